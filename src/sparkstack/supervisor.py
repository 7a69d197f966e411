"""The supervisor carries out the scheduler's decisions against the runtimes.

It implements the scheduler's `Effects`: it starts engine runs (`runtime/lifecycle.py`
owns each one, from launch to exit), stops them, wakes requests that were granted or
refused, and re-arms one timer for the scheduler's next deadline. Every fact it learns
goes back to the scheduler as an event; it never decides anything itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import time
from collections.abc import Callable, Mapping
from pathlib import Path

import aiohttp

from .config import Config
from .engines import Upstream, engine_identity, launch_spec, new_key
from .runtime import LogBuffer, Runtime, StartError
from .runtime.base import free_port, port_is_free
from .runtime.docker import LABEL_HASH, DockerRuntime
from .runtime.lifecycle import EngineRun, RunContext
from .runtime.process import ProcessRuntime
from .runtime.span import Spans
from .scheduler import ModelState, Scheduler, State, Ticket, invariants
from .scheduler.refusal import Refusal
from .telemetry.events import EventBus, LoadProgress, ModelChanged, QueueChanged
from .telemetry.loadtimes import read_load_times, record_load_time
from .telemetry.memory import MemoryMonitor
from .telemetry.progress import ProgressParser
from .views import ModelView, Snapshot, wall
from .weights import states as weights_on_disk

log = logging.getLogger("sparkstack.supervisor")


class Supervisor:
    def __init__(
        self,
        config: Config,
        runtimes: Mapping[str, Runtime],
        budget_gb: float,
        *,
        data_dir: Path,
        check_free_memory: bool = False,
        keep_engines: bool = False,
        clock: Callable[[], float] = time.monotonic,
        bus: EventBus | None = None,
        memory_interval: float = 5.0,
        weights_interval: float = 30.0,
    ) -> None:
        self.config = config
        self.data_dir = data_dir
        self.runtimes = runtimes
        # With a measured budget, a start is refused when the machine lacks the memory
        # right now (better than vLLM failing after minutes).
        self.check_free_memory = check_free_memory
        self.keep_engines = keep_engines
        s = config.settings
        self.scheduler = Scheduler(
            config.engines.values(), budget_gb, self, clock,
            queue_timeout=s.queue_timeout, max_queue=s.max_queue, start_backoff=s.start_backoff,
            load_times=read_load_times(data_dir),
        )
        if os.environ.get("SPARKSTACK_DEBUG") == "1":
            invariants.checked(self.scheduler)
        self.logs = {mid: LogBuffer(data_dir / "logs" / f"{mid}.log") for mid in config.engines}
        self.runs: dict[str, EngineRun] = {}
        self.ports: dict[str, int] = {}
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at: float | None = None
        self._http: aiohttp.ClientSession | None = None
        self._changed = asyncio.Event()
        self._watchers = 0
        self._closed = False
        # Telemetry (docs/monitoring.md): events out, load progress and measured memory in.
        self.bus = bus or EventBus()
        self.memory = MemoryMonitor(data_dir)
        self.memory_interval = memory_interval
        # Whether each model's weights are on disk, as last read (_watch_weights): views
        # read this, never the disk. Empty until the first read, just after the start.
        self.weights_state: Mapping[str, str | None] = {}
        self.weights_interval = weights_interval
        self._weights_soon = asyncio.Event()
        self._weights_next = asyncio.Event()  # set when the next read has finished
        self._weights_task: asyncio.Task[None] | None = None
        self._published: dict[str, State] = {}  # the state each model's last event showed
        self._loads: dict[str, tuple[ProgressParser, float, Callable[[str], None]]] = {}
        self._dirty: set[str] = set()
        self._flush: asyncio.TimerHandle | None = None
        self._queued = 0
        self._sample_soon = asyncio.Event()
        self._sampler: asyncio.Task[None] | None = None
        self.spans: Spans | None = None
        self._span_http: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> Supervisor:
        # Health probes get their own small session: they must never queue behind traffic.
        self._http = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5))
        self._ctx = RunContext(self.runtimes, self.scheduler, self._http, self.data_dir,
                               self.check_free_memory)
        # Models spanning two nodes reserve their other half on a peer (the session is
        # made even without peers: a reload may add them).
        self._span_http = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=10))
        self.spans = self._ctx.spans = Spans(self.config, self._span_http)
        process = self.runtimes.get("process")
        if isinstance(process, ProcessRuntime):  # before anything starts: their memory
            await process.stop_leftovers()
        docker = self.runtimes.get("docker")
        if isinstance(docker, DockerRuntime):
            await self._adopt(docker)
        self._sampler = asyncio.create_task(self._sample_memory(), name="memory-sampler")
        self._weights_task = asyncio.create_task(self._watch_weights(), name="weights-watcher")
        self.scheduler.tick()  # pinned models start now
        return self

    async def __aexit__(self, *exc: object) -> None:
        if not self._closed:  # an error before the orderly shutdown: stop engines now
            await self.shutdown(0)

    # ------------------------------------------------------------ for the gateway

    def submit(self, model_id: str) -> Ticket:
        fut: asyncio.Future[Upstream] = asyncio.get_running_loop().create_future()
        return self.scheduler.submit(model_id, fut)

    def stand_in(self, model_id: str, may_serve: Callable[[str], bool]) -> str | None:
        """A running model that answers for `model_id` now (Scheduler.stand_in)."""
        return self.scheduler.stand_in(model_id, may_serve)

    async def wait(self, ticket: Ticket) -> Upstream:
        result: Upstream = await ticket.waiter
        return result

    def finish(self, ticket: Ticket) -> None:
        self.scheduler.finish(ticket)

    def upstream(self, model_id: str) -> Upstream | None:
        run = self.runs.get(model_id)
        return run.upstream if run else None

    def state(self, model_id: str) -> ModelState:
        """The live state (tests and the supervisor itself; others read `snapshot()`)."""
        return self.scheduler.models[model_id]

    def snapshot(self) -> Snapshot:
        sched = self.scheduler
        return Snapshot(
            memory_budget_gb=sched.budget_gb,
            memory_used_gb=round(sum(s.memory_gb for s in sched.residents.values()), 3),
            queued=sched.queued,
            starting=sched.starting,
            shutting_down=sched.shutting_down,
            models=tuple(self._view(s) for s in sched.models.values()
                         if not (s.removed and s.state is State.STOPPED)),
        )

    def model_view(self, model_id: str) -> ModelView:
        return self._view(self.scheduler.models[model_id])

    def _view(self, s: ModelState) -> ModelView:
        m = s.model
        idle_at = self.scheduler.idle_deadline(s)
        load = self._loads.get(m.id) if s.state is State.STARTING else None
        measured = self.memory.current.get(m.id) if s.state is not State.STOPPED else None
        peak = self.memory.peaks.get(m.id, {}).get("peak_gb")
        return ModelView(
            id=m.id, state=s.state.value, status=m.cfg.status, notes=m.cfg.notes,
            memory_gb=m.memory_gb, in_flight=len(s.active), queued=len(s.waiters),
            last_used=wall(s.last_used),
            ready_since=wall(s.ready_at) if s.state is State.READY else None,
            load_seconds=None if s.load_seconds is None else round(s.load_seconds, 3),
            last_error=s.last_error, stop_reason=s.stop_reason,
            leaving=s.leaving and s.state is not State.STOPPED, ttl_s=m.ttl,
            idle_stop_at=None if idle_at == math.inf else wall(idle_at),
            retry_at=wall(s.retry_at) if s.retry_at > self.scheduler.clock() else None,
            pinned=m.cfg.pinned, exclusive=m.cfg.exclusive, runtime=m.cfg.runtime,
            engine=m.cfg.engine, port=self.ports.get(m.id), aliases=tuple(m.cfg.aliases),
            capabilities=tuple(m.cfg.capabilities), context_length=m.cfg.max_model_len,
            load_phase=load[0].phase if load else None,
            load_percent=load[0].percent if load else None,
            load_started=wall(load[1]) if load else None,
            memory_measured_gb=measured.gb if measured else None,
            memory_peak_gb=peak, memory_source=measured.source if measured else None,
            span_role=m.span.role if m.span else None,
            span_partner=m.span.partner if m.span else None,
            weights_state=self.weights_state.get(m.id),
        )

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

    def reconfigure(self, new: Config) -> dict[str, list[str]]:
        """Take a reloaded catalog (already validated). Unchanged models keep running;
        models whose engine changed restart once idle; removed ones stop once idle; added
        ones are available at once. `self.config` is updated in place, so every reader
        holding it sees the new catalog."""
        old = self.config
        before, after = old.engines, new.engines  # worker halves of spanning models too
        changed = {mid for mid, m in after.items()
                   if mid in before and engine_identity(before[mid]) != engine_identity(m)}
        sched = self.scheduler
        summary = {
            "added": sorted(set(after) - set(before)),
            "removed": sorted(set(before) - set(after)),
            "restarting": sorted(mid for mid in changed if sched.models[mid].resident),
            "changed": sorted(changed),
            "unchanged": sorted(set(after) & set(before) - changed),
        }
        for mid in after:
            if mid not in self.logs:
                self.logs[mid] = LogBuffer(self.data_dir / "logs" / f"{mid}.log")
        s = new.settings
        if s.memory_gb != "auto":
            sched.budget_gb = float(s.memory_gb)
        sched.queue_timeout, sched.max_queue = s.queue_timeout, s.max_queue
        sched.start_backoff = s.start_backoff
        old.settings, old.models, old.aliases = new.settings, new.models, new.aliases
        old.placed, old.workers, old.warnings = new.placed, new.workers, new.warnings
        sched.reconfigure(after, changed)
        self._weights_soon.set()  # models added, or their weights moved
        return summary

    async def wait_changed(self) -> None:
        """Wait until any model changes state or load."""
        self._watchers += 1
        try:
            await self._changed.wait()
        finally:
            self._watchers -= 1

    async def shutdown(self, timeout: float) -> None:
        """Refuse new work, let in-flight requests finish (bounded), stop every engine."""
        self._closed = True
        self.scheduler.shutdown()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                while any(s.active for s in self.scheduler.models.values()):
                    await self.wait_changed()
        kept = {mid for mid, m in self.config.models.items()
                if self.keep_engines and m.cfg.runtime == "docker"}
        self.scheduler.stop_all("shutdown", keep=kept)
        for mid in kept & set(self.runs):
            if self.runs[mid].task:
                self.runs[mid].task.cancel()  # stop watching; the container runs on
        tasks = [r.task for r in self.runs.values() if r.task and not r.task.done()]
        if tasks:
            # Bounded: an engine we cannot even observe (Docker gone) must not hang the exit.
            grace = max(m.cfg.stop_timeout for m in self.config.engines.values())
            _, stuck = await asyncio.wait(tasks, timeout=grace + 15)
            for task in stuck:
                log.warning("gave up waiting for %s to stop", task.get_name())
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        if self._timer:
            self._timer.cancel()
        if self._flush:
            self._flush.cancel()
        if self._sampler:
            self._sampler.cancel()
        if self._weights_task:
            self._weights_task.cancel()
        if self._http:
            await self._http.close()
        if self._span_http:
            await self._span_http.close()
        for runtime in self.runtimes.values():
            await runtime.close()
        for buf in self.logs.values():
            buf.close()
            buf.end_followers()
        self.bus.close()  # event streams (the dashboard) end too

    # ------------------------------------------------------------ Effects

    def start_engine(self, model_id: str) -> None:
        model = self.scheduler.models[model_id].model  # a reload may have replaced it
        port = self.ports.get(model_id)
        if port is None or not port_is_free(port):
            port = free_port(set(self.ports.values()))
        self.ports[model_id] = port
        run = EngineRun(self._ctx, model, port, new_key(model), self.logs[model_id])
        self.runs[model_id] = run
        self._follow_load(model_id)
        run.launch()

    def stop_engine(self, model_id: str, reason: str) -> None:
        run = self.runs.get(model_id)
        if run is not None:
            run.stop(reason)

    def grant(self, ticket: Ticket) -> None:
        fut = ticket.waiter
        if fut is not None and not fut.done():
            fut.set_result(self.runs[ticket.model].upstream)

    def reject(self, ticket: Ticket, refusal: Refusal) -> None:
        fut = ticket.waiter
        if fut is not None and not fut.done():
            fut.set_exception(refusal)
            fut.exception()  # whoever awaits still gets it; nobody else logs it

    def changed(self, model_id: str) -> None:
        if self._watchers:  # called twice per request: free when nobody watches
            self._changed.set()
            self._changed = asyncio.Event()
        # A state transition is published at once (rare, and metrics count them); minor
        # changes (in-flight and queued counts, twice per request) only when someone
        # streams events, and then at most every 100 ms per model.
        state = self.scheduler.models[model_id].state
        previous = self._published.get(model_id, State.STOPPED)
        if state is not previous:
            self._published[model_id] = state
            self._transition(model_id, previous, state)
            self._dirty.discard(model_id)
            self.bus.publish(ModelChanged(self.model_view(model_id), previous.value))
            self._publish_queue()
        elif self.bus.watched:
            self._dirty.add(model_id)
            if self._flush is None:
                self._flush = asyncio.get_running_loop().call_later(0.1, self._publish_dirty)

    def _publish_dirty(self) -> None:
        self._flush = None
        dirty, self._dirty = self._dirty, set()
        for mid in dirty:
            self.bus.publish(ModelChanged(self.model_view(mid)))
        self._publish_queue()

    def _publish_queue(self) -> None:
        if self.scheduler.queued != self._queued:
            self._queued = self.scheduler.queued
            self.bus.publish(QueueChanged(self._queued, self.scheduler.starting))

    def _transition(self, model_id: str, previous: State, state: State) -> None:
        if previous is State.STARTING:
            load = self._loads.pop(model_id, None)
            if load is not None:
                with contextlib.suppress(ValueError):
                    self.logs[model_id].listeners.remove(load[2])
            if state is State.READY:
                self.memory.load_finished(model_id)
                record_load_time(self.data_dir, model_id,
                                 self.scheduler.models[model_id].load_seconds)
                self._sample_soon.set()
        if state is State.STOPPED:
            self.memory.stopped(model_id)
        if state in (State.READY, State.STOPPED):
            # A start may have downloaded the weights, a failed one left them partial.
            self._weights_soon.set()

    def _follow_load(self, model_id: str) -> None:
        """Read the engine's log while it starts: its phase and percentage as events."""
        old = self._loads.pop(model_id, None)
        if old is not None:
            with contextlib.suppress(ValueError):
                self.logs[model_id].listeners.remove(old[2])
        parser, began = ProgressParser(), time.monotonic()

        def on_line(line: str) -> None:
            if parser.feed(line):
                self.bus.publish(LoadProgress(model_id, parser.phase, parser.percent,
                                              time.monotonic() - began))

        self._loads[model_id] = (parser, began, on_line)
        self.logs[model_id].listeners.append(on_line)
        self.memory.load_started(model_id)

    async def _sample_memory(self) -> None:
        """Measure the running engines every `memory_interval` (and just after a load)."""
        await self.memory.start()
        declared = {mid: m.memory_gb for mid, m in self.config.engines.items()}
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._sample_soon.wait(), self.memory_interval)
            self._sample_soon.clear()
            engines = {mid: run.engine for mid, run in self.runs.items()
                       if run.engine is not None
                       and self.scheduler.models[mid].state is not State.STOPPED}
            if not engines:
                continue
            try:
                moved = await self.memory.sample(engines, declared)
            except Exception:  # measuring must never take the gateway down
                log.exception("measuring memory failed")
                continue
            for mid in moved:
                if self.scheduler.models[mid].state is not State.STOPPED:
                    self.bus.publish(ModelChanged(self.model_view(mid)))

    async def _watch_weights(self) -> None:
        """Read whether weights are on disk, in a thread (it stats download folders and may
        import huggingface_hub, most of a second: never on the event loop, where a view
        is built for every /v1/models), every `weights_interval` and soon after a model
        starts or stops and after a reload. A change is published like any other."""
        while True:
            self._weights_soon.clear()
            done, self._weights_next = self._weights_next, asyncio.Event()
            try:
                models = [s.model for s in self.scheduler.models.values()]
                found = await asyncio.to_thread(weights_on_disk, models)
                moved = [mid for mid, st in found.items() if self.weights_state.get(mid) != st]
                self.weights_state = found
                for mid in moved:
                    if mid in self.scheduler.models:
                        self.bus.publish(ModelChanged(self.model_view(mid)))
            except Exception:  # views without it beat a gateway without views
                log.exception("reading whether weights are on disk failed")
            finally:
                done.set()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._weights_soon.wait(), self.weights_interval)

    async def refresh_weights(self) -> None:
        """Have whether weights are on disk read again now; return once views show it."""
        if self._weights_task is None or self._weights_task.done():
            raise RuntimeError("the supervisor is not running")
        done = self._weights_next  # a read that starts after this call
        self._weights_soon.set()
        await done.wait()

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

    # ------------------------------------------------------------ adoption

    async def _adopt(self, docker: DockerRuntime) -> None:
        """After a crash or a kept shutdown: take over running containers whose config
        still matches (ready if healthy, idle clock from now); stop stale ones."""
        try:
            found = await docker.managed()
        except StartError as e:
            log.warning("cannot look for running engines: %s", e)
            for s in self.scheduler.models.values():
                if s.model.cfg.runtime == "docker":
                    s.last_error = str(e)
            return
        for m in found:
            if not m.running:
                continue  # a stopped container is re-used or re-created at its next start
            model = self.config.engines.get(m.model_id)
            identity = None
            if model is not None and model.cfg.runtime == "docker":
                with contextlib.suppress(StartError):
                    spec = await asyncio.to_thread(launch_spec, model, 0, None, self.data_dir)
                    identity = spec.identity
            # A spanning model's half is never adopted: its other half's lease is gone.
            if model is None or model.span is not None or identity != m.labels.get(LABEL_HASH):
                log.info("stopping stale container %s (%s)", m.container.id[:12], m.model_id)
                await docker.stop_container(m.container)
                continue
            engine = docker.attach(m, self.logs[model.id])
            run = EngineRun(self._ctx, model, engine.port, engine.key, self.logs[model.id])
            if not await run.healthy():
                log.info("stopping unhealthy container of %s", model.id)
                await engine.stop(model.cfg.stop_timeout)
                continue
            self.ports[model.id] = engine.port
            self.runs[model.id] = run
            self.logs[model.id].begin_run(f"sparkstack: adopted running {engine.description}")
            self.scheduler.adopt(model.id)
            run.adopt(engine)
