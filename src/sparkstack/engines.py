"""Engine templates: turn a catalog entry into a concrete command line for one run.

`custom` runs the entry's `command` as written; the others build the engine's usual
command line from `weights`, `max_model_len`, `served_name` and `args`. Each run gets
an internal API key where the engine supports one, so an engine port is useless
without the gateway.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass

from .config import Model, substitute_port
from .runtime.base import LaunchSpec


@dataclass(frozen=True)
class Upstream:
    """Where the gateway sends a model's requests during one engine run."""

    base_url: str
    headers: dict[str, str]


def launch_spec(model: Model, port: int) -> tuple[LaunchSpec, Upstream]:
    cfg = model.cfg
    key: str | None = None
    if cfg.command is None:
        raise ValueError(f"model {model.id!r} has no command")
    argv = [substitute_port(a, port) for a in cfg.command]
    env = {k: substitute_port(v, port) for k, v in cfg.env.items()}
    base = substitute_port(cfg.upstream, port) if cfg.upstream else f"http://127.0.0.1:{port}"
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    # Relative paths in a command resolve against the config file's folder.
    cwd = model.base_dir / cfg.cwd if cfg.cwd else model.base_dir
    return LaunchSpec(model, argv, env, port, cwd), Upstream(base.rstrip("/"), headers)


def new_engine_key() -> str:
    return secrets.token_urlsafe(24)
