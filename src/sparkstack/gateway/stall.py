"""The idle bound on an engine's answer (`stream_idle_timeout`), without a timer per request.

A relayed answer records the time of each chunk (one store). One timer per event loop
(the sweep) looks at every answer being relayed, a few times per bound and at least once
a second; a stall is noticed within a quarter of the bound after it passed (at most a
second). aiohttp's own `sock_read` timeout re-creates a timer on every read instead:
measured at 400 paced streams (20,000 chunks/s), ~0.1 of a core more for the gateway; a
timer per request still cost ~5% of the gateway's throughput on small requests
(docs/performance-history.md).

Until the engine's headers arrive, a stall cancels the request (as `asyncio.timeout`
does, and as safely: a client's own cancellation is told apart); once the body flows, it
fails the body's reader, so the relay ends the answer where it is.
"""

from __future__ import annotations

import asyncio
from typing import ClassVar

from aiohttp import StreamReader

MAX_TICK_S = 1.0  # the sweep's longest interval: a bound is checked at least this often
TICKS_PER_BOUND = 4  # ... and this many times within the shortest bound being watched


class EngineStalled(Exception):
    """The engine sent nothing for `stream_idle_timeout` seconds."""


class Watchdog:
    __slots__ = ("_cancelling", "_content", "_loop", "_sweep", "_task", "fired", "idle", "last")

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
        self._sweep = _Sweep.of(self._loop)
        self._sweep.watch(self)

    def feed(self) -> None:
        """Bytes arrived."""
        self.last = self._loop.time()

    def body(self, content: StreamReader) -> None:
        """The headers arrived: from now on a stall fails this reader. (Had the bound passed
        meanwhile, the request would have been cancelled at its await: no race here.)"""
        self._content = content
        self.feed()

    def _check(self) -> None:
        """Fire if the bound has passed since the last bytes."""
        if self.fired or self._loop.time() < self.last + self.idle:
            return
        self.fired = True
        self._sweep.dogs.discard(self)
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
        self._sweep.dogs.discard(self)


class _Sweep:
    """The one timer of an event loop that checks every watchdog on it."""

    # Only while something is watched, so a closed loop is never kept.
    _loops: ClassVar[dict[asyncio.AbstractEventLoop, _Sweep]] = {}

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.dogs: set[Watchdog] = set()
        self.due = 0.0
        self.handle: asyncio.TimerHandle | None = None

    @classmethod
    def of(cls, loop: asyncio.AbstractEventLoop) -> _Sweep:
        sweep = cls._loops.get(loop)
        if sweep is None:
            sweep = cls._loops[loop] = cls(loop)
        return sweep

    def watch(self, dog: Watchdog) -> None:
        self.dogs.add(dog)
        due = self.loop.time() + min(MAX_TICK_S, dog.idle / TICKS_PER_BOUND)
        if self.handle is None or due < self.due:
            if self.handle is not None:
                self.handle.cancel()
            self.due = due
            self.handle = self.loop.call_at(due, self._run)

    def _run(self) -> None:
        self.handle = None
        for dog in list(self.dogs):
            dog._check()
        if not self.dogs:  # idle: forget this loop until a request comes
            self._loops.pop(self.loop, None)
            return
        tick = min(MAX_TICK_S, min(d.idle for d in self.dogs) / TICKS_PER_BOUND)
        self.due = self.loop.time() + tick
        self.handle = self.loop.call_at(self.due, self._run)
