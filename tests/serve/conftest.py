"""A real `qwq-local serve` on 127.0.0.1 (port 0: a free one) with the tiny model, as a child
process started through the command line, for the server and chat-page tests."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time

import pytest


class Server:
    def __init__(self, model, *args: str, env: dict | None = None) -> None:
        cmd = [sys.executable, "-m", "qwq_local.cli", "serve", "-m", str(model), "--port", "0", "--ctx", "512",
               "--threads", "1", *args]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                     env={**os.environ, **(env or {})})
        line = self.proc.stdout.readline()  # "qwq-local: serving ... at http://127.0.0.1:PORT/v1 ..."
        match = re.search(r"(http://127\.0\.0\.1:\d+)", line)
        if not match:
            self.proc.kill()
            raise RuntimeError(f"server did not start: {line!r} {self.proc.stderr.read()[-2000:]}")
        self.url = match.group(1)

    def stop(self, sig=signal.SIGTERM, timeout: float = 15.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()
            self.proc.stdout.close()
            self.proc.stderr.close()


@pytest.fixture(scope="session")
def server(tiny_gguf):
    srv = Server(tiny_gguf, "--alias", "tiny", "--ctx", "2048")
    yield srv
    srv.stop()


@pytest.fixture()
def client(server):
    from openai import OpenAI

    return OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)


def wait_for(predicate, timeout: float = 10.0, step: float = 0.05):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        value = predicate()
        if value:
            return value
        time.sleep(step)
    return predicate()
