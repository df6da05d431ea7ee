"""`ftlib` command line: one subcommand per pipeline stage, each a thin call into its module.

Exit codes (DESIGN.md): 0 ok, 1 invalid data, 2 usage error.
"""

from __future__ import annotations

import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Optional

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from ftlib import __version__

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


def _params(path: Path, overrides: Optional[list[str]]):
    from ftlib.config import ConfigError, load_params

    try:
        return load_params(path, overrides or [])
    except ConfigError as e:
        err.print(f"[red]error:[/] {e}")
        raise typer.Exit(2)


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
    for i in result.issues:
        suffix = " (warning)" if i.severity == "warning" else ""
        out.print(f"{i}{suffix}", markup=False)


def _summary(result) -> Table:
    from collections import Counter

    table = Table(title="validation summary")
    for col in ("file", "lines", "valid", "errors", "warnings"):
        table.add_column(col, justify="left" if col == "file" else "right")
    bad = result.bad_lines()
    rows = Counter(r.file for r in result.rows)
    valid = Counter(r.file for r in result.rows if (r.file, r.line) not in bad)
    parsed = {(r.file, r.line) for r in result.rows}
    unparsed = Counter(f for f, line in {(i.file, i.line) for i in result.issues if i.line > 0} if (f, line) not in parsed)
    sev = Counter((i.file, i.severity) for i in result.issues)
    for f in result.files:
        table.add_row(f, str(rows[f] + unparsed[f]), str(valid[f]), str(sev[(f, "error")]), str(sev[(f, "warning")]))
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
    report_dir: Optional[Path] = typer.Option(Path("data/validated"), "--report-dir", help="Where report.json, quarantine.jsonl and data_docs/ go."),
    no_report: bool = typer.Option(False, "--no-report", help="Only print; write nothing."),
    json_out: bool = typer.Option(False, "--json", help="Print the report as JSON instead of tables."),
    params_file: Path = ParamsOpt,
    overrides: Optional[list[str]] = SetOpt,
) -> None:
    """Check instruction data (alpaca or chat JSONL) against the data contract, with Great Expectations.

    Every problem prints as FILE:LINE: RULE: message (LINE 0 = whole file). Exit 0 valid, 1 invalid data, 2 usage error. Raw files are never modified; bad rows are copied with their reasons to quarantine.jsonl.

    [b]Examples[/]

      ftlib validate data/raw/

      ftlib validate new_batch.jsonl --report-dir /tmp/check

      ftlib validate data/samples/support_chat.jsonl -o data.task=generation -o max_seq_length=1024

      ftlib validate data/raw -o validate.duplicates=warning
    """
    from ftlib.models import ModelError
    from ftlib.validate import UsageError, validate_paths

    params = _params(params_file, overrides)
    try:
        with _progress() as tick:
            result = validate_paths(paths, params, None if no_report else report_dir, progress=tick)
    except (UsageError, ModelError) as e:
        err.print(f"[red]error:[/] {e}")
        raise typer.Exit(2)
    if json_out and not no_report:
        out.print_json((report_dir / "report.json").read_text(encoding="utf-8"))
    else:
        _print_issues(result)
        out.print(_summary(result))
        if (rules := _rules_table(result)) is not None:
            out.print(rules)
        verdict = "[green]valid[/]" if result.ok else "[red]INVALID[/]"
        out.print(f"{verdict}: {len(result.valid_rows())} usable examples, {len(result.errors)} errors, "
                  f"{len(result.warnings)} warnings in {result.elapsed_s:.1f}s")
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
    from ftlib.models import ModelError
    from ftlib.split import SPLITS, InvalidData, split_paths
    from ftlib.validate import UsageError

    params = _params(params_file, overrides)
    try:
        with _progress() as tick:
            result = split_paths(paths or [Path("data/raw")], params, out_dir, progress=tick)
    except (UsageError, ModelError) as e:
        err.print(f"[red]error:[/] {e}")
        raise typer.Exit(2)
    except InvalidData as e:
        _print_issues(e.result)
        out.print(f"[red]refused:[/] {e}")
        raise typer.Exit(1)

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


@app.command("run")
def run_pipeline(
    force: bool = typer.Option(False, "--force", "-f", help="Re-run every stage even if nothing changed."),
) -> None:
    """Run the whole pipeline locally through DVC (`dvc repro`), then list where every output went.

    DVC skips stages whose data, code and params did not change, so a second run is instant. Run it from the project root (where dvc.yaml is).

    [b]Examples[/]

      ftlib run

      ftlib run --force
    """
    import os
    import subprocess

    import yaml

    if not Path("dvc.yaml").is_file():
        err.print("[red]error:[/] no dvc.yaml here; run from the project root")
        raise typer.Exit(2)
    bindir = str(Path(sys.executable).parent)
    env = {**os.environ, "PATH": bindir + os.pathsep + os.environ.get("PATH", "")}
    cmd = [sys.executable, "-m", "dvc", "repro", *(["--force"] if force else [])]
    out.print(f"$ {' '.join(['dvc', *cmd[3:]])}")
    code = subprocess.call(cmd, env=env)
    if code != 0:
        err.print(f"[red]pipeline failed[/] (dvc repro exit {code}); see the messages above")
        raise typer.Exit(1)

    table = Table(title="pipeline outputs")
    for col in ("stage", "output", "size"):
        table.add_column(col, justify="right" if col == "size" else "left")
    stages = yaml.safe_load(Path("dvc.yaml").read_text())["stages"]
    for name, stage in stages.items():
        for entry in stage.get("outs", []) + stage.get("metrics", []) + stage.get("plots", []):
            path = Path(next(iter(entry)) if isinstance(entry, dict) else entry)
            files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
            size = sum(p.stat().st_size for p in files)
            table.add_row(name, str(path) + ("/" if path.is_dir() else ""), f"{size / 1024:,.1f} KiB" if files else "missing")
    out.print(table)


def entrypoint() -> None:
    """Entry point for `python -m ftlib`."""
    app()
