"""Prometheus metrics (`GET /metrics`), fed by the event bus and, at scrape time, by a
snapshot of the stack.

Counters and histograms follow events: requests (by model, endpoint and status), their
duration, time to first token, queue wait and tokens; loads (duration by result) and
stops (by reason). Gauges (model state, in-flight, queued, memory) are read from the
frozen snapshot when Prometheus scrapes, so they cost nothing in between. Names carry the
`sparkstack_` prefix, values are in base units (seconds, bytes), counters end in `_total`.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric

from ..views import Snapshot
from .events import Event, ModelChanged, RequestFinished
from .memory import GIB

STATES = ("stopped", "starting", "ready", "stopping")
STOP_REASONS = ("idle", "evicted", "manual", "crash", "shutdown")
# Requests take milliseconds (embeddings) to many minutes (a cold start of a big model).
REQUEST_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800)
TTFT_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120, 300, 600, 1800)
LOAD_BUCKETS = (1, 5, 10, 30, 60, 120, 300, 600, 900, 1200, 1800, 3600)


def stop_reason(reason: str | None) -> str:
    """The scheduler's stop reasons ("evicted for X", "unloaded (forced)") as a label."""
    r = reason or ""
    if r == "idle":
        return "idle"
    if r.startswith("evicted"):
        return "evicted"
    if r.startswith("unloaded"):
        return "manual"
    if r.startswith("crash"):
        return "crash"
    if r == "shutdown":
        return "shutdown"
    return "other"


class Metrics:
    def __init__(self, snapshot: Callable[[], Snapshot]) -> None:
        self.registry = r = CollectorRegistry(auto_describe=False)
        self.requests = Counter("sparkstack_requests", "Proxied requests",
                                ["model", "endpoint", "status"], registry=r)
        self.duration = Histogram("sparkstack_request_duration_seconds",
                                  "Time from a request's arrival to the end of its answer",
                                  ["model", "endpoint"], buckets=REQUEST_BUCKETS, registry=r)
        self.ttft = Histogram("sparkstack_time_to_first_token_seconds",
                              "Streamed requests: arrival to the first chunk of the answer",
                              ["model"], buckets=TTFT_BUCKETS, registry=r)
        self.queue_wait = Histogram("sparkstack_queue_wait_seconds",
                                    "Time a request waited for its model (load, swap, queue)",
                                    ["model"], buckets=TTFT_BUCKETS, registry=r)
        self.prompt_tokens = Counter("sparkstack_prompt_tokens", "Prompt tokens", ["model"],
                                     registry=r)
        self.completion_tokens = Counter("sparkstack_completion_tokens", "Completion tokens",
                                         ["model"], registry=r)
        self.load_duration = Histogram("sparkstack_model_load_duration_seconds",
                                       "Engine starts by result (ready, failed, timeout, "
                                       "cancelled)", ["model", "result"],
                                       buckets=LOAD_BUCKETS, registry=r)
        self.stops = Counter("sparkstack_model_stops", "Engine stops by reason (idle, evicted, "
                             "manual, crash, shutdown)", ["model", "reason"], registry=r)
        r.register(_Gauges(snapshot))
        self._loading: dict[str, float] = {}
        self._children: dict[tuple[str, str, int], tuple[Any, Any]] = {}
        self._per_model: dict[str, tuple[Any, Any, Any, Any]] = {}

    def render(self) -> bytes:
        return generate_latest(self.registry)

    def on_event(self, event: Event) -> None:
        if isinstance(event, RequestFinished):
            self._request(event)
        elif isinstance(event, ModelChanged) and event.previous is not None:
            self._transition(event)

    def _request(self, event: RequestFinished) -> None:
        rec = event.record
        key = (rec.model, rec.endpoint, rec.status)
        children = self._children.get(key)
        if children is None:  # label lookups are the costly part: once per combination
            children = (self.requests.labels(rec.model, rec.endpoint, str(rec.status)),
                        self.duration.labels(rec.model, rec.endpoint))
            self._children[key] = children
        children[0].inc()
        children[1].observe(rec.duration_s)
        ttft, queue_wait, prompt, completion = self._per_model.get(rec.model) or self._model(
            rec.model)
        if rec.ttft_s is not None:
            ttft.observe(rec.ttft_s)
        if rec.queue_s is not None:
            queue_wait.observe(rec.queue_s)
        if rec.prompt_tokens:
            prompt.inc(rec.prompt_tokens)
        if rec.completion_tokens:
            completion.inc(rec.completion_tokens)

    def _model(self, model: str) -> tuple[Any, Any, Any, Any]:
        found = (self.ttft.labels(model), self.queue_wait.labels(model),
                 self.prompt_tokens.labels(model), self.completion_tokens.labels(model))
        self._per_model[model] = found
        return found

    def _transition(self, event: ModelChanged) -> None:
        view, previous = event.model, event.previous
        if view.state == "starting":
            self._loading[view.id] = time.monotonic()
        if previous == "starting":
            began = self._loading.pop(view.id, None)
            took = time.monotonic() - began if began is not None else 0.0
            if view.state == "ready":
                result = "ready"
                took = view.load_seconds if view.load_seconds is not None else took
            elif view.state == "stopping":
                result = "cancelled"
            elif "health_timeout" in (view.last_error or ""):
                result = "timeout"
            else:
                result = "failed"
            self.load_duration.labels(view.id, result).observe(took)
        if (view.state == "stopping" and previous in ("ready", "starting")) or (
                view.state == "stopped" and previous == "ready"):  # a crash skips stopping
            self.stops.labels(view.id, stop_reason(view.stop_reason)).inc()


class _Gauges:
    """State, in-flight, queue and memory gauges, read from a snapshot at scrape time."""

    def __init__(self, snapshot: Callable[[], Snapshot]) -> None:
        self.snapshot = snapshot

    def collect(self) -> Iterator[Metric]:
        snap = self.snapshot()
        state = GaugeMetricFamily("sparkstack_model_state", "1 for the state a model is in",
                                  labels=["model", "state"])
        in_flight = GaugeMetricFamily("sparkstack_model_in_flight",
                                      "Requests being answered", labels=["model"])
        queued = GaugeMetricFamily("sparkstack_model_queued", "Requests waiting for the model",
                                   labels=["model"])
        declared = GaugeMetricFamily("sparkstack_model_memory_declared_bytes",
                                     "Memory a model declares (memory_gb)", labels=["model"])
        measured = GaugeMetricFamily("sparkstack_model_memory_measured_bytes",
                                     "Memory a running model uses, as measured",
                                     labels=["model"])
        peak = GaugeMetricFamily("sparkstack_model_memory_peak_bytes",
                                 "The most memory a model was measured using", labels=["model"])
        for v in snap.models:
            for s in STATES:
                state.add_metric([v.id, s], 1.0 if v.state == s else 0.0)
            in_flight.add_metric([v.id], v.in_flight)
            queued.add_metric([v.id], v.queued)
            declared.add_metric([v.id], v.memory_gb * GIB)
            if v.memory_measured_gb is not None:
                measured.add_metric([v.id], v.memory_measured_gb * GIB)
            if v.memory_peak_gb is not None:
                peak.add_metric([v.id], v.memory_peak_gb * GIB)
        yield from (state, in_flight, queued, declared, measured, peak)
        yield GaugeMetricFamily("sparkstack_queue_length", "Requests waiting for a model",
                                value=snap.queued)
        yield GaugeMetricFamily("sparkstack_memory_budget_bytes", "The memory budget",
                                value=snap.memory_budget_gb * GIB)
        yield GaugeMetricFamily("sparkstack_memory_reserved_bytes",
                                "Declared memory of the models holding some",
                                value=snap.memory_used_gb * GIB)
