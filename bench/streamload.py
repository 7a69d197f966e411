"""Streaming load generator: N concurrent SSE streams, every chunk's arrival timed.

Run as its own process (`python -m bench.streamload ...`) so its event loop competes
with nothing in the harness. Raw asyncio protocols on uvloop (HTTP/1.1 response
parsing, an incremental chunked decoder, SSE event splitting): at 400 streams × 50
chunks/s an HTTP client library would cost more CPU than the proxy under test.

Per stream, chunk i's delay is `arrival_i − i × interval − min_j(arrival_j − j × interval)`:
how late the chunk is against the engine's schedule, the schedule laid on the stream's
most punctual chunk. The engine stub sends chunk i at exactly t0 + i × interval, so
through a perfect proxy this is the stub's and the generator's own jitter; the proxy's
added delay is the difference of the same percentile measured through it and direct.
(Anchored on the first chunk instead, a relay that holds the first chunks back and then
delivers them in a burst, as LiteLLM does under load, would show negative delays.)

Prints one JSON object on stdout.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import re
import resource
import sys
import time
from typing import Any, cast

from .common import cpu_seconds, percentile, rss_mb

TOKEN = re.compile(rb'"content":\s*"[^"]')  # an event that carries text
QUANTILES = [*range(0, 90, 2), *range(90, 99), 99.0, 99.5, 99.9, 99.99, 100.0]


class Stream(asyncio.Protocol):
    """One streamed request on its own connection."""

    def __init__(self, run: Run, request: bytes) -> None:
        self.run = run
        self.request = request
        self.transport: asyncio.Transport | None = None
        self.buf = b""
        self.body = b""
        self.status: int | None = None
        self.chunked = False
        self.chunk_left = -1  # -1: expecting a size line; -2: expecting the CRLF after data
        self.arrivals: list[float] = []
        self.started = 0.0
        self.error: str | None = None
        self.complete = False
        self.announced = False
        self.done: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self.transport.write(self.request)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.complete and self.error is None:
            self.error = f"connection lost: {exc}" if exc else "connection closed early"
        self.finish()

    def finish(self) -> None:
        if not self.done.done():
            self.done.set_result(None)
        if self.transport is not None:
            self.transport.close()

    def data_received(self, data: bytes) -> None:
        now = time.monotonic()
        if self.status is None:
            self.buf += data
            end = self.buf.find(b"\r\n\r\n")
            if end < 0:
                return
            head = self.buf[:end].split(b"\r\n")
            data, self.buf = self.buf[end + 4:], b""
            self.status = int(head[0].split(b" ", 2)[1])
            for line in head[1:]:
                name, _, value = line.partition(b":")
                if (name.strip().lower() == b"transfer-encoding"
                        and b"chunked" in value.lower()):
                    self.chunked = True
            if self.status != 200:
                self.error = f"HTTP {self.status}"
                self.finish()
                return
        if self.chunked:
            data = self.dechunk(data)
        self.events(data, now)
        if self.complete:
            self.finish()

    def dechunk(self, data: bytes) -> bytes:
        """Incremental HTTP/1.1 chunked decoding (proxies re-chunk as they please)."""
        buf = self.buf + data
        out = []
        pos = 0
        while pos < len(buf):
            if self.chunk_left == -1:
                eol = buf.find(b"\r\n", pos)
                if eol < 0:
                    break
                size = int(buf[pos:eol].split(b";", 1)[0], 16)
                pos = eol + 2
                if size == 0:
                    self.complete = True  # trailers, if any, do not matter
                    pos = len(buf)
                    break
                self.chunk_left = size
            elif self.chunk_left == -2:
                if len(buf) - pos < 2:
                    break
                pos += 2
                self.chunk_left = -1
            else:
                take = min(self.chunk_left, len(buf) - pos)
                out.append(buf[pos:pos + take])
                pos += take
                self.chunk_left -= take
                if self.chunk_left == 0:
                    self.chunk_left = -2
        self.buf = buf[pos:]
        return b"".join(out)

    def events(self, data: bytes, now: float) -> None:
        body = self.body + data
        start = 0
        while True:
            end = body.find(b"\n\n", start)
            if end < 0:
                break
            event = body[start:end]
            start = end + 2
            if event.startswith(b"data: [DONE]"):
                if not self.chunked:
                    self.complete = True
            elif event.startswith(b"data:") and TOKEN.search(event):
                self.arrivals.append(now)
                if len(self.arrivals) == 1:
                    self.run.started(self)
            # SSE comments (": loading ...") are not chunks, nor events without a token
            # (LiteLLM moves finish_reason into an event of its own).
        self.body = body[start:]


class Run:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.streams: list[Stream] = []
        self.announced = 0
        self.all_started: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        body = json.dumps({
            "model": args.model, "stream": True,
            "messages": [{"role": "user", "content": "Count to 250, please."}],
        }).encode()
        self.request = (
            f"POST {args.path} HTTP/1.1\r\nHost: 127.0.0.1:{args.port}\r\n"
            f"Authorization: Bearer {args.key}\r\nContent-Type: application/json\r\n"
            f"Accept: text/event-stream\r\nContent-Length: {len(body)}\r\n\r\n"
        ).encode() + body

    def started(self, s: Stream) -> None:
        """A stream got its first chunk (or failed): counted once."""
        if s.announced:
            return
        s.announced = True
        self.announced += 1
        if self.announced == self.args.streams and not self.all_started.done():
            self.all_started.set_result(None)

    async def one(self, index: int) -> None:
        await asyncio.sleep(index * self.args.ramp / self.args.streams)
        loop = asyncio.get_running_loop()
        s = Stream(self, self.request)
        self.streams.append(s)
        s.started = time.monotonic()
        try:
            await loop.create_connection(lambda: s, "127.0.0.1", self.args.port)
            async with asyncio.timeout(self.args.timeout):
                await s.done
        except (OSError, TimeoutError) as e:
            s.error = s.error or f"{type(e).__name__}: {e}"
            s.finish()
        finally:
            self.started(s)

    def close_all(self) -> None:
        for s in self.streams:
            s.complete = s.complete or bool(s.arrivals)  # closed by us on purpose (hold mode)
            s.finish()


class Sampler:
    """CPU time and RSS of watched processes (the proxy under test, the stub)."""

    def __init__(self, watch: dict[str, int]) -> None:
        self.watch = watch
        self.marks: dict[str, tuple[float, dict[str, float], float]] = {}
        self.rss: dict[str, list[float]] = {name: [] for name in watch}

    def mark(self, label: str) -> None:
        cpu = {}
        for name, pid in self.watch.items():
            try:
                cpu[name] = cpu_seconds(pid)
            except OSError:
                cpu[name] = float("nan")
        own = resource.getrusage(resource.RUSAGE_SELF)
        self.marks[label] = (time.monotonic(), cpu, own.ru_utime + own.ru_stime)
        self.sample_rss()

    def sample_rss(self) -> None:
        for name, pid in self.watch.items():
            with contextlib.suppress(OSError):  # gone: its last sample stands
                self.rss[name].append(rss_mb(pid))

    def cores(self, a: str, b: str) -> tuple[float, dict[str, float], float]:
        if a not in self.marks or b not in self.marks:
            return 0.0, {}, 0.0
        t0, c0, own0 = self.marks[a]
        t1, c1, own1 = self.marks[b]
        wall = max(t1 - t0, 1e-9)
        return wall, {n: (c1[n] - c0[n]) / wall for n in c0}, (own1 - own0) / wall


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    run = Run(args)
    sampler = Sampler({k: int(v) for k, v in (w.split("=", 1) for w in args.watch)})
    loop = asyncio.get_running_loop()

    async def rss_loop() -> None:
        while True:
            sampler.sample_rss()
            await asyncio.sleep(args.sample_every)

    sampler.mark("begin")
    rss_task = asyncio.ensure_future(rss_loop())
    tasks = [asyncio.ensure_future(run.one(i)) for i in range(args.streams)]
    everything = asyncio.gather(*tasks)
    # The steady window: every stream has its first chunk, none has ended yet.
    await asyncio.wait({run.all_started, everything}, return_when=asyncio.FIRST_COMPLETED)
    sampler.mark("steady")
    if args.hold > 0:
        await asyncio.wait({everything}, timeout=args.hold)
        sampler.mark("steady_end")
        run.close_all()
    else:
        first_done: asyncio.Future[None] = loop.create_future()
        for s in run.streams:
            s.done.add_done_callback(
                lambda _: first_done.done() or first_done.set_result(None))
        await asyncio.wait({first_done, everything}, return_when=asyncio.FIRST_COMPLETED)
        sampler.mark("steady_end")
    await everything
    sampler.mark("end")
    rss_task.cancel()
    return report(args, run, sampler)


def report(args: argparse.Namespace, run: Run, sampler: Sampler) -> dict[str, Any]:
    interval = args.interval
    delays: list[float] = []
    steady: list[float] = []  # chunks that arrived while every stream was running
    w0 = sampler.marks.get("steady", (0.0,))[0]
    w1 = sampler.marks.get("steady_end", (0.0,))[0]
    firsts: list[float] = []
    received = 0
    errors: dict[str, int] = {}
    for s in run.streams:
        received += len(s.arrivals)
        if s.error:
            errors[s.error] = errors.get(s.error, 0) + 1
        if s.arrivals:
            firsts.append((s.arrivals[0] - s.started) * 1000)
            anchor = min(a - i * interval for i, a in enumerate(s.arrivals))
            for i, a in enumerate(s.arrivals):
                d = (a - anchor - i * interval) * 1000
                delays.append(d)
                if w0 <= a <= w1:
                    steady.append(d)
    delays.sort()
    steady.sort()
    firsts.sort()
    expected = args.streams * args.chunks
    wall, cores, own = sampler.cores("steady", "steady_end")
    total_wall, total_cores, total_own = sampler.cores("begin", "end")
    out: dict[str, Any] = {
        "streams": args.streams,
        "streams_with_chunks": sum(1 for s in run.streams if s.arrivals),
        "chunks_expected": expected if args.hold <= 0 else None,
        "chunks_received": received,
        "chunks_lost": max(0, expected - received) if args.hold <= 0 else None,
        "errors": errors,
        "interval_ms": interval * 1000,
        "delay_ms": {
            "n": len(delays),
            **{f"p{q:g}": percentile(delays, q) for q in (50, 90, 99, 99.9)},
            "max": delays[-1] if delays else None,
            "mean": sum(delays) / len(delays) if delays else None,
        },
        "steady_delay_ms": {"n": len(steady), "p50": percentile(steady, 50),
                            "p99": percentile(steady, 99),
                            "max": steady[-1] if steady else None},
        "delay_quantiles_ms": [[q, percentile(delays, q)] for q in QUANTILES] if delays else [],
        "first_chunk_ms": {"p50": percentile(firsts, 50), "p99": percentile(firsts, 99)},
        "steady_window_s": wall,
        "cpu_cores": cores,
        "loadgen_cpu_cores": own,
        "run_wall_s": total_wall,
        "run_cpu_cores": total_cores,
        "loadgen_run_cpu_cores": total_own,
        "rss_mb": {name: {"max": max(v), "first": v[0], "last": v[-1], "n": len(v)}
                   for name, v in sampler.rss.items() if v},
    }
    return out


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="concurrent SSE streams, every chunk timed")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--path", default="/v1/chat/completions")
    p.add_argument("--key", default="none")
    p.add_argument("--model", default="fast")
    p.add_argument("--streams", type=int, default=400)
    p.add_argument("--chunks", type=int, default=250, help="chunks the engine sends per stream")
    p.add_argument("--interval", type=float, default=0.02, help="the engine's chunk interval")
    p.add_argument("--ramp", type=float, default=1.0, help="spread the stream starts over this")
    p.add_argument("--timeout", type=float, default=60.0, help="per stream")
    p.add_argument("--hold", type=float, default=0.0,
                   help="once all streams are open, hold them this long then close (0: read "
                        "every stream to its end)")
    p.add_argument("--watch", action="append", default=[], metavar="NAME=PID",
                   help="report this process's CPU and RSS")
    p.add_argument("--sample-every", type=float, default=0.25)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        import uvloop
    except ImportError:
        result = asyncio.run(main_async(args))
    else:
        result = uvloop.run(main_async(args))
    json.dump(result, sys.stdout)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
