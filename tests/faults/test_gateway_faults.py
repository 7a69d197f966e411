"""The gateway itself killed or stopped while it serves: `sparkstack serve` as a
subprocess, process engines behind it (containers: test_docker_faults.py)."""

from __future__ import annotations

import asyncio
import json
import shlex
import signal
import time
from pathlib import Path
from typing import Any

import aiohttp

from ..conftest import KEY, fake, free_port, pid_alive, pids, write_config
from ..test_cli import start_serving
from .common import alive, until_dead

AUTH = {"Authorization": f"Bearer {KEY}"}
HELD = {"x-fake-gate": "held"}  # the fake engine holds this stream until released
LIMIT = aiohttp.ClientTimeout(total=60)  # a test fails, never hangs


def two_engines(tmp_path: Path, *args: str, **settings: str) -> Path:
    models = "".join(f"""
    {m}:
      command: {fake("--served-name", m, *args, starts=tmp_path / f"{m}.starts")}
      memory_gb: 1
    """ for m in ("a", "b"))
    config = write_config(tmp_path, models)
    extra = "".join(f"{k}: {v}\n" for k, v in settings.items())
    config.write_text(extra + config.read_text())
    return config


def body(model: str, stream: bool = True) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": "hi"}], "stream": stream}


async def first_chunk(resp: aiohttp.ClientResponse) -> None:
    """Read until the engine's first chunk (past keep-alive comments while it loads)."""
    assert resp.status == 200
    while not (await resp.content.readuntil(b"\n\n")).startswith(b"data: {"):
        pass


async def engine_ports(http: aiohttp.ClientSession, url: str) -> dict[str, int]:
    async with http.get(url + "/api/models") as resp:
        return {m["id"]: m["port"] for m in (await resp.json())["models"]}


async def until_refused(url: str, timeout: float = 20) -> None:
    """The gateway stopped listening (its first step of a shutdown): a new connection is
    refused (one per try: a kept-alive one would still be answered, with a 503)."""
    connector = aiohttp.TCPConnector(force_close=True)
    async with asyncio.timeout(timeout), aiohttp.ClientSession(connector=connector) as s:
        while True:
            try:
                async with s.get(url + "/healthz"):
                    pass
            except aiohttp.ClientConnectorError:
                return
            await asyncio.sleep(0.02)


async def test_sigkilled_gateway_takes_its_engines_along_and_restarts_clean(tmp_path):
    config = two_engines(tmp_path)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc, _ = await start_serving(config, port)
    try:
        async with aiohttp.ClientSession(headers=AUTH, timeout=LIMIT) as http:
            async with http.post(url + "/api/models/b/load") as resp:
                assert resp.status == 200
            async with http.post(url + "/v1/chat/completions", json=body("a"),
                                 headers=HELD) as streaming:
                await first_chunk(streaming)  # a stream in flight, held at a's gate
                engines = [p for m in ("a", "b") for p in pids(tmp_path / f"{m}.starts")]
                assert len(engines) == 2 and all(map(pid_alive, engines))
                proc.kill()
                await proc.wait()
                try:
                    rest = await streaming.content.read()
                except aiohttp.ClientPayloadError:
                    rest = b""  # the connection was cut mid-body: what a client sees
                assert b"[DONE]" not in rest
            await until_dead(engines)  # PR_SET_PDEATHSIG: no orphan holds memory
            proc, _ = await start_serving(config, port)
            for m in ("a", "b"):
                async with http.post(url + "/v1/chat/completions",
                                     json=body(m, stream=False) | {"max_tokens": 0}) as resp:
                    assert resp.status == 200, await resp.text()
            assert [len(pids(tmp_path / f"{m}.starts")) for m in ("a", "b")] == [2, 2]
            assert not any(map(pid_alive, engines))
    finally:
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 60) == 0


async def test_engines_a_sigkilled_gateway_leaves_are_stopped_at_its_next_start(tmp_path):
    """The SIGTERM of PR_SET_PDEATHSIG cannot stop an engine that ignores it, and never
    reaches a wrapper script's children: the next gateway stops both before it serves."""
    inner = json.loads(fake("--served-name", "wrapped", starts=tmp_path / "wrapped.starts"))
    wrapper = ["sh", "-c", " ".join(shlex.quote(a) for a in inner) + " & wait"]
    config = write_config(tmp_path, f"""
    stubborn:
      command: {fake("--served-name", "stubborn", "--ignore-sigterm",
                     starts=tmp_path / "stubborn.starts")}
      memory_gb: 1
      stop_timeout: 1s
    wrapped:
      command: {json.dumps(wrapper)}
      memory_gb: 1
      stop_timeout: 1s
    """)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc, _ = await start_serving(config, port)
    try:
        async with aiohttp.ClientSession(headers=AUTH, timeout=LIMIT) as http:
            for m in ("stubborn", "wrapped"):
                async with http.post(url + f"/api/models/{m}/load") as resp:
                    assert resp.status == 200, await resp.text()
            engines = [p for m in ("stubborn", "wrapped") for p in pids(tmp_path / f"{m}.starts")]
            assert len(engines) == 2
            proc.kill()
            await proc.wait()
            assert all(map(pid_alive, engines)), "neither can be stopped by its parent's death"
            proc, _ = await start_serving(config, port)
            assert not any(map(pid_alive, engines)), "stopped before the gateway served"
            for m in ("stubborn", "wrapped"):
                async with http.post(url + "/v1/chat/completions",
                                     json=body(m, stream=False) | {"max_tokens": 0}) as resp:
                    assert resp.status == 200, await resp.text()
    finally:
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 60) == 0
    assert not list((tmp_path / "data" / "engines").glob("*.json")), "a clean stop leaves none"


async def test_sigterm_lets_inflight_streams_finish_then_stops_every_engine(tmp_path):
    config = two_engines(tmp_path, "--gate", "--tokens", "8", shutdown_timeout="30s")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc, _ = await start_serving(config, port)
    try:
        async with aiohttp.ClientSession(headers=AUTH, timeout=LIMIT) as http:
            streams = [await http.post(url + "/v1/chat/completions", json=body(m))
                       for m in ("a", "a", "b")]
            for resp in streams:
                await first_chunk(resp)
            ports = await engine_ports(http, url)
            proc.send_signal(signal.SIGTERM)
            await until_refused(url)  # shutting down: no new connection is accepted
            assert proc.returncode is None, "it waits for the streams in flight"
            for m in ("a", "b"):
                async with http.post(f"http://127.0.0.1:{ports[m]}/release") as resp:
                    assert resp.status == 200
            for resp in streams:
                rest = (await resp.content.read()).decode()
                resp.release()
                assert rest.rstrip().endswith("data: [DONE]"), rest
                assert rest.count("data: {") == 8 and "error" not in rest  # 7 tokens, the end
        assert await asyncio.wait_for(proc.wait(), 30) == 0
    finally:
        if proc.returncode is None:
            proc.kill()
    assert not alive(tmp_path / "a.starts") and not alive(tmp_path / "b.starts")


async def test_sigterm_cuts_a_stream_still_running_after_the_grace_period(tmp_path):
    config = two_engines(tmp_path, "--gate", shutdown_timeout="1s")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc, _ = await start_serving(config, port)
    try:
        async with aiohttp.ClientSession(headers=AUTH, timeout=LIMIT) as http:
            async with http.post(url + "/v1/chat/completions", json=body("a")) as resp:
                await first_chunk(resp)
                began = time.monotonic()
                proc.send_signal(signal.SIGTERM)  # the gate is never released
                rest = (await resp.content.read()).decode()
            took = time.monotonic() - began
        assert took >= 0.9, "the stream had its grace period"
        event = json.loads(rest.strip().splitlines()[-1].removeprefix("data: "))
        assert event["error"]["code"] == "engine_died", "cut with an error event, not silently"
        assert await asyncio.wait_for(proc.wait(), 30) == 0
    finally:
        if proc.returncode is None:
            proc.kill()
    assert not alive(tmp_path / "a.starts")
