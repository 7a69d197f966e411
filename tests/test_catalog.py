"""The built-in DGX Spark catalog carries every model of the original stack faithfully.

The facts come from the reference table in ../shared/reference/seed-catalog.md (beside
the repository in CI). Without it the per-row checks are skipped, but the checks that
need no table (every model present, lifecycle roles, shared flags, env and volumes) run
against the ids and roles written down here.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import pytest

from sparkstack.config import Config, Model, builtin_catalog, load_config
from sparkstack.engines import launch_spec

REFERENCE = Path(__file__).parents[2] / "shared" / "reference" / "seed-catalog.md"
DATA = "/srv/sparkstack-data"

MODEL_IDS = (
    "deepseek-r1-distill-qwen-14b", "deepseek-r1-distill-qwen-32b", "deepseek-ocr",
    "qwen3-next-80b-a3b-instruct-fp4", "qwen3-next-80b-a3b-thinking-fp4",
    "phi-4-multimodal-instruct-fp4", "phi-4-reasoning-plus-fp4", "nemotron-3-nano-30b-fp8",
    "glm-4.5-air-fp4", "glm-4.6v-flash-fp4", "glm-4.5-air-derestricted-fp4", "glm-4-9b-chat",
    "gpt-oss-20b", "gpt-oss-120b", "llama-3.3-70b-instruct-fp4", "llama-3.3-70b-joyous-fp4",
    "eurollm-22b-instruct-fp4", "mistral-nemo-instruct-2407", "nemotron-3-nano-30b-nvfp4",
    "qwen3-vl-32b-instruct-fp4", "qwen2.5-1.5b-instruct", "qwen2.5-vl-7b",
    "qwen3-coder-30b-a3b-instruct", "qwen2.5-coder-7b-instruct", "qwen-math",
    "qwen3-vl-30b-instruct", "qwen3-vl-30b-thinking-instruct",
)
UTILITY = "qwen2.5-1.5b-instruct"
EXCLUSIVE = "gpt-oss-120b"
DISABLED = {"nemotron-3-nano-30b-nvfp4"}
EXPERIMENTAL = {  # the original's deepseek and experimental compose files
    "deepseek-r1-distill-qwen-14b", "deepseek-r1-distill-qwen-32b", "deepseek-ocr",
    "qwen3-next-80b-a3b-instruct-fp4", "qwen3-next-80b-a3b-thinking-fp4",
    "phi-4-multimodal-instruct-fp4", "phi-4-reasoning-plus-fp4", "nemotron-3-nano-30b-fp8",
}

# The original's flags and env for every service that the template does not emit itself
# (--host/--port are ours; the API key is a per-run --api-key, never VLLM_API_KEY).
COMMON_FLAGS = [["--download-dir", "/models"], ["--disable-log-requests"],
                ["--disable-log-stats"]]
COMMON_ENV = {"HF_HOME": "/root/.cache/huggingface", "VLLM_NO_USAGE_STATS": "1",
              "VLLM_CONFIGURE_LOGGING": "0"}
COMMON_MOUNTS = {
    "/root/.cache/huggingface": "~/.cache/huggingface",
    "/models": f"{DATA}/models",
    "/root/.cache/flashinfer": f"{DATA}/cache/flashinfer",
    "/root/.cache/torch_extensions": f"{DATA}/cache/torch_extensions",
    "/tmp/torchinductor_root": f"{DATA}/cache/torchinductor",
}


# ---------------------------------------------------------------- the reference table


@dataclass(frozen=True)
class Row:
    id: str
    weights: str
    image: str
    ctx: int
    mem_frac: float
    flags: list[list[str]]  # [flag] or [flag, value], in order
    env: dict[str, str]
    status_notes: str
    compose: str

    @property
    def included_by_default(self) -> bool:
        return self.compose.endswith("(yes)")


def parse_flags(text: str) -> list[list[str]]:
    """`--a 1 --b --c x y` → [[--a, 1], [--b], [--c, "x y"]]: a value runs to the next
    flag, so the phi-4 chat template (which holds spaces) stays one argument."""
    groups = []
    for chunk in re.split(r"\s+(?=--)", text.strip()) if text.strip() else []:
        flag, _, value = chunk.partition(" ")
        groups.append([flag, value] if value else [flag])
    return groups


def parse_env(text: str) -> dict[str, str]:
    return dict(item.split("=", 1) for item in text.split(", ")) if text.strip() else {}


def parse_reference(path: Path) -> dict[str, Row]:
    rows = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.startswith("| ") or line.startswith(("| id ", "|---")):
            continue
        # Cells are split on " | ": the chat template's own pipes have no spaces around.
        cells = [c.strip() for c in line.strip()[1:-1].split(" | ")]
        assert len(cells) == 9, f"cannot read this reference row: {line[:80]}"
        row = Row(cells[0], cells[1], cells[2], int(cells[3]), float(cells[4]),
                  parse_flags(cells[5]), parse_env(cells[6]), cells[7], cells[8])
        rows[row.id] = row
    return rows


@pytest.fixture(scope="module")
def reference() -> dict[str, Row]:
    if not REFERENCE.exists():
        pytest.skip(f"reference table not found at {REFERENCE} (CI checks out ../shared)")
    return parse_reference(REFERENCE)


# ---------------------------------------------------------------- the catalog


@pytest.fixture(scope="module")
def catalog() -> Config:
    return load_config(builtin_catalog("dgx-spark"), env={"SPARKSTACK_DATA": DATA})


def argv_of(model: Model, tmp_path: Path) -> list[str]:
    return list(launch_spec(model, 8000, "KEY", tmp_path).argv)


def value_after(argv: list[str], flag: str) -> str:
    assert argv.count(flag) == 1, f"{flag} appears {argv.count(flag)} times in {argv}"
    return argv[argv.index(flag) + 1]


def assert_in_order(argv: list[str], groups: list[list[str]]) -> None:
    """Every flag appears after the previous one, immediately followed by its value."""
    position = 0
    for flag, *value in groups:
        assert flag in argv[position:], f"{flag} missing (or out of order) in {argv}"
        position = argv.index(flag, position) + 1
        if value:
            assert argv[position:position + 1] == value, (
                f"{flag} should be followed by {value[0]!r}, got {argv[position:position + 1]}")
            position += 1


def mounts(model: Model) -> dict[str, str]:
    """container path → host path (a trailing :ro/:rw is dropped)."""
    out = {}
    for volume in model.cfg.volumes:
        parts = volume.split(":")
        if parts[-1] in ("ro", "rw"):
            parts = parts[:-1]
        host, container = parts
        out[container] = host
    return out


# ---------------------------------------------------------------- checks without the table


def test_catalog_has_every_model_of_the_original_and_nothing_else(catalog):
    assert len(MODEL_IDS) == 27
    assert sorted(catalog.models) == sorted(MODEL_IDS)
    assert catalog.warnings == []


def test_reference_table_lists_the_same_models(reference):
    assert sorted(reference) == sorted(MODEL_IDS)


def test_top_level_settings(catalog):
    s = catalog.settings
    assert (s.listen, s.memory_gb, s.idle_ttl, s.busy_policy) == (
        "127.0.0.1:8009", "auto", 1200, "queue")


@pytest.mark.parametrize("model_id", MODEL_IDS)
def test_every_model_runs_vllm_in_docker_with_the_common_settings(catalog, model_id, tmp_path):
    model = catalog.models[model_id]
    cfg = model.cfg
    assert (cfg.engine, cfg.runtime, cfg.gpus, cfg.shm_size) == ("vllm", "docker", "all", "16g")
    assert cfg.health_timeout == 30 * 60
    assert cfg.memory_gb is None, "memory_gb is derived from gpu_memory_utilization"
    assert model.served_name == model_id
    assert cfg.notes, "every model says what it is for"
    argv = argv_of(model, tmp_path)
    assert value_after(argv, "--served-model-name") == model_id
    assert value_after(argv, "--api-key") == "KEY"
    assert_in_order(argv, COMMON_FLAGS)
    assert cfg.env.items() >= COMMON_ENV.items()
    assert "VLLM_API_KEY" not in cfg.env
    assert mounts(model).items() >= COMMON_MOUNTS.items()


def test_lifecycle_roles(catalog):
    assert [m.id for m in catalog.models.values() if m.cfg.pinned] == [UTILITY]
    assert [m.id for m in catalog.models.values() if m.cfg.exclusive] == [EXCLUSIVE]
    statuses = {m.id: m.cfg.status for m in catalog.models.values()}
    assert {i for i, s in statuses.items() if s == "disabled"} == DISABLED
    assert {i for i, s in statuses.items() if s == "experimental"} == EXPERIMENTAL


def test_every_model_fits_beside_the_utility_model_with_headroom(catalog):
    utility = catalog.models[UTILITY].cfg.gpu_memory_utilization or 0
    for m in catalog.models.values():
        if m.id not in (UTILITY, EXCLUSIVE):
            assert (m.cfg.gpu_memory_utilization or 0) + utility <= 0.9, m.id


def test_gpt_oss_models_mount_the_tiktoken_encodings(catalog):
    for model_id in ("gpt-oss-20b", "gpt-oss-120b"):
        model = catalog.models[model_id]
        assert f"{DATA}/encodings:/etc/encodings:ro" in model.cfg.volumes
        assert model.cfg.env["TIKTOKEN_ENCODINGS_BASE"] == "/etc/encodings"


def test_nemotron_nvfp4_mounts_the_reasoning_parser_plugin_it_loads(catalog, tmp_path):
    model = catalog.models["nemotron-3-nano-30b-nvfp4"]
    plugin = value_after(argv_of(model, tmp_path), "--reasoning-parser-plugin")
    assert mounts(model)[plugin] == f"{DATA}/plugins/nano_v3_reasoning_parser.py"


@pytest.mark.parametrize("model_id", MODEL_IDS)
def test_capabilities_follow_the_flags(catalog, model_id, tmp_path):
    model = catalog.models[model_id]
    caps = set(model.cfg.capabilities)
    assert "chat" in caps
    if "tools" in caps:
        assert "--enable-auto-tool-choice" in argv_of(model, tmp_path)
    if re.search(r"vl|ocr|multimodal|4\.6v", model_id):
        assert "vision" in caps
    if re.search(r"thinking|r1|reasoning|gpt-oss", model_id):
        assert "reasoning" in caps


# ---------------------------------------------------------------- checks against the table


@pytest.mark.parametrize("model_id", MODEL_IDS)
def test_model_matches_the_reference_row(catalog, reference, model_id, tmp_path):
    row = reference[model_id]
    model = catalog.models[model_id]
    cfg = model.cfg
    assert (cfg.image, cfg.weights) == (row.image, row.weights)
    assert (cfg.max_model_len, cfg.gpu_memory_utilization) == (row.ctx, row.mem_frac)

    argv = argv_of(model, tmp_path)
    head = (["serve", "--model", row.weights] if row.image.startswith("avarok/")
            else ["vllm", "serve", row.weights])
    assert argv[:3] == head
    assert value_after(argv, "--served-model-name") == row.id
    assert float(value_after(argv, "--gpu-memory-utilization")) == row.mem_frac
    assert value_after(argv, "--max-model-len") == str(row.ctx)
    assert_in_order(argv, COMMON_FLAGS + row.flags)
    assert cfg.env.items() >= (COMMON_ENV | row.env).items()


@pytest.mark.parametrize("model_id", MODEL_IDS)
def test_status_and_notes_follow_the_reference(catalog, reference, model_id):
    row = reference[model_id]
    cfg = catalog.models[model_id].cfg
    label, _, text = row.status_notes.partition(": ")
    if label in ("disabled", "experimental"):
        expected = label
    else:
        expected = "stable" if row.included_by_default else "experimental"
    assert cfg.status == expected
    assert cfg.pinned == (label == "utility lane")
    assert cfg.exclusive == (label == "exclusive")
    if row.status_notes:
        note = text if label in ("note", "disabled", "experimental", "exclusive") else (
            row.status_notes)
        assert note in cfg.notes
