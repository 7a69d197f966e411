"""The CLI against a running stack: status, load, unload, logs, activity, chat, top.

The stack is found the way `serve` would run it: the URL from `--url`, $SPARKSTACK_URL
or the config's `listen`; the key from `--key`, $SPARKSTACK_API_KEY (or $VLLM_API_KEY),
the config (an admin key first: load and unload may need one) or the key file `serve`
generated in the data directory. Everything goes through the HTTP API; the progress of a
load comes from `/api/events`.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
from collections.abc import AsyncIterator, Callable, Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import aiohttp
import typer
from rich.console import Console
from rich.table import Table

from .config import DEFAULT_LISTEN, ApiKey, Config, ConfigError, builtin_catalog, load_config
from .keys import ENV_KEYS
from .telemetry.progress import describe, format_duration

out = Console(soft_wrap=True, highlight=False)
err = Console(stderr=True, soft_wrap=True, highlight=False)

UrlOpt = Annotated[str | None, typer.Option(
    "--url", envvar="SPARKSTACK_URL", help="the stack (default: the config's listen)")]
KeyOpt = Annotated[str | None, typer.Option(
    "--key", help="an API key (default: $SPARKSTACK_API_KEY, the config, the key file)")]
ConfigOpt = Annotated[Path | None, typer.Option("--config", "-c", help="catalog YAML file")]
CatalogOpt = Annotated[str | None, typer.Option("--catalog", help="a built-in catalog")]


class StackError(Exception):
    pass


@dataclass
class Stack:
    url: str
    key: str | None

    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.key}"} if self.key else {}

    def session(self) -> aiohttp.ClientSession:
        # No total timeout: a load may take many minutes, a followed log forever.
        return aiohttp.ClientSession(self.url, headers=self.headers(),
                                     timeout=aiohttp.ClientTimeout(total=None, sock_connect=10))


def find_stack(url: str | None, key: str | None, config: Path | None,
               catalog: str | None) -> Stack:
    cfg: Config | None = None
    if config is not None or catalog is not None:
        try:
            cfg = load_config(config or builtin_catalog(catalog or ""))
        except (ConfigError, OSError, ValueError) as e:
            raise StackError(f"cannot read the config: {e}") from e
    if url is None:
        listen = cfg.settings.listen if cfg else DEFAULT_LISTEN
        host, _, port = listen.rpartition(":")
        host = host.strip("[]")
        if host in ("", "0.0.0.0", "::"):
            host = "127.0.0.1"
        url = f"http://{'[' + host + ']' if ':' in host else host}:{port}"
    return Stack(url.rstrip("/"), key or _find_key(cfg))


def _find_key(cfg: Config | None) -> str | None:
    for name in ENV_KEYS:
        if os.environ.get(name, "").strip():
            return os.environ[name].strip()
    if cfg is not None:
        s = cfg.settings
        if s.admin_keys:
            return s.admin_keys[0]
        for k in s.api_keys:
            found = k.key if isinstance(k, ApiKey) else k
            if found:
                return str(found)
    from .paths import data_dir

    path = data_dir(cfg) / "api_key"  # written by `serve` on its first run; never made here
    try:
        return path.read_text().strip() or None
    except OSError:
        return None


async def _json(resp: aiohttp.ClientResponse) -> Any:
    if resp.status >= 400:
        raise StackError(await error_message(resp))
    return await resp.json(content_type=None)


async def error_message(resp: aiohttp.ClientResponse) -> str:
    text = await resp.text()
    try:
        return str(json.loads(text)["error"]["message"])
    except (ValueError, KeyError, TypeError):
        return f"{resp.status} {resp.reason}: {text[:500]}"


async def events(http: aiohttp.ClientSession, model: str | None = None
                 ) -> AsyncIterator[tuple[str, dict[str, Any]]]:
    """The stack's event stream, as (kind, data)."""
    async with http.get("/api/events", params={"model": model} if model else None) as resp:
        if resp.status >= 400:
            raise StackError(await error_message(resp))
        kind = "message"
        async for raw in resp.content:
            line = raw.decode("utf-8", errors="replace").rstrip("\r\n")
            if line.startswith("event: "):
                kind = line[7:]
            elif line.startswith("data: "):
                yield kind, json.loads(line[6:])
                kind = "message"


# ------------------------------------------------------------------ status and top


def _ago(t: float | None) -> str:
    return format_duration(time.time() - t) if t else "—"


def _gb(x: float) -> str:
    return f"{x:.2f}" if x < 1 else f"{x:.1f}"


def status_table(body: dict[str, Any], all_models: bool = False) -> Table:
    now = time.time()
    models = [m for m in body["models"] if all_models or m["state"] != "stopped"]
    measured = sum(m.get("memory_measured_gb") or 0 for m in body["models"])
    title = (f"memory {body['memory_used_gb']:g}/{body['memory_budget_gb']:g} GB declared, "
             f"{measured:.1f} GB measured · {body['queued']} queued")
    table = Table(title=title, title_justify="left", box=None, pad_edge=False)
    for col, justify in (("MODEL", "left"), ("STATE", "left"), ("MEMORY", "right"),
                         ("IN FLIGHT", "right"), ("QUEUED", "right"), ("IDLE FOR", "right"),
                         ("TTL LEFT", "right")):
        table.add_column(col, justify=justify)  # type: ignore[arg-type]
    for m in models:
        state = m["state"]
        if state == "starting":
            progress = describe(m.get("load_phase"), m.get("load_percent"))
            since = m.get("load_started")
            state += f" {progress}" + (f" {format_duration(now - since)}" if since else "")
        elif state == "stopped" and m.get("last_error"):
            state = "failed: " + m["last_error"].splitlines()[0][:60]
        elif state == "stopped" and m.get("weights_state") in ("partial", "missing"):
            state = f"stopped, weights {m['weights_state']} (sparkstack pull)"
        measured_gb = m.get("memory_measured_gb")
        memory = (f"{_gb(measured_gb)}/{m['memory_gb']:g} GB" if measured_gb is not None
                  else f"-/{m['memory_gb']:g} GB")
        idle = _ago(m["last_used"]) if state == "ready" and not m["in_flight"] else "—"
        if m.get("pinned"):
            ttl = "pinned"
        elif not m.get("ttl_s"):
            ttl = "never"
        elif m.get("idle_stop_at"):
            ttl = format_duration(max(0.0, m["idle_stop_at"] - now))
        else:
            ttl = "—"
        name = m["id"]
        if m.get("span_role") == "worker":  # its head on the other node holds it
            name += f" (worker for {m.get('span_partner')})"
        elif m.get("span_role") == "head":
            name += f" (+ {m.get('span_partner')})"
        table.add_row(name, state, memory, str(m["in_flight"]), str(m["queued"]), idle, ttl)
    if not models:
        table.add_row("(nothing running)", "", "", "", "", "", "")
    return table


async def _status(stack: Stack, all_models: bool) -> None:
    async with stack.session() as http, http.get("/api/models") as resp:
        body = await _json(resp)
    out.print(status_table(body, all_models))


async def _top(stack: Stack, interval: float) -> None:
    from rich.live import Live

    async with stack.session() as http:
        with Live(console=out, auto_refresh=False, screen=out.is_terminal) as live:
            while True:
                async with http.get("/api/models") as resp:
                    body = await _json(resp)
                live.update(status_table(body, all_models=True), refresh=True)
                await asyncio.sleep(interval)


# ------------------------------------------------------------------ load and unload


async def _load(stack: Stack, model: str) -> None:
    async with stack.session() as http:
        async with http.get("/api/models") as resp:
            known = {m["id"]: m for m in (await _json(resp))["models"]}
        if model not in known:
            raise StackError(f"no model {model!r} (models: {', '.join(known)})")
        if known[model]["state"] == "ready":
            out.print(f"{model} is already ready")
            return
        began = time.monotonic()
        show = _progress_display(model, began)
        listening = asyncio.Event()
        watcher = asyncio.create_task(_watch_load(http, model, show, listening))
        # Listen first, so no progress of this load is missed.
        heard = asyncio.create_task(listening.wait())
        await asyncio.wait({heard, watcher}, timeout=10, return_when=asyncio.FIRST_COMPLETED)
        heard.cancel()
        try:
            async with http.post(f"/api/models/{model}/load") as resp:
                failed = await error_message(resp) if resp.status >= 400 else None
                view = None if failed else await resp.json()
        finally:
            watcher.cancel()
            await asyncio.gather(watcher, return_exceptions=True)
            show(None)
        if failed is None and view is not None:
            took = view.get("load_seconds")
            took = took if took is not None else time.monotonic() - began
            out.print(f"loaded {model} in {took:.1f} s")
            return
        err.print(f"[red]loading {model} failed:[/] {failed}")
        if failed and "Last log lines" not in failed:
            async with http.get(f"/api/models/{model}/logs", params={"lines": "20"}) as resp:
                if resp.status == 200:
                    err.print("last log lines:\n" + await resp.text(), markup=False)
        raise typer.Exit(1)


def _progress_display(model: str, began: float) -> Callable[[dict[str, Any] | None], None]:
    """A live bar on a terminal; elsewhere (a pipe, a log) one line per change."""
    if out.is_terminal:
        from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn

        bar = Progress(TextColumn("[bold]{task.fields[model]}[/] {task.description}"),
                       BarColumn(), TaskProgressColumn(), TextColumn("{task.fields[elapsed]}"),
                       console=out, transient=True)
        task = bar.add_task("starting", total=None, model=model, elapsed="0s")
        bar.start()

        def update(p: dict[str, Any] | None) -> None:
            if p is None:
                bar.stop()
                return
            pct = p.get("percent")
            bar.update(task, description=p.get("phase") or "starting",
                       total=100 if pct is not None else None, completed=pct or 0,
                       elapsed=format_duration(time.monotonic() - began))
        return update

    last: list[str] = []

    def line(p: dict[str, Any] | None) -> None:
        if p is None:
            return
        text = describe(p.get("phase"), p.get("percent")) or "(starting)"
        if last and last[-1] == text:
            return
        last.append(text)
        print(f"{model}: {text} {format_duration(time.monotonic() - began)}", flush=True)
    return line


async def _watch_load(http: aiohttp.ClientSession, model: str,
                      show: Callable[[dict[str, Any] | None], None],
                      listening: asyncio.Event) -> None:
    last: dict[str, Any] = {"phase": "starting", "percent": None}

    async def tick() -> None:  # keep a terminal's elapsed time moving between events
        while True:
            await asyncio.sleep(1)
            show(last)

    ticker = asyncio.create_task(tick()) if out.is_terminal else None
    try:
        async for kind, data in events(http, model):
            listening.set()
            views = ([data["model"]] if kind == "model" else
                     data["models"] if kind == "snapshot" else [])
            for view in views:
                if view["id"] == model and view["state"] == "starting":
                    last = {"phase": view.get("load_phase") or "starting",
                            "percent": view.get("load_percent")}
                    show(last)
            if kind == "progress":
                last = data
                show(data)
    finally:
        if ticker is not None:
            ticker.cancel()


async def _unload(stack: Stack, model: str, force: bool) -> None:
    async with stack.session() as http:
        params = {"force": "true"} if force else None
        async with http.post(f"/api/models/{model}/unload", params=params) as resp:
            view = await _json(resp)
    out.print(f"{model} is {view['state']}" + (" (in-flight requests were cut)" if force else ""))


# ------------------------------------------------------------------ logs and activity


async def _logs(stack: Stack, model: str, follow: bool, lines: int) -> None:
    params = {"lines": str(lines)}
    if follow:
        params["follow"] = "true"
    async with stack.session() as http, http.get(f"/api/models/{model}/logs",
                                                 params=params) as resp:
        if resp.status >= 400:
            raise StackError(await error_message(resp))
        async for chunk in resp.content.iter_any():
            sys.stdout.write(chunk.decode("utf-8", errors="replace"))
            sys.stdout.flush()


def _secs(x: float | None) -> str:
    if x is None:
        return "—"
    return f"{x * 1000:.0f} ms" if x < 1 else f"{x:.2f} s"


async def _activity(stack: Stack, n: int, model: str | None) -> None:
    params = {"limit": str(n), **({"model": model} if model else {})}
    async with stack.session() as http, http.get("/api/activity", params=params) as resp:
        rows = (await _json(resp))["data"]
    table = Table(box=None, pad_edge=False)
    for col in ("TIME", "MODEL", "ENDPOINT", "STATUS", "KEY", "TOKENS", "TTFT", "TOK/S",
                "TOOK"):
        table.add_column(col, no_wrap=True)
    table.add_column("ERROR", overflow="ellipsis", no_wrap=True, max_width=60)
    for r in reversed(rows):  # oldest first, like a log
        table.add_row(
            time.strftime("%H:%M:%S", time.localtime(r["ts"])), r["model"],
            r["endpoint"].removeprefix("/v1/") + (" (stream)" if r["stream"] else ""),
            str(r["status"]), r["key"] or "—",
            f"{r['prompt_tokens'] if r['prompt_tokens'] is not None else '—'}→"
            f"{r['completion_tokens'] if r['completion_tokens'] is not None else '—'}",
            _secs(r["ttft_s"]), "—" if r["tokens_per_s"] is None else f"{r['tokens_per_s']:.1f}",
            _secs(r["duration_s"]), (r["error"] or "").splitlines()[0][:80] if r["error"] else "")
    out.print(table)


# ------------------------------------------------------------------ chat


async def _chat(stack: Stack, model: str, prompt: str | None) -> None:
    messages: list[dict[str, str]] = []
    async with stack.session() as http:
        if prompt is not None:
            await _turn(http, model, messages, prompt)
            return
        err.print(f"chatting with {model}; an empty line or Ctrl-D ends", style="dim")
        while True:
            try:
                text = await asyncio.to_thread(input, "> ")
            except EOFError:
                break
            if not text.strip():
                break
            await _turn(http, model, messages, text)


async def _turn(http: aiohttp.ClientSession, model: str, messages: list[dict[str, str]],
                text: str) -> None:
    messages.append({"role": "user", "content": text})
    body = {"model": model, "messages": messages, "stream": True,
            "stream_options": {"include_usage": True}}
    began = time.monotonic()
    first = None
    answer: list[str] = []
    usage: dict[str, Any] = {}
    async with http.post("/v1/chat/completions", json=body) as resp:
        if resp.status >= 400:
            raise StackError(await error_message(resp))
        async for raw in resp.content:
            line = raw.decode("utf-8", errors="replace").strip()
            if line.startswith(": loading"):
                err.print(line[2:], style="dim")
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            if "error" in event:
                raise StackError(event["error"].get("message", str(event["error"])))
            usage = event.get("usage") or usage
            for choice in event.get("choices") or []:
                piece = (choice.get("delta") or {}).get("content") or ""
                if piece:
                    first = first or time.monotonic()
                    answer.append(piece)
                    sys.stdout.write(piece)
                    sys.stdout.flush()
    sys.stdout.write("\n")
    messages.append({"role": "assistant", "content": "".join(answer)})
    if usage and first:
        took = time.monotonic() - first
        n = usage.get("completion_tokens") or 0
        rate = f", {(n - 1) / took:.1f} tokens/s" if n > 1 and took > 0 else ""
        err.print(f"{n} tokens, first after {first - began:.2f} s{rate}", style="dim")


# ------------------------------------------------------------------ the commands


def run_against(stack_args: tuple[str | None, str | None, Path | None, str | None],
                make: Callable[[Stack], Coroutine[Any, Any, None]]) -> None:
    try:
        stack = find_stack(*stack_args)
        asyncio.run(make(stack))
    except StackError as e:
        err.print(f"[red]error:[/] {e}")
        raise typer.Exit(1) from e
    except aiohttp.ClientConnectionError as e:
        err.print(f"[red]no sparkstack answers at {stack.url}:[/] {e} "
                  "(is it serving? --url or $SPARKSTACK_URL)")
        raise typer.Exit(1) from e
    except KeyboardInterrupt:
        raise typer.Exit(130) from None


def register(app: typer.Typer) -> None:
    @app.command()
    def status(url: UrlOpt = None, key: KeyOpt = None, config: ConfigOpt = None,
               catalog: CatalogOpt = None,
               all_models: Annotated[bool, typer.Option("--all", "-a",
                                                        help="stopped models too")] = False,
               ) -> None:
        """What runs now: state, memory measured/declared, in flight, queued, idle, TTL."""
        run_against((url, key, config, catalog), lambda s: _status(s, all_models))

    @app.command()
    def top(url: UrlOpt = None, key: KeyOpt = None, config: ConfigOpt = None,
            catalog: CatalogOpt = None,
            interval: Annotated[float, typer.Option(help="seconds between updates")] = 1.0,
            ) -> None:
        """Status of every model, refreshed live (Ctrl-C ends)."""
        run_against((url, key, config, catalog), lambda s: _top(s, interval))

    @app.command()
    def load(model: Annotated[str, typer.Argument(help="model id")], url: UrlOpt = None,
             key: KeyOpt = None, config: ConfigOpt = None, catalog: CatalogOpt = None) -> None:
        """Load a model, with its progress (phase, percent, elapsed), then the load time."""
        run_against((url, key, config, catalog), lambda s: _load(s, model))

    @app.command()
    def unload(model: Annotated[str, typer.Argument(help="model id")],
               force: Annotated[bool, typer.Option(
                   "--force", help="now, cutting in-flight requests")] = False,
               url: UrlOpt = None, key: KeyOpt = None, config: ConfigOpt = None,
               catalog: CatalogOpt = None) -> None:
        """Stop a model once its in-flight requests are done (--force: now)."""
        run_against((url, key, config, catalog), lambda s: _unload(s, model, force))

    @app.command()
    def logs(model: Annotated[str, typer.Argument(help="model id")],
             follow: Annotated[bool, typer.Option("--follow", "-f",
                                                  help="keep printing new lines")] = False,
             lines: Annotated[int, typer.Option("--lines", "-n")] = 200,
             url: UrlOpt = None, key: KeyOpt = None, config: ConfigOpt = None,
             catalog: CatalogOpt = None) -> None:
        """A model engine's log (-f follows it)."""
        run_against((url, key, config, catalog), lambda s: _logs(s, model, follow, lines))

    @app.command()
    def activity(n: Annotated[int, typer.Option("-n", help="how many requests")] = 20,
                 model: Annotated[str | None, typer.Option(help="one model's")] = None,
                 url: UrlOpt = None, key: KeyOpt = None, config: ConfigOpt = None,
                 catalog: CatalogOpt = None) -> None:
        """The last requests: status, tokens, time to first token, tokens/s, duration."""
        run_against((url, key, config, catalog), lambda s: _activity(s, n, model))

    @app.command()
    def chat(model: Annotated[str, typer.Argument(help="model id")],
             prompt: Annotated[str | None, typer.Argument(
                 help="one question; without it, an interactive chat")] = None,
             url: UrlOpt = None, key: KeyOpt = None, config: ConfigOpt = None,
             catalog: CatalogOpt = None) -> None:
        """Chat with a model (streamed); interactive when no prompt is given."""
        run_against((url, key, config, catalog), lambda s: _chat(s, model, prompt))
