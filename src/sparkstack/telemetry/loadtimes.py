"""Measured start times, kept in the data directory across restarts.

The scheduler weighs an eviction by how long the evicted model takes to load again
(`scheduler/eviction.py`); a measured time beats the catalog's estimate (`load_seconds`).
The supervisor records each start that becomes ready; the next run reads them back.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

LOAD_TIMES_FILE = "load-times.json"


def read_load_times(data_dir: Path) -> dict[str, float]:
    """Model id → seconds its last start took; {} when nothing was measured (or unreadable)."""
    try:
        raw = json.loads((data_dir / LOAD_TIMES_FILE).read_text())
    except (OSError, ValueError):
        return {}
    if not isinstance(raw, dict):
        return {}
    return {str(k): float(v) for k, v in raw.items()
            if isinstance(v, int | float) and not isinstance(v, bool) and v > 0}


def record_load_time(data_dir: Path, model_id: str, seconds: float | None) -> None:
    """Remember how long `model_id`'s start took (a few hundred bytes, once per start)."""
    if not seconds or seconds <= 0:
        return
    times = read_load_times(data_dir)
    times[model_id] = round(seconds, 1)
    path = data_dir / LOAD_TIMES_FILE
    with contextlib.suppress(OSError):  # a read-only data dir costs only the estimate
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(times, indent=1, sort_keys=True))
        tmp.replace(path)
