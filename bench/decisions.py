"""Scheduler decision time with a 500-model catalog, in-process (no gateway, no sockets).

The scheduler is driven as the tests drive it (tests/test_scheduler.py): a fake clock
and a recorder of effects stand in for time and the supervisor. Memory sizes are random
(1–16 GB). Two budgets: 128 GB (a DGX Spark: ~15 resident models), and half the catalog
(~250 resident models, so every request for a stopped model makes `plan()` choose victims
among all of them: the worst case of the policy, far beyond any real machine).

Timed calls (time.perf_counter_ns around the one synchronous method call):
- `submit()` of a stopped model that needs evictions (plans, marks victims, stops idle ones);
- `finish()` of a request (updates idle clocks, may stop a drained victim, re-plans);
- the engine events that complete a swap (`engine_exited`, `engine_ready`), for context.
"""

from __future__ import annotations

import random
import time
from typing import Any

from sparkstack.config import load_config
from sparkstack.errors import ApiError
from sparkstack.scheduler import Scheduler, State, Ticket

from .common import percentile


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


class Recorder:
    """The scheduler's effects, queued for the driver to answer."""

    def __init__(self) -> None:
        self.started: list[str] = []
        self.stopped: list[str] = []
        self.wakes: list[float] = []  # when the scheduler asked to be woken (holds end)

    def start_engine(self, model_id: str) -> None:
        self.started.append(model_id)

    def stop_engine(self, model_id: str, reason: str) -> None:
        self.stopped.append(model_id)

    def grant(self, ticket: Ticket) -> None:
        pass

    def reject(self, ticket: Ticket, error: ApiError) -> None:
        pass

    def changed(self, model_id: str) -> None:
        pass

    def wake_at(self, when: float | None) -> None:
        if when is not None:
            self.wakes.append(when)


def stats_ms(ns: list[int]) -> dict[str, float]:
    v = sorted(x / 1e6 for x in ns)
    if not v:
        return {"n": 0}
    return {"n": len(v), "p50": percentile(v, 50), "p99": percentile(v, 99), "max": v[-1]}


def measure(n_models: int = 500, decisions: int = 2000, budget_gb: float | None = None,
            seed: int = 7) -> dict[str, Any]:
    """`budget_gb` None: half the catalog's memory."""
    rng = random.Random(seed)
    mem = {f"m{i:03d}": round(rng.uniform(1, 16), 1) for i in range(n_models)}
    lines = ["idle_ttl: 1h", "models:"]
    for mid, gb in mem.items():
        lines += [f"  {mid}:", "    command: [engine]", f"    memory_gb: {gb}"]
    cfg = load_config(text="\n".join(lines), env={})
    budget = sum(mem.values()) / 2 if budget_gb is None else budget_gb
    clock, fx = Clock(), Recorder()
    s = cfg.settings
    sched = Scheduler(cfg.models.values(), budget, fx, clock, queue_timeout=s.queue_timeout,
                      max_queue=s.max_queue, start_backoff=s.start_backoff)
    models = sched.models
    timings: dict[str, list[int]] = {"submit_evict": [], "finish": [], "events": [],
                                     "submit_ready": []}

    def timed(kind: str, fn: Any, *args: Any) -> Any:
        t0 = time.perf_counter_ns()
        out = fn(*args)
        timings[kind].append(time.perf_counter_ns() - t0)
        return out

    def used() -> float:
        return sum(st.model.memory_gb for st in sched.residents.values())

    def settle(target: str, busy: list[Ticket]) -> None:
        """Answer effects (engines stop and start at once) until `target` is ready."""
        for _ in range(10_000):
            if fx.stopped:
                timed("events", sched.engine_exited, fx.stopped.pop(0))
            elif fx.started:
                timed("events", sched.engine_ready, fx.started.pop(0))
            elif models[target].state is State.READY:
                return
            elif busy:  # requests in flight end (a victim's first): then it can stop
                victim = next((t for t in busy if models[t.model].leaving), busy[0])
                busy.remove(victim)
                timed("finish", sched.finish, victim)
            else:  # a fresh load or a burst holds the start back until a time it named
                due = [w for w in fx.wakes if w > clock.t]
                if not due:
                    break
                clock.t = min(due)
                fx.wakes = due
                timed("events", sched.tick)
        raise RuntimeError(f"{target} never became ready")

    # Fill the budget: start models while they fit without evicting anything.
    busy: list[Ticket] = []
    for mid, gb in mem.items():
        if used() + gb > budget:
            continue
        clock.t += 1
        t = sched.submit(mid)
        settle(mid, busy)
        sched.finish(t)
    residents_at_start = len(sched.residents)

    for _ in range(decisions):
        clock.t += rng.uniform(0.1, 5)
        # Keep a few requests in flight on ready models, so victims are sometimes busy.
        ready = [m for m, st in models.items() if st.state is State.READY and not st.leaving]
        if ready and len(busy) < 20:
            busy.append(timed("submit_ready", sched.submit, rng.choice(ready)))
        if busy and rng.random() < 0.5:
            timed("finish", sched.finish, busy.pop(rng.randrange(len(busy))))
        free = budget - used()
        stopped = [m for m, st in models.items() if st.state is State.STOPPED]
        needs_room = [m for m in stopped if mem[m] > free] or stopped
        target = rng.choice(needs_room)
        ticket = timed("submit_evict", sched.submit, target)
        settle(target, busy)
        timed("finish", sched.finish, ticket)

    out: dict[str, Any] = {k: stats_ms(v) for k, v in timings.items()}
    out.update(models=n_models, budget_gb=round(budget, 1),
               residents_at_start=residents_at_start, residents_at_end=len(sched.residents))
    out["decision_ms"] = max(out["submit_evict"]["p99"], out["finish"]["p99"])
    return out


if __name__ == "__main__":
    import json

    print(json.dumps({"128gb": measure(budget_gb=128), "half": measure()}, indent=1))
