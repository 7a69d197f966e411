"""Why a request is not served: a domain value, not an HTTP answer.

The scheduler and the engine runs say *what* happened (the reason and its facts); the
gateway alone turns a `Refusal` into a status code, retry headers and English
(`gateway/refusals.py`). One refusal path for every caller: requests, the load API,
the CLI.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum


class Reason(StrEnum):
    SHUTTING_DOWN = "shutting_down"
    QUEUE_FULL = "queue_full"  # max_queue requests are already waiting
    MODEL_BUSY = "model_busy"  # busy_policy reject: memory is held by busy models
    QUEUE_TIMEOUT = "queue_timeout"  # waited queue_timeout for memory
    NEVER_FITS = "insufficient_memory"  # larger than the whole budget
    UNLOADED = "unloaded"  # a forced unload answered the waiters
    START_FAILED = "engine_failed"  # the engine exited or could not be launched
    START_TIMEOUT = "start_timeout"  # not healthy within health_timeout
    RUNTIME_UNAVAILABLE = "runtime_unavailable"  # Docker unreachable: fail closed
    IMAGE_MISSING = "image_missing"  # the model's container image is not on this machine
    MEMORY_IN_USE = "memory_in_use"  # the machine lacks the free memory right now
    BACKING_OFF = "start_backoff"  # a start failed moments ago; not retried yet


@dataclass(eq=False)
class Refusal(Exception):
    """A request (or a start) the stack cannot serve, with the facts to explain it."""

    reason: Reason
    model: str
    busy: Sequence[str] = ()  # busy models this request would have to wait for
    retry_after: float | None = None  # seconds until a retry may succeed
    error: str | None = None  # a failed start: what went wrong, with the engine's log tail
    needed_gb: float = 0.0
    budget_gb: float = 0.0
    waited_s: float = 0.0
    queue_max: int = 0

    def __post_init__(self) -> None:
        super().__init__(f"{self.reason.value}: {self.model}"
                         + (f": {self.error}" if self.error else ""))
