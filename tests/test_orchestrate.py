"""Airflow glue: UI params -> overrides, the landing move, the GPU pod spec (rendered with the
provider's own pod-building code; no cluster exists here, so the pod is built, not run),
and the extra-links plugin."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from ftlib.airflow.orchestrate import POD_GID, POD_UID, TUNABLES, collect_landed, gpu_pod, overrides, pod_command
from tests.conftest import REPO
from tests.test_dvc import repo  # noqa: F401  (the temp git + DVC project fixture)


def test_only_set_params_become_overrides():
    conf = dict.fromkeys(TUNABLES) | {"lora_r": 8, "learning_rate": 5e-5, "method": "lora"}
    assert overrides(conf, ["train.lora_dropout=0.05"]) == [
        "train.method=lora", "train.lora_r=8", "train.learning_rate=5e-05", "train.lora_dropout=0.05"]
    from ftlib.core.config import load_params

    p = load_params(REPO / "params.yaml", overrides(conf))
    assert (p.train.method, p.train.lora_r, p.train.learning_rate) == ("lora", 8, 5e-5)


def test_the_form_opens_on_params_yaml_and_an_untouched_form_overrides_nothing():
    """Issue 17: the form showed `method: null` and every tunable empty. Now it shows params.yaml's values, and a
    run that leaves them alone still runs as `dvc repro` (no overrides)."""
    from ftlib.airflow.orchestrate import current_values, dvc_reason

    shown = current_values(REPO)
    assert shown["method"] == "auto" and shown["lora_r"] == 16 and shown["max_steps"] == -1
    conf = {"project_dir": str(REPO), **shown}
    assert overrides(conf, []) == []
    assert overrides({**conf, "lora_r": 8}, []) == ["train.lora_r=8"]
    paths_left_empty = dict.fromkeys(["raw_dir", "splits_dir", "reports_dir"])  # optional in the form: dvc.yaml's paths
    assert "differ from dvc.yaml's paths" not in (dvc_reason({**conf, **paths_left_empty, "dvc_cache": True}) or "")


@pytest.mark.parametrize("item", ["trust_remote_code=true", "allow_pickle_weights=true", "paths.allowed_roots=/",
                                  "register.accuracy_threshold=0", "register.min_improvement=-1", "register.model_name=x",
                                  "train.output_dir=/etc/ftlib", "train.checkpoint_dir=/tmp/x", "max_seq_lengthx=1"])
def test_form_overrides_cannot_widen_permissions_or_loosen_the_gate(item):
    """Issue 16: the form's `overrides` accepted trust_remote_code=true, allow_pickle_weights=true and
    paths.allowed_roots=/. Now they pass an allow-list; the message names the override."""
    from ftlib.core.config import ConfigError

    with pytest.raises(ConfigError, match="not allowed from the DAG form"):
        overrides({}, [item])
    assert "register.accuracy_threshold" not in [key for key, _ in TUNABLES.values()]  # nor a form field for the gate


def test_the_project_dir_comes_from_the_deployment(tmp_path, monkeypatch):
    from ftlib.airflow.orchestrate import deployment_project

    monkeypatch.delenv("FTLIB_PROJECT_DIR", raising=False)
    assert deployment_project(str(REPO / "dags" / "finetune_llama3.py")) == REPO
    monkeypatch.setenv("FTLIB_PROJECT_DIR", str(tmp_path))
    assert deployment_project(str(REPO / "dags" / "finetune_llama3.py")) == tmp_path


def test_collect_landed_moves_finished_files_atomically_and_never_overwrites(tmp_path):
    landing, raw = tmp_path / "landing", tmp_path / "raw"
    landing.mkdir()
    raw.mkdir()
    (raw / "a.jsonl").write_text("old\n")
    for name in ("a.jsonl", "b.jsonl", "c.jsonl", "notes.txt"):
        (landing / name).write_text(f"{name}\n")
        os.utime(landing / name, (time.time() - 60, time.time() - 60))
    (landing / "writing.jsonl").write_text("half")  # just modified: still being written
    moved = collect_landed(landing, raw)
    assert len(moved) == 3 and (raw / "a.jsonl").read_text() == "old\n"  # a clash is renamed, not overwritten
    assert sorted(p.read_text() for p in raw.glob("*.jsonl")) == ["a.jsonl\n", "b.jsonl\n", "c.jsonl\n", "old\n"]
    assert sorted(p.name for p in landing.iterdir()) == ["notes.txt", "writing.jsonl"]
    assert collect_landed(landing, raw) == []  # nothing finished is left
    assert collect_landed(tmp_path / "missing", raw) == []


@pytest.mark.parametrize("gpus", [1, 4])
def test_gpu_pod_spec(gpus, monkeypatch):
    monkeypatch.setenv("FTLIB_POD_IMAGE", "registry.example/ftlib-trainer:1.2.3")
    monkeypatch.setenv("FTLIB_POD_NODE_SELECTOR", '{"cloud.google.com/gke-accelerator": "nvidia-h100-80gb"}')
    monkeypatch.setenv("FTLIB_POD_IMAGE_PULL_SECRETS", "regcred, other")
    op = gpu_pod("train", ["train", "--data-dir", "data/splits", "-o", "train.lora_r=8"], gpus)
    pod = op.build_pod_request_obj(dry_run=True)  # the provider's own pod-building code, no cluster needed
    spec, c = pod.spec, pod.spec.containers[0]
    assert c.image == "registry.example/ftlib-trainer:1.2.3"
    script = c.args[0]
    assert c.command == ["bash", "-c"] and script.startswith("cd /work && exec ")
    if gpus > 1:
        assert "accelerate launch --multi_gpu --num_processes 4 -m ftlib train" in script
    else:
        assert "exec ftlib train --data-dir data/splits -o train.lora_r=8" in script
    assert c.resources.limits["nvidia.com/gpu"] == str(gpus) and c.resources.requests["nvidia.com/gpu"] == str(gpus)
    assert c.resources.requests["cpu"] == "8" and c.resources.requests["memory"] == "48Gi"
    assert spec.node_selector == {"cloud.google.com/gke-accelerator": "nvidia-h100-80gb"}
    assert [(t.key, t.operator, t.effect) for t in spec.tolerations] == [("nvidia.com/gpu", "Exists", "NoSchedule")]
    vols = {v.name: v for v in spec.volumes}
    assert vols["work"].persistent_volume_claim.claim_name == "ftlib-work"
    mounts = [(m.name, m.mount_path) for m in c.volume_mounts]
    if gpus > 1:  # NCCL's shared memory between the GPU processes: a RAM-backed /dev/shm
        assert mounts == [("work", "/work"), ("dshm", "/dev/shm")]
        assert vols["dshm"].empty_dir.medium == "Memory" and vols["dshm"].empty_dir.size_limit == "16Gi"
    else:
        assert mounts == [("work", "/work")] and set(vols) == {"work"}
    assert [s.name for s in spec.image_pull_secrets] == ["regcred", "other"]
    env = {e.name: e for e in c.env}
    assert env["MLFLOW_TRACKING_URI"].value is None  # never a literal
    assert env["MLFLOW_TRACKING_URI"].value_from.secret_key_ref.name == "ftlib-mlflow"
    hf = env["HF_TOKEN"].value_from.secret_key_ref  # gated models; a pod without the secret still starts
    assert (hf.name, hf.key, hf.optional, env["HF_TOKEN"].value) == ("ftlib-hf", "token", True, None)
    assert [e.secret_ref.name for e in c.env_from] == ["ftlib-object-store"]
    sc = spec.security_context  # the images' user (tests/test_docker.py checks the Dockerfiles against these)
    assert sc.run_as_non_root and (sc.run_as_user, sc.run_as_group, sc.fs_group) == (POD_UID, POD_GID, POD_GID) == (50000, 0, 0)
    assert c.security_context.allow_privilege_escalation is False and c.security_context.capabilities.drop == ["ALL"]
    assert op.on_finish_action.value == "delete_succeeded_pod"
    assert pod.metadata.namespace == "ml" and pod.metadata.labels["ftlib/stage"] == "train"


def test_no_pull_secrets_by_default(monkeypatch):
    monkeypatch.delenv("FTLIB_POD_IMAGE_PULL_SECRETS", raising=False)
    assert not gpu_pod("train", ["train"], 1).build_pod_request_obj(dry_run=True).spec.image_pull_secrets


@pytest.mark.parametrize("dvc", [False, True])
def test_kubernetes_runs_every_gpu_worthy_stage_as_a_pod(dvc, tmp_path, monkeypatch):
    """executor=kubernetes: train, quantize, benchmark, evaluate and the gate's re-scoring each start a pod
    (nothing runs in the worker), with arguments the ftlib CLI accepts and paths relative to the project
    (the pod's workdir). Only train gets the form's 4 GPUs."""
    from typer.main import get_command

    from ftlib.airflow import tasks
    from ftlib.cli.main import app
    from ftlib.core.config import load_params

    (tmp_path / "params.yaml").write_text((REPO / "params.yaml").read_text())
    run = tasks.Run(tmp_path, {"executor": "kubernetes", "gpus": 4}, tmp_path / "params.yaml", ["train.lora_r=8"],
                    load_params(tmp_path / "params.yaml"), dvc, context={})
    pods = []

    class Pod:
        def __init__(self, name, args, gpus):
            pods.append((name, args, gpus))
            self.args = args

        def execute(self, context):
            if self.args[0] == "evaluate" and "--json" in self.args:  # the re-score reads its metrics back
                out = tmp_path / self.args[self.args.index("--json") + 1]
                out.parent.mkdir(parents=True, exist_ok=True)
                out.write_text('{"accuracy": 0.75, "f1_macro": 0.5}')

    monkeypatch.setattr(tasks, "gpu_pod", Pod)
    monkeypatch.setattr(tasks, "current", lambda: run)
    monkeypatch.setattr(tasks, "repro", lambda *a: pytest.fail("a stage ran in the worker"))
    tasks.train()
    tasks.quantize_and_benchmark()
    tasks.evaluate()
    assert tasks.pod_rescore(run)("models:/ftlib-sentiment/3") == {"score": 0.75, "f1": 0.5}
    assert tasks.pod_rescore(tasks.Run(**{**run.__dict__, "form": {"executor": "local"}})) is None  # in the worker
    names = [n for n, _, _ in pods]
    assert names == ["train", "quantize", "benchmark", "evaluate", "gate"]
    assert [g for _, _, g in pods] == [1 if dvc else 4, 1, 1, 1, 1]
    cli = get_command(app)
    for name, args, _ in pods:
        if dvc and name != "gate":
            assert args == ["dvc", "repro", "--single-item", name]
            continue
        assert args[-4:] == ["-p", "params.yaml", "-o", "train.lora_r=8"]
        assert not any(a.startswith(str(tmp_path)) for a in args), args  # the pod mounts the project elsewhere
        cli.commands[args[0]].make_context(args[0], list(args[1:]))  # raises on an option `ftlib` does not have
    gate_args = pods[-1][1]
    assert gate_args[:3] == ["evaluate", "--model", "models:/ftlib-sentiment/3"]
    assert gate_args[gate_args.index("--json") + 1] == "reports/gate_rescore/models_ftlib-sentiment_3.json"


def test_pod_command():
    assert pod_command(["quantize"], 1) == ["ftlib", "quantize"]
    assert pod_command(["train"], 2)[:5] == ["accelerate", "launch", "--multi_gpu", "--num_processes", "2"]
    assert pod_command(["dvc", "repro", "--single-item", "train"], 1) == ["dvc", "repro", "--single-item", "train"]


def test_extra_links_plugin_loads_in_airflow(tmp_path):
    env = {**os.environ, "AIRFLOW_HOME": str(tmp_path), "AIRFLOW__CORE__PLUGINS_FOLDER": str(REPO / "plugins"),
           "AIRFLOW__CORE__LOAD_EXAMPLES": "False", "FTLIB_MLFLOW_UI_URL": "http://mlflow.internal:5000"}
    code = """
import json
from airflow import plugins_manager
from airflow.models.taskinstancekey import TaskInstanceKey
links = {l.name: l for l in plugins_manager.get_global_operator_extra_links()}
key = TaskInstanceKey("finetune_llama3", "validate", "manual__2026-01-01", 1)
other = TaskInstanceKey("someone_elses_dag", "t", "r", 1)
print(json.dumps({n: [l.get_link(None, ti_key=key), l.get_link(None, ti_key=other)] for n, l in links.items()}))
"""
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    import json

    links = json.loads(r.stdout.strip().splitlines()[-1])
    assert set(links) == {"MLflow run", "MLflow model", "GX Data Docs"}
    runs, other = links["MLflow run"]
    assert runs == "/ftlib/mlflow-run?dag_run_id=manual__2026-01-01&task_id=validate"
    assert other == ""
    assert links["MLflow model"][0] == "http://mlflow.internal:5000/#/models/ftlib-sentiment"
    assert links["GX Data Docs"][0] == "/ftlib/data-docs/index.html"


def test_the_plugin_routes_open_the_task_run_and_serve_the_data_docs(tmp_path, monkeypatch):
    """Issue 17: "MLflow runs" landed on the generic Experiments list and the Data Docs were never shown. The plugin's
    routes (mounted under /ftlib by Airflow) redirect to the task's MLflow run and serve the rendered Data Docs."""
    import importlib.util

    from fastapi.testclient import TestClient
    from mlflow import MlflowClient

    docs = tmp_path / "data" / "validated" / "data_docs"
    docs.mkdir(parents=True)
    (docs / "index.html").write_text("<html>expectations</html>")
    monkeypatch.setenv("FTLIB_PROJECT_DIR", str(tmp_path))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.setenv("FTLIB_MLFLOW_UI_URL", "http://mlflow.internal:5000")
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "ftlib")
    c = MlflowClient()
    exp = c.create_experiment("ftlib")
    train_run = c.create_run(exp).info.run_id
    register_run = c.create_run(exp, tags={"ftlib.lineage.airflow.run_id": "manual__1",
                                           "ftlib.lineage.train.mlflow_run_id": train_run}).info.run_id
    spec = importlib.util.spec_from_file_location("ftlib_links_test", REPO / "plugins" / "ftlib_links.py")
    plugin = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(plugin)
    web = TestClient(plugin.routes(), follow_redirects=False)
    assert web.get("/data-docs/index.html").text == "<html>expectations</html>"
    base = f"http://mlflow.internal:5000/#/experiments/{exp}"
    assert web.get("/mlflow-run", params={"dag_run_id": "manual__1", "task_id": "register"}).headers["location"] == \
        f"{base}/runs/{register_run}"
    assert web.get("/mlflow-run", params={"dag_run_id": "manual__1", "task_id": "train"}).headers["location"] == \
        f"{base}/runs/{train_run}"
    assert "searchFilter" in web.get("/mlflow-run", params={"dag_run_id": "manual__2", "task_id": "gate"}).headers["location"]


def test_dvc_reason_only_when_dvc_sees_the_whole_run(repo, tmp_path):  # noqa: F811
    from ftlib.airflow.orchestrate import DVC_PATHS, dvc_reason

    conf = {"project_dir": str(repo), "dvc_cache": True, "overrides": [], "gpus": 1, **DVC_PATHS,
            **dict.fromkeys(TUNABLES)}
    assert dvc_reason(conf) is None
    assert dvc_reason({**conf, "splits_dir": str(repo / "data" / "splits")}) is None  # absolute, same folder
    assert "not a DVC project" in dvc_reason({**conf, "project_dir": str(tmp_path)})
    assert "train.lora_r=8" in dvc_reason({**conf, "lora_r": 8})
    assert "train.seed=1" in dvc_reason({**conf, "overrides": ["train.seed=1"]})
    assert "splits_dir" in dvc_reason({**conf, "splits_dir": "/tmp/elsewhere"})
    assert "GPU" in dvc_reason({**conf, "gpus": 2})
    assert "off" in dvc_reason({**conf, "dvc_cache": False})


def test_repro_and_push_to_the_dvc_remote_and_fail_clearly_when_unreachable(repo, tmp_path):  # noqa: F811
    from ftlib.airflow.orchestrate import DvcPushError, push, repro
    from tests.test_dvc import sh as run

    remote = tmp_path / "remote"
    run(repo, "dvc", "remote", "modify", "local", "url", str(remote))
    assert repro(repo, "validate") == "ran" and repro(repo, "split") == "ran"
    assert repro(repo, "split") == "unchanged"
    assert "pushed" in push(repo, "split")
    stored = [p for p in remote.rglob("*") if p.is_file()]
    assert len(stored) >= 3  # the three split files are in the remote's content-addressed store

    for f in (repo / "data" / "splits").iterdir():  # a fresh worker: outputs gone, DVC's cache still there
        f.unlink()
    assert repro(repo, "split") == "restored from cache"
    assert len((repo / "data" / "splits" / "train.jsonl").read_text().splitlines()) > 0

    run(repo, "dvc", "remote", "modify", "local", "url", "/proc/nope/remote")  # unwritable: a remote that is down
    raw = repo / "data" / "raw" / "reviews.jsonl"
    (repo / "data" / "raw" / "more.jsonl").write_text(raw.read_text().replace("review", "opinion"))
    assert repro(repo, "validate") == "ran" and repro(repo, "split") == "ran"
    with pytest.raises(DvcPushError, match="dvc push split failed"):
        push(repo, "split")
    run(repo, "dvc", "remote", "modify", "local", "url", str(remote))  # the remote is back: the retry succeeds
    assert "pushed" in push(repo, "split")
