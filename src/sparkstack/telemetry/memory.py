"""How much memory the machine has and uses (SPEC 10b).

On unified-memory machines (DGX Spark / GB10) NVML reports no device memory, so the
truth is /proc/meminfo: total = MemTotal, used = MemTotal - MemAvailable. On discrete
GPUs NVML's device total is the budget.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path

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
