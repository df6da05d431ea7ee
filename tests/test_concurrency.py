"""Runs that must not overlap, with a real Airflow (`airflow standalone`: api-server, scheduler,
dag-processor, triggerer on SQLite): a burst of 50 asset events (50 producers each landing a
file) and two runs triggered at the same moment. The DAGs are tests/dags_concurrency/burst.py."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from scripts.airflow_e2e import api, free_port, standalone, standalone_env, wait
from tests.conftest import REPO

pytestmark = pytest.mark.slow


def intervals(log: Path) -> list[tuple[float, float, str, int]]:
    starts, out = {}, []
    for line in log.read_text().splitlines():
        kind, t, run_id, *rest = line.split()
        if kind == "start":
            starts[run_id] = float(t)
        else:
            out.append((starts[run_id], float(t), run_id, int(rest[0])))
    return sorted(out)


def test_asset_burst_and_simultaneous_triggers_never_overlap(tmp_path):
    proj = tmp_path / "project"
    (proj / "data" / "raw").mkdir(parents=True)
    env = standalone_env(tmp_path / "airflow", REPO / "tests" / "dags_concurrency", free_port(), AIRFLOW__CORE__PARALLELISM="4",
                         FTLIB_PROJECT_DIR=str(proj), BURST_FILES="50", PYTHONPATH=str(REPO))
    with standalone(env, tmp_path / "standalone.log", dags=2, unpause=("land_burst", "probe")) as (base, token):
        # 1. the burst: 50 mapped producers, each lands a file and emits one asset event
        burst = api(base, token, "POST", "/api/v2/dags/land_burst/dagRuns", {"logical_date": None})["dag_run_id"]
        state = wait("the burst", lambda: (s := api(base, token, "GET", f"/api/v2/dags/land_burst/dagRuns/{burst}")["state"])
                     in ("success", "failed") and s, 600, 3)
        assert state == "success"
        events = api(base, token, "GET", "/api/v2/assets/events?limit=100")["asset_events"]
        assert len(events) == 50

        def settled():  # every asset-triggered probe run finished, and the newest one saw all 50 files
            runs = api(base, token, "GET", "/api/v2/dags/probe/dagRuns?limit=100")["dag_runs"]
            done = all(r["state"] in ("success", "failed") for r in runs)
            return runs if runs and done and (proj / "runs.log").exists() and intervals(proj / "runs.log")[-1][3] == 50 else None

        asset_runs = wait("the asset-triggered runs", settled, 600, 3)
        assert {r["state"] for r in asset_runs} == {"success"}
        assert {r["run_type"] for r in asset_runs} == {"asset_triggered"}
        assert len(asset_runs) < 50  # events queued while a run was active were consumed by the next run

        # 2. two runs triggered at the same moment
        ids = [api(base, token, "POST", "/api/v2/dags/probe/dagRuns", {"logical_date": None})["dag_run_id"] for _ in range(2)]
        wait("the two triggered runs", lambda: all(
            api(base, token, "GET", f"/api/v2/dags/probe/dagRuns/{i}")["state"] in ("success", "failed") for i in ids), 300, 3)
        assert [api(base, token, "GET", f"/api/v2/dags/probe/dagRuns/{i}")["state"] for i in ids] == ["success", "success"]

    spans = intervals(proj / "runs.log")
    print(f"50 asset events -> {len(asset_runs)} asset-triggered runs, + 2 triggered together; all serialized")
    assert len(spans) == len(asset_runs) + 2
    for (s1, e1, r1, _), (s2, e2, r2, _) in zip(spans, spans[1:]):
        assert e1 <= s2, f"{r1} and {r2} overlapped"
    state = json.loads((proj / "state.json").read_text())
    assert state == {"runs": len(spans), "files": 50}  # no update lost to a concurrent run
    assert sorted(p.name for p in (proj / "data" / "raw").iterdir()) == [f"batch-{i:03d}.jsonl" for i in range(50)]
    assert list((proj / "data" / "landing").iterdir()) == []  # nothing lost in landing
