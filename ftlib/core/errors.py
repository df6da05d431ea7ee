"""What both model loading (models) and its safety checks (security) need, so neither imports the other."""

from __future__ import annotations

import os
from pathlib import Path


class ModelError(RuntimeError):
    """A model string that cannot be resolved; the message says what to do."""


def cache_dir() -> Path:
    """Where converted models live: $FTLIB_CACHE, else ~/.cache/ftlib."""
    return Path(os.environ.get("FTLIB_CACHE") or Path.home() / ".cache" / "ftlib")
