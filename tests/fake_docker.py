"""A fake Docker Engine API on a unix socket, for tests that must not touch the real
daemon: it records every call (method, path, query) and keeps just enough container
state for the Docker runtime's start, re-use, adoption and stop."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiohttp import web

API = "v1.47"


@dataclass
class Container:
    id: str
    name: str
    labels: dict[str, str]
    running: bool = False
    exited: asyncio.Event = field(default_factory=asyncio.Event)

    def info(self) -> dict[str, Any]:
        return {"Id": self.id, "Name": "/" + self.name,
                "Config": {"Labels": self.labels, "Tty": True},
                "State": {"Running": self.running,
                          "Status": "running" if self.running else "exited"}}


@dataclass
class Call:
    method: str
    path: str
    query: dict[str, str]


class FakeDocker:
    def __init__(self, socket: Path, images: Iterable[str] = ()) -> None:
        self.socket = socket
        self.images = set(images)
        self.containers: dict[str, Container] = {}
        self.calls: list[Call] = []
        self._runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        return f"unix://{self.socket}"

    def add(self, name: str, labels: dict[str, str], running: bool) -> Container:
        c = Container(uuid.uuid4().hex + uuid.uuid4().hex, name, labels, running)
        self.containers[c.id] = c
        return c

    def touched(self, c: Container) -> list[Call]:
        """Every call that named this container (by id or by name)."""
        return [k for k in self.calls
                if f"/containers/{c.id}" in k.path or f"/containers/{c.name}/" in k.path]

    async def __aenter__(self) -> FakeDocker:
        app = web.Application(middlewares=[self._record])
        app.router.add_get("/version", self._version)
        app.router.add_get(f"/{API}/version", self._version)
        app.router.add_get(f"/{API}/info", self._info)
        app.router.add_get(f"/{API}/containers/json", self._list)
        app.router.add_post(f"/{API}/containers/create", self._create)
        app.router.add_get(f"/{API}/containers/{{ref}}/json", self._inspect)
        app.router.add_post(f"/{API}/containers/{{ref}}/start", self._start)
        app.router.add_post(f"/{API}/containers/{{ref}}/stop", self._stop)
        app.router.add_post(f"/{API}/containers/{{ref}}/wait", self._wait)
        app.router.add_get(f"/{API}/containers/{{ref}}/logs", self._logs)
        app.router.add_delete(f"/{API}/containers/{{ref}}", self._delete)
        app.router.add_get(f"/{API}/images/{{name:.+}}/json", self._image)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        await web.UnixSite(self._runner, str(self.socket)).start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        for c in self.containers.values():
            c.exited.set()
        assert self._runner is not None
        await self._runner.cleanup()

    @web.middleware
    async def _record(self, request: web.Request, handler: Any) -> web.StreamResponse:
        self.calls.append(Call(request.method, request.path, dict(request.query)))
        return await handler(request)

    def _find(self, ref: str) -> Container:
        for c in self.containers.values():
            if ref in (c.id, c.name):
                return c
        raise web.HTTPNotFound(text=json.dumps({"message": f"No such container: {ref}"}),
                               content_type="application/json")

    async def _version(self, request: web.Request) -> web.Response:
        return web.json_response({"ApiVersion": API[1:], "Version": "27.0.0"})

    async def _info(self, request: web.Request) -> web.Response:
        return web.json_response({"ServerVersion": "27.0.0", "Runtimes": {"runc": {}}})

    async def _list(self, request: web.Request) -> web.Response:
        wanted = json.loads(request.query.get("filters", "{}")).get("label", [])
        found = [c for c in self.containers.values() if all(k in c.labels for k in wanted)]
        return web.json_response([{"Id": c.id, "Names": ["/" + c.name], "Labels": c.labels}
                                  for c in found])

    async def _create(self, request: web.Request) -> web.Response:
        body = await request.json()
        c = self.add(request.query["name"], body.get("Labels") or {}, running=False)
        return web.json_response({"Id": c.id, "Warnings": []}, status=201)

    async def _inspect(self, request: web.Request) -> web.Response:
        return web.json_response(self._find(request.match_info["ref"]).info())

    async def _start(self, request: web.Request) -> web.Response:
        c = self._find(request.match_info["ref"])
        c.running, c.exited = True, asyncio.Event()
        return web.Response(status=204)

    async def _stop(self, request: web.Request) -> web.Response:
        c = self._find(request.match_info["ref"])
        c.running = False
        c.exited.set()
        return web.Response(status=204)

    async def _wait(self, request: web.Request) -> web.Response:
        c = self._find(request.match_info["ref"])
        if c.running:
            await c.exited.wait()
        return web.json_response({"StatusCode": 0})

    async def _logs(self, request: web.Request) -> web.Response:
        self._find(request.match_info["ref"])
        return web.Response(body=b"", content_type="text/plain")

    async def _delete(self, request: web.Request) -> web.Response:
        c = self._find(request.match_info["ref"])
        c.exited.set()
        del self.containers[c.id]
        return web.Response(status=204)

    async def _image(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        if name not in self.images:
            raise web.HTTPNotFound(text=json.dumps({"message": f"No such image: {name}"}),
                                   content_type="application/json")
        return web.json_response({"Id": "sha256:" + "0" * 64, "Size": 1})
