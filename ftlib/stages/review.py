"""Qualitative review (course notes 6.2) without a pipeline waiting on input().

The notes print each case and ask for a 1-5 rating with input(); a pipeline cannot
stop for that. Here the review is two steps a person does in between:

  export  sample N examples, let the model answer them, write a sheet (CSV or HTML)
          with an empty `rating` column;
  import  read the filled sheet back, check every rating, and log the mean, the count
          and the distribution to the model's MLflow run.

A sheet with any bad rating is refused as a whole (FILE:LINE: RULE: message, like
`ftlib validate`) and nothing is logged. Importing the same sheet twice logs it once.
"""

from __future__ import annotations

import csv
import hashlib
import html
import io
import random
from dataclasses import dataclass, field
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

from ftlib.core.errors import InvalidData
from ftlib.core.formats import Issue, read_examples
from ftlib.core.security import redact_url

COLUMNS = ["id", "line", "prompt", "expected", "predicted", "rating", "comment"]
RATINGS = (1, 2, 3, 4, 5)


class SheetError(InvalidData):
    """A filled sheet that cannot be imported; `issues` say where and why."""

    def __init__(self, issues: list[Issue]):
        super().__init__("\n".join(str(i) for i in issues), issues)


@dataclass
class ReviewResult:
    sheet: str
    ratings: list[int]
    distribution: dict[int, int]
    run_id: str
    new_run: bool  # no ftlib_train.json run id: a review run was opened for the model
    already_logged: bool  # this exact sheet was imported into this run before
    metrics: dict[str, float] = field(default_factory=dict)

    @property
    def mean(self) -> float:
        return sum(self.ratings) / len(self.ratings)


# ---------------------------------------------------------------------------
# Export

def _prompt_text(messages: list[dict[str, str]]) -> str:
    """One user turn as is; a longer conversation as `role: content` paragraphs."""
    if len(messages) == 1:
        return messages[0]["content"]
    return "\n\n".join(f"{m['role']}: {m['content']}" for m in messages)


def export_sheet(model: str, data: str | Path, out: str | Path, n: int = 20, seed: int = 3407, template: str = "chat",
                 batch_size: int = 8, max_new_tokens: int = 256, progress: Any = None) -> Path:
    """Write N sampled (prompt, expected, predicted) rows with an empty rating column.

    `out` ending in .html/.htm gives a page to fill in a browser (editable rating and
    comment cells, a button that saves the filled sheet as CSV); anything else gives CSV.
    The sample depends only on `seed` and the data, so a re-export gives the same rows.
    """
    from ftlib.serving.generate import load_predictor

    examples = read_examples(data)
    picked = sorted(random.Random(seed).sample(range(len(examples)), min(n, len(examples))))
    sample = [examples[i] for i in picked]
    predictor = load_predictor(model, template)
    answers = predictor.generate([e.prompt_messages for e in sample], max_new_tokens=max_new_tokens,
                                 batch_size=batch_size, progress=progress)
    rows = [{"id": i, "line": e.line, "prompt": _prompt_text(e.prompt_messages), "expected": e.output,
             "predicted": a.text, "rating": "", "comment": ""} for i, (e, a) in enumerate(zip(sample, answers), start=1)]
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    if path.suffix.lower() in (".html", ".htm"):
        tmp.write_text(_html_sheet(rows, model, str(data)), encoding="utf-8")
    else:
        # utf-8-sig: spreadsheet programs then read the accents right.
        with tmp.open("w", newline="", encoding="utf-8-sig") as f:
            writer = csv.DictWriter(f, fieldnames=COLUMNS)
            writer.writeheader()
            writer.writerows(rows)
    tmp.replace(path)
    return path


_PAGE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>ftlib review: {model}</title>
<style>
body {{ font-family: sans-serif; margin: 2em; }}
table {{ border-collapse: collapse; }}
th, td {{ border: 1px solid #bbb; padding: .4em; vertical-align: top; white-space: pre-wrap; max-width: 40em; }}
td.rating, td.comment {{ background: #fffbe6; min-width: 4em; }}
</style></head><body>
<h1>Review of {model}</h1>
<p>Data: {data}. Rate each predicted answer from 1 (useless) to 5 (perfect) in the yellow
<b>rating</b> column (comments optional), then press <b>Save as CSV</b> and run
<code>ftlib review import &lt;saved file&gt; --model {model}</code>.</p>
<button onclick="saveCsv()">Save as CSV</button>
<table id="review">
<thead><tr>{header}</tr></thead>
<tbody>
{body}
</tbody></table>
<script>
function saveCsv() {{
  const quote = s => '"' + s.replace(/"/g, '""') + '"';
  const rows = [...document.querySelectorAll("#review tr")].map(
    tr => [...tr.children].map(td => quote(td.innerText.trim())).join(","));
  const blob = new Blob(["\\ufeff" + rows.join("\\r\\n") + "\\r\\n"], {{type: "text/csv"}});
  const a = document.createElement("a");
  a.href = URL.createObjectURL(blob);
  a.download = "review.csv";
  a.click();
}}
</script>
</body></html>
"""


def _html_sheet(rows: list[dict[str, Any]], model: str, data: str) -> str:
    def cell(col: str, value: Any) -> str:
        editable = ' contenteditable="true"' if col in ("rating", "comment") else ""
        return f'<td class="{col}"{editable}>{html.escape(str(value))}</td>'

    body = "\n".join("<tr>" + "".join(cell(c, r[c]) for c in COLUMNS) + "</tr>" for r in rows)
    return _PAGE.format(model=html.escape(model), data=html.escape(data),
                        header="".join(f"<th>{c}</th>" for c in COLUMNS), body=body)


# ---------------------------------------------------------------------------
# Import: read the sheet, check it, log it

class _TableReader(HTMLParser):
    """Rows of the first <table> as (source line, [cell texts]); <br> and blocks become newlines."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.rows: list[tuple[int, list[str]]] = []
        self._tables = 0
        self._cell: list[str] | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "table":
            self._tables += 1
        elif self._tables == 1 and tag == "tr":
            self.rows.append((self.getpos()[0], []))
        elif self._tables == 1 and tag in ("td", "th") and self.rows:
            self._cell = []
        elif self._cell is not None and tag in ("br", "div", "p"):
            self._cell.append("\n")

    def handle_endtag(self, tag: str) -> None:
        if tag in ("td", "th") and self._cell is not None:
            self.rows[-1][1].append("".join(self._cell).strip())
            self._cell = None

    def handle_data(self, data: str) -> None:
        if self._cell is not None:
            self._cell.append(data)


def read_sheet(path: str | Path) -> tuple[list[str], list[tuple[int, dict[str, str]]]]:
    """(header, [(line, row)]) of a CSV (comma, semicolon or tab) or an HTML sheet.

    Raises SheetError for a file that is missing, not UTF-8, empty or has no header.
    """
    name = str(path)
    try:
        text = Path(path).read_bytes().decode("utf-8-sig")
    except (FileNotFoundError, IsADirectoryError):
        raise FileNotFoundError(f"{name}: no such file") from None
    except OSError as e:
        raise SheetError([Issue(name, 0, "unreadable", e.strerror or str(e))]) from None
    except UnicodeDecodeError as e:
        line = e.object[: e.start].count(b"\n") + 1
        raise SheetError([Issue(name, line, "encoding", f"not UTF-8: byte 0x{e.object[e.start]:02x}; save the sheet as UTF-8")]) from None
    if not text.strip():
        raise SheetError([Issue(name, 0, "empty-file", "the sheet is empty")])

    if Path(path).suffix.lower() in (".html", ".htm"):
        parser = _TableReader()
        parser.feed(text)
        parser.close()
        lines = parser.rows
    else:
        # Spreadsheets in some locales save with ';' (or tabs): take what the header uses.
        delimiter = max(",;\t", key=text.splitlines()[0].count)
        reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter)
        lines, start = [], 1
        for cells in reader:
            lines.append((start, cells))
            start = reader.line_num + 1  # a quoted cell may span lines: a row starts after the last one
    if not lines:
        raise SheetError([Issue(name, 0, "empty-file", "no table in the sheet")])
    header = [h.strip().lower() for h in lines[0][1]]
    rows = [(line, dict(zip(header, cells))) for line, cells in lines[1:] if any(c.strip() for c in cells)]
    return header, rows


def parse_rating(value: str) -> int | None:
    """'4', ' 4 ', '4.0' -> 4; anything else (3.5, 6, 'good') -> None."""
    try:
        number = float(value.strip().replace(",", "."))
    except ValueError:
        return None
    return int(number) if number.is_integer() and int(number) in RATINGS else None


def check_sheet(path: str | Path, allow_missing: bool = False) -> list[int]:
    """The ratings of a filled sheet, or SheetError listing every bad row."""
    name = str(path)
    header, rows = read_sheet(path)
    if "rating" not in header:
        raise SheetError([Issue(name, 1, "columns", f"no `rating` column; found: {', '.join(header) or 'none'}")])
    issues, ratings = [], []
    for line, row in rows:
        value = (row.get("rating") or "").strip()
        if not value:
            if not allow_missing:
                issues.append(Issue(name, line, "missing-rating", "no rating; rate 1-5 (or import with --allow-missing)"))
            continue
        rating = parse_rating(value)
        if rating is None:
            issues.append(Issue(name, line, "rating", f"{value!r} is not a whole number from 1 to 5"))
        else:
            ratings.append(rating)
    if not issues and not ratings:
        issues.append(Issue(name, 0, "no-ratings", "no row has a rating"))
    if issues:
        raise SheetError(issues)
    return ratings


def _model_tag(model: str) -> str:
    """The model as tagged on a review run: an absolute path for local directories."""
    path = Path(model).expanduser()
    return str(path.resolve()) if path.exists() else model


def _review_run(client: Any, model: str) -> tuple[str, bool]:
    """The model's MLflow run: ftlib_train.json's `mlflow_run_id`, else a review run tagged with the model.

    The tagged run is reused on the next import, so a model has one review run, not one per sheet.
    """
    import os

    from mlflow.exceptions import MlflowException

    from ftlib.core.models import train_info

    info = train_info(model) or {}
    if info.get("mlflow_run_id"):
        run_id = info["mlflow_run_id"]
        try:
            client.get_run(run_id)
        except MlflowException:  # the run lives in another tracking store
            raise ValueError(f"{model}: MLflow run {run_id} (from ftlib_train.json) is not in {redact_url(client.tracking_uri)}; "
                             "set MLFLOW_TRACKING_URI to the store `ftlib train` used") from None
        return run_id, False
    exp_name = os.environ.get("MLFLOW_EXPERIMENT_NAME", "ftlib")
    exp = client.get_experiment_by_name(exp_name)
    exp_id = exp.experiment_id if exp is not None else client.create_experiment(exp_name)
    tag = _model_tag(model)
    for run in client.search_runs([exp_id], filter_string="tags.`ftlib.stage` = 'review'"):
        if run.data.tags.get("ftlib.model") == tag:
            return run.info.run_id, False
    run = client.create_run(exp_id, tags={"ftlib.model": tag, "ftlib.stage": "review", "mlflow.runName": f"review {Path(tag).name}"})
    client.set_terminated(run.info.run_id)
    return run.info.run_id, True


def import_sheet(path: str | Path, model: str, allow_missing: bool = False) -> ReviewResult:
    """Check a filled sheet and log its ratings to the model's MLflow run.

    Metrics: review_rating_mean, review_rating_count, review_rating_1 ... _5 (how many
    rows got each rating). Raises SheetError (nothing logged) on any bad rating, and
    ValueError when the model's run is not in the tracking store.
    """
    from mlflow.tracking import MlflowClient

    from ftlib.core.tracking import setup_tracking

    ratings = check_sheet(path, allow_missing)
    distribution = {r: ratings.count(r) for r in RATINGS}
    metrics = {"review_rating_mean": sum(ratings) / len(ratings), "review_rating_count": float(len(ratings)),
               **{f"review_rating_{r}": float(c) for r, c in distribution.items()}}
    setup_tracking()
    client = MlflowClient()
    run_id, new_run = _review_run(client, model)
    # One tag per imported sheet, keyed by its content hash: a second import of the same
    # file is recognized and skipped; a new sheet is logged at the next step.
    tag = "ftlib.review.sheet." + hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]
    tags = client.get_run(run_id).data.tags
    if tag in tags:
        return ReviewResult(str(path), ratings, distribution, run_id, new_run, True, metrics)
    step = sum(k.startswith("ftlib.review.sheet.") for k in tags)
    for key, value in metrics.items():
        client.log_metric(run_id, key, value, step=step)
    client.set_tag(run_id, tag, str(Path(path).resolve()))
    return ReviewResult(str(path), ratings, distribution, run_id, new_run, False, metrics)
