"""The Docker runtime: an engine is a container, driven through the Docker Engine API.

Containers are named `sparkstack-<model>` and labelled with the model, the identity of
their configuration (everything but port and key), and the port and internal key they
were created with. A stopped container whose identity still matches is re-used (a
plain start, seconds instead of a re-create); any change re-creates it. Host network,
engine bound to 127.0.0.1:<port>, an init process (vLLM leaves zombie workers
otherwise), `restart: no`: sparkstack decides when an engine runs.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiodocker
import aiohttp

from ..config import Model, parse_size
from ..images import describe
from ..scheduler.refusal import Reason
from .base import LaunchSpec, LogBuffer, StartError, port_is_free

log = logging.getLogger("sparkstack.docker")

LABEL_MODEL = "org.sparkstack.model"
LABEL_HASH = "org.sparkstack.config-hash"
LABEL_PORT = "org.sparkstack.port"
LABEL_KEY = "org.sparkstack.engine-key"


def container_name(model_id: str) -> str:
    return f"sparkstack-{model_id.replace(':', '-')}"


def docker_host() -> str:
    return os.environ.get("DOCKER_HOST") or "unix:///var/run/docker.sock"


def unavailable(e: BaseException) -> StartError:
    return StartError(f"Docker is not reachable at {docker_host()} ({e}); start the Docker "
                      "daemon or set DOCKER_HOST", Reason.RUNTIME_UNAVAILABLE)


def resolve_volume(spec: str, base_dir: Path) -> str:
    """HOST:CONTAINER[:MODE] with the host path made absolute (relative to the config)."""
    host, _, rest = spec.partition(":")
    path = Path(host).expanduser()
    if not path.is_absolute():
        path = base_dir / path
    return f"{path}:{rest}"


def container_config(spec: LaunchSpec, labels: dict[str, str]) -> dict[str, Any]:
    cfg = spec.model.cfg
    host: dict[str, Any] = {
        "NetworkMode": "host",
        "Binds": [resolve_volume(v, spec.model.base_dir) for v in cfg.volumes],
        "ShmSize": parse_size(cfg.shm_size),
        "Ulimits": [{"Name": k, "Soft": v, "Hard": v} for k, v in cfg.ulimits.items()],
        "Init": True,
        "RestartPolicy": {"Name": "no"},
    }
    if cfg.ipc:
        host["IpcMode"] = cfg.ipc
    if cfg.gpus != "none":
        request: dict[str, Any] = {"Driver": "nvidia", "Capabilities": [["gpu"]]}
        if cfg.gpus == "all":
            request["Count"] = -1
        else:
            request["DeviceIDs"] = [d.strip() for d in cfg.gpus.split(",") if d.strip()]
        host["DeviceRequests"] = [request]
    config = {
        "Image": cfg.image,
        "Cmd": list(spec.argv),
        "Env": [f"{k}={v}" for k, v in spec.env.items()],
        "Labels": labels,
        "HostConfig": host,
    }
    if cfg.entrypoint is not None:  # [] runs the command itself, without the image's
        config["Entrypoint"] = list(cfg.entrypoint)
    return config


class ContainerEngine:
    def __init__(self, container: Any, port: int, key: str | None, log_buffer: LogBuffer,
                 since: int = 0) -> None:
        self.container = container
        self.port = port
        self.key = key or None
        self._log = log_buffer
        self._logs = asyncio.create_task(self._follow(log_buffer, since))

    @property
    def description(self) -> str:
        return f"container {self.container.id[:12]}"

    async def _follow(self, buf: LogBuffer, since: int) -> None:
        with contextlib.suppress(aiodocker.DockerError, aiohttp.ClientError, asyncio.TimeoutError):
            async for chunk in self.container.log(stdout=True, stderr=True, follow=True,
                                                  since=since):
                for line in chunk.splitlines():
                    buf.write(line)

    async def wait(self) -> int:
        failing = False
        while True:
            try:
                result = await self.container.wait()
                break
            except (aiodocker.DockerError, aiohttp.ClientError) as e:
                if isinstance(e, aiodocker.DockerError) and e.status == 404:
                    # Removed behind our back (docker rm -f): it runs no more. Waiting on
                    # would keep its model "ready" forever, every request failing.
                    self._log.write(f"sparkstack: {self.description} no longer exists "
                                    "(removed outside sparkstack)")
                    return 128 + 9
                # The daemon went away: the container's fate is unknown; look again soon
                # (said once, not every second of an outage).
                if not failing:
                    log.warning("waiting for %s: %s; retrying every second", self.description, e)
                failing = True
                await asyncio.sleep(1)
        if failing:
            log.info("Docker answers again about %s", self.description)
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(asyncio.shield(self._logs), 1.0)
        return int(result.get("StatusCode", -1))

    async def stop(self, grace: float) -> None:
        """`docker stop`: SIGTERM, then SIGKILL after the grace."""
        with contextlib.suppress(aiodocker.DockerError, aiohttp.ClientError, OSError):
            await self.container.stop(t=max(1, math.ceil(grace)))


@dataclass
class Managed:
    """A container of ours found on the daemon."""

    model_id: str
    container: Any
    labels: dict[str, str]
    running: bool


class DockerRuntime:
    def __init__(self) -> None:
        self._docker: aiodocker.Docker | None = None

    async def client(self) -> aiodocker.Docker:
        if self._docker is None:
            self._docker = aiodocker.Docker()
        try:
            await self._docker.version()
        except (aiodocker.DockerError, aiohttp.ClientError, OSError, ValueError) as e:
            raise unavailable(e) from e
        return self._docker

    async def start(self, spec: LaunchSpec, log_buffer: LogBuffer) -> ContainerEngine:
        docker = await self.client()
        model = spec.model
        name = container_name(model.id)
        try:
            existing = await self._get(docker, name)
            if existing is not None:
                info = await existing.show()
                labels = info["Config"].get("Labels") or {}
                if labels.get(LABEL_MODEL) != model.id:
                    # Someone else's container under our name: never stop or remove it.
                    raise StartError(
                        f"a container named {name} exists and is not sparkstack's (it lacks "
                        f"the label {LABEL_MODEL}={model.id}); rename or remove it "
                        f"(docker rm -f {name}) if it is not needed")
                port = int(labels.get(LABEL_PORT, "0") or 0)
                if (not info["State"]["Running"] and labels.get(LABEL_HASH) == spec.identity
                        and port and port_is_free(port)):
                    log_buffer.write(f"sparkstack: re-using stopped container {existing.id[:12]}")
                    await existing.start()
                    return ContainerEngine(existing, port, labels.get(LABEL_KEY), log_buffer,
                                           since=int(time.time()) - 1)
                why = ("its configuration changed" if labels.get(LABEL_HASH) != spec.identity
                       else f"its port {port} is taken" if not info["State"]["Running"]
                       else "it was running outside sparkstack's control")
                log_buffer.write(f"sparkstack: re-creating the container: {why}")
                await existing.delete(force=True)
            await self._require_image(docker, model)
            labels = {LABEL_MODEL: model.id, LABEL_HASH: spec.identity,
                      LABEL_PORT: str(spec.port), LABEL_KEY: spec.key or ""}
            container = await docker.containers.create(container_config(spec, labels), name=name)
            try:
                await container.start()
            except aiodocker.DockerError as e:
                # Never leave a half-created container behind.
                with contextlib.suppress(aiodocker.DockerError):
                    await container.delete(force=True)
                raise StartError(f"Docker could not start {name}: {e.message}") from e
            log_buffer.write(f"sparkstack: created and started container {container.id[:12]} "
                             f"from {model.cfg.image}")
            return ContainerEngine(container, spec.port, spec.key, log_buffer)
        except (aiohttp.ClientError, OSError) as e:
            raise unavailable(e) from e
        except aiodocker.DockerError as e:
            raise StartError(f"Docker refused {name}: {e.message}") from e

    async def managed(self) -> list[Managed]:
        """Every sparkstack container on the daemon (for adoption at start-up)."""
        docker = await self.client()
        found = []
        for c in await docker.containers.list(all=True, filters={"label": [LABEL_MODEL]}):
            info = await c.show()
            labels = info["Config"].get("Labels") or {}
            found.append(Managed(labels.get(LABEL_MODEL, ""), c, labels,
                                 bool(info["State"]["Running"])))
        return found

    def attach(self, m: Managed, log_buffer: LogBuffer) -> ContainerEngine:
        """Take over a running container: its port and key come from its labels."""
        return ContainerEngine(m.container, int(m.labels.get(LABEL_PORT, "0") or 0),
                               m.labels.get(LABEL_KEY), log_buffer, since=int(time.time()))

    async def stop_container(self, container: Any, grace: float = 10) -> None:
        with contextlib.suppress(aiodocker.DockerError, aiohttp.ClientError):
            await container.stop(t=max(1, math.ceil(grace)))

    async def _get(self, docker: aiodocker.Docker, name: str) -> Any:
        try:
            return await docker.containers.get(name)
        except aiodocker.DockerError as e:
            if e.status == 404:
                return None
            raise

    async def _require_image(self, docker: aiodocker.Docker, model: Model) -> None:
        image = model.cfg.image or ""
        try:
            await docker.images.inspect(image)
        except aiodocker.DockerError as e:
            if e.status != 404:
                raise
            raise StartError(f"image {image!r} is not on this machine; to get it: "
                             f"{describe(image).fix()}", Reason.IMAGE_MISSING) from e

    async def close(self) -> None:
        if self._docker is not None:
            await self._docker.close()
            self._docker = None
