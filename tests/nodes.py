"""Two sparkstack instances on loopback standing in for two Sparks (tests of peers and
of models spanning both)."""

from __future__ import annotations

import asyncio
import textwrap
from pathlib import Path

import aiohttp
from aiohttp import web

from sparkstack.config import load_config
from sparkstack.gateway.app import PEERS
from sparkstack.gateway.peers import Peers
from sparkstack.gateway.server import ServeInfo, serve

from .conftest import KEY, Gateway, free_port


class Node:
    """One sparkstack instance of the pair, restartable on the same port."""

    def __init__(self, root: Path, name: str, models: str, peers: list[tuple[str, int]],
                 extra: str = ""):
        self.dir = root / name
        self.dir.mkdir()
        self.name, self.port = name, free_port()
        peer_yaml = "".join(f"\n  - {{name: {p}, url: 'http://127.0.0.1:{port}', key: {KEY}}}"
                            for p, port in peers)
        (self.dir / "sparkstack.yaml").write_text(
            f"api_keys: [{KEY}]\nmemory_gb: 4\nnode_name: {name}\npeer_poll_interval: 0.2s\n"
            + (f"peers:{peer_yaml}\n" if peers else "") + extra)
        with (self.dir / "sparkstack.yaml").open("a") as f:
            f.write("models:\n" + textwrap.indent(textwrap.dedent(models), "  "))
        self.task: asyncio.Task[None] | None = None
        self.stop_event = asyncio.Event()
        self.gw: Gateway | None = None
        self.app: web.Application | None = None

    async def start(self, http: aiohttp.ClientSession) -> Gateway:
        config = load_config(self.dir / "sparkstack.yaml")
        ready: asyncio.Future[ServeInfo] = asyncio.get_running_loop().create_future()
        self.stop_event = asyncio.Event()
        self.task = asyncio.create_task(serve(
            config, f"127.0.0.1:{self.port}", data_dir=self.dir / "data",
            on_ready=ready.set_result, stop=self.stop_event))
        done, _ = await asyncio.wait({ready, self.task}, return_when=asyncio.FIRST_COMPLETED)
        if self.task in done:
            self.task.result()
        info = ready.result()
        self.app = info.app
        self.gw = Gateway(info.url, info.supervisor, http)
        return self.gw

    async def stop(self) -> None:
        if self.task is not None:
            self.stop_event.set()
            await self.task
            self.task = None


async def until_peer(node: Node, *, healthy: bool, peer: str = "spark-b") -> None:
    directory = _directory(node)
    async with asyncio.timeout(20):
        while directory.states[peer].healthy is not healthy:
            await directory.changed.wait()


def _directory(node: Node) -> Peers:
    assert node.app is not None
    return node.app[PEERS]


async def chat(http: aiohttp.ClientSession, url: str, model: str, **body) -> tuple[int, dict]:
    payload = {"model": model, "messages": [{"role": "user", "content": "hi"}], **body}
    async with http.post(url + "/v1/chat/completions", json=payload) as resp:
        return resp.status, await resp.json(content_type=None)
