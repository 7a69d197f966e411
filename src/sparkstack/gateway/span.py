"""The worker node's side of a model spanning two nodes: `POST /api/span/<model>`.

The head node's gateway holds this request open for as long as the model runs
(runtime/span.py describes the exchange). Here it is one more request for the local
worker half: the scheduler queues it, evicts idle models for it, never cuts in-flight
requests and refuses with the usual reasons; once granted, the worker half runs until
the head lets go of the request (or drops it), and its exit ends the request.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from ..config import Config
from ..engines import SpanLaunch, engine_digest
from ..errors import ApiError
from ..runtime.span import event_line
from ..scheduler import State
from ..scheduler.refusal import Refusal
from ..supervisor import Supervisor
from .refusals import to_api_error

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

log = logging.getLogger("sparkstack.span")


def handler(config: Config, supervisor: Supervisor) -> Handler:
    async def reserve(request: web.Request) -> web.StreamResponse:
        return await _reserve(request, config, supervisor)
    return reserve


async def _reserve(request: web.Request, config: Config, supervisor: Supervisor
                   ) -> web.StreamResponse:
    mid = request.match_info["model"]
    model = config.workers.get(mid)
    me = config.settings.node_name
    if model is None or model.span is None:
        raise ApiError(404, f"model {mid!r} has no worker half on this node ({me!r}): its "
                       "entry here needs nodes: 2 with this node as its worker_node",
                       "model_not_found")
    try:
        body = await request.json()
        head, digest = str(body["head"]), str(body["digest"])
        master_port = int(body["master_port"])
        master_addr = body.get("master_addr") or request.remote
    except (ValueError, KeyError, TypeError) as e:
        raise ApiError(400, "a reservation needs head, digest and master_port",
                       "invalid_request") from e
    if head != model.span.head:
        raise ApiError(409, f"model {mid!r} spans {model.span.head!r} and {me!r} here, not "
                       f"{head!r}", "span_mismatch")
    if digest != engine_digest(model):
        raise ApiError(409, f"the entries of model {mid!r} differ between {head!r} and {me!r}: "
                       "both nodes must run the same engine (copy the same catalog entry to "
                       "both)", "span_mismatch")
    spans = supervisor.spans
    assert spans is not None
    if mid in spans.worker_launches:
        raise ApiError(409, f"the worker half of {mid!r} is already held by a running head",
                       "span_busy")
    link = config.settings.link
    spans.worker_launches[mid] = SpanLaunch(
        1, master_addr, master_port, host_ip=link.address or _local_address(request),
        interface=link.interface, env=link.env)
    heartbeat = config.settings.peer_poll_interval
    response = web.StreamResponse(headers={"Content-Type": "application/x-ndjson",
                                           "Cache-Control": "no-store"})
    ticket = None
    try:
        await response.prepare(request)
        await response.write(event_line("accepted", master_addr=master_addr,
                                        heartbeat=heartbeat))
        log.info("%s: worker half reserved by %s (master %s:%d)", mid, head, master_addr,
                 master_port)
        try:
            ticket = supervisor.submit(mid)
            await _granted(supervisor.wait(ticket), response, heartbeat)
        except Refusal as r:
            e = to_api_error(r)
            await response.write(event_line("ended", error=e.message, status=e.status,
                                            reason=r.reason.value))
            return response
        await response.write(event_line("ready"))
        why = await _serve(supervisor, mid, response, heartbeat)
        await response.write(event_line("ended", error=why))
    except ConnectionError:  # the head closed the lease (a cancellation ends here too)
        log.info("%s: the head on %s let go of the worker half", mid, head)
    finally:
        spans.worker_launches.pop(mid, None)
        if ticket is not None:
            supervisor.finish(ticket)
            supervisor.scheduler.unload(mid)  # a worker half never outlives its lease
    return response


async def _granted(waiting: Any, response: web.StreamResponse, heartbeat: float) -> None:
    """Wait for the grant, telling the head every heartbeat that we are still here."""
    task = asyncio.ensure_future(waiting)
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=heartbeat)
            if done:
                task.result()
                return
            await response.write(event_line("alive"))
    finally:
        if not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Refusal):
                await task


async def _serve(supervisor: Supervisor, mid: str, response: web.StreamResponse,
                 heartbeat: float) -> str:
    """Hold the worker half until its run ends; why it ended."""
    state = supervisor.state(mid)
    run = state.run
    engine_run = supervisor.runs[mid].task  # ends once the run's exit is reported
    assert engine_run is not None
    # Only an unload on this node ends it here (seen at the next heartbeat): an eviction
    # waits for the lease to end, like any request in flight. Waiting on the run itself,
    # not on every state change of the node, keeps the lease off the request path.
    while state.run == run and state.state is State.READY and not state.unload_requested:
        done, _ = await asyncio.wait({engine_run}, timeout=heartbeat)
        if done:
            break
        await response.write(event_line("alive"))
    if state.run == run and state.state is State.READY:
        return "was asked to stop on its node"
    error = (state.last_error or "").split(". Last log lines:")[0]
    return error or f"stopped on its node ({state.stop_reason or 'stopped'})"


def _local_address(request: web.Request) -> str | None:
    """This node's address on the connection the head came in on: its link address."""
    sock = request.transport.get_extra_info("sockname") if request.transport else None
    if not sock:
        return None
    host = str(sock[0])
    with contextlib.suppress(OSError):
        socket.inet_pton(socket.AF_INET6 if ":" in host else socket.AF_INET, host)
        return host
    return None
