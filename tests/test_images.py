"""Our engine images: every Dockerfile under images/ parses and pins what it installs,
the catalog and `check` name them consistently, their patch scripts do what they say,
and `sparkstack images build` really builds through the Docker daemon (against a
locally made stand-in base: NVIDIA's images are never pulled here).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
import uuid
from pathlib import Path

import pytest
from dockerfile_parse import DockerfileParser

from sparkstack.config import builtin_catalog, load_config
from sparkstack.images import (
    Image,
    build_notice,
    catalog_images,
    describe,
    dockerfile_args,
    images_dir,
)

REPO = Path(__file__).resolve().parents[1]
IMAGES = REPO / "images"
DOCKERFILES = sorted(IMAGES.glob("*/Dockerfile"))
REFERENCE = (Path(__file__).with_name("data") / "images.md").read_text(encoding="utf-8")
# Pins the reference gives (digests D0-D4, source commits P1-P7).
PINS = dict(re.findall(r"- (D\d|P\d): .*?`(?:sha256:)?([0-9a-f]{7,64})`", REFERENCE))
PINNED_PACKAGES = re.compile(
    r"^(torch|torchvision|torchaudio|vllm|flashinfer[\w-]*|transformers|huggingface[_-]hub|"
    r"triton|xgrammar)\b", re.I)


def parsed(dockerfile: Path) -> DockerfileParser:
    parser = DockerfileParser(fileobj=dockerfile.open("rb"))
    assert parser.structure, f"{dockerfile} does not parse"
    return parser


def run_commands(dockerfile: Path) -> list[str]:
    return [i["value"] for i in parsed(dockerfile).structure if i["instruction"] == "RUN"]


def pip_requirements(command: str) -> list[str]:
    """The requirement arguments of every `pip install`/`pip wheel` in a RUN command."""
    reqs = []
    for part in re.split(r"&&|;|\|\|", command):
        words = re.findall(r'"[^"]*"|\'[^\']*\'|\S+', part)
        if "pip" not in words or not {"install", "wheel"} & set(words):
            continue
        if "uninstall" in words:
            continue
        skip_next = False
        for word in words[words.index("pip") + 2:]:
            word = word.strip("\"'()")  # `(cd x && pip wheel .)` is a subshell
            if skip_next:
                skip_next = False
            elif word in ("-r", "-w", "--index-url", "-c"):
                skip_next = True
            elif not word.startswith("-"):
                reqs.append(word)
    return reqs


# ---------------------------------------------------------------- the Dockerfiles


def test_every_image_the_catalog_builds_has_a_dockerfile():
    catalog = load_config(builtin_catalog("dgx-spark"))
    ours = [i for i in catalog_images(catalog) if i.own]
    assert {i.name for i in ours} == {p.parent.name for p in DOCKERFILES}
    for image in ours:
        assert image.buildable, image.ref
        # The catalog's tag is the one the Dockerfile builds and labels.
        assert image.ref.rpartition(":")[2] == image.default_tag, image.ref


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.parent.name)
def test_dockerfile_parses_and_labels_the_image(dockerfile):
    parser = parsed(dockerfile)
    assert parser.baseimage
    args = dockerfile_args(dockerfile)
    labels = parser.labels
    assert labels["org.opencontainers.image.title"] == dockerfile.parent.name
    # ARG defaults filled in: the build passes the tag as IMAGE_VERSION.
    assert labels["org.opencontainers.image.version"] == args["IMAGE_VERSION"]
    assert labels["org.opencontainers.image.source"] == f"images/{dockerfile.parent.name}"


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.parent.name)
def test_dockerfile_pins_its_base_image(dockerfile):
    text = dockerfile.read_text()
    assert ":latest" not in text
    base = describe(f"sparkstack/{dockerfile.parent.name}:x").base
    assert base
    repo, _, tag = base.split("@")[0].rpartition(":")
    assert repo and tag and tag != "latest", base
    if base.startswith("sparkstack/"):
        # One of ours: the tag its own Dockerfile builds.
        parent = IMAGES / repo.removeprefix("sparkstack/") / "Dockerfile"
        assert dockerfile_args(parent)["IMAGE_VERSION"] == tag
    else:
        assert re.search(r"@sha256:[0-9a-f]{64}$", base), f"{base} has no digest"
        assert base.rpartition("sha256:")[2] in PINS.values(), "the digest the reference gives"


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.parent.name)
def test_dockerfile_pins_every_version_it_installs(dockerfile):
    args = dockerfile_args(dockerfile)
    runs = [re.sub(r"\$\{?(\w+)\}?", lambda m: args.get(m.group(1), m.group(0)), r)
            for r in run_commands(dockerfile)]
    for req in (r for run in runs for r in pip_requirements(run)):
        if req == "." or req.startswith("/tmp/wheels/"):
            continue
        assert "${" not in req and "$" not in req, f"{req}: an ARG without a default"
        if " @ git+" in req or req.startswith("git+"):
            assert re.search(r"@[0-9a-f]{40}$", req), f"{req}: not pinned to a commit"
        else:
            assert re.fullmatch(r"[\w.\[\]-]+==[\w.+-]+", req), f"{req}: not pinned (==)"
        if PINNED_PACKAGES.match(req):
            assert "==" in req or "@" in req
    for run in runs:
        for url_ref in re.findall(r"(?:--branch|checkout -q|fetch_commit\.sh \S+) (\S+)", run):
            assert url_ref not in ("main", "master", "HEAD"), f"unpinned source in {run[:80]}"


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.parent.name)
def test_compiling_images_build_for_gb10_only(dockerfile):
    text = dockerfile.read_text()
    compiles = "--no-build-isolation" in text
    arch = re.findall(r"TORCH_CUDA_ARCH_LIST=(\S+)", text)
    if compiles:
        assert arch, "a CUDA compile without TORCH_CUDA_ARCH_LIST builds every GPU"
    for value in arch:
        assert value.strip("\"'\\") in ("12.1f", "12.1a", "12.0;12.1"), value


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.parent.name)
def test_every_file_the_dockerfile_copies_is_in_its_folder(dockerfile):
    for item in parsed(dockerfile).structure:
        if item["instruction"] == "COPY" and "--from=" not in item["value"]:
            for name in item["value"].split()[:-1]:
                assert (dockerfile.parent / name).is_file(), name


def test_the_reference_pins_are_the_ones_built():
    text = {p.parent.name: p.read_text() for p in DOCKERFILES}
    assert PINS["D0"] in text["vllm-gb10"]
    for pin in ("D2", "P2", "P4", "P5"):
        assert PINS[pin] in text["vllm-gb10-mxfp4"], pin
    assert "VLLM_COMMIT=50cd5674b" in text["vllm-gb10-tf5-ngc"]
    assert PINS["P6"] in text["vllm-gb10-gemma4"]
    assert PINS["P7"] in text["vllm-gb10-qwen35"] and PINS["P7"] in text["vllm-gb10-glm47"]


def test_models_that_ask_for_a_chat_template_run_on_an_image_that_installs_it():
    catalog = load_config(builtin_catalog("dgx-spark"))
    for m in catalog.models.values():
        if "QWEN35_CHAT_TEMPLATE_MODEL_ID" not in m.cfg.env:
            continue
        image = describe(m.cfg.image or "")
        chain = []
        while image.folder is not None:
            chain.append(image.folder.name)
            image = describe(image.base or "")
        assert "vllm-gb10-tf5-ngc" in chain, m.id
    entry = parsed(IMAGES / "vllm-gb10-tf5-ngc" / "Dockerfile")
    assert any(i["instruction"] == "ENTRYPOINT" and "qwen-entrypoint.sh" in i["value"]
               for i in entry.structure)


# ---------------------------------------------------------------- what check and list say


def test_each_missing_image_names_the_command_that_makes_it():
    assert describe("sparkstack/vllm-gb10:0.13.0").fix().startswith(
        "sparkstack images build vllm-gb10 ")
    # A tag other than the Dockerfile's: the full reference builds it under that tag.
    assert describe("sparkstack/vllm-gb10:custom").fix().startswith(
        "sparkstack images build sparkstack/vllm-gb10:custom ")
    ngc = describe("nvcr.io/nvidia/vllm:25.10-py3").fix()
    assert "docker login nvcr.io" in ngc
    assert ngc.endswith("then docker pull nvcr.io/nvidia/vllm:25.10-py3")
    assert describe("scitrera/x:1").fix() == "docker pull scitrera/x:1"
    assert "no Dockerfile for it" in describe("sparkstack/nothing-here:1").fix()


def test_a_catalog_lists_the_bases_its_images_are_built_from(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text(textwrap.dedent("""\
        models:
          g:
            runtime: docker
            engine: vllm
            image: sparkstack/vllm-gb10-gemma4:50cd567-c472755
            weights: google/gemma-4-26B-A4B-it
    """))
    images = {i.name: i for i in catalog_images(load_config(config))}
    assert list(images) == ["vllm-gb10-gemma4", "vllm-gb10-tf5-ngc", "vllm-gb10-mxfp4"]
    assert images["vllm-gb10-gemma4"].models == ["g"]
    assert images["vllm-gb10-tf5-ngc"].base_of == ["sparkstack/vllm-gb10-gemma4:50cd567-c472755"]
    assert images["vllm-gb10-mxfp4"].base.startswith("nvcr.io/nvidia/pytorch:26.01-py3@")


def test_the_build_notice_says_how_long_and_when_ngc_login_is_needed():
    mxfp4 = describe("sparkstack/vllm-gb10-mxfp4:045293d")
    general = describe("sparkstack/vllm-gb10:0.13.0")
    assert "about 20 minutes" in build_notice([general])
    assert "docker login nvcr.io" not in build_notice([general]), "a Docker Hub base"
    assert "vllm-gb10-mxfp4 start(s) from NVIDIA's NGC images: run `docker login nvcr.io`" in (
        build_notice([general, mxfp4]))


def test_images_dir_is_the_repository_folder_unless_overridden(monkeypatch, tmp_path):
    monkeypatch.delenv("SPARKSTACK_IMAGES_DIR", raising=False)
    assert images_dir() == IMAGES
    monkeypatch.setenv("SPARKSTACK_IMAGES_DIR", str(tmp_path))
    assert images_dir() == tmp_path


# ---------------------------------------------------------------- the patch scripts


def run_script(script: Path, *args: str, env: dict[str, str] | None = None,
               cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(script), *args], capture_output=True, text=True,
                          timeout=60, env={**os.environ, **(env or {})}, cwd=cwd)


def test_narrowing_keeps_only_sm10_for_the_kernels_that_break_on_gb10(tmp_path):
    cmake = tmp_path / "CMakeLists.txt"
    cmake.write_text(textwrap.dedent("""\
        cuda_archs_loose_intersection(FP4_ARCHS "12.0f" "${CUDA_ARCHS}")
        cuda_archs_loose_intersection(SCALED_MM_ARCHS "10.0f;11.0f;12.0f" "${CUDA_ARCHS}")
        cuda_archs_loose_intersection(CUTLASS_MOE_DATA_ARCHS "9.0a;10.0a;12.0a;12.1a" "${X}")
        cuda_archs_loose_intersection(MARLIN_ARCHS "8.0;12.0" "${CUDA_ARCHS}")
    """))
    script = IMAGES / "vllm-gb10" / "narrow_sm12_kernels.py"
    assert run_script(script, str(cmake)).returncode == 0
    assert cmake.read_text().splitlines() == [
        'cuda_archs_loose_intersection(FP4_ARCHS "" "${CUDA_ARCHS}")',
        'cuda_archs_loose_intersection(SCALED_MM_ARCHS "10.0f" "${CUDA_ARCHS}")',
        'cuda_archs_loose_intersection(CUTLASS_MOE_DATA_ARCHS "9.0a;10.0a" "${X}")',
        'cuda_archs_loose_intersection(MARLIN_ARCHS "8.0;12.0" "${CUDA_ARCHS}")',
    ]
    # Nothing left to narrow: the build stops instead of compiling kernels known to fail.
    result = run_script(script, str(cmake))
    assert result.returncode == 1 and "update narrow_sm12_kernels.py" in result.stderr


def test_cache_kernels_lose_the_failure_index_argument_cuda13_dropped(tmp_path):
    source = tmp_path / "csrc" / "cache_kernels.cu"
    source.parent.mkdir()
    source.write_text("size_t fail_idx = 0;\n"
                      "CHECK(cudaMemcpyBatchAsync(d.data(), s.data(), n.data(), k, &attr,"
                      " &idx, 1, &fail_idx, stream));\n"
                      "CHECK(cudaMemcpyBatchAsync(d, s, n, k, &attr, &idx, 1, stream));\n")
    script = IMAGES / "vllm-gb10-tf5-ngc" / "patch_cache_kernels.py"
    result = run_script(script, str(tmp_path))
    assert result.returncode == 0, result.stderr
    assert "1 of 2" in result.stdout
    assert "&fail_idx" not in source.read_text().split("\n", 1)[1]
    assert source.read_text().count("&idx, 1, stream));") == 2
    source.write_text("// no batched copies\n")
    assert run_script(script, str(tmp_path)).returncode == 1


def test_fastsafetensors_shards_are_read_in_numeric_order(tmp_path):
    module = tmp_path / "weight_utils.py"
    module.write_text(textwrap.dedent('''\
        def fastsafetensors_weights_iterator(hf_weights_files, use_tqdm_on_load):
            """Iterate over the shards."""
            for name in hf_weights_files:
                yield name
    '''))
    script = IMAGES / "vllm-gb10-mxfp4" / "sort_fastsafetensors_shards.py"
    assert run_script(script, str(module)).returncode == 0
    namespace: dict[str, object] = {}
    exec(compile(module.read_text(), str(module), "exec"), namespace)
    shards = ["model-00010-of-00012.safetensors", "model-00002-of-00012.safetensors",
              "model-00001-of-00012.safetensors"]
    iterator = namespace["fastsafetensors_weights_iterator"]
    assert list(iterator(shards, False)) == sorted(shards, key=lambda s: int(s[6:11]))
    assert run_script(script, str(module)).returncode == 0, "a second run changes nothing"


def fake_package(root: Path, name: str, files: dict[str, str]) -> dict[str, str]:
    """A stand-in installed package for the scripts that patch site-packages."""
    for rel, text in files.items():
        path = root / name / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text))
    (root / name / "__init__.py").touch()
    return {"PYTHONPATH": str(root)}


def test_missing_cutlass_ops_make_capability_checks_answer_no(tmp_path):
    env = fake_package(tmp_path, "vllm", {"_custom_ops.py": """\
        def cutlass_scaled_mm_supports_fp8(capability):
            raise AttributeError("no op cutlass_scaled_mm_supports_fp8")

        def cutlass_scaled_mm_supports_block_fp8(capability):
            return capability >= 90
    """})
    script = IMAGES / "vllm-gb10-tf5-ngc" / "guard_missing_ops.py"
    assert run_script(script, env=env).returncode == 0
    check = subprocess.run(
        [sys.executable, "-c", "import vllm._custom_ops as o; print("
         "o.cutlass_scaled_mm_supports_fp8(121), o.cutlass_scaled_mm_supports_block_fp8(121))"],
        capture_output=True, text=True, env={**os.environ, **env}, timeout=60)
    assert check.stdout.split() == ["False", "True"]


def test_the_mla_decode_splits_grow_with_the_longest_sequence(tmp_path):
    env = fake_package(tmp_path, "vllm", {"v1/attention/backends/mla/triton_mla.py": """\
        def decode(attn_metadata):
            num_kv_splits = 4  # TODO: heuristic
            return num_kv_splits
    """})
    assert run_script(IMAGES / "vllm-gb10-glm47" / "mla_kv_splits.py", env=env).returncode == 0
    text = (tmp_path / "vllm/v1/attention/backends/mla/triton_mla.py").read_text()
    assert "num_kv_splits = _sparkstack_num_kv_splits(attn_metadata)" in text
    namespace: dict[str, object] = {}
    exec(compile(text.replace("    import torch\n", ""), "triton_mla", "exec"),
         {"__builtins__": __builtins__, **namespace}, namespace)
    splits = namespace["_sparkstack_num_kv_splits"]

    class Lens(list):
        def max(self):
            return max(self)

    class Torch:  # no GPU here: only what the helper asks of torch
        class cuda:
            @staticmethod
            def is_current_stream_capturing():
                return False

    splits.__globals__["torch"] = Torch

    def meta(*lens):
        return type("M", (), {"decode": type("D", (), {"seq_lens": Lens(lens)})})

    assert [splits(meta(100)), splits(meta(900, 60_000)), splits(meta(1_000_000))] == [
        32, 40, 128]


def test_the_qwen_entrypoint_installs_the_borrowed_chat_template(tmp_path):
    snapshot = tmp_path / "models" / "models--Qwen--Qwen3.5-0.8B" / "snapshots" / "abc"
    snapshot.mkdir(parents=True)
    (snapshot / "chat_template.jinja").write_text("{{ messages }}")
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text("abc")
    target = tmp_path / "workspace" / "unsloth.jinja"
    script = IMAGES / "vllm-gb10-tf5-ngc" / "install_chat_template.py"
    env = {"QWEN35_CHAT_TEMPLATE_MODEL_ID": "Qwen/Qwen3.5-0.8B",
           "QWEN35_CHAT_TEMPLATE_CACHE_ROOT": str(tmp_path / "models"),
           "QWEN35_CHAT_TEMPLATE_TARGET": str(target)}
    assert run_script(script, env=env).returncode == 0
    assert target.read_text() == "{{ messages }}"
    # Not downloaded yet: the start fails, saying what to download.
    result = run_script(script, env={**env, "QWEN35_CHAT_TEMPLATE_MODEL_ID": "Qwen/Other"})
    assert result.returncode == 1
    assert "a snapshot of Qwen/Other" in result.stderr


# ---------------------------------------------------------------- building, for real

SPARKSTACK = [sys.executable, "-m", "sparkstack.cli"]


def cli(*args: str, root: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*SPARKSTACK, *args], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "SPARKSTACK_IMAGES_DIR": str(root),
                               "COLUMNS": "200"})


@pytest.fixture
def test_images(docker_image, tmp_path):
    """An images/ folder with a base image FROM the stand-in, a child FROM that base, and
    one whose build fails; the images built are removed afterwards."""
    suffix = uuid.uuid4().hex[:8]
    names = {k: f"itest-{k}-{suffix}" for k in ("base", "child", "broken")}
    root = tmp_path / "images"
    files = {
        "base": f"""\
            ARG BASE_IMAGE={docker_image}
            FROM ${{BASE_IMAGE}}
            ARG IMAGE_VERSION=1
            LABEL org.opencontainers.image.title="{names['base']}" \\
                  org.opencontainers.image.version="${{IMAGE_VERSION}}"
            COPY greeting.txt /etc/greeting.txt
            ENV GREETING=hello
        """,
        "child": f"""\
            ARG BASE_IMAGE=sparkstack/{names['base']}:1
            FROM ${{BASE_IMAGE}}
            ARG IMAGE_VERSION=1
            LABEL org.opencontainers.image.version="${{IMAGE_VERSION}}"
            COPY greeting.txt /etc/child.txt
        """,
        "broken": f"""\
            FROM {docker_image}
            COPY no-such-file.txt /etc/
        """,
    }
    for key, text in files.items():
        folder = root / names[key]
        folder.mkdir(parents=True)
        (folder / "Dockerfile").write_text(textwrap.dedent(text))
        (folder / "greeting.txt").write_text("hi\n")
    yield root, {k: f"sparkstack/{v}:1" for k, v in names.items()}
    for name in names.values():
        subprocess.run(["docker", "rmi", "-f", f"sparkstack/{name}:1"], capture_output=True)


def inspect(ref: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["docker", "image", "inspect", "--format",
                           '{{index .Config.Labels "org.opencontainers.image.version"}}', ref],
                          capture_output=True, text=True)


def test_build_makes_the_missing_base_first_and_streams_progress(test_images):
    root, refs = test_images
    result = cli("images", "build", refs["child"].split("/")[1].split(":")[0], root=root)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "about 20 minutes" in out.split("==>")[0], "said before the first build"
    assert out.index(f"==> {refs['base']}") < out.index(f"==> {refs['child']}")
    assert "Step 1/" in out and "COPY greeting.txt /etc/greeting.txt" in out
    assert f"built {refs['child']}" in out
    for ref in (refs["base"], refs["child"]):
        assert inspect(ref).stdout.strip() == "1", "the version label is the tag"


def test_build_of_a_model_image_skips_what_is_already_here(test_images, tmp_path):
    root, refs = test_images
    config = tmp_path / "c.yaml"
    config.write_text(f"models:\n  m:\n    runtime: docker\n    engine: vllm\n"
                      f"    image: {refs['base']}\n    weights: org/model\n")
    first = cli("images", "build", "--for-model", "m", "--config", str(config), root=root)
    assert first.returncode == 0, first.stderr
    assert f"built {refs['base']}" in first.stdout
    listed = cli("images", "list", "--config", str(config), root=root)
    row = next(line for line in listed.stdout.splitlines() if refs["base"] in line)
    assert re.search(r"\byes\b.*GB.*1: m", row), row
    again = cli("images", "build", "--for-model", "m", "--config", str(config), root=root)
    assert again.returncode == 0
    assert f"{refs['base']} is already here (--force rebuilds it)" in again.stdout
    assert "==>" not in again.stdout


def test_a_failing_build_says_which_step_failed_and_why(test_images):
    root, refs = test_images
    result = cli("images", "build", refs["broken"], root=root)
    assert result.returncode == 1
    message = " ".join(result.stderr.split())
    assert f"building {refs['broken']} failed at Step 2/2 : COPY no-such-file.txt" in message
    assert "no-such-file.txt" in message and "not found" in message.lower()
    assert inspect(refs["broken"]).returncode != 0, "no image is tagged"


def test_build_refuses_an_image_that_is_not_ours(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("models:\n  m:\n    runtime: docker\n    engine: vllm\n"
                      "    image: nvcr.io/nvidia/vllm:25.10-py3\n    weights: org/model\n")
    result = cli("images", "build", "--for-model", "m", "--config", str(config), root=tmp_path)
    assert result.returncode == 1
    assert "not built by sparkstack" in result.stderr
    assert "docker pull nvcr.io/nvidia/vllm:25.10-py3" in result.stderr
    unknown = cli("images", "build", "no-such-image", root=IMAGES)
    assert unknown.returncode == 1
    assert "no image 'no-such-image'" in unknown.stderr and "vllm-gb10" in unknown.stderr


def test_image_registry_reads_our_folder_layout():
    image = describe("sparkstack/vllm-gb10-tf5:0.13.0")
    assert isinstance(image, Image) and image.buildable
    assert image.base == "sparkstack/vllm-gb10:0.13.0"
    assert image.default_tag == "0.13.0"
