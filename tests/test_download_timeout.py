"""A start whose weights are still downloading is not killed by its health_timeout while
bytes keep arriving in the model's download folder; once they stop for a whole
health_timeout, the start fails and says so. Driven through the real engine run and
supervisor, with the fake engine and a folder that the test grows."""

from __future__ import annotations

import asyncio
import textwrap
from pathlib import Path

import pytest

from sparkstack.config import load_config
from sparkstack.runtime import ProcessRuntime
from sparkstack.scheduler import State
from sparkstack.scheduler.refusal import Reason, Refusal
from sparkstack.supervisor import Supervisor

from .conftest import fake

HEALTH_TIMEOUT = 1.0


def catalog(tmp_path: Path, *engine_args: object) -> Path:
    path = tmp_path / "c.yaml"
    path.write_text(textwrap.dedent(f"""
        memory_gb: 4
        models:
          big:
            engine: vllm
            command: {fake(*engine_args)}
            weights: acme/big
            env: {{HF_HUB_CACHE: "{tmp_path / 'hub'}"}}
            health_timeout: {HEALTH_TIMEOUT}s
            memory_gb: 1
    """))
    return path


class Download:
    """Half-written weights arriving in the engine's hub cache, a chunk at a time."""

    def __init__(self, tmp_path: Path):
        blobs = tmp_path / "hub" / "models--acme--big" / "blobs"
        blobs.mkdir(parents=True)
        self.file = blobs / "0123abcd.incomplete"
        self.last_write = 0.0

    async def grow(self, until: asyncio.Event | None = None, seconds: float = 0.0) -> None:
        """Append 4 KB every 0.1 s until the event is set, or for `seconds`."""
        loop = asyncio.get_running_loop()
        end = loop.time() + seconds
        while (until is not None and not until.is_set()) or loop.time() < end:
            with self.file.open("ab") as f:
                f.write(b"w" * 4096)
            self.last_write = loop.time()
            await asyncio.sleep(0.1)


async def failed_start(sup: Supervisor) -> Refusal:
    """Ask for "big" and return why its start failed."""
    ticket = sup.submit("big")
    try:
        with pytest.raises(Refusal) as e:
            await asyncio.wait_for(sup.wait(ticket), 60)
    finally:
        sup.finish(ticket)
    return e.value


async def test_a_start_lives_past_its_health_timeout_while_weights_arrive(tmp_path):
    # The engine turns healthy after 3 health_timeouts; bytes arrive the whole time.
    config = load_config(catalog(tmp_path, "--ready-delay", 3 * HEALTH_TIMEOUT))
    download = Download(tmp_path)
    loop = asyncio.get_running_loop()
    async with Supervisor(config, {"process": ProcessRuntime()}, 4,
                          data_dir=tmp_path / "data") as sup:
        done = asyncio.Event()
        grower = asyncio.create_task(download.grow(until=done))
        began = loop.time()
        ticket = sup.submit("big")
        try:
            await asyncio.wait_for(sup.wait(ticket), 60)
        finally:
            sup.finish(ticket)
            done.set()
            await grower
        assert sup.state("big").state is State.READY
        assert loop.time() - began > 2 * HEALTH_TIMEOUT, "it outlived its health_timeout"
        assert any("weights still downloading" in line and "health_timeout starts again" in line
                   for line in sup.logs["big"].tail(50))


async def test_a_stalled_download_fails_the_start_after_one_health_timeout(tmp_path):
    config = load_config(catalog(tmp_path, "--never-ready"))
    download = Download(tmp_path)
    loop = asyncio.get_running_loop()
    async with Supervisor(config, {"process": ProcessRuntime()}, 4,
                          data_dir=tmp_path / "data") as sup:
        began = loop.time()
        # Bytes for twice the health_timeout, then nothing.
        grower = asyncio.create_task(download.grow(seconds=2 * HEALTH_TIMEOUT))
        try:
            refusal = await failed_start(sup)
        finally:
            await grower
        failed = loop.time()
        assert refusal.reason is Reason.START_TIMEOUT
        assert download.last_write - began >= 2 * HEALTH_TIMEOUT - 0.2
        assert failed > download.last_write, "not while bytes were still arriving"
        assert "weights download stalled in" in (refusal.error or "")
        assert "sparkstack pull big" in (refusal.error or "")
        assert sup.state("big").state is State.STOPPED


async def test_without_a_download_the_health_timeout_is_as_before(tmp_path):
    config = load_config(catalog(tmp_path, "--never-ready"))
    loop = asyncio.get_running_loop()
    async with Supervisor(config, {"process": ProcessRuntime()}, 4,
                          data_dir=tmp_path / "data") as sup:
        began = loop.time()
        refusal = await failed_start(sup)
        assert refusal.reason is Reason.START_TIMEOUT
        assert "stalled" not in (refusal.error or "")
        assert loop.time() - began < 20 * HEALTH_TIMEOUT
