"""GC pause probe, loaded into the gateway under test through PYTHONPATH (src/ untouched).

With BENCH_GC_LOG set, every collection of generation 1 or 2, and any collection that
pauses 1 ms or more, appends `<time.time()> <generation> <pause ms>` to that file, so
the harness can tell event-loop stalls caused by the collector from anything else.
The callback costs about a microsecond per collection.
The variable is removed at once, so the engines the gateway spawns do not log.
"""

import gc
import os
import time

_path = os.environ.pop("BENCH_GC_LOG", None)
if _path:
    _out = open(_path, "a", buffering=1)  # noqa: SIM115 - open for the process's life
    _start = [0.0]

    def _probe(phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            _start[0] = time.perf_counter()
        else:
            pause = (time.perf_counter() - _start[0]) * 1000
            if info["generation"] or pause >= 1.0:
                _out.write(f"{time.time():.4f} {info['generation']} {pause:.3f}\n")

    gc.callbacks.append(_probe)
