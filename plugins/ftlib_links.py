"""Airflow plugin: every ftlib task instance links to its MLflow run, the registered model and the GX Data Docs.

Links are computed from the task instance key alone (dag, task, run id), so they work in the UI without
extra XCom traffic. Two of them go through this plugin's own routes (`fastapi_apps`, under /ftlib on the
Airflow API server):
  MLflow run     /ftlib/mlflow-run?dag_run_id=..&task_id=..: redirects to the MLflow run of that task (the
                 register/gate run of the Airflow run, tagged ftlib.lineage.airflow.run_id; for `train`, the
                 training run it records), else to the ftlib experiment filtered to the Airflow run
  MLflow model   the registered model's versions, aliases and lineage tags
  GX Data Docs   /ftlib/data-docs/index.html: the Data Docs the validate task rendered, served from the project
Plugin routes are not behind Airflow's login (Airflow does not protect plugin apps): they serve the Data Docs
and a redirect, nothing else; set FTLIB_PLUGIN_ROUTES=off to leave them out.
Deployment settings: FTLIB_MLFLOW_UI_URL (http://localhost:5000), FTLIB_REGISTERED_MODEL (ftlib-sentiment),
FTLIB_PROJECT_DIR (the folder above plugins/), MLFLOW_TRACKING_URI (the store the redirect searches).
"""

from __future__ import annotations

import os
import urllib.parse
from pathlib import Path

from airflow.plugins_manager import AirflowPlugin
from airflow.sdk import BaseOperatorLink

FTLIB_DAGS = ("finetune_llama3", "promote_model", "data_landing")
PROJECT_DIR = os.environ.get("FTLIB_PROJECT_DIR", str(Path(__file__).resolve().parents[1]))


def _mlflow() -> str:
    return os.environ.get("FTLIB_MLFLOW_UI_URL", "http://localhost:5000").rstrip("/")


class MLflowRunsLink(BaseOperatorLink):
    name = "MLflow run"

    def get_link(self, operator, *, ti_key) -> str:
        if ti_key.dag_id not in FTLIB_DAGS:
            return ""
        query = urllib.parse.urlencode({"dag_run_id": ti_key.run_id, "task_id": ti_key.task_id})
        return f"/ftlib/mlflow-run?{query}"


class MLflowModelLink(BaseOperatorLink):
    name = "MLflow model"

    def get_link(self, operator, *, ti_key) -> str:
        if ti_key.dag_id not in FTLIB_DAGS:
            return ""
        return f"{_mlflow()}/#/models/{urllib.parse.quote(os.environ.get('FTLIB_REGISTERED_MODEL', 'ftlib-sentiment'))}"


class DataDocsLink(BaseOperatorLink):
    name = "GX Data Docs"

    def get_link(self, operator, *, ti_key) -> str:
        if ti_key.dag_id != "finetune_llama3" or ti_key.task_id not in ("validate", "split"):
            return ""
        return os.environ.get("FTLIB_DATA_DOCS_URL", "/ftlib/data-docs/index.html")


def mlflow_run_url(dag_run_id: str, task_id: str) -> str:
    """The MLflow UI page of a task's run (see the module docstring), or the experiment filtered to the Airflow run."""
    from mlflow import MlflowClient

    c = MlflowClient()
    experiment = c.get_experiment_by_name(os.environ.get("MLFLOW_EXPERIMENT_NAME", "ftlib"))
    if experiment is None:
        return f"{_mlflow()}/#/experiments"
    quoted = dag_run_id.replace("'", "")
    runs = c.search_runs([experiment.experiment_id], f"tags.`ftlib.lineage.airflow.run_id` = '{quoted}'",
                         order_by=["attributes.start_time DESC"], max_results=1)
    base = f"{_mlflow()}/#/experiments/{experiment.experiment_id}"
    if not runs:
        search = f"tags.`ftlib.lineage.airflow.run_id` = '{quoted}'"
        return f"{base}/runs?searchFilter={urllib.parse.quote(search)}"
    run = runs[0]
    if task_id == "train" and run.data.tags.get("ftlib.lineage.train.mlflow_run_id"):
        return f"{base}/runs/{run.data.tags['ftlib.lineage.train.mlflow_run_id']}"
    return f"{base}/runs/{run.info.run_id}"


def routes():
    """The plugin's FastAPI app: the MLflow redirect and the Data Docs (read from disk on every request)."""
    from fastapi import FastAPI
    from fastapi.responses import RedirectResponse
    from fastapi.staticfiles import StaticFiles

    app = FastAPI(title="ftlib links")

    @app.get("/mlflow-run")
    def mlflow_run(dag_run_id: str, task_id: str = "") -> RedirectResponse:
        return RedirectResponse(mlflow_run_url(dag_run_id, task_id), status_code=307)

    docs = Path(PROJECT_DIR, "data", "validated", "data_docs")
    app.mount("/data-docs", StaticFiles(directory=docs, html=True, check_dir=False), name="data-docs")
    return app


class FtlibPlugin(AirflowPlugin):
    name = "ftlib"
    global_operator_extra_links = [MLflowRunsLink(), MLflowModelLink(), DataDocsLink()]
    fastapi_apps = ([] if os.environ.get("FTLIB_PLUGIN_ROUTES") == "off" else
                    [{"app": routes(), "url_prefix": "/ftlib", "name": "ftlib: MLflow run redirect and GX Data Docs"}])
