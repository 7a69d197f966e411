"""Early headers: a non-streamed request waiting for a cold start gets `200` at once, so a
Node client whose header timeout is shorter than the load keeps waiting (SPEC 10b)."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import subprocess
from pathlib import Path
from typing import Any

import pytest

from sparkstack.scheduler import State

from .conftest import KEY, fake, pids

NODE_DIR = Path(__file__).with_name("node")
CLIENT_TIMEOUT_MS = 1000  # the SDK's timeout, lowered from its 10 minutes


@pytest.fixture(scope="session")
def node_chat() -> Path:
    """The `openai` npm package, installed from tests/node's lock file when missing."""
    if not (shutil.which("node") and shutil.which("npm")):
        message = "node and npm are needed for the Node client tests"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    if not (NODE_DIR / "node_modules" / "openai" / "package.json").exists():
        subprocess.run(["npm", "ci", "--no-audit", "--no-fund"], cwd=NODE_DIR, check=True,
                       capture_output=True, timeout=300)
    return NODE_DIR / "chat.mjs"


class NodeClient:
    def __init__(self, proc: asyncio.subprocess.Process):
        self.proc = proc

    async def next(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        line = await asyncio.wait_for(self.proc.stdout.readline(), 30)
        assert line, "the Node client ended without saying more"
        return json.loads(line)


async def node(script: Path, url: str, model: str) -> NodeClient:
    proc = await asyncio.create_subprocess_exec(
        "node", str(script), url + "/v1", KEY, model, str(CLIENT_TIMEOUT_MS),
        stdout=asyncio.subprocess.PIPE)
    return NodeClient(proc)


def slow_model(tmp_path: Path, early: bool) -> tuple[str, Path]:
    """A model whose engine loads until the test sends it SIGUSR1."""
    starts = tmp_path / "slow.starts"
    return f"""
    slow:
      command: {fake("--wait-signal", "--tokens", "3", starts=starts)}
      memory_gb: 1
      early_headers: {str(early).lower()}
    """, starts


async def test_node_client_outlives_its_timeout_with_early_headers(
        start_gateway, tmp_path, node_chat):
    yaml, starts = slow_model(tmp_path, early=True)
    gw = await start_gateway(yaml, keepalive_interval="0.2s")
    client = await node(node_chat, gw.url, "slow")
    assert await client.next() == {"event": "past-timeout"}, "still waiting, not timed out"
    assert gw.state("slow").state is State.STARTING
    os.kill(pids(starts)[0], signal.SIGUSR1)  # the model finishes loading
    reply = await client.next()
    assert reply == {"event": "reply", "content": "tok0 tok1 tok2 ", "error": None}
    assert await client.proc.wait() == 0


async def test_without_early_headers_the_same_client_times_out(
        start_gateway, tmp_path, node_chat):
    yaml, _ = slow_model(tmp_path, early=False)
    gw = await start_gateway(yaml, keepalive_interval="0.2s")
    client = await node(node_chat, gw.url, "slow")
    outcome = await client.next()
    assert outcome["event"] == "error" and outcome["name"] == "APIConnectionTimeoutError"
    assert await client.next() == {"event": "past-timeout"}
    await client.proc.wait()


async def test_a_failed_start_after_early_headers_is_an_error_object(start_gateway, tmp_path):
    gw = await start_gateway(f"""
    broken:
      command: {fake("--exit-at-start", "1")}
      memory_gb: 1
    """, early_headers="true", keepalive_interval="0.2s")
    async with gw.http.post(gw.url + "/v1/chat/completions", json={
            "model": "broken", "messages": [{"role": "user", "content": "hi"}]}) as resp:
        assert resp.status == 200 and resp.content_type == "application/json"
        body = json.loads(await resp.text())  # leading whitespace is valid JSON
    assert body["error"]["code"] == "engine_failed"
    assert "CUDA error: out of memory" in body["error"]["message"]


async def test_a_ready_model_answers_without_early_headers(start_gateway, tmp_path):
    """Once loaded, answers keep their real status and the engine's own headers."""
    gw = await start_gateway(f"""
    quick:
      command: {fake("--served-name", "quick")}
      memory_gb: 1
      early_headers: true
    """)
    status, _ = await gw.chat("quick")
    assert status == 200
    async with gw.http.post(gw.url + "/v1/chat/completions", json={
            "model": "quick", "messages": [{"role": "user", "content": "hi"}],
            "max_tokens": 1}) as resp:
        assert resp.status == 200 and "x-fake-pid" in resp.headers
