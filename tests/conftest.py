"""Shared fixtures. Everything here is real: the embedded SmolLM2 tokenizer (converted
once into ~/.cache/ftlib), temp git/DVC repos and a SQLite Airflow home."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from ftlib.config import Params, load_params

REPO = Path(__file__).resolve().parents[1]
LABELS = ["POSITIVO", "NEGATIVO", "NEUTRAL"]


def write_jsonl(path: Path, rows: list[Any]) -> Path:
    """Rows may be dicts (dumped as JSON), str (written as is) or bytes (raw)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    data = b""
    for r in rows:
        if isinstance(r, bytes):
            data += r + b"\n"
        elif isinstance(r, str):
            data += r.encode() + b"\n"
        else:
            data += json.dumps(r, ensure_ascii=False).encode() + b"\n"
    path.write_bytes(data)
    return path


def alpaca(text: str, label: str = "POSITIVO", instruction: str = "Clasifica el sentimiento") -> dict[str, str]:
    return {"instruction": instruction, "input": text, "output": label}


def balanced(n_per_label: int, start: int = 0) -> list[dict[str, str]]:
    """Distinct, balanced sentiment rows (content varies so hashes differ)."""
    return [alpaca(f"{label.lower()} review number {i} about product {i * 7 % 13}", label)
            for i in range(start, start + n_per_label) for label in LABELS]


@pytest.fixture(scope="session")
def tokenizer():
    from ftlib.models import load_tokenizer

    return load_tokenizer("embedded:smollm2-135m-instruct")


@pytest.fixture
def params() -> Params:
    # Data Docs are exercised by their own test; elsewhere they only cost time.
    return load_params(None, ["validate.data_docs=false"])
