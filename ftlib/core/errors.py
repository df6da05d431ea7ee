"""Errors every layer raises and the faces map to exit codes (ftlib/cli/main.py `exit_code`), and what both
model loading (models) and its safety checks (security) need, so neither imports the other."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any


class ModelError(RuntimeError):
    """A model string that cannot be resolved; the message says what to do."""


def cache_dir() -> Path:
    """Where converted models live: $FTLIB_CACHE, else ~/.cache/ftlib."""
    return Path(os.environ.get("FTLIB_CACHE") or Path.home() / ".cache" / "ftlib")


class InvalidData(ValueError):
    """Data that breaks the contract (bad rows, an unreadable file, a malformed review sheet): nothing
    downstream ran. `issues` (FILE:LINE: RULE: message each) say where; `path` is the file, when one.
    The CLI prints the issues and exits 1, as `ftlib validate` does for invalid data."""

    def __init__(self, message: str, issues: list[Any] | None = None, path: str | Path | None = None):
        super().__init__(message)
        self.issues = list(issues or [])
        self.path = path
