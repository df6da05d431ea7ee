"""ftlib.core.log: off a terminal (Airflow task logs, CI, files) progress is log lines, never redrawn bars, and
messages keep their level (issue 17: every stderr line showed as a red ERROR in the task log)."""

import logging
import subprocess
import sys

from ftlib.core.log import ProgressLines, progress_bar
from tests.conftest import REPO, make_splits


def test_progress_lines_are_spaced_and_end_with_the_last(caplog):
    caplog.set_level(logging.INFO, logger="t")
    spaced = ProgressLines(logging.getLogger("t"), "scoring", 5, every=3600)
    for _ in range(5):
        spaced(1)
    each = ProgressLines(logging.getLogger("t"), "each", 2, every=0)
    each(1)
    each(1)
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 3 and lines[0].startswith("scoring: 5/5 (100%), 0:00 elapsed, eta 0:00")
    assert lines[1].startswith("each: 1/2 (50%)") and lines[2].startswith("each: 2/2 (100%)")


def test_progress_bar_off_a_terminal_logs_lines(caplog):
    caplog.set_level(logging.INFO, logger="ftlib.progress")
    bar, advance = progress_bar(3, "evaluating test.jsonl")  # pytest's stderr is not a terminal
    with bar:
        for _ in range(3):
            advance(1)
    assert [r.getMessage().split(",")[0] for r in caplog.records] == ["evaluating test.jsonl: 3/3 (100%)"]


def test_dvc_output_keeps_the_level_ftlib_wrote(caplog):
    from ftlib.airflow.orchestrate import _relay

    caplog.set_level(logging.INFO, logger="ftlib.dvc")
    for line in ("WARNING the base model never answers with a label\n", "INFO step 8: validation accuracy 0.3\n",
                 "Running stage 'train':\n", "\n"):
        _relay(line)
    assert [(r.levelname, r.getMessage()) for r in caplog.records] == [
        ("WARNING", "the base model never answers with a label"), ("INFO", "step 8: validation accuracy 0.3"),
        ("INFO", "Running stage 'train':")]


def test_training_off_a_terminal_logs_lines_not_bars(tmp_path, tiny_model):
    """A real `ftlib train` with its output piped, as under Airflow or CI: no carriage-return bars (datasets,
    the Trainer), no per-step dicts, and progress as `INFO training (...) step: N/M` lines."""
    data = make_splits(tmp_path / "splits")
    r = subprocess.run([sys.executable, "-m", "ftlib", "train", "--data-dir", str(data), "--reports-dir", str(tmp_path / "r"),
                        "--no-compare", "-p", str(REPO / "params.yaml"), "-o", f"base_model={tiny_model}",
                        "-o", f"train.output_dir={tmp_path / 'adapter'}", "-o", f"train.checkpoint_dir={tmp_path / 'ckpt'}",
                        "-o", "train.max_steps=4", "-o", "train.eval_steps=2", "-o", "train.per_device_train_batch_size=4"],
                       capture_output=True, text=True, timeout=600, cwd=tmp_path)
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-3000:]
    assert "\r" not in out and "it/s]" not in out and "examples/s]" not in out, out[-3000:]
    assert "{'loss'" not in out
    assert "INFO training (loss " in out and "step: 4/4 (100%)" in out, out[-3000:]
