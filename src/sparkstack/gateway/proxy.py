"""Relaying one request to its engine, streaming included.

Bytes pass through as they arrive (no buffering, no per-chunk parsing). A client that
disconnects cancels the handler (aiohttp `handler_cancellation`), which closes the
upstream connection at once, so the engine stops generating for it.

An engine that sends nothing for `stream_idle_timeout` (no header, no chunk) is
abandoned: the connection to it is closed and the client gets `engine_stalled` (504, or
an error event once a stream has begun). One lazy timer per request watches for it
(gateway/stall.py): a chunk costs a time stamp, not a timer.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Mapping

import aiohttp
from aiohttp import web
from multidict import CIMultiDict

from ..engines import Upstream
from ..errors import ApiError
from .accounting import Meter, mark_error
from .stall import EngineStalled, Watchdog

HOP_BY_HOP = frozenset({
    "connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te",
    "trailer", "trailers", "transfer-encoding", "upgrade", "host", "content-length",
})
_NOT_FORWARDED = HOP_BY_HOP | {"authorization", "x-api-key"}
# The engine went away after its status line: the response is cut mid-body.
ENGINE_BROKE = (aiohttp.ClientPayloadError, aiohttp.ServerDisconnectedError,
                aiohttp.ClientOSError)
# The engine sent nothing for stream_idle_timeout (before its headers or between chunks).
ENGINE_STALLED = EngineStalled
ERROR_BODY_SHOWN = 2000  # characters of a non-OpenAI error page quoted to the client
WHOLE_BODY_MAX = 1 << 20  # responses up to this size with a length are sent in one piece


def new_client_session() -> aiohttp.ClientSession:
    return aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=0, keepalive_timeout=30),
        # No total timeout: a long generation is not an error (SPEC 10: hidden timeouts).
        timeout=aiohttp.ClientTimeout(total=None, sock_connect=30),
        auto_decompress=False,
        skip_auto_headers=("User-Agent", "Accept-Encoding"),
        cookie_jar=aiohttp.DummyCookieJar(),  # engines set no cookies: skip the jar per request
    )


def upstream_headers(request: web.Request, upstream: Upstream) -> CIMultiDict[str]:
    headers = CIMultiDict(
        (k, v) for k, v in request.headers.items() if k.lower() not in _NOT_FORWARDED
    )
    headers.update(upstream.headers)
    return headers


def _response_headers(headers: Mapping[str, str]) -> CIMultiDict[str]:
    return CIMultiDict((k, v) for k, v in headers.items() if k.lower() not in HOP_BY_HOP)


def sse_event(payload: dict[str, object]) -> bytes:
    return b"data: " + json.dumps(payload, ensure_ascii=False).encode() + b"\n\n"


async def open_event_stream(request: web.Request) -> web.StreamResponse:
    """Commit a 200 event stream now (a streaming client waits for a cold start on it)."""
    resp = web.StreamResponse(headers={
        "Content-Type": "text/event-stream", "Cache-Control": "no-cache",
        "X-Accel-Buffering": "no",
    })
    await resp.prepare(request)
    return resp


async def open_json_early(request: web.Request) -> web.StreamResponse:
    """Commit `200 application/json` now for a non-streamed request waiting for its model
    (`early_headers`): a client whose header timeout is shorter than the load keeps
    waiting. JSON allows leading whitespace, so spaces can keep the connection busy until
    the body follows. The price: an error from here on arrives with status 200."""
    resp = web.StreamResponse(headers={
        "Content-Type": "application/json", "Cache-Control": "no-cache",
        "X-Accel-Buffering": "no",
    })
    await resp.prepare(request)
    return resp


def _early_json(resp: web.StreamResponse) -> bool:
    return resp.content_type == "application/json"


async def end_in_band(resp: web.StreamResponse, error: ApiError) -> None:
    """An error after the status line went out: an error event on an event stream, the
    OpenAI error object as the body of an early-headers JSON answer."""
    mark_error(resp, error.status, error.message)
    if _early_json(resp):
        await resp.write(json.dumps(error.body(), ensure_ascii=False).encode())
    else:
        await resp.write(sse_event(error.body()))
    await resp.write_eof()


async def relay(
    request: web.Request,
    session: aiohttp.ClientSession,
    upstream: Upstream,
    path: str,
    body: bytes,
    model_id: str,
    opened: web.StreamResponse | None = None,
    idle_timeout: float | None = None,
    meter: Meter | None = None,
) -> web.StreamResponse:
    """Send the request to the engine and relay its answer.

    `opened` is a response already committed to the client (keep-alives while the model
    loaded): an event stream, or an early-headers JSON answer. The engine's answer
    continues it, and an engine error becomes an error in the body, since the status line
    has been sent. `idle_timeout` is the model's stream_idle_timeout. `meter` observes
    the answer for the request's record (gateway/accounting.py).
    """
    if meter is not None:
        meter.granted()
    url = upstream.base_url + path
    if request.query_string:
        url += "?" + request.query_string
    dog = Watchdog(idle_timeout) if idle_timeout else None
    try:
        async with session.request(
            request.method, url, data=body, headers=upstream_headers(request, upstream)
        ) as up:
            if dog is not None:
                dog.body(up.content)
            if meter is not None:
                meter.answered(up.content_type)
            if opened is not None and _early_json(opened):
                return await _continue_json(opened, up, model_id, meter)
            if opened is not None:
                return await _continue_stream(opened, up, model_id, meter, dog)
            length = up.content_length
            if (length is not None and length <= WHOLE_BODY_MAX
                    and up.content_type != "text/event-stream"):
                data = await up.read()
                if meter is not None:
                    meter.body(data)
                if up.status >= 500:
                    return _error_page(up, data, model_id)
                return web.Response(status=up.status, body=data,
                                    headers=_response_headers(up.headers))
            resp = web.StreamResponse(status=up.status, headers=_response_headers(up.headers))
            await resp.prepare(request)
            try:
                async for chunk in up.content.iter_any():
                    if dog is not None:
                        dog.feed()
                    await resp.write(meter.feed(chunk) if meter is not None else chunk)
            except ENGINE_BROKE as e:
                await _end_broken(request, resp, up, _died(model_id, e))
                return resp
            except ENGINE_STALLED:
                await _end_broken(request, resp, up, _stalled(model_id, idle_timeout))
                return resp
            if meter is not None:
                await resp.write(meter.rest())
            await resp.write_eof()
            return resp
    except (asyncio.CancelledError, ENGINE_STALLED) as e:  # before its headers, or mid-body
        if isinstance(e, asyncio.CancelledError) and (dog is None or not dog.stalled()):
            raise  # the client went away, or a shutdown
        error = _stalled(model_id, idle_timeout)
        if opened is not None:
            await end_in_band(opened, error)
            return opened
        raise error from None
    except (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError) as e:
        error = ApiError(502, f"model {model_id!r}: the engine did not answer ({e})",
                         "engine_unreachable")
        if opened is not None:
            await end_in_band(opened, error)
            return opened
        raise error from e
    finally:
        if dog is not None:
            dog.close()


async def _continue_json(
    resp: web.StreamResponse, up: aiohttp.ClientResponse, model_id: str,
    meter: Meter | None = None,
) -> web.StreamResponse:
    """The engine's answer as the body of an early-headers response. Read whole (it is not
    streamed), so an engine that dies midway still leaves valid JSON: an error object."""
    try:
        data = await up.read()
    except ENGINE_BROKE as e:
        await end_in_band(resp, _died(model_id, e))
        return resp
    if meter is not None:
        meter.body(data)
    if up.status != 200:
        mark_error(resp, up.status, f"engine answered {up.status}")
        try:
            payload = json.loads(data)
        except ValueError:
            payload = None
        if not (isinstance(payload, dict) and "error" in payload):
            text = data.decode("utf-8", errors="replace")
            await end_in_band(resp, ApiError(up.status, text or f"engine answered {up.status}"))
            return resp
    await resp.write(data)
    await resp.write_eof()
    return resp


async def _continue_stream(
    resp: web.StreamResponse, up: aiohttp.ClientResponse, model_id: str,
    meter: Meter | None = None, dog: Watchdog | None = None,
) -> web.StreamResponse:
    if up.status != 200:
        text = (await up.read()).decode("utf-8", errors="replace")
        mark_error(resp, up.status, text[:2000] or f"engine answered {up.status}")
        try:
            payload = json.loads(text)
        except ValueError:
            payload = ApiError(up.status, text or f"engine answered {up.status}").body()
        await resp.write(sse_event(payload))
        await resp.write_eof()
        return resp
    try:
        async for chunk in up.content.iter_any():
            if dog is not None:
                dog.feed()
            await resp.write(meter.feed(chunk) if meter is not None else chunk)
        if meter is not None:
            await resp.write(meter.rest())
    except ENGINE_BROKE as e:
        died = _died(model_id, e)
        mark_error(resp, died.status, died.message)
        await resp.write(sse_event(died.body()))
    await resp.write_eof()
    return resp


def _stalled(model_id: str, idle: float | None) -> ApiError:
    return ApiError(504, f"model {model_id!r}: the engine sent nothing for {idle or 0:g} s "
                    "(stream_idle_timeout); the request was abandoned", "engine_stalled")


def _error_page(up: aiohttp.ClientResponse, data: bytes, model_id: str) -> web.Response:
    """An engine's 5xx, in the OpenAI error shape whatever the engine sent (a plain-text
    500 page, say); an error already in that shape passes through unchanged."""
    try:
        payload = json.loads(data)
    except ValueError:
        payload = None
    if isinstance(payload, dict) and isinstance(payload.get("error"), dict):
        return web.Response(status=up.status, body=data, headers=_response_headers(up.headers))
    text = data.decode("utf-8", errors="replace").strip()
    if len(text) > ERROR_BODY_SHOWN:
        text = text[:ERROR_BODY_SHOWN] + "…"
    error = ApiError(up.status, f"model {model_id!r}: the engine answered {up.status}"
                     + (f": {text}" if text else ""), "engine_error")
    return web.json_response(error.body(), status=up.status)


def _died(model_id: str, e: Exception) -> ApiError:
    return ApiError(502, f"model {model_id!r}: the engine stopped answering mid-response ({e})",
                    "engine_died")


async def _end_broken(
    request: web.Request, resp: web.StreamResponse, up: aiohttp.ClientResponse,
    error: ApiError,
) -> None:
    """The engine died or stalled after the status line was sent: say so in-band if we can."""
    mark_error(resp, error.status, error.message)
    if up.content_type == "text/event-stream":
        await resp.write(sse_event(error.body()))
        await resp.write_eof()
    elif request.transport is not None:
        # Not an event stream: a cut connection is the only honest signal left.
        request.transport.close()
