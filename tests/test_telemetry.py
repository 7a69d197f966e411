"""Telemetry end to end: what /metrics, /api/activity and /api/events say after known
requests, loads and unloads; load progress from engines' logs; measured memory."""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from sparkstack.gateway.accounting import Meter
from sparkstack.telemetry.activity import PRUNE_EVERY, ROWS_PER_INSERT, ActivityStore
from sparkstack.telemetry.events import (
    Event,
    LoadProgress,
    ModelChanged,
    RequestFinished,
    RequestRecord,
)
from sparkstack.telemetry.memory import GIB, declaration_findings
from sparkstack.telemetry.progress import ProgressParser, parse_log

from .conftest import KEY, Gateway, fake
from .test_e2e_llamacpp import gguf, llama  # noqa: F401 (gguf: the session's demo model)

DATA = Path(__file__).with_name("data")
VLLM_LOG = DATA / "vllm-load.log"


def one_model(*args: object, memory: float = 1, name: str = "a") -> str:
    return f"""
    {name}:
      command: {fake("--served-name", name, *args)}
      memory_gb: {memory}
    """


async def metrics(gw: Gateway) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    async with gw.http.get(gw.url + "/metrics") as resp:
        assert resp.status == 200
        text = await resp.text()
    return {(s.name, frozenset(s.labels.items())): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples}


def value(m: dict[Any, float], name: str, **labels: str) -> float:
    return m.get((name, frozenset(labels.items())), 0.0)


async def activity(gw: Gateway, **query: Any) -> list[dict[str, Any]]:
    async with gw.http.get(gw.url + "/api/activity", params=query) as resp:
        assert resp.status == 200
        return (await resp.json())["data"]


class Recorder:
    """Every event of the gateway's bus from now on, and a way to wait for one."""

    def __init__(self, gw: Gateway) -> None:
        self.events: list[Event] = []
        self._new = asyncio.Event()
        gw.supervisor.bus.subscribe(self._on)

    def _on(self, event: Event) -> None:
        self.events.append(event)
        self._new.set()

    async def until(self, predicate: Callable[[Event], bool], timeout: float = 20) -> Event:
        seen = 0
        async with asyncio.timeout(timeout):
            while True:
                for event in self.events[seen:]:
                    if predicate(event):
                        return event
                seen = len(self.events)
                self._new.clear()
                await self._new.wait()

    def states(self, model: str) -> list[str]:
        return [e.model.state for e in self.events
                if isinstance(e, ModelChanged) and e.previous and e.model.id == model]


# ------------------------------------------------------------------ requests


async def test_metrics_and_activity_count_the_tokens_of_known_requests(start_gateway):
    gw = await start_gateway(one_model("--tokens", "7"))
    status, body = await gw.chat("a")
    assert status == 200 and body["usage"]["completion_tokens"] == 7
    lines = await gw.stream("a")  # the client did not ask for usage...
    events = [json.loads(ln[6:]) for ln in lines if ln.startswith("data: {")]
    assert all(e["choices"] for e in events), "...so it gets no usage-only chunk"
    assert "".join(e["choices"][0]["delta"].get("content") or "" for e in events) == \
        "".join(f"tok{i} " for i in range(7))
    lines = await gw.stream("a", stream_options={"include_usage": True})
    asked = [json.loads(ln[6:]) for ln in lines if ln.startswith("data: {")]
    assert asked[-1]["choices"] == [] and asked[-1]["usage"]["completion_tokens"] == 7

    rows = await activity(gw, model="a")
    assert [(r["stream"], r["status"], r["completion_tokens"], r["key"]) for r in rows] == [
        (True, 200, 7, "key1"), (True, 200, 7, "key1"), (False, 200, 7, "key1")]
    assert all(r["prompt_tokens"] == 1 and r["duration_s"] > 0 for r in rows)
    assert rows[0]["ttft_s"] is not None and rows[2]["ttft_s"] is None
    assert rows[2]["queue_s"] > rows[0]["queue_s"], "the first request waited for the load"

    m = await metrics(gw)
    assert value(m, "sparkstack_requests_total", model="a", endpoint="/v1/chat/completions",
                 status="200") == 3
    assert value(m, "sparkstack_completion_tokens_total", model="a") == 21
    assert value(m, "sparkstack_prompt_tokens_total", model="a") == 3
    assert value(m, "sparkstack_time_to_first_token_seconds_count", model="a") == 2
    assert value(m, "sparkstack_request_duration_seconds_count", model="a",
                 endpoint="/v1/chat/completions") == 3
    assert value(m, "sparkstack_queue_wait_seconds_count", model="a") == 3
    assert value(m, "sparkstack_model_state", model="a", state="ready") == 1
    assert value(m, "sparkstack_memory_reserved_bytes") == 1 * GIB
    assert value(m, "sparkstack_memory_budget_bytes") == 10 * GIB
    assert value(m, "sparkstack_model_load_duration_seconds_count", model="a",
                 result="ready") == 1


async def test_streamed_tokens_are_counted_when_the_engine_reports_no_usage(start_gateway):
    gw = await start_gateway(one_model("--tokens", "9", "--no-usage"))
    await gw.stream("a")
    await gw.stream("a", max_tokens=4)
    rows = await activity(gw)
    assert [r["completion_tokens"] for r in rows] == [4, 9]
    assert all(r["tokens_per_s"] for r in rows)


async def test_failures_are_recorded_with_their_status_and_error(start_gateway, tmp_path):
    gw = await start_gateway(f"""
    f:
      command: {fake("--exit-at-start", "1")}
      memory_gb: 1
    c:
      command: {fake("--crash-after", "0", "--tokens", "5", "--rate", "50")}
      memory_gb: 1
    """, start_backoff="30s")
    assert (await gw.chat("f"))[0] == 502
    assert (await gw.chat("f"))[0] == 503  # backing off: refused at once
    lines = await gw.stream("c")
    assert "engine_died" in lines[-1]
    rows = await activity(gw)
    assert [(r["model"], r["status"]) for r in rows] == [("c", 502), ("f", 503), ("f", 502)]
    assert "CUDA error: out of memory" in rows[2]["error"]
    assert "stopped answering" in rows[0]["error"]
    m = await metrics(gw)
    assert value(m, "sparkstack_model_load_duration_seconds_count", model="f",
                 result="failed") == 1
    assert value(m, "sparkstack_model_stops_total", model="c", reason="crash") == 1


async def test_activity_pages_backwards_and_filters_by_model(start_gateway, tmp_path):
    gw = await start_gateway(one_model() + one_model(name="b"))
    for model in ("a", "b", "a", "b", "a"):
        assert (await gw.chat(model))[0] == 200
    rows = await activity(gw, limit=2)
    assert [r["model"] for r in rows] == ["a", "b"]
    older = await activity(gw, limit=10, before=rows[-1]["ts"])
    assert [r["model"] for r in older] == ["a", "b", "a"]
    assert len(await activity(gw, model="b")) == 2
    assert (tmp_path / "data" / "activity.sqlite3").exists()


async def test_metrics_need_a_key_unless_public(start_gateway):
    gw = await start_gateway(one_model())
    async with aiohttp.ClientSession() as anon, anon.get(gw.url + "/metrics") as resp:
        assert resp.status == 401
    gw = await start_gateway(one_model(), metrics_public="true")
    async with aiohttp.ClientSession() as anon, anon.get(gw.url + "/metrics") as resp:
        assert resp.status == 200 and "sparkstack_model_state" in await resp.text()


# ------------------------------------------------------------------ events and progress


async def test_events_arrive_for_a_load_with_its_progress_and_an_unload(start_gateway):
    gw = await start_gateway(one_model("--load-log", VLLM_LOG, "--start-delay", "0.3"))
    rec = Recorder(gw)
    async with gw.http.post(gw.url + "/api/models/a/load") as resp:
        assert resp.status == 200
    async with gw.http.post(gw.url + "/api/models/a/unload") as resp:
        assert resp.status == 200
    await rec.until(lambda e: isinstance(e, ModelChanged) and e.model.state == "stopped")
    assert rec.states("a") == ["starting", "ready", "stopping", "stopped"]
    progress = [(e.phase, e.percent) for e in rec.events if isinstance(e, LoadProgress)]
    weights = [p for phase, p in progress if phase == "weights" and p is not None]
    assert weights == sorted(weights) and weights[-1] == 100 and len(weights) > 10
    phases = list(dict.fromkeys(phase for phase, _ in progress))
    assert phases == ["weights", "compile", "kv-cache", "cuda-graphs", "warmup", "server"]
    # Only what came before ready: the ready event carries no progress any more.
    ready = next(e for e in rec.events if isinstance(e, ModelChanged)
                 and e.model.state == "ready")
    assert ready.model.load_phase is None and ready.model.load_seconds is not None
    m = await metrics(gw)
    assert value(m, "sparkstack_model_stops_total", model="a", reason="manual") == 1


async def test_events_endpoint_streams_a_snapshot_then_one_models_changes(start_gateway):
    gw = await start_gateway(one_model() + one_model(name="b"))
    seen: list[tuple[str, dict[str, Any]]] = []
    async with gw.http.get(gw.url + "/api/events", params={"model": "a"}) as resp:
        assert resp.status == 200
        load_a = load_b = None
        kind = None
        async for raw in resp.content:
            line = raw.decode().rstrip("\n")
            if line.startswith("event: "):
                kind = line[7:]
            elif line.startswith("data: "):
                data = json.loads(line[6:])
                seen.append((kind or "", data))
                if kind == "snapshot":
                    assert [m["id"] for m in data["models"]] == ["a", "b"]
                    load_b = asyncio.create_task(gw.chat("b"))
                    await load_b
                    load_a = asyncio.create_task(gw.chat("a"))
                if kind == "request":
                    break
        assert load_a is not None and (await load_a)[0] == 200
    models = {d["model"]["id"] for k, d in seen if k == "model"}
    assert models == {"a"}, "only model a's events"
    states = [d["model"]["state"] for k, d in seen if k == "model" and d["previous"]]
    assert states == ["starting", "ready"]
    request = seen[-1][1]
    assert request["model"] == "a" and request["status"] == 200


async def test_keepalive_comments_show_the_load_progress(start_gateway, tmp_path):
    log = tmp_path / "load.log"
    log.write_text("Loading safetensors checkpoint shards:  45% Completed | 5/11 "
                   "[00:12<00:15,  2.1s/it]\n")
    gw = await start_gateway(one_model("--load-log", log, "--start-delay", "1.2"),
                             keepalive_interval="0.3s")
    comments = [ln for ln in await gw.stream("a") if ln.startswith(":")]
    assert comments[0] == ": loading a"
    assert any(re.fullmatch(r": loading a 45% \(weights\) \d+s", c) for c in comments), comments


def test_progress_from_recorded_vllm_log():
    steps = parse_log(VLLM_LOG.read_text().split("\n"))
    weights = [p for phase, p in steps if phase == "weights" and p is not None]
    assert weights[0] == 0 and weights[-1] == 100 and 45 < weights[len(weights) // 2] < 55
    graphs = [p for phase, p in steps if phase == "cuda-graphs"]
    assert 45.0 in graphs and graphs[-1] == 100
    assert steps[-1] == ("server", 100.0)


def test_progress_from_recorded_vllm_cpu_log():
    # vLLM 0.32.0's CPU build, as tests/test_e2e_vllm.py ran it (--enforce-eager): it says
    # "disabling torch.compile" (no compile phase), "CPU KV cache size", and
    # "Starting vLLM server on".
    steps = parse_log((DATA / "vllm-cpu-load.log").read_text().split("\n"))
    assert steps == [("weights", None), ("weights", 0.0), ("weights", 100.0),
                     ("kv-cache", None), ("warmup", 100.0), ("server", None),
                     ("server", 100.0)]


@pytest.mark.parametrize("name", ["llamacpp-load.log", "llamacpp-load-2025.log"])
def test_progress_from_recorded_llamacpp_logs(name):
    steps = parse_log((DATA / name).read_text().split("\n"))
    phases = [phase for phase, _ in steps]
    assert phases[0] == "weights" and "kv-cache" in phases
    assert steps[-1] == ("server", 100.0)


def test_a_progress_bar_line_holds_many_updates():
    parser = ProgressParser()
    bar = "\r".join(f"Capturing CUDA graphs (decode, FULL): {p:3d}%|#| {p}/100" for p in
                    (0, 10, 60))
    assert parser.feed(bar) and (parser.phase, parser.percent) == ("cuda-graphs", 60.0)
    assert not parser.feed("INFO an unrelated line")


# ------------------------------------------------------------------ memory


async def test_measured_memory_of_an_engine_is_within_ten_percent(start_gateway, tmp_path):
    gw = await start_gateway(one_model(name="small") + one_model(
        "--allocate-mb", 400, name="big", memory=1))
    rec = Recorder(gw)
    for model in ("small", "big"):
        async with gw.http.post(gw.url + f"/api/models/{model}/load") as resp:
            assert resp.status == 200
    measured = {}
    for model in ("small", "big"):
        event = await rec.until(lambda e, m=model: isinstance(e, ModelChanged)
                                and e.model.id == m and e.model.memory_measured_gb is not None)
        assert isinstance(event, ModelChanged)
        measured[model] = event.model.memory_measured_gb
        assert event.model.memory_source == "rss"
    ballast = (measured["big"] - measured["small"]) * 1024  # MB
    assert abs(ballast - 400) <= 40, measured
    async with gw.http.get(gw.url + "/api/models") as resp:
        big = next(m for m in (await resp.json())["models"] if m["id"] == "big")
    assert big["memory_peak_gb"] >= big["memory_measured_gb"] > 0.39
    m = await metrics(gw)
    assert value(m, "sparkstack_model_memory_measured_bytes", model="big") > 400 * 2**20
    # Declared 1 GB, used under half of it: `sparkstack check` says so.
    findings = declaration_findings({"big": 1.0, "small": 1.0}, tmp_path / "data")
    assert any("'big' declares memory_gb: 1" in f and "lower it" in f for f in findings)


async def test_request_events_reach_subscribers(start_gateway):
    gw = await start_gateway(one_model("--tokens", "3"))
    rec = Recorder(gw)
    assert (await gw.chat("a"))[0] == 200
    event = await rec.until(lambda e: isinstance(e, RequestFinished))
    assert isinstance(event, RequestFinished)
    assert (event.record.model, event.record.completion_tokens) == ("a", 3)
    assert KEY not in json.dumps(event.as_dict()), "never the key itself"


@pytest.mark.e2e
async def test_progress_from_the_real_llama_server(start_gateway, request):
    model = request.getfixturevalue("gguf")  # fails, not skips, with CI=true
    gw = await start_gateway(llama(model, "gemma"), memory_gb=1)
    rec = Recorder(gw)
    async with gw.http.post(gw.url + "/api/models/gemma/load") as resp:
        assert resp.status == 200
    phases = [e.phase for e in rec.events if isinstance(e, LoadProgress)]
    assert phases[0] == "weights" and "kv-cache" in phases, phases
    assert phases[-1] == "server", phases
    # Real memory of a real engine: the 253 MB model is mapped, its KV cache allocated.
    event = await rec.until(lambda e: isinstance(e, ModelChanged)
                            and e.model.memory_measured_gb is not None)
    assert isinstance(event, ModelChanged)
    assert 0.1 < (event.model.memory_measured_gb or 0) < 2


# ------------------------------------------------------------------ the meter, chunk by chunk


def _meter(strip: bool) -> Meter:
    meter = Meter(RequestRecord(ts=0, model="m", endpoint="/v1/chat/completions", key=None,
                                stream=True), 0.0, strip)
    meter.answered("text/event-stream")
    return meter


USAGE_EVENT = (b'data: {"id":"x","choices":[],"usage":{"prompt_tokens":25,'
               b'"completion_tokens":3,"total_tokens":28}}\n\n')


@pytest.mark.parametrize("cut", [5, 40, len(USAGE_EVENT) - 1])
def test_a_usage_event_cut_across_chunks_is_read_and_stripped(cut):
    meter = _meter(strip=True)
    token = b'data: {"choices":[{"index":0,"delta":{"content":"hi"}}]}\n\n'
    stream = token + USAGE_EVENT + b"data: [DONE]\n\n"
    at = len(token) + cut
    sent = meter.feed(stream[:at]) + meter.feed(stream[at:]) + meter.rest()
    assert sent == token + b"data: [DONE]\n\n"
    assert (meter.record.prompt_tokens, meter.record.completion_tokens) == (25, 3)


def test_usage_the_client_asked_for_passes_through():
    meter = _meter(strip=False)
    stream = USAGE_EVENT + b"data: [DONE]\n\n"
    assert meter.feed(stream[:30]) + meter.feed(stream[30:]) + meter.rest() == stream
    assert meter.record.completion_tokens == 3


def test_usage_of_the_responses_and_messages_apis():
    meter = _meter(strip=False)
    meter.feed(b'event: message_start\ndata: {"type":"message_start","message":{"usage":'
               b'{"input_tokens":12,"output_tokens":1}}}\n\n')
    meter.feed(b'event: message_delta\ndata: {"type":"message_delta","usage":'
               b'{"output_tokens":40}}\n\n')
    assert (meter.record.prompt_tokens, meter.record.completion_tokens) == (12, 40)
    meter = _meter(strip=False)
    meter.feed(b'event: response.completed\ndata: {"type":"response.completed","response":'
               b'{"output":[],"usage":{"input_tokens":7,"output_tokens":9}}}\n\n')
    assert (meter.record.prompt_tokens, meter.record.completion_tokens) == (7, 9)


def test_a_whole_body_gives_its_usage_and_text_mentioning_usage_is_ignored():
    meter = _meter(strip=False)
    meter.body(b'{"choices":[{"message":{"content":"the \\"usage\\" key"}}],'
               b'"usage":{"prompt_tokens":3,"completion_tokens":5}}')
    assert (meter.record.prompt_tokens, meter.record.completion_tokens) == (3, 5)


async def test_open_event_and_log_streams_do_not_hold_the_shutdown(tmp_path):
    from sparkstack.config import load_config
    from sparkstack.gateway.server import ServeInfo, serve

    from .conftest import free_port

    path = tmp_path / "c.yaml"
    path.write_text(f"api_keys: [{KEY}]\nmemory_gb: 2\nshutdown_timeout: 30s\nmodels:\n"
                    + "\n".join("  " + ln for ln in one_model().strip("\n").splitlines()))
    ready: asyncio.Future[ServeInfo] = asyncio.get_running_loop().create_future()
    stop = asyncio.Event()
    server = asyncio.create_task(serve(load_config(path), f"127.0.0.1:{free_port()}",
                                       data_dir=tmp_path / "data", on_ready=ready.set_result,
                                       stop=stop))
    info = await ready
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {KEY}"}) as http:
        events = await http.get(info.url + "/api/events")
        await events.content.readuntil(b"\n\n")  # the snapshot: the stream is open
        logs = await http.get(info.url + "/api/models/a/logs", params={"follow": "true"})
        assert events.status == logs.status == 200
        stop.set()
        await asyncio.wait_for(server, 10)  # not the 30 s shutdown_timeout
        events.close()
        logs.close()


# ------------------------------------------------------------------ memory sources


class FakeNvml:
    def __init__(self, unified: bool, used: dict[int, int]) -> None:
        self.ok, self.unified, self.used = True, unified, used

    def per_process(self) -> dict[int, int]:
        return self.used


class FakeContainer:
    """What the Docker API answers for a container (cgroup v2 stats)."""

    def __init__(self, usage: int, inactive_file: int, pid: int) -> None:
        self.usage, self.inactive_file, self.pid = usage, inactive_file, pid

    async def stats(self, stream: bool) -> list[dict[str, Any]]:
        return [{"memory_stats": {"usage": self.usage,
                                  "stats": {"inactive_file": self.inactive_file}}}]

    async def show(self) -> dict[str, Any]:
        return {"State": {"Pid": self.pid}}


class Engine:
    def __init__(self, container: Any = None, pid: int | None = None) -> None:
        self.container = container
        if pid is not None:
            self.proc = type("Proc", (), {"pid": pid, "returncode": None})()


async def test_memory_of_a_container_on_a_discrete_gpu(tmp_path):
    import os

    from sparkstack.telemetry.memory import MemoryMonitor

    monitor = MemoryMonitor(tmp_path)
    monitor._nvml = FakeNvml(unified=False, used={os.getpid(): 3 * GIB})  # type: ignore
    box = Engine(FakeContainer(usage=int(2.5 * GIB), inactive_file=GIB // 2, pid=os.getpid()))
    moved = await monitor.sample({"c": box}, {"c": 6})
    assert moved == {"c"}
    got = monitor.current["c"]
    assert (got.gb, got.source) == (5.0, "container+nvml"), "2 GB in the container + 3 on GPU"
    assert json.loads((tmp_path / "memory.json").read_text())["c"]["peak_gb"] == 5.0


async def test_memory_on_unified_memory_is_the_hosts_delta_across_the_load(tmp_path,
                                                                             monkeypatch):
    import os

    from sparkstack.telemetry import memory
    from sparkstack.telemetry.memory import MemoryMonitor

    used = iter([10 * GIB, 75 * GIB])  # before the start, once ready
    monkeypatch.setattr(memory, "host_used_bytes", lambda: next(used))
    monitor = MemoryMonitor(tmp_path)
    monitor._nvml = FakeNvml(unified=True, used={})  # type: ignore  # GB10: no per-process memory
    monitor.load_started("big")
    monitor.load_finished("big")
    await monitor.sample({"big": Engine(pid=os.getpid())}, {"big": 70})
    got = monitor.current["big"]
    assert (got.gb, got.source) == (65.0, "host-delta")
    assert declaration_findings({"big": 70}, tmp_path) == [], "65 is within 10% of 70"
    assert declaration_findings({"big": 50}, tmp_path)[0].endswith(
        "raise it, or the budget is overrun")


async def test_a_flush_bigger_than_one_insert_keeps_every_row_and_the_bound(tmp_path):
    """A busy second's rows go in a few multi-row INSERTs: none lost, in order, and the
    table still bounded by `activity_max_rows`."""
    n = ROWS_PER_INSERT * 2 + 7
    store = ActivityStore(tmp_path / "activity.sqlite3", max_rows=n)
    await store.open()
    now = time.time()
    try:
        for i in range(n):
            store.on_event(RequestFinished(RequestRecord(
                ts=now - n + i, model=f"m{i % 3}", endpoint="/v1/chat/completions", key=None,
                status=200, duration_s=0.001 * i, completion_tokens=i)))
        await store.flush()
        newest = await store.query(limit=5)
        assert [r["completion_tokens"] for r in newest] == [n - 1 - k for k in range(5)]
        assert len(await store.query(model="m1", limit=10_000)) == len(range(1, n, 3))
        for _ in range(PRUNE_EVERY):
            store.on_event(RequestFinished(RequestRecord(
                ts=now + 1, model="late", endpoint="/v1/embeddings", key="k", status=200)))
        await store.flush()  # past the bound (checked every PRUNE_EVERY rows): oldest go
        rows = await store.query(limit=10_000)
        assert len(rows) == n and rows[0]["model"] == "late"
        assert rows[-1]["completion_tokens"] == PRUNE_EVERY
    finally:
        await store.close()
