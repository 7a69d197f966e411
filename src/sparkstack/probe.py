"""`sparkstack probe`: drive models through the running gateway and say what works.

After a driver or image change a DGX Spark owner wants to know, per model, whether it
still loads and answers the way clients use it: plain and streamed chat (usage in the
last chunk), a tool call round trip, reasoning kept apart from the answer, JSON mode,
the context ceiling (a prompt near the limit answered, one over it refused with a 400),
two requests at once; an embeddings model gets an embeddings request instead.

Everything goes through the gateway's OpenAI API, as a client would, so a probe also
checks the gateway's shaping in front of the engine. Which probes apply comes from what
/v1/models says a model serves (`capabilities`): tools only with `tools`, reasoning only
with `reasoning`. A model that is not running is started by its first request: that
request's time is the LOAD cell.

Each probe ends ok, fail, n/a or, for tools, "no call": the model accepted the tool and
answered in prose instead of calling it. That is the model's choice (small models do
it), not a broken pipeline, so it does not fail the run. The table shows only that word
(and a figure where one tells something), so that it fits 80 columns; why goes in the
lines under it.
"""

from __future__ import annotations

import asyncio
import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal

import aiohttp
import typer
from rich import box
from rich.console import Console
from rich.table import Table

from .client import (
    CatalogOpt,
    ConfigOpt,
    KeyOpt,
    Stack,
    StackError,
    UrlOpt,
    err,
    error_message,
    out,
    run_against,
)

Status = Literal["ok", "fail", "n/a", "no call"]
# The probes, in table order, with the short names people read (column headings, the
# lines under the table, progress): short so that the table fits 80 columns.
PROBES: dict[str, str] = {
    "loads": "load", "chat": "chat", "stream": "stream", "tools": "tools",
    "reasoning": "think", "json": "json", "context": "ctx", "concurrent": "2x",
    "embeddings": "embed",
}
CHAT_PROBES = ("chat", "stream", "tools", "reasoning", "json", "context", "concurrent")

# Every request is greedy (temperature 0): a probe's result should not change from one
# run to the next, so a change after an upgrade means something.
QUESTION = "What is the capital of France? Answer in one sentence."
WEATHER_TOOL = {"type": "function", "function": {
    "name": "get_weather", "description": "Get the current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                   "required": ["city"]}}}
TOOL_RESULT = "18 degrees Celsius and sunny"
# Ordinary English, about four characters a token in common tokenizers: the gateway's
# estimate of it is close, so a prompt near the limit is not refused on a guess.
FILLER = "The quick brown fox jumps over the lazy dog. "
CALIBRATE = (16, 64)  # filler repeats of the two prompts whose usage sizes the rest
ANSWER_TOKENS = 32  # a sentence: the probes check that an answer comes, not its length
OBJECT_TOKENS = 64  # room for a whole JSON object or tool call
REASONING_TOKENS = 2048  # a thinking model spends tokens before it answers


@dataclass
class Cell:
    status: Status
    detail: str = ""
    seconds: float | None = None
    shown: str = ""  # what the table shows for ok when it says more than "ok"

    def text(self) -> str:
        """The table's cell: a status word of a few characters, or `shown`."""
        if self.status == "ok":
            return self.shown or "ok"
        return {"fail": "FAIL", "n/a": "—"}.get(self.status, self.status)


def _secs(seconds: float) -> str:
    return f"{seconds:.1f}s" if seconds < 10 else f"{seconds:.0f}s"


def _tokens(n: int) -> str:
    """A token count in a few characters; large ones in k as context sizes are named
    (131072 is 128k)."""
    return str(n) if n < 10_000 else f"{n // 1024}k"


@dataclass
class Result:
    model: str
    kind: Literal["chat", "embeddings", "other"]
    cells: dict[str, Cell] = field(default_factory=dict)

    @property
    def failed(self) -> bool:
        return any(c.status == "fail" for c in self.cells.values())

    def as_dict(self) -> dict[str, Any]:
        return {"id": self.model, "kind": self.kind, "failed": self.failed,
                "probes": {k: {"status": c.status, "detail": c.detail, "seconds": c.seconds}
                           for k, c in self.cells.items()}}


@dataclass
class Reply:
    """One exchange with the gateway; status 0 when no HTTP answer came."""

    status: int
    body: Any
    error: str | None
    seconds: float

    @property
    def ok(self) -> bool:
        return self.error is None

    def why(self) -> str:
        return f"{self.status} {self.error}" if self.status else str(self.error)


def _short(text: Any, n: int = 60) -> str:
    s = " ".join(str(text).split())
    return s if len(s) <= n else s[:n - 1] + "…"


async def call(http: aiohttp.ClientSession, path: str, body: dict[str, Any],
               timeout: float | None) -> Reply:
    began = time.monotonic()
    try:
        async with asyncio.timeout(timeout), http.post(path, json=body) as resp:
            if resp.status >= 400:
                return Reply(resp.status, None, await error_message(resp), time.monotonic() - began)
            text = await resp.text()
            took = time.monotonic() - began
            try:
                data = json.loads(text)  # early headers: leading spaces, which JSON allows
            except ValueError:
                return Reply(resp.status, None, f"not JSON: {_short(text)}", took)
            if isinstance(data, dict) and isinstance(data.get("error"), dict):
                # A refusal behind early headers arrives as a 200 with an error body.
                return Reply(resp.status, data, str(data["error"].get("message")), took)
            return Reply(resp.status, data, None, took)
    except TimeoutError:
        return Reply(0, None, f"no answer within {timeout:g} s", time.monotonic() - began)
    except aiohttp.ClientError as e:
        return Reply(0, None, f"connection failed: {e}", time.monotonic() - began)


def message_of(reply: Reply) -> dict[str, Any] | None:
    """The first choice's message of a chat answer, or None for a malformed one."""
    try:
        msg = reply.body["choices"][0]["message"]
    except (KeyError, IndexError, TypeError):
        return None
    return msg if isinstance(msg, dict) else None


def reasoning_of(msg: dict[str, Any]) -> str:
    # vLLM named it reasoning_content, then reasoning; llama.cpp uses reasoning_content.
    return str(msg.get("reasoning_content") or msg.get("reasoning") or "")


def _answered(reply: Reply) -> tuple[str | None, str]:
    """(why it is not an answer or None, the answer's text)."""
    if not reply.ok:
        return reply.why(), ""
    msg = message_of(reply)
    if msg is None:
        return f"malformed answer: {_short(json.dumps(reply.body))}", ""
    text = str(msg.get("content") or "")
    if not text.strip() and not reasoning_of(msg).strip():
        return "empty answer", ""
    return None, text


# ---------------------------------------------------------------- classification (pure)


def classify_tool_call(msg: dict[str, Any], tool: str) -> tuple[Status, str]:
    """The first answer to a request offering `tool`: ok (a well-formed call, continue the
    round trip), no call (answered in prose) or fail (a malformed call, or a call left as
    text in the content: the engine's tool parser did not catch it)."""
    calls = msg.get("tool_calls") or []
    content = str(msg.get("content") or "")
    if not calls:
        if tool in content and ("{" in content or "<tool_call>" in content):
            return "fail", f"the call came back as text, not tool_calls: {_short(content)}"
        return "no call", f"answered without calling {tool}: {_short(content) or '(empty)'}"
    fn = (calls[0] or {}).get("function") or {}
    if fn.get("name") != tool:
        return "fail", f"called {fn.get('name')!r}, which was not offered"
    try:
        args = json.loads(fn.get("arguments") or "")
    except (ValueError, TypeError):
        return "fail", f"arguments are not JSON: {_short(fn.get('arguments'))}"
    if not isinstance(args, dict):
        return "fail", f"arguments are not a JSON object: {_short(fn.get('arguments'))}"
    return "ok", f"called {tool}({_short(json.dumps(args), 40)})"


def classify_reasoning(msg: dict[str, Any]) -> tuple[Status, str]:
    thought = reasoning_of(msg)
    content = str(msg.get("content") or "")
    tagged = "<think>" in content or "</think>" in content
    if thought.strip() and not tagged:
        return "ok", f"{len(thought)} characters of reasoning apart from the answer"
    if thought.strip():
        return "fail", "reasoning_content is there, yet the content still has <think> tags"
    if tagged:
        return "fail", ("the reasoning came back inside the content (<think> tags): "
                        "does the engine have a reasoning parser?")
    return "fail", "no reasoning_content: the model did not think, or the engine drops it"


def classify_json(msg: dict[str, Any], finish: str | None) -> tuple[Status, str]:
    content = str(msg.get("content") or "")
    try:
        value = json.loads(content)
    except ValueError:
        if finish == "length" and content.lstrip().startswith("{"):
            return "fail", ("the object was still open when max_tokens cut it (the engine "
                            f"constrains the output, the model does not finish): "
                            f"{_short(content, 40)}")
        return "fail", f"content is not JSON: {_short(content) or '(empty)'}"
    if not isinstance(value, dict):
        return "fail", f"content is JSON but not an object: {_short(content)}"
    return "ok", f"a JSON object: {_short(content, 40)}"


def context_prompts(limit: int, small: tuple[int, int], large: tuple[int, int]
                    ) -> tuple[int, int] | None:
    """Filler repeats for a prompt near the limit and one over it, from two measured
    (repeats, prompt_tokens) pairs; None when the counts do not grow with the prompt."""
    per = (large[1] - small[1]) / (large[0] - small[0])
    if per <= 0:
        return None
    base = small[1] - small[0] * per  # the chat template's own tokens
    near = math.floor((limit - max(32, limit // 50) - 8 - base) / per)
    over = math.ceil((limit + max(64, limit // 20) - base) / per)
    return (near, over) if near >= 1 else None


# ---------------------------------------------------------------- the probes


class Prober:
    def __init__(self, http: aiohttp.ClientSession, timeout: float):
        self.http = http
        self.timeout = timeout

    def chat_body(self, model: str, content: str, max_tokens: int, **extra: Any
                  ) -> dict[str, Any]:
        return {"model": model, "messages": [{"role": "user", "content": content}],
                "max_tokens": max_tokens, "temperature": 0, **extra}

    async def chat(self, body: dict[str, Any], *, starting: bool = False) -> Reply:
        # A start has no limit here: the gateway bounds it itself (health_timeout).
        return await call(self.http, "/v1/chat/completions", body,
                          None if starting else self.timeout)

    async def loads(self, info: dict[str, Any], kind: str) -> Cell:
        if info.get("state") == "ready":
            return Cell("ok", "already running", shown="ready")
        was = info.get("state") or "not known"
        if kind == "embeddings":
            body = {"model": info["id"], "input": "hello"}
            reply = await call(self.http, "/v1/embeddings", body, None)
        else:
            reply = await self.chat(self.chat_body(info["id"], "Hi.", 1), starting=True)
        if not reply.ok:
            return Cell("fail", f"did not start: {reply.why()}", reply.seconds)
        return Cell("ok", f"first answer from {was} after {reply.seconds:.1f} s", reply.seconds,
                    _secs(reply.seconds))

    async def plain(self, model: str, tokens: int) -> Cell:
        reply = await self.chat(self.chat_body(model, QUESTION, tokens))
        why, text = _answered(reply)
        if why:
            return Cell("fail", why, reply.seconds)
        return Cell("ok", f"answered: {_short(text) or '(reasoning only)'}", reply.seconds)

    async def stream(self, model: str, tokens: int) -> Cell:
        body = self.chat_body(model, QUESTION, tokens, stream=True,
                              stream_options={"include_usage": True})
        began = time.monotonic()
        first: float | None = None
        usage: dict[str, Any] | None = None
        done = False
        try:
            async with asyncio.timeout(self.timeout), self.http.post(
                    "/v1/chat/completions", json=body) as resp:
                if resp.status >= 400:
                    return Cell("fail", f"{resp.status} {await error_message(resp)}",
                                time.monotonic() - began)
                async for raw in resp.content:
                    line = raw.decode("utf-8", errors="replace").strip()
                    if line == "data: [DONE]":
                        done = True
                    if not line.startswith("data: ") or done:
                        continue
                    try:
                        event = json.loads(line[6:])
                    except ValueError:
                        return Cell("fail", f"a malformed event: {_short(line)}",
                                    time.monotonic() - began)
                    if "error" in event:
                        return Cell("fail", f"error event: {_short(event['error'])}",
                                    time.monotonic() - began)
                    usage = event.get("usage") or usage
                    for choice in event.get("choices") or []:
                        delta = choice.get("delta") or {}
                        if first is None and (delta.get("content") or reasoning_of(delta)):
                            first = time.monotonic()
        except TimeoutError:
            return Cell("fail", f"no end within {self.timeout:g} s", time.monotonic() - began)
        except aiohttp.ClientError as e:
            return Cell("fail", f"the stream broke: {e}", time.monotonic() - began)
        took = time.monotonic() - began
        if first is None:
            return Cell("fail", "no content in the stream", took)
        if not done:
            return Cell("fail", "the stream ended without data: [DONE]", took)
        if not usage:
            return Cell("fail", "no usage in the final chunk (stream_options.include_usage)",
                        took)
        return Cell("ok", f"first token after {first - began:.2f} s, "
                    f"{usage.get('completion_tokens')} tokens, usage in the final chunk", took)

    async def tools(self, model: str, tokens: int) -> Cell:
        question = {"role": "user",
                    "content": "What is the weather in Paris right now? Use get_weather."}
        body = {"model": model, "messages": [question], "tools": [WEATHER_TOOL],
                "max_tokens": tokens, "temperature": 0}
        first = await self.chat(body)
        msg = message_of(first) if first.ok else None
        if msg is None:
            return Cell("fail", first.why() if not first.ok else "malformed answer",
                        first.seconds)
        status, detail = classify_tool_call(msg, "get_weather")
        if status != "ok":
            return Cell(status, detail, first.seconds)
        call_ = msg["tool_calls"][0]
        answer = await self.chat({**body, "messages": [
            question, {"role": "assistant", "content": None, "tool_calls": [call_]},
            {"role": "tool", "tool_call_id": call_.get("id") or "call_1",
             "content": TOOL_RESULT}]})
        took = first.seconds + answer.seconds
        why, text = _answered(answer)
        if why:
            return Cell("fail", f"{detail}; the answer to its result failed: {why}", took)
        return Cell("ok", f"{detail}, then answered: {_short(text, 40)}", took)

    async def reasoning(self, model: str, tokens: int) -> Cell:
        body = self.chat_body(model, "How many times does the letter r occur in "
                              "'strawberry'? Think it through, then answer.",
                              tokens, reasoning_effort="low")
        reply = await self.chat(body)
        msg = message_of(reply) if reply.ok else None
        if msg is None:
            return Cell("fail", reply.why() if not reply.ok else "malformed answer",
                        reply.seconds)
        return Cell(*classify_reasoning(msg), reply.seconds)

    async def json_mode(self, model: str, tokens: int) -> Cell:
        body = self.chat_body(model, 'Give the capital of France as a JSON object like '
                              '{"country": "...", "capital": "..."}.', tokens,
                              response_format={"type": "json_object"})
        reply = await self.chat(body)
        msg = message_of(reply) if reply.ok else None
        if msg is None:
            return Cell("fail", reply.why() if not reply.ok else "malformed answer",
                        reply.seconds)
        finish = (reply.body.get("choices") or [{}])[0].get("finish_reason")
        return Cell(*classify_json(msg, finish), reply.seconds)

    async def context(self, model: str, limit: int | None) -> Cell:
        if not limit:
            return Cell("n/a", "no context length declared (max_model_len)")
        measured = []
        for n in CALIBRATE:
            reply = await self.chat(self.chat_body(model, FILLER * n, 1))
            tokens = ((reply.body or {}).get("usage") or {}).get("prompt_tokens") \
                if reply.ok else None
            if not reply.ok:
                return Cell("fail", f"a prompt of {n * len(FILLER)} characters: {reply.why()}",
                            reply.seconds)
            if not isinstance(tokens, int):
                return Cell("n/a", "the answers carry no usage.prompt_tokens to size the "
                            "prompts by")
            measured.append((n, tokens))
        sizes = context_prompts(limit, measured[0], measured[1])
        if sizes is None:
            return Cell("fail", f"usage.prompt_tokens does not grow with the prompt "
                        f"({measured})")
        per = (measured[1][1] - measured[0][1]) / (CALIBRATE[1] - CALIBRATE[0])
        base = measured[0][1] - CALIBRATE[0] * per
        near_n, over_n = sizes
        near = await self.chat(self.chat_body(model, FILLER * near_n, 8))
        want = round(base + near_n * per)
        if not near.ok:
            return Cell("fail", f"a prompt of ~{want} tokens, under the {limit} limit, was "
                        f"refused: {near.why()}", near.seconds)
        got = ((near.body or {}).get("usage") or {}).get("prompt_tokens")
        got = got if isinstance(got, int) and got > 0 else want
        over = await self.chat(self.chat_body(model, FILLER * over_n, 8))
        over_tokens = round(base + over_n * per)
        took = near.seconds + over.seconds
        if over.ok:
            return Cell("fail", f"a prompt of ~{over_tokens} tokens, over the {limit} limit, "
                        "was answered (the engine may have cut it silently)", took)
        if over.status != 400 or not (over.error or "").strip():
            return Cell("fail", f"a prompt over the limit got {over.why()} instead of a 400 "
                        "with a message", took)
        return Cell("ok", f"{got}/{limit} tokens answered in {near.seconds:.1f} s; "
                    f"~{over_tokens} refused: 400 {_short(over.error, 70)}", took,
                    f"{_tokens(got)}/{_tokens(limit)}")

    async def concurrent(self, model: str, tokens: int) -> Cell:
        began = time.monotonic()
        replies = await asyncio.gather(
            self.chat(self.chat_body(model, QUESTION, tokens)),
            self.chat(self.chat_body(model, "Name a fruit that is yellow.", tokens)))
        took = time.monotonic() - began
        whys = [w for w, _ in map(_answered, replies) if w]
        if whys:
            return Cell("fail", f"{len(whys)} of 2 failed: {whys[0]}", took)
        each = ", ".join(f"{r.seconds:.1f}" for r in replies)
        return Cell("ok", f"both answered in {took:.1f} s (each {each} s)", took)

    async def embeddings(self, model: str) -> Cell:
        texts = ["The capital of France is Paris.", "Bananas are yellow."]
        reply = await call(self.http, "/v1/embeddings", {"model": model, "input": texts},
                           self.timeout)
        if not reply.ok:
            return Cell("fail", reply.why(), reply.seconds)
        try:
            vectors = [d["embedding"] for d in reply.body["data"]]
        except (KeyError, TypeError):
            return Cell("fail", f"malformed answer: {_short(json.dumps(reply.body))}",
                        reply.seconds)
        dims = {len(v) for v in vectors if isinstance(v, list)}
        if len(vectors) != 2 or len(dims) != 1 or 0 in dims:
            return Cell("fail", f"{len(vectors)} vectors of sizes {sorted(dims)} for 2 inputs",
                        reply.seconds)
        if vectors[0] == vectors[1]:
            return Cell("fail", "two different texts got the same vector", reply.seconds)
        return Cell("ok", f"2 vectors of {dims.pop()} dimensions", reply.seconds)

    async def model(self, info: dict[str, Any], report: Callable[[str, str, Cell], None]
                    ) -> Result:
        """Every probe that applies to one model, one after the other."""
        mid = info["id"]
        caps = set(info.get("capabilities") or [])
        kind: Literal["chat", "embeddings", "other"] = (
            "chat" if "chat" in caps else "embeddings" if "embeddings" in caps else "other")
        result = Result(mid, kind)

        def put(name: str, cell: Cell) -> None:
            result.cells[name] = cell
            report(mid, name, cell)

        if kind == "other":
            for name in PROBES:
                put(name, Cell("n/a", "serves neither chat nor embeddings (capabilities: "
                               f"{', '.join(sorted(caps)) or 'none'})"))
            return result
        put("loads", await self.loads(info, kind))
        if result.cells["loads"].status == "fail":
            for name in PROBES:
                if name != "loads":
                    put(name, Cell("n/a", "did not load"))
            return result
        if kind == "embeddings":
            for name in CHAT_PROBES:
                put(name, Cell("n/a", "an embeddings model"))
            put("embeddings", await self.embeddings(mid))
            return result
        thinks = "reasoning" in caps
        limit = info.get("context_length")

        def room(n: int) -> int:  # an answer that leaves a small context room for the prompt
            return min(n, max(16, limit // 4)) if limit else n

        tokens = room(REASONING_TOKENS if thinks else ANSWER_TOKENS)
        objects = room(REASONING_TOKENS if thinks else OBJECT_TOKENS)
        put("chat", await self.plain(mid, tokens))
        put("stream", await self.stream(mid, tokens))
        put("tools", await self.tools(mid, objects) if "tools" in caps
            else Cell("n/a", "no 'tools' capability"))
        put("reasoning", await self.reasoning(mid, tokens) if thinks
            else Cell("n/a", "no 'reasoning' capability"))
        put("json", await self.json_mode(mid, objects))
        put("context", await self.context(mid, limit))
        put("concurrent", await self.concurrent(mid, tokens))
        put("embeddings", Cell("n/a", "not an embeddings model"))
        return result


# ---------------------------------------------------------------- selection and output


class UsageError(Exception):
    """A mistake in the command line (exit code 2)."""


async def served(http: aiohttp.ClientSession) -> list[dict[str, Any]]:
    """What the gateway serves (/v1/models: enabled models, its peers' too)."""
    async with http.get("/v1/models") as resp:
        if resp.status >= 400:
            raise StackError(await error_message(resp))
        return list((await resp.json(content_type=None))["data"])


def select(models: list[dict[str, Any]], ids: list[str]) -> list[dict[str, Any]]:
    """The models named (ids or aliases), in the order given; every one at most once."""
    by_name: dict[str, dict[str, Any]] = {}
    for m in models:
        for name in [m["id"], *(m.get("aliases") or [])]:
            by_name.setdefault(name, m)
    unknown = [i for i in ids if i not in by_name]
    if unknown:
        raise UsageError(f"not served here: {', '.join(unknown)} (served: "
                         f"{', '.join(m['id'] for m in models) or 'nothing'})")
    return list({by_name[i]["id"]: by_name[i] for i in ids}.values())


def table(results: list[Result], url: str) -> Table:
    """One row per model; it fits 80 columns whole (cells of a few characters, and a long
    model id wraps within its column rather than cutting the probes off)."""
    # Two spaces between columns (a padding each side of a box line would make three).
    t = Table(title=f"probe of {url}", title_justify="left", box=box.SIMPLE_HEAD,
              show_edge=False, padding=(0, 1, 0, 0))
    t.add_column("MODEL", overflow="fold")
    for name in PROBES.values():
        t.add_column(name.upper(), no_wrap=True)
    style = {"ok": "green", "fail": "bold red", "n/a": "dim", "no call": "yellow"}
    for r in results:
        t.add_row(r.model, *(f"[{style[c.status]}]{c.text()}[/]" for c in r.cells.values()))
    return t


def notes(results: list[Result]) -> list[str]:
    """What the table has no room for, one line each: why a probe failed or made no
    call, what the context probe measured, and per model why the others did not run."""
    lines = []
    for r in results:
        for key, c in r.cells.items():
            if c.status in ("fail", "no call"):
                lines.append(f"{r.model} {PROBES[key]}: {c.text()}: {c.detail}")
            elif c.status == "ok" and key == "context":
                lines.append(f"{r.model} {PROBES[key]}: {c.detail}")
        skipped: dict[str, list[str]] = {}
        for key, c in r.cells.items():
            if c.status == "n/a":
                skipped.setdefault(c.detail, []).append(PROBES[key])
        if skipped:
            lines.append(f"{r.model} not run: " + "; ".join(
                f"{', '.join(names)} ({why})" for why, names in skipped.items()))
    return lines


def show(console: Console, results: list[Result], url: str) -> None:
    """The report for people: the table, then the lines that say why."""
    console.print(table(results, url))
    lines = notes(results)
    if lines:
        console.print()
    for line in lines:
        # One line each however long (the terminal wraps it): `grep FAIL` finds it whole.
        console.print(line, markup=False, highlight=False, soft_wrap=True)


async def run(stack: Stack, ids: list[str], every: bool, as_json: bool, timeout: float
              ) -> None:
    async with stack.session() as http:
        models = await served(http)
        chosen = models if every else select(models, ids)
        if not chosen:
            raise StackError("the gateway serves no models")
        prober = Prober(http, timeout)

        def report(model: str, name: str, cell: Cell) -> None:
            took = f" {cell.seconds:.1f}s" if cell.seconds is not None else ""
            err.print(f"{model} {PROBES[name]}: {cell.status}{took}"
                      + (f" ({_short(cell.detail, 90)})" if cell.status != "ok" else ""),
                      style="dim", markup=False)

        results = [await prober.model(m, report) for m in chosen]
    if as_json:
        print(json.dumps({"url": stack.url, "failed": any(r.failed for r in results),
                          "models": [r.as_dict() for r in results]}, indent=2))
    else:
        show(out, results, stack.url)
    if any(r.failed for r in results):
        raise typer.Exit(1)


def register(app: typer.Typer) -> None:
    @app.command()
    def probe(
        models: Annotated[list[str] | None, typer.Argument(
            help="model ids or aliases", show_default=False)] = None,
        every: Annotated[bool, typer.Option(
            "--all", help="every model the gateway serves (its /v1/models)")] = False,
        as_json: Annotated[bool, typer.Option("--json", help="JSON, for scripts")] = False,
        timeout: Annotated[float, typer.Option(
            help="seconds each request may take once the model runs")] = 600.0,
        url: UrlOpt = None, key: KeyOpt = None, config: ConfigOpt = None,
        catalog: CatalogOpt = None,
    ) -> None:
        """Check that models really work, through the running gateway: load, chat,
        streaming with usage, tool call round trip, reasoning apart, JSON mode, context
        ceiling, two requests at once (embeddings models: an embeddings request). A model
        that is not running is started (that is what LOAD times), which may stop others
        to make room, as any request would. --config/--catalog only say where the gateway
        listens and which key to use. Exit code 1 when a probe failed."""
        if bool(models) == every:
            err.print("[red]name the models to probe, or give --all[/]")
            raise typer.Exit(2)
        try:
            run_against((url, key, config, catalog),
                 lambda s: run(s, models or [], every, as_json, timeout))
        except UsageError as e:
            err.print(str(e), style="red", markup=False)
            raise typer.Exit(2) from e
