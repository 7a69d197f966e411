"""Ready client configuration, generated from the catalog and the stack's address.

`sparkstack integrations <client>` prints what a client needs: a file to save (OpenCode,
Continue, aider), values to enter (Cline), environment variables (Open WebUI, any
OpenAI SDK). The numbers come from the catalog, so they match what the gateway enforces:
a model's context is the one request shaping fits requests into. The API key stays an
environment reference unless asked for (`--with-key`), so the output can be shared.

Each generator returns the text for stdout (the file itself, so it can be redirected)
and notes for stderr: where it goes, and the caveats of this catalog with this client.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import yaml

from .config import Config, Model, parse_listen
from .gateway.shaping import rules_for

CLIENTS = ("opencode", "cline", "continue", "openwebui", "aider", "env")
KEY_ENV = "SPARKSTACK_API_KEY"
PROVIDER = "sparkstack"
# OpenCode's system prompt and tool definitions alone come to about this many tokens.
OPENCODE_PROMPT_TOKENS = 35_000
CLINE_PROMPT_TOKENS = 12_000  # Cline's system prompt, about
ANSWER_MAX = 32_768  # the longest answer a generated config lets a client ask for


@dataclass(frozen=True)
class ClientModel:
    """What a client needs to know of one chat model."""

    id: str
    context: int | None  # tokens one request may use (as request shaping enforces it)
    tools: bool  # the engine parses tool calls
    reasoning: bool
    vision: bool
    utility: bool  # pinned: always running, cheap (titles, tags, summaries)
    exclusive: bool
    tags: tuple[str, ...]
    notes: str

    @property
    def output(self) -> int | None:
        """A sensible answer budget: a quarter of the context, at most ANSWER_MAX."""
        return min(ANSWER_MAX, self.context // 4) if self.context else None


@dataclass
class Integration:
    text: str  # stdout: the file or values themselves
    notes: list[str] = field(default_factory=list)  # stderr: where it goes, caveats


def client_model(m: Model) -> ClientModel:
    rules = rules_for(m)
    caps = m.cfg.capabilities
    if m.cfg.engine == "custom" and m.cfg.shaping.tools is None:
        tools = "tools" in caps  # flags of a custom engine tell us nothing
    else:
        tools = rules.tools != "none"
    return ClientModel(
        id=m.id, context=rules.context, tools=tools,
        reasoning="reasoning" in caps or m.cfg.shaping.reasoning is not None,
        vision="vision" in caps, utility=m.cfg.pinned, exclusive=m.cfg.exclusive,
        tags=tuple(m.cfg.tags), notes=m.cfg.notes)


def chat_models(config: Config) -> list[ClientModel]:
    return [client_model(m) for m in config.models.values()
            if m.enabled and "chat" in m.cfg.capabilities]


def main_model(models: list[ClientModel], wanted: str | None = None,
               prefer: str = "chat") -> ClientModel:
    """The model a client uses by default: the one asked for, else one that calls tools,
    runs beside the utility model (not exclusive), is tagged for the client's work
    (`prefer`), with the longest context."""
    if wanted is not None:
        for m in models:
            if m.id == wanted:
                return m
        raise ValueError(f"{wanted!r} is not an enabled chat model of this catalog "
                         f"(there are: {', '.join(m.id for m in models)})")
    if not models:
        raise ValueError("the catalog has no enabled chat model")
    return max(models, key=lambda m: (m.tools, not m.exclusive, not m.utility,
                                      prefer in m.tags, m.context or 0, -models.index(m)))


def utility_model(models: list[ClientModel]) -> ClientModel | None:
    return next((m for m in models if m.utility), None)


def base_url(config: Config, override: str | None = None) -> tuple[str, list[str]]:
    """The gateway's /v1 address as a client on this machine reaches it."""
    if override:
        return override.rstrip("/").removesuffix("/v1") + "/v1", []
    host, port = parse_listen(config.settings.listen)
    notes = []
    if host in ("0.0.0.0", "::", ""):
        notes.append(f"the gateway listens on every interface ({config.settings.listen}); "
                     "from another machine use its address: --url http://HOST:PORT")
        host = "127.0.0.1"
    if ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{port}/v1", notes


def cold_start_seconds(config: Config) -> int:
    """The longest a request may wait for its model to load: what client timeouts need."""
    waits = [m.cfg.health_timeout for m in config.models.values() if m.enabled]
    return int(max(waits, default=900) + config.settings.queue_timeout)


def _caveats(models: list[ClientModel], main: ClientModel, needs_tools: bool,
             prompt_tokens: int | None, client: str) -> list[str]:
    out = []
    for m in models:
        if prompt_tokens and m.context and m.context < prompt_tokens + 4096 and not m.utility:
            out.append(f"{m.id}: its {m.context}-token context is too small for {client}'s "
                       f"~{prompt_tokens // 1000}k-token requests; use it for small jobs only")
        if needs_tools and not m.tools and not m.utility:
            out.append(f"{m.id}: no tool-call parser, so sparkstack removes tools from its "
                       f"requests; {client} can chat with it but not act")
    if main.exclusive:
        out.append(f"{main.id} runs alone (exclusive): while it serves, the utility model "
                   "is stopped and small jobs wait for a swap")
    return out


def _notes_of(models: list[ClientModel], main: ClientModel, caveats: list[str]) -> list[str]:
    """The catalog's notes of the models this configuration leans on: the main model, the
    utility, and those a caveat names."""
    named = {c.split(":", 1)[0] for c in caveats}
    return [f"{m.id}: {m.notes}" for m in models
            if m.notes and (m is main or m.utility or m.id in named)]


def _key(key: str | None, style: str) -> str:
    if key is not None:
        return key
    return {"opencode": f"{{env:{KEY_ENV}}}", "continue": f"${{{{ secrets.{KEY_ENV} }}}}",
            "shell": f"${{{KEY_ENV}}}"}[style]


def opencode(config: Config, url: str, key: str | None, main: ClientModel,
             models: list[ClientModel]) -> Integration:
    entries = {}
    for m in models:
        entry: dict[str, object] = {"name": m.id, "tool_call": m.tools, "reasoning": m.reasoning,
                                    "attachment": m.vision, "temperature": True}
        if m.context:
            entry["limit"] = {"context": m.context, "output": m.output}
        if m.vision:
            entry["modalities"] = {"input": ["text", "image"], "output": ["text"]}
        entries[m.id] = entry
    doc: dict[str, object] = {
        "$schema": "https://opencode.ai/config.json",
        "provider": {PROVIDER: {
            "npm": "@ai-sdk/openai-compatible",
            "name": "sparkstack",
            "options": {"baseURL": url, "apiKey": _key(key, "opencode"),
                        "timeout": cold_start_seconds(config) * 1000},
            "models": entries,
        }},
        "model": f"{PROVIDER}/{main.id}",
    }
    utility = utility_model(models)
    notes = ["save as opencode.json in your project (or ~/.config/opencode/opencode.json)"]
    if utility is not None:
        doc["small_model"] = f"{PROVIDER}/{utility.id}"
        notes.append(f"titles and summaries go to {utility.id}, the utility model that is "
                     "always loaded")
    else:
        notes.append("no pinned utility model: OpenCode uses the main model for titles too")
    caveats = _caveats(models, main, True, OPENCODE_PROMPT_TOKENS, "OpenCode")
    return Integration(json.dumps(doc, indent=2) + "\n",
                       notes + caveats + _notes_of(models, main, caveats))


def cline(config: Config, url: str, key: str | None, main: ClientModel,
          models: list[ClientModel]) -> Integration:
    shown = key if key is not None else f"the value of ${KEY_ENV}"
    lines = [
        'Cline settings: API Provider "OpenAI Compatible", then',
        f"  Base URL:              {url}",
        f"  API Key:               {shown}",
        f"  Model ID:              {main.id}",
        "  Model Configuration:",
        f"    Supports Images:     {'yes' if main.vision else 'no'}",
        f"    Context Window Size: {main.context or 'as the model allows'}",
        f"    Max Output Tokens:   {main.output or 'leave empty'}",
        "",
        "Other chat models (Model ID, Context Window Size, Max Output Tokens, images):",
    ]
    lines += [f"  {m.id:<36} {m.context or '-':>7} {m.output or '-':>7}  "
              f"{'images' if m.vision else ''}".rstrip()
              for m in models if m is not main]
    notes = [f"the Request Timeout in Cline's advanced settings: {cold_start_seconds(config)} s "
             "or more covers a cold start"]
    caveats = _caveats(models, main, False, CLINE_PROMPT_TOKENS, "Cline")
    return Integration("\n".join(lines) + "\n", notes + caveats + _notes_of(models, main, caveats))


def continue_dev(config: Config, url: str, key: str | None, main: ClientModel,
                 models: list[ClientModel]) -> Integration:
    entries = []
    for m in sorted(models, key=lambda m: m is not main):
        entry: dict[str, object] = {
            "name": m.id, "provider": "openai", "model": m.id, "apiBase": url,
            "apiKey": _key(key, "continue"),
            "roles": ["chat", "edit", "apply", "summarize"] if m.utility
            else ["chat", "edit", "apply"]}
        caps = [c for c, on in (("tool_use", m.tools), ("image_input", m.vision)) if on]
        if caps:
            entry["capabilities"] = caps
        if m.context:
            entry["defaultCompletionOptions"] = {"contextLength": m.context,
                                                 "maxTokens": m.output}
        entry["requestOptions"] = {"timeout": cold_start_seconds(config)}
        entries.append(entry)
    for m in config.models.values():
        if not m.enabled:
            continue
        for cap, role in (("embeddings", "embed"), ("rerank", "rerank")):
            if cap in m.cfg.capabilities:
                entries.append({"name": m.id, "provider": "openai", "model": m.id,
                                "apiBase": url, "apiKey": _key(key, "continue"),
                                "roles": [role]})
    doc = {"name": "sparkstack", "version": "1.0.0", "schema": "v1", "models": entries}
    notes = ["save as ~/.continue/config.yaml (or merge its models into yours)"]
    if key is None:
        notes.append(f"put {KEY_ENV}=<your key> in ~/.continue/.env (Continue's secrets)")
    notes.append("autocomplete needs a fill-in-the-middle model; none is marked in the "
                 "catalog, so no model gets that role")
    caveats = _caveats(models, main, False, None, "Continue")
    return Integration(yaml.safe_dump(doc, sort_keys=False),
                       notes + caveats + _notes_of(models, main, caveats))


def openwebui(config: Config, url: str, key: str | None, main: ClientModel,
              models: list[ClientModel]) -> Integration:
    shown = _key(key, "shell")
    utility = utility_model(models)
    lines = [
        f"OPENAI_API_BASE_URL={url}",
        f"OPENAI_API_KEY={shown}",
        "ENABLE_OLLAMA_API=False",
        f"TASK_MODEL_EXTERNAL={(utility or main).id}",
        f"AIOHTTP_CLIENT_TIMEOUT={cold_start_seconds(config)}",
    ]
    embed = next((m for m in config.models.values()
                  if m.enabled and "embeddings" in m.cfg.capabilities), None)
    if embed is not None:
        lines += ["RAG_EMBEDDING_ENGINE=openai", f"RAG_OPENAI_API_BASE_URL={url}",
                  f"RAG_OPENAI_API_KEY={shown}", f"RAG_EMBEDDING_MODEL={embed.id}"]
    notes = [
        "environment of the Open WebUI container or process (docker run -e ..., or an "
        "env file); Open WebUI reads them on its first start, later changes go through "
        "Admin Settings > Connections",
        f"titles, tags and follow-ups run on {(utility or main).id} "
        f"({'the utility model, always loaded' if utility else 'the main model'})",
        "Open WebUI in Docker: 127.0.0.1 is the container itself; use "
        "http://host.docker.internal:PORT/v1 (docker run --add-host="
        "host.docker.internal:host-gateway) and a listen address the container reaches",
    ]
    if key is None:
        notes.append(f"${{{KEY_ENV}}} is expanded by a shell or docker compose, not by "
                     "docker --env-file: there, use --with-key")
    return Integration("\n".join(lines) + "\n", notes + _notes_of(models, main, []))


def aider(config: Config, url: str, key: str | None, main: ClientModel,
          models: list[ClientModel]) -> Integration:
    meta = {}
    for m in models:
        if not m.context:
            continue
        meta[f"openai/{m.id}"] = {
            "max_tokens": m.output, "max_input_tokens": m.context,
            "max_output_tokens": m.output, "input_cost_per_token": 0.0,
            "output_cost_per_token": 0.0, "litellm_provider": "openai", "mode": "chat",
            "supports_function_calling": m.tools, "supports_vision": m.vision}
    utility = utility_model(models)
    weak = f" --weak-model openai/{utility.id}" if utility else ""
    notes = [
        "save as .aider.model.metadata.json (in your project or home directory), then:",
        f"  export OPENAI_API_BASE={url}",
        f"  export OPENAI_API_KEY={_key(key, 'shell')}",
        f"  aider --model openai/{main.id}{weak} "
        "--model-metadata-file .aider.model.metadata.json",
    ]
    caveats = _caveats(models, main, False, None, "aider")
    return Integration(json.dumps(meta, indent=2) + "\n",
                       notes + caveats + _notes_of(models, main, caveats))


def env(config: Config, url: str, key: str | None, main: ClientModel,
        models: list[ClientModel]) -> Integration:
    lines = [f"export OPENAI_BASE_URL={url}",
             f"export OPENAI_API_BASE={url}  # older tools read this name",
             f'export OPENAI_API_KEY="{_key(key, "shell")}"']
    notes = [f"any OpenAI SDK or tool; models: {', '.join(m.id for m in models)} "
             f"(default suggestion: {main.id})"]
    return Integration("\n".join(lines) + "\n", notes)


GENERATORS = {"opencode": opencode, "cline": cline, "continue": continue_dev,
              "openwebui": openwebui, "aider": aider, "env": env}


def generate(client: str, config: Config, *, key: str | None = None, url: str | None = None,
             model: str | None = None) -> Integration:
    """The configuration of `client` for this catalog. `key`: the literal API key to
    embed (None: an environment reference). Raises ValueError for an unknown client or
    model."""
    if client not in GENERATORS:
        raise ValueError(f"unknown client {client!r} (one of: {', '.join(CLIENTS)})")
    models = chat_models(config)
    main = main_model(models, model, "chat" if client in ("openwebui", "env") else "coder")
    address, notes = base_url(config, url)
    out = GENERATORS[client](config, address, key, main, models)
    out.notes = notes + out.notes
    return out
