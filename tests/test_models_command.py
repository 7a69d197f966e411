"""What a user sees of a catalog from the command line: `sparkstack models` in an
80-column terminal, --wide, --json and --tag; and `sparkstack check` verifying what the
models `require`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from sparkstack import hostcheck
from sparkstack.config import builtin_catalog, load_config

SPARKSTACK = [sys.executable, "-m", "sparkstack.cli"]


def run_cli(*args: str, columns: int = 80, env: dict[str, str] | None = None,
            ) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*SPARKSTACK, *args], capture_output=True, text=True, timeout=60,
                          env={**os.environ, "COLUMNS": str(columns), **(env or {})})


@pytest.fixture(scope="module")
def dgx():
    return load_config(builtin_catalog("dgx-spark"))


def test_models_fits_an_80_column_terminal(dgx):
    result = run_cli("models", "--catalog", "dgx-spark")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert max(len(line) for line in lines) <= 80
    rows = [line.split() for line in lines]
    for model in dgx.models.values():
        if len(model.id) <= 30:  # longer ids fold onto a second line, still whole
            row = next(r for r in rows if r and r[0] == model.id)
            assert row[1] == model.cfg.status
    # One line per model (two for the longest ids), not a notes column wrapped one
    # word per line as before.
    body = [line for line in lines if line.strip()][3:-1]
    assert len(dgx.models) <= len(body) <= len(dgx.models) + sum(
        len(m) > 30 for m in dgx.models)


def test_models_wide_has_one_line_per_model_with_image_tags_and_notes(dgx):
    result = run_cli("models", "--catalog", "dgx-spark", "--wide")
    assert result.returncode == 0, result.stderr
    for model in dgx.models.values():
        line = next(line for line in result.stdout.splitlines() if f" {model.id} " in line)
        assert model.cfg.image in line
        assert ", ".join(model.cfg.tags) in line
        assert " ".join(model.cfg.notes.split())[:60] in line


def test_models_json_is_for_scripts(dgx):
    result = run_cli("models", "--catalog", "dgx-spark", "--json")
    assert result.returncode == 0, result.stderr
    models = {m["id"]: m for m in json.loads(result.stdout)}
    assert list(models) == list(dgx.models)
    phi = models["phi-4-reasoning-plus-fp4"]
    assert (phi["status"], phi["tags"]) == ("disabled", ["chat", "reasoning"])
    assert models["qwen2.5-1.5b-instruct"]["pinned"] is True
    assert models["qwen3.6-27b-fp8"]["requires"]["min_driver"] == "580"


def test_models_tag_filters_and_unknown_tags_are_refused(dgx):
    result = run_cli("models", "--catalog", "dgx-spark", "--tag", "vision", "--json")
    shown = [m["id"] for m in json.loads(result.stdout)]
    assert shown == [m.id for m in dgx.models.values() if "vision" in m.cfg.tags]
    assert "deepseek-ocr" in shown and "gpt-oss-20b" not in shown
    both = run_cli("models", "--catalog", "dgx-spark", "--tag", "coder", "--tag", "reasoning")
    assert "tagged coder and reasoning" in both.stdout
    assert "glm-4.7-flash-awq" in both.stdout and "qwen3-coder-30b" not in both.stdout
    bad = run_cli("models", "--catalog", "dgx-spark", "--tag", "poetry")
    assert bad.returncode == 2
    assert "unknown tag(s): poetry" in bad.stderr and "coder" in bad.stderr


def test_a_tag_outside_the_vocabulary_is_a_config_error(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("models:\n  a: {command: [x], tags: [chat, poetry]}\n")
    result = run_cli("check", "--config", str(path))
    assert result.returncode == 2
    assert "model 'a', field 'tags': unknown tag(s) 'poetry'" in result.stderr


# ---------------------------------------------------------------- requires


def requiring(tmp_path: Path, requires: str) -> Path:
    path = tmp_path / "c.yaml"
    path.write_text(textwrap.dedent(f"""\
        models:
          needy:
            command: [x]
            requires: {requires}
          off:
            command: [x]
            status: disabled
            requires: {{files: [/nowhere/at/all], min_driver: "999"}}
    """))
    return path


def test_check_reports_a_required_file_that_is_missing_and_finds_globs(tmp_path):
    snapshot = tmp_path / "hub" / "snapshots" / "abc123"
    config = load_config(requiring(
        tmp_path, f"{{files: ['{tmp_path}/hub/snapshots/*/chat_template.jinja']}}"))
    (finding,) = [f for f in hostcheck._check_requires(list(config.models.values()))
                  if "chat_template" in f.text]
    assert not finding.ok and "missing (needed by needy)" in finding.text
    snapshot.mkdir(parents=True)
    (snapshot / "chat_template.jinja").write_text("{{ x }}")
    enabled = [m for m in config.models.values() if m.enabled]
    assert [f.ok for f in hostcheck._check_requires(enabled)] == [True], (
        "present now; the disabled model's requirements are not checked")


def test_check_compares_the_nvidia_driver_with_min_driver(tmp_path, monkeypatch):
    config = load_config(requiring(tmp_path, '{min_driver: "580.65"}'))
    models = [m for m in config.models.values() if m.enabled]
    for have, ok in ((None, False), ("575.51.03", False), ("580.65.06", True), ("590.1", True)):
        monkeypatch.setattr(hostcheck, "nvidia_driver_version", lambda have=have: have)
        (finding,) = hostcheck._check_requires(models)
        assert finding.ok is ok, have
        if not ok:
            assert "need 580.65 or newer (needy)" in finding.text


def test_check_command_prints_the_requirement_and_its_fix(tmp_path):
    path = requiring(tmp_path, f"{{files: ['{tmp_path}/missing-plugin.py']}}")
    result = run_cli("check", "--config", str(path), columns=200)
    assert result.returncode == 1
    assert f"{tmp_path}/missing-plugin.py: missing (needed by needy)" in result.stdout
    assert "fix: see the model's notes" in result.stdout


def test_the_driver_version_is_read_from_the_loaded_module(tmp_path):
    module = tmp_path / "version"
    module.write_text("580.95.05\n")
    proc = tmp_path / "proc-version"
    proc.write_text("NVRM version: NVIDIA UNIX Open Kernel Module for aarch64  580.95.05  "
                    "Release Build  (dvs-builder@U22)  Mon Oct 13 2025\n"
                    "GCC version:  gcc version 13.3.0 (Ubuntu 13.3.0-6ubuntu2~24.04)\n")
    missing = str(tmp_path / "none")
    assert hostcheck.nvidia_driver_version((str(module), str(proc))) == "580.95.05"
    assert hostcheck.nvidia_driver_version((missing, str(proc))) == "580.95.05"
    assert hostcheck.nvidia_driver_version((missing,)) is None
