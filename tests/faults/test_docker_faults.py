"""Docker faults, for real: the daemon stopped, crashed and restarted, containers removed
or stopped by hand, the gateway SIGKILLed while containers run.

These tests restart the machine's Docker daemon (stopping every container on it), so
they carry the `docker_faults` marker: `pytest -m "not docker_faults"` leaves them out.
Like tests/test_docker.py they fail, not skip, with CI=true when no daemon answers, and
whatever happens the daemon runs again when each test ends.
"""

from __future__ import annotations

import asyncio
import signal
from collections.abc import AsyncIterator
from pathlib import Path

import aiodocker
import aiohttp
import pytest

from sparkstack.config import load_config
from sparkstack.engines import launch_spec
from sparkstack.runtime import LogBuffer
from sparkstack.runtime.docker import LABEL_MODEL, DockerRuntime, container_name
from sparkstack.scheduler import State

from ..conftest import IMAGE, KEY, Gateway, free_port, pids, write_config
from ..test_cli import start_serving
from ..test_docker import docker_model, info
from . import dockerd
from .common import chat, last_event, stream, tokens

pytestmark = pytest.mark.docker_faults

HELD = {"x-fake-gate": "held"}


@pytest.fixture(autouse=True)
async def no_engine_left(docker: aiodocker.Docker) -> AsyncIterator[None]:
    """Here engines are containers. After the test (and its gateway): the daemon answers
    again, whatever happened, and no container of ours is left running."""
    try:
        yield
    finally:
        if not await asyncio.to_thread(dockerd.answers):
            await dockerd.start()
    ours = {"label": [LABEL_MODEL], "ancestor": [IMAGE]}
    left = [c.id[:12] for c in await docker.containers.list(filters=ours)]
    assert not left, f"containers left running: {left}"


async def running(client: aiodocker.Docker, model: str) -> bool:
    try:
        return bool((await info(client, model))["State"]["Running"])
    except aiodocker.DockerError as e:
        if e.status == 404:
            return False
        raise


async def ready_model(start_gateway, tmp_path: Path, *args: str) -> Gateway:
    gw: Gateway = await start_gateway(docker_model("dk", tmp_path, *args), start_backoff="0.2s")
    status, body = await chat(gw, "dk")
    assert status == 200, body
    return gw


async def until_served(gw: Gateway, model: str, timeout: float = 60) -> None:
    """Requests until one is served: after a fault, a start may first be refused (its
    back-off) while the gateway catches up. Each refusal must be a clear error."""
    async with asyncio.timeout(timeout):
        while True:
            status, body = await chat(gw, model)
            if status == 200:
                return
            assert status in (502, 503), body
            assert body["error"]["code"] in (
                "engine_unreachable", "runtime_unavailable", "start_backoff", "engine_failed"
            ), body
            await asyncio.sleep(0.2)


async def test_daemon_restarted_while_idle(start_gateway, tmp_path, docker):
    gw = await ready_model(start_gateway, tmp_path)
    await dockerd.stop()  # a clean stop: the daemon stops its containers first
    status, body = await chat(gw, "dk")
    assert status in (502, 503), "no engine, no daemon: a clear error, not a hang"
    assert body["error"]["code"] in ("engine_unreachable", "runtime_unavailable"), body
    await dockerd.start()
    await gw.until_state("dk", State.STOPPED, timeout=30)  # noticed, at the latest now
    await until_served(gw, "dk")
    assert await running(docker, "dk")
    assert len(pids(tmp_path / "dk.starts")) == 2


async def test_daemon_restarted_while_serving(start_gateway, tmp_path, docker):
    gw = await ready_model(start_gateway, tmp_path)
    streaming = asyncio.create_task(stream(gw, "dk", headers=HELD))
    await gw.until(lambda: bool(gw.state("dk").active))
    port = gw.supervisor.ports["dk"]
    async with aiohttp.ClientSession() as s:
        while (await (await s.get(f"http://127.0.0.1:{port}/stats")).json())["gated"] != 1:
            await asyncio.sleep(0.05)
    await dockerd.stop()
    status, lines = await streaming
    assert status == 200 and tokens(lines) == "tok0 "
    assert last_event(lines)["error"]["code"] == "engine_died", "cut, with an error event"
    await dockerd.start()
    await gw.until_state("dk", State.STOPPED, timeout=30)
    await until_served(gw, "dk")
    status, lines = await stream(gw, "dk")
    assert lines[-1] == "data: [DONE]"


async def test_daemon_crash_while_serving_the_stream_finishes(
        start_gateway, tmp_path, docker):
    gw = await ready_model(start_gateway, tmp_path)
    streaming = asyncio.create_task(stream(gw, "dk", headers=HELD))
    await gw.until(lambda: bool(gw.state("dk").active))
    await dockerd.stop(signal.SIGKILL)  # the containers live on without their daemon
    status, body = await chat(gw, "dk")
    assert status == 200, f"a running engine serves on while the daemon is down: {body}"
    await gw.release("dk", "held")
    status, lines = await streaming
    assert lines[-1] == "data: [DONE]" and "error" not in "".join(lines)
    # A daemon without live-restore stops the containers it finds at its next start.
    await dockerd.start()
    await gw.until_state("dk", State.STOPPED, timeout=30)
    await until_served(gw, "dk")
    assert await running(docker, "dk")


async def test_container_removed_by_hand_while_ready(start_gateway, tmp_path, docker):
    gw = await ready_model(start_gateway, tmp_path)
    first = (await info(docker, "dk"))["Id"]
    await (await docker.containers.get(container_name("dk"))).delete(force=True)
    await gw.until_state("dk", State.STOPPED, timeout=30)
    assert "SIGKILL" in (gw.state("dk").last_error or "")
    status, body = await chat(gw, "dk")
    assert status == 200, body
    assert (await info(docker, "dk"))["Id"] != first, "a new container"


async def test_container_stopped_by_hand_while_ready(start_gateway, tmp_path, docker):
    gw = await ready_model(start_gateway, tmp_path)
    first = (await info(docker, "dk"))["Id"]
    await (await docker.containers.get(container_name("dk"))).stop(t=2)
    await gw.until_state("dk", State.STOPPED, timeout=30)
    assert gw.state("dk").stop_reason == "crashed"
    status, body = await chat(gw, "dk")
    assert status == 200, body
    assert (await info(docker, "dk"))["Id"] == first, "the stopped container is re-used"


async def test_sigkilled_gateway_containers_are_adopted_or_stopped_at_next_start(
        tmp_path, docker):
    models = docker_model("keep", tmp_path) + docker_model("gone", tmp_path) + docker_model(
        "changed", tmp_path)
    config = write_config(tmp_path, models)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc, _ = await start_serving(config, port)
    try:
        async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {KEY}"},
                                         timeout=aiohttp.ClientTimeout(total=120)) as http:
            for m in ("keep", "gone", "changed"):
                async with http.post(f"{url}/api/models/{m}/load") as resp:
                    assert resp.status == 200, await resp.text()
            kept = await info(docker, "keep")
            proc.kill()  # SIGKILL: the containers run on, unowned
            await proc.wait()
            assert all([await running(docker, m) for m in ("keep", "gone", "changed")])
            # The next gateway: "gone" left the catalog, "changed" has new arguments.
            config = write_config(tmp_path, docker_model("keep", tmp_path) + docker_model(
                "changed", tmp_path, "--tokens", "2"))
            proc, _ = await start_serving(config, port)
            async with http.get(url + "/api/models") as resp:
                states = {m["id"]: m["state"] for m in (await resp.json())["models"]}
            assert states == {"keep": "ready", "changed": "stopped"}
            assert not await running(docker, "gone"), "stale: stopped at start"
            assert not await running(docker, "changed"), "stale: stopped at start"
            after = await info(docker, "keep")
            assert after["State"]["StartedAt"] == kept["State"]["StartedAt"], "adopted"
            async with http.post(url + "/v1/chat/completions",
                                 json={"model": "changed", "messages": []}) as resp:
                body = await resp.json()
            assert body["choices"][0]["message"]["content"] == "tok0 tok1 "
    finally:
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 60) == 0
    for m in ("keep", "changed"):
        assert not await running(docker, m), "a clean exit stops them"


async def test_waiting_on_a_container_removed_behind_our_back_ends(tmp_path, docker):
    """Had the container gone while the daemon was away (or between two looks), waiting
    on it used to retry forever: its model stayed "ready" and every request failed."""
    runtime = DockerRuntime()
    config = load_config(write_config(tmp_path, docker_model("dk", tmp_path)))
    spec = launch_spec(config.models["dk"], free_port(), None, tmp_path / "data")
    buf = LogBuffer()
    engine = await runtime.start(spec, buf)
    try:
        await engine.container.delete(force=True)
        async with asyncio.timeout(20):
            code = await engine.wait()
        assert code == 137 and "removed outside sparkstack" in "\n".join(buf.tail(5))
    finally:
        await runtime.close()
