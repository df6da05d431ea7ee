"""Retraining: validate -> split -> train -> quantize_and_benchmark -> evaluate -> gate -> register -> summary.

Runs when new data lands (the `ftlib_raw_data` asset, updated by the `data_landing` DAG:
one run per settled burst of files) and on a cron schedule (FTLIB_RETRAIN_CRON, Mondays
03:00 UTC by default); trigger it by hand from the UI with the form's params. Unpausing
it starts no run for a cron point already past, neither before its first scheduled run
nor after a pause that spans cron points: the next run is the next cron
point from now (ftlib.airflow.schedule.NoBacklogCronTimetable, registered by
plugins/ftlib_schedule.py; no start_date), so "Unpause on trigger" starts the user's run,
not a cron run ahead of it. A point less than 5 minutes past still runs; where the plugin
is not loaded the DAG falls back to the plain cron, which runs the latest missed point.

Thin on purpose: each task is one call into
ftlib.airflow.tasks, which reads the form from the task context and calls the same stage
functions the CLI and dvc.yaml use, in process; tasks pass paths (never data) on.
Nothing heavy is imported at parse time -- torch, transformers, great_expectations and
the Kubernetes provider load inside the tasks -- so the DAG processor parses this file fast.

With dvc.yaml's paths and params.yaml's values (no overrides in the form), every stage
runs as `dvc repro --single-item STAGE`: on unchanged data, params and code DVC skips the
stage or restores its outputs from its cache instead of retraining, dvc.lock records the
run, and the splits are pushed to the DVC remote. A run with overrides or other paths
calls ftlib directly (the log says why), where a finished training checkpoint of the same
data and params is still reused.

executor=local runs every stage in the task's process; executor=kubernetes runs train, quantize,
benchmark, evaluate and the gate's re-scoring as pods on a GPU node (ftlib.airflow.orchestrate.gpu_pod: nvidia.com/gpu limit, GPU node selector
and toleration, the project PVC, secrets from Kubernetes secrets, non-root).
"""

from __future__ import annotations

import os
from datetime import timedelta
from pathlib import Path

from airflow.sdk import AssetOrTimeSchedule, Param, dag, task

from ftlib.airflow.orchestrate import TUNABLES, current_values, raw_data_asset
from ftlib.airflow.schedule import retrain_timetable
from ftlib.core.config import PROFILES

# The project checkout the tasks work in (the image's working dir in production).
PROJECT_DIR = os.environ.get("FTLIB_PROJECT_DIR", str(Path(__file__).resolve().parents[1]))
RAW_DATA = raw_data_asset(PROJECT_DIR)
CURRENT = current_values(PROJECT_DIR)  # the form opens on params.yaml's values
RETRAIN_CRON = os.environ.get("FTLIB_RETRAIN_CRON", "0 3 * * 1")  # Mondays 03:00 UTC


@dag(
    dag_id="finetune_llama3",
    description="Validate new data with GX, split, fine-tune, quantize + benchmark, evaluate, gate, register.",
    # No start_date: with one, Airflow schedules the latest past cron point as soon as the DAG is
    # unpaused. The timetable's next run is never a cron point more than 5 min past, before the
    # first scheduled run or after a pause (ftlib/airflow/schedule.py).
    schedule=AssetOrTimeSchedule(timetable=retrain_timetable(RETRAIN_CRON), assets=[RAW_DATA]),
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
        "profile": Param("full", type="string", enum=list(PROFILES),
                         description="full: the real run. smoke: every stage for real but cut to seconds (8 training steps, "
                                     "q8_0 only, 16 benchmark rows, no base model), ~3 min on 2 cores; outputs go to "
                                     "runs/smoke/, nothing is gated or registered."),
        **{name: Param(CURRENT.get(name), **schema) for name, (_, schema) in TUNABLES.items()},
        "executor": Param("local", type="string", enum=["local", "kubernetes"],
                          description="local: every stage in the task process on this worker; kubernetes: train, quantize, benchmark, evaluate and the gate's re-scoring in GPU pods."),
        "gpus": Param(1, type="integer", minimum=1, maximum=8, description="GPUs of the train pod (>1 runs `accelerate launch`); the other pods take one."),
        "params_file": Param("params.yaml", type=["null", "string"],
                             description="params.yaml, relative to the project dir (the deployment's FTLIB_PROJECT_DIR)."),
        "raw_dir": Param("data/raw", type=["null", "string"], description="Where new JSONL data lands."),
        "validated_dir": Param("data/validated", type=["null", "string"], description="report.json, quarantine.jsonl, Data Docs."),
        "splits_dir": Param("data/splits", type=["null", "string"], description="train/validation/test.jsonl."),
        "reports_dir": Param("reports", type=["null", "string"], description="metrics.json, benchmark.json, gate.json, plots/."),
        "merged_dir": Param("models/merged", type=["null", "string"], description="The adapter merged into the base (fp16)."),
        "quantized_dir": Param("models/quantized", type=["null", "string"], description="GGUF files, Modelfile, other variants."),
        "dvc_cache": Param(True, type="boolean",
                           description="Run the stages as `dvc repro` when paths and params are dvc.yaml's: "
                                       "unchanged data, params and code reuse DVC's cache instead of retraining."),
        "overrides": Param([], type="array", items={"type": "string", "pattern": "^[a-z][a-z0-9_.]*=.*$"},
                           description="Other params.yaml overrides, e.g. train.lora_dropout=0.05: base_model, template, "
                                       "max_seq_length, data.*, validate.*, split.*, train.* (not its output paths), quantize.*, "
                                       "benchmark.*. Security settings, path roots and the gate (register.*) are params.yaml's only."),
    },
    tags=["ftlib", "llm", "fine-tuning"],
    doc_md=__doc__,
)
def finetune_llama3():
    from ftlib.airflow import tasks  # noqa: F401  (light: the stage modules load inside each task)

    @task
    def validate() -> str:
        return tasks.validate()

    @task
    def split() -> dict[str, str]:
        return tasks.split()

    @task
    def train() -> str:
        return tasks.train()

    @task
    def quantize_and_benchmark() -> str:
        return tasks.quantize_and_benchmark()

    @task
    def evaluate() -> str:
        return tasks.evaluate()

    @task.short_circuit(ignore_downstream_trigger_rules=False)
    def gate() -> bool:
        """False skips register; the refusal, with every score, is in the log, reports/gate.json and MLflow."""
        return tasks.gate()

    @task
    def register() -> dict[str, str]:
        return tasks.register()

    @task(trigger_rule="none_failed")
    def summary() -> dict:
        """Runs whether or not the gate passed."""
        return tasks.summary()

    validate() >> split() >> train() >> quantize_and_benchmark() >> evaluate() >> gate() >> register() >> summary()


finetune_llama3()
