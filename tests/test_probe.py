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
from rich.console import Console

from sparkstack.probe import PROBES, Cell, Result, show

from .conftest import KEY, Gateway, fake, serving


async def probe(url: str, *args: str, key: str = KEY) -> tuple[int, str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("SPARKSTACK_API_KEY", "VLLM_API_KEY", "SPARKSTACK_URL")}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "sparkstack.cli", "probe", *args, "--url", url, "--key", key,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        env={**env, "COLUMNS": "80"})  # the narrowest terminal the table must fit
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


# The longest id in the DGX catalog: it wraps within its column.
LONG_ID = "jackrong-qwen3.5-35b-a3b-claude-4.6-opus-reasoning-distilled"


def test_the_table_is_whole_at_80_columns_and_the_reasons_are_under_it():
    def result(model: str, kind: str = "chat", **cells: Cell) -> Result:
        r = Result(model, kind)  # type: ignore[arg-type]
        for key in PROBES:
            r.cells[key] = cells.get(key) or Cell("n/a", "not an embeddings model")
        return r

    slow_load = Cell("ok", "first answer from stopped after 312.5 s", 312.5, "312s")
    results = [
        result("smol-chat",
               loads=Cell("ok", "first answer from stopped after 3.6 s", 3.6, "3.6s"),
               chat=Cell("ok", "answered: Paris.", 1.3), stream=Cell("ok", "usage", 1.0),
               tools=Cell("no call", "answered without calling get_weather: Paris is sunny",
                          4.7),
               reasoning=Cell("n/a", "no 'reasoning' capability"),
               json=Cell("ok", "a JSON object", 4.6),
               context=Cell("ok", "4001/4096 tokens answered in 45.4 s; ~4301 refused: 400 "
                            "prompt is 4301 tokens; smol-chat accepts 4096", 45.4,
                            "4001/4096"),
               concurrent=Cell("fail", "1 of 2 failed: 502 the engine went away", 0.8)),
        result(LONG_ID, loads=slow_load, chat=Cell("ok"), stream=Cell(
                   "fail", "no usage in the final chunk (stream_options.include_usage)", 2.0),
               tools=Cell("ok"), reasoning=Cell("ok"),
               json=Cell("fail", "the object was still open when max_tokens cut it (the "
                         "engine constrains the output, the model does not finish)", 3.2),
               context=Cell("ok", "130500/131072 tokens answered", 900.0, "127k/128k"),
               concurrent=Cell("ok")),
        result("gemma-embed", "embeddings",
               loads=Cell("ok", "already running", shown="ready"),
               **{k: Cell("n/a", "an embeddings model") for k in
                  ("chat", "stream", "tools", "reasoning", "json", "context", "concurrent")},
               embeddings=Cell("ok", "2 vectors of 640 dimensions", 0.1)),
    ]
    console = Console(width=80, record=True)
    show(console, results, "http://127.0.0.1:18009")
    text = console.export_text()
    assert "…" not in text, text
    lines = text.splitlines()
    assert max(len(ln.rstrip()) for ln in lines[:lines.index("")]) <= 80, text
    assert row(text, "MODEL") == ["MODEL", "LOAD", "CHAT", "STREAM", "TOOLS", "THINK", "JSON",
                                  "CTX", "2X", "EMBED"], text
    assert row(text, "smol-chat") == ["smol-chat", "3.6s", "ok", "ok", "no call", "—", "ok",
                                      "4001/4096", "FAIL", "—"], text
    assert row(text, "gemma-embed") == ["gemma-embed", "ready", *["—"] * 7, "ok"], text
    long_row = next(i for i, ln in enumerate(lines) if ln.startswith(LONG_ID[:8]))
    assert re.split(r"\s{2,}", lines[long_row].strip())[1:] == [
        "312s", "ok", "FAIL", "ok", "ok", "FAIL", "127k/128k", "ok", "—"], text
    # The id, wrapped in its column, is whole: its pieces start the next lines.
    pieces = [ln.split("  ")[0] for ln in lines[long_row:long_row + 8]]
    assert LONG_ID in "".join(pieces), text
    # Under the table, whole lines (however long): why each probe failed or made no call,
    # what the context probe measured, and why the others did not run.
    for line in (
        "smol-chat tools: no call: answered without calling get_weather: Paris is sunny",
        "smol-chat ctx: 4001/4096 tokens answered in 45.4 s; ~4301 refused: 400 prompt is "
        "4301 tokens; smol-chat accepts 4096",
        "smol-chat 2x: FAIL: 1 of 2 failed: 502 the engine went away",
        "smol-chat not run: think (no 'reasoning' capability); embed (not an embeddings "
        "model)",
        f"{LONG_ID} stream: FAIL: no usage in the final chunk "
        "(stream_options.include_usage)",
        f"{LONG_ID} json: FAIL: the object was still open when max_tokens cut it (the engine "
        "constrains the output, the model does not finish)",
        f"{LONG_ID} ctx: 130500/131072 tokens answered",
        "gemma-embed not run: chat, stream, tools, think, json, ctx, 2x (an embeddings model)",
    ):
        assert line in lines, (line, text)
    # The JSON report (for scripts) keeps its shape: what the table shows is not in it.
    assert results[2].as_dict()["probes"]["loads"] == {
        "status": "ok", "detail": "already running", "seconds": None}


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

    # Once running, LOAD says so; an alias names the model too.
    code, out, _ = await probe(gw.url, "everything")
    assert code == 0
    assert row(out, "full")[1] == "ready"


async def test_a_model_that_answers_in_prose_is_no_call_not_a_failure(start_gateway):
    gw = await start_gateway(CAPABLE)
    code, out, err = await probe(gw.url, "prose")
    assert code == 0, out + err
    cols = row(out, "prose")
    assert cols[0] == "prose" and cols[4] == "no call", out
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
    assert [ln.split(": ")[0] for ln in out.splitlines() if ": FAIL: " in ln] == ["gemma json"]
    assert "gemma json: FAIL: the object was still open when max_tokens cut it" in out
    assert "…" not in out.split("\n\n")[0], "every cell whole at 80 columns"
    smol, gemma, embed = row(out, "smol-chat"), row(out, "gemma"), row(out, "gemma-embed")
    heads = ["MODEL", "LOAD", "CHAT", "STREAM", "TOOLS", "THINK", "JSON", "CTX", "2X", "EMBED"]
    assert row(out, "MODEL") == heads, out
    for name, cols in (("smol-chat", smol), ("gemma", gemma)):
        got = dict(zip(heads, cols, strict=True))
        assert re.fullmatch(r"\d+(\.\d)?s", got["LOAD"]), (name, out)
        assert got["CHAT"] == got["STREAM"] == got["2X"] == "ok", (name, out)
        assert re.fullmatch(r"\d+/\d+", got["CTX"]), (name, out)
        assert got["THINK"] == got["EMBED"] == "—"
    # The 135M model takes the tool and answers in prose: said so, and not a failure.
    assert smol[6] == "ok" and gemma[6] == "FAIL"
    assert smol[4] == "no call", out
    assert "smol-chat tools: no call: answered without calling get_weather" in out
    assert gemma[4] == "—" and "gemma not run: tools (no 'tools' capability)" in out
    assert re.fullmatch(r"\d+(\.\d)?s", embed[1]) and embed[9] == "ok"
    assert embed[2:9] == ["—"] * 7
    # The ceiling: near the limit answered, over it refused by the gateway with why.
    assert re.search(r"smol-chat ctx: (\d+)/4096 tokens answered in [\d.]+ s; ~\d+ "
                     r"refused: 400 prompt is \d+ tokens; smol-chat accepts 4096", out), out
    near = int(re.search(r"smol-chat ctx: (\d+)/4096", out)[1])
    assert smol[7] == f"{near}/4096"
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
