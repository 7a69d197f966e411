"""The scheduling policy, driven without processes, sockets or sleeps.

A fake clock and a recorder of effects stand in for time and the supervisor.
"""

from __future__ import annotations

from typing import Any

import pytest

from sparkstack.config import load_config
from sparkstack.gateway.refusals import to_api_error
from sparkstack.scheduler import Resident, Scheduler, State, Ticket, plan
from sparkstack.scheduler.refusal import Reason, Refusal


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


class Recorder:
    """The scheduler's effects, written down."""

    def __init__(self) -> None:
        self.started: list[str] = []
        self.stopped: list[tuple[str, str]] = []
        self.granted: list[Ticket] = []
        self.rejected: list[tuple[Ticket, Refusal]] = []
        self.wakes: list[float] = []  # every "wake me by then" the scheduler asked for

    def start_engine(self, model_id: str) -> None:
        self.started.append(model_id)

    def stop_engine(self, model_id: str, reason: str) -> None:
        self.stopped.append((model_id, reason))

    def grant(self, ticket: Ticket) -> None:
        self.granted.append(ticket)

    def reject(self, ticket: Ticket, refusal: Refusal) -> None:
        self.rejected.append((ticket, refusal))

    def changed(self, model_id: str) -> None:
        pass

    def wake_at(self, when: float | None) -> None:
        if when is not None:
            self.wakes.append(when)


def make(models: dict[str, dict[str, Any]], budget: float = 10, **settings: Any):
    # The mechanics here do not wait for bursts (finish, then at once another model):
    # tests/test_scheduler_policy.py tests the burst hold.
    settings.setdefault("burst_gap", 0)
    lines = [f"{k}: {v}" for k, v in settings.items()]
    lines.append("models:")
    for mid, opts in models.items():
        lines.append(f"  {mid}:")
        lines.append("    command: [engine]")
        for k, v in opts.items():
            lines.append(f"    {k}: {str(v).lower() if isinstance(v, bool) else v}")
    cfg = load_config(text="\n".join(lines), env={})
    s = cfg.settings
    clock, fx = Clock(), Recorder()
    sched = Scheduler(cfg.models.values(), budget, fx, clock, queue_timeout=s.queue_timeout,
                      max_queue=s.max_queue, start_backoff=s.start_backoff)
    return sched, fx, clock


def ready(sched: Scheduler, mid: str) -> None:
    sched.engine_ready(mid)


def stopped(sched: Scheduler, mid: str) -> None:
    assert sched.models[mid].state is State.STOPPING, sched.models[mid].state
    sched.engine_exited(mid)


# ------------------------------------------------------------------ eviction policy


def r(id: str, mem: float, used: float, **kw: Any) -> Resident:
    return Resident(id=id, memory_gb=mem, busy=kw.pop("busy", False), last_used=used, **kw)


def test_plan_nothing_to_stop_when_it_fits():
    assert plan(4, False, [r("a", 4, 1)], 10) == []


def test_plan_prefers_idle_then_least_recently_used():
    residents = [r("busy-old", 4, 1, busy=True), r("idle-new", 4, 5), r("idle-old", 4, 2)]
    assert plan(4, False, residents, 12) == ["idle-old"]
    assert plan(8, False, residents, 12) == ["idle-old", "idle-new"]
    assert plan(12, False, residents, 12) == ["idle-old", "idle-new", "busy-old"]


def test_plan_keeps_pinned_models_until_last():
    residents = [r("utility", 1, 0, pinned=True), r("chat", 6, 9)]
    assert plan(5, False, residents, 10) == ["chat"]


def test_plan_does_not_stop_a_small_model_needlessly():
    residents = [r("small", 1, 1), r("big", 8, 2)]
    assert plan(8, False, residents, 10) == ["big"]


def test_plan_exclusive_target_stops_everything_and_exclusive_resident_goes_first():
    residents = [r("utility", 1, 0, pinned=True), r("chat", 2, 9)]
    assert set(plan(5, True, residents, 100) or []) == {"utility", "chat"}
    assert plan(1, False, [r("huge", 5, 1, exclusive=True)], 100) == ["huge"]


def test_plan_counts_memory_already_on_its_way_out():
    assert plan(6, False, [r("a", 6, 1, leaving=True), r("b", 4, 2)], 10) == []


def test_plan_refuses_what_can_never_fit():
    assert plan(11, False, [], 10) is None


def test_plan_for_500_models_is_a_list_not_a_search():
    residents = [r(f"m{i}", 0.1, i) for i in range(500)]
    assert plan(0.5, False, residents, 50) == [f"m{i}" for i in range(5)]


# ------------------------------------------------------------------ cold start


def test_concurrent_requests_for_a_stopped_model_start_it_once():
    sched, fx, _ = make({"a": {"memory_gb": 4}})
    tickets = [sched.submit("a") for _ in range(20)]
    assert fx.started == ["a"]
    assert not fx.granted
    ready(sched, "a")
    assert fx.granted == tickets
    assert sched.models["a"].active == set(tickets)


def test_ready_model_is_granted_at_once_while_another_loads():
    sched, fx, _ = make({"a": {"memory_gb": 4}, "b": {"memory_gb": 4}})
    t = sched.submit("a")
    ready(sched, "a")
    sched.finish(t)
    sched.submit("b")  # b starts loading
    assert fx.started == ["a", "b"]
    fast = sched.submit("a")
    assert fast.status == "granted"


def test_engine_starts_are_serialised():
    sched, fx, _ = make({"a": {"memory_gb": 1}, "b": {"memory_gb": 1}})
    sched.submit("a")
    sched.submit("b")
    assert fx.started == ["a"]
    ready(sched, "a")
    assert fx.started == ["a", "b"]


def test_failed_start_answers_every_waiter_and_retries_after_backoff():
    sched, fx, clock = make({"a": {"memory_gb": 1}}, start_backoff=2)
    t1, t2 = sched.submit("a"), sched.submit("a")
    sched.engine_failed("a", Refusal(Reason.START_FAILED, "a", error="boom: last lines"))
    assert [t for t, _ in fx.rejected] == [t1, t2]
    assert sched.models["a"].state is State.STOPPED
    assert sched.models["a"].last_error == "boom: last lines"
    clock.t += 0.5
    with pytest.raises(Refusal) as e:  # a client's own retry gets the error at once
        sched.submit("a")
    assert e.value.reason is Reason.BACKING_OFF and e.value.error == "boom: last lines"
    assert e.value.retry_after == 1.5
    assert fx.started == ["a"], "no retry during the back-off"
    err = to_api_error(e.value)
    assert err.status == 503 and err.headers["Retry-After"] == "2"
    assert "boom: last lines" in err.message
    clock.t += 1.5
    sched.submit("a")
    assert fx.started == ["a", "a"]


def test_backoff_doubles_then_resets_after_a_success():
    sched, _fx, clock = make({"a": {"memory_gb": 1}}, start_backoff=1)
    for expected in (1, 2, 4):
        clock.t = max(clock.t, sched.models["a"].retry_at)
        sched.submit("a")
        sched.engine_failed("a", Refusal(Reason.START_FAILED, "a", error="x"))
        assert sched.models["a"].retry_at - clock.t == expected
    clock.t = sched.models["a"].retry_at
    t = sched.submit("a")
    ready(sched, "a")
    assert t.status == "granted" and sched.models["a"].failures == 0


def test_a_model_that_never_fits_does_not_hold_up_the_next_one():
    sched, fx, _ = make({"huge": {"memory_gb": 20}, "a": {"memory_gb": 6},
                         "b": {"memory_gb": 6}}, budget=10)
    ta = sched.submit("a")
    ready(sched, "a")
    sched.finish(ta)
    sched.submit("b")  # a is idle: it is stopped for b
    stopped(sched, "a")
    sched.submit("huge")  # both wait for b's start to finish: huge first, then a
    ta2 = sched.submit("a")
    ready(sched, "b")
    assert fx.rejected and fx.rejected[0][1].reason is Reason.NEVER_FITS
    assert sched.models["b"].leaving, "a plans its room at once: huge does not block it"
    assert ta2.status == "waiting"


def test_model_larger_than_budget_is_refused_with_the_numbers():
    sched, fx, _ = make({"huge": {"memory_gb": 20}}, budget=10)
    sched.submit("huge")
    (_, refusal), = fx.rejected
    err = to_api_error(refusal)
    assert err.status == 503 and "20 GB" in err.message and "10 GB" in err.message
    assert not fx.started


# ------------------------------------------------------------------ swapping


def swap_setup(**settings: Any):
    sched, fx, clock = make({"a": {"memory_gb": 6}, "b": {"memory_gb": 6}, "c": {"memory_gb": 2}},
                            **settings)
    ta = sched.submit("a")
    ready(sched, "a")
    return sched, fx, clock, ta


def test_swap_waits_for_inflight_request_then_stops_and_starts():
    sched, fx, _, ta = swap_setup()
    tb = sched.submit("b")
    assert fx.stopped == [] and fx.started == ["a"], "a is busy: never cut off"
    assert sched.models["a"].leaving
    sched.finish(ta)
    assert fx.stopped == [("a", "evicted for b")]
    stopped(sched, "a")
    assert fx.started == ["a", "b"]
    ready(sched, "b")
    assert tb.status == "granted"


def test_requests_for_a_leaving_model_queue_behind_the_swap():
    sched, fx, _, ta = swap_setup()
    sched.submit("b")
    late = sched.submit("a")
    assert late.status == "waiting", "a busy model cannot starve the swap"
    sched.finish(ta)
    stopped(sched, "a")
    assert fx.started[-1] == "b"
    ready(sched, "b")
    # b is idle (its request was granted and is still running) -> a waits for it
    assert late.status == "waiting"


def test_idle_model_is_evicted_at_once():
    sched, fx, _, ta = swap_setup()
    sched.finish(ta)
    sched.submit("b")
    assert fx.stopped == [("a", "evicted for b")]


def test_eviction_is_called_off_when_the_waiter_leaves():
    sched, fx, _, ta = swap_setup()
    tb = sched.submit("b")
    late = sched.submit("a")
    sched.finish(tb)  # the client of b went away
    assert not sched.models["a"].leaving
    assert late.status == "granted", "a serves its queued request again"
    sched.finish(ta)
    assert fx.stopped == []


def test_small_model_fitting_beside_does_not_evict():
    sched, fx, _, _ = swap_setup()
    sched.submit("c")
    assert fx.started == ["a", "c"] and fx.stopped == []


def test_fifo_between_waiting_models():
    sched, fx, _, ta = swap_setup()
    sched.submit("b")
    sched.submit("c")  # c would fit now, but b asked first and starts are serialised
    sched.finish(ta)
    stopped(sched, "a")
    assert fx.started == ["a", "b"]
    ready(sched, "b")
    assert fx.started == ["a", "b", "c"]


def test_queue_timeout_answers_429_with_retry_after():
    sched, fx, clock, _ = swap_setup(queue_timeout=30)
    tb = sched.submit("b")
    clock.t += 30
    sched.tick()
    (t, refusal), = fx.rejected
    assert refusal.reason is Reason.QUEUE_TIMEOUT and list(refusal.busy) == ["a"]
    err = to_api_error(refusal)
    assert t is tb and err.status == 429 and "a" in err.message
    assert 1 <= int(err.headers["Retry-After"]) <= 60
    assert not sched.models["a"].leaving, "nobody waits for a any more"


def test_reject_policy_answers_429_at_once_naming_the_busy_model():
    sched, fx, clock, ta = swap_setup(busy_policy="reject")
    clock.t += 5
    with pytest.raises(Refusal) as e:
        sched.submit("b")
    err = to_api_error(e.value)
    assert err.status == 429
    assert err.headers["x-sparkstack-busy-models"] == "a"
    assert err.headers["Retry-After"] == "10"  # 15 s typical request, 5 s already run
    assert err.headers["retry-after-ms"] == "10000"
    assert not sched.models["a"].leaving
    sched.finish(ta)
    sched.submit("b")  # a is idle now: the swap goes ahead
    assert fx.stopped == [("a", "evicted for b")]


def test_retry_after_is_capped_at_60_seconds():
    sched, _fx, _clock, _ta = swap_setup(busy_policy="reject")
    sched.models["a"].avg_request_s = 3600
    with pytest.raises(Refusal) as e:
        sched.submit("b")
    assert to_api_error(e.value).headers["Retry-After"] == "60"


def test_full_queue_is_refused():
    sched, _fx, _, _ = swap_setup(max_queue=2)
    sched.submit("b")
    sched.submit("b")
    with pytest.raises(Refusal) as e:
        sched.submit("b")
    err = to_api_error(e.value)
    assert err.status == 429 and err.code == "queue_full"


# ------------------------------------------------------------------ idle TTL


def test_idle_ttl_counts_from_the_end_of_the_last_request():
    sched, fx, clock = make({"a": {"memory_gb": 1, "ttl": "60s"}})
    t = sched.submit("a")
    ready(sched, "a")
    clock.t += 3600  # a one-hour stream is not idle
    sched.tick()
    assert fx.stopped == []
    sched.finish(t)
    assert clock.t + 60 in fx.wakes
    clock.t += 59
    sched.tick()
    assert fx.stopped == []
    clock.t += 1
    sched.tick()
    assert fx.stopped == [("a", "idle")]


def test_ttl_zero_means_never():
    sched, fx, clock = make({"a": {"memory_gb": 1, "ttl": 0}})
    sched.finish(_ready_ticket(sched, "a"))
    clock.t += 10**6
    sched.tick()
    assert fx.stopped == []


def test_request_arriving_as_ttl_expires_restarts_cleanly():
    sched, fx, clock = make({"a": {"memory_gb": 1, "ttl": 10}})
    sched.finish(_ready_ticket(sched, "a"))
    clock.t += 10
    sched.tick()
    assert sched.models["a"].state is State.STOPPING
    t = sched.submit("a")  # no decision from a stale "stopping" snapshot: it queues
    assert t.status == "waiting"
    stopped(sched, "a")
    assert fx.started == ["a", "a"]
    ready(sched, "a")
    assert t.status == "granted"


def _ready_ticket(sched: Scheduler, mid: str) -> Ticket:
    t = sched.submit(mid)
    ready(sched, mid)
    return t


# ------------------------------------------------------------------ pinned / exclusive


def test_pinned_model_starts_by_itself_and_restarts_when_memory_frees():
    sched, fx, _ = make({"util": {"memory_gb": 1, "pinned": True},
                         "big": {"memory_gb": 10, "exclusive": True}})
    sched.tick()
    assert fx.started == ["util"]
    ready(sched, "util")
    tb = sched.submit("big")
    assert fx.stopped == [("util", "evicted for big")]
    stopped(sched, "util")
    ready(sched, "big")
    assert fx.started == ["util", "big"]
    sched.finish(tb)
    sched.unload("big")
    stopped(sched, "big")
    assert fx.started == ["util", "big", "util"]


def test_exclusive_model_runs_alone():
    sched, fx, _ = make({"x": {"memory_gb": 1, "exclusive": True}, "y": {"memory_gb": 1}},
                        budget=100)
    tx = _ready_ticket(sched, "x")
    sched.finish(tx)
    sched.submit("y")
    assert fx.stopped == [("x", "evicted for y")]


def test_pinned_model_never_idles_out():
    sched, fx, clock = make({"util": {"memory_gb": 1, "pinned": True, "ttl": 1}})
    sched.tick()
    ready(sched, "util")
    clock.t += 1000
    sched.tick()
    assert fx.stopped == []


# ------------------------------------------------------------------ crashes and unload


def test_engine_crash_returns_model_to_stopped_and_next_request_restarts():
    sched, fx, _ = make({"a": {"memory_gb": 1}})
    t = _ready_ticket(sched, "a")
    sched.engine_exited("a", "engine exited with code 3")
    assert sched.models["a"].state is State.STOPPED
    assert sched.models["a"].last_error == "engine exited with code 3"
    sched.finish(t)  # the broken request ends after the crash: counts for nothing
    t2 = sched.submit("a")
    assert fx.started == ["a", "a"]
    ready(sched, "a")
    assert t2.status == "granted" and sched.models["a"].active == {t2}


def test_unload_waits_for_inflight_unless_forced():
    sched, fx, _ = make({"a": {"memory_gb": 1}})
    t = _ready_ticket(sched, "a")
    sched.unload("a")
    assert fx.stopped == []
    sched.finish(t)
    assert fx.stopped == [("a", "unloaded")]
    stopped(sched, "a")
    t = _ready_ticket(sched, "a")
    sched.unload("a", force=True)
    assert fx.stopped[-1] == ("a", "unloaded (forced)")


def test_shutdown_answers_waiters_and_refuses_new_requests():
    sched, fx, _ = make({"a": {"memory_gb": 1}})
    t = sched.submit("a")
    sched.shutdown()
    assert fx.rejected[0][0] is t and fx.rejected[0][1].reason is Reason.SHUTTING_DOWN
    with pytest.raises(Refusal) as e:
        sched.submit("a")
    assert to_api_error(e.value).status == 503


def test_waiter_that_leaves_does_not_start_the_model():
    sched, fx, _, ta = swap_setup()
    tb = sched.submit("b")
    sched.finish(tb)
    sched.finish(ta)
    assert fx.stopped == [] and fx.started == ["a"]
