"""The CLI contract: exit codes 0/1/2, FILE:LINE: RULE: messages, --help with examples, --version."""

import re

import pytest
from typer.testing import CliRunner

from ftlib import __version__
from ftlib.cli import app
from tests.conftest import balanced, write_jsonl

runner = CliRunner()


def test_version():
    r = runner.invoke(app, ["--version"])
    assert r.exit_code == 0 and r.output.strip() == f"ftlib {__version__}"


@pytest.mark.parametrize("cmd", ["validate", "split", "run"])
def test_help_has_examples(cmd):
    r = runner.invoke(app, [cmd, "--help"], env={"COLUMNS": "200"})
    assert r.exit_code == 0 and "Examples" in r.output and f"ftlib {cmd}" in r.output


def test_validate_exit_codes_and_messages(tmp_path):
    good = write_jsonl(tmp_path / "good.jsonl", balanced(3))
    r = runner.invoke(app, ["validate", str(good), "--report-dir", str(tmp_path / "out"), "-o", "validate.data_docs=false"])
    assert r.exit_code == 0, r.output
    assert "valid: 9 usable examples" in r.output and (tmp_path / "out" / "report.json").is_file()

    bad = write_jsonl(tmp_path / "bad.jsonl", balanced(3) + ["[1, 2]", {"instruction": "Clasifica", "output": "MEH"}])
    r = runner.invoke(app, ["validate", str(bad), "--no-report"])
    assert r.exit_code == 1
    lines = [l for l in r.output.splitlines() if l.startswith(str(bad))]
    assert re.fullmatch(rf"{re.escape(str(bad))}:10: not-object: .+", lines[0])
    assert any(re.fullmatch(rf"{re.escape(str(bad))}:11: label: .+", l) for l in lines)
    assert "INVALID" in r.output and not (tmp_path / "data").exists()

    r = runner.invoke(app, ["validate", str(tmp_path / "missing.jsonl")])
    assert r.exit_code == 2 and "no such file" in r.output
    r = runner.invoke(app, ["validate", str(good), "-o", "split.train=2"])
    assert r.exit_code == 2


def test_split_cli_prints_counts_and_refuses_bad_data(tmp_path):
    good = write_jsonl(tmp_path / "raw" / "good.jsonl", balanced(20))
    r = runner.invoke(app, ["split", str(good), "--out-dir", str(tmp_path / "s")], env={"COLUMNS": "200"})
    assert r.exit_code == 0, r.output
    assert "train.jsonl" in r.output and "POSITIVO" in r.output and "60" in r.output
    bad = write_jsonl(tmp_path / "bad.jsonl", balanced(2) + [b"\xff\xfe"])
    r = runner.invoke(app, ["split", str(bad), "--out-dir", str(tmp_path / "s2")])
    assert r.exit_code == 1 and f"{bad}:7: encoding:" in r.output and not (tmp_path / "s2").exists()


def test_stage_commands_fail_cleanly_on_bad_input(tmp_path):
    for cmd in (["train", "--data-dir", str(tmp_path / "nope")],
                ["merge", "--model", str(tmp_path), "--out", str(tmp_path / "m")],
                ["prune", "--model", str(tmp_path / "missing"), "--amount", "0.3"],
                ["distill", "--teacher", str(tmp_path / "missing"), "--max-steps", "1"]):
        r = runner.invoke(app, cmd)
        assert r.exit_code == 2, (cmd, r.output)
        assert "error:" in r.output and "Traceback" not in r.output


def test_run_prints_outputs_and_the_run_summary(tmp_path, monkeypatch):
    """`ftlib run` on a one-stage DVC project: dvc repro, the outputs table, and the summary the DAG's summary task
    writes too (reports/summary.md). A failing stage exits 1."""
    import json
    import subprocess
    import sys

    import yaml

    monkeypatch.chdir(tmp_path)
    subprocess.run([sys.executable, "-m", "dvc", "init", "--no-scm", "-q"], check=True)
    write_jsonl(tmp_path / "data" / "splits" / "test.jsonl", balanced(2))
    cmd = "mkdir -p reports && echo '{\"accuracy\": 0.9, \"f1\": 0.8}' > reports/metrics.json"
    (tmp_path / "dvc.yaml").write_text(yaml.safe_dump({"stages": {"evaluate": {"cmd": cmd, "outs": ["reports/metrics.json"]}}}))
    r = runner.invoke(app, ["run", "--no-register"], env={"COLUMNS": "200"})
    assert r.exit_code == 0, r.output
    assert "pipeline outputs" in r.output and "reports/metrics.json" in r.output
    assert "accuracy" in r.output and "0.9" in r.output and "not run" in r.output  # the gate did not run
    summary_md = (tmp_path / "reports" / "summary.md").read_text()
    assert "| accuracy | 0.900 |" in summary_md and "| examples | train 0, validation 0, test 6 |" in summary_md
    assert json.loads((tmp_path / "reports" / "metrics.json").read_text())["accuracy"] == 0.9
    # a stage that fails after DVC removed its output: the last good output is checked back out (issue 17)
    (tmp_path / "dvc.yaml").write_text(yaml.safe_dump({"stages": {"evaluate": {"cmd": "test -e reports/metrics.json || exit 3",
                                                                              "outs": ["reports/metrics.json"]}}}))
    assert runner.invoke(app, ["run", "--no-register"]).exit_code == 1
    assert json.loads((tmp_path / "reports" / "metrics.json").read_text())["accuracy"] == 0.9


@pytest.mark.slow
def test_run_profile_smoke_runs_every_stage_into_its_own_root(tmp_path, monkeypatch, tiny_model):
    """Issue 17: `ftlib run --profile smoke` runs validate -> split -> train -> quantize -> benchmark -> evaluate for
    real, cut short, writes only under runs/smoke/ (DVC's outputs and the registry are left alone), and never
    registers; invalid data stops it at validation."""
    import json

    import yaml
    from mlflow import MlflowClient

    from tests.conftest import REPO

    monkeypatch.chdir(tmp_path)
    p = yaml.safe_load((REPO / "params.yaml").read_text())
    p["base_model"], p["validate"]["data_docs"] = tiny_model, False
    p["train"]["per_device_train_batch_size"] = 4
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(p))
    write_jsonl(tmp_path / "data" / "raw" / "d.jsonl", balanced(12))
    before = {m.name for m in MlflowClient().search_registered_models()}
    r = runner.invoke(app, ["run", "--profile", "smoke"], env={"COLUMNS": "200"})
    assert r.exit_code == 0, r.output
    assert "profile smoke: outputs in runs/smoke/; nothing was gated or registered" in r.output
    smoke = tmp_path / "runs" / "smoke"
    assert json.loads((smoke / "models" / "adapter" / "ftlib_train.json").read_text())["global_step"] == 8
    bench = json.loads((smoke / "reports" / "benchmark.json").read_text())
    assert [v["kind"] for v in bench["variants"]] == ["adapter-fp32", "merged-fp32", "gguf-q8_0", "classical"]
    metrics = json.loads((smoke / "reports" / "metrics.json").read_text())
    assert metrics["n"] == len((smoke / "data" / "splits" / "test.jsonl").read_text().splitlines())  # the whole test split
    assert "| gate | not run |" in (smoke / "reports" / "summary.md").read_text()
    assert sorted(q.name for q in tmp_path.iterdir()) == ["data", "params.yaml", "runs"]
    assert [q.name for q in (tmp_path / "data").iterdir()] == ["raw"]
    assert {m.name for m in MlflowClient().search_registered_models()} == before

    write_jsonl(tmp_path / "data" / "raw" / "bad.jsonl", [{"instruction": "x", "output": 5}])
    (smoke / "reports" / "metrics.json").unlink()
    r = runner.invoke(app, ["run", "--profile", "smoke"])
    assert r.exit_code == 1 and "bad.jsonl:1: type:" in r.output and "not valid data" in r.output
    assert not (smoke / "reports" / "metrics.json").exists()
    assert runner.invoke(app, ["run", "--profile", "quick"]).exit_code == 2


def test_loading_an_adapter_prints_no_spurious_warnings(tiny_adapter):
    """Issue 17: every adapter load printed bitsandbytes' 'kernels-community' hub warning and PEFT's
    `is_gradient_checkpointing` FutureWarning into the CLI output and every task log."""
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-m", "ftlib", "generate", "-m", tiny_adapter, "hola", "--max-new-tokens", "2"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "kernels-community" not in r.stderr and "is_gradient_checkpointing" not in r.stderr, r.stderr[-2000:]
