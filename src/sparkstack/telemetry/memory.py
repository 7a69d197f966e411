"""How much memory the machine has and uses (SPEC 10b).

On unified-memory machines (DGX Spark / GB10) NVML reports no device memory, so the
truth is /proc/meminfo: total = MemTotal, used = MemTotal - MemAvailable. On discrete
GPUs NVML's device total is the budget.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

GIB = 1024**3


@dataclass(frozen=True)
class MemoryInfo:
    total_gb: float
    available_gb: float
    source: str


def meminfo(path: Path = Path("/proc/meminfo")) -> MemoryInfo:
    values: dict[str, int] = {}
    for line in path.read_text().splitlines():
        key, _, rest = line.partition(":")
        parts = rest.split()
        if parts:
            values[key] = int(parts[0]) * 1024
    total = values.get("MemTotal", 0)
    return MemoryInfo(total / GIB, values.get("MemAvailable", total) / GIB, "/proc/meminfo")


def nvml_memory() -> MemoryInfo | None:
    """Total and free memory of all NVIDIA devices, or None (no NVML, or GB10's 'Not Supported')."""
    try:
        import pynvml  # type: ignore[import-not-found]
    except ImportError:
        return None
    try:
        pynvml.nvmlInit()
    except Exception:
        return None
    try:
        total = free = 0
        for i in range(pynvml.nvmlDeviceGetCount()):
            info = pynvml.nvmlDeviceGetMemoryInfo(pynvml.nvmlDeviceGetHandleByIndex(i))
            total += info.total
            free += info.free
        return MemoryInfo(total / GIB, free / GIB, "nvml") if total else None
    except Exception:
        return None
    finally:
        with contextlib.suppress(Exception):
            pynvml.nvmlShutdown()


def machine_total_gb() -> float:
    """What a memory fraction (vLLM's --gpu-memory-utilization) is a fraction of."""
    return (nvml_memory() or meminfo()).total_gb


def detect_budget(reserve_gb: float) -> tuple[float, str]:
    """The memory budget for engines when `memory_gb: auto`: device memory if NVML reports
    it, else (CPU or unified memory) total RAM, minus the reserve."""
    info = nvml_memory() or meminfo()
    budget = max(0.5, info.total_gb - reserve_gb)
    note = f"{info.total_gb:.1f} GB total ({info.source}) - {reserve_gb:g} GB reserve"
    return round(budget, 1), note


# ------------------------------------------------------------------ measured, per model
# What each running model really uses, beside what it declares (`memory_gb`):
# - a process engine: the resident memory of its process tree (/proc), plus what NVML
#   reports for those processes on a discrete GPU;
# - a container: its memory from the Docker API (usage less inactive page cache), plus
#   NVML per process likewise;
# - on unified memory (GB10: NVML runs but reports no device memory, and CUDA memory is
#   in no process's RSS) also the host's used memory (MemTotal - MemAvailable) across the
#   load: used after it became ready minus used before it started.
# The peak per model is kept in `memory.json` in the data directory, so `sparkstack
# check` can compare declarations with reality after the gateway has gone.

PEAKS_FILE = "memory.json"
OFF_BY = 0.10  # a declaration further than this from the measured peak is reported


@dataclass(frozen=True)
class Measured:
    gb: float
    peak_gb: float
    source: str  # rss | container | +nvml | host-delta


def host_used_bytes(path: Path = Path("/proc/meminfo")) -> int:
    info = meminfo(path)
    return int((info.total_gb - info.available_gb) * GIB)


def process_tree(pid: int) -> list[int]:
    """The process and all its descendants (via /proc/<pid>/task/*/children)."""
    found, todo = [], [pid]
    while todo:
        p = todo.pop()
        found.append(p)
        for children in Path(f"/proc/{p}/task").glob("*/children"):
            with contextlib.suppress(OSError, ValueError):
                todo.extend(int(c) for c in children.read_text().split())
    return found


_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def rss_bytes(pids: list[int]) -> int:
    total = 0
    for pid in pids:
        with contextlib.suppress(OSError, ValueError, IndexError):
            total += int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * _PAGE
    return total


class Nvml:
    """NVML's per-process memory, when nvidia-ml-py is importable and a GPU answers."""

    def __init__(self) -> None:
        self.ok = False
        self.unified = False
        try:
            import pynvml  # type: ignore[import-not-found]

            pynvml.nvmlInit()
        except Exception:
            return
        self._nvml = pynvml
        self.ok = True
        # GB10: NVML works but has no device memory to report ("Not Supported").
        self.unified = nvml_memory() is None

    def per_process(self) -> dict[int, int]:
        if not self.ok:
            return {}
        nv = self._nvml
        used: dict[int, int] = {}
        with contextlib.suppress(Exception):
            for i in range(nv.nvmlDeviceGetCount()):
                handle = nv.nvmlDeviceGetHandleByIndex(i)
                for proc in nv.nvmlDeviceGetComputeRunningProcesses(handle):
                    if proc.usedGpuMemory:  # None where NVML cannot tell (GB10)
                        used[proc.pid] = used.get(proc.pid, 0) + proc.usedGpuMemory
        return used


async def container_memory(container: Any) -> tuple[int, int | None]:
    """(bytes used less inactive page cache, the container's main pid) from the Docker API."""
    stats = await container.stats(stream=False)
    stats = stats[0] if isinstance(stats, list) else stats
    mem = stats.get("memory_stats") or {}
    detail = mem.get("stats") or {}
    cache = detail.get("inactive_file", detail.get("total_inactive_file", 0))
    pid = None
    with contextlib.suppress(Exception):
        pid = (await container.show())["State"]["Pid"] or None
    return max(0, int(mem.get("usage", 0)) - int(cache)), pid


class MemoryMonitor:
    """Measures running engines and keeps each model's peak (persisted)."""

    def __init__(self, data_dir: Path | None) -> None:
        self.path = data_dir / PEAKS_FILE if data_dir else None
        self.current: dict[str, Measured] = {}
        self.peaks: dict[str, dict[str, Any]] = load_peaks(self.path) if self.path else {}
        self._before: dict[str, int] = {}
        self._delta: dict[str, int] = {}
        self._nvml: Nvml | None = None

    async def start(self) -> None:
        """Look for NVML once (in a thread: initialising it can take a while)."""
        if self._nvml is None:
            self._nvml = await asyncio.to_thread(Nvml)

    def load_started(self, model_id: str) -> None:
        """Before an engine starts (on unified memory, the baseline of the load's delta)."""
        self._delta.pop(model_id, None)
        if self._nvml is not None and self._nvml.unified:
            with contextlib.suppress(OSError):
                self._before[model_id] = host_used_bytes()

    def load_finished(self, model_id: str) -> None:
        before = self._before.pop(model_id, None)
        if before is not None:
            with contextlib.suppress(OSError):
                self._delta[model_id] = max(0, host_used_bytes() - before)

    def stopped(self, model_id: str) -> None:
        self.current.pop(model_id, None)
        self._before.pop(model_id, None)

    async def sample(self, engines: dict[str, Any], declared: dict[str, float]) -> set[str]:
        """Measure every engine given (model id → runtime engine); the ids whose measure
        moved by more than 1% (or appeared)."""
        await self.start()
        assert self._nvml is not None
        gpu = await asyncio.to_thread(self._nvml.per_process) if self._nvml.ok else {}
        results = await asyncio.gather(
            *(self._measure(engine, gpu, self._delta.get(mid)) for mid, engine in engines.items()),
            return_exceptions=True)
        changed = set()
        for mid, result in zip(engines, results, strict=True):
            if isinstance(result, BaseException) or result is None:
                continue
            used, source = result
            gb = round(used / GIB, 3)
            peak = max(gb, self.current[mid].peak_gb if mid in self.current else 0.0)
            old = self.current.get(mid)
            self.current[mid] = Measured(gb, peak, source)
            if old is None or abs(old.gb - gb) > 0.01 * max(gb, 0.001):
                changed.add(mid)
            self._note_peak(mid, peak, source, declared.get(mid))
        return changed

    async def _measure(self, engine: Any, gpu: dict[int, int],
                       delta: int | None) -> tuple[int, str] | None:
        container = getattr(engine, "container", None)
        proc = getattr(engine, "proc", None)
        if container is not None:
            used, pid = await container_memory(container)
            source = "container"
            pids = await asyncio.to_thread(process_tree, pid) if pid else []
        elif proc is not None and proc.returncode is None:
            pids = await asyncio.to_thread(process_tree, proc.pid)
            used, source = await asyncio.to_thread(rss_bytes, pids), "rss"
        else:
            return None
        on_gpu = sum(gpu.get(p, 0) for p in pids)
        if on_gpu:
            used, source = used + on_gpu, source + "+nvml"
        if delta is not None and delta > used:
            used, source = delta, "host-delta"
        return used, source

    def _note_peak(self, model_id: str, peak_gb: float, source: str,
                   declared: float | None) -> None:
        old = self.peaks.get(model_id)
        if old is not None and old.get("peak_gb", 0) >= peak_gb * 0.99:
            return
        self.peaks[model_id] = {"peak_gb": peak_gb, "declared_gb": declared, "source": source,
                                "at": round(time.time())}
        if self.path is not None:
            with contextlib.suppress(OSError):
                tmp = self.path.with_suffix(".tmp")
                self.path.parent.mkdir(parents=True, exist_ok=True)
                tmp.write_text(json.dumps(self.peaks, indent=1, sort_keys=True))
                tmp.replace(self.path)


def load_peaks(path: Path) -> dict[str, dict[str, Any]]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def declaration_findings(declared: dict[str, float], data_dir: Path) -> list[str]:
    """Models whose declared memory_gb is more than 10% off their measured peak."""
    found = []
    for mid, entry in sorted(load_peaks(data_dir / PEAKS_FILE).items()):
        want = declared.get(mid)
        peak = entry.get("peak_gb")
        if not want or not isinstance(peak, int | float) or abs(peak - want) <= OFF_BY * want:
            continue
        hint = ("raise it, or the budget is overrun" if peak > want
                else "lower it, and more fits beside it")
        found.append(f"model {mid!r} declares memory_gb: {want:g} but used up to {peak:.2f} GB "
                     f"({entry.get('source', '?')}): {hint}")
    return found
