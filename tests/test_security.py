"""Security (issue 9): keys on every route, per-key limits, no secret in any answer or
log, engines only behind the gateway, only our own containers touched, and the limits
that keep slow or oversized requests from holding the gateway. Each against a running
gateway (or, for Docker, a fake Engine API that records every call)."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import re
import sys
import tempfile
import textwrap
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from aiohttp import web

from sparkstack import engines, redact
from sparkstack.config import ConfigError, load_config
from sparkstack.engines import launch_spec
from sparkstack.errors import ApiError
from sparkstack.gateway.app import create_app
from sparkstack.gateway.auth import Caller, Keyring
from sparkstack.gateway.limits import KeyLimits
from sparkstack.gateway.server import is_loopback, serve
from sparkstack.hostcheck import _check_docker
from sparkstack.runtime.base import LogBuffer, StartError
from sparkstack.runtime.docker import LABEL_HASH, LABEL_MODEL, DockerRuntime
from sparkstack.scheduler import State
from sparkstack.supervisor import Supervisor

from .conftest import FAKE_ENGINE, KEY, fake, free_port
from .fake_docker import API, FakeDocker

ALICE = "sk-alice-0123456789abcdef"
BOB = "sk-bob-0123456789abcdef"
ADMIN = "sk-admin-0123456789abcdef"
HELD = {"x-fake-gate": "held"}
REPO = Path(__file__).resolve().parents[1]


def one_model(tmp_path: Path, *extra: object) -> tuple[str, Path]:
    starts = tmp_path / "a.starts"
    return f"""
    a:
      command: {fake("--served-name", "a", *extra, starts=starts)}
      memory_gb: 1
    """, starts


def port_of(url: str) -> int:
    return int(url.rsplit(":", 1)[1])


def assert_openai_error(body: dict[str, Any], code: str) -> None:
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["code"] == code, body


async def raw_response(reader: asyncio.StreamReader) -> tuple[int, dict[str, str], bytes]:
    """Status, headers and body of one HTTP/1.1 response with a Content-Length."""
    head = (await reader.readuntil(b"\r\n\r\n")).decode()
    status = int(head.split(" ", 2)[1])
    headers = {k.strip().lower(): v.strip() for k, _, v in
               (line.partition(":") for line in head.split("\r\n")[1:] if line)}
    return status, headers, await reader.readexactly(int(headers["content-length"]))


# ------------------------------------------------------------------ keys on every route


async def test_every_route_but_the_public_ones_needs_a_key(start_gateway, tmp_path):
    models, starts = one_model(tmp_path)
    gw = await start_gateway(models)
    # The routes as the app really has them (future ones included), from a twin app.
    config = gw.supervisor.config
    keys = Keyring(config)
    app = create_app(config, Supervisor(config, {}, 10, data_dir=tmp_path / "twin"), keys)
    assert {p for p in keys.public_paths if not p.startswith("/static/")} <= {"/healthz", "/"}
    checked = set()
    async with aiohttp.ClientSession() as anon:
        for route in app.router.routes():
            method = "GET" if route.method in ("*", "HEAD") else route.method
            path = re.sub(r"\{[^}]*\}", "a", route.resource.canonical)
            if path in keys.public_paths or (method, path) in checked:
                continue
            checked.add((method, path))
            for headers in ({}, {"Authorization": "Bearer sk-wrong-0123456789"},
                            {"x-api-key": "sk-wrong-0123456789"}):
                async with anon.request(method, gw.url + path, headers=headers,
                                        json={"model": "a", "messages": []}) as resp:
                    assert resp.status == 401, (method, path, headers)
                    body = await resp.json()
                assert body["error"]["type"] == "authentication_error"
        # An unknown route answers 401 too: no key, no map of what exists.
        async with anon.get(gw.url + "/no/such/route") as resp:
            assert resp.status == 401
        async with anon.get(gw.url + "/healthz") as resp:
            assert resp.status == 200
    assert len(checked) >= 10, checked
    assert not starts.exists(), "no model was loaded for a stranger"


async def test_state_changing_api_routes_need_an_admin_key(start_gateway, tmp_path):
    models, starts = one_model(tmp_path)
    gw = await start_gateway(models, admin_keys=f"[{ADMIN}]")
    config = gw.supervisor.config
    app = create_app(config, Supervisor(config, {}, 10, data_dir=tmp_path / "twin"),
                     Keyring(config))
    admin_routes = sorted({(r.method, re.sub(r"\{[^}]*\}", "a", r.resource.canonical))
                           for r in app.router.routes()
                           if r.method not in ("GET", "HEAD")
                           and r.resource.canonical.startswith("/api/")})
    assert ("POST", "/api/models/a/load") in admin_routes
    async with aiohttp.ClientSession() as http:
        for method, path in admin_routes:
            async with http.request(method, gw.url + path, headers={"x-api-key": KEY}) as resp:
                assert resp.status == 403, (method, path)
                assert_openai_error(await resp.json(), "admin_required")
        assert not starts.exists(), "a plain key loaded nothing"
        async with http.post(gw.url + "/api/models/a/unload",
                             headers={"x-api-key": ADMIN}) as resp:
            assert resp.status == 200
        async with http.get(gw.url + "/api/models", headers={"x-api-key": KEY}) as resp:
            assert resp.status == 200, "reading needs only a key"
        # ... but engine logs (which may hold other people's prompts) need an admin key.
        async with http.get(gw.url + "/api/models/a/logs", headers={"x-api-key": KEY}) as resp:
            assert resp.status == 403
            assert_openai_error(await resp.json(), "admin_required")
        async with http.get(gw.url + "/api/models/a/logs",
                            headers={"x-api-key": ADMIN}) as resp:
            assert resp.status == 200


async def test_a_key_limited_to_some_models_reads_only_their_logs(start_gateway, tmp_path):
    models, _ = one_model(tmp_path)
    gw = await start_gateway(models + models.replace("a:", "b:", 1),
                             api_keys=f'["{KEY}", {{name: bee, key: "{BOB}", models: [b]}}]')
    async with aiohttp.ClientSession(headers={"x-api-key": BOB}) as http:
        async with http.get(gw.url + "/api/models/b/logs") as resp:
            assert resp.status == 200
        async with http.get(gw.url + "/api/models/a/logs") as resp:
            assert resp.status == 403
            assert_openai_error(await resp.json(), "model_not_allowed")


def test_key_entries_read_files_and_variables_and_errors_name_the_entry(tmp_path):
    (tmp_path / "keys").mkdir()
    (tmp_path / "keys" / "ci.key").write_text(f"  {BOB}\n")
    (tmp_path / "keys" / "ci.key").chmod(0o644)
    path = tmp_path / "sparkstack.yaml"
    path.write_text(f"""
api_keys:
  - {ALICE}
  - {{name: ci, key_file: keys/ci.key, models: [a], max_concurrent: 2, rpm: 30}}
  - {{name: laptop, key_env: LAPTOP_KEY}}
admin_keys: [{ADMIN}]
models: {{a: {{command: [x], memory_gb: 1}}}}
""")
    config = load_config(path, env={"LAPTOP_KEY": "sk-laptop-0123456789"})
    first, ci, laptop = config.settings.api_keys
    assert first == ALICE
    assert (ci.name, ci.key, ci.models, ci.max_concurrent, ci.rpm) == ("ci", BOB, ["a"], 2, 30)
    assert (laptop.name, laptop.key) == ("laptop", "sk-laptop-0123456789")
    assert any("readable by other users" in w and "chmod 600" in w for w in config.warnings)
    shown = repr(config.settings) + repr(config)
    assert not any(k in shown for k in (ALICE, BOB, ADMIN, "sk-laptop-0123456789"))
    keys = Keyring(config)
    assert len(keys) == 4

    def problems(entries: str) -> str:
        path.write_text(f"api_keys:\n{textwrap.indent(entries, '  ')}models: {{}}\n")
        with pytest.raises(ConfigError) as e:
            load_config(path, env={})
        text = "\n".join(e.value.problems)
        assert ALICE not in text and BOB not in text, "a problem names the entry, not the key"
        return text

    found = problems(f"""- {{name: both, key: "{ALICE}", key_file: x.key}}
- {{name: short, key: "sk-1"}}
- {{name: typo, kye: "{BOB}"}}
""")
    for expected in ("entry 1 ('both'): give exactly one of key, key_file or key_env",
                     "entry 2 ('short'), field 'key'",
                     "entry 3 ('typo'), field 'kye': unknown key"):
        assert expected in found, found
    found = problems(f"""- {{name: nofile, key_file: missing.key}}
- {{name: noenv, key_env: UNSET_VAR}}
- {{name: dup, key: "{BOB}"}}
- {{name: dup, key: "{BOB}x"}}
- {{key: "{BOB}"}}
""")
    for expected in ("entry 1 ('nofile'): cannot read key_file",
                     "entry 2 ('noenv'): environment variable UNSET_VAR (key_env) is not set",
                     "entry 4 ('dup'): the name 'dup' is taken by entry 3",
                     "entry 5: the same key as entry 3"):
        assert expected in found, found


# ------------------------------------------------------------------ listening


@pytest.mark.parametrize("listen", ["0.0.0.0", "[::]", "192.168.1.20", "spark.lan"])
async def test_a_non_loopback_listen_without_a_key_refuses_to_start(tmp_path, monkeypatch,
                                                                   listen):
    binds: list[object] = []
    monkeypatch.setattr(web.TCPSite, "start", lambda site: binds.append(site))
    config = load_config(text="memory_gb: 4\nmodels: {}\n")
    with pytest.raises(ConfigError, match=r"refusing to listen .* no API key configured"):
        await serve(config, f"{listen}:{free_port()}", data_dir=tmp_path / "data")
    assert binds == [], "it failed before binding"


async def test_the_generated_key_counts_and_loopback_needs_none(tmp_path, monkeypatch):
    """The CLI hands serve() the first-run key as extra_keys: that is a configured key.
    (The bind itself is faked: no test listens on a non-loopback address.)"""
    binds: list[tuple[str, int]] = []

    async def fake_start(site: web.TCPSite) -> None:
        binds.append((site._host, site._port))  # type: ignore[attr-defined]

    async def fake_stop(site: web.TCPSite) -> None:
        return None

    monkeypatch.setattr(web.TCPSite, "start", fake_start)
    monkeypatch.setattr(web.TCPSite, "stop", fake_stop)
    config = load_config(text="memory_gb: 4\nmodels: {}\n")
    stop = asyncio.Event()
    stop.set()
    port = free_port()
    await serve(config, f"0.0.0.0:{port}", data_dir=tmp_path / "data",
                extra_keys=["sk-spark-generated-0123456789"], stop=stop)
    assert binds == [("0.0.0.0", port)]
    assert all(is_loopback(h) for h in ("127.0.0.1", "127.0.0.2", "::1", "localhost"))
    assert not any(is_loopback(h) for h in ("0.0.0.0", "::", "10.0.0.1", "spark.lan"))


# ------------------------------------------------------------------ secrets


def talker(tmp_path: Path, name: str, script: str) -> str:
    """A YAML command: a shell that gets the run's engine key as $0, writes it to
    <name>.key for the test, then runs `script` (which may print it, as engines do)."""
    keyfile = tmp_path / f"{name}.key"
    return json.dumps(["sh", "-c", f'echo "$0" > {keyfile}; {script}', "${ENGINE_KEY}"])


async def test_no_key_in_any_answer_or_log_only_names(start_gateway, tmp_path, caplog):
    caplog.set_level(logging.DEBUG)
    redact.install()  # what `sparkstack serve` does: filter the log handlers (caplog's)
    (tmp_path / "bob.key").write_text(BOB + "\n")
    (tmp_path / "bob.key").chmod(0o600)
    serve_a = (f'echo "engine args: --api-key $0 api_key=\'$0\'"; exec {sys.executable} '
               f'{FAKE_ENGINE} --port ${{PORT}} --served-name a --api-key "$0"')
    crash_b = ('echo "Authorization: Bearer $0"; echo "server_args=ServerArgs(api_key=\'$0\')";'
               ' exit 1')
    models = f"""
    a:
      command: {talker(tmp_path, "a", serve_a)}
      memory_gb: 1
    b:
      command: {talker(tmp_path, "b", crash_b)}
      memory_gb: 1
    """
    gw = await start_gateway(models, api_keys=(
        f'[{{name: alice, key: "{ALICE}", rpm: 2}}, {{name: bob, key_file: bob.key}}]'))
    seen: list[str] = []

    async def call(method: str, path: str, key: str, **kw: Any) -> int:
        async with aiohttp.ClientSession() as http, http.request(
                method, gw.url + path, headers={"Authorization": f"Bearer {key}"}, **kw) as r:
            seen.append(str(r.headers) + (await r.read()).decode("utf-8", "replace"))
            return r.status

    chat = {"model": "a", "messages": [{"role": "user", "content": "hi"}]}
    assert await call("POST", "/v1/chat/completions", ALICE, json=chat) == 200
    assert await call("POST", "/v1/chat/completions", ALICE, json={**chat, "stream": True}) == 200
    assert await call("POST", "/v1/chat/completions", ALICE, json=chat) == 429  # rpm 2
    assert await call("POST", "/v1/chat/completions", BOB, json=chat) == 200  # key_file
    assert await call("POST", "/v1/chat/completions", BOB, json={**chat, "model": "b"}) == 502
    assert await call("GET", "/v1/models", BOB) == 200
    assert await call("GET", "/api/models", BOB) == 200
    for m in ("a", "b"):
        assert await call("GET", f"/api/models/{m}/logs", BOB) == 200
    assert await call("GET", "/v1/models", "sk-wrong-0123456789") == 401
    # aiohttp would log the first 100 bytes of this header: the key.
    assert await call("GET", "/v1/models", ALICE + "x" * 20_000) == 431
    engine_keys = [(tmp_path / f"{m}.key").read_text().strip() for m in ("a", "b")]
    assert all(len(k) >= 16 for k in engine_keys)
    answers = "\n".join(seen)
    assert "api_key='***'" in answers and "--api-key ***" in answers, \
        "the engines did print their keys, masked in the logs API"
    assert "Bearer ***" in answers, "and in the log tail of b's failed start"
    files = "".join(p.read_text() for p in (tmp_path / "data" / "logs").glob("*.log*"))
    for secret in (ALICE, BOB, KEY, *engine_keys):
        assert secret not in answers
        assert secret not in caplog.text
        assert secret not in files
    assert "'alice'" in caplog.text, "a key is named in the logs"


def test_the_log_filter_masks_known_and_key_shaped_secrets(caplog):
    redact.register("plain-secret-value-42")
    log = logging.getLogger("sparkstack.test")
    caplog.set_level(logging.INFO)
    redact.install()
    try:
        raise RuntimeError("upstream said: Authorization: Bearer sk-live-0123456789")
    except RuntimeError:
        log.exception("headers %s, key %s", {"x-api-key": "abcd-efgh-1234"},
                      "plain-secret-value-42")
    text = caplog.text
    assert "sk-live-0123456789" not in text and "abcd-efgh-1234" not in text
    assert "plain-secret-value-42" not in text
    assert "Bearer ***" in text and "'x-api-key': '***'" in text


# ------------------------------------------------------------------ per-key limits


async def test_max_concurrent_answers_429_and_frees_the_slot_however_a_request_ends(
        start_gateway, tmp_path):
    models, _ = one_model(tmp_path)
    gw = await start_gateway(models, api_keys=f'[{{name: alice, key: "{ALICE}", '
                                              'max_concurrent: 1}]')
    alice = aiohttp.ClientSession(headers={"Authorization": f"Bearer {ALICE}"})
    chat = {"model": "a", "messages": [{"role": "user", "content": "hi"}]}

    async def held_stream() -> None:
        async with alice.post(gw.url + "/v1/chat/completions", headers=HELD,
                              json={**chat, "stream": True}) as resp:
            assert resp.status == 200
            async for _ in resp.content:
                pass

    try:
        first = asyncio.create_task(held_stream())
        await gw.until(lambda: bool(gw.state("a").active))
        async with alice.post(gw.url + "/v1/chat/completions", json=chat) as resp:
            body = await resp.json()
            assert resp.status == 429
            assert resp.headers["Retry-After"] == "1" and resp.headers["retry-after-ms"] == "1000"
        assert_openai_error(body, "concurrency_limit_exceeded")
        assert body["error"]["type"] == "rate_limit_error" and "'alice'" in body["error"]["message"]
        assert (await gw.chat("a"))[0] == 200, "another key is not held up"
        first.cancel()  # the client goes away mid-stream
        await gw.until(lambda: not gw.state("a").active)
        async with alice.post(gw.url + "/v1/chat/completions", json={**chat, "model": "zz"}) as r:
            assert r.status == 404  # ends in an error: its slot is given back too
        async with alice.post(gw.url + "/v1/chat/completions", json=chat) as resp:
            assert resp.status == 200
    finally:
        await alice.close()


async def test_rpm_answers_429_with_the_time_until_the_window_frees(start_gateway, tmp_path):
    models, _ = one_model(tmp_path)
    gw = await start_gateway(models, api_keys=f'[{{name: ci, key: "{ALICE}", rpm: 3}}]')
    async with aiohttp.ClientSession(headers={"x-api-key": ALICE}) as ci:
        chat = {"model": "a", "messages": [{"role": "user", "content": "hi"}]}
        for _ in range(3):
            async with ci.post(gw.url + "/v1/chat/completions", json=chat) as resp:
                assert resp.status == 200
        async with ci.post(gw.url + "/v1/chat/completions", json=chat) as resp:
            body = await resp.json()
            assert resp.status == 429
            wait = int(resp.headers["Retry-After"])
            assert 30 <= wait <= 60, "the first of the three leaves the window in < 60 s"
            assert int(resp.headers["retry-after-ms"]) == wait * 1000
    assert_openai_error(body, "rate_limit_exceeded")
    assert "'ci'" in body["error"]["message"] and "rpm" in body["error"]["message"]
    assert (await gw.chat("a"))[0] == 200, "limits are per key"


def test_rpm_is_a_sliding_window_and_refusals_do_not_count():
    now = [1000.0]
    limits = KeyLimits(clock=lambda: now[0])
    ci = Caller("ci", None, False, rpm=2)

    def admit() -> int | None:
        try:
            with limits.admit(ci):
                return None
        except ApiError as e:
            assert e.status == 429
            return int(e.headers["Retry-After"])

    assert admit() is None  # t=1000
    now[0] = 1030.0
    assert admit() is None
    now[0] = 1050.0
    assert admit() == 10  # the first leaves the window at 1060
    now[0] = 1059.5
    assert admit() == 1
    now[0] = 1060.0
    assert admit() is None, "refused requests took no place in the window"
    assert admit() == 30  # 1030 and 1060 are in the window now


def test_a_slot_is_released_when_the_request_fails():
    limits = KeyLimits()
    one = Caller("one", None, False, max_concurrent=1)
    with pytest.raises(RuntimeError), limits.admit(one):
        assert limits.in_flight("one") == 1
        raise RuntimeError("the engine broke")
    assert limits.in_flight("one") == 0
    with limits.admit(one):
        pass


# ------------------------------------------------------------------ request limits


async def test_a_body_that_stops_arriving_gets_408_and_holds_nothing(start_gateway, tmp_path):
    models, starts = one_model(tmp_path)
    gw = await start_gateway(models, client_body_timeout="0.3s", api_keys=(
        f'[{{name: slow, key: "{ALICE}", max_concurrent: 1}}]'))
    reader, writer = await asyncio.open_connection("127.0.0.1", port_of(gw.url))
    writer.write(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
                 b"Authorization: Bearer " + ALICE.encode() + b"\r\n"
                 b"Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n"
                 b'{"model": "a", "messages": [')
    await writer.drain()
    async with asyncio.timeout(10):  # a bound, not a wait: the 408 comes after ~0.3-0.6 s
        status, _, raw = await raw_response(reader)
    writer.close()
    assert status == 408
    body = json.loads(raw)
    assert_openai_error(body, "body_timeout")
    assert body["error"]["type"] == "timeout_error"
    assert "client_body_timeout" in body["error"]["message"]
    assert gw.supervisor.scheduler.queued == 0 and not starts.exists(), "no ticket was taken"
    async with aiohttp.ClientSession(headers={"x-api-key": ALICE}) as slow, slow.post(
            gw.url + "/v1/chat/completions", json={"model": "a", "messages": []}) as resp:
        assert resp.status == 200, "the key's one slot was given back"


async def test_a_slow_upload_that_keeps_moving_is_not_cut(start_gateway, tmp_path):
    models, _ = one_model(tmp_path)
    gw = await start_gateway(models, client_body_timeout="1s")
    payload = json.dumps({"model": "a", "messages": [
        {"role": "user", "content": "x" * 4000}]}).encode()
    pieces = [payload[i:i + 100] for i in range(0, len(payload), 100)]

    async def trickle():  # ~2 s in all, never more than 50 ms without a byte
        for piece in pieces:
            yield piece
            await asyncio.sleep(0.05)

    async with gw.http.post(gw.url + "/v1/chat/completions", data=trickle(),
                            headers={"Content-Type": "application/json"}) as resp:
        assert resp.status == 200, await resp.text()


async def test_headers_that_never_end_are_cut_off(start_gateway, tmp_path):
    models, _ = one_model(tmp_path)
    gw = await start_gateway(models, client_body_timeout="0.3s")
    reader, writer = await asyncio.open_connection("127.0.0.1", port_of(gw.url))
    writer.write(b"GET /v1/models HTTP/1.1\r\nHost: x\r\nAuthorization: Bea")
    await writer.drain()
    async with asyncio.timeout(10):
        assert await reader.read() == b"", "closed without an answer"
    writer.close()


async def test_oversized_and_malformed_headers_get_openai_shaped_4xx(start_gateway, tmp_path):
    models, _ = one_model(tmp_path)
    gw = await start_gateway(models)
    async with gw.http.get(gw.url + "/v1/models", headers={"x-big": "a" * 20_000}) as resp:
        assert resp.status == 431
        assert_openai_error(await resp.json(), "header_too_large")
    for raw in (b"GET /v1/models HTTP/1.1\r\nHost: x\r\nthis is no header\r\n\r\n",
                b"GET /v1/models HTTP/1.1\r\nHost: x\r\nX-A: b\rX-Injected: 1\r\n\r\n",
                b"GET /" + b"a" * 20_000 + b" HTTP/1.1\r\nHost: x\r\n\r\n"):
        reader, writer = await asyncio.open_connection("127.0.0.1", port_of(gw.url))
        writer.write(raw)
        await writer.drain()
        async with asyncio.timeout(10):
            status, headers, body = await raw_response(reader)
            assert await reader.read() == b"", "and the connection is closed"
        writer.close()
        assert status in (400, 431) and headers["content-type"].startswith("application/json")
        assert_openai_error(json.loads(body), "header_too_large" if status == 431
                            else "malformed_request")


async def test_a_too_large_body_gets_413_in_the_openai_shape(start_gateway, tmp_path):
    models, starts = one_model(tmp_path)
    gw = await start_gateway(models, max_body_mb=0.01)
    async with gw.http.post(gw.url + "/v1/chat/completions", data=b"x" * 20_000,
                            headers={"Content-Type": "application/json"}) as resp:
        assert resp.status == 413
        body = await resp.json()
    assert_openai_error(body, "request_entity_too_large")
    assert "max_body_mb" in body["error"]["message"] and not starts.exists()


async def test_a_full_queue_answers_429_with_retry_after(start_gateway, tmp_path):
    models, _ = one_model(tmp_path, "--wait-signal")  # stays loading: its requests queue
    gw = await start_gateway(models, max_queue=1)
    waiting = asyncio.create_task(gw.chat("a"))
    await gw.until(lambda: gw.supervisor.scheduler.queued == 1)
    async with gw.http.post(gw.url + "/v1/chat/completions",
                            json={"model": "a", "messages": []}) as resp:
        body = await resp.json()
        assert resp.status == 429
        assert 1 <= int(resp.headers["Retry-After"]) <= 60
        assert int(resp.headers["retry-after-ms"]) == int(resp.headers["Retry-After"]) * 1000
    assert_openai_error(body, "queue_full")
    waiting.cancel()
    await gw.until(lambda: gw.supervisor.scheduler.queued == 0)


# ------------------------------------------------------------------ engines


@pytest.mark.parametrize("engine", ["vllm", "sglang", "llamacpp"])
def test_templated_engines_bind_loopback_and_take_the_run_key(engine, tmp_path, monkeypatch):
    monkeypatch.setattr(engines, "llama_server_binary", lambda: "llama-server")
    (tmp_path / "m.gguf").write_bytes(b"GGUF")
    config = load_config(text=(
        f"memory_gb: 4\nmodels:\n  m:\n    engine: {engine}\n"
        f"    weights: {tmp_path / 'm.gguf'}\n    memory_gb: 1\n"))
    model = config.models["m"]
    keys = {engines.new_key(model) for _ in range(3)}
    assert len(keys) == 3 and None not in keys, "a fresh key for every run"
    key = keys.pop()
    spec = launch_spec(model, 40000, key, tmp_path)
    argv = list(spec.argv)
    assert argv[argv.index("--host") + 1] == "127.0.0.1"
    if engine == "sglang":  # it has no environment variable for its key
        assert argv[argv.index("--api-key") + 1] == key
    else:  # any local user can read a command line (ps); only the owner the environment
        assert key not in " ".join(argv) and "--api-key" not in argv
        assert spec.env[engines.KEY_ENV[engine]] == key


def test_a_run_key_is_never_read_as_an_option(tmp_path):
    # vLLM parses its flags with argparse: a key starting with "-" made `vllm serve` exit
    # with "argument --api-key: expected at least one argument" (seen with a real vLLM).
    config = load_config(text=(
        "memory_gb: 4\nmodels:\n  m:\n    engine: vllm\n    weights: org/m\n"
        "    memory_gb: 1\n"))
    parser = argparse.ArgumentParser(exit_on_error=False)
    parser.add_argument("--api-key")
    for _ in range(2000):  # a bare token_urlsafe(24) starts with "-" once in 64
        key = engines.new_key(config.models["m"])
        assert key and parser.parse_args(["--api-key", key]).api_key == key


async def test_an_engine_port_is_useless_without_the_run_key(start_gateway, tmp_path):
    starts = tmp_path / "a.starts"
    gw = await start_gateway(f"""
    a:
      command: {fake("--served-name", "a", "--api-key", "${ENGINE_KEY}", starts=starts)}
      memory_gb: 1
    """)
    assert (await gw.chat("a"))[0] == 200, "the gateway sends the run's key"
    first = gw.supervisor.runs["a"].key
    upstream = gw.supervisor.upstream("a")
    assert upstream is not None and upstream.base_url.startswith("http://127.0.0.1:")
    async with aiohttp.ClientSession() as direct:
        for headers in ({}, {"Authorization": f"Bearer {KEY}"}):
            async with direct.post(upstream.base_url + "/v1/chat/completions", headers=headers,
                                   json={"model": "a", "messages": []}) as resp:
                assert resp.status == 401, "a client key does not open the engine"
    async with gw.http.post(gw.url + "/api/models/a/unload") as resp:
        assert resp.status == 200
    await gw.until_state("a", State.STOPPED)
    assert (await gw.chat("a"))[0] == 200
    assert gw.supervisor.runs["a"].key not in (None, first), "each run has its own key"


# ------------------------------------------------------------------ Docker


def proxy_allow_list() -> dict[str, re.Pattern[str]]:
    """The socket proxy's allow-list, compiled as the proxy does (Go: ^pattern$)."""
    compose = yaml.safe_load((REPO / "deploy" / "docker-compose.socket-proxy.yml").read_text())
    allowed = {}
    for arg in compose["services"]["docker-proxy"]["command"]:
        m = re.fullmatch(r"-allow(GET|HEAD|POST|PUT|PATCH|DELETE)=(.+)", arg)
        if m:
            allowed[m.group(1)] = re.compile("^" + m.group(2) + "$")
    return allowed


def docker_model(text: str = "") -> Any:
    config = load_config(text=(
        "memory_gb: 4\nmodels:\n  a:\n    runtime: docker\n    image: engine:1\n"
        f"    command: [serve{text}]\n    memory_gb: 1\n    gpus: none\n"))
    return config.models["a"]


@pytest.fixture
async def fake_docker(monkeypatch):
    with tempfile.TemporaryDirectory(dir="/tmp") as d:  # a unix socket path must be short
        async with FakeDocker(Path(d) / "docker.sock", images={"engine:1"}) as daemon:
            monkeypatch.setenv("DOCKER_HOST", daemon.url)
            yield daemon


async def test_docker_touches_only_its_own_containers_and_only_calls_the_proxy_allows(
        fake_docker, tmp_path):
    stranger = fake_docker.add("sparkstack-a", {"com.example": "theirs"}, running=True)
    stale = fake_docker.add("sparkstack-old", {LABEL_MODEL: "old", LABEL_HASH: "x"}, running=True)
    runtime = DockerRuntime()
    try:
        model = docker_model()
        spec = launch_spec(model, free_port(), "engine-key-0123456789", tmp_path)
        with pytest.raises(StartError, match="not sparkstack's"):
            await runtime.start(spec, LogBuffer())
        assert {c.method for c in fake_docker.touched(stranger)} == {"GET"}, "only looked at"
        assert stranger.id in fake_docker.containers and stranger.running
        found = await runtime.managed()
        assert [m.model_id for m in found] == ["old"]
        assert json.loads(fake_docker.calls[-2].query["filters"]) == {"label": [LABEL_MODEL]}
        await runtime.stop_container(found[0].container)
        assert not stale.running

        del fake_docker.containers[stranger.id]  # its owner removed it: now a is ours to run
        engine = await runtime.start(spec, LogBuffer())  # created
        ours = next(c for c in fake_docker.containers.values() if c.name == "sparkstack-a")
        assert ours.labels[LABEL_MODEL] == "a" and ours.running
        await engine.stop(1)
        assert await engine.wait() == 0
        engine = await runtime.start(spec, LogBuffer())  # the stopped one, re-used
        assert engine.container.id == ours.id
        await engine.stop(1)
        await engine.wait()
        changed = launch_spec(docker_model(", --flag"), free_port(), "k" * 20, tmp_path)
        engine = await runtime.start(changed, LogBuffer())  # re-created: ours, so removed
        assert ours.id not in fake_docker.containers
        await engine.stop(1)
        await engine.wait()
        findings = await _check_docker([model])  # `sparkstack check` (GET /info, images)
        assert all(f.ok for f in findings), findings
    finally:
        await runtime.close()
    allowed = proxy_allow_list()
    assert {c.method for c in fake_docker.calls} <= set(allowed)
    for call in fake_docker.calls:
        assert allowed[call.method].match(call.path), f"the proxy would refuse {call}"
    for method, path in [("POST", f"/{API}/containers/abc/exec"), ("POST", f"/{API}/build"),
                         ("POST", f"/{API}/images/create"), ("GET", f"/{API}/containers/"
                                                              "abc/archive"),
                         ("DELETE", f"/{API}/images/engine:1"), ("POST", f"/{API}/volumes/"
                                                                 "create")]:
        assert method not in allowed or not allowed[method].match(path), (method, path)


async def test_gateway_adoption_stops_only_stale_containers_of_ours(fake_docker, start_gateway,
                                                                    tmp_path):
    stranger = fake_docker.add("their-db", {"com.example": "theirs"}, running=True)
    stale = fake_docker.add("sparkstack-gone", {LABEL_MODEL: "gone", LABEL_HASH: "x"},
                            running=True)
    fake_docker.add("sparkstack-a", {"com.example": "theirs"}, running=True)
    gw = await start_gateway("""
    a:
      runtime: docker
      image: engine:1
      command: [serve]
      memory_gb: 1
      gpus: none
    """)
    assert not stale.running, "a container of ours for a model no longer in the catalog"
    assert fake_docker.touched(stranger) == [] and stranger.running
    status, body = await gw.chat("a")
    assert status in (502, 503) and "not sparkstack's" in body["error"]["message"]
    assert gw.state("a").state is State.STOPPED
