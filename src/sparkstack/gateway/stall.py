"""The idle bound on an engine's answer (`stream_idle_timeout`), without a timer per chunk.

A relayed answer records the time of each chunk (one store); a single timer per request
looks at it only when the bound could have passed, and re-arms itself for the real
deadline when bytes came meanwhile. aiohttp's own `sock_read` timeout re-creates a timer
on every read instead: measured at 400 paced streams (20,000 chunks/s), ~0.1 of a core
more for the gateway.

Until the engine's headers arrive, a stall cancels the request (as `asyncio.timeout`
does, and as safely: a client's own cancellation is told apart); once the body flows, it
fails the body's reader, so the relay ends the answer where it is.
"""

from __future__ import annotations

import asyncio

from aiohttp import StreamReader


class EngineStalled(Exception):
    """The engine sent nothing for `stream_idle_timeout` seconds."""


class Watchdog:
    __slots__ = ("_cancelling", "_content", "_handle", "_loop", "_task", "fired", "idle",
                 "last")

    def __init__(self, idle: float) -> None:
        self._loop = asyncio.get_running_loop()
        task = asyncio.current_task()
        assert task is not None
        self._task = task
        self._cancelling = task.cancelling()
        self._content: StreamReader | None = None
        self.idle = idle
        self.fired = False
        self.last = self._loop.time()
        self._handle = self._loop.call_at(self.last + idle, self._check)

    def feed(self) -> None:
        """Bytes arrived."""
        self.last = self._loop.time()

    def body(self, content: StreamReader) -> None:
        """The headers arrived: from now on a stall fails this reader. (Had the bound passed
        meanwhile, the request would have been cancelled at its await: no race here.)"""
        self._content = content
        self.feed()

    def _check(self) -> None:
        due = self.last + self.idle
        if self._loop.time() < due:
            self._handle = self._loop.call_at(due, self._check)
            return
        self.fired = True
        if self._content is not None:
            self._content.set_exception(EngineStalled())
        else:
            self._task.cancel()

    def stalled(self) -> bool:
        """On a CancelledError: True if it was ours alone (then it is a stall, not a client
        that went away or a shutdown)."""
        return (self.fired and self._content is None
                and self._task.uncancel() <= self._cancelling)

    def close(self) -> None:
        self._handle.cancel()
