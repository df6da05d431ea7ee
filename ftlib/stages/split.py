"""Stage `split`: a stable train/validation/test split.

An example's split is a function of its content only: the salted SHA-256 of its prompt
picks a point u in [0, 1), and u < train -> train, u < train + validation -> validation,
else test. Consequences:
  * appending data never moves an old example to another split (no test leakage when
    you retrain on more data);
  * exact-duplicate prompts hash alike, so they always land in the same split;
  * every label is cut by the same thresholds, so each label gets the configured ratios
    (stratified up to sampling noise: exact per-label counts are printed and stored).

The stage validates and refuses invalid data, so nothing downstream ever trains on rows
that broke a contract. It streams: rows go to temporary split files as validation passes
them, and the files replace the old splits only when the data as a whole is valid.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from ftlib.core import errors
from ftlib.core.config import SPLITS, Params
from ftlib.core.formats import Row
from ftlib.stages.validate import CHUNK_ROWS, ValidationResult, prompt_key, validate_paths



class InvalidData(errors.InvalidData):
    """The input failed validation; `result` holds the whole validation (its issues: exit code 1)."""

    def __init__(self, result: ValidationResult):
        super().__init__(f"{len(result.errors)} validation error(s); nothing was written", result.issues)
        self.result = result


@dataclass
class SplitResult:
    out_dir: str
    counts: dict[str, int]
    per_label: dict[str, dict[str, int]] = field(default_factory=dict)
    duplicates_dropped: int = 0
    validation: ValidationResult | None = None


def assign(key: str, params: Params) -> str:
    """The split of an example whose prompt key is `key`."""
    digest = hashlib.sha256(f"{params.split.seed}:{key}".encode()).digest()
    u = int.from_bytes(digest[:8], "big") / 2**64
    if u < params.split.train:
        return "train"
    if u < params.split.train + params.split.validation:
        return "validation"
    return "test"


def label_of(obj: dict[str, Any]) -> str:
    if "messages" in obj:
        return obj["messages"][-1]["content"].strip()
    return obj["output"].strip()


class _Writer:
    """Streams rows into <split>.jsonl.tmp files while validation runs: commit() moves them
    into place, discard() leaves no trace (not even the directories it created)."""

    def __init__(self, out: Path, params: Params):
        self.out, self.params = out, params
        self.handles: dict[str, Any] = {}
        self.created: list[Path] = []
        self.counts: Counter[str] = Counter({s: 0 for s in SPLITS})
        self.per_label: dict[str, Counter[str]] = {s: Counter() for s in SPLITS}
        self.dropped = 0

    def _open(self) -> None:
        self.created = [p for p in (self.out, *self.out.parents) if not p.exists()]
        self.out.mkdir(parents=True, exist_ok=True)
        for s in SPLITS:
            self.handles[s] = self._tmp(s).open("w", encoding="utf-8", newline="\n")

    def _tmp(self, split: str) -> Path:
        return self.out / f"{split}.jsonl.tmp"

    def add(self, rows: list[tuple[Row, bool]]) -> None:
        if not self.handles:
            self._open()
        classification = self.params.data.task == "classification"
        for row, repeat in rows:
            if repeat:  # exact duplicates only get here as warnings: keep the first copy
                self.dropped += 1
                continue
            split = assign(prompt_key(row.obj), self.params)
            self.handles[split].write(json.dumps(row.obj, ensure_ascii=False) + "\n")
            self.counts[split] += 1
            if classification:
                self.per_label[split][label_of(row.obj)] += 1

    def commit(self) -> None:
        if not self.handles:
            self._open()
        for s, h in self.handles.items():
            h.close()
            self._tmp(s).replace(self.out / f"{s}.jsonl")

    def discard(self) -> None:
        for s, h in self.handles.items():
            h.close()
            self._tmp(s).unlink(missing_ok=True)
        for d in self.created:  # deepest first; only if still empty
            try:
                d.rmdir()
            except OSError:
                break


def split_paths(
    paths: list[str | Path],
    params: Params,
    out_dir: str | Path = "data/splits",
    tokenizer: Any = None,
    progress: Callable[[str, int, int], None] | None = None,
    *,
    chunk_rows: int = CHUNK_ROWS,
) -> SplitResult:
    """Validate `paths` and write train/validation/test.jsonl into out_dir, in one streaming
    pass over the rows; on invalid data the files are discarded and nothing is written."""
    out = Path(out_dir)
    writer = _Writer(out, params)
    try:
        checked = validate_paths(paths, params, tokenizer=tokenizer, progress=progress, chunk_rows=chunk_rows, sink=writer.add)
    except BaseException:
        writer.discard()
        raise
    if not checked.ok:
        writer.discard()
        raise InvalidData(checked)
    writer.commit()
    return SplitResult(
        str(out),
        dict(writer.counts),
        {s: dict(sorted(c.items())) for s, c in writer.per_label.items()} if params.data.task == "classification" else {},
        writer.dropped,
        checked,
    )
