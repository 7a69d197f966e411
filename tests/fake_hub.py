"""A stand-in Hugging Face hub on 127.0.0.1: the endpoints huggingface_hub's
snapshot_download calls, for tiny repos held in memory.

- GET  /api/models/{repo}/revision/{rev}   the repo's commit and files (sizes with ?blobs)
- GET  /api/models/{repo}/tree/{rev}       the file listing (one page)
- HEAD /{repo}/resolve/{rev}/{file}        ETag, X-Repo-Commit, Content-Length
- GET  /{repo}/resolve/{rev}/{file}        the bytes; `Range: bytes=N-` answers 206

No Xet headers are sent, so huggingface_hub downloads over plain HTTP. Faults, set by a
test: `drop_after[file] = n` sends n bytes of the file's next GET and closes the
connection (huggingface_hub retries with a Range); `broken[file] = status` answers every
GET of it with that status. Every request is recorded in `requests`.
"""

from __future__ import annotations

import asyncio
import hashlib
import threading
from dataclasses import dataclass, field

from aiohttp import web


@dataclass
class Repo:
    files: dict[str, bytes]
    sha: str = "0123456789abcdef0123456789abcdef01234567"
    gated: bool = False


@dataclass(frozen=True)
class Seen:
    method: str
    path: str
    range: str | None
    auth: str | None


@dataclass
class FakeHub:
    repos: dict[str, Repo] = field(default_factory=dict)
    drop_after: dict[str, int] = field(default_factory=dict)
    broken: dict[str, int] = field(default_factory=dict)
    requests: list[Seen] = field(default_factory=list)
    url: str = ""

    def gets(self, filename: str) -> list[Seen]:
        """The GETs of a file's bytes."""
        return [r for r in self.requests
                if r.method == "GET" and "/resolve/" in r.path and r.path.endswith(filename)]

    # ------------------------------------------------------------ handlers

    def _repo(self, request: web.Request) -> tuple[str, Repo]:
        name = f"{request.match_info['owner']}/{request.match_info['name']}"
        repo = self.repos.get(name)
        if repo is None:
            raise web.HTTPNotFound(headers={"X-Error-Code": "RepoNotFound",
                                            "X-Error-Message": "Repository not found"})
        if repo.gated and not request.headers.get("Authorization"):
            raise web.HTTPForbidden(headers={"X-Error-Code": "GatedRepo",
                                             "X-Error-Message": "Access to model is restricted"})
        return name, repo

    async def info(self, request: web.Request) -> web.Response:
        name, repo = self._repo(request)
        blobs = "blobs" in request.query
        return web.json_response({
            "id": name, "modelId": name, "sha": repo.sha, "private": False,
            "siblings": [{"rfilename": f, **({"size": len(b)} if blobs else {})}
                         for f, b in repo.files.items()]})

    async def tree(self, request: web.Request) -> web.Response:
        _, repo = self._repo(request)
        return web.json_response([
            {"type": "file", "path": f, "size": len(b), "oid": _etag(b)}
            for f, b in repo.files.items()])

    async def resolve(self, request: web.Request) -> web.StreamResponse:
        _, repo = self._repo(request)
        filename = request.match_info["file"]
        body = repo.files.get(filename)
        if body is None:
            raise web.HTTPNotFound(headers={"X-Error-Code": "EntryNotFound"})
        headers = {"ETag": f'"{_etag(body)}"', "X-Repo-Commit": repo.sha,
                   "Accept-Ranges": "bytes"}
        if request.method == "HEAD":
            return web.Response(headers={**headers, "Content-Length": str(len(body))})
        if filename in self.broken:
            return web.Response(status=self.broken[filename], text="injected")
        start = 0
        ranged = request.headers.get("Range", "")
        if ranged.startswith("bytes="):
            start = int(ranged[6:].split("-")[0])
        part = body[start:]
        resp = web.StreamResponse(status=206 if start else 200, headers=headers)
        if start:
            resp.headers["Content-Range"] = f"bytes {start}-{len(body) - 1}/{len(body)}"
        resp.content_length = len(part)
        await resp.prepare(request)
        cut = self.drop_after.pop(filename, None)
        if cut is not None:
            await resp.write(part[:cut])
            await asyncio.sleep(0.05)  # let the bytes leave before the connection dies
            assert request.transport is not None
            request.transport.abort()
            return resp
        await resp.write(part)
        await resp.write_eof()
        return resp

    # ------------------------------------------------------------ running

    def app(self) -> web.Application:
        @web.middleware
        async def record(request: web.Request, handler):  # type: ignore[no-untyped-def]
            self.requests.append(Seen(request.method, request.path,
                                      request.headers.get("Range"),
                                      request.headers.get("Authorization")))
            return await handler(request)

        app = web.Application(middlewares=[record])
        repo = "/{owner}/{name}"
        app.router.add_get("/api/models" + repo + "/revision/{rev}", self.info)
        app.router.add_get("/api/models" + repo + "/tree/{rev}", self.tree)
        app.router.add_route("*", repo + "/resolve/{rev}/{file:.+}", self.resolve)
        return app


def _etag(body: bytes) -> str:
    return hashlib.sha256(body).hexdigest()


class HubThread:
    """The hub served from its own thread and event loop, for synchronous tests."""

    def __init__(self, hub: FakeHub):
        self.hub = hub
        self.loop = asyncio.new_event_loop()
        self.runner = web.AppRunner(hub.app(), access_log=None)
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)

    def __enter__(self) -> FakeHub:
        self.thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self.loop).result(30)
        return self.hub

    async def _start(self) -> None:
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        port = self.runner.addresses[0][1]
        self.hub.url = f"http://127.0.0.1:{port}"

    def __exit__(self, *exc: object) -> None:
        asyncio.run_coroutine_threadsafe(self.runner.cleanup(), self.loop).result(30)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(30)
        self.loop.close()
