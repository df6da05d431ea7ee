"""GPU training throughput: ftlib's default vs the course notes' config, on models of real shapes (issue 14).

For each shape, a random-initialized Llama of those dimensions (no weights are downloaded: the
embedded SmolLM2 tokenizer, vocabulary 49,152) is written once, then trained on the demo's
train split by each configuration in its own process (so peak memory is its own):

  notes  course notes 4.3: QLoRA NF4 + double quantization, bf16, adamw_8bit, batch 2 x accumulation 4,
         alpaca prompt + EOS, loss on the whole sequence, LoRA r=16/alpha=16 on all projections, no packing.
  ftlib  `ftlib.stages.train.train` with params.yaml as it is, except LoRA on every layer (lora_layers 0, as the
         notes; the demo's 15 is for the 135M model on a CPU) and no evaluation: method auto (qlora on a GPU),
         answer-only loss, padding-free micro-batches packed to train.batch_tokens, Liger where installed.

Printed per shape and config: tokens/s (non-pad tokens of the rows trained / optimizer-loop seconds),
examples/s, peak GPU MB, MFU (6 x parameters x tokens/s over the device's dense bf16 peak), and the
ftlib/notes ratio; the last line is one JSON object {shape: {"ftlib": {...}, "notes": {...}, "ratio": r}}.

With no CUDA GPU it runs the `tiny` shape on 16 rows on the CPU (tests/test_benchmarks_gpu_train.py runs
that mode, so the script cannot rot in CI); figures from a CPU say nothing about a GPU.

    python benchmarks/gpu_train.py                                   # every shape on a GPU; tiny on a CPU
    python benchmarks/gpu_train.py --shapes llama-3-8b --epochs 1
    python benchmarks/gpu_train.py --shapes smollm2-135m --max-train 128 --data-dir data/splits
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

# hidden, intermediate, layers, attention heads, kv heads, tied embeddings, rope theta
SHAPES = {
    "tiny": (64, 128, 2, 4, 2, True, 10000.0),
    "smollm2-135m": (576, 1536, 30, 9, 3, True, 100000.0),
    "llama-3.2-1b": (2048, 8192, 16, 32, 8, True, 500000.0),
    "llama-3-8b": (4096, 14336, 32, 32, 8, False, 500000.0),
}
# dense bf16 peak FLOP/s, by a substring of torch.cuda.get_device_name()
PEAK_BF16 = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "L4": 121e12, "A10": 125e12,
             "RTX 4090": 165e12, "RTX 3090": 71e12}
VOCAB_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json")


def build_shape(shape: str, out: Path) -> int:
    """Random-init model of `shape` (bf16 on a GPU, built there: an 8B model in fp32 on a CPU is 30 GB) + tokenizer."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from ftlib.core.models import load_tokenizer, resolve

    hidden, inter, layers, heads, kv, tied, theta = SHAPES[shape]
    tok = load_tokenizer("embedded:smollm2-135m-instruct")
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=kv, tie_word_embeddings=tied, rope_theta=theta,
                      max_position_embeddings=8192, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                      pad_token_id=tok.pad_token_id)
    cuda = torch.cuda.is_available()
    torch.manual_seed(0)
    with torch.device("cuda" if cuda else "cpu"):
        model = LlamaForCausalLM(cfg).to(torch.bfloat16 if cuda else torch.float32)
    model.save_pretrained(out)
    src = Path(resolve("embedded:smollm2-135m-instruct"))
    for name in VOCAB_FILES:
        if (src / name).is_file():
            shutil.copy(src / name, out / name)
    return sum(p.numel() for p in model.parameters())


def _peak_gpu_mb() -> float | None:
    import torch

    return torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None


def run_notes(model_dir: Path, data: Path, epochs: float, work: Path) -> dict:
    """Course notes 4.3 on the same rows (fp32 and adamw_torch on a CPU, where bf16/8-bit optimizers do not apply)."""
    import torch
    from datasets import Dataset
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig
    from trl import SFTConfig, SFTTrainer

    from ftlib.core.formats import ALPACA_PROMPT, alpaca_fields, read_examples
    from ftlib.core.models import load_tokenizer
    from train_throughput import _Timer

    cuda = torch.cuda.is_available()
    dtype = torch.bfloat16 if cuda else torch.float32
    tok = load_tokenizer(str(model_dir))
    q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                           bnb_4bit_compute_dtype=dtype)
    model = AutoModelForCausalLM.from_pretrained(model_dir, quantization_config=q, dtype=dtype)
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=True)
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=16, lora_dropout=0, bias="none", task_type="CAUSAL_LM",
                                             target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                                             "down_proj"]))
    texts = []
    for e in read_examples(data / "train.jsonl"):
        instruction, inp = alpaca_fields(e)
        texts.append(ALPACA_PROMPT.format(instruction, inp, e.output) + tok.eos_token)
    timer = _Timer()
    trainer = SFTTrainer(
        model=model, processing_class=tok, train_dataset=Dataset.from_list([{"text": t} for t in texts]), callbacks=[timer],
        args=SFTConfig(
            output_dir=str(work / "notes"), dataset_text_field="text", max_length=512, packing=False,
            per_device_train_batch_size=2, gradient_accumulation_steps=4, warmup_steps=5, num_train_epochs=epochs,
            learning_rate=2e-4, bf16=cuda, logging_steps=1, optim="adamw_8bit" if cuda else "adamw_torch",
            weight_decay=0.01, lr_scheduler_type="linear", seed=3407, use_cpu=not cuda, report_to=[],
            save_strategy="no", eval_strategy="no", completion_only_loss=False, gradient_checkpointing=True,
        ),
    )
    trainer.train()
    tokens = sum(len(tok(t, add_special_tokens=False)["input_ids"]) for t in texts) * epochs
    return {"rows": len(texts) * epochs, "tokens": tokens, "seconds": timer.seconds, "peak_gpu_mb": _peak_gpu_mb()}


def run_ftlib(model_dir: Path, data: Path, epochs: float, work: Path) -> dict:
    from ftlib.core.config import load_params
    from ftlib.core.formats import encode_example, read_examples
    from ftlib.core.models import load_tokenizer
    from ftlib.stages.train import train

    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{work / 'mlflow.db'}"  # ftlib tracks every run; the notes do not
    params = load_params(ROOT / "params.yaml", [
        f"base_model={model_dir}", f"train.num_train_epochs={epochs}", "train.lora_layers=0", "train.eval_steps=0",
        "train.save_steps=100000", f"train.output_dir={work / 'adapter'}", f"train.checkpoint_dir={work / 'ckpt'}",
        f"paths.allowed_roots=[{work}]"])
    result = train(params, data, None)
    tok = load_tokenizer(str(model_dir))
    rows = read_examples(data / "train.jsonl")
    tokens = sum(len(encode_example(e, tok, params.template, params.max_seq_length)["input_ids"]) for e in rows) * epochs
    return {"rows": len(rows) * epochs, "tokens": tokens, "seconds": result.train_seconds, "peak_gpu_mb": _peak_gpu_mb(),
            "method": result.method, "token_budget": result.token_budget}


def _child(args: argparse.Namespace) -> None:
    if args._run == "build":
        print("RESULT " + json.dumps({"params": build_shape(args.shape, args._model)}), flush=True)
        return
    fn = run_ftlib if args._run == "ftlib" else run_notes
    print("RESULT " + json.dumps(fn(args._model, args.data_dir, args.epochs, args._work)), flush=True)


def _spawn(args: argparse.Namespace, *extra: str) -> dict:
    cmd = [sys.executable, __file__, "--data-dir", str(args.data_dir), "--epochs", str(args.epochs), *extra]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
    if proc.returncode != 0 or not line:
        sys.exit(f"{' '.join(extra)} failed (exit {proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return json.loads(line[-1][7:])


def device() -> tuple[str, float | None]:
    import torch

    if not torch.cuda.is_available():
        return "cpu", None
    name = torch.cuda.get_device_name(0)
    return name, next((peak for key, peak in PEAK_BF16.items() if key in name), None)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default=None, help="comma-separated, of: " + ", ".join(SHAPES) +
                    " (default: every real shape on a GPU, tiny on a CPU)")
    ap.add_argument("--epochs", type=float, default=1.0)
    ap.add_argument("--max-train", type=int, default=None, help="first N training rows (default: all on a GPU, 16 on a CPU)")
    ap.add_argument("--data-dir", type=Path, default=ROOT / "data" / "splits")
    ap.add_argument("--_run", choices=["build", "notes", "ftlib"], help=argparse.SUPPRESS)
    ap.add_argument("--_model", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--_work", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--shape", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args._run:
        _child(args)
        return

    if not (args.data_dir / "train.jsonl").is_file():
        sys.exit(f"{args.data_dir}/train.jsonl missing: run `make demo` or `ftlib split` first")
    name, peak = device()
    shapes = args.shapes.split(",") if args.shapes else (["tiny"] if name == "cpu" else ["smollm2-135m", "llama-3.2-1b", "llama-3-8b"])
    unknown = [s for s in shapes if s not in SHAPES]
    if unknown:
        sys.exit(f"unknown shape(s) {unknown}; known: {', '.join(SHAPES)}")
    max_train = args.max_train if args.max_train is not None else (16 if name == "cpu" else 0)
    print(f"device: {name}; dense bf16 peak {peak / 1e12:.0f} TFLOP/s" if peak else f"device: {name}", flush=True)

    from train_throughput import _limit

    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(dir=os.environ.get("FTLIB_BENCH_TMP")) as tmp:
        args.data_dir = _limit(args.data_dir, Path(tmp) / "data", max_train)
        for shape in shapes:
            model_dir = Path(tmp) / shape
            print(f"== {shape}: building a random-init model", flush=True)
            n_params = _spawn(args, "--_run", "build", "--shape", shape, "--_model", str(model_dir))["params"]
            row: dict[str, dict] = {}
            for config in ("notes", "ftlib"):
                print(f"== {shape}: {config}", flush=True)
                work = Path(tmp) / f"{shape}-{config}"
                work.mkdir()
                r = _spawn(args, "--_run", config, "--_model", str(model_dir), "--_work", str(work))
                tps = r["tokens"] / r["seconds"]
                row[config] = {"tokens_per_s": round(tps, 1), "examples_per_s": round(r["rows"] / r["seconds"], 3),
                               "peak_gpu_mb": None if r["peak_gpu_mb"] is None else round(r["peak_gpu_mb"]),
                               "mfu": round(6 * n_params * tps / peak, 4) if peak else None, "seconds": round(r["seconds"], 1),
                               "params": n_params, **({"token_budget": r.get("token_budget")} if config == "ftlib" else {})}
            row["ratio"] = round(row["ftlib"]["tokens_per_s"] / row["notes"]["tokens_per_s"], 3)
            results[shape] = row
            shutil.rmtree(model_dir, ignore_errors=True)  # an 8B shape is 15 GB on disk

    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"training throughput on {name}, {args.epochs:g} epoch(s)")
    for col in ("shape", "config", "tokens/s", "examples/s", "peak GPU MB", "MFU", "train s", "ftlib/notes"):
        table.add_column(col, justify="left" if col in ("shape", "config") else "right")
    for shape, row in results.items():
        for config in ("notes", "ftlib"):
            r = row[config]
            table.add_row(shape, config, f"{r['tokens_per_s']:,.0f}", f"{r['examples_per_s']:.2f}",
                          "-" if r["peak_gpu_mb"] is None else f"{r['peak_gpu_mb']:,}",
                          "-" if r["mfu"] is None else f"{r['mfu']:.1%}", f"{r['seconds']:.0f}",
                          f"{row['ratio']:.2f}x" if config == "ftlib" else "")
    Console(width=120).print(table)
    print(json.dumps({"device": name, **results}))


if __name__ == "__main__":
    main()
