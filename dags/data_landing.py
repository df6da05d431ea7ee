"""Data landing: move each settled burst of landed JSONL files into data/raw and emit the
`ftlib_raw_data` asset event that schedules `finetune_llama3`.

Event-driven, with no DAG run per poll: the `ftlib_landing` asset (the landing folder,
FTLIB_LANDING_DIR) has an asset watcher, ftlib.airflow.landing.LandingTrigger, which scans
the folder in the triggerer. When no *.jsonl file has appeared or changed for
FTLIB_LANDING_QUIET_S seconds (30 by default), it claims the burst (renames it into
`.settled/<claim>/` inside the landing folder) and fires one asset event; this DAG runs
once per event. Its task moves every claimed file into data/raw by atomic rename (never
copied, never overwritten: a name clash gets a timestamp prefix) and emits one
`ftlib_raw_data` event, so one burst gives one retraining run, which sees every file of
the burst. Nothing claimed -> the task is skipped and no event is emitted. Files of a
burst still being written are not claimed, and a claim still unmoved 10 minutes after its
event (a lost event, a paused DAG) is announced again. The watcher only runs while this
DAG is unpaused. In production the landing location is a mounted bucket prefix
(s3fs/gcsfuse) or a volume the ingestion job writes to; the triggerer and the workers
both mount it.
"""

from __future__ import annotations

import os
from pathlib import Path

from airflow.sdk import dag, task

from ftlib.airflow.landing import landing_asset
from ftlib.airflow.orchestrate import raw_data_asset

# From the deployment, never the trigger form: the watcher watches this folder.
PROJECT_DIR = os.environ.get("FTLIB_PROJECT_DIR", str(Path(__file__).resolve().parents[1]))
LANDING_DIR = os.environ.get("FTLIB_LANDING_DIR", str(Path(PROJECT_DIR, "data", "landing")))
LANDING = landing_asset(LANDING_DIR, quiet_s=float(os.environ.get("FTLIB_LANDING_QUIET_S", "30")))


@dag(
    dag_id="data_landing",
    description="Move each settled burst of landed JSONL files into data/raw and emit the ftlib_raw_data asset event.",
    schedule=[LANDING],
    catchup=False,
    max_active_runs=1,
    tags=["ftlib", "data"],
    doc_md=__doc__,
)
def data_landing():
    @task(outlets=[raw_data_asset(PROJECT_DIR)])
    def collect() -> list[str]:
        """Move the claimed bursts; skip (no asset event) when nothing is claimed."""
        from airflow.sdk.exceptions import AirflowSkipException

        from ftlib.airflow.landing import collect_settled

        moved = collect_settled(Path(LANDING_DIR), Path(PROJECT_DIR, "data", "raw"))
        if not moved:
            raise AirflowSkipException(f"no settled burst in {LANDING_DIR}")
        for f in moved:
            print(f"landed: {f}")
        return [str(f) for f in moved]

    collect()


data_landing()
