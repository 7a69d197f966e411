"""One in-process event bus: what happened, typed, for whoever listens.

The supervisor publishes model events (carrying the frozen `ModelView`) and load
progress; the gateway publishes one event per finished request. Metrics, the activity
store, `/api/events` and through it the dashboard subscribe; none of them reads the
scheduler.

Subscribers are plain callables run synchronously by `publish` (so they must be quick
and never call back into the scheduler). Streaming readers (`stream()`) get their own
bounded queue: a reader that does not keep up loses the oldest events, never holds
memory without bound.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import asdict, dataclass
from typing import Any

from ..views import ModelView

log = logging.getLogger("sparkstack.events")


@dataclass(frozen=True, slots=True)
class ModelChanged:
    """A model's view after a change; `previous` is the state it left, on a transition."""

    model: ModelView
    previous: str | None = None
    kind = "model"

    @property
    def model_id(self) -> str:
        return self.model.id

    def as_dict(self) -> dict[str, Any]:
        return {"model": self.model.as_dict(), "previous": self.previous}


@dataclass(frozen=True, slots=True)
class QueueChanged:
    queued: int  # requests waiting for a model, over all models
    starting: str | None
    kind = "queue"
    model_id = None

    def as_dict(self) -> dict[str, Any]:
        return {"queued": self.queued, "starting": self.starting}


@dataclass(frozen=True, slots=True)
class LoadProgress:
    """How far a load has got, from the engine's own log lines."""

    model_id: str
    phase: str  # starting | download | weights | compile | kv-cache | cuda-graphs | warmup | ...
    percent: float | None  # of this phase, when the engine says
    elapsed_s: float  # since the start began
    kind = "progress"

    def as_dict(self) -> dict[str, Any]:
        return {"model_id": self.model_id, "phase": self.phase, "percent": self.percent,
                "elapsed_s": round(self.elapsed_s, 1)}


@dataclass(slots=True)
class RequestRecord:
    """One proxied request, filled in by the gateway as it goes, published when done."""

    ts: float  # Unix time it arrived
    model: str
    endpoint: str
    key: str | None  # the name of the API key that made it (never the key itself)
    stream: bool = False
    status: int = 0
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    ttft_s: float | None = None  # arrival to the first streamed byte of the answer
    tokens_per_s: float | None = None
    duration_s: float = 0.0
    queue_s: float | None = None  # waiting for the model (load, swap, queue)
    error: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True, slots=True)
class RequestFinished:
    record: RequestRecord
    kind = "request"

    @property
    def model_id(self) -> str:
        return self.record.model

    def as_dict(self) -> dict[str, Any]:
        return self.record.as_dict()


Event = ModelChanged | QueueChanged | LoadProgress | RequestFinished
Subscriber = Callable[[Event], None]


class EventBus:
    def __init__(self) -> None:
        self._subscribers: list[Subscriber] = []
        self._streams = 0
        self._queues: set[asyncio.Queue[Event | None]] = set()

    def subscribe(self, fn: Subscriber) -> Callable[[], None]:
        """Call `fn` with every event from now on; returns the unsubscribe function."""
        self._subscribers.append(fn)
        return lambda: self._subscribers.remove(fn)

    @property
    def watched(self) -> bool:
        """Someone streams every change (the dashboard): publishers of frequent, minor
        changes (in-flight counts) publish only then."""
        return self._streams > 0

    def publish(self, event: Event) -> None:
        for fn in tuple(self._subscribers):
            try:
                fn(event)
            except Exception:  # one broken subscriber must not break the publisher
                log.exception("event subscriber %r failed on %s", fn, event.kind)

    def close(self) -> None:
        """The stack is shutting down: every queue gets None, its end."""
        for queue in self._queues:
            if queue.full():
                queue.get_nowait()
            queue.put_nowait(None)

    @contextlib.contextmanager
    def queue(self, model_id: str | None = None,
              backlog: int = 1000) -> Iterator[asyncio.Queue[Event | None]]:
        """A queue of every event from now on (of one model, if given) while inside;
        None in it means the end (shutdown)."""
        queue: asyncio.Queue[Event | None] = asyncio.Queue(backlog)

        def put(event: Event) -> None:
            if model_id is not None and event.model_id not in (model_id, None):
                return
            if queue.full():
                queue.get_nowait()
            queue.put_nowait(event)

        unsubscribe = self.subscribe(put)
        self._streams += 1
        self._queues.add(queue)
        try:
            yield queue
        finally:
            self._queues.discard(queue)
            self._streams -= 1
            unsubscribe()

    async def stream(self, model_id: str | None = None) -> AsyncIterator[Event]:
        """Every event from now on (of one model, if given) until the caller stops."""
        with self.queue(model_id) as queue:
            while (event := await queue.get()) is not None:
                yield event
