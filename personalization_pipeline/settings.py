"""Where the pipeline keeps its files, from the environment.

`PP_DATA_DIR` (absolute; default `./.pp_data` resolved at start-up) holds:
  landing/  published landing files from the ingest service (ready/...)
  lake/     staged history and quarantine as Parquet, resolved tables
  state/    coordination.sqlite (rate-limit buckets), secrets.json (0600), pipeline.sqlite
"""

from __future__ import annotations

import os
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent
CONFIG_DIR = PACKAGE_DIR / "config"


class ConfigError(ValueError):
    """Configuration is missing or wrong; the message says which setting and how to fix it."""


def data_dir() -> Path:
    raw = os.environ.get("PP_DATA_DIR", "").strip()
    path = Path(raw) if raw else Path.cwd() / ".pp_data"
    if raw and not path.is_absolute():
        raise ConfigError(f"PP_DATA_DIR must be an absolute path, got {raw!r}")
    return path.resolve()


def _sub(name: str, override: str | None) -> Path:
    path = Path(override) if override else data_dir() / name
    path.mkdir(parents=True, exist_ok=True)
    return path


def state_dir(override: str | None = None) -> Path:
    return _sub("state", override)


def lake_dir(override: str | None = None) -> Path:
    return _sub("lake", override)


def landing_dir(override: str | None = None) -> Path:
    return _sub("landing", override)


def env_float(name: str, default: float) -> float:
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        return float(raw)
    except ValueError:
        raise ConfigError(f"{name} must be a number, got {raw!r}") from None
