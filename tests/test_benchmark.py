"""`ftlib benchmark`: every variant measured in its own process, the parity rule, the outputs and MLflow child runs."""

import json

import mlflow
import pytest

from ftlib.stages.benchmark import benchmark, parity
from ftlib.stages.quantize import quantize
from tests.conftest import REPO, make_splits

MAX_DROP = {"q8_0": 0.02, "q4_k_m": 0.05, "default": 0.05}


def row(kind, accuracy, stop_rate=1.0):
    return {"kind": kind, "accuracy": accuracy, "stop_rate": stop_rate}


def test_parity_rule():
    merged = row("merged-fp32", 0.80, stop_rate=0.95)
    assert parity(row("gguf-q8_0", 0.79), merged, MAX_DROP)[0]            # -0.01 <= 0.02
    ok, why = parity(row("gguf-q8_0", 0.77), merged, MAX_DROP)            # -0.03 > 0.02
    assert not ok and "max_quant_drop 0.02" in why
    assert parity(row("gguf-q4_k_m", 0.76), merged, MAX_DROP)[0]          # -0.04 <= 0.05
    assert not parity(row("bnb-nf4", 0.74), merged, MAX_DROP)[0]          # default 0.05
    assert parity(row("gguf-q4_k_m", 0.90), merged, MAX_DROP)[0]          # better is fine
    ok, why = parity(row("gguf-q8_0", 0.80, stop_rate=0.5), merged, MAX_DROP)  # no longer stops at EOS
    assert not ok and "EOS" in why


def test_benchmark_end_to_end_on_the_tiny_model(tiny_model, tiny_adapter, tmp_path):
    from ftlib.core.config import load_params
    from ftlib.core.models import train_info

    data = make_splits(tmp_path / "splits", n_test=4)
    quantize(tiny_adapter, tmp_path / "quantized", tmp_path / "merged", ["q8_0", "torch-int8"], progress=lambda m: None)
    params = load_params(REPO / "params.yaml", [f"base_model={tiny_model}", "benchmark.max_new_tokens=4", "benchmark.decode_tokens=32"])  # 4 tokens of a tiny model: under the timer noise
    out = tmp_path / "reports" / "benchmark.json"
    result = benchmark(params, tiny_adapter, str(tmp_path / "quantized"), str(data), str(out), progress=lambda m: None)

    saved = json.loads(out.read_text())
    assert saved["ratio"] == result["ratio"] and saved["ratio"] > 0
    kinds = [v["kind"] for v in saved["variants"]]
    assert kinds == ["base-fp32", "adapter-fp32", "merged-fp32", "gguf-q8_0", "torch-int8", "classical"]
    for v in saved["variants"]:
        assert {"name", "kind", "path", "accuracy", "f1", "examples_per_s", "decode_tokens_per_s", "size_mb",
                "peak_rss_mb", "shippable"} <= set(v), v
        assert "error" not in v, v
        assert 0.0 <= v["accuracy"] <= 1.0 and v["n"] == 4
    llm = [v for v in saved["variants"] if v["kind"] != "classical"]
    assert all(v["decode_tokens_per_s"] > 0 and v["latency_p95_s"] >= v["latency_p50_s"] > 0 for v in llm)
    assert not saved["variants"][0]["shippable"]  # the base model is never offered
    assert (out.parent / "benchmark.md").read_text().startswith("| variant |")
    assert (out.parent / "plots" / "benchmark.png").stat().st_size > 10_000

    # one child run per variant under the training run
    parent = train_info(tiny_adapter)["mlflow_run_id"]
    children = mlflow.search_runs(search_all_experiments=True, filter_string=f"tags.mlflow.parentRunId = '{parent}'",
                                  output_format="list")
    assert sorted(r.data.params["kind"] for r in children) == sorted(kinds)
    assert all("accuracy" in r.data.metrics for r in children)


@pytest.mark.parametrize("bad", ["nonexistent-dir"])
def test_benchmark_needs_a_test_split(tmp_path, tiny_adapter, bad):
    from ftlib.core.config import load_params

    with pytest.raises(FileNotFoundError, match="test.jsonl"):
        benchmark(load_params(None), tiny_adapter, str(tmp_path), str(tmp_path / bad), str(tmp_path / "b.json"))


def test_quality_script_tiny_mode_prints_the_summary(tmp_path):
    """benchmarks/quality.py end to end in its --tiny mode (a 2-layer random model, 3 steps per seed),
    so the script cannot rot: per-seed rows, then one JSON object with the keys its issue names."""
    import subprocess
    import sys

    from tests.conftest import REPO, make_splits

    data = make_splits(tmp_path / "splits", n_train=12, n_val=3, n_test=6)
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "quality.py"), "--tiny", "--seeds", "1", "2",
                           "--data-dir", str(data)], capture_output=True, text=True, cwd=tmp_path, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    for key in ("accuracy_mean", "accuracy_min", "f1_macro_mean", "min_class_recall", "tfidf_accuracy",
                "margin_over_tfidf", "train_seconds_mean", "ratio"):
        assert key in summary
    assert summary["accuracy_min"] <= summary["accuracy_mean"] <= 1.0 and summary["tiny"] is True
    assert summary["margin_over_tfidf"] == pytest.approx(summary["accuracy_mean"] - summary["tfidf_accuracy"], abs=1e-3)
    assert "ftlib seed 1" in proc.stdout and "ftlib seed 2" in proc.stdout and "tf-idf + logreg" in proc.stdout
    assert not (REPO / "models" / "checkpoints" / "seed-1").exists()  # everything went to a temp dir


def test_gpu_train_script_runs_its_cpu_mode(tmp_path):
    """benchmarks/gpu_train.py with no GPU: the tiny shape, both configs in their own processes, the table and
    the JSON its issue names (the GPU figures themselves need a GPU machine)."""
    import subprocess
    import sys

    from tests.conftest import REPO, make_splits

    data = make_splits(tmp_path / "splits", n_train=16, n_val=2, n_test=2)
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "gpu_train.py"), "--data-dir", str(data)],
                          capture_output=True, text=True, cwd=tmp_path, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    if out["device"] != "cpu":
        pytest.skip("a GPU is present: the script ran the real shapes")
    row = out["tiny"]
    for config in ("ftlib", "notes"):
        r = row[config]
        assert r["tokens_per_s"] > 0 and r["examples_per_s"] > 0 and r["params"] > 0
        assert r["peak_gpu_mb"] is None and r["mfu"] is None  # nothing to measure them on a CPU
    assert row["ratio"] == pytest.approx(row["ftlib"]["tokens_per_s"] / row["notes"]["tokens_per_s"], rel=1e-2)
    assert row["ftlib"]["token_budget"] is None  # batch_tokens: auto is off on a CPU
    assert "ftlib/notes" in proc.stdout
