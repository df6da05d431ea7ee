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

from tests.conftest import REPO


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
    assert f"skipping incomplete or corrupt checkpoint {last}" in rerun.stdout
    assert f"resuming from {last.parent / 'checkpoint-2'}" in rerun.stdout  # the previous good one
    assert (last.parent / "partial-checkpoint-4").is_dir()  # kept for inspection
    import json

    assert json.loads((tmp_path / "adapter" / "ftlib_train.json").read_text())["global_step"] == 4
