"""Event-driven data landing: an Airflow asset watcher notices a settled burst of *.jsonl files in the
landing folder, from the triggerer (no DAG run per poll), and the `data_landing` DAG moves it into data/raw.

The trigger (LandingTrigger, an Airflow BaseEventTrigger) scans the folder every few seconds with one
os.scandir. A burst has settled when no *.jsonl file appeared, grew or changed for `quiet_s`
seconds; the trigger then claims it -- renames its files into landing/.settled/<claim>/, built under a
hidden name and published with one more rename -- and fires one event. The claim is what keeps a
restarted trigger (triggerer restart, redeploy) from announcing the same files again: they are no longer
at the top of the folder, like FileDeleteTrigger's unlink. `collect_settled` (the data_landing task) moves
every published claim into data/raw. A claim still there `refire_s` after it was announced (the event was
lost with a crashed triggerer, or the DAG was paused) is announced again, so nothing stays stranded.

Light at import (stdlib and airflow.triggers.base): the triggerer imports the class by its classpath,
DAG files import this module at parse time.
"""

from __future__ import annotations

import asyncio
import os
import stat
import time
import uuid
from collections.abc import AsyncIterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from airflow.triggers.base import BaseEventTrigger, TriggerEvent

SETTLED = ".settled"  # landing/.settled/<claim>/*.jsonl: bursts announced, waiting for data_landing to move them
PENDING = ".tmp-"  # a claim being built (hidden from the mover until it is complete)
Fingerprint = tuple[int, int]  # (size, mtime_ns): any write changes it


def scan(landing: Path) -> dict[str, Fingerprint]:
    """The *.jsonl regular files at the top of the landing folder (no symlinks, no dotfiles), with their
    fingerprints; {} when the folder does not exist yet."""
    out: dict[str, Fingerprint] = {}
    try:
        with os.scandir(landing) as entries:
            for e in entries:
                if e.name.endswith(".jsonl") and not e.name.startswith(".") and e.is_file(follow_symlinks=False):
                    try:
                        st = e.stat(follow_symlinks=False)
                    except FileNotFoundError:  # moved away between the listing and the stat
                        continue
                    out[e.name] = (st.st_size, st.st_mtime_ns)
    except FileNotFoundError:
        return {}
    return out


def _jsonl(folder: Path) -> list[str]:
    try:
        return sorted(p.name for p in folder.iterdir() if p.name.endswith(".jsonl"))
    except FileNotFoundError:  # data_landing moved the claim away meanwhile
        return []


def claim(landing: Path, files: dict[str, Fingerprint]) -> tuple[str, list[str]] | None:
    """Rename the files still matching their fingerprint into a new claim, landing/.settled/<claim>/; the
    claim's name and files, or None when none was left unchanged. The claim becomes visible to the mover
    only once complete (built as .settled/.tmp-<claim>, then renamed)."""
    settled = landing / SETTLED
    settled.mkdir(exist_ok=True)
    name = f"{datetime.now(timezone.utc):%Y%m%dT%H%M%S.%fZ}-{uuid.uuid4().hex[:6]}"
    building = settled / f"{PENDING}{name}"
    building.mkdir()
    taken = []
    for f, fingerprint in sorted(files.items()):
        src = landing / f
        try:
            st = os.stat(src, follow_symlinks=False)
            if not stat.S_ISREG(st.st_mode) or (st.st_size, st.st_mtime_ns) != fingerprint:
                continue  # written to since it was seen: it waits for the next quiet period
            os.rename(src, building / f)
        except FileNotFoundError:
            continue
        taken.append(f)
    if not taken:
        building.rmdir()
        return None
    os.rename(building, settled / name)
    return name, taken


def recover(landing: Path) -> list[tuple[str, list[str]]]:
    """Claims a previous trigger started building but never published (it stopped midway): publish them.
    They were never announced, so they are announced now."""
    out = []
    settled = landing / SETTLED
    for building in sorted(settled.glob(f"{PENDING}*")) if settled.is_dir() else []:
        name = building.name[len(PENDING):]
        try:
            os.rename(building, settled / name)
            os.utime(settled / name)  # announced now
        except FileNotFoundError:
            continue
        if files := _jsonl(settled / name):
            out.append((name, files))
    return out


def stale_claims(landing: Path, older_than_s: float) -> list[tuple[str, list[str]]]:
    """Published claims announced more than `older_than_s` ago and still not moved; their age restarts now
    (the claim folder's mtime is when it was last announced)."""
    settled = landing / SETTLED
    out = []
    for folder in sorted(settled.iterdir()) if settled.is_dir() else []:
        try:
            if folder.name.startswith(".") or not folder.is_dir() or time.time() - folder.stat().st_mtime < older_than_s:
                continue
            if files := _jsonl(folder):
                os.utime(folder)
                out.append((folder.name, files))
        except FileNotFoundError:  # moved by data_landing meanwhile
            continue
    return out


class LandingTrigger(BaseEventTrigger):
    """Fires one event per settled burst of *.jsonl files in `directory` (see the module docstring).

    :param directory: the landing folder (created by producers; a missing folder is waited for)
    :param quiet_s: a burst has settled when nothing appeared or changed for this long
    :param poll_s: seconds between scans (default: quiet_s / 5, at most 5 s)
    :param refire_s: announce a claim again when it is still unmoved this long after its event
    """

    def __init__(self, directory: str, quiet_s: float = 30.0, poll_s: float | None = None, refire_s: float = 600.0):
        super().__init__()
        self.directory = str(directory)
        self.quiet_s = float(quiet_s)
        self.poll_s = float(poll_s) if poll_s is not None else min(5.0, max(0.1, self.quiet_s / 5))
        self.refire_s = float(refire_s)

    def serialize(self) -> tuple[str, dict[str, Any]]:
        return (f"{type(self).__module__}.{type(self).__qualname__}",
                {"directory": self.directory, "quiet_s": self.quiet_s, "poll_s": self.poll_s, "refire_s": self.refire_s})

    def _event(self, name: str, files: list[str], again: bool = False) -> TriggerEvent:
        self.log.info("%s burst %s: %d file(s) in %s", "re-announcing" if again else "settled", name, len(files),
                      Path(self.directory, SETTLED, name))
        return TriggerEvent({"landing": self.directory, "claim": name, "files": files, "again": again})

    async def run(self) -> AsyncIterator[TriggerEvent]:
        landing = Path(self.directory)
        for name, files in await asyncio.to_thread(recover, landing):
            yield self._event(name, files)
        seen: dict[str, Fingerprint] | None = None
        since = time.monotonic()
        while True:
            files = await asyncio.to_thread(scan, landing)
            if files != seen:  # something appeared, changed or went: the quiet period starts again
                seen, since = files, time.monotonic()
            elif files and time.monotonic() - since >= self.quiet_s:
                claimed = await asyncio.to_thread(claim, landing, files)
                seen = None
                if claimed:
                    yield self._event(*claimed)
            for name, stale in await asyncio.to_thread(stale_claims, landing, self.refire_s):
                yield self._event(name, stale, again=True)
            await asyncio.sleep(self.poll_s)


def landing_asset(landing_dir: str | Path, quiet_s: float = 30.0) -> Any:
    """The `ftlib_landing` asset: the landing folder, watched by a LandingTrigger. `data_landing` is
    scheduled on it (the watcher only runs while a DAG scheduled on the asset is unpaused)."""
    from airflow.sdk import Asset, AssetWatcher

    directory = os.path.abspath(landing_dir)
    return Asset(name="ftlib_landing", uri=f"file://{directory}",
                 watchers=[AssetWatcher(name="ftlib_landing_settled", trigger=LandingTrigger(directory, quiet_s=quiet_s))])


def collect_settled(landing: Path, raw: Path) -> list[Path]:
    """Move every published claim (landing/.settled/<claim>/*.jsonl) into data/raw; the moved paths.
    Each file moves by atomic rename and never overwrites (orchestrate.collect_landed); emptied claims
    are removed. Unclaimed files at the top of the folder stay for the watcher."""
    from ftlib.airflow.orchestrate import collect_landed

    settled = Path(landing) / SETTLED
    moved: list[Path] = []
    for folder in sorted(settled.iterdir()) if settled.is_dir() else []:
        if folder.name.startswith(".") or not folder.is_dir():
            continue
        moved += collect_landed(folder, Path(raw), settle_s=0)
        try:
            folder.rmdir()
        except OSError:  # not empty (a file that is not *.jsonl) or already gone
            pass
    return moved
