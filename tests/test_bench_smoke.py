"""A smoke run of the benchmark's in-process part, so the harness keeps working as the
scheduler changes (the benchmark itself never runs in `make test`: `make bench`), and of
the stub and the stream generator that every relay (ours, nginx, LiteLLM) is measured with."""

from __future__ import annotations

import http.client
import itertools
import json
import subprocess
import sys

from bench.common import BENCH, ROOT, free_port, wait_port
from bench.decisions import measure
from bench.streamload import TOKEN


def test_decision_benchmark_drives_the_real_scheduler():
    result = measure(n_models=60, decisions=30)
    assert result["submit_evict"]["n"] == 30
    assert result["residents_at_end"] > 1


def test_stub_streams_varied_tokens_and_the_generator_counts_each_one():
    port = free_port()
    stub = subprocess.Popen([sys.executable, str(BENCH / "upstream.py"), "--port", str(port),
                             "--chunks", "150", "--interval", "0.002"], cwd=ROOT)
    try:
        wait_port(port, 60)
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        conn.request("POST", "/v1/chat/completions", body=json.dumps({"stream": True}),
                     headers={"Content-Type": "application/json"})
        body = conn.getresponse().read().decode()
        conn.close()
        events = [e.removeprefix("data: ") for e in body.split("\n\n") if e.startswith("data:")]
        assert events[-1] == "[DONE]"
        tokens = [json.loads(e)["choices"][0]["delta"]["content"] for e in events[:-1]]
        assert len(tokens) == 150
        # LiteLLM ends a stream whose chunks repeat as a model stuck in a loop.
        assert all(a != b for a, b in itertools.pairwise(tokens))

        out = subprocess.run(
            [sys.executable, "-m", "bench.streamload", "--port", str(port), "--streams", "4",
             "--chunks", "150", "--interval", "0.002", "--ramp", "0.1", "--timeout", "60"],
            capture_output=True, text=True, timeout=120, cwd=ROOT, check=True)
        result = json.loads(out.stdout.strip().splitlines()[-1])
        assert result["errors"] == {}
        assert (result["chunks_received"], result["chunks_lost"]) == (600, 0)
    finally:
        stub.terminate()
        stub.wait(30)


def test_generator_does_not_count_an_event_without_a_token():
    # LiteLLM sends finish_reason in an event of its own, after the last token.
    assert not TOKEN.search(b'data: {"choices":[{"index":0,"delta":{},"finish_reason":"stop"}]}')
    assert not TOKEN.search(b'data: {"choices":[{"delta":{"content":""}}]}')
    assert TOKEN.search(b'data: {"choices":[{"delta":{"role":"assistant","content":" t00"}}]}')
