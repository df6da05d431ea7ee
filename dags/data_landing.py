"""Data landing: move new JSONL files from the landing folder into data/raw and emit the
`ftlib_raw_data` asset event that schedules `finetune_llama3`.

Polls every FTLIB_LANDING_POLL_S seconds (60 by default) with one run at a time. A burst
of files is moved together (or over a few polls); each poll that moved something emits one
event, and `finetune_llama3` (max_active_runs=1) queues them, so runs never overlap and
the last one trains on every file in data/raw. Nothing moved -> the task is skipped and no
event is emitted. Files are moved with an atomic rename (never copied, never overwritten),
and a file modified in the last 2 s waits for the next poll (it may still be written).
In production the landing location is a mounted bucket prefix (s3fs/gcsfuse) or a
volume the ingestion job writes to; FTLIB_LANDING_DIR points at it.
"""

from __future__ import annotations

import os
from datetime import timedelta
from pathlib import Path

import pendulum
from airflow.sdk import Param, dag, task

from ftlib.airflow.orchestrate import raw_data_asset

PROJECT_DIR = os.environ.get("FTLIB_PROJECT_DIR", str(Path(__file__).resolve().parents[1]))
LANDING_DIR = os.environ.get("FTLIB_LANDING_DIR", str(Path(PROJECT_DIR, "data", "landing")))


@dag(
    dag_id="data_landing",
    description="Move newly landed JSONL files into data/raw and emit the ftlib_raw_data asset event.",
    schedule=timedelta(seconds=int(os.environ.get("FTLIB_LANDING_POLL_S", "60"))),
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    max_active_runs=1,
    params={
        "landing_dir": Param(LANDING_DIR, type="string", description="Where producers drop *.jsonl files."),
        "raw_dir": Param(str(Path(PROJECT_DIR, "data", "raw")), type="string", description="The pipeline's data/raw."),
    },
    tags=["ftlib", "data"],
    doc_md=__doc__,
)
def data_landing():
    @task(outlets=[raw_data_asset(PROJECT_DIR)])
    def collect(landing_dir: str, raw_dir: str) -> list[str]:
        """Move finished files; skip (no asset event) when nothing landed."""
        from airflow.exceptions import AirflowSkipException

        from ftlib.airflow.orchestrate import collect_landed

        moved = collect_landed(Path(landing_dir), Path(raw_dir))
        if not moved:
            raise AirflowSkipException(f"nothing new in {landing_dir}")
        for f in moved:
            print(f"landed: {f}")
        return [str(f) for f in moved]

    collect("{{ params.landing_dir }}", "{{ params.raw_dir }}")


data_landing()
