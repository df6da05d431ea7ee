"""`ftlib` command line: one subcommand per pipeline stage, each a thin call into its module.

Exit codes (DESIGN.md): 0 ok, 1 invalid data, 2 usage error.
"""

from __future__ import annotations

import functools
import os
import sys
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from ftlib import __version__
import ftlib.registry  # noqa: F401  (plugs models:/ resolution into ftlib.core.models)

app = typer.Typer(
    name="ftlib",
    help="Fine-tune Llama-3-style models: validate -> split -> train -> quantize -> evaluate -> register.",
    no_args_is_help=True,
    rich_markup_mode="rich",
    context_settings={"help_option_names": ["-h", "--help"]},
)
out = Console(highlight=False, soft_wrap=True)
err = Console(stderr=True, highlight=False, soft_wrap=True)

ParamsOpt = typer.Option(Path("params.yaml"), "--params", "-p", help="params.yaml to read (missing file = defaults).")
SetOpt = typer.Option(None, "--set", "-o", help="Override a param for this run: section.key=value (repeatable).")


def _version(value: bool) -> None:
    if value:
        out.print(f"ftlib {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    version: Optional[bool] = typer.Option(None, "--version", callback=_version, is_eager=True, help="Print the version and exit."),
) -> None:
    """ftlib: an Airflow/DVC/MLflow workflow for fine-tuning Llama-3-style models."""
    from ftlib.core.log import setup_cli

    setup_cli()  # the stages' messages (logging) on stderr, one line each


def _params(path: Path, overrides: Optional[list[str]]):
    from ftlib.core.config import load_params

    params = load_params(path, overrides or [])
    return params


@contextmanager
def _progress() -> Iterator:
    """A progress callback (stage, advance, total) drawing one bar per stage on stderr."""
    labels = {"read": "reading files", "tokens": "templating + counting tokens"}
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=err, transient=True, disable=not err.is_terminal) as bar:
        tasks: dict[str, int] = {}

        def tick(stage: str, advance: int, total: int) -> None:
            if stage not in tasks:
                tasks[stage] = bar.add_task(labels.get(stage, stage), total=total)
            bar.update(tasks[stage], advance=advance)

        yield tick


def _print_issues(result) -> None:
    """FILE:LINE: RULE: message, one per line (a validation result's issues, or an InvalidData's)."""
    for i in result.issues:
        suffix = " (warning)" if getattr(i, "severity", "error") == "warning" else ""
        out.print(f"{i}{suffix}", markup=False)


def _summary(result) -> Table:
    from collections import Counter

    table = Table(title="validation summary")
    for col in ("file", "lines", "valid", "errors", "warnings"):
        table.add_column(col, justify="left" if col == "file" else "right")
    sev = Counter((i.file, i.severity) for i in result.issues)
    for f in result.files:
        n = result.per_file[f]
        table.add_row(f, str(n["lines"]), str(n["valid"]), str(sev[(f, "error")]), str(sev[(f, "warning")]))
    return table


def _rules_table(result) -> Table | None:
    if not result.issues:
        return None
    from collections import Counter

    table = Table(title="problems by rule")
    table.add_column("rule")
    table.add_column("severity")
    table.add_column("count", justify="right")
    for (rule, sev), n in sorted(Counter((i.rule, i.severity) for i in result.issues).items()):
        table.add_row(rule, sev, str(n))
    return table


@app.command()
def validate(
    paths: list[Path] = typer.Argument(..., help="JSONL files or directories of *.jsonl files."),
    report_dir: Optional[Path] = typer.Option(None, "--report-dir", help="Where report.json, quarantine.jsonl and data_docs/ go. "
                                              "Default: data/validated when validating the pipeline's data/raw, else nothing is written."),
    no_report: bool = typer.Option(False, "--no-report", help="Only print; write nothing."),
    json_out: bool = typer.Option(False, "--json", help="Print the report as JSON instead of tables."),
    params_file: Path = ParamsOpt,
    overrides: Optional[list[str]] = SetOpt,
) -> None:
    """Check instruction data (alpaca or chat JSONL) against the data contract, with Great Expectations.

    Every problem prints as FILE:LINE: RULE: message (LINE 0 = whole file). Exit 0 valid, 1 invalid data, 2 usage error. Raw files are never modified; bad rows are copied with their reasons to quarantine.jsonl. Checking a file outside data/raw writes nothing unless --report-dir says where (the pipeline's data/validated stays as the last pipeline run left it).

    [b]Examples[/]

      ftlib validate data/raw/

      ftlib validate new_batch.jsonl --report-dir /tmp/check

      ftlib validate data/samples/support_chat.jsonl -o data.task=generation -o max_seq_length=1024

      ftlib validate data/raw -o validate.duplicates=warning
    """
    from ftlib.stages.validate import validate_paths

    params = _params(params_file, overrides)
    skipped = False  # an ad-hoc check outside data/raw must not overwrite the pipeline's data/validated
    if report_dir is None and not no_report:
        pipeline = all(p.resolve().is_relative_to(Path("data/raw").resolve()) for p in paths)
        report_dir = Path("data/validated") if pipeline else None
        no_report = skipped = not pipeline
    with _progress() as tick:
        result = validate_paths(paths, params, None if no_report else report_dir, progress=tick)
    if json_out and not no_report:
        out.print_json((report_dir / "report.json").read_text(encoding="utf-8"))
    else:
        _print_issues(result)
        out.print(_summary(result))
        if (rules := _rules_table(result)) is not None:
            out.print(rules)
        verdict = "[green]valid[/]" if result.ok else "[red]INVALID[/]"
        out.print(f"{verdict}: {result.n_valid} usable examples, {len(result.errors)} errors, "
                  f"{len(result.warnings)} warnings in {result.elapsed_s:.1f}s")
        if skipped:
            out.print("no report written (the input is not the pipeline's data/raw; --report-dir DIR writes one)")
        if not no_report:
            out.print(f"report: {report_dir / 'report.json'}  quarantine: {report_dir / 'quarantine.jsonl'}"
                      + (f"  data docs: {report_dir / 'data_docs' / 'index.html'}" if params.validate.data_docs else ""))
    raise typer.Exit(0 if result.ok else 1)


@app.command()
def split(
    paths: list[Path] = typer.Argument(None, help="JSONL files or directories (default: data/raw/)."),
    out_dir: Path = typer.Option(Path("data/splits"), "--out-dir", help="Where train/validation/test.jsonl go."),
    params_file: Path = ParamsOpt,
    overrides: Optional[list[str]] = SetOpt,
) -> None:
    """Write a stable train/validation/test split (ratios from params.yaml `split:`).

    An example's split depends only on its content, so appending data never moves an old example. Invalid data is refused (exit 1, same messages as `validate`), and nothing is written.

    [b]Examples[/]

      ftlib split                                   # data/raw/ -> data/splits/

      ftlib split data/raw/sentiment.jsonl --out-dir /tmp/splits

      ftlib split data/raw -o split.train=0.7 -o split.validation=0.15 -o split.test=0.15
    """
    from ftlib.stages.split import SPLITS, split_paths

    params = _params(params_file, overrides)
    with _progress() as tick:
        result = split_paths(paths or [Path("data/raw")], params, out_dir, progress=tick)

    table = Table(title=f"split -> {result.out_dir}")
    table.add_column("split")
    table.add_column("examples", justify="right")
    labels = sorted({k for c in result.per_label.values() for k in c})
    for label in labels:
        table.add_column(label, justify="right")
    for s in SPLITS:
        table.add_row(f"{s}.jsonl", str(result.counts[s]), *(str(result.per_label[s].get(k, 0)) for k in labels))
    table.add_row("total", str(sum(result.counts.values())),
                  *(str(sum(result.per_label[s].get(k, 0) for s in SPLITS)) for k in labels), style="bold")
    if result.validation:
        _print_issues(result.validation)  # warnings only, by construction
    out.print(table)
    if result.duplicates_dropped:
        out.print(f"dropped {result.duplicates_dropped} exact duplicate(s) (validate.duplicates=warning)")
    for s in SPLITS:
        out.print(f"wrote {Path(result.out_dir) / f'{s}.jsonl'}")


@app.command()
def train(
    data_dir: Path = typer.Option(Path("data/splits"), "--data-dir", help="Holds train.jsonl and validation.jsonl (and test.jsonl for --compare)."),
    compare: bool = typer.Option(True, "--compare/--no-compare", help="After training, score base and fine-tuned models on test.jsonl (classification data)."),
    reports_dir: Path = typer.Option(Path("reports"), "--reports-dir", help="Where train_loss.csv and train_metrics.json go."),
    params_file: Path = ParamsOpt,
    overrides: Optional[list[str]] = SetOpt,
) -> None:
    """Fine-tune the base model on train.jsonl with TRL's SFTTrainer (train.method auto: QLoRA on a CUDA GPU, LoRA on a CPU); write models/adapter/.

    Rerunning with the same data and params resumes from the newest checkpoint. Loss is taken on the answers only; classification batches hold every label in proportion; every train.eval_steps the model answers validation.jsonl and the best validation accuracy of the generated label picks the checkpoint and drives early stopping. Params, losses, throughput and memory go to MLflow (sqlite:///mlflow.db unless MLFLOW_TRACKING_URI is set).

    [b]Examples[/]

      ftlib train

      ftlib train -o train.method=lora -o train.lora_r=32 -o train.use_rslora=true

      ftlib train -o train.lora_layers=0 -o train.num_train_epochs=1   # LoRA on every layer, one epoch

      ftlib train -o train.method=full -o train.learning_rate=2e-5

      ftlib train -o train.batch_tokens=8192   # GPU: micro-batches packed to 8,192 tokens (0 = 8 rows per batch)

      ftlib train -o train.max_steps=60 -o train.lr_scheduler_type=cosine --no-compare
    """
    from ftlib.stages.train import train as run_train

    params = _params(params_file, overrides)
    bars, ticks = ExitStack(), []

    def scored(n: int) -> None:  # the bar starts with the test scoring, after the Trainer's own progress bars
        if not ticks:
            ticks.append(bars.enter_context(_progress()))
        ticks[0]("scoring test split", n, 2 * _count_lines(data_dir / "test.jsonl"))

    with bars:
        result = run_train(params, data_dir, reports_dir, compare_on_test=compare, progress=scored)
    table = Table(title=f"trained -> {result.output_dir}")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for k, v in result.summary.items():
        if v is not None:
            table.add_row(k, f"{v:.4f}" if isinstance(v, float) else str(v))
    if result.resumed_from:
        table.add_row("resumed from", result.resumed_from)
    for b in result.oom_backoffs:
        table.add_row("OOM back-off", ", ".join(f"{k} {v}" for k, v in b.items()))
    out.print(table)
    if "test_accuracy" in result.summary:
        m = result.summary
        out.print(f"test accuracy: base {m['base_test_accuracy']:.3f} -> fine-tuned {m['test_accuracy']:.3f} (n={m['test_n']})")
    out.print(f"wrote {result.output_dir}/" + (f", {reports_dir / 'train_loss.csv'}, {reports_dir / 'train_metrics.json'}" if reports_dir else ""))


def _count_lines(path: Path) -> int:
    return sum(1 for line in path.open(encoding="utf-8") if line.strip())


@app.command()
def generate(
    instruction: str = typer.Argument(..., help="The instruction (alpaca) or the user message (chat)."),
    input_text: str = typer.Option("", "--input", "-i", help="Optional input/context (alpaca `input`)."),
    model: str = typer.Option("models/adapter", "--model", "-m", help="Adapter/merged/quantized dir, a .gguf file, HF dir, hub id or embedded:smollm2-135m-instruct."),
    system: Optional[str] = typer.Option(None, "--system", help="Optional system message."),
    max_new_tokens: int = typer.Option(256, "--max-new-tokens"),
    temperature: float = typer.Option(0.0, "--temperature", "-t", help="0 = greedy."),
    top_p: float = typer.Option(0.9, "--top-p"),
    stream: bool = typer.Option(True, "--stream/--no-stream", help="Print tokens as they come."),
    params_file: Path = ParamsOpt,
    overrides: Optional[list[str]] = SetOpt,
) -> None:
    """Answer one request with a model; the prompt is built exactly as in training. Stops at EOS.

    [b]Examples[/]

      ftlib generate "Clasifica el sentimiento" --input "Este producto superó todas mis expectativas!"

      ftlib generate --model embedded:smollm2-135m-instruct "Explain LoRA in one sentence" -t 0.7 --top-p 0.9

      ftlib generate -m models/merged "¿Cómo creo una lista en Python?" --max-new-tokens 128

      ftlib generate -m models/quantized/model-q4_k_m.gguf "Clasifica el sentimiento" -i "Pésimo servicio"
    """
    from ftlib.serving.generate import HFPredictor, load_predictor, user_messages
    from ftlib.serving.generate import generate as run_generate

    params = _params(params_file, overrides)
    predictor = load_predictor(model, params.template)
    messages = [user_messages(instruction, input_text, system)]
    if not isinstance(predictor, HFPredictor):  # GGUF on llama.cpp: greedy, printed when done
        if temperature > 0:
            raise ValueError("GGUF models are served greedily here; use --temperature 0 (or Ollama for sampling)")
        out.print(predictor.generate(messages, max_new_tokens=max_new_tokens)[0].text, markup=False)
        return
    from transformers import TextStreamer

    m, tok = predictor.model, predictor.tokenizer
    streamer = TextStreamer(tok, skip_prompt=True, skip_special_tokens=True) if stream else None
    answer = run_generate(m, tok, messages, predictor.template, max_new_tokens=max_new_tokens, temperature=temperature,
                          top_p=top_p, batch_size=1, streamer=streamer)[0]
    if not stream:
        out.print(answer, markup=False)


@app.command()
def merge(
    model: str = typer.Option("models/adapter", "--model", "-m", help="Adapter directory written by `ftlib train`."),
    out_dir: Path = typer.Option(Path("models/merged"), "--out", help="Where the merged safetensors go."),
    dtype: str = typer.Option("float16", "--dtype", help="float16, bfloat16 or float32."),
    params_file: Path = ParamsOpt,
    overrides: Optional[list[str]] = SetOpt,
) -> None:
    """Merge a LoRA adapter into its base model and save safetensors (for GGUF export and serving).

    [b]Examples[/]

      ftlib merge

      ftlib merge --model models/adapter --out models/merged --dtype bfloat16
    """
    from ftlib.stages.merge import merge_adapter

    params = _params(params_file, overrides)
    path = merge_adapter(model, out_dir, dtype, params.allow_pickle_weights)
    out.print(f"wrote {path}/ ({sum(p.stat().st_size for p in path.glob('*.safetensors')) / 2**20:,.1f} MiB safetensors, {dtype})")


@app.command()
def prune(
    model: str = typer.Option("models/merged", "--model", "-m", help="Any --model form; adapters are merged first."),
    amount: float = typer.Option(0.3, "--amount", help="Share of weights to zero in each linear layer (course notes: 0.3)."),
    out_dir: Path = typer.Option(Path("models/pruned"), "--out"),
) -> None:
    """L1 unstructured pruning of the decoder's linear layers (course notes 5.2); reports sparsity.

    [b]Examples[/]

      ftlib prune --amount 0.3

      ftlib prune -m embedded:smollm2-135m-instruct --amount 0.5 --out /tmp/pruned
    """
    from ftlib.stages.prune import prune_model

    r = prune_model(model, amount, out_dir)
    out.print(f"pruned {r.layers} linear layers by {r.amount:.0%}: sparsity {r.sparsity:.3f} in those layers, "
              f"{r.total_sparsity:.3f} of all parameters -> {r.out_dir}/")


@app.command()
def distill(
    teacher: str = typer.Option("models/adapter", "--teacher", help="The model to imitate (any --model form)."),
    student: str = typer.Option("embedded:smollm2-135m-instruct", "--student", help="The model to train (any --model form)."),
    student_layers: int = typer.Option(0, "--student-layers", help="Keep only the first N decoder layers of the student (0 = all)."),
    temperature: float = typer.Option(2.0, "--temperature", help="Softmax temperature of the KD loss (course notes: 2.0)."),
    alpha: float = typer.Option(0.5, "--alpha", help="Weight of the soft (KL) term; 1 - alpha goes to the hard CE term."),
    max_steps: int = typer.Option(-1, "--max-steps", help="-1 = train.num_train_epochs over train.jsonl."),
    data_dir: Path = typer.Option(Path("data/splits"), "--data-dir"),
    out_dir: Path = typer.Option(Path("models/distilled"), "--out"),
    params_file: Path = ParamsOpt,
    overrides: Optional[list[str]] = SetOpt,
) -> None:
    """Knowledge distillation (course notes 5.3): student learns the teacher's soft labels plus the true answers.

    [b]Examples[/]

      ftlib distill --teacher models/adapter --student embedded:smollm2-135m-instruct --student-layers 15

      ftlib distill --teacher models/merged --student /models/small --temperature 2 --alpha 0.5 --max-steps 200
    """
    from ftlib.stages.distill import distill as run_distill

    params = _params(params_file, overrides)
    r = run_distill(params, teacher, student, out_dir, data_dir, temperature, alpha, student_layers, max_steps)
    out.print(f"distilled {r.teacher_params / 1e6:.1f}M -> {r.student_params / 1e6:.1f}M parameters in {r.global_step} steps "
              f"(final loss {r.final_loss:.3f}) -> {r.out_dir}/")


# ---------------------------------------------------------------------------
# evaluate, review export/import


def _metrics_tables(m: dict) -> list[Table]:
    """The headline metrics; for classification also per-class scores and the confusion matrix."""
    table = Table(title=f"evaluation: {m['model']} on {m['data']} ({m['task']}, {m['mode']})")
    table.add_column("metric")
    table.add_column("value", justify="right")
    keys = (["accuracy", "precision", "recall", "f1", "f1_macro", "off_label"] if m["task"] == "classification"
            else ["exact_match", "chrf", "bleu", "rouge_l", "syntax_valid_rate"])
    for k in [*keys, "n", "examples_per_s"]:
        if m.get(k) is not None:
            table.add_row(k, f"{m[k]:.4f}" if isinstance(m[k], float) else str(m[k]))
    if m["task"] != "classification" or not m["n"]:
        return [table]
    per_class = Table(title="per class")
    for col in ("label", "precision", "recall", "f1", "support"):
        per_class.add_column(col, justify="left" if col == "label" else "right")
    for label in m["confusion_labels"]:
        if (r := m["per_class"].get(label)) is not None:
            per_class.add_row(label, f"{r['precision']:.3f}", f"{r['recall']:.3f}", f"{r['f1-score']:.3f}", str(int(r["support"])))
    confusion = Table(title="confusion matrix (rows: actual, columns: predicted)")
    confusion.add_column("")
    for col in m["confusion_columns"]:
        confusion.add_column(col, justify="right")
    for label, row in zip(m["confusion_labels"], m["confusion_matrix"]):
        confusion.add_row(label, *(str(v) for v in row))
    return [table, per_class, confusion]


@app.command()
def evaluate(
    model: str = typer.Option("models/adapter", "--model", "-m", help="Adapter/merged dir, HF dir, hub id, GGUF file or embedded:smollm2-135m-instruct."),
    data: Path = typer.Option(Path("data/splits/test.jsonl"), "--data", "-d", help="JSONL examples to score (alpaca or chat)."),
    json_out: Path = typer.Option(Path("reports/metrics.json"), "--json", help="Where the metrics go (JSON)."),
    mode: str = typer.Option("generate", "--mode", help="Classification only: generate (read the label from the answer) or loglik (most likely label, never off-label)."),
    plot: Optional[Path] = typer.Option(None, "--plot", help="Also draw the confusion matrix as a PNG (classification)."),
    predictions: Optional[Path] = typer.Option(None, "--predictions", help="Also write one CSV row per example: actual, predicted, answer, line."),
    batch_size: int = typer.Option(8, "--batch-size", help="Examples (loglik: example x label pairs) per forward pass."),
    max_new_tokens: Optional[int] = typer.Option(None, "--max-new-tokens", help="Default: longest label + 8 (classification), 256 (generation)."),
    params_file: Path = ParamsOpt,
    overrides: Optional[list[str]] = SetOpt,
) -> None:
    """Score a model on a JSONL split: accuracy/precision/recall/F1 for classification, exact match/chrF/BLEU/ROUGE-L for generation.

    The task and labels come from params.yaml `data:` (task: classification, generation or code; code adds the share of answers that parse as Python). Answers are generated greedily in batches, prompts built exactly as in training. Exit 0 ok, 1 invalid data, 2 usage error.

    [b]Examples[/]

      ftlib evaluate --model models/adapter --data data/splits/test.jsonl --json reports/metrics.json

      ftlib evaluate --mode loglik --plot reports/plots/confusion.png --predictions reports/predictions.csv

      ftlib evaluate -m embedded:smollm2-135m-instruct --json /tmp/base.json

      ftlib evaluate -m models/merged --data data/samples/python_code.jsonl --json /tmp/code.json -o data.task=code
    """
    from ftlib.stages.evaluate import evaluate as run_evaluate

    params = _params(params_file, overrides)
    task = params.data.task
    if mode not in ("generate", "loglik"):
        raise ValueError(f"--mode: generate or loglik, got {mode!r}")
    if task != "classification" and (mode == "loglik" or plot is not None):
        raise ValueError(f"{'--mode loglik' if mode == 'loglik' else '--plot'} needs classification data (data.task is {task})")
    if not data.is_file():
        raise ValueError(f"{data}: {'is a directory, expected a .jsonl file' if data.is_dir() else 'no such file'}")
    m = run_evaluate(model, data, labels=params.data.labels, task=task, mode=mode, template=params.template,
                     batch_size=batch_size, max_new_tokens=max_new_tokens, predictions_csv=predictions,
                     metrics_json=json_out, confusion_png=plot)
    metrics = {k: v for k, v in m.items() if k != "predictions"}
    written = [p for p in (json_out, plot, predictions) if p is not None]
    for table in _metrics_tables(metrics):
        out.print(table)
    out.print(f"wrote {', '.join(str(p) for p in written)}")


review_app = typer.Typer(
    help="Qualitative review (course notes 6.2): export answers to rate 1-5, import the ratings into MLflow.",
    no_args_is_help=True,
    rich_markup_mode="rich",
    context_settings={"help_option_names": ["-h", "--help"]},
)
app.add_typer(review_app, name="review")


@review_app.command("export")
def review_export(
    model: str = typer.Option("models/adapter", "--model", "-m", help="Any --model form."),
    data: Path = typer.Option(Path("data/splits/test.jsonl"), "--data", "-d", help="JSONL examples to sample from."),
    sheet: Path = typer.Option(Path("reports/review.csv"), "--out", help="The sheet: .csv, or .html to fill in a browser."),
    n: int = typer.Option(20, "-n", "--samples", help="How many examples to sample."),
    seed: int = typer.Option(3407, "--seed", help="Which examples are sampled (same seed + data = same rows)."),
    batch_size: int = typer.Option(8, "--batch-size"),
    max_new_tokens: int = typer.Option(256, "--max-new-tokens"),
    params_file: Path = ParamsOpt,
    overrides: Optional[list[str]] = SetOpt,
) -> None:
    """Write N sampled predictions to a sheet with an empty `rating` column (1-5) for a person to fill.

    Nothing waits for the person: rate the sheet whenever, then run `ftlib review import`. An .html sheet has editable rating cells and a button that saves the filled sheet as CSV.

    [b]Examples[/]

      ftlib review export -n 20 --out reports/review.csv

      ftlib review export --model models/merged --data data/splits/test.jsonl --out reports/review.html
    """
    from ftlib.stages.review import export_sheet

    params = _params(params_file, overrides)
    if not data.is_file():
        raise ValueError(f"{data}: no such file")
    if n < 1:
        raise ValueError("-n: sample at least one example")
    total = min(n, _count_lines(data))
    with _progress() as tick:
        path = export_sheet(model, data, sheet, n=n, seed=seed, template=params.template, batch_size=batch_size,
                            max_new_tokens=max_new_tokens, progress=lambda k: tick("generating answers", k, total))
    out.print(f"wrote {path} ({total} rows); fill the `rating` column (1-5), then: ftlib review import {path} --model {model}")


@review_app.command("import")
def review_import(
    sheet: Path = typer.Argument(..., help="The filled sheet (.csv, comma/semicolon/tab separated, or the .html page)."),
    model: str = typer.Option("models/adapter", "--model", "-m", help="The reviewed model: its MLflow run gets the ratings."),
    allow_missing: bool = typer.Option(False, "--allow-missing", help="Skip rows without a rating instead of refusing the sheet."),
) -> None:
    """Check a filled review sheet and log the mean rating, count and distribution to the model's MLflow run.

    The run is the one `ftlib train` recorded in the model's ftlib_train.json; for other models, a review run tagged with the model. A bad rating prints FILE:LINE: RULE: message and nothing is logged (exit 1). Importing the same sheet twice logs it once.

    [b]Examples[/]

      ftlib review import reports/review.csv

      ftlib review import ~/Downloads/review.csv --model models/merged --allow-missing
    """
    from ftlib.stages.review import import_sheet

    r = import_sheet(sheet, model, allow_missing)
    spread = "  ".join(f"{k}: {v}" for k, v in r.distribution.items())
    verb = "already logged" if r.already_logged else "logged"
    out.print(f"mean rating {r.mean:.2f}/5 over {len(r.ratings)} rows ({spread}); {verb} to MLflow run {r.run_id}"
              + (" (new review run)" if r.new_run else ""))


@app.command()
def quantize(
    model: str = typer.Option("models/adapter", "--model", "-m", help="Adapter dir (merged first) or any HF model dir."),
    out_dir: Path = typer.Option(Path("models/quantized"), "--out-dir", help="Where GGUF files, the Modelfile and variants go."),
    merged_dir: Path = typer.Option(Path("models/merged"), "--merged-dir", help="Where the merged model goes (quantize.merged_dtype, fp16 by default)."),
    variants: Optional[list[str]] = typer.Option(None, "--variant", "-v", help="Only these (repeatable): f16, q8_0, q4_k_m, bnb-int8, bnb-nf4, torch-int8. Default: quantize.variants."),
    params_file: Path = ParamsOpt,
    overrides: Optional[list[str]] = SetOpt,
) -> None:
    """Write every deployable variant: merged fp16, GGUF f16/Q8_0/Q4_K_M + Ollama Modelfile, bitsandbytes int8/NF4, torch int8.

    Each variant is a path every other command accepts as --model.

    [b]Examples[/]

      ftlib quantize

      ftlib quantize --model models/adapter -v q8_0 -v q4_k_m

      ollama create sentiment -f models/quantized/Modelfile && ollama run sentiment
    """
    from ftlib.stages.quantize import quantize as run_quantize

    params = _params(params_file, overrides)
    manifest = run_quantize(model, out_dir, merged_dir, variants or params.quantize.variants, params.quantize.merged_dtype,
                            allow_pickle_weights=params.allow_pickle_weights)
    from ftlib.stages.benchmark import size_mb

    table = Table(title="variants")
    for col in ("name", "runtime", "path", "size MB"):
        table.add_column(col, justify="right" if col == "size MB" else "left")
    for v in manifest:
        table.add_row(v["name"], v["runtime"], v["path"], f"{size_mb(v['path']) or 0:,.1f}")
    out.print(table)


@app.command()
def benchmark(
    adapter: str = typer.Option("models/adapter", "--adapter", help="The fine-tuned adapter (its base is benchmarked too)."),
    quantized: Path = typer.Option(Path("models/quantized"), "--quantized", help="Output dir of `ftlib quantize` (variants.json)."),
    data_dir: Path = typer.Option(Path("data/splits"), "--data-dir", help="train.jsonl (classical baseline) and test.jsonl."),
    json_out: Path = typer.Option(Path("reports/benchmark.json"), "--json", help="Results; benchmark.md and plots/benchmark.png go beside it."),
    params_file: Path = ParamsOpt,
    overrides: Optional[list[str]] = SetOpt,
) -> None:
    """Benchmark base, fine-tuned, merged and every quantized variant (plus TF-IDF + logistic regression) on the test split.

    Accuracy/F1, latency p50/p95, examples/s, decode tokens/s, load time, size, peak memory; flags variants that
    lose accuracy or stop at EOS less often than the merged model. Each variant is a child run of the training run in MLflow.

    [b]Examples[/]

      ftlib benchmark

      ftlib benchmark -o benchmark.max_examples=20 -o benchmark.include_base=false
    """
    from ftlib.stages.benchmark import benchmark as run_benchmark
    from ftlib.stages.benchmark import table

    params = _params(params_file, overrides)
    result = run_benchmark(params, adapter, str(quantized), str(data_dir), str(json_out), params.benchmark.include_base)
    Console(width=max(out.width, 150)).print(table(result))
    if result["ratio"]:
        out.print(f"Q8_0 GGUF decode tokens/s over fp32 transformers: {result['ratio']:.1f}x")
    out.print(f"wrote {json_out}, {json_out.with_suffix('.md')}, {json_out.parent / 'plots' / 'benchmark.png'}")


def _wide(renderable) -> None:
    """Print a table at least 120 columns wide (names are not wrapped on a narrow terminal or in a log)."""
    Console(width=max(out.width, 120), highlight=False).print(renderable)


def _gate_table(g) -> Table:
    """One row per criterion of the gate, all on the same test split: the candidate, what it is compared with, the bar."""
    t = Table(title="gate: " + ("[green]passed[/]" if g.passed else "[red]refused[/]") + f" ({g.metric} on the test split)")
    for col in ("criterion", "candidate", "compared with", "required", ""):
        t.add_column(col, justify="left" if col in ("criterion", "") else "right")
    for c in g.criteria:
        t.add_row(c["name"], f"{c['candidate']:.3f}", "-" if c["reference"] is None else f"{c['reference']:.3f}",
                  f">= {c['required']:.3f}", "[green]ok[/]" if c["passed"] else "[red]fails[/]")
    if g.overrides:  # recorded in gate.json and on the version too
        t.caption = "changed from ftlib's defaults: " + ", ".join(f"{k}={v['value']} (default {v['default']})"
                                                                 for k, v in g.overrides.items())
    return t


def _print_registration(r) -> None:
    if r.gate is not None:
        _wide(_gate_table(r.gate))
    for m in r.messages:
        out.print(("[red]" if r.status == "refused" else "[green]") + m + "[/]")


@app.command()
def gate(
    metrics: Path = typer.Option(Path("reports/metrics.json"), "--metrics", help="The candidate's test-split metrics (`ftlib evaluate`)."),
    adapter: Path = typer.Option(Path("models/adapter"), "--adapter", help="The candidate (hashed into the run key)."),
    data_dir: Path = typer.Option(Path("data/splits"), "--data-dir", help="Splits; the champion is re-scored on test.jsonl."),
    json_out: Path = typer.Option(Path("reports/gate.json"), "--json", help="Where the decision goes."),
    params_file: Path = ParamsOpt,
    overrides: Optional[list[str]] = SetOpt,
) -> None:
    """Decide whether the candidate may be registered: accuracy/F1 bars, and beating TF-IDF, the base model and the re-scored champion.

    Thresholds come from params.yaml `register:`. The decision is logged as an MLflow run (kept for refusals too) and written to reports/gate.json. Exit 0 passed, 3 refused, 2 error.

    [b]Examples[/]

      ftlib gate

      ftlib gate -o register.accuracy_threshold=0.8 -o register.min_improvement=0.02
    """
    from ftlib.registry.register import gate as run_gate

    params = _params(params_file, overrides)
    g = run_gate(params, metrics, data_dir, adapter, json_out)
    if g.already:
        out.print(f"already registered as {g.already}: the gate decided then ({'passed' if g.passed else 'refused'}); "
                  "nothing re-scored, no run rewritten")
    else:
        _wide(_gate_table(g))
    for r in g.reasons:
        out.print(f"[red]refused:[/] {r}")
    out.print(f"decision in MLflow run {g.run_id}; wrote {json_out}")
    raise typer.Exit(0 if g.passed else 3)


@app.command()
def register(
    adapter: Path = typer.Option(Path("models/adapter"), "--adapter", help="The trained adapter (logged as the pyfunc model)."),
    data_dir: Path = typer.Option(Path("data/splits"), "--data-dir"),
    reports: Path = typer.Option(Path("reports"), "--reports", help="metrics.json (required), benchmark.json, plots, ..."),
    quantized: Path = typer.Option(Path("models/quantized"), "--quantized", help="GGUF files; the shippable ones are logged."),
    merged: Path = typer.Option(Path("models/merged"), "--merged", help="Merged model (logged when register.log_merged)."),
    validation_report: Path = typer.Option(Path("data/validated/report.json"), "--validation-report", help="Logged with the run."),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Also write {status, name, version, run_id, uri} here."),
    force: bool = typer.Option(False, "--force", help="Register even if the gate refuses (needs --reason; the version is tagged forced)."),
    reason: str = typer.Option("", "--reason", help="Why --force."),
    params_file: Path = ParamsOpt,
    overrides: Optional[list[str]] = SetOpt,
) -> None:
    """Gate the candidate, then register it in MLflow as `challenger` with artifacts, model card and lineage.

    Idempotent: the same training output (same splits, params, code and adapter weights) is registered once; a rerun after an interruption finishes the same version. Any MLFLOW_TRACKING_URI works (default sqlite:///mlflow.db). Exit 0 registered or already registered, 3 refused by the gate, 2 error.

    [b]Examples[/]

      ftlib register

      MLFLOW_TRACKING_URI=http://mlflow:5000 ftlib register

      ftlib register --force --reason "hotfix: old champion broke on new labels"
    """
    from ftlib.registry.register import register as run_register

    params = _params(params_file, overrides)
    r = run_register(params, adapter, data_dir, reports, quantized, merged, validation_report, force=force, reason=reason,
                     record=json_out)
    _print_registration(r)
    if r.version:
        out.print(f"next: ftlib lineage models:/{r.name}/{r.version} | ftlib promote {r.name} --version {r.version} --reason '...'")
    raise typer.Exit(3 if r.status == "refused" else 0)


@app.command()
def promote(
    name: str = typer.Argument(..., help="Registered model name (params.yaml register.model_name)."),
    version: Optional[str] = typer.Option(None, "--version", help="Version number to make champion."),
    alias: Optional[str] = typer.Option(None, "--alias", help="Or the alias that points at it, e.g. challenger."),
    rollback: bool = typer.Option(False, "--rollback", help="Point champion back at the previous champion."),
    reason: str = typer.Option("", "--reason", "-r", help="Why (recorded as a version tag)."),
    force: bool = typer.Option(False, "--force", help="Promote a version that failed the gate (needs --reason)."),
) -> None:
    """Move the `champion` alias (who, when and why become version tags) or roll it back.

    The previous champion keeps the `previous-champion` alias; rollbacks walk back through the promotion history.

    [b]Examples[/]

      ftlib promote ftlib-sentiment --alias challenger --reason "beats v3 by 4 points"

      ftlib promote ftlib-sentiment --version 3

      ftlib promote ftlib-sentiment --rollback --reason "complaints about NEUTRAL"
    """
    from ftlib.registry.promote import promote as run_promote
    from ftlib.registry.promote import rollback as run_rollback
    from ftlib.registry.register import client

    c = client()
    if rollback:
        if version or alias:
            raise ValueError("--rollback takes no --version/--alias")
        r = run_rollback(c, name, reason)
        out.print(f"[green]rolled back:[/] {name} @champion v{r['previous']} -> v{r['version']}")
    else:
        r = run_promote(c, name, version, alias, reason, force)
        if not r["changed"]:
            out.print(f"{name} v{r['version']} is already @champion; nothing changed")
        else:
            out.print(f"[green]promoted:[/] {name} @champion -> v{r['version']}" + (f" (previous champion v{r['previous']} is @previous-champion)" if r["previous"] else ""))


models_app = typer.Typer(help="Registered models: list versions with aliases, gate results, scores and data hashes.",
                         no_args_is_help=True, context_settings={"help_option_names": ["-h", "--help"]})
app.add_typer(models_app, name="models")


@models_app.command("list")
def models_list(name: str = typer.Argument(..., help="Registered model name.")) -> None:
    """Versions of a registered model, newest first.

    [b]Examples[/]

      ftlib models list ftlib-sentiment
    """
    from ftlib.registry.promote import versions
    from ftlib.registry.register import client

    rows = versions(client(), name)
    t = Table(title=f"{name}: {len(rows)} version(s)")
    for col in ("version", "aliases", "gate", "score", "f1", "test md5", "train md5", "created (UTC)", "promoted", "run"):
        t.add_column(col)
    for r in rows:
        t.add_row(r["version"] + ("" if r["complete"] else " (incomplete)"), ", ".join(r["aliases"]), r["gate"], r["score"] or "-",
                  r["f1"] or "-", r["test_md5"], r["train_md5"], r["created"], r["promoted"], r["run_id"][:10])
    out.print(t)


@models_app.command("pull")
def models_pull(
    uri: str = typer.Argument(..., help="models:/NAME@ALIAS or models:/NAME/VERSION"),
    out_dir: Path = typer.Option(Path("deploy"), "--out", help="Where the GGUF files and the Modelfile go."),
) -> None:
    """Download a version's shipped GGUF files and Ollama Modelfile (pointing at the smallest shippable GGUF).

    [b]Examples[/]

      ftlib models pull models:/ftlib-sentiment@champion --out deploy

      cd deploy && ollama create sentiment -f Modelfile && ollama run sentiment "Loved it"

      python -m llama_cpp.server --model deploy/model-q8_0.gguf --port 8081
    """
    from ftlib.registry.pull import pull_gguf

    files = pull_gguf(uri, out_dir)
    for f in files:
        out.print(f"{f}  ({f.stat().st_size / 2**20:,.1f} MiB)")


@app.command()
def lineage(
    uri: str = typer.Argument(..., help="models:/NAME/VERSION or models:/NAME@ALIAS"),
    check: bool = typer.Option(False, "--check", help="Compare the split files in --data-dir with the recorded hashes (exit 1 on mismatch)."),
    data_dir: Path = typer.Option(Path("data/splits"), "--data-dir"),
) -> None:
    """Trace a registered version back to its data: version -> run -> params -> split hashes -> raw data -> stages, and the commands that rebuild it.

    [b]Examples[/]

      ftlib lineage models:/ftlib-sentiment@champion

      ftlib lineage models:/ftlib-sentiment/3 --check
    """
    from ftlib.core import lineage as lin
    from ftlib.registry.register import client, get_version

    mv = get_version(client(), uri)
    info = lin.of(mv.tags)
    for line in lin.chain(mv.name, str(mv.version), list(mv.aliases), mv.run_id, mv.tags):
        out.print(line, markup=False)
    out.print("[b]rebuild[/]")
    for cmd in lin.rebuild_commands(info, mv.name, str(mv.version)):
        out.print(f"  {cmd}", markup=False)
    if check:
        rows = lin.check(info, data_dir)
        t = Table(title=f"{data_dir} against {mv.name} v{mv.version}")
        for col in ("split", "recorded md5", "on disk", "same"):
            t.add_column(col)
        for s, want, have, same in rows:
            t.add_row(s, want, have, "[green]yes[/]" if same else "[red]no[/]")
        out.print(t)
        if not rows or not all(r[3] for r in rows):
            err.print("[red]the split files differ from the ones this version was trained and scored on[/]")
            raise typer.Exit(1)


@app.command()
def serve(
    model: str = typer.Option(..., "--model", "-m", help="models:/NAME@ALIAS or models:/NAME/VERSION."),
    host: str = typer.Option("127.0.0.1", "--host", help="Beyond loopback, set FTLIB_SERVE_TOKEN (bearer token) too."),
    port: int = typer.Option(8000, "--port", help="Checked before the model loads (Airflow's webserver has 8080)."),
    runtime: str = typer.Option("transformers", "--runtime", help="transformers (base + adapter) or llama.cpp (the version's shipped GGUF)."),
    max_queue: int = typer.Option(32, "--max-queue", min=0, help="Requests that may wait for the model; one more gets 503."),
    max_new_tokens: int = typer.Option(512, "--max-new-tokens", min=1, help="Clamp for max_tokens (and the context left)."),
    timeout: float = typer.Option(120.0, "--timeout", min=1, help="Seconds a request may wait for the model before 503."),
) -> None:
    """Serve a registered model over HTTP (FastAPI on uvicorn): OpenAI-style /v1/chat/completions, MLflow-style /invocations, /health.

    The alias is resolved at start: restart after `ftlib promote` or a rollback to serve the new champion. Requests queue for the model (one at a time on a CPU); the body, inputs, prompt length and max_tokens are bounded, and a client's mistake is a 400.

    [b]Examples[/]

      ftlib serve --model models:/ftlib-sentiment@champion

      curl -s localhost:8000/v1/chat/completions -d '{"messages": [{"role": "user", "content": "Loved it!"}]}'

      curl -s localhost:8000/invocations -d '{"inputs": ["Loved it!", "Never again."]}'

      FTLIB_SERVE_TOKEN=s3cret ftlib serve -m models:/ftlib-sentiment@champion --runtime llama.cpp --host 0.0.0.0
    """
    from ftlib.registry.pull import load_version
    from ftlib.serving.serve import Limits, check_port
    from ftlib.serving.serve import serve as run_serve

    check_port(host, port)
    loaded, mv = load_version(model, runtime)
    run_serve(loaded, mv, model, host, port, runtime, Limits(max_queue=max_queue, max_new_tokens=max_new_tokens, deadline_s=timeout))


def _print_summary(reports: Path = Path("reports"), splits: Path = Path("data/splits")) -> None:
    """What the run produced and decided (ftlib.registry.summary, as the DAG's summary task; also reports/summary.md)."""
    from ftlib.registry.summary import rows, summary

    t = Table(title=f"this run ({reports / 'summary.md'})")
    t.add_column("")
    t.add_column("", justify="right")
    for label, value in rows(summary(reports, splits)):
        t.add_row(label, value)
    out.print(t)


def _outputs_table() -> Table:
    """Where every output of dvc.yaml went, and its size."""
    from ftlib.registry.pipeline import outputs

    table = Table(title="pipeline outputs")
    for col in ("stage", "output", "size"):
        table.add_column(col, justify="right" if col == "size" else "left")
    for stage, path, size in outputs():
        table.add_row(stage, path, "missing" if size is None else f"{size / 1024:,.1f} KiB")
    return table


@app.command("run")
def run_pipeline(
    force: bool = typer.Option(False, "--force", "-f", help="Re-run every stage even if nothing changed."),
    do_register: bool = typer.Option(True, "--register/--no-register", help="Gate and register the result in MLflow at the end."),
    profile: str = typer.Option("full", "--profile", "-P",
                                help="full: the pipeline through DVC. smoke: every stage for real, cut to seconds (8 training "
                                     "steps, q8_0 only, 16 benchmark rows, no base model), outputs in runs/smoke/, nothing "
                                     "gated or registered: a ~3-minute check that the whole pipeline works."),
    params_file: Path = typer.Option(Path("params.yaml"), "--params", "-p", help="params.yaml to read (profile smoke)."),
) -> None:
    """Run the whole pipeline locally through DVC (`dvc repro`), list where every output went, then gate and register.

    DVC skips stages whose data, code and params did not change, so a second run is instant (and registers nothing new: the same training output is registered once). The model is registered as `challenger` only if the gate passes; its lineage is printed. Run it from the project root (where dvc.yaml is). `--profile smoke` runs the same stages in this process instead, into runs/smoke/, leaving DVC's outputs and the registry alone.

    [b]Examples[/]

      ftlib run

      ftlib run --force

      ftlib run --no-register

      ftlib run --profile smoke
    """
    import json

    from ftlib.core.config import get_profile
    from ftlib.registry.pipeline import repro, run_profile
    from ftlib.registry.register import register as run_register
    from ftlib.stages.benchmark import table as bench_table

    chosen = get_profile(profile)
    if chosen.root:
        where = run_profile(_params(params_file, list(chosen.overrides)), chosen)
        Console(width=max(out.width, 150)).print(bench_table(json.loads((where["reports"] / "benchmark.json").read_text())))
        _print_summary(where["reports"], where["splits"])
        out.print(f"profile {chosen.name}: outputs in {chosen.root}/; nothing was gated or registered")
        return
    out.print("$ dvc repro" + (" --force" if force else ""))
    if (code := repro(force)) != 0:
        err.print(f"[red]pipeline failed[/] (dvc repro exit {code}); see the messages above")
        raise typer.Exit(1)
    out.print(_outputs_table())
    if Path("reports/benchmark.json").is_file():
        Console(width=max(out.width, 150)).print(bench_table(json.loads(Path("reports/benchmark.json").read_text())))
    r = run_register(_params(Path("params.yaml"), None), record=Path("reports/registration.json")) if do_register else None
    if r is not None:
        _print_registration(r)
    _print_summary()
    if r is not None and r.status == "refused":
        out.print(f"the decision and every score are in MLflow run {r.run_id} and reports/gate.json; "
                  "improve the data or the training params and rerun (docs/model-quality.md)")
    elif r is not None:
        lineage(f"models:/{r.name}/{r.version}", check=False, data_dir=Path("data/splits"))
        out.print(f"promote it: ftlib promote {r.name} --version {r.version} --reason '...'")
    out.print("see also: dvc metrics show | dvc plots show | ftlib models list NAME | mlflow ui --backend-store-uri sqlite:///mlflow.db")


# ---------------------------------------------------------------------------
# Errors -> exit codes, in one place. Every command runs through `_handled`: an error a user can act on
# prints one message and exits with its code; anything else is a bug and keeps its traceback.
#   0 done   1 the data, the model run or the disk failed   2 usage: a bad param, path, model or registry
#   3 the gate refused (gate, register)      FTLIB_DEBUG=1 shows the traceback of every error.

def exit_code(e: BaseException) -> int | None:
    """The exit code of an error a user can act on; None for a bug."""
    from ftlib.core.atomic import DiskFullError, is_disk_full
    from ftlib.core.errors import InvalidData, ModelError
    from ftlib.core.tracking import RegistryError, is_locked_store

    if isinstance(e, (InvalidData, DiskFullError)) or is_disk_full(e) or is_locked_store(e):
        return 1
    if isinstance(e, (ModelError, RegistryError, ValueError, OSError)):  # ConfigError, PathError, UsageError: ValueErrors
        return 2
    if isinstance(e, RuntimeError):  # a stage that could not finish (training, quantization) and says why
        return 1
    return None


def _report(e: BaseException) -> None:
    from ftlib.core.atomic import DiskFullError, is_disk_full
    from ftlib.core.errors import InvalidData
    from ftlib.core.tracking import is_locked_store

    if isinstance(e, InvalidData):  # the FILE:LINE: RULE: message lines, then one verdict
        _print_issues(e)
        errors = sum(getattr(i, "severity", "error") != "warning" for i in e.issues)
        verdict = (f"{e.path} is not valid data; run `ftlib validate {e.path}`" if e.path
                   else f"{errors} problem(s); nothing written, nothing logged" if e.issues else str(e))
        out.print(f"[red]refused:[/] {escape(verdict)}")
    elif isinstance(e, DiskFullError):
        err.print(f"[red]error:[/] {escape(e.strerror)}")
    elif is_disk_full(e):
        err.print(f"[red]error:[/] disk full: {escape(str(e))}")
    elif is_locked_store(e):
        err.print("[red]error:[/] the MLflow SQLite store is locked by another process (still after sqlite's busy "
                  "timeout); let it finish (or stop it) and rerun")
    else:
        err.print(f"[red]error:[/] {escape(str(e))}")


def _handled(command: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(command)
    def run(*args: Any, **kwargs: Any) -> Any:
        try:
            return command(*args, **kwargs)
        except (typer.Exit, typer.Abort, KeyboardInterrupt):
            raise
        except Exception as e:
            code = exit_code(e)
            if code is None or os.environ.get("FTLIB_DEBUG"):
                raise
            _report(e)
            raise typer.Exit(code) from None

    return run


for _typer in (app, review_app, models_app):
    for _info in _typer.registered_commands:
        _info.callback = _handled(_info.callback)


def entrypoint() -> None:
    """Entry point for `ftlib` and `python -m ftlib`."""
    app()
