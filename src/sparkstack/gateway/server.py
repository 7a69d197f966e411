"""Running the gateway: listen, serve until SIGTERM/SIGINT, then shut down cleanly.

Shutdown order matters: stop accepting connections, refuse new requests (503), let
in-flight requests finish (bounded by `shutdown_timeout`), then stop every engine we
started, so nothing is left holding GPU memory.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import signal
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from aiohttp import web

from ..config import Config, parse_listen
from ..runtime import ProcessRuntime, Runtime
from ..runtime.docker import DockerRuntime
from ..supervisor import Supervisor
from ..telemetry.memory import detect_budget
from .app import create_app
from .auth import Keyring

log = logging.getLogger("sparkstack")


@dataclass
class ServeInfo:
    url: str
    budget_gb: float
    budget_source: str
    supervisor: Supervisor


def memory_budget(config: Config) -> tuple[float, str]:
    s = config.settings
    if s.memory_gb == "auto":
        return detect_budget(s.memory_reserve_gb)
    return float(s.memory_gb), "memory_gb in the config"


async def serve(
    config: Config,
    listen: str | None = None,
    *,
    extra_keys: list[str] | None = None,
    keep_engines: bool = False,
    data_dir: Path,
    on_ready: Callable[[ServeInfo], None] | None = None,
    stop: asyncio.Event | None = None,
) -> None:
    host, port = parse_listen(listen or config.settings.listen)
    budget, source = memory_budget(config)
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    runtimes: dict[str, Runtime] = {"process": ProcessRuntime()}
    if any(m.cfg.runtime == "docker" for m in config.models.values()):
        runtimes["docker"] = DockerRuntime()
    supervisor = Supervisor(
        config, runtimes, budget, data_dir=data_dir, keep_engines=keep_engines,
        check_free_memory=config.settings.memory_gb == "auto")
    keys = Keyring(config, extra_keys or [])
    app = create_app(config, supervisor, keys)
    runner = web.AppRunner(app, handler_cancellation=True, access_log=None,
                           shutdown_timeout=config.settings.shutdown_timeout)
    await runner.setup()
    # Full garbage collections paused 400 relayed streams for ~50 ms (docs/performance.md):
    # move everything alive at start-up out of the collector's sight and collect young
    # objects less often.
    gc.collect()
    gc.freeze()
    gc.set_threshold(20_000, 20, 20)
    async with supervisor:
        site = web.TCPSite(runner, host, port, reuse_address=True)
        await site.start()
        if on_ready:
            on_ready(ServeInfo(f"http://{host}:{port}", budget, source, supervisor))
        await stop.wait()
        log.info("shutting down: waiting for in-flight requests, then stopping engines")
        await site.stop()
        await supervisor.shutdown(config.settings.shutdown_timeout)
    await runner.cleanup()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.remove_signal_handler(sig)
