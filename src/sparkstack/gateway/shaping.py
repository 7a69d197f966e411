"""Request shaping: what real clients send, made into what each model's engine accepts.

Clients (OpenCode, Cline, Continue, Open WebUI, aider) send what engines reject: `tools`
to a model started without a tool parser, `max_tokens` beyond what is left of the
context, system messages a template refuses, prompts longer than the model's context.
Each model declares its rules in the catalog (`shaping:`, defaults derived from the
engine and its flags); nothing here matches model names.

The first part is pure: `shape(body, rules, endpoint)` returns a new body and the names
of the rules that changed it; the input is never mutated, so it can be shaped again once
the prompt has been counted exactly. The second part (`count_prompt_tokens`, `prepare`)
is the gateway's side: it asks the engine's own tokenizer only when an estimate is too
close to the limit to decide, and only when that engine is already running.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

import aiohttp

from ..config import Model, ReasoningShaping
from ..engines import Upstream
from ..errors import ApiError

log = logging.getLogger("sparkstack.shaping")

Kind = Literal["chat", "completions", "responses"]
KINDS: dict[str, Kind] = {
    "/v1/chat/completions": "chat",
    "/v1/completions": "completions",
    "/v1/responses": "responses",
}
# The fields that bound the answer's length, per kind of request.
ANSWER_FIELDS: dict[Kind, tuple[str, ...]] = {
    "chat": ("max_tokens", "max_completion_tokens"),
    "completions": ("max_tokens",),
    "responses": ("max_output_tokens",),
}
TOOL_FIELDS = ("tools", "tool_choice", "functions", "function_call", "parallel_tool_calls")
TEXT_PARTS = frozenset({"text", "input_text", "output_text"})
IMAGE_PARTS = frozenset({"image_url", "input_image", "image"})
EFFORTS = frozenset({"none", "minimal", "low", "medium", "high", "xhigh", "max", "auto"})
# An estimate is trusted only this far from the limit: closer, the prompt is counted by
# the engine's tokenizer (when it runs), and decisions leave this margin for its error.
MARGIN = 0.15
IMAGE_TOKENS = 512  # what an image is guessed to take in an estimate
MESSAGE_TOKENS = 4  # role markers and separators around each message
COUNT_TIMEOUT_S = 10.0


@dataclass(frozen=True)
class Rules:
    """One model's shaping, resolved from its catalog entry and engine flags."""

    model: str
    context: int | None  # tokens one request may use, prompt and answer together
    context_note: str  # where that number comes from, for refusals
    count_with: Literal["vllm", "llamacpp"] | None  # whose tokenizer counts exactly
    fit: bool
    tools: Literal["none", "auto", "required"]
    merge_system: bool
    merge_consecutive: bool
    vision: bool
    flatten: bool
    reasoning: ReasoningShaping | None
    defaults: Mapping[str, Any]
    strip: tuple[str, ...]
    fallback: str | None


@dataclass(frozen=True)
class Shaped:
    body: dict[str, Any]
    applied: list[str]
    prompt_tokens: int | None = None  # counted or estimated; None when not measured
    exact: bool = False
    count_wanted: bool = False  # too close to the limit for the estimate to decide
    overflow: ApiError | None = None  # the prompt does not fit: refuse, or fall back


# ---------------------------------------------------------------- rules from the catalog


def _last_flag(args: list[str], on: tuple[str, ...], off: tuple[str, ...]) -> bool | None:
    """The last of the on/off flags given (`--x` or `--x=value`), or None if neither."""
    found = None
    for a in args:
        name = a.split("=", 1)[0]
        if name in on:
            found = True
        elif name in off:
            found = False
    return found


def _flag_value(args: list[str], names: tuple[str, ...]) -> str | None:
    value = None
    for i, a in enumerate(args):
        name, eq, rest = a.partition("=")
        if name in names:
            value = rest if eq else (args[i + 1] if i + 1 < len(args) else None)
    return value


def tool_support(model: Model) -> Literal["none", "auto"]:
    """Whether the engine parses tool calls, from its flags: vLLM and SGLang need a tool
    call parser (`--enable-auto-tool-choice`, `--tool-call-parser`); llama.cpp needs its
    Jinja templates (`--jinja`, the default of current builds; `--no-jinja` turns it off).
    A custom engine is taken at its word (tools pass through)."""
    cfg = model.cfg
    args = list(cfg.command or []) + list(cfg.args)
    if cfg.engine == "vllm":
        ok = "--enable-auto-tool-choice" in args and _flag_value(args, ("--tool-call-parser",))
        return "auto" if ok else "none"
    if cfg.engine == "sglang":
        return "auto" if _flag_value(args, ("--tool-call-parser",)) else "none"
    if cfg.engine == "llamacpp":
        return "none" if _last_flag(args, ("--jinja",), ("--no-jinja",)) is False else "auto"
    return "auto"


def _context(model: Model) -> tuple[int | None, str]:
    """What one request may use. For llama.cpp too this is max_model_len: the engine
    template gives each parallel slot that many tokens (engines.py)."""
    cfg = model.cfg
    if cfg.shaping.context_length:
        return cfg.shaping.context_length, "shaping.context_length"
    total = cfg.max_model_len
    if total is None:
        return None, ""
    return total, f"max_model_len {total}"


_RULES: dict[int, tuple[Model, Rules]] = {}  # by the identity of the (immutable) Model
_RULES_MAX = 4096  # each config reload makes new Model objects: forget the old ones


def rules_for(model: Model) -> Rules:
    """The model's rules; worked out once per loaded config (they were ~5% of a small
    request's cost in the gateway, recomputed per request)."""
    hit = _RULES.get(id(model))
    if hit is not None and hit[0] is model:
        return hit[1]
    if len(_RULES) >= _RULES_MAX:
        _RULES.clear()
    rules = _rules(model)
    _RULES[id(model)] = (model, rules)
    return rules


def _rules(model: Model) -> Rules:
    cfg = model.cfg
    sh = cfg.shaping
    vision = "vision" in cfg.capabilities
    context, note = _context(model)
    engine = cfg.engine if cfg.engine in ("vllm", "llamacpp") else None
    return Rules(
        model=model.id,
        context=context,
        context_note=note,
        count_with=engine if sh.exact_count else None,  # type: ignore[arg-type]
        fit=sh.context_fit,
        tools=sh.tools or tool_support(model),
        merge_system=sh.merge_system,
        merge_consecutive=sh.merge_consecutive,
        vision=vision,
        flatten=(not vision) if sh.flatten_content is None else sh.flatten_content,
        reasoning=sh.reasoning,
        defaults=sh.defaults,
        strip=tuple(sh.strip),
        fallback=cfg.context_fallback,
    )


# ---------------------------------------------------------------- the pure part


def shape(body: dict[str, Any], rules: Rules, endpoint: str,
          prompt_tokens: int | None = None) -> Shaped:
    """Apply a model's rules to a request body. `prompt_tokens` is the exact prompt count
    when the engine's tokenizer gave one. Raises ApiError for a request the model can
    never serve (images to a model without vision)."""
    kind = KINDS.get(endpoint)
    if kind is None:
        return Shaped(body, [])
    applied: list[str] = []
    body = _strip(body, rules, applied)
    body = _tools(body, rules, kind, applied)
    body = _content(body, rules, kind, applied)
    if kind == "chat":
        body = _roles(body, rules, applied)
    body = _reasoning(body, rules, kind, applied)
    body = _defaults(body, rules, applied)
    return _fit(body, rules, kind, applied, prompt_tokens)


def _strip(body: dict[str, Any], rules: Rules, applied: list[str]) -> dict[str, Any]:
    if not any(k in body for k in rules.strip):
        return body
    applied.append("strip")
    return {k: v for k, v in body.items() if k not in rules.strip}


def _has_tool_result(body: dict[str, Any], kind: Kind) -> bool:
    items = body.get("messages") if kind == "chat" else body.get("input")
    if not isinstance(items, list):
        return False
    return any(isinstance(m, dict) and (m.get("role") in ("tool", "function")
                                        or m.get("type") == "function_call_output")
               for m in items)


def _tools(body: dict[str, Any], rules: Rules, kind: Kind, applied: list[str]
           ) -> dict[str, Any]:
    if rules.tools == "none":
        if not any(k in body for k in TOOL_FIELDS):
            return body
        applied.append("tools_removed")
        return {k: v for k, v in body.items() if k not in TOOL_FIELDS}
    if rules.tools == "required":
        # A model that answers in prose when it should call a tool: make it call one, until
        # a tool result is in the conversation (then it may answer).
        tools = body.get("tools")
        if (isinstance(tools, list) and tools and body.get("tool_choice", "auto") == "auto"
                and not _has_tool_result(body, kind)):
            applied.append("tool_choice_required")
            return {**body, "tool_choice": "required"}
    return body


def _part_type(part: Any) -> str | None:
    return part.get("type") if isinstance(part, dict) else None


def _content(body: dict[str, Any], rules: Rules, kind: Kind, applied: list[str]
             ) -> dict[str, Any]:
    key = "messages" if kind == "chat" else "input" if kind == "responses" else None
    items = body.get(key) if key else None
    if not isinstance(items, list):
        return body
    if not rules.vision and any(
            _part_type(p) in IMAGE_PARTS
            for m in items if isinstance(m, dict) and isinstance(m.get("content"), list)
            for p in m["content"]):
        raise ApiError(400, f"model {rules.model!r} does not accept images (no 'vision' in "
                       "its capabilities): send text only, or choose a model with vision "
                       "(GET /v1/models lists capabilities)", "images_not_supported")
    if not rules.flatten:
        return body
    out, changed = [], False
    for m in items:
        content = m.get("content") if isinstance(m, dict) else None
        if (isinstance(content, list) and content
                and all(_part_type(p) in TEXT_PARTS for p in content)):
            # vLLM joins text parts the same way for text-only models.
            m = {**m, "content": "\n".join(str(p.get("text", "")) for p in content)}
            changed = True
        out.append(m)
    if not changed:
        return body
    applied.append("flatten_content")
    return {**body, key: out}  # type: ignore[dict-item]


def _text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "\n".join(str(p.get("text", "")) for p in content
                         if _part_type(p) in TEXT_PARTS)
    return ""


def _as_parts(content: Any) -> list[Any]:
    if isinstance(content, list):
        return list(content)
    return [{"type": "text", "text": content if isinstance(content, str) else ""}]


def _join(a: Any, b: Any) -> Any:
    if isinstance(a, str) and isinstance(b, str):
        return f"{a}\n\n{b}"
    return [*_as_parts(a), {"type": "text", "text": "\n\n"}, *_as_parts(b)]


def _roles(body: dict[str, Any], rules: Rules, applied: list[str]) -> dict[str, Any]:
    messages = body.get("messages")
    if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
        return body
    if rules.merge_system and any(m.get("role") in ("system", "developer") for m in messages):
        # Templates that refuse a system role get its text in front of the first user turn.
        system = "\n\n".join(t for m in messages if m.get("role") in ("system", "developer")
                             if (t := _text(m.get("content"))))
        rest = [m for m in messages if m.get("role") not in ("system", "developer")]
        first_user = next((i for i, m in enumerate(rest) if m.get("role") == "user"), None)
        if not system:
            pass
        elif first_user is None:
            rest.insert(0, {"role": "user", "content": system})
        else:
            m = rest[first_user]
            rest[first_user] = {**m, "content": _join(system, m.get("content"))}
        messages = rest
        applied.append("merge_system")
    if rules.merge_consecutive:
        merged: list[dict[str, Any]] = []
        for m in messages:
            prev = merged[-1] if merged else None
            if (prev is not None and prev.get("role") == m.get("role")
                    and m.get("role") in ("user", "assistant", "system")
                    and not prev.get("tool_calls") and not m.get("tool_calls")):
                merged[-1] = {**prev, "content": _join(prev.get("content"), m.get("content"))}
            else:
                merged.append(m)
        if len(merged) != len(messages):
            messages = merged
            applied.append("merge_consecutive")
    if messages is body["messages"]:
        return body
    return {**body, "messages": messages}


def _thinking_wanted(body: dict[str, Any]) -> tuple[bool | None, str | None]:
    """(thinking on/off if the request says, the reasoning effort it asks for)."""
    thinking = body.get("thinking")
    on: bool | None = None
    if isinstance(thinking, bool):
        on = thinking
    elif isinstance(thinking, dict) and thinking.get("type") in ("enabled", "disabled"):
        on = thinking["type"] == "enabled"  # Anthropic's shape
    reasoning = body.get("reasoning")
    effort = body.get("reasoning_effort", body.get("reasoningEffort"))
    if effort is None and isinstance(reasoning, dict):
        effort = reasoning.get("effort")
    effort = effort.strip().lower() if isinstance(effort, str) else None
    if effort not in EFFORTS:
        effort = None
    if on is None and effort is not None:
        on = effort != "none"
    return on, effort


def _reasoning(body: dict[str, Any], rules: Rules, kind: Kind, applied: list[str]
               ) -> dict[str, Any]:
    cfg = rules.reasoning
    if cfg is None:
        return body
    on, effort = _thinking_wanted(body)
    if on is None:
        on = cfg.default
    out = {k: v for k, v in body.items() if k not in ("thinking", "reasoningEffort")}
    reasoning = out.get("reasoning")
    if cfg.effort == "switch":
        out.pop("reasoning_effort", None)
        if isinstance(reasoning, dict) and "effort" in reasoning:
            rest = {k: v for k, v in reasoning.items() if k != "effort"}
            if rest:
                out["reasoning"] = rest
            else:
                del out["reasoning"]
    elif kind != "responses":
        # The engine reads `reasoning_effort` itself: give it in that one field.
        if isinstance(reasoning, dict) and "effort" in reasoning:
            del out["reasoning"]
        if effort is None and on is False:
            effort = "low"  # such models cannot stop thinking; the least they can do
        if effort is not None and effort != "none":
            out["reasoning_effort"] = effort
        elif effort == "none":
            out.pop("reasoning_effort", None)
    if kind == "chat" and cfg.kwargs and on is not None:
        given = out.get("chat_template_kwargs")
        kwargs = dict(given) if isinstance(given, dict) else {}
        for key in cfg.kwargs:
            kwargs.setdefault(key, on)  # a value the client set itself wins
        out["chat_template_kwargs"] = kwargs
    if out != body:
        applied.append("reasoning")
        return out
    return body


def _defaults(body: dict[str, Any], rules: Rules, applied: list[str]) -> dict[str, Any]:
    missing = {k: v for k, v in rules.defaults.items() if k not in body}
    if not missing:
        return body
    applied.append("defaults")
    return {**body, **json.loads(json.dumps(missing))}  # a copy: the catalog's stays intact


# ---------------------------------------------------------------- context fit


def estimate_text(text: str) -> int:
    """A cheap token estimate: ~4 characters per token for ASCII, more tokens for other
    scripts (a CJK character, 3 bytes in UTF-8, is about one token)."""
    if text.isascii():
        return math.ceil(len(text) / 4)
    extra = len(text.encode()) - len(text)
    return math.ceil(len(text) / 4 + extra / 3)


def _estimate_value(value: Any) -> int:
    """Tokens of the text inside a message's content (or any JSON value), images guessed."""
    if isinstance(value, str):
        return estimate_text(value)
    if isinstance(value, list):
        return sum(_estimate_value(v) for v in value)
    if isinstance(value, dict):
        if value.get("type") in IMAGE_PARTS:
            return IMAGE_TOKENS  # never count a base64 image as text
        return sum(_estimate_value(v) for k, v in value.items() if k not in ("type", "role"))
    return 0


def estimate_prompt(body: dict[str, Any], kind: Kind) -> int:
    """The prompt's tokens, estimated (the longest prompt of a completions batch)."""
    if kind == "completions":
        prompt = body.get("prompt")
        if isinstance(prompt, list) and prompt and not _token_ids(prompt):
            return max(_estimate_prompt_one(p) for p in prompt)
        return _estimate_prompt_one(prompt)
    tokens = 3
    items = body.get("messages") if kind == "chat" else body.get("input")
    if isinstance(items, list):
        tokens += sum(MESSAGE_TOKENS + _estimate_value(m) for m in items)
    else:
        tokens += _estimate_value(items)
    if kind == "responses":
        tokens += _estimate_value(body.get("instructions"))
    if body.get("tools") or body.get("functions"):
        tokens += estimate_text(json.dumps(body.get("tools") or body.get("functions")))
    return tokens


def _token_ids(prompt: Any) -> bool:
    return isinstance(prompt, list) and bool(prompt) and all(
        isinstance(t, int) and not isinstance(t, bool) for t in prompt)


def _estimate_prompt_one(prompt: Any) -> int:
    return len(prompt) if _token_ids(prompt) else _estimate_value(prompt)


def _answer_limit(value: Any) -> int | None:
    """A usable answer length, or None for a value an engine would reject."""
    if isinstance(value, bool):
        return None
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return value if isinstance(value, int) and value >= 1 else None


def _fit(body: dict[str, Any], rules: Rules, kind: Kind, applied: list[str],
         exact: int | None) -> Shaped:
    limit = rules.context
    if not rules.fit or limit is None:
        return Shaped(body, applied)
    fields = ANSWER_FIELDS[kind]
    requested = None
    for f in fields:
        if f not in body or body[f] is None:
            continue
        value = _answer_limit(body[f])
        if value is None:
            body = {k: v for k, v in body.items() if k != f}
            applied.append("max_tokens_dropped")  # the engine's default applies
        else:
            requested = max(requested or 0, value)
    prompt = body.get("prompt")
    if exact is None and kind == "completions" and _token_ids(prompt):
        exact = len(prompt)
    n = exact if exact is not None else estimate_prompt(body, kind)
    # The estimate's plausible range; an exact count has none.
    low = n if exact is not None else math.floor(n * (1 - MARGIN))
    high = n if exact is not None else math.ceil(n / (1 - MARGIN))
    count_wanted = exact is None and high + (requested or 0) > limit
    overflow = None
    if low >= limit or (exact is None and n >= limit and rules.fallback):
        # Surely too long (or, with a bigger model to fall back to, probably).
        about = "" if exact is not None else "about "
        est = "" if exact is not None else " (estimated)"
        overflow = ApiError(
            400, f"prompt is {about}{n} tokens{est}; {rules.model} accepts {limit} "
            f"({rules.context_note}, prompt and answer together). Shorten the conversation "
            "or use a model with a longer context.", "context_length_exceeded")
    elif requested is not None and requested > limit - high:
        room = limit - high
        if room >= 1:
            body = {**body, **{f: room for f in fields
                               if (_answer_limit(body.get(f)) or 0) > room}}
            applied.append("max_tokens_clamped")
        else:
            # No room by the estimate, yet the prompt may fit: let the engine use what is
            # left (its default), rather than send a length it would reject.
            body = {k: v for k, v in body.items() if k not in fields}
            applied.append("max_tokens_dropped")
    return Shaped(body, applied, n, exact is not None, count_wanted, overflow)


# ---------------------------------------------------------------- the gateway's side (I/O)


async def _post(session: aiohttp.ClientSession, upstream: Upstream, path: str,
                payload: dict[str, Any]) -> Any:
    async with session.post(upstream.base_url + path, json=payload,
                            headers=upstream.headers) as resp:
        if resp.status != 200:
            raise ValueError(f"{path} answered {resp.status}")
        return await resp.json(content_type=None)


def _chat_for_tokenizer(body: dict[str, Any], kind: Kind) -> dict[str, Any] | None:
    if kind == "chat":
        messages = body.get("messages")
        if not isinstance(messages, list):
            return None
        out = {"messages": messages}
        for k in ("tools", "chat_template_kwargs"):
            if body.get(k):
                out[k] = body[k]
        return out
    return None


def _prompt_text(body: dict[str, Any], kind: Kind) -> list[str] | None:
    """The texts to count for completions (each prompt of a batch) and responses."""
    if kind == "completions":
        prompt = body.get("prompt")
        if isinstance(prompt, str):
            return [prompt]
        if isinstance(prompt, list) and all(isinstance(p, str) for p in prompt):
            return prompt
        return None
    parts = [_text(body.get("instructions"))]
    items = body.get("input")
    if isinstance(items, str):
        parts.append(items)
    elif isinstance(items, list):
        parts += [_text(m.get("content")) if isinstance(m, dict) else "" for m in items]
    return ["\n".join(p for p in parts if p)]


async def count_prompt_tokens(session: aiohttp.ClientSession, upstream: Upstream,
                              rules: Rules, endpoint: str, body: dict[str, Any],
                              served_name: str) -> int | None:
    """The prompt's tokens by the running engine's own tokenizer and chat template, or
    None when it cannot tell (the estimate then stands)."""
    kind = KINDS[endpoint]
    engine = rules.count_with
    try:
        async with asyncio.timeout(COUNT_TIMEOUT_S):
            chat = _chat_for_tokenizer(body, kind)
            if chat is not None and engine == "vllm":
                got = await _post(session, upstream, "/tokenize", {
                    "model": served_name, **chat, "add_generation_prompt": True})
                return int(got["count"])
            if chat is not None and engine == "llamacpp":
                templated = await _post(session, upstream, "/apply-template", chat)
                got = await _post(session, upstream, "/tokenize", {
                    "content": templated["prompt"], "add_special": True})
                return len(got["tokens"])
            texts = _prompt_text(body, kind)
            if not texts or engine is None:
                return None
            counts = []
            for text in texts:
                if engine == "vllm":
                    got = await _post(session, upstream, "/tokenize",
                                      {"model": served_name, "prompt": text})
                    counts.append(int(got["count"]))
                else:
                    got = await _post(session, upstream, "/tokenize",
                                      {"content": text, "add_special": True})
                    counts.append(len(got["tokens"]))
            items = body.get("input")
            overhead = 3 + MESSAGE_TOKENS * len(items) if isinstance(items, list) else 0
            return max(counts) + (overhead if kind == "responses" else 0)
    except (aiohttp.ClientError, TimeoutError, ValueError, KeyError, TypeError) as e:
        log.debug("%s: exact token count failed, using the estimate: %s", rules.model, e)
        return None


@dataclass(frozen=True)
class Prepared:
    model: Model  # who serves: the one asked for, or its context fallback
    body: dict[str, Any] | None  # None: the body goes upstream as the client sent it
    applied: list[str]


async def prepare(
    payload: dict[str, Any],
    model: Model,
    endpoint: str,
    *,
    resolve: Callable[[str], Model | None],
    upstream: Callable[[str], Upstream | None],
    session: aiohttp.ClientSession,
    may_use: Callable[[Model], bool],
) -> Prepared:
    """Shape a request for `model`, counting exactly when it matters and the engine runs.
    A prompt that does not fit goes to the model's `context_fallback` (shaped by that
    model's rules) when there is one the caller may use; otherwise it is refused (400)."""
    if endpoint not in KINDS:
        return Prepared(model, None, [])
    current = model
    tried = {model.id}
    while True:
        rules = rules_for(current)
        shaped = shape(payload, rules, endpoint)
        running = upstream(current.id) if shaped.count_wanted and rules.count_with else None
        if running is not None:
            n = await count_prompt_tokens(session, running, rules, endpoint, shaped.body,
                                          current.served_name)
            if n is not None:
                shaped = shape(payload, rules, endpoint, prompt_tokens=n)
        if shaped.overflow is None:
            break
        fallback = resolve(rules.fallback) if rules.fallback else None
        if (fallback is None or fallback.id in tried or not fallback.enabled
                or not may_use(fallback)):
            log.debug("%s: refused: %s", current.id, shaped.overflow.message)
            raise shaped.overflow
        log.debug("%s: prompt of %s tokens goes to its context_fallback %s",
                  current.id, shaped.prompt_tokens, fallback.id)
        tried.add(fallback.id)
        current = fallback
    applied = list(dict.fromkeys(shaped.applied))
    if current is not model:
        applied.append("context_fallback")
    if applied:
        log.debug("%s %s shaped: %s%s", current.id, endpoint, ",".join(applied),
                  f" (prompt {shaped.prompt_tokens} tokens, "
                  f"{'counted' if shaped.exact else 'estimated'})"
                  if shaped.prompt_tokens is not None else "")
    return Prepared(current, shaped.body if shaped.applied else None, applied)
