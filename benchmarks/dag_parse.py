"""DAG parse time: each file in dags/ and the whole folder, against an empty DAG in the same run.

Every measurement is a fresh Python process (the DAG processor parses a file in a fresh
context too, so module imports count): it imports Airflow's DagBag, then times
`DagBag(dag_folder=PATH)` alone. The baseline is a DAG with one empty task and no
imports beyond airflow.sdk. Median of --runs runs each.

Target: each file <= 0.3 s above the empty DAG. Prints a table, then one JSON line:
per_file_s (mapping), folder_s, empty_dag_s, above_empty_s (mapping), ratio (slowest file
over the empty DAG), target_met.

    python benchmarks/dag_parse.py [--runs 7]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
EMPTY_DAG = '''
import pendulum
from airflow.sdk import dag, task


@dag(dag_id="empty", schedule=None, start_date=pendulum.datetime(2026, 1, 1, tz="UTC"))
def empty():
    @task
    def noop():
        pass

    noop()


empty()
'''
PROBE = """
import sys, time
from airflow.dag_processing.dagbag import DagBag
t = time.perf_counter()
bag = DagBag(dag_folder=sys.argv[1])
dt = time.perf_counter() - t
assert not bag.import_errors, bag.import_errors
print("PARSE", dt, len(bag.dags))
"""


def parse_s(path: Path, env: dict[str, str]) -> float:
    r = subprocess.run([sys.executable, "-c", PROBE, str(path)], env=env, capture_output=True, text=True, timeout=300)
    if r.returncode != 0:
        raise SystemExit(f"{path}: {r.stderr[-2000:]}")
    return float(next(line for line in r.stdout.splitlines() if line.startswith("PARSE ")).split()[1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=7)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        env = {**os.environ, "AIRFLOW_HOME": tmp, "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
               "AIRFLOW__CORE__DAGS_FOLDER": str(ROOT / "dags"), "PYTHONPATH": str(ROOT)}
        empty = Path(tmp) / "empty_dag.py"
        empty.write_text(EMPTY_DAG)
        targets = {"(empty DAG)": empty, **{p.name: p for p in sorted((ROOT / "dags").glob("*.py"))}, "dags/ (folder)": ROOT / "dags"}
        medians = {name: statistics.median(parse_s(path, env) for _ in range(args.runs)) for name, path in targets.items()}
    base = medians.pop("(empty DAG)")
    folder = medians.pop("dags/ (folder)")
    above = {k: v - base for k, v in medians.items()}
    print(f"{'file':<24} {'parse s':>9} {'above empty s':>14}")
    print(f"{'(empty DAG)':<24} {base:>9.3f} {'':>14}")
    for k, v in medians.items():
        print(f"{k:<24} {v:>9.3f} {above[k]:>14.3f}")
    print(f"{'dags/ (whole folder)':<24} {folder:>9.3f} {folder - base:>14.3f}")
    print(json.dumps({
        "per_file_s": {k: round(v, 4) for k, v in medians.items()}, "folder_s": round(folder, 4),
        "empty_dag_s": round(base, 4), "above_empty_s": {k: round(v, 4) for k, v in above.items()},
        "ratio": round(max(medians.values()) / base, 3), "target_met": max(above.values()) <= 0.3, "runs": args.runs,
    }))


if __name__ == "__main__":
    main()
