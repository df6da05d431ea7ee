"""The dvc.yaml stages on a temp repo: repro, no-op repro, dag, appends, bad data, no remote."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO, balanced, write_jsonl

pytestmark = pytest.mark.slow


def sh(cwd: Path, *cmd: str, check: bool = True) -> subprocess.CompletedProcess:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    r = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    if check and r.returncode != 0:
        raise AssertionError(f"{cmd} -> {r.returncode}\n{r.stdout}\n{r.stderr}")
    return r


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    root = tmp_path / "proj"
    root.mkdir()
    for name in ("dvc.yaml", "params.yaml"):
        shutil.copy(REPO / name, root / name)
    shutil.copytree(REPO / "ftlib", root / "ftlib", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(REPO / ".dvc", root / ".dvc", ignore=shutil.ignore_patterns("tmp", "cache"))
    # the default remote must never be needed: point it somewhere that does not exist
    sh(root, "git", "init", "-q")
    sh(root, "dvc", "remote", "modify", "local", "url", str(tmp_path / "unreachable" / "remote"))
    write_jsonl(root / "data" / "raw" / "reviews.jsonl", balanced(20))
    return root


def test_repro_noop_dag_and_append(repo: Path):
    r = sh(repo, "dvc", "repro", "split")  # train is covered by tests/test_train.py
    assert "Running stage 'validate'" in r.stdout and "Running stage 'split'" in r.stdout
    counts = {s: len((repo / "data" / "splits" / f"{s}.jsonl").read_text().splitlines()) for s in ("train", "validation", "test")}
    assert sum(counts.values()) == 60
    assert (repo / "dvc.lock").is_file() and (repo / "data" / "validated" / "report.json").is_file()

    r = sh(repo, "dvc", "repro", "split")  # train is covered by tests/test_train.py
    assert "Running stage" not in r.stdout and "up to date" in r.stdout

    dag = sh(repo, "dvc", "dag").stdout
    assert "validate" in dag and "split" in dag and "train" in dag

    write_jsonl(repo / "data" / "raw" / "more.jsonl", balanced(2, start=500))
    r = sh(repo, "dvc", "repro", "split")  # train is covered by tests/test_train.py
    assert "Running stage 'split'" in r.stdout
    assert sum(len((repo / "data" / "splits" / f"{s}.jsonl").read_text().splitlines()) for s in counts) == 66


def test_invalid_data_stops_the_pipeline(repo: Path):
    write_jsonl(repo / "data" / "raw" / "broken.jsonl", ['{"instruction": "x"'])
    r = sh(repo, "dvc", "repro", "split", check=False)
    assert r.returncode != 0
    assert "broken.jsonl:1: json:" in r.stdout + r.stderr
    assert not (repo / "data" / "splits" / "train.jsonl").exists()
    assert (repo / "data" / "validated" / "quarantine.jsonl").read_text().count("broken.jsonl") == 1
