"""Retraining: validate -> split -> train -> quantize_and_benchmark -> evaluate -> gate -> register -> summary.

Runs when new data lands (the `ftlib_raw_data` asset, updated by the `data_landing` DAG)
and on a cron schedule (FTLIB_RETRAIN_CRON, weekly by default); trigger it by hand from
the UI with the form's params. Thin on purpose: each task is one call into the same
ftlib code the CLI and dvc.yaml use, and passes paths (never data) to the next task.
Nothing heavy is imported at parse time -- torch, transformers, great_expectations and
the Kubernetes provider load inside the tasks -- so the DAG processor parses this file fast.

With dvc.yaml's paths and params.yaml's values (no overrides in the form), every stage
runs as `dvc repro --single-item STAGE`: on unchanged data, params and code DVC skips the
stage or restores its outputs from its cache instead of retraining, dvc.lock records the
run, and the splits are pushed to the DVC remote. A run with overrides or other paths
calls ftlib directly (the log says why), where a finished training checkpoint of the same
data and params is still reused.

executor=local runs train and quantize as subprocesses here; executor=kubernetes runs them
as pods on a GPU node (ftlib.airflow.orchestrate.gpu_pod: nvidia.com/gpu limit, GPU node selector
and toleration, the project PVC, secrets from Kubernetes secrets, non-root).
"""

from __future__ import annotations

import os
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import pendulum
from airflow.sdk import AssetOrTimeSchedule, CronTriggerTimetable, Param, dag, task

from ftlib.airflow.orchestrate import TUNABLES, raw_data_asset

# The project checkout the tasks work in (the image's working dir in production).
PROJECT_DIR = os.environ.get("FTLIB_PROJECT_DIR", str(Path(__file__).resolve().parents[1]))
RAW_DATA = raw_data_asset(PROJECT_DIR)
RETRAIN_CRON = os.environ.get("FTLIB_RETRAIN_CRON", "0 3 * * 1")  # Mondays 03:00 UTC


def _path(project_dir: str, p: str) -> Path:
    """A form path, confined to the project dir, the ftlib cache and the temp dir (untrusted input)."""
    from ftlib.airflow.orchestrate import form_path

    return form_path(project_dir, p)


def _rel(project_dir: str, p: str | Path) -> str:
    """A path as the pod sees it: relative to the project dir (mounted as the pod's workdir)."""
    return os.path.relpath(_path(project_dir, str(p)), Path(project_dir).resolve())


def _airflow_ids() -> dict[str, str]:
    """The Airflow dag/run/task ids, for the lineage ftlib records in MLflow."""
    from airflow.sdk import get_current_context

    ctx = get_current_context()
    return {"AIRFLOW_CTX_DAG_ID": ctx["dag"].dag_id, "AIRFLOW_CTX_DAG_RUN_ID": ctx["run_id"],
            "AIRFLOW_CTX_TASK_ID": ctx["task"].task_id}


def _ftlib(project_dir: str, params_file: str, overrides: list[str], *args: str, ok: tuple[int, ...] = (0,)) -> int:
    """`python -m ftlib ARGS -p params -o ...` here, with the Airflow run ids in its environment (lineage)."""
    cmd = [sys.executable, "-m", "ftlib", *args, "-p", str(_path(project_dir, params_file))]
    for o in overrides:
        cmd += ["-o", o]
    code = subprocess.run(cmd, cwd=project_dir, env={**os.environ, **_airflow_ids()}).returncode
    if code not in ok:
        raise RuntimeError(f"ftlib {args[0]} exited with {code}; see the log above")
    return code


def _on_gpu_pod(task_id: str, project_dir: str, params_file: str, overrides: list[str], gpus: int, *args: str) -> None:
    """The same `ftlib ARGS` (or `dvc repro STAGE`) as a KubernetesPodOperator on a GPU node
    (paths relative to the PVC workdir)."""
    from airflow.sdk import get_current_context

    from ftlib.airflow.orchestrate import gpu_pod

    cli = list(args)
    if args[0] != "dvc":
        cli += ["-p", _rel(project_dir, params_file)]
        for o in overrides:
            cli += ["-o", o]
    gpu_pod(task_id, cli, gpus).execute(get_current_context())


def _dvc_mode(params: dict | None) -> bool:
    """True: run the stages as `dvc repro` (see the module docstring); else say why not."""
    from ftlib.airflow.orchestrate import dvc_reason

    reason = dvc_reason(params or {})
    if reason:
        print(f"calling ftlib directly, DVC's cache is not used: {reason}")
    return reason is None


def _repro(project_dir: str, stage: str) -> None:
    from ftlib.airflow.orchestrate import repro

    print(f"dvc repro {stage}: {repro(project_dir, stage, _airflow_ids())}")


def _overrides(params: dict) -> list[str]:
    from ftlib.airflow.orchestrate import overrides

    return overrides(params, params.get("overrides"))


@dag(
    dag_id="finetune_llama3",
    description="Validate new data with GX, split, fine-tune, quantize + benchmark, evaluate, gate, register.",
    schedule=AssetOrTimeSchedule(timetable=CronTriggerTimetable(RETRAIN_CRON, timezone="UTC"), assets=[RAW_DATA]),
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    max_active_runs=1,  # runs never overlap: a burst of landings queues, and the last run sees every file
    render_template_as_native_obj=True,  # list params reach the tasks as lists
    default_args={
        "owner": "ml-platform",
        "retries": 2,
        "retry_delay": timedelta(seconds=30),
        "retry_exponential_backoff": True,
        "max_retry_delay": timedelta(minutes=10),
    },
    params={
        **{name: Param(None, **schema) for name, (_, schema) in TUNABLES.items()},
        "executor": Param("local", type="string", enum=["local", "kubernetes"],
                          description="local: subprocesses on this worker; kubernetes: train and quantize in GPU pods."),
        "gpus": Param(1, type="integer", minimum=1, maximum=8, description="GPUs per pod (>1 runs `accelerate launch`)."),
        "project_dir": Param(PROJECT_DIR, type="string", description="Checkout holding params.yaml and data/."),
        "params_file": Param("params.yaml", type="string", description="params.yaml, relative to project_dir."),
        "raw_dir": Param("data/raw", type="string", description="Where new JSONL data lands."),
        "validated_dir": Param("data/validated", type="string", description="report.json, quarantine.jsonl, Data Docs."),
        "splits_dir": Param("data/splits", type="string", description="train/validation/test.jsonl."),
        "reports_dir": Param("reports", type="string", description="metrics.json, benchmark.json, gate.json, plots/."),
        "merged_dir": Param("models/merged", type="string", description="The adapter merged into the base (fp16)."),
        "quantized_dir": Param("models/quantized", type="string", description="GGUF files, Modelfile, other variants."),
        "dvc_cache": Param(True, type="boolean",
                           description="Run the stages as `dvc repro` when paths and params are dvc.yaml's: "
                                       "unchanged data, params and code reuse DVC's cache instead of retraining."),
        "overrides": Param([], type="array", items={"type": "string", "pattern": "^[a-z][a-z0-9_.]*=.*$"},
                           description="Any other params.yaml override, e.g. train.lora_dropout=0.05."),
    },
    tags=["ftlib", "llm", "fine-tuning"],
    doc_md=__doc__,
)
def finetune_llama3():
    @task
    def validate(project_dir: str, params_file: str, raw_dir: str, validated_dir: str, params: dict | None = None) -> str:
        """Great Expectations data contract; a failed validation fails the run (not retried)."""
        import json

        from airflow.exceptions import AirflowFailException

        from ftlib.core.config import load_params
        from ftlib.airflow.orchestrate import DvcReproError
        from ftlib.stages.validate import validate_paths

        out = _path(project_dir, validated_dir)
        links = (f"report: {out / 'report.json'}, Data Docs: {out / 'data_docs' / 'index.html'}, "
                 f"bad rows: {out / 'quarantine.jsonl'}")
        if _dvc_mode(params):
            try:
                _repro(project_dir, "validate")
            except DvcReproError:
                report = out / "report.json"
                if report.is_file() and json.loads(report.read_text()).get("valid") is False:
                    raise AirflowFailException(f"invalid data (errors above); {links}") from None
                raise  # DVC itself failed: retried
            return str(out / "report.json")
        result = validate_paths([_path(project_dir, raw_dir)], load_params(_path(project_dir, params_file)), out)
        for issue in result.issues:
            print(issue)
        if not result.ok:
            raise AirflowFailException(f"{len(result.errors)} validation errors; {links}")
        return str(out / "report.json")

    @task
    def split(project_dir: str, params_file: str, raw_dir: str, splits_dir: str, report: str,
              params: dict | None = None) -> dict[str, str]:
        """Stable hash split into train/validation/test, recorded in dvc.lock and pushed to the DVC remote."""
        from ftlib.core.config import load_params
        from ftlib.airflow.orchestrate import push
        from ftlib.stages.split import SPLITS, split_paths

        out = _path(project_dir, splits_dir)
        if _dvc_mode(params):
            _repro(project_dir, "split")
            print(push(project_dir, "split"))  # an unreachable remote fails (and retries) the task
        else:
            result = split_paths([_path(project_dir, raw_dir)], load_params(_path(project_dir, params_file)), out)
            print(f"split counts: {result.counts} per label: {result.per_label} (validated: {report})")
        return {s: str(out / f"{s}.jsonl") for s in SPLITS}

    @task
    def train(project_dir: str, params_file: str, splits: dict[str, str], reports_dir: str, executor: str, gpus: int,
              params: dict | None = None) -> str:
        """`ftlib train`: a killed or retried attempt resumes from its last checkpoint; a finished one is reused."""
        from ftlib.core.config import load_params
        from ftlib.airflow.orchestrate import repro_command

        overrides = _overrides(params or {})
        args = ["train", "--no-compare", "--data-dir", _rel(project_dir, Path(splits["train"]).parent),
                "--reports-dir", _rel(project_dir, reports_dir)]
        if _dvc_mode(params):
            if executor == "kubernetes":
                _on_gpu_pod("train", project_dir, params_file, [], 1, *repro_command("train"))
            else:
                _repro(project_dir, "train")
        elif executor == "kubernetes":
            _on_gpu_pod("train", project_dir, params_file, overrides, gpus, *args)
        else:
            _ftlib(project_dir, params_file, overrides, *args)
        return str(_path(project_dir, load_params(_path(project_dir, params_file), overrides).train.output_dir))

    @task
    def quantize_and_benchmark(project_dir: str, params_file: str, adapter: str, splits: dict[str, str], merged_dir: str,
                               quantized_dir: str, reports_dir: str, executor: str, params: dict | None = None) -> str:
        """Every deployable variant (merged, GGUF + Modelfile, bitsandbytes, torch int8), then one comparison table."""
        from ftlib.airflow.orchestrate import repro_command

        out = _path(project_dir, reports_dir) / "benchmark.json"
        if _dvc_mode(params):
            if executor == "kubernetes":
                _on_gpu_pod("quantize", project_dir, params_file, [], 1, *repro_command("quantize"))
            else:
                _repro(project_dir, "quantize")
            _repro(project_dir, "benchmark")
            return str(out)
        overrides = _overrides(params or {})
        q_args = ["quantize", "--model", _rel(project_dir, adapter), "--out-dir", _rel(project_dir, quantized_dir),
                  "--merged-dir", _rel(project_dir, merged_dir)]
        if executor == "kubernetes":
            _on_gpu_pod("quantize", project_dir, params_file, overrides, 1, *q_args)
        else:
            _ftlib(project_dir, params_file, overrides, *q_args)
        _ftlib(project_dir, params_file, overrides, "benchmark", "--adapter", adapter, "--quantized",
               str(_path(project_dir, quantized_dir)), "--data-dir", str(Path(splits["test"]).parent), "--json", str(out))
        return str(out)

    @task
    def evaluate(project_dir: str, params_file: str, adapter: str, splits: dict[str, str], reports_dir: str,
                 benchmark: str, params: dict | None = None) -> str:
        """Accuracy, precision, recall, F1 and the confusion matrix of the fine-tuned model on the test split."""
        reports = _path(project_dir, reports_dir)
        print(f"benchmark: {benchmark}")
        if _dvc_mode(params):
            _repro(project_dir, "evaluate")
            return str(reports / "metrics.json")
        _ftlib(project_dir, params_file, _overrides(params or {}), "evaluate", "--model", adapter, "--data", splits["test"],
               "--json", str(reports / "metrics.json"), "--plot", str(reports / "plots" / "confusion_matrix.png"),
               "--predictions", str(reports / "predictions.csv"))
        return str(reports / "metrics.json")

    @task.short_circuit(ignore_downstream_trigger_rules=False)
    def gate(project_dir: str, params_file: str, adapter: str, splits: dict[str, str], reports_dir: str, metrics: str,
             params: dict | None = None) -> bool:
        """The accuracy gate (thresholds, and beating the re-scored champion). False skips register;
        the refusal, with both scores, is in this log, in reports/gate.json and in MLflow."""
        code = _ftlib(project_dir, params_file, _overrides(params or {}), "gate", "--metrics", metrics, "--adapter", adapter,
                      "--data-dir", str(Path(splits["test"]).parent), "--json", str(_path(project_dir, reports_dir) / "gate.json"),
                      ok=(0, 3))
        return code == 0

    @task
    def register(project_dir: str, params_file: str, adapter: str, splits: dict[str, str], reports_dir: str, merged_dir: str,
                 quantized_dir: str, validated_dir: str, params: dict | None = None) -> dict[str, str]:
        """Register the candidate as `challenger` (idempotent: a retry finds the version it made)."""
        import json

        reports = _path(project_dir, reports_dir)
        _ftlib(project_dir, params_file, _overrides(params or {}), "register", "--adapter", adapter,
               "--data-dir", str(Path(splits["test"]).parent), "--reports", str(reports),
               "--quantized", str(_path(project_dir, quantized_dir)), "--merged", str(_path(project_dir, merged_dir)),
               "--validation-report", str(_path(project_dir, validated_dir) / "report.json"),
               "--json", str(reports / "registration.json"))
        return json.loads((reports / "registration.json").read_text())

    @task(trigger_rule="none_failed")
    def summary(project_dir: str, splits: dict[str, str], reports_dir: str) -> dict:
        """What this run produced and decided (also reports/summary.md): runs whether or not the gate passed."""
        from ftlib.airflow.orchestrate import summary as summarize

        s = summarize(_path(project_dir, reports_dir), Path(splits["test"]).parent)
        for k, v in s.items():
            print(f"{k:>20}: {v}")
        return s

    p = "{{ params.project_dir }}", "{{ params.params_file }}"
    report = validate(*p, "{{ params.raw_dir }}", "{{ params.validated_dir }}")
    splits = split(*p, "{{ params.raw_dir }}", "{{ params.splits_dir }}", report)
    adapter = train(*p, splits, "{{ params.reports_dir }}", "{{ params.executor }}", "{{ params.gpus }}")
    bench = quantize_and_benchmark(*p, adapter, splits, "{{ params.merged_dir }}", "{{ params.quantized_dir }}",
                                   "{{ params.reports_dir }}", "{{ params.executor }}")
    metrics = evaluate(*p, adapter, splits, "{{ params.reports_dir }}", bench)
    passed = gate(*p, adapter, splits, "{{ params.reports_dir }}", metrics)
    registered = register(*p, adapter, splits, "{{ params.reports_dir }}", "{{ params.merged_dir }}",
                          "{{ params.quantized_dir }}", "{{ params.validated_dir }}")
    passed >> registered >> summary("{{ params.project_dir }}", splits, "{{ params.reports_dir }}")


finetune_llama3()
