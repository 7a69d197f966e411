"""Eviction policy: given a model to load and what is resident, which models must stop.

A pure function of its inputs, so every case is a one-line unit test.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass
from typing import Protocol


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


def plan(
    memory_gb: float, exclusive: bool, residents: Collection[ResidentLike], budget_gb: float
) -> list[str] | None:
    """Ids of the residents to stop so a model of `memory_gb` fits; None if it never can.

    Order of preference, each branch for a reason:
    - an exclusive target needs everything else gone, and an exclusive resident must go
      before anything else loads (it runs alone);
    - then idle models before busy ones (a busy model makes the newcomer wait), pinned
      models last (they are the always-on helpers), least recently used first;
    - finally drop any victim the others already make room for, so a small model is not
      stopped needlessly beside a big one.
    """
    if memory_gb > budget_gb:
        return None
    used = sum(r.memory_gb for r in residents)
    freeing = sum(r.memory_gb for r in residents if r.leaving)
    forced = [r for r in residents if not r.leaving and (exclusive or r.exclusive)]
    freeing += sum(r.memory_gb for r in forced)

    def fits(freed: float) -> bool:
        return used - freed + memory_gb <= budget_gb + 1e-9

    optional: list[ResidentLike] = []
    if not fits(freeing):
        forced_ids = {r.id for r in forced}
        candidates = sorted(
            (r for r in residents if not r.leaving and r.id not in forced_ids),
            key=lambda r: (not r.movable, r.pinned, r.busy, r.last_used),
        )
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
