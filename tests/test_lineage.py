"""Lineage and reproducibility: a registered version is rebuilt from its lineage in a
fresh clone (identical split files), and the same data + params + seed give the same
splits byte for byte and the same model on the CPU."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
from typer.testing import CliRunner

from ftlib.cli import app
from ftlib.core.config import load_params
from tests.conftest import GATE_MECHANICS_ONLY, LABELS, balanced, train_params, write_jsonl
from tests.test_dvc import repo, sh  # noqa: F401  (the temp git + DVC project fixture)

pytestmark = pytest.mark.slow


def test_rebuild_from_lineage_in_a_clone(repo: Path, tmp_path, tiny_model, monkeypatch):  # noqa: F811
    from ftlib.stages.evaluate import evaluate
    from ftlib.registry.register import register
    from ftlib.stages.train import train

    sh(repo, "dvc", "repro", "split")
    sh(repo, "git", "add", "-A")
    sh(repo, "git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "data + splits")
    commit = sh(repo, "git", "rev-parse", "HEAD").stdout.strip()

    monkeypatch.chdir(repo)
    p = train_params(tiny_model, tmp_path, "train.method=lora", "train.max_steps=2", "register.model_name=lineage-test",
                     "register.accuracy_threshold=0", "register.log_merged=false", *GATE_MECHANICS_ONLY)
    train(p, Path("data/splits"), None)
    m = evaluate(p.train.output_dir, "data/splits/test.jsonl", labels=LABELS, progress=False)
    Path("reports").mkdir()
    Path("reports/metrics.json").write_text(json.dumps({k: v for k, v in m.items() if k != "predictions"}))
    # registered as `ftlib register` would, with params.yaml's values: the lineage must still say max_steps=2 (issue 17)
    at_registration = train_params(tiny_model, tmp_path, "train.method=lora", "register.model_name=lineage-test",
                                   "register.accuracy_threshold=0", "register.log_merged=false", *GATE_MECHANICS_ONLY)
    r = register(at_registration, Path(p.train.output_dir))
    assert r.status == "registered"
    from mlflow import MlflowClient

    tags = MlflowClient().get_model_version("lineage-test", r.version).tags
    assert json.loads(tags["ftlib.lineage.params"])["train"]["max_steps"] == 2
    assert json.loads(tags["ftlib.lineage.train.overrides"])["train.max_steps"] == 2
    assert "reviews.jsonl" in json.loads(tags["ftlib.lineage.raw.files"])  # the raw files by name, with their md5

    shown = CliRunner().invoke(app, ["lineage", f"models:/lineage-test/{r.version}"])
    assert shown.exit_code == 0, shown.output
    for hop in ("lineage-test v", "MLflow run", "params hash", "splits", "raw data", "stages: validate -> split -> train",
                f"git {commit}"):
        assert hop in shown.output, hop
    rebuild = shown.output.split("rebuild\n", 1)[1].splitlines()
    assert f"  git checkout {commit}" in rebuild
    assert any(line.strip().startswith("ftlib train") and "-o train.max_steps=2" in line for line in rebuild), rebuild
    assert "trained with overrides of params.yaml" in shown.output

    clone = tmp_path / "clone"
    sh(tmp_path, "git", "clone", "-q", str(repo), str(clone))
    sh(clone, "git", "checkout", "-q", "-b", "elsewhere", "HEAD")  # the clone may be on any branch
    for line in rebuild:
        cmd = line.split("#")[0].strip()
        if cmd and not cmd.startswith(("dvc repro", "ftlib train", "ftlib evaluate")):  # retraining: not needed to check the data
            sh(clone, "bash", "-c", cmd)
    for s in ("train", "validation", "test"):
        assert (clone / "data" / "splits" / f"{s}.jsonl").read_bytes() == (repo / "data" / "splits" / f"{s}.jsonl").read_bytes()

    # and --check catches split files that are not the ones the version was made from
    write_jsonl(clone / "data" / "splits" / "test.jsonl", balanced(1))
    bad = sh(clone, "ftlib", "lineage", f"models:/lineage-test/{r.version}", "--check", check=False)
    assert bad.returncode == 1 and "differ" in bad.stdout + bad.stderr


def test_same_data_params_seed_same_splits_and_model(tmp_path, tiny_model):
    from ftlib.stages.evaluate import evaluate
    from ftlib.stages.split import split_paths
    from ftlib.stages.train import train

    raw = write_jsonl(tmp_path / "raw" / "reviews.jsonl", balanced(12))
    params = load_params(None, ["validate.data_docs=false"])
    outs = []
    for run in ("a", "b"):
        split_paths([raw], params, tmp_path / run / "splits")
        outs.append({s: (tmp_path / run / "splits" / f"{s}.jsonl").read_bytes() for s in ("train", "validation", "test")})
    assert outs[0] == outs[1] and all(outs[0].values())

    results = []
    for run in ("a", "b"):
        p = train_params(tiny_model, tmp_path / run, "train.method=lora", "train.max_steps=4", "train.learning_rate=5e-3")
        t = train(p, tmp_path / run / "splits", None)
        # loglik mode scores every label: a real accuracy even for a tiny model that never names a label
        m = evaluate(p.train.output_dir, tmp_path / run / "splits" / "test.jsonl", labels=LABELS, mode="loglik", progress=False)
        results.append((t, m))
    (ta, ma), (tb, mb) = results
    assert ta.global_step == tb.global_step == 4
    assert abs(ma["accuracy"] - mb["accuracy"]) <= 0.01
    la = [r["logliks"][lab] for r in ma["predictions"] for lab in LABELS]
    lb = [r["logliks"][lab] for r in mb["predictions"] for lab in LABELS]
    assert la == pytest.approx(lb, abs=1e-4)  # the two models are the same model

    from safetensors.torch import load_file

    wa = load_file(str(Path(ta.output_dir) / "adapter_model.safetensors"))
    wb = load_file(str(Path(tb.output_dir) / "adapter_model.safetensors"))
    assert wa.keys() == wb.keys() and all((wa[k] - wb[k]).abs().max() < 1e-6 for k in wa)
