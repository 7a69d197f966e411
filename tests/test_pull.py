"""`sparkstack pull` against a stand-in hub (tests/fake_hub.py) on 127.0.0.1: weights go
to the folder the engine reads them from, a second pull downloads nothing, a broken
transfer resumes, a missing or gated repo says what to do, and `models --json` tells
which weights are here."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest
from huggingface_hub import constants
from rich.console import Console

from sparkstack.client import status_table
from sparkstack.config import load_config
from sparkstack.runtime import ProcessRuntime
from sparkstack.supervisor import Supervisor
from sparkstack.telemetry.events import ModelChanged

from .conftest import fake
from .fake_hub import FakeHub, HubThread, Repo

SPARKSTACK = [sys.executable, "-m", "sparkstack.cli"]
# huggingface_hub writes what it receives in chunks of this size: a broken transfer
# resumes from the last whole chunk, so the weights are bigger than one.
CHUNK = constants.DOWNLOAD_CHUNK_SIZE
WEIGHTS = bytes(range(256)) * (CHUNK // 256 + 4096)  # "model.safetensors": a chunk + 1 MiB
TINY = Repo(files={
    "config.json": b'{"model_type": "tiny"}',
    "tokenizer.json": b'{"version": "1.0"}',
    "model.safetensors": WEIGHTS,
    # What vLLM does not fetch, so neither does pull: its default --ignore-patterns
    # (original/) and a second weight format beside the safetensors (gpt-oss's metal/).
    "original/model.safetensors": b"x" * 4096,
    "metal/model.bin": b"y" * 4096,
})
FETCHED = ["config.json", "model.safetensors", "tokenizer.json"]


@pytest.fixture
def hub() -> Iterator[FakeHub]:
    fake = FakeHub(repos={"acme/tiny": Repo(dict(TINY.files)),
                          "acme/gated": Repo({"config.json": b"{}"}, gated=True)})
    with HubThread(fake) as running:
        yield running


@pytest.fixture
def catalog(tmp_path: Path) -> Path:
    """A Docker vLLM model with --download-dir /models (the DGX catalog's shape), a
    process model using HF_HUB_CACHE, a local GGUF, and two repos the hub refuses."""
    path = tmp_path / "sparkstack.yaml"
    path.write_text(textwrap.dedent(f"""\
        memory_gb: 8
        data_dir: {tmp_path / 'data'}
        models:
          tiny:
            engine: vllm
            runtime: docker
            image: example/vllm:1
            weights: acme/tiny
            memory_gb: 1
            args: [--download-dir, /models, --enforce-eager]
            volumes: ["{tmp_path}/hf:/root/.cache/huggingface", "{tmp_path}/models:/models"]
          tiny-proc:
            engine: vllm
            weights: acme/tiny
            memory_gb: 1
            env: {{HF_HUB_CACHE: "{tmp_path}/proc-cache"}}
          local:
            engine: llamacpp
            weights: ./tiny.gguf
            memory_gb: 1
          gone:
            engine: vllm
            weights: acme/nothing-here
            status: disabled
          gated:
            engine: vllm
            weights: acme/gated
            status: disabled
    """))
    return path


def run(hub: FakeHub, *args: str, token: str | None = None, home: Path
        ) -> subprocess.CompletedProcess[str]:
    # Nothing of the machine's own Hugging Face setup (token file, cache, endpoint).
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGING"))}
    env.update(HF_ENDPOINT=hub.url, HF_HOME=str(home / "hf-home"), HF_HUB_DISABLE_XET="1",
               HF_HUB_DISABLE_TELEMETRY="1", COLUMNS="200")
    if token:
        env["HF_TOKEN"] = token
    return subprocess.run([*SPARKSTACK, *args], capture_output=True, text=True, timeout=120,
                          env=env)


def states(hub: FakeHub, catalog: Path) -> dict[str, str | None]:
    result = run(hub, "models", "--config", str(catalog), "--json", home=catalog.parent)
    assert result.returncode == 0, result.stderr
    return {m["id"]: m["weights_state"] for m in json.loads(result.stdout)}


def snapshot(root: Path) -> Path:
    return root / "models--acme--tiny" / "snapshots" / TINY.sha


def test_pull_fetches_into_the_engines_download_dir_once(hub, catalog):
    tmp = catalog.parent
    assert states(hub, catalog) == {"tiny": "missing", "tiny-proc": "missing", "local": None,
                                    "gone": "missing", "gated": "missing"}
    result = run(hub, "pull", "tiny", "--config", str(catalog), token="hf_secret", home=tmp)
    assert result.returncode == 0, result.stderr
    # The host side of the container's /models (vLLM's --download-dir), not the HF cache.
    snap = snapshot(tmp / "models")
    assert sorted(str(p.relative_to(snap)) for p in snap.rglob("*") if p.is_file()) == FETCHED
    assert (snap / "model.safetensors").read_bytes() == WEIGHTS
    assert not (tmp / "hf").exists()
    # The size up front, from the hub; then the outcome.
    assert f"tiny: acme/tiny → {tmp / 'models' / 'models--acme--tiny'}: 3 files, 11.5 MB, " \
        "11.5 MB to download" in result.stdout
    assert "tiny: downloaded" in result.stdout
    assert not hub.gets("original/model.safetensors") and not hub.gets("metal/model.bin")
    assert {r.auth for r in hub.requests} == {"Bearer hf_secret"}, "HF_TOKEN is sent"
    assert states(hub, catalog)["tiny"] == "downloaded"
    assert states(hub, catalog)["tiny-proc"] == "missing", "another cache, not pulled yet"

    fetched = len([r for r in hub.requests if "/resolve/" in r.path])
    again = run(hub, "pull", "tiny", "--config", str(catalog), home=tmp)
    assert again.returncode == 0, again.stderr
    assert "tiny: already downloaded" in again.stdout
    assert len([r for r in hub.requests if "/resolve/" in r.path]) == fetched, (
        "a second pull transfers nothing")


def test_pull_all_fills_every_enabled_models_cache_and_skips_local_weights(hub, catalog):
    tmp = catalog.parent
    result = run(hub, "pull", "--all", "--config", str(catalog), home=tmp)
    assert result.returncode == 0, result.stderr
    assert (snapshot(tmp / "models") / "model.safetensors").is_file()
    assert (snapshot(tmp / "proc-cache") / "model.safetensors").is_file()
    assert "local" not in result.stdout and "gone" not in result.stdout + result.stderr
    pulled = states(hub, catalog)
    assert (pulled["tiny"], pulled["tiny-proc"], pulled["local"]) == (
        "downloaded", "downloaded", None)
    local = run(hub, "pull", "local", "--config", str(catalog), home=tmp)
    assert local.returncode == 0
    assert "local: nothing to pull: its weights are a local path (./tiny.gguf)" in local.stdout


def test_a_dropped_connection_resumes_where_it_stopped(hub, catalog):
    hub.drop_after["model.safetensors"] = CHUNK + 20_000
    result = run(hub, "pull", "tiny", "--config", str(catalog), home=catalog.parent)
    assert result.returncode == 0, result.stderr
    first, second = hub.gets("model.safetensors")
    assert (first.range, second.range) == (None, f"bytes={CHUNK}-"), "from the last chunk"
    assert (snapshot(catalog.parent / "models") / "model.safetensors").read_bytes() == WEIGHTS


def test_a_failed_pull_keeps_finished_files_and_the_next_one_completes(hub, catalog):
    tmp = catalog.parent
    hub.broken["model.safetensors"] = 500
    failed = run(hub, "pull", "tiny", "--config", str(catalog), home=tmp)
    assert failed.returncode == 1
    assert "tiny: acme/tiny: the hub at" in failed.stderr and "answered 500" in failed.stderr
    assert states(hub, catalog)["tiny"] == "partial"
    done_before = len(hub.gets("config.json"))
    assert done_before == 1

    del hub.broken["model.safetensors"]
    result = run(hub, "pull", "tiny", "--config", str(catalog), home=tmp)
    assert result.returncode == 0, result.stderr
    assert len(hub.gets("config.json")) == done_before, "finished files are not fetched again"
    assert (snapshot(tmp / "models") / "model.safetensors").read_bytes() == WEIGHTS
    assert states(hub, catalog)["tiny"] == "downloaded"


def test_a_missing_or_gated_repo_and_an_unknown_model_say_what_to_do(hub, catalog):
    tmp = catalog.parent
    gone = run(hub, "pull", "gone", "--config", str(catalog), home=tmp)
    assert gone.returncode == 1
    assert "acme/nothing-here was not found on " + hub.url in gone.stderr
    assert "check the model's `weights:` repo name" in gone.stderr and "HF_TOKEN" in gone.stderr
    gated = run(hub, "pull", "gated", "--config", str(catalog), home=tmp)
    assert gated.returncode == 1
    assert "acme/gated is gated" in gated.stderr and "set HF_TOKEN" in gated.stderr
    typo = run(hub, "pull", "tinny", "--config", str(catalog), home=tmp)
    assert typo.returncode == 2
    assert "no model 'tinny'" in typo.stderr and "did you mean tiny" in typo.stderr
    nothing = run(hub, "pull", "--config", str(catalog), home=tmp)
    assert nothing.returncode == 2 and "name models to pull, or give --all" in nothing.stderr


async def test_the_gateway_and_status_show_whether_weights_are_here(start_gateway, tmp_path):
    gw = await start_gateway(hub_model(tmp_path) + f"""
        small:
          command: {fake()}
          memory_gb: 1
    """)

    async def views() -> dict:
        async with gw.http.get(gw.url + "/api/models") as resp:
            assert resp.status == 200
            return await resp.json()

    await gw.supervisor.refresh_weights()  # the first read, begun at the start, is done
    body = await views()
    assert {m["id"]: m["weights_state"] for m in body["models"]} == {
        "big": "missing", "small": None}
    console = Console(width=160, record=True)
    console.print(status_table(body, all_models=True))
    assert "stopped, weights missing (sparkstack pull)" in console.export_text()

    # The weights arrive (as a pull or the engine leaves them): the views follow once the
    # gateway has looked again (every 30 s, or at once after a start or a stop).
    weights_arrive(tmp_path / "hub", "acme/big")
    await gw.supervisor.refresh_weights()
    assert {m["id"]: m for m in (await views())["models"]}["big"]["weights_state"] == (
        "downloaded")


def hub_model(tmp_path: Path) -> str:
    """`big`: a vLLM entry whose weights (acme/big) live in the hub cache tmp_path/hub."""
    return f"""
        big:
          engine: vllm
          command: {fake()}
          weights: acme/big
          env: {{HF_HUB_CACHE: "{tmp_path / 'hub'}"}}
          memory_gb: 1
    """


def weights_arrive(cache: Path, repo: str) -> None:
    """Complete weights in a hub cache, as the engine's own download leaves them."""
    snap = cache / ("models--" + repo.replace("/", "--")) / "snapshots" / "c0ffee"
    snap.mkdir(parents=True)
    (snap.parent.parent / "refs").mkdir()
    (snap.parent.parent / "refs" / "main").write_text("c0ffee")
    (snap / "config.json").write_text("{}")
    (snap / "model.safetensors").write_bytes(b"w" * 64)


async def test_a_view_reads_the_weights_state_in_memory_never_the_disk(tmp_path):
    path = tmp_path / "c.yaml"
    entry = textwrap.indent(textwrap.dedent(hub_model(tmp_path)), "  ")
    path.write_text("memory_gb: 4\nmodels:" + entry)
    # Read every hour only, unless something happens: the test says when it does.
    sup = Supervisor(load_config(path), {"process": ProcessRuntime()}, 4,
                     data_dir=tmp_path / "data", weights_interval=3600)
    assert sup.model_view("big").weights_state is None, "not read before the supervisor runs"
    async with sup:
        await sup.refresh_weights()
        assert sup.model_view("big").weights_state == "missing"
        weights_arrive(tmp_path / "hub", "acme/big")
        assert sup.model_view("big").weights_state == "missing", "a view looked at the disk"
        # A start is one moment it is read again (the engine may have fetched them): the
        # change comes as an event, as a state change does, for the dashboard.
        seen = asyncio.Event()
        sup.bus.subscribe(lambda e: isinstance(e, ModelChanged)
                          and e.model.weights_state == "downloaded" and seen.set())
        await asyncio.wait_for(sup.load("big"), 60)
        await asyncio.wait_for(seen.wait(), 60)
        assert sup.model_view("big").weights_state == "downloaded"


def test_check_says_which_weights_are_here_and_how_to_fetch_the_rest(hub, catalog):
    tmp = catalog.parent
    assert run(hub, "pull", "tiny", "--config", str(catalog), home=tmp).returncode == 0
    result = run(hub, "check", "--config", str(catalog), home=tmp)
    assert ("weights on disk for 1 of 2 models; the others (tiny-proc) download on their "
            "first start: `sparkstack pull <id>` fetches them ahead") in result.stdout
