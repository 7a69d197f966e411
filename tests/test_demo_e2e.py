"""The demo catalog, as a new user meets it: the chat model is really given the prompt.

These tests assert meaning, not shapes: the user's words reach the model, answers
depend on the prompt (and only on it, at temperature 0), tools and tool results reach
the model, a coding agent's real request shape is answered, and the context that
/v1/models advertises is the context a request gets. Real llama-server, real models,
the official openai SDK. With CI=true they fail (not skip) when the engine is missing.
"""

from __future__ import annotations

import aiohttp
import openai
import pytest

from .conftest import KEY

pytestmark = pytest.mark.e2e

WEATHER_TOOL = {"type": "function", "function": {
    "name": "get_weather", "description": "Get the current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                   "required": ["city"]}}}


def sdk(url: str) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0, timeout=180)


async def ask(client: openai.AsyncOpenAI, text: str, **kw):
    return await client.chat.completions.create(
        model="smol-chat", messages=[{"role": "user", "content": text}], temperature=0,
        max_tokens=kw.pop("max_tokens", 32), **kw)


async def engine_prompt(gw, model: str, body: dict) -> str:
    """The prompt the engine builds from a chat body (llama-server's /apply-template)."""
    upstream = gw.supervisor.upstream(model)
    async with aiohttp.ClientSession(headers=upstream.headers) as http, http.post(
            upstream.base_url + "/apply-template", json=body) as resp:
        assert resp.status == 200
        return (await resp.json())["prompt"]


async def test_the_chat_model_answers_what_it_was_asked(start_gateway, demo):
    gw = await start_gateway(demo)
    client = sdk(gw.url)
    paris = await ask(client, "What is the capital of France?")
    assert "Paris" in paris.choices[0].message.content
    again = await ask(client, "What is the capital of France?")
    assert again.choices[0].message.content == paris.choices[0].message.content, \
        "temperature 0: the same prompt gives the same answer"
    other = await ask(client, "Name a fruit that is yellow.")
    assert other.choices[0].message.content != paris.choices[0].message.content

    short = await ask(client, "Hi.", max_tokens=1)
    long = await ask(client, "Hi. " + "Tell me about the sea and the sky. " * 40, max_tokens=1)
    assert long.usage.prompt_tokens > short.usage.prompt_tokens + 300, \
        "prompt_tokens grows with the prompt"

    prompt = await engine_prompt(gw, "smol-chat", {"messages": [
        {"role": "system", "content": "You answer like a pirate."},
        {"role": "user", "content": "Where is the treasure?"}]})
    assert "You answer like a pirate." in prompt and "Where is the treasure?" in prompt
    await client.close()


async def test_tools_and_tool_results_reach_the_model(start_gateway, demo):
    gw = await start_gateway(demo)
    client = sdk(gw.url)
    question = {"role": "user", "content": "What is the weather in Paris?"}
    first = await client.chat.completions.create(
        model="smol-chat", messages=[question], tools=[WEATHER_TOOL], temperature=0,
        max_tokens=24)
    assert first.choices[0].message.content or first.choices[0].message.tool_calls
    prompt = await engine_prompt(gw, "smol-chat", {"messages": [question],
                                                   "tools": [WEATHER_TOOL]})
    assert "get_weather" in prompt and "Get the current weather in a city" in prompt

    # The rest of the round trip: the client runs the tool and sends its result back.
    call = {"id": "call_1", "type": "function",
            "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}
    answer = await client.chat.completions.create(
        model="smol-chat", tools=[WEATHER_TOOL], temperature=0, max_tokens=40, messages=[
            question, {"role": "assistant", "content": None, "tool_calls": [call]},
            {"role": "tool", "tool_call_id": "call_1",
             "content": "18 degrees Celsius and sunny"}])
    assert "18" in answer.choices[0].message.content, "the answer uses the tool's result"
    await client.close()


async def test_a_coding_agents_request_is_answered_within_the_advertised_context(
        start_gateway, demo):
    """OpenCode's first request: a ~2k-token system prompt plus tools, streamed."""
    gw = await start_gateway(demo)
    client = sdk(gw.url)
    listed = {m.id: m for m in (await client.models.list()).data}
    advertised = listed["smol-chat"].model_extra["context_length"]
    assert advertised == 4096
    system = ("You are an interactive CLI agent that helps users with software "
              "engineering tasks. Use the tools available to you. " * 110)
    tools = [WEATHER_TOOL] + [{"type": "function", "function": {
        "name": name, "description": f"{name} a file in the workspace",
        "parameters": {"type": "object", "properties": {"path": {"type": "string"}},
                       "required": ["path"]}}} for name in ("read", "write", "edit", "glob")]
    stream = await client.chat.completions.create(
        model="smol-chat", stream=True, stream_options={"include_usage": True},
        max_tokens=16, temperature=0, tools=tools,
        messages=[{"role": "system", "content": system},
                  {"role": "user", "content": "List the files in this project."}])
    usage = None
    got_output = False
    async for chunk in stream:
        if chunk.usage:
            usage = chunk.usage
        if chunk.choices and (chunk.choices[0].delta.content
                              or chunk.choices[0].delta.tool_calls):
            got_output = True
    assert got_output and usage is not None
    assert 2000 < usage.prompt_tokens < advertised, usage
    await client.close()
