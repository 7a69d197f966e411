"""The Docker runtime against a real Docker daemon.

The test image is assembled here, without any registry: an almost empty root file
system (`docker import`) into which the host's Python, the virtualenv and this
repository are bind-mounted read-only, so the container runs tests/fake_engine.py.
With CI=true these tests fail (not skip) when Docker cannot be reached.
"""

from __future__ import annotations

import asyncio
import io
import os
import signal
import subprocess
import sys
import tarfile
from pathlib import Path

import aiodocker
import aiohttp
import pytest

from sparkstack.runtime.docker import LABEL_HASH, LABEL_MODEL, container_name
from sparkstack.scheduler import State

from .conftest import FAKE_ENGINE, KEY, free_port, pids
from .test_cli import start_serving

IMAGE = "sparkstack-test-engine:2"
REPO = Path(__file__).resolve().parents[1]


def _rootfs_tar() -> bytes:
    """A root file system with only the directories and symlinks a Debian host's
    bind-mounted /usr needs (merged /usr: /bin, /lib, /lib64 point into it)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        # /sbin is a real directory: Docker mounts its init process at /sbin/docker-init.
        for d in ("usr", "tmp", "etc", "proc", "sys", "dev", "root", "work", "sbin"):
            info = tarfile.TarInfo(d)
            info.type, info.mode = tarfile.DIRTYPE, 0o1777 if d == "tmp" else 0o755
            tar.addfile(info)
        for link in ("bin", "lib", "lib64"):
            info = tarfile.TarInfo(link)
            info.type, info.linkname = tarfile.SYMTYPE, f"usr/{link}"
            tar.addfile(info)
    return buf.getvalue()


@pytest.fixture(scope="session")
def docker_image() -> str:
    try:
        subprocess.run(["docker", "info"], check=True, capture_output=True, timeout=20)
    except (OSError, subprocess.SubprocessError) as e:
        message = f"no Docker daemon answers ({e}); `make test` starts one when run as root"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    if subprocess.run(["docker", "image", "inspect", IMAGE], capture_output=True).returncode:
        subprocess.run(["docker", "import", "-", IMAGE], input=_rootfs_tar(), check=True,
                       capture_output=True, timeout=60)
    return IMAGE


def mounts(tmp_path: Path) -> list[str]:
    """What the fake engine needs from the host, read-only, plus the test's folder."""
    paths = {Path("/usr"), Path(sys.base_prefix).resolve(), Path(sys.prefix), REPO, tmp_path}
    return [f"{p}:{p}:{'rw' if p == tmp_path else 'ro'}" for p in sorted(paths)]


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


@pytest.fixture
async def docker(docker_image):
    client = aiodocker.Docker()
    yield client
    for c in await client.containers.list(all=True, filters={"label": [LABEL_MODEL]}):
        await c.delete(force=True)
    await client.close()


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
    config = tmp_path / "s.yaml"
    config.write_text(f"api_keys: [{KEY}]\nmemory_gb: 4\ndata_dir: {tmp_path / 'data'}\n"
                      f"models:{docker_model('dk', tmp_path)}")
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
    config = tmp_path / "s.yaml"
    config.write_text(f"api_keys: [{KEY}]\nmemory_gb: 4\ndata_dir: {tmp_path / 'data'}\n"
                      f"models:{docker_model('dk', tmp_path)}")
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
    assert "docker build" in body["error"]["message"]
    with pytest.raises(aiodocker.DockerError):
        await info(docker, "ghost")


async def test_unreachable_docker_fails_closed_with_503(start_gateway, tmp_path, monkeypatch,
                                                        docker_image):
    monkeypatch.setenv("DOCKER_HOST", f"unix://{tmp_path}/no-docker.sock")
    gw = await start_gateway(docker_model("dk", tmp_path))
    status, body = await gw.chat("dk")
    assert status == 503 and body["error"]["code"] == "docker_unavailable"
    assert "Docker is not reachable" in body["error"]["message"]
    async with gw.http.get(gw.url + "/healthz") as resp:
        assert resp.status == 200
    async with gw.http.get(gw.url + "/api/models") as resp:
        (dk,) = (await resp.json())["models"]
    assert "Docker is not reachable" in dk["last_error"]
