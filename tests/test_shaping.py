"""Request shaping, rule by rule (pure functions), then through a real gateway."""

from __future__ import annotations

import copy
import hashlib
import json
from typing import Any

import aiohttp
import pytest
import yaml
from aiohttp import web
from aiohttp.test_utils import TestServer

from sparkstack.config import ConfigError, Model, load_config
from sparkstack.engines import Upstream
from sparkstack.errors import ApiError
from sparkstack.gateway.shaping import (
    count_prompt_tokens,
    estimate_prompt,
    prepare,
    rules_for,
    shape,
)

from .conftest import fake, pids

CHAT = "/v1/chat/completions"
TOOLS = [{"type": "function", "function": {"name": "get_weather",
                                           "parameters": {"type": "object"}}}]


def catalog(**models: dict[str, Any]) -> dict[str, Model]:
    entries = {mid: {"command": ["x"], **entry} for mid, entry in models.items()}
    return load_config(text=yaml.safe_dump({"models": entries}), env={}).models


def one(**entry: Any) -> Model:
    return catalog(m=entry)["m"]


def chat(*messages: tuple[str, Any], **extra: Any) -> dict[str, Any]:
    model = extra.pop("model", "m")
    return {"model": model, "messages": [{"role": r, "content": c} for r, c in messages],
            **extra}


def run(body: dict[str, Any], model: Model, endpoint: str = CHAT, **kw: Any):
    before = copy.deepcopy(body)
    shaped = shape(body, rules_for(model), endpoint, **kw)
    assert body == before, "shaping never changes the body it was given"
    return shaped


# ------------------------------------------------------------------ tools


@pytest.mark.parametrize(("entry", "kept"), [
    ({"engine": "vllm", "weights": "w"}, False),
    ({"engine": "vllm", "weights": "w",
      "args": ["--enable-auto-tool-choice", "--tool-call-parser", "hermes"]}, True),
    ({"engine": "vllm", "weights": "w", "args": ["--tool-call-parser=hermes"]}, False),
    ({"engine": "sglang", "weights": "w", "args": ["--tool-call-parser", "qwen25"]}, True),
    ({"engine": "llamacpp", "weights": "w"}, True),  # current llama-server: Jinja by default
    ({"engine": "llamacpp", "weights": "w", "args": ["--no-jinja"]}, False),
    ({"engine": "llamacpp", "weights": "w", "args": ["--no-jinja", "--jinja"]}, True),
    ({"engine": "vllm", "weights": "w", "shaping": {"tools": "auto"}}, True),
    ({"shaping": {"tools": "none"}}, False),
    ({}, True),  # a custom engine is taken at its word
])
def test_tools_are_removed_for_models_without_a_tool_parser(entry, kept):
    body = chat(("user", "weather?"), tools=TOOLS, tool_choice="auto",
                parallel_tool_calls=True, functions=[{"name": "f"}], function_call="auto")
    shaped = run(body, one(**entry))
    if kept:
        assert shaped.body == body and shaped.applied == []
    else:
        assert shaped.applied == ["tools_removed"]
        assert shaped.body == chat(("user", "weather?"))


def test_required_tools_force_a_call_until_a_tool_result_arrives():
    model = one(shaping={"tools": "required"})
    first = run(chat(("user", "weather in Oslo?"), tools=TOOLS), model)
    assert first.body["tool_choice"] == "required" and first.applied == ["tool_choice_required"]
    after = chat(("user", "weather in Oslo?"), ("assistant", ""), ("tool", "12°C"), tools=TOOLS)
    assert run(after, model).body == after, "with the result in hand the model may answer"
    chosen = chat(("user", "hi"), tools=TOOLS, tool_choice="none")
    assert run(chosen, model).body == chosen, "an explicit choice is the client's"
    assert run(chat(("user", "hi")), model).applied == [], "no tools, nothing to force"


# ------------------------------------------------------------------ content


def test_multi_part_text_is_flattened_for_text_only_models():
    parts = [{"type": "text", "text": "first"}, {"type": "text", "text": "second"}]
    shaped = run(chat(("user", parts)), one())
    assert shaped.body["messages"][0]["content"] == "first\nsecond"
    assert shaped.applied == ["flatten_content"]
    vision = one(capabilities=["chat", "vision"])
    assert run(chat(("user", parts)), vision).applied == []


def test_responses_input_parts_are_flattened_too():
    body = {"model": "m", "input": [{"role": "user", "content": [
        {"type": "input_text", "text": "a"}, {"type": "input_text", "text": "b"}]}]}
    shaped = run(body, one(), "/v1/responses")
    assert shaped.body["input"][0]["content"] == "a\nb"


def test_images_to_a_model_without_vision_are_refused_clearly():
    image = [{"type": "text", "text": "what is this?"},
             {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}]
    with pytest.raises(ApiError) as e:
        run(chat(("user", image)), one())
    assert e.value.status == 400 and e.value.code == "images_not_supported"
    assert "'m' does not accept images" in e.value.message
    shaped = run(chat(("user", image)), one(capabilities=["chat", "vision"]))
    assert shaped.body["messages"][0]["content"] == image


# ------------------------------------------------------------------ roles


def test_merge_system_moves_system_text_into_the_first_user_turn():
    model = one(shaping={"merge_system": True})
    shaped = run(chat(("system", "Be brief."), ("user", "Hi"), ("system", "No emoji.")), model)
    assert shaped.body["messages"] == [{"role": "user",
                                        "content": "Be brief.\n\nNo emoji.\n\nHi"}]
    listed = run(chat(("system", "Be brief."),
                      ("user", [{"type": "image_url", "image_url": {"url": "x"}}])),
                 one(capabilities=["chat", "vision"], shaping={"merge_system": True}))
    assert listed.body["messages"][0]["content"][0] == {"type": "text", "text": "Be brief."}
    alone = run(chat(("system", "Be brief."), ("assistant", "Hello")), model)
    assert alone.body["messages"] == [{"role": "user", "content": "Be brief."},
                                      {"role": "assistant", "content": "Hello"}]


def test_merge_consecutive_joins_same_role_turns_but_not_tool_calls():
    model = one(shaping={"merge_consecutive": True})
    call = {"role": "assistant", "content": None,
            "tool_calls": [{"id": "1", "type": "function",
                            "function": {"name": "f", "arguments": "{}"}}]}
    body = chat(("user", "a"), ("user", "b"), ("assistant", "c"))
    body["messages"] += [call, {"role": "tool", "tool_call_id": "1", "content": "r1"},
                         {"role": "tool", "tool_call_id": "2", "content": "r2"}]
    shaped = run(body, model)
    assert [m["role"] for m in shaped.body["messages"]] == [
        "user", "assistant", "assistant", "tool", "tool"]
    assert shaped.body["messages"][0]["content"] == "a\n\nb"
    assert shaped.applied == ["merge_consecutive"]


# ------------------------------------------------------------------ reasoning


QWEN = {"shaping": {"reasoning": {"kwargs": ["enable_thinking"], "default": False}}}


@pytest.mark.parametrize(("extra", "thinking"), [
    ({}, False),  # the model's default
    ({"reasoning_effort": "high"}, True),
    ({"reasoning_effort": " None "}, False),
    ({"reasoning": {"effort": "low"}}, True),
    ({"thinking": True}, True),
    ({"thinking": {"type": "enabled", "budget_tokens": 1024}}, True),
    ({"reasoning_effort": "high", "chat_template_kwargs": {"enable_thinking": False}}, False),
])
def test_reasoning_switches_become_the_templates_kwargs(extra, thinking):
    shaped = run(chat(("user", "hi"), **extra), one(**QWEN))
    assert shaped.body["chat_template_kwargs"]["enable_thinking"] is thinking
    assert not {"reasoning_effort", "reasoning", "thinking"} & set(shaped.body)


def test_engines_that_read_reasoning_effort_get_it_in_one_field():
    model = one(shaping={"reasoning": {"kwargs": [], "effort": "pass"}})
    assert run(chat(("user", "hi"), reasoning={"effort": "High"}),
               model).body["reasoning_effort"] == "high"
    assert run(chat(("user", "hi"), thinking=False), model).body["reasoning_effort"] == "low"
    kept = chat(("user", "hi"), reasoning_effort="medium")
    assert run(kept, model).applied == []
    assert run(chat(("user", "hi"), reasoning_effort="high"), one()).applied == [], \
        "a model that declares no reasoning gets the request as sent"


# ------------------------------------------------------------------ defaults and strip


def test_defaults_fill_gaps_and_strip_always_removes():
    model = one(shaping={"defaults": {"temperature": 0.6, "stop": ["<|end|>"]},
                         "strip": ["logit_bias", "user"]})
    shaped = run(chat(("user", "hi"), temperature=1.0, logit_bias={"1": 5}, user="u1"), model)
    assert shaped.body["temperature"] == 1.0, "the client's value wins"
    assert shaped.body["stop"] == ["<|end|>"]
    assert "logit_bias" not in shaped.body and "user" not in shaped.body
    assert shaped.applied == ["strip", "defaults"]
    assert run({"model": "m", "input": [1, 2]}, model, "/v1/embeddings").applied == []


def test_stripping_what_a_request_needs_is_a_config_error():
    with pytest.raises(ConfigError, match="cannot strip messages"):
        one(shaping={"strip": ["messages"]})


# ------------------------------------------------------------------ context fit


SMALL = {"max_model_len": 1000}


def test_max_tokens_is_clamped_so_prompt_and_answer_fit():
    shaped = run(chat(("user", "hi"), max_tokens=5000, max_completion_tokens=4000),
                 one(**SMALL), prompt_tokens=200)
    assert shaped.body["max_tokens"] == 800 and shaped.body["max_completion_tokens"] == 800
    assert shaped.applied == ["max_tokens_clamped"]
    roomy = run(chat(("user", "hi"), max_tokens=100), one(**SMALL), prompt_tokens=200)
    assert roomy.body["max_tokens"] == 100 and roomy.applied == []


@pytest.mark.parametrize("bad", [-1, 0, "512", True, 1.5])
def test_invalid_max_tokens_are_dropped(bad):
    shaped = run(chat(("user", "hi"), max_tokens=bad), one(**SMALL))
    assert "max_tokens" not in shaped.body and shaped.applied == ["max_tokens_dropped"]


def test_a_prompt_that_cannot_fit_is_refused_with_the_numbers():
    shaped = run(chat(("user", "hi")), one(**SMALL), prompt_tokens=1030)
    assert shaped.overflow is not None and shaped.overflow.status == 400
    assert shaped.overflow.message.startswith("prompt is 1030 tokens; m accepts 1000")
    assert shaped.overflow.code == "context_length_exceeded"
    guessed = run(chat(("user", "word " * 2000)), one(**SMALL))
    assert guessed.overflow is not None
    assert guessed.overflow.message.startswith(f"prompt is about {guessed.prompt_tokens} tokens")


def test_an_estimate_near_the_limit_asks_for_an_exact_count_and_refuses_nothing():
    body = chat(("user", "x" * 3700), max_tokens=500)  # ~930 tokens by the estimate
    shaped = run(body, one(**SMALL))
    assert shaped.count_wanted and not shaped.exact and shaped.overflow is None
    assert "max_tokens" not in shaped.body, "the engine uses whatever room is left"
    far = run(chat(("user", "hello"), max_tokens=100), one(**SMALL))
    assert not far.count_wanted and far.applied == []


def test_responses_and_completions_bound_their_own_fields():
    model = one(**SMALL)
    responses = run({"model": "m", "input": "hi", "max_output_tokens": 4000}, model,
                    "/v1/responses", prompt_tokens=100)
    assert responses.body["max_output_tokens"] == 900
    tokens = run({"model": "m", "prompt": list(range(990)), "max_tokens": 50}, model,
                 "/v1/completions")
    assert tokens.exact and tokens.body["max_tokens"] == 10, "token ids are counted exactly"


def test_a_llama_cpp_request_may_use_the_whole_max_model_len():
    """The template gives each of llama-server's slots max_model_len tokens, so the limit
    a request is shaped against is the context /v1/models advertises."""
    model = one(engine="llamacpp", weights="w", max_model_len=4096, args=["--parallel", "2"])
    assert rules_for(model).context == 4096
    shaped = run(chat(("user", "hi")), model, prompt_tokens=5000)
    assert "m accepts 4096 (max_model_len 4096" in shaped.overflow.message


def test_estimates_count_text_not_base64_images():
    image = {"type": "image_url", "image_url": {"url": "data:image/png;base64," + "A" * 10**6}}
    assert estimate_prompt(chat(("user", [image])), "chat") < 600
    assert 240 <= estimate_prompt(chat(("user", "word " * 200)), "chat") <= 270
    assert estimate_prompt(chat(("user", "漢字" * 100)), "chat") >= 150


def test_context_fallback_must_be_a_longer_model():
    with pytest.raises(ConfigError, match="'big' is not a model"):
        catalog(a={"max_model_len": 10, "context_fallback": "big"})
    with pytest.raises(ConfigError, match="not longer than"):
        catalog(a={"max_model_len": 10, "context_fallback": "b"}, b={"max_model_len": 10})
    models = catalog(a={"max_model_len": 10, "context_fallback": "bee"},
                     b={"max_model_len": 20, "aliases": ["bee"]})
    assert rules_for(models["a"]).fallback == "bee"


# ------------------------------------------------------------------ counting by the engine


async def tokenizer(kind: str) -> TestServer:
    """A stand-in for an engine's tokenizer endpoints that records what it was asked."""
    seen: list[tuple[str, dict[str, Any]]] = []

    async def handle(request: web.Request) -> web.Response:
        body = await request.json()
        seen.append((request.path, body))
        if request.path == "/apply-template":
            return web.json_response({"prompt": "<start>" + json.dumps(body["messages"])})
        if kind == "vllm":
            return web.json_response({"count": 1234, "max_model_len": 2000, "tokens": []})
        return web.json_response({"tokens": list(range(len(body["content"]) // 10))})

    app = web.Application()
    app.router.add_post("/{tail:.*}", handle)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    server.seen = seen  # type: ignore[attr-defined]
    return server


async def test_vllm_counts_chat_prompts_with_its_template():
    server = await tokenizer("vllm")
    model = one(engine="vllm", weights="w", max_model_len=2000)
    body = chat(("user", "hi"), tools=TOOLS)
    async with aiohttp.ClientSession() as session:
        n = await count_prompt_tokens(session, Upstream(str(server.make_url("")).rstrip("/"),
                                                        {}), rules_for(model), CHAT, body, "m")
    await server.close()
    assert n == 1234
    path, sent = server.seen[0]
    assert path == "/tokenize" and sent["add_generation_prompt"] is True
    assert sent["messages"] == body["messages"] and sent["model"] == "m"


async def test_llama_cpp_counts_the_applied_template():
    server = await tokenizer("llamacpp")
    model = one(engine="llamacpp", weights="w", max_model_len=2000)
    body = chat(("user", "hello"))
    templated = "<start>" + json.dumps(body["messages"])
    async with aiohttp.ClientSession() as session:
        n = await count_prompt_tokens(session, Upstream(str(server.make_url("")).rstrip("/"),
                                                        {}), rules_for(model), CHAT, body, "m")
    await server.close()
    assert [p for p, _ in server.seen] == ["/apply-template", "/tokenize"]
    assert server.seen[1][1] == {"content": templated, "add_special": True}
    assert n == len(templated) // 10


async def test_prepare_counts_exactly_only_when_the_engine_runs():
    server = await tokenizer("vllm")  # says 1234 tokens
    model = one(engine="vllm", weights="w", max_model_len=2000)
    body = chat(("user", "x" * 100), max_tokens=1990)
    upstream = Upstream(str(server.make_url("")).rstrip("/"), {})

    async def shaped(running: bool):
        async with aiohttp.ClientSession() as session:
            return await prepare(body, model, CHAT, resolve=lambda n: None,
                                 upstream=lambda mid: upstream if running else None,
                                 session=session, may_use=lambda m: True)

    cold = await shaped(False)
    warm = await shaped(True)
    await server.close()
    assert warm.body["max_tokens"] == 2000 - 1234
    assert cold.body["max_tokens"] > 1900, "by the estimate, a short prompt leaves more room"
    assert len(server.seen) == 1


async def test_prepare_sends_a_long_prompt_to_the_fallback_or_refuses():
    models = catalog(small={"max_model_len": 100, "context_fallback": "big"},
                     big={"max_model_len": 10000, "shaping": {"tools": "none"}})
    body = chat(("user", "word " * 500), tools=TOOLS)

    async def run_prepare(may_use):
        return await prepare(body, models["small"], CHAT, resolve=models.get,
                             upstream=lambda mid: None, session=None,  # type: ignore[arg-type]
                             may_use=may_use)

    served = await run_prepare(lambda m: True)
    assert served.model.id == "big"
    assert served.applied == ["tools_removed", "context_fallback"], "big's own rules apply"
    with pytest.raises(ApiError) as e:
        await run_prepare(lambda m: m.id != "big")
    assert e.value.code == "context_length_exceeded" and "small accepts 100" in e.value.message


# ------------------------------------------------------------------ through the gateway


async def engine_saw(gw, model_id: str) -> dict[str, Any]:
    async with aiohttp.ClientSession() as s, s.get(
            f"http://127.0.0.1:{gw.supervisor.ports[model_id]}/stats") as r:
        return (await r.json())["last_body"]


async def test_the_gateway_shapes_before_the_engine_sees_the_request(start_gateway, tmp_path):
    gw = await start_gateway(f"""
    plain:
      command: {fake("--served-name", "plain")}
      memory_gb: 1
      max_model_len: 4096
      shaping: {{tools: none, merge_system: true, defaults: {{temperature: 0.2}}}}
    """)
    payload = chat(("system", "Be brief."), ("user", "hi"), tools=TOOLS, max_tokens=9000)
    payload["model"] = "plain"
    async with gw.http.post(gw.url + CHAT, json=payload) as resp:
        assert resp.status == 200, await resp.text()
        header = resp.headers["x-sparkstack-shaped"]
    assert header == "tools_removed,merge_system,defaults,max_tokens_clamped"
    seen = await engine_saw(gw, "plain")
    assert "tools" not in seen and seen["temperature"] == 0.2
    assert seen["messages"] == [{"role": "user", "content": "Be brief.\n\nhi"}]
    assert seen["max_tokens"] < 4096
    untouched = json.dumps(chat(("user", "hi"), model="plain", temperature=0.7)).encode()
    async with gw.http.post(gw.url + CHAT, data=untouched,
                            headers={"Content-Type": "application/json"}) as resp:
        assert resp.status == 200 and "x-sparkstack-shaped" not in resp.headers
        assert resp.headers["x-fake-body-sha256"] == hashlib.sha256(untouched).hexdigest(), \
            "a request no rule changes goes upstream byte for byte"


async def test_refusals_come_before_any_engine_starts(start_gateway, tmp_path):
    starts = tmp_path / "t.starts"
    gw = await start_gateway(f"""
    tiny:
      command: {fake(starts=starts)}
      memory_gb: 1
      max_model_len: 256
    """)
    status, body = await gw.chat("tiny", messages=[{"role": "user", "content": "word " * 2000}])
    assert status == 400 and body["error"]["code"] == "context_length_exceeded"
    assert "tiny accepts 256" in body["error"]["message"]
    image = [{"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}]
    status, body = await gw.chat("tiny", messages=[{"role": "user", "content": image}])
    assert status == 400 and body["error"]["code"] == "images_not_supported"
    assert pids(starts) == [], "nothing was loaded for requests it could not serve"


async def test_a_long_prompt_is_served_by_the_context_fallback(start_gateway, tmp_path):
    small, big = tmp_path / "s.starts", tmp_path / "b.starts"
    gw = await start_gateway(f"""
    small:
      command: {fake("--served-name", "small", starts=small)}
      memory_gb: 1
      max_model_len: 256
      context_fallback: big
    big:
      command: {fake("--served-name", "big", starts=big)}
      memory_gb: 1
      max_model_len: 32768
    """)
    payload = chat(("user", "word " * 2000))
    payload["model"] = "small"
    async with gw.http.post(gw.url + CHAT, json=payload) as resp:
        body = await resp.json()
        assert resp.status == 200, body
        assert resp.headers["x-sparkstack-served-by"] == "big"
        assert "context_fallback" in resp.headers["x-sparkstack-shaped"]
    assert body["model"] == "big"
    assert pids(small) == [] and len(pids(big)) == 1

