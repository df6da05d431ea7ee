"""What one pipeline run produced and decided, read from its reports: the DAG's summary task and `ftlib run` print it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ftlib.core.atomic import write_text


def summary(reports: Path, splits: Path) -> dict[str, Any]:
    """One dict (and reports/summary.md) with what the run produced and decided."""
    def read(name: str) -> dict[str, Any]:
        f = reports / name
        return json.loads(f.read_text()) if f.is_file() else {}

    metrics, gate, reg, bench = read("metrics.json"), read("gate.json"), read("registration.json"), read("benchmark.json")
    counts = {s: sum(1 for line in (splits / f"{s}.jsonl").open() if line.strip()) if (splits / f"{s}.jsonl").is_file() else 0
              for s in ("train", "validation", "test")}
    shipped = [v["name"] for v in bench.get("variants", []) if v.get("shippable") and str(v.get("kind", "")).startswith("gguf")]
    s = {
        "examples": counts,
        "accuracy": metrics.get("accuracy", metrics.get("exact_match")), "f1": metrics.get("f1"),
        "gate": "passed" if gate.get("passed") else ("refused" if gate else "not run"),
        "gate_reasons": gate.get("reasons", []),
        "champion_rescored": (gate.get("champion") or {}).get("score"),
        "tfidf_baseline": (gate.get("baseline") or {}).get("score"), "base_model_rescored": (gate.get("base") or {}).get("score"),
        "registered": reg.get("uri") if reg.get("version") else None,
        "registration": reg.get("status", "not run"),
        "q8_0_decode_ratio": bench.get("ratio"), "shipped_gguf": shipped,
    }
    lines = ["# ftlib run summary", "", "| | |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in rows(s)]
    write_text(reports / "summary.md", "\n".join(lines) + "\n")
    return s


def rows(s: dict[str, Any]) -> list[tuple[str, str]]:
    """(label, value) of each summary entry as a person reads them: summary.md, the CLI table, the task log."""
    return [(k.replace("_", " "), readable(v)) for k, v in s.items()]


def readable(v: Any) -> str:
    """A summary value as a person reads it: 3 decimals, counts with separators, lists and dicts spelled out, '-' for none."""
    if v is None or v == [] or v == {}:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return f"{v:.3f}"
    if isinstance(v, int):
        return f"{v:,}"
    if isinstance(v, dict):
        return ", ".join(f"{k} {readable(x)}" for k, x in v.items())
    if isinstance(v, (list, tuple)):
        return "; ".join(readable(x) for x in v)
    return str(v)
