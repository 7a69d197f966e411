"""The Docker runtime against a real Docker daemon, with the test image assembled by
conftest.docker_image (no registry). With CI=true these tests fail, not skip, when
Docker cannot be reached."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from pathlib import Path

import aiodocker
import aiohttp
import pytest

from sparkstack.runtime.docker import LABEL_HASH, LABEL_MODEL, container_name
from sparkstack.scheduler import State

from .conftest import FAKE_ENGINE, IMAGE, KEY, free_port, mounts, pids, write_config
from .test_cli import start_serving


def docker_model(name: str, tmp_path: Path, *args: str, ttl: str = "10m") -> str:
    starts = tmp_path / f"{name}.starts"
    argv = [sys.executable, str(FAKE_ENGINE), "--port", "${PORT}", "--starts-file", str(starts),
            *args]
    vols = ", ".join(f'"{v}"' for v in mounts(tmp_path))
    return f"""
    {name}:
      runtime: docker
      image: {IMAGE}
      command: [{", ".join(f'"{a}"' for a in argv)}]
      volumes: [{vols}]
      gpus: none
      shm_size: 64m
      ulimits: {{memlock: 8388608, stack: 67108864}}  # this sandbox caps memlock at 8 MiB
      memory_gb: 1
      ttl: {ttl}
      stop_timeout: 2s
    """


async def info(client: aiodocker.Docker, model: str) -> dict:
    return await (await client.containers.get(container_name(model))).show()


async def test_cold_start_creates_the_container_ttl_stops_it_next_request_reuses_it(
        start_gateway, tmp_path, docker):
    gw = await start_gateway(docker_model("dk", tmp_path, ttl="1s"))
    status, body = await gw.chat("dk")
    assert status == 200, body
    first = await info(docker, "dk")
    host = first["HostConfig"]
    assert first["State"]["Running"]
    assert first["Config"]["Labels"][LABEL_MODEL] == "dk"
    assert host["NetworkMode"] == "host" and host["Init"] is True
    assert host["RestartPolicy"]["Name"] == "no" and host["ShmSize"] == 64 * 1024**2
    assert {u["Name"]: u["Hard"] for u in host["Ulimits"]} == {"memlock": 8388608,
                                                                "stack": 67108864}
    await gw.until_state("dk", State.STOPPED, timeout=30)
    assert not (await info(docker, "dk"))["State"]["Running"], "idle TTL stopped it"
    status, _ = await gw.chat("dk")
    again = await info(docker, "dk")
    assert status == 200 and again["Id"] == first["Id"], "the stopped container is re-used"
    assert len(pids(tmp_path / "dk.starts")) == 2
    async with gw.http.get(gw.url + "/api/models/dk/logs") as resp:
        assert "fake engine ready" in await resp.text()


async def test_config_change_recreates_the_container(start_gateway, tmp_path, docker):
    gw = await start_gateway(docker_model("dk", tmp_path))
    assert (await gw.chat("dk"))[0] == 200
    first = await info(docker, "dk")
    async with gw.http.post(gw.url + "/api/models/dk/unload") as resp:
        assert resp.status == 200
    gw2 = await start_gateway(docker_model("dk", tmp_path, "--tokens", "3"))
    status, body = await gw2.chat("dk")
    second = await info(docker, "dk")
    assert status == 200 and body["choices"][0]["message"]["content"] == "tok0 tok1 tok2 "
    assert second["Id"] != first["Id"]
    assert second["Config"]["Labels"][LABEL_HASH] != first["Config"]["Labels"][LABEL_HASH]


async def test_killed_gateway_restarts_and_adopts_the_running_container(tmp_path, docker):
    config = write_config(tmp_path, docker_model("dk", tmp_path))
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    headers = {"Authorization": f"Bearer {KEY}"}
    proc, _ = await start_serving(config, port)
    async with aiohttp.ClientSession(headers=headers) as http:
        async with http.post(url + "/api/models/dk/load") as resp:
            assert resp.status == 200
        before = await info(docker, "dk")
        proc.kill()  # SIGKILL: no clean-up at all
        await proc.wait()
        proc, _ = await start_serving(config, port)
        try:
            async with http.get(url + "/api/models") as resp:
                (dk,) = (await resp.json())["models"]
            assert dk["state"] == "ready", "adopted, not restarted"
            async with http.post(url + "/v1/chat/completions",
                                 json={"model": "dk", "messages": []}) as resp:
                assert resp.status == 200
            after = await info(docker, "dk")
            assert after["Id"] == before["Id"]
            assert after["State"]["StartedAt"] == before["State"]["StartedAt"]
            assert len(pids(tmp_path / "dk.starts")) == 1
        finally:
            proc.send_signal(signal.SIGTERM)
            assert await asyncio.wait_for(proc.wait(), 30) == 0
    assert not (await info(docker, "dk"))["State"]["Running"], "a clean exit stops it"


async def test_keep_engines_leaves_the_container_for_the_next_gateway(tmp_path, docker):
    config = write_config(tmp_path, docker_model("dk", tmp_path))
    port = free_port()
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "sparkstack.cli", "serve", "--config", str(config),
        "--listen", f"127.0.0.1:{port}", "--keep-engines", stdout=asyncio.subprocess.DEVNULL)
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {KEY}"}) as http:
        for _ in range(100):
            try:
                async with http.post(f"http://127.0.0.1:{port}/api/models/dk/load") as resp:
                    assert resp.status == 200
                    break
            except aiohttp.ClientConnectorError:
                await asyncio.sleep(0.1)
    proc.send_signal(signal.SIGTERM)
    assert await asyncio.wait_for(proc.wait(), 30) == 0
    assert (await info(docker, "dk"))["State"]["Running"], "kept for the next start"


async def test_container_that_exits_at_once_fails_fast_with_its_log(
        start_gateway, tmp_path, docker):
    gw = await start_gateway(docker_model("bad", tmp_path, "--exit-at-start", "1"))
    loop = asyncio.get_running_loop()
    began = loop.time()
    status, body = await gw.chat("bad")
    assert status == 502 and "CUDA error: out of memory" in body["error"]["message"]
    assert loop.time() - began < 15
    assert not (await info(docker, "bad"))["State"]["Running"], "nothing left running"


async def test_missing_image_names_the_image_and_the_fix(start_gateway, tmp_path, docker):
    gw = await start_gateway(docker_model("ghost", tmp_path).replace(IMAGE, "sparkstack/nope:0"))
    status, body = await gw.chat("ghost")
    assert status == 502 and body["error"]["code"] == "image_missing"
    assert "sparkstack/nope:0" in body["error"]["message"]
    assert "no Dockerfile for it in" in body["error"]["message"], "the fix is named"
    with pytest.raises(aiodocker.DockerError):
        await info(docker, "ghost")


async def test_unreachable_docker_fails_closed_with_503(start_gateway, tmp_path, monkeypatch,
                                                        docker_image):
    monkeypatch.setenv("DOCKER_HOST", f"unix://{tmp_path}/no-docker.sock")
    gw = await start_gateway(docker_model("dk", tmp_path))
    status, body = await gw.chat("dk")
    assert status == 503 and body["error"]["code"] == "runtime_unavailable"
    assert "Docker is not reachable" in body["error"]["message"]
    async with gw.http.get(gw.url + "/healthz") as resp:
        assert resp.status == 200
    async with gw.http.get(gw.url + "/api/models") as resp:
        (dk,) = (await resp.json())["models"]
    assert "Docker is not reachable" in dk["last_error"]


def test_check_lists_the_images_a_host_is_missing(docker_image, tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "sparkstack.cli", "check", "--catalog", "dgx-spark"],
        capture_output=True, text=True, timeout=60,
        env={**os.environ, "SPARKSTACK_DATA_DIR": str(tmp_path), "COLUMNS": "300"})
    assert result.returncode == 1, "problems found: exit 1"
    out = result.stdout
    assert "Docker reachable" in out
    for image, fix in (
            ("sparkstack/vllm-gb10:0.13.0", "sparkstack images build vllm-gb10 "),
            ("sparkstack/vllm-gb10-mxfp4:045293d", "sparkstack images build vllm-gb10-mxfp4 "),
            ("nvcr.io/nvidia/vllm:25.10-py3", "then docker pull nvcr.io/nvidia/vllm:25.10-py3")):
        assert f"image {image} missing" in out
        assert fix in out
    assert "missing cl100k_base.tiktoken, o200k_base.tiktoken" in out
    assert "run: sparkstack setup" in out


async def test_container_crash_while_serving_is_noticed_and_restarts(
        start_gateway, tmp_path, docker):
    gw = await start_gateway(docker_model("dk", tmp_path, "--crash-after", "1", "--tokens", "10",
                                          "--rate", "50"))
    assert (await gw.chat("dk"))[0] == 200
    first = await info(docker, "dk")
    lines = await gw.stream("dk")
    assert "engine_died" in lines[-1], "the stream ends with an error event"
    await gw.until_state("dk", State.STOPPED, timeout=5)
    assert "code 3" in (gw.state("dk").last_error or "")
    assert (await gw.chat("dk"))[0] == 200, "the next request starts it again"
    assert (await info(docker, "dk"))["Id"] == first["Id"]


async def test_an_empty_entrypoint_runs_the_command_without_the_images_own(
        start_gateway, tmp_path, docker, docker_image):
    """Some images' entrypoint does not pass the command on (the SGLang utility image:
    the original emptied it); `entrypoint: []` runs the command as the catalog wrote it."""
    image = "sparkstack-test-entrypoint:1"
    build = subprocess.run(
        ["docker", "build", "-q", "-t", image, "-"], capture_output=True, text=True,
        input=f'FROM {docker_image}\nENTRYPOINT ["/bin/false"]\n', timeout=120)
    assert build.returncode == 0, build.stderr
    entry = docker_model("ep", tmp_path).replace(f"image: {IMAGE}", f"image: {image}")
    gw = await start_gateway(entry.rstrip() + "\n      entrypoint: []\n")
    status, body = await gw.chat("ep")
    assert status == 200, body
    assert not (await info(docker, "ep"))["Config"]["Entrypoint"]
