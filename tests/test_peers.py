"""Two gateways on loopback standing in for two Sparks: each serves the other's models
through one endpoint, merges the model lists, answers 503 naming a peer that is down
(local models unaffected), notices when it is back, and never relays a request twice."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import pytest

from .conftest import fake, free_port, pids
from .nodes import Node, chat, until_peer


@pytest.fixture
async def pair(tmp_path, http) -> AsyncIterator[tuple[Node, Node]]:
    """Spark B (one model) and Spark A (one model, B as its peer). Each node starts its
    own models only; B's model is reached through A."""
    b = Node(tmp_path, "spark-b", f"""
    big:
      command: {fake("--served-name", "big", "--tokens", "6", starts=tmp_path / "big.starts")}
      memory_gb: 3
      aliases: [large]
    """, [])
    a = Node(tmp_path, "spark-a", f"""
    small:
      command: {fake("--served-name", "small", starts=tmp_path / "small.starts")}
      memory_gb: 1
    """, [("spark-b", b.port)])
    await b.start(http)
    await a.start(http)
    await until_peer(a, healthy=True)
    yield a, b
    for node in (a, b):
        with contextlib.suppress(Exception):
            await node.stop()


async def test_either_gateway_serves_the_peers_models(pair, http, tmp_path):
    a, b = pair
    status, body = await chat(http, a.gw.url, "big")
    assert status == 200 and body["model"] == "big"
    assert body["usage"]["completion_tokens"] == 6
    assert b.gw.state("big").state.value == "ready", "it runs on B"
    assert not a.gw.supervisor.runs.get("big")
    assert (await chat(http, a.gw.url, "large"))[0] == 200, "the peer's aliases work too"

    # Streaming through the peer, and the path form.
    payload = {"messages": [], "stream": True}
    async with http.post(a.gw.url + "/v1/big/chat/completions", json=payload) as resp:
        assert resp.status == 200
        lines = [ln.decode().strip() async for ln in resp.content if ln.strip()]
    assert lines[-1] == "data: [DONE]" and sum(ln.startswith("data: {") for ln in lines) >= 6

    async with http.get(a.gw.url + "/v1/models") as resp:
        listed = {m["id"]: m for m in (await resp.json())["data"]}
    assert listed["small"]["node"] == "spark-a" and listed["big"]["node"] == "spark-b"
    async with http.get(b.gw.url + "/v1/models") as resp:
        assert {m["id"] for m in (await resp.json())["data"]} == {"big"}
    async with http.get(a.gw.url + "/api/models") as resp:
        peers = (await resp.json())["peers"]
    assert peers[0]["name"] == "spark-b" and peers[0]["healthy"] is True


async def test_a_peer_down_answers_503_for_its_models_only(pair, http, tmp_path):
    a, b = pair
    await b.stop()
    status, body = await chat(http, a.gw.url, "big")
    assert status == 503 and body["error"]["code"] == "peer_unavailable"
    assert "spark-b" in body["error"]["message"]
    assert (await chat(http, a.gw.url, "small"))[0] == 200, "local models are unaffected"
    await until_peer(a, healthy=False)
    async with http.get(a.gw.url + "/v1/models") as resp:
        listed = {m["id"]: m for m in (await resp.json())["data"]}
    assert listed["big"]["state"] == "unreachable"

    await b.start(http)  # back, on the same address
    await until_peer(a, healthy=True)
    assert (await chat(http, a.gw.url, "big"))[0] == 200, "served again, by itself"
    assert len(pids(tmp_path / "big.starts")) == 1, "B started it when asked, once"


async def test_a_relayed_request_is_never_relayed_again(pair, http):
    a, _ = pair
    hop = {"x-sparkstack-hop": "spark-x"}
    async with http.post(a.gw.url + "/v1/chat/completions", headers=hop,
                         json={"model": "big", "messages": []}) as resp:
        assert resp.status == 404, "A does not pass on a request that was already relayed"
    status, body = await chat(http, a.gw.url, "nowhere")
    assert status == 404 and body["error"]["code"] == "model_not_found"


async def test_two_gateways_that_list_each_other_do_not_loop(tmp_path, http):
    port_a = free_port()
    b = Node(tmp_path, "spark-b", f"""
    big:
      command: {fake("--served-name", "big")}
      memory_gb: 3
    """, [("spark-a", port_a)])
    a = Node(tmp_path, "spark-a", f"""
    small:
      command: {fake("--served-name", "small")}
      memory_gb: 1
    """, [("spark-b", b.port)])
    a.port = port_a
    try:
        await b.start(http)
        await a.start(http)
        await until_peer(a, healthy=True)
        await until_peer(b, healthy=True, peer="spark-a")
        for url in (a.gw.url, b.gw.url):
            async with http.get(url + "/v1/models") as resp:
                ids = sorted(m["id"] for m in (await resp.json())["data"])
            assert ids == ["big", "small"], "each lists both, once"
        async with asyncio.timeout(10):
            status, _ = await chat(http, a.gw.url, "missing")
        assert status == 404
        assert (await chat(http, b.gw.url, "small"))[0] == 200
    finally:
        await a.stop()
        await b.stop()

