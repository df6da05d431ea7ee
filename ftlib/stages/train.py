"""Stage `train`: supervised fine-tuning with TRL's SFTTrainer.

Methods (params.yaml `train.method`): qlora (4-bit NF4 base, double quantization, LoRA on
top), lora, full, prompt_tuning, and auto (the default: qlora on a CUDA GPU, lora on a CPU;
see resolve_method). The loop is TRL's; this module only
decides what to load, how to batch and where to write:

  * supervision: examples are pre-tokenized by ftlib.core.formats.encode_example into
    input_ids + completion_mask, so the loss falls on the answer only, every answer ends
    with EOS, and the prompt text is the one inference builds;
  * speed: bf16 autocast where the hardware has it; class-balanced batches on a CPU; on
    CUDA exact padding-free micro-batches packed to a token budget (train.batch_tokens,
    docs/gpu-training.md), adamw_8bit and Liger; Unsloth when asked for (or
    `backend: auto` on a GPU where it is installed);
  * resume: checkpoints go to <checkpoint_dir>/<run key>, the key being a hash of the data
    and every parameter that changes what is learned; rerunning the same command resumes
    from the newest checkpoint (an Airflow retry after a killed pod does exactly that);
  * out-of-memory: halve the micro-batch, double accumulation, resume, log it;
  * tracking: MLflow (params, loss, eval loss, lr, examples/s, tokens/s, peak memory)
    and reports/train_loss.csv for `dvc plots show`.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import json
import math
import os
import resource
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from transformers import TrainerCallback

from ftlib.core.atomic import write_json
from ftlib.core.config import SPLITS, Params, TrainConfig, as_dict, flatten
from ftlib.core.errors import InvalidData
from ftlib.core.log import ProgressLines, on_terminal
from ftlib.core.log import get as get_logger
from ftlib.core.tracking import setup_tracking
from ftlib.core.formats import encode_example, read_examples

log = get_logger(__name__)

SPLIT_FILES = tuple(f"{s}.jsonl" for s in SPLITS)


@dataclass
class TrainResult:
    output_dir: str
    run_key: str
    method: str  # the method used (train.method: auto resolved)
    global_step: int
    resumed_from: str | None
    train_examples: int
    seconds: float | None  # wall time of the training run, loading included (None: unknown)
    train_seconds: float | None  # optimizer steps only (no loading, evaluation or checkpointing)
    examples_per_s: float | None  # median over logged steps; a rerun that loads a finished run reports that run's
    metrics: dict[str, float] = field(default_factory=dict)
    oom_backoffs: list[dict[str, int]] = field(default_factory=list)
    mlflow_run_id: str | None = None
    token_budget: dict[str, float] | None = None  # train.batch_tokens in effect (GPU): budget, rows/step, lr, ...
    summary: dict[str, Any] = field(default_factory=dict)  # what reports/train_metrics.json holds


# ---------------------------------------------------------------------------
# Hardware decisions (each one is a param with an "auto" that resolves here)

def has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def cpu_has_bf16() -> bool:
    """AMX or AVX512-BF16: bf16 matmuls are native, autocast is a speed-up, not an emulation."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "amx_bf16" in flags or "avx512_bf16" in flags


def use_bf16(setting: str) -> bool:
    if setting != "auto":
        return setting == "true"
    import torch

    return torch.cuda.is_bf16_supported() if has_cuda() else cpu_has_bf16()


def resolve_method(setting: str) -> str:
    """train.method: auto -> qlora on a CUDA GPU, lora on a CPU.

    QLoRA is the production path: on a GPU the 4-bit base is what lets an 8B model train on one
    card, and bitsandbytes dequantizes NF4 in fused CUDA kernels. On a CPU it dequantizes in
    software on every forward and backward, and the model that fits on a CPU is small enough
    for a full-precision base anyway. Measured on the embedded SmolLM2-135M, 2 cores, same
    batches (docs/model-quality.md): lora trains at 3.02 examples/s vs 2.45 for qlora (1.23x),
    and scores at least as well on the test split (0.429 vs 0.397 after the same 2 epochs).
    """
    if setting != "auto":
        return setting
    return "qlora" if has_cuda() else "lora"


def use_unsloth(backend: str) -> bool:
    import importlib.util

    available = importlib.util.find_spec("unsloth") is not None and has_cuda()
    if backend == "unsloth" and not available:
        raise RuntimeError("train.backend=unsloth needs a CUDA GPU and `pip install unsloth`; use backend: auto or transformers")
    return backend == "unsloth" or (backend == "auto" and available)


def use_padding_free(setting: str, method: str = "lora") -> bool:
    """Padding-free batches: the rows of a micro-batch are laid end to end in one sequence
    and position_ids restart at 0 for each. That is exact (each row attends only to itself)
    with FlashAttention's varlen kernel, and with SDPA/eager too: given position_ids and no
    attention mask, transformers builds a block-diagonal mask (packed-sequence detection;
    tests/test_train.py checks the logits match row by row on the pinned version).
    auto: on a CUDA GPU only, so CPU training stays exactly as measured in docs/model-quality.md.
    Never for prompt tuning: PEFT drops position_ids there, and the rows would attend to each other."""
    if method == "prompt_tuning":
        if setting == "true":
            raise ValueError("train.packing=true: prompt tuning cannot train padding-free (PEFT ignores position_ids); "
                             "use packing: auto or false")
        return False
    if setting != "auto":
        return setting == "true"
    return has_cuda()


def attention_for(padding_free: bool) -> str | None:
    """FlashAttention-2 when padding-free on CUDA and flash_attn is installed (varlen: linear in tokens).
    Eager on a CPU: the same math as SDPA, but SDPA's CPU flash kernel is slow in backward (13 ms per layer
    call vs 1.4 ms forward at batch 8 x 95 tokens; eager made a step 1.14x faster, docs/model-quality.md).
    Otherwise the model's default (SDPA, whose block-diagonal mask is quadratic in a micro-batch's tokens)."""
    import importlib.util

    if not has_cuda():
        return "eager"
    if padding_free and importlib.util.find_spec("flash_attn") is not None:
        return "flash_attention_2"
    return None


def use_checkpointing(setting: str) -> bool:
    """train.gradient_checkpointing: auto = on with a CUDA GPU, off on a CPU.

    On a GPU memory is what limits the batch and the model size, so recomputing activations is
    worth its ~30% of a step. On a CPU the activations of SmolLM2-135M at batch 8 are a few hundred
    MB, and recomputing them made a step 1.8x slower (docs/model-quality.md, item 14)."""
    if setting != "auto":
        return setting == "true"
    return has_cuda()


def gpu_memory_gb() -> float | None:
    if not has_cuda():
        return None
    import torch

    return torch.cuda.get_device_properties(0).total_memory / 2**30


def resolve_batch_tokens(setting: str | int, padding_free: bool, gpu_gb: float | None, max_seq_length: int) -> int:
    """train.batch_tokens -> token budget of one micro-batch (0 = rows per batch, as on a CPU).

    On a GPU, a step of 8 rows (~600 tokens) costs ~0.75 s whatever the model size (H200:
    701 tokens/s for an 8B shape, 770 for 135M; issue 14): launch overhead, not math. Filling
    each micro-batch to a token budget makes every step carry thousands of tokens. auto: only
    padding-free (else padding, not data, would fill the budget), 16,384 tokens on cards with
    >= 40 GB, 8,192 on >= 20 GB, else 4,096; never below max_seq_length, so any row fits.
    The budgets follow activation memory with gradient checkpointing (~0.3 MB per token for
    an 8B shape), not a measurement: benchmarks/gpu_train.py measures them.
    """
    if str(setting) == "auto":
        if not padding_free or gpu_gb is None:
            return 0
        budget = 16384 if gpu_gb >= 40 else 8192 if gpu_gb >= 20 else 4096
    else:
        budget = int(setting)
        if budget and not padding_free:
            raise ValueError("train.batch_tokens needs padding-free batches (train.packing: true, or auto on a CUDA GPU)")
    return max(budget, max_seq_length) if budget else 0


@dataclass
class TokenBudgetPlan:
    """How a token budget changes the optimization, so a run stays comparable to rows-per-step training."""

    budget: int
    rows_per_step: float  # expected rows in one optimizer step (accumulation x rows per packed micro-batch)
    scale: float  # rows_per_step / (per_device_train_batch_size x gradient_accumulation_steps)
    learning_rate: float  # x sqrt(scale): the square-root rule for Adam-type optimizers (Malladi et al., 2022)
    warmup_steps: int  # same rows warmed up as configured
    eval_steps: int  # same rows between evaluations / checkpoints as configured
    save_steps: int


def token_budget_plan(lengths: list[int], budget: int, batch: int, accum: int, cfg: TrainConfig) -> TokenBudgetPlan:
    """Rows per step when micro-batches are packed (best-fit decreasing) up to `budget` tokens."""
    rows_per_bin = max(1.0, budget / (sum(lengths) / len(lengths)))
    rows_per_step = min(float(len(lengths)), rows_per_bin * accum)  # ~full bins: best-fit leaves little space
    scale = max(1.0, rows_per_step / (batch * accum))

    def fewer(steps: int) -> int:
        return max(1, round(steps / scale)) if steps > 0 else steps

    return TokenBudgetPlan(budget=budget, rows_per_step=rows_per_step, scale=scale,
                           learning_rate=cfg.learning_rate * math.sqrt(scale), warmup_steps=round(cfg.warmup_steps / scale),
                           eval_steps=fewer(cfg.eval_steps), save_steps=fewer(cfg.save_steps))


# ---------------------------------------------------------------------------
# Data

def file_sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def run_key(params: Params, data_dir: Path) -> str:
    """Same data + same learning-relevant params -> same key -> resume instead of restart."""
    t = as_dict(params)["train"]
    for cosmetic in ("logging_steps", "output_dir", "checkpoint_dir", "save_total_limit", "lm_head_chunk",
                     "gradient_checkpointing", "gradient_checkpointing_fraction"):
        t.pop(cosmetic)
    blob = {
        "data": {f: file_sha256(data_dir / f) for f in SPLIT_FILES[:2]},
        "base_model": params.base_model, "template": params.template, "max_seq_length": params.max_seq_length,
        "train": t,
    }
    return hashlib.sha256(json.dumps(blob, sort_keys=True).encode()).hexdigest()[:16]


def build_dataset(path: Path, tokenizer: Any, params: Params, examples: list[Any] | None = None) -> Any:
    """Pre-tokenized dataset: input_ids, completion_mask (loss on answers only). `examples`: path already read."""
    from datasets import Dataset

    examples = read_examples(path) if examples is None else examples
    rows = [encode_example(e, tokenizer, params.template, params.max_seq_length) for e in examples]
    return Dataset.from_list(rows) if rows else None


def stratified(params: Params) -> bool:
    """Are the training batches class-stratified (train.balanced_batches, classification data)?"""
    return params.train.balanced_batches and params.data.task == "classification"


def stratified_order(labels: list[str], epochs: int, seed: int) -> list[int]:
    """Indices for `epochs` passes, each a new shuffle in which every class is spread evenly.

    Example i of class c (rank r_i among the c examples, after a seeded shuffle) goes to
    position (r_i + u_i) / n_c of the epoch, u_i uniform in [0, 1): every stretch of the
    order, so every batch, holds the classes in their overall proportions (8 rows of three
    balanced classes: 3/3/2). With random batches of 8 a class's share swings by +-17%
    from batch to batch, and on a small model that noise in "which label is likelier
    overall" drowned the review-dependent signal for 100+ steps (docs/model-quality.md).
    """
    import random

    rng = random.Random(seed)
    by_class: dict[str, list[int]] = {}
    for i, label in enumerate(labels):
        by_class.setdefault(label, []).append(i)
    order: list[int] = []
    for _ in range(epochs):
        keyed = []
        for members in by_class.values():
            members = members[:]
            rng.shuffle(members)
            keyed += [((r + rng.random()) / len(members), i) for r, i in enumerate(members)]
        order += [i for _, i in sorted(keyed)]
    return order


# ---------------------------------------------------------------------------
# Model

def load_for_training(params: Params, bf16: bool) -> tuple[Any, Any]:
    """(model ready for the trainer, tokenizer) for params.train.method."""
    import torch
    from transformers import AutoModelForCausalLM

    from ftlib.core.models import load_tokenizer, resolve
    from ftlib.core.security import check_model_dir

    cfg = params.train
    path = resolve(params.base_model)
    check_model_dir(path, params.trust_remote_code, params.allow_pickle_weights)
    tokenizer = load_tokenizer(params.base_model, params.trust_remote_code)
    if use_unsloth(cfg.backend):
        return _load_unsloth(params, path, bf16), tokenizer

    kwargs: dict[str, Any] = {"use_safetensors": None if params.allow_pickle_weights else True,  # None: else the pickle
                              "trust_remote_code": params.trust_remote_code}
    if cfg.method == "qlora":
        from transformers import BitsAndBytesConfig

        compute = torch.bfloat16 if bf16 else torch.float32
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=compute,
        )
        kwargs["dtype"] = compute
    else:
        # master weights in fp32; bf16 autocast does the math. Frozen LoRA base weights in bf16 made a CPU training
        # step 1.09x faster but every validation pass 2.5x slower (fp32 adapter outputs meet bf16 ones): a loss here.
        kwargs["dtype"] = torch.float32
    attention = attention_for(use_padding_free(cfg.packing, cfg.method))
    if attention:
        kwargs["attn_implementation"] = attention
    model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    model.config.use_cache = False

    if use_checkpointing(cfg.gradient_checkpointing):
        _checkpoint_first_layers(model, cfg.gradient_checkpointing_fraction)
    if cfg.method == "full":
        return model, tokenizer
    from peft import (
        LoraConfig,
        PromptTuningConfig,
        PromptTuningInit,
        TaskType,
        get_peft_model,
    )

    if cfg.method == "qlora":
        from peft import prepare_model_for_kbit_training

        # fp32 norms/embeddings (stability); checkpointing is set up above, non-reentrant
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    if cfg.method == "prompt_tuning":
        peft_config = PromptTuningConfig(
            task_type=TaskType.CAUSAL_LM, num_virtual_tokens=cfg.num_virtual_tokens,
            prompt_tuning_init=PromptTuningInit.TEXT, tokenizer_name_or_path=path,
            prompt_tuning_init_text="Read the request and answer it exactly in the expected format.",
        )
    else:
        peft_config = LoraConfig(
            task_type=TaskType.CAUSAL_LM, r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
            target_modules=list(cfg.target_modules), bias="none", use_rslora=cfg.use_rslora, use_dora=cfg.use_dora,
            layers_to_transform=top_layers(model.config.num_hidden_layers, cfg.lora_layers),
        )
    return get_peft_model(model, peft_config), tokenizer


def top_layers(n_layers: int, top: int) -> list[int] | None:
    """Indices of the top `top` decoder layers (None = all): the lower layers stay frozen and backward skips them."""
    if top <= 0 or top >= n_layers:
        return None
    return list(range(n_layers - top, n_layers))


def _load_unsloth(params: Params, path: str, bf16: bool) -> Any:  # pragma: no cover - needs a CUDA GPU
    """The course notes' recommended path (section 4.3) when Unsloth and a GPU are present."""
    import torch
    from unsloth import FastLanguageModel

    cfg = params.train
    model, _ = FastLanguageModel.from_pretrained(
        model_name=path, max_seq_length=params.max_seq_length, load_in_4bit=cfg.method == "qlora",
        dtype=torch.bfloat16 if bf16 else None, full_finetuning=cfg.method == "full",
    )
    if cfg.method in ("qlora", "lora"):
        model = FastLanguageModel.get_peft_model(
            model, r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
            target_modules=list(cfg.target_modules), bias="none", use_gradient_checkpointing="unsloth",
            random_state=cfg.seed, use_rslora=cfg.use_rslora,
            layers_to_transform=top_layers(model.config.num_hidden_layers, cfg.lora_layers),
        )
    return model


# ---------------------------------------------------------------------------
# Trainer

def best_metric(params: Params) -> str:
    """The validation metric that picks the checkpoint and stops early: train.metric_for_best_model,
    except that label metrics need classification data (anything else falls back to the loss)."""
    metric = params.train.metric_for_best_model
    return metric if metric == "loss" or params.data.task == "classification" else "loss"


def _callbacks(params: Params, tracker: Tracker, extra: list[Any], eval_examples: list[Any], tokenizer: Any) -> list[Any]:
    from transformers import EarlyStoppingCallback

    cbs: list[Any] = [tracker]
    cfg = params.train
    if eval_examples and params.data.task == "classification":
        # before EarlyStopping: it reads the metrics this callback adds
        cbs.append(LabelMetrics(eval_examples, list(params.data.labels), tokenizer, params.template))
    if eval_examples and cfg.eval_steps > 0 and cfg.early_stopping_patience > 0 and cfg.load_best_model_at_end:
        cbs.append(EarlyStoppingCallback(early_stopping_patience=params.train.early_stopping_patience))
    return cbs + extra


class LabelMetrics(TrainerCallback):
    """Validation accuracy, macro-F1 and lowest class recall of the label the model answers with.

    The gate scores greedy generation on the test split (`ftlib evaluate`); eval loss is a
    poor proxy for it here, because most answer tokens are format (the rest of the label
    word, EOS) and the decision sits in one token. So at every evaluation the model answers
    the validation prompts greedily, and the metrics go into the Trainer's metrics (as
    eval_accuracy, eval_f1_macro, eval_min_recall) before checkpoint selection and early
    stopping read them, and into MLflow and the loss CSV. When the labels start with distinct
    tokens, two forward passes tell which label greedy decoding writes (`HFPredictor.greedy_labels`,
    instead of generating label + 8 tokens); otherwise the answers are generated.
    """

    def __init__(self, examples: list[Any], labels: list[str], tokenizer: Any, template: str, batch_size: int = 16):
        self.examples, self.labels, self.tokenizer, self.template = examples, labels, tokenizer, template
        self.batch_size = batch_size
        from ftlib.serving.generate import label_budget

        self.max_new = label_budget(tokenizer, labels)

    def score(self, model: Any, bf16: bool = False) -> dict[str, float]:
        import torch

        from ftlib.stages.evaluate import classification_metrics
        from ftlib.serving.generate import HFPredictor, extract_label

        was_training = model.training
        model.eval()
        predictor = HFPredictor(model, self.tokenizer, self.template)
        prompts = [e.prompt_messages for e in self.examples]
        try:  # under the bf16 autocast training and the eval loss use (2x faster on a CPU with AMX)
            with torch.no_grad(), torch.autocast(model.device.type, dtype=torch.bfloat16, enabled=bf16):
                predicted = predictor.greedy_labels(prompts, self.labels, batch_size=self.batch_size)
                if predicted is None:
                    answers = predictor.generate(prompts, max_new_tokens=self.max_new, batch_size=self.batch_size)
                    predicted = [extract_label(a.text, self.labels) for a in answers]
        finally:
            model.train(was_training)
        m = classification_metrics([e.output.strip() for e in self.examples], predicted, self.labels)
        recalls = [m["per_class"][label]["recall"] for label in self.labels if label in m["per_class"]]
        return {"eval_accuracy": m["accuracy"], "eval_f1_macro": m["f1_macro"], "eval_min_recall": min(recalls, default=0.0)}

    def on_evaluate(self, args, state, control, model=None, metrics=None, **kw):
        import mlflow

        scores = self.score(model, bf16=args.bf16)
        if metrics is not None:
            metrics.update(scores)
        state.log_history.append({**scores, "step": state.global_step})
        log.info(f"step {state.global_step}: validation " + ", ".join(f"{k[5:]} {v:.3f}" for k, v in scores.items()))
        if mlflow.active_run() is not None:
            mlflow.log_metrics(scores, step=state.global_step)


def sft_config(params: Params, ckpt_dir: Path, batch: int, accum: int, bf16: bool, has_eval: bool,
               max_steps: int | None = None, plan: TokenBudgetPlan | None = None) -> Any:
    """TRL's config for this run. With a token-budget `plan` (GPU), each micro-batch is one packed
    row of up to plan.budget tokens, and lr / warmup / eval / save steps follow the plan."""
    from trl import SFTConfig

    cfg = params.train
    cuda = has_cuda()
    eval_every = plan.eval_steps if plan else cfg.eval_steps
    eval_steps = eval_every if has_eval and eval_every > 0 else None
    best = bool(eval_steps) and cfg.load_best_model_at_end
    save_every = plan.save_steps if plan else cfg.save_steps
    # load_best_model_at_end needs a checkpoint at every evaluation
    save_steps = save_every if not best else max(eval_steps, (save_every // eval_steps) * eval_steps)
    padding_free = use_padding_free(cfg.packing, cfg.method)
    import importlib.util

    return SFTConfig(
        output_dir=str(ckpt_dir),
        run_name=f"train-{ckpt_dir.name}",
        per_device_train_batch_size=1 if plan else batch,
        per_device_eval_batch_size=batch,
        gradient_accumulation_steps=accum,
        learning_rate=plan.learning_rate if plan else cfg.learning_rate,
        lr_scheduler_type=cfg.lr_scheduler_type,
        warmup_steps=plan.warmup_steps if plan else cfg.warmup_steps,
        weight_decay=cfg.weight_decay,
        max_grad_norm=cfg.max_grad_norm,
        seed=cfg.seed,
        data_seed=cfg.seed,
        num_train_epochs=cfg.num_train_epochs,
        max_steps=cfg.max_steps if max_steps is None else max_steps,
        logging_steps=cfg.logging_steps,
        eval_strategy="steps" if eval_steps else "no",
        # Evaluation needs the loss only; otherwise TRL reruns every eval batch for full
        # (batch x seq x 49k) logits, which was the run's memory peak (+300-500 MB per eval).
        prediction_loss_only=True,
        eval_steps=eval_steps,
        save_strategy="steps",
        save_steps=save_steps,
        save_total_limit=cfg.save_total_limit,
        load_best_model_at_end=best,
        metric_for_best_model=f"eval_{best_metric(params)}" if best else None,
        greater_is_better=best_metric(params) != "loss" if best else None,
        bf16=bf16,
        # load_for_training set checkpointing up (train.gradient_checkpointing[_fraction]); TRL's default (on,
        # every layer) would redo it over ours, so the off switch and the fraction never took effect
        activation_checkpointing=False,
        use_cpu=not cuda,
        optim="adamw_8bit" if cuda else "adamw_torch",
        use_liger_kernel=cuda and importlib.util.find_spec("liger_kernel") is not None,
        max_length=plan.budget if plan else params.max_seq_length,
        completion_only_loss=True,
        padding_free=padding_free,
        # token budget: best-fit-decreasing bins of whole rows (every row fits: budget >= max_seq_length);
        # evaluation stays row-batched, so its loss and label metrics are the same as without a budget
        packing=plan is not None,
        packing_strategy="bfd",
        eval_packing=False,
        # stratified batches come pre-ordered (stratified_order); otherwise length-grouped or random
        train_sampling_strategy="sequential" if stratified(params) and not plan else (
            "group_by_length" if cfg.group_by_length and not padding_free else "random"),
        report_to=["mlflow"],
        dataloader_num_workers=0,
        disable_tqdm=False,
    )


class Tracker(TrainerCallback):
    """Throughput, peak memory and ftlib params into the MLflow run the Trainer opened."""

    def __init__(self, params: Params, key: str, data_dir: Path, rows_per_step: float | None = None):
        self.params, self.key, self.data_dir = params, key, data_dir
        self.rows_per_step = rows_per_step  # packed micro-batches (token budget): expected rows, not the batch size
        self.t0 = self.t_last = time.perf_counter()
        self.step_last = 0
        self.run_id: str | None = None
        self.history: list[dict[str, float]] = []  # step, examples_per_s, peak_rss_mb
        self.train_seconds = 0.0
        self.lines: ProgressLines | None = None  # off a terminal: progress as log lines (Airflow, CI)

    def on_train_begin(self, args, state, control, **kw):
        import mlflow

        if not on_terminal():
            self.lines = ProgressLines(log, "training", state.max_steps)
        run = mlflow.active_run()
        if run is None:
            return
        self.run_id = run.info.run_id
        flat = {f"ftlib.{k}": v for k, v in flatten(as_dict(self.params)).items()}
        existing = set(run.data.params) if run.data.params else set()
        mlflow.log_params({k: str(v)[:500] for k, v in flat.items() if k not in existing})
        mlflow.set_tags({"ftlib.run_key": self.key, "ftlib.stage": "train", **{
            f"ftlib.data.{f}": file_sha256(self.data_dir / f)[:16] for f in SPLIT_FILES[:2]}})
        self.t_last, self.step_last = time.perf_counter(), state.global_step

    def on_evaluate(self, args, state, control, **kw):
        release_free_memory()
        self.t_last = time.perf_counter()  # throughput counts training time only

    on_save = on_evaluate

    def on_log(self, args, state, control, logs=None, **kw):
        import mlflow

        now = time.perf_counter()
        steps = state.global_step - self.step_last
        if logs is None or "loss" not in logs or steps <= 0:
            return
        per_step = self.rows_per_step or args.per_device_train_batch_size * args.gradient_accumulation_steps
        self.train_seconds += now - self.t_last
        metrics = {"examples_per_s": steps * per_step / (now - self.t_last), "peak_rss_mb": peak_rss_mb()}
        if has_cuda():
            import torch

            metrics["peak_gpu_mb"] = torch.cuda.max_memory_allocated() / 2**20
        logs.update({k: round(v, 3) for k, v in metrics.items()})  # shown in the progress log
        if self.lines is not None:
            self.lines.what = f"training (loss {float(logs['loss']):.3f}, {metrics['examples_per_s']:.1f} examples/s) step"
            self.lines.done = state.global_step - steps  # the Trainer's count (a resumed run starts mid-way)
            self.lines(steps)
        self.history.append({"step": state.global_step, **metrics})
        if mlflow.active_run() is not None:
            mlflow.log_metrics(metrics, step=state.global_step)
        self.t_last, self.step_last = now, state.global_step


def release_free_memory() -> None:
    """Hand memory freed by evaluation/checkpointing back to the OS (glibc malloc_trim).

    Without it, evaluation's differently sized tensors fragment the heap and training's
    peak RSS creeps up ~300 MB after the first evaluation (measured on SmolLM2-135M).
    """
    import ctypes
    import ctypes.util

    try:
        ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc (macOS, musl): nothing to do
        pass


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _checkpoint_first_layers(model: Any, fraction: float) -> None:
    """Gradient checkpointing (non-reentrant: no input-grad hooks needed) on the first ceil(fraction x n) decoder layers only.

    Recomputing every layer cost ~40% of a QLoRA step here; each layer left out costs
    its activations (~50 MB at batch 8 x 100 tokens on SmolLM2-135M) instead.
    """
    enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable  # renamed in 5.x
    enable({"use_reentrant": False})
    layers = [m for m in model.modules() if hasattr(m, "gradient_checkpointing") and type(m).__name__.endswith("DecoderLayer")]
    keep = math.ceil(max(0.0, min(1.0, fraction)) * len(layers))
    for i, layer in enumerate(layers):
        layer.gradient_checkpointing = i < keep


def _tune_lm_head(tokens: int) -> None:
    """Two fixes to TRL's fused LM head (log-probs without materializing all logits) on CPU.

    - It scores only the positions that carry a label on Triton devices, but every position
      elsewhere (to keep tile shapes static for compilers). On a CPU there is nothing to
      recompile, and with answer-only loss ~95% of positions are masked: score just the
      answer tokens. Same loss, exactly.
    - Its chunk (32,768 positions) holds a whole CPU batch of 49k-wide rows at once; a
      smaller chunk bounds that memory on long answers.
    """
    import trl.trainer.utils as trl_utils

    if hasattr(trl_utils, "_CHUNKED_LOGPROB_CHUNK_SIZE") and tokens > 0:
        trl_utils._CHUNKED_LOGPROB_CHUNK_SIZE = tokens
    triton = getattr(trl_utils, "_use_triton", None)
    if triton is not None and not getattr(triton, "ftlib_compact", False):
        def compact(device: Any) -> bool:
            return device.type == "cpu" or triton(device)

        compact.ftlib_compact = True
        trl_utils._use_triton = compact


def _run_exists(run_id: str) -> bool:
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    try:
        MlflowClient().get_run(run_id)
        return True
    except MlflowException:
        return False


# ---------------------------------------------------------------------------
# Checkpoints

def last_good_checkpoint(ckpt_dir: Path) -> str | None:
    """Newest checkpoint that was written completely, else None.

    A process killed while saving leaves a checkpoint without trainer_state.json (the
    Trainer writes it last) or without weights; a bad disk or copy leaves truncated or
    corrupt weights. Such a directory is renamed to `partial-checkpoint-N` -- kept for
    inspection, invisible to resume and rotation -- and the previous good checkpoint is used.
    """
    found = sorted(ckpt_dir.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]) if p.name.split("-")[1].isdigit() else -1)
    for ckpt in reversed(found):
        state = ckpt / "trainer_state.json"
        weights = list(ckpt.glob("*.safetensors"))
        try:
            ok = bool(weights) and all(map(_safetensors_whole, weights)) and json.loads(state.read_text()).get("global_step") is not None
        except (OSError, ValueError):
            ok = False
        if ok:
            return str(ckpt)
        log.warning(f"skipping incomplete or corrupt checkpoint {ckpt} (killed while saving?)")
        ckpt.rename(ckpt.with_name("partial-" + ckpt.name))
    return None


def _safetensors_whole(path: Path) -> bool:
    """The header parses and every tensor's bytes are in the file (cheap: reads the header only)."""
    with path.open("rb") as f:
        head = f.read(8)
        if len(head) < 8:
            return False
        n = int.from_bytes(head, "little")
        header = json.loads(f.read(n)) if 0 < n < 100_000_000 else None
    try:
        end = max((int(t["data_offsets"][1]) for k, t in header.items() if k != "__metadata__"), default=0)
    except (AttributeError, KeyError, TypeError, IndexError, ValueError):  # not a safetensors header
        return False
    return path.stat().st_size >= 8 + n + end


def _finished(ckpt: str) -> bool:
    """Did the run that wrote this checkpoint reach its last step (a rerun after success)?"""
    state = json.loads((Path(ckpt) / "trainer_state.json").read_text())
    return 0 < state.get("max_steps", 0) <= state.get("global_step", 0)


def _load_finished(trainer: Any, ckpt: str) -> None:
    from transformers import TrainerState

    trainer.state = TrainerState.load_from_json(str(Path(ckpt) / "trainer_state.json"))
    best = trainer.state.best_model_checkpoint
    source = best if best and Path(best).is_dir() and trainer.args.load_best_model_at_end else ckpt
    log.info(f"{ckpt} already finished at step {trainer.state.global_step}: loading {source} instead of training")
    trainer._load_from_checkpoint(source)


# ---------------------------------------------------------------------------
# The stage

def train(params: Params, data_dir: str | Path = "data/splits", reports_dir: str | Path | None = "reports",
          extra_callbacks: list[Any] | None = None, compare_on_test: bool = False,
          progress: Callable[[int], None] | None = None) -> TrainResult:
    """Fine-tune params.base_model on data_dir/train.jsonl; write params.train.output_dir, and with a
    reports_dir train_loss.csv and train_metrics.json. compare_on_test (classification data with a
    test.jsonl): also score the base and the fine-tuned model on it, into the summary and the MLflow run;
    `progress` gets the number of test examples just scored."""
    import torch
    from trl import SFTTrainer

    data_dir = Path(data_dir)
    if params.train.method == "auto":  # decided once, here: the run key, the adapter and MLflow record the method used
        method = resolve_method("auto")
        log.info(f"train.method=auto -> {method} ({'CUDA GPU' if method == 'qlora' else 'no CUDA GPU'})")
        params = dataclasses.replace(params, train=dataclasses.replace(params.train, method=method))
    cfg = params.train
    for f in SPLIT_FILES[:2]:
        if not (data_dir / f).is_file():
            raise FileNotFoundError(f"{data_dir / f}: missing; run `ftlib split` (or `dvc repro split`) first")
    torch.manual_seed(cfg.seed)
    _tune_lm_head(cfg.lm_head_chunk)
    setup_tracking()
    key = run_key(params, data_dir)
    ckpt_dir = Path(cfg.checkpoint_dir) / key
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    run_file = ckpt_dir / "mlflow_run_id"
    if run_file.is_file() and not _run_exists(run_file.read_text().strip()):
        run_file.unlink()  # the store was reset or MLFLOW_TRACKING_URI changed: start a new run
    if run_file.is_file():  # a retry continues the same MLflow run
        os.environ["MLFLOW_RUN_ID"] = run_file.read_text().strip()
    bf16 = use_bf16(cfg.bf16)
    batch, accum = cfg.per_device_train_batch_size, cfg.gradient_accumulation_steps
    budget = resolve_batch_tokens(cfg.batch_tokens, use_padding_free(cfg.packing, cfg.method), gpu_memory_gb(), params.max_seq_length)
    plan: TokenBudgetPlan | None = None
    backoffs: list[dict[str, int]] = []
    first_resume = last_good_checkpoint(ckpt_dir)
    t0 = time.perf_counter()
    reloaded = False
    while True:
        train_examples, eval_examples = _read_split(data_dir / "train.jsonl"), _read_split(data_dir / "validation.jsonl")
        model, tokenizer = load_for_training(params, bf16)
        train_ds = build_dataset(data_dir / "train.jsonl", tokenizer, params, train_examples)
        if train_ds is None:
            raise InvalidData(f"{data_dir / 'train.jsonl'}: no examples to train on")
        steps = None
        if budget:  # GPU: micro-batches packed to a token budget; big batches hold every class in proportion anyway
            plan = token_budget_plan([len(ids) for ids in train_ds["input_ids"]], budget, batch, accum, cfg)
            log.info(f"token budget {budget} per micro-batch x {accum}: ~{plan.rows_per_step:.0f} rows per step "
                  f"({plan.scale:.1f}x {batch * accum}), learning rate {plan.learning_rate:.3g} (x sqrt), "
                  f"eval/save every {plan.eval_steps}/{plan.save_steps} steps")
        elif stratified(params):  # every pass pre-ordered so each batch holds every class; the sampler just reads in order
            n, per_step = len(train_ds), batch * accum
            steps = cfg.max_steps if cfg.max_steps > 0 else max(1, math.ceil(cfg.num_train_epochs * n / per_step))
            labels = [e.output.strip() for e in train_examples]
            train_ds = train_ds.select(stratified_order(labels, math.ceil(steps * per_step / n), cfg.seed))
        eval_ds = build_dataset(data_dir / "validation.jsonl", tokenizer, params, eval_examples)
        tracker = Tracker(params, key, data_dir, rows_per_step=plan.rows_per_step if plan else None)
        trainer = SFTTrainer(
            model=model, args=sft_config(params, ckpt_dir, batch, accum, bf16, eval_ds is not None, steps, plan),
            train_dataset=train_ds, eval_dataset=eval_ds, processing_class=tokenizer,
            callbacks=_callbacks(params, tracker, extra_callbacks or [], eval_examples, tokenizer),
        )
        if not on_terminal():  # line mode: the Tracker logs progress lines; these would print a dict per step
            from transformers.trainer_callback import PrinterCallback, ProgressCallback

            trainer.remove_callback(PrinterCallback)
            trainer.remove_callback(ProgressCallback)
        resume = last_good_checkpoint(ckpt_dir)
        if resume and _finished(resume):
            # The Trainer would run one more step when resumed mid-epoch at max_steps: load instead.
            _load_finished(trainer, resume)
            reloaded = True
            break
        if resume:
            log.info(f"resuming from {resume}")
        try:
            trainer.train(resume_from_checkpoint=resume)
            break
        except torch.OutOfMemoryError:
            if budget:  # same tokens per step: half the budget, twice the accumulation
                if budget // 2 < params.max_seq_length:
                    raise
                backoffs.append({"from_batch_tokens": budget, "from_accum": accum, "to_batch_tokens": budget // 2,
                                 "to_accum": accum * 2})
                log.warning(f"out of memory at {budget} tokens per micro-batch: retrying with {budget // 2} x accumulation "
                            f"{accum * 2}")
                budget, accum = budget // 2, accum * 2
            else:
                if batch == 1:
                    raise
                # Course notes 8.1: smaller micro-batch, more accumulation; the effective batch is unchanged.
                backoffs.append({"from_batch": batch, "from_accum": accum, "to_batch": batch // 2, "to_accum": accum * 2})
                log.warning(f"out of memory at batch {batch}: retrying with batch {batch // 2} x accumulation {accum * 2}")
                batch, accum = batch // 2, accum * 2
            del trainer, model
            if has_cuda():
                torch.cuda.empty_cache()
    stats_file = ckpt_dir / "train_stats.json"
    if reloaded:  # nothing was trained now: report the figures of the run that trained it, if recorded
        stats = json.loads(stats_file.read_text()) if stats_file.is_file() else {}
    else:
        stats = {"seconds": round(time.perf_counter() - t0, 1), "train_seconds": round(tracker.train_seconds, 1),
                 "examples_per_s": _throughput(tracker.history)}
        stats_file.write_text(json.dumps(stats) + "\n")
    if tracker.run_id:
        run_file.write_text(tracker.run_id)

    final_metrics = {}
    if eval_ds is not None:
        final_metrics = kept_metrics(trainer) or {k: float(v) for k, v in trainer.evaluate().items() if isinstance(v, (int, float))}
    state = trainer.state
    result = TrainResult(
        output_dir=cfg.output_dir, run_key=key, method=cfg.method, global_step=state.global_step, resumed_from=first_resume,
        train_examples=len(train_ds), seconds=stats.get("seconds"), train_seconds=stats.get("train_seconds"),
        examples_per_s=stats.get("examples_per_s"), metrics=final_metrics,
        oom_backoffs=backoffs,
        token_budget=None if plan is None else {k: round(v, 6) if isinstance(v, float) else v
                                                for k, v in dataclasses.asdict(plan).items()},
        # a finished run loaded from its checkpoint keeps the MLflow run it was trained in
        mlflow_run_id=tracker.run_id or (run_file.read_text().strip() if run_file.is_file() else None),
    )
    _save(trainer, tokenizer, params, result, data_dir)
    _end_mlflow_run(result)
    m = result.metrics
    result.summary = {
        "method": result.method, "global_step": result.global_step, "train_examples_per_s": result.examples_per_s,
        "train_seconds": result.seconds, "eval_loss": m.get("eval_loss"),
        **{k: m[f"eval_{k}"] for k in ("accuracy", "f1_macro", "min_recall") if f"eval_{k}" in m},
        "run_key": result.run_key, "mlflow_run_id": result.mlflow_run_id}
    test = data_dir / "test.jsonl"
    if compare_on_test and params.data.task == "classification" and test.is_file():
        scores = base_vs_fine_tuned(params, test, result.output_dir, progress)
        result.summary |= {"base_test_accuracy": round(scores["base"]["accuracy"], 4),
                           "test_accuracy": round(scores["fine-tuned"]["accuracy"], 4), "test_n": scores["base"]["n"],
                           "base_off_label": scores["base"]["off_label"], "off_label": scores["fine-tuned"]["off_label"]}
        if result.mlflow_run_id:
            import mlflow

            with mlflow.start_run(run_id=result.mlflow_run_id):
                mlflow.log_metrics({k: result.summary[k] for k in ("base_test_accuracy", "test_accuracy")})
    if reports_dir is not None:
        write_loss_csv(state.log_history + tracker.history, Path(reports_dir) / "train_loss.csv")
        write_json(Path(reports_dir) / "train_metrics.json", result.summary)
    return result


def kept_metrics(trainer: Any) -> dict[str, float] | None:
    """Validation metrics of the checkpoint load_best_model_at_end kept, from the log of its evaluation:
    evaluating it again would repeat the same numbers for the price of a validation pass."""
    step = trainer.state.best_global_step
    if not (trainer.args.load_best_model_at_end and step):
        return None
    metrics = {k: float(v) for entry in trainer.state.log_history if entry.get("step") == step
               for k, v in entry.items() if k.startswith("eval_") and isinstance(v, (int, float))}
    return metrics if "eval_loss" in metrics else None


def _read_split(path: Path) -> list[Any]:
    """The examples of a split file; a row that cannot become one refuses the run (InvalidData: CLI exit 1)."""
    try:
        return read_examples(path)
    except ValueError as e:
        raise InvalidData(str(e), str(e).splitlines(), path) from e


def base_vs_fine_tuned(params: Params, test: Path, adapter: str, progress: Callable[[int], None] | None = None) -> dict:
    """Test-split accuracy of the base model and of the fine-tuned one (classification data).

    A PEFT adapter carries its base: the base is scored with the adapter switched off,
    so the model is loaded once.
    """
    from ftlib.core.models import load_model
    from ftlib.serving.generate import classification_accuracy

    examples = read_examples(test)

    def score(model: Any, tok: Any) -> dict:
        return classification_accuracy(model, tok, examples, params.data.labels, params.template, progress=progress)

    tuned, tok = load_model(adapter, allow_pickle_weights=params.allow_pickle_weights)
    scores = {"fine-tuned": score(tuned, tok)}
    if hasattr(tuned, "disable_adapter"):
        with tuned.disable_adapter():
            scores["base"] = score(tuned, tok)
    else:  # full fine-tuning wrote a whole model
        del tuned
        scores["base"] = score(*load_model(params.base_model, allow_pickle_weights=params.allow_pickle_weights))
    return scores


def _throughput(history: list[dict[str, float]]) -> float | None:
    """Median examples/s over logged steps (robust to the eval pauses); None when no step was logged."""
    rates = sorted(h["examples_per_s"] for h in history)
    return round(rates[len(rates) // 2], 3) if rates else None


def _save(trainer: Any, tokenizer: Any, params: Params, result: TrainResult, data_dir: Path) -> None:
    """Write the output directory atomically: the previous model stays until the new one is complete."""
    from ftlib.core.atomic import replacing

    if not trainer.is_world_process_zero():  # under `accelerate launch`, rank 0 alone writes the model
        return
    with replacing(params.train.output_dir, "adapter") as tmp:
        _write_output(trainer, tokenizer, params, result, data_dir, tmp)


def _write_output(trainer: Any, tokenizer: Any, params: Params, result: TrainResult, data_dir: Path, tmp: Path) -> None:
    import importlib.metadata as md

    trainer.save_model(str(tmp))
    tokenizer.save_pretrained(str(tmp))
    info = {
        "base_model": params.base_model, "method": params.train.method, "template": params.template,
        "max_seq_length": params.max_seq_length, "labels": params.data.labels if params.data.task == "classification" else [],
        "run_key": result.run_key, "global_step": result.global_step, "metrics": result.metrics,
        "mlflow_run_id": result.mlflow_run_id, "oom_backoffs": result.oom_backoffs, "token_budget": result.token_budget,
        "data": {f: file_sha256(data_dir / f) for f in SPLIT_FILES[:2]},
        "params": as_dict(params),
        "versions": {p: md.version(p) for p in ("torch", "transformers", "trl", "peft", "bitsandbytes")},
    }
    (tmp / "ftlib_train.json").write_text(json.dumps(info, indent=2) + "\n")


CSV_COLUMNS = ["step", "loss", "eval_loss", "eval_accuracy", "eval_f1_macro", "learning_rate", "examples_per_s"]


def write_loss_csv(history: list[dict[str, Any]], path: Path) -> None:
    """step, loss, eval_loss, validation accuracy/F1, learning_rate: one row per logged step, for `dvc plots show`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    rows: dict[int, dict[str, Any]] = {}
    for h in history:
        step = h.get("step")
        if step is None:
            continue
        row = rows.setdefault(step, {"step": step})
        for k in CSV_COLUMNS[1:]:
            if k in h:
                row[k] = h[k]
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_COLUMNS)
        w.writeheader()
        for step in sorted(rows):
            w.writerow(rows[step])


def _end_mlflow_run(result: TrainResult) -> None:
    import mlflow

    if mlflow.active_run() is not None:
        mlflow.log_metrics({"final_" + k: v for k, v in result.metrics.items()})
        mlflow.end_run()
    os.environ.pop("MLFLOW_RUN_ID", None)
