"""Typed view of params.yaml.

A parameter travels params.yaml -> one of these dataclasses -> the stage function
that uses it. `load_params` applies `section.key=value` overrides from the CLI the
way TRL scripts do: YAML first, then the command line.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

Severity = Literal["error", "warning"]


class ConfigError(ValueError):
    """A params file or override that cannot be used (exit code 2)."""


@dataclass
class DataConfig:
    task: Literal["classification", "generation"] = "classification"
    """classification: the output is one of `labels`; generation: free text."""
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
    data: DataConfig = field(default_factory=DataConfig)
    validate: ValidateConfig = field(default_factory=ValidateConfig)
    split: SplitConfig = field(default_factory=SplitConfig)


def _coerce(value: str, current: Any) -> Any:
    """Turn a CLI string into the type of the field it overrides (YAML rules)."""
    parsed = yaml.safe_load(value) if value != "" else ""
    if isinstance(current, list) and isinstance(parsed, str):
        return [v.strip() for v in parsed.split(",") if v.strip()]
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
        kwargs[name] = value
    return cls(**kwargs)


def _check(p: Params) -> None:
    ratios = (p.split.train, p.split.validation, p.split.test)
    if any(r < 0 for r in ratios) or abs(sum(ratios) - 1.0) > 1e-6:
        raise ConfigError(f"split: train/validation/test must be >= 0 and sum to 1, got {ratios}")
    for name in ("duplicates", "contradictions", "class_balance"):
        if getattr(p.validate, name) not in ("error", "warning"):
            raise ConfigError(f"validate.{name}: must be 'error' or 'warning'")
    if p.template not in ("chat", "alpaca"):
        raise ConfigError(f"template: must be 'chat' or 'alpaca', got {p.template!r}")
    if p.data.task not in ("classification", "generation"):
        raise ConfigError(f"data.task: must be 'classification' or 'generation', got {p.data.task!r}")
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
