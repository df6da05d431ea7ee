"""MLflow tracking setup, shared by every stage that logs (train, benchmark, review) and the registry."""

from __future__ import annotations

import os
import urllib.error
import urllib.request
from pathlib import Path


class RegistryError(RuntimeError):
    """A registry problem the user must act on (unreachable server, unknown model, refused promotion)."""


def setup_tracking() -> str:
    """Default `sqlite:///mlflow.db` in the working directory; fail fast when a server is down.

    MLflow's client retries an unreachable server for minutes; one short /health probe
    turns that into an immediate, clear error before anything is written.
    """
    os.environ.setdefault("MLFLOW_TRACKING_URI", f"sqlite:///{Path('mlflow.db').resolve()}")
    os.environ.setdefault("MLFLOW_EXPERIMENT_NAME", "ftlib")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    os.environ.setdefault("HF_MLFLOW_LOG_ARTIFACTS", "0")  # the Trainer's MLflow callback: metrics, not checkpoints
    uri = os.environ["MLFLOW_TRACKING_URI"]
    if uri.startswith(("http://", "https://")):
        try:
            with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=5) as r:
                r.read()
        except (urllib.error.URLError, OSError) as e:
            raise RegistryError(f"MLflow tracking server {uri} is unreachable ({getattr(e, 'reason', e)}); "
                                "nothing was logged or registered. Start it (or fix MLFLOW_TRACKING_URI) and rerun.") from None
    return uri
