"""How far an engine's load has got, read from its own log lines.

Engines say what they are doing while they load: vLLM (and SGLang) print tqdm bars for
checkpoint shards and CUDA-graph capture and INFO lines around torch.compile and the KV
cache; llama.cpp's llama-server prints a line per stage. `ProgressParser` turns those
lines into a phase and, where the engine gives one, the percentage of that phase.

A tqdm bar rewrites its line with carriage returns: a line may hold many updates
("\\r"-separated); the last one wins. Under Docker the daemon passes a line on only at
its newline, so a bar's percentages arrive when it completes; the phases still arrive
live (docs/monitoring.md).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

# (pattern, phase, percent): percent None means "unknown", -1 means "from group 1".
_RAW: list[tuple[str, str, float | None]] = [
    # ---- vLLM / SGLang
    (r"(?:Fetching \d+ files|Downloading)\S*:?\s+(\d+)%", "download", -1),
    (r"Loading (?:\w+ )?checkpoint shards:\s+(\d+)%", "weights", -1),
    (r"Starting to load model|Load weight begin|Using model weights format", "weights", None),
    (r"Loading weights took|Model loading took|Load weight end", "weights", 100.0),
    (r"Capturing CUDA graphs?[^:]*:\s+(\d+)%|Capture cuda graph[^:]*:\s+(\d+)%",
     "cuda-graphs", -1),
    (r"Graph capturing finished|Capture cuda graph end", "cuda-graphs", 100.0),
    (r"torch\.compile takes", "compile", 100.0),
    # Not "Enforce eager set, disabling torch.compile": that run compiles nothing.
    (r"(?<!disabling )torch\.compile|Dynamo bytecode transform|Compiling a graph", "compile",
     None),
    (r"Memory profiling takes|Available KV cache memory|[GC]PU KV cache size"
     r"|KV Cache is allocated", "kv-cache", None),
    (r"Capture cuda graph begin|Capturing CUDA graph", "cuda-graphs", None),
    (r"init engine \(profile, create kv cache, warmup model\) took", "warmup", 100.0),
    (r"Starting vLLM (?:API )?server|Started server process|Waiting for application startup",
     "server", None),
    (r"Application startup complete|The server is fired up", "server", 100.0),
    # ---- llama.cpp (llama-server): recent builds and older ones
    (r"load_model: loading model|llama_model_loader: loaded meta data|load_tensors: loading",
     "weights", None),
    (r"llama threadpool init|llama_context: constructing|llama_kv_cache", "kv-cache", None),
    (r"warming up the model", "warmup", None),
    (r"load_model: initializing|initializing slots", "slots", None),
    (r"llama_server: model loaded|main: model loaded", "server", None),
    (r"server is listening on|llama_server: listening on", "server", 100.0),
]
_RULES = [(re.compile(p, re.I), phase, percent) for p, phase, percent in _RAW]


@dataclass
class ProgressParser:
    phase: str = "starting"
    percent: float | None = None

    def feed(self, line: str) -> bool:
        """Read one log line; True when the phase or its percentage changed."""
        changed = False
        for piece in line.split("\r"):
            if piece.strip():
                changed = self._piece(piece) or changed
        return changed

    def _piece(self, text: str) -> bool:
        for pattern, phase, percent in _RULES:
            m = pattern.search(text)
            if m is None:
                continue
            if percent == -1:
                digits = next((g for g in m.groups() if g is not None), None)
                value: float | None = float(digits) if digits is not None else None
            else:
                value = percent
            if (phase, value) == (self.phase, self.percent):
                return False
            self.phase, self.percent = phase, value
            return True
        return False


def parse_log(lines: list[str]) -> list[tuple[str, float | None]]:
    """Every (phase, percent) step a log goes through (tests, and a log read afterwards)."""
    parser = ProgressParser()
    steps = []
    for line in lines:
        for piece in line.split("\r"):
            if parser.feed(piece):
                steps.append((parser.phase, parser.percent))
    return steps


def format_duration(seconds: float) -> str:
    """`42s`, `3m12s`, `1h05m`: how long a load has run, for people."""
    s = int(seconds)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


def describe(phase: str | None, percent: float | None) -> str:
    """`45% (weights)`, `(compile)`."""
    if phase is None:
        return ""
    return (f"{percent:.0f}% " if percent is not None else "") + f"({phase})"
