"""Eviction policy: given a model to load and what is resident, which models must stop.

`plan` is a pure function of its inputs, so every case is a one-line unit test. A
`Policy` wraps it for the scheduler: which order victims are taken in, and how long a
fresh load is protected (`min_residency`). `CostAware` is ours and the default; the
policy simulator (bench/policy) runs its peers' policies through the same interface.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Collection
from dataclasses import dataclass
from typing import Any, Protocol

DEMAND_WINDOW_S = 600.0  # recent demand: requests decayed with this time constant
# min_residency "auto": as long as the model's own load took (measured, else declared),
# so that a load serves at least as long as it cost; at most this long, which bounds how
# long anyone is passed over. Chosen by the policy simulator (docs/scheduling.md): longer
# caps do no better overall, and make people hopping between models wait longer.
AUTO_RESIDENCY_MAX_S = 120.0


class ResidentLike(Protocol):
    """What the policy reads of a model holding memory (starting, ready or stopping)."""

    id: str
    memory_gb: float
    last_used: float
    pinned: bool
    exclusive: bool

    @property
    def busy(self) -> bool: ...  # has in-flight requests: stops only when they finish

    @property
    def leaving(self) -> bool: ...  # already stopping or asked to: its memory is on its way out

    @property
    def movable(self) -> bool: ...  # False while it starts


@dataclass(frozen=True, slots=True)
class Resident:
    """A plain ResidentLike, for tests and tools (the scheduler passes its own states)."""

    id: str
    memory_gb: float
    busy: bool  # has in-flight requests: may be chosen, but stops only when they finish
    last_used: float
    pinned: bool = False
    exclusive: bool = False
    leaving: bool = False  # already stopping or asked to stop: its memory is on its way out
    movable: bool = True  # False while it starts: a start is never cut short to make room


def lru_order(r: ResidentLike) -> Any:
    """Idle before busy, pinned last, least recently used first."""
    return (not r.movable, r.pinned, r.busy, r.last_used)


def plan(
    memory_gb: float, exclusive: bool, residents: Collection[ResidentLike], budget_gb: float,
    order: Callable[[Any], Any] = lru_order,
) -> list[str] | None:
    """Ids of the residents to stop so a model of `memory_gb` fits; None if it never can.

    Order of preference, each branch for a reason:
    - an exclusive target needs everything else gone, and an exclusive resident must go
      before anything else loads (it runs alone);
    - then in `order`: by default idle models before busy ones (a busy model makes the
      newcomer wait), pinned models last (they are the always-on helpers), least
      recently used first;
    - finally drop any victim the others already make room for, so a small model is not
      stopped needlessly beside a big one.
    """
    if memory_gb > budget_gb:
        return None
    used = freeing = 0.0
    staying: list[ResidentLike] = []  # one pass: `leaving` is a property, 500 models deep
    for r in residents:
        used += r.memory_gb
        if r.leaving:
            freeing += r.memory_gb
        else:
            staying.append(r)
    forced = [r for r in staying if exclusive or r.exclusive]
    freeing += sum(r.memory_gb for r in forced)

    def fits(freed: float) -> bool:
        return used - freed + memory_gb <= budget_gb + 1e-9

    optional: list[ResidentLike] = []
    if not fits(freeing):
        candidates = sorted((r for r in staying if r not in forced), key=order) if forced \
            else sorted(staying, key=order)
        for r in candidates:
            if fits(freeing):
                break
            optional.append(r)
            freeing += r.memory_gb
        for r in reversed(optional[:-1]):
            if fits(freeing - r.memory_gb):
                optional.remove(r)
                freeing -= r.memory_gb
    return [r.id for r in forced + optional]


# ---------------------------------------------------------------- policies


class Candidate(ResidentLike, Protocol):
    """What a policy reads of a resident beyond `ResidentLike` (`ModelState` has it all)."""

    ready_at: float  # when its current run became ready
    prewarmed: bool  # started ahead of demand and not asked for since
    holding_since: float | None  # when its current run first held a due start back
    burst_gap: float  # in use while its last request ended less than this long ago
    burst_max: float  # ... holding a due start back for at most this long

    @property
    def min_residency(self) -> float: ...

    @property
    def load_estimate(self) -> float: ...  # seconds a start takes: measured, else declared

    def demand(self, now: float) -> float: ...  # recent requests, decayed over DEMAND_WINDOW_S


class Target(Protocol):
    """The model a start is planned for."""

    id: str
    memory_gb: float
    exclusive: bool
    pinned: bool


class Policy(Protocol):
    """The scheduler's eviction policy. Pure: reads its arguments, changes nothing, and is
    cheap (it runs inside every scheduling decision)."""

    # While the head of the start queue waits for memory, may a later queued model that
    # fits in free memory start, if its load ends before the head could start?
    backfill: bool

    def victims(self, target: Target, residents: Collection[Any], budget_gb: float,
                now: float) -> list[str] | None:
        """Ids of the residents to stop so `target` fits; None if it never can."""
        ...

    def hold_until(self, r: Any, target: Target, now: float) -> float:
        """Until when resident `r` may not be evicted for `target` (a past time: it may).
        The scheduler asks again at that time, or at the next event."""
        ...


class CostAware:
    """Ours.

    - A fresh load serves at least its `min_residency` (by default as long as it took to
      load, at most AUTO_RESIDENCY_MAX_S) before another model may take its memory: two
      people on two models that do not fit together share the machine in turns instead
      of reloading each other after every answer. The waiting request is passed over for
      at most that long (then the victim's requests in flight drain).
    - Among the residents that may go, the one cheapest to lose goes first: expected
      cost = its load time x the chance it is asked for again soon (from its recent
      request rate). A model used once an hour goes before one used every minute, one
      that loads in 30 s before one that takes 5 min. LRU only breaks ties.
    - A model in use is not evicted mid-burst: while a request runs on it or its last
      one ended less than `burst_gap` ago (a coding agent running its tools between
      requests), it keeps serving, for at most `burst_max` from the moment it first
      held a due start back (that start keeps its place across a queue timeout, so
      nobody is passed over longer). An interrupted burst costs two loads (the
      newcomer's and its own back), which everyone queued behind them waits for too.
    - Pinned models are the always-on lane: never protected, and requests for them are
      never held back (a task model beside an exclusive one must swap anyway: holding
      its requests back only moves the wait). Nor is a pre-warmed model nobody asked for.
    """

    backfill = True  # a start that does not delay the head's makes nobody wait longer

    def hold_until(self, r: Candidate, target: Target, now: float) -> float:
        if r.prewarmed or r.pinned or target.pinned or not r.movable:
            return 0.0
        return max(r.ready_at + r.min_residency, self.burst_until(r, now))

    @staticmethod
    def burst_until(r: Candidate, now: float) -> float:
        """Until when `r`'s burst holds a due start back (a past time: it does not)."""
        if r.burst_gap <= 0 or (not r.busy and r.last_used + r.burst_gap <= now):
            return 0.0
        limit = (now if r.holding_since is None else r.holding_since) + r.burst_max
        return limit if r.busy else min(r.last_used + r.burst_gap, limit)

    def cost(self, r: Candidate, now: float) -> float:
        return r.load_estimate * -math.expm1(-r.demand(now))

    def victims(self, target: Target, residents: Collection[Candidate], budget_gb: float,
                now: float) -> list[str] | None:
        exempt = target.pinned
        expm1 = math.expm1

        def order(r: Candidate) -> Any:  # hold_until and cost, inlined: it runs per resident
            if not r.movable:
                return (2,)
            if r.pinned:
                return (1, r.busy, r.last_used)
            held = not exempt and not r.prewarmed and (
                r.ready_at + r.min_residency > now or self.burst_until(r, now) > now)
            return (0, held, r.busy, r.load_estimate * -expm1(-r.demand(now)), r.last_used)

        return plan(target.memory_gb, target.exclusive, residents, budget_gb, order)


class DailyProfile:
    """On which of the last DAYS days a model was asked for in each quarter hour of the
    day: the habit pre-warming reads ("the model a user used at this hour yesterday").
    Days are 86,400 s of the scheduler's clock, whatever its origin: a habit only needs
    the period. O(1) to update, O(window) to read."""

    SLOT_S = 900
    SLOTS = 96
    DAYS = 7

    def __init__(self) -> None:
        self.masks = [0] * self.SLOTS  # bit k: asked for on day `days[slot]` - k
        self.days = [0] * self.SLOTS

    def _at(self, t: float) -> tuple[int, int]:
        return int(t // 86400), int(t % 86400 // self.SLOT_S)

    def note(self, now: float) -> None:
        day, slot = self._at(now)
        shift = day - self.days[slot]
        kept = (self.masks[slot] << shift) if shift <= self.DAYS else 0
        self.masks[slot] = (kept | 1) & ((1 << (self.DAYS + 1)) - 1)
        self.days[slot] = day

    def likelihood(self, now: float, horizon: float) -> float:
        """The share of the last DAYS days on which it was asked for between this time of
        day and `horizon` later."""
        hit = 0
        for back in range(1, self.DAYS + 1):
            t = now
            while t < now + horizon:
                day, slot = self._at(t)
                k = self.days[slot] - (day - back)
                if 0 <= k <= self.DAYS and self.masks[slot] >> k & 1:
                    hit += 1
                    break
                t += self.SLOT_S
        return hit / self.DAYS


class Lru:
    """The policy before cost-aware eviction: least recently used first, no protection
    of fresh loads, strict FIFO starts."""

    backfill = False

    def hold_until(self, r: ResidentLike, target: Target, now: float) -> float:
        return 0.0

    def victims(self, target: Target, residents: Collection[ResidentLike], budget_gb: float,
                now: float) -> list[str] | None:
        return plan(target.memory_gb, target.exclusive, residents, budget_gb)
