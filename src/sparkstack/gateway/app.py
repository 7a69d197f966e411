"""The HTTP server: routes, auth, errors in the OpenAI shape, and the request flow.

A request names its model (body `model`, multipart field, or the path form), is
authorised, takes a ticket from the scheduler (through the supervisor), waits for its
grant (streaming clients get an event stream at once, with keep-alive comments while
the model loads), is relayed, and gives its ticket back however it ends.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
from aiohttp import web

from .. import redact
from ..config import Config, ConfigError, Model, load_config
from ..errors import ApiError, shown
from ..runtime.span import SPAN_PATH
from ..scheduler.refusal import Refusal
from ..supervisor import Supervisor
from ..telemetry.progress import describe, format_duration
from ..views import ModelView
from . import accounting, cors, monitor, openapi, shaping, span
from .auth import CALLER, Caller, Keyring
from .limits import read_body
from .peers import Peers, PeerState, relayed, unavailable
from .proxy import (
    end_in_band,
    new_client_session,
    open_event_stream,
    open_json_early,
    relay,
    sse_event,
)
from .refusals import to_api_error
from .routing import (
    ENDPOINT_CAPABILITY,
    MODEL_ENDPOINTS,
    ModelRequest,
    parse_body,
    split_path_form,
)

log = logging.getLogger("sparkstack.gateway")

SUPERVISOR = web.AppKey("supervisor", Supervisor)
KEYS = web.AppKey("keys", Keyring)
CONFIG = web.AppKey("config", Config)
CLIENT = web.AppKey("client", aiohttp.ClientSession)
STARTED = web.AppKey("started", float)
PEERS = web.AppKey("peers", Peers)
# Headers every response to a request carries, streamed ones included (set before the
# status line goes out, by `_extra_headers`).
EXTRA_HEADERS = web.RequestKey("extra_headers", dict[str, str])


@web.middleware
async def openai_errors(request: web.Request, handler: Any) -> web.StreamResponse:
    """Every error leaves in the OpenAI shape, whatever raised it."""
    try:
        return await handler(request)
    except Refusal as r:
        e = to_api_error(r)
        return web.json_response(e.body(), status=e.status, headers=e.headers)
    except ApiError as e:
        return web.json_response(e.body(), status=e.status, headers=e.headers)
    except web.HTTPException as e:
        if e.status < 400:
            raise
        message = {
            404: f"no route for {request.method} {shown(request.path)}",
            405: f"method {request.method} is not allowed on {shown(request.path)}",
            413: "request body too large (max_body_mb)",
        }.get(e.status, e.reason)
        err = ApiError(e.status, message, e.reason.lower().replace(" ", "_"))
        return web.json_response(err.body(), status=e.status)
    except Exception:  # a bug of ours: still an answer in the OpenAI shape, and a log
        log.exception("unexpected error on %s %s", request.method, request.path[:200])
        err = ApiError(500, "internal error in sparkstack (the gateway log has the details)",
                       "internal_error")
        return web.json_response(err.body(), status=500)


def create_app(config: Config, supervisor: Supervisor, keys: Keyring) -> web.Application:
    app = web.Application(
        middlewares=[openai_errors, keys.middleware],  # keys: every route but /healthz
        client_max_size=int(config.settings.max_body_mb * 1024 * 1024),
    )
    app[SUPERVISOR] = supervisor
    app[KEYS] = keys
    app[CONFIG] = config
    app[STARTED] = time.time()

    app[PEERS] = Peers(config)

    async def client_ctx(app: web.Application) -> AsyncIterator[None]:
        app[CLIENT] = new_client_session()
        app[PEERS].start(app[CLIENT])
        yield
        await app[PEERS].close()
        await app[CLIENT].close()

    app.cleanup_ctx.append(client_ctx)
    app.on_response_prepare.append(_extra_headers)
    cors.install(app, config.settings.cors_origins)
    monitor.install(app, config, supervisor, keys)  # /metrics, /api/events, the dashboard
    r = app.router
    r.add_get("/healthz", healthz)
    r.add_get("/v1/models", list_models)
    r.add_get("/v1/models/{model:.+}", get_model)
    for path in MODEL_ENDPOINTS:
        r.add_post(path, model_endpoint)
    r.add_post("/v1/{tail:.+}", path_form_endpoint)
    r.add_get("/api/models", api_models)
    r.add_post("/api/models/{model}/load", api_load)
    r.add_post("/api/models/{model}/unload", api_unload)
    r.add_get("/api/models/{model}/logs", api_logs)
    r.add_post("/api/reload", api_reload)
    # A head node holds our worker half of a model spanning both (gateway/span.py).
    r.add_post(SPAN_PATH + "{model}", span.handler(config, supervisor))
    r.add_get("/openapi.json", openapi.openapi_json)
    return app


# ---------------------------------------------------------------- inference


async def model_endpoint(request: web.Request) -> web.StreamResponse:
    return await _serve(request, request.path, None)


async def path_form_endpoint(request: web.Request) -> web.StreamResponse:
    config, peers = request.app[CONFIG], request.app[PEERS]
    split = split_path_form(request.match_info["tail"], lambda n: config.resolve(n) is not None
                            or (not relayed(request) and peers.route(n) is not None))
    if split is None:
        tail = request.match_info["tail"]
        first = tail.split("/", 1)[0]
        if config.resolve(first) is None and "/" in tail:
            raise ApiError(404, f"model {shown(first)} does not exist; GET /v1/models lists "
                           "the models", "model_not_found")
        raise web.HTTPNotFound()
    name, endpoint = split
    return await _serve(request, endpoint, name)


async def _serve(request: web.Request, endpoint: str, path_model: str | None) -> web.StreamResponse:
    # The key's limits hold from here until the request ends, however it ends.
    with request.app[KEYS].limits.admit(request[CALLER]):
        # Its record (telemetry) is published however it ends.
        return await accounting.observe(request, request.app[SUPERVISOR].bus,
                                        _serve_admitted(request, endpoint, path_model))


async def _serve_admitted(request: web.Request, endpoint: str, path_model: str | None
                          ) -> web.StreamResponse:
    caller = request[CALLER]
    body = await read_body(request, request.app[CONFIG].settings.client_body_timeout)
    req = parse_body(body, request.headers.get("Content-Type", ""))
    name = path_model or req.name
    if not name:
        raise ApiError(400, "the request names no model: set 'model' in the body, or use "
                       "/v1/<model>/...", "model_required")
    if request.app[CONFIG].resolve(name) is None and not relayed(request):
        peer = request.app[PEERS].route(name)
        if peer is not None:
            return await _serve_on_peer(request, peer, req, endpoint, name)
    model = _model(request, name)
    Keyring.authorize(caller, model.id)
    if not model.enabled:
        raise ApiError(400, f"model {model.id!r} is disabled"
                       + (f": {model.cfg.notes}" if model.cfg.notes else ""), "model_disabled")
    _require_capability(request.app[CONFIG], model, endpoint)
    if model.cfg.stand_ins:
        model = _stand_in(request, caller, model, endpoint)
    if req.payload is not None:
        model = await _shape(request, caller, req, endpoint, model)
    meter = accounting.begin(request, req, endpoint, model.id)
    body = req.with_model(model.served_name)
    supervisor = request.app[SUPERVISOR]
    ticket = supervisor.submit(model.id)
    opened: web.StreamResponse | None = None
    try:
        if not ticket.waiter.done() and req.streaming:
            opened = await open_event_stream(request)
            upstream = await _wait_streaming(request, opened, ticket.waiter, model.id)
            if upstream is None:
                return opened
        elif not ticket.waiter.done() and req.payload is not None and _early_headers(
                request.app[CONFIG], model):
            opened = await open_json_early(request)
            upstream = await _wait_early(request, opened, ticket.waiter)
            if upstream is None:
                return opened
        else:
            upstream = await supervisor.wait(ticket)
        return await relay(request, request.app[CLIENT], upstream, endpoint, body,
                           model.id, opened, model.stream_idle_timeout, meter)
    finally:
        supervisor.finish(ticket)


async def _serve_on_peer(request: web.Request, peer: PeerState, req: ModelRequest,
                         endpoint: str, name: str) -> web.StreamResponse:
    """Relay to the peer whose model it is (one hop; it shapes and schedules itself)."""
    Keyring.authorize(request[CALLER], name)
    upstream = request.app[PEERS].upstream(peer)
    meter = accounting.begin(request, req, endpoint, name)
    body = req.with_model(name)
    try:
        return await relay(request, request.app[CLIENT], upstream, endpoint, body, name,
                           None, request.app[CONFIG].settings.stream_idle_timeout, meter)
    except ApiError as e:
        if e.code != "engine_unreachable":
            raise
        peer.healthy, peer.last_error = False, e.message
        raise unavailable(peer) from e


def _stand_in(request: web.Request, caller: Caller, model: Model, endpoint: str) -> Model:
    """The running model that answers in this model's place (its `stand_ins`), if starting
    it now would stop another model; else the model itself."""
    config = request.app[CONFIG]
    needed = ENDPOINT_CAPABILITY.get(endpoint)

    def may_serve(mid: str) -> bool:
        m = config.models[mid]
        return (m.enabled and (m.span is None or m.span.role == "head")
                and (needed is None or needed in m.cfg.capabilities)
                and (caller.models is None or mid in caller.models))

    stand = request.app[SUPERVISOR].stand_in(model.id, may_serve)
    if stand is None:
        return model
    log.debug("%s is not running and would stop a model to start: %s answers in its place",
              model.id, stand)
    request[EXTRA_HEADERS] = {"x-sparkstack-served-by": stand}
    return config.models[stand]


async def _shape(request: web.Request, caller: Caller, req: ModelRequest, endpoint: str,
                 model: Model) -> Model:
    """Request shaping (gateway/shaping.py) before a ticket is taken, so a request the
    model cannot serve never loads it. Returns the model that serves the request: the one
    asked for, or its context fallback."""
    assert req.payload is not None
    prepared = await shaping.prepare(
        req.payload, model, endpoint, resolve=request.app[CONFIG].resolve,
        upstream=request.app[SUPERVISOR].upstream, session=request.app[CLIENT],
        may_use=lambda m: caller.models is None or m.id in caller.models)
    if prepared.body is not None:
        req.replace_payload(prepared.body)
    headers = {}
    if prepared.applied:
        headers["x-sparkstack-shaped"] = ",".join(prepared.applied)
    if prepared.model is not model:
        headers["x-sparkstack-served-by"] = prepared.model.id
    if headers:
        request[EXTRA_HEADERS] = {**request.get(EXTRA_HEADERS, {}), **headers}
    return prepared.model


async def _extra_headers(request: web.Request, response: web.StreamResponse) -> None:
    extra = request.get(EXTRA_HEADERS)
    if extra:
        response.headers.update(extra)


def _require_capability(config: Config, model: Model, endpoint: str) -> None:
    needed = ENDPOINT_CAPABILITY.get(endpoint)
    if needed is None or needed in model.cfg.capabilities:
        return
    others = [m.id for m in config.models.values()
              if m.enabled and needed in m.cfg.capabilities]
    raise ApiError(
        400, f"model {model.id!r} does not serve {endpoint} (its capabilities: "
        f"{', '.join(model.cfg.capabilities) or 'none'})"
        + (f"; models that do: {', '.join(others[:5])}" if others else ""),
        "unsupported_endpoint")


async def _wait_streaming(
    request: web.Request, resp: web.StreamResponse, fut: asyncio.Future[Any], model_id: str
) -> Any:
    """Wait for the grant, sending `: loading <model> 45% (weights) 3m12s` comments (the
    load's progress when the engine tells it, and how long this request has waited) so
    that clients and tunnels keep the connection. A refusal becomes an error event."""
    interval = request.app[CONFIG].settings.keepalive_interval
    supervisor = request.app[SUPERVISOR]
    loop = asyncio.get_running_loop()
    began = loop.time()
    await resp.write(f": loading {model_id}\n\n".encode())
    while True:
        done, _ = await asyncio.wait({fut}, timeout=interval)
        if done:
            break
        view = supervisor.model_view(model_id)
        progress = describe(view.load_phase, view.load_percent)
        await resp.write(f": loading {model_id} {progress + ' ' if progress else ''}"
                         f"{format_duration(loop.time() - began)}\n\n".encode())
    try:
        return fut.result()
    except Refusal as r:
        api = to_api_error(r)
        accounting.mark_error(resp, api.status, api.message)
        await resp.write(sse_event(api.body()))
        await resp.write_eof()
        return None


def _early_headers(config: Config, model: Model) -> bool:
    own = model.cfg.early_headers
    return config.settings.early_headers if own is None else own


async def _wait_early(request: web.Request, resp: web.StreamResponse,
                      fut: asyncio.Future[Any]) -> Any:
    """Wait for the grant behind early headers, sending a space every keepalive_interval
    (JSON allows leading whitespace). A refusal becomes the body: an OpenAI error object."""
    interval = request.app[CONFIG].settings.keepalive_interval
    while not (await asyncio.wait({fut}, timeout=interval))[0]:
        await resp.write(b" ")
    try:
        return fut.result()
    except Refusal as r:
        await end_in_band(resp, to_api_error(r))
        return None


def _model(request: web.Request, name: str) -> Model:
    model = request.app[CONFIG].resolve(name)
    if model is None:
        raise ApiError(404, f"model {shown(name)} does not exist; GET /v1/models lists the models",
                       "model_not_found")
    return model


# ---------------------------------------------------------------- listings


async def healthz(request: web.Request) -> web.Response:
    snap = request.app[SUPERVISOR].snapshot()
    if snap.shutting_down:
        return web.json_response({"status": "shutting_down"}, status=503)
    states = [m.state for m in snap.models]
    return web.json_response({
        "status": "ok",
        "models": len(states),
        "ready": states.count("ready"),
        "starting": states.count("starting"),
    })


def _openai_model(request: web.Request, v: ModelView) -> dict[str, Any]:
    return {
        "id": v.id,
        "object": "model",
        "created": int(request.app[STARTED]),
        "owned_by": "sparkstack",
        "state": v.state,
        "status": v.status,
        "context_length": v.context_length,
        "max_model_len": v.context_length,
        "capabilities": list(v.capabilities),
        "aliases": list(v.aliases),
        "notes": v.notes,
    }


async def list_models(request: web.Request) -> web.Response:
    """Answered from the catalog at once: listing never loads a model."""
    snap = request.app[SUPERVISOR].snapshot()
    node = request.app[CONFIG].settings.node_name
    data = [{**_openai_model(request, v), "node": node} for v in snap.models
            if v.status != "disabled" and v.span_role != "worker"]  # its head serves it
    if not relayed(request):  # a peer asking lists only what runs here
        local = {m["id"] for m in data}
        data += [m for m in request.app[PEERS].listing() if m["id"] not in local]
    return web.json_response({"object": "list", "data": data})


async def get_model(request: web.Request) -> web.Response:
    model = _model(request, request.match_info["model"])
    return web.json_response(_openai_model(request,
                                           request.app[SUPERVISOR].model_view(model.id)))


async def api_models(request: web.Request) -> web.Response:
    snap = request.app[SUPERVISOR].snapshot()
    return web.json_response({
        "memory_budget_gb": snap.memory_budget_gb,
        "memory_used_gb": snap.memory_used_gb,
        "queued": snap.queued,
        "models": [v.as_dict() for v in snap.models],
        "node": request.app[CONFIG].settings.node_name,
        "peers": [st.view() for st in request.app[PEERS].states.values()],
    })


# ---------------------------------------------------------------- admin


def _admin(request: web.Request) -> tuple[Caller, Model]:
    caller = request[CALLER]
    Keyring.require_admin(caller)
    return caller, _model(request, request.match_info["model"])


async def api_load(request: web.Request) -> web.Response:
    _, model = _admin(request)
    if not model.enabled:
        raise ApiError(400, f"model {model.id!r} is disabled", "model_disabled")
    supervisor = request.app[SUPERVISOR]
    await supervisor.load(model.id)
    return web.json_response(supervisor.model_view(model.id).as_dict())


async def api_unload(request: web.Request) -> web.Response:
    _, model = _admin(request)
    force = request.query.get("force", "").lower() in ("1", "true", "yes")
    supervisor = request.app[SUPERVISOR]
    await supervisor.unload(model.id, force)
    return web.json_response(supervisor.model_view(model.id).as_dict())


async def api_logs(request: web.Request) -> web.StreamResponse:
    """The engine's recent output; `?follow=true` keeps streaming new lines. Engine logs
    can hold other people's prompts: with `admin_keys`, only an admin key reads them, and
    a key limited to some models reads only theirs."""
    model = _model(request, request.match_info["model"])
    caller = request[CALLER]
    if request.app[CONFIG].settings.admin_keys:
        Keyring.require_admin(caller)
    Keyring.authorize(caller, model.id)
    buf = request.app[SUPERVISOR].logs[model.id]
    try:
        n = int(request.query.get("lines", "200"))
    except ValueError as e:
        raise ApiError(400, "'lines' must be a number", "invalid_parameter") from e
    text = "".join(line + "\n" for line in buf.tail(max(0, n)))
    if request.query.get("follow", "").lower() not in ("1", "true", "yes"):
        return web.Response(text=text, content_type="text/plain")
    resp = web.StreamResponse(headers={"Content-Type": "text/plain; charset=utf-8"})
    await resp.prepare(request)
    await resp.write(text.encode())
    async for line in buf.follow():
        await resp.write((line + "\n").encode())
    return resp


# ---------------------------------------------------------------- reload


async def reload_config(app: web.Application) -> dict[str, Any]:
    """Re-read the config file (SIGHUP or POST /api/reload). An invalid file is refused
    with every problem listed, and the running config is kept."""
    config, keys = app[CONFIG], app[KEYS]
    if config.path is None:
        raise ApiError(400, "this stack was not started from a file: nothing to reload",
                       "reload_unavailable")
    try:
        new = await asyncio.to_thread(load_config, config.path)
    except ConfigError as e:
        log.error("config reload refused, the running config is kept:\n  %s",
                  "\n  ".join(e.problems))
        raise ApiError(400, "the config has problems; the running config is kept:\n"
                       + "\n".join(e.problems), "invalid_config") from e
    notes = list(new.warnings)
    if new.settings.listen != config.settings.listen:
        notes.append(f"listen changed to {new.settings.listen}: restart sparkstack to apply")
    summary: dict[str, Any] = app[SUPERVISOR].reconfigure(new)
    keys.reload(config)
    redact.register(*keys.secrets(), *(p.api_key() for p in config.settings.peers))
    log.info("config reloaded from %s: %s", config.path, ", ".join(
        f"{k} {len(v)}" for k, v in summary.items() if v) or "no change")
    for note in notes:
        log.warning("%s", note)
    return {**summary, "warnings": notes}


async def api_reload(request: web.Request) -> web.Response:
    return web.json_response(await reload_config(request.app))
