"""Our eviction policy (the default): min_residency, cost-aware victims, pre-warming and
measured load times. Driven like tests/test_scheduler.py: a fake clock and a recorder of
effects, no processes."""

from __future__ import annotations

from typing import Any

import pytest

from sparkstack.config import load_config
from sparkstack.scheduler import Scheduler, State
from sparkstack.scheduler.eviction import AUTO_RESIDENCY_MAX_S, CostAware, DailyProfile
from sparkstack.scheduler.refusal import Reason, Refusal
from sparkstack.telemetry.loadtimes import read_load_times, record_load_time

from .test_scheduler import Clock, Recorder, stopped

DAY = 86400.0


def make(models: dict[str, dict[str, Any]], budget: float = 10,
         load_times: dict[str, float] | None = None, **settings: Any):
    lines = [f"{k}: {v}" for k, v in settings.items()] + ["models:"]
    for mid, opts in models.items():
        lines += [f"  {mid}:", "    command: [engine]"]
        lines += [f"    {k}: {str(v).lower() if isinstance(v, bool) else v}"
                  for k, v in opts.items()]
    cfg = load_config(text="\n".join(lines), env={})
    clock, fx = Clock(), Recorder()
    sched = Scheduler(cfg.models.values(), budget, fx, clock, load_times=load_times,
                      queue_timeout=cfg.settings.queue_timeout, max_queue=cfg.settings.max_queue)
    return sched, fx, clock


def serve(sched: Scheduler, clock: Clock, mid: str, seconds: float = 1.0,
          load: float = 0.0) -> None:
    """One request for `mid`, answered in `seconds` (the model starts in `load` s if it
    must)."""
    t = sched.submit(mid)
    if sched.models[mid].state is State.STARTING:
        clock.t += load
        sched.engine_ready(mid)
    assert t.status == "granted"
    clock.t += seconds
    sched.finish(t)


def two_big(**a: Any) -> tuple[Scheduler, Recorder, Clock]:
    """a and b never fit together (6 + 6 GB of 10)."""
    return make({"a": {"memory_gb": 6, **a}, "b": {"memory_gb": 6}})


def test_policy_is_ours_by_default():
    sched, _, _ = two_big()
    assert isinstance(sched.policy, CostAware)


# ------------------------------------------------------------------ min_residency


def test_fresh_load_serves_its_min_residency_before_another_model_takes_its_memory():
    sched, fx, clock = two_big(min_residency="5m")
    serve(sched, clock, "a")  # ready at 1000
    clock.t += 60
    tb = sched.submit("b")
    assert fx.stopped == [] and tb.status == "waiting"
    assert 1000 + 300 in fx.wakes, "the scheduler asks to be woken when the window ends"
    late = sched.submit("a")
    assert late.status == "granted", "a serves on during its window"
    sched.finish(late)
    clock.t = 1000 + 300
    sched.tick()
    assert fx.stopped == [("a", "evicted for b")]
    stopped(sched, "a")
    sched.engine_ready("b")
    assert tb.status == "granted"


def test_min_residency_is_global_with_a_per_model_override():
    cfg = load_config(text="min_residency: 5m\nmodels:\n  a: {command: [x]}\n"
                           "  b: {command: [x], min_residency: 0}\n", env={})
    assert cfg.models["a"].min_residency == 300 and cfg.models["b"].min_residency == 0
    auto = load_config(text="models:\n  a: {command: [x], min_residency: auto}\n", env={})
    assert auto.models["a"].min_residency is None


def test_by_default_min_residency_is_the_model_s_own_load_time_at_most_2_min():
    sched, fx, clock = two_big()
    serve(sched, clock, "a", load=90)  # ready at 1090
    sched.submit("b")
    assert fx.stopped == [] and 1090 + 90 in fx.wakes
    clock.t = 1090 + 90
    sched.tick()
    assert fx.stopped == [("a", "evicted for b")]
    stopped(sched, "a")
    clock.t += 300
    sched.engine_ready("b")  # a slow load: protected for the cap only
    sched.submit("a")
    assert sched.models["b"].min_residency == AUTO_RESIDENCY_MAX_S == 120


def test_under_reject_a_request_for_protected_memory_gets_the_window_as_retry_after():
    sched, fx, clock = make({"a": {"memory_gb": 6, "min_residency": "5m"}, "b": {"memory_gb": 6}},
                            busy_policy="reject")
    serve(sched, clock, "a")
    clock.t = 1000 + 200
    with pytest.raises(Refusal) as e:
        sched.submit("b")
    assert e.value.reason is Reason.MODEL_BUSY and list(e.value.busy) == ["a"]
    assert e.value.retry_after == pytest.approx(100)
    clock.t = 1000 + 300
    sched.submit("b")
    assert fx.stopped == [("a", "evicted for b")], "the window is over: the swap goes ahead"


# ------------------------------------------------------------------ without a window


def burst(sched: Scheduler, clock: Clock, mid: str, n: int, gap: float = 3.0) -> None:
    for _ in range(n):
        serve(sched, clock, mid, seconds=10)
        clock.t += gap


def test_without_min_residency_a_swap_goes_ahead_at_once():
    """Someone trying models one after another does not wait for their own last model."""
    sched, fx, clock = make({"a": {"memory_gb": 6}, "b": {"memory_gb": 6}},
                            min_residency=0, burst_gap=0)
    burst(sched, clock, "a", 3)
    sched.submit("b")
    assert fx.stopped == [("a", "evicted for b")]


# ------------------------------------------------------------------ bursts


def test_a_burst_finishes_before_another_model_takes_its_memory():
    """A coding agent's requests come seconds apart (its tools run between them): its
    model is not swapped out mid-task; the swap happens at the first longer pause."""
    sched, fx, clock = make({"a": {"memory_gb": 6}, "b": {"memory_gb": 6}},
                            min_residency=0, burst_gap="15s")
    burst(sched, clock, "a", 3)  # the last answer ended 3 s ago
    tb = sched.submit("b")
    assert fx.stopped == [] and tb.status == "waiting"
    clock.t += 5
    serve(sched, clock, "a", seconds=10)  # the agent's next step is served at once
    clock.t += 14
    sched.tick()
    assert fx.stopped == [], "14 s since its last answer: still within the burst"
    clock.t += 1
    sched.tick()
    assert fx.stopped == [("a", "evicted for b")]


def test_a_burst_holds_a_waiting_start_back_for_at_most_burst_max():
    sched, fx, clock = make({"a": {"memory_gb": 6}, "b": {"memory_gb": 6}},
                            min_residency=0, burst_gap="15s", burst_max="2m")
    serve(sched, clock, "a")
    held_from = clock.t
    tb = sched.submit("b")
    while clock.t < held_from + 120:  # the agent never pauses
        serve(sched, clock, "a", seconds=5)
        clock.t += 2
        sched.tick()
    assert fx.stopped == [("a", "evicted for b")] and sched.models["a"].leaving
    assert sched.submit("a").status == "waiting", "a's next step waits behind the swap"
    stopped(sched, "a")
    sched.engine_ready("b")
    assert tb.status == "granted"


def test_burst_gap_0_turns_the_burst_hold_off():
    cfg = load_config(text="burst_gap: 0\nmodels:\n  a: {command: [x]}\n", env={})
    assert cfg.models["a"].burst_gap == 0
    assert load_config(text="models:\n  a: {command: [x]}\n", env={}).models["a"].burst_gap > 0


# ------------------------------------------------------------------ backfilling


def test_a_small_model_starts_while_the_big_swap_waits_if_it_does_not_delay_it():
    """b waits for a's window; the embedding model fits in the free memory and loads
    before the window ends: it starts at once instead of waiting behind b. One that
    would still be loading when b could start waits its turn."""
    sched, fx, clock = make({"a": {"memory_gb": 6}, "b": {"memory_gb": 6},
                             "embed": {"memory_gb": 2, "load_seconds": 30},
                             "slow": {"memory_gb": 2, "load_seconds": 600}},
                            min_residency="5m", burst_gap=0)
    serve(sched, clock, "a")  # ready at 1000, protected until 1300
    tb = sched.submit("b")
    ts = sched.submit("slow")
    te = sched.submit("embed")
    assert fx.started[-1] == "embed" and ts.status == "waiting"
    clock.t += 30
    sched.engine_ready("embed")
    assert te.status == "granted" and tb.status == "waiting"
    assert "slow" not in fx.started, "600 s of loading would delay b's start"
    clock.t = 1300
    sched.tick()
    assert fx.stopped == [("a", "evicted for b")]


def test_a_backfill_never_takes_the_room_the_waiting_swap_needs():
    """b (8 GB) waits for a's window; c (3 GB) fits in the 4 GB free now, but with c
    resident, b would need c evicted too once a has gone: c waits its turn."""
    sched, fx, clock = make({"a": {"memory_gb": 6}, "b": {"memory_gb": 8},
                             "c": {"memory_gb": 3, "load_seconds": 10}},
                            min_residency="5m", burst_gap=0)
    serve(sched, clock, "a")
    tb = sched.submit("b")
    tc = sched.submit("c")
    assert fx.started == ["a"] and tc.status == "waiting"
    clock.t = 1300
    sched.tick()
    assert fx.stopped == [("a", "evicted for b")]
    stopped(sched, "a")
    assert fx.started[-1] == "b", "b starts on time: nothing else took its room"
    sched.engine_ready("b")
    assert tb.status == "granted"


# ------------------------------------------------------------------ queue timeouts


@pytest.mark.parametrize("late", [False, True])
def test_a_request_retried_after_a_queue_timeout_keeps_its_place(late):
    """b's request times out while it waits for a's window; its client retries after
    the Retry-After and is still ahead of c, asked for later. A request long after that
    is a new one: it joins at the back."""
    sched, fx, clock = make({"a": {"memory_gb": 6}, "b": {"memory_gb": 6},
                             "c": {"memory_gb": 6}},
                            min_residency="10m", burst_gap=0, queue_timeout="1m")
    serve(sched, clock, "a")
    sched.submit("b")
    clock.t += 30
    sched.submit("c")
    clock.t += 30
    sched.tick()
    (_, refusal), = fx.rejected
    assert refusal.reason is Reason.QUEUE_TIMEOUT and list(sched.pending) == ["c"]
    clock.t += refusal.retry_after + (60 if late else 0)
    sched.submit("b")
    assert list(sched.pending) == (["c", "b"] if late else ["b", "c"])


def test_pinned_models_are_never_protected_nor_held_back():
    """The utility model's task requests next to an exclusive model: holding them back
    only moves the wait (the swap must happen anyway)."""
    sched, fx, clock = make({"util": {"memory_gb": 1, "pinned": True},
                             "big": {"memory_gb": 10, "exclusive": True,
                                     "min_residency": "10m"}})
    sched.tick()
    sched.engine_ready("util")
    tb = sched.submit("big")
    assert fx.stopped == [("util", "evicted for big")]
    stopped(sched, "util")
    sched.engine_ready("big")
    sched.finish(tb)
    burst(sched, clock, "big", 2)
    tu = sched.submit("util")
    assert fx.stopped[-1] == ("big", "evicted for util"), "the window is not for it"
    stopped(sched, "big")
    sched.engine_ready("util")
    assert tu.status == "granted"
    sched.finish(tu)
    sched.submit("big")
    assert fx.stopped[-1] == ("util", "evicted for big"), "the fresh utility is not protected"



# ------------------------------------------------------------------ cost-aware victims


def test_the_victim_is_the_model_cheapest_to_lose_not_the_least_recently_used():
    sched, fx, clock = make({
        "slow": {"memory_gb": 4, "load_seconds": 300},  # used every minute, 5 min to load
        "quick": {"memory_gb": 4, "load_seconds": 30},  # used once, loads in 30 s
        "new": {"memory_gb": 4},
    }, budget=8)
    serve(sched, clock, "slow", load=300)
    serve(sched, clock, "quick", load=30)
    for _ in range(5):
        clock.t += 60
        serve(sched, clock, "slow")
    clock.t += 60
    serve(sched, clock, "quick")  # quick is now the most recently used
    clock.t += 60
    sched.submit("new")
    assert fx.stopped == [("quick", "evicted for new")]


def test_measured_load_times_replace_the_declared_estimate():
    sched, _, clock = make({"a": {"memory_gb": 1, "load_seconds": 300}},
                           load_times={"a": 42.0, "gone": 1.0})
    assert sched.models["a"].load_estimate == 42
    sched.submit("a")
    clock.t += 95
    sched.engine_ready("a")
    assert sched.models["a"].load_estimate == 95


def test_measured_load_times_persist_in_the_data_directory(tmp_path):
    assert read_load_times(tmp_path) == {}
    record_load_time(tmp_path, "a", 95.04)
    record_load_time(tmp_path, "b", 30)
    record_load_time(tmp_path, "a", 80)
    assert read_load_times(tmp_path) == {"a": 80.0, "b": 30.0}
    (tmp_path / "load-times.json").write_text("not json")
    assert read_load_times(tmp_path) == {}


# ------------------------------------------------------------------ pre-warming


def habit(days: int = 5, at: float = 9 * 3600, **opts: Any):
    """`a` is asked for at 9:00 every day for `days` days; the clock ends at 8:50 of the
    next day with a idle-stopped."""
    sched, fx, clock = make({"a": {"memory_gb": 6, "ttl": "20m", **opts}, "b": {"memory_gb": 6}})
    for day in range(days):
        clock.t = day * DAY + at
        serve(sched, clock, "a")
        clock.t += 1200
        sched.tick()
        stopped(sched, "a")
    clock.t = days * DAY + at - 600
    return sched, fx, clock


def test_prewarm_is_off_by_default():
    sched, fx, _ = habit()
    sched.tick()
    assert fx.started.count("a") == 5


def test_prewarm_starts_the_model_used_at_this_hour_on_the_previous_days():
    sched, fx, clock = habit(prewarm=True)
    clock.t -= 3600  # 7:50: nothing at this hour on previous days
    sched.tick()
    assert fx.started.count("a") == 5
    clock.t += 3600
    sched.tick()
    assert fx.started.count("a") == 6 and sched.models["a"].prewarmed
    sched.engine_ready("a")
    t = sched.submit("a")
    assert t.status == "granted" and not sched.models["a"].prewarmed


def test_prewarm_never_evicts_anything():
    sched, fx, clock = habit(prewarm=True)
    serve(sched, clock, "b")  # b holds the memory a would need
    sched.tick()
    assert fx.started.count("a") == 5 and fx.stopped[-1][0] == "a"


def test_a_real_request_cancels_a_prewarm_start():
    sched, fx, _ = habit(prewarm=True)
    sched.tick()
    assert sched.starting == "a"
    tb = sched.submit("b")
    assert fx.stopped[-1] == ("a", "pre-warm cancelled")
    stopped(sched, "a")
    assert fx.started[-1] == "b"
    sched.engine_ready("b")
    assert tb.status == "granted"


def test_a_prewarmed_model_gives_way_at_once():
    sched, fx, _ = habit(prewarm=True, min_residency="10m")
    sched.tick()
    sched.engine_ready("a")
    sched.submit("b")
    assert fx.stopped[-1] == ("a", "evicted for b"), "nobody asked for it: no protection"


def test_an_unused_prewarm_is_not_repeated():
    sched, fx, clock = habit(prewarm=True)
    sched.tick()
    sched.engine_ready("a")
    clock.t += 1200
    sched.tick()
    stopped(sched, "a")
    sched.tick()
    assert fx.started.count("a") == 6, "not started again for nothing"


def test_daily_profile_reads_the_share_of_days():
    p = DailyProfile()
    for day in (0, 1, 3):
        p.note(day * DAY + 9 * 3600 + 60)
    assert p.likelihood(4 * DAY + 8.75 * 3600, 1800) == pytest.approx(3 / 7)
    assert p.likelihood(4 * DAY + 12 * 3600, 1800) == 0
    assert p.likelihood(12 * DAY + 8.75 * 3600, 1800) == 0, "a habit older than a week"


# ------------------------------------------------------------------ stand-ins


def task_beside_exclusive(**task: Any) -> tuple[Scheduler, Recorder, Clock]:
    """big (exclusive: nothing runs beside it), small, and the task model t."""
    return make({"big": {"memory_gb": 6, "exclusive": True}, "small": {"memory_gb": 2},
                 "t": {"memory_gb": 1, **task}})


def test_a_running_model_stands_in_rather_than_be_stopped_for_the_task_model():
    sched, fx, clock = task_beside_exclusive(stand_ins="[small, big]")
    serve(sched, clock, "big", load=60)
    # t would stop big (exclusive): big answers at once; nothing stops, nothing starts.
    assert sched.stand_in("t", lambda m: True) == "big"
    assert sched.stand_in("t", lambda m: m != "big") is None, "the caller's rules count"
    assert fx.started == ["big"] and not fx.stopped
    sched.unload("big")
    sched.engine_exited("big")
    serve(sched, clock, "small", load=10)
    # t fits beside small: it starts, nobody answers for it.
    assert sched.stand_in("t", lambda m: True) is None


def test_any_picks_the_smallest_running_model_and_never_one_leaving_or_starting():
    sched, _, clock = make({"a": {"memory_gb": 5}, "b": {"memory_gb": 3},
                            "c": {"memory_gb": 1.5}, "t": {"memory_gb": 4, "stand_ins": "any"}})
    for mid in ("a", "b", "c"):
        serve(sched, clock, mid, load=30)
    assert sched.stand_in("t", lambda m: True) == "c"
    sched.unload("c")  # stopping: it no longer answers (and t still does not fit)
    assert sched.stand_in("t", lambda m: True) == "b"
    sched.engine_exited("c")
    sched.unload("b")
    assert sched.stand_in("t", lambda m: True) is None, "t fits once b has gone: it starts"
    sched.engine_exited("b")
    sched.submit("t")
    assert sched.models["t"].state is State.STARTING
    assert sched.stand_in("t", lambda m: True) is None, "a starting model is waited for"


def test_without_stand_ins_the_task_model_stops_the_big_one():
    sched, fx, clock = task_beside_exclusive()
    serve(sched, clock, "big", load=60)
    assert sched.stand_in("t", lambda m: True) is None
    clock.t += AUTO_RESIDENCY_MAX_S + 60  # past big's window and burst
    sched.submit("t")
    assert fx.stopped and fx.stopped[-1][0] == "big"
