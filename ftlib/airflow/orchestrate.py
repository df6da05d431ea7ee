"""What the Airflow DAGs need beyond the stage functions: UI params -> overrides, the data-landing
move, running stages through DVC (`dvc repro`, `dvc push`), the run summary, and the GPU training pod.

Light at import (stdlib only): DAG files import it at parse time. The Kubernetes provider
(0.7 s to import) is only imported when a pod is built, inside a running task.
"""

from __future__ import annotations

import json
import logging
import os
import shlex
import time
from pathlib import Path
from typing import Any

from ftlib.core.config import METHODS, get_profile, load_params

# DAG param -> (params.yaml key, JSON schema). The form shows params.yaml's current value; a value the user
# changes becomes an override for that run (null, or params.yaml's value, keeps params.yaml's).
TUNABLES: dict[str, tuple[str, dict[str, Any]]] = {
    "base_model": ("base_model", {"type": ["null", "string"], "minLength": 1,
                                  "description": "embedded:smollm2-135m-instruct, a hub id (meta-llama/Meta-Llama-3-8B-Instruct) or a local dir"}),
    "method": ("train.method", {"type": ["null", "string"], "enum": [None, *METHODS],
                                "description": "auto (QLoRA on a CUDA GPU, LoRA on a CPU), qlora, lora, full or prompt_tuning"}),
    "lora_r": ("train.lora_r", {"type": ["null", "integer"], "minimum": 1, "maximum": 256,
                                "description": "LoRA rank: capacity of the adapter (course default 16)"}),
    "lora_alpha": ("train.lora_alpha", {"type": ["null", "integer"], "minimum": 1, "maximum": 512,
                                        "description": "LoRA scaling; the update is scaled by alpha / r"}),
    "lora_layers": ("train.lora_layers", {"type": ["null", "integer"], "minimum": 0, "maximum": 1000,
                                          "description": "LoRA on the top N decoder layers only; 0 = every layer (use 0 for a 7-8B base)"}),
    "learning_rate": ("train.learning_rate", {"type": ["null", "number"], "exclusiveMinimum": 0, "maximum": 0.1,
                                              "description": "peak learning rate (2e-3 for the embedded 135M model, 2e-4 for 7-8B)"}),
    "num_train_epochs": ("train.num_train_epochs", {"type": ["null", "number"], "exclusiveMinimum": 0, "maximum": 100,
                                                    "description": "passes over train.jsonl (ignored when max_steps > 0)"}),
    "max_steps": ("train.max_steps", {"type": ["null", "integer"], "minimum": -1,
                                      "description": "-1 = train num_train_epochs; otherwise stop after this many steps"}),
}


def current_values(project_dir: str | Path) -> dict[str, Any]:
    """params.yaml's value of every TUNABLE (what the form shows); {} when it cannot be read. Plain YAML: light
    enough for DAG parse time."""
    import yaml

    try:
        raw = yaml.safe_load((Path(project_dir) / "params.yaml").read_text()) or {}
    except (OSError, yaml.YAMLError):
        return {}
    out = {}
    for name, (key, _) in TUNABLES.items():
        node: Any = raw
        for part in key.split("."):
            node = node.get(part) if isinstance(node, dict) else None
        out[name] = node
    return out


# What a form's `overrides` may change (key prefixes). Not on it, because a UI user must not widen what the
# deployment allows: trust_remote_code and allow_pickle_weights (security), paths.* (the roots form paths are
# confined to), register.* (the gate and the registered name: change them in params.yaml, reviewed in git),
# train.output_dir / train.checkpoint_dir (paths: the form's own path fields are confined instead).
OVERRIDABLE = ("base_model=", "template=", "max_seq_length=", "data.", "validate.", "split.", "train.", "quantize.", "benchmark.")
NOT_OVERRIDABLE = ("train.output_dir=", "train.checkpoint_dir=")


def form_overrides(items: list[str] | None) -> list[str]:
    """The form's `overrides`, each checked against the allow-list (ConfigError names the first one refused)."""
    from ftlib.core.config import ConfigError

    out = []
    for item in items or []:
        item = str(item).strip()
        if not item.startswith(OVERRIDABLE) or item.startswith(NOT_OVERRIDABLE):
            raise ConfigError(f"override {item!r} is not allowed from the DAG form (security settings, path roots, "
                              "output paths and the gate are set in params.yaml); allowed: " +
                              ", ".join(k.rstrip("=") + ("*" if k.endswith(".") else "") for k in OVERRIDABLE))
        out.append(item)
    return out


def deployment_project(dag_file: str | None = None) -> Path:
    """The project checkout the tasks work in: FTLIB_PROJECT_DIR, else the folder above the DAG file (dags/..).
    From the deployment, never from the trigger form: the form could otherwise point every confined path at
    a directory of its choosing."""
    if os.environ.get("FTLIB_PROJECT_DIR"):
        return Path(os.environ["FTLIB_PROJECT_DIR"])
    if dag_file is None:
        raise ValueError("no FTLIB_PROJECT_DIR and no DAG file to derive the project dir from")
    return Path(dag_file).resolve().parents[1]


def overrides(conf: dict[str, Any], extra: list[str] | None = None) -> list[str]:
    """`section.key=value` overrides from the DAG params set to something other than params.yaml's value (the
    form shows that value, so an untouched form overrides nothing), then the form's `overrides` list
    (allow-listed: form_overrides)."""
    now = current_values(conf["project_dir"]) if conf.get("project_dir") else {}
    out = [f"{key}={conf[name]}" for name, (key, _) in TUNABLES.items()
           if conf.get(name) is not None and conf.get(name) != now.get(name)]
    return out + form_overrides(extra)


# ---------------------------------------------------------------------------
# Data landing

def raw_data_asset(project_dir: str | Path) -> Any:
    """The asset both DAGs share: data/raw of the project (updated by data_landing, consumed by finetune_llama3)."""
    from airflow.sdk import Asset

    return Asset(name="ftlib_raw_data", uri=f"file://{Path(project_dir, 'data', 'raw')}")


def collect_landed(landing: Path, raw: Path, settle_s: float = 2.0) -> list[Path]:
    """Move every finished *.jsonl from a folder into data/raw; the moved paths.

    A file modified in the last `settle_s` seconds (it may still be written) stays where
    it is (data_landing passes 0: the landing watcher already waited for its burst to
    settle). os.replace within one filesystem is atomic: a file is either in landing or
    in raw, never lost or half-copied. Name clashes get a timestamp prefix, never
    overwrite earlier data.
    """
    landing, raw = Path(landing), Path(raw)
    if not landing.is_dir():
        return []
    raw.mkdir(parents=True, exist_ok=True)
    moved = []
    now = time.time()
    for f in sorted(landing.glob("*.jsonl")):
        try:
            if not f.is_file() or now - f.stat().st_mtime < settle_s:
                continue
        except FileNotFoundError:  # another collector moved it between the listing and the stat
            continue
        target = raw / f.name
        if target.exists():
            target = raw / f"{time.strftime('%Y%m%dT%H%M%S')}-{time.time_ns() % 10**6:06d}-{f.name}"
        try:
            os.replace(f, target)
        except FileNotFoundError:  # another collector moved it first: it is in raw, not lost
            continue
        moved.append(target)
    return moved


# ---------------------------------------------------------------------------
# DVC

class DvcPushError(RuntimeError):
    """Outputs could not be pushed to the DVC remote (the task fails and is retried)."""


class DvcReproError(RuntimeError):
    """`dvc repro` of a stage failed (its command failed, or DVC could not run it)."""


# The DAG's path params as dvc.yaml's stage commands have them (relative to the project).
DVC_PATHS = {"params_file": "params.yaml", "raw_dir": "data/raw", "validated_dir": "data/validated",
             "splits_dir": "data/splits", "reports_dir": "reports", "merged_dir": "models/merged",
             "quantized_dir": "models/quantized"}
INPUT_PATHS = ("params_file", "raw_dir")  # the rest are outputs, which a profile with a root of its own moves


def _is_dvc_project(root: Path) -> bool:
    return (root / ".dvc").is_dir() and (root / "dvc.yaml").is_file()


def _dvc_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    from ftlib.registry.pipeline import dvc_env

    return dvc_env(extra)


def _dvc(root: Path, *args: str) -> Any:
    import subprocess
    import sys

    return subprocess.run([sys.executable, "-m", "dvc", *args], cwd=root, env=_dvc_env(), capture_output=True, text=True)


def dvc_reason(conf: dict[str, Any], changed: list[str] | None = None) -> str | None:
    """Why this DAG run cannot run its stages as `dvc repro` (None: it can, and will).

    DVC decides from dvc.yaml, params.yaml and dvc.lock alone, so it only sees a run whose
    paths are dvc.yaml's and whose params are params.yaml's: UI overrides or other paths
    would be invisible to it (such runs call ftlib directly, which still reuses a finished
    training checkpoint of the same data + params).
    """
    if "project_dir" not in conf:
        return "no project_dir in the run's params"
    root = Path(conf["project_dir"])
    if not conf.get("dvc_cache", True):
        return "dvc_cache is off"
    if (profile := conf.get("profile") or "full") != "full":
        return f"profile {profile} (its outputs go to {get_profile(profile).root}/, outside dvc.yaml's)"
    if not _is_dvc_project(root):
        return f"{root} is not a DVC project"
    if changed is None:
        changed = overrides(conf, conf.get("overrides"))  # reads params.yaml
    if changed:
        return f"params overridden for this run ({', '.join(changed)})"
    other = [k for k, default in DVC_PATHS.items()
             if (root / (conf.get(k) or default)).resolve() != (root / default).resolve()]
    if other:
        return f"{', '.join(other)} differ from dvc.yaml's paths"
    if int(conf.get("gpus", 1)) > 1:
        return "more than one GPU (dvc.yaml's commands do not run `accelerate launch`)"
    return None


def repro_command(stage: str) -> list[str]:
    """`dvc repro` of one stage only: the upstream stages are the DAG's own tasks."""
    return ["dvc", "repro", "--single-item", stage]


def _relay(line: str) -> None:
    """A line of `dvc repro`'s output into this task's log, at the level the `ftlib` it ran wrote it with (its CLI
    writes `LEVEL message` off a terminal); DVC's own lines at INFO."""
    level, _, message = line.rstrip("\n").partition(" ")
    if level in ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL") and message:
        logging.getLogger("ftlib.dvc").log(getattr(logging, level), message)
    elif line.strip():
        logging.getLogger("ftlib.dvc").info(line.rstrip("\n"))


def repro(project_dir: str | Path, stage: str, env: dict[str, str] | None = None) -> str:
    """Run one dvc.yaml stage through DVC; what DVC did: "ran", "unchanged" or "restored from cache".

    Unchanged deps, params and code with the outputs in place: DVC skips the stage. With
    the outputs missing (a fresh worker, a deleted folder) DVC checks them out of its cache
    (the run-cache knows every earlier combination too), and nothing is retrained. The
    stage's output streams to this log as it runs (training takes a while); `env` adds
    variables (the Airflow run ids the lineage records).
    """
    import collections
    import subprocess
    import sys

    markers = {f"Running stage '{stage}'": "ran", "didn't change": "unchanged", "is cached - skipping run": "restored from cache"}
    seen, tail = [], collections.deque(maxlen=40)
    proc = subprocess.Popen([sys.executable, "-m", "dvc", *repro_command(stage)[1:]], cwd=project_dir, env=_dvc_env(env),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert proc.stdout is not None
    from ftlib.registry.pipeline import restore

    try:
        for line in proc.stdout:
            _relay(line)
            tail.append(line)
            seen += [what for marker, what in markers.items() if marker in line]
        failed = proc.wait() != 0
    except BaseException:  # the task was cancelled or killed: stop DVC, put the last good outputs back
        proc.terminate()
        proc.wait()
        restore(Path(project_dir), stage)
        raise
    if failed:  # DVC deleted the stage's outputs before running it: the last good ones go back in place
        restore(Path(project_dir), stage)
        raise DvcReproError(f"dvc repro {stage} failed in {project_dir}: {''.join(tail).strip()[-2000:]}")
    return seen[0] if seen else "done"  # "done": a DVC version with other wording


def push(project_dir: str | Path, stage: str) -> str:
    """`dvc push STAGE`: its outputs to the default remote. DvcPushError (with DVC's message)
    when the remote cannot be reached, so Airflow retries the task."""
    r = _dvc(Path(project_dir), "push", stage)
    if r.returncode != 0:
        raise DvcPushError(f"dvc push {stage} failed in {project_dir}: {(r.stderr or r.stdout).strip()[-1500:]}")
    last = r.stdout.strip().splitlines()[-1] if r.stdout.strip() else "ok"
    return f"{stage} outputs pushed to the DVC remote ({last})"


# ---------------------------------------------------------------------------
# Summary

# ---------------------------------------------------------------------------
# The GPU pod

POD_DEFAULTS = {
    "image": "ghcr.io/ftlib/trainer:latest",     # docker/Dockerfile.trainer
    "namespace": "ml",                            # the Airflow workers' own: a PVC is mounted only in its namespace
    "pvc": "ftlib-work",                          # holds the project checkout: data/, models/, reports/
    "workdir": "/work",
    "node_selector": {"nvidia.com/gpu.present": "true"},
    "toleration_key": "nvidia.com/gpu",
    "cpu": "8", "memory": "48Gi", "memory_limit": "64Gi",
    "mlflow_secret": "ftlib-mlflow",              # key tracking_uri (+ username/password)
    "storage_secret": "ftlib-object-store",       # AWS_* keys for the DVC remote / MLflow artifacts
    "hf_secret": "ftlib-hf",                      # key `token` -> HF_TOKEN for gated hub models; optional
    "image_pull_secrets": "",                     # comma-separated docker-registry secrets of a private registry
    "shm_size": "16Gi",                           # /dev/shm of a multi-GPU pod (counts against memory_limit)
}
# The trainer image's user (docker/Dockerfile.trainer) is the Airflow image's, uid 50000 gid 0: workers and
# pods write the same shared volume, so they must own what they write alike.
POD_UID, POD_GID = 50000, 0


def pod_setting(name: str) -> str | dict[str, str]:
    """FTLIB_POD_<NAME> from the environment (the Airflow deployment), else the default."""
    value = os.environ.get(f"FTLIB_POD_{name.upper()}")
    if value is None:
        return POD_DEFAULTS[name]
    return json.loads(value) if name == "node_selector" else value


def pod_command(args: list[str], gpus: int) -> list[str]:
    """`ftlib ARGS`, under `accelerate launch` (one process per GPU) when more than one GPU.
    ARGS starting with "dvc" (a `repro_command`) run as they are."""
    if args[:1] == ["dvc"]:
        return list(args)
    if gpus > 1:
        return ["accelerate", "launch", "--multi_gpu", "--num_processes", str(gpus), "-m", "ftlib", *args]
    return ["ftlib", *args]


def gpu_pod(task_id: str, args: list[str], gpus: int = 1) -> Any:
    """A KubernetesPodOperator running `ftlib ARGS` on a GPU node (built inside a running task)."""
    from airflow.providers.cncf.kubernetes.operators.pod import KubernetesPodOperator
    from airflow.providers.cncf.kubernetes.secret import Secret
    from kubernetes.client import models as k8s

    workdir = str(pod_setting("workdir"))
    volumes = [k8s.V1Volume(name="work", persistent_volume_claim=k8s.V1PersistentVolumeClaimVolumeSource(
        claim_name=str(pod_setting("pvc"))))]
    mounts = [k8s.V1VolumeMount(name="work", mount_path=workdir)]
    if gpus > 1:  # NCCL passes data between the GPU processes through /dev/shm; a container's default 64 MB stalls it
        volumes.append(k8s.V1Volume(name="dshm", empty_dir=k8s.V1EmptyDirVolumeSource(
            medium="Memory", size_limit=str(pod_setting("shm_size")))))
        mounts.append(k8s.V1VolumeMount(name="dshm", mount_path="/dev/shm"))
    return KubernetesPodOperator(
        task_id=task_id,
        name=f"ftlib-{task_id.replace('_', '-')}",
        namespace=str(pod_setting("namespace")),
        image=str(pod_setting("image")),
        cmds=["bash", "-c"],
        arguments=[f"cd {shlex.quote(workdir)} && exec {shlex.join(pod_command(args, gpus))}"],
        container_resources=k8s.V1ResourceRequirements(
            requests={"cpu": str(pod_setting("cpu")), "memory": str(pod_setting("memory")), "nvidia.com/gpu": str(gpus)},
            limits={"memory": str(pod_setting("memory_limit")), "nvidia.com/gpu": str(gpus)},
        ),
        node_selector=dict(pod_setting("node_selector")),  # type: ignore[arg-type]
        tolerations=[k8s.V1Toleration(key=str(pod_setting("toleration_key")), operator="Exists", effect="NoSchedule")],
        volumes=volumes,
        volume_mounts=mounts,
        image_pull_secrets=[k8s.V1LocalObjectReference(name=s.strip())
                            for s in str(pod_setting("image_pull_secrets")).split(",") if s.strip()],
        env_vars=[
            k8s.V1EnvVar(name="MLFLOW_TRACKING_URI", value_from=k8s.V1EnvVarSource(
                secret_key_ref=k8s.V1SecretKeySelector(name=str(pod_setting("mlflow_secret")), key="tracking_uri"))),
            k8s.V1EnvVar(name="HF_TOKEN", value_from=k8s.V1EnvVarSource(secret_key_ref=k8s.V1SecretKeySelector(
                name=str(pod_setting("hf_secret")), key="token", optional=True))),  # no secret: public models only
            k8s.V1EnvVar(name="HF_HOME", value=f"{workdir}/.cache/huggingface"),
            k8s.V1EnvVar(name="FTLIB_CACHE", value=f"{workdir}/.cache/ftlib"),
        ],
        secrets=[Secret("env", None, str(pod_setting("storage_secret")))],  # every key as an env var
        security_context=k8s.V1PodSecurityContext(run_as_non_root=True, run_as_user=POD_UID, run_as_group=POD_GID, fs_group=POD_GID),
        container_security_context=k8s.V1SecurityContext(
            allow_privilege_escalation=False, run_as_non_root=True, capabilities=k8s.V1Capabilities(drop=["ALL"])),
        labels={"app.kubernetes.io/name": "ftlib", "ftlib/stage": task_id},
        on_finish_action="delete_succeeded_pod",  # keep failed pods for `kubectl logs`
        get_logs=True,
        startup_timeout_seconds=1800,  # GPU nodes may have to scale up first
    )


def form_path(project_dir: str, p: str, extra_roots: tuple[str, ...] | None = None) -> Path:
    """A path from the DAG's trigger form or the REST API (untrusted input), relative to project_dir, resolved
    (symlinks, ..) and refused (PathError) unless it lies in the project dir, the ftlib cache, the system temp
    dir or `extra_roots` (params.yaml `paths.allowed_roots`). The CLI, run by a local user on their own files,
    does not confine; this does."""
    from ftlib.core.security import allowed_roots, confine

    if extra_roots is None:  # the project's own params.yaml (a file on disk, never the form's overrides) may add roots
        extra_roots = tuple(load_params(Path(project_dir) / "params.yaml").paths.allowed_roots)
    path = Path(p).expanduser()
    return confine(path if path.is_absolute() else Path(project_dir) / path, allowed_roots(project_dir, extra_roots))
