"""The `sparkstack` command as a user runs it: check, serve, and a clean exit."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import stat
import subprocess
import sys
from pathlib import Path

import aiohttp

from .conftest import KEY, fake, free_port, local_server, pid_alive, pids, write_config

SPARKSTACK = [sys.executable, "-m", "sparkstack.cli"]


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*SPARKSTACK, *args], capture_output=True, text=True, timeout=60,
                          env={**os.environ, **(env or {})})


def test_check_prints_every_problem(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("models:\n  a: {memory_gb: lots}\n  b: {command: [x], pinned: maybe}\n")
    result = run_cli("check", "--config", str(path))
    assert result.returncode == 2
    assert "3 problem(s)" in result.stderr
    assert "model 'a', field 'memory_gb'" in result.stderr
    assert "model 'a': engine 'custom' needs a 'command'" in result.stderr
    assert "model 'b', field 'pinned'" in result.stderr


def test_check_accepts_the_example_config():
    example = Path(__file__).parents[1] / "examples" / "fake-engines.yaml"
    result = run_cli("check", "--config", str(example))
    assert result.returncode == 0, result.stderr
    assert "2 models (2 enabled)" in result.stdout


async def start_serving(config: Path | None, port: int, env: dict[str, str] | None = None):
    """`sparkstack serve` in a subprocess; returns it once its banner is printed."""
    args = ["--config", str(config)] if config else []
    proc = await asyncio.create_subprocess_exec(
        *SPARKSTACK, "serve", *args, "--listen", f"127.0.0.1:{port}",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
        env={**os.environ, **(env or {})})
    banner = b""
    assert proc.stdout is not None
    while b"curl" not in banner:
        line = await asyncio.wait_for(proc.stdout.readline(), 30)
        assert line, banner.decode()
        banner += line
    return proc, banner.decode()


async def test_sigterm_finishes_inflight_stream_then_leaves_no_engine(tmp_path):
    starts = tmp_path / "a.starts"
    config = write_config(tmp_path, f"""
    a:
      command: {fake("--tokens", "20", "--gate", starts=starts)}
      memory_gb: 1
    """)
    port = free_port()
    proc, _ = await start_serving(config, port)
    url = f"http://127.0.0.1:{port}/v1/chat/completions"
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {KEY}"}) as http:
        payload = {"model": "a", "messages": [], "stream": True}
        async with http.post(url, json=payload) as resp:
            while not (await resp.content.readuntil(b"\n\n")).startswith(b"data: {"):
                pass
            async with http.get(f"http://127.0.0.1:{port}/api/models") as models:
                engine_port = (await models.json())["models"][0]["port"]
            proc.send_signal(signal.SIGTERM)  # the stream is held at the engine's gate
            async with http.post(f"http://127.0.0.1:{engine_port}/release") as released:
                assert released.status == 200
            rest = (await resp.content.read()).decode()
    assert rest.rstrip().endswith("data: [DONE]"), "the in-flight stream finished"
    assert await asyncio.wait_for(proc.wait(), 30) == 0
    assert not pid_alive(pids(starts)[0]), "no orphan engine"
    assert (tmp_path / "data" / "logs" / "a.log").read_text().count("fake engine ready") == 1


async def test_engines_die_with_a_killed_gateway(tmp_path):
    starts = tmp_path / "a.starts"
    config = write_config(tmp_path, f"a: {{command: {fake(starts=starts)}, memory_gb: 1, "
                                    "pinned: true}")
    proc, _ = await start_serving(config, free_port())
    for _ in range(100):
        if pids(starts):
            break
        await asyncio.sleep(0.05)
    engine = pids(starts)[0]
    proc.kill()
    await proc.wait()
    for _ in range(100):
        if not pid_alive(engine):
            break
        await asyncio.sleep(0.05)
    assert not pid_alive(engine), "the engine follows a SIGKILLed gateway (PR_SET_PDEATHSIG)"


async def test_first_run_generates_a_private_key_and_prints_a_curl(tmp_path):
    config = tmp_path / "s.yaml"
    config.write_text(f"memory_gb: 4\nmodels:\n  a: {{command: {fake()}, memory_gb: 1}}\n")
    env = {"SPARKSTACK_DATA_DIR": str(tmp_path / "data"), "SPARKSTACK_API_KEY": "",
           "VLLM_API_KEY": ""}
    port = free_port()
    proc, banner = await start_serving(config, port, env)
    key_file = tmp_path / "data" / "api_key"
    key = key_file.read_text().strip()
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    assert key.startswith("sk-spark-") and key in banner
    assert re.search(rf"curl http://127.0.0.1:{port}/v1/chat/completions .*Bearer {key}", banner)
    async with aiohttp.ClientSession() as http:
        async with http.get(f"http://127.0.0.1:{port}/v1/models",
                            headers={"Authorization": f"Bearer {key}"}) as resp:
            assert resp.status == 200
    proc.send_signal(signal.SIGTERM)
    await proc.wait()
    proc, banner = await start_serving(config, port, env)
    proc.send_signal(signal.SIGTERM)
    await proc.wait()
    assert key in banner, "the next run uses the same key"


def test_models_lists_the_dgx_spark_catalog():
    result = run_cli("models", "--catalog", "dgx-spark", env={"COLUMNS": "250"})
    assert result.returncode == 0, result.stderr
    assert "54 models in the built-in catalog 'dgx-spark'" in result.stdout
    for model in ("gpt-oss-120b", "qwen2.5-1.5b-instruct", "nemotron-3-nano-30b-nvfp4"):
        assert model in result.stdout


async def test_setup_fetches_the_tiktoken_files_where_the_catalog_mounts_them(tmp_path):
    from aiohttp import web

    served = {"cl100k_base.tiktoken": b"IQ== 0\nIg== 1\n", "o200k_base.tiktoken": b"IQ== 0\n"}

    async def file(request: web.Request) -> web.Response:
        return web.Response(body=served[request.match_info["name"]])

    app = web.Application()
    app.router.add_get("/enc/{name}", file)
    config = tmp_path / "c.yaml"
    config.write_text("""
models:
  oss:
    runtime: docker
    engine: vllm
    image: some/vllm:1
    weights: openai/gpt-oss-20b
    env: {TIKTOKEN_ENCODINGS_BASE: /etc/encodings}
    volumes: ["./enc:/etc/encodings:ro"]
""")
    async with local_server(app) as port:
        args = ["setup", "--config", str(config), "--tiktoken-url", f"http://127.0.0.1:{port}/enc"]
        first = await asyncio.to_thread(run_cli, *args)
        assert first.returncode == 0, first.stderr
        for name, data in served.items():
            assert (tmp_path / "enc" / name).read_bytes() == data
        second = await asyncio.to_thread(run_cli, *args)
        assert second.stdout.count("already present") == 2


def sigill_engine(tmp_path: Path) -> tuple[Path, dict[str, str]]:
    """A catalog whose llama.cpp binary dies of SIGILL, as a build for another CPU does."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    binary = bindir / "llama-server"
    binary.write_text("#!/bin/sh\necho 'load_tensors: repacking'\nkill -ILL $$\n")
    binary.chmod(binary.stat().st_mode | stat.S_IXUSR)
    (tmp_path / "model.gguf").write_bytes(b"GGUF")
    config = write_config(tmp_path, """
    m:
      engine: llamacpp
      weights: model.gguf
      memory_gb: 1
    """)
    return config, {"PATH": f"{bindir}:{os.environ['PATH']}",
                    "SPARKSTACK_DATA_DIR": str(tmp_path / "data")}


def test_check_and_setup_refuse_an_engine_that_cannot_run(tmp_path):
    config, env = sigill_engine(tmp_path)
    result = run_cli("check", "--config", str(config), "--listen", f"127.0.0.1:{free_port()}",
                     env=env)
    assert result.returncode == 1, result.stdout
    assert "cannot run here: it was killed by SIGILL (illegal instruction)" in result.stdout
    assert "load_tensors: repacking" in result.stdout, "its last log line is shown"
    assert "make install" in result.stdout
    result = run_cli("setup", "--config", str(config), env=env)
    assert result.returncode == 1 and "SIGILL" in result.stderr


async def test_access_log_prints_a_line_per_request(tmp_path):
    config = write_config(tmp_path, f"""
    a:
      command: {fake("--tokens", "7")}
      memory_gb: 1
    """)
    port = free_port()
    proc = await asyncio.create_subprocess_exec(
        *SPARKSTACK, "serve", "--config", str(config), "--listen", f"127.0.0.1:{port}",
        "--access-log", stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    assert proc.stdout is not None
    output = b""
    while b"curl" not in output:
        output += await asyncio.wait_for(proc.stdout.readline(), 30)
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {KEY}"}) as http:
        async with http.post(f"http://127.0.0.1:{port}/v1/chat/completions",
                             json={"model": "a", "messages": []}) as resp:
            assert resp.status == 200
    while b"sparkstack.access" not in output:
        output += await asyncio.wait_for(proc.stdout.readline(), 30)
    line = output.decode().splitlines()[-1]
    assert "200 /v1/chat/completions model=a key=key1" in line and "tokens=" in line
    assert KEY not in output.decode(), "the key itself is never printed"
    assert "starting a (custom, process runtime)" in output.decode()
    proc.send_signal(signal.SIGTERM)
    assert await asyncio.wait_for(proc.wait(), 30) == 0
