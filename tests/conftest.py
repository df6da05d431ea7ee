"""Shared fixtures. Everything here is real: the embedded SmolLM2 tokenizer (converted
once into ~/.cache/ftlib), temp git/DVC repos and a SQLite Airflow home."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from ftlib.core.config import Params, load_params

REPO = Path(__file__).resolve().parents[1]
LABELS = ["POSITIVO", "NEGATIVO", "NEUTRAL"]
# The gate's quality criteria (F1 bar, TF-IDF baseline, base model) switched off, for tests of the
# registry mechanics with tiny random models; tests/test_gate.py exercises the criteria themselves.
GATE_MECHANICS_ONLY = ["register.f1_threshold=0", "register.baseline_margin=null", "register.check_base_model=false"]


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
    from ftlib.core.models import load_tokenizer

    return load_tokenizer("embedded:smollm2-135m-instruct")


@pytest.fixture
def params() -> Params:
    # Data Docs are exercised by their own test; elsewhere they only cost time.
    return load_params(None, ["validate.data_docs=false"])


@pytest.fixture(scope="session", autouse=True)
def _mlflow_store(tmp_path_factory):
    """Every test logs to a throwaway local MLflow store, never the repo's mlflow.db."""
    import os

    root = tmp_path_factory.mktemp("mlflow")
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{root / 'mlflow.db'}"
    os.environ["MLFLOW_EXPERIMENT_NAME"] = "ftlib-tests"
    yield


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory, tokenizer) -> str:
    """A 2-layer random Llama with the embedded tokenizer: trains in seconds on a CPU."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    path = tmp_path_factory.mktemp("tiny-llama")
    cfg = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024, tie_word_embeddings=True,
                      bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


def make_splits(root: Path, n_train: int = 8, n_val: int = 4, n_test: int = 6) -> Path:
    rows = balanced(max(n_train, n_val, n_test) + 2)
    write_jsonl(root / "train.jsonl", rows[:n_train])
    write_jsonl(root / "validation.jsonl", rows[n_train:n_train + n_val])
    write_jsonl(root / "test.jsonl", rows[n_train + n_val:n_train + n_val + n_test])
    return root


def train_params(model: str, tmp: Path, *overrides: str) -> Params:
    """Params for a fast run: no eval, no checkpoints unless the test asks, outputs in tmp."""
    return load_params(REPO / "params.yaml", [
        f"base_model={model}", f"train.output_dir={tmp / 'adapter'}", f"train.checkpoint_dir={tmp / 'ckpt'}",
        "train.eval_steps=0", "train.save_steps=1000", "train.per_device_train_batch_size=4", "train.warmup_steps=0",
        *overrides,
    ])


@pytest.fixture(scope="session")
def tiny_adapter(tmp_path_factory, tiny_model) -> str:
    """A LoRA adapter trained for a few steps on the tiny model (shared by merge/prune/distill tests)."""
    from ftlib.stages.train import train

    tmp = tmp_path_factory.mktemp("tiny-adapter")
    data = make_splits(tmp / "splits")
    p = train_params(tiny_model, tmp, "train.method=lora", "train.max_steps=4", "train.learning_rate=5e-3")
    train(p, data, tmp / "reports")
    return p.train.output_dir
