"""The terminal side of `qwq-local run` and `qwq-local chat`: streaming output with the thought
set apart, and the chat REPL (history, multi-line input, slash commands, Ctrl-C handling).

This is CLI code (it prints); the library it drives is `qwq_local.runtime` (QwQ.stream).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sys
import threading
from pathlib import Path
from typing import Any, Callable, TextIO

from ..errors import QwQLocalError, UsageError

DIM, RESET = "\x1b[2m", "\x1b[0m"

HELP = """commands:
  /reset              forget the conversation (keeps the system prompt)
  /save FILE          write the conversation as JSON messages
  /load FILE          read a conversation saved with /save
  /think show|hide    show or hide the model's thinking
  /exit               leave (also Ctrl-D, or Ctrl-C at the prompt)
input: end a line with \\ to continue it; a line of \"\"\" starts and ends a multi-line block
Ctrl-C while the model writes stops it and keeps the partial answer"""


def _is_tty(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


class Printer:
    """Writes streamed events: thought (dimmed on a terminal, or hidden) and answer."""

    def __init__(self, *, thought_stream: TextIO, answer_stream: TextIO, show_thinking: bool) -> None:
        self.thought_stream = thought_stream
        self.answer_stream = answer_stream
        self.show_thinking = show_thinking
        # Dim only on a terminal, and not when the user opted out of colour (no-color.org).
        self.dim = _is_tty(thought_stream) and not os.environ.get("NO_COLOR")
        self._in_thought = False
        self._wrote_answer = False

    def event(self, kind: str, text: str) -> None:
        if kind == "thinking":
            if not self.show_thinking:
                return
            if not self._in_thought and self.dim:
                self.thought_stream.write(DIM)
            self._in_thought = True
            self.thought_stream.write(text)
            self.thought_stream.flush()
        elif kind == "content":
            self._end_thought()
            self._wrote_answer = True
            self.answer_stream.write(text)
            self.answer_stream.flush()

    def _end_thought(self) -> None:
        if self._in_thought:
            self.thought_stream.write((RESET if self.dim else "") + "\n")
            self.thought_stream.flush()
            self._in_thought = False

    def finish(self) -> None:
        self._end_thought()
        if self._wrote_answer:
            self.answer_stream.write("\n")
            self.answer_stream.flush()
        self._wrote_answer = False


def length_note(reply, *, n_ctx: int, in_chat: bool = False) -> str:
    """Why a reply ended with finish_reason "length": the token cap, or a full context (say so,
    and what makes room: a longer answer needs a larger context, not a larger --max-tokens)."""
    usage = reply.usage
    # At the context end every position is used and the last sampled token had no room left.
    if usage["prompt_tokens"] + usage["completion_tokens"] + usage.get("injected_tokens", 0) > n_ctx:
        room = "/reset or a larger --ctx makes room" if in_chat else "a larger --ctx makes room"
        return f"[stopped: the context of {n_ctx} tokens is full after {usage['completion_tokens']} tokens; {room}]"
    return f"[stopped at the token limit after {usage['completion_tokens']} tokens]"


def stream_reply(model, messages: list[dict], printer: Printer, *, options: dict, cancel=None):
    """Stream one reply through the printer; returns the Reply."""
    reply = None
    try:
        for event in model.stream(messages, cancel=cancel, **options):
            if event.kind == "done":
                reply = event.reply
            else:
                printer.event(event.kind, event.text)
    finally:
        printer.finish()
    return reply


@contextlib.contextmanager
def ctrl_c_cancels(cancel):
    """While the model writes, Ctrl-C sets `cancel` (the loop stops after the current token);
    a second Ctrl-C before it stops raises KeyboardInterrupt as usual."""
    def handler(signum, frame):
        if cancel.is_set():
            raise KeyboardInterrupt
        cancel.set()

    try:
        previous = signal.signal(signal.SIGINT, handler)
    except ValueError:  # not the main thread: leave Ctrl-C alone
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


@contextlib.contextmanager
def sigint_wakes_main_thread():
    """While the main thread waits for input, make Ctrl-C interrupt that wait.

    The kernel hands a process's SIGINT to any thread that does not block it, and native
    worker threads (OpenBLAS's from numpy, OpenMP's from llama.cpp) qualify. When one of them
    gets it, Python only sets a flag, and the main thread sleeps on in readline's select()
    until the next key: Ctrl-C at the prompt seemed to do nothing. Python writes every caught
    signal to the wakeup fd; a watcher thread reads it and pokes the main thread with a signal
    whose handler does nothing, which interrupts select() so the pending SIGINT is handled
    there. It pokes until the main thread has left the wait, because a poke that lands just
    before readline enters select() is lost (the same race loses a SIGINT that the main thread
    itself gets at that moment). Re-sending SIGINT itself would count one Ctrl-C twice."""
    poke = getattr(signal, "SIGUSR2", None)
    if poke is None or not hasattr(signal, "pthread_kill") or threading.current_thread() is not threading.main_thread():
        yield
        return
    main_id = threading.main_thread().ident
    leaving = threading.Event()
    r, w = os.pipe()
    os.set_blocking(w, False)
    previous_poke = signal.signal(poke, lambda signum, frame: None)
    previous_fd = signal.set_wakeup_fd(w, warn_on_full_buffer=False)

    def watch() -> None:
        while True:
            data = os.read(r, 64)
            if not data or 0 in data:  # 0: the sentinel written on the way out
                return
            if signal.SIGINT not in data:
                continue
            for _ in range(40):  # 2 s at most, in case something swallows the interrupt
                with contextlib.suppress(OSError, ProcessLookupError):
                    signal.pthread_kill(main_id, poke)
                if leaving.wait(0.05):
                    return

    watcher = threading.Thread(target=watch, name="qwq-local-sigint", daemon=True)
    watcher.start()
    try:
        yield
    finally:
        leaving.set()
        signal.set_wakeup_fd(previous_fd)
        os.set_blocking(w, True)
        os.write(w, b"\0")
        watcher.join(timeout=5)
        os.close(w)
        # Only once the watcher is gone: a late poke under the default SIGUSR2 action would
        # kill the process.
        if not watcher.is_alive():
            os.close(r)
            signal.signal(poke, previous_poke)


def read_message(read_line: Callable[[str], str]) -> str | None:
    """One user message: a line, lines joined by a trailing backslash, or a \"\"\" block.
    None on end of input."""
    try:
        line = read_line(">>> ")
    except EOFError:
        return None
    if line.strip() == '"""':
        lines = []
        while True:
            try:
                line = read_line("... ")
            except EOFError:
                break
            if line.strip() == '"""':
                break
            lines.append(line)
        return "\n".join(lines)
    lines = []
    while line.endswith("\\"):
        lines.append(line[:-1])
        try:
            line = read_line("... ")
        except EOFError:
            line = ""
            break
    lines.append(line)
    return "\n".join(lines)


def load_messages(path: Path) -> list[dict]:
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UsageError(f"no such file: {path}") from None
    except (OSError, ValueError) as exc:
        raise UsageError(f"cannot read a conversation from {path}: {exc}") from None
    if isinstance(data, dict):
        data = data.get("messages")
    if not isinstance(data, list) or not all(isinstance(m, dict) and isinstance(m.get("role"), str) for m in data):
        raise UsageError(f"{path} does not hold a list of {{'role': ..., 'content': ...}} messages (as /save writes)")
    return data


def repl(model, *, system: str | None, options: dict, show_thinking: bool,
         read_line: Callable[[str], str] = input, out: TextIO | None = None, err: TextIO | None = None) -> int:
    """The chat loop; returns the exit code."""
    from ..runtime.decode import Cancel

    out = out or sys.stdout
    err = err or sys.stderr
    base = [{"role": "system", "content": system}] if system else []
    messages: list[dict[str, Any]] = list(base)
    say = lambda text: (err.write(text + "\n"), err.flush())  # noqa: E731
    say(f"chatting with {Path(model.path).name} (context {model.n_ctx}); /help for commands, Ctrl-D to leave")
    while True:
        try:
            with sigint_wakes_main_thread():
                text = read_message(read_line)
        except KeyboardInterrupt:
            out.write("\n")
            return 0
        if text is None:
            out.write("\n")
            return 0
        stripped = text.strip()
        if not stripped:
            continue
        if stripped.startswith("/"):
            word, _, arg = stripped.partition(" ")
            arg = arg.strip()
            if word in ("/exit", "/quit", "/bye"):
                return 0
            if word == "/help":
                say(HELP)
            elif word == "/reset":
                messages = list(base)
                model.reset()
                say("conversation cleared")
            elif word == "/save":
                if not arg:
                    say("usage: /save FILE")
                    continue
                try:
                    Path(arg).expanduser().write_text(json.dumps(messages, indent=2, ensure_ascii=False) + "\n",
                                                      encoding="utf-8")
                except OSError as exc:
                    say(f"error: cannot write {arg}: {exc}")
                    continue
                say(f"saved {len(messages)} messages to {arg}")
            elif word == "/load":
                if not arg:
                    say("usage: /load FILE")
                    continue
                try:
                    loaded = load_messages(Path(arg).expanduser())
                    # Refuse now what the template would refuse at the next turn.
                    model.render_prompt(loaded, add_generation_prompt=False)
                except QwQLocalError as exc:
                    say(f"error: {exc}; the conversation is unchanged")
                    continue
                messages = loaded
                say(f"loaded {len(messages)} messages from {arg}")
            elif word == "/think":
                if arg not in ("show", "hide"):
                    say("usage: /think show|hide")
                    continue
                show_thinking = arg == "show"
                say(f"thinking will be {'shown' if show_thinking else 'hidden'}")
            else:
                say(f"unknown command {word}; /help lists them")
            continue
        messages.append({"role": "user", "content": text})
        printer = Printer(thought_stream=out, answer_stream=out, show_thinking=show_thinking)
        cancel = Cancel()
        try:
            with ctrl_c_cancels(cancel):
                reply = stream_reply(model, messages, printer, options=options, cancel=cancel)
        except KeyboardInterrupt:
            out.write("\n")
            return 0
        except QwQLocalError as exc:
            messages.pop()
            say(f"error: {exc}")
            continue
        messages.append(reply.message())
        if reply.finish_reason == "interrupted":
            say("[stopped; the partial answer is kept]")
        elif reply.finish_reason == "length":
            say(length_note(reply, n_ctx=model.n_ctx, in_chat=True))
        t = reply.timings
        say(f"[{reply.usage['completion_tokens']} tokens, {t['gen_tps']:.1f} tok/s; "
            f"prompt {reply.usage['prompt_tokens_decoded']} new tokens]")
