"""The CLI against a running stack (sparkstack status, load, chat, activity, logs, unload),
run as a real subprocess against a gateway serving in the test."""

from __future__ import annotations

import asyncio
import os
import re
import sys
from pathlib import Path

from .conftest import KEY, Gateway, fake

VLLM_LOG = Path(__file__).with_name("data") / "vllm-load.log"
MODELS = f"""
coder:
  command: {fake("--served-name", "coder", "--load-log", VLLM_LOG, "--start-delay", "1",
                 "--tokens", "4")}
  memory_gb: 2
broken:
  command: {fake("--exit-at-start", "1")}
  memory_gb: 1
"""


async def cli(tmp_path: Path, gw: Gateway, *args: str, key_in_config: bool = True
              ) -> tuple[int, str, str]:
    """Run `sparkstack ARGS` finding the stack from a config file: its listen address,
    and its key (or, without one, the key file in its data directory)."""
    host_port = gw.url.removeprefix("http://")
    config = tmp_path / "client.yaml"
    data = tmp_path / "client-data"
    keys = f"api_keys: [{KEY}]\n" if key_in_config else ""
    config.write_text(f"listen: {host_port}\n{keys}data_dir: {data}\nmodels: {{}}\n")
    if not key_in_config:
        data.mkdir(exist_ok=True)
        (data / "api_key").write_text(KEY + "\n")
    env = {k: v for k, v in os.environ.items()
           if k not in ("SPARKSTACK_API_KEY", "VLLM_API_KEY", "SPARKSTACK_URL")}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "sparkstack.cli", *args, "--config", str(config),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        env={**env, "COLUMNS": "120"})
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def test_load_shows_progress_then_the_load_time(start_gateway, tmp_path):
    gw = await start_gateway(MODELS, memory_gb=4, start_backoff="30s")
    code, out, err = await cli(tmp_path, gw, "load", "coder")
    assert code == 0, err
    lines = out.strip().splitlines()
    progress = [ln for ln in lines if ln.startswith("coder: ")]
    assert any(re.fullmatch(r"coder: 47% \(weights\) \d+s", ln) for ln in progress), out
    assert any("(cuda-graphs)" in ln for ln in progress), out
    assert re.fullmatch(r"loaded coder in \d+\.\d s", lines[-1]), out

    code, out, err = await cli(tmp_path, gw, "status", key_in_config=False)
    assert code == 0, err
    row = next(ln for ln in out.splitlines() if ln.startswith("coder"))
    assert re.match(r"coder\s+ready\s+[\d.]+/2 GB\s+0\s+0\s+\d+s\s+19m\d\ds", row), out

    code, out, err = await cli(tmp_path, gw, "chat", "coder", "Hello there")
    assert code == 0, err
    assert out.strip() == "tok0 tok1 tok2 tok3"
    assert "4 tokens" in err

    code, out, err = await cli(tmp_path, gw, "activity", "-n", "5")
    assert code == 0, err
    assert re.search(r"coder\s+chat/completions \(stream\)\s+200\s+key1\s+2→4", out), out

    code, out, _ = await cli(tmp_path, gw, "logs", "coder", "-n", "100")
    assert "Loading safetensors checkpoint shards: 100%" in out

    code, out, err = await cli(tmp_path, gw, "unload", "coder")
    assert code == 0 and out.strip() == "coder is stopped", err


async def test_a_failed_load_prints_the_error_and_log_tail(start_gateway, tmp_path):
    gw = await start_gateway(MODELS, memory_gb=4, start_backoff="30s")
    code, _, err = await cli(tmp_path, gw, "load", "broken")
    assert code == 1
    assert "loading broken failed" in err and "exited with code 1" in err
    assert "CUDA error: out of memory" in err, "the engine's last log lines"


async def test_no_stack_is_said_plainly(tmp_path):
    from .conftest import free_port

    config = tmp_path / "c.yaml"
    config.write_text(f"listen: 127.0.0.1:{free_port()}\nmodels: {{}}\n")
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "sparkstack.cli", "status", "--config", str(config),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    _, err = await proc.communicate()
    assert proc.returncode == 1 and "no sparkstack answers at" in err.decode()
