"""The chat page in a real headless Chromium (Debian's chromium + chromedriver, driven by
selenium) against a live server on the tiny model: type, send, see the thought and the answer
stream, tokens/s, code blocks, stop a long reply (the slot is freed), start a new chat."""

from __future__ import annotations

import shutil

import pytest
import requests

from conftest import Server, wait_for


@pytest.fixture(scope="module")
def page_server(tiny_gguf):
    # A long context: with end tokens banned a reply runs until stopped or the context is full,
    # and the tiny model fills 4096 tokens in a second or two, sometimes before Stop is clicked.
    srv = Server(tiny_gguf, "--alias", "tiny", "--ctx", "32768")
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-dev-shm-usage",
                 f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}"):
        opts.add_argument(flag)
    if shutil.which("chromium"):
        opts.binary_location = shutil.which("chromium")
    driver = webdriver.Chrome(service=Service(shutil.which("chromedriver") or "/usr/bin/chromedriver"), options=opts)
    driver.set_page_load_timeout(30)
    yield driver
    driver.quit()


def busy(server) -> float:
    text = requests.get(server.url + "/metrics").text
    return float(next(line.split()[-1] for line in text.splitlines() if line.startswith("qwq_local_slots_busy ")))


def test_chat_page_streams_thought_and_answer(browser, page_server):
    from selenium.webdriver.common.by import By

    browser.get(page_server.url + "/")
    assert "qwq-local" in browser.title
    assert wait_for(lambda: "tiny" in browser.find_element(By.ID, "model").text)
    browser.find_element(By.ID, "budget").send_keys("4")  # the tiny model closes no thought by itself
    browser.find_element(By.ID, "input").send_keys("Hello there")
    browser.find_element(By.ID, "send").click()
    assert wait_for(lambda: browser.find_element(By.CSS_SELECTOR, ".answer").text.strip(), timeout=30)
    thought = browser.find_element(By.CSS_SELECTOR, "details.thought")
    assert thought.get_attribute("textContent").strip()  # the thought came first, then collapsed
    assert thought.get_attribute("open") is None
    assert "tokens/s" in browser.find_element(By.ID, "stats").text
    if browser.find_element(By.ID, "stop").is_enabled():  # the answer may still be running
        browser.find_element(By.ID, "stop").click()
    assert wait_for(lambda: browser.find_element(By.ID, "send").is_enabled(), timeout=30)
    assert browser.find_element(By.CSS_SELECTOR, ".user").text == "Hello there"
    # code fences become <pre><code> blocks, other text stays text (never HTML)
    browser.execute_script("render(arguments[0], 'see:\\n```python\\nprint(1)\\n```\\n<b>x</b>')",
                           browser.find_element(By.CSS_SELECTOR, ".answer"))
    assert browser.find_element(By.CSS_SELECTOR, ".answer pre code").text == "print(1)"
    assert "<b>x</b>" in browser.find_element(By.CSS_SELECTOR, ".answer").text


def test_chat_page_stop_frees_the_slot_and_new_chat_clears(browser, page_server):
    from selenium.webdriver.common.by import By

    browser.get(page_server.url + "/")
    browser.find_element(By.ID, "budget").clear()
    # The tiny model may end a reply at any token; so that Stop meets a running reply, the
    # page's request also asks the server to ban end tokens (llama.cpp's `ignore_eos`): the reply
    # then runs to the end of the 32768-token context unless stopped.
    browser.execute_script("""
        const original = window.fetch;
        window.fetch = (url, init) => {
            if (init && init.body) init.body = JSON.stringify(Object.assign(JSON.parse(init.body), {ignore_eos: true}));
            return original(url, init);
        };""")
    browser.find_element(By.ID, "input").send_keys("Tell me a long story")
    browser.find_element(By.ID, "send").click()
    # textContent, not .text: the thought folds (and hides) once the answer starts
    assert wait_for(lambda: browser.find_element(By.CSS_SELECTOR, "details.thought > div").get_attribute(
        "textContent"), timeout=20)
    assert busy(page_server) == 1
    browser.find_element(By.ID, "stop").click()
    assert wait_for(lambda: browser.find_elements(By.CSS_SELECTOR, ".stopped"), timeout=10)
    assert wait_for(lambda: busy(page_server) == 0, timeout=10)  # the server saw the disconnect
    assert browser.find_element(By.ID, "send").is_enabled()
    browser.find_element(By.ID, "new").click()
    assert browser.find_elements(By.CSS_SELECTOR, ".turn") == []
