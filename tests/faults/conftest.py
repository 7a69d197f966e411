"""Every fault test ends with no engine process left running (checked after the gateway
fixture has stopped its gateway)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from ..conftest import pid_alive, pids


@pytest.fixture(autouse=True)
async def no_engine_left(tmp_path: Path) -> AsyncIterator[None]:
    yield
    started = [p for f in tmp_path.glob("*.starts") for p in pids(f)]
    try:
        async with asyncio.timeout(20):
            while any(pid_alive(p) for p in started):
                await asyncio.sleep(0.05)
    except TimeoutError:
        left = [p for p in started if pid_alive(p)]
        pytest.fail(f"engine processes left running after the test: {left}")
