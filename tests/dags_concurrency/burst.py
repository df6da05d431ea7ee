"""Test DAGs for tests/test_concurrency.py (not product DAGs): 50 producers each land one file
with ftlib's landing move and emit the `ftlib_raw_data` asset event; a consumer scheduled
on that asset with finetune_llama3's `max_active_runs=1` records when it ran and what it saw."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pendulum
from airflow.sdk import dag, task

from ftlib.airflow.orchestrate import raw_data_asset

PROJECT = Path(os.environ["FTLIB_PROJECT_DIR"])
RAW = raw_data_asset(PROJECT)
N = int(os.environ.get("BURST_FILES", "50"))


@dag(dag_id="land_burst", schedule=None, start_date=pendulum.datetime(2026, 1, 1, tz="UTC"), catchup=False)
def land_burst():
    @task(outlets=[RAW])
    def land(i: int) -> None:
        from ftlib.airflow.orchestrate import collect_landed

        landing = PROJECT / "data" / "landing"
        landing.mkdir(parents=True, exist_ok=True)
        f = landing / f"batch-{i:03d}.jsonl"
        f.write_text(json.dumps({"instruction": "Clasifica", "input": f"text {i}", "output": "POSITIVO"}) + "\n")
        os.utime(f, (time.time() - 60, time.time() - 60))
        collect_landed(landing, PROJECT / "data" / "raw", settle_s=0)

    land.expand(i=list(range(N)))


@dag(dag_id="probe", schedule=[RAW], start_date=pendulum.datetime(2026, 1, 1, tz="UTC"), catchup=False,
     max_active_runs=1)
def probe():
    @task
    def consume() -> None:
        from airflow.sdk import get_current_context

        run_id = get_current_context()["run_id"]
        state_file, log = PROJECT / "state.json", PROJECT / "runs.log"
        with log.open("a") as f:
            f.write(f"start {time.time():.3f} {run_id}\n")
        # read-modify-write with a pause in the middle: overlapping runs would lose an update
        state = json.loads(state_file.read_text()) if state_file.exists() else {"runs": 0}
        files = sorted(p.name for p in (PROJECT / "data" / "raw").glob("*.jsonl"))
        time.sleep(2)
        state_file.write_text(json.dumps({"runs": state["runs"] + 1, "files": len(files)}))
        with log.open("a") as f:
            f.write(f"end {time.time():.3f} {run_id} {len(files)}\n")

    consume()


land_burst()
probe()
