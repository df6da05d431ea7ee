"""Airflow plugin: every ftlib task instance links to its MLflow runs, the registered model and the GX Data Docs.

Links are computed from the task instance key alone (dag, task, run id), so they work in
the UI without extra XCom traffic:
  MLflow runs   runs of this Airflow run (register tags them ftlib.lineage.airflow.run_id)
  MLflow model  the registered model's versions, aliases and lineage tags
  Data Docs     the Great Expectations Data Docs the validate task rendered
Base URLs come from the deployment: FTLIB_MLFLOW_UI_URL (http://localhost:5000),
FTLIB_REGISTERED_MODEL (ftlib-sentiment) and FTLIB_DATA_DOCS_URL (the project's
data/validated/data_docs/index.html as a file:// URL).
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
    name = "MLflow runs"

    def get_link(self, operator, *, ti_key) -> str:
        if ti_key.dag_id not in FTLIB_DAGS:
            return ""
        search = f"tags.`ftlib.lineage.airflow.run_id` = '{ti_key.run_id}'"
        return f"{_mlflow()}/#/experiments?searchFilter={urllib.parse.quote(search)}"


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
        default = Path(PROJECT_DIR, "data", "validated", "data_docs", "index.html").as_uri()
        return os.environ.get("FTLIB_DATA_DOCS_URL", default)


class FtlibPlugin(AirflowPlugin):
    name = "ftlib"
    global_operator_extra_links = [MLflowRunsLink(), MLflowModelLink(), DataDocsLink()]
