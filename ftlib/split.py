"""Stage `split`: a stable train/validation/test split.

An example's split is a function of its content only: the salted SHA-256 of its prompt
picks a point u in [0, 1), and u < train -> train, u < train + validation -> validation,
else test. Consequences:
  * appending data never moves an old example to another split (no test leakage when
    you retrain on more data);
  * exact-duplicate prompts hash alike, so they always land in the same split;
  * every label is cut by the same thresholds, so each label gets the configured ratios
    (stratified up to sampling noise: exact per-label counts are printed and stored).

The stage validates first and refuses invalid data, so nothing downstream ever trains
on rows that broke a contract.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from ftlib.config import Params
from ftlib.formats import write_jsonl
from ftlib.validate import ValidationResult, content_key, prompt_key, validate_paths

SPLITS = ("train", "validation", "test")


class InvalidData(RuntimeError):
    """The input failed validation; `result` holds the issues (exit code 1)."""

    def __init__(self, result: ValidationResult):
        super().__init__(f"{len(result.errors)} validation error(s); nothing was written")
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


def split_paths(
    paths: list[str | Path],
    params: Params,
    out_dir: str | Path = "data/splits",
    tokenizer: Any = None,
    progress: Callable[[str, int, int], None] | None = None,
) -> SplitResult:
    """Validate `paths`, then write train/validation/test.jsonl into out_dir."""
    checked = validate_paths(paths, params, tokenizer=tokenizer, progress=progress)
    if not checked.ok:
        raise InvalidData(checked)

    buckets: dict[str, list[dict[str, Any]]] = {s: [] for s in SPLITS}
    seen: set[str] = set()
    dropped = 0
    per_label: dict[str, Counter[str]] = {s: Counter() for s in SPLITS}
    for row in checked.valid_rows():
        # Exact duplicates can only reach here as warnings: keep the first copy.
        full = content_key(row.obj)
        if full in seen:
            dropped += 1
            continue
        seen.add(full)
        split = assign(prompt_key(row.obj), params)
        buckets[split].append(row.obj)
        if params.data.task == "classification":
            per_label[split][label_of(row.obj)] += 1

    out = Path(out_dir)
    for split, objs in buckets.items():
        write_jsonl(out / f"{split}.jsonl", objs)
    return SplitResult(
        str(out),
        {s: len(v) for s, v in buckets.items()},
        {s: dict(sorted(c.items())) for s, c in per_label.items()} if params.data.task == "classification" else {},
        dropped,
        checked,
    )
