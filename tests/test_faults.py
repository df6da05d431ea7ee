"""Faults a production retraining loop meets, tried on purpose: a full disk while writing a model,
a corrupt checkpoint, a model trained on shuffled labels. (SIGKILL mid-training, MLflow and
the DVC remote unreachable are in tests/test_train.py, test_register.py and test_orchestrate.py.)"""

from __future__ import annotations

import hashlib
import resource
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import GATE_MECHANICS_ONLY, REPO


def tree_digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.md5(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*")) if p.is_file()}


def ftlib(*args: str, fsize: int | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """`python -m ftlib ARGS`, optionally with files capped at `fsize` bytes: writing past it fails
    with EFBIG exactly as a full disk fails with ENOSPC (no root or tmpfs needed)."""
    def cap() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, fsize))

    return subprocess.run([sys.executable, "-m", "ftlib", *args], capture_output=True, text=True, cwd=cwd,
                          preexec_fn=cap if fsize else None, timeout=600)


@pytest.mark.slow
def test_disk_full_while_writing_a_model_leaves_the_previous_one(tmp_path, tiny_adapter):
    out = tmp_path / "merged"
    ok = ftlib("merge", "--model", tiny_adapter, "--out", str(out), "--dtype", "float32")
    assert ok.returncode == 0, ok.stderr[-2000:]
    before = tree_digest(out)
    assert sum(p.stat().st_size for p in out.glob("*.safetensors")) > 2**20

    full = ftlib("merge", "--model", tiny_adapter, "--out", str(out), "--dtype", "float32", fsize=2**20)
    assert full.returncode == 1, full.stdout[-2000:] + full.stderr[-2000:]
    assert "no space left while writing the merged model" in full.stderr and "still holds the previous" in full.stderr
    assert "Traceback" not in full.stdout + full.stderr
    assert tree_digest(out) == before  # the previous model, byte for byte
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("merged")) == ["merged"]  # no .tmp/.old left


@pytest.mark.slow
def test_corrupt_latest_checkpoint_is_skipped_and_training_resumes_from_the_previous(tmp_path, tiny_model):
    from tests.conftest import make_splits

    data = make_splits(tmp_path / "s", n_train=24)
    ckpt = tmp_path / "ckpt"
    args = ["train", "--no-compare", "--data-dir", str(data), "--reports-dir", str(tmp_path / "reports"),
            "-p", str(REPO / "params.yaml"), "-o", f"base_model={tiny_model}", "-o", f"train.output_dir={tmp_path / 'adapter'}",
            "-o", f"train.checkpoint_dir={ckpt}", "-o", "train.method=lora", "-o", "train.max_steps=4", "-o", "train.save_steps=2",
            "-o", "train.eval_steps=0", "-o", "train.save_total_limit=3", "-o", "train.per_device_train_batch_size=4",
            "-o", "train.load_best_model_at_end=false"]
    first = ftlib(*args, cwd=tmp_path)
    assert first.returncode == 0, first.stdout[-2000:] + first.stderr[-2000:]
    (last,) = ckpt.glob("*/checkpoint-4")
    weights = last / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])  # a bad disk or an interrupted copy

    rerun = ftlib(*args, cwd=tmp_path)
    assert rerun.returncode == 0, rerun.stdout[-2000:] + rerun.stderr[-2000:]
    assert f"skipping incomplete or corrupt checkpoint {last}" in rerun.stderr
    assert f"resuming from {last.parent / 'checkpoint-2'}" in rerun.stderr  # the previous good one
    assert (last.parent / "partial-checkpoint-4").is_dir()  # kept for inspection
    import json

    assert json.loads((tmp_path / "adapter" / "ftlib_train.json").read_text())["global_step"] == 4


# ---------------------------------------------------------------------------
# Gate integrity

@pytest.fixture(scope="module")
def good_and_shuffled(tmp_path_factory, tiny_model):
    """The same tiny Llama fully fine-tuned on true labels and on shuffled ones (test accuracy 1.0 vs ~chance)."""
    import random

    from ftlib.stages.train import train
    from tests.conftest import balanced, train_params, write_jsonl

    root = tmp_path_factory.mktemp("integrity")
    rows = balanced(14)
    random.Random(0).shuffle(rows)
    train_rows, test_rows = rows[:30], rows[30:]
    splits = root / "data" / "splits"
    write_jsonl(splits / "train.jsonl", train_rows)
    write_jsonl(splits / "validation.jsonl", test_rows[:3])
    write_jsonl(splits / "test.jsonl", test_rows)
    labels = [r["output"] for r in train_rows]
    random.Random(1).shuffle(labels)
    write_jsonl(root / "shuffled" / "train.jsonl", [{**r, "output": lab} for r, lab in zip(train_rows, labels)])
    for f in ("validation.jsonl", "test.jsonl"):
        (root / "shuffled" / f).write_bytes((splits / f).read_bytes())
    models = {}
    for name, data in (("good", splits), ("shuffled", root / "shuffled")):
        # random batches, as this fixture was tuned with (the gate is under test here, not the batching)
        p = train_params(tiny_model, root / name, "train.method=full", "train.max_steps=150", "train.learning_rate=3e-3",
                         "train.num_train_epochs=100", "train.balanced_batches=false")
        train(p, data, None)
        models[name] = Path(p.train.output_dir)
    return root, models


@pytest.mark.slow
def test_gate_integrity_shuffled_labels_stale_metrics_and_champion(good_and_shuffled, tiny_model, monkeypatch):
    import json
    import uuid

    from mlflow import MlflowClient

    from ftlib.core.config import load_params
    from ftlib.stages.evaluate import evaluate
    from ftlib.registry.promote import promote
    from ftlib.registry.register import RegistryError, register
    from tests.conftest import LABELS

    root, models = good_and_shuffled
    monkeypatch.chdir(root)
    n = f"integrity-{uuid.uuid4().hex[:8]}"
    c = MlflowClient()

    def params(*o: str):
        return load_params(REPO / "params.yaml", [f"base_model={tiny_model}", f"register.model_name={n}",
                                                  "register.accuracy_threshold=0.5", "register.log_merged=false", *GATE_MECHANICS_ONLY, *o])

    def scored(model: Path) -> float:
        m = evaluate(str(model), Path("data/splits/test.jsonl"), labels=LABELS, progress=False)
        Path("reports").mkdir(exist_ok=True)
        Path("reports/metrics.json").write_text(json.dumps({k: v for k, v in m.items() if k != "predictions"}))
        return m["accuracy"]

    def names() -> list[str]:
        return sorted(str(v.version) for v in c.search_model_versions(f"name = '{n}'"))

    bad_acc = scored(models["shuffled"])
    assert bad_acc < 0.5
    r = register(params(), models["shuffled"])
    assert r.status == "refused" and "< accuracy_threshold 0.500" in r.gate.reasons[0] and names() == []

    assert scored(models["good"]) == 1.0
    assert register(params(), models["good"]).version == "1"
    promote(c, n, alias="challenger", reason="the good model")

    # the good model's metrics.json left in place while the shuffled model is the candidate
    stale = register(params("register.accuracy_threshold=0"), models["shuffled"])
    assert stale.status == "refused" and any("scored other weights" in x for x in stale.gate.reasons)

    # its own metrics, no threshold: it still has to beat the (re-scored) champion
    scored(models["shuffled"])
    worse = register(params("register.accuracy_threshold=0"), models["shuffled"])
    assert worse.status == "refused" and "does not beat champion v1 (1.000)" in worse.gate.reasons[0]
    assert names() == ["1"] and str(c.get_model_version_by_alias(n, "champion").version) == "1"

    forced = register(params("register.accuracy_threshold=0"), models["shuffled"], force=True, reason="audit copy")
    with pytest.raises(RegistryError, match="failed the gate"):
        promote(c, n, version=forced.version)
    assert str(c.get_model_version_by_alias(n, "champion").version) == "1"
    assert not c.get_model_version(n, forced.version).aliases or c.get_model_version(n, forced.version).aliases == ["challenger"]


def test_replacing_keeps_the_previous_model_when_nothing_or_something_bad_is_written(tmp_path):
    from ftlib.core.atomic import replacing

    out = tmp_path / "model"
    out.mkdir()
    (out / "w.safetensors").write_text("old")
    with pytest.raises(RuntimeError, match="nothing was written"):
        with replacing(out, "model"):
            pass  # e.g. a non-zero rank, or a writer that silently skipped
    with pytest.raises(ValueError):
        with replacing(out, "model") as tmp:
            tmp.mkdir()
            (tmp / "w.safetensors").write_text("half")
            raise ValueError("writer crashed")
    assert (out / "w.safetensors").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]
    with replacing(out, "model") as tmp:
        tmp.mkdir()
        (tmp / "w.safetensors").write_text("new")
    assert (out / "w.safetensors").read_text() == "new" and sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_gate_refuses_metrics_it_cannot_tie_to_the_candidate(tmp_path):
    from ftlib.core.lineage import md5
    from ftlib.registry.register import provenance_problems

    test = tmp_path / "test.jsonl"
    test.write_text("{}\n")
    pickle_only = tmp_path / "adapter"
    pickle_only.mkdir()
    (pickle_only / "adapter_model.bin").write_bytes(b"x")
    metrics = {"model_files": {}, "data_md5": md5(test)}  # e.g. `evaluate --model embedded:...`
    assert "cannot identify the candidate's weights" in provenance_problems(metrics, pickle_only, test)[0]
    assert "does not record" in provenance_problems({"accuracy": 1.0}, pickle_only, test)[0]


def test_a_locked_mlflow_store_is_waited_for_then_one_line(tmp_path, monkeypatch):
    """Issue 16: a SQLite store another process holds locked used to end in a 273-line traceback. Now ftlib waits
    (sqlite's busy timeout) and, if the lock outlives it, exits 1 with one line; a lock released in time is waited out."""
    import sqlite3
    import threading

    import mlflow
    from typer.testing import CliRunner

    from ftlib.cli import app
    from ftlib.core import tracking

    db = tmp_path / "mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{db}")
    mlflow.MlflowClient().search_registered_models()  # creates the store's tables
    monkeypatch.setattr(tracking, "SQLITE_WAIT_S", 1.0)
    holder = sqlite3.connect(db, isolation_level=None, check_same_thread=False)
    holder.execute("BEGIN EXCLUSIVE")
    r = CliRunner().invoke(app, ["models", "list", "m"])
    assert r.exit_code == 1 and "locked by another process" in r.output and "Traceback" not in r.output, r.output
    assert len(r.output.strip().splitlines()) <= 3

    monkeypatch.setattr(tracking, "SQLITE_WAIT_S", 20.0)
    threading.Timer(1.0, lambda: holder.execute("ROLLBACK")).start()
    r = CliRunner().invoke(app, ["models", "list", "m"])
    assert r.exit_code == 2 and "no registered model named 'm'" in r.output, r.output  # it got through to the store
    holder.close()
