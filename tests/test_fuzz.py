"""Bad input, generated: every answer is a 4xx in the OpenAI error shape (or a real
answer), never a 5xx, a hang or a stack trace.

A real gateway (a subprocess, as users run it) in front of a fake engine; requests are
written on raw sockets so that what no client library would send can be sent: invalid
UTF-8, broken multipart, header injection, odd paths. Hypothesis generates the cases.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from .conftest import KEY, fake, free_port, write_config

FUZZ = settings(max_examples=150, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.function_scoped_fixture,
                                       HealthCheck.too_slow])
STATS = {"cases": 0}


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[int]:
    tmp = tmp_path_factory.mktemp("fuzz")
    config = write_config(tmp, f"""
    a:
      command: {fake()}
      memory_gb: 1
      aliases: [alpha]
      capabilities: [chat, completions, embeddings, transcription]
    """)
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "sparkstack.cli", "serve", "--config", str(config),
         "--listen", f"127.0.0.1:{port}"], stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True)
    assert proc.stdout is not None
    banner = ""
    while "curl" not in banner:
        line = proc.stdout.readline()
        assert line, banner
        banner += line
    yield port
    proc.terminate()
    out = proc.communicate(timeout=30)[0]
    assert "Traceback" not in banner + out, "the gateway logged a stack trace"
    print(f"\nfuzz cases sent: {STATS['cases']}")


def send(port: int, raw: bytes, timeout: float = 15) -> tuple[int, bytes]:
    """One raw HTTP/1.1 request (Connection: close); the status and body."""
    STATS["cases"] += 1
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(raw)
        chunks = []
        while True:
            data = sock.recv(65536)  # a hang fails here with a timeout
            if not data:
                break
            chunks.append(data)
    response = b"".join(chunks)
    head, _, body = response.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    if b"transfer-encoding: chunked" in head.lower():
        body = _unchunk(body)
    return status, body


def _unchunk(body: bytes) -> bytes:
    out, rest = b"", body
    while rest:
        size_line, _, rest = rest.partition(b"\r\n")
        size = int(size_line.split(b";")[0] or b"0", 16)
        if size == 0:
            break
        out, rest = out + rest[:size], rest[size + 2:]
    return out


def request(path: str | bytes, body: bytes = b"", *, method: bytes = b"POST",
            ctype: bytes = b"application/json", headers: bytes = b"",
            key: bytes = KEY.encode()) -> bytes:
    p = path if isinstance(path, bytes) else path.encode()
    return (method + b" " + p + b" HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n"
            b"Authorization: Bearer " + key + b"\r\nContent-Type: " + ctype + b"\r\n"
            + headers + b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)


def assert_clean(status: int, body: bytes, allowed: frozenset[int] = frozenset()) -> None:
    assert status < 500, (status, body[:300])
    if status in allowed:
        return
    assert 400 <= status < 500, (status, body[:300])
    error = json.loads(body)["error"]
    assert isinstance(error["message"], str) and error["type"] and "code" in error
    assert len(error["message"]) < 2000, "client input is not echoed back whole"
    assert "Traceback" not in error["message"]


JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False)
    | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                max_size=4),
    max_leaves=20)
ENDPOINTS = st.sampled_from(["/v1/chat/completions", "/v1/completions", "/v1/embeddings",
                             "/v1/responses", "/tokenize", "/v1/a/chat/completions"])


@FUZZ
@given(path=ENDPOINTS, body=JSON, model=st.one_of(
    st.text(max_size=40), st.integers(), st.lists(st.text(max_size=3), max_size=2),
    st.none(), st.just("alpha"), st.just("a")))
def test_json_bodies_of_any_shape(gateway, path, body, model):
    payload = body if isinstance(body, dict) else {"messages": body}
    payload = {**payload, "model": model}
    status, answer = send(gateway, request(path, json.dumps(payload).encode()))
    assert_clean(status, answer, allowed=frozenset({200}))


@FUZZ
@given(depth=st.integers(min_value=1, max_value=200_000), kind=st.sampled_from("[{"))
def test_deeply_nested_bodies(gateway, depth, kind):
    body = (b"[" * depth + b"]" * depth if kind == "[" else
            b'{"a":' * depth + b"1" + b"}" * depth)
    status, answer = send(gateway, request("/v1/chat/completions", body))
    assert_clean(status, answer)


def test_the_reported_nested_body_is_a_400(gateway):
    status, answer = send(gateway, request("/v1/chat/completions",
                                           b"[" * 100_000 + b"]" * 100_000))
    assert status == 400 and json.loads(answer)["error"]["code"] == "invalid_json"


@FUZZ
@given(raw=st.binary(max_size=300))
def test_arbitrary_bytes_and_invalid_utf8(gateway, raw):
    status, answer = send(gateway, request("/v1/chat/completions",
                                           b'{"model": "a", "x": "' + raw + b'"}'))
    assert_clean(status, answer, allowed=frozenset({200}))


@FUZZ
@given(name=st.text(min_size=1, max_size=300).filter(lambda n: n not in ("a", "alpha")))
def test_odd_model_names(gateway, name):
    body = json.dumps({"model": name, "messages": []}).encode()
    status, answer = send(gateway, request("/v1/chat/completions", body))
    assert_clean(status, answer)


def test_a_huge_model_name_is_not_echoed_whole(gateway):
    body = json.dumps({"model": "x" * 100_000, "messages": []}).encode()
    status, answer = send(gateway, request("/v1/chat/completions", body))
    assert status == 404
    assert len(json.loads(answer)["error"]["message"]) < 500


@FUZZ
@given(segments=st.lists(st.sampled_from(
    ["..", ".", "%2e%2e", "%2f", "a", "v1", "api", "models", "logs", "etc", "passwd",
     "chat", "completions", "%00", "~", "//"]), min_size=1, max_size=8),
    method=st.sampled_from([b"GET", b"POST", b"DELETE", b"PUT"]))
def test_odd_paths_and_traversal(gateway, segments, method):
    path = "/" + "/".join(segments)
    status, answer = send(gateway, request(path, b"{}", method=method))
    assert_clean(status, answer, allowed=frozenset({200}))


@FUZZ
@given(value=st.binary(min_size=1, max_size=200).filter(
    lambda v: b"\r" not in v and b"\n" not in v))
def test_odd_header_values(gateway, value):
    raw = request("/v1/chat/completions", b'{"model":"zz","messages":[]}',
                  headers=b"X-Odd: " + value + b"\r\nx-api-key: " + value + b"\r\n")
    status, answer = send(gateway, raw)
    assert_clean(status, answer)


def test_header_injection_does_not_authenticate(gateway):
    raw = request("/v1/models", method=b"GET", key=b"nope\r\nAuthorization: Bearer " + KEY
                  .encode())
    status, _ = send(gateway, raw)
    assert status in (400, 401)


@FUZZ
@given(parts=st.lists(st.tuples(st.sampled_from(["model", "file", "x", ""]),
                                st.binary(max_size=50)), max_size=5),
       boundary=st.sampled_from([b"b0undary", b"", b"x" * 80]),
       truncate=st.booleans())
def test_multipart_edge_cases(gateway, parts, boundary, truncate):
    body = b""
    for name, data in parts:
        body += (b"--" + boundary + b"\r\nContent-Disposition: form-data; name=\""
                 + name.encode() + b"\"\r\n\r\n" + data + b"\r\n")
    body += b"--" + boundary + b"--\r\n"
    if truncate:
        body = body[: len(body) // 2]
    ctype = b"multipart/form-data; boundary=" + boundary if boundary else b"multipart/form-data"
    status, answer = send(gateway, request("/v1/audio/transcriptions", body, ctype=ctype))
    assert_clean(status, answer, allowed=frozenset({200}))


def test_the_routes_are_described(gateway):
    status, body = send(gateway, request("/openapi.json", method=b"GET"))
    assert status == 200
    paths = json.loads(body)["paths"]
    assert {"/v1/chat/completions", "/v1/models", "/api/reload"} <= set(paths)
    assert "requestBody" in paths["/v1/chat/completions"]["post"]


def test_nothing_hangs_on_a_body_never_sent(gateway):
    """A client announcing a body and sending nothing is not answered with a 5xx; the
    gateway is still serving others meanwhile."""
    with socket.create_connection(("127.0.0.1", gateway), timeout=5) as slow:
        slow.sendall(request("/v1/chat/completions", b"x" * 10)[:-10])
        began = time.monotonic()
        status, _ = send(gateway, request("/v1/models", method=b"GET"))
        assert status == 200 and time.monotonic() - began < 5


