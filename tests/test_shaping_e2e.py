"""Request shaping against the real engine (llama.cpp's llama-server on Gemma 3 270M):
prompts are counted by the engine's own template and tokenizer, answers are clamped to
the room left, overflowing prompts are refused with the engine's numbers, and tools sent
to a model without a tool parser are removed so the request is answered."""

from __future__ import annotations

import re

import aiohttp
import pytest

from sparkstack.scheduler import State

from .test_e2e_llamacpp import gguf, llama, sdk  # noqa: F401  (gguf: a fixture)

pytestmark = pytest.mark.e2e

CTX = 256  # small: a 2-core machine evaluates prompts slowly
TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]


async def load(gw, model: str) -> aiohttp.ClientSession:
    """Start the model (exact counting needs a running engine); a session that talks to
    the engine directly, bypassing the gateway."""
    async with gw.http.post(f"{gw.url}/api/models/{model}/load") as resp:
        assert resp.status == 200, await resp.text()
    return aiohttp.ClientSession(headers=gw.supervisor.upstream(model).headers)


async def test_overflowing_answers_are_clamped_and_prompts_refused_with_exact_numbers(
        start_gateway, gguf):  # noqa: F811
    gw = await start_gateway(llama(gguf, "small", "--parallel", "1", ctx=CTX), memory_gb=1)
    client = sdk(gw.url)
    status, body = await gw.chat("small", messages=[{"role": "user", "content": "word " * 900}])
    assert status == 400 and body["error"]["code"] == "context_length_exceeded"
    assert re.match(r"prompt is about \d+ tokens \(estimated\); small accepts 256",
                    body["error"]["message"])
    assert gw.state("small").state is State.STOPPED, "refused without loading the model"

    direct = await load(gw, "small")
    engine = gw.supervisor.upstream("small").base_url
    words = "word " * 300
    status, body = await gw.chat("small", messages=[{"role": "user", "content": words}])
    async with direct.post(engine + "/v1/chat/completions", json={
            "messages": [{"role": "user", "content": words}], "max_tokens": 4}) as resp:
        own = (await resp.json())["error"]
    assert resp.status == 400 and own["n_ctx"] == CTX
    assert status == 400, body
    assert body["error"]["message"].startswith(
        f"prompt is {own['n_prompt_tokens']} tokens; small accepts {CTX}"), \
        "the gateway's count is the engine's own"

    prompt = "Tell me a story about a lighthouse keeper. " * 22  # ~220 of the 256 tokens
    raw = await client.chat.completions.with_raw_response.create(
        model="small", messages=[{"role": "user", "content": prompt}], max_tokens=4096,
        extra_body={"ignore_eos": True})
    reply = raw.parse()
    assert "max_tokens_clamped" in raw.headers["x-sparkstack-shaped"]
    room = CTX - reply.usage.prompt_tokens
    assert reply.choices[0].finish_reason == "length"
    assert room - 1 <= reply.usage.completion_tokens <= room, "clamped to exactly the room"
    await direct.close()
    await client.close()


async def test_tools_sent_to_a_model_without_a_tool_parser_are_removed(start_gateway, gguf):  # noqa: F811
    gw = await start_gateway(llama(gguf, "plain", "--no-jinja", ctx=CTX), memory_gb=1)
    direct = await load(gw, "plain")
    request = {"messages": [{"role": "user", "content": "What is the weather in Oslo?"}],
               "tools": TOOLS, "tool_choice": "auto", "max_tokens": 8}
    async with direct.post(gw.supervisor.upstream("plain").base_url + "/v1/chat/completions",
                           json=request) as resp:
        assert resp.status >= 400 and "jinja" in (await resp.text()), \
            "the engine itself refuses tools without a tool parser"
    await direct.close()

    client = sdk(gw.url)
    raw = await client.chat.completions.with_raw_response.create(model="plain", **request)
    reply = raw.parse()
    assert raw.headers["x-sparkstack-shaped"] == "tools_removed"
    assert reply.choices[0].message.content and not reply.choices[0].message.tool_calls
    await client.close()
