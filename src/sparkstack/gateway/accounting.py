"""Request accounting: what each proxied request cost, observed as it is relayed.

A `Meter` rides along with one request: the relay hands it every chunk of the engine's
answer, and it takes the token counts from `usage` (a whole JSON body, or the final SSE
event; streamed chat and completions requests ask the engine for that event with
`stream_options.include_usage` when the client did not) or, failing that, counts the
streamed events. The answer is never held: per chunk the work is a count of `data:`
and a substring test for `"usage"`; JSON is parsed only for the one event that has it.

When the meter asked for the usage event and the client did not, it removes that event
(`choices: []`) before the client sees it: clients that read `choices[0]` of every chunk
would break on it. For that, a chunk that ends inside an event line is held until the
line is complete (only then: normally the engine writes whole events).

When the request ends (`observe`), its `RequestRecord` is published on the bus.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections.abc import Awaitable
from typing import Any

from aiohttp import web

from ..errors import ApiError
from ..scheduler.refusal import Refusal
from ..telemetry.events import EventBus, RequestFinished, RequestRecord
from .auth import CALLER
from .refusals import to_api_error
from .routing import ModelRequest

# An error written into an answer whose status line had already gone out (status, message).
IN_BAND_ERROR = web.ResponseKey("in_band_error", tuple[int, str])
USAGE_ENDPOINTS = ("/v1/chat/completions", "/v1/completions")

_USAGE = b'"usage"'
_NULL_USAGE = re.compile(rb'"usage"\s*:\s*null')
_USAGE_OBJECT = re.compile(rb'"usage"\s*:\s*\{')
_INJECTED = b'"stream_options":{"include_usage":true},'
_DECODER = json.JSONDecoder()


def ask_for_usage(req: ModelRequest, endpoint: str) -> bool:
    """Make a streamed chat/completions request ask for the usage event; True when we
    added it (the client did not ask, so it must not see it)."""
    payload = req.payload
    if endpoint not in USAGE_ENDPOINTS or payload is None or payload.get("stream") is not True:
        return False
    opts = payload.get("stream_options")
    if isinstance(opts, dict) and opts.get("include_usage"):
        return False
    if "stream_options" not in payload and not req.reshaped:
        # Splice the bytes rather than re-encode a body that may be megabytes of prompt.
        brace = req.body.find(b"{")
        if brace < 0:
            return False
        req.body = req.body[:brace + 1] + _INJECTED + req.body[brace + 1:]
        payload["stream_options"] = {"include_usage": True}
    else:
        req.replace_payload({**payload, "stream_options": {
            **(opts if isinstance(opts, dict) else {}), "include_usage": True}})
    return True


def mark_error(resp: web.StreamResponse, status: int, message: str) -> None:
    """Note an error sent in-band (after a 200 went out) for the request's record."""
    resp[IN_BAND_ERROR] = (status, message)


class Meter:
    __slots__ = ("_began", "_first", "_strip", "_tail", "events", "granted_at", "record", "sse")

    def __init__(self, record: RequestRecord, began: float, strip: bool) -> None:
        self.record = record
        self._began = began  # perf_counter at arrival
        self._strip = strip
        self._first = 0.0
        self._tail = b""
        self.events = 0
        self.granted_at = 0.0
        self.sse = False

    def granted(self) -> None:
        """The engine is ready for this request: the relay begins."""
        self.granted_at = time.perf_counter()

    def answered(self, content_type: str) -> None:
        """The engine's status line and headers arrived."""
        self.sse = content_type == "text/event-stream"

    def feed(self, chunk: bytes) -> bytes:
        """One chunk of a streamed answer; returns what to send to the client."""
        if not self._first:
            self._first = time.perf_counter()
        if not self.sse:
            return chunk
        self.events += chunk.count(b"data:")
        scan = chunk
        if self._tail:  # the rest of a line cut at the last chunk's end
            scan = self._tail + chunk
            self._tail = b""
            if self._strip:
                chunk = scan
        if not scan.endswith(b"\n"):
            cut = scan.rfind(b"\n") + 1
            self._tail = scan[cut:]
            scan = scan[:cut]
            if self._strip:
                chunk = scan
        if _USAGE in scan:
            kept = self._stream_usage(scan)
            if self._strip:
                chunk = kept
        return chunk

    def rest(self) -> bytes:
        """Held bytes still owed to the client at the end of the stream."""
        tail, self._tail = self._tail, b""
        if tail and _USAGE in tail:
            kept = self._stream_usage(tail)
            return kept if self._strip else tail
        return tail if self._strip else b""

    def body(self, data: bytes) -> None:
        """A whole (non-streamed) answer: usage is near its end."""
        at = data.rfind(_USAGE)
        if at < 0:
            return
        m = _USAGE_OBJECT.match(data, at)
        if m is None:
            return
        start = m.end() - 1
        try:
            usage, _ = _DECODER.raw_decode(
                data[start:start + 4096].decode("utf-8", errors="replace"))
        except ValueError:
            return
        if isinstance(usage, dict):
            self._take(usage)

    def _stream_usage(self, buf: bytes) -> bytes:
        """Read the usage of the events in `buf` (whole lines); drop the usage-only event
        we asked for. Returns `buf`, less that event."""
        lines = buf.split(b"\n")
        drop = -1
        for i, line in enumerate(lines):
            if _USAGE not in line or not line.startswith(b"data:"):
                continue
            if _NULL_USAGE.search(line) and line.count(_USAGE) == 1:
                continue
            try:
                event = json.loads(line[5:])
            except ValueError:
                continue
            if not isinstance(event, dict):
                continue
            usage = event.get("usage")
            for inner in ("response", "message"):  # Responses API, Anthropic message_start
                if not isinstance(usage, dict) and isinstance(event.get(inner), dict):
                    usage = event[inner].get("usage")
            if isinstance(usage, dict):
                self._take(usage)
                if self._strip and event.get("choices") == []:
                    drop = i
        if drop < 0:
            return buf
        # The event and the blank line that ends it.
        end = drop + 2 if drop + 1 < len(lines) and not lines[drop + 1].strip() else drop + 1
        self.events -= 1
        return b"\n".join(lines[:drop] + lines[end:])

    def _take(self, usage: dict[str, Any]) -> None:
        prompt = usage.get("prompt_tokens", usage.get("input_tokens"))
        completion = usage.get("completion_tokens", usage.get("output_tokens"))
        if isinstance(prompt, int):
            self.record.prompt_tokens = prompt
        if isinstance(completion, int):
            self.record.completion_tokens = completion

    def finish(self, status: int, error: str | None) -> RequestRecord:
        rec = self.record
        end = time.perf_counter()
        rec.status = status
        rec.error = error
        rec.duration_s = round(end - self._began, 4)
        if self.granted_at:
            rec.queue_s = round(self.granted_at - self._began, 4)
        if rec.stream and self._first:
            rec.ttft_s = round(self._first - self._began, 4)
        if rec.completion_tokens is None and rec.stream and self.events:
            # No usage from the engine: one token per event, less [DONE] and the final
            # (finish_reason) event.
            rec.completion_tokens = max(0, self.events - 2)
        n = rec.completion_tokens or 0
        since = self._first if rec.stream and self._first else self.granted_at
        if n > 1 and since and end > since:
            # Streamed: decode speed after the first token; whole: including the prefill.
            rec.tokens_per_s = round((n - 1 if rec.stream else n) / (end - since), 2)
        return rec


METER = web.RequestKey("meter", Meter)
_ARRIVED = web.RequestKey("arrived", float)


def begin(request: web.Request, req: ModelRequest, endpoint: str, model_id: str) -> Meter:
    """Start accounting for a request that is about to take a ticket."""
    strip = ask_for_usage(req, endpoint)
    caller = request.get(CALLER)
    record = RequestRecord(ts=round(time.time(), 3), model=model_id, endpoint=endpoint,
                           key=caller.name if caller else None, stream=req.streaming)
    meter = Meter(record, request.get(_ARRIVED) or time.perf_counter(), strip)
    request[METER] = meter
    return meter


async def observe(request: web.Request, bus: EventBus,
                  handling: Awaitable[web.StreamResponse]) -> web.StreamResponse:
    """Await the request's handling; publish its record however it ends (when it got as
    far as `begin`: requests refused before naming a model are not recorded)."""
    request[_ARRIVED] = time.perf_counter()
    try:
        resp = await handling
    except BaseException as e:
        meter = request.get(METER)
        if meter is not None:
            status, error = _failure(e)
            bus.publish(RequestFinished(meter.finish(status, error)))
        raise
    meter = request.get(METER)
    if meter is not None:
        marked = resp.get(IN_BAND_ERROR)
        status, error = marked if marked else (resp.status, None)
        if error is None and resp.status >= 400 and isinstance(resp, web.Response):
            error = _error_message(resp.body)
        bus.publish(RequestFinished(meter.finish(status, error)))
    return resp


def _failure(e: BaseException) -> tuple[int, str]:
    if isinstance(e, Refusal):
        api = to_api_error(e)
        return api.status, api.message
    if isinstance(e, ApiError):
        return e.status, e.message
    if isinstance(e, asyncio.CancelledError):
        return 499, "the client went away"  # nginx's code for it
    if isinstance(e, web.HTTPException):
        return e.status, e.reason
    return 500, f"{type(e).__name__}: {e}"


def _error_message(body: Any) -> str | None:
    if not isinstance(body, bytes | bytearray) or len(body) > 65536:
        return None
    try:
        payload = json.loads(body)
    except ValueError:
        return body[:300].decode("utf-8", errors="replace") or None
    if isinstance(payload, dict) and isinstance(payload.get("error"), dict):
        return str(payload["error"].get("message"))[:2000]
    return None
