"""Shared harness: a real gateway in the test's event loop, in front of real fake-engine
processes on free ports."""

from __future__ import annotations

import asyncio
import contextlib
import io
import os
import socket
import subprocess
import sys
import tarfile
import textwrap
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiodocker
import aiohttp
import pytest
from aiohttp import web

from sparkstack.config import Config, builtin_catalog, load_config
from sparkstack.gateway.server import ServeInfo, serve
from sparkstack.runtime.docker import LABEL_MODEL
from sparkstack.scheduler import ModelState, State
from sparkstack.supervisor import Supervisor

# Every scheduler the tests drive, in-process or in a subprocess gateway, checks its
# invariants after each event (scheduler/invariants.py).
os.environ.setdefault("SPARKSTACK_DEBUG", "1")

FAKE_ENGINE = Path(__file__).with_name("fake_engine.py")
KEY = "sk-test-key-0123456789"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def fake(*args: Any, starts: Path | None = None) -> str:
    """A YAML `command:` running the fake engine with these options."""
    argv = [sys.executable, str(FAKE_ENGINE), "--port", "${PORT}", *map(str, args)]
    if starts is not None:
        argv += ["--starts-file", str(starts)]
    return "[" + ", ".join(f'"{a}"' for a in argv) + "]"


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie has exited; only its parent has not collected it yet.
    with contextlib.suppress(OSError):
        if Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] == "Z":
            return False
    return True


def write_config(tmp_path: Path, models: str) -> Path:
    """A config file for a gateway run as a subprocess: the test key, a 4 GB budget, data
    under tmp_path, and `models` (YAML of the models, indented or not)."""
    path = tmp_path / "sparkstack.yaml"
    path.write_text(f"api_keys: [{KEY}]\nmemory_gb: 4\nmin_residency: 0s\n"
                    f"data_dir: {tmp_path / 'data'}\n"
                    "models:\n" + textwrap.indent(textwrap.dedent(models).strip("\n"), "  ")
                    + "\n")
    return path


def pids(starts: Path) -> list[int]:
    return [int(x) for x in starts.read_text().split()] if starts.exists() else []


class Gateway:
    def __init__(self, url: str, supervisor: Supervisor, session: aiohttp.ClientSession):
        self.url = url
        self.supervisor = supervisor
        self.http = session

    def state(self, model_id: str) -> ModelState:
        return self.supervisor.scheduler.models[model_id]

    async def until(self, predicate: Callable[[], bool], timeout: float = 20) -> None:
        """Wait for a scheduler state change that makes `predicate` true."""
        async with asyncio.timeout(timeout):
            while not predicate():
                await self.supervisor.wait_changed()

    async def until_state(self, model_id: str, state: State, timeout: float = 20) -> None:
        await self.until(lambda: self.state(model_id).state is state, timeout)

    async def release(self, model_id: str, gate: str = "default") -> None:
        """Open a gate of the model's fake engine: the streams held at it go on."""
        port = self.supervisor.ports[model_id]
        async with aiohttp.ClientSession() as s, s.post(
                f"http://127.0.0.1:{port}/release?gate={gate}") as resp:
            assert resp.status == 200, await resp.text()

    async def chat(self, model: str, headers: dict[str, str] | None = None,
                   **body: Any) -> tuple[int, dict[str, Any]]:
        payload = {"model": model, "messages": [{"role": "user", "content": "hi"}], **body}
        async with self.http.post(self.url + "/v1/chat/completions", json=payload,
                                  headers=headers) as resp:
            return resp.status, await resp.json(content_type=None)

    async def stream(self, model: str, headers: dict[str, str] | None = None,
                     **body: Any) -> list[str]:
        """Every SSE line of a streamed chat, comments included. `headers` reach the
        engine (the fake engine's `x-fake-gate` holds the stream until released)."""
        payload = {"model": model, "messages": [{"role": "user", "content": "hi"}],
                   "stream": True, **body}
        lines = []
        async with self.http.post(self.url + "/v1/chat/completions", json=payload,
                                  headers=headers) as resp:
            assert resp.status == 200, await resp.text()
            async for raw in resp.content:
                line = raw.decode().strip()
                if line:
                    lines.append(line)
        return lines


StartGateway = Callable[..., Awaitable[Gateway]]


# ------------------------------------------------------------------ Docker
# The test image is assembled here, without any registry: an almost empty root file
# system (`docker import`) into which the host's Python, the virtualenv and this
# repository are bind-mounted read-only, so a container can run the fake engine or the
# llama-server binary of the venv.

IMAGE = "sparkstack-test-engine:2"
REPO = Path(__file__).resolve().parents[1]


def _rootfs_tar() -> bytes:
    """A root file system with only the directories and symlinks a Debian host's
    bind-mounted /usr needs (merged /usr: /bin, /lib, /lib64 point into it)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        # /sbin is a real directory: Docker mounts its init process at /sbin/docker-init.
        for d in ("usr", "tmp", "etc", "proc", "sys", "dev", "root", "work", "sbin"):
            info = tarfile.TarInfo(d)
            info.type, info.mode = tarfile.DIRTYPE, 0o1777 if d == "tmp" else 0o755
            tar.addfile(info)
        for link in ("bin", "lib", "lib64"):
            info = tarfile.TarInfo(link)
            info.type, info.linkname = tarfile.SYMTYPE, f"usr/{link}"
            tar.addfile(info)
    return buf.getvalue()


@pytest.fixture(scope="session")
def docker_image() -> str:
    try:
        subprocess.run(["docker", "info"], check=True, capture_output=True, timeout=20)
    except (OSError, subprocess.SubprocessError) as e:
        message = f"no Docker daemon answers ({e}); `make test` starts one when run as root"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    if subprocess.run(["docker", "image", "inspect", IMAGE], capture_output=True).returncode:
        subprocess.run(["docker", "import", "-", IMAGE], input=_rootfs_tar(), check=True,
                       capture_output=True, timeout=60)
    return IMAGE


@pytest.fixture
async def docker(docker_image: str) -> AsyncIterator[aiodocker.Docker]:
    """A Docker client; removes the containers the test made when it ends."""
    client = aiodocker.Docker()
    yield client
    # Only the tests' own containers (from the test image): never a user's real engines.
    ours = {"label": [LABEL_MODEL], "ancestor": [IMAGE]}
    for c in await client.containers.list(all=True, filters=ours):
        await c.delete(force=True)
    await client.close()


def mounts(tmp_path: Path) -> list[str]:
    """What the fake engine needs from the host, read-only, plus the test's folder."""
    paths = {Path("/usr"), Path(sys.base_prefix).resolve(), Path(sys.prefix), REPO, tmp_path}
    return [f"{p}:{p}:{'rw' if p == tmp_path else 'ro'}" for p in sorted(paths)]





@contextlib.asynccontextmanager
async def local_server(app: web.Application) -> AsyncIterator[int]:
    """Serve a stand-in (a hub, a peer) on 127.0.0.1 while the block runs; its port."""
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        yield port
    finally:
        await runner.cleanup()


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    """A client session sending the test key."""
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {KEY}"}) as s:
        yield s


@contextlib.asynccontextmanager
async def serving(config: Config, data_dir: Path) -> AsyncIterator[Gateway]:
    """A gateway serving `config` on a free port (with the test key) for the block."""
    ready: asyncio.Future[ServeInfo] = asyncio.get_running_loop().create_future()
    stop = asyncio.Event()
    task = asyncio.create_task(serve(
        config, f"127.0.0.1:{free_port()}", data_dir=data_dir, extra_keys=[KEY],
        on_ready=ready.set_result, stop=stop))
    try:
        done, _ = await asyncio.wait({ready, task}, return_when=asyncio.FIRST_COMPLETED)
        if task in done:
            task.result()
        info = ready.result()
        async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {KEY}"}) as session:
            yield Gateway(info.url, info.supervisor, session)
    finally:
        stop.set()
        await task


@pytest.fixture
async def start_gateway(tmp_path: Path) -> AsyncIterator[StartGateway]:
    """`await start_gateway(models_yaml, **settings)` → a serving Gateway; stopped after."""
    async with contextlib.AsyncExitStack() as gateways:

        async def start(models: str | Config, **settings: Any) -> Gateway:
            """`models`: the YAML of the models (beside `settings`), or a whole Config."""
            if isinstance(models, Config):
                config = models
            else:
                # Swaps happen at once unless a test asks for min_residency (its own tests).
                settings = {"api_keys": f"[{KEY}]", "memory_gb": 10, "min_residency": "0s",
                            **settings}
                text = "".join(f"{k}: {v}\n" for k, v in settings.items())
                text += "models:\n" + textwrap.indent(textwrap.dedent(models), "  ")
                path = tmp_path / "sparkstack.yaml"
                path.write_text(text)
                config = load_config(path)
            return await gateways.enter_async_context(serving(config, tmp_path / "data"))

        yield start


@pytest.fixture(scope="module")
def demo() -> Config:
    """The CPU demo catalog (real llama-server, packaged models); with CI=true its
    absence fails the test instead of skipping it."""
    from sparkstack.engines import describe_packaged, llama_server_binary

    config = load_config(builtin_catalog("demo-cpu"))
    missing = [m.cfg.weights for m in config.models.values()
               if describe_packaged(m.cfg.weights or "") is not None]
    try:
        llama_server_binary()
    except Exception as e:
        missing.append(str(e))
    if missing:
        message = f"the demo's engine or models are not installed (make install): {missing}"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    return config
