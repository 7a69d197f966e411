"""The idle bound's watchdog (gateway/stall.py) on its own: it fires only after `idle`
seconds without bytes, and never mistakes a client's cancellation for a stall."""

from __future__ import annotations

import asyncio
from unittest.mock import Mock

import pytest
from aiohttp import StreamReader
from aiohttp.base_protocol import BaseProtocol

from sparkstack.gateway.stall import EngineStalled, Watchdog


async def test_silence_before_the_headers_cancels_and_counts_as_a_stall():
    loop = asyncio.get_running_loop()
    began = loop.time()
    dog = Watchdog(0.3)
    with pytest.raises(asyncio.CancelledError):
        await asyncio.sleep(30)  # an engine that never answers
    assert dog.stalled() and loop.time() - began >= 0.3
    dog.close()


async def test_bytes_keep_it_quiet_and_silence_after_them_fails_the_body():
    loop = asyncio.get_running_loop()
    dog = Watchdog(1.0)
    protocol = BaseProtocol(loop)
    protocol.connection_made(Mock())  # a connected reader, as a live response has
    content = StreamReader(protocol, 2**16, loop=loop)
    dog.body(content)
    for _ in range(30):  # 1.5 s of bytes every 50 ms: never 1 s of silence
        await asyncio.sleep(0.05)
        dog.feed()
    assert not dog.fired
    silent_from = loop.time()
    with pytest.raises(EngineStalled):
        await content.readany()
    assert loop.time() - silent_from >= 0.95 and not dog.stalled(), "no task was cancelled"
    dog.close()


async def guarded_request(dogs: list[Watchdog]) -> bool:
    """A request under a 60 s watchdog that waits 30 s; whether it was stalled, if cut."""
    dog = Watchdog(60)
    dogs.append(dog)
    try:
        await asyncio.sleep(30)
    except asyncio.CancelledError:
        return dog.stalled()
    finally:
        dog.close()
    return True


async def test_a_client_going_away_is_not_a_stall():
    task = asyncio.create_task(guarded_request([]))
    await asyncio.sleep(0.05)
    task.cancel()  # what aiohttp does when the client disconnects
    assert await task is False


async def test_a_client_going_away_as_the_bound_passes_is_still_a_cancellation():
    dogs: list[Watchdog] = []
    task = asyncio.create_task(guarded_request(dogs))
    await asyncio.sleep(0.05)
    (dog,) = dogs
    dog.last -= 60  # the bound has passed: the watchdog cancels, and so does the client,
    dog._check()  # both before the request runs again
    task.cancel()
    assert await task is False, "two cancellations, one ours: the client's wins"


async def test_a_short_bound_is_kept_beside_long_ones():
    """One sweep watches every answer: a short bound registered after long ones (a model
    with a 0.4 s stream_idle_timeout beside the default 300 s) still fires on time, and
    the long ones do not."""
    loop = asyncio.get_running_loop()
    long_ones = [Watchdog(300) for _ in range(50)]
    began = loop.time()
    short = Watchdog(0.4)
    with pytest.raises(asyncio.CancelledError):
        await asyncio.sleep(30)
    took = loop.time() - began
    assert short.stalled() and 0.4 <= took < 0.4 * 1.25 + 0.3, took
    assert not any(d.fired for d in long_ones)
    for d in (*long_ones, short):
        d.close()
