"""The one place a `Refusal` becomes an HTTP answer: status, retry headers, English."""

from __future__ import annotations

from ..errors import ApiError, retry_headers
from ..scheduler.refusal import Reason, Refusal

STATUS = {
    Reason.SHUTTING_DOWN: 503,
    Reason.QUEUE_FULL: 429,
    Reason.MODEL_BUSY: 429,
    Reason.QUEUE_TIMEOUT: 429,
    Reason.NEVER_FITS: 503,
    Reason.UNLOADED: 503,
    Reason.START_FAILED: 502,
    Reason.START_TIMEOUT: 504,
    Reason.RUNTIME_UNAVAILABLE: 503,
    Reason.IMAGE_MISSING: 502,
    Reason.MEMORY_IN_USE: 503,
    Reason.BACKING_OFF: 503,
}


def _message(r: Refusal) -> str:
    m = repr(r.model)
    busy = ", ".join(r.busy)
    match r.reason:
        case Reason.SHUTTING_DOWN:
            return "sparkstack is shutting down"
        case Reason.QUEUE_FULL:
            return f"the request queue is full ({r.queue_max} waiting)"
        case Reason.MODEL_BUSY:
            return (f"model {m} cannot start now: memory is used by busy model(s) {busy}; "
                    f"retry in {_seconds(r)} s")
        case Reason.QUEUE_TIMEOUT:
            return (f"model {m} waited {r.waited_s:.0f} s (queue_timeout) for memory held by "
                    f"{busy or 'other models'}")
        case Reason.NEVER_FITS:
            return (f"model {m} needs {r.needed_gb:g} GB but the memory budget is "
                    f"{r.budget_gb:g} GB")
        case Reason.UNLOADED:
            return f"model {m} was unloaded"
        case Reason.BACKING_OFF:
            return (f"model {m} failed to start moments ago; the next try is in "
                    f"{_seconds(r)} s. The last error: {r.error}")
        case _:  # the start failures: the run wrote the facts, the log tail included
            return f"model {m} failed to start: {r.error}"


def _seconds(r: Refusal) -> str:
    return retry_headers(r.retry_after or 1.0)["Retry-After"]


def to_api_error(r: Refusal) -> ApiError:
    headers: dict[str, str] = {}
    if r.retry_after is not None:
        headers.update(retry_headers(r.retry_after))
    if r.busy:
        headers["x-sparkstack-busy-models"] = ",".join(r.busy)
    return ApiError(STATUS[r.reason], _message(r), r.reason.value, headers)
