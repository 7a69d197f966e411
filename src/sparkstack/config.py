"""The YAML catalog: loading, `${VAR}` expansion, validation and the resolved model view.

One file is the single source of truth for every model. Validation collects every
problem at once and names the file, the model and the field, so `sparkstack check`
can print them all.
"""

from __future__ import annotations

import itertools
import os
import re
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    ValidationError,
    field_validator,
    model_validator,
)

from .telemetry.memory import machine_total_gb


def default_data_dir() -> Path:
    """$SPARKSTACK_DATA_DIR, else $XDG_DATA_HOME/sparkstack (~/.local/share/sparkstack)."""
    if os.environ.get("SPARKSTACK_DATA_DIR"):
        return Path(os.environ["SPARKSTACK_DATA_DIR"]).expanduser()
    xdg = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(xdg) / "sparkstack"

DEFAULT_LISTEN = "127.0.0.1:8009"
RESERVED_VARS = ("PORT", "ENGINE_KEY")  # filled in for each engine run
_VAR = re.compile(r"\$\$|\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")
_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d)")
_UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400}
MODEL_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]*$")


class _Loader(yaml.SafeLoader):
    """YAML 1.2 booleans: only true/false. YAML 1.1 would turn a model named `off`, `on`,
    `yes` or `no` into a boolean."""


_Loader.yaml_implicit_resolvers = {
    first: [(tag, rx) for tag, rx in resolvers if tag != "tag:yaml.org,2002:bool"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF"))


class ConfigError(Exception):
    """A config that cannot be used; `problems` lists every problem found."""

    def __init__(self, problems: list[str]):
        super().__init__("\n".join(problems))
        self.problems = problems


def parse_duration(value: Any) -> float:
    """`90s`, `5m`, `1h30m`, `250ms` or plain seconds → seconds."""
    if isinstance(value, bool):
        raise ValueError("expected a duration such as 90s, 5m, 1h or seconds")
    if isinstance(value, int | float):
        if value < 0:
            raise ValueError("a duration cannot be negative")
        return float(value)
    if isinstance(value, str):
        text = value.strip().lower()
        try:
            return parse_duration(float(text))
        except ValueError:
            pass
        parts = _DURATION_PART.findall(text)
        if parts and "".join(n + u for n, u in parts) == text:
            return sum(float(n) * _UNITS[u] for n, u in parts)
    raise ValueError(f"{value!r} is not a duration (use 90s, 5m, 1h or seconds)")


Duration = Annotated[float, BeforeValidator(parse_duration)]


def _keys(value: Any) -> Any:
    """Accept one key or a list; drop keys that expanded to nothing (unset variables)."""
    if value is None:
        return []
    if isinstance(value, str | dict):
        value = [value]
    if isinstance(value, list):
        return [k for k in value if not (isinstance(k, str) and not k.strip())]
    return value


class ApiKey(BaseModel):
    """A client's key: inline (`key`), in a file (`key_file`, read at load, so the config
    can be shared without the secret) or in an environment variable (`key_env`). `name`
    stands for the key in logs and telemetry; `models` limits it (`["*"]`: all);
    `max_concurrent` and `rpm` bound its in-flight requests and requests per minute."""

    model_config = ConfigDict(extra="forbid")
    name: str = Field(default="", max_length=64)  # `key<N>` (its place in the list) if unset
    key: str | None = Field(default=None, min_length=8, repr=False)  # never in a repr
    key_file: str | None = None
    key_env: str | None = None
    models: list[str] = Field(default_factory=lambda: ["*"])
    max_concurrent: int | None = Field(default=None, ge=1)
    rpm: int | None = Field(default=None, ge=1)

    @model_validator(mode="after")
    def _one_source(self) -> ApiKey:
        given = [f for f in ("key", "key_file", "key_env") if getattr(self, f) is not None]
        if len(given) != 1:
            raise ValueError("give exactly one of key, key_file or key_env"
                             + (f" (got {' and '.join(given)})" if given else ""))
        return self


# A mapping is a key with options, anything else a plain key: so a bad entry gets the
# errors of one branch, not of both.
KeyEntry = Annotated[
    Annotated[ApiKey, Tag("ApiKey")] | Annotated[str, Tag("str")],
    Discriminator(lambda v: "ApiKey" if isinstance(v, dict | ApiKey) else "str"),
]


# Browsers and editor webviews that may call the gateway (SPEC 9): localhost on any port,
# and VS Code-based editors' webviews (Cline, Continue).
DEFAULT_CORS_ORIGINS = (
    "http://localhost:*", "http://127.0.0.1:*", "http://[::1]:*",
    "https://localhost:*", "https://127.0.0.1:*", "https://[::1]:*",
    "vscode-webview://*", "vscode-file://*",
)
# Fields shaping may never strip: without them there is no request.
_UNSTRIPPABLE = frozenset({"model", "messages", "prompt", "input"})


class ReasoningShaping(BaseModel):
    """How a model's thinking is switched (request shaping, docs/configuration.md)."""

    model_config = ConfigDict(extra="forbid")
    # chat_template_kwargs keys that turn thinking on or off (Qwen3: enable_thinking).
    kwargs: list[str] = Field(default_factory=lambda: ["enable_thinking"])
    # Thinking when the request does not say; None leaves the template's own default.
    default: bool | None = None
    # switch: `reasoning_effort` only turns thinking on (any effort) or off (`none`) and
    # is removed; pass: the engine understands `reasoning_effort` itself (gpt-oss).
    effort: Literal["switch", "pass"] = "switch"


class Shaping(BaseModel):
    """Per-model request shaping: what clients send, made into what the engine accepts."""

    model_config = ConfigDict(extra="forbid")
    context_fit: bool = True
    context_length: int | None = Field(default=None, gt=0)
    exact_count: bool = True
    tools: Literal["none", "auto", "required"] | None = None
    merge_system: bool = False
    merge_consecutive: bool = False
    flatten_content: bool | None = None
    reasoning: ReasoningShaping | None = None
    defaults: dict[str, Any] = Field(default_factory=dict)
    strip: list[str] = Field(default_factory=list)

    @field_validator("strip")
    @classmethod
    def _strippable(cls, v: list[str]) -> list[str]:
        bad = sorted(_UNSTRIPPABLE.intersection(v))
        if bad:
            raise ValueError(f"cannot strip {', '.join(bad)}: a request needs it")
        return v


TAGS = ("chat", "coder", "vision", "ocr", "reasoning", "embeddings", "utility")


class Requires(BaseModel):
    """What a model needs on the host beyond its own image; `sparkstack check` verifies it."""

    model_config = ConfigDict(extra="forbid")
    image: list[str] = Field(default_factory=list)  # further images that must be present
    files: list[str] = Field(default_factory=list)  # host paths (globs allowed)
    min_driver: str | None = None  # lowest NVIDIA driver version, e.g. "580.65"

    @field_validator("image", "files", mode="before")
    @classmethod
    def _one_or_many(cls, v: Any) -> Any:
        return [v] if isinstance(v, str) else v

    @field_validator("min_driver", mode="before")
    @classmethod
    def _driver(cls, v: Any) -> Any:
        if isinstance(v, int | float) and not isinstance(v, bool):
            v = str(v)
        if isinstance(v, str) and not re.fullmatch(r"\d+(\.\d+)*", v.strip()):
            raise ValueError(f"min_driver {v!r} is not a driver version such as 580.65")
        return v.strip() if isinstance(v, str) else v


class Peer(BaseModel):
    """Another sparkstack (the second Spark): its models are served through this one."""

    model_config = ConfigDict(extra="forbid")
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    url: str = Field(pattern=r"^https?://")  # its gateway, e.g. http://10.0.0.2:8009
    key: str | None = Field(default=None, repr=False)  # an API key of the peer
    key_env: str | None = None  # ...or the environment variable holding it

    def api_key(self, env: Mapping[str, str] | None = None) -> str | None:
        if self.key:
            return self.key
        return (os.environ if env is None else env).get(self.key_env or "") or None


class Link(BaseModel):
    """The link between two Sparks, for models that span both (`nodes: 2`)."""

    model_config = ConfigDict(extra="forbid")
    # This node's address on the link (VLLM_HOST_IP; the head's is the master address).
    # Default: the address this node uses to reach the peer.
    address: str | None = None
    # Its network interface (e.g. the ConnectX-7 port): NCCL_SOCKET_IFNAME,
    # GLOO_SOCKET_IFNAME and TP_SOCKET_IFNAME. Default: NCCL and Gloo choose.
    interface: str | None = None
    master_port: int = Field(default=29501, ge=1024, le=65535)  # the head's rendezvous port
    env: dict[str, str] = Field(default_factory=dict)  # more, for both halves (NCCL_IB_HCA...)


class ModelConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    runtime: Literal["process", "docker"] = "process"
    engine: Literal["vllm", "sglang", "llamacpp", "custom"] = "custom"
    command: list[str] | None = None
    weights: str | None = None
    args: list[str] = Field(default_factory=list)
    gpu_memory_utilization: float | None = Field(default=None, gt=0, le=1)
    upstream: str | None = None
    health: str = "/health"
    memory_gb: float | None = Field(default=None, ge=0)
    ttl: Duration | None = None
    min_residency: Duration | Literal["auto"] | None = None  # global min_residency unless set
    prewarm: bool | None = None  # global prewarm unless set
    # How long a start takes (an estimate); a measured start time replaces it.
    load_seconds: Duration | None = Field(default=None, gt=0)
    health_timeout: Duration = 900.0
    stop_timeout: Duration = 10.0
    stream_idle_timeout: Duration | None = None  # global stream_idle_timeout unless set
    aliases: list[str] = Field(default_factory=list)
    pinned: bool = False
    exclusive: bool = False
    served_name: str | None = None
    status: Literal["stable", "experimental", "disabled"] = "stable"
    notes: str = ""
    busy_policy: Literal["queue", "reject"] | None = None
    max_model_len: int | None = Field(default=None, gt=0)
    capabilities: list[str] = Field(default_factory=lambda: ["chat", "completions"])
    env: dict[str, str] = Field(default_factory=dict)
    cwd: str | None = None
    # runtime: docker
    image: str | None = None
    # Replaces the image's entrypoint; [] runs the command without it (an image whose
    # entrypoint would not pass the command on). Unset: the image's own.
    entrypoint: list[str] | None = None
    volumes: list[str] = Field(default_factory=list)
    gpus: str = "all"  # none | all | device ids ("0,1")
    shm_size: str = "16g"
    # vLLM pins memory and needs a deep stack; -1 is unlimited.
    ulimits: dict[str, int] = Field(
        default_factory=lambda: {"memlock": -1, "stack": 67108864})
    ipc: str | None = None
    serve_style: Literal["vllm", "model-flag"] = "vllm"
    drop_page_cache: bool = False
    node: str | None = None  # the node that runs it (node_name or a peer); unset: this one
    # 2: one vLLM over two nodes (tensor parallel): the head on `node`, a headless worker
    # on `worker_node` (default: the other node); docs/two-sparks.md
    nodes: int = Field(default=1, ge=1, le=2)
    worker_node: str | None = None
    shaping: Shaping = Field(default_factory=Shaping)
    context_fallback: str | None = None  # a model with a longer context serves long prompts
    # Running models that may answer for this one rather than have it stop one of them to
    # start (a task model beside an exclusive chat model): ids, or "any".
    stand_ins: list[str] | Literal["any"] = Field(default_factory=list)
    early_headers: bool | None = None  # global early_headers unless set
    requires: Requires = Field(default_factory=Requires)
    tags: list[str] = Field(default_factory=list)

    @field_validator("tags")
    @classmethod
    def _tags(cls, v: list[str]) -> list[str]:
        unknown = [t for t in v if t not in TAGS]
        if unknown:
            raise ValueError(f"unknown tag(s) {', '.join(map(repr, unknown))} "
                             f"(tags are: {', '.join(TAGS)})")
        return v

    @field_validator("shm_size")
    @classmethod
    def _size(cls, v: str) -> str:
        parse_size(v)
        return v

    @field_validator("volumes", mode="before")
    @classmethod
    def _volumes(cls, v: Any) -> Any:
        if isinstance(v, list):
            for item in v:
                if isinstance(item, str) and item.count(":") not in (1, 2):
                    raise ValueError(f"volume {item!r} must be HOST:CONTAINER[:ro|rw]")
        return ModelConfig._flatten(v)

    @field_validator("command", "args", mode="before")
    @classmethod
    def _flatten(cls, v: Any) -> Any:
        """Nested lists are spliced, so a YAML anchor can hold a shared list of flags."""
        if not isinstance(v, list):
            return v
        flat: list[Any] = []
        for item in v:
            flat.extend(cls._flatten(item) if isinstance(item, list) else [item])
        return [str(x) if isinstance(x, int | float) and not isinstance(x, bool) else x
                for x in flat]

    @field_validator("command")
    @classmethod
    def _command_not_empty(cls, v: list[str] | None) -> list[str] | None:
        if v is not None and not v:
            raise ValueError("command must name a program")
        return v

    @field_validator("health")
    @classmethod
    def _health_path(cls, v: str) -> str:
        if not v.startswith("/"):
            raise ValueError("health must be a path starting with '/'")
        return v

    @field_validator("env", mode="before")
    @classmethod
    def _env_strings(cls, v: Any) -> Any:
        if isinstance(v, dict):
            return {k: "" if x is None else str(x) for k, x in v.items()}
        return v



class Settings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    listen: str = DEFAULT_LISTEN
    # Secrets: kept out of reprs (a logged or printed Settings shows no key).
    api_keys: Annotated[list[KeyEntry], BeforeValidator(_keys)] = Field(
        default_factory=list, repr=False)
    admin_keys: Annotated[list[str], BeforeValidator(_keys)] = Field(
        default_factory=list, repr=False)
    memory_gb: float | Literal["auto"] = "auto"
    memory_total_gb: float | Literal["auto"] = "auto"
    memory_reserve_gb: float = Field(default=4.0, ge=0)
    idle_ttl: Duration = 1200.0
    # auto: as long as the model's own load took, at most 2 min (chosen by the policy
    # simulator, docs/scheduling.md); or a duration for every model
    min_residency: Duration | Literal["auto"] = "auto"
    # A model in use (a request in flight, or one ended less than burst_gap ago: an agent
    # running its tools) is not evicted mid-burst; it holds a waiting start back for at
    # most burst_max. 0 s turns it off. Chosen by the policy simulator (docs/scheduling.md).
    burst_gap: Duration = 15.0
    burst_max: Duration = 900.0
    prewarm: bool = False
    queue_timeout: Duration = 600.0
    max_queue: int = Field(default=1000, ge=1)
    busy_policy: Literal["queue", "reject"] = "queue"
    start_backoff: Duration = 2.0
    shutdown_timeout: Duration = 30.0
    keepalive_interval: Duration = 5.0
    # An engine that sends nothing for this long (no header, no chunk) is abandoned: the
    # client gets `engine_stalled`. Long on purpose: a reasoning model's prefill of a big
    # prompt sends nothing for minutes, and a non-streamed answer's first byte is its
    # last. 0 = never.
    stream_idle_timeout: Duration = 300.0
    max_body_mb: float = Field(default=100.0, gt=0)
    # A client silent this long while sending its headers or body is cut off (408), and
    # an idle keep-alive connection closed: slow clients cannot hold connections.
    client_body_timeout: Duration = Field(default=60.0, gt=0)
    cors_origins: list[str] = Field(default_factory=lambda: list(DEFAULT_CORS_ORIGINS))
    early_headers: bool = False
    data_dir: str | None = None
    # Monitoring (docs/monitoring.md): /metrics without a key; how much activity to keep.
    metrics_public: bool = False
    activity_max_rows: int = Field(default=100_000, ge=100)
    activity_max_days: float = Field(default=30.0, gt=0)
    # Two Sparks (docs/two-sparks.md): this node's name, and the other nodes whose models
    # this gateway serves too. A model with `node: <peer>` runs there, not here.
    node_name: str = "local"
    peers: list[Peer] = Field(default_factory=list)
    peer_poll_interval: Duration = Field(default=5.0, gt=0)
    link: Link = Field(default_factory=Link)
    models: dict[str, ModelConfig] = Field(default_factory=dict)

    @field_validator("models", mode="before")
    @classmethod
    def _model_ids(cls, v: Any) -> Any:
        return {str(k): m for k, m in v.items()} if isinstance(v, dict) else v

    @field_validator("cors_origins")
    @classmethod
    def _origins(cls, v: list[str]) -> list[str]:
        for origin in v:
            if origin != "*" and "://" not in origin:
                raise ValueError(f"{origin!r} is not an origin (scheme://host[:port], a port "
                                 "of '*' for any, or '*' for every origin)")
        return v

    @field_validator("listen")
    @classmethod
    def _listen(cls, v: str) -> str:
        parse_listen(v)
        return v

    @field_validator("memory_gb", mode="before")
    @classmethod
    def _memory(cls, v: Any) -> Any:
        if isinstance(v, int | float) and not isinstance(v, bool) and v <= 0:
            raise ValueError("memory_gb must be positive or 'auto'")
        return v


CATALOG_DIR = Path(__file__).with_name("catalogs")
DEFAULT_CATALOG = "demo-cpu"


def builtin_catalogs() -> list[str]:
    return sorted(p.stem for p in CATALOG_DIR.glob("*.yaml"))


def builtin_catalog(name: str) -> Path:
    path = CATALOG_DIR / f"{name}.yaml"
    if not path.exists():
        raise ConfigError([f"no built-in catalog {name!r} (there are: "
                           f"{', '.join(builtin_catalogs())})"])
    return path


def parse_size(value: str | int) -> int:
    """`16g`, `512m`, `1024k` or bytes → bytes (Docker's size syntax)."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmgt]?)b?\s*", str(value).lower())
    if not m:
        raise ValueError(f"{value!r} is not a size (use 16g, 512m or bytes)")
    return int(float(m.group(1)) * 1024 ** " kmgt".index(m.group(2) or " "))


def parse_listen(value: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"listen must be HOST:PORT, got {value!r}")
    return host.strip("[]"), int(port)


# ---------------------------------------------------------------- expansion


def expand_vars(value: Any, env: Mapping[str, str], unset: set[str]) -> Any:
    """Expand `${VAR}` / `${VAR:-default}` in every string; `${PORT}` and `${ENGINE_KEY}`
    stay for each engine run.

    `$$` is a literal `$`. Unset variables without a default become "" and are recorded
    in `unset` so `check` can warn (the docker-compose convention).
    """
    if isinstance(value, str):

        def sub(m: re.Match[str]) -> str:
            if m.group(0) == "$$":
                return "$"
            name, default = m.group(1), m.group(2)
            if name in RESERVED_VARS:
                return m.group(0)
            if name in env and (env[name] or default is None):
                return env[name]
            if default is not None:
                return default
            unset.add(name)
            return ""

        return _VAR.sub(sub, value)
    if isinstance(value, list):
        return [expand_vars(v, env, unset) for v in value]
    if isinstance(value, dict):
        return {k: expand_vars(v, env, unset) for k, v in value.items()}
    return value


def substitute_port(text: str, port: int) -> str:
    return text.replace("${PORT}", str(port))


# ---------------------------------------------------------------- resolved view


@dataclass(frozen=True)
class Span:
    """Where the two halves of a model spanning two nodes run, seen from this node."""

    role: Literal["head", "worker"]  # the half this node runs
    head: str  # node names
    worker: str

    @property
    def partner(self) -> str:
        """The node running the other half."""
        return self.worker if self.role == "head" else self.head


@dataclass(frozen=True)
class Model:
    """One catalog entry with every default applied: what the rest of the stack reads."""

    id: str
    cfg: ModelConfig
    ttl: float
    busy_policy: str
    base_dir: Path
    memory_gb: float  # declared, or gpu_memory_utilization x the machine's total memory
    min_residency: float | None = None  # not evicted for another model sooner after a
    # load; None: auto (the scheduler's share of its load time)
    prewarm: bool = False  # may be started ahead of demand, into free memory only
    burst_gap: float = 0.0  # in use while a request ended less than this long ago (0: off)
    burst_max: float = 0.0  # ... holding a waiting start back for at most this long
    stream_idle_timeout: float = 300.0  # abandon an engine silent this long (0 = never)
    span: Span | None = None  # set for `nodes: 2`: which half runs here

    @property
    def served_name(self) -> str:
        return self.cfg.served_name or self.id


    @property
    def enabled(self) -> bool:
        return self.cfg.status != "disabled"


@dataclass
class Config:
    settings: Settings
    models: dict[str, Model]
    path: Path | None
    warnings: list[str] = field(default_factory=list)
    aliases: dict[str, str] = field(default_factory=dict)
    placed: dict[str, str] = field(default_factory=dict)  # model id → the peer it runs on
    # Models spanning two nodes whose head runs on a peer and whose worker half runs here:
    # never served here (requests go to the head), started by the head's reservation.
    workers: dict[str, Model] = field(default_factory=dict)

    @property
    def engines(self) -> dict[str, Model]:
        """Every model whose engine (or half of it) may run on this node."""
        return {**self.models, **self.workers}

    def resolve(self, name: str) -> Model | None:
        """A catalog id, an alias or a served name → the model, or None."""
        model_id = name if name in self.models else self.aliases.get(name)
        return self.models.get(model_id) if model_id else None

    @property
    def source(self) -> str:
        if self.path and self.path.parent == CATALOG_DIR:
            return f"the built-in catalog {self.path.stem!r}"
        return str(self.path) if self.path else "<built-in>"


def key_entry(index: int, name: str = "") -> str:
    """How a problem names an `api_keys` entry: its place and its name, never its key."""
    return f"field 'api_keys', entry {index + 1}" + (f" ({name!r})" if name else "")


def _format_error(source: str, err: dict[str, Any], raw: Mapping[str, Any]) -> str:
    loc = [str(p) for p in err["loc"]]
    # Pydantic names union branches and validators in the location; users need the field.
    loc = [p for p in loc if not p.startswith(("function-", "str", "ApiKey", "literal["))]
    msg = err["msg"].removeprefix("Value error, ")
    if err["type"] == "extra_forbidden":
        msg = "unknown key (check the spelling; see docs/configuration.md)"
    if loc[:1] == ["models"] and len(loc) >= 2:
        where = f"model {loc[1]!r}" + (f", field {'.'.join(loc[2:])!r}" if loc[2:] else "")
    elif loc[:1] == ["api_keys"] and len(loc) >= 2 and loc[1].isdigit():
        entries = _keys(raw.get("api_keys"))
        entry = entries[int(loc[1])] if isinstance(entries, list) else None
        name = entry.get("name") if isinstance(entry, dict) else None
        where = key_entry(int(loc[1]), name if isinstance(name, str) else "") + (
            f", field {'.'.join(loc[2:])!r}" if loc[2:] else "")
    else:
        where = f"field {'.'.join(loc)!r}" if loc else "top level"
    return f"{source}: {where}: {msg}"


def _cross_field_problems(source: str, models: Any) -> list[str]:
    problems = []
    for model_id, entry in (models or {}).items() if isinstance(models, dict) else ():
        if not isinstance(entry, dict):
            continue
        where = f"{source}: model {str(model_id)!r}"
        process = entry.get("runtime", "process") == "process"
        engine = entry.get("engine", "custom")
        if entry.get("runtime") == "docker" and not entry.get("image"):
            problems.append(f"{where}: runtime 'docker' needs an 'image'")
        if process and engine == "custom" and entry.get("command") is None:
            problems.append(f"{where}: engine 'custom' needs a 'command' "
                            "(a list: program and arguments)")
        if engine != "custom" and entry.get("command") is None and not entry.get("weights"):
            problems.append(f"{where}: engine {engine!r} needs 'weights' (a model path or id)")
        if entry.get("pinned") is True and entry.get("exclusive") is True:
            problems.append(f"{where}: a model cannot be both 'pinned' and 'exclusive'")
    return problems


def _fallback_problems(source: str, models: dict[str, Model], aliases: dict[str, str]
                       ) -> list[str]:
    """A `context_fallback` names another model whose context is longer than this one's."""
    problems = []
    for m in models.values():
        name = m.cfg.context_fallback
        if name is None:
            continue
        where = f"{source}: model {m.id!r}, field 'context_fallback'"
        target = models.get(name) or models.get(aliases.get(name, ""))
        if target is None:
            problems.append(f"{where}: {name!r} is not a model of this catalog")
        elif target.id == m.id:
            problems.append(f"{where}: a model cannot be its own fallback")
        elif not (m.cfg.max_model_len and target.cfg.max_model_len):
            problems.append(f"{where}: both models need 'max_model_len' to compare contexts")
        elif target.cfg.max_model_len <= m.cfg.max_model_len:
            problems.append(
                f"{where}: {target.id!r} has a context of {target.cfg.max_model_len} tokens, "
                f"not longer than this model's {m.cfg.max_model_len}")
    return problems


def _stand_in_problems(source: str, models: dict[str, Model], aliases: dict[str, str]
                       ) -> list[str]:
    """`stand_ins` name other models of the catalog."""
    problems = []
    for m in models.values():
        if m.cfg.stand_ins == "any":
            continue
        where = f"{source}: model {m.id!r}, field 'stand_ins'"
        for name in m.cfg.stand_ins:
            target = models.get(name)
            if target is None:
                known = f" (an alias of {aliases[name]!r}: name the id)" \
                    if name in aliases else ""
                problems.append(f"{where}: {name!r} is not a model id of this catalog{known}")
            elif target.id == m.id:
                problems.append(f"{where}: a model cannot stand in for itself")
    return problems


def _span(source: str, model_id: str, cfg: ModelConfig, settings: Settings
          ) -> tuple[Span | None, list[str]]:
    """Which half of a `nodes: 2` model runs on this node (None: neither, or a single-node
    model), and what is wrong with its entry."""
    if cfg.nodes == 1:
        if cfg.worker_node is not None:
            return None, [f"{source}: model {model_id!r}, field 'worker_node': only for "
                          "models with nodes: 2"]
        return None, []
    where = f"{source}: model {model_id!r}"
    problems = []
    if cfg.engine not in ("vllm", "custom") or (cfg.engine == "custom" and not cfg.command):
        problems.append(f"{where}: nodes: 2 runs vLLM's multi-node launch: engine 'vllm' "
                        "(or 'custom' with a command that takes vLLM's flags)")
    for flag, value in itertools.pairwise([*cfg.args, ""]):
        name, _, inline = flag.partition("=")
        if name in ("--tensor-parallel-size", "--tensor_parallel_size", "-tp") \
                and (inline or value) != "2":
            problems.append(f"{where}: nodes: 2 runs tensor parallel over the two GPUs "
                            f"(--tensor-parallel-size 2); remove {flag} {value} from 'args'")
        if name in ("--distributed-executor-backend", "--nnodes", "--node-rank", "--headless",
                    "--master-addr", "--master-port"):
            problems.append(f"{where}: nodes: 2 sets {name} itself; remove it from 'args'")
    peers = [p.name for p in settings.peers]
    me = settings.node_name
    head = cfg.node or me
    worker = cfg.worker_node
    if worker is None:
        others = [n for n in [me, *peers] if n != head]
        if len(others) > 1:
            problems.append(f"{where}: field 'worker_node' is needed: which of "
                            f"{', '.join(map(repr, others))} runs the second half")
        worker = others[0] if len(others) == 1 else None
    elif worker not in (me, *peers):
        problems.append(f"{where}: field 'worker_node': {worker!r} is neither this node "
                        f"({me!r}) nor a peer")
    if worker is not None and worker == head:
        problems.append(f"{where}: the head and the worker half must run on two nodes "
                        f"(both are {head!r})")
    if problems or worker is None:
        return None, problems
    if me not in (head, worker):
        return None, []
    return Span("head" if me == head else "worker", head, worker), []


def _residency(value: float | str) -> float | None:
    return None if value == "auto" else float(value)


def load_config(
    path: str | Path | None = None,
    *,
    text: str | None = None,
    env: Mapping[str, str] | None = None,
) -> Config:
    """Read and validate a config file (or `text`); raise ConfigError listing every problem."""
    # ${SPARKSTACK_PYTHON} is the interpreter running sparkstack (for Python engines);
    # ${SPARKSTACK_DATA} is the default data directory (catalogs keep caches under it).
    env = {"SPARKSTACK_PYTHON": sys.executable, "SPARKSTACK_DATA": str(default_data_dir()),
           **(os.environ if env is None else env)}
    source = str(path) if path else "<built-in>"
    if text is None:
        if path is None:
            raise ValueError("load_config needs a path or text")
        try:
            text = Path(path).read_text(encoding="utf-8")
        except OSError as e:
            raise ConfigError([f"{source}: cannot read: {e.strerror or e}"]) from e
    try:
        raw = yaml.load(text, Loader=_Loader) or {}
    except yaml.YAMLError as e:
        raise ConfigError([f"{source}: not valid YAML: {e}"]) from e
    if not isinstance(raw, dict):
        raise ConfigError([f"{source}: top level must be a mapping of settings"])
    # Keys starting with x- hold YAML anchors (shared volumes, env) and are not settings.
    raw = {k: v for k, v in raw.items() if not str(k).startswith("x-")}
    unset: set[str] = set()
    raw = expand_vars(raw, env, unset)
    # Rules across fields are checked on the raw entries, so they are reported even when
    # a field of the same model is also wrong.
    problems = _cross_field_problems(source, raw.get("models"))
    try:
        settings = Settings.model_validate(raw)
    except ValidationError as e:
        raise ConfigError([_format_error(source, err, raw) for err in e.errors()]
                          + problems) from e
    if problems:
        raise ConfigError(problems)

    base_dir = Path(path).resolve().parent if path else Path.cwd()
    total_gb = 0.0
    if any(m.memory_gb is None and m.gpu_memory_utilization for m in settings.models.values()):
        total_gb = (settings.memory_total_gb if settings.memory_total_gb != "auto"
                    else machine_total_gb())
    models: dict[str, Model] = {}
    aliases: dict[str, str] = {}
    placed: dict[str, str] = {}
    peer_names = {p.name for p in settings.peers}
    if settings.node_name in peer_names:
        problems.append(f"{source}: field 'peers': {settings.node_name!r} is this node's own "
                        "name (node_name)")
    workers: dict[str, Model] = {}
    for model_id, cfg in settings.models.items():
        span, span_problems = _span(source, model_id, cfg, settings)
        problems += span_problems
        if span is None and cfg.nodes > 1 and not span_problems:
            cfg = cfg.model_copy(update={"status": "disabled", "notes": (
                "needs two nodes: list the other Spark under `peers` (docs/two-sparks.md)"
                + (f". {cfg.notes}" if cfg.notes else ""))})
        head = span.head if span else cfg.node
        if head is not None and head != settings.node_name:
            if head not in peer_names:
                problems.append(f"{source}: model {model_id!r}, field 'node': {head!r} is "
                                f"neither this node ({settings.node_name!r}) nor a peer")
            placed[model_id] = head  # the peer runs it; this gateway relays to it
            if span is None or span.role != "worker":
                continue
        if not MODEL_ID.match(model_id):
            problems.append(
                f"{source}: model {model_id!r}: an id may hold letters, digits and . _ : - only"
            )
        ttl = settings.idle_ttl if cfg.ttl is None else cfg.ttl
        memory = cfg.memory_gb
        if memory is None:
            memory = (cfg.gpu_memory_utilization or 0) * (
                total_gb if cfg.gpu_memory_utilization else 0)
        model = Model(
            id=model_id,
            cfg=cfg,
            ttl=ttl,
            busy_policy=cfg.busy_policy or settings.busy_policy,
            base_dir=base_dir,
            # A derived size is rounded (fraction × total); a declared one is kept as is.
            memory_gb=round(memory, 1) if cfg.memory_gb is None else memory,
            min_residency=_residency(settings.min_residency if cfg.min_residency is None
                                     else cfg.min_residency),
            prewarm=settings.prewarm if cfg.prewarm is None else cfg.prewarm,
            burst_gap=settings.burst_gap,
            burst_max=settings.burst_max,
            stream_idle_timeout=(settings.stream_idle_timeout if cfg.stream_idle_timeout is None
                                 else cfg.stream_idle_timeout),
            span=span,
        )
        (workers if span is not None and span.role == "worker" else models)[model_id] = model
    for model_id, m in models.items():
        names = list(m.cfg.aliases)
        if m.served_name != model_id:
            names.append(m.served_name)
        for alias in names:
            owner = aliases.get(alias)
            if alias in models and alias != model_id:
                problems.append(
                    f"{source}: model {model_id!r}, field 'aliases': {alias!r} "
                    "is another model's id"
                )
            elif owner and owner != model_id:
                problems.append(
                    f"{source}: model {model_id!r}, field 'aliases': {alias!r} "
                    f"is already an alias of {owner!r}"
                )
            elif alias != model_id:
                aliases[alias] = model_id
    problems += _fallback_problems(source, models, aliases)
    problems += _stand_in_problems(source, models, aliases)
    if isinstance(settings.memory_gb, float | int):
        for m in models.values():
            if m.memory_gb > settings.memory_gb:
                problems.append(
                    f"{source}: model {m.id!r}, field 'memory_gb': {m.memory_gb:g} GB does not fit "
                    f"the budget memory_gb={settings.memory_gb:g}"
                )
    key_problems, warnings = _resolve_keys(source, settings, base_dir, env)
    problems += key_problems
    for i, k in enumerate(settings.api_keys):
        if isinstance(k, ApiKey):
            for name in k.models:
                if name != "*" and name not in models and name not in aliases:
                    problems.append(f"{source}: {key_entry(i, k.name)}: names unknown "
                                    f"model {name!r}")
    if problems:
        raise ConfigError(problems)
    warnings += [
        f"{source}: environment variable {name} is not set (expanded to an empty string)"
        for name in sorted(unset)
    ]
    return Config(
        settings=settings, models=models, path=Path(path) if path else None,
        warnings=warnings, aliases=aliases, placed=placed, workers=workers,
    )


def _resolve_keys(source: str, settings: Settings, base_dir: Path, env: Mapping[str, str]
                  ) -> tuple[list[str], list[str]]:
    """Read every `key_file` and `key_env` into `key` and name every entry (`key<N>` by
    its place), in place; (problems, warnings). Messages name entries, never keys."""
    problems: list[str] = []
    warnings: list[str] = []
    names: dict[str, int] = {}
    values: dict[str, int] = {}
    for i, k in enumerate(settings.api_keys):
        where = f"{source}: {key_entry(i, k.name if isinstance(k, ApiKey) else '')}"
        name = (k.name if isinstance(k, ApiKey) else "") or f"key{i + 1}"
        if name in names:
            problems.append(f"{where}: the name {name!r} is taken by entry "
                            f"{names[name] + 1} (names stand for keys in logs)")
        names.setdefault(name, i)
        value: str | None = k if isinstance(k, str) else k.key
        if isinstance(k, ApiKey) and k.key_file is not None:
            file = Path(k.key_file).expanduser()
            file = file if file.is_absolute() else base_dir / file
            try:
                value = file.read_text(encoding="utf-8").strip()
                if file.stat().st_mode & 0o077:
                    warnings.append(f"{where}: key_file {str(file)!r} is readable by other "
                                    f"users (chmod 600 {file})")
            except (OSError, UnicodeDecodeError) as e:
                problems.append(f"{where}: cannot read key_file {str(file)!r}: "
                                f"{getattr(e, 'strerror', None) or e}")
                continue
            if not value:
                problems.append(f"{where}: key_file {str(file)!r} is empty")
                continue
        elif isinstance(k, ApiKey) and k.key_env is not None:
            value = env.get(k.key_env, "").strip()
            if not value:
                problems.append(f"{where}: environment variable {k.key_env} (key_env) is "
                                "not set")
                continue
        assert value is not None
        if len(value) < 8:
            problems.append(f"{where}: a key must have at least 8 characters")
        elif value in values:
            problems.append(f"{where}: the same key as entry {values[value] + 1}")
        values.setdefault(value, i)
        if isinstance(k, ApiKey):
            settings.api_keys[i] = k.model_copy(update={"key": value, "name": name})
    for i, a in enumerate(settings.admin_keys):
        if len(a) < 8:
            problems.append(f"{source}: field 'admin_keys', entry {i + 1}: a key must have "
                            "at least 8 characters")
    return problems, warnings
