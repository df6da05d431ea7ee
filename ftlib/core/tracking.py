"""MLflow tracking setup, shared by every stage that logs (train, benchmark, review) and the registry."""

from __future__ import annotations

import contextlib
import os
import urllib.error
import urllib.request
from pathlib import Path
from typing import Iterator


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
        probe(uri)
    elif uri.startswith("sqlite:///"):
        wait_for_sqlite(Path(uri[len("sqlite:///"):]))
    return uri


SQLITE_WAIT_S = 30.0


def wait_for_sqlite(db: Path, seconds: float | None = None) -> None:
    """Wait (up to `seconds`) until no other process holds a write lock on the SQLite store, so a concurrent
    `ftlib register` or `mlflow ui` migration makes this one wait instead of failing with a traceback.
    sqlite3's own busy timeout does the retrying; RegistryError (one line) when it runs out."""
    import sqlite3

    if not db.is_file():
        return
    seconds = SQLITE_WAIT_S if seconds is None else seconds
    try:
        con = sqlite3.connect(db, timeout=seconds, isolation_level=None)
        try:
            con.execute("BEGIN IMMEDIATE")  # waits for the reserved lock, the one every writer needs
            con.execute("ROLLBACK")
        finally:
            con.close()
    except sqlite3.OperationalError as e:
        raise RegistryError(f"{db} is locked by another process (waited {seconds:.0f} s: {e}); "
                            "let it finish (or stop it) and rerun") from None


def is_locked_store(e: BaseException) -> bool:
    """A 'database is locked' error from the SQLite store, however MLflow or SQLAlchemy wrapped it."""
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if "database is locked" in str(e):
            return True
        e = e.__cause__ or e.__context__
    return False


def probe(uri: str) -> None:
    """GET /health of a tracking server within 5 s, with the URI's basic-auth credentials if it has any
    (MLflow's client sends them too); RegistryError names the server without its credentials."""
    import base64

    from ftlib.core.security import redact_url, split_userinfo

    bare, auth = split_userinfo(uri)
    request = urllib.request.Request(bare.rstrip("/") + "/health")
    if auth:
        request.add_header("Authorization", "Basic " + base64.b64encode(":".join(auth).encode()).decode())
    try:
        with urllib.request.urlopen(request, timeout=5) as r:
            r.read()
    except urllib.error.HTTPError as e:
        if e.code in (401, 403):
            raise RegistryError(f"MLflow tracking server {redact_url(uri)} refused the credentials (HTTP {e.code}); "
                                "check the user and password in MLFLOW_TRACKING_URI or MLFLOW_TRACKING_USERNAME/PASSWORD") from None
        raise RegistryError(f"MLflow tracking server {redact_url(uri)} answered /health with HTTP {e.code}; "
                            "nothing was logged or registered.") from None
    except (urllib.error.URLError, OSError, ValueError) as e:
        raise RegistryError(f"MLflow tracking server {redact_url(uri)} is unreachable ({getattr(e, 'reason', e)}); "
                            "nothing was logged or registered. Start it (or fix MLFLOW_TRACKING_URI) and rerun.") from None


@contextlib.contextmanager
def registry_lock(name: str) -> Iterator[None]:
    """Serialize register / promote / rollback of one registered model across this machine's processes
    (Airflow workers on one host, CLI runs, the DAG and a person at once): an exclusive flock on a file in the
    ftlib cache named after the tracking store and the model. Stores shared by several hosts are covered by
    register's check after creating a version (the lowest version of a run key stays)."""
    import fcntl
    import hashlib

    from ftlib.core.errors import cache_dir

    setup_tracking()
    key = hashlib.sha256(f"{os.environ['MLFLOW_TRACKING_URI']}\0{name}".encode()).hexdigest()[:16]
    path = cache_dir() / "locks" / f"registry-{key}.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)
