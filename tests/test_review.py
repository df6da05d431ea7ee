"""Qualitative review: export a sheet, rate it, import the ratings into MLflow; bad sheets refused."""

import csv
import json
import re
from pathlib import Path

import pytest
from typer.testing import CliRunner

from ftlib.cli import app
from ftlib.stages.review import COLUMNS, SheetError, check_sheet, export_sheet, import_sheet
from tests.conftest import REPO, make_splits

LABELS = ["POSITIVO", "NEGATIVO", "NEUTRAL"]
runner = CliRunner()


@pytest.fixture(scope="module")
def splits(tmp_path_factory):
    return make_splits(tmp_path_factory.mktemp("review-splits"), n_test=6)


def client():
    from mlflow.tracking import MlflowClient

    return MlflowClient()  # the temp store conftest points MLFLOW_TRACKING_URI at


def fill(sheet: Path, ratings: list) -> Path:
    with sheet.open(encoding="utf-8-sig", newline="") as f:
        rows = list(csv.DictReader(f))
    for row, rating in zip(rows, ratings):
        row["rating"] = str(rating)
    with sheet.open("w", encoding="utf-8", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    return sheet


def test_export_then_import_logs_to_the_training_run(tiny_adapter, splits, tmp_path):
    sheet = export_sheet(tiny_adapter, splits / "test.jsonl", tmp_path / "review.csv", n=4, max_new_tokens=4)
    with sheet.open(encoding="utf-8-sig", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 4 and list(rows[0]) == COLUMNS and all(r["rating"] == "" for r in rows)
    assert rows[0]["prompt"].startswith("Clasifica el sentimiento\n\n") and rows[0]["expected"] in LABELS
    again = export_sheet(tiny_adapter, splits / "test.jsonl", tmp_path / "again.csv", n=4, max_new_tokens=4)
    assert again.read_text(encoding="utf-8-sig") == sheet.read_text(encoding="utf-8-sig")  # same seed, same rows

    r = import_sheet(fill(sheet, [5, 4, 4, 2]), tiny_adapter)
    run_id = json.loads((Path(tiny_adapter) / "ftlib_train.json").read_text())["mlflow_run_id"]
    assert run_id and r.run_id == run_id and not r.new_run and not r.already_logged
    metrics = client().get_run(run_id).data.metrics
    assert metrics["review_rating_mean"] == pytest.approx(3.75) and metrics["review_rating_count"] == 4
    assert [metrics[f"review_rating_{k}"] for k in range(1, 6)] == [0, 1, 0, 2, 1]

    assert import_sheet(sheet, tiny_adapter).already_logged  # the same file twice is logged once
    assert len(client().get_metric_history(run_id, "review_rating_mean")) == 1


def test_model_without_a_run_gets_one_tagged_review_run(tmp_path):
    model = str(tmp_path / "some-model")  # import never loads the model
    first = tmp_path / "a.csv"
    first.write_text("id,prompt,rating\n1,hola,3\n2,adiós,5\n", encoding="utf-8")
    r1 = import_sheet(first, model)
    assert r1.new_run and r1.mean == 4.0
    run = client().get_run(r1.run_id)
    assert run.data.tags["ftlib.model"] == model and run.data.tags["ftlib.stage"] == "review"

    second = tmp_path / "b.csv"
    second.write_text("id,prompt,rating\n1,hola,1\n", encoding="utf-8")
    r2 = import_sheet(second, model)
    assert r2.run_id == r1.run_id and not r2.new_run  # one review run per model
    history = client().get_metric_history(r1.run_id, "review_rating_mean")
    assert sorted((m.step, m.value) for m in history) == [(0, 4.0), (1, 1.0)]


BAD_SHEET = (
    'id,line,prompt,expected,predicted,rating,comment\n'
    '1,3,"Clasifica el sentimiento\n\nme encanta",POSITIVO,POSITIVO,5,\n'  # one row over lines 2-4
    '2,4,texto,NEGATIVO,NEUTRAL,6,\n'
    '3,5,texto,NEUTRAL,NEUTRAL,bueno,\n'
    '4,6,texto,NEUTRAL,NEUTRAL,,sin nota\n'
    '5,7,texto,NEUTRAL,NEUTRAL,3.5,\n'
)


def test_bad_ratings_are_refused_with_file_line_rule(tmp_path):
    sheet = tmp_path / "bad.csv"
    sheet.write_text(BAD_SHEET, encoding="utf-8")
    model = "org/never-reviewed"
    with pytest.raises(SheetError) as e:
        import_sheet(sheet, model)
    assert [(i.line, i.rule) for i in e.value.issues] == [(5, "rating"), (6, "rating"), (7, "missing-rating"), (8, "rating")]

    r = runner.invoke(app, ["review", "import", str(sheet), "--model", model, "--allow-missing"])
    assert r.exit_code == 1 and "Traceback" not in r.output
    problems = [line for line in r.output.splitlines() if line.startswith(str(sheet))]
    assert len(problems) == 3 and re.fullmatch(rf"{re.escape(str(sheet))}:5: rating: '6' is not .+", problems[0])
    assert "nothing logged" in r.output
    experiments = [x.experiment_id for x in client().search_experiments()]
    logged = [run for run in client().search_runs(experiments) if run.data.tags.get("ftlib.model") == model]
    assert logged == []

    r = runner.invoke(app, ["review", "import", str(tmp_path / "missing.csv"), "--model", model])
    assert r.exit_code == 2 and "no such file" in r.output


def test_sheet_formats(tiny_model, tmp_path):
    excel = tmp_path / "excel.csv"  # a spreadsheet in a Spanish locale saves with ';' and a BOM
    excel.write_bytes("\ufeffid;prompt;rating\n1;\"a; b\";4.0\n2;c;2\n\n".encode())
    assert check_sheet(excel) == [4, 2]
    no_column = tmp_path / "cols.csv"
    no_column.write_text("id,prompt\n1,a\n")
    with pytest.raises(SheetError, match=r"cols.csv:1: columns: no `rating` column"):
        check_sheet(no_column)
    empty = tmp_path / "empty.csv"
    empty.write_text("id,rating\n1,\n")
    with pytest.raises(SheetError, match="no-ratings"):
        check_sheet(empty, allow_missing=True)

    page = export_sheet(tiny_model, REPO / "data" / "raw" / "sentiment.jsonl", tmp_path / "review.html", n=2, max_new_tokens=4)
    text = page.read_text()
    assert text.count('<td class="rating" contenteditable="true"></td>') == 2 and "Save as CSV" in text
    page.write_text(text.replace('<td class="rating" contenteditable="true"></td>',
                                 '<td class="rating" contenteditable="true">4<br></td>'))
    assert check_sheet(page) == [4, 4]


def test_review_cli_round_trip(tiny_model, splits, tmp_path):
    sheet = tmp_path / "r.csv"
    r = runner.invoke(app, ["review", "export", "-m", tiny_model, "-d", str(splits / "test.jsonl"), "--out", str(sheet),
                            "-n", "3", "--max-new-tokens", "4", "-p", str(REPO / "params.yaml")])
    assert r.exit_code == 0, r.output
    assert "wrote" in r.output and "ftlib review import" in r.output
    r = runner.invoke(app, ["review", "import", str(fill(sheet, [2, 3, 4])), "-m", tiny_model])
    assert r.exit_code == 0, r.output
    assert "mean rating 3.00/5 over 3 rows" in r.output
