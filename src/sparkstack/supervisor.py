"""The supervisor carries out the scheduler's decisions against a runtime.

It implements the scheduler's `Effects`: it starts engines (polling their health while
watching them exit), stops them, wakes requests that were granted or refused, and
re-arms one timer for the scheduler's next deadline. Every fact it learns goes back to
the scheduler as an event; it never decides anything itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp

from .config import Config
from .engines import Upstream, launch_spec, new_run
from .errors import ApiError
from .runtime import Engine, LogBuffer, Runtime, StartError
from .scheduler import ModelState, Scheduler, State, Ticket

log = logging.getLogger("sparkstack.supervisor")

FIRST_POLL_S = 0.01
MAX_POLL_S = 0.1  # the health poll backs off to this: at most ~100 ms added to a cold start
LOG_TAIL_LINES = 20


@dataclass(eq=False)
class EngineRun:
    """One start of one model's engine, from launch to exit."""

    model_id: str
    upstream: Upstream
    key: str | None
    stop_requested: asyncio.Event = field(default_factory=asyncio.Event)
    engine: Engine | None = None
    task: asyncio.Task[None] | None = None
    stop_task: asyncio.Task[None] | None = None


def free_port(avoid: set[int]) -> int:
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port not in avoid:
            return port


def port_is_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


class Supervisor:
    def __init__(
        self,
        config: Config,
        runtime: Runtime,
        budget_gb: float,
        *,
        data_dir: Path,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.config = config
        self.data_dir = data_dir
        self.runtime = runtime
        s = config.settings
        self.scheduler = Scheduler(
            config.models.values(), budget_gb, self, clock,
            queue_timeout=s.queue_timeout, max_queue=s.max_queue, start_backoff=s.start_backoff,
        )
        self.logs = {mid: LogBuffer(data_dir / "logs" / f"{mid}.log") for mid in config.models}
        self.runs: dict[str, EngineRun] = {}
        self.ports: dict[str, int] = {}
        self.listeners: set[Callable[[str], None]] = set()
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at: float | None = None
        self._http: aiohttp.ClientSession | None = None
        self._changed = asyncio.Event()

    async def __aenter__(self) -> Supervisor:
        # Health probes get their own small session: they must never queue behind traffic.
        self._http = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5))
        self.scheduler.tick()  # pinned models start now
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.shutdown(0)

    # ------------------------------------------------------------ for the gateway

    def submit(self, model_id: str) -> Ticket:
        fut: asyncio.Future[Upstream] = asyncio.get_running_loop().create_future()
        return self.scheduler.submit(model_id, fut)

    async def wait(self, ticket: Ticket) -> Upstream:
        result: Upstream = await ticket.waiter
        return result

    def finish(self, ticket: Ticket) -> None:
        self.scheduler.finish(ticket)

    def upstream(self, model_id: str) -> Upstream | None:
        run = self.runs.get(model_id)
        return run.upstream if run else None

    def state(self, model_id: str) -> ModelState:
        return self.scheduler.models[model_id]

    async def load(self, model_id: str) -> None:
        ticket = self.submit(model_id)
        try:
            await self.wait(ticket)
        finally:
            self.finish(ticket)

    async def unload(self, model_id: str, force: bool = False) -> None:
        """Stop a model (after its in-flight requests unless forced); return once stopped."""
        s = self.scheduler.models[model_id]
        run = s.run
        self.scheduler.unload(model_id, force)
        # Done when this run has stopped (queued requests may start a new run right after).
        while s.run == run and s.state is not State.STOPPED:
            await self.wait_changed()

    async def wait_changed(self) -> None:
        """Wait until any model changes state or load."""
        await self._changed.wait()

    async def shutdown(self, timeout: float) -> None:
        """Refuse new work, let in-flight requests finish (bounded), stop every engine."""
        self.scheduler.shutdown()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                while any(s.active for s in self.scheduler.models.values()):
                    await self.wait_changed()
        self.scheduler.stop_all("shutdown")
        tasks = [r.task for r in self.runs.values() if r.task]
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        if self._timer:
            self._timer.cancel()
        if self._http:
            await self._http.close()
        await self.runtime.close()
        for buf in self.logs.values():
            buf.close()

    # ------------------------------------------------------------ Effects

    def start_engine(self, model_id: str) -> None:
        model = self.config.models[model_id]
        port = self.ports.get(model_id)
        if port is None or not port_is_free(port):
            port = free_port(set(self.ports.values()))
        self.ports[model_id] = port
        upstream, key = new_run(model, port)
        run = EngineRun(model_id, upstream, key)
        self.runs[model_id] = run
        run.task = asyncio.create_task(self._run(run), name=f"engine:{model_id}")

    def stop_engine(self, model_id: str, reason: str) -> None:
        run = self.runs.get(model_id)
        if run is None:
            return
        log.info("stopping %s: %s", model_id, reason)
        self.logs[model_id].write(f"----- sparkstack: stopping ({reason})")
        run.stop_requested.set()
        if run.engine is not None and run.stop_task is None:
            grace = self.config.models[model_id].cfg.stop_timeout
            run.stop_task = asyncio.create_task(run.engine.stop(grace))

    def grant(self, ticket: Ticket) -> None:
        fut = ticket.waiter
        if fut is not None and not fut.done():
            fut.set_result(self.runs[ticket.model].upstream)

    def reject(self, ticket: Ticket, error: ApiError) -> None:
        fut = ticket.waiter
        if fut is not None and not fut.done():
            fut.set_exception(error)
            fut.exception()  # whoever awaits still gets it; nobody else logs it

    def changed(self, model_id: str) -> None:
        self._changed.set()
        self._changed = asyncio.Event()
        for listener in list(self.listeners):
            listener(model_id)

    def wake_at(self, when: float | None) -> None:
        # Lazy: keep an earlier timer; when it fires, tick() re-arms for the real deadline.
        if when is None or (self._timer_at is not None and self._timer_at <= when):
            return
        if self._timer:
            self._timer.cancel()
        loop = asyncio.get_running_loop()
        delay = max(0.0, when - self.scheduler.clock())
        self._timer_at = when
        self._timer = loop.call_at(loop.time() + delay, self._fire)

    def _fire(self) -> None:
        self._timer = self._timer_at = None
        self.scheduler.tick()

    # ------------------------------------------------------------ one engine run

    async def _run(self, run: EngineRun) -> None:
        mid = run.model_id
        model = self.config.models[mid]
        buf = self.logs[mid]
        buf.begin_run(f"sparkstack: starting {mid} on port {self.ports[mid]}")
        try:
            # In a thread: preparing weights (assembling a packaged GGUF) may take seconds.
            spec = await asyncio.to_thread(
                launch_spec, model, self.ports[mid], run.key, self.data_dir)
            run.engine = await self.runtime.start(spec, buf)
        except StartError as e:
            buf.write(f"sparkstack: {e}")
            self.scheduler.engine_failed(
                mid, ApiError(502, f"model {mid!r} failed to start: {e}", "engine_failed"))
            return
        engine = run.engine
        exited = asyncio.create_task(engine.wait())
        error = await self._wait_ready(run, exited, model.cfg.health_timeout)
        if error is not None or run.stop_requested.is_set():
            await engine.stop(model.cfg.stop_timeout)
            await exited
            if error is not None and not run.stop_requested.is_set():
                error.message += self._tail(mid)
                buf.write(f"sparkstack: start failed: {error.message.splitlines()[0]}")
                self.scheduler.engine_failed(mid, error)
            else:
                self.scheduler.engine_exited(mid)
            return
        buf.write(f"sparkstack: {mid} is ready ({engine.description})")
        self.scheduler.engine_ready(mid)
        code = await exited
        if run.stop_task is not None:
            await run.stop_task
        crash = None
        if not run.stop_requested.is_set():
            crash = f"model {mid!r} engine exited with code {code} while serving" + self._tail(mid)
            log.warning("%s", crash.splitlines()[0])
        self.scheduler.engine_exited(mid, crash)

    async def _wait_ready(
        self, run: EngineRun, exited: asyncio.Task[int], timeout: float
    ) -> ApiError | None:
        """Poll health (first poll at once, backing off to 100 ms) until ready, exit or timeout."""
        mid = run.model_id
        url = run.upstream.base_url + self.config.models[mid].cfg.health
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        delay = FIRST_POLL_S
        stop = asyncio.create_task(run.stop_requested.wait())
        try:
            while True:
                if exited.done():
                    return ApiError(
                        502, f"model {mid!r} engine exited with code {exited.result()} "
                        "while starting", "engine_failed")
                if stop.done() or await self._healthy(url, run.upstream):
                    return None
                remaining = deadline - loop.time()
                if remaining <= 0:
                    return ApiError(
                        504, f"model {mid!r} did not become healthy within "
                        f"{timeout:g} s (health_timeout)", "start_timeout")
                await asyncio.wait({exited, stop}, timeout=min(delay, remaining))
                delay = min(delay * 2, MAX_POLL_S)
        finally:
            stop.cancel()

    async def _healthy(self, url: str, upstream: Upstream) -> bool:
        assert self._http is not None
        try:
            async with self._http.get(url, headers=upstream.headers) as resp:
                return resp.status == 200
        except (aiohttp.ClientError, TimeoutError, OSError):
            return False

    def _tail(self, model_id: str) -> str:
        lines = [ln for ln in self.logs[model_id].tail(LOG_TAIL_LINES + 5)
                 if not ln.startswith("-----")][-LOG_TAIL_LINES:]
        return ". Last log lines:\n" + "\n".join(lines) if lines else ""
