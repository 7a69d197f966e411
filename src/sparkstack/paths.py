"""Where sparkstack keeps its data: logs, the generated API key, the activity database."""

from __future__ import annotations

import os
from pathlib import Path

from .config import Config


def data_dir(config: Config | None = None) -> Path:
    if config is not None and config.settings.data_dir:
        d = Path(config.settings.data_dir).expanduser()
        return d if d.is_absolute() else (config.path.parent if config.path else Path.cwd()) / d
    if os.environ.get("SPARKSTACK_DATA_DIR"):
        return Path(os.environ["SPARKSTACK_DATA_DIR"]).expanduser()
    xdg = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(xdg) / "sparkstack"
