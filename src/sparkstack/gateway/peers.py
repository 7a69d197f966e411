"""Peers: other sparkstack gateways (the second Spark) whose models this one serves too.

Each peer's own catalog is read from it (`GET /v1/models`, polled every
`peer_poll_interval`), never duplicated here. A request for a model that is not local
but that a peer lists (or that our catalog places on a peer with `node:`) is relayed to
that peer's gateway — streaming, cancellation and errors exactly as for a local engine.
A relayed request carries `x-sparkstack-hop`; a gateway never relays such a request
again, so two gateways that list each other cannot loop. A peer that does not answer
makes its models answer 503 naming it; local models are unaffected; the poll notices
when it is back.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from aiohttp import web

from ..config import Config, Peer
from ..engines import Upstream
from ..errors import ApiError

log = logging.getLogger("sparkstack.peers")

HOP = "x-sparkstack-hop"  # on relayed requests: the node they came from
POLL_TIMEOUT_S = 5.0


@dataclass
class PeerState:
    peer: Peer
    healthy: bool | None = None  # None until the first poll answered or failed
    models: dict[str, dict[str, Any]] = field(default_factory=dict)  # the peer's listing
    aliases: dict[str, str] = field(default_factory=dict)
    last_error: str | None = None
    checked_at: float | None = None  # Unix time of the last poll

    def knows(self, name: str) -> bool:
        return name in self.models or name in self.aliases

    def view(self) -> dict[str, Any]:
        return {"name": self.peer.name, "url": self.peer.url, "healthy": self.healthy,
                "last_error": self.last_error, "checked_at": self.checked_at,
                "models": sorted(self.models)}


class Peers:
    def __init__(self, config: Config) -> None:
        self.config = config
        self.states: dict[str, PeerState] = {}
        self.changed = asyncio.Event()  # set after every poll round (tests await it)
        self._task: asyncio.Task[None] | None = None
        self._sync()

    def _sync(self) -> None:
        """Follow the config (a reload may add or remove peers)."""
        wanted = {p.name: p for p in self.config.settings.peers}
        for name in list(self.states):
            if name not in wanted:
                del self.states[name]
        for name, peer in wanted.items():
            if name not in self.states or self.states[name].peer != peer:
                self.states[name] = PeerState(peer)

    # ------------------------------------------------------------ polling

    def start(self, session: aiohttp.ClientSession) -> None:
        if self.config.settings.peers:
            self._task = asyncio.create_task(self._poll_forever(session), name="peers")

    async def close(self) -> None:
        if self._task:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _poll_forever(self, session: aiohttp.ClientSession) -> None:
        while True:
            self._sync()
            await asyncio.gather(*(self._poll(session, st) for st in self.states.values()))
            self.changed.set()
            self.changed = asyncio.Event()
            await asyncio.sleep(self.config.settings.peer_poll_interval)

    async def _poll(self, session: aiohttp.ClientSession, st: PeerState) -> None:
        try:
            async with session.get(st.peer.url.rstrip("/") + "/v1/models",
                                   headers=self.headers(st.peer),
                                   timeout=aiohttp.ClientTimeout(total=POLL_TIMEOUT_S)) as r:
                if r.status != 200:
                    raise ValueError(f"/v1/models answered {r.status}")
                data = (await r.json())["data"]
            models = {m["id"]: m for m in data if isinstance(m, dict) and "id" in m}
        except (aiohttp.ClientError, TimeoutError, OSError, ValueError, KeyError,
                TypeError) as e:
            if st.healthy is not False:
                log.warning("peer %s (%s) does not answer: %s", st.peer.name, st.peer.url,
                            e or type(e).__name__)
            st.healthy, st.last_error = False, str(e) or type(e).__name__
        else:
            if st.healthy is not True:
                log.info("peer %s (%s) answers: %d models", st.peer.name, st.peer.url,
                         len(models))
            st.models = models
            st.aliases = {a: mid for mid, m in models.items() for a in m.get("aliases") or []}
            st.healthy, st.last_error = True, None
        st.checked_at = round(time.time(), 3)

    # ------------------------------------------------------------ routing

    def headers(self, peer: Peer) -> dict[str, str]:
        headers = {HOP: self.config.settings.node_name}
        key = peer.api_key()
        if key:
            headers["Authorization"] = f"Bearer {key}"
        return headers

    def route(self, name: str) -> PeerState | None:
        """The peer that serves `name` (a model that is not local), or None."""
        node = self.config.placed.get(name)
        if node is not None:
            return self.states.get(node)
        return next((st for st in self.states.values() if st.knows(name)), None)

    def upstream(self, st: PeerState) -> Upstream:
        """Where a relayed request goes: the peer's gateway, with the peer's key."""
        if st.healthy is False:
            raise unavailable(st)
        return Upstream(st.peer.url.rstrip("/"), self.headers(st.peer))

    def listing(self) -> list[dict[str, Any]]:
        """The peers' models for our /v1/models, each naming its node."""
        out = []
        for st in self.states.values():
            for m in st.models.values():
                entry = {**m, "node": st.peer.name}
                if st.healthy is False:
                    entry["state"] = "unreachable"
                out.append(entry)
        return out


def relayed(request: web.Request) -> bool:
    """A request another gateway relayed to us: never relayed again."""
    return HOP in request.headers


def unavailable(st: PeerState) -> ApiError:
    return ApiError(503, f"peer {st.peer.name!r} ({st.peer.url}) does not answer"
                    + (f" ({st.last_error})" if st.last_error else "")
                    + "; its models are unavailable until it is back, local models are not "
                    "affected", "peer_unavailable")
