"""The scheduling policy: who is served now, who waits, what starts and what stops.

Events in, effects out. Everything that happens (a request arrives or ends, an engine
becomes ready, fails or exits, an admin unloads, time passes) is a synchronous method
call on `Scheduler`; it answers through the narrow `Effects` interface. It never awaits,
so on the event loop each call is atomic: "start if needed" is decided in one place,
from the current state, never from a stale snapshot.

The policy, top to bottom:
1. A request for a ready model that nothing is asking to stop is granted at once, even
   while other models load (no head-of-line blocking).
2. Otherwise it waits in its model's queue, and the model joins the start queue (FIFO by
   first waiter). A starting model collects waiters; they are all granted when it is ready.
3. Engine starts are serialised (concurrent starts on unified memory corrupt each
   other's memory profiling). The head of the start queue plans its room with the
   eviction `Policy` (eviction.py; ours unless another is given): victims are marked
   leaving and stop as soon as their in-flight requests end, never before. New requests
   for a leaving model queue behind the swap. A victim still inside its min_residency,
   or in a burst of requests, is not marked yet: the head waits, still first in line;
   meanwhile a later queued model that fits in free memory may start if its load ends
   before the head could start (backfilling). A request refused by queue_timeout whose
   client retries in time gets its place in the start queue back.
4. A failed start answers every waiter with the error and backs off before the next try;
   the model is stopped again, never wedged.
5. Ready models with no request in flight stop after their TTL; pinned models never idle
   out and are restarted whenever they fit without evicting anything.
6. With `prewarm`, when nothing waits and nothing starts, the model its habit says is
   next starts into free memory; any request that needs a start cancels it.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Set
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Protocol

from ..config import Model
from . import invariants
from .eviction import (
    AUTO_RESIDENCY_MAX_S,
    DEMAND_WINDOW_S,
    CostAware,
    DailyProfile,
    Policy,
    plan,
)
from .refusal import Reason, Refusal

MAX_BACKOFF_S = 60.0
DEFAULT_REQUEST_S = 15.0  # what we assume a request takes before we have measured any
DEFAULT_LOAD_S = 60.0  # what we assume a start takes when neither measured nor declared
PREWARM_HORIZON_S = 1800.0  # pre-warm a model likely to be asked for within this long
PREWARM_LIKELIHOOD = 0.5  # ... on at least this share of the last days
RETRY_GRACE_S = 10.0  # a client retrying this long after the Retry-After keeps its place


class State(StrEnum):
    STOPPED = "stopped"
    STARTING = "starting"
    READY = "ready"
    STOPPING = "stopping"


@dataclass(eq=False, slots=True)
class Ticket:
    """One request's claim on a model: waiting, then granted, then done."""

    model: str
    created: float
    deadline: float  # give up waiting for memory at this time
    waiter: Any = None  # opaque to the scheduler (the gateway's future)
    status: str = "waiting"  # waiting | granted | done
    run: int = 0  # the engine run it was granted on
    granted_at: float = 0.0


@dataclass(eq=False)
class ModelState:
    """One model's live state. It is also what `eviction.plan` reads (id, memory_gb,
    busy, last_used, pinned, exclusive, leaving, movable): no copy per decision."""

    model: Model
    state: State = State.STOPPED
    run: int = 0  # increments at each start; requests of an older run no longer count
    active: set[Ticket] = field(default_factory=set)
    waiters: deque[Ticket] = field(default_factory=deque)
    last_used: float = 0.0
    last_error: str | None = None
    failures: int = 0
    retry_at: float = 0.0
    unload_requested: bool = False
    evicting: str | None = None  # the model this one stops for
    started_at: float = 0.0
    ready_at: float = 0.0
    load_seconds: float | None = None
    stop_reason: str | None = None
    avg_request_s: float | None = None
    measured_load_s: float | None = None  # the last start's duration, kept across runs
    prewarmed: bool = False  # started ahead of demand; nobody has asked for it since
    holding_since: float | None = None  # when this run first held a due start back
    queued_since: float = 0.0  # when its waiters first asked for a start (see _enqueue)
    place_until: float = 0.0  # a request before then takes back its place in the start queue
    _demand: float = 0.0  # requests, decayed over DEMAND_WINDOW_S, as of _demand_at
    _demand_at: float = 0.0
    profile: DailyProfile | None = None  # its daily habit, kept when pre-warming may use it
    replacement: Model | None = None  # a reloaded config, taken up once the engine stopped
    removed: bool = False  # gone from the catalog: stops once idle, never starts again

    def __post_init__(self) -> None:
        self.use(self.model)

    def use(self, model: Model) -> None:
        """Serve `model`'s catalog entry from now on (same id)."""
        self.model = model
        self.id = model.id
        self.memory_gb = model.memory_gb
        self.pinned = model.cfg.pinned
        self.exclusive = model.cfg.exclusive

    @property
    def busy(self) -> bool:
        return bool(self.active)

    @property
    def movable(self) -> bool:
        return self.state is not State.STARTING  # a start is never cut short

    @property
    def leaving(self) -> bool:
        return (self.state is State.STOPPING or self.unload_requested
                or self.evicting is not None)

    @property
    def resident(self) -> bool:
        return self.state is not State.STOPPED

    @property
    def min_residency(self) -> float:
        declared = self.model.min_residency
        return min(AUTO_RESIDENCY_MAX_S, self.load_estimate) if declared is None else declared

    @property
    def burst_gap(self) -> float:
        return self.model.burst_gap

    @property
    def burst_max(self) -> float:
        return self.model.burst_max

    @property
    def load_estimate(self) -> float:
        if self.measured_load_s is not None:
            return self.measured_load_s
        return self.model.cfg.load_seconds or DEFAULT_LOAD_S

    def demand(self, now: float) -> float:
        return self._demand * math.exp((self._demand_at - now) / DEMAND_WINDOW_S)

    def note_request(self, now: float) -> None:
        self._demand = self.demand(now) + 1.0
        self._demand_at = now
        self.prewarmed = False
        if self.model.prewarm:
            if self.profile is None:
                self.profile = DailyProfile()
            self.profile.note(now)


class Effects(Protocol):
    def start_engine(self, model_id: str) -> None: ...
    def stop_engine(self, model_id: str, reason: str) -> None: ...
    def grant(self, ticket: Ticket) -> None: ...
    def reject(self, ticket: Ticket, refusal: Refusal) -> None: ...
    def changed(self, model_id: str) -> None: ...
    def wake_at(self, when: float | None) -> None: ...


class Scheduler:
    def __init__(
        self,
        models: Iterable[Model],
        budget_gb: float,
        effects: Effects,
        clock: Callable[[], float],
        *,
        queue_timeout: float = 600.0,
        max_queue: int = 1000,
        start_backoff: float = 2.0,
        policy: Policy | None = None,
        load_times: Mapping[str, float] | None = None,
    ) -> None:
        """`policy` chooses victims and protects fresh loads (ours unless given);
        `load_times` are start durations measured by earlier runs, by model id."""
        self.models = {m.id: ModelState(m) for m in models}
        for mid, seconds in (load_times or {}).items():
            if mid in self.models:
                self.models[mid].measured_load_s = seconds
        self.policy: Policy = policy or CostAware()
        self.budget_gb = budget_gb
        self.effects = effects
        self.clock = clock
        self.queue_timeout = queue_timeout
        self.max_queue = max_queue
        self.start_backoff = start_backoff
        self.pending: dict[str, None] = {}  # models waiting to start, FIFO (an ordered set)
        self.residents: dict[str, ModelState] = {}
        self.starting: str | None = None
        self.queued = 0
        self.shutting_down = False
        self.pinned = [s for s in self.models.values() if s.model.cfg.pinned and s.model.enabled]

    # ------------------------------------------------------------ requests

    def submit(self, model_id: str, waiter: Any = None) -> Ticket:
        """A request for `model_id` arrives. Raises Refusal if it is refused at once."""
        if self.shutting_down:
            raise Refusal(Reason.SHUTTING_DOWN, model_id)
        s = self.models[model_id]
        now = self.clock()
        s.note_request(now)
        ticket = Ticket(model_id, now, now + self.queue_timeout, waiter)
        if s.state is State.READY and not s.leaving:
            self._grant(s, ticket, now)
            return ticket
        if s.state is State.STOPPED and s.retry_at > now and s.last_error:
            # A start failed moments ago: answer with its error rather than start the
            # same broken engine again for each of the client's own retries.
            raise Refusal(Reason.BACKING_OFF, model_id, retry_after=s.retry_at - now,
                          error=s.last_error)
        if self.queued >= self.max_queue:
            raise Refusal(Reason.QUEUE_FULL, model_id, queue_max=self.max_queue,
                          retry_after=self._expected_wait(self._busy_blockers(s), s))
        if s.model.busy_policy == "reject" and s.state is not State.STARTING:
            busy = self._busy_blockers(s)
            if busy:
                raise Refusal(Reason.MODEL_BUSY, model_id, busy=[b.id for b in busy],
                              retry_after=self._expected_wait(busy, s))
        s.waiters.append(ticket)
        self.queued += 1
        if s.state is not State.STARTING:
            self._enqueue(s, now)
        self.effects.wake_at(ticket.deadline)
        self._schedule()
        # Watchers see the new waiter and what it set in motion (victims marked leaving).
        self.effects.changed(model_id)
        return ticket

    def stand_in(self, model_id: str, may_serve: Callable[[str], bool]) -> str | None:
        """A running model to answer a request for `model_id` in its place (its
        `stand_ins`, `may_serve` by the caller's rules), when `model_id` is neither running
        nor starting and starting it would stop another model: a title request beside an
        exclusive chat model is answered by the chat model at once, rather than stop it,
        load the task model, and load the chat model again for its user's next turn. Of
        several, the first listed; with "any", the smallest."""
        s = self.models.get(model_id)
        if s is None or not s.model.cfg.stand_ins or s.state in (State.READY, State.STARTING):
            return None
        if self.policy.victims(s, self.residents.values(), self.budget_gb, self.clock()) == []:
            return None  # it fits: it starts, nothing else pays for it
        listed = s.model.cfg.stand_ins
        ready = [r for r in self.residents.values()
                 if r.state is State.READY and not r.leaving and r.id != model_id
                 and (listed == "any" or r.id in listed) and may_serve(r.id)]
        if not ready:
            return None
        if listed == "any":
            return min(ready, key=lambda r: (r.model.memory_gb, r.id)).id
        return min(ready, key=lambda r: listed.index(r.id)).id

    def finish(self, ticket: Ticket) -> None:
        """The request ended (answered, failed, or its client went away)."""
        s = self.models[ticket.model]
        now = self.clock()
        waiting = ticket.status == "waiting"
        if waiting:
            ticket.status = "done"
            s.waiters.remove(ticket)
            self.queued -= 1
            if not s.waiters:
                self.pending.pop(s.id, None)
        elif ticket.status == "granted":
            ticket.status = "done"
            if ticket.run == s.run and ticket in s.active:
                s.active.discard(ticket)
                s.last_used = now
                took = now - ticket.granted_at
                s.avg_request_s = took if s.avg_request_s is None else (
                    0.8 * s.avg_request_s + 0.2 * took)
                self._stop_if_drained(s)
                self._wake_for_idle(s)
        else:
            return
        self.effects.changed(s.id)
        # Re-plan only when it can change something: a waiter left (its eviction may be
        # called off) or starts are waiting (a drained victim frees their memory). A
        # request ending on a model nobody waits for is the hot path: no scan at all.
        if waiting or self.pending:
            self._schedule()

    # ------------------------------------------------------------ engine events

    def engine_ready(self, model_id: str) -> None:
        s = self.models[model_id]
        if s.state is not State.STARTING:
            return
        now = self.clock()
        s.state = State.READY
        s.ready_at = s.last_used = now
        s.load_seconds = s.measured_load_s = now - s.started_at
        s.failures = 0
        s.last_error = None
        self.starting = None
        self.pending.pop(model_id, None)
        while s.waiters:
            self._grant(s, s.waiters.popleft(), now)
            self.queued -= 1
        self.effects.changed(model_id)
        self._stop_if_drained(s)
        self._wake_for_idle(s)
        self._schedule()

    def engine_failed(self, model_id: str, refusal: Refusal) -> None:
        """The start failed or timed out; the engine has already been stopped."""
        s = self.models[model_id]
        if s.state is not State.STARTING:
            return
        now = self.clock()
        s.failures += 1
        s.retry_at = now + min(MAX_BACKOFF_S, self.start_backoff * 2 ** (s.failures - 1))
        self.effects.wake_at(s.retry_at)
        s.last_error = refusal.error or refusal.reason.value
        s.unload_requested = False
        self._set_stopped(s)
        self.pending.pop(model_id, None)
        self._reject_all(s, refusal)
        self.effects.changed(model_id)
        self._schedule()

    def engine_exited(self, model_id: str, error: str | None = None) -> None:
        """The engine is gone: a stop we asked for (error None) or a crash."""
        s = self.models[model_id]
        if s.state is State.STOPPED:
            return
        if s.state is State.STARTING:
            self.engine_failed(model_id, Refusal(Reason.START_FAILED, model_id,
                                                 error=error or "the engine exited"))
            return
        if s.state is not State.STOPPING:
            s.last_error = error or "engine exited"
            s.stop_reason = "crashed"
        self._set_stopped(s)
        if s.waiters:
            self._enqueue(s, self.clock())
        self.effects.changed(model_id)
        self._schedule()

    # ------------------------------------------------------------ admin

    def unload(self, model_id: str, force: bool = False) -> None:
        """Stop a model once its in-flight requests end, or now with `force`."""
        s = self.models[model_id]
        if s.state in (State.STOPPED, State.STOPPING):
            return
        s.unload_requested = True
        if force:
            self._reject_all(s, Refusal(Reason.UNLOADED, model_id))
            self._stop(s, "unloaded (forced)")
        else:
            self._stop_if_drained(s)
        self.effects.changed(model_id)
        self._schedule()

    def reconfigure(self, models: Mapping[str, Model], restart: Set[str]) -> None:
        """A reloaded catalog. Models in `restart` whose engine runs are stopped once
        their in-flight requests end and come back with the new entry; models no longer
        in `models` stop once idle and are never started again; new ones are available
        at once; every other model takes its new entry now, its engine untouched."""
        for mid, s in self.models.items():
            new = models.get(mid)
            if new is None:
                s.removed = True
                s.replacement = None
                if s.resident:
                    self._retire(s)
                else:
                    self._reject_all(s, Refusal(Reason.UNLOADED, mid))
            elif mid in restart and s.resident:
                s.removed = False
                s.replacement = new
                self._retire(s)
            else:
                s.removed = False
                s.replacement = None
                s.use(new)
        for mid, model in models.items():
            if mid not in self.models:
                self.models[mid] = ModelState(model)
        self.pinned = [s for s in self.models.values()
                       if s.model.cfg.pinned and s.model.enabled and not s.removed]
        for mid in self.models:
            self.effects.changed(mid)
        self._schedule()

    def _retire(self, s: ModelState) -> None:
        """Stop `s` once its in-flight requests end (an unload that waits)."""
        if s.state is State.STOPPING:
            return
        s.unload_requested = True
        self._stop_if_drained(s)

    def shutdown(self) -> None:
        """Refuse new requests and answer every waiter; running requests go on."""
        self.shutting_down = True
        for s in self.models.values():
            self._reject_all(s, Refusal(Reason.SHUTTING_DOWN, s.id))

    def stop_all(self, reason: str = "shutdown", keep: Set[str] = frozenset()) -> None:
        for s in list(self.residents.values()):
            if s.state in (State.READY, State.STARTING) and s.id not in keep:
                self._stop(s, reason)

    def adopt(self, model_id: str) -> None:
        """A healthy engine from an earlier gateway is ours again: ready, idle clock from now."""
        s = self.models[model_id]
        if s.state is not State.STOPPED:
            return
        now = self.clock()
        s.state = State.READY
        s.run += 1
        s.ready_at = s.last_used = now
        self.residents[model_id] = s
        self.effects.changed(model_id)
        self._wake_for_idle(s)
        self._schedule()

    # ------------------------------------------------------------ time

    def tick(self) -> None:
        """Time passed: idle TTLs, queue timeouts and start back-offs may have expired."""
        now = self.clock()
        for s in list(self.residents.values()):
            if self.idle_deadline(s) <= now:
                self._stop(s, "idle")
        for mid in list(self.pending):
            s = self.models[mid]
            if s.waiters and s.waiters[0].deadline <= now:
                busy = self._busy_blockers(s)
                retry_after = self._expected_wait(busy, s)
                self._reject_all(s, Refusal(
                    Reason.QUEUE_TIMEOUT, mid, busy=[b.id for b in busy],
                    waited_s=self.queue_timeout, retry_after=retry_after), expired_by=now)
                if mid not in self.pending:  # the clients retry: hold their place till then
                    s.place_until = now + retry_after + RETRY_GRACE_S
        self._schedule()
        self.effects.wake_at(self.next_deadline())

    def check_invariants(self) -> None:
        """Raise AssertionError if the state breaks a rule (scheduler/invariants.py)."""
        invariants.check(self)

    def next_deadline(self) -> float | None:
        """The earliest idle TTL, queue timeout or back-off. A full scan: only tick() runs
        it; every event that creates a deadline reports it through wake_at itself."""
        deadlines = [self.idle_deadline(s) for s in self.residents.values()]
        for mid in self.pending:
            s = self.models[mid]
            deadlines.append(s.waiters[0].deadline)
            if s.retry_at > self.clock():
                deadlines.append(s.retry_at)
        when = min(deadlines, default=math.inf)
        return None if when == math.inf else when

    # ------------------------------------------------------------ the decision

    def _schedule(self) -> None:
        if not self.shutting_down:
            self._plan_starts()

    def _plan_starts(self) -> None:
        now = self.clock()
        was_evicting = [s for s in self.residents.values() if s.evicting]
        for s in was_evicting:
            s.evicting = None
        if (self.starting is not None and self.models[self.starting].prewarmed
                and any(self.models[m].retry_at <= now for m in self.pending)):
            # A real request needs the start slot: a guess never makes anyone wait.
            self._stop(self.models[self.starting], "pre-warm cancelled")
        target = self._next_start(now)
        while target is not None:
            victims = self.policy.victims(target, self.residents.values(), self.budget_gb, now)
            if victims is None:  # can never fit: refuse it and let the next one plan
                self._refuse_never_fits(target)
                target = self._next_start(now)
                continue
            hold = max((self.policy.hold_until(self.residents[v], target, now)
                        for v in victims), default=0.0)
            if hold > now:  # a fresh load or a burst serves on: the start waits,
                if hold != math.inf:  # still first in line
                    self.effects.wake_at(hold)
                for vid in victims:  # burst_max counts from the first start held back
                    v = self.residents[vid]
                    if v.holding_since is None and self.policy.hold_until(v, target, now) > now:
                        v.holding_since = now
                self._backfill(target, victims, now)
                break
            for vid in victims:
                self.residents[vid].evicting = target.id
                self._stop_if_drained(self.residents[vid])
            if not victims and self._free_gb() >= target.model.memory_gb - 1e-9:
                self._start(target, now)
            else:
                self._backfill(target, victims, now)
            break
        # A model whose eviction is called off serves its queued requests again.
        for s in was_evicting:
            if s.state is State.READY and not s.leaving:
                self.pending.pop(s.id, None)
                while s.waiters:
                    self._grant(s, s.waiters.popleft(), now)
                    self.queued -= 1
                self._wake_for_idle(s)
                self.effects.changed(s.id)
        if self.starting is None and not self.pending:
            self._start_pinned(now)
        if self.starting is None and not self.pending:
            self._prewarm(now)

    def _next_start(self, now: float) -> ModelState | None:
        """The head of the start queue, skipping models in back-off or still stopping."""
        if self.starting is not None:
            return None
        for mid in self.pending:
            s = self.models[mid]
            if s.retry_at > now or s.resident:
                continue
            return s
        return None

    def _enqueue(self, s: ModelState, now: float) -> None:
        """`s` joins the start queue (FIFO), or takes back the place its requests had
        before a queue timeout when a client retries in time: a timed-out request is not
        sent to the back of the line behind models asked for after it."""
        if s.id in self.pending:
            return
        self.pending[s.id] = None
        if s.place_until >= now:
            order = sorted(self.pending, key=lambda m: self.models[m].queued_since)
            self.pending.clear()
            self.pending.update(dict.fromkeys(order))
        else:
            s.queued_since = now
        s.place_until = 0.0

    def _backfill(self, head: ModelState, victims: list[str], now: float) -> None:
        """The head of the start queue waits for memory (a hold, requests in flight):
        start a later queued model that fits in free memory if its load ends before the
        head could start, so the head waits no longer for it (backfilling, as batch
        schedulers do). Typically a small model (embeddings, the utility) whose request
        would otherwise wait behind the big swap."""
        if not self.policy.backfill or self.starting is not None:
            return
        due = now + self._expected_wait([self.residents[v] for v in victims], head)
        free = self._free_gb()
        # What stays free once the head's victims have gone and the head runs: a
        # backfilled model must fit there too, or it would become one more victim.
        spare = free + sum(self.residents[v].memory_gb for v in victims) - head.memory_gb
        for mid in self.pending:
            s = self.models[mid]
            if (s is head or s.retry_at > now or s.resident
                    or s.memory_gb > min(free, spare) + 1e-9
                    or now + s.load_estimate > due):
                continue
            if plan(s.memory_gb, s.exclusive, self.residents.values(), self.budget_gb) == []:
                self._start(s, now)
                return

    def _start_pinned(self, now: float) -> None:
        for s in self.pinned:
            if s.state is State.STOPPED and s.retry_at <= now:
                victims = plan(s.model.memory_gb, False, self.residents.values(), self.budget_gb)
                if victims == [] and self._free_gb() >= s.model.memory_gb - 1e-9:
                    self._start(s, now)
                    return

    def _prewarm(self, now: float) -> None:
        """Nothing waits and no start runs: start the `prewarm` model most likely to be
        asked for within PREWARM_HORIZON_S (by its habit at this time of day), if that is
        likely enough and it fits in free memory. Never evicts; any real request that
        needs a start cancels it; a pre-warm left unused until its TTL is not repeated
        until the model is asked for again."""
        best, best_p, any_habit = None, PREWARM_LIKELIHOOD, False
        free = self._free_gb()
        for s in self.models.values():
            if s.profile is None or not s.model.prewarm or not s.model.enabled or s.removed:
                continue
            any_habit = True
            if (s.state is not State.STOPPED or s.retry_at > now or s.memory_gb > free + 1e-9
                    or (s.prewarmed and s.stop_reason == "idle")):
                continue
            p = s.profile.likelihood(now, PREWARM_HORIZON_S)
            if p >= best_p and plan(s.memory_gb, s.exclusive, self.residents.values(),
                                    self.budget_gb) == []:
                best, best_p = s, p
        if best is not None:
            self._start(best, now)
            best.prewarmed = True
        elif any_habit:  # habits move with the clock: look again at the next quarter hour
            slot = DailyProfile.SLOT_S
            self.effects.wake_at((now // slot + 1) * slot)

    def _refuse_never_fits(self, s: ModelState) -> None:
        s.last_error = (f"needs {s.model.memory_gb:g} GB but the memory budget is "
                        f"{self.budget_gb:g} GB")
        self._reject_all(s, Refusal(Reason.NEVER_FITS, s.id, needed_gb=s.model.memory_gb,
                                    budget_gb=self.budget_gb))

    # ------------------------------------------------------------ transitions

    def _reject_all(
        self, s: ModelState, refusal: Refusal, expired_by: float | None = None
    ) -> None:
        """Answer the model's waiters with `refusal` (only those past their deadline, if given)."""
        while s.waiters and (expired_by is None or s.waiters[0].deadline <= expired_by):
            t = s.waiters.popleft()
            self.queued -= 1
            t.status = "done"
            self.effects.reject(t, refusal)
        if not s.waiters:
            self.pending.pop(s.id, None)

    def _grant(self, s: ModelState, ticket: Ticket, now: float) -> None:
        ticket.status = "granted"
        ticket.run = s.run
        ticket.granted_at = now
        s.active.add(ticket)
        s.last_used = now
        self.effects.grant(ticket)
        self.effects.changed(s.id)

    def _start(self, s: ModelState, now: float) -> None:
        s.state = State.STARTING
        s.run += 1
        s.started_at = now
        s.stop_reason = None
        s.holding_since = None
        s.active.clear()
        self.starting = s.id
        self.residents[s.id] = s
        self.pending.pop(s.id, None)
        self.effects.start_engine(s.id)
        self.effects.changed(s.id)

    def _stop(self, s: ModelState, reason: str) -> None:
        if s.state is State.STARTING:
            self.starting = None
        s.state = State.STOPPING
        s.stop_reason = reason
        self.effects.stop_engine(s.id, reason)
        self.effects.changed(s.id)

    def _stop_if_drained(self, s: ModelState) -> None:
        if s.state is State.READY and s.leaving and not s.active:
            self._stop(s, "unloaded" if s.unload_requested else f"evicted for {s.evicting}")

    def _set_stopped(self, s: ModelState) -> None:
        if self.starting == s.id:
            self.starting = None
        s.state = State.STOPPED
        s.active.clear()
        s.unload_requested = False
        s.evicting = None
        self.residents.pop(s.id, None)
        if s.replacement is not None:  # a reload changed its engine: the next start uses it
            s.use(s.replacement)
            s.replacement = None
        if s.removed:
            self._reject_all(s, Refusal(Reason.UNLOADED, s.id))

    # ------------------------------------------------------------ views

    def _wake_for_idle(self, s: ModelState) -> None:
        when = self.idle_deadline(s)
        if when != math.inf:
            self.effects.wake_at(when)

    def idle_deadline(self, s: ModelState) -> float:
        if (s.state is not State.READY or s.active or s.leaving or s.model.cfg.pinned
                or s.model.ttl <= 0):
            return math.inf
        return s.last_used + s.model.ttl

    def _free_gb(self) -> float:
        return self.budget_gb - sum(s.model.memory_gb for s in self.residents.values())

    def _busy_blockers(self, s: ModelState) -> list[ModelState]:
        """Models this request would wait for before its model can start: busy ones, and
        fresh loads still inside their min_residency."""
        if s.state is State.READY:
            return [s] if s.active else []
        now = self.clock()
        victims = self.policy.victims(s, self.residents.values(), self.budget_gb, now) or []
        leaving = [r.id for r in self.residents.values() if r.leaving]
        return [r for r in (self.residents[v] for v in dict.fromkeys(victims + leaving))
                if r.active or (not r.leaving and self.policy.hold_until(r, s, now) > now)]

    def _expected_wait(self, busy: list[ModelState], target: ModelState) -> float:
        """Honest guess of when the blockers free up: their typical request length minus
        how long their oldest request has run, or the end of their min_residency."""
        now = self.clock()
        wait = 1.0
        for s in busy:
            if s.active:
                typical = s.avg_request_s or DEFAULT_REQUEST_S
                oldest = min((t.granted_at for t in s.active), default=now)
                wait = max(wait, typical - (now - oldest))
            if not s.leaving:
                wait = max(wait, self.policy.hold_until(s, target, now) - now)
        return wait
