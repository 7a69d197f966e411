"""Load: 1,000 concurrent streams through a gateway for a bounded time.

`sparkstack serve` runs as a subprocess in front of four fake engines (paced streams
of 11 chunks, one a second: each stream lasts ~10 s, so ~100 new streams a second keep
1,000 open). 1,000 clients, each on its own connection (`Connection: close`: every
stream opens and closes a socket), start the next stream as soon as one ends. Checked:
every stream arrives complete, the gateway really holds ~1,000 at once, its RSS in the
last window of the run is no higher than in the first (a leak of a few KB a request
would show), and it holds no more file descriptors afterwards than before.

SOAK_SECONDS sets the loaded time: 80 in `make test` (the test takes under 2 minutes),
600 in `make soak`. The figures are printed (`-s`) and recorded in docs/reliability.md.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import resource
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import pytest

from ..conftest import KEY, fake, free_port, write_config
from ..test_cli import start_serving

pytestmark = pytest.mark.soak

SECONDS = float(os.environ.get("SOAK_SECONDS", "80"))
STREAMS = int(os.environ.get("SOAK_STREAMS", "1000"))
MODELS = ("s0", "s1", "s2", "s3")
TOKENS = 11  # chunks per stream: 11 tokens, then the finish chunk, then [DONE]
RATE = 1  # tokens a second
RAMP_S = 10.0  # clients start spread over this (as long as a stream: steady arrivals)
RSS_GROWTH_MB = 10.0  # tolerated RSS growth, first window to last
RSS_GROWTH_SHARE = 0.10  # ... or this share of the first window's, whichever is larger


@dataclass
class Figures:
    completed: int = 0
    failed: list[str] = field(default_factory=list)
    open_now: int = 0
    rss: list[tuple[float, float]] = field(default_factory=list)  # (time, MB)
    in_flight: list[int] = field(default_factory=list)  # the gateway's own count


def vm_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError(f"no VmRSS for {pid}")


def fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def dechunk(body: bytes) -> bytes:
    """The payload of a chunked HTTP/1.1 body."""
    out, pos = bytearray(), 0
    while True:
        end = body.index(b"\r\n", pos)
        size = int(body[pos:end].split(b";")[0], 16)
        if size == 0:
            return bytes(out)
        out += body[end + 2:end + 2 + size]
        pos = end + 2 + size + 2


async def one_stream(port: int, model: str) -> str | None:
    """One streamed chat on a fresh connection; None if it arrived whole, else why not."""
    body = json.dumps({"model": model, "stream": True, "max_tokens": TOKENS,
                       "messages": [{"role": "user", "content": "hi"}]}).encode()
    head = (f"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
            f"Authorization: Bearer {KEY}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(head + body)
        raw = await reader.read()  # to EOF: the gateway closes after the answer
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
    header, _, rest = raw.partition(b"\r\n\r\n")
    if not header.startswith(b"HTTP/1.1 200"):
        return header[:200].decode(errors="replace")
    text = (dechunk(rest) if b"chunked" in header.lower() else rest).decode()
    events = [e for e in text.split("\n\n") if e.startswith("data: ")]
    if events[-1:] != ["data: [DONE]"] or len(events) != TOKENS + 2 or "error" in text:
        return f"incomplete stream: {text[-300:]!r}"
    return None


async def client(port: int, index: int, until: float, figures: Figures) -> None:
    await asyncio.sleep(RAMP_S * index / STREAMS)
    model = MODELS[index % len(MODELS)]
    while time.monotonic() < until:
        figures.open_now += 1
        try:
            problem = await one_stream(port, model)
        except (OSError, ValueError) as e:
            problem = f"{type(e).__name__}: {e}"
        finally:
            figures.open_now -= 1
        if problem is None:
            figures.completed += 1
        else:
            figures.failed.append(problem)


async def sample(pid: int, url: str, figures: Figures, began: float) -> None:
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {KEY}"}) as http:
        while True:
            figures.rss.append((time.monotonic() - began, vm_rss_mb(pid)))
            async with http.get(url + "/api/models") as resp:
                models = (await resp.json())["models"]
            figures.in_flight.append(sum(m["in_flight"] for m in models))
            await asyncio.sleep(1.0)


async def all_models(http: aiohttp.ClientSession, url: str, action: str) -> None:
    for m in MODELS:
        async with http.post(f"{url}/api/models/{m}/{action}") as resp:
            assert resp.status == 200, await resp.text()


async def until_fds(pid: int, at_most: int, timeout: float = 30) -> int:
    """Closed connections free their descriptors as the event loop notices: poll."""
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(timeout):
            while fds(pid) > at_most:
                await asyncio.sleep(0.1)
    return fds(pid)


async def test_1000_streams_held_with_flat_memory_and_no_leaked_descriptors(tmp_path):
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    need = 4 * STREAMS + 1024  # clients here; client + upstream sockets in the gateway
    if soft < need:  # the gateway and its engines inherit the limit
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(need, hard), hard))
    models = "".join(f"""
    {m}:
      command: {fake("--served-name", m, "--tokens", TOKENS, "--rate", RATE)}
      memory_gb: 1
    """ for m in MODELS)
    config = write_config(tmp_path, models)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc, _ = await start_serving(config, port)
    assert proc.stdout is not None
    drain = asyncio.create_task(proc.stdout.read())  # a full pipe would block its logging
    figures = Figures()
    try:
        async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {KEY}"}) as http:
            # Every model once, then none: what stays open (log files) is in the baseline.
            await all_models(http, url, "load")
            await all_models(http, url, "unload")
            fds_before = fds(proc.pid)
            await all_models(http, url, "load")
            began = time.monotonic()
            until = began + RAMP_S + SECONDS
            sampler = asyncio.create_task(sample(proc.pid, url, figures, began))
            clients = [asyncio.create_task(client(port, i, until, figures))
                       for i in range(STREAMS)]
            await asyncio.gather(*clients)
            sampler.cancel()
            await all_models(http, url, "unload")
            fds_after = await until_fds(proc.pid, fds_before)
    finally:
        proc.terminate()
        await asyncio.wait_for(proc.wait(), 60)
        drain.cancel()

    window = min(60.0, SECONDS / 3)
    start, end = RAMP_S, RAMP_S + SECONDS
    first = [mb for t, mb in figures.rss if start <= t <= start + window]
    last = [mb for t, mb in figures.rss if end - window <= t <= end]
    held = figures.in_flight[int(RAMP_S):int(RAMP_S + SECONDS)]
    report = {
        "seconds": SECONDS, "clients": STREAMS, "streams_completed": figures.completed,
        "streams_failed": len(figures.failed),
        "gateway_in_flight_median": statistics.median(held) if held else 0,
        "gateway_in_flight_min": min(held, default=0),
        "rss_mb_first_window": [round(min(first), 1), round(max(first), 1)],
        "rss_mb_last_window": [round(min(last), 1), round(max(last), 1)],
        "rss_window_s": window, "fds_before": fds_before, "fds_after": fds_after,
    }
    print("\nSOAK", json.dumps(report))
    assert not figures.failed, f"{len(figures.failed)} streams failed, e.g. {figures.failed[:3]}"
    assert figures.completed >= 0.5 * STREAMS * SECONDS / (TOKENS / RATE), report
    assert statistics.median(held) >= 0.95 * STREAMS, f"the gateway held fewer: {report}"
    growth = max(RSS_GROWTH_MB, RSS_GROWTH_SHARE * max(first))
    assert max(last) <= max(first) + growth, f"RSS grew: {report}"
    assert fds_after <= fds_before, f"descriptors leaked: {report}"
