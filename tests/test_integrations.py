"""`sparkstack integrations`: generated client configs parse, validate, and carry the
catalog's numbers."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest
import yaml

from sparkstack.config import builtin_catalog, load_config
from sparkstack.gateway.shaping import rules_for
from sparkstack.integrations import generate

SCHEMA = json.loads(Path(__file__).with_name("schemas").joinpath(
    "opencode-config.schema.json").read_text())
DGX = load_config(builtin_catalog("dgx-spark"), env={"HF_HOME": "/hf"})
UTILITY = next(m.id for m in DGX.models.values() if m.cfg.pinned)


def chat_ids(config) -> set[str]:
    return {m.id for m in config.models.values()
            if m.enabled and "chat" in m.cfg.capabilities}


def test_opencode_config_validates_and_carries_the_catalogs_numbers():
    out = generate("opencode", DGX)
    doc = json.loads(out.text)
    jsonschema.validate(doc, SCHEMA)
    provider = doc["provider"]["sparkstack"]
    assert provider["options"]["baseURL"] == "http://127.0.0.1:8009/v1"
    assert provider["options"]["apiKey"] == "{env:SPARKSTACK_API_KEY}"
    assert provider["options"]["timeout"] >= 30 * 60 * 1000, "covers a 30-minute cold start"
    assert set(provider["models"]) == chat_ids(DGX)
    for model_id, entry in provider["models"].items():
        m = DGX.models[model_id]
        assert entry["limit"]["context"] == m.cfg.max_model_len
        assert entry["limit"]["output"] <= entry["limit"]["context"] // 4
        assert entry["tool_call"] is (rules_for(m).tools != "none")
        assert entry["attachment"] is ("vision" in m.cfg.capabilities)
    assert provider["models"]["gpt-oss-20b"]["tool_call"] is True
    assert provider["models"]["gpt-oss-20b"]["reasoning"] is True
    assert doc["small_model"] == f"sparkstack/{UTILITY}"
    main = provider["models"][doc["model"].removeprefix("sparkstack/")]
    assert main["tool_call"] and main["limit"]["context"] >= 65536
    notes = "\n".join(out.notes)
    assert "qwen2.5-coder-7b-instruct: its 32768-token context is too small for " \
           "OpenCode's ~35k-token requests" in notes


def test_a_misspelt_key_would_fail_the_schema():
    """The schema check can fail: it is not satisfied by any JSON object."""
    doc = json.loads(generate("opencode", DGX).text)
    doc["provider"]["sparkstack"]["models"]["gpt-oss-20b"]["limits"] = {}
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(doc, SCHEMA)


def test_the_key_is_an_environment_reference_unless_asked_for():
    for client in ("opencode", "cline", "continue", "openwebui", "aider", "env"):
        out = generate(client, DGX)
        assert "sk-secret-123456" not in out.text + "".join(out.notes)
        assert "SPARKSTACK_API_KEY" in out.text + "".join(out.notes), client
        keyed = generate(client, DGX, key="sk-secret-123456")
        assert "sk-secret-123456" in keyed.text + "".join(keyed.notes), client


SMALL = load_config(text="""
models:
  chat:
    engine: llamacpp
    weights: model.gguf
    max_model_len: 4096
    args: [--parallel, "2"]
    capabilities: [chat, completions]
  helper:
    engine: llamacpp
    weights: model.gguf
    max_model_len: 2048
    pinned: true
    capabilities: [chat]
  embed:
    engine: llamacpp
    weights: model.gguf
    args: [--embedding]
    capabilities: [embeddings]
""", env={})


def test_continue_config_has_roles_and_contexts():
    doc = yaml.safe_load(generate("continue", SMALL).text)
    assert doc["schema"] == "v1" and doc["name"] and doc["version"]
    by_name = {m["name"]: m for m in doc["models"]}
    assert by_name["chat"]["roles"] == ["chat", "edit", "apply"]
    assert by_name["chat"]["capabilities"] == ["tool_use"]  # llama.cpp: Jinja templates
    # The window a request really gets: the template gives each llama.cpp slot all of it.
    assert by_name["chat"]["defaultCompletionOptions"]["contextLength"] == 4096
    assert "summarize" in by_name["helper"]["roles"]
    assert by_name["embed"]["roles"] == ["embed"]
    assert all(m["apiBase"] == "http://127.0.0.1:8009/v1" for m in doc["models"])
    assert all(m["apiKey"] == "${{ secrets.SPARKSTACK_API_KEY }}" for m in doc["models"])


def test_aider_metadata_carries_context_windows():
    meta = json.loads(generate("aider", DGX).text)
    assert meta["openai/gpt-oss-120b"]["max_input_tokens"] == 131072
    assert meta["openai/qwen2.5-coder-7b-instruct"]["max_input_tokens"] == 32768
    assert all(v["litellm_provider"] == "openai" and v["mode"] == "chat" for v in meta.values())


def test_open_webui_env_points_tasks_at_the_utility_model():
    out = generate("openwebui", DGX, url="http://spark.lan:8009")
    env = dict(line.split("=", 1) for line in out.text.splitlines())
    assert env["OPENAI_API_BASE_URL"] == "http://spark.lan:8009/v1"
    assert env["TASK_MODEL_EXTERNAL"] == UTILITY
    assert env["ENABLE_OLLAMA_API"] == "False"
    small = dict(line.split("=", 1) for line in generate("openwebui", SMALL).text.splitlines())
    assert small["RAG_EMBEDDING_MODEL"] == "embed" and small["TASK_MODEL_EXTERNAL"] == "helper"


def test_cline_values_and_plain_env():
    out = generate("cline", DGX, model="gpt-oss-20b")
    assert "Base URL:              http://127.0.0.1:8009/v1" in out.text
    assert "Model ID:              gpt-oss-20b" in out.text
    assert "Context Window Size: 131072" in out.text
    env = generate("env", DGX).text
    assert "export OPENAI_BASE_URL=http://127.0.0.1:8009/v1" in env
    assert 'export OPENAI_API_KEY="${SPARKSTACK_API_KEY}"' in env
    with pytest.raises(ValueError, match="not an enabled chat model"):
        generate("cline", DGX, model="nope")


def test_the_command_prints_the_file_on_stdout_and_notes_on_stderr(tmp_path):
    env = {**os.environ, "SPARKSTACK_DATA_DIR": str(tmp_path), "SPARKSTACK_API_KEY": ""}
    run = [sys.executable, "-m", "sparkstack.cli", "integrations"]
    result = subprocess.run([*run, "opencode", "--catalog", "dgx-spark"], capture_output=True,
                            text=True, timeout=60, env=env)
    assert result.returncode == 0, result.stderr
    json.loads(result.stdout)  # redirectable into opencode.json as it is
    assert "# save as opencode.json" in result.stderr
    keyed = subprocess.run([*run, "env", "--catalog", "demo-cpu", "--with-key"],
                           capture_output=True, text=True, timeout=60, env=env)
    generated = (tmp_path / "api_key").read_text().strip()
    assert f'OPENAI_API_KEY="{generated}"' in keyed.stdout, "the key serve would use"
    bad = subprocess.run([*run, "vim"], capture_output=True, text=True, timeout=60, env=env)
    assert bad.returncode == 2 and "unknown client 'vim'" in bad.stderr
