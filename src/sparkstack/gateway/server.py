"""Running the gateway: listen, serve until SIGTERM/SIGINT, then shut down cleanly.

Shutdown order matters: stop accepting connections, refuse new requests (503), let
in-flight requests finish (bounded by `shutdown_timeout`), then stop every engine we
started, so nothing is left holding GPU memory.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import ipaddress
import logging
import signal
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from aiohttp import web

from .. import redact
from ..config import Config, ConfigError, parse_listen
from ..errors import ApiError
from ..runtime import ProcessRuntime, Runtime
from ..runtime.docker import DockerRuntime
from ..runtime.process import ENGINES_DIR
from ..supervisor import Supervisor
from ..telemetry.access import access_line
from ..telemetry.memory import detect_budget
from .app import create_app, reload_config
from .auth import Keyring
from .limits import MAX_LINE_BYTES, AppRunner

log = logging.getLogger("sparkstack")


@dataclass
class ServeInfo:
    url: str
    budget_gb: float
    budget_source: str
    supervisor: Supervisor
    app: web.Application


def is_loopback(host: str) -> bool:
    """127.0.0.0/8, ::1 or `localhost`; any other name counts as reachable from outside."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


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
    access_log: bool = False,
    data_dir: Path,
    on_ready: Callable[[ServeInfo], None] | None = None,
    stop: asyncio.Event | None = None,
) -> None:
    host, port = parse_listen(listen or config.settings.listen)
    keys = Keyring(config, extra_keys or [])
    if not keys and not is_loopback(host):
        raise ConfigError([
            f"refusing to listen on {host}:{port}, an address other machines can reach, "
            "with no API key configured: set api_keys (or $SPARKSTACK_API_KEY), or listen "
            "on 127.0.0.1 and reach it through an SSH tunnel"])
    redact.register(*keys.secrets())  # masked wherever a log or engine output shows them
    redact.register(*(p.api_key() for p in config.settings.peers))
    budget, source = memory_budget(config)
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    runtimes: dict[str, Runtime] = {"process": ProcessRuntime(data_dir / ENGINES_DIR)}
    if any(m.cfg.runtime == "docker" for m in config.models.values()):
        runtimes["docker"] = DockerRuntime()
    supervisor = Supervisor(
        config, runtimes, budget, data_dir=data_dir, keep_engines=keep_engines,
        check_free_memory=config.settings.memory_gb == "auto")
    app = create_app(config, supervisor, keys)
    if access_log:
        supervisor.bus.subscribe(access_line)
    s = config.settings
    runner = AppRunner(app, handler_cancellation=True, access_log=None,
                       shutdown_timeout=s.shutdown_timeout,
                       # A connection silent this long before its request is complete
                       # (or idle between requests) is closed: no slow-header hold.
                       keepalive_timeout=s.client_body_timeout,
                       max_line_size=MAX_LINE_BYTES, max_field_size=MAX_LINE_BYTES)
    await runner.setup()
    # Full garbage collections paused 400 relayed streams for ~50 ms (docs/performance.md):
    # move everything alive at start-up out of the collector's sight and collect young
    # objects less often.
    gc.collect()
    gc.freeze()
    gc.set_threshold(20_000, 20, 20)
    def on_sighup() -> None:
        async def reload() -> None:
            with contextlib.suppress(ApiError):  # refused: logged, the old config kept
                await reload_config(app)
        reloads.add(task := loop.create_task(reload()))
        task.add_done_callback(reloads.discard)

    reloads: set[asyncio.Task[None]] = set()
    loop.add_signal_handler(signal.SIGHUP, on_sighup)
    async with supervisor:
        site = web.TCPSite(runner, host, port, reuse_address=True)
        await site.start()
        if on_ready:
            on_ready(ServeInfo(f"http://{host}:{port}", budget, source, supervisor, app))
        await stop.wait()
        log.info("shutting down: waiting for in-flight requests, then stopping engines")
        await site.stop()
        await supervisor.shutdown(config.settings.shutdown_timeout)
    await runner.cleanup()
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        loop.remove_signal_handler(sig)
