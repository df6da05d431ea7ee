"""Training throughput and quality: the course notes' configuration vs ftlib's default.

On the embedded model and the sample sentiment split (data/splits/, made by `make demo`
or `ftlib split`), the same epochs and max length:

  (a) baseline  course notes 4.3 on a CPU: SFTTrainer over alpaca-prompt text + EOS,
                batch 2 x grad-accum 4, no packing, loss on the full sequence, fp32,
                LoRA r=16/alpha=16 on all projections, lr 2e-4 linear, warmup 5, wd 0.01, seed 3407.
  (b) ftlib     `ftlib.stages.train.train` with params.yaml as it is (QLoRA NF4, chat template,
                answer-only loss, bf16 autocast where the CPU has it, batch 8, length-grouped,
                gradient checkpointing on 3/4 of the layers, LM head over answer tokens only).

Each runs in its own subprocess (so peak RSS is its own), and both log to MLflow (a
temporary sqlite store): tracking is part of the pipeline and costs ~170 MB of RSS, so
the notes' config gets the same instrumentation. For each: examples/s,
non-pad tokens/s, peak RSS of training (load, train, final evaluation; the test scoring
that follows is reported apart), final validation loss, test accuracy (greedy generation, the
label read from the answer). Also the weight footprint of the base model loaded for
QLoRA (4-bit) and for fp32 LoRA. The last line is one JSON object.

    python benchmarks/train_throughput.py [--epochs 1] [--max-train N]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _limit(src: Path, dst: Path, n: int) -> Path:
    dst.mkdir(parents=True, exist_ok=True)
    for name in ("train.jsonl", "validation.jsonl", "test.jsonl"):
        lines = (src / name).read_text(encoding="utf-8").splitlines()
        (dst / name).write_text("\n".join(lines[:n] if name == "train.jsonl" and n else lines) + "\n", encoding="utf-8")
    return dst


def run_baseline(data: Path, epochs: float, work: Path) -> dict:
    """Course notes 4.3, transcribed for a CPU (no Unsloth, fp32, adamw_torch)."""
    import torch
    from datasets import Dataset
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM
    from trl import SFTConfig, SFTTrainer

    from ftlib.core.config import load_params
    from ftlib.core.formats import ALPACA_PROMPT, alpaca_fields, read_examples
    from ftlib.serving.generate import classification_accuracy
    from ftlib.core.models import load_tokenizer, resolve

    params = load_params(ROOT / "params.yaml")
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{work / 'mlflow-baseline.db'}"  # same instrumentation as (b)
    path = resolve(params.base_model)
    tok = load_tokenizer(params.base_model)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=16, lora_dropout=0, bias="none", task_type="CAUSAL_LM",
                                             target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]))

    def texts(name: str) -> Dataset:
        rows = []
        for e in read_examples(data / name):
            instruction, inp = alpaca_fields(e)
            rows.append({"text": ALPACA_PROMPT.format(instruction, inp, e.output) + tok.eos_token})
        return Dataset.from_list(rows)

    train_ds, val_ds = texts("train.jsonl"), texts("validation.jsonl")
    timer = _Timer()
    trainer = SFTTrainer(
        model=model, processing_class=tok, train_dataset=train_ds, eval_dataset=val_ds, callbacks=[timer],
        args=SFTConfig(
            output_dir=str(work / "baseline"), dataset_text_field="text", max_length=params.max_seq_length, packing=False,
            per_device_train_batch_size=2, gradient_accumulation_steps=4, warmup_steps=5, num_train_epochs=epochs,
            learning_rate=2e-4, bf16=False, fp16=False, logging_steps=1, optim="adamw_torch", weight_decay=0.01,
            lr_scheduler_type="linear", seed=3407, use_cpu=True, report_to=["mlflow"], save_strategy="no", eval_strategy="no",
            completion_only_loss=False,
        ),
    )
    trainer.train()
    val_loss = trainer.evaluate()["eval_loss"]
    train_peak = _rss()
    n = len(train_ds) * epochs
    tokens = sum(len(tok(t["text"], add_special_tokens=False)["input_ids"]) for t in train_ds) * epochs
    model.eval()
    acc = classification_accuracy(model, tok, read_examples(data / "test.jsonl"), params.data.labels, "alpaca")
    return {"examples_per_s": n / timer.seconds, "tokens_per_s": tokens / timer.seconds, "seconds": timer.seconds,
            "val_loss": val_loss, "test_accuracy": acc["accuracy"], "peak_rss_mb": train_peak, "scoring_peak_rss_mb": _rss()}


def run_ftlib(data: Path, epochs: float, work: Path) -> dict:
    from ftlib.core.config import load_params
    from ftlib.core.formats import encode_example, read_examples
    from ftlib.serving.generate import classification_accuracy
    from ftlib.core.models import load_model, load_tokenizer
    from ftlib.stages.train import train

    params = load_params(ROOT / "params.yaml", [f"train.num_train_epochs={epochs}", f"train.output_dir={work / 'adapter'}",
                                                f"train.checkpoint_dir={work / 'ckpt'}"])
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{work / 'mlflow.db'}"
    result = train(params, data, work / "reports")
    train_peak = _rss()
    tok = load_tokenizer(params.base_model)
    n = result.train_examples * epochs
    tokens = sum(len(encode_example(e, tok, params.template, params.max_seq_length)["input_ids"])
                 for e in read_examples(data / "train.jsonl")) * epochs
    train_s = result.train_seconds
    model, tok = load_model(str(work / "adapter"))
    acc = classification_accuracy(model, tok, read_examples(data / "test.jsonl"), params.data.labels, params.template)
    return {"examples_per_s": n / train_s, "tokens_per_s": tokens / train_s, "seconds": train_s,
            "val_loss": result.metrics.get("eval_loss"), "test_accuracy": acc["accuracy"], "peak_rss_mb": train_peak,
            "scoring_peak_rss_mb": _rss()}


def footprints() -> dict:
    import torch
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from ftlib.core.models import resolve

    path = resolve("embedded:smollm2-135m-instruct")
    fp32 = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).get_memory_footprint()
    q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                           bnb_4bit_compute_dtype=torch.bfloat16)
    nf4 = AutoModelForCausalLM.from_pretrained(path, quantization_config=q, dtype=torch.bfloat16).get_memory_footprint()
    return {"qlora_weights_mb": nf4 / 2**20, "fp32_weights_mb": fp32 / 2**20}


class _Timer:
    """Training-loop wall time, excluding setup and evaluation."""

    def __new__(cls):
        from transformers import TrainerCallback

        class Timer(TrainerCallback):
            seconds = 0.0

            def on_train_begin(self, *a, **k):
                self.t = time.perf_counter()

            def on_train_end(self, *a, **k):
                self.seconds = time.perf_counter() - self.t

        return Timer()


def _rss() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--epochs", type=float, default=1.0)
    ap.add_argument("--max-train", type=int, default=0, help="use only the first N training examples (0 = all)")
    ap.add_argument("--data-dir", type=Path, default=ROOT / "data" / "splits")
    ap.add_argument("--_run", choices=["baseline", "ftlib", "footprint"], help=argparse.SUPPRESS)
    ap.add_argument("--_work", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args._run:  # child process: one configuration
        fn = {"baseline": run_baseline, "ftlib": run_ftlib, "footprint": lambda *a: footprints()}[args._run]
        print("RESULT " + json.dumps(fn(args.data_dir, args.epochs, args._work)), flush=True)
        return

    if not (args.data_dir / "train.jsonl").is_file():
        sys.exit(f"{args.data_dir}/train.jsonl missing: run `make demo` or `ftlib split` first")
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        data = _limit(args.data_dir, Path(tmp) / "data", args.max_train)
        for name in ("footprint", "baseline", "ftlib"):
            print(f"== {name}", flush=True)
            cmd = [sys.executable, __file__, "--_run", name, "--_work", tmp, "--data-dir", str(data), "--epochs", str(args.epochs)]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            line = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
            if proc.returncode != 0 or not line:
                sys.exit(f"{name} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
            results[name] = json.loads(line[-1][7:])

    from rich.console import Console
    from rich.table import Table

    a, b, fp = results["baseline"], results["ftlib"], results["footprint"]
    table = Table(title=f"training, {args.epochs:g} epoch(s) on the embedded model")
    # val loss: (a) averages over the whole sequence, (b) over the answer only; not comparable.
    for col in ("config", "examples/s", "tokens/s", "train s", "train peak RSS MB", "+ scoring MB", "val loss", "test acc"):
        table.add_column(col, justify="left" if col == "config" else "right")
    for name, r in (("(a) course notes, fp32, bs 2x4, full loss", a), ("(b) ftlib default", b)):
        table.add_row(name, f"{r['examples_per_s']:.2f}", f"{r['tokens_per_s']:.0f}", f"{r['seconds']:.0f}", f"{r['peak_rss_mb']:.0f}",
                      f"{r['scoring_peak_rss_mb']:.0f}", f"{r['val_loss']:.3f}", f"{r['test_accuracy']:.3f}")
    Console(width=130).print(table)
    ratio = b["examples_per_s"] / a["examples_per_s"]
    print(f"ratio b/a examples/s {ratio:.2f}; QLoRA weights {fp['qlora_weights_mb']:.0f} MB vs fp32 {fp['fp32_weights_mb']:.0f} MB "
          f"({fp['qlora_weights_mb'] / fp['fp32_weights_mb']:.0%})")
    print(json.dumps({
        "ratio": round(ratio, 3),
        "baseline_examples_per_s": round(a["examples_per_s"], 3), "ftlib_examples_per_s": round(b["examples_per_s"], 3),
        "baseline_tokens_per_s": round(a["tokens_per_s"], 1), "ftlib_tokens_per_s": round(b["tokens_per_s"], 1),
        "baseline_test_accuracy": round(a["test_accuracy"], 4), "ftlib_test_accuracy": round(b["test_accuracy"], 4),
        "baseline_val_loss": round(a["val_loss"], 4), "ftlib_val_loss": round(b["val_loss"], 4),
        "baseline_peak_rss_mb": round(a["peak_rss_mb"], 1), "ftlib_peak_rss_mb": round(b["peak_rss_mb"], 1),
        "qlora_weights_mb": round(fp["qlora_weights_mb"], 1), "fp32_weights_mb": round(fp["fp32_weights_mb"], 1),
    }))


if __name__ == "__main__":
    main()
