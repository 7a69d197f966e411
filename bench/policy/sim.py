"""The simulator: one trace, one policy, the real `Scheduler`, simulated engines.

The simulator is the scheduler's `Effects`: a start becomes "ready" after the model's
load time, a stop "exited" after STOP_S, a granted request finishes after its duration.
Time is a fake clock that jumps from event to event, so a week of a household's traffic
replays in well under a second. Clients behave as the real ones do: a refused request
(429/503) is retried after its Retry-After (at most 60 s, as the openai SDK and OpenCode
honour it) until it is served or the client gives up after PATIENCE_S.
"""

from __future__ import annotations

import heapq
import math
import time
from bisect import bisect_right
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from sparkstack.scheduler import Scheduler, Ticket
from sparkstack.scheduler.eviction import Policy

from .models import BUDGET_GB, STOP_S, SimModel, catalog_models, sim_config
from .traces import Request

PATIENCE_S = 3600.0  # a client retrying a refused request gives up after this
EXCEED_AT = (1, 10, 30, 60, 120, 300, 600, 1200, 1800, 3600)  # the waits' tail, in s
WASTED_BELOW = 2  # a load stopped having served fewer requests than this was wasted


@dataclass(frozen=True)
class PolicySpec:
    """A scheduling policy as the simulator runs it: the eviction policy object and the
    settings that go with it (idle TTL, busy policy, queue bounds)."""

    name: str
    make: Callable[[], Policy] | None  # None: the scheduler's default (ours)
    settings: dict[str, Any]
    pinned: bool = True  # does the stack keep the utility model always on
    residency_factor: float | None = None  # min_residency = this x each model's load time
    residency_cap: float | None = None  # ... at most this long
    peer: bool = True  # one of the peers' policies (the targets compare against them)
    stand_ins: bool = False  # a running model answers for one that would stop it (ours)
    about: str = ""


@dataclass(eq=False)
class Req:
    """One request's life in the simulation."""

    spec: Request
    after: Req | None = None  # the answer it follows (same session), if any
    issued: float = math.nan  # first attempt
    granted: float = math.nan
    ended: float = math.nan
    refusals: int = 0
    failed: bool = False
    passed_over: float = 0.0  # time its start was due but memory was kept from it
    dependants: list[Req] = field(default_factory=list)

    @property
    def wait(self) -> float:
        return (self.ended if self.failed else self.granted) - self.issued


@dataclass(eq=False)
class Run:
    model: str
    started: float
    ready: float = math.nan
    served: int = 0
    stopping: bool = False
    stop_reason: str = ""


def link_sessions(trace: Sequence[Request]) -> list[Req]:
    """Requests with the answer each one follows: the latest request of its session (or
    of a parent session) that had ended by its time in the trace."""
    reqs = [Req(r) for r in trace]
    ends: dict[str, tuple[list[float], list[Req]]] = {}  # session -> sorted trace ends
    for r in sorted(reqs, key=lambda r: r.spec.time + r.spec.duration):
        e, rs = ends.setdefault(r.spec.session, ([], []))
        e.append(r.spec.time + r.spec.duration)
        rs.append(r)
    for r in reqs:
        if not r.spec.session:
            continue
        best: Req | None = None
        parts = r.spec.session.split("/")
        for depth in range(len(parts), 0, -1):
            e, rs = ends.get("/".join(parts[:depth]), ([], []))
            i = bisect_right(e, r.spec.time) - 1
            if i >= 0 and (best is None or e[i] > best.spec.time + best.spec.duration):
                best = rs[i]
        if best is not None:
            r.after = best
            best.dependants.append(r)
    return reqs


def retry_after(refusal: Any) -> float:
    """Seconds a client waits before retrying: the refusal's own figure, ≤ 60 s."""
    seconds = getattr(refusal, "retry_after", None)
    if seconds is None:
        headers = getattr(refusal, "headers", None) or {}
        seconds = float(headers.get("Retry-After", 5))
    return min(60.0, max(1.0, seconds))


class Simulation:
    def __init__(self, trace: Sequence[Request], spec: PolicySpec,
                 models: dict[str, SimModel] | None = None) -> None:
        self.models = models or catalog_models()
        unknown = {r.model for r in trace} - set(self.models)
        if unknown:
            raise ValueError(f"the trace names models not in the catalog: {sorted(unknown)}")
        cfg = sim_config(self.models, spec.settings, pinned=spec.pinned,
                         residency_factor=spec.residency_factor,
                         residency_cap=spec.residency_cap)
        s = cfg.settings
        self.spec = spec
        self.now = 0.0
        self.sched = Scheduler(cfg.models.values(), BUDGET_GB, self, lambda: self.now,
                               queue_timeout=s.queue_timeout, max_queue=s.max_queue,
                               start_backoff=s.start_backoff,
                               policy=spec.make() if spec.make else None)
        self.reqs = link_sessions(trace)
        self.events: list[tuple[float, int, str, Any]] = []
        self.seq = 0
        self.timer_at: float | None = None  # the one timer, as the supervisor keeps it
        self.runs: dict[str, Run] = {}
        self.all_runs: list[Run] = []
        self.used_gb = 0.0
        self.gb_seconds = 0.0
        self.head: tuple[str, float] | None = None  # the start that is due, since when
        self.open = len(self.reqs)  # requests not ended yet

    # ------------------------------------------------------------ the event loop

    def push(self, when: float, kind: str, what: Any) -> None:
        self.seq += 1
        heapq.heappush(self.events, (when, self.seq, kind, what))

    def run(self) -> dict[str, Any]:
        wall = time.perf_counter()
        for r in self.reqs:
            if r.after is None:
                self.push(r.spec.time, "issue", r)
        end = max((r.spec.time + r.spec.duration for r in self.reqs), default=0.0)
        self.sched.tick()  # pinned models start
        handlers = {"issue": self._issue, "ready": self._ready, "exited": self._exited,
                    "finish": self._finish, "tick": self._tick}
        while self.events:
            when, _, kind, what = heapq.heappop(self.events)
            if not self.open and when > end:  # only timers left (TTLs, pre-warm checks)
                break
            self.gb_seconds += self.used_gb * (when - self.now)
            self.now = when
            handlers[kind](what)
            self._watch_head()
        return self.figures(time.perf_counter() - wall, end)

    def _issue(self, r: Req) -> None:
        if math.isnan(r.issued):
            r.issued = self.now
        model = r.spec.model
        if self.spec.stand_ins:  # as the gateway asks, for every request
            model = self.sched.stand_in(model, self._serves_chat) or model
        try:
            self.sched.submit(model, r)
        except Exception as refusal:  # Refusal (or ApiError): the client retries
            if not hasattr(refusal, "retry_after") and not hasattr(refusal, "headers"):
                raise
            self._refused(r, refusal)

    def _serves_chat(self, model_id: str) -> bool:
        return self.models[model_id].chat

    def _refused(self, r: Req, refusal: Any) -> None:
        r.refusals += 1
        delay = retry_after(refusal)
        if self.now + delay - r.issued > PATIENCE_S:
            r.failed = True
            self._ended(r)
        else:
            self.push(self.now + delay, "issue", r)

    def _finish(self, ticket: Ticket) -> None:
        self.sched.finish(ticket)
        self._ended(ticket.waiter)

    def _ended(self, r: Req) -> None:
        r.ended = self.now
        self.open -= 1
        late = max(0.0, r.ended - (r.spec.time + r.spec.duration))
        for d in r.dependants:  # the session's next request keeps its think time
            self.push(d.spec.time + late, "issue", d)

    def _ready(self, run: Run) -> None:
        if self.runs.get(run.model) is run and not run.stopping:
            run.ready = self.now
            self.sched.engine_ready(run.model)

    def _exited(self, run: Run) -> None:
        self.used_gb -= self.models[run.model].memory_gb
        if self.runs.get(run.model) is run:
            del self.runs[run.model]
        self.sched.engine_exited(run.model)

    def _tick(self, when: float) -> None:
        if when != self.timer_at:
            return  # superseded by an earlier timer
        self.timer_at = None
        self.sched.tick()

    def _watch_head(self) -> None:
        """Passed-over time: while a model's start is due (no other start in progress,
        it heads the start queue) but it has not started, its waiters are being passed
        over (the memory they need is still serving others, or draining)."""
        sched = self.sched
        head = None
        if sched.starting is None:
            for mid in sched.pending:
                st = sched.models[mid]
                if st.retry_at <= self.now and not st.resident:
                    head = mid
                    break
        if self.head is not None and self.head[0] != head:
            mid, since = self.head
            for t in sched.models[mid].waiters:
                t.waiter.passed_over += self.now - max(since, t.created)
        if head is None:
            self.head = None
        elif self.head is None or self.head[0] != head:
            self.head = (head, self.now)

    # ------------------------------------------------------------ Effects

    def start_engine(self, model_id: str) -> None:
        run = Run(model_id, self.now)
        self.runs[model_id] = run
        self.all_runs.append(run)
        self.used_gb += self.models[model_id].memory_gb
        self.push(self.now + self.models[model_id].load_s, "ready", run)

    def stop_engine(self, model_id: str, reason: str) -> None:
        run = self.runs[model_id]
        run.stopping = True
        run.stop_reason = reason
        self.push(self.now + STOP_S, "exited", run)

    def grant(self, ticket: Ticket) -> None:
        r: Req = ticket.waiter
        r.granted = self.now
        self.runs[ticket.model].served += 1
        self.push(self.now + r.spec.duration, "finish", ticket)

    def reject(self, ticket: Ticket, refusal: Any) -> None:
        r: Req = ticket.waiter
        if self.head is not None and self.head[0] == ticket.model:
            # Its model's start is due and it leaves the queue (a queue timeout): the time
            # it was passed over counts now, or its retry would start again from zero.
            r.passed_over += self.now - max(self.head[1], ticket.created)
        self._refused(r, refusal)

    def changed(self, model_id: str) -> None:
        pass

    def wake_at(self, when: float | None) -> None:
        # Lazy, like the supervisor's: keep an earlier timer; tick() re-arms for the next.
        if when is None or (self.timer_at is not None and self.timer_at <= when):
            return
        self.timer_at = when
        self.push(max(when, self.now), "tick", when)

    # ------------------------------------------------------------ figures

    def figures(self, wall_s: float, end: float) -> dict[str, Any]:
        stopped = [run for run in self.all_runs if run.stopping]
        span = max(self.now, end) or 1.0
        unfinished = sum(1 for r in self.reqs if math.isnan(r.ended))
        return {
            "policy": self.spec.name,
            "requests": len(self.reqs),
            "failed": sum(r.failed for r in self.reqs) + unfinished,
            "waits": sorted(r.wait for r in self.reqs if not math.isnan(r.wait)),
            "loads": len(self.all_runs),
            "wasted_loads": sum(1 for run in stopped if run.served < WASTED_BELOW),
            "load_h": sum(((run.ready if not math.isnan(run.ready) else self.now) - run.started)
                          for run in self.all_runs) / 3600,
            "refusals": sum(r.refusals for r in self.reqs),
            "gb_hours": self.gb_seconds / 3600,
            "passed_over_max": max((r.passed_over for r in self.reqs), default=0.0),
            "longest_request_s": max((r.spec.duration for r in self.reqs), default=0.0),
            "sim_hours": span / 3600,
            "wall_s": wall_s,
        }


SUMMED = ("requests", "failed", "loads", "wasted_loads", "load_h", "refusals", "gb_hours",
          "sim_hours", "wall_s")
MAXED = ("passed_over_max", "longest_request_s")


def summarise(runs: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The figures of one or more replays (of one policy) pooled: counts add up, waits
    are taken together for the percentiles."""
    out: dict[str, Any] = {"policy": runs[0]["policy"], "replays": len(runs)}
    out.update({k: sum(r[k] for r in runs) for k in SUMMED})
    out.update({k: max(r[k] for r in runs) for k in MAXED})
    waits = sorted(w for r in runs for w in r["waits"])
    n = max(1, len(waits))
    out.update({
        "wait_p50": pct(waits, 50), "wait_p95": pct(waits, 95), "wait_p99": pct(waits, 99),
        "wait_mean": sum(waits) / n, "wait_total_h": sum(waits) / 3600,
        "wait_max": waits[-1] if waits else 0.0,
        "waited": sum(1 for w in waits if w > 0.5),
        "memory_util": out["gb_hours"] / (BUDGET_GB * out["sim_hours"]),
        "exceed": {x: sum(1 for w in waits if w > x) / n for x in EXCEED_AT},
    })
    return out


def pct(values: Sequence[float], q: float) -> float:
    """Linear-interpolated percentile of sorted values."""
    if not values:
        return 0.0
    k = (len(values) - 1) * q / 100
    lo = int(k)
    hi = min(lo + 1, len(values) - 1)
    return values[lo] + (values[hi] - values[lo]) * (k - lo)


def simulate(trace: Sequence[Request], spec: PolicySpec,
             models: dict[str, SimModel] | None = None) -> dict[str, Any]:
    """One replay's figures (see `summarise`)."""
    return summarise([Simulation(trace, spec, models).run()])
