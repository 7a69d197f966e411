"""The catalog file: expansion, durations, and errors that name file, model and field."""

from __future__ import annotations

import pytest

from sparkstack.config import ConfigError, load_config, parse_duration, substitute_port


def test_variables_expand_with_defaults_and_port_is_left_for_the_runtime():
    cfg = load_config(text="""
models:
  m:
    command: [serve, --port, "${PORT}", --key, "${KEY}", --dir, "${DIR:-/models}", "$${HOME}"]
    env: {TOKEN: "${MISSING}"}
""", env={"KEY": "abc"})
    m = cfg.models["m"]
    assert m.cfg.command == ["serve", "--port", "${PORT}", "--key", "abc", "--dir", "/models",
                             "${HOME}"]
    assert substitute_port(m.cfg.command[2], 8123) == "8123"
    assert m.cfg.env == {"TOKEN": ""}
    assert any("MISSING" in w for w in cfg.warnings)


@pytest.mark.parametrize(("text", "seconds"), [
    ("90s", 90), ("5m", 300), ("1h", 3600), ("1h30m", 5400), ("250ms", 0.25), (42, 42),
    ("15", 15),
])
def test_durations(text, seconds):
    assert parse_duration(text) == seconds


def test_defaults_apply_per_model():
    cfg = load_config(text="""
idle_ttl: 5m
busy_policy: reject
models:
  a: {command: [x]}
  b: {command: [x], ttl: 0, busy_policy: queue, served_name: bee}
""", env={})
    assert (cfg.models["a"].ttl, cfg.models["a"].busy_policy) == (300, "reject")
    assert (cfg.models["b"].ttl, cfg.models["b"].busy_policy) == (0, "queue")
    assert cfg.resolve("bee") is cfg.models["b"]
    assert cfg.models["a"].cfg.health_timeout == 900, "15 minutes: big models load slowly"


def test_every_problem_is_reported_with_file_model_and_field(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("""
listen: nowhere
memory_gb: 10
colour: blue
models:
  a:
    command: [x]
    memory_gb: -1
    tll: 5m
  b:
    runtime: process
    health_timeout: soon
  c:
    command: [x]
    memory_gb: 12
    aliases: [a]
""")
    with pytest.raises(ConfigError) as e:
        load_config(path)
    text = "\n".join(e.value.problems)
    assert f"{path}: field 'listen'" in text
    assert f"{path}: field 'colour': unknown key" in text
    assert "model 'a', field 'memory_gb'" in text
    assert "model 'a', field 'tll': unknown key" in text
    assert "model 'b', field 'health_timeout'" in text and "not a duration" in text
    assert "model 'b'" in text and "needs a 'command'" in text
    assert len(e.value.problems) == 6


def test_semantic_problems_are_all_reported():
    with pytest.raises(ConfigError) as e:
        load_config(text="""
memory_gb: 10
api_keys: [short]
models:
  a: {command: [x], memory_gb: 12, aliases: [b]}
  b: {command: [x], pinned: true}
  c: {command: [x], aliases: [z]}
  d: {command: [x], aliases: [z], stand_ins: [a, nope, z, d]}
""", env={})
    text = "\n".join(e.value.problems)
    assert "model 'd', field 'stand_ins': 'nope' is not a model id of this catalog" in text
    assert "'z' is not a model id of this catalog (an alias of 'c': name the id)" in text
    assert "model 'd', field 'stand_ins': a model cannot stand in for itself" in text
    with pytest.raises(ConfigError) as e:
        load_config(text="models:\n  e: {command: [x], stand_ins: all}\n", env={})
    assert "model 'e', field 'stand_ins': Input should be 'any'" in "\n".join(e.value.problems)
    assert "'memory_gb': 12 GB does not fit the budget memory_gb=10" in text
    assert "'b' is another model's id" in text
    assert "'z' is already an alias of 'c'" in text
    assert "at least 8 characters" in text


def test_model_named_like_a_yaml_1_1_boolean_stays_a_name():
    cfg = load_config(text="models:\n  off: {command: [x]}\n  yes: {command: [x]}\n", env={})
    assert list(cfg.models) == ["off", "yes"]
