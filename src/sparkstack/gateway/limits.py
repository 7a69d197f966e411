"""Limits that keep one client, or one slow connection, from holding the gateway.

- Per-key limits (`api_keys` entries' `max_concurrent` and `rpm`): 429 in the OpenAI
  shape with `Retry-After`, so a runaway agent backs off instead of filling the queue.
- The request body must keep arriving: a client silent for `client_body_timeout` gets
  408, before any ticket is taken, so a stalled upload never holds a model.
- A malformed or oversized request line or header gets a 4xx in the OpenAI shape
  (aiohttp would answer in plain text, and log the offending line, key included).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from aiohttp import web
from aiohttp.http_exceptions import BadHttpMethod, LineTooLong
from aiohttp.web_protocol import RequestHandler

from ..errors import ApiError, retry_headers

if TYPE_CHECKING:
    from .auth import Caller

log = logging.getLogger("sparkstack.gateway")

RPM_WINDOW_S = 60.0
LOG_EVERY_S = 60.0  # a key held at its limit is logged once a minute, not per request
MAX_LINE_BYTES = 8190  # the request line and each header (aiohttp's default, made explicit)


class KeyLimits:
    """In-flight and per-minute counts of each key that has limits.

    `rpm` is a sliding window: at most `rpm` requests admitted in any 60 s, so a burst
    cannot take two minutes' worth at a window edge. Refused requests do not count.
    """

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._in_flight: dict[str, int] = {}
        self._admitted: dict[str, deque[float]] = {}
        self._logged: dict[str, float] = {}

    def in_flight(self, name: str) -> int:
        return self._in_flight.get(name, 0)

    @contextmanager
    def admit(self, caller: Caller) -> Iterator[None]:
        """Hold one of the key's request slots for the block, however it ends; raise
        a 429 ApiError when the key is at a limit."""
        if caller.max_concurrent is None and caller.rpm is None:
            yield
            return
        name = caller.name
        now = self._clock()
        if caller.max_concurrent is not None and self.in_flight(name) >= caller.max_concurrent:
            self._note(name, now, f"{self.in_flight(name)} requests in flight (max_concurrent)")
            # No way to know when one ends: the soonest honest retry.
            raise ApiError(429, f"API key {name!r} already has {caller.max_concurrent} "
                           "request(s) in flight, its limit (max_concurrent); retry when "
                           "one ends", "concurrency_limit_exceeded", retry_headers(1.0))
        if caller.rpm is not None:
            admitted = self._admitted.setdefault(name, deque())
            while admitted and admitted[0] <= now - RPM_WINDOW_S:
                admitted.popleft()
            if len(admitted) >= caller.rpm:
                wait = admitted[0] + RPM_WINDOW_S - now
                self._note(name, now, f"{caller.rpm} requests in the last minute (rpm)")
                headers = retry_headers(wait)
                raise ApiError(429, f"API key {name!r} made {caller.rpm} requests in the last "
                               f"minute, its limit (rpm); retry in {headers['Retry-After']} s",
                               "rate_limit_exceeded", headers)
            admitted.append(now)
        self._in_flight[name] = self.in_flight(name) + 1
        try:
            yield
        finally:
            left = self._in_flight[name] - 1
            if left:
                self._in_flight[name] = left
            else:
                del self._in_flight[name]

    def _note(self, name: str, now: float, what: str) -> None:
        if now - self._logged.get(name, -LOG_EVERY_S) >= LOG_EVERY_S:
            self._logged[name] = now
            log.warning("API key %r is at its limit: %s; refusing with 429", name, what)


async def read_body(request: web.Request, idle_timeout: float) -> bytes:
    """The whole body, or 408 once the client sends nothing for `idle_timeout` (checked
    every `idle_timeout`, so a stall is noticed within twice that). A slow upload that
    keeps moving is never cut."""
    if request.content.is_eof():  # the usual case: the body came with the headers
        return await request.read()
    reading = asyncio.ensure_future(request.read())
    seen = request.content.total_bytes
    try:
        while True:
            done, _ = await asyncio.wait({reading}, timeout=idle_timeout)
            if done:
                return reading.result()
            if request.content.total_bytes == seen:
                log.info("cut off a client that sent no body bytes for %g s (%s %s)",
                         idle_timeout, request.method, request.path[:200])
                raise ApiError(408, f"the request body stopped arriving: nothing for "
                               f"{idle_timeout:g} s (client_body_timeout)", "body_timeout")
            seen = request.content.total_bytes
    finally:
        reading.cancel()


class _OpenAIShapedErrors(RequestHandler):
    """aiohttp's connection handler, answering requests it cannot parse in the OpenAI
    shape. The stock handler answers in plain text and logs the exception, whose text
    holds the first 100 bytes of the offending line: an `Authorization` header, say."""

    def handle_error(self, request: Any, status: int = 500, exc: BaseException | None = None,
                     message: str | None = None) -> web.StreamResponse:
        if status >= 500 or request.writer.output_size > 0:
            return super().handle_error(request, status, exc, message)
        if isinstance(exc, LineTooLong):
            status, code = 431, "header_too_large"
            text = (f"the request line or a header is longer than {MAX_LINE_BYTES} bytes; "
                    "send keys and options in the body or shorter headers")
        else:
            code = "malformed_request"
            text = "the request is not valid HTTP (its request line or a header is malformed)"
        # Never the exception's text: it quotes the offending line. Non-HTTP traffic (TLS
        # to this port, scanners) only at debug, as aiohttp does.
        log.log(logging.DEBUG if isinstance(exc, BadHttpMethod) else logging.WARNING,
                "refused a request that is not valid HTTP from %s: %s (%d)",
                request.remote, type(exc).__name__ if exc else "error", status)
        resp = web.json_response(ApiError(status, text, code).body(), status=status)
        resp.force_close()
        return resp


class _Server(web.Server):
    def __call__(self) -> RequestHandler:
        return _OpenAIShapedErrors(self, loop=self._loop, **self._kwargs)


class AppRunner(web.AppRunner):
    """`web.AppRunner` whose connections answer unparsable requests in the OpenAI shape
    (aiohttp offers no hook for this: the server's class is swapped for one that makes
    the handler above)."""

    async def _make_server(self) -> web.Server:
        server = await super()._make_server()
        server.__class__ = _Server
        return server
