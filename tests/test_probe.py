"""`sparkstack probe`, run as a real subprocess against a gateway serving in the test.

The fake engine (tests/fake_engine.py) stands in for engines that do everything right
and for ones that do not, so each way a probe can end is seen; the demo catalog's real
llama-server shows what an owner sees for real models (one gateway, module-scoped: the
probes load three models and fill a 4,096-token context on two shared cores).
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import sys
from typing import Any

import pytest

from .conftest import KEY, Gateway, fake, serving


async def probe(url: str, *args: str, key: str = KEY) -> tuple[int, str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("SPARKSTACK_API_KEY", "VLLM_API_KEY", "SPARKSTACK_URL")}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "sparkstack.cli", "probe", *args, "--url", url, "--key", key,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        env={**env, "COLUMNS": "200"})
    # Generous: the real engine on an oversubscribed 2-core machine is slow.
    out, err = await asyncio.wait_for(proc.communicate(), 1500)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


def cells(report: dict[str, Any]) -> dict[str, dict[str, str]]:
    """{model: {probe: status}} of a --json report."""
    return {m["id"]: {k: c["status"] for k, c in m["probes"].items()}
            for m in report["models"]}


def row(table: str, model: str) -> list[str]:
    """A model's cells in the printed table (columns are 2+ spaces apart)."""
    line = next(ln for ln in table.splitlines() if ln.strip().startswith(model + " "))
    return re.split(r"\s{2,}", line.strip())


CAPABLE = f"""
full:
  command: {fake("--tool-calls", "--reasoning", "--json-mode", "--context", "1024")}
  memory_gb: 1
  max_model_len: 1024
  aliases: [everything]
  capabilities: [chat, completions, tools, reasoning]
  # The engine refuses an oversize prompt itself (as SGLang would), the gateway does not.
  shaping: {{context_fit: false}}
vectors:
  command: {fake("--embedding-dim", "16")}
  memory_gb: 1
  capabilities: [embeddings]
prose:
  command: {fake("--json-mode", "--context", "1024")}
  memory_gb: 1
  max_model_len: 1024
  capabilities: [chat, completions, tools]
  shaping: {{context_fit: false}}
"""


async def test_a_model_that_does_everything_passes_every_probe(start_gateway):
    gw: Gateway = await start_gateway(CAPABLE)
    code, out, err = await probe(gw.url, "full", "vectors", "--json")
    assert code == 0, out + err
    report = json.loads(out)
    assert report["failed"] is False
    got = cells(report)
    assert got["full"] == {p: "ok" for p in got["full"]} | {"embeddings": "n/a"}
    assert got["vectors"] == {p: "n/a" for p in got["vectors"]} | {
        "loads": "ok", "embeddings": "ok"}
    full = report["models"][0]["probes"]
    assert full["loads"]["detail"].startswith("first answer from stopped after")
    assert "called get_weather" in full["tools"]["detail"]
    assert "The tool said: 18 degrees" in full["tools"]["detail"]
    assert re.match(r"\d+/1024 tokens answered .*; ~\d+ refused: 400 This model's maximum "
                    "context length is 1024", full["context"]["detail"])
    assert report["models"][1]["probes"]["embeddings"]["detail"] == "2 vectors of 16 dimensions"
    assert "full chat: ok" in err, "progress goes to stderr as the probes finish"

    # Once running, LOADS says so; an alias names the model too.
    code, out, _ = await probe(gw.url, "everything")
    assert code == 0
    assert row(out, "full")[1] == "ok (running)"


async def test_a_model_that_answers_in_prose_is_no_call_not_a_failure(start_gateway):
    gw = await start_gateway(CAPABLE)
    code, out, err = await probe(gw.url, "prose")
    assert code == 0, out + err
    cols = row(out, "prose")
    assert cols[0] == "prose" and re.fullmatch(r"no call \d+\.\ds", cols[4]), out
    assert re.search(r"^prose tools: no call: answered without calling get_weather: tok0",
                     out, re.M), out


async def test_broken_features_fail_the_run_with_the_reason(start_gateway):
    gw = await start_gateway(f"""
    loose:
      command: {fake()}
      memory_gb: 1
      max_model_len: 512
      shaping: {{context_fit: false}}
    mute:
      command: {fake("--no-usage")}
      memory_gb: 1
      max_model_len: 512
      capabilities: [chat, completions, reasoning]
    """)
    code, out, err = await probe(gw.url, "--all", "--json")
    assert code == 1, out + err
    report = json.loads(out)
    assert report["failed"] is True
    got = cells(report)
    assert got["loose"]["json"] == "fail" and got["loose"]["context"] == "fail"
    assert got["loose"]["chat"] == got["loose"]["stream"] == got["loose"]["concurrent"] == "ok"
    assert got["mute"]["stream"] == "fail" and got["mute"]["reasoning"] == "fail"
    assert got["mute"]["context"] == "n/a"
    details = {m["id"]: {k: c["detail"] for k, c in m["probes"].items()}
               for m in report["models"]}
    assert details["loose"]["json"] == "content is not JSON: tok0 tok1 tok2 tok3 tok4"
    assert "over the 512 limit, was answered" in details["loose"]["context"]
    assert details["mute"]["stream"].startswith("no usage in the final chunk")
    assert details["mute"]["reasoning"].startswith("no reasoning_content")
    assert details["mute"]["context"].startswith("the answers carry no usage")

    code, _, err = await probe(gw.url, "nonesuch")
    assert code == 2 and "not served here: nonesuch (served: loose, mute)" in err
    code, _, err = await probe(gw.url)
    assert code == 2 and "name the models to probe, or give --all" in err
    code, _, err = await probe(gw.url, "loose", key="sk-wrong")
    assert code == 1 and "invalid" in err.lower(), err


async def test_no_gateway_is_said_plainly(tmp_path):
    from .conftest import free_port

    code, _, err = await probe(f"http://127.0.0.1:{free_port()}", "--all")
    assert code == 1 and "no sparkstack answers at" in err


# ------------------------------------------------------------------ the real engine


@pytest.fixture(scope="module")
def demo_probe(demo, tmp_path_factory) -> tuple[tuple[int, str, str], tuple[int, str, str]]:
    """`probe --all` (the table) and then `probe gemma-embed --json` against one demo
    gateway: the second run finds gemma-embed still running."""
    async def run() -> tuple[tuple[int, str, str], tuple[int, str, str]]:
        async with serving(demo, tmp_path_factory.mktemp("demo") / "data") as gw:
            table = await probe(gw.url, "--all")
            as_json = await probe(gw.url, "gemma-embed", "--json")
            return table, as_json

    return asyncio.run(run())


@pytest.mark.e2e
def test_demo_models_table(demo_probe):
    (code, out, err), _ = demo_probe
    # Gemma is a base model: in JSON mode it opens an object and never closes it.
    assert code == 1, out + err
    assert [ln.split(": ")[0] for ln in out.splitlines() if ": fail: " in ln] == ["gemma json"]
    assert "gemma json: fail: the object was still open when max_tokens cut it" in out
    smol, gemma, embed = row(out, "smol-chat"), row(out, "gemma"), row(out, "gemma-embed")
    heads = ["MODEL", "LOADS", "CHAT", "STREAM", "TOOLS", "REASONING", "JSON", "CONTEXT",
             "2 AT ONCE", "EMBED"]
    assert row(out, "MODEL") == heads, out
    for name, cols in (("smol-chat", smol), ("gemma", gemma)):
        got = dict(zip(heads, cols, strict=True))
        for probe_name in ("LOADS", "CHAT", "STREAM", "CONTEXT", "2 AT ONCE"):
            assert re.fullmatch(r"ok \d+\.\ds", got[probe_name]), (name, probe_name, out)
        assert got["REASONING"] == got["EMBED"] == "n/a"
    # The 135M model takes the tool and answers in prose: said so, and not a failure.
    assert re.fullmatch(r"ok \d+\.\ds", smol[6]) and re.fullmatch(r"FAIL \d+\.\ds", gemma[6])
    assert re.fullmatch(r"no call \d+\.\ds", smol[4]), out
    assert "smol-chat tools: no call: answered without calling get_weather" in out
    assert gemma[4] == "n/a" and "gemma n/a: tools (no 'tools' capability)" in out
    assert re.fullmatch(r"ok \d+\.\ds", embed[1]) and re.fullmatch(r"ok \d+\.\ds", embed[9])
    assert embed[2:9] == ["n/a"] * 7
    # The ceiling: near the limit answered, over it refused by the gateway with why.
    assert re.search(r"smol-chat context: (\d+)/4096 tokens answered in [\d.]+ s; ~\d+ "
                     r"refused: 400 prompt is \d+ tokens; smol-chat accepts 4096", out), out
    near = int(re.search(r"smol-chat context: (\d+)/4096", out)[1])
    assert 3800 < near <= 4096 - 8, "near the limit, with room for the answer"


@pytest.mark.e2e
def test_demo_json_report_is_for_scripts(demo_probe):
    _, (code, out, err) = demo_probe
    assert code == 0, out + err
    report = json.loads(out)
    (embed,) = report["models"]
    assert embed["id"] == "gemma-embed" and embed["kind"] == "embeddings"
    assert embed["probes"]["loads"] == {"status": "ok", "detail": "already running",
                                        "seconds": None}
    assert embed["probes"]["embeddings"]["status"] == "ok"
    assert embed["probes"]["embeddings"]["detail"] == "2 vectors of 640 dimensions"
    assert embed["probes"]["chat"] == {"status": "n/a", "detail": "an embeddings model",
                                       "seconds": None}
