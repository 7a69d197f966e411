"""The policies compared: ours, and the ones users would otherwise run, each behind the
scheduler's `Policy` interface (victims, hold_until) with the settings that go with it.

The peers are their *policies*, not their bugs: every one runs inside our scheduler, so
each gets serialised starts, no head-of-line blocking, exact in-flight tracking and an
honest Retry-After (the original always said 900 s; Ollama's loads block requests to
models already loaded). What differs is what each decides.
"""

from __future__ import annotations

import math
from collections.abc import Collection
from typing import Any

from sparkstack.config import Settings
from sparkstack.scheduler.eviction import Lru, plan

from .sim import PolicySpec

CATALOG_TTL = "20m"  # the dgx-spark catalog's idle_ttl
NO_TIMEOUT = "7d"  # a queue that never times out


class Original:
    """The original DGX Spark stack's waker: one model beside the utility model; a
    request for another model is refused (429) until the running one has been idle for
    its idle limit (IDLE_STOP_SECONDS, 20 min), when its idle tick stops it; a model
    that loads or serves is never stopped for another; the utility model (pinned) is
    stopped at once for the exclusive gpt-oss-120b."""

    backfill = False  # one start at a time, in arrival order

    idle_s = 1200.0
    no_stop_before_s = 30.0

    def hold_until(self, r: Any, target: Any, now: float) -> float:
        if r.pinned:
            return 0.0
        if not r.movable or r.busy:
            return math.inf
        return max(r.last_used + self.idle_s, r.ready_at + self.no_stop_before_s)

    def victims(self, target: Any, residents: Collection[Any], budget_gb: float,
                now: float) -> list[str] | None:
        return plan(target.memory_gb, target.exclusive, residents, budget_gb)


class LlamaSwap:
    """llama-swap: a request for a model that is not running swaps it in, stopping every
    other running model (after their in-flight requests) whatever memory they hold; no
    memory model. The utility model sits in a `persistent` group (never swapped out,
    except that the exclusive gpt-oss-120b needs its memory)."""

    backfill = False  # one start at a time, in arrival order

    def hold_until(self, r: Any, target: Any, now: float) -> float:
        return 0.0

    def victims(self, target: Any, residents: Collection[Any], budget_gb: float,
                now: float) -> list[str] | None:
        needed = plan(target.memory_gb, target.exclusive, residents, budget_gb)
        if needed is None or target.pinned:
            return needed
        swap = [r.id for r in residents if not r.leaving and not r.pinned and r.id != target.id]
        return list(dict.fromkeys(swap + needed))


class Ollama:
    """Ollama: each model stays loaded for its keep-alive (5 min by default) after its
    last request; when memory is needed it unloads the idle model whose keep-alive ends
    soonest (waiting for a busy one if none is idle); a bounded queue (OLLAMA_MAX_QUEUE
    512); no always-on model."""

    backfill = False  # one start at a time, in arrival order

    keep_alive_s = 300.0

    def hold_until(self, r: Any, target: Any, now: float) -> float:
        return 0.0

    def victims(self, target: Any, residents: Collection[Any], budget_gb: float,
                now: float) -> list[str] | None:
        def order(r: Any) -> Any:
            return (not r.movable, r.busy, r.last_used + self.keep_alive_s)

        return plan(target.memory_gb, target.exclusive, residents, budget_gb, order)


def ours(min_residency: float | str | None = None, prewarm: bool = False,
         name: str = "sparkstack", factor: float | None = None,
         cap: float | None = None) -> PolicySpec:
    """Ours with the shipped defaults and the catalog's 20 min idle TTL; `min_residency`
    (a duration or "auto"), or `factor` x each model's load time (at most `cap` s),
    instead of the default min_residency."""
    settings: dict[str, Any] = {"idle_ttl": CATALOG_TTL}
    settings["min_residency"] = (Settings().min_residency if min_residency is None
                                 else min_residency)
    if prewarm:
        settings["prewarm"] = "true"
    about = ("min_residency, cost-aware victims, stand-ins"
             + (", pre-warming" if prewarm else ""))
    return PolicySpec(name, None, settings, peer=False, about=about, residency_factor=factor,
                      residency_cap=cap, stand_ins=True)


POLICIES: list[PolicySpec] = [
    ours(),
    ours(prewarm=True, name="sparkstack+prewarm"),
    PolicySpec("sparkstack-lru", Lru, {"idle_ttl": CATALOG_TTL}, peer=False,
               about="ours before: LRU, no protection of fresh loads"),
    PolicySpec("original", Original, {"idle_ttl": CATALOG_TTL, "busy_policy": "reject"},
               about="one model; 429 until it idled 20 min"),
    PolicySpec("llama-swap", LlamaSwap, {"idle_ttl": CATALOG_TTL, "queue_timeout": NO_TIMEOUT},
               about="swap on demand, no memory model, TTL 20 min"),
    PolicySpec("ollama", Ollama, {"idle_ttl": "5m", "queue_timeout": NO_TIMEOUT,
                                  "max_queue": 512}, pinned=False,
               about="keep-alive 5 min, soonest-expiring idle model goes, queue ≤ 512"),
]
