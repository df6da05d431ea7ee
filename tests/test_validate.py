"""Every validation rule with a failing and a passing case, on real GX suites."""

import hashlib
import json
import re
from pathlib import Path

import pytest

from ftlib.core.config import load_params
from ftlib.stages.validate import UsageError, validate_paths
from tests.conftest import LABELS, alpaca, balanced, write_jsonl


def run(tmp_path, rows, params, tokenizer, name="d.jsonl", out=None):
    f = write_jsonl(tmp_path / name, rows)
    return f, validate_paths([f], params, out, tokenizer=tokenizer)


def rules(result, severity="error"):
    return sorted({i.rule for i in result.issues if i.severity == severity})


def lines_for(result, rule):
    return sorted(i.line for i in result.issues if i.rule == rule)


def test_sample_data_is_valid(params, tokenizer):
    from tests.conftest import REPO

    result = validate_paths([REPO / "data" / "raw"], params, tokenizer=tokenizer)
    assert result.ok, [str(i) for i in result.issues[:5]]
    assert len(result.rows) >= 1290 and result.stats["labels"] == {"POSITIVO": 430, "NEGATIVO": 430, "NEUTRAL": 430}


def test_generation_sample_sets_are_valid(params, tokenizer):
    from tests.conftest import REPO

    p = load_params(None, ["data.task=generation", "max_seq_length=1024", "validate.data_docs=false"])
    for name in ("support_chat.jsonl", "python_code.jsonl"):
        result = validate_paths([REPO / "data" / "samples" / name], p, tokenizer=tokenizer)
        assert result.ok, [str(i) for i in result.issues[:5]]
        assert len(result.rows) >= 100


@pytest.mark.parametrize("bad, rule", [
    ({"input": "falta la instrucción", "output": "NEUTRAL"}, "required-field"),
    ({"instruction": "Clasifica el sentimiento", "input": "sin salida"}, "required-field"),
    ({"instruction": 7, "input": "x", "output": "NEUTRAL"}, "type"),
    ({"instruction": "Clasifica el sentimiento", "input": ["x"], "output": "NEUTRAL"}, "type"),
    ({"instruction": "Clasifica el sentimiento", "input": "x", "output": {"label": "NEUTRAL"}}, "type"),
    ({"instruction": "   ", "input": "x", "output": "NEUTRAL"}, "non-empty"),
    ({"instruction": "Clasifica el sentimiento", "input": "x", "output": "NEUTRO"}, "label"),
])
def test_alpaca_field_rules(tmp_path, params, tokenizer, bad, rule):
    f, result = run(tmp_path, balanced(3) + [bad], params, tokenizer)
    assert not result.ok
    assert rule in rules(result)
    assert lines_for(result, rule) == [10]
    assert any(re.fullmatch(rf"{re.escape(str(f))}:10: {rule}: .+", str(i)) for i in result.issues)
    # the good rows are untouched by the bad one
    assert len(result.valid_rows()) == 9


def test_passing_case_has_no_issues(tmp_path, params, tokenizer):
    _, result = run(tmp_path, balanced(3) + [{"instruction": "Clasifica el sentimiento", "output": "NEUTRAL"}], params, tokenizer)
    assert result.ok and result.issues == []


def test_min_output_length(tmp_path, tokenizer):
    p = load_params(None, ["data.task=generation", "validate.data_docs=false"])
    _, result = run(tmp_path, [{"instruction": "Saluda", "output": "Hola"}, {"instruction": "Despídete", "output": "Adiós, hasta luego"}], p, tokenizer)
    assert rules(result) == ["min-output-length"] and lines_for(result, "min-output-length") == [1]
    assert "4 characters" in result.issues[0].message


def test_max_tokens_after_templating(tmp_path, tokenizer):
    p = load_params(None, ["data.task=generation", "max_seq_length=64", "validate.data_docs=false"])
    long = {"instruction": "Resume", "input": "palabra " * 80, "output": "Un resumen corto."}
    _, result = run(tmp_path, [long, {"instruction": "Resume", "input": "poco", "output": "Nada que resumir."}], p, tokenizer)
    assert rules(result) == ["max-tokens"] and lines_for(result, "max-tokens") == [1]
    assert "tokens after the chat template > max_seq_length=64" in result.issues[0].message


def test_duplicates_are_errors_by_default_and_warnings_on_request(tmp_path, params, tokenizer):
    rows = balanced(3) + [balanced(1)[0]]
    _, result = run(tmp_path, rows, params, tokenizer)
    assert rules(result) == ["duplicate"] and lines_for(result, "duplicate") == [1, 10]
    warn = load_params(None, ["validate.duplicates=warning", "validate.data_docs=false"])
    _, result = run(tmp_path, rows, warn, tokenizer)
    assert result.ok and rules(result, "warning") == ["duplicate"]


def test_contradictions(tmp_path, params, tokenizer):
    rows = balanced(3) + [alpaca("positivo review number 0 about product 0", "NEGATIVO")]
    _, result = run(tmp_path, rows, params, tokenizer)
    # line 1 says POSITIVO, line 10 says NEGATIVO for the same prompt
    assert "contradiction" in rules(result) and lines_for(result, "contradiction") == [1, 10]
    warn = load_params(None, ["validate.contradictions=warning", "validate.data_docs=false"])
    _, result = run(tmp_path, rows, warn, tokenizer)
    assert result.ok and "contradiction" in rules(result, "warning")


def test_class_balance(tmp_path, params, tokenizer):
    rows = [alpaca(f"great thing {i}", "POSITIVO") for i in range(10)] + [alpaca("bad thing", "NEGATIVO"), alpaca("plain thing", "NEUTRAL")]
    _, result = run(tmp_path, rows, params, tokenizer)
    assert result.ok  # a warning by default
    bal = [i for i in result.issues if i.rule == "class-balance"]
    assert {i.line for i in bal} == {0} and len(bal) == 2 and "'NEGATIVO' has 1 examples" in bal[0].message + bal[1].message
    strict = load_params(None, ["validate.class_balance=error", "validate.data_docs=false"])
    _, result = run(tmp_path, rows, strict, tokenizer)
    assert not result.ok and rules(result) == ["class-balance"]
    _, result = run(tmp_path, balanced(4), strict, tokenizer)
    assert result.ok


CHAT_OK = {"messages": [{"role": "system", "content": "Eres soporte."}, {"role": "user", "content": "Mi app no abre"},
                        {"role": "assistant", "content": "Reinicia el dispositivo y vuelve a intentarlo."}]}


@pytest.mark.parametrize("messages, rule", [
    ([{"role": "user", "content": "hola"}, {"role": "bot", "content": "Hola, ¿en qué te ayudo?"}], "chat-roles"),
    ([{"role": "user", "content": "hola"}, {"role": "system", "content": "tarde"}, {"role": "assistant", "content": "Hola, dime."}], "chat-roles"),
    ([{"role": "assistant", "content": "Empiezo yo, hola."}, {"role": "user", "content": "vale"}, {"role": "assistant", "content": "¿En qué te ayudo?"}], "chat-order"),
    ([{"role": "user", "content": "uno"}, {"role": "user", "content": "dos"}, {"role": "assistant", "content": "Respondo a ambos."}], "chat-order"),
    ([{"role": "user", "content": "hola"}, {"role": "assistant", "content": "Hola, ¿qué pasa?"}, {"role": "user", "content": "nada"}], "chat-ends-with-assistant"),
    ([{"role": "user", "content": "  "}, {"role": "assistant", "content": "¿Puedes repetir la pregunta?"}], "non-empty"),
    ([{"role": "user"}, {"role": "assistant", "content": "Hola, ¿qué pasa?"}], "type"),
    ("not a list", "type"),
])
def test_chat_role_rules(tmp_path, tokenizer, messages, rule):
    p = load_params(None, ["data.task=generation", "validate.data_docs=false"])
    _, result = run(tmp_path, [CHAT_OK, {"messages": messages}], p, tokenizer)
    assert rule in rules(result) and lines_for(result, rule) == [2], [str(i) for i in result.issues]
    assert {i.line for i in result.errors} == {2}
    _, ok = run(tmp_path, [CHAT_OK], p, tokenizer)
    assert ok.ok and ok.issues == []


def test_chat_classification_uses_the_last_assistant_turn_as_label(tmp_path, params, tokenizer):
    rows = [{"messages": [{"role": "user", "content": f"reseña {i}"}, {"role": "assistant", "content": lab}]}
            for i, lab in enumerate(LABELS * 2)] + [{"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "MALO!"}]}]
    _, result = run(tmp_path, rows, params, tokenizer)
    assert rules(result) == ["label"] and lines_for(result, "label") == [7]


def test_extra_fields_are_a_warning(tmp_path, params, tokenizer):
    rows = balanced(2) + [{**alpaca("con id"), "id": 17}]
    _, result = run(tmp_path, rows, params, tokenizer)
    assert result.ok and rules(result, "warning") == ["extra-field"]


@pytest.mark.parametrize("content, rule", [
    (b"", "empty-file"),
    (b"\n\n  \n", "empty-file"),
    (b'[{"instruction": "a", "output": "POSITIVO"}]', "not-object"),
    (b'{"instruction": "caf\xff", "output": "POSITIVO"}', "encoding"),
    (b'{"instruction": "x", "output": "' + b"a" * 2_000_000 + b'"}', "line-too-long"),
])
def test_bad_files_get_clear_errors_not_tracebacks(tmp_path, params, tokenizer, content, rule):
    f = tmp_path / "bad.jsonl"
    f.write_bytes(content)
    result = validate_paths([f], params, tmp_path / "out", tokenizer=tokenizer)
    assert not result.ok and rules(result) == [rule]
    assert result.issues[0].line == (0 if rule == "empty-file" else 1)
    if rule != "empty-file":
        q = [json.loads(l) for l in (tmp_path / "out" / "quarantine.jsonl").read_text().splitlines()]
        assert len(q) == 1 and q[0]["line"] == 1 and q[0]["reasons"][0].startswith(rule) and "raw" in q[0]


def test_outputs_report_quarantine_and_data_docs_and_raw_untouched(tmp_path, tokenizer):
    p = load_params(None)  # data docs on
    rows = balanced(3) + ['{"instruction": broken', alpaca("corto", "MAL")]
    f = write_jsonl(tmp_path / "raw" / "d.jsonl", rows)
    before = hashlib.sha256(f.read_bytes()).hexdigest()
    out = tmp_path / "validated"
    result = validate_paths([tmp_path / "raw"], p, out, tokenizer=tokenizer)
    assert hashlib.sha256(f.read_bytes()).hexdigest() == before
    report = json.loads((out / "report.json").read_text())
    assert report["valid"] is False and report["errors"] == len(result.errors) >= 2
    assert report["examples_valid"] == 9 and report["lines"] == 11
    assert report["files"][0]["sha256"] == before
    q = [json.loads(l) for l in (out / "quarantine.jsonl").read_text().splitlines()]
    assert [e["line"] for e in q] == [10, 11]
    assert q[0]["raw"] == '{"instruction": broken' and q[1]["record"]["output"] == "MAL"
    assert any(r.startswith("label:") for r in q[1]["reasons"])
    index = out / "data_docs" / "index.html"
    assert index.is_file() and "ftlib-alpaca" in index.read_text()


def test_report_is_deterministic(tmp_path, params, tokenizer):
    f = write_jsonl(tmp_path / "d.jsonl", balanced(3))
    validate_paths([f], params, tmp_path / "a", tokenizer=tokenizer)
    validate_paths([f], params, tmp_path / "b", tokenizer=tokenizer)
    assert (tmp_path / "a" / "report.json").read_text().replace(str(tmp_path / "a"), "X") == \
        (tmp_path / "b" / "report.json").read_text().replace(str(tmp_path / "b"), "X")


def test_duplicates_across_files_are_found(tmp_path, params, tokenizer):
    write_jsonl(tmp_path / "raw" / "a.jsonl", balanced(3))
    write_jsonl(tmp_path / "raw" / "b.jsonl", [balanced(1)[0]])
    result = validate_paths([tmp_path / "raw"], params, tokenizer=tokenizer)
    assert {(Path(i.file).name, i.line) for i in result.issues if i.rule == "duplicate"} == {("a.jsonl", 1), ("b.jsonl", 1)}


def test_directory_inside_and_missing_paths(tmp_path, params, tokenizer):
    with pytest.raises(UsageError, match="no such file"):
        validate_paths([tmp_path / "nope.jsonl"], params, tokenizer=tokenizer)
    (tmp_path / "empty").mkdir()
    with pytest.raises(UsageError, match="no \\*.jsonl"):
        validate_paths([tmp_path / "empty"], params, tokenizer=tokenizer)


def _with_problems(tmp_path: Path, n_per_label: int) -> Path:
    """Two files of distinct rows plus problems far apart: across files and chunks."""
    rows = balanced(n_per_label)
    half = len(rows) // 2
    a = rows[:half] + [{**alpaca("con id"), "id": 1}, '{"instruction": broken']
    b = rows[half:] + [rows[3], alpaca(rows[5]["input"], "NEUTRAL" if rows[5]["output"] != "NEUTRAL" else "POSITIVO"),
                       alpaca("etiqueta rara", "MEH"), {"messages": [{"role": "user", "content": "hola"}, {"role": "assistant", "content": "POSITIVO"}]}]
    write_jsonl(tmp_path / "raw" / "a.jsonl", a)
    write_jsonl(tmp_path / "raw" / "b.jsonl", b)
    return tmp_path / "raw"


@pytest.mark.slow
def test_chunks_change_nothing(tmp_path, params, tokenizer):
    """20,000 rows checked 1,000 at a time: the same issues, report and quarantine as in one chunk."""
    raw = _with_problems(tmp_path, 6_667)
    one = validate_paths([raw], params, tmp_path / "one", tokenizer=tokenizer, chunk_rows=10**9)
    many = validate_paths([raw], params, tmp_path / "many", tokenizer=tokenizer, chunk_rows=1_000)
    assert one.n_rows == many.n_rows > 20_000 and one.n_valid == many.n_valid
    assert {"duplicate", "contradiction", "json", "label", "mixed-format"} <= set(rules(one)) and rules(one, "warning") == ["extra-field"]
    assert one.issues == many.issues
    for name in ("report.json", "quarantine.jsonl"):
        assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "many" / name).read_bytes()
    report = json.loads((tmp_path / "one" / "report.json").read_text())
    # the row repeated across files is flagged on both copies, far apart
    assert [(Path(i["file"]).name, i["line"]) for i in report["issues"] if i["rule"] == "duplicate"] == [("a.jsonl", 4), ("b.jsonl", 10_002)]


def test_a_file_that_changes_during_validation_is_refused(tmp_path, params, tokenizer):
    f = write_jsonl(tmp_path / "d.jsonl", balanced(10))

    def append(_rows):  # someone appends while validation reads the file
        with f.open("a", encoding="utf-8") as fh:
            fh.write(json.dumps(alpaca(f"late {fh.tell()}")) + "\n")

    result = validate_paths([f], params, tokenizer=tokenizer, chunk_rows=7, sink=append)
    assert [str(i) for i in result.errors] == [f"{f}:0: changed: the file changed while it was being validated; run again"]
