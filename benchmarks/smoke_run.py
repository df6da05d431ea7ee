"""How long a UI-triggered smoke run takes: `airflow standalone` (SQLite) over a copy of this project (its
params.yaml, data/raw and the embedded 135M model), `finetune_llama3` triggered through the REST API v2 with
{"profile": "smoke"} as the trigger form sends it, timed from the trigger to the run's end.

Baseline: issue 17's budget for that run, 5 minutes on 2 cores (before the profile existed, the quickest
form-only run, max_steps=2, still ran six quantize variants and the base-model benchmark: cancelled after 38 min).

    python benchmarks/smoke_run.py [--keep]

Prints each task's seconds, then as its last line one JSON object: run_s, state, tasks, budget_s, ratio
(run_s / budget_s; <= 1 meets the budget).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from scripts.airflow_e2e import api, free_port, standalone, standalone_env, wait  # noqa: E402

BUDGET_S = 300.0


def seconds(ti: dict) -> float | None:
    if not (ti.get("start_date") and ti.get("end_date")):
        return None
    return (datetime.fromisoformat(ti["end_date"]) - datetime.fromisoformat(ti["start_date"])).total_seconds()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--keep", action="store_true", help="Keep the temp dir (Airflow home, logs, project copy).")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="ftlib-smoke-"))
    proj = tmp / "project"
    proj.mkdir()
    shutil.copy(ROOT / "params.yaml", proj / "params.yaml")
    shutil.copytree(ROOT / "data" / "raw", proj / "data" / "raw")
    env = standalone_env(tmp / "airflow", ROOT / "dags", free_port(), AIRFLOW__CORE__PLUGINS_FOLDER=str(ROOT / "plugins"),
                         FTLIB_PROJECT_DIR=str(proj), FTLIB_LANDING_DIR=str(proj / "data" / "landing"),
                         MLFLOW_TRACKING_URI=f"sqlite:///{tmp / 'mlflow.db'}")
    dag = "/api/v2/dags/finetune_llama3"
    result: dict = {"budget_s": BUDGET_S}
    try:
        with standalone(env, tmp / "standalone.log", 3, unpause=("finetune_llama3",)) as (base, token):
            t0 = time.time()
            run_id = api(base, token, "POST", f"{dag}/dagRuns", {"logical_date": None, "conf": {"profile": "smoke"}})["dag_run_id"]
            state = wait("the smoke run", lambda: (s := api(base, token, "GET", f"{dag}/dagRuns/{run_id}")["state"])
                         in ("success", "failed") and s, 1800, 2)
            result |= {"run_s": round(time.time() - t0, 1), "state": state}
            tis = api(base, token, "GET", f"{dag}/dagRuns/{run_id}/taskInstances")["task_instances"]
            result["tasks"] = {ti["task_id"]: {"state": ti["state"], "s": seconds(ti)} for ti in tis}
            others = [r for r in api(base, token, "GET", f"{dag}/dagRuns")["dag_runs"] if r["dag_run_id"] != run_id]
            result["other_runs"] = [f"{r['run_type']}:{r['state']}" for r in others]  # e.g. a cron run unpausing queued
    finally:
        if args.keep:
            result["tmp"] = str(tmp)
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    print(f"{'task':<24}{'state':<10}{'seconds':>8}")
    for name, t in result.get("tasks", {}).items():
        print(f"{name:<24}{str(t['state']):<10}{'-' if t['s'] is None else format(t['s'], '.1f'):>8}")
    if "run_s" in result:
        result["ratio"] = round(result["run_s"] / BUDGET_S, 3)
        print(f"UI-triggered smoke run: {result['state']} in {result['run_s']:.0f} s; budget {BUDGET_S:.0f} s; "
              f"ratio {result['ratio']:.2f}")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
