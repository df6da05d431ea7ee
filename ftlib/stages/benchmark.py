"""Stage `benchmark`: every variant of the model, side by side, on the test split.

Rows: the base model, the fine-tuned adapter, the merged model (fp32 transformers: the
reference), each quantized variant from `ftlib quantize` (variants.json), and a classical
baseline (TF-IDF + logistic regression on the same train split) so a user sees what the
LLM buys. Each LLM row runs in its own subprocess, so load time and peak RSS are its own
(and llama.cpp never shares a process with torch, DESIGN.md).

Per row: accuracy and F1 over the whole test split (classification; exact match and ROUGE-L
for generation data; greedy, batched), latency p50/p95 per example and examples/s on the first
`latency_examples` answered one request at a time (batch 1), decode tokens/s (64 tokens
with EOS suppressed, minus the first-token time), load time, size on disk, peak RSS, and
whether it stops at EOS. Parity rule: a quantized variant more than `max_quant_drop`
below the merged model's accuracy, or that stops at EOS less often than it, is flagged
and never `shippable`. Headline `ratio`: Q8_0 GGUF decode tokens/s over fp32 transformers.
"""

from __future__ import annotations

import json
import math
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from ftlib.core.atomic import write_json, write_text
from ftlib.core.log import get as get_logger

log = get_logger(__name__)

QUANTIZED_KINDS = ("gguf-f16", "gguf-q8_0", "gguf-q4_k_m", "bnb-int8", "bnb-nf4", "torch-int8")


def size_mb(path: str | Path) -> float | None:
    p = Path(path)
    if p.is_file():
        return p.stat().st_size / 2**20
    if not p.exists():  # a hub id: not on disk here (None, not NaN: NaN is not valid JSON)
        return None
    return sum(f.stat().st_size for f in p.rglob("*") if f.is_file()) / 2**20


# ---------------------------------------------------------------------------
# One variant, in a child process

def measure(spec: dict[str, Any]) -> dict[str, Any]:
    """Load one variant, answer every test example (batched), time single requests. Runs in a child process."""
    from ftlib.stages.evaluate import classification_metrics, generation_metrics
    from ftlib.core.formats import read_examples
    from ftlib.serving.generate import extract_label, load_predictor

    examples = read_examples(spec["data"])[: spec.get("max_examples") or None]
    t = time.perf_counter()
    if spec["kind"] == "merged-fp32" or spec["runtime"] == "transformers":
        predictor = load_predictor(spec["path"], spec["template"], dtype="float32")
        if spec["kind"] == "torch-int8":
            spec["size_mb"] = _state_mb(predictor.model)
    else:
        predictor = load_predictor(spec["path"], spec["template"])
    load_s = time.perf_counter() - t

    # Quality over every example, batched (what a batch job sees); latency on the first
    # `latency_examples`, one request at a time (what a single request sees).
    answers = _answers(predictor, [e.prompt_messages for e in examples], spec)
    timed = []
    start = time.perf_counter()
    for e in examples[: spec.get("latency_examples") or None]:
        timed += predictor.generate([e.prompt_messages], max_new_tokens=spec["max_new_tokens"], batch_size=1)
    seconds = time.perf_counter() - start
    gold = [e.output.strip() for e in examples]
    if spec["task"] == "classification":
        m = classification_metrics(gold, [extract_label(a.text, spec["labels"]) for a in answers], spec["labels"])
        quality = {"accuracy": m["accuracy"], "f1": m["f1"], "f1_macro": m["f1_macro"]}
    else:
        m = generation_metrics(gold, [a.text for a in answers], code=spec["task"] == "code")
        quality = {"accuracy": m["exact_match"], "f1": m["rouge_l"]}
    latencies = sorted(a.seconds for a in timed)
    return {
        **quality,
        "n": len(examples), "n_timed": len(timed),
        "latency_p50_s": statistics.median(latencies),
        "latency_p95_s": latencies[min(len(latencies) - 1, int(0.95 * len(latencies)))],
        "examples_per_s": len(timed) / seconds,
        "decode_tokens_per_s": predictor.decode_tokens_per_s(examples[0].prompt_messages, spec["decode_tokens"]),
        "stop_rate": sum(a.stopped for a in answers) / len(answers),
        "load_s": load_s,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        **({"size_mb": spec["size_mb"]} if "size_mb" in spec else {}),
    }


def _answers(predictor: Any, convs: list[list[dict[str, str]]], spec: dict[str, Any]) -> list[Any]:
    """Every greedy answer, batched. For classification on transformers, the rows whose greedy answer is
    exactly a label then EOS come from `greedy_labels` (two forward passes, the same answer as generating
    it); only the others are generated."""
    from ftlib.serving.generate import Answer

    batch = spec.get("batch_size", 16)
    known = None
    if spec["task"] == "classification" and hasattr(predictor, "greedy_labels"):
        known = predictor.greedy_labels(convs, spec["labels"], batch_size=batch)
    if known is None:
        return predictor.generate(convs, max_new_tokens=spec["max_new_tokens"], batch_size=batch)
    rest = iter(predictor.generate([c for c, k in zip(convs, known) if k is None],
                                   max_new_tokens=spec["max_new_tokens"], batch_size=batch))
    return [Answer(k, True, 0, 0.0) if k is not None else next(rest) for k in known]


def _state_mb(model: Any) -> float:
    """Serialized size of a torch-int8 model (it has no safetensors form to measure on disk)."""
    import io

    import torch

    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    return buf.tell() / 2**20


def _child(spec: dict[str, Any]) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "ftlib.stages.benchmark", json.dumps(spec)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "TOKENIZERS_PARALLELISM": "false"}, check=False)
    lines = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        return {"error": (proc.stderr or proc.stdout).strip().splitlines()[-1] if (proc.stderr or proc.stdout).strip() else f"exit {proc.returncode}"}
    return json.loads(lines[-1][len("RESULT "):])


# ---------------------------------------------------------------------------
# The classical baseline

def tfidf_baseline(train_file: Path, test_file: Path, labels: list[str]) -> dict[str, Any]:
    """TF-IDF (word 1-2 grams) + logistic regression on the prompt text: what a 1-second model gets."""
    import pickle

    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline

    from ftlib.stages.evaluate import classification_metrics
    from ftlib.core.formats import read_examples

    def xy(path: Path) -> tuple[list[str], list[str]]:
        ex = read_examples(path)
        return [" ".join(m["content"] for m in e.prompt_messages) for e in ex], [e.output.strip() for e in ex]

    (xtr, ytr), (xte, yte) = xy(train_file), xy(test_file)
    t = time.perf_counter()
    clf = make_pipeline(TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True), LogisticRegression(max_iter=2000, C=10.0))
    clf.fit(xtr, ytr)
    load_s = time.perf_counter() - t
    latencies = []
    for x in xte:
        t = time.perf_counter()
        clf.predict([x])
        latencies.append(time.perf_counter() - t)
    m = classification_metrics(yte, list(clf.predict(xte)), labels)
    latencies.sort()
    return {"accuracy": m["accuracy"], "f1": m["f1"], "f1_macro": m["f1_macro"], "n": len(yte),
            "latency_p50_s": statistics.median(latencies), "latency_p95_s": latencies[int(0.95 * (len(latencies) - 1))],
            "examples_per_s": len(latencies) / sum(latencies), "decode_tokens_per_s": None, "stop_rate": None,
            "load_s": load_s, "peak_rss_mb": None, "size_mb": len(pickle.dumps(clf)) / 2**20}


# ---------------------------------------------------------------------------
# The stage

def parity(row: dict[str, Any], merged: dict[str, Any], max_drop: dict[str, float]) -> tuple[bool, str]:
    """Is a quantized variant as good as the merged model it came from? (shippable, reason)"""
    limit = max_drop.get(row["kind"].removeprefix("gguf-"), max_drop.get("default", 0.05))
    drop = merged["accuracy"] - row["accuracy"]
    if drop > limit + 1e-9:
        return False, f"accuracy {row['accuracy']:.3f} is {drop:.3f} below merged {merged['accuracy']:.3f} (max_quant_drop {limit})"
    if row["stop_rate"] < merged["stop_rate"] - 0.05:
        return False, f"stops at EOS on {row['stop_rate']:.0%} of answers vs {merged['stop_rate']:.0%} for merged"
    return True, f"within {limit} of merged"


def benchmark(params: Any, adapter: str = "models/adapter", quantized_dir: str = "models/quantized",
              data_dir: str = "data/splits", out: str = "reports/benchmark.json", include_base: bool = True,
              progress: Any = None) -> dict[str, Any]:
    """Measure every variant; write benchmark.json, benchmark.md and plots/benchmark.png beside `out`."""
    progress = progress or log.info
    from ftlib.core.models import resolve, template_of

    cfg, data = params.benchmark, Path(data_dir)
    test = data / "test.jsonl"
    if not test.is_file():
        raise FileNotFoundError(f"{test}: missing; run `ftlib split` first")
    manifest_file = Path(quantized_dir) / "variants.json"
    manifest = json.loads(manifest_file.read_text()) if manifest_file.is_file() else []
    merged = next((v for v in manifest if v["name"] == "merged"), None)
    rows: list[dict[str, Any]] = []
    if include_base:
        rows.append({"name": "base", "kind": "base-fp32", "runtime": "transformers", "path": params.base_model})
    rows.append({"name": "fine-tuned (adapter)", "kind": "adapter-fp32", "runtime": "transformers", "path": adapter})
    if merged:
        rows.append({"name": "merged", "kind": "merged-fp32", "runtime": "transformers", "path": merged["path"]})
    rows += [{**v} for v in manifest if v["kind"] in QUANTIZED_KINDS]

    max_new = cfg.max_new_tokens
    if params.data.task == "classification":  # the label budget evaluate and the gate use (a base model that never
        from ftlib.core.models import load_tokenizer  # stops costs label+8 tokens per answer, not 32)
        from ftlib.serving.generate import label_budget

        max_new = min(max_new, label_budget(load_tokenizer(params.base_model, params.trust_remote_code), list(params.data.labels)))
    common = {"data": str(test), "task": params.data.task, "labels": list(params.data.labels),
              "template": template_of(adapter, params.template), "max_new_tokens": max_new,
              "decode_tokens": cfg.decode_tokens, "max_examples": cfg.max_examples, "latency_examples": cfg.latency_examples}
    total = len(rows) + (params.data.task == "classification")
    for i, row in enumerate(rows, 1):
        progress(f"benchmarking [{i}/{total}] {row['name']} ({row['runtime']}) ...")
        t = time.perf_counter()
        row.update(_child({**common, **row}))
        row["wall_s"] = round(time.perf_counter() - t, 1)  # the whole child: start-up, load, every measurement
        progress(f"  {row['name']}: " + (f"failed: {row['error']}" if "error" in row else
                                           f"accuracy {row['accuracy']:.3f}, {row['wall_s']:.0f} s"))
        row.setdefault("size_mb", size_mb(resolve(row["path"]) if row["kind"] == "base-fp32" else row["path"]))
    if params.data.task == "classification":
        progress(f"benchmarking [{total}/{total}] TF-IDF + logistic regression ...")
        rows.append({"name": "tf-idf + logreg", "kind": "classical", "runtime": "scikit-learn", "path": str(data / "train.jsonl"),
                     **tfidf_baseline(data / "train.jsonl", test, list(params.data.labels))})

    ref = next((r for r in rows if r["kind"] == "merged-fp32" and "error" not in r), None)
    for r in rows:
        if "error" in r:
            r["shippable"], r["reason"] = False, f"failed: {r['error']}"
        elif r["kind"] in QUANTIZED_KINDS:
            r["shippable"], r["reason"] = parity(r, ref, dict(params.quantize.max_quant_drop)) if ref else (False, "no merged model to compare with")
        else:
            r["shippable"], r["reason"] = {"base-fp32": (False, "not fine-tuned"), "classical": (False, "baseline for comparison"),
                                           }.get(r["kind"], (True, "reference"))
    q8 = next((r for r in rows if r["kind"] == "gguf-q8_0" and r.get("decode_tokens_per_s")), None)
    result = {
        "ratio": round(q8["decode_tokens_per_s"] / ref["decode_tokens_per_s"], 3) if q8 and ref and ref.get("decode_tokens_per_s") else None,
        "ratio_definition": "Q8_0 GGUF (llama.cpp) decode tokens/s over fp32 transformers generate (merged model)",
        "test_file": str(test), "n": rows[0].get("n"), "variants": rows,
    }
    out_path = write_json(out, result)
    write_text(out_path.with_suffix(".md"), markdown(result))
    plot(result, out_path.parent / "plots" / "benchmark.png")
    log_to_mlflow(result, adapter)
    return result


COLUMNS = [("accuracy", "acc", "{:.3f}"), ("f1", "F1", "{:.3f}"), ("latency_p50_s", "p50 s", "{:.3f}"),
           ("latency_p95_s", "p95 s", "{:.3f}"), ("examples_per_s", "ex/s", "{:.1f}"), ("decode_tokens_per_s", "decode tok/s", "{:.0f}"),
           ("load_s", "load s", "{:.1f}"), ("size_mb", "size MB", "{:.0f}"), ("peak_rss_mb", "peak RSS MB", "{:.0f}")]


def _cell(row: dict[str, Any], key: str, fmt: str) -> str:
    v = row.get(key)
    return "-" if v is None or math.isnan(v) else fmt.format(v)


def markdown(result: dict[str, Any]) -> str:
    head = "| variant | kind | " + " | ".join(c[1] for c in COLUMNS) + " | ship |\n"
    head += "|---|---|" + "---:|" * len(COLUMNS) + "---|\n"
    body = "".join(f"| {r['name']} | {r['kind']} | " + " | ".join(_cell(r, k, f) for k, _, f in COLUMNS)
                   + f" | {'yes' if r['shippable'] else 'no'}: {r['reason']} |\n" for r in result["variants"])
    ratio = f"\nQ8_0 GGUF decode tokens/s over fp32 transformers: **{result['ratio']}x**\n" if result["ratio"] else ""
    return head + body + ratio


def table(result: dict[str, Any]) -> Any:
    from rich.table import Table

    t = Table(title=f"benchmark on {result['test_file']} (n={result['n']})")
    t.add_column("variant")
    for _, title, _ in COLUMNS:
        t.add_column(title, justify="right")
    t.add_column("ship")
    for r in result["variants"]:
        t.add_row(r["name"], *[_cell(r, k, f) for k, _, f in COLUMNS],
                  "[green]yes[/]" if r["shippable"] else f"[red]no[/] {r['reason'][:40]}")
    return t


def plot(result: dict[str, Any], png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in result["variants"] if "error" not in r]
    names = [r["name"] for r in rows]
    fig, axes = plt.subplots(1, 4, figsize=(18, 4.5))
    for ax, (key, title) in zip(axes, [("accuracy", "accuracy"), ("examples_per_s", "examples/s (batch 1)"),
                                       ("decode_tokens_per_s", "decode tokens/s"), ("size_mb", "size on disk (MB)")]):
        vals = [r.get(key) or 0 for r in rows]
        colors = ["tab:green" if r["shippable"] else "tab:gray" for r in rows]
        ax.barh(names, vals, color=colors)
        ax.set_title(title)
        ax.invert_yaxis()
    for ax in axes[1:]:
        ax.set_yticklabels([])
    fig.suptitle("ftlib benchmark (green = shippable)")
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=100)
    plt.close(fig)


def log_to_mlflow(result: dict[str, Any], adapter: str) -> None:
    """Each variant as a child run of the training run (from the adapter's ftlib_train.json)."""
    import mlflow

    from ftlib.core.models import train_info
    from ftlib.core.tracking import setup_tracking

    setup_tracking()
    mlflow.set_experiment(os.environ["MLFLOW_EXPERIMENT_NAME"])
    parent = (train_info(adapter) or {}).get("mlflow_run_id")
    try:
        mlflow.get_run(parent) if parent else None
    except mlflow.exceptions.MlflowException:
        parent = None  # the run lives in another tracking store
    with mlflow.start_run(run_id=parent, run_name=None if parent else "benchmark"):
        if result["ratio"] is not None:
            mlflow.log_metric("benchmark_q8_0_decode_ratio", result["ratio"])
        for r in result["variants"]:
            with mlflow.start_run(run_name=f"benchmark-{r['name']}", nested=True):
                mlflow.set_tags({"ftlib.stage": "benchmark", "ftlib.variant.kind": r["kind"],
                                 "ftlib.variant.shippable": str(r["shippable"]).lower(), "ftlib.variant.reason": r["reason"][:500]})
                mlflow.log_params({"variant": r["name"], "kind": r["kind"], "runtime": r["runtime"], "path": str(r["path"])[:500]})
                mlflow.log_metrics({k: float(r[k]) for k, _, _ in COLUMNS if isinstance(r.get(k), (int, float)) and r[k] == r[k]})


if __name__ == "__main__":  # child process: python -m ftlib.stages.benchmark '<spec json>'
    print("RESULT " + json.dumps(measure(json.loads(sys.argv[1]))), flush=True)
