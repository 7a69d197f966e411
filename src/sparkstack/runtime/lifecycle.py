"""One engine run, from launch to exit, owned by one object.

`EngineRun.run()` prepares the command line, launches the engine through its runtime,
polls its health while watching it exit, serves until it exits, and stops it when
asked. Whatever happens on the way — a clean exit, a crash, a health timeout, or any
exception raised by a runtime, a weights package or the host — it reports exactly one
final event to the scheduler (`engine_failed` during a start, `engine_exited` after)
and leaves no engine running. A run that could die silently would leave its model
`starting` forever and, since starts are serialised, block every other cold start.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import aiohttp

from ..config import Model
from ..engines import SpanLaunch, Upstream, launch_spec, upstream_for
from ..scheduler.refusal import Reason, Refusal
from ..telemetry.memory import meminfo
from ..weights import DownloadWatch
from .base import Engine, LogBuffer, Runtime, StartError, describe_exit
from .span import SpanLease, SpannedEngine, Spans

log = logging.getLogger("sparkstack.engine")

FIRST_POLL_S = 0.01
MAX_POLL_S = 0.05  # the health poll backs off to this: at most ~50 ms added to a cold start
LOG_TAIL_LINES = 20


class Events(Protocol):
    """What a run tells the scheduler: each run reports `engine_ready` at most once, and
    exactly one of `engine_failed` / `engine_exited`."""

    def engine_ready(self, model_id: str) -> None: ...
    def engine_failed(self, model_id: str, refusal: Refusal) -> None: ...
    def engine_exited(self, model_id: str, error: str | None = None) -> None: ...


@dataclass
class RunContext:
    """What every run of a supervisor shares."""

    runtimes: Mapping[str, Runtime]
    events: Events
    http: aiohttp.ClientSession  # health probes only: never queued behind traffic
    data_dir: Path
    check_free_memory: bool = False
    spans: Spans | None = None  # models spanning two nodes (None: no peers)


def drop_page_cache() -> None:
    """Flush the page cache (root only): vLLM compares its memory fraction with what is
    free *now*, and a previous model's weight files in the cache make it fail."""
    os.sync()
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3\n")


class EngineRun:
    def __init__(self, ctx: RunContext, model: Model, port: int, key: str | None,
                 log_buffer: LogBuffer):
        self.ctx = ctx
        self.model = model
        self.port = port
        self.key = key
        self.log = log_buffer
        self.upstream: Upstream = upstream_for(model, port, key)
        self.engine: Engine | None = None
        self.stop_requested = asyncio.Event()
        self.task: asyncio.Task[None] | None = None
        self._stop_task: asyncio.Task[None] | None = None
        self._reported = False
        self._ready = False

    @property
    def model_id(self) -> str:
        return self.model.id

    # ------------------------------------------------------------ control

    def launch(self) -> None:
        self.task = asyncio.create_task(self.run(), name=f"engine:{self.model_id}")

    def adopt(self, engine: Engine) -> None:
        """Watch an engine that is already running and healthy (adopted container)."""
        self.engine = engine
        self.port = engine.port
        self.key = engine.key
        self.upstream = upstream_for(self.model, engine.port, engine.key)
        self._ready = True
        self.task = asyncio.create_task(self._watch_adopted(), name=f"engine:{self.model_id}")

    def stop(self, reason: str) -> None:
        """Stop the engine (now if it runs; at once after launch if it is launching)."""
        log.info("stopping %s: %s", self.model_id, reason)
        self.log.write(f"----- sparkstack: stopping ({reason})")
        self.stop_requested.set()
        if self.engine is not None and self._stop_task is None:
            self._stop_task = asyncio.create_task(self.engine.stop(self.model.cfg.stop_timeout))

    # ------------------------------------------------------------ the run

    async def run(self) -> None:
        began = time.monotonic()
        mid = self.model_id
        cfg = self.model.cfg
        self.log.begin_run(f"sparkstack: starting {mid} on port {self.port}")
        log.info("starting %s (%s, %s runtime) on port %d", mid, cfg.engine, cfg.runtime,
                 self.port)
        try:
            exited = await self._launch()
            if exited is None:
                return
            failure = await self._wait_ready(exited)
            if failure is not None or self.stop_requested.is_set():
                await self._stop_engine()
                await exited
                if failure is not None and not self.stop_requested.is_set():
                    self._fail(failure, began)
                else:
                    self._exited(None)
                return
            took = time.monotonic() - began
            self.log.write(f"sparkstack: {mid} is ready after {took:.1f} s "
                           f"({self.engine.description if self.engine else ''})")
            log.info("%s ready in %.1f s", mid, took)
            self._ready = True
            self.ctx.events.engine_ready(mid)
            await self._serve_until_exit(exited)
        except asyncio.CancelledError:
            # Only a kept shutdown cancels a run: the engine goes on, nobody listens.
            self._reported = True
            raise
        except Exception as e:  # anything unforeseen: report it, never wedge the model
            log.exception("engine run of %s failed unexpectedly", mid)
            with contextlib.suppress(Exception):
                await self._stop_engine()
            error = f"unexpected {type(e).__name__}: {e}"
            if self._ready:
                self._exited(error + self._tail())
            else:
                self._fail(Refusal(Reason.START_FAILED, mid, error=error + self._tail()),
                           began)

    async def _launch(self) -> asyncio.Task[int] | None:
        """Prepare and launch; None when the launch failed (already reported)."""
        mid = self.model_id
        try:
            runtime = self.ctx.runtimes.get(self.model.cfg.runtime)
            if runtime is None:
                raise StartError(f"runtime {self.model.cfg.runtime!r} is not available",
                                 Reason.RUNTIME_UNAVAILABLE)
            self._before_launch()
            lease, span = await self._span()
            try:
                # In a thread: preparing weights (assembling a packaged GGUF) may take seconds.
                spec = await asyncio.to_thread(
                    launch_spec, self.model, self.port, self.key, self.ctx.data_dir, span)
                self.engine = await runtime.start(spec, self.log)
            except BaseException:
                if lease is not None:
                    await lease.release()
                raise
            if lease is not None:
                self.engine = SpannedEngine(self.engine, lease, self.log)
        except StartError as e:
            self._fail(Refusal(e.reason, mid, error=str(e)), None)
            return None
        if self.stop_requested.is_set() and self._stop_task is None:
            self._stop_task = asyncio.create_task(self.engine.stop(self.model.cfg.stop_timeout))
        if self.engine.port != self.port or self.engine.key != self.key:  # a re-used container
            self.port, self.key = self.engine.port, self.engine.key
            self.upstream = upstream_for(self.model, self.port, self.key)
        return asyncio.create_task(self.engine.wait())

    async def _span(self) -> tuple[SpanLease | None, SpanLaunch | None]:
        """For a half of a spanning model: the head reserves the worker half on the peer
        first (as long as the peer needs to make room, unless asked to stop); a worker
        half takes the launch its head's reservation brought."""
        span = self.model.span
        if span is None:
            return None, None
        spans = self.ctx.spans
        if spans is None:
            raise StartError("spanning two nodes needs peers", Reason.RUNTIME_UNAVAILABLE)
        if span.role == "worker":
            launch = spans.worker_launches.get(self.model_id)
            if launch is None:
                raise StartError("a worker half starts only for its head's reservation")
            return None, launch
        reserve = asyncio.ensure_future(spans.reserve(self.model, self.log))
        stop = asyncio.ensure_future(self.stop_requested.wait())
        await asyncio.wait({reserve, stop}, return_when=asyncio.FIRST_COMPLETED)
        stop.cancel()
        if not reserve.done():
            reserve.cancel()
            with contextlib.suppress(asyncio.CancelledError, StartError):
                await reserve
            raise StartError("stopped while reserving the worker half")
        return reserve.result()

    def _before_launch(self) -> None:
        m = self.model
        if m.cfg.drop_page_cache and os.geteuid() == 0:
            try:
                drop_page_cache()
            except OSError as e:  # e.g. a read-only /proc/sys in a container: start anyway
                log.warning("%s: cannot drop the page cache (%s); starting anyway",
                            m.id, e.strerror or e)
                self.log.write(f"sparkstack: cannot drop the page cache: {e}")
        if self.ctx.check_free_memory and m.memory_gb:
            free = meminfo().available_gb
            if free < m.memory_gb:
                raise StartError(
                    f"it needs {m.memory_gb:g} GB but only {free:.1f} GB are free now "
                    "(MemAvailable); something outside sparkstack holds the memory"
                    + ("" if m.cfg.drop_page_cache else ", or the page cache does: try "
                       "drop_page_cache: true (as root)"), Reason.MEMORY_IN_USE)

    async def _wait_ready(self, exited: asyncio.Task[int]) -> Refusal | None:
        """Poll health (first poll at once, backing off to 50 ms) until ready, exit or
        timeout; None when ready (or asked to stop). While the engine downloads the
        model's hub weights, each health_timeout that saw bytes arrive starts another
        (weights.DownloadWatch)."""
        mid = self.model_id
        cfg = self.model.cfg
        if self.model.span is not None and self.model.span.role == "worker":
            # A headless worker serves no API: it is up once launched, and the head's
            # health tells whether the two halves found each other.
            return None
        loop = asyncio.get_running_loop()
        deadline = loop.time() + cfg.health_timeout
        downloads = await asyncio.to_thread(DownloadWatch.of, self.model)
        delay = FIRST_POLL_S
        stop = asyncio.create_task(self.stop_requested.wait())
        try:
            while True:
                if exited.done():
                    return Refusal(Reason.START_FAILED, mid, error=(
                        f"the engine {self._describe_exit(exited.result())} while starting"
                        + self._tail()))
                if stop.done() or await self.healthy():
                    return None
                remaining = deadline - loop.time()
                if remaining <= 0 and downloads and await asyncio.to_thread(downloads.grew):
                    self.log.write(f"sparkstack: {downloads.describe()}: health_timeout "
                                   "starts again")
                    deadline = loop.time() + cfg.health_timeout
                    remaining = cfg.health_timeout
                if remaining <= 0:
                    return Refusal(Reason.START_TIMEOUT, mid, error=(
                        f"it did not become healthy within {cfg.health_timeout:g} s "
                        f"(health_timeout)" + (downloads.stalled() if downloads else "")
                        + self._tail()))
                await asyncio.wait({exited, stop}, timeout=min(delay, remaining))
                delay = min(delay * 2, MAX_POLL_S)
        finally:
            stop.cancel()

    async def _serve_until_exit(self, exited: asyncio.Task[int]) -> None:
        """The one place a ready engine's exit is reported: asked for, or a crash."""
        code = await exited
        if self._stop_task is not None:
            await self._stop_task
        crash = None
        if not self.stop_requested.is_set():
            crash = f"model {self.model_id!r} engine {self._describe_exit(code)} while serving"
            log.warning("%s; log: %s", crash, self.log.path)
            crash += self._tail()
        else:
            log.info("%s stopped", self.model_id)
        self._exited(crash)

    async def _watch_adopted(self) -> None:
        assert self.engine is not None
        try:
            await self._serve_until_exit(asyncio.create_task(self.engine.wait()))
        except asyncio.CancelledError:
            self._reported = True
            raise
        except Exception as e:
            log.exception("watching %s failed", self.model_id)
            with contextlib.suppress(Exception):
                await self._stop_engine()
            self._exited(f"unexpected {type(e).__name__}: {e}")

    async def _stop_engine(self) -> None:
        if self.engine is None:
            return
        if self._stop_task is None:
            self._stop_task = asyncio.create_task(self.engine.stop(self.model.cfg.stop_timeout))
        await self._stop_task

    def _describe_exit(self, code: int) -> str:
        # A spanning model's head is stopped by us when its worker half ends: say that.
        return getattr(self.engine, "exit_reason", None) or describe_exit(code)

    async def healthy(self) -> bool:
        url = self.upstream.base_url + self.model.cfg.health
        try:
            async with self.ctx.http.get(url, headers=self.upstream.headers) as resp:
                return resp.status == 200
        except (aiohttp.ClientError, TimeoutError, OSError):
            return False

    # ------------------------------------------------------------ the final event

    def _fail(self, refusal: Refusal, began: float | None) -> None:
        if self.stop_requested.is_set():  # stopped while starting: not a failure
            self._exited(None)
            return
        if self._reported:
            return
        self._reported = True
        first = (refusal.error or refusal.reason.value).splitlines()[0]
        first = first.removesuffix(". Last log lines:")
        self.log.write(f"sparkstack: start failed: {first}")
        after = f" after {time.monotonic() - began:.1f} s" if began is not None else ""
        log.error("%s failed to start%s: %s; log: %s", self.model_id, after, first,
                  self.log.path)
        self.ctx.events.engine_failed(self.model_id, refusal)

    def _exited(self, error: str | None) -> None:
        if self._reported:
            return
        self._reported = True
        self.ctx.events.engine_exited(self.model_id, error)

    def _tail(self) -> str:
        lines = [ln for ln in self.log.tail(LOG_TAIL_LINES + 5)
                 if not ln.startswith("-----")][-LOG_TAIL_LINES:]
        return ". Last log lines:\n" + "\n".join(lines) if lines else ""
