"""The cache folder: where downloads, generated datasets and decoded probes are kept between runs."""

from __future__ import annotations

import os
from pathlib import Path

CACHE_ENV = "LIGHTNING_DISSECT_CACHE"


def cache_root() -> Path:
    """The cache directory: `$LIGHTNING_DISSECT_CACHE`, else `$XDG_CACHE_HOME/lightning_dissect`, else
    `~/.cache/lightning_dissect`."""
    configured = os.environ.get(CACHE_ENV)
    if configured:
        return Path(configured).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "lightning_dissect"
