"""The API key when the config names none: from the environment, or generated once.

Never a well-known default: the first run generates a random key and stores it (0600)
in the data directory, so the same key works across restarts.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path

ENV_KEYS = ("SPARKSTACK_API_KEY", "VLLM_API_KEY")


def default_api_key(data_dir: Path) -> tuple[str, str]:
    """(key, where it came from)."""
    for name in ENV_KEYS:
        if os.environ.get(name, "").strip():
            return os.environ[name].strip(), f"${name}"
    path = data_dir / "api_key"
    if path.exists():
        key = path.read_text().strip()
        if key:
            return key, str(path)
    data_dir.mkdir(parents=True, exist_ok=True)
    key = "sk-spark-" + secrets.token_urlsafe(24)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(key + "\n")
    return key, f"{path} (generated)"
