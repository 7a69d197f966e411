"""The benchmark's upstream stub: an OpenAI-shaped engine that costs as little as possible.

It must never be the bottleneck, so it is a raw asyncio protocol on uvloop with
precomputed responses (no framework, no per-request JSON building):

- `GET /health`: 200, or 503 until `--ready-after` seconds after start (then it writes
  the instant it became ready, a `time.time()` float, to `--ready-file`);
- `POST /v1/chat/completions` (and `/v1/completions`): a small fixed JSON, or with
  `"stream": true` an SSE stream of `--chunks` events, chunk i sent at
  t0 + i * `--interval` (absolute deadlines, so timer lateness never accumulates);
  consecutive chunks differ, as a model's tokens do (LiteLLM ends a stream that repeats
  one chunk 100 times as a model stuck in a loop);
- SIGTERM: exit at once (the swap benchmark times the engine's exit);
- `--start-file`: the instant the process started, taken before any other import.

Run: ``python bench/upstream.py --port 8001 [--chunks 250 --interval 0.02 --cpu 1]``
"""

import time

T_START = time.time()  # first statement: the swap benchmark times the engine's spawn

import argparse  # noqa: E402
import asyncio  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import signal  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import cast  # noqa: E402


def write_atomic(path: str, text: str) -> None:
    """Readers poll these files: never let them see half a number."""
    tmp = f"{path}.{os.getpid()}.tmp"
    Path(tmp).write_text(text)
    os.replace(tmp, path)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--chunks", type=int, default=250, help="SSE events per streamed answer")
    p.add_argument("--interval", type=float, default=0.02, help="seconds between events")
    p.add_argument("--ready-after", type=float, default=0.0,
                   help="/health answers 503 for this long after start")
    p.add_argument("--ready-after-file", default=None,
                   help="read --ready-after from this file (the harness varies it per run)")
    p.add_argument("--ready-file", default=None, help="write the ready instant here")
    p.add_argument("--start-file", default=None, help="write '<pid> <start instant>' here")
    p.add_argument("--stop-file", default=None, help="write the SIGTERM instant here")
    p.add_argument("--exit-after-start", action="store_true",
                   help="write --start-file and exit (measures interpreter start-up)")
    p.add_argument("--cpu", type=int, default=None, help="pin to this CPU")
    p.add_argument("--served-name", default="bench")
    return p.parse_args(argv)


def http_response(status: str, body: bytes, ctype: bytes = b"application/json") -> bytes:
    return (b"HTTP/1.1 " + status.encode() + b"\r\nContent-Type: " + ctype
            + b"\r\nContent-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)


def chunk_frame(payload: bytes) -> bytes:
    """One HTTP/1.1 chunk (the answer's length is unknown up front, as with real engines)."""
    return f"{len(payload):x}\r\n".encode() + payload + b"\r\n"


class Responses:
    """Every byte string the stub sends, built once."""

    def __init__(self, name: str) -> None:
        completion = {
            "id": "chatcmpl-bench", "object": "chat.completion", "created": 0, "model": name,
            "choices": [{"index": 0, "finish_reason": "stop",
                         "message": {"role": "assistant", "content": "Hello from the stub."}}],
            "usage": {"prompt_tokens": 8, "completion_tokens": 5, "total_tokens": 13},
        }
        self.completion = http_response("200 OK", json.dumps(completion).encode())
        self.healthy = http_response("200 OK", b'{"status":"ok"}')
        self.loading = http_response("503 Service Unavailable", b'{"status":"loading"}')
        models = {"object": "list", "data": [{"id": name, "object": "model", "owned_by": "bench"}]}
        self.models = http_response("200 OK", json.dumps(models).encode())
        self.not_found = http_response("404 Not Found", b'{"error":"not found"}')
        self.stream_head = (b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
                            b"Cache-Control: no-cache\r\nTransfer-Encoding: chunked\r\n\r\n")

        def event(token: str, finish: str | None) -> bytes:
            data = {"id": "chatcmpl-bench", "object": "chat.completion.chunk", "created": 0,
                    "model": name, "choices": [{"index": 0, "delta": {"content": token},
                                                "finish_reason": finish}]}
            return b"data: " + json.dumps(data, separators=(",", ":")).encode() + b"\n\n"

        # Tokens of one length (" t00" … " t99"): every chunk is the same size.
        self.chunks = [chunk_frame(event(f" t{i:02d}", None)) for i in range(100)]
        # The last content event carries finish_reason, so a stream is exactly --chunks
        # data events followed by [DONE] (what the load generator counts).
        self.last = chunk_frame(event(" end", "stop") + b"data: [DONE]\n\n") + b"0\r\n\r\n"

    def chunk(self, i: int) -> bytes:
        return self.chunks[i % len(self.chunks)]


class Stub:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.r = Responses(args.served_name)
        self.ready = False


class Conn(asyncio.Protocol):
    """One client connection: HTTP/1.1 keep-alive, requests with Content-Length bodies."""

    def __init__(self, stub: Stub) -> None:
        self.stub = stub
        self.loop = asyncio.get_running_loop()
        self.transport: asyncio.Transport | None = None
        self.buf = b""
        self.head: tuple[bytes, bytes, int, bool] | None = None  # method, path, length, close
        self.timer: asyncio.TimerHandle | None = None
        self.streaming = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass

    def connection_lost(self, exc: Exception | None) -> None:
        if self.timer is not None:
            self.timer.cancel()
        self.transport = None

    def data_received(self, data: bytes) -> None:
        self.buf += data
        while not self.streaming and self.transport is not None:
            if self.head is None:
                end = self.buf.find(b"\r\n\r\n")
                if end < 0:
                    return
                lines = self.buf[:end].split(b"\r\n")
                self.buf = self.buf[end + 4:]
                method, path = lines[0].split(b" ", 2)[:2]
                length, close = 0, False
                for line in lines[1:]:
                    name, _, value = line.partition(b":")
                    name = name.strip().lower()
                    if name == b"content-length":
                        length = int(value)
                    elif name == b"connection" and value.strip().lower() == b"close":
                        close = True
                self.head = (method, path.split(b"?", 1)[0], length, close)
            method, path, length, close = self.head
            if len(self.buf) < length:
                return
            body, self.buf = self.buf[:length], self.buf[length:]
            self.head = None
            self.handle(method, path, body)
            if close and not self.streaming and self.transport is not None:
                self.transport.close()

    def handle(self, method: bytes, path: bytes, body: bytes) -> None:
        assert self.transport is not None
        r = self.stub.r
        if path == b"/health":
            self.transport.write(r.healthy if self.stub.ready else r.loading)
        elif method == b"POST" and path in (b"/v1/chat/completions", b"/v1/completions"):
            if b'"stream"' in body and json.loads(body).get("stream") is True:
                self.start_stream()
            else:
                self.transport.write(r.completion)
        elif path == b"/v1/models":
            self.transport.write(r.models)
        else:
            self.transport.write(r.not_found)

    def start_stream(self) -> None:
        assert self.transport is not None
        self.streaming = True
        self.sent = 1
        self.t0 = self.loop.time()
        self.transport.write(self.stub.r.stream_head + self.stub.r.chunk(0))
        self.schedule()

    def schedule(self) -> None:
        when = self.t0 + self.sent * self.stub.args.interval
        self.timer = self.loop.call_at(when, self.tick)

    def tick(self) -> None:
        self.timer = None
        if self.transport is None:
            return
        self.sent += 1
        if self.sent < self.stub.args.chunks:
            self.transport.write(self.stub.r.chunk(self.sent - 1))
            self.schedule()
            return
        self.transport.write(self.stub.r.last)
        self.streaming = False
        if self.buf:  # a pipelined request waited for the stream to end
            self.data_received(b"")


async def serve(args: argparse.Namespace) -> None:
    loop = asyncio.get_running_loop()
    stub = Stub(args)

    def terminate() -> None:
        if args.stop_file:
            write_atomic(args.stop_file, repr(time.time()))
        os._exit(0)  # "exits promptly on SIGTERM": no draining, like a killed engine

    loop.add_signal_handler(signal.SIGTERM, terminate)
    loop.add_signal_handler(signal.SIGINT, terminate)
    server = await loop.create_server(lambda: Conn(stub), args.host, args.port, backlog=4096,
                                      reuse_address=True)
    delay = args.ready_after
    if args.ready_after_file and os.path.exists(args.ready_after_file):
        delay = float(Path(args.ready_after_file).read_text())

    def become_ready() -> None:
        stub.ready = True
        t_ready = time.time()
        if args.ready_file:
            write_atomic(args.ready_file, repr(t_ready))

    # The port is bound at once; only /health says "loading" until the known instant.
    if delay > 0:
        loop.call_at(loop.time() + delay, become_ready)
    else:
        become_ready()
    async with server:
        await server.serve_forever()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.start_file:
        write_atomic(args.start_file, f"{os.getpid()} {T_START!r}")
    if args.exit_after_start:
        return 0
    if args.cpu is not None and args.cpu < (os.cpu_count() or 1):
        os.sched_setaffinity(0, {args.cpu})  # the gateway's CPU is not ours to share
    try:
        import uvloop
    except ImportError:
        asyncio.run(serve(args))
    else:
        uvloop.run(serve(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
