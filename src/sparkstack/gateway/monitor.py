"""Seeing the stack: `/metrics`, `/api/activity`, `/api/events` and the dashboard at `/`.

Everything here reads the event bus or frozen snapshots (telemetry/); nothing reads the
scheduler. The dashboard is one static page in `static/` (no build step, no CDN): it
asks for the key once and follows `/api/events` with fetch() streaming, which can send
the Authorization header (EventSource cannot), so no key ever travels in a URL.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST

from ..config import Config
from ..errors import ApiError
from ..supervisor import Supervisor
from ..telemetry.activity import FILE, ActivityStore
from ..telemetry.events import Event
from ..telemetry.metrics import Metrics
from .auth import Keyring

METRICS = web.AppKey("metrics", Metrics)
ACTIVITY = web.AppKey("activity", ActivityStore)
MONITORED = web.AppKey("monitored", Supervisor)
STATIC = Path(__file__).with_name("static")
EVENTS_KEEPALIVE_S = 15.0
# The page loads only what it ships with, and talks only to this gateway.
PAGE_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data:; "
                               "frame-ancestors 'none'; base-uri 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}
_TYPES = {".html": "text/html", ".js": "text/javascript", ".css": "text/css",
          ".svg": "image/svg+xml"}


def install(app: web.Application, config: Config, supervisor: Supervisor,
            keys: Keyring) -> None:
    s = config.settings
    metrics = Metrics(supervisor.snapshot)
    store = ActivityStore(supervisor.data_dir / FILE, s.activity_max_rows, s.activity_max_days)
    app[METRICS] = metrics
    app[ACTIVITY] = store
    app[MONITORED] = supervisor
    # Subscribed now: the events of pinned models starting with the gateway count too.
    supervisor.bus.subscribe(metrics.on_event)
    supervisor.bus.subscribe(store.on_event)

    async def activity_ctx(app: web.Application) -> AsyncIterator[None]:
        await store.open()
        yield
        await store.close()

    app.cleanup_ctx.append(activity_ctx)

    async def end_streams(app: web.Application) -> None:
        supervisor.bus.close()

    app.on_shutdown.append(end_streams)
    files = sorted(f.name for f in STATIC.iterdir() if f.suffix in _TYPES)
    keys.public_paths |= {"/", *(f"/static/{f}" for f in files)}
    if s.metrics_public:
        keys.public_paths.add("/metrics")
    r = app.router
    r.add_get("/", dashboard)
    r.add_get("/static/{name}", static_file)
    r.add_get("/metrics", metrics_endpoint)
    r.add_get("/api/activity", api_activity)
    r.add_get("/api/events", api_events)


async def dashboard(request: web.Request) -> web.StreamResponse:
    return web.FileResponse(STATIC / "index.html", headers=PAGE_HEADERS)


async def static_file(request: web.Request) -> web.StreamResponse:
    path = STATIC / request.match_info["name"]
    if path.parent != STATIC or path.suffix not in _TYPES or not path.is_file():
        raise web.HTTPNotFound()
    return web.FileResponse(path, headers={**PAGE_HEADERS,
                                           "Content-Type": _TYPES[path.suffix]})


async def metrics_endpoint(request: web.Request) -> web.Response:
    body = request.app[METRICS].render()
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


def _number(request: web.Request, name: str, default: float | None) -> float | None:
    raw = request.query.get(name)
    if raw is None or raw == "":
        return default
    try:
        return float(raw)
    except ValueError as e:
        raise ApiError(400, f"{name!r} must be a number", "invalid_parameter") from e


async def api_activity(request: web.Request) -> web.Response:
    """`?model=&limit=&before=` (Unix time): the newest requests first."""
    limit = int(_number(request, "limit", 100) or 100)
    rows = await request.app[ACTIVITY].query(
        request.query.get("model") or None, max(1, min(limit, 1000)),
        _number(request, "before", None))
    return web.json_response({"data": rows})


def sse(kind: str, data: Any) -> bytes:
    return f"event: {kind}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n".encode()


def snapshot_payload(supervisor: Supervisor) -> dict[str, Any]:
    snap = supervisor.snapshot()
    return {"memory_budget_gb": snap.memory_budget_gb, "memory_used_gb": snap.memory_used_gb,
            "queued": snap.queued, "starting": snap.starting,
            "models": [v.as_dict() for v in snap.models]}


async def api_events(request: web.Request) -> web.StreamResponse:
    """Server-sent events of the bus (`?model=` for one model's), after a `snapshot`
    event with the state of every model; a comment every 15 s keeps tunnels open."""
    supervisor = request.app[MONITORED]
    model = request.query.get("model") or None
    if model is not None and model not in supervisor.config.models:
        raise ApiError(404, f"model {model!r} does not exist", "model_not_found")
    resp = web.StreamResponse(headers={"Content-Type": "text/event-stream",
                                       "Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    await resp.prepare(request)
    with supervisor.bus.queue(model) as queue:
        await resp.write(sse("snapshot", snapshot_payload(supervisor)))
        while True:
            try:
                event: Event | None = await asyncio.wait_for(queue.get(), EVENTS_KEEPALIVE_S)
            except TimeoutError:
                await resp.write(b": keep-alive\n\n")
                continue
            if event is None:  # shutting down: end the stream, do not hold the exit
                await resp.write_eof()
                return resp
            await resp.write(sse(event.kind, event.as_dict()))
