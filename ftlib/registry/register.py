"""Stage `register`: the accuracy gate, then an MLflow model version with its lineage.

    gate      every criterion on the same, current test split (reports/metrics.json is the
              candidate's): accuracy >= register.accuracy_threshold, F1 (macro for
              classification) >= f1_threshold; accuracy above a TF-IDF + logistic regression
              baseline trained on train.jsonl by baseline_margin (classification); above the
              base model by min_improvement; and, when the registered model has a
              `champion`, above the re-scored champion by min_improvement. Every decision
              is an MLflow run (tags ftlib.gate / ftlib.gate.reason) and reports/gate.json,
              which lists each criterion with both scores and what was required.
    register  only after a passed gate: logs params, metrics, reports, dvc.lock, the
              validation report, a model card, the merged model and the shippable GGUFs
              to that run, logs the adapter as an MLflow pyfunc (ftlib/serving/pyfunc_model.py,
              logged as code: no pickle), creates a model version tagged with the run key
              and the lineage (ftlib.core.lineage) and points the `challenger` alias at it.

Idempotent: the run key (hash of split files, params, code version and adapter
weights) is a tag on the run and on the version. A rerun finds them and finishes
what a dead attempt left (run without version, version without alias) instead of
creating a second version. MLflow 3 aliases, never the deprecated stages.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

from ftlib.core import lineage
from ftlib.core.atomic import replacing, write_json
from ftlib.core.config import Params, as_dict, flatten
from ftlib.core.tracking import RegistryError, registry_lock, setup_tracking
from ftlib.core.log import get as get_logger

logger = get_logger(__name__)

KEY_TAG = "ftlib.register_key"
COMPLETE_TAG = "ftlib.registered"  # set last: a version without it was interrupted
REGISTRY_PREFIX = "models:/"




@dataclass
class Gate:
    passed: bool
    reasons: list[str]
    metric: str                      # accuracy (classification) or exact_match (generation)
    candidate: dict[str, float]      # {"score": .., "f1": ..}
    champion: dict[str, Any] | None  # {"version": .., "score": .., "f1": ..} re-scored now
    thresholds: dict[str, float | None]
    key: str
    run_id: str | None = None
    metrics_md5: str = ""            # the metrics.json decided on: a cached decision is reused only for the same file
    criteria: list[dict[str, Any]] = field(default_factory=list)  # name, candidate, reference, required, passed
    baseline: dict[str, float] | None = None  # TF-IDF + logistic regression on the same split
    base: dict[str, float] | None = None      # the base model on the same split
    overrides: dict[str, Any] = field(default_factory=dict)  # register.* values that differ from the defaults
    already: str | None = None  # "v3 (@champion)": this candidate is registered; decided then, not re-scored now


@dataclass
class Registration:
    status: str  # registered | exists | refused
    gate: Gate | None
    name: str
    version: str | None = None
    run_id: str | None = None
    messages: list[str] = field(default_factory=list)


# ---------------------------------------------------------------------------
# MLflow plumbing

def client() -> Any:
    from mlflow import MlflowClient

    setup_tracking()
    return MlflowClient()


def _experiment_id(c: Any) -> str:
    name = os.environ.get("MLFLOW_EXPERIMENT_NAME", "ftlib")
    exp = c.get_experiment_by_name(name)
    return exp.experiment_id if exp else c.create_experiment(name)


def alias_version(c: Any, name: str, alias: str) -> Any | None:
    """The version an alias points at, None if the model or the alias does not exist."""
    from mlflow.exceptions import MlflowException

    try:
        return c.get_model_version_by_alias(name, alias)
    except MlflowException:
        return None


def parse_uri(uri: str) -> tuple[str, str, str]:
    """models:/NAME/N -> (NAME, "version", N); models:/NAME@ALIAS -> (NAME, "alias", ALIAS)."""
    if not uri.startswith(REGISTRY_PREFIX):
        raise RegistryError(f"{uri}: expected models:/NAME/VERSION or models:/NAME@ALIAS")
    rest = uri[len(REGISTRY_PREFIX):].strip("/")
    if "@" in rest:
        name, alias = rest.rsplit("@", 1)
        return name, "alias", alias
    name, _, version = rest.rpartition("/")
    if not name or not version.isdigit():
        raise RegistryError(f"{uri}: expected models:/NAME/VERSION (a number) or models:/NAME@ALIAS")
    return name, "version", version


def get_version(c: Any, uri: str) -> Any:
    """The ModelVersion of a models:/ URI, with a clear error for unknown names, versions and aliases."""
    from mlflow.exceptions import MlflowException

    name, kind, ref = parse_uri(uri)
    try:
        c.get_registered_model(name)
    except MlflowException:
        known = ", ".join(m.name for m in c.search_registered_models()) or "none yet"
        raise RegistryError(f"{uri}: no registered model named {name!r} (registered: {known})") from None
    try:
        return c.get_model_version_by_alias(name, ref) if kind == "alias" else c.get_model_version(name, ref)
    except MlflowException:
        aliases = c.get_registered_model(name).aliases or {}
        have = ", ".join(f"@{a} -> v{v}" for a, v in aliases.items()) or "no aliases"
        raise RegistryError(f"{uri}: {name} has no {'alias' if kind == 'alias' else 'version'} {ref!r} ({have})") from None


# ---------------------------------------------------------------------------
# The gate

def register_key(params: Params, data_dir: Path, adapter: Path, root: Path = Path(".")) -> str:
    """data hashes + params hash + code version + adapter weights: same training output -> same key."""
    code = lineage.git(root, "rev-parse", "HEAD")
    if code is None:
        from ftlib import __version__ as code
    blob = {
        "data": {s: lineage.md5(Path(data_dir) / f"{s}.jsonl") for s in lineage.SPLITS if (Path(data_dir) / f"{s}.jsonl").is_file()},
        "params": lineage.params_hash(as_dict(params)),
        "code": code,
        "adapter": lineage.weight_md5s(adapter) if Path(adapter).is_dir() else {},
    }
    return hashlib.sha256(json.dumps(blob, sort_keys=True).encode()).hexdigest()[:16]


def provenance_problems(metrics: dict[str, Any], adapter: Path, test_file: Path, metrics_name: str = "metrics.json") -> list[str]:
    """Why these metrics may not be the candidate's on this test split (stale, copied, hand-edited)."""
    fix = "rerun `ftlib evaluate` (or `dvc repro evaluate`) on the candidate"
    if "model_files" not in metrics or "data_md5" not in metrics:
        return [f"{metrics_name} does not record which weights and test split it scored: {fix}"]
    problems = []
    weights = lineage.weight_md5s(adapter)
    if not weights:
        problems.append(f"cannot identify the candidate's weights: no *.safetensors in {adapter}")
    elif metrics["model_files"] != weights:
        problems.append(f"{metrics_name} scored other weights than {adapter}: {fix}")
    if test_file.is_file() and metrics["data_md5"] != lineage.md5(test_file):
        problems.append(f"{metrics_name} scored another test split than {test_file}: {fix}")
    return problems


def primary_metrics(params: Params, metrics: dict[str, Any]) -> dict[str, float]:
    """{"score", "f1"}: accuracy and macro F1 for classification (a class the model never predicts
    pulls macro F1 down; weighted F1 hides it), exact match and chrF/100 otherwise."""
    if params.data.task == "classification":
        return {"score": float(metrics["accuracy"]), "f1": float(metrics["f1_macro"])}
    return {"score": float(metrics["exact_match"]), "f1": float(metrics["chrf"]) / 100}


def score_model(model: str, params: Params, test_file: Path) -> dict[str, float]:
    """Score any --model form (a models:/ URI included) on test_file, exactly as `ftlib evaluate` does."""
    from ftlib.stages.evaluate import evaluate

    m = evaluate(model, test_file, labels=params.data.labels, task=params.data.task, template=params.template, progress=False)
    return primary_metrics(params, m)


def baseline_scores(params: Params, data_dir: Path) -> dict[str, float] | None:
    """TF-IDF + logistic regression trained on train.jsonl, scored on test.jsonl (classification only)."""
    if params.data.task != "classification" or not (data_dir / "train.jsonl").is_file():
        return None
    from ftlib.stages.benchmark import tfidf_baseline

    b = tfidf_baseline(data_dir / "train.jsonl", data_dir / "test.jsonl", list(params.data.labels))
    return {"score": b["accuracy"], "f1": b["f1_macro"]}


def metric_name(params: Params) -> str:
    """The gate's headline metric: accuracy for classification, exact match for generation."""
    return "accuracy" if params.data.task == "classification" else "exact_match"


def decide(params: Params, candidate_metrics: dict[str, Any], test_file: Path, key: str,
           rescore: Callable[[str], dict[str, float]] | None = None, adapter: Path | None = None) -> Gate:
    """Apply the gate. `rescore(model)` scores a model (the base model, or the champion as a models:/ URI)
    on test_file; default: score_model. With `adapter`, metrics that were not computed on its weights and
    this test split are refused. The TF-IDF baseline trains on train.jsonl next to test_file."""
    cfg = params.register
    metric = metric_name(params)
    f1_name = "f1_macro" if params.data.task == "classification" else "chrf/100"
    cand = primary_metrics(params, candidate_metrics)
    rescore = rescore or (lambda m: score_model(m, params, test_file))
    reasons = provenance_problems(candidate_metrics, adapter, test_file) if adapter is not None else []
    overrides = gate_overrides(params)
    for margin in ("min_improvement", "baseline_margin"):  # a negative margin lets a worse candidate through
        value = getattr(cfg, margin)
        if value is not None and value < 0:
            reasons.append(f"register.{margin}={value:g} accepts a candidate worse than what it is compared with: "
                           "a loosened gate registers only with --force --reason (and such a version promotes only with --force)")
    criteria: list[dict[str, Any]] = []

    def check(name: str, value: float, required: float, reference: float | None, why: str) -> None:
        ok = value >= required - 1e-9
        criteria.append({"name": name, "candidate": round(value, 4), "reference": None if reference is None else round(reference, 4),
                         "required": round(required, 4), "passed": ok})
        if not ok:
            reasons.append(why)

    check(f"{metric} >= accuracy_threshold", cand["score"], cfg.accuracy_threshold, None,
          f"{metric} {cand['score']:.3f} < accuracy_threshold {cfg.accuracy_threshold:.3f}")
    if cfg.f1_threshold > 0:
        check(f"{f1_name} >= f1_threshold", cand["f1"], cfg.f1_threshold, None,
              f"{f1_name} {cand['f1']:.3f} < f1_threshold {cfg.f1_threshold:.3f}")
    baseline = None
    if cfg.baseline_margin is not None and (baseline := baseline_scores(params, test_file.parent)) is not None:
        need = baseline["score"] + cfg.baseline_margin
        check(f"beats TF-IDF baseline by {cfg.baseline_margin:.2f}", cand["score"], need, baseline["score"],
              f"{metric} {cand['score']:.3f} does not beat the TF-IDF + logistic regression baseline "
              f"({baseline['score']:.3f}) by baseline_margin {cfg.baseline_margin:.3f}")
    base = None
    if cfg.check_base_model:
        base = rescore(params.base_model)
        check(f"beats base model by {cfg.min_improvement:.2f}", cand["score"], base["score"] + cfg.min_improvement, base["score"],
              f"{metric} {cand['score']:.3f} does not beat the base model {params.base_model} "
              f"({base['score']:.3f}) by min_improvement {cfg.min_improvement:.3f}")
    champ_info = None
    champ = alias_version(client(), cfg.model_name, "champion")
    if champ is not None:
        scores = rescore(f"models:/{cfg.model_name}/{champ.version}")
        champ_info = {"version": str(champ.version), **scores}
        check(f"beats champion v{champ.version} by {cfg.min_improvement:.2f}", cand["score"], scores["score"] + cfg.min_improvement,
              scores["score"], f"{metric} {cand['score']:.3f} does not beat champion v{champ.version} "
              f"({scores['score']:.3f}) by min_improvement {cfg.min_improvement:.3f}")
    return Gate(not reasons, reasons, metric, cand, champ_info,
                {"accuracy_threshold": cfg.accuracy_threshold, "f1_threshold": cfg.f1_threshold,
                 "min_improvement": cfg.min_improvement, "baseline_margin": cfg.baseline_margin}, key,
                criteria=criteria, baseline=baseline, base=base, overrides=overrides)


def gate_overrides(params: Params) -> dict[str, Any]:
    """register.* settings that differ from ftlib's defaults (RegisterConfig), as {key: {value, default}}:
    recorded in gate.json and on the version, so a gate changed for one run says so."""
    from ftlib.core.config import RegisterConfig

    defaults = RegisterConfig()
    return {f"register.{k}": {"value": getattr(params.register, k), "default": getattr(defaults, k)}
            for k in ("accuracy_threshold", "f1_threshold", "baseline_margin", "check_base_model", "min_improvement")
            if getattr(params.register, k) != getattr(defaults, k)}


def _find_run(c: Any, key: str) -> Any | None:
    runs = c.search_runs([_experiment_id(c)], filter_string=f"tags.`{KEY_TAG}` = '{key}'", max_results=1,
                         order_by=["attributes.start_time DESC"])
    return runs[0] if runs else None


def _find_version(c: Any, name: str, key: str) -> Any | None:
    found = c.search_model_versions(f"name = '{name}' and tags.`{KEY_TAG}` = '{key}'")
    return found[0] if found else None


def log_gate(c: Any, gate: Gate, lineage_tags: dict[str, str]) -> str:
    """Record the decision in the run of this key (created on first use): refusals are kept too."""
    run = _find_run(c, gate.key)
    run_id = run.info.run_id if run else c.create_run(_experiment_id(c), run_name=f"register-{gate.key[:8]}").info.run_id
    tags = {KEY_TAG: gate.key, "ftlib.stage": "register", "ftlib.gate": "passed" if gate.passed else "failed",
            "ftlib.gate.reason": "; ".join(gate.reasons) or "passed", **lineage_tags}
    if gate.overrides:
        tags["ftlib.gate.overrides"] = json.dumps(gate.overrides, sort_keys=True)
    if gate.champion:
        tags["ftlib.gate.champion_version"] = gate.champion["version"]
    for k, v in tags.items():
        c.set_tag(run_id, k, v)
    metrics = {f"candidate_{gate.metric}": gate.candidate["score"], "candidate_f1": gate.candidate["f1"]}
    for who, scores in (("champion", gate.champion), ("baseline", gate.baseline), ("base", gate.base)):
        if scores:
            metrics |= {f"{who}_{gate.metric}": scores["score"], f"{who}_f1": scores["f1"]}
    ts = int(time.time() * 1000)
    for k, v in metrics.items():
        c.log_metric(run_id, k, v, timestamp=ts)
    gate.run_id = run_id
    return run_id


def gate(params: Params, metrics_file: Path = Path("reports/metrics.json"), data_dir: Path = Path("data/splits"),
         adapter: Path = Path("models/adapter"), out: Path | None = Path("reports/gate.json"),
         rescore: Callable[[str], dict[str, float]] | None = None, key: str | None = None,
         tags: dict[str, str] | None = None) -> Gate:
    """Decide, log the decision as an MLflow run and write reports/gate.json."""
    if not metrics_file.is_file():
        raise FileNotFoundError(f"{metrics_file}: missing; run `ftlib evaluate` (or `dvc repro evaluate`) first")
    c = client()
    key = key or register_key(params, data_dir, adapter)
    existing = _find_version(c, params.register.model_name, key)
    if existing is not None:  # the same training output is registered: its decision stands; re-scoring the
        # champion against itself would refuse it and rewrite the champion's run (issue 17)
        aliases = [a for a, v in (c.get_registered_model(params.register.model_name).aliases or {}).items()
                   if str(v) == str(existing.version)]
        passed = existing.tags.get("ftlib.gate") == "passed"
        g = Gate(passed, [] if passed else [existing.tags.get("ftlib.gate.reason", "failed the gate")],
                 metric_name(params),
                 primary_metrics(params, json.loads(metrics_file.read_text())), None, {}, key, run_id=existing.run_id,
                 already=f"v{existing.version}" + "".join(f" (@{a})" for a in sorted(aliases)))
        if out is not None:
            write_json(out, asdict(g))
        return g
    g = decide(params, json.loads(metrics_file.read_text()), data_dir / "test.jsonl", key, rescore, adapter)
    g.metrics_md5 = lineage.md5(metrics_file)
    # register() passes the key and lineage it computed: hashing the base weights twice is slow for 8B models
    log_gate(c, g, tags if tags is not None else lineage.collect(as_dict(params), data_dir, adapter))
    if out is not None:
        write_json(out, asdict(g))
    return g


# ---------------------------------------------------------------------------
# What gets logged

def shippable_ggufs(benchmark: dict[str, Any] | None, quantized_dir: Path) -> list[Path]:
    """GGUF files the benchmark's parity rule lets ship, smallest first (all GGUFs if no benchmark ran)."""
    if benchmark is None:
        return sorted(quantized_dir.glob("*.gguf"), key=lambda p: p.stat().st_size)
    rows = [r for r in benchmark.get("variants", []) if str(r.get("kind", "")).startswith("gguf") and r.get("shippable")]
    paths = [Path(r["path"]) for r in rows if Path(r["path"]).is_file()]
    return sorted(paths, key=lambda p: p.stat().st_size)


def default_prompt(train_file: Path) -> dict[str, str]:
    """The instruction (and system prompt) most training examples share, so callers can send only the input."""
    from collections import Counter

    from ftlib.core.formats import read_examples

    if not train_file.is_file():
        return {}
    examples = read_examples(train_file)
    instructions = Counter(e.raw.get("instruction") for e in examples if e.format == "alpaca")
    found: dict[str, str] = {}
    if instructions:
        text, n = instructions.most_common(1)[0]
        if text and n >= len(examples) / 2:
            found["instruction"] = text
    systems = Counter(e.messages[0]["content"] for e in examples if e.messages[0]["role"] == "system")
    if systems:
        text, n = systems.most_common(1)[0]
        if n >= len(examples) / 2:
            found["system"] = text
    return found


def model_card(params: Params, name: str, g: Gate, metrics: dict[str, Any], benchmark: dict[str, Any] | None,
               tags: dict[str, str], prompt: dict[str, str], shipped: list[Path]) -> str:
    """A markdown model card: intended use, data, metrics, variants, limitations, lineage."""
    lin = lineage.of(tags)
    task = params.data.task
    lines = [f"# {name}", "",
             f"Fine-tuned from `{params.base_model}` with {params.train.method} (LoRA r={params.train.lora_r}, "
             f"alpha={params.train.lora_alpha}) by ftlib.", "", "## Intended use", ""]
    if task == "classification":
        lines.append(f"Classify text into one of: {', '.join(params.data.labels)}.")
    else:
        lines.append(f"{task.capitalize()} in the style of its training data.")
    if prompt.get("instruction"):
        lines.append(f"Prompted with the instruction \"{prompt['instruction']}\" followed by the text; the pyfunc "
                     "and `ftlib serve` add it when a request sends only the text.")
    lines += ["Greedy decoding (temperature 0). Not for decisions about people without human review.", "",
              "## Data", "", "| split | md5 (DVC) |", "|---|---|"]
    lines += [f"| {s} | `{lin.get(f'data.{s}.md5', 'n/a')}` |" for s in lineage.SPLITS]
    raw = {k[len('dvc.raw.'):]: v for k, v in lin.items() if k.startswith("dvc.raw.")}
    lines += [f"| raw `{p}` | `{h}` |" for p, h in raw.items()]
    lines += ["", f"Test examples: {metrics.get('n', 'n/a')}.", "", "## Metrics (test split)", "", "| metric | value |", "|---|---|"]
    keys = ("accuracy", "precision", "recall", "f1", "f1_macro", "off_label") if task == "classification" else \
        ("exact_match", "chrf", "bleu", "rouge_l", "syntax_valid_rate")
    lines += [f"| {k} | {metrics[k]:.3f} |" if isinstance(metrics[k], float) else f"| {k} | {metrics[k]} |"
              for k in keys if k in metrics]
    lines += ["", "## Gate", "", f"{'Passed' if g.passed else 'Refused'}: {'; '.join(g.reasons) or 'every criterion met'}. "
              "All scores on the same test split.", "", "| criterion | candidate | compared with | required | |", "|---|---:|---:|---:|---|"]
    lines += [f"| {c['name']} | {c['candidate']:.3f} | {'-' if c['reference'] is None else format(c['reference'], '.3f')} | "
              f">= {c['required']:.3f} | {'ok' if c['passed'] else 'fails'} |" for c in g.criteria]
    lines += ["", "## Variants", ""]
    if benchmark:
        from ftlib.stages.benchmark import markdown

        lines.append(markdown(benchmark))
    lines.append("Shipped GGUF files (llama.cpp / Ollama): " + (", ".join(f"`{p.name}`" for p in shipped) or "none passed parity") + ".")
    lines += ["", "## Limitations", ""]
    if benchmark:
        flagged = [r["name"] for r in benchmark.get("variants", []) if r.get("kind", "").startswith(("gguf", "bnb", "torch"))
                   and not r.get("shippable")]
        if flagged:
            lines.append(f"- Not shipped (lost accuracy against the merged model): {', '.join(flagged)}.")
        classical = next((r for r in benchmark.get("variants", []) if r.get("kind") == "classical"), None)
        if classical and classical.get("accuracy") is not None and classical["accuracy"] > metrics.get("accuracy", 1):
            lines.append(f"- A TF-IDF + logistic regression baseline scores {classical['accuracy']:.3f} on the same split, "
                         f"above this model's {metrics['accuracy']:.3f}: consider a larger base model.")
    lines += ["- Scored on a held-out split of the same distribution as training; other domains or languages are untested.",
              f"- Longest input: {params.max_seq_length} tokens after templating.", "",
              "## Lineage", "", f"`ftlib lineage models:/{name}/<version>` prints the chain and the rebuild commands.", "",
              f"- git commit: `{lin.get('git.commit')}` (dirty: {lin.get('git.dirty')})",
              f"- params hash: `{lin.get('params.hash')}`; base model revision: {lin.get('base_model.revision')}",
              f"- stages: {lin.get('dvc.stages')}", f"- hardware: {lin.get('hardware')}", ""]
    return "\n".join(lines)


def _requirements() -> list[str]:
    versions = lineage.library_versions()
    pins = {"torch": "torch", "transformers": "transformers", "peft": "peft", "mlflow": "mlflow",
            "llama_cpp_python": "llama-cpp-python", "bitsandbytes": "bitsandbytes"}
    return [f"{pip}=={versions[k]}" for k, pip in pins.items() if k in versions] + ["pyyaml", "rich"]


def _log_artifacts(c: Any, run_id: str, params: Params, card: str, shipped: list[Path], modelfile_text: str | None,
                   paths: dict[str, Path]) -> None:
    """Everything but the model itself, into the run. Rerunning overwrites the same paths (idempotent)."""
    with tempfile.TemporaryDirectory() as tmp:
        t = Path(tmp)
        (t / "model_card.md").write_text(card)
        (t / "params.json").write_text(json.dumps(as_dict(params), indent=2) + "\n")
        c.log_artifact(run_id, str(t / "model_card.md"))
        c.log_artifact(run_id, str(t / "params.json"))
        if modelfile_text:
            (t / "Modelfile").write_text(modelfile_text)
            c.log_artifact(run_id, str(t / "Modelfile"), "gguf")
    for what in ("params_yaml", "dvc_lock", "validation_report"):
        if paths[what].is_file():
            c.log_artifact(run_id, str(paths[what]), "lineage" if what != "validation_report" else "validation")
    reports = paths["reports"]
    for f in ("metrics.json", "benchmark.json", "benchmark.md", "train_metrics.json", "train_loss.csv", "predictions.csv", "gate.json"):
        if (reports / f).is_file():
            c.log_artifact(run_id, str(reports / f), "reports")
    if (reports / "plots").is_dir():
        c.log_artifacts(run_id, str(reports / "plots"), "reports/plots")
    for g in shipped:
        c.log_artifact(run_id, str(g), "gguf")
    merged = paths["merged"]
    if params.register.log_merged and (merged / "config.json").is_file():
        c.log_artifacts(run_id, str(merged), "merged")


def _log_model(run_id: str, adapter: Path, gguf: Path | None, config: dict[str, Any]) -> str:
    """The adapter (and the smallest shippable GGUF) as an MLflow pyfunc logged from code."""
    import mlflow

    import ftlib

    artifacts = {"adapter": str(adapter)}
    if gguf is not None:
        artifacts["gguf"] = str(gguf)
    with mlflow.start_run(run_id=run_id):
        info = mlflow.pyfunc.log_model(
            name="model", python_model=str(Path(__file__).parents[1] / "serving" / "pyfunc_model.py"), artifacts=artifacts,
            code_paths=[str(Path(ftlib.__file__).parent)], model_config=config, pip_requirements=_requirements(),
        )
    return info.model_uri


def register(params: Params, adapter: Path = Path("models/adapter"), data_dir: Path = Path("data/splits"),
             reports: Path = Path("reports"), quantized_dir: Path = Path("models/quantized"),
             merged_dir: Path = Path("models/merged"), validation_report: Path = Path("data/validated/report.json"),
             force: bool = False, reason: str = "", log: Callable[[str], None] | None = None,
             record: Path | None = None) -> Registration:
    """Gate the candidate and, when it passes (or `force` with a reason), register it as `challenger`.
    `record`: where to write what happened (status, name, version, run id, models:/ URI) as JSON, atomically."""
    with registry_lock(params.register.model_name):  # two registers of one candidate at once: one version
        r = _register(params, adapter, data_dir, reports, quantized_dir, merged_dir, validation_report, force, reason,
                      log or logger.info)
    if record is not None:
        write_json(record, {"status": r.status, "name": r.name, "version": r.version, "run_id": r.run_id,
                            "uri": f"models:/{r.name}/{r.version}" if r.version else None})
    return r


def _register(params: Params, adapter: Path, data_dir: Path, reports: Path, quantized_dir: Path, merged_dir: Path,
              validation_report: Path, force: bool, reason: str, log: Callable[[str], None]) -> Registration:
    name = params.register.model_name
    if not (adapter / "adapter_config.json").is_file() and not (adapter / "config.json").is_file():
        raise FileNotFoundError(f"{adapter}: no trained model; run `ftlib train` (or `dvc repro train`) first")
    if force and not reason.strip():
        raise RegistryError("--force needs --reason: say why a model that failed the gate should be registered")
    c = client()
    key = register_key(params, data_dir, adapter)
    existing = _find_version(c, name, key)
    if existing is not None:
        if existing.tags.get(COMPLETE_TAG) != "true":  # a previous attempt died after creating the version
            _finish(c, name, str(existing.version), existing.tags.get("ftlib.model_card", ""))
        return Registration("exists", None, name, str(existing.version), existing.run_id,
                            [f"already registered: {name} v{existing.version} has run key {key}; nothing to do"])

    cached = reports / "gate.json"
    g = None
    if cached.is_file():  # the DAG's gate task decided moments ago: reuse it if nothing changed since
        saved = json.loads(cached.read_text())
        champ = alias_version(c, name, "champion")
        same_metrics = (reports / "metrics.json").is_file() and saved.get("metrics_md5") == lineage.md5(reports / "metrics.json")
        if saved.get("key") == key and same_metrics and (saved.get("champion") or {}).get("version") == (str(champ.version) if champ else None):
            g = Gate(**saved)
    tags = lineage.collect(as_dict(params), data_dir, adapter)
    if g is None:
        g = gate(params, reports / "metrics.json", data_dir, adapter, cached, key=key, tags=tags)
    run_id = g.run_id or log_gate(c, g, tags)
    if not g.passed and not force:
        return Registration("refused", g, name, None, run_id, [f"not registered: {'; '.join(g.reasons)}"])

    metrics = json.loads((reports / "metrics.json").read_text())
    bench_file = reports / "benchmark.json"
    benchmark = json.loads(bench_file.read_text()) if bench_file.is_file() else None
    shipped = shippable_ggufs(benchmark, quantized_dir)
    prompt = default_prompt(data_dir / "train.jsonl")
    card = model_card(params, name, g, metrics, benchmark, tags, prompt, shipped)
    modelfile_text = None
    if shipped:
        from ftlib.core.models import load_tokenizer
        from ftlib.stages.quantize import modelfile

        modelfile_text = modelfile(shipped[0].name, load_tokenizer(str(adapter), light=True))
    run = c.get_run(run_id)
    if run.data.tags.get("ftlib.artifacts") != "complete":
        log(f"logging artifacts to run {run_id}")
        _log_artifacts(c, run_id, params, card, shipped, modelfile_text, {
            "params_yaml": Path("params.yaml"), "dvc_lock": Path("dvc.lock"), "validation_report": validation_report,
            "reports": reports, "merged": merged_dir})
        from mlflow.entities import Metric, Param


        flat = [Param(k, str(v)[:6000]) for k, v in flatten(as_dict(params)).items() if k not in run.data.params]
        for i in range(0, len(flat), 100):  # MLflow takes at most 100 params per batch
            c.log_batch(run_id, params=flat[i:i + 100])
        ts = int(time.time() * 1000)
        c.log_batch(run_id, metrics=[Metric(f"test_{k}", float(v), ts, 0) for k, v in metrics.items()
                                     if isinstance(v, (int, float)) and not isinstance(v, bool)])
        c.set_tag(run_id, "ftlib.artifacts", "complete")
    model_uri = run.data.tags.get("ftlib.model_uri")
    if not model_uri:
        log("logging the pyfunc model (adapter" + (f" + {shipped[0].name})" if shipped else ")"))
        config = {"runtime": "transformers", "template": params.template, "task": params.data.task,
                  "labels": params.data.labels if params.data.task == "classification" else [],
                  "max_new_tokens": 16 if params.data.task == "classification" else 256, **prompt}
        model_uri = _log_model(run_id, adapter, shipped[0] if shipped else None, config)
        c.set_tag(run_id, "ftlib.model_uri", model_uri)
    version_tags = {KEY_TAG: key, "ftlib.gate": "passed" if g.passed else "failed",
                    "ftlib.gate.reason": "; ".join(g.reasons) or "passed",
                    f"ftlib.{g.metric}": f"{g.candidate['score']:.4f}", "ftlib.f1": f"{g.candidate['f1']:.4f}", **tags}
    if g.overrides:
        version_tags["ftlib.gate.overrides"] = json.dumps(g.overrides, sort_keys=True)
    if force and not g.passed:
        version_tags |= {"ftlib.forced": "true", "ftlib.forced.reason": reason, "ftlib.forced.by": who()}
    import mlflow

    mv = mlflow.register_model(model_uri, name, tags=version_tags)
    same = sorted(int(v.version) for v in c.search_model_versions(f"name = '{name}' and tags.`{KEY_TAG}` = '{key}'"))
    if same and same[0] < int(mv.version):  # another host registered this candidate meanwhile (a shared remote store)
        c.delete_model_version(name, str(mv.version))
        return Registration("exists", None, name, str(same[0]), run_id,
                            [f"already registered: {name} v{same[0]} has run key {key} (registered concurrently)"])
    _finish(c, name, str(mv.version), card)
    return Registration("registered", g, name, str(mv.version), run_id,
                        [f"registered {name} v{mv.version} as @challenger (run {run_id})"])


def _finish(c: Any, name: str, version: str, card: str) -> None:
    """Alias + description, then the completion tag (last, so a crash before it is finished on rerun)."""
    c.set_registered_model_alias(name, "challenger", version)
    if card:
        c.update_model_version(name, version, description=card)
    c.set_model_version_tag(name, version, COMPLETE_TAG, "true")


def who() -> str:
    import getpass

    try:
        return os.environ.get("FTLIB_USER") or getpass.getuser()
    except (KeyError, OSError):
        return "unknown"


def local_copy(uri: str, dest_root: Path | None = None) -> Path:
    """Download a models:/ URI's pyfunc model once per version; the local directory."""
    import mlflow

    c = client()
    mv = get_version(c, uri)
    from ftlib.core.models import cache_dir

    tracking = hashlib.sha256(os.environ["MLFLOW_TRACKING_URI"].encode()).hexdigest()[:8]
    # the run id too: a model deleted and registered again reuses version numbers
    dest = (dest_root or cache_dir() / "registry") / tracking / mv.name / f"{mv.version}-{mv.run_id[:12]}"
    if not (dest / "MLmodel").is_file():
        dest.parent.mkdir(parents=True, exist_ok=True)
        with replacing(dest, "registry download", per_process=True) as tmp:
            tmp.mkdir()
            mlflow.artifacts.download_artifacts(f"models:/{mv.name}/{mv.version}", dst_path=str(tmp))
    return dest
