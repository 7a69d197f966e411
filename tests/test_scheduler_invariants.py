"""Thousands of random event sequences through the real scheduler: after every event
the invariants hold (the running set fits the budget, at most one start, queued counts
match the waiters, every ticket is in one place), every request is answered exactly
once, and nothing waits forever once the engines behave."""

from __future__ import annotations

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from sparkstack.scheduler import State, Ticket
from sparkstack.scheduler.refusal import Reason, Refusal

from .test_scheduler import make

MODELS = ["a", "b", "c", "d"]


class SchedulerMachine(RuleBasedStateMachine):
    @initialize(
        sizes=st.lists(st.sampled_from([1, 2, 4, 6, 9, 12]), min_size=4, max_size=4),
        pinned=st.sampled_from([None, *MODELS]),
        exclusive=st.sampled_from([None, *MODELS]),
        policy=st.sampled_from(["queue", "reject"]),
        burst_gap=st.sampled_from([0, 5]),
    )
    def setup(self, sizes, pinned, exclusive, policy, burst_gap):
        opts = {m: {"memory_gb": size, "ttl": "30s"} for m, size in zip(MODELS, sizes,
                                                                          strict=True)}
        if pinned:
            opts[pinned]["pinned"] = True
        if exclusive and exclusive != pinned:
            opts[exclusive]["exclusive"] = True
        self.sched, self.fx, self.clock = make(opts, budget=10, busy_policy=policy,
                                               max_queue=12, queue_timeout="60s",
                                               start_backoff="1s", burst_gap=burst_gap,
                                               burst_max="20s")
        self.tickets: list[Ticket] = []
        self.answered: dict[int, int] = {}
        self.sched.tick()

    # ------------------------------------------------------------ requests

    @rule(model=st.sampled_from(MODELS))
    def submit(self, model):
        try:
            self.tickets.append(self.sched.submit(model))
        except Refusal as r:
            assert r.reason in (Reason.QUEUE_FULL, Reason.MODEL_BUSY, Reason.BACKING_OFF)

    @precondition(lambda self: any(t.status != "done" for t in self.tickets))
    @rule(pick=st.integers(min_value=0))
    def finish(self, pick):
        live = [t for t in self.tickets if t.status != "done"]
        self.sched.finish(live[pick % len(live)])

    # ------------------------------------------------------------ engines

    def _in(self, state: State) -> list[str]:
        return [m for m in MODELS if self.sched.models[m].state is state]

    @precondition(lambda self: self.sched.starting is not None)
    @rule(ok=st.booleans())
    def start_ends(self, ok):
        mid = self.sched.starting
        if ok:
            self.sched.engine_ready(mid)
        else:
            self.sched.engine_failed(mid, Refusal(Reason.START_FAILED, mid, error="boom"))

    @precondition(lambda self: bool(self._in(State.STOPPING)))
    @rule(pick=st.integers(min_value=0))
    def stop_completes(self, pick):
        stopping = self._in(State.STOPPING)
        self.sched.engine_exited(stopping[pick % len(stopping)])

    @precondition(lambda self: bool(self._in(State.READY)))
    @rule(pick=st.integers(min_value=0))
    def crash(self, pick):
        ready = self._in(State.READY)
        self.sched.engine_exited(ready[pick % len(ready)], "crashed")

    @rule(model=st.sampled_from(MODELS), force=st.booleans())
    def unload(self, model, force):
        self.sched.unload(model, force)

    @rule(seconds=st.sampled_from([0.5, 2, 31, 61]))
    def time_passes(self, seconds):
        self.clock.t += seconds
        self.sched.tick()

    # ------------------------------------------------------------ what must hold

    @invariant()
    def invariants_hold(self):
        self.sched.check_invariants()

    @invariant()
    def each_request_is_answered_at_most_once(self):
        for t, _ in self.fx.rejected:
            assert t.status == "done"
        granted = [t for t in self.fx.granted]
        assert len({id(t) for t in granted}) == len(granted), "a request granted twice"
        both = {id(t) for t in granted} & {id(t) for t, _ in self.fx.rejected}
        assert not both, "a request both granted and refused"

    def teardown(self):
        if not hasattr(self, "sched"):
            return
        # The engines now behave: every start succeeds, every stop completes, time
        # passes. Every waiting request must then be answered (granted or refused).
        for _ in range(200):
            if self.sched.starting:
                self.sched.engine_ready(self.sched.starting)
            for m in self._in(State.STOPPING):
                self.sched.engine_exited(m)
            for t in list(self.tickets):
                if t.status == "granted":
                    self.sched.finish(t)
            self.clock.t += 5
            self.sched.tick()
            self.sched.check_invariants()
            if all(t.status == "done" for t in self.tickets):
                break
        assert all(t.status == "done" for t in self.tickets), "a request waits forever"


SchedulerMachine.TestCase.settings = settings(
    max_examples=500, stateful_step_count=40, deadline=None,
    suppress_health_check=[HealthCheck.too_slow])
test_random_event_sequences_keep_the_invariants = SchedulerMachine.TestCase
