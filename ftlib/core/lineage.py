"""Lineage: everything that made a model version, and the commands that rebuild it.

`collect()` gathers, at registration time, the facts a person needs to trace a model
back to its data: the git commit (and whether the tree was dirty), the DVC content
hashes of the raw data and of each split (read from dvc.lock, checked against the
files actually used), the params and their hash, the base model and a hash or
revision of its weights, library versions, hardware, and the Airflow dag/run ids
when Airflow runs the task. They become `ftlib.lineage.*` tags on the MLflow model
version and its run.

`chain()` renders the chain model version -> MLflow run -> params -> split hashes ->
raw data hashes -> stage graph (`ftlib lineage` prints it), `rebuild_commands()` the exact
commands that rebuild the splits; `check()` compares split files on disk with a version's
recorded hashes.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

from ftlib.core.config import SPLITS
from ftlib.core.security import redact_url

# The params sections that shape a trained model (the rest decide gating, benchmarks, quantization).
TRAINING_SECTIONS = ("base_model", "template", "max_seq_length", "data", "split", "train")

PREFIX = "ftlib.lineage."
LIBRARIES = ("ftlib", "torch", "transformers", "trl", "peft", "bitsandbytes", "mlflow", "dvc", "llama_cpp_python")


def md5(path: Path) -> str:
    """The hash DVC records for a file (md5 of its bytes). Remembered per (path, size, mtime):
    the run key, the gate's provenance check and the lineage hash the same weights and splits."""
    st = Path(path).stat()
    return _md5(str(Path(path).resolve()), st.st_size, st.st_mtime_ns)


@functools.lru_cache(maxsize=1024)
def _md5(path: str, size: int, mtime_ns: int) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "md5").hexdigest()


def weight_md5s(model: str | Path) -> dict[str, str]:
    """{file name: md5} of a local model's weights (a directory's *.safetensors, or a GGUF file); {} otherwise."""
    p = Path(str(model))
    if p.is_dir():
        return {f.name: md5(f) for f in sorted(p.glob("*.safetensors"))}
    return {p.name: md5(p)} if p.is_file() else {}


def params_hash(params: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(params, sort_keys=True).encode()).hexdigest()[:16]


def git(root: Path, *args: str) -> str | None:
    try:
        r = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return r.stdout.strip() if r.returncode == 0 else None


def dvc_lock(root: Path) -> dict[str, Any]:
    """{stage: {"deps": {path: md5}, "outs": {path: md5}}} from dvc.lock, {} without one."""
    lock = root / "dvc.lock"
    if not lock.is_file():
        return {}
    stages = (yaml.safe_load(lock.read_text()) or {}).get("stages", {})
    return {name: {kind: {e["path"]: e.get("md5") for e in s.get(kind, [])} for kind in ("deps", "outs")}
            for name, s in stages.items()}


def pipeline_outputs(root: Path) -> list[str]:
    """dvc.lock, the gate/registration reports and every out/metric/plot path dvc.yaml declares."""
    dvc_yaml = root / "dvc.yaml"
    stages = (yaml.safe_load(dvc_yaml.read_text()) or {}).get("stages", {}) if dvc_yaml.is_file() else {}
    found = ["dvc.lock", "reports/gate.json", "reports/registration.json"]  # + what gate/register write
    for stage in stages.values():
        for kind in ("outs", "metrics", "plots"):
            found += [next(iter(e)) if isinstance(e, dict) else str(e) for e in stage.get(kind, [])]
    return found


def stage_graph(root: Path) -> list[str]:
    """Stage names of dvc.yaml in file order (it is written in dependency order)."""
    dvc_yaml = root / "dvc.yaml"
    return list((yaml.safe_load(dvc_yaml.read_text()) or {}).get("stages", {})) if dvc_yaml.is_file() else []


def base_model_revision(base_model: str) -> str:
    """Something that pins the base weights: package version + file hash, hub revision, or weight hashes."""
    from ftlib.core.models import PREFIX as EMBEDDED_PREFIX
    from ftlib.core.models import resolve

    path = Path(resolve(base_model))
    source = path / "ftlib_source.json"
    if base_model.startswith(EMBEDDED_PREFIX) and source.is_file():
        s = json.loads(source.read_text())
        return f"{s['package']}=={s['package_version']} {s['gguf_file']} sha256:{s['gguf_sha256'][:16]}"
    if not path.exists():  # a hub id not in the local cache
        return "unresolved (hub id; pin with a revision)"
    if "snapshots" in path.parts:  # an HF cache snapshot: the directory name is the commit
        return f"hub revision {path.name}"
    weights = sorted(path.glob("*.safetensors"))
    h = hashlib.sha256()
    for w in weights:
        h.update(md5(w).encode())
    return f"safetensors md5-of-md5 {h.hexdigest()[:16]} ({len(weights)} files)"


def library_versions() -> dict[str, str]:
    import importlib.metadata as md

    found = {"python": platform.python_version()}
    for name in LIBRARIES:
        try:
            found[name] = md.version(name)
        except md.PackageNotFoundError:
            pass
    return found


def hardware() -> str:
    """CPU, cores, memory, and GPUs when torch sees any (torch is only asked if already loaded)."""
    mem = ""
    try:
        mem = f", {os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.0f} GiB"
    except (ValueError, OSError, AttributeError):
        pass
    gpus = ""
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        gpus = ", " + ", ".join(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count()))
    return f"{platform.machine()} {platform.system()}, {os.cpu_count()} cores{mem}{gpus}"


def collect(params: dict[str, Any], data_dir: Path, adapter: Path, root: Path = Path(".")) -> dict[str, str]:
    """The lineage of a candidate as flat string tags (MLflow tag values are strings)."""
    root = root.resolve()
    tags: dict[str, str] = {}
    commit = git(root, "rev-parse", "HEAD")
    tags["git.commit"] = commit or "none (not a git repository or no commit)"
    dirty = git(root, "status", "--porcelain", "--untracked-files=no")
    if dirty is None:
        tags["git.dirty"] = "unknown"
    else:  # pipeline outputs (dvc.lock, reports, ...) change on every run: only source edits count
        outputs = pipeline_outputs(root)
        paths = [line.split(maxsplit=1)[1].split(" -> ")[-1] for line in dirty.splitlines() if line.strip()]
        changed = [p for p in paths if not any(p == o or p.startswith(o.rstrip("/") + "/") for o in outputs)]
        tags["git.dirty"] = str(bool(changed)).lower()
        if changed:
            tags["git.dirty_files"] = " ".join(changed[:20])
    remote = git(root, "remote", "get-url", "origin")
    if remote:
        tags["git.remote"] = redact_url(remote)  # a token in an https remote never reaches a tag

    lock = dvc_lock(root)
    for path, h in lock.get("validate", {}).get("deps", {}).items():
        if path.startswith("data/raw"):
            tags[f"dvc.raw.{path}"] = str(h)
    data_dir = Path(data_dir)
    rel = os.path.relpath(data_dir.resolve(), root)
    locked = lock.get("split", {}).get("outs", {})
    stale = []
    for s in SPLITS:
        f = data_dir / f"{s}.jsonl"
        if f.is_file():
            tags[f"data.{s}.md5"] = md5(f)
            recorded = locked.get(f"{rel}/{s}.jsonl")
            if recorded is not None and recorded != tags[f"data.{s}.md5"]:
                stale.append(s)
    tags["dvc.lock"] = ("missing" if not lock else "stale: splits on disk differ for " + ",".join(stale) if stale
                        else "matches the splits used")
    tags["dvc.stages"] = " -> ".join(stage_graph(root)) or "none"

    raw = root / "data" / "raw"  # the files by name (dvc.lock has only the directory's hash)
    if raw.is_dir():
        tags["raw.files"] = json.dumps({str(f.relative_to(raw)): md5(f) for f in sorted(raw.rglob("*")) if f.is_file()},
                                       sort_keys=True)

    info_file = Path(adapter) / "ftlib_train.json"
    info = json.loads(info_file.read_text()) if info_file.is_file() else {}
    # the sections that shaped the model as training ran them (a `-o` at train time), the rest (gate, benchmark) as now
    trained = {k: v for k, v in (info.get("params") or {}).items() if k in TRAINING_SECTIONS}
    used = {**params, **trained}
    tags["params.source"] = ("training sections from the training run (ftlib_train.json), the rest at registration"
                             if trained else "params at registration")
    tags["params.hash"] = params_hash(used)
    tags["params"] = json.dumps(used, sort_keys=True, separators=(",", ":"))
    tags["train.overrides"] = json.dumps(training_overrides(used, root), sort_keys=True)
    tags["base_model"] = used["base_model"]
    tags["base_model.revision"] = base_model_revision(used["base_model"])
    if info:
        tags["train.run_key"] = str(info.get("run_key"))
        tags["train.mlflow_run_id"] = str(info.get("mlflow_run_id"))
        tags["train.global_step"] = str(info.get("global_step"))
    tags["libraries"] = json.dumps(library_versions(), sort_keys=True)
    tags["hardware"] = hardware()
    for env, key in (("AIRFLOW_CTX_DAG_ID", "airflow.dag_id"), ("AIRFLOW_CTX_DAG_RUN_ID", "airflow.run_id"),
                     ("AIRFLOW_CTX_TASK_ID", "airflow.task_id")):
        if os.environ.get(env):
            tags[key] = os.environ[env]
    return {PREFIX + k: v for k, v in tags.items()}


def of(tags: dict[str, str]) -> dict[str, str]:
    """The lineage part of a tag dict, without the prefix."""
    return {k[len(PREFIX):]: v for k, v in tags.items() if k.startswith(PREFIX)}


def training_overrides(used: dict[str, Any], root: Path) -> dict[str, Any]:
    """`-o key=value` that turn root's params.yaml into the params training used (the sections that shape the model)."""
    from ftlib.core.config import as_dict, flatten, load_params

    try:
        current = flatten(as_dict(load_params(root / "params.yaml")))
    except Exception:  # noqa: BLE001  (no or unreadable params.yaml: every training value is an override)
        current = {}
    ran = flatten({k: v for k, v in used.items() if k in TRAINING_SECTIONS})
    return {k: v for k, v in ran.items() if current.get(k) != v}


def rebuild_commands(lineage: dict[str, str], name: str, version: str) -> list[str]:
    commit = lineage.get("git.commit", "")
    cmds = []
    if lineage.get("git.remote"):
        cmds.append(f"git clone {redact_url(lineage['git.remote'])} ftlib-rebuild && cd ftlib-rebuild")
    if commit and not commit.startswith("none"):
        cmds.append(f"git checkout {commit}")
    cmds += [
        "dvc pull data/splits || dvc repro split   # restore the splits from the remote, or recompute them",
        f"ftlib lineage models:/{name}/{version} --check   # the split files must match the recorded hashes",
    ]
    overrides = json.loads(lineage.get("train.overrides", "{}"))
    if overrides:  # trained with values params.yaml at that commit does not hold: `dvc repro` would train another model
        def value(v: Any) -> str:
            return ",".join(map(str, v)) if isinstance(v, list) else "null" if v is None else str(v).lower() if isinstance(v, bool) else str(v)

        cmds += ["ftlib train --data-dir data/splits " + " ".join(f"-o {k}={value(v)}" for k, v in sorted(overrides.items()))
                 + "   # the params this version was trained with",
                 "ftlib evaluate --data data/splits/test.jsonl   # score it as the gate did"]
    else:
        cmds.append("dvc repro   # retrain, quantize, benchmark and evaluate from those splits")
    return cmds


def check(lineage: dict[str, str], data_dir: Path) -> list[tuple[str, str, str, bool]]:
    """(split, recorded md5, md5 on disk, equal) for each split the version recorded."""
    rows = []
    for s in SPLITS:
        recorded = lineage.get(f"data.{s}.md5")
        if recorded is None:
            continue
        f = Path(data_dir) / f"{s}.jsonl"
        now = md5(f) if f.is_file() else "missing"
        rows.append((s, recorded, now, now == recorded))
    return rows


def chain(name: str, version: str, aliases: list[str], run_id: str, tags: dict[str, str]) -> list[str]:
    """The lines `ftlib lineage` prints for one registered version (its tags hold the lineage)."""
    info = of(tags)
    params = json.loads(info.get("params", "{}"))
    train = params.get("train", {})
    alias_text = ", ".join(f"@{a}" for a in aliases) or "no alias"
    metric = next((k for k in ("ftlib.accuracy", "ftlib.exact_match") if k in tags), None)
    lines = [
        f"{name} v{version} ({alias_text}) gate: {tags.get('ftlib.gate', '?')}" + (f", {metric[6:]} {tags[metric]}" if metric else ""),
        f"  -> MLflow run {run_id} (register); training run {info.get('train.mlflow_run_id', '?')}, step {info.get('train.global_step', '?')}",
        f"    -> params hash {info.get('params.hash', '?')}: base_model {info.get('base_model')} [{info.get('base_model.revision')}], "
        f"method {train.get('method')}, lora_r {train.get('lora_r')}, lora_alpha {train.get('lora_alpha')}, "
        f"lora_layers {train.get('lora_layers', 0)}, "
        f"lr {train.get('learning_rate')}, epochs {train.get('num_train_epochs')}, seed {train.get('seed')}",
        f"      -> splits (split seed {params.get('split', {}).get('seed')}; dvc.lock {info.get('dvc.lock', '?')})",
        *[f"           {s}.jsonl md5 {info.get(f'data.{s}.md5', 'n/a')}" for s in SPLITS],
        "        -> raw data",
        *[f"             {k[len('dvc.raw.'):]} md5 {v}" for k, v in info.items() if k.startswith("dvc.raw.")],
        *[f"               {f} md5 {h}" for f, h in json.loads(info.get("raw.files", "{}")).items()],
        f"          -> stages: {info.get('dvc.stages', 'n/a')}",
        f"  code: git {info.get('git.commit')} (dirty: {info.get('git.dirty')})",
        f"  libraries: {info.get('libraries')}",
        f"  hardware: {info.get('hardware')}",
    ]
    if "airflow.run_id" in info:
        lines.append(f"  airflow: dag {info.get('airflow.dag_id')} run {info['airflow.run_id']}")
    if json.loads(info.get("train.overrides", "{}")):
        lines.append(f"  trained with overrides of params.yaml: {info['train.overrides']}")
    if tags.get("ftlib.forced") == "true":
        lines.append(f"  FORCED past the gate by {tags.get('ftlib.forced.by', '?')}: {tags.get('ftlib.forced.reason', '')}")
    return lines
