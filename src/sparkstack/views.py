"""Frozen views of the stack's state: what the gateway, the CLI and telemetry read.

Nobody outside the scheduler reads or writes its live objects; `Supervisor.snapshot()`
copies what they need into these immutable values, with wall-clock times.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Any


def wall(monotonic_t: float) -> float | None:
    """A monotonic time as a Unix timestamp (None for 'never')."""
    if not monotonic_t:
        return None
    return round(time.time() - (time.monotonic() - monotonic_t), 3)


@dataclass(frozen=True, slots=True)
class ModelView:
    id: str
    state: str  # stopped | starting | ready | stopping
    status: str  # stable | experimental | disabled
    notes: str
    memory_gb: float
    in_flight: int
    queued: int
    last_used: float | None
    ready_since: float | None
    load_seconds: float | None
    last_error: str | None
    stop_reason: str | None
    leaving: bool
    ttl_s: float
    idle_stop_at: float | None  # when the idle TTL will stop it, if it is idle now
    retry_at: float | None  # a failed start is retried from then
    pinned: bool
    exclusive: bool
    runtime: str
    engine: str
    port: int | None
    aliases: tuple[str, ...]
    capabilities: tuple[str, ...]
    context_length: int | None
    # While starting: how far the load has got (from the engine's log) and since when.
    load_phase: str | None = None
    load_percent: float | None = None
    load_started: float | None = None
    # What it really uses (telemetry/memory.py): now, and the highest ever seen.
    memory_measured_gb: float | None = None
    memory_peak_gb: float | None = None
    memory_source: str | None = None
    # Whether its hub weights are in its engine's cache: downloaded | partial | missing
    # (None: nothing to download, or not read yet). weights.py, read off the event loop.
    weights_state: str | None = None
    # A model spanning two nodes: the half running here (head | worker), the other node.
    span_role: str | None = None
    span_partner: str | None = None

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["aliases"] = list(self.aliases)
        d["capabilities"] = list(self.capabilities)
        return d


@dataclass(frozen=True, slots=True)
class Snapshot:
    memory_budget_gb: float
    memory_used_gb: float  # declared memory of the models holding some (starting to stopping)
    queued: int
    starting: str | None
    shutting_down: bool
    models: tuple[ModelView, ...]
