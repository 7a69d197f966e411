"""The simulated machine: the dgx-spark catalog's models on a DGX Spark's 121 GB budget.

Sizes are the catalog's: each model holds its `gpu_memory_utilization` of the machine's
total memory (a GB10 reports 121.7 GiB). Start times are estimates (below), declared to
the scheduler as each model's `load_seconds`, as a catalog entry would declare them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sparkstack.config import Config, builtin_catalog, load_config

TOTAL_GB = 121.7  # what a GB10 reports: a model's memory is its fraction of this
BUDGET_GB = 121.0
STOP_S = 5.0  # a clean vLLM stop takes up to ~10 s (SPEC 10b)

# Warm-cache start times (s): the second start onwards, compile caches mounted. Estimated,
# not measured, as 40 s (container, imports, engine init, KV-cache profiling) + the
# weights at 0.4 GB/s (1.2 GB/s with --load-format fastsafetensors) + 50 s of
# torch.compile and CUDA-graph capture (none with --enforce-eager). SPEC 10b reports 1-20
# min for cold starts; these are the quicker, usual case. The scheduler replaces them by
# measured ones as soon as a model has started once.
LOAD_SECONDS: dict[str, float] = {
    "qwen2.5-1.5b-instruct": 100,  # 3 GB bf16
    "gpt-oss-20b": 100,  # 13 GB MXFP4, fastsafetensors
    "gpt-oss-120b": 140,  # 61 GB MXFP4, fastsafetensors
    "qwen3-coder-30b-a3b-instruct": 85,  # 17 GB FP4, eager
    "qwen2.5-coder-7b-instruct": 130,  # 15 GB bf16
    "qwen3-vl-32b-instruct-fp4": 110,  # 20 GB NVFP4
    "qwen3-vl-30b-instruct": 105,  # 17 GB AWQ, fastsafetensors
    "qwen3-vl-30b-thinking-instruct": 105,
    "qwen2.5-vl-7b": 105,  # 7 GB AWQ
    "qwen-math": 100,  # 3 GB bf16
    "mistral-nemo-instruct-2407": 150,  # 24 GB bf16
    "glm-4.5-air-fp4": 245,  # 62 GB NVFP4
    "glm-4.5-air-derestricted-fp4": 245,
    "glm-4.6v-flash-fp4": 110,  # 7 GB NVFP4
    "glm-4-9b-chat": 135,  # 19 GB bf16
    "llama-3.3-70b-instruct-fp4": 195,  # 42 GB NVFP4
    "llama-3.3-70b-joyous-fp4": 195,
    "eurollm-22b-instruct-fp4": 125,  # 14 GB NVFP4
    "deepseek-r1-distill-qwen-14b": 115,  # 30 GB bf16, eager
    "deepseek-r1-distill-qwen-32b": 205,  # 66 GB bf16, eager
    "deepseek-ocr": 105,  # 7 GB bf16
    "qwen3-next-80b-a3b-instruct-fp4": 155,  # 45 GB NVFP4, eager
    "qwen3-next-80b-a3b-thinking-fp4": 155,
}
DEFAULT_LOAD_S = 120.0  # a catalog model missing above

# The catalog has no embedding model (docs/models.md: add your own). The RAG traces use
# the entry a user would add: Qwen3-Embedding-0.6B on vLLM at 0.08 (9.7 GB), which fits
# beside the utility model and any 0.82 model.
EMBED = "qwen3-embedding-0.6b"
EXTRA: dict[str, dict[str, Any]] = {EMBED: {"fraction": 0.08, "load_s": 60.0}}

UTILITY = "qwen2.5-1.5b-instruct"


@dataclass(frozen=True)
class SimModel:
    id: str
    memory_gb: float
    load_s: float
    pinned: bool = False
    exclusive: bool = False
    chat: bool = True  # serves chat requests (may stand in for another model)
    stand_ins: str | tuple[str, ...] = ()  # the catalog's `stand_ins` ("any" or ids)


def catalog_models() -> dict[str, SimModel]:
    """Every enabled model of the dgx-spark catalog, plus the embedding model."""
    cfg = load_config(builtin_catalog("dgx-spark"), env={"HOME": "/nonexistent"})
    out: dict[str, SimModel] = {}
    for m in cfg.models.values():
        if not m.enabled or not m.cfg.gpu_memory_utilization:
            continue
        stand = m.cfg.stand_ins
        out[m.id] = SimModel(m.id, round(m.cfg.gpu_memory_utilization * TOTAL_GB, 1),
                             LOAD_SECONDS.get(m.id, DEFAULT_LOAD_S), m.cfg.pinned,
                             m.cfg.exclusive, "chat" in m.cfg.capabilities,
                             stand if isinstance(stand, str) else tuple(stand))
    for mid, x in EXTRA.items():
        out[mid] = SimModel(mid, round(x["fraction"] * TOTAL_GB, 1), x["load_s"], chat=False)
    return out


def sim_config(models: dict[str, SimModel], settings: dict[str, Any], pinned: bool = True,
               residency_factor: float | None = None,
               residency_cap: float | None = None) -> Config:
    """A config of `models` (engine `command` only: nothing is ever run) with `settings`
    at the top level; `pinned` False drops every pin (a stack without that notion);
    `residency_factor` sets each model's min_residency to that share of its load time
    (at most `residency_cap` s)."""
    lines = [f"memory_gb: {BUDGET_GB}"] + [f"{k}: {v}" for k, v in settings.items()]
    lines.append("models:")
    for m in models.values():
        lines += [f"  {m.id}:", "    command: [engine]", f"    memory_gb: {m.memory_gb}",
                  f"    load_seconds: {m.load_s}"]
        if m.pinned and pinned:
            lines.append("    pinned: true")
        if m.exclusive:
            lines.append("    exclusive: true")
        if m.stand_ins:
            listed = m.stand_ins if isinstance(m.stand_ins, str) else list(m.stand_ins)
            lines.append(f"    stand_ins: {listed}")
        if residency_factor is not None:
            window = residency_factor * m.load_s
            if residency_cap is not None:
                window = min(window, residency_cap)
            lines.append(f"    min_residency: {window:g}")
    return load_config(text="\n".join(lines), env={})
