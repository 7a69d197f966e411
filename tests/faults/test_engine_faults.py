"""Engine faults, injected for real into fake-engine processes behind a real gateway.

Each test asserts what a user notices: the client gets a clear error (or the right
answer), no engine is left running that should not be (the `no_engine_left` fixture
checks the end), the model does not wedge, and the next request works.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import openai
import pytest

from sparkstack.scheduler import State

from ..conftest import KEY, Gateway, fake, pids
from .common import alive, chat, engine, last_event, release, stream, tokens, until_engine

FAULT = "x-fake-fault"


def model(tmp_path: Path, name: str, *args: object, **fields: object) -> str:
    """One fake-engine model; its starts are recorded in <name>.starts."""
    extra = "".join(f"\n      {k}: {v}" for k, v in fields.items())
    return f"""
    {name}:
      command: {fake("--served-name", name, *args, starts=tmp_path / f"{name}.starts")}
      memory_gb: 1{extra}
    """


async def after_backoff(gw: Gateway, model_id: str) -> None:
    """The scheduler refuses a failed model until its back-off ends (a known deadline)."""
    await asyncio.sleep(max(0.0, gw.state(model_id).retry_at - time.monotonic()) + 0.01)


# ------------------------------------------------------------------ starting


async def test_engine_exiting_during_start_fails_fast_then_starts_once_mended(
        start_gateway, tmp_path):
    broken = tmp_path / "broken"
    broken.touch()
    starts = tmp_path / "m.starts"
    gw = await start_gateway(model(tmp_path, "m", "--exit-at-start", "1", "--while-exists",
                                   broken), start_backoff="0.3s")
    began = time.monotonic()
    status, body = await chat(gw, "m")
    assert status == 502 and body["error"]["code"] == "engine_failed"
    assert "exited with code 1 while starting" in body["error"]["message"]
    assert "CUDA error: out of memory" in body["error"]["message"], "the log tail is shown"
    assert time.monotonic() - began < 15, "an exit fails the start at once, not at a timeout"
    assert gw.state("m").state is State.STOPPED and not alive(starts)
    status, body = await stream(gw, "m")  # a streamed request during the back-off
    assert status == 503 and body and "start_backoff" in "".join(body)
    broken.unlink()  # mended
    await after_backoff(gw, "m")
    status, body = await chat(gw, "m")
    assert status == 200 and body["choices"][0]["message"]["content"]
    assert len(pids(starts)) == 2 and alive(starts) == pids(starts)[1:]


async def test_engine_never_healthy_times_out_killed_then_starts_once_mended(
        start_gateway, tmp_path):
    broken = tmp_path / "broken"
    broken.touch()
    starts = tmp_path / "m.starts"
    gw = await start_gateway(model(tmp_path, "m", "--never-ready", "--while-exists", broken,
                                   health_timeout="1s"), start_backoff="0.2s")
    status, body = await stream(gw, "m")  # a streaming client waits on keep-alives
    assert status == 200 and body[0] == ": loading m"
    error = last_event(body)["error"]
    assert error["code"] == "start_timeout" and "health_timeout" in error["message"]
    assert gw.state("m").state is State.STOPPED and not alive(starts), "the engine was killed"
    broken.unlink()
    await after_backoff(gw, "m")
    status, body = await stream(gw, "m")
    assert status == 200 and body[-1] == "data: [DONE]" and tokens(body)
    assert len(pids(starts)) == 2


# ------------------------------------------------------------------ serving


@pytest.mark.parametrize("streamed", [True, False])
async def test_engine_dying_mid_answer_errors_then_restarts(start_gateway, tmp_path, streamed):
    starts = tmp_path / "m.starts"
    gw = await start_gateway(model(tmp_path, "m"))
    assert (await chat(gw, "m"))[0] == 200
    first = pids(starts)[0]
    if streamed:
        status, lines = await stream(gw, "m", headers={FAULT: "die"})
        assert status == 200 and tokens(lines) == "tok0 tok1 ", "what was sent arrived"
        assert last_event(lines)["error"]["code"] == "engine_died"
        assert lines[-1] != "data: [DONE]"
    else:
        status, body = await chat(gw, "m", headers={FAULT: "die"})
        assert status == 502 and body["error"]["code"] == "engine_unreachable"
    await gw.until_state("m", State.STOPPED)
    assert "code 3" in (gw.state("m").last_error or "")
    assert gw.state("m").stop_reason == "crashed" and not alive(starts)
    status, body = await chat(gw, "m")
    assert status == 200, "the next request starts the engine again"
    assert alive(starts) == [pids(starts)[1]] and first != pids(starts)[1]


async def test_engine_hanging_mid_stream_is_abandoned_after_stream_idle_timeout(
        start_gateway, tmp_path):
    starts = tmp_path / "m.starts"
    gw = await start_gateway(model(tmp_path, "m", "--tokens", "12", "--rate", "4",
                                   stream_idle_timeout="1.5s"))
    # Slower than the bound in total (~3 s), but never silent that long: not cut.
    status, lines = await stream(gw, "m")
    assert status == 200 and lines[-1] == "data: [DONE]" and len(tokens(lines).split()) == 12
    port = gw.supervisor.ports["m"]
    began = time.monotonic()
    status, lines = await stream(gw, "m", headers={FAULT: "hang"})
    waited = time.monotonic() - began
    assert status == 200 and tokens(lines) == "tok0 "
    error = last_event(lines)["error"]
    assert error["code"] == "engine_stalled" and "stream_idle_timeout" in error["message"]
    assert "1.5 s" in error["message"] and waited >= 1.4
    # The gateway closed the engine's connection: the engine's handler was cancelled.
    stats = await until_engine(port, "hung", 0)
    assert stats["cancelled_streams"] == 1 and stats["active_streams"] == 0
    assert gw.state("m").state is State.READY and not gw.state("m").active, "not wedged"
    status, lines = await stream(gw, "m")
    assert lines[-1] == "data: [DONE]" and alive(starts) == pids(starts), "same engine"


async def test_engine_silent_before_its_headers_answers_504(start_gateway, tmp_path):
    gw = await start_gateway(model(tmp_path, "m", stream_idle_timeout="1s"))
    assert (await chat(gw, "m"))[0] == 200
    status, body = await chat(gw, "m", headers={FAULT: "hang"})
    assert status == 504 and body["error"]["code"] == "engine_stalled"
    assert body["error"]["type"] == "timeout_error"
    await until_engine(gw.supervisor.ports["m"], "hung", 0)
    assert (await chat(gw, "m"))[0] == 200


async def test_engine_hanging_during_a_cold_streamed_request_ends_with_an_error_event(
        start_gateway, tmp_path):
    gw = await start_gateway(model(tmp_path, "m", "--start-delay", "0.3",
                                   stream_idle_timeout="1s"), keepalive_interval="0.2s")
    status, lines = await stream(gw, "m", headers={FAULT: "hang"})
    assert status == 200 and lines[0] == ": loading m"
    assert last_event(lines)["error"]["code"] == "engine_stalled"
    status, lines = await stream(gw, "m")
    assert lines[-1] == "data: [DONE]"


async def test_engine_ignoring_sigterm_is_killed_after_stop_timeout_and_restarts(
        start_gateway, tmp_path):
    starts = tmp_path / "m.starts"
    gw = await start_gateway(model(tmp_path, "m", "--ignore-sigterm", stop_timeout="1s"))
    assert (await chat(gw, "m"))[0] == 200
    began = time.monotonic()
    unload = asyncio.create_task(gw.supervisor.unload("m"))
    await gw.until_state("m", State.STOPPING)
    status, body = await chat(gw, "m")  # arrives while the stubborn engine is stopping
    assert status == 200, body
    assert time.monotonic() - began >= 0.9, "SIGTERM was ignored: killed after stop_timeout"
    await unload
    assert len(pids(starts)) == 2
    assert alive(starts) == pids(starts)[1:], "the old engine was SIGKILLed, the new one serves"
    assert "stopping (unloaded)" in "\n".join(gw.supervisor.logs["m"].tail(100))


async def test_engine_answering_500_passes_an_openai_error_and_the_model_serves_on(
        start_gateway, tmp_path):
    starts = tmp_path / "m.starts"
    gw = await start_gateway(model(tmp_path, "m"))
    assert (await chat(gw, "m"))[0] == 200
    status, body = await chat(gw, "m", headers={FAULT: "500"})
    assert status == 500 and "illegal memory access" in body["error"]["message"]
    # A plain-text error page is put in the OpenAI shape, the engine's words quoted.
    status, body = await chat(gw, "m", headers={FAULT: "500-text"})
    assert status == 500 and set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["code"] == "engine_error"
    assert "the engine answered 500: 500 Internal Server Error" in body["error"]["message"]
    status, lines = await stream(gw, "m", headers={FAULT: "500-text"})
    assert status == 500 and "engine_error" in lines[0]
    client = openai.AsyncOpenAI(base_url=gw.url + "/v1", api_key=KEY, max_retries=0)
    with pytest.raises(openai.InternalServerError, match="Internal Server Error"):
        await client.chat.completions.create(
            model="m", messages=[{"role": "user", "content": "hi"}],
            extra_headers={FAULT: "500-text"})
    await client.close()
    assert gw.state("m").state is State.READY and alive(starts) == pids(starts)
    assert (await chat(gw, "m"))[0] == 200


async def test_engine_closing_before_headers_answers_502_and_serves_on(
        start_gateway, tmp_path):
    starts = tmp_path / "m.starts"
    gw = await start_gateway(model(tmp_path, "m"))
    assert (await chat(gw, "m"))[0] == 200
    status, body = await chat(gw, "m", headers={FAULT: "close"})
    assert status == 502 and body["error"]["code"] == "engine_unreachable"
    status, lines = await stream(gw, "m", headers={FAULT: "close"})
    assert status == 502 and "engine_unreachable" in lines[0]
    assert gw.state("m").state is State.READY and len(alive(starts)) == 1
    status, lines = await stream(gw, "m")
    assert lines[-1] == "data: [DONE]"


async def test_engine_sending_invalid_json_and_sse_reaches_the_client_as_sent(
        start_gateway, tmp_path):
    """The relay never parses or rewrites a 200 answer (docs/reliability.md says why): the
    client's SDK sees the engine's malformed bytes and raises; the gateway serves on."""
    starts = tmp_path / "m.starts"
    gw = await start_gateway(model(tmp_path, "m", "--tokens", "3"))
    status, body = await chat(gw, "m", headers={FAULT: "bad-json"})
    assert status == 200 and body == '{"id": "x", "choices": [{"message": {"content": "tok0'
    status, lines = await stream(gw, "m", headers={FAULT: "bad-json"})
    assert status == 200 and "this line is not an event" in lines
    assert lines[-1] == "data: [DONE]", "the engine's stream went on and was relayed whole"
    client = openai.AsyncOpenAI(base_url=gw.url + "/v1", api_key=KEY, max_retries=0)
    with pytest.raises(ValueError):  # the SDK's JSONDecodeError: the user sees the fault
        await client.chat.completions.create(
            model="m", messages=[{"role": "user", "content": "hi"}],
            extra_headers={FAULT: "bad-json"})
    with pytest.raises(ValueError):  # likewise on the malformed event
        s = await client.chat.completions.create(
            model="m", messages=[{"role": "user", "content": "hi"}], stream=True,
            extra_headers={FAULT: "bad-json"})
        async for _ in s:
            pass
    await client.close()
    # The client gave up mid-stream: the gateway sees it go (or the stream end) a moment
    # later, and then nothing of the request is left.
    await gw.until(lambda: not gw.state("m").active)
    assert gw.state("m").state is State.READY
    assert alive(starts) == pids(starts) and len(pids(starts)) == 1
    status, lines = await stream(gw, "m")
    assert tokens(lines) == "tok0 tok1 tok2 "


async def test_gated_stream_lasts_exactly_until_released(start_gateway, tmp_path):
    """The release gate the fault tests rely on: a stream ends when the test says so."""
    gw = await start_gateway(model(tmp_path, "m", "--gate"))
    task = asyncio.create_task(stream(gw, "m"))
    await gw.until(lambda: bool(gw.state("m").active))
    port = gw.supervisor.ports["m"]
    await until_engine(port, "gated", 1)
    assert not task.done()
    await release(port)
    status, lines = await task
    assert status == 200 and lines[-1] == "data: [DONE]"
    assert (await engine(port, "/stats"))["completed_streams"] == 1
