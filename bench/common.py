"""Small helpers shared by the harness, the load generator and the report."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import statistics
import subprocess
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, TextIO

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"
RESULTS = BENCH / "results"
CLK_TCK = os.sysconf("SC_CLK_TCK")


# ---------------------------------------------------------------- statistics


def percentile(values: Sequence[float], q: float) -> float:
    """Linear-interpolated percentile (q in 0..100) of already sorted values."""
    if not values:
        return float("nan")
    k = (len(values) - 1) * q / 100
    lo = int(k)
    hi = min(lo + 1, len(values) - 1)
    return values[lo] + (values[hi] - values[lo]) * (k - lo)


def spread(runs: Iterable[float | None]) -> dict[str, Any]:
    """Median and min–max of repeated runs: the shape every figure is reported in."""
    vals = [float(v) for v in runs if v is not None]
    if not vals:
        return {"median": None, "min": None, "max": None, "runs": []}
    return {"median": statistics.median(vals), "min": min(vals), "max": max(vals),
            "runs": vals}


# ---------------------------------------------------------------- /proc


def cpu_seconds(pid: int) -> float:
    """utime + stime of one process (not its children), in seconds."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def children(pid: int) -> list[int]:
    out: list[int] = []
    with contextlib.suppress(OSError):
        for task in Path(f"/proc/{pid}/task").iterdir():
            with contextlib.suppress(OSError):
                out += [int(c) for c in (task / "children").read_text().split()]
    return out


def descendants(pid: int) -> list[int]:
    found: list[int] = []
    todo = children(pid)
    while todo:
        p = todo.pop()
        found.append(p)
        todo += children(p)
    return found


def start_ticks(pid: int) -> int | None:
    """When the process started (clock ticks since boot): tells a pid from its reuse."""
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19])
    except (OSError, IndexError, ValueError):
        return None


def alive(pid: int, started: int | None = None) -> bool:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return False
    return fields[0] != "Z" and (started is None or int(fields[19]) == started)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def wait_port(port: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        if time.monotonic() > deadline:
            raise TimeoutError(f"nothing listens on 127.0.0.1:{port} after {timeout:g} s")
        time.sleep(0.02)


def cpu_sets() -> tuple[set[int] | None, set[int] | None]:
    """(proxy CPUs, harness CPUs): the proxy under test gets CPU 0 to itself; the stub and
    the load generators share the rest, the same for every target. None: do not pin."""
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        return None, None
    return {cpus[0]}, set(cpus[1:])


# ---------------------------------------------------------------- processes


class Procs:
    """Every process the harness starts, so each one ends, whatever happens (error, Ctrl-C).

    Children get a session of their own (a terminal's Ctrl-C reaches only us; we end
    them in order). Engines the gateway spawned are ended through the gateway, and any
    that outlive it are ended by pid.
    """

    def __init__(self) -> None:
        self.procs: list[tuple[str, subprocess.Popen[bytes]]] = []
        self.logs: list[TextIO] = []
        self.known: set[tuple[int, int | None]] = set()  # descendants seen: (pid, start)

    def spawn(self, name: str, argv: Sequence[str], *, log: Path | None = None,
              cpus: set[int] | None = None, env: dict[str, str] | None = None,
              stdout: int | None = None) -> subprocess.Popen[bytes]:
        out: Any = stdout
        if out is None:
            if log is not None:
                f = log.open("a")
                self.logs.append(f)
                out = f
            else:
                out = subprocess.DEVNULL

        def pin() -> None:
            if cpus:
                os.sched_setaffinity(0, cpus)

        p = subprocess.Popen(
            list(argv), stdin=subprocess.DEVNULL, stdout=out,
            stderr=subprocess.STDOUT if log is not None else None,
            start_new_session=True, preexec_fn=pin, env=env, cwd=ROOT,
        )
        self.procs.append((name, p))
        return p

    def remember_descendants(self, p: subprocess.Popen[bytes]) -> None:
        self.known.update((d, start_ticks(d)) for d in descendants(p.pid))

    def stop(self, p: subprocess.Popen[bytes], grace: float = 10.0) -> None:
        """SIGTERM (a gateway then stops its engines), SIGKILL after `grace`."""
        if p.poll() is None:
            self.remember_descendants(p)
            with contextlib.suppress(ProcessLookupError):
                p.send_signal(signal.SIGTERM)
            try:
                p.wait(grace)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(p.pid, signal.SIGKILL)  # its own group: it and its workers
                p.wait(5)
        self.procs = [(n, q) for n, q in self.procs if q is not p]
        self._reap_known()

    def _reap_known(self) -> None:
        """End what the gateway should have ended, by pid (checked against reuse)."""
        for pid, started in self.known:
            if alive(pid, started):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + 3
        while any(alive(*k) for k in self.known) and time.monotonic() < deadline:
            time.sleep(0.05)
        for pid, started in self.known:
            if alive(pid, started):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        self.known = {k for k in self.known if alive(*k)}

    def close(self) -> None:
        # Newest first: load generators before the gateway, the gateway before nginx.
        for _, p in reversed(list(self.procs)):
            with contextlib.suppress(Exception):
                self.stop(p, grace=5)
        self._reap_known()
        for f in self.logs:
            f.close()


def pin(pid: int, cpus: set[int] | None) -> None:
    """Move every thread of a running process to `cpus`."""
    if not cpus:
        return
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(OSError):
            os.sched_setaffinity(int(task.name), cpus)


def _machine_cpu() -> tuple[int, int]:
    """(busy, steal) of the whole machine in clock ticks; busy counts irq and softirq
    time too, which the kernel also charges to the processes it ran on behalf of."""
    f = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    return f[0] + f[1] + f[2] + f[5] + f[6], f[7]


class Meter:
    """CPU the machine spent outside the processes under test during one run, and
    hypervisor steal: interference that explains an outlier (other jobs on a shared box)."""

    def __init__(self, pids: Iterable[int]) -> None:
        self.pids = [p for p in pids if p]
        self.t0 = time.monotonic()
        self.busy0, self.steal0 = _machine_cpu()
        self.ours0 = self._ours()

    def _ours(self) -> float:
        total = 0.0
        for pid in self.pids:
            with contextlib.suppress(OSError):
                total += cpu_seconds(pid)
        import resource

        for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN):  # wrk, the generator
            ru = resource.getrusage(who)
            total += ru.ru_utime + ru.ru_stime
        return total

    def stop(self) -> dict[str, float]:
        wall = max(time.monotonic() - self.t0, 1e-9)
        busy, steal = _machine_cpu()
        foreign = (busy - self.busy0) / CLK_TCK - (self._ours() - self.ours0)
        return {"foreign_cores": round(foreign / wall, 3),
                "steal_cores": round((steal - self.steal0) / CLK_TCK / wall, 3)}
