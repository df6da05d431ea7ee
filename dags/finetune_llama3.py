"""Retraining workflow: validate -> split -> train -> quantize_and_benchmark -> evaluate -> gate -> register.

Thin on purpose: each task is one call into the same ftlib function the CLI and dvc.yaml
use, and passes paths (never data) to the next task. Nothing heavy is imported at parse
time -- torch, transformers and great_expectations load inside the tasks -- so the
scheduler parses this file in milliseconds.
"""

from __future__ import annotations

import os
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import pendulum
from airflow.sdk import Param, dag, task

# The project checkout the tasks work in (the image's working dir in production).
PROJECT_DIR = os.environ.get("FTLIB_PROJECT_DIR", str(Path(__file__).resolve().parents[1]))


def _path(project_dir: str, p: str) -> Path:
    path = Path(p)
    return path if path.is_absolute() else Path(project_dir) / path


@dag(
    dag_id="finetune_llama3",
    description="Validate new instruction data with GX, split it, fine-tune, quantize and benchmark every variant, evaluate, gate, register.",
    schedule=None,
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    max_active_runs=1,
    render_template_as_native_obj=True,  # the `overrides` list reaches the task as a list
    default_args={
        "owner": "ml-platform",
        "retries": 2,
        "retry_delay": timedelta(seconds=30),
        "retry_exponential_backoff": True,
        "max_retry_delay": timedelta(minutes=10),
    },
    params={
        "project_dir": Param(PROJECT_DIR, type="string", description="Checkout holding params.yaml and data/."),
        "params_file": Param("params.yaml", type="string", description="params.yaml, relative to project_dir."),
        "raw_dir": Param("data/raw", type="string", description="Where new JSONL data lands."),
        "validated_dir": Param("data/validated", type="string", description="report.json, quarantine.jsonl, Data Docs."),
        "splits_dir": Param("data/splits", type="string", description="train/validation/test.jsonl."),
        "reports_dir": Param("reports", type="string", description="train_loss.csv, metrics.json, benchmark.json, plots/."),
        "merged_dir": Param("models/merged", type="string", description="The adapter merged into the base (fp16)."),
        "quantized_dir": Param("models/quantized", type="string", description="GGUF files, Modelfile, bitsandbytes/torch variants."),
        "overrides": Param([], type="array", items={"type": "string", "pattern": "^[a-z_.]+=.*$"},
                           description="params.yaml overrides for this run, e.g. train.method=lora."),
    },
    tags=["ftlib", "llm", "fine-tuning"],
    doc_md=__doc__,
)
def finetune_llama3():
    @task
    def validate(project_dir: str, params_file: str, raw_dir: str, validated_dir: str) -> str:
        """Great Expectations data contract; a failed validation fails the run."""
        from airflow.exceptions import AirflowFailException

        from ftlib.config import load_params
        from ftlib.validate import validate_paths

        out = _path(project_dir, validated_dir)
        result = validate_paths([_path(project_dir, raw_dir)], load_params(_path(project_dir, params_file)), out)
        for issue in result.issues:
            print(issue)
        if not result.ok:
            # Not retryable: the data is wrong, trying again changes nothing.
            raise AirflowFailException(
                f"{len(result.errors)} validation errors; report: {out / 'report.json'}, "
                f"Data Docs: {out / 'data_docs' / 'index.html'}, bad rows: {out / 'quarantine.jsonl'}"
            )
        return str(out / "report.json")

    @task
    def split(project_dir: str, params_file: str, raw_dir: str, splits_dir: str, report: str) -> dict[str, str]:
        """Stable hash split into train/validation/test (paths go to the next task)."""
        from ftlib.config import load_params
        from ftlib.split import SPLITS, split_paths

        out = _path(project_dir, splits_dir)
        result = split_paths([_path(project_dir, raw_dir)], load_params(_path(project_dir, params_file)), out)
        print(f"split counts: {result.counts} per label: {result.per_label} (validated: {report})")
        return {s: str(out / f"{s}.jsonl") for s in SPLITS}

    @task
    def train(project_dir: str, params_file: str, splits: dict[str, str], reports_dir: str, overrides: list[str]) -> str:
        """`ftlib train` in a subprocess: a killed or retried attempt resumes from its last checkpoint."""
        from ftlib.config import load_params

        params_path = _path(project_dir, params_file)
        cmd = [sys.executable, "-m", "ftlib", "train", "--data-dir", str(Path(splits["train"]).parent),
               "--reports-dir", str(_path(project_dir, reports_dir)), "-p", str(params_path)]
        for o in overrides:
            cmd += ["-o", o]
        subprocess.run(cmd, cwd=project_dir, check=True)
        return str(_path(project_dir, load_params(params_path, overrides).train.output_dir))

    def _ftlib(project_dir: str, params_file: str, overrides: list[str], *args: str, ok: tuple[int, ...] = (0,)) -> int:
        cmd = [sys.executable, "-m", "ftlib", *args, "-p", str(_path(project_dir, params_file))]
        for o in overrides:
            cmd += ["-o", o]
        from airflow.sdk import get_current_context

        ctx = get_current_context()  # recorded in the MLflow lineage tags of what this run registers
        env = {**os.environ, "AIRFLOW_CTX_DAG_ID": ctx["dag"].dag_id, "AIRFLOW_CTX_DAG_RUN_ID": ctx["run_id"],
               "AIRFLOW_CTX_TASK_ID": ctx["task"].task_id}
        code = subprocess.run(cmd, cwd=project_dir, env=env).returncode
        if code not in ok:
            raise RuntimeError(f"{' '.join(cmd[2:4])} exited with {code}; see the log above")
        return code

    @task
    def quantize_and_benchmark(project_dir: str, params_file: str, adapter: str, splits: dict[str, str], merged_dir: str,
                               quantized_dir: str, reports_dir: str, overrides: list[str]) -> str:
        """Every deployable variant (merged, GGUF + Modelfile, bitsandbytes, torch int8), then one comparison table."""
        quantized = str(_path(project_dir, quantized_dir))
        _ftlib(project_dir, params_file, overrides, "quantize", "--model", adapter, "--out-dir", quantized,
               "--merged-dir", str(_path(project_dir, merged_dir)))
        out = _path(project_dir, reports_dir) / "benchmark.json"
        _ftlib(project_dir, params_file, overrides, "benchmark", "--adapter", adapter, "--quantized", quantized,
               "--data-dir", str(Path(splits["test"]).parent), "--json", str(out))
        return str(out)

    @task
    def evaluate(project_dir: str, params_file: str, adapter: str, splits: dict[str, str], reports_dir: str,
                 overrides: list[str], benchmark: str) -> str:
        """Accuracy, precision, recall, F1 and the confusion matrix of the fine-tuned model on the test split."""
        reports = _path(project_dir, reports_dir)
        _ftlib(project_dir, params_file, overrides, "evaluate", "--model", adapter, "--data", splits["test"],
               "--json", str(reports / "metrics.json"), "--plot", str(reports / "plots" / "confusion_matrix.png"),
               "--predictions", str(reports / "predictions.csv"))
        print(f"benchmark: {benchmark}")
        return str(reports / "metrics.json")

    @task.short_circuit
    def gate(project_dir: str, params_file: str, adapter: str, splits: dict[str, str], reports_dir: str,
             overrides: list[str], metrics: str) -> bool:
        """The accuracy gate (thresholds, and beating the re-scored champion). False skips register;
        the refusal, with both scores, is in this log, in reports/gate.json and in MLflow."""
        code = _ftlib(project_dir, params_file, overrides, "gate", "--metrics", metrics, "--adapter", adapter,
                      "--data-dir", str(Path(splits["test"]).parent), "--json", str(_path(project_dir, reports_dir) / "gate.json"),
                      ok=(0, 3))
        return code == 0

    @task
    def register(project_dir: str, params_file: str, adapter: str, splits: dict[str, str], reports_dir: str, merged_dir: str,
                 quantized_dir: str, validated_dir: str, overrides: list[str]) -> dict[str, str]:
        """Register the candidate as `challenger` (idempotent: a retry finds the version it made)."""
        import json

        reports = _path(project_dir, reports_dir)
        _ftlib(project_dir, params_file, overrides, "register", "--adapter", adapter, "--data-dir", str(Path(splits["test"]).parent),
               "--reports", str(reports), "--quantized", str(_path(project_dir, quantized_dir)),
               "--merged", str(_path(project_dir, merged_dir)),
               "--validation-report", str(_path(project_dir, validated_dir) / "report.json"),
               "--json", str(reports / "registration.json"))
        return json.loads((reports / "registration.json").read_text())

    report = validate("{{ params.project_dir }}", "{{ params.params_file }}", "{{ params.raw_dir }}", "{{ params.validated_dir }}")
    splits = split("{{ params.project_dir }}", "{{ params.params_file }}", "{{ params.raw_dir }}", "{{ params.splits_dir }}", report)
    adapter = train("{{ params.project_dir }}", "{{ params.params_file }}", splits, "{{ params.reports_dir }}", "{{ params.overrides }}")
    bench = quantize_and_benchmark("{{ params.project_dir }}", "{{ params.params_file }}", adapter, splits, "{{ params.merged_dir }}",
                                   "{{ params.quantized_dir }}", "{{ params.reports_dir }}", "{{ params.overrides }}")
    metrics = evaluate("{{ params.project_dir }}", "{{ params.params_file }}", adapter, splits, "{{ params.reports_dir }}",
                       "{{ params.overrides }}", bench)
    passed = gate("{{ params.project_dir }}", "{{ params.params_file }}", adapter, splits, "{{ params.reports_dir }}",
                  "{{ params.overrides }}", metrics)
    passed >> register("{{ params.project_dir }}", "{{ params.params_file }}", adapter, splits, "{{ params.reports_dir }}",
                       "{{ params.merged_dir }}", "{{ params.quantized_dir }}", "{{ params.validated_dir }}", "{{ params.overrides }}")


finetune_llama3()
