"""An OpenAPI description of the gateway's routes, generated from its router.

Served at GET /openapi.json so clients and fuzzers can see every route; generated, so a
route added later is described without anyone remembering to.
"""

from __future__ import annotations

import re
from typing import Any

from aiohttp import web

from .. import __version__
from .routing import MODEL_ENDPOINTS

_PARAM = re.compile(r"\{([^}:]+)(?::[^}]*)?\}")
_ERROR = {"$ref": "#/components/schemas/Error"}


def _request_body(path: str) -> dict[str, Any] | None:
    if path not in MODEL_ENDPOINTS and "{tail}" not in path:
        return None
    schema = {"type": "object", "properties": {"model": {"type": "string"},
                                               "stream": {"type": "boolean"}},
              "additionalProperties": True}
    content: dict[str, Any] = {"application/json": {"schema": schema}}
    if "audio" in path:
        content = {"multipart/form-data": {"schema": schema}}
    return {"required": True, "content": content}


def describe(app: web.Application) -> dict[str, Any]:
    paths: dict[str, dict[str, Any]] = {}
    for route in app.router.routes():
        info = route.resource.get_info() if route.resource else {}
        raw = info.get("path") or info.get("formatter") or info.get("prefix")
        if not raw or route.method == "HEAD":
            continue
        path = _PARAM.sub(lambda m: "{" + m.group(1) + "}", raw)
        doc = (route.handler.__doc__ or "").strip().split("\n")[0]
        op: dict[str, Any] = {
            "summary": doc or route.handler.__name__.replace("_", " "),
            "parameters": [{"name": p, "in": "path", "required": True,
                            "schema": {"type": "string"}} for p in _PARAM.findall(raw)],
            "responses": {"200": {"description": "OK"},
                          "default": {"description": "an error in the OpenAI shape",
                                      "content": {"application/json": {"schema": _ERROR}}}},
        }
        body = _request_body(path) if route.method == "POST" else None
        if body:
            op["requestBody"] = body
        paths.setdefault(path, {})[route.method.lower()] = op
    return {
        "openapi": "3.0.3",
        "info": {"title": "sparkstack", "version": __version__,
                 "description": "One OpenAI-compatible endpoint in front of a model catalog"},
        "components": {
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
            "schemas": {"Error": {"type": "object", "required": ["error"], "properties": {
                "error": {"type": "object", "required": ["message", "type"], "properties": {
                    "message": {"type": "string"}, "type": {"type": "string"},
                    "param": {"nullable": True}, "code": {"nullable": True}}}}}},
        },
        "security": [{"bearer": []}],
        "paths": dict(sorted(paths.items())),
    }


async def openapi_json(request: web.Request) -> web.Response:
    """This description of the gateway's routes."""
    return web.json_response(describe(request.app))
