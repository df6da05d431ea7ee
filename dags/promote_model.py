"""Promotion and rollback of a registered model: a person triggers it from the UI form.

Calls `ftlib promote`, which moves the `champion` alias, records who/when/why as version
tags, keeps `previous-champion`, and refuses a version that failed the gate unless
`force` is set with a reason. `ftlib serve` picks the new champion up on restart.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pendulum
from airflow.sdk import Param, dag, task

PROJECT_DIR = os.environ.get("FTLIB_PROJECT_DIR", str(Path(__file__).resolve().parents[1]))


@dag(
    dag_id="promote_model",
    description="Move @champion to a registered version, or roll it back (ftlib promote).",
    schedule=None,
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    max_active_runs=1,
    params={
        "model_name": Param("ftlib-sentiment", type="string", minLength=1, description="Registered model name."),
        "action": Param("promote", type="string", enum=["promote", "rollback"]),
        "version": Param(None, type=["null", "integer"], minimum=1, description="Version to promote (or give an alias)."),
        "alias": Param("challenger", type=["null", "string"], description="Alias of the version to promote, if no version."),
        "reason": Param("", type="string", description="Why (recorded on the version); required with force."),
        "force": Param(False, type="boolean", description="Promote a version that failed the gate (needs a reason)."),
    },
    tags=["ftlib", "registry"],
    doc_md=__doc__,
)
def promote_model():
    @task(retries=0)  # a refused promotion must not be retried into success
    def promote(params: dict | None = None) -> str:
        from airflow.sdk.exceptions import AirflowFailException
        from airflow.sdk import get_current_context

        p = params or {}
        cmd = [sys.executable, "-m", "ftlib", "promote", p["model_name"], "--reason", p.get("reason") or ""]
        if p["action"] == "rollback":
            cmd.append("--rollback")
        elif p.get("version") is not None:
            cmd += ["--version", str(p["version"])]
        else:
            cmd += ["--alias", p.get("alias") or "challenger"]
        if p.get("force"):
            cmd.append("--force")
        ctx = get_current_context()
        env = {**os.environ, "FTLIB_USER": f"airflow:{ctx['dag_run'].run_id}"}
        r = subprocess.run(cmd, cwd=PROJECT_DIR, env=env, capture_output=True, text=True)
        print(r.stdout + r.stderr)
        if r.returncode != 0:
            raise AirflowFailException(f"ftlib promote refused (exit {r.returncode}): {(r.stderr or r.stdout).strip()}")
        return r.stdout.strip()

    promote()


promote_model()
