"""The built-in DGX Spark catalog carries every model of the original stack faithfully:
its first release (tests/data/seed-catalog.md), the models of its later releases and
its commented-out services (tests/data/catalog-later.md), with the corrections this
catalog makes on purpose listed here, each with the reason.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import jinja2
import pytest

from sparkstack.config import TAGS, Config, Model, builtin_catalog, load_config
from sparkstack.engines import KEY_ENV, launch_spec

DATA_DIR = Path(__file__).with_name("data")
SEED = DATA_DIR / "seed-catalog.md"
LATER = DATA_DIR / "catalog-later.md"
DATA = "/srv/sparkstack-data"

SEED_IDS = (
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
# The original's commented-out services (part B), each with a word of the reason that
# its notes must carry.
COMMENTED_OUT = {
    "rimtalk-mini-v1-fp4": "memory", "kimi-linear-48b-a3b-instruct-fp4": "MLA",
    "step-audio-r1-fp4": "did not get", "nemotron-nano-12b-v2-vl": "does not yet work",
    "devstral-small-2-24b-instruct-fp4": "Mistral-based",
    "mistral-small-3.2-24b-instruct-fp4": "Mistral-based",
    "ministral-3-8b-instruct-fp4": "Mistral-based", "ministral-3-3b-reasoning-fp4":
    "Mistral-based", "ministral-3-8b-reasoning-fp4": "Mistral-based",
    "ministral-3-14b-reasoning-fp4": "Mistral-based",
    "ministral-3-14b-instruct-fp4": "Mistral-based",
}
UTILITY = "qwen2.5-1.5b-instruct"
EXCLUSIVE = {"gpt-oss-120b", "gemma4-31b", "qwen3.5-122b-a10b-int4-autoround",
             "jackrong-qwen3.5-35b-a3b-claude-4.6-opus-reasoning-distilled",
             "qwen3-coder-next-int4-autoround"}

# ---------------------------------------------------------------- deliberate changes
# The seed images, replaced by the ones images/ builds (docs/images.md).
IMAGE_FOR = {
    "avarok/vllm-dgx-spark:v11": "sparkstack/vllm-gb10:0.13.0",
    "avarok/vllm-dgx-spark:v11-tf5": "sparkstack/vllm-gb10-tf5:0.13.0",
    "christopherowen/vllm-dgx-spark:v12": "sparkstack/vllm-gb10-mxfp4:045293d",
    "nvcr.io/nvidia/vllm:25.10-py3": "nvcr.io/nvidia/vllm:25.10-py3",
    "vllm-node-mxfp4": "sparkstack/vllm-gb10-mxfp4:045293d",
    "vllm-node-tf5": "sparkstack/vllm-gb10-tf5-ngc:50cd567",
    "vllm-node-tf5-gemma4": "sparkstack/vllm-gb10-gemma4:50cd567-c472755",
    "vllm-node-mxfp4-qwen35": "sparkstack/vllm-gb10-qwen35:50cd567-eb981ae",
    "local/vllm-glm-4.7-flash-awq:tf5": "sparkstack/vllm-gb10-glm47:50cd567-eb981ae",
}
# The Qwen 3.5/3.6 models need a transformers that knows qwen3_5: the qwen35 image.
QWEN35_IMAGE = "sparkstack/vllm-gb10-qwen35:50cd567-eb981ae"
# Statuses corrected from the original's (catalog-later.md, part B, and the issue).
STATUS_FIX = {
    "nemotron-3-nano-30b-fp8": "disabled",  # its decoder returns empty strings
    "phi-4-multimodal-instruct-fp4": "disabled",  # emits garbage ("ousous...")
    "phi-4-reasoning-plus-fp4": "disabled",
    "qwen3-vl-30b-thinking-instruct": "experimental",  # AWQ weights + modelopt_fp4
}
# GPT-OSS runs the MXFP4 fork the later release built, with that release's environment.
GPT_OSS_ENV = {"VLLM_USE_FLASHINFER_MOE_MXFP4_MXFP8": "1", "FLASHINFER_NVCC_THREADS": "2"}
GPT_OSS_ENV_DROPPED = ("VLLM_USE_FLASHINFER_MXFP4_BF16_MOE",)

COMMON_ENV = {"HF_HOME": "/root/.cache/huggingface", "VLLM_NO_USAGE_STATS": "1",
              "VLLM_CONFIGURE_LOGGING": "1"}
COMMON_MOUNTS = {
    "/root/.cache/huggingface": "~/.cache/huggingface",
    "/models": f"{DATA}/models",
    "/root/.cache/flashinfer": f"{DATA}/cache/flashinfer",
    "/root/.cache/torch_extensions": f"{DATA}/cache/torch_extensions",
    "/tmp/torchinductor_root": f"{DATA}/cache/torchinductor",
    "/root/.cache/vllm": f"{DATA}/cache/vllm",
}
SEED_FLAGS = [["--download-dir", "/models"], ["--disable-log-requests"],
              ["--disable-log-stats"]]


# ---------------------------------------------------------------- the reference tables


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


def table_rows(text: str, columns: int) -> list[list[str]]:
    """The cells of every row of the markdown tables in `text` with that many columns."""
    rows = []
    for line in text.splitlines():
        if not line.startswith("| ") or line.startswith("|---"):
            continue
        # Cells are split on " | ": the chat template's own pipes have no spaces around.
        cells = [c.strip() for c in line.strip()[1:-1].split(" | ")]
        if len(cells) == columns and not cells[0].startswith("id"):
            rows.append(cells)
    return rows


def parse_seed(path: Path) -> dict[str, Row]:
    rows = {}
    for cells in table_rows(path.read_text(encoding="utf-8"), 9):
        row = Row(cells[0], cells[1], cells[2], int(cells[3]), float(cells[4]),
                  parse_flags(cells[5]), parse_env(cells[6]), cells[7], cells[8])
        rows[row.id] = row
    return rows


@dataclass(frozen=True)
class LaterRow:
    """A row of part A: the facts this test can read back reliably."""

    id: str
    weights: str
    image: str
    ctx: int
    mem_frac: float
    flags: str  # the cell as written (prose around the flags)
    env: str
    lifecycle: str
    status: str


def section(text: str, title: str) -> str:
    start = text.index(f"## {title}")
    end = text.find("\n## ", start + 1)
    return text[start:end if end != -1 else None]


def parse_later(path: Path) -> dict[str, LaterRow]:
    rows = {}
    for cells in table_rows(section(path.read_text(encoding="utf-8"), "A."), 10):
        model_id = cells[0].split(" / ")[0].strip()
        image = re.sub(r"\s*\(.*", "", cells[2]).split(" @")[0].strip("` ")
        ctx = int(re.findall(r"\d{4,}", cells[3])[-1])  # "compose auto; models.json N"
        mem = float(re.search(r"\d\.\d+", cells[4]).group())
        rows[model_id] = LaterRow(model_id, cells[1].split(" (")[0], image, ctx, mem,
                                  cells[5], cells[6], cells[7].split(" /")[0].strip(),
                                  cells[8])
    return rows


@pytest.fixture(scope="module")
def seed() -> dict[str, Row]:
    return parse_seed(SEED)


@pytest.fixture(scope="module")
def later() -> dict[str, LaterRow]:
    return parse_later(LATER)


LATER_IDS = tuple(parse_later(LATER))


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


def vllm_models(catalog: Config) -> list[Model]:
    return [m for m in catalog.models.values() if m.cfg.engine == "vllm"]


# ---------------------------------------------------------------- the whole catalog


def test_the_reference_data_is_complete():
    assert len(SEED_IDS) == 27
    assert sorted(parse_seed(SEED)) == sorted(SEED_IDS)
    assert len(LATER_IDS) == 15
    part_b = section(LATER.read_text(encoding="utf-8"), "B.")
    for model_id in COMMENTED_OUT:
        assert model_id in part_b


# Ours, not the original's: the original ran on one Spark.
TWO_SPARKS = {"gpt-oss-120b-tp2"}


def test_catalog_has_every_model_of_the_original_and_nothing_else(catalog):
    expected = {*SEED_IDS, *LATER_IDS, *COMMENTED_OUT}
    assert len(expected) == 27 + 15 + 11
    assert sorted(catalog.models) == sorted(expected | TWO_SPARKS)
    assert catalog.warnings == []


def test_the_sglang_utility_runs_its_command_without_the_images_entrypoint(catalog):
    assert catalog.models["qwen3.5-0.8b"].cfg.entrypoint == [], "as the original did"


def test_the_model_spanning_two_sparks_is_gpt_oss_120b_over_both(catalog):
    """On one Spark it is listed disabled, saying why; with a peer it is the same engine as
    gpt-oss-120b but for tensor parallel 2 and half the memory of each machine."""
    alone = catalog.models["gpt-oss-120b-tp2"]
    assert not alone.enabled and "needs two nodes" in alone.cfg.notes
    text = builtin_catalog("dgx-spark").read_text() + (
        "\nnode_name: spark-a\npeers: [{name: spark-b, url: 'http://127.0.0.1:1'}]\n")
    with_peer = load_config(text=text, env={"SPARKSTACK_DATA": DATA})
    tp2, one = with_peer.models["gpt-oss-120b-tp2"], with_peer.models["gpt-oss-120b"]
    assert tp2.enabled and tp2.span is not None and tp2.span.worker == "spark-b"
    assert (tp2.cfg.image, tp2.cfg.weights, tp2.cfg.env) == (one.cfg.image, one.cfg.weights,
                                                              one.cfg.env)
    assert [a for a in one.cfg.args if a not in tp2.cfg.args] == ["--tensor-parallel-size", "1"]
    assert tp2.cfg.gpu_memory_utilization == 0.5 and not tp2.cfg.exclusive


def test_top_level_settings(catalog):
    s = catalog.settings
    assert (s.listen, s.memory_gb, s.idle_ttl, s.busy_policy) == (
        "127.0.0.1:8009", "auto", 1200, "queue")


@pytest.mark.parametrize("model_id", [*SEED_IDS, *LATER_IDS, *COMMENTED_OUT])
def test_every_model_runs_in_docker_with_the_common_settings(catalog, model_id, tmp_path):
    model = catalog.models[model_id]
    cfg = model.cfg
    assert (cfg.runtime, cfg.gpus, cfg.shm_size[-1]) == ("docker", "all", "g")
    assert cfg.health_timeout >= 30 * 60
    assert cfg.memory_gb is None, "memory_gb is derived from gpu_memory_utilization"
    assert model.served_name == model_id
    assert cfg.notes, "every model says what it is for"
    assert cfg.tags and set(cfg.tags) <= set(TAGS)
    assert cfg.requires.min_driver == "580", "every image here is built for CUDA 13"
    spec = launch_spec(model, 8000, "KEY", tmp_path)
    argv = list(spec.argv)
    assert value_after(argv, "--served-model-name") == model_id
    assert "VLLM_API_KEY" not in cfg.env
    # The run's key: in the environment where the engine reads it (a command line is
    # visible to every local user), else on the command line.
    if cfg.engine == "sglang":
        assert value_after(argv, "--api-key") == "KEY"
    else:
        assert "KEY" not in argv and spec.env[KEY_ENV[cfg.engine]] == "KEY"
    if cfg.engine == "vllm":
        assert value_after(argv, "--download-dir") == "/models"
        assert cfg.env.items() >= COMMON_ENV.items()
        assert mounts(model).items() >= COMMON_MOUNTS.items()


def test_lifecycle_roles(catalog):
    assert [m.id for m in catalog.models.values() if m.cfg.pinned] == [UTILITY]
    assert {m.id for m in catalog.models.values() if m.cfg.exclusive} == EXCLUSIVE


def test_every_model_fits_beside_the_utility_model_with_headroom(catalog):
    utility = catalog.models[UTILITY].cfg.gpu_memory_utilization or 0
    for m in catalog.models.values():
        if m.id != UTILITY and not m.cfg.exclusive:
            assert (m.cfg.gpu_memory_utilization or 0) + utility <= 0.9, m.id


@pytest.mark.parametrize("model_id", [*SEED_IDS, *LATER_IDS, *COMMENTED_OUT])
def test_capabilities_and_tags_follow_the_flags(catalog, model_id, tmp_path):
    model = catalog.models[model_id]
    caps, tags = set(model.cfg.capabilities), set(model.cfg.tags)
    argv = argv_of(model, tmp_path)
    assert "chat" in caps
    if "tools" in caps:
        assert "--enable-auto-tool-choice" in argv
    if "--reasoning-parser" in argv:
        assert "reasoning" in caps and "reasoning" in tags
    if re.search(r"vl|ocr|multimodal|4\.6v", model_id):
        assert "vision" in caps
    if re.search(r"thinking|r1|reasoning|gpt-oss", model_id):
        assert "reasoning" in caps
    assert ("vision" in caps) == ("vision" in tags)
    if "coder" in model_id:
        assert "coder" in tags
    assert ("ocr" in tags) == ("ocr" in model_id)


def test_the_utility_tag_marks_the_small_helpers(catalog):
    assert {m.id for m in catalog.models.values() if "utility" in m.cfg.tags} == {
        UTILITY, "qwen3.5-0.8b"}


def test_every_disabled_model_says_why(catalog):
    for m in catalog.models.values():
        if m.cfg.status == "disabled":
            assert len(m.cfg.notes) > 40, m.id


# ---------------------------------------------------------------- the first release


@pytest.mark.parametrize("model_id", SEED_IDS)
def test_seed_model_matches_the_reference_row(catalog, seed, model_id, tmp_path):
    row = seed[model_id]
    model = catalog.models[model_id]
    cfg = model.cfg
    assert (cfg.image, cfg.weights) == (IMAGE_FOR[row.image], row.weights)
    assert (cfg.max_model_len, cfg.gpu_memory_utilization) == (row.ctx, row.mem_frac)

    argv = argv_of(model, tmp_path)
    head = (["serve", "--model", row.weights] if row.image.startswith("avarok/")
            else ["vllm", "serve", row.weights])
    assert argv[:3] == head
    assert float(value_after(argv, "--gpu-memory-utilization")) == row.mem_frac
    assert value_after(argv, "--max-model-len") == str(row.ctx)
    # The phi-4 template is checked on its own (its newlines were flattened in the table).
    flags = [g for g in row.flags if g[0] != "--chat-template"]
    assert_in_order(argv, SEED_FLAGS + flags)
    env = dict(row.env)
    if model_id.startswith("gpt-oss"):
        env = {k: v for k, v in env.items() if k not in GPT_OSS_ENV_DROPPED} | GPT_OSS_ENV
        for k in GPT_OSS_ENV_DROPPED:
            assert k not in cfg.env
    assert cfg.env.items() >= (COMMON_ENV | env).items()


@pytest.mark.parametrize("model_id", SEED_IDS)
def test_seed_status_and_notes_follow_the_reference(catalog, seed, model_id):
    row = seed[model_id]
    cfg = catalog.models[model_id].cfg
    label, _, text = row.status_notes.partition(": ")
    if model_id in STATUS_FIX:
        expected = STATUS_FIX[model_id]
    elif label in ("disabled", "experimental"):
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


# ---------------------------------------------------------------- corrections


def test_phi4_reasoning_template_puts_role_message_and_end_on_their_own_lines(catalog,
                                                                              tmp_path):
    argv = argv_of(catalog.models["phi-4-reasoning-plus-fp4"], tmp_path)
    template = value_after(argv, "--chat-template")
    rendered = jinja2.Environment().from_string(template).render(
        messages=[{"role": "system", "content": "Be brief."},
                  {"role": "user", "content": "Hi"}], add_generation_prompt=True)
    assert rendered == ("<|system|>\nBe brief.<|end|>\n<|user|>\nHi<|end|>\n"
                        "<|assistant|>\n")


def test_nemotron_fp8_is_disabled_because_it_decodes_empty_strings(catalog):
    cfg = catalog.models["nemotron-3-nano-30b-fp8"].cfg
    assert cfg.status == "disabled"
    assert "empty strings" in cfg.notes


def test_qwen3_vl_thinking_awq_with_modelopt_fp4_is_experimental_and_says_so(catalog,
                                                                             tmp_path):
    model = catalog.models["qwen3-vl-30b-thinking-instruct"]
    assert "AWQ" in model.cfg.weights
    assert value_after(argv_of(model, tmp_path), "--quantization") == "modelopt_fp4"
    assert model.cfg.status == "experimental"
    assert "experimental until verified" in model.cfg.notes
    assert "modelopt_fp4" in model.cfg.notes


@pytest.mark.parametrize("model_id", ["gpt-oss-20b", "gpt-oss-120b",
                                      "huihui-gpt-oss-120b-mxfp4-abliterated"])
def test_gpt_oss_keeps_its_compile_caches_across_containers(catalog, model_id):
    """A re-created container finds vLLM's torch.compile cache and FlashInfer's ccache
    on the host, instead of compiling again."""
    model = catalog.models[model_id]
    assert mounts(model)["/root/.cache/vllm"] == f"{DATA}/cache/vllm"
    assert mounts(model)["/root/.ccache"] == f"{DATA}/cache/ccache"
    assert f"{DATA}/encodings:/etc/encodings:ro" in model.cfg.volumes
    assert model.cfg.env["TIKTOKEN_ENCODINGS_BASE"] == "/etc/encodings"


def test_vllm_logging_is_on_by_default_and_can_be_turned_off():
    on = load_config(builtin_catalog("dgx-spark"), env={"SPARKSTACK_DATA": DATA})
    off = load_config(builtin_catalog("dgx-spark"),
                      env={"SPARKSTACK_DATA": DATA, "VLLM_CONFIGURE_LOGGING": "0"})
    for config, value in ((on, "1"), (off, "0")):
        assert {m.cfg.env["VLLM_CONFIGURE_LOGGING"] for m in vllm_models(config)} == {value}


def test_nemotron_nvfp4_mounts_the_reasoning_parser_plugin_it_loads(catalog, tmp_path):
    model = catalog.models["nemotron-3-nano-30b-nvfp4"]
    plugin = value_after(argv_of(model, tmp_path), "--reasoning-parser-plugin")
    assert mounts(model)[plugin] == f"{DATA}/plugins/nano_v3_reasoning_parser.py"


# ---------------------------------------------------------------- later releases


@pytest.mark.parametrize("model_id", LATER_IDS)
def test_later_model_matches_the_reference_row(catalog, later, model_id, tmp_path):
    row = later[model_id]
    model = catalog.models[model_id]
    cfg = model.cfg
    assert cfg.weights == row.weights
    assert (cfg.max_model_len, cfg.gpu_memory_utilization) == (row.ctx, row.mem_frac)
    if model_id.startswith(("qwen3.6", "qwen3.5-122b", "huihui-qwen3", "jackrong")):
        assert cfg.image == QWEN35_IMAGE
    elif row.image.startswith("scitrera/"):
        assert cfg.image.startswith(row.image + "@sha256:")
    else:
        assert cfg.image == IMAGE_FOR[row.image]
    assert cfg.status == ("stable" if "validated" in row.status else "experimental")
    assert cfg.exclusive == (row.lifecycle == "exclusive")

    argv = argv_of(model, tmp_path)
    flags, absent = row_flags(later, model_id)
    assert flags, f"no flags read for {model_id}"
    for flag in flags:
        assert flag in argv, f"{model_id}: {flag} missing from {argv}"
    for flag in absent:
        assert flag not in argv

    env = dict(re.findall(r"`([A-Za-z_][A-Za-z0-9_]*)=([^`\s]+)`", row.env))
    env.pop("TIKTOKEN_ENCODINGS_BASE", None)  # mounted at /etc/encodings here
    if "Qwen env" in row.env:
        template_from = "Qwen/Qwen3.5-0.8B" if "Qwen3.5-0.8B" in row.env else row.weights
        env |= {"VLLM_MARLIN_USE_ATOMIC_ADD": "1", "QWEN35_CHAT_TEMPLATE_CACHE_ROOT": "/models",
                "QWEN35_CHAT_TEMPLATE_MODEL_ID": template_from}
    if "Offline env" in row.env:
        env |= {"HF_HUB_CACHE": "/models", "HUGGINGFACE_HUB_CACHE": "/models",
                "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    assert cfg.env.items() >= env.items()


def row_flags(rows: dict[str, LaterRow], model_id: str) -> tuple[set[str], set[str]]:
    """The flags a part-A row names (those of the row it refers to included: "same flag
    set as X", "as X plus ...", "as above plus ..."), and those it says are absent."""
    text = rows[model_id].flags
    flags = set(re.findall(r"(?<![\w-])--[a-z][\w.-]*", text))
    # "like X but --kv-cache-dtype auto and no --quantization": that flag must be absent.
    absent = set(re.findall(r"\bno (--[a-z][\w.-]*)", text))
    ids = list(rows)
    base = re.search(r"(?:same flag set as|like|as) ([\w.-]+[a-z0-9])", text)
    if base and base.group(1) == "above":
        base_id: str | None = ids[ids.index(model_id) - 1]
    else:
        base_id = base.group(1) if base and base.group(1) in rows else None
    if base_id:
        flags |= row_flags(rows, base_id)[0]
    if "speculative config" in text:
        flags.add("--speculative-config")
    return flags - absent - {"--model"}, absent  # `vllm serve --model X` = `vllm serve X`


def test_structured_flag_values_are_valid_json(catalog, tmp_path):
    argv = argv_of(catalog.models["qwen3.6-35b-a3b-fp8-mtp"], tmp_path)
    assert json.loads(value_after(argv, "--speculative-config")) == {
        "method": "mtp", "num_speculative_tokens": 2}
    argv = argv_of(catalog.models["qwen3-coder-next-int4-autoround"], tmp_path)
    assert json.loads(value_after(argv, "--hf-overrides"))["rope_scaling"] == {
        "rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 262144}


def test_the_sglang_utility_runs_sglangs_own_server(catalog, tmp_path):
    model = catalog.models["qwen3.5-0.8b"]
    argv = argv_of(model, tmp_path)
    assert argv[:3] == ["python3", "-m", "sglang.launch_server"]
    assert value_after(argv, "--model-path") == "Qwen/Qwen3.5-0.8B"
    assert value_after(argv, "--mem-fraction-static") == "0.05"
    assert value_after(argv, "--context-length") == "32768"
    assert_in_order(argv, [["--tp-size", "1"], ["--attention-backend", "triton"]])
    assert set(mounts(model)) == {"/root/.cache/huggingface", "/models"}


def test_models_that_borrow_a_chat_template_require_its_snapshot(catalog):
    """check reports a missing template before a start fails on it."""
    for m in catalog.models.values():
        model_id = m.cfg.env.get("QWEN35_CHAT_TEMPLATE_MODEL_ID")
        if not model_id:
            continue
        folder = "models--" + model_id.replace("/", "--")
        assert any(f.startswith(f"{DATA}/models/{folder}/snapshots/")
                   for f in m.cfg.requires.files), m.id
        assert value_after(argv_of(m, Path("/tmp")), "--chat-template") == (
            "/workspace/unsloth.jinja")


@pytest.mark.parametrize("model_id", sorted(COMMENTED_OUT))
def test_commented_out_services_are_listed_disabled_with_their_reason(catalog, model_id):
    cfg = catalog.models[model_id].cfg
    assert cfg.status == "disabled"
    assert COMMENTED_OUT[model_id] in cfg.notes
