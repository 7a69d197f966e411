"""Config reload (SIGHUP and POST /api/reload): unchanged models keep running, changed
ones restart once idle, removed ones stop once idle, added ones are available, and an
invalid config is refused with the running one kept."""

from __future__ import annotations

import asyncio
import signal
import textwrap

import aiohttp

from sparkstack.scheduler import State

from .conftest import KEY, fake, free_port, pids, write_config
from .test_cli import start_serving


def models_yaml(tmp_path, *, b_tokens: int = 5, with_c: bool = True, with_d: bool = False,
                a_ttl: str = "20m") -> str:
    s = {m: tmp_path / f"{m}.starts" for m in "abcd"}
    text = f"""
    a:
      command: {fake(starts=s["a"])}
      memory_gb: 1
      ttl: {a_ttl}
    b:
      command: {fake("--tokens", b_tokens, starts=s["b"])}
      memory_gb: 1
    """
    if with_c:
        text += f"""
    c:
      command: {fake(starts=s["c"])}
      memory_gb: 1
    """
    if with_d:
        text += f"""
    d:
      command: {fake(starts=s["d"])}
      memory_gb: 1
    """
    return text


def rewrite(tmp_path, models: str) -> None:
    path = tmp_path / "sparkstack.yaml"
    head = path.read_text().split("models:\n")[0]
    path.write_text(head + "models:\n" + textwrap.indent(textwrap.dedent(models), "  "))


async def reload(gw) -> tuple[int, dict]:
    async with gw.http.post(gw.url + "/api/reload") as resp:
        return resp.status, await resp.json()


async def test_reload_keeps_unchanged_restarts_changed_once_idle(start_gateway, tmp_path):
    gw = await start_gateway(models_yaml(tmp_path))
    for m in "abc":
        assert (await gw.chat(m))[0] == 200
    sup = gw.supervisor
    busy_b, busy_c = sup.submit("b"), sup.submit("c")  # a request in flight on each
    await sup.wait(busy_b)
    await sup.wait(busy_c)

    rewrite(tmp_path, models_yaml(tmp_path, b_tokens=9, with_c=False, with_d=True,
                                  a_ttl="30m"))
    status, summary = await reload(gw)
    assert status == 200, summary
    assert summary["unchanged"] == ["a"] and summary["changed"] == ["b"]
    assert summary["removed"] == ["c"] and summary["added"] == ["d"]
    assert gw.state("a").model.ttl == 1800, "a takes its new entry at once"
    assert gw.state("b").state is State.READY, "b is not cut off mid-request"
    assert (await gw.chat("c"))[0] == 404, "a removed model takes no new requests"
    assert (await gw.chat("d"))[0] == 200, "an added model is available at once"

    sup.finish(busy_b)
    sup.finish(busy_c)
    await gw.until(lambda: gw.state("b").state is State.STOPPED
                   and gw.state("c").state is State.STOPPED)
    status, body = await gw.chat("b")
    assert status == 200 and body["usage"]["completion_tokens"] == 9, "b runs its new entry"
    assert len(pids(tmp_path / "b.starts")) == 2
    assert len(pids(tmp_path / "a.starts")) == 1, "a was never restarted"
    assert (await gw.chat("a"))[0] == 200
    async with gw.http.get(gw.url + "/api/models") as resp:
        listed = {m["id"] for m in (await resp.json())["models"]}
    assert listed == {"a", "b", "d"}


async def test_an_invalid_config_is_refused_and_the_old_one_kept(start_gateway, tmp_path):
    gw = await start_gateway(models_yaml(tmp_path))
    assert (await gw.chat("a"))[0] == 200
    rewrite(tmp_path, "a:\n  command: [x]\n  memory_gb: lots\nb: {}\n")
    status, body = await reload(gw)
    assert status == 400 and body["error"]["code"] == "invalid_config"
    assert "memory_gb" in body["error"]["message"]
    assert "running config is kept" in body["error"]["message"]
    assert (await gw.chat("a"))[0] == 200 and (await gw.chat("c"))[0] == 200
    assert len(pids(tmp_path / "a.starts")) == 1


async def test_sighup_reloads_a_running_gateway(tmp_path):
    config = write_config(tmp_path, models_yaml(tmp_path))
    port = free_port()
    proc, _ = await start_serving(config, port)
    url = f"http://127.0.0.1:{port}"
    try:
        async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {KEY}"}) as http:
            rewrite(tmp_path, models_yaml(tmp_path, with_d=True))
            proc.send_signal(signal.SIGHUP)
            async with asyncio.timeout(20):
                while True:  # the reload is asynchronous: wait for its effect
                    async with http.get(url + "/v1/models") as resp:
                        ids = {m["id"] for m in (await resp.json())["data"]}
                    if "d" in ids:
                        break
                    await asyncio.sleep(0.05)
            payload = {"model": "d", "messages": [{"role": "user", "content": "hi"}]}
            async with http.post(url + "/v1/chat/completions", json=payload) as resp:
                assert resp.status == 200
    finally:
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 30) == 0
