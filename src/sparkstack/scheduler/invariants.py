"""What must hold after every scheduler event, whatever happened before.

`check(scheduler)` raises AssertionError naming the broken rule. The randomised
scheduler tests run it after each of thousands of events; with SPARKSTACK_DEBUG=1
(the test suite sets it) the supervisor wraps the scheduler with `checked()` so a live
gateway checks them after every event too.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .scheduler import Scheduler

EVENTS = ("submit", "finish", "engine_ready", "engine_failed", "engine_exited", "unload",
          "shutdown", "stop_all", "adopt", "tick")
EPS = 1e-6


def check(sched: Scheduler) -> None:
    from .scheduler import State

    models = sched.models.values()
    residents = {s.id for s in models if s.state is not State.STOPPED}
    assert set(sched.residents) == residents, (
        f"residents {sorted(sched.residents)} != models not stopped {sorted(residents)}")
    used = sum(s.memory_gb for s in models if s.state is not State.STOPPED)
    assert used <= sched.budget_gb + EPS, (
        f"resident models hold {used:g} GB, over the {sched.budget_gb:g} GB budget")
    starting = [s.id for s in models if s.state is State.STARTING]
    assert len(starting) <= 1, f"more than one start at once: {starting}"
    assert sched.starting == (starting[0] if starting else None), (
        f"starting is {sched.starting!r} but the starting models are {starting}")
    waiting = sum(len(s.waiters) for s in models)
    assert sched.queued == waiting, f"queued counts {sched.queued}, waiters are {waiting}"
    seen: set[int] = set()
    for s in models:
        for t in s.waiters:
            assert t.status == "waiting" and t.model == s.id, f"{t} is queued but {t.status}"
            assert id(t) not in seen, f"{t} is in two places"
            seen.add(id(t))
        for t in s.active:
            assert t.status == "granted" and t.model == s.id, f"{t} is active but {t.status}"
            assert id(t) not in seen, f"{t} is in two places"
            seen.add(id(t))
        if s.state is State.STOPPED:
            assert not s.active, f"{s.id} is stopped with requests in flight"
        if s.state is State.READY and not s.leaving:
            assert not s.waiters, f"{s.id} is ready and free, yet requests wait for it"
    for mid in sched.pending:
        assert sched.models[mid].waiters, f"{mid} is in the start queue with nobody waiting"


def checked(sched: Scheduler) -> Scheduler:
    """Make every event method of `sched` check the invariants after it ran."""
    for name in EVENTS:
        method = getattr(sched, name)

        @functools.wraps(method)
        def run(*args: Any, _method: Any = method, **kwargs: Any) -> Any:
            try:
                return _method(*args, **kwargs)
            finally:
                check(sched)

        setattr(sched, name, run)
    return sched
