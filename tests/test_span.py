"""One model over two nodes (`nodes: 2`), with two gateways on loopback standing in for
two Sparks and the two-part test engine (its head becomes healthy only once its worker
has connected to the master port; neither half stops by itself when the other dies).

Both nodes read the same catalog, as an owner copies one file to both machines."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
from rich.console import Console

from sparkstack.client import status_table
from sparkstack.config import Span, load_config
from sparkstack.engines import SpanLaunch, launch_spec
from sparkstack.runtime.span import SpannedEngine

from .conftest import fake, free_port, local_server, pid_alive
from .nodes import Node, chat, until_peer

DATA = Path(__file__).parent / "data"


def catalog(duo_extra: str = "") -> str:
    return f"""
    duo:
      command: {fake("--served-name", "duo", "--tokens", "4")}
      memory_gb: 3
      nodes: 2
      node: spark-a
      {duo_extra}
    chat-b:
      command: {fake("--served-name", "chat-b", "--tokens", "2")}
      memory_gb: 2
      node: spark-b
    """


async def two_sparks(tmp_path: Path, http: aiohttp.ClientSession, *, b_catalog: str = ""
                     ) -> tuple[Node, Node]:
    port_a = free_port()
    link = f"link: {{master_port: {free_port()}, interface: lo, env: {{NCCL_DEBUG: WARN}}}}\n"
    b = Node(tmp_path, "spark-b", b_catalog or catalog(), [("spark-a", port_a)], extra=link)
    a = Node(tmp_path, "spark-a", catalog(), [("spark-b", b.port)], extra=link)
    a.port = port_a
    await b.start(http)
    await a.start(http)
    await until_peer(a, healthy=True)
    await until_peer(b, healthy=True, peer="spark-a")
    return a, b


@pytest.fixture
async def pair(tmp_path, http) -> AsyncIterator[tuple[Node, Node]]:
    a, b = await two_sparks(tmp_path, http)
    yield a, b
    for node in (a, b):
        with contextlib.suppress(Exception):
            await node.stop()


def head_pid(node: Node) -> int:
    engine = node.gw.supervisor.runs["duo"].engine
    assert isinstance(engine, SpannedEngine)
    return engine.head.proc.pid  # type: ignore[attr-defined]


def worker_pid(node: Node) -> int:
    return node.gw.supervisor.runs["duo"].engine.proc.pid  # type: ignore[union-attr]


def state(node: Node, model: str = "duo") -> str:
    return node.gw.state(model).state.value


async def test_a_model_spans_both_nodes_and_the_peer_makes_room(pair, http):
    a, b = pair
    assert (await chat(http, b.gw.url, "chat-b"))[0] == 200
    assert state(b, "chat-b") == "ready", "an idle model holds B's memory"

    status, body = await chat(http, a.gw.url, "duo")
    assert status == 200 and body["model"] == "duo"
    assert state(a) == "ready" and state(b) == "ready", "the head here, the worker on B"
    assert state(b, "chat-b") == "stopped", "B evicted its idle model for the worker half"
    assert b.gw.state("chat-b").stop_reason == "evicted for duo"
    assert b.gw.supervisor.snapshot().memory_used_gb == 3, "B holds the worker's memory"

    # Either gateway serves it: B relays to the head.
    status, body = await chat(http, b.gw.url, "duo")
    assert status == 200 and body["usage"]["completion_tokens"] == 4
    async with http.get(b.gw.url + "/v1/models") as resp:
        listed = [m for m in (await resp.json())["data"] if m["id"] == "duo"]
    assert [m["node"] for m in listed] == ["spark-a"], "listed once, by its head's node"
    async with http.get(b.gw.url + "/api/models") as resp:
        body = await resp.json()
    views = {m["id"]: m for m in body["models"]}
    assert views["duo"]["span_role"] == "worker" and views["duo"]["span_partner"] == "spark-a"
    console = Console(width=160, record=True)
    console.print(status_table(body))
    assert "duo (worker for spark-a)" in console.export_text(), "sparkstack status on B"

    # vLLM's own multi-node launch, with the link's settings, on each side.
    head_log = "\n".join(a.gw.supervisor.logs["duo"].tail(50))
    worker_log = "\n".join(b.gw.supervisor.logs["duo"].tail(50))
    master = a.gw.supervisor.spans.master_port(a.gw.supervisor.config.models["duo"])
    assert f"--nnodes 2 --node-rank 0 --master-addr 127.0.0.1 --master-port {master}" in head_log
    assert "--headless" not in head_log
    assert "--node-rank 1" in worker_log and "--headless" in worker_log
    assert f"joined master 127.0.0.1:{master}" in worker_log
    assert "VLLM_HOST_IP=127.0.0.1, NCCL_SOCKET_IFNAME=lo" in worker_log


async def test_a_worker_crash_stops_the_head_and_the_next_request_starts_both(pair, http):
    a, b = pair
    assert (await chat(http, a.gw.url, "duo"))[0] == 200
    head, worker = head_pid(a), worker_pid(b)

    os.kill(worker, signal.SIGKILL)
    await a.gw.until(lambda: a.gw.state("duo").state.value == "stopped")
    assert "worker half on spark-b" in (a.gw.state("duo").last_error or "")
    assert "SIGKILL" in (a.gw.state("duo").last_error or ""), "it says how the worker died"
    await b.gw.until(lambda: b.gw.state("duo").state.value == "stopped")
    assert not pid_alive(head), "the head does not outlive its worker"

    status, _ = await chat(http, a.gw.url, "duo")
    assert status == 200, "the next request starts both halves cleanly"
    assert head_pid(a) != head and worker_pid(b) != worker


async def test_the_head_dying_stops_the_worker(pair, http):
    a, b = pair
    assert (await chat(http, a.gw.url, "duo"))[0] == 200
    worker = worker_pid(b)
    os.kill(head_pid(a), signal.SIGKILL)
    await a.gw.until(lambda: a.gw.state("duo").state.value == "stopped")
    await b.gw.until(lambda: b.gw.state("duo").state.value == "stopped")
    assert not pid_alive(worker)
    assert (await chat(http, a.gw.url, "duo"))[0] == 200


async def test_stopping_stops_both_halves_and_so_does_the_head_gateway_going_away(pair, http):
    a, b = pair
    assert (await chat(http, a.gw.url, "duo"))[0] == 200
    async with http.post(a.gw.url + "/api/models/duo/unload") as resp:
        assert resp.status == 200
    await b.gw.until(lambda: b.gw.state("duo").state.value == "stopped")

    assert (await chat(http, a.gw.url, "duo"))[0] == 200
    worker = worker_pid(b)
    await a.stop()  # the head's gateway shuts down: its lease closes with it
    await b.gw.until(lambda: b.gw.state("duo").state.value == "stopped")
    assert not pid_alive(worker), "no orphan worker on B"


async def test_the_worker_node_never_cuts_its_requests_in_flight(pair, http, tmp_path):
    a, b = pair
    gate = {"x-fake-gate": "held"}
    held = asyncio.create_task(chat_with(http, b.gw.url, "chat-b", gate))
    await b.gw.until(lambda: b.gw.state("chat-b").busy)

    duo = asyncio.create_task(chat(http, a.gw.url, "duo"))
    await b.gw.until(lambda: bool(b.gw.state("duo").waiters))
    assert state(a) == "starting" and state(b, "chat-b") == "ready", "B's request goes on"

    engine = b.gw.supervisor.runs["chat-b"].upstream.base_url
    async with http.post(engine + "/release?gate=held") as resp:
        assert resp.status == 200
    assert (await held)[0] == 200, "the request in flight on B finished"
    status, body = await duo
    assert status == 200 and body["model"] == "duo"
    assert b.gw.state("chat-b").stop_reason == "evicted for duo"


async def chat_with(http: aiohttp.ClientSession, url: str, model: str,
                    headers: dict[str, str]) -> tuple[int, dict]:
    payload = {"model": model, "messages": [{"role": "user", "content": "hi"}]}
    async with http.post(url + "/v1/chat/completions", json=payload, headers=headers) as resp:
        return resp.status, await resp.json(content_type=None)


async def test_entries_that_differ_between_the_nodes_are_refused_clearly(tmp_path, http):
    a, b = await two_sparks(tmp_path, http, b_catalog=catalog("args: [--max-num-seqs, '4']"))
    try:
        status, body = await chat(http, a.gw.url, "duo")
        assert status == 502, "a failed start, as for any engine"
        message = body["error"]["message"]
        assert "differ between 'spark-a' and 'spark-b'" in message
        assert "copy the same catalog entry to both" in message
        assert state(b) == "stopped" and state(a) == "stopped", "nothing left half-started"
    finally:
        await a.stop()
        await b.stop()


# ---------------------------------------------------------------- command lines


def vllm_flags() -> set[str]:
    lines = (DATA / "vllm-serve-flags.txt").read_text().splitlines()
    return {ln for ln in lines if ln.startswith("-")}


def test_head_and_worker_command_lines_are_vllm_serve_command_lines(tmp_path):
    config = load_config(text="""
    node_name: spark-a
    peers: [{name: spark-b, url: "http://127.0.0.1:1"}]
    models:
      big:
        engine: vllm
        weights: openai/gpt-oss-120b
        max_model_len: 131072
        gpu_memory_utilization: 0.8
        nodes: 2
    """)
    model = config.models["big"]
    assert model.span == Span("head", "spark-a", "spark-b")
    known = vllm_flags()
    for rank in (0, 1):
        launch = SpanLaunch(rank, "192.168.100.1", 29501, host_ip="192.168.100.2",
                            interface="enp1s0f0np0", env={"NCCL_IB_HCA": "rocep1s0f0"})
        spec = launch_spec(model, 8000, "k", tmp_path, launch)
        argv = list(spec.argv)
        assert argv[:3] == ["vllm", "serve", "openai/gpt-oss-120b"]
        unknown = [a for a in argv if a.startswith("-") and a not in known]
        assert not unknown, f"flags vLLM does not know: {unknown}"
        assert argv[argv.index("--tensor-parallel-size") + 1] == "2"
        assert argv[argv.index("--distributed-executor-backend") + 1] == "mp"
        assert argv[argv.index("--node-rank") + 1] == str(rank)
        assert ("--headless" in argv) == (rank == 1)
        assert spec.env["NCCL_SOCKET_IFNAME"] == spec.env["GLOO_SOCKET_IFNAME"] == "enp1s0f0np0"
        assert spec.env["VLLM_HOST_IP"] == "192.168.100.2"
        assert spec.env["NCCL_IB_HCA"] == "rocep1s0f0"


@pytest.mark.parametrize(("entry", "settings", "message"), [
    ("args: [--tensor-parallel-size, '1']", "", "remove --tensor-parallel-size 1"),
    ("args: [--distributed-executor-backend, ray]", "",
     "sets --distributed-executor-backend itself"),
    ("engine: llamacpp", "", "engine 'vllm'"),
    ("worker_node: spark-z", "", "'spark-z' is neither this node"),
    ("", "\n  - {name: spark-c, url: 'http://127.0.0.1:2'}", "'worker_node' is needed"),
])
def test_a_spanning_entry_that_cannot_work_is_refused_at_load(entry, settings, message):
    from sparkstack.config import ConfigError
    text = ("node_name: spark-a\npeers:\n  - {name: spark-b, url: 'http://127.0.0.1:1'}"
            + settings + "\nmodels:\n  big: {engine: vllm, weights: x/y, memory_gb: 1, "
            + "nodes: 2" + (", " + entry.replace(": [", ": [") if entry else "") + "}\n")
    with pytest.raises(ConfigError) as e:
        load_config(text=text)
    assert message in str(e.value)


def test_without_a_peer_a_spanning_model_is_listed_disabled_with_the_reason():
    config = load_config(text="models:\n  big: {engine: vllm, weights: x/y, nodes: 2}\n")
    big = config.models["big"]
    assert not big.enabled and "needs two nodes" in big.cfg.notes


async def test_a_worker_node_that_falls_silent_ends_the_lease(tmp_path):
    """A peer that stops answering (frozen, cable pulled) is gone after three heartbeats
    and the margin: the head must not serve on with half a model."""
    from aiohttp import web

    from sparkstack.runtime.base import LogBuffer
    from sparkstack.runtime.span import SILENCE_MARGIN_S, Spans, event_line, silence

    frozen = asyncio.Event()

    async def reserve(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse()
        await response.prepare(request)
        await response.write(event_line("accepted", master_addr="127.0.0.1", heartbeat=0.1))
        await response.write(event_line("ready"))
        await frozen.wait()  # then nothing, not even a heartbeat
        return response

    app = web.Application()
    app.router.add_post("/api/span/{model}", reserve)
    async with local_server(app) as port, aiohttp.ClientSession() as http:
        config = load_config(text=f"""
        node_name: spark-a
        peers: [{{name: spark-b, url: "http://127.0.0.1:{port}"}}]
        models:
          big: {{engine: vllm, weights: x/y, memory_gb: 1, nodes: 2}}
        """)
        spans = Spans(config, http)
        lease, launch = await spans.reserve(config.models["big"], LogBuffer())
        assert launch.rank == 0 and launch.master_addr == "127.0.0.1"
        async with asyncio.timeout(silence(0.1) + 30):
            why = await lease.ended
        assert why == f"stopped answering for {0.3 + SILENCE_MARGIN_S:g} s"
        await lease.release()
        frozen.set()
