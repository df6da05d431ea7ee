"""Typed view of params.yaml.

A parameter travels params.yaml -> one of these dataclasses -> the stage function
that uses it. `load_params` applies `section.key=value` overrides from the CLI the
way TRL scripts do: YAML first, then the command line.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

Severity = Literal["error", "warning"]


class ConfigError(ValueError):
    """A params file or override that cannot be used (exit code 2)."""


@dataclass
class DataConfig:
    task: Literal["classification", "generation", "code"] = "classification"
    """classification: the output is one of `labels`; generation: free text; code: free text that is Python code."""
    labels: list[str] = field(default_factory=lambda: ["POSITIVO", "NEGATIVO", "NEUTRAL"])
    """The declared label set of a classification dataset."""


@dataclass
class ValidateConfig:
    min_output_chars: int = 5
    """Outputs shorter than this are errors (course notes 3.2: "Output muy corto")."""
    max_line_bytes: int = 1_000_000
    """Lines longer than this are rejected before JSON parsing."""
    duplicates: Severity = "error"
    """Severity of exact duplicate examples."""
    contradictions: Severity = "error"
    """Severity of the same prompt with different outputs."""
    class_balance: Severity = "warning"
    """Severity when the largest class exceeds `max_class_imbalance` x the smallest."""
    max_class_imbalance: float = 3.0
    """Largest class count / smallest class count allowed."""
    data_docs: bool = True
    """Render Great Expectations Data Docs HTML next to report.json."""


@dataclass
class SplitConfig:
    train: float = 0.8
    """Share of examples in train.jsonl."""
    validation: float = 0.1
    """Share of examples in validation.jsonl (early stopping, eval during training)."""
    test: float = 0.1
    """Share of examples in test.jsonl (the accuracy gate scores this one)."""
    seed: int = 3407
    """Salt of the content hash that assigns an example to a split."""


Method = Literal["auto", "qlora", "lora", "full", "prompt_tuning"]
METHODS: tuple[str, ...] = typing.get_args(Method)  # the one list: the dataclass, the check and the DAG form read it
# The three split files every stage reads and writes
SPLITS = ("train", "validation", "test")

LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@dataclass(frozen=True)
class Profile:
    """One switch that changes a whole run consistently: `ftlib run --profile NAME`, the DAG form's `profile`."""

    name: str
    overrides: tuple[str, ...] = ()
    """params overrides applied before the run's own (which win)."""
    root: str = ""
    """Where the run's outputs go instead of the pipeline's (data/splits -> ROOT/data/splits, ...), so the
    DVC-tracked outputs and the adapter the registry's versions came from are never touched; "" = the pipeline's."""
    register: bool = True
    """Whether the gate scores what the run made and may register it."""

    def path(self, default: str) -> str:
        """An output path of the pipeline (as dvc.yaml names it) for this profile."""
        return str(Path(self.root) / default) if self.root else default


SMOKE_ROOT = "runs/smoke"
PROFILES = {
    "full": Profile("full"),
    # Every stage runs for real on the real data and model, each cut to seconds (≤ 5 min on 2 cores through the UI:
    # benchmarks/smoke_run.py): 8 training steps with no validation checks, one GGUF variant (q8_0) benchmarked on 16
    # test rows without the base model. The model it makes is not trained, so nothing is gated or registered.
    "smoke": Profile("smoke", (
        "train.max_steps=8", "train.eval_steps=0", "train.save_steps=8",
        f"train.output_dir={SMOKE_ROOT}/models/adapter", f"train.checkpoint_dir={SMOKE_ROOT}/models/checkpoints",
        "quantize.variants=[q8_0]",
        "benchmark.include_base=false", "benchmark.max_examples=16", "benchmark.latency_examples=2", "benchmark.decode_tokens=8",
        "benchmark.max_new_tokens=8",
    ), SMOKE_ROOT, register=False),
}


def get_profile(name: str | None) -> Profile:
    if not name:
        return PROFILES["full"]
    if name not in PROFILES:
        raise ConfigError(f"profile: one of {', '.join(PROFILES)}; got {name!r}")
    return PROFILES[name]


@dataclass
class TrainConfig:
    method: Method = "auto"
    """qlora: 4-bit NF4 base + LoRA; lora: full-precision base + LoRA; full: every weight; prompt_tuning: soft prompt only;
    auto (default): qlora on a CUDA GPU (the production path), lora on a CPU (measured faster and no worse there:
    ftlib.stages.train.resolve_method)."""
    backend: Literal["auto", "transformers", "unsloth"] = "auto"
    """auto: Unsloth when installed and a CUDA GPU is present, else transformers."""
    lora_r: int = 16
    """LoRA rank (course notes: r=16)."""
    lora_alpha: int = 32
    """LoRA scaling numerator; the update is scaled by alpha/r (course notes: 16; the 135M demo: 32, docs/model-quality.md)."""
    lora_dropout: float = 0.0
    """Dropout on the LoRA path (course notes: 0)."""
    target_modules: list[str] = field(default_factory=lambda: list(LORA_TARGETS))
    """Linear layers that get LoRA adapters (course notes: all attention and MLP projections)."""
    lora_layers: int = 15
    """Adapt only the top N decoder layers (0 = every layer); backward then stops at the lowest adapted layer.
    The 135M demo on a CPU: 15 of 30 (1.2x faster per step, which buys a 2nd epoch: docs/model-quality.md);
    for a 7-8B base on a GPU use 0, as the course notes do."""
    use_rslora: bool = False
    """Rank-stabilized LoRA scaling alpha/sqrt(r)."""
    use_dora: bool = False
    """Weight-decomposed LoRA (DoRA)."""
    num_virtual_tokens: int = 20
    """Soft-prompt length for prompt_tuning."""
    learning_rate: float = 2e-3
    """Peak learning rate (the 135M demo on a CPU: 2e-3; course notes, 7-8B QLoRA: 2e-4; ~2e-5 for full fine-tuning of large models)."""
    lr_scheduler_type: str = "linear"
    """linear (course notes) or cosine (slow convergence, notes 8.3)."""
    warmup_steps: int = 5
    """Linear warmup steps (course notes: 5)."""
    weight_decay: float = 0.01
    """AdamW weight decay (course notes: 0.01)."""
    max_grad_norm: float = 1.0
    """Gradient-norm clipping (notes 8.3)."""
    seed: int = 3407
    """Random seed for init, shuffling and dropout (course notes: 3407)."""
    num_train_epochs: float = 2.0
    """Passes over train.jsonl (ignored when max_steps > 0)."""
    max_steps: int = -1
    """Optimizer steps to run; -1 = use num_train_epochs."""
    per_device_train_batch_size: int = 8
    """Micro-batch size; halved automatically on out-of-memory."""
    gradient_accumulation_steps: int = 1
    """Micro-batches per optimizer step; doubled automatically on out-of-memory."""
    gradient_checkpointing: Literal["auto", "true", "false"] = "auto"
    """Recompute activations in backward: much less memory for more time. auto = on with a CUDA GPU
    (memory is the limit there), off on a CPU (RAM is plentiful; 1.8x faster per step, docs/model-quality.md)."""
    gradient_checkpointing_fraction: float = 1.0
    """Share of decoder layers that recompute (the first ones); the rest keep their activations.
    1.0 = least memory; each layer left out trades ~50 MB (SmolLM2-135M, batch 8) for speed."""
    lm_head_chunk: int = 256
    """Positions TRL's fused LM head projects through the vocabulary at once (memory lever: 49k-wide rows)."""
    bf16: Literal["auto", "true", "false"] = "auto"
    """bf16 autocast: auto = on for CUDA with bf16 and CPUs with AMX/AVX512-BF16."""
    balanced_batches: bool = True
    """Classification data: every batch holds the labels in their overall proportions (a new stratified
    shuffle each epoch); takes precedence over group_by_length. Measured: docs/model-quality.md."""
    group_by_length: bool = True
    """Batch examples of similar length together (less padding) when packing is not possible."""
    packing: Literal["auto", "true", "false"] = "auto"
    """Padding-free batches (rows end to end, each attending only to itself; exact with FlashAttention varlen
    and with SDPA's block-diagonal mask): auto = on a CUDA GPU only, so CPU runs stay as measured."""
    batch_tokens: str = "auto"
    """Token budget of one micro-batch with padding-free batches: rows are packed (best-fit decreasing) up to
    this many tokens, so each step carries thousands of tokens instead of 8 rows (issue 14: a GPU step costs
    ~0.75 s whatever its size). auto = 16,384 / 8,192 / 4,096 tokens for >= 40 / >= 20 / smaller GB of GPU
    memory, off on a CPU; 0 = off (per_device_train_batch_size rows); N >= max_seq_length. The learning rate
    is scaled by sqrt(rows per step / (batch x accumulation)), and warmup/eval/save steps shrink by that
    ratio so they cover the same rows (ftlib.stages.train.token_budget_plan, docs/gpu-training.md)."""
    eval_steps: int = 33
    """Evaluate on validation.jsonl every N steps (0 = only at the end)."""
    save_steps: int = 33
    """Write a resumable checkpoint every N steps."""
    save_total_limit: int = 2
    """Checkpoints kept (the best one is always kept when load_best_model_at_end)."""
    early_stopping_patience: int = 3
    """Stop after N evaluations without improvement of `metric_for_best_model` (0 = off; notes 8.2)."""
    load_best_model_at_end: bool = True
    """Keep the checkpoint with the best `metric_for_best_model`, not the last one (notes 8.2)."""
    metric_for_best_model: Literal["accuracy", "f1_macro", "min_recall", "loss"] = "accuracy"
    """Validation metric that picks the checkpoint and stops early. accuracy / f1_macro / min_recall: of the label
    the model generates on validation.jsonl, as the gate scores the test split (classification data);
    loss: eval loss over the answer tokens (always used for generation data)."""
    logging_steps: int = 1
    """Log loss, learning rate, throughput and memory every N steps."""
    output_dir: str = "models/adapter"
    """Where the fine-tuned adapter (or full model), tokenizer and train config go."""
    checkpoint_dir: str = "models/checkpoints"
    """Where resumable checkpoints go, one folder per data+params hash (kept across dvc repro)."""


@dataclass
class QuantizeConfig:
    variants: list[str] = field(default_factory=lambda: ["f16", "q8_0", "q4_k_m", "bnb-int8", "bnb-nf4", "torch-int8"])
    """Variants `ftlib quantize` writes: GGUF f16/q8_0/q4_k_m (llama.cpp, Ollama), bnb-int8, bnb-nf4, torch-int8."""
    merged_dtype: Literal["bfloat16", "float16", "float32"] = "float16"
    """dtype of models/merged (the adapter folded into the base); GGUF conversion starts from it.
    float16 keeps 3 more mantissa bits than bfloat16, which a small LoRA delta needs."""
    max_quant_drop: dict[str, float] = field(default_factory=lambda: {"q8_0": 0.02, "q4_k_m": 0.05, "default": 0.05})
    """Largest accuracy drop vs the merged model a variant may show and still ship (by GGUF type; default for the rest)."""


@dataclass
class BenchmarkConfig:
    max_new_tokens: int = 32
    """Token budget per answer; an answer that has not reached EOS by then counts as not stopping.
    Classification: at most the label budget `ftlib evaluate` and the gate use (longest label + 8)."""
    decode_tokens: int = 64
    """Tokens generated (EOS suppressed) to measure pure decode speed."""
    max_examples: int = 0
    """Benchmark on the first N test examples only (0 = all)."""
    latency_examples: int = 24
    """Latency p50/p95 and examples/s time the first N examples answered one at a time (batch 1; 0 = all);
    accuracy always covers every benchmarked example, generated in batches."""
    include_base: bool = True
    """Add a row for the base model (before fine-tuning)."""


@dataclass
class RegisterConfig:
    model_name: str = "ftlib-sentiment"
    """Registered model name in MLflow (`models:/NAME@champion`)."""
    accuracy_threshold: float = 0.8
    """The gate: test-split accuracy below this is never registered."""
    f1_threshold: float = 0.8
    """The gate on macro F1 (classification: every class counts) or chrF/100 (generation); 0 = not checked."""
    min_improvement: float = 0.01
    """A candidate must beat the champion and the base model, re-scored on the same test split, by at least this much accuracy."""
    baseline_margin: float | None = 0.05
    """Classification: a candidate must beat TF-IDF + logistic regression (trained on train.jsonl in a second,
    scored on the same test split) by at least this much accuracy; null = not checked."""
    check_base_model: bool = True
    """The candidate must beat the base model it was fine-tuned from (scored on the same test split) by min_improvement."""
    log_merged: bool = True
    """Also log the merged model (fp16, full size) as a run artifact; the adapter and shippable GGUFs always are."""


@dataclass
class PathsConfig:
    allowed_roots: list[str] = field(default_factory=list)
    """Directories (besides the project dir, the ftlib cache and the system temp dir) that paths from the DAG's
    trigger form / REST API may resolve into; one outside every root fails the task. ~ and $VARS expand.
    The CLI, run by a local user on their own files, is not confined."""


@dataclass
class Params:
    base_model: str = "embedded:smollm2-135m-instruct"
    """embedded:smollm2-135m-instruct, a local HF directory or a hub id."""
    template: Literal["chat", "alpaca"] = "chat"
    """chat: the tokenizer's chat template; alpaca: the course's alpaca prompt + EOS."""
    max_seq_length: int = 512
    """Longest example in tokens after templating."""
    trust_remote_code: bool = False
    """Allow code shipped with a hub model to run. Off unless you need it."""
    allow_pickle_weights: bool = False
    """Load a model or adapter that has only pickle weights (*.bin/*.pt; loading a pickle can run code),
    with torch's weights_only=True; off = safetensors only. Honoured by train, merge, quantize and distill."""
    paths: PathsConfig = field(default_factory=PathsConfig)
    data: DataConfig = field(default_factory=DataConfig)
    validate: ValidateConfig = field(default_factory=ValidateConfig)
    split: SplitConfig = field(default_factory=SplitConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    quantize: QuantizeConfig = field(default_factory=QuantizeConfig)
    benchmark: BenchmarkConfig = field(default_factory=BenchmarkConfig)
    register: RegisterConfig = field(default_factory=RegisterConfig)


def _coerce(value: str, current: Any) -> Any:
    """Turn a CLI string into the type of the field it overrides (YAML rules)."""
    parsed = yaml.safe_load(value) if value != "" else ""
    if isinstance(current, list) and isinstance(parsed, str):
        return [v.strip() for v in parsed.split(",") if v.strip()]
    if isinstance(current, float) and isinstance(parsed, (int, str)) and not isinstance(parsed, bool):
        try:
            return float(parsed)  # YAML reads "5e-3" (no dot) as a string
        except ValueError:
            raise ConfigError(f"expected a number, got {value!r}") from None
    return parsed


def _build(cls: type, raw: dict[str, Any], where: str) -> Any:
    names = {f.name: f for f in dataclasses.fields(cls)}
    unknown = set(raw) - set(names)
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {sorted(unknown)}; known: {sorted(names)}")
    kwargs = {}
    for name, value in raw.items():
        default = getattr(cls(), name)
        if dataclasses.is_dataclass(default):
            if not isinstance(value, dict):
                raise ConfigError(f"{where}.{name}: expected a mapping, got {value!r}")
            value = _build(type(default), value, f"{where}.{name}")
        elif isinstance(default, float) and isinstance(value, (int, str)) and not isinstance(value, bool):
            try:
                value = float(value)  # YAML 1.1 reads 2e-4 (no dot) as a string
            except ValueError:
                raise ConfigError(f"{where}.{name}: expected a number, got {value!r}") from None
        kwargs[name] = value
    return cls(**kwargs)


# Allowed ranges of the numeric params: key -> (lowest, highest). None = unbounded on that side.
# Everything numeric must also be finite; checked at load, so a bad value exits 2 before any work.
RANGES: dict[str, tuple[float | None, float | None]] = {
    "max_seq_length": (1, None),
    "validate.min_output_chars": (0, None), "validate.max_line_bytes": (1, None), "validate.max_class_imbalance": (1, None),
    "split.train": (0, 1), "split.validation": (0, 1), "split.test": (0, 1),
    "train.lora_r": (1, None), "train.lora_alpha": (1, None), "train.lora_dropout": (0, 0.99), "train.lora_layers": (0, None),
    "train.num_virtual_tokens": (1, None), "train.learning_rate": (1e-12, 10), "train.warmup_steps": (0, None),
    "train.weight_decay": (0, None), "train.max_grad_norm": (0, None), "train.num_train_epochs": (1e-9, None),
    "train.max_steps": (-1, None), "train.per_device_train_batch_size": (1, None), "train.gradient_accumulation_steps": (1, None),
    "train.gradient_checkpointing_fraction": (0, 1), "train.lm_head_chunk": (1, None), "train.eval_steps": (0, None),
    "train.save_steps": (1, None), "train.save_total_limit": (1, None), "train.early_stopping_patience": (0, None),
    "train.logging_steps": (1, None),
    "benchmark.max_new_tokens": (1, None), "benchmark.decode_tokens": (1, None), "benchmark.max_examples": (0, None),
    "benchmark.latency_examples": (0, None),
    "register.accuracy_threshold": (0, 1), "register.f1_threshold": (0, 1), "register.min_improvement": (-1, 1),
    "register.baseline_margin": (-1, 1),
}
NON_EMPTY = ("base_model", "register.model_name", "train.output_dir", "train.checkpoint_dir", "train.target_modules",
             "quantize.variants")


def _fields(obj: Any, prefix: str = "") -> typing.Iterator[tuple[str, Any, Any, bool]]:
    """(dotted key, value, the dataclass default, whether None is allowed) of every leaf param."""
    defaults = type(obj)()
    for f in dataclasses.fields(obj):
        value, default = getattr(obj, f.name), getattr(defaults, f.name)
        if dataclasses.is_dataclass(default):
            yield from _fields(value, f"{prefix}{f.name}.")
        else:
            yield f"{prefix}{f.name}", value, default, "None" in str(f.type)


def _check_values(p: Params) -> None:
    """Types (as the defaults have them), finiteness, ranges and non-empty names, with the key in every message."""
    import math

    for key, value, default, optional in _fields(p):
        kind = type(default)
        if value is None and optional:
            continue
        if kind is str:  # text; auto|true|false and batch_tokens are checked (and normalized) by name below
            if not isinstance(value, (str, bool, int)):
                raise ConfigError(f"{key}: expected text, got {value!r}")
        elif kind is bool or isinstance(value, bool):
            if type(value) is not kind:
                raise ConfigError(f"{key}: expected {'true or false' if kind is bool else 'a number'}, got {value!r}")
        elif kind is int and not isinstance(value, int):
            raise ConfigError(f"{key}: expected a whole number, got {value!r}")
        elif kind is float and not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        elif kind in (list, dict) and not isinstance(value, kind):
            raise ConfigError(f"{key}: expected a {kind.__name__}, got {value!r}")
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"{key}: must be a finite number, got {value!r}")
        if key in RANGES and isinstance(value, (int, float)):
            low, high = RANGES[key]
            if (low is not None and value < low) or (high is not None and value > high):
                bounds = f"between {low:g} and {high:g}" if low is not None and high is not None else f">= {low:g}"
                raise ConfigError(f"{key}: must be {bounds}, got {value!r}")
        if key in NON_EMPTY and not (value.strip() if isinstance(value, str) else value):
            raise ConfigError(f"{key}: must not be empty")
    if p.train.max_steps == 0:
        raise ConfigError("train.max_steps: -1 (train num_train_epochs) or a positive number of steps, got 0")
    for name, drop in p.quantize.max_quant_drop.items():
        if not isinstance(drop, (int, float)) or isinstance(drop, bool) or not 0 <= drop <= 1:
            raise ConfigError(f"quantize.max_quant_drop.{name}: an accuracy drop between 0 and 1, got {drop!r}")
    labels = [str(label).strip() for label in p.data.labels]
    if any(not label for label in labels) or len(set(labels)) != len(labels):
        raise ConfigError(f"data.labels: non-empty and distinct, got {p.data.labels!r}")


def _check(p: Params) -> None:
    _check_values(p)
    ratios = (p.split.train, p.split.validation, p.split.test)
    if abs(sum(ratios) - 1.0) > 1e-6 or p.split.train <= 0:
        raise ConfigError(f"split: train/validation/test must be >= 0, train > 0, and sum to 1, got {ratios}")
    for name in ("duplicates", "contradictions", "class_balance"):
        if getattr(p.validate, name) not in ("error", "warning"):
            raise ConfigError(f"validate.{name}: must be 'error' or 'warning'")
    if p.template not in ("chat", "alpaca"):
        raise ConfigError(f"template: must be 'chat' or 'alpaca', got {p.template!r}")
    if p.data.task not in ("classification", "generation", "code"):
        raise ConfigError(f"data.task: must be 'classification', 'generation' or 'code', got {p.data.task!r}")
    if p.train.method not in METHODS:
        raise ConfigError(f"train.method: one of auto, qlora, lora, full, prompt_tuning; got {p.train.method!r}")
    if p.train.metric_for_best_model not in ("accuracy", "f1_macro", "min_recall", "loss"):
        raise ConfigError(f"train.metric_for_best_model: accuracy, f1_macro, min_recall or loss; got {p.train.metric_for_best_model!r}")
    tokens = str(p.train.batch_tokens).strip().lower()
    if tokens != "auto" and not (tokens.isdigit() and (int(tokens) == 0 or int(tokens) >= p.max_seq_length)):
        raise ConfigError(f"train.batch_tokens: auto, 0 (off) or a token budget >= max_seq_length ({p.max_seq_length}); "
                          f"got {p.train.batch_tokens!r}")
    p.train.batch_tokens = tokens
    if p.train.backend not in ("auto", "transformers", "unsloth"):
        raise ConfigError(f"train.backend: one of auto, transformers, unsloth; got {p.train.backend!r}")
    for name in ("bf16", "packing", "gradient_checkpointing"):
        value = str(getattr(p.train, name)).lower()
        if value not in ("auto", "true", "false"):
            raise ConfigError(f"train.{name}: auto, true or false; got {getattr(p.train, name)!r}")
        setattr(p.train, name, value)
    if p.data.task == "classification" and not p.data.labels:
        raise ConfigError("data.labels: a classification dataset needs a declared label set")


def load_params(path: str | Path | None = "params.yaml", overrides: list[str] | None = None) -> Params:
    """Read params.yaml (missing file -> defaults), then apply `a.b=value` overrides."""
    raw: dict[str, Any] = {}
    if path is not None and Path(path).exists():
        try:
            raw = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML: {e}") from e
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: expected a mapping at the top level")
    params = _build(Params, raw, str(path or "params"))
    for item in overrides or []:
        key, sep, value = item.partition("=")
        if not sep:
            raise ConfigError(f"override {item!r}: expected section.key=value")
        *parents, leaf = key.strip().split(".")
        target: Any = params
        for part in parents:
            if not hasattr(target, part):
                raise ConfigError(f"override {item!r}: unknown section {part!r}")
            target = getattr(target, part)
        if not dataclasses.is_dataclass(target) or leaf not in {f.name for f in dataclasses.fields(target)}:
            raise ConfigError(f"override {item!r}: unknown key {key!r}")
        setattr(target, leaf, _coerce(value, getattr(target, leaf)))
    _check(params)
    return params


def as_dict(params: Params) -> dict[str, Any]:
    return dataclasses.asdict(params)


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out |= flatten(v, f"{prefix}{k}.")
        else:
            out[f"{prefix}{k}"] = v
    return out
