"""Writing a model (a directory or a file) so that a failure never leaves half a model
where the previous complete one was.

The new model is written next to the old one (`NAME.tmp`, same filesystem) and renamed
into place only once complete. On a failure -- a full disk, a file-size limit, any error
-- the temp copy is removed (it would only fill the disk further) and the previous model
is untouched. A full disk becomes DiskFullError with a message that says so.
"""

from __future__ import annotations

import errno
import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

# Rust writers (safetensors) and subprocesses (llama.cpp's converter) report these as text.
_FULL_TEXTS = ("No space left on device", "File too large", "Disk quota exceeded", "os error 28", "os error 27")


class DiskFullError(OSError):
    """No space (or no quota) left while writing a model; the previous model is untouched."""


def is_disk_full(e: BaseException) -> bool:
    if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT):
        return True
    return any(t in str(e) for t in _FULL_TEXTS)


def _remove(p: Path) -> None:
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p, ignore_errors=True)
    elif p.exists() or p.is_symlink():
        p.unlink()


@contextmanager
def replacing(out: str | Path, what: str = "model", per_process: bool = False) -> Iterator[Path]:
    """Yield a temp path to write `out`'s new content to; it replaces `out` on success.
    per_process: temp names carry the pid, for outputs several processes may write at once (a cache)."""
    out = Path(out)
    tag = f".{os.getpid()}" if per_process else ""
    tmp, old = out.with_name(out.name + ".tmp" + tag), out.with_name(out.name + ".old" + tag)
    _remove(tmp)
    try:
        yield tmp
    except BaseException as e:
        _remove(tmp)
        if is_disk_full(e):
            raise DiskFullError(errno.ENOSPC, f"no space left while writing the {what} {out} ({e}); "
                                f"nothing was replaced: {out} still holds the previous {what}. "
                                "Free some space (or point the output elsewhere) and rerun") from e
        raise
    if not (tmp.exists() or tmp.is_symlink()):  # the writer wrote nothing: keep the old model
        raise RuntimeError(f"nothing was written for the {what} {out}; {out} still holds the previous {what}")
    # Two renames in one directory: `out` is always the old model or the new one, never a mix.
    _remove(old)
    had_old = out.exists() or out.is_symlink()
    if had_old:
        out.rename(old)
    try:
        tmp.rename(out)
    except BaseException:
        if had_old:
            old.rename(out)  # put the previous model back
        raise
    _remove(old)


def write_text(path: str | Path, text: str) -> Path:
    """Write a small file (a report, a record) whole or not at all: temp file in the same directory, then rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with replacing(path, "file") as tmp:
        tmp.write_text(text, encoding="utf-8")
    return path


def write_json(path: str | Path, obj: object) -> Path:
    """write_text of indented JSON (UTF-8, non-ASCII kept), the form every ftlib report and record takes."""
    import json

    return write_text(path, json.dumps(obj, indent=2, ensure_ascii=False) + "\n")
