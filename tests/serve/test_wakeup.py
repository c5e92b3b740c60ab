"""serve.wakeup.LoopWaker: waking the asyncio loop from the decode thread must not hand the loop
the GIL before the decode thread gets to llama_decode."""

from __future__ import annotations

import asyncio
import threading

import pytest

from qwq_local.serve import wakeup
from qwq_local.serve.wakeup import LoopWaker


@pytest.fixture
def loop_thread():
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    yield loop
    loop.call_soon_threadsafe(loop.stop)
    thread.join(5)
    loop.close()


def _waker(loop) -> LoopWaker:
    async def make():
        return LoopWaker.of(loop)
    return asyncio.run_coroutine_threadsafe(make(), loop).result(5)


def _future(loop) -> asyncio.Future:
    async def make():
        return loop.create_future()
    return asyncio.run_coroutine_threadsafe(make(), loop).result(5)


def test_wake_resolves_futures_from_another_thread(loop_thread):
    waker = _waker(loop_thread)
    assert LoopWaker.of(loop_thread) is waker  # one per loop
    futures = [_future(loop_thread) for _ in range(3)]
    for f in futures:
        waker.wake(f)  # the second and third ride on the first's pending wake-up (or a new one)
    for f in futures:
        asyncio.run_coroutine_threadsafe(asyncio.wait_for(asyncio.shield(f), 5), loop_thread).result(6)
        assert f.done()
    waker.wake(futures[0])  # an already resolved future is left alone


def test_wake_keeps_the_gil(loop_thread, monkeypatch):
    """wake() writes its byte through a ctypes.PyDLL function, which keeps the GIL. os.write and
    socket.send (call_soon_threadsafe) release it around the syscall, and the loop thread, woken
    by that very syscall, took the GIL and ran its per-chunk work while the decode thread waited
    to enter llama_decode (0.43-0.63 ms per token, docs/serve.md, Speed). A timing probe cannot
    show this here reliably (the loop wins the race only sometimes on an idle machine), so the
    test checks the means."""
    import ctypes
    import socket

    waker = _waker(loop_thread)
    assert waker._fds is not None, "this platform should wake through the pipe"
    assert LoopWaker._write._flags_ & ctypes._FUNCFLAG_PYTHONAPI, "the write must be a PyDLL function"

    def released(*args):
        raise AssertionError("wake() made a syscall that releases the GIL")
    f = _future(loop_thread)
    with monkeypatch.context() as patch:  # only around wake(): the test's own calls use both
        patch.setattr(wakeup.os, "write", released)
        patch.setattr(socket.socket, "send", released)
        waker.wake(f)
    asyncio.run_coroutine_threadsafe(asyncio.wait_for(asyncio.shield(f), 5), loop_thread).result(6)


def test_fallback_without_libc_write(loop_thread, monkeypatch):
    monkeypatch.setattr(LoopWaker, "_write", None)
    monkeypatch.setattr(LoopWaker, "_write_probed", True)
    waker = LoopWaker(loop_thread)  # direct: LoopWaker.of would return the loop's existing one
    assert waker._fds is None
    f = _future(loop_thread)
    waker.wake(f)
    asyncio.run_coroutine_threadsafe(asyncio.wait_for(asyncio.shield(f), 5), loop_thread).result(6)


def test_libc_write_is_found_here():
    assert wakeup._gil_holding_write() is not None
