"""LiteLLM's proxy as a baseline: the relay a Python user would pick instead of ours.

Configured as its documentation recommends for production, minus everything that would
cost it work ours does not do: one worker (like the gateway), the stub as an
OpenAI-compatible model, a master key (the gateway checks a key too), no database, no
spend or error logs, no callbacks, errors-only logging, and nothing fetched from the
network (the model cost map is the copy inside the package).

LiteLLM lives in a virtual environment of its own, `.venv-litellm`, made by
`scripts/litellm-venv.sh` (`make bench` runs it): its pins clash with the project's. Without
it the benchmark runs its other targets and says how to install it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from .common import ROOT

VENV = ROOT / ".venv-litellm"
INSTALL = "bash scripts/litellm-venv.sh"

READY_PATH = "/health/liveliness"  # answers once the app has started; needs no key
# The proxy's environment: no download, errors-only logs, no banner, no database schema work.
ENV = {
    "LITELLM_LOCAL_MODEL_COST_MAP": "True",  # no download of the cost map at start-up
    "LITELLM_LOG": "ERROR",
    "LITELLM_DONT_SHOW_FEEDBACK_BOX": "True",
    "DISABLE_SCHEMA_UPDATE": "True",
}
# Whatever the developer's shell points LiteLLM at must not follow it into the benchmark.
UNSET = ("DATABASE_URL", "DIRECT_URL", "REDIS_URL", "REDIS_HOST", "LITELLM_MASTER_KEY",
         "LITELLM_CONFIG_BUCKET_NAME", "CONFIG_FILE_PATH")


def version() -> str | None:
    """The LiteLLM in VENV (from its install record), or None when it is not installed."""
    if not executable().exists():
        return None
    for info in VENV.glob("lib/python*/site-packages/litellm-*.dist-info"):
        return info.name.removeprefix("litellm-").removesuffix(".dist-info")
    return None


def executable() -> Path:
    """`litellm`, the proxy's own CLI."""
    return VENV / "bin" / "litellm"


def config(model: str, upstream_port: int, key: str) -> str:
    """The proxy config (YAML; JSON is YAML): `model` served by the stub on `upstream_port`."""
    return json.dumps({
        "model_list": [{
            "model_name": model,
            "litellm_params": {"model": f"openai/{model}",
                               "api_base": f"http://127.0.0.1:{upstream_port}/v1",
                               "api_key": "none"},
            # A price of zero: the cost of every answer is computed without a miss in
            # the cost map (a miss is logged and would be slower than a hit).
            "model_info": {"input_cost_per_token": 0, "output_cost_per_token": 0},
        }],
        "litellm_settings": {"set_verbose": False, "json_logs": False, "telemetry": False,
                             "turn_off_message_logging": True, "callbacks": [],
                             "success_callback": [], "failure_callback": []},
        "general_settings": {"master_key": key, "disable_spend_logs": True,
                             "disable_error_logs": True},
    }, indent=1)


def command(config_path: Path, port: int) -> list[str]:
    return [str(executable()), "--config", str(config_path), "--host", "127.0.0.1",
            "--port", str(port), "--num_workers", "1"]


def environment() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in UNSET}
    env.update(ENV)
    return env

