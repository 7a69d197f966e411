"""CORS: browser pages on localhost and editor webviews may call the gateway; others not."""

from __future__ import annotations

import aiohttp
import pytest

from sparkstack.config import DEFAULT_CORS_ORIGINS, ConfigError, load_config
from sparkstack.gateway.cors import Cors

from .conftest import KEY, fake


@pytest.mark.parametrize(("origin", "allowed"), [
    ("http://localhost:5173", True),
    ("http://localhost", True),
    ("http://127.0.0.1:8080", True),
    ("http://[::1]:3000", True),
    ("vscode-webview://1a2b3c4d5e", True),
    ("http://localhost.evil.example", False),
    ("http://localhost:80@evil.example", False),
    ("https://evil.example", False),
    ("null", False),
])
def test_default_origins_are_localhost_and_editor_webviews(origin, allowed):
    assert Cors(DEFAULT_CORS_ORIGINS).allowed(origin) is allowed


def test_configured_origins_replace_the_defaults():
    cors = Cors(["https://chat.home.arpa", "https://*.lan:*"])
    assert cors.allowed("https://chat.home.arpa")
    assert cors.allowed("https://box.lan:8443") and not cors.allowed("https://lan")
    assert not cors.allowed("http://localhost:5173")
    assert Cors(["*"]).allowed("https://anything.example")
    with pytest.raises(ConfigError, match="is not an origin"):
        load_config(text="cors_origins: [localhost]\nmodels: {}\n", env={})


async def test_preflight_and_responses_carry_cors_headers(start_gateway, tmp_path):
    gw = await start_gateway(f"""
    a:
      command: {fake("--served-name", "a")}
      memory_gb: 1
    """)
    async with aiohttp.ClientSession() as anon:
        preflight = {"Origin": "vscode-webview://abc123",
                     "Access-Control-Request-Method": "POST",
                     "Access-Control-Request-Headers": "authorization,content-type",
                     "Access-Control-Request-Private-Network": "true"}
        async with anon.options(gw.url + "/v1/chat/completions", headers=preflight) as resp:
            assert resp.status == 204, "answered without a key: browsers send none here"
            assert resp.headers["Access-Control-Allow-Origin"] == "vscode-webview://abc123"
            assert "POST" in resp.headers["Access-Control-Allow-Methods"]
            assert resp.headers["Access-Control-Allow-Headers"] == "authorization,content-type"
            assert resp.headers["Access-Control-Allow-Private-Network"] == "true"
        async with anon.options(gw.url + "/v1/chat/completions",
                                headers={**preflight, "Origin": "https://evil.example"}) as resp:
            assert resp.status == 403
            assert "Access-Control-Allow-Origin" not in resp.headers
            assert (await resp.json())["error"]["code"] == "origin_not_allowed"

    page = {"Origin": "http://localhost:5173"}
    async with gw.http.get(gw.url + "/v1/models", headers=page) as resp:
        assert resp.headers["Access-Control-Allow-Origin"] == "http://localhost:5173"
        assert "Retry-After" in resp.headers["Access-Control-Expose-Headers"]
    payload = {"model": "a", "stream": True, "messages": [{"role": "user", "content": "hi"}]}
    async with gw.http.post(gw.url + "/v1/chat/completions", json=payload,
                            headers=page) as resp:
        assert resp.content_type == "text/event-stream"
        assert resp.headers["Access-Control-Allow-Origin"] == "http://localhost:5173", \
            "a streamed answer, whose headers leave first, is labelled too"
        await resp.read()
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {KEY}"}) as other:
        async with other.get(gw.url + "/v1/models",
                             headers={"Origin": "https://evil.example"}) as resp:
            assert resp.status == 200 and "Access-Control-Allow-Origin" not in resp.headers
