"""A fake OpenAI-compatible inference engine for the sparkstack test suite.

It stands in for vLLM / llama-server: the gateway starts it as a subprocess, waits for
``/health``, proxies requests to it and stops it again.  Command-line options simulate the
awkward parts of real engines: slow loading (port closed, or open but ``/health`` 503),
crashing at start or mid-request, ignoring SIGTERM, and slow token streams.  Responses
expose what the gateway sent (echoed ``model``, ``x-fake-body-sha256`` of the raw body)
and ``GET /stats`` reports stream counters so tests can check cancellation propagates.

The release gate makes tests independent of timing: with ``--gate`` (or a request header
``x-fake-gate: NAME``) a completion stops at the gate — a stream after its first chunk,
a non-streamed answer before its headers — until the test calls ``POST /release``
(``?gate=NAME``). A released gate stays open, so a release that comes first is not lost.

Faults, for every completion (``--fault MODE``) or one request (header
``x-fake-fault: MODE``): ``hang`` (a stream stops after its first chunk, a non-streamed
answer never comes; the connection stays open), ``die`` (the process exits mid-answer),
``500`` (an OpenAI-shaped 500), ``500-text`` (a plain-text 500 page), ``close`` (the
connection is closed before any header), ``bad-json`` (a 200 whose JSON body, or whose
SSE stream, is malformed). With ``--while-exists PATH`` the faults given on the command
line (start faults included) apply only to runs started while PATH exists: a test
removes the file to mend the engine.

Run: ``python tests/fake_engine.py --port 8001 [--rate 5] [--crash-after 1] ...``
Importing this module has no side effects.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import email.parser
import email.policy
import hashlib
import json
import os
import signal
import sys
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
FAULTS = ("hang", "die", "500", "500-text", "close", "bad-json")
DEFAULT_GATE = "default"


@dataclass
class State:
    """Runtime configuration and counters shared by the handlers."""

    args: argparse.Namespace
    ready_at: float = 0.0
    completions: int = 0
    requests: int = 0
    active_streams: int = 0
    completed_streams: int = 0
    cancelled_streams: int = 0
    last_body: dict[str, Any] | None = None  # the last completion request, as received
    pid: int = field(default_factory=os.getpid)
    gates: dict[str, asyncio.Event] = field(default_factory=dict)
    gated: int = 0  # completions waiting at a gate now
    hung: int = 0  # completions hanging now (fault "hang")
    worker_joined: bool = False  # a head of two nodes: its worker has connected

    def is_ready(self) -> bool:
        if self.args.nnodes > 1 and not self.worker_joined:
            return False
        return not self.args.never_ready and time.monotonic() >= self.ready_at

    def gate(self, name: str) -> asyncio.Event:
        return self.gates.setdefault(name, asyncio.Event())

    async def pass_gate(self, request: web.Request) -> None:
        """Wait at this request's gate, if it has one, until the test releases it."""
        name = request.headers.get("x-fake-gate") or (DEFAULT_GATE if self.args.gate else None)
        if name is None:
            return
        gate = self.gate(name)
        if gate.is_set():
            return
        self.gated += 1
        log(f"waiting at gate {name}")
        try:
            await gate.wait()
        finally:
            self.gated -= 1

    async def hang(self) -> None:
        """Stop sending without closing: until the client goes away (or forever)."""
        self.hung += 1
        log("hanging (fault)")
        try:
            await asyncio.Event().wait()
        finally:
            self.hung -= 1


STATE = web.AppKey("state", State)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Fake OpenAI-compatible engine for tests.")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--start-delay", type=float, default=0.0, help="sleep before binding")
    p.add_argument("--ready-delay", type=float, default=0.0, help="/health 503 for this long")
    p.add_argument("--never-ready", action="store_true", help="/health always 503")
    p.add_argument("--wait-signal", action="store_true",
                   help="keep loading (port closed) until SIGUSR1 arrives")
    p.add_argument("--exit-at-start", type=int, default=None, metavar="CODE")
    p.add_argument("--tokens", type=int, default=5, help="tokens per completion")
    p.add_argument("--rate", type=float, default=0.0, help="tokens/s (0 = unpaced)")
    p.add_argument(
        "--crash-after",
        type=int,
        default=None,
        metavar="N",
        help="exit(3) during the (N+1)-th completion/embedding request",
    )
    p.add_argument("--ignore-sigterm", action="store_true")
    p.add_argument("--gate", action="store_true",
                   help="every completion waits at the default gate until POST /release")
    p.add_argument("--fault", choices=FAULTS, default=None,
                   help="inject this fault into every completion (see the module doc)")
    p.add_argument("--while-exists", default=None, metavar="PATH",
                   help="command-line faults apply only if PATH exists when the run starts")
    p.add_argument("--starts-file", default=None, help="append the pid here on each start")
    p.add_argument("--served-name", default="fake")
    p.add_argument("--api-key", default=None)
    p.add_argument("--embedding-dim", type=int, default=8)
    p.add_argument("--allocate-mb", type=int, default=0,
                   help="hold this much memory (touched, so it is resident) while running")
    p.add_argument("--load-log", default=None, metavar="FILE",
                   help="print this recorded engine log while starting (load progress)")
    p.add_argument("--no-usage", action="store_true",
                   help="never report usage (an engine that ignores stream_options)")
    # What a capable engine does with a non-streamed chat (sparkstack probe's checks).
    p.add_argument("--tool-calls", action="store_true",
                   help="call the first tool offered, until a tool result is in the chat")
    p.add_argument("--reasoning", action="store_true",
                   help="give a reasoning_content apart from the content")
    p.add_argument("--json-mode", action="store_true",
                   help="response_format json_object: the content is a JSON object")
    p.add_argument("--context", type=int, default=None, metavar="TOKENS",
                   help="answer 400 when prompt (words) and max_tokens exceed this")
    # vLLM's multi-node launch: the head (rank 0) is healthy only once the worker has
    # connected to its master port; the worker (--headless) serves no HTTP. Like an
    # engine that hangs rather than exits, neither half stops when the other goes away:
    # stopping both is sparkstack's job.
    p.add_argument("--nnodes", type=int, default=1)
    p.add_argument("--node-rank", type=int, default=0)
    p.add_argument("--master-addr", default="127.0.0.1")
    p.add_argument("--master-port", type=int, default=29501)
    p.add_argument("--headless", action="store_true")
    p.add_argument("--tensor-parallel-size", type=int, default=1)
    p.add_argument("--distributed-executor-backend", default=None)
    return p.parse_args(argv)


def log(msg: str) -> None:
    print(msg, flush=True)


async def early_fault(request: web.Request, fault: str | None) -> web.StreamResponse | None:
    """The faults that strike before any header: an answer to send instead, or None."""
    if fault == "500":
        return error_reply(request, 500, "CUDA error: an illegal memory access was encountered",
                           "internal_server_error")
    if fault == "500-text":
        return web.Response(status=500, text="500 Internal Server Error\n\nServer got itself "
                            "in trouble", headers=fake_headers(request))
    if fault == "close":
        log("closing the connection before any header (fault)")
        assert request.transport is not None
        request.transport.abort()
        raise asyncio.CancelledError  # nothing more to do for this request
    return None


def crash() -> None:
    print("fake engine crashing (--crash-after)", file=sys.stderr, flush=True)
    sys.stdout.flush()
    os._exit(3)


def fake_headers(request: web.Request) -> dict[str, str]:
    return {"x-fake-body-sha256": request["sha256"], "x-fake-pid": str(os.getpid())}


def json_reply(request: web.Request, data: Any, status: int = 200) -> web.Response:
    return web.json_response(data, status=status, headers=fake_headers(request))


def error_reply(request: web.Request, status: int, message: str, kind: str) -> web.Response:
    body = {"error": {"message": message, "type": kind, "code": status}}
    return json_reply(request, body, status)


@web.middleware
async def common_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Log, count, hash the raw body and enforce the API key."""
    state = request.app[STATE]
    log(f"{request.method} {request.path}")
    if request.path not in ("/health", "/stats"):
        state.requests += 1
    raw = await request.read()
    request["raw"] = raw
    request["sha256"] = hashlib.sha256(raw).hexdigest()
    key = state.args.api_key
    authorized = request.headers.get("Authorization") == f"Bearer {key}"
    if key and request.path.startswith("/v1/") and not authorized:
        return error_reply(request, 401, "invalid api key", "authentication_error")
    try:
        return await handler(request)
    except (TypeError, AttributeError, KeyError, ValueError) as e:
        # A body of the wrong shape: real engines validate and answer 400, so do we.
        return error_reply(request, 400, f"invalid request: {e}", "invalid_request_error")


def json_body(request: web.Request) -> dict[str, Any] | None:
    try:
        body = json.loads(request["raw"] or b"{}")
    except ValueError:
        return None
    return body if isinstance(body, dict) else None


def multipart_field(request: web.Request, name: str) -> str | None:
    """Return a text field of a multipart/form-data body (already read as raw bytes)."""
    head = f"Content-Type: {request.headers.get('Content-Type', '')}\r\n\r\n".encode()
    msg = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(head + request["raw"])
    if not msg.is_multipart():
        return None
    for part in msg.iter_parts():
        if part.get_param("name", header="content-disposition") == name:
            payload = part.get_payload(decode=True)
            return payload.decode() if isinstance(payload, bytes) else None
    return None


def text_of(content: Any) -> str:
    """Content of a chat message / prompt as plain text."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = [p.get("text", "") if isinstance(p, dict) else str(p) for p in content]
        return "".join(parts)
    return "" if content is None else json.dumps(content)


async def handle_health(request: web.Request) -> web.Response:
    if request.app[STATE].is_ready():
        return json_reply(request, {"status": "ok"})
    return json_reply(request, {"status": "loading"}, status=503)


async def handle_stats(request: web.Request) -> web.Response:
    s = request.app[STATE]
    return json_reply(
        request,
        {
            "active_streams": s.active_streams,
            "completed_streams": s.completed_streams,
            "cancelled_streams": s.cancelled_streams,
            "requests": s.requests,
            "last_body": s.last_body,
            "pid": s.pid,
            "gated": s.gated,
            "hung": s.hung,
        },
    )


async def handle_release(request: web.Request) -> web.Response:
    """POST /release[?gate=NAME]: open a gate for good (the default gate unless named)."""
    state = request.app[STATE]
    name = request.query.get("gate", DEFAULT_GATE)
    state.gate(name).set()
    return json_reply(request, {"released": name, "gated": state.gated})


async def handle_models(request: web.Request) -> web.Response:
    name = request.app[STATE].args.served_name
    model = {"id": name, "object": "model", "created": 0, "owned_by": "fake"}
    return json_reply(request, {"object": "list", "data": [model]})


async def handle_completion(request: web.Request) -> web.StreamResponse:
    """POST /v1/chat/completions and /v1/completions."""
    state = request.app[STATE]
    args = state.args
    body = json_body(request)
    if body is None:
        return error_reply(request, 400, "body must be a JSON object", "invalid_request_error")
    state.completions += 1
    state.last_body = body
    will_crash = args.crash_after is not None and state.completions > args.crash_after

    chat = request.path.endswith("/chat/completions")
    if chat:
        messages = body.get("messages") or [{}]
        last = messages[-1] if isinstance(messages[-1], dict) else {}
        prompt = text_of(last.get("content"))
    else:
        prompt = text_of(body.get("prompt"))
    n = args.tokens
    max_tokens = body.get("max_tokens")
    if isinstance(max_tokens, int) and not isinstance(max_tokens, bool):
        n = max(0, min(n, max_tokens))
    pieces = [prompt] if body.get("echo") is True else [f"tok{i} " for i in range(n)]
    usage = {
        "prompt_tokens": len(prompt.split()),
        "completion_tokens": len(pieces),
        "total_tokens": len(prompt.split()) + len(pieces),
    }
    if args.context is not None and usage["prompt_tokens"] + (max_tokens or 0) > args.context:
        return error_reply(request, 400, f"This model's maximum context length is "
                           f"{args.context} tokens. However, you requested "
                           f"{usage['prompt_tokens'] + (max_tokens or 0)} tokens.",
                           "invalid_request_error")
    base = {
        "id": f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:16]}",
        "created": int(time.time()),
        "model": body.get("model"),
    }
    delay = 1.0 / args.rate if args.rate > 0 else 0.0
    fault = request.headers.get("x-fake-fault") or args.fault
    if fault is not None and fault not in FAULTS:
        return error_reply(request, 400, f"unknown fault {fault!r}", "invalid_request_error")
    will_crash = will_crash or fault == "die"
    early = await early_fault(request, fault)
    if early is not None:
        return early

    if body.get("stream") is True:
        return await stream_completion(request, chat, base, pieces, usage, delay, will_crash,
                                       fault)

    await state.pass_gate(request)
    if will_crash:
        crash()
    if fault == "hang":
        await state.hang()
    if fault == "bad-json":
        return web.Response(body=b'{"id": "x", "choices": [{"message": {"content": "tok0',
                            content_type="application/json", headers=fake_headers(request))
    if delay:
        await asyncio.sleep(delay * len(pieces))
    text = "".join(pieces)
    if chat:
        choice = {
            "index": 0,
            "message": chat_message(args, body, prompt, text),
            "finish_reason": "stop",
        }
        if choice["message"].get("tool_calls"):
            choice["finish_reason"] = "tool_calls"
    else:
        choice = {"index": 0, "text": text, "finish_reason": "stop"}
    obj = "chat.completion" if chat else "text_completion"
    reply = {**base, "object": obj, "choices": [choice], "usage": usage}
    if args.no_usage:
        del reply["usage"]
    return json_reply(request, reply)


def chat_message(args: argparse.Namespace, body: dict[str, Any], prompt: str, text: str
                 ) -> dict[str, Any]:
    """The assistant message of a non-streamed chat, as the engine options shape it."""
    message: dict[str, Any] = {"role": "assistant", "content": text}
    tools = body.get("tools") or []
    results = [m for m in body.get("messages") or []
               if isinstance(m, dict) and m.get("role") == "tool"]
    if args.tool_calls and tools and not results:
        name = tools[0]["function"]["name"]
        message = {"role": "assistant", "content": None, "tool_calls": [{
            "id": "call_0", "type": "function",
            "function": {"name": name, "arguments": json.dumps({"city": "Paris"})}}]}
    elif args.tool_calls and results:
        message["content"] = f"The tool said: {text_of(results[-1].get('content'))}"
    fmt = body.get("response_format")
    if args.json_mode and isinstance(fmt, dict) and fmt.get("type") == "json_object":
        message["content"] = json.dumps({"answer": text.strip()})
    if args.reasoning:
        message["reasoning_content"] = f"The user asked: {prompt}"
    return message


async def stream_completion(
    request: web.Request,
    chat: bool,
    base: dict[str, Any],
    pieces: list[str],
    usage: dict[str, int],
    delay: float,
    will_crash: bool,
    fault: str | None = None,
) -> web.StreamResponse:
    state = request.app[STATE]
    obj = "chat.completion.chunk" if chat else "text_completion"

    def chunk(piece: str | None, finish: str | None = None, first: bool = False) -> bytes:
        if chat:
            delta: dict[str, str] = {} if piece is None else {"content": piece}
            if first:
                delta["role"] = "assistant"
            choice: dict[str, Any] = {"index": 0, "delta": delta, "finish_reason": finish}
        else:
            choice = {"index": 0, "text": piece or "", "finish_reason": finish}
        data = {**base, "object": obj, "choices": [choice]}
        return f"data: {json.dumps(data)}\n\n".encode()

    resp = web.StreamResponse(
        headers={
            **fake_headers(request),
            "Content-Type": "text/event-stream",
            "Cache-Control": "no-cache",
        }
    )
    await resp.prepare(request)
    state.active_streams += 1
    finished = False
    try:
        for i, piece in enumerate(pieces):
            if i and delay:
                await asyncio.sleep(delay)
            await resp.write(chunk(piece, first=i == 0))
            if i == 0:
                await state.pass_gate(request)
                if fault == "hang":
                    await state.hang()
                if fault == "bad-json":
                    await resp.write(b'data: {"choices": [{"delta": {"content": "tok1\n\n'
                                     b"this line is not an event\n\n")
            if will_crash and i == 1:
                break
        if will_crash:
            await asyncio.sleep(0.05)  # let the chunks reach the socket
            crash()
        await resp.write(chunk(None, finish="stop"))
        opts = json_body(request) or {}
        stream_opts = opts.get("stream_options")
        if (isinstance(stream_opts, dict) and stream_opts.get("include_usage")
                and not state.args.no_usage):
            data = {**base, "object": obj, "choices": [], "usage": usage}
            await resp.write(f"data: {json.dumps(data)}\n\n".encode())
        await resp.write(b"data: [DONE]\n\n")
        await resp.write_eof()
        finished = True
    except ConnectionResetError:
        pass  # client went away; counted below
    finally:
        state.active_streams -= 1
        if finished:
            state.completed_streams += 1
        else:
            state.cancelled_streams += 1
            log(f"stream cancelled {request.path}")
    return resp


def embed(text: str, dim: int) -> list[float]:
    """Deterministic pseudo-embedding derived from sha256 of the text."""
    out: list[float] = []
    counter = 0
    while len(out) < dim:
        digest = hashlib.sha256(f"{counter}:{text}".encode()).digest()
        out.extend(round(b / 255.0 * 2 - 1, 6) for b in digest)
        counter += 1
    return out[:dim]


async def handle_embeddings(request: web.Request) -> web.Response:
    state = request.app[STATE]
    body = json_body(request)
    if body is None:
        return error_reply(request, 400, "body must be a JSON object", "invalid_request_error")
    state.completions += 1
    if state.args.crash_after is not None and state.completions > state.args.crash_after:
        crash()
    raw_input = body.get("input", "")
    inputs = raw_input if isinstance(raw_input, list) else [raw_input]
    texts = [x if isinstance(x, str) else json.dumps(x) for x in inputs]
    data = [
        {"object": "embedding", "index": i, "embedding": embed(t, state.args.embedding_dim)}
        for i, t in enumerate(texts)
    ]
    tokens = sum(len(t.split()) for t in texts)
    return json_reply(
        request,
        {
            "object": "list",
            "data": data,
            "model": body.get("model"),
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
        },
    )


async def handle_other(request: web.Request) -> web.Response:
    """Any other POST: describe what arrived so tests can check the proxying."""
    content_type = request.headers.get("Content-Type", "")
    model: Any = None
    if content_type.startswith("multipart/"):
        model = multipart_field(request, "model")
    else:
        body = json_body(request)
        model = body.get("model") if body else None
    return json_reply(
        request,
        {
            "path": request.path,
            "model": model,
            "content_type": content_type,
            "body_len": len(request["raw"]),
        },
    )


def make_app(args: argparse.Namespace) -> web.Application:
    app = web.Application(middlewares=[common_middleware], client_max_size=64 * 1024**2)
    app[STATE] = State(args)
    app.router.add_get("/health", handle_health)
    app.router.add_get("/stats", handle_stats)
    app.router.add_post("/release", handle_release)
    app.router.add_get("/v1/models", handle_models)
    app.router.add_post("/v1/chat/completions", handle_completion)
    app.router.add_post("/v1/completions", handle_completion)
    app.router.add_post("/v1/embeddings", handle_embeddings)
    app.router.add_post("/tokenize", handle_other)
    app.router.add_post("/detokenize", handle_other)
    app.router.add_post("/v1/{tail:.*}", handle_other)
    return app


async def announce_ready(state: State) -> None:
    if state.args.never_ready:
        return
    await asyncio.sleep(max(0.0, state.ready_at - time.monotonic()))
    log("fake engine ready")


async def serve(args: argparse.Namespace) -> int:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGINT, stop.set)
    if not args.ignore_sigterm:
        loop.add_signal_handler(signal.SIGTERM, stop.set)

    if args.wait_signal:  # "loading" until the test says so: port closed, SIGTERM works
        released = asyncio.Event()
        loop.add_signal_handler(signal.SIGUSR1, released.set)
        if _RELEASED:
            released.set()
        waits = {asyncio.ensure_future(released.wait()), asyncio.ensure_future(stop.wait())}
        _, pending = await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        for task in pending:
            task.cancel()
        if stop.is_set():
            log("fake engine stopping")
            return 0

    if args.start_delay > 0:  # "loading": port closed, but SIGTERM still works
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), args.start_delay)
        if stop.is_set():
            log("fake engine stopping")
            return 0

    if args.headless:
        return await join_master(args, stop)
    app = make_app(args)
    state = app[STATE]
    master = None
    if args.nnodes > 1:
        master = await asyncio.start_server(
            lambda r, w: worker_connected(state, r, w), args.master_addr, args.master_port,
            reuse_address=True)
        log(f"fake engine head: master listening on {args.master_addr}:{args.master_port}")
    runner = web.AppRunner(app, handler_cancellation=True, shutdown_timeout=0.2, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, args.host, args.port).start()
    state.ready_at = time.monotonic() + args.ready_delay
    ready_task = asyncio.create_task(announce_ready(state))
    await stop.wait()
    log("fake engine stopping")
    ready_task.cancel()
    if master is not None:
        master.close()
    await runner.cleanup()
    return 0


async def worker_connected(state: State, reader: asyncio.StreamReader,
                           writer: asyncio.StreamWriter) -> None:
    state.worker_joined = True
    log("fake engine head: worker joined")
    await reader.read()  # until the worker goes away
    log("fake engine head: worker left (serving on regardless)")
    writer.close()


async def join_master(args: argparse.Namespace, stop: asyncio.Event) -> int:
    """The headless worker: connect to the head's master port, then hold until stopped."""
    writer = None
    while writer is None and not stop.is_set():
        try:
            _, writer = await asyncio.open_connection(args.master_addr, args.master_port)
        except OSError:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 0.05)
    if writer is not None:
        log(f"fake engine worker: joined master {args.master_addr}:{args.master_port} "
            f"(VLLM_HOST_IP={os.environ.get('VLLM_HOST_IP')}, "
            f"NCCL_SOCKET_IFNAME={os.environ.get('NCCL_SOCKET_IFNAME')})")
    await stop.wait()
    log("fake engine stopping")
    if writer is not None:
        writer.close()
    return 0


_BALLAST: list[bytearray] = []  # --allocate-mb
_RELEASED: list[int] = []  # SIGUSR1 seen before the event loop took the signal over


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.while_exists and not os.path.exists(args.while_exists):  # the engine is mended
        args.exit_at_start = args.crash_after = args.fault = None
        args.never_ready = args.ignore_sigterm = False
    pid = os.getpid()
    if args.wait_signal:  # before the pid is published: a signal must never kill us
        signal.signal(signal.SIGUSR1, lambda *_: _RELEASED.append(1))
    if args.ignore_sigterm:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    if args.starts_file:
        with open(args.starts_file, "a", encoding="utf-8") as f:
            f.write(f"{pid}\n")
    log(f"fake engine pid={pid} port={args.port} starting")
    if args.allocate_mb:  # filled, not calloc'd: the pages are resident
        _BALLAST.append(bytearray(b"\x01") * (args.allocate_mb * 1024 * 1024))
    if args.load_log:
        with open(args.load_log, encoding="utf-8") as f:
            sys.stdout.write(f.read())
        sys.stdout.flush()
    if args.exit_at_start is not None:
        for line in ("loading weights...", "allocating KV cache...", "CUDA error: out of memory"):
            print(line, file=sys.stderr, flush=True)
        return args.exit_at_start
    return asyncio.run(serve(args))


if __name__ == "__main__":
    sys.exit(main())
