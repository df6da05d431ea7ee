"""Model quality over seeds: ftlib's default training vs a TF-IDF + logistic regression baseline.

Trains params.yaml's configuration (with any `-o section.key=value` overrides) once per
seed on the demo splits (data/splits/, made by `make demo` or `ftlib split`), scores each
model on test.jsonl exactly as `ftlib evaluate` does (greedy generation, the label read
from the answer), and fits the classical baseline on the same train split. Each seed trains
in its own subprocess, into a temporary directory, logging to a temporary MLflow store:
nothing of the pipeline's (models/, reports/, mlflow.db) is touched.

Prints one row per seed (test accuracy, macro-F1, lowest class recall, train seconds),
the summary, and as the last line one JSON object with accuracy_mean, accuracy_min,
f1_macro_mean, min_class_recall (lowest over classes and seeds), tfidf_accuracy,
margin_over_tfidf (accuracy_mean - tfidf_accuracy), margin_min_over_tfidf,
train_seconds_mean and ratio (accuracy_mean / tfidf_accuracy).

    python benchmarks/quality.py                         # 3 seeds, ~50 min on 2 cores
    python benchmarks/quality.py --seeds 3407 1 2 3 4
    python benchmarks/quality.py -o train.method=qlora   # compare another configuration
    python benchmarks/quality.py --tiny                  # a 2-layer random model, a few steps (the test's mode)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

TINY = ["train.max_steps=3", "train.eval_steps=0", "train.per_device_train_batch_size=4", "train.warmup_steps=0"]


def tiny_model(dest: Path) -> str:
    """A 2-layer random Llama with the embedded tokenizer (what the tests train)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from ftlib.core.models import load_tokenizer

    tok = load_tokenizer("embedded:smollm2-135m-instruct")
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=1024, tie_word_embeddings=True,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).save_pretrained(dest)
    tok.save_pretrained(dest)
    return str(dest)


def one_seed(seed: int, data: Path, work: Path, overrides: list[str]) -> dict:
    """Train with this seed and score test.jsonl (runs in its own process)."""
    from ftlib.core.config import load_params
    from ftlib.stages.evaluate import evaluate
    from ftlib.stages.train import train

    params = load_params(ROOT / "params.yaml", [*overrides, f"train.seed={seed}", f"train.output_dir={work / 'adapter'}",
                                                f"train.checkpoint_dir={work / 'ckpt'}"])
    t = time.perf_counter()
    result = train(params, data, None)
    seconds = time.perf_counter() - t
    m = evaluate(result.output_dir, data / "test.jsonl", labels=params.data.labels, template=params.template, progress=False)
    recalls = {label: m["per_class"][label]["recall"] for label in params.data.labels if label in m["per_class"]}
    return {"seed": seed, "method": params.train.method, "accuracy": m["accuracy"], "f1_macro": m["f1_macro"],
            "min_class_recall": min(recalls.values()), "recalls": recalls, "off_label": m["off_label"], "n": m["n"],
            "steps": result.global_step, "validation_accuracy": result.metrics.get("eval_accuracy"),
            "train_seconds": round(seconds, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, nargs="+", default=[3407, 1, 2], help="train.seed values (default: 3407 1 2)")
    ap.add_argument("--data-dir", type=Path, default=ROOT / "data" / "splits", help="train/validation/test.jsonl")
    ap.add_argument("-o", "--override", action="append", default=[], help="section.key=value, as for the ftlib CLI")
    ap.add_argument("--tiny", action="store_true", help="a tiny random model and 3 steps: checks the script, not the model")
    ap.add_argument("--one", type=int, help=argparse.SUPPRESS)  # internal: train one seed in this process
    ap.add_argument("--work", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if not (args.data_dir / "train.jsonl").is_file():
        sys.exit(f"{args.data_dir}/train.jsonl missing: run `ftlib split` (or `make demo`) first")
    if args.one is not None:
        print("RESULT " + json.dumps(one_seed(args.one, args.data_dir, args.work, args.override)), flush=True)
        return

    from rich.console import Console
    from rich.table import Table

    from ftlib.stages.benchmark import tfidf_baseline
    from ftlib.core.config import load_params

    params = load_params(ROOT / "params.yaml", args.override)
    tfidf = tfidf_baseline(args.data_dir / "train.jsonl", args.data_dir / "test.jsonl", list(params.data.labels))
    with tempfile.TemporaryDirectory(prefix="ftlib-quality-") as tmp:
        overrides = list(args.override)
        if args.tiny:
            overrides = [f"base_model={tiny_model(Path(tmp) / 'tiny')}", *TINY, *overrides]
        env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{Path(tmp) / 'mlflow.db'}", "MLFLOW_EXPERIMENT_NAME": "quality"}
        runs = []
        for seed in args.seeds:
            work = Path(tmp) / f"seed-{seed}"
            cmd = [sys.executable, __file__, "--one", str(seed), "--work", str(work), "--data-dir", str(args.data_dir),
                   *[a for o in overrides for a in ("-o", o)]]
            print(f"seed {seed}: training ...", file=sys.stderr, flush=True)
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
            lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
            if proc.returncode != 0 or not lines:
                sys.exit(f"seed {seed} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
            runs.append(json.loads(lines[-1][len("RESULT "):]))
            r = runs[-1]
            print(f"seed {seed}: test accuracy {r['accuracy']:.3f}, macro-F1 {r['f1_macro']:.3f}, {r['train_seconds']:.0f} s",
                  file=sys.stderr, flush=True)

    acc = [r["accuracy"] for r in runs]
    summary = {
        "accuracy_mean": round(statistics.mean(acc), 4), "accuracy_min": round(min(acc), 4),
        "f1_macro_mean": round(statistics.mean(r["f1_macro"] for r in runs), 4),
        "min_class_recall": round(min(r["min_class_recall"] for r in runs), 4),
        "tfidf_accuracy": round(tfidf["accuracy"], 4),
        "margin_over_tfidf": round(statistics.mean(acc) - tfidf["accuracy"], 4),
        "margin_min_over_tfidf": round(min(acc) - tfidf["accuracy"], 4),
        "train_seconds_mean": round(statistics.mean(r["train_seconds"] for r in runs), 1),
        "ratio": round(statistics.mean(acc) / tfidf["accuracy"], 3) if tfidf["accuracy"] else None,
        "method": runs[0]["method"], "seeds": args.seeds, "n_test": runs[0]["n"], "overrides": args.override, "tiny": args.tiny,
    }
    t = Table(title=f"test split (n={summary['n_test']}), {summary['method']}" + (" [tiny model]" if args.tiny else ""))
    for col in ("model", "accuracy", "macro-F1", "min class recall", "off-label", "steps", "val acc", "train s"):
        t.add_column(col, justify="left" if col == "model" else "right")
    for r in runs:
        va = r["validation_accuracy"]
        t.add_row(f"ftlib seed {r['seed']}", f"{r['accuracy']:.3f}", f"{r['f1_macro']:.3f}", f"{r['min_class_recall']:.3f}",
                  str(r["off_label"]), str(r["steps"]), "-" if va is None else f"{va:.3f}", f"{r['train_seconds']:.0f}")
    t.add_row("tf-idf + logreg", f"{tfidf['accuracy']:.3f}", f"{tfidf['f1_macro']:.3f}", "", "", "", "", "")
    console = Console(width=120)
    console.print(t)
    console.print(f"accuracy mean {summary['accuracy_mean']:.3f} (min {summary['accuracy_min']:.3f}) vs TF-IDF "
                  f"{summary['tfidf_accuracy']:.3f}: margin {summary['margin_over_tfidf']:+.3f} (worst seed "
                  f"{summary['margin_min_over_tfidf']:+.3f}); ratio {summary['ratio']}")
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
