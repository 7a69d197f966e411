"""CORS: which browser pages and editor webviews may call the gateway (SPEC 9).

Allowed origins come from `cors_origins` (default: localhost on any port and VS Code
webviews). A preflight (`OPTIONS` with `Access-Control-Request-Method`) is answered here,
before routing and before auth: browsers send no credentials on a preflight. Every other
response to an allowed origin gets its CORS headers as it is prepared, so streamed
responses (whose headers leave before the body) carry them too. A request from any other
origin is still served; the browser just does not let that page read the answer. API
keys, not CORS, keep strangers out.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any

from aiohttp import web

from ..errors import ApiError

# Headers a page may read from our answers (retry hints, what shaping did).
EXPOSED = ("Retry-After, retry-after-ms, x-sparkstack-busy-models, x-sparkstack-shaped, "
           "x-sparkstack-served-by")
PREFLIGHT_MAX_AGE_S = 600


def _pattern(entry: str) -> re.Pattern[str]:
    """`*` (any origin), `scheme://host:*` (any port or none), `scheme://*` (any host of
    that scheme, e.g. editor webviews), `scheme://*.domain`, or one exact origin."""
    if entry == "*":
        return re.compile(r".+")
    scheme, _, rest = entry.partition("://")
    if rest == "*":
        host = r"[^/\s]+"
    else:
        port = ""
        if rest.endswith(":*"):
            rest, port = rest[:-2], r"(?::\d+)?"
        sub = ""
        if rest.startswith("*."):
            rest, sub = rest[2:], r"(?:[a-z0-9-]+\.)+"
        host = sub + re.escape(rest) + port
    return re.compile(re.escape(scheme) + "://" + host, re.IGNORECASE)


class Cors:
    def __init__(self, origins: Iterable[str]) -> None:
        self._patterns = [_pattern(o) for o in origins]

    def allowed(self, origin: str) -> bool:
        return any(p.fullmatch(origin) for p in self._patterns)

    @web.middleware
    async def preflight(self, request: web.Request, handler: Any) -> web.StreamResponse:
        if request.method != "OPTIONS" or "Access-Control-Request-Method" not in request.headers:
            return await handler(request)
        origin = request.headers.get("Origin", "")
        if not self.allowed(origin):
            err = ApiError(403, f"origin {origin or '(none)'!r} may not call this gateway "
                           "(cors_origins in the config)", "origin_not_allowed")
            return web.json_response(err.body(), status=403)
        headers = {
            "Access-Control-Allow-Methods": "GET, POST, OPTIONS",
            "Access-Control-Allow-Headers": request.headers.get(
                "Access-Control-Request-Headers", "Authorization, Content-Type, x-api-key"),
            "Access-Control-Max-Age": str(PREFLIGHT_MAX_AGE_S),
        }
        # Chrome asks before a public page or webview may reach a private address.
        if request.headers.get("Access-Control-Request-Private-Network") == "true":
            headers["Access-Control-Allow-Private-Network"] = "true"
        return web.Response(status=204, headers=headers)

    async def on_prepare(self, request: web.Request, response: web.StreamResponse) -> None:
        origin = request.headers.get("Origin")
        if origin and self.allowed(origin):
            response.headers["Access-Control-Allow-Origin"] = origin
            response.headers["Access-Control-Expose-Headers"] = EXPOSED
            response.headers.add("Vary", "Origin")


def install(app: web.Application, origins: Iterable[str]) -> None:
    """Answer preflights first (before auth and routing) and label allowed responses."""
    cors = Cors(origins)
    app.middlewares.insert(0, cors.preflight)
    app.on_response_prepare.append(cors.on_prepare)
