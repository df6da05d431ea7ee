"""Stage `evaluate`: score a model on a JSONL split.

Classification data (params.yaml `data.task: classification`) is scored with
scikit-learn: accuracy, weighted and macro precision/recall/F1, a per-class report and
a confusion matrix. The predicted label comes from one of two modes:

  generate  greedy-generate an answer and read the label out of it
            (ftlib.serving.generate.extract_label: case, accents, markdown, trailing words);
            an answer that names no label is "off-label" and counts as wrong;
  loglik    score log p(label + EOS | prompt) for every declared label and take the
            best one: one prompt pass per batch, each label continued from a copy
            of its KV cache; never off-label.

Generation data (`generation`, `code`) is scored against the reference answer: exact
match, chrF and BLEU (sacrebleu corpus scores, 0-100), ROUGE-L F1 over whitespace tokens,
and for code the share of answers that parse as Python.

Every --model form works: the model is reached through ftlib.serving.generate.load_predictor.
"""

from __future__ import annotations

import ast
import csv
import re
import time
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Literal

from ftlib.core.atomic import write_json
from ftlib.core.log import progress_bar
from ftlib.core.errors import InvalidData  # noqa: F401  (re-exported: the data file cannot be read as examples)
from ftlib.core.formats import Example, read_examples
from ftlib.serving.generate import extract_label, label_budget, load_predictor

OFF_LABEL = "(none)"  # the confusion-matrix column of answers that name no declared label
Mode = Literal["generate", "loglik"]
Task = Literal["classification", "generation", "code"]




# ---------------------------------------------------------------------------
# Classification metrics

def classification_metrics(gold: list[str], predicted: list[str | None], labels: list[str]) -> dict[str, Any]:
    """Accuracy, precision/recall/F1 (weighted and macro), per-class report, confusion matrix.

    `predicted` holds None for an answer that named no label: it is wrong for accuracy,
    a false negative of its gold class (lower recall), and a false positive of no class.
    Averages run over the declared labels that occur in `gold` or `predicted` (a label
    absent from both would add a meaningless 0 to the macro average); gold labels that
    are not declared are scored too rather than dropped.
    """
    from sklearn.metrics import (
        classification_report,
        confusion_matrix,
        precision_recall_fscore_support,
    )

    pred = [OFF_LABEL if p is None else p for p in predicted]
    rows = list(labels) + sorted(set(gold) - set(labels))  # every declared label, then surprises
    seen = set(gold) | set(pred)
    scored = [label for label in rows if label in seen]
    n = len(gold)
    off = sum(p is None for p in predicted)
    if n == 0:
        return {"accuracy": 0.0, "precision": 0.0, "recall": 0.0, "f1": 0.0, "f1_macro": 0.0, "n": 0, "off_label": 0,
                "per_class": {}, "confusion_matrix": [], "confusion_labels": rows, "confusion_columns": rows}

    p_w, r_w, f_w, _ = precision_recall_fscore_support(gold, pred, labels=scored, average="weighted", zero_division=0)
    _, _, f_m, _ = precision_recall_fscore_support(gold, pred, labels=scored, average="macro", zero_division=0)
    report = classification_report(gold, pred, labels=scored, output_dict=True, zero_division=0)
    # sklearn's matrix is square over `columns`; the OFF_LABEL row is always empty (no
    # gold answer is off-label), so only its column is kept.
    columns = rows + ([OFF_LABEL] if off else [])
    matrix = confusion_matrix(gold, pred, labels=columns)[: len(rows)]
    return {
        "accuracy": sum(g == p for g, p in zip(gold, pred)) / n,
        "precision": float(p_w), "recall": float(r_w), "f1": float(f_w), "f1_macro": float(f_m),
        "n": n, "off_label": off,
        "per_class": _plain(report),
        "confusion_matrix": matrix.tolist(),
        "confusion_labels": rows,  # row order (actual)
        "confusion_columns": columns,  # column order (predicted), OFF_LABEL last when present
    }


def _plain(obj: Any) -> Any:
    """numpy scalars -> Python numbers, so the dict dumps to JSON."""
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    return obj.item() if hasattr(obj, "item") else obj


def plot_confusion(metrics: dict[str, Any], png_path: str | Path) -> Path:
    """Draw the confusion matrix of `classification_metrics` as a PNG (counts in the cells)."""
    # The Agg canvas draws into memory: no display needed, and no pyplot global state.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    matrix, rows, cols = metrics["confusion_matrix"], metrics["confusion_labels"], metrics["confusion_columns"]
    fig = Figure(figsize=(1.6 + 1.1 * len(cols), 1.4 + 0.9 * len(rows)), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.imshow(matrix or [[0]], cmap="Blues", vmin=0)
    ax.set_xticks(range(len(cols)), cols, rotation=30, ha="right")
    ax.set_yticks(range(len(rows)), rows)
    ax.set_xlabel("predicted")
    ax.set_ylabel("actual")
    ax.set_title(f"accuracy {metrics['accuracy']:.3f}, n={metrics['n']}")
    top = max((v for r in matrix for v in r), default=0)
    for i, row in enumerate(matrix):
        for j, v in enumerate(row):
            ax.text(j, i, str(v), ha="center", va="center", color="white" if v > top / 2 else "black")
    path = Path(png_path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    return path


# ---------------------------------------------------------------------------
# Generation metrics

def lcs_length(a: list[str], b: list[str]) -> int:
    """Length of the longest common subsequence (dynamic programming, two rows)."""
    if len(a) < len(b):
        a, b = b, a
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b):
            cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
        prev = cur
    return prev[-1]


def rouge_l(reference: str, hypothesis: str) -> float:
    """ROUGE-L F1: LCS-based precision and recall over whitespace tokens."""
    ref, hyp = reference.split(), hypothesis.split()
    if not ref or not hyp:
        return float(ref == hyp)  # both empty: identical
    lcs = lcs_length(ref, hyp)
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(hyp), lcs / len(ref)
    return 2 * precision * recall / (precision + recall)


_FENCE = re.compile(r"```[^\n`]*\n(.*?)(?:```|\Z)", re.DOTALL)


def strip_fences(text: str) -> str:
    """The code inside the first ``` fence (language tag dropped), else the whole text."""
    m = _FENCE.search(text)
    return m.group(1) if m else text


def is_valid_python(text: str) -> bool:
    """Parses as Python (ast.parse only parses; nothing is executed)."""
    try:
        ast.parse(strip_fences(text))
    except (SyntaxError, ValueError, RecursionError, MemoryError):  # ValueError: null bytes
        return False
    return True


def generation_metrics(references: list[str], hypotheses: list[str], code: bool = False) -> dict[str, Any]:
    """Exact match, chrF, BLEU, ROUGE-L (and syntax_valid_rate when `code`)."""
    import sacrebleu

    n = len(references)
    if n == 0:
        return {"exact_match": 0.0, "chrf": 0.0, "bleu": 0.0, "rouge_l": 0.0, "n": 0} | ({"syntax_valid_rate": 0.0} if code else {})
    metrics: dict[str, Any] = {
        "exact_match": sum(r.strip() == h.strip() for r, h in zip(references, hypotheses)) / n,
        "chrf": sacrebleu.corpus_chrf(hypotheses, [references]).score,
        "bleu": sacrebleu.corpus_bleu(hypotheses, [references]).score,
        "rouge_l": sum(rouge_l(r, h) for r, h in zip(references, hypotheses)) / n,
        "n": n,
    }
    if code:
        metrics["syntax_valid_rate"] = sum(is_valid_python(h) for h in hypotheses) / n
    return metrics


# ---------------------------------------------------------------------------
# The stage

def evaluate(
    model: str,
    data: str | Path,
    labels: list[str] | None = None,
    task: Task = "classification",
    mode: Mode = "generate",
    template: str = "chat",
    batch_size: int = 8,
    max_new_tokens: int | None = None,
    predictions_csv: str | Path | None = None,
    progress: bool | Callable[[float], None] = True,
    metrics_json: str | Path | None = None,
    confusion_png: str | Path | None = None,
) -> dict[str, Any]:
    """Score `model` on the examples of `data`; the metrics plus one dict per example under "predictions".
    Writes, when given: predictions_csv (one row per example), metrics_json (the metrics without the
    per-example rows, atomically) and confusion_png (classification).

    max_new_tokens defaults to the longest label + 8 tokens (room for "El sentimiento es
    POSITIVO") for classification and 256 for generation. `progress` is True for a rich
    bar, False for none, or a callable receiving the number of examples just finished.
    """
    if task not in ("classification", "generation", "code"):
        raise ValueError(f"task: classification, generation or code; got {task!r}")
    if mode not in ("generate", "loglik"):
        raise ValueError(f"mode: generate or loglik; got {mode!r}")
    labels = list(labels or [])
    if task == "classification" and not labels:
        raise ValueError("classification needs the declared labels (params.yaml data.labels)")
    if task != "classification" and mode == "loglik":
        raise ValueError("--mode loglik scores a fixed label set; it only applies to classification data")
    try:  # read the data before loading a model: a bad file fails in milliseconds
        examples = read_examples(data)
    except ValueError as e:
        raise InvalidData(str(e), str(e).splitlines(), data) from e

    predictor = load_predictor(model, template)
    conversations = [e.prompt_messages for e in examples]
    if progress is True:
        bar, advance = progress_bar(len(examples), f"evaluating {Path(data).name} ({mode})")
    else:
        bar, advance = nullcontext(), progress or None
    scores: list[list[float]] = []
    t0 = time.perf_counter()
    with bar:
        if task == "classification" and mode == "loglik":
            scores = predictor.label_logliks(conversations, labels, batch_size=batch_size, progress=advance)
            predicted: list[str | None] = [labels[max(range(len(row)), key=row.__getitem__)] for row in scores]
            answers = [str(p) for p in predicted]
        else:
            if max_new_tokens is None:
                max_new_tokens = label_budget(predictor.tokenizer, labels) if task == "classification" else 256
            generated = predictor.generate(conversations, max_new_tokens=max_new_tokens, batch_size=batch_size, progress=advance)
            answers = [a.text for a in generated]
            predicted = [extract_label(a, labels) for a in answers] if task == "classification" else list(answers)
    seconds = time.perf_counter() - t0

    gold = [e.output.strip() if task == "classification" else e.output for e in examples]
    if task == "classification":
        metrics = classification_metrics(gold, predicted, labels)
    else:
        metrics = generation_metrics(gold, answers, code=task == "code")
    rows = _prediction_rows(examples, gold, predicted, answers)
    if mode == "loglik":
        for row, s in zip(rows, scores):
            row["logliks"] = dict(zip(labels, s))
    if predictions_csv is not None:
        write_predictions(rows, predictions_csv)
    from ftlib.core.lineage import md5, weight_md5s

    # which weights and which test file these numbers belong to: the gate refuses metrics of another model
    result = {**metrics, "task": task, "mode": mode, "model": str(model), "data": str(data),
              "model_files": weight_md5s(model), "data_md5": md5(Path(data)),
              "runtime": predictor.runtime, "seconds": round(seconds, 2),
              "examples_per_s": round(len(examples) / seconds, 3) if seconds > 0 else None}
    if metrics_json is not None:
        write_json(metrics_json, result)
    if confusion_png is not None and task == "classification":
        plot_confusion(result, confusion_png)
    return {**result, "predictions": rows}


def _prediction_rows(examples: list[Example], gold: list[str], predicted: list[str | None], answers: list[str]) -> list[dict[str, Any]]:
    return [{"line": e.line, "actual": g, "predicted": OFF_LABEL if p is None else p, "answer": a}
            for e, g, p, a in zip(examples, gold, predicted, answers)]


def write_predictions(rows: list[dict[str, Any]], path: str | Path) -> Path:
    """actual, predicted, answer, line: one row per example (DVC's confusion template reads actual/predicted)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=["actual", "predicted", "answer", "line"], extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    tmp.replace(path)
    return path
