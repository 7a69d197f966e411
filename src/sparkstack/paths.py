"""Where sparkstack keeps its data: logs, the generated API key, the activity database."""

from __future__ import annotations

from pathlib import Path

from .config import Config, default_data_dir


def data_dir(config: Config | None = None) -> Path:
    if config is not None and config.settings.data_dir:
        d = Path(config.settings.data_dir).expanduser()
        return d if d.is_absolute() else (config.path.parent if config.path else Path.cwd()) / d
    return default_data_dir()
