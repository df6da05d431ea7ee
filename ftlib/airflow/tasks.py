"""The retraining DAG's tasks; dags/finetune_llama3.py is their thin face (one line each, ordering with >>).

Every task reads the run's trigger form from the Airflow task context (`current()`), confines the form's
paths (`form_path`: the form is untrusted input), and calls the stage functions in this process, with the
project dir as working directory (relative paths in params.yaml, and the default `mlflow.db`, mean the same
as for `ftlib` run there). Two things change where a stage runs, both decided in `stage()`:
  * DVC can see the whole run (`dvc_reason`): the stage is `dvc repro STAGE`, which reuses DVC's cache;
  * executor=kubernetes: the GPU stages (train, quantize, benchmark, evaluate, and the gate's re-scoring of
    the base model and the champion) run `ftlib STAGE` (or `dvc repro`) in a pod.
Imported by the tasks at run time only: the DAG file stays light at parse time.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

from ftlib.airflow.orchestrate import (DVC_PATHS, INPUT_PATHS, DvcReproError, deployment_project, dvc_reason, form_path, gpu_pod,
                                      overrides, push, repro, repro_command)
from ftlib.core.config import PROFILES, Params, Profile, get_profile, load_params
from ftlib.core.security import PathError

log = logging.getLogger(__name__)  # Airflow files each line under its level


@dataclass
class Run:
    """One task's view of the DAG run: the form, the params it resolves to, and where things go."""

    project: Path
    form: dict[str, Any]
    params_file: Path
    overrides: list[str]
    params: Params
    dvc: bool  # stages run as `dvc repro` (see the module docstring)
    context: Any
    profile: Profile = PROFILES["full"]  # frozen: safe as a shared default

    def path(self, key: str) -> Path:
        """A directory named by the form (raw_dir, splits_dir, ...), confined to the allowed roots. Empty or left at
        dvc.yaml's path: dvc.yaml's path, moved under the profile's own root for an output (smoke: runs/smoke/...)."""
        value = str(self.form.get(key) or DVC_PATHS[key])
        if value == DVC_PATHS[key] and key not in INPUT_PATHS:
            value = self.profile.path(value)
        return form_path(str(self.project), value)

    def rel(self, path: str | Path) -> str:
        """A path as a pod sees it: relative to the project dir (mounted as the pod's workdir)."""
        return os.path.relpath(path, self.project.resolve())

    @property
    def executor(self) -> str:
        return str(self.form.get("executor") or "local")


def current() -> Run:
    """The DAG run as this task sees it. Every task calls it first, before importing a stage module: it quiets the
    libraries' log noise and progress bars (line mode), which some of them set up at import."""
    from airflow.sdk import get_current_context

    from ftlib.core.log import line_mode, silence_known_noise

    silence_known_noise()
    line_mode()  # progress as log lines, no tqdm bars (their stderr lines show as red ERROR in the task log)
    ctx = get_current_context()
    form = dict(ctx["params"])
    # lineage: register records the Airflow dag/run/task ids it finds here on the MLflow version
    os.environ.update({"AIRFLOW_CTX_DAG_ID": ctx["dag"].dag_id, "AIRFLOW_CTX_DAG_RUN_ID": ctx["run_id"],
                       "AIRFLOW_CTX_TASK_ID": ctx["task"].task_id})
    if "project_dir" in form:
        raise PathError("project_dir is the deployment's (FTLIB_PROJECT_DIR), not a form field; remove it from the run's conf")
    project = deployment_project(ctx["dag"].fileloc)
    form["project_dir"] = str(project)  # what dvc_reason and the pods read
    params_file = form_path(str(project), str(form.get("params_file") or DVC_PATHS["params_file"]))
    profile = get_profile(form.get("profile"))
    changed = overrides(form, form.get("overrides"))
    extra = [*profile.overrides, *changed]  # the form's own overrides win
    reason = dvc_reason(form, changed)
    if reason:
        log.info(f"calling ftlib directly, DVC's cache is not used: {reason}")
    return Run(project, form, params_file, extra, load_params(params_file, extra), reason is None, ctx, profile)


@contextlib.contextmanager
def in_project(run: Run) -> Iterator[None]:
    before = Path.cwd()
    os.chdir(run.project)
    try:
        yield
    finally:
        os.chdir(before)


def stage(run: Run, name: str, direct: Callable[[], Any], cli: list[str] | None = None, gpu: bool = False) -> Any:
    """The one place that decides how a stage runs: `dvc repro` (in the GPU pod for a GPU stage on
    Kubernetes), `ftlib CLI...` in the GPU pod, or `direct()` here."""
    on_pod = gpu and run.executor == "kubernetes"
    if run.dvc:
        if on_pod:
            return gpu_pod(name, repro_command(name), 1).execute(run.context)
        log.info(f"dvc repro {name}: {repro(str(run.project), name, dict(os.environ))}")
        return None
    if on_pod:
        return in_pod(run, name, cli or [name])
    with in_project(run):
        return direct()


def in_pod(run: Run, name: str, cli: list[str]) -> Any:
    """`ftlib CLI... -p PARAMS -o ...` in the GPU pod. Only training spreads over several GPUs (accelerate
    launch); N copies of any other stage would write the same outputs."""
    args = [*cli, "-p", run.rel(run.params_file)]
    for o in run.overrides:
        args += ["-o", o]
    return gpu_pod(name, args, int(run.form.get("gpus") or 1) if name == "train" else 1).execute(run.context)


def pod_rescore(run: Run) -> Callable[[str], dict[str, float]] | None:
    """executor=kubernetes: the gate scores the base model and the champion with `ftlib evaluate` in the GPU
    pod (an 8B model on the CPU worker would take hours), reading the metrics back from the shared volume.
    None: they are scored in this process."""
    if run.executor != "kubernetes":
        return None
    from ftlib.registry.register import primary_metrics

    def rescore(model: str) -> dict[str, float]:
        out = run.path("reports_dir") / "gate_rescore" / (re.sub(r"[^\w.-]+", "_", model) + ".json")
        out.unlink(missing_ok=True)  # never read an earlier run's scores
        in_pod(run, "gate", ["evaluate", "--model", model, "--data", run.rel(run.path("splits_dir") / "test.jsonl"),
                             "--json", run.rel(out)])
        return primary_metrics(run.params, json.loads(out.read_text()))

    return rescore


def validate() -> str:
    """Great Expectations data contract; invalid data fails the run (not retried)."""
    run = current()
    from airflow.sdk.exceptions import AirflowFailException

    from ftlib.stages.validate import validate_paths

    out = run.path("validated_dir")
    links = f"report: {out / 'report.json'}, Data Docs: {out / 'data_docs' / 'index.html'}, bad rows: {out / 'quarantine.jsonl'}"
    try:
        result = stage(run, "validate", lambda: validate_paths([run.path("raw_dir")], run.params, out))
    except DvcReproError:
        report = out / "report.json"
        if report.is_file() and json.loads(report.read_text()).get("valid") is False:
            raise AirflowFailException(f"invalid data (errors above); {links}") from None
        raise  # DVC itself failed: retried
    if result is not None:
        for issue in result.issues:
            log.log(logging.ERROR if issue.severity == "error" else logging.WARNING, str(issue))
        if not result.ok:
            raise AirflowFailException(f"{len(result.errors)} validation errors; {links}")
    return str(out / "report.json")


def split() -> dict[str, str]:
    """Stable hash split into train/validation/test; in DVC mode recorded in dvc.lock and pushed to the remote."""
    run = current()
    from ftlib.stages.split import SPLITS, split_paths

    out = run.path("splits_dir")
    result = stage(run, "split", lambda: split_paths([run.path("raw_dir")], run.params, out))
    if run.dvc:
        log.info(push(str(run.project), "split"))  # an unreachable remote fails (and retries) the task
    else:
        log.info(f"split counts: {result.counts} per label: {result.per_label}")
    return {s: str(out / f"{s}.jsonl") for s in SPLITS}


def train() -> str:
    """A killed or retried attempt resumes from its last checkpoint; a finished one is reused."""
    run = current()
    from ftlib.stages.train import train as train_stage

    splits, reports = run.path("splits_dir"), run.path("reports_dir")
    cli = ["train", "--no-compare", "--data-dir", run.rel(splits), "--reports-dir", run.rel(reports)]
    stage(run, "train", lambda: train_stage(run.params, splits, reports), cli, gpu=True)
    return str(run.project / run.params.train.output_dir)


def quantize_and_benchmark() -> str:
    """Every deployable variant (merged, GGUF + Modelfile, bitsandbytes, torch int8), then one comparison table."""
    run = current()
    from ftlib.stages.benchmark import benchmark
    from ftlib.stages.quantize import quantize

    p = run.params
    adapter = str(run.project / p.train.output_dir)
    merged, quantized, out = run.path("merged_dir"), run.path("quantized_dir"), run.path("reports_dir") / "benchmark.json"
    cli = ["quantize", "--model", run.rel(adapter), "--out-dir", run.rel(quantized), "--merged-dir", run.rel(merged)]
    stage(run, "quantize", lambda: quantize(adapter, quantized, merged, p.quantize.variants, p.quantize.merged_dtype,
                                            allow_pickle_weights=p.allow_pickle_weights), cli, gpu=True)
    # In the GPU pod with executor=kubernetes; its GGUF rows run there too, on the pod's CPUs (llama.cpp's CPU build).
    bench = ["benchmark", "--adapter", run.rel(adapter), "--quantized", run.rel(quantized),
             "--data-dir", run.rel(run.path("splits_dir")), "--json", run.rel(out)]
    stage(run, "benchmark", lambda: benchmark(p, adapter, str(quantized), str(run.path("splits_dir")), str(out),
                                              p.benchmark.include_base), bench, gpu=True)
    return str(out)


def evaluate() -> str:
    """Accuracy, precision, recall, F1 and the confusion matrix of the fine-tuned model on the test split."""
    run = current()
    from ftlib.stages.evaluate import evaluate as evaluate_stage

    p, reports = run.params, run.path("reports_dir")
    adapter, test = run.project / p.train.output_dir, run.path("splits_dir") / "test.jsonl"
    cli = ["evaluate", "--model", run.rel(adapter), "--data", run.rel(test), "--json", run.rel(reports / "metrics.json"),
           "--plot", run.rel(reports / "plots" / "confusion_matrix.png"), "--predictions", run.rel(reports / "predictions.csv")]
    stage(run, "evaluate", lambda: evaluate_stage(
        str(adapter), test, labels=p.data.labels, task=p.data.task,
        template=p.template, predictions_csv=reports / "predictions.csv", progress=True,  # line mode here
        metrics_json=reports / "metrics.json", confusion_png=reports / "plots" / "confusion_matrix.png"), cli, gpu=True)
    return str(reports / "metrics.json")


def gate() -> bool:
    """The gate (thresholds; beating TF-IDF, the base model and the re-scored champion). False skips register;
    the refusal, with every score, is in this log, in reports/gate.json and in MLflow."""
    run = current()
    from ftlib.registry.register import gate as gate_decision

    if not run.profile.register:
        log.info(f"profile {run.profile.name}: the model was not really trained, so it is neither scored against the gate "
                 "nor registered")
        return False
    reports = run.path("reports_dir")
    with in_project(run):
        g = gate_decision(run.params, reports / "metrics.json", run.path("splits_dir"),
                          run.project / run.params.train.output_dir, reports / "gate.json", rescore=pod_rescore(run))
    if g.already:
        log.info(f"this candidate is already registered as {g.already}; its gate decision stands ({'passed' if g.passed else 'refused'}), "
                 "nothing re-scored")
    for reason in g.reasons:
        log.warning(f"refused: {reason}")
    return g.passed


def register() -> dict[str, Any]:
    """Register the candidate as `challenger` (idempotent: a retry finds the version it made)."""
    run = current()
    from ftlib.registry.register import register as register_version

    reports = run.path("reports_dir")
    with in_project(run):
        r = register_version(run.params, run.project / run.params.train.output_dir, run.path("splits_dir"), reports,
                             run.path("quantized_dir"), run.path("merged_dir"), run.path("validated_dir") / "report.json",
                             record=reports / "registration.json")
    for m in r.messages:
        log.info(m)
    return json.loads((reports / "registration.json").read_text())


def summary() -> dict[str, Any]:
    """What this run produced and decided (also reports/summary.md): runs whether or not the gate passed."""
    run = current()
    from ftlib.registry.summary import rows, summary as summarize

    s = summarize(run.path("reports_dir"), run.path("splits_dir"))
    for label, value in rows(s):
        log.info(f"{label:>20}: {value}")
    return s
