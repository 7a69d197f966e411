"""The gateway end to end: real fake-engine processes behind a real gateway."""

from __future__ import annotations

import asyncio
import hashlib
import json
import time
from pathlib import Path

import aiohttp
import openai
import pytest

from sparkstack.scheduler import State

from .conftest import KEY, fake, pid_alive, pids

# The fake engine holds a stream sent with this header after its first chunk, until the
# test releases the gate (Gateway.release): no test relies on a stream lasting long enough.
HELD = {"x-fake-gate": "held"}


def two_models(tmp_path: Path, *extra: object, ttl: str = "20m") -> tuple[str, Path, Path]:
    sa, sb = tmp_path / "a.starts", tmp_path / "b.starts"
    yaml = f"""
    a:
      command: {fake("--served-name", "a", *extra, starts=sa)}
      memory_gb: 6
      ttl: {ttl}
      aliases: [alpha]
      capabilities: [chat, completions, transcription]
    b:
      command: {fake("--served-name", "b-served", *extra, starts=sb)}
      memory_gb: 6
      served_name: b-served
      capabilities: [chat, embeddings]
    """
    return yaml, sa, sb


# ------------------------------------------------------------------ cold start


async def test_twenty_concurrent_cold_requests_start_the_engine_once(start_gateway, tmp_path):
    yaml, sa, _ = two_models(tmp_path, "--start-delay", "0.5")
    gw = await start_gateway(yaml)
    results = await asyncio.gather(*(gw.chat("a") for _ in range(20)))
    assert [status for status, _ in results] == [200] * 20
    assert all(body["choices"][0]["message"]["content"] for _, body in results)
    assert len(pids(sa)) == 1


async def test_openai_sdk_chat_streaming_and_not(start_gateway, tmp_path):
    yaml, _, _ = two_models(tmp_path, "--tokens", "6")
    gw = await start_gateway(yaml)
    client = openai.AsyncOpenAI(base_url=gw.url + "/v1", api_key=KEY, max_retries=0)
    reply = await client.chat.completions.create(
        model="a", messages=[{"role": "user", "content": "hello"}])
    assert reply.choices[0].message.content == "tok0 tok1 tok2 tok3 tok4 tok5 "
    stream = await client.chat.completions.create(
        model="b", messages=[{"role": "user", "content": "hello"}], stream=True)
    pieces = [c.choices[0].delta.content async for c in stream if c.choices and
              c.choices[0].delta.content]
    assert pieces == [f"tok{i} " for i in range(6)]
    models = await client.models.list()
    assert [m.id for m in models.data] == ["a", "b"]
    await client.close()


async def test_streaming_request_gets_keepalives_while_the_model_loads(start_gateway, tmp_path):
    yaml, _, _ = two_models(tmp_path, "--start-delay", "1.2")
    gw = await start_gateway(yaml, keepalive_interval="0.3s")
    lines = await gw.stream("a")
    comments = [ln for ln in lines if ln.startswith(":")]
    assert comments[0] == ": loading a"
    assert len(comments) >= 3, lines
    assert lines[-1] == "data: [DONE]"


async def test_models_list_answers_from_the_catalog_without_loading(start_gateway, tmp_path):
    yaml, sa, sb = two_models(tmp_path)
    yaml += """
    off:
      command: [nothing]
      status: disabled
      notes: broken on this build
    """
    gw = await start_gateway(yaml)
    async with gw.http.get(gw.url + "/v1/models") as resp:
        body = await resp.json()
    assert [(m["id"], m["state"]) for m in body["data"]] == [("a", "stopped"), ("b", "stopped")]
    assert not sa.exists() and not sb.exists()
    status, body = await gw.chat("off")
    assert status == 400 and "broken on this build" in body["error"]["message"]


# ------------------------------------------------------------------ swapping


async def test_swap_waits_for_inflight_stream(start_gateway, tmp_path):
    yaml, sa, sb = two_models(tmp_path, "--tokens", "15")
    # No burst hold: the swap is marked at once and waits only for the stream in flight
    # (a burst's hold is the scheduler tests' subject).
    gw = await start_gateway(yaml, burst_gap="0s")
    await gw.chat("a", max_tokens=1)
    stream_a = asyncio.create_task(gw.stream("a", headers=HELD))
    await gw.until(lambda: bool(gw.state("a").active))
    chat_b = asyncio.create_task(gw.chat("b", max_tokens=2))
    await gw.until(lambda: gw.state("a").leaving)
    assert not sb.exists() and not stream_a.done(), "b waits while a streams"
    await gw.release("a", "held")
    status, body = await chat_b
    lines_a = await stream_a
    assert status == 200 and body["model"] == "b-served"
    tokens = [ln for ln in lines_a if ln.startswith("data: {")]
    assert len(tokens) == 16 and lines_a[-1] == "data: [DONE]", "a's stream was never cut"
    assert "error" not in "".join(lines_a)
    assert not pid_alive(pids(sa)[0])
    assert gw.state("a").stop_reason == "evicted for b"


async def test_waiter_that_disconnects_leaves_the_queue(start_gateway, tmp_path):
    yaml, _, sb = two_models(tmp_path)
    gw = await start_gateway(yaml, keepalive_interval="0.1s", burst_gap="0s")
    stream_a = asyncio.create_task(gw.stream("a", headers=HELD))
    await gw.until(lambda: bool(gw.state("a").active))
    waiting = asyncio.create_task(gw.stream("b"))
    await gw.until(lambda: gw.state("a").leaving)
    waiting.cancel()
    await gw.until(lambda: not gw.state("a").leaving)
    assert gw.supervisor.scheduler.queued == 0
    await gw.release("a", "held")
    assert (await stream_a)[-1] == "data: [DONE]"
    assert not sb.exists(), "b never started: nobody wanted it any more"


async def test_reject_policy_answers_429_with_honest_retry_headers(start_gateway, tmp_path):
    yaml, _, _ = two_models(tmp_path)
    gw = await start_gateway(yaml, busy_policy="reject")
    stream_a = asyncio.create_task(gw.stream("a", headers=HELD))
    await gw.until(lambda: bool(gw.state("a").active))
    async with gw.http.post(gw.url + "/v1/chat/completions",
                            json={"model": "b", "messages": []}) as resp:
        body = await resp.json()
        assert resp.status == 429
        assert resp.headers["x-sparkstack-busy-models"] == "a"
        assert 1 <= int(resp.headers["Retry-After"]) <= 60  # no request measured yet: ~15 s
        assert int(resp.headers["retry-after-ms"]) == int(resp.headers["Retry-After"]) * 1000
    assert body["error"]["type"] == "rate_limit_error"
    await gw.release("a", "held")
    assert (await stream_a)[-1] == "data: [DONE]"


# ------------------------------------------------------------------ idle, crash, failure


async def test_idle_model_stops_after_its_ttl(start_gateway, tmp_path):
    yaml, sa, _ = two_models(tmp_path, ttl="0.3s")
    gw = await start_gateway(yaml)
    assert (await gw.chat("a"))[0] == 200
    await gw.until_state("a", State.STOPPED, timeout=10)
    assert gw.state("a").stop_reason == "idle"
    assert not pid_alive(pids(sa)[0])
    assert (await gw.chat("a"))[0] == 200
    assert len(pids(sa)) == 2


async def test_engine_crash_mid_stream_ends_with_error_event_and_restarts(start_gateway, tmp_path):
    starts = tmp_path / "c.starts"
    gw = await start_gateway(f"""
    c:
      command: {fake("--crash-after", "1", "--tokens", "10", "--rate", "50", starts=starts)}
      memory_gb: 1
    """)
    assert (await gw.chat("c"))[0] == 200
    lines = await gw.stream("c")
    event = json.loads(lines[-1].removeprefix("data: "))
    assert event["error"]["code"] == "engine_died"
    await gw.until_state("c", State.STOPPED)
    assert "code 3" in (gw.state("c").last_error or "")
    status, _ = await gw.chat("c")
    assert status == 200 and len(pids(starts)) == 2


async def test_failed_start_reports_log_tail_and_leaves_nothing(start_gateway, tmp_path):
    starts = tmp_path / "f.starts"
    gw = await start_gateway(f"""
    f:
      command: {fake("--exit-at-start", "1", starts=starts)}
      memory_gb: 1
    """, start_backoff="0.2s")
    status, body = await gw.chat("f")
    assert status == 502
    assert "CUDA error: out of memory" in body["error"]["message"]
    assert "exited with code 1" in body["error"]["message"]
    assert gw.state("f").state is State.STOPPED
    # The client's own retry during the back-off gets the same error at once: the
    # broken engine is not started again for it.
    status, body = await gw.chat("f")
    assert status == 503 and body["error"]["code"] == "start_backoff"
    assert "CUDA error: out of memory" in body["error"]["message"]
    assert len(pids(starts)) == 1
    await asyncio.sleep(max(0.0, gw.state("f").retry_at - time.monotonic()))
    status, _ = await gw.chat("f")  # tried again after the back-off: not wedged
    assert status == 502 and len(pids(starts)) == 2


async def test_start_timeout_answers_504_and_kills_the_engine(start_gateway, tmp_path):
    starts = tmp_path / "n.starts"
    gw = await start_gateway(f"""
    n:
      command: {fake("--never-ready", starts=starts)}
      memory_gb: 1
      health_timeout: 1s
    """)
    status, body = await gw.chat("n")
    assert status == 504 and "health_timeout" in body["error"]["message"]
    assert "fake engine pid=" in body["error"]["message"]
    assert not pid_alive(pids(starts)[0])


async def test_engine_ignoring_sigterm_is_killed_after_the_grace(start_gateway, tmp_path):
    starts = tmp_path / "s.starts"
    gw = await start_gateway(f"""
    s:
      command: {fake("--ignore-sigterm", starts=starts)}
      memory_gb: 1
      stop_timeout: 0.5s
    """)
    assert (await gw.chat("s"))[0] == 200
    async with gw.http.post(gw.url + "/api/models/s/unload") as resp:
        assert resp.status == 200 and (await resp.json())["state"] == "stopped"
    assert not pid_alive(pids(starts)[0])


async def test_unload_waits_for_inflight_unless_forced(start_gateway, tmp_path):
    yaml, _, _ = two_models(tmp_path, "--tokens", "10")
    gw = await start_gateway(yaml)
    stream = asyncio.create_task(gw.stream("a", headers=HELD))
    await gw.until(lambda: bool(gw.state("a").active))
    unload = asyncio.create_task(gw.http.post(gw.url + "/api/models/a/unload"))
    await gw.until(lambda: gw.state("a").leaving)
    assert not unload.done() and gw.state("a").state is State.READY, "waits for the stream"
    await gw.release("a", "held")
    async with await unload as resp:
        assert resp.status == 200
    assert stream.done() and (await stream)[-1] == "data: [DONE]"
    payload = {"model": "a", "messages": [], "stream": True}
    async with gw.http.post(gw.url + "/v1/chat/completions", json=payload,
                            headers=HELD) as stream:
        first = await stream.content.readuntil(b"\n\n")
        assert first.startswith(b"data: {") or first.startswith(b": loading")
        while not first.startswith(b"data: {"):
            first = await stream.content.readuntil(b"\n\n")
        async with gw.http.post(gw.url + "/api/models/a/unload?force=true") as resp:
            assert resp.status == 200
        rest = (await stream.content.read()).decode().strip().splitlines()
    assert "engine_died" in rest[-1], "a forced unload cuts the stream, with an error event"


async def test_load_endpoint_starts_a_model_and_reports_it(start_gateway, tmp_path):
    yaml, sa, _ = two_models(tmp_path)
    gw = await start_gateway(yaml)
    async with gw.http.post(gw.url + "/api/models/a/load") as resp:
        assert resp.status == 200 and (await resp.json())["state"] == "ready"
    async with gw.http.get(gw.url + "/api/models") as resp:
        body = await resp.json()
    a = body["models"][0]
    assert (a["id"], a["state"], a["in_flight"], a["memory_gb"]) == ("a", "ready", 0, 6)
    assert body["memory_used_gb"] == 6 and len(pids(sa)) == 1


async def test_pinned_model_starts_with_the_gateway(start_gateway, tmp_path):
    starts = tmp_path / "u.starts"
    gw = await start_gateway(f"""
    u:
      command: {fake(starts=starts)}
      memory_gb: 1
      pinned: true
    """)
    await gw.until_state("u", State.READY)
    assert len(pids(starts)) == 1


# ------------------------------------------------------------------ the relay


async def test_client_disconnect_mid_stream_cancels_upstream(start_gateway, tmp_path):
    yaml, _, _ = two_models(tmp_path, "--tokens", "200")
    gw = await start_gateway(yaml)
    payload = {"model": "a", "messages": [], "stream": True}
    async with gw.http.post(gw.url + "/v1/chat/completions", json=payload,
                            headers=HELD) as resp:
        while not (await resp.content.readuntil(b"\n\n")).startswith(b"data: {"):
            pass  # keep-alive comments while the model loads
    await gw.until(lambda: not gw.state("a").active, timeout=5)
    port = gw.supervisor.ports["a"]
    async with aiohttp.ClientSession() as s:
        for _ in range(400):  # the engine notices the closed connection: poll, bounded
            async with s.get(f"http://127.0.0.1:{port}/stats") as r:
                stats = await r.json()
            if stats["cancelled_streams"]:
                break
            await asyncio.sleep(0.05)
    assert stats["cancelled_streams"] == 1 and stats["active_streams"] == 0


async def test_200kb_multibyte_body_arrives_intact(start_gateway, tmp_path):
    yaml, _, _ = two_models(tmp_path)
    gw = await start_gateway(yaml)
    text = "größer 😀 €ü 漢字 " * 12000
    body = json.dumps({"model": "a", "echo": True,
                       "messages": [{"role": "user", "content": text}]},
                      ensure_ascii=False).encode()
    assert len(body) > 200_000
    async with gw.http.post(gw.url + "/v1/chat/completions", data=body,
                            headers={"Content-Type": "application/json"}) as resp:
        reply = await resp.json()
        assert resp.headers["x-fake-body-sha256"] == hashlib.sha256(body).hexdigest()
    assert reply["choices"][0]["message"]["content"] == text


async def test_path_form_and_aliases_reach_the_served_name(start_gateway, tmp_path):
    yaml, _, _ = two_models(tmp_path)
    gw = await start_gateway(yaml)
    async with gw.http.post(gw.url + "/v1/b/chat/completions",
                            json={"model": "ignored", "messages": []}) as resp:
        assert (await resp.json())["model"] == "b-served"
    status, body = await gw.chat("alpha")
    assert status == 200 and body["model"] == "a"
    async with gw.http.post(gw.url + "/v1/b/embeddings", json={"input": "x"}) as resp:
        assert len((await resp.json())["data"][0]["embedding"]) == 8
    async with gw.http.post(gw.url + "/v1/a/tokenize", json={"prompt": "x"}) as resp:
        assert (await resp.json())["path"] == "/tokenize"


async def test_multipart_request_routes_by_its_model_field(start_gateway, tmp_path):
    yaml, _, _ = two_models(tmp_path)
    gw = await start_gateway(yaml)
    form = aiohttp.FormData()
    form.add_field("model", "alpha")
    form.add_field("file", b"\x00\x01RIFF" * 1000, filename="a.wav", content_type="audio/wav")
    async with gw.http.post(gw.url + "/v1/audio/transcriptions", data=form) as resp:
        body = await resp.json()
    assert body["path"] == "/v1/audio/transcriptions" and body["model"] == "a"


# ------------------------------------------------------------------ stand-ins


async def test_a_running_model_answers_for_a_task_model_that_would_stop_it(
        start_gateway, tmp_path):
    """Open WebUI's title request beside an exclusive chat model: the chat model answers
    it at once, rather than be stopped for the task model and loaded again."""
    sb, st = tmp_path / "big.starts", tmp_path / "t.starts"
    gw = await start_gateway(f"""
    big:
      command: {fake("--served-name", "big", starts=sb)}
      memory_gb: 2
      exclusive: true
    t:
      command: {fake("--served-name", "t", starts=st)}
      memory_gb: 1
      stand_ins: [big]
    """, api_keys=f'["{KEY}", {{key: "sk-only-t-0123", models: [t]}}]',
        min_residency=0, burst_gap=0)  # the swap below need not wait for big's windows
    assert (await gw.chat("big"))[0] == 200
    async with gw.http.post(gw.url + "/v1/chat/completions", json={
            "model": "t", "messages": [{"role": "user", "content": "Title?"}]}) as resp:
        body = await resp.json()
        assert resp.status == 200 and resp.headers["x-sparkstack-served-by"] == "big"
    assert body["model"] == "big" and pids(st) == [] and len(pids(sb)) == 1
    assert gw.state("big").state is State.READY
    # A key that may not use big gets t itself, which stops big to start.
    async with gw.http.post(gw.url + "/v1/chat/completions", headers={
            "Authorization": "Bearer sk-only-t-0123"}, json={
            "model": "t", "messages": [{"role": "user", "content": "Title?"}]}) as resp:
        body = await resp.json()
        assert resp.status == 200 and "x-sparkstack-served-by" not in resp.headers
    assert body["model"] == "t" and len(pids(st)) == 1
    assert gw.state("big").state is not State.READY


# ------------------------------------------------------------------ auth and errors


async def test_auth_keys_and_admin_keys(start_gateway, tmp_path):
    yaml, _, _ = two_models(tmp_path)
    gw = await start_gateway(
        yaml,
        api_keys=f'["{KEY}", {{key: "sk-only-b-0123", models: ["b"]}}]',
        admin_keys='["sk-admin-0123456"]',
    )
    async with aiohttp.ClientSession() as anon:
        for headers, expected in [
            ({}, 401), ({"Authorization": "Bearer wrong-key-123"}, 401),
            ({"x-api-key": KEY}, 200), ({"Authorization": "Bearer sk-only-b-0123"}, 200),
        ]:
            async with anon.get(gw.url + "/v1/models", headers=headers) as resp:
                assert resp.status == expected
                if expected == 401:
                    assert (await resp.json())["error"]["type"] == "authentication_error"
        limited = {"Authorization": "Bearer sk-only-b-0123"}
        async with anon.post(gw.url + "/v1/chat/completions", headers=limited,
                             json={"model": "a", "messages": []}) as resp:
            assert resp.status == 403
        async with anon.post(gw.url + "/api/models/a/load", headers={"x-api-key": KEY}) as resp:
            assert resp.status == 403 and "admin" in (await resp.json())["error"]["message"]
        async with anon.post(gw.url + "/api/models/a/load",
                             headers={"x-api-key": "sk-admin-0123456"}) as resp:
            assert resp.status == 200
        async with anon.get(gw.url + "/healthz") as resp:
            assert resp.status == 200


@pytest.mark.parametrize(("data", "status", "code"), [
    (b"{not json", 400, "invalid_json"),
    (b'{"messages": []}', 400, "model_required"),
    (b'{"model": "nope", "messages": []}', 404, "model_not_found"),
    (b'["a"]', 400, "invalid_json"),
    (b'{"model": "a", "x": "\xff"}', 400, "invalid_body"),
])
async def test_bad_requests_get_openai_shaped_errors(start_gateway, tmp_path, data, status, code):
    yaml, sa, _ = two_models(tmp_path)
    gw = await start_gateway(yaml, max_body_mb=0.5)
    async with gw.http.post(gw.url + "/v1/chat/completions", data=data,
                            headers={"Content-Type": "application/json"}) as resp:
        body = await resp.json()
    assert resp.status == status and body["error"]["code"] == code
    assert set(body["error"]) == {"message", "type", "param", "code"}
    assert not sa.exists()


async def test_too_large_body_and_unknown_route(start_gateway, tmp_path):
    yaml, _, _ = two_models(tmp_path)
    gw = await start_gateway(yaml, max_body_mb=0.5)
    async with gw.http.post(gw.url + "/v1/chat/completions", data=b"x" * 600_000) as resp:
        assert resp.status == 413 and "max_body_mb" in (await resp.json())["error"]["message"]
    async with gw.http.get(gw.url + "/nothing/here") as resp:
        assert resp.status == 404 and "no route" in (await resp.json())["error"]["message"]


async def test_an_endpoint_the_model_does_not_serve_is_refused_without_loading_it(
        start_gateway, tmp_path):
    yaml, sa, _ = two_models(tmp_path)
    gw = await start_gateway(yaml)
    async with gw.http.post(gw.url + "/v1/embeddings",
                            json={"model": "a", "input": "x"}) as resp:
        body = await resp.json()
    assert resp.status == 400 and body["error"]["code"] == "unsupported_endpoint"
    assert "models that do: b" in body["error"]["message"]
    assert gw.state("a").state is State.STOPPED and not pids(sa), "nothing was loaded"
