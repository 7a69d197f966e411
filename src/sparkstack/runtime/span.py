"""A model spanning two nodes (`nodes: 2`): the head's side of the reservation.

vLLM's multi-node launch does the distributed work; sparkstack only places, starts,
watches and stops the two halves. Before the head half starts here, the worker node
must hold the memory for the other half. The head asks it with one long-lived request,
`POST /api/span/<model>` on the peer's gateway (gateway/span.py answers it): the peer's
scheduler treats it like any request for its local worker half (it queues, evicts idle
models, never cuts in-flight requests, refuses with the usual reasons), starts the
headless worker, and then keeps the response open, one JSON line per event:

    {"event": "accepted", "master_addr": ..., "heartbeat": 5.0}   at once
    {"event": "ready"}                                            the worker runs
    {"event": "alive"}                                            every heartbeat
    {"event": "ended", "error": ..., "status": ...}                refused, or the worker exited

The open response is the lease. The worker half lives exactly as long as it: when the
head stops (or its gateway dies and the connection drops), the peer stops the worker;
when the worker exits (or the peer goes silent for three heartbeats), the lease ends
and `SpannedEngine` stops the head. The model is then stopped, and the next request
starts both halves again.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from dataclasses import dataclass, field
from typing import Any

import aiohttp

from ..config import Config, Link, Model, Peer
from ..engines import SpanLaunch, engine_digest
from ..scheduler.refusal import Reason
from .base import Engine, LogBuffer, StartError

log = logging.getLogger("sparkstack.span")

SPAN_PATH = "/api/span/"
SILENT_HEARTBEATS = 3  # a peer silent this many heartbeats (plus a margin) is gone
SILENCE_MARGIN_S = 5.0


def event_line(event: str, **fields: Any) -> bytes:
    return (json.dumps({"event": event, **fields}) + "\n").encode()


class SpanLease:
    """The worker half held on the peer, from `accepted` until released or ended."""

    def __init__(self, peer: Peer, model: Model, response: aiohttp.ClientResponse,
                 heartbeat: float, master_addr: str):
        self.peer = peer
        self.model = model
        self.heartbeat = heartbeat
        self.master_addr = master_addr
        self.ended: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        self._response = response
        self._reader: asyncio.Task[None] | None = None

    def watch(self) -> None:
        """From `ready` on: end the lease when the peer says so, or falls silent."""
        self._reader = asyncio.create_task(self._read(), name=f"span:{self.model.id}")

    async def _read(self) -> None:
        why = "closed the reservation"
        try:
            while True:
                event = await next_event(self._response, self.heartbeat)
                if event is None:
                    break
                if event.get("event") == "ended":
                    why = str(event.get("error") or "ended the reservation")
                    break
        except TimeoutError:
            why = f"stopped answering for {silence(self.heartbeat):g} s"
        except (aiohttp.ClientError, OSError, ValueError) as e:
            why = f"dropped the reservation ({e or type(e).__name__})"
        if not self.ended.done():
            self.ended.set_result(why)

    async def release(self) -> None:
        """Let the worker half go: the peer stops it once the connection closes."""
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader
        self._response.close()
        if not self.ended.done():
            self.ended.set_result("released")


def silence(heartbeat: float) -> float:
    return SILENT_HEARTBEATS * heartbeat + SILENCE_MARGIN_S


async def next_event(response: aiohttp.ClientResponse, heartbeat: float
                     ) -> dict[str, Any] | None:
    """The next event line (None at the end of the response)."""
    async with asyncio.timeout(silence(heartbeat)):
        line = await response.content.readline()
    if not line:
        return None
    event = json.loads(line)
    if not isinstance(event, dict):
        raise ValueError(f"not an event: {line[:200]!r}")
    return event


@dataclass
class Spans:
    """What this node needs to run either half of a spanning model."""

    config: Config  # the live catalog (a reload updates it in place)
    http: aiohttp.ClientSession  # no total timeout: a lease lasts as long as the model runs
    # Worker halves reserved by a head (set by gateway/span.py before the start).
    worker_launches: dict[str, SpanLaunch] = field(default_factory=dict)

    @property
    def link(self) -> Link:
        return self.config.settings.link

    def master_port(self, model: Model) -> int:
        """Each spanning model has its own rendezvous port: master_port + its place."""
        spanning = sorted(mid for mid, m in self.config.engines.items() if m.cfg.nodes > 1)
        return self.link.master_port + (spanning.index(model.id) if model.id in spanning else 0)

    async def reserve(self, model: Model, log_buffer: LogBuffer) -> tuple[SpanLease, SpanLaunch]:
        """Hold the worker half on the peer (waiting while the peer makes room), and the
        head's launch that goes with it. Raises StartError when the peer refuses."""
        assert model.span is not None
        settings = self.config.settings
        peer = next((p for p in settings.peers if p.name == model.span.partner), None)
        master_port = self.master_port(model)
        if peer is None:
            raise StartError(f"peer {model.span.partner!r} (the worker node) is not in "
                             "'peers'", Reason.RUNTIME_UNAVAILABLE)
        url = peer.url.rstrip("/") + SPAN_PATH + model.id
        headers = {"Authorization": f"Bearer {peer.api_key()}"} if peer.api_key() else {}
        body = {"head": settings.node_name, "digest": engine_digest(model),
                "master_addr": self.link.address, "master_port": master_port}
        log_buffer.write(f"sparkstack: reserving the worker half on {peer.name} ({peer.url})")
        where = f"the worker node {peer.name!r} ({peer.url})"
        try:
            response = await self.http.post(url, json=body, headers=headers)
        except (aiohttp.ClientError, OSError) as e:
            raise StartError(f"{where} does not answer: {e or type(e).__name__}",
                             Reason.RUNTIME_UNAVAILABLE) from e
        try:
            if response.status != 200:
                raise StartError(f"{where} refused the worker half: "
                                 f"{await _error_text(response)}", Reason.START_FAILED)
            accepted = await next_event(response, 5.0)
            if not accepted or accepted.get("event") != "accepted":
                raise StartError(f"{where} answered the reservation with {accepted!r}")
            heartbeat = float(accepted.get("heartbeat") or 5.0)
            lease = SpanLease(peer, model, response, heartbeat,
                              self.link.address or str(accepted["master_addr"]))
            while True:
                event = await next_event(response, heartbeat)
                kind = event.get("event") if event else None
                if kind == "ready":
                    break
                if kind != "alive":
                    error = (event or {}).get("error") or "closed the reservation"
                    raise StartError(f"{where} cannot run the worker half: {error}",
                                     Reason.START_FAILED)
        except asyncio.CancelledError:
            response.close()
            raise
        except StartError:
            response.close()
            raise
        except (aiohttp.ClientError, OSError, ValueError, KeyError, TimeoutError) as e:
            response.close()
            raise StartError(f"{where} broke off the reservation: "
                             f"{e or type(e).__name__}") from e
        log_buffer.write(f"sparkstack: the worker half runs on {peer.name}; starting the head "
                         f"(master {lease.master_addr}:{master_port})")
        lease.watch()
        launch = SpanLaunch(0, lease.master_addr, master_port, host_ip=lease.master_addr,
                            interface=self.link.interface, env=self.link.env)
        return lease, launch


async def _error_text(response: aiohttp.ClientResponse) -> str:
    text = (await response.text())[:500]
    with contextlib.suppress(ValueError, KeyError, TypeError):
        return str(json.loads(text)["error"]["message"])
    return f"HTTP {response.status} {text}".strip()


class SpannedEngine:
    """The head half, running here, bound to its lease: either ending ends both."""

    def __init__(self, head: Engine, lease: SpanLease, log_buffer: LogBuffer):
        self.head = head
        self.lease = lease
        self.log = log_buffer
        self.exit_reason: str | None = None  # why it exited, when the head did not decide

    @property
    def description(self) -> str:
        return f"{self.head.description}, worker half on {self.lease.peer.name}"

    @property
    def port(self) -> int:
        return self.head.port

    @property
    def key(self) -> str | None:
        return self.head.key

    async def wait(self) -> int:
        head = asyncio.ensure_future(self.head.wait())
        await asyncio.wait({head, self.lease.ended}, return_when=asyncio.FIRST_COMPLETED)
        if not head.done():
            why = self.lease.ended.result()
            if why != "released":  # not our own stop: the worker half is gone
                self.exit_reason = f"was stopped: its worker half on {self.lease.peer.name} {why}"
                self.log.write(f"sparkstack: the worker half on {self.lease.peer.name} {why}; "
                               "stopping the head")
                log.warning("%s: the worker half on %s %s; stopping the head",
                            self.lease.model.id, self.lease.peer.name, why)
            await self.head.stop(self.lease.model.cfg.stop_timeout)
        code = await head
        await self.lease.release()
        return code

    async def stop(self, grace: float) -> None:
        await self.head.stop(grace)
        await self.lease.release()
