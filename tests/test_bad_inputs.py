"""The bad-input corpus (tests/data/bad/, expectations in its MANIFEST.yaml) through every
command that reads user JSONL: validate, split, evaluate --data, train --data-dir. Each file
gets its exit code and its FILE:LINE: RULE: message, never a traceback, and nothing
downstream is written. Then property tests: random bytes and random JSON never crash the
reader or the validator, and every line ends up as a row or an issue."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from ftlib.cli import app
from ftlib.core.config import load_params
from ftlib.core.formats import iter_lines, read_examples, read_rows
from ftlib.stages.split import SPLITS
from ftlib.stages.validate import validate_paths
from tests.conftest import REPO, balanced, write_jsonl

BAD = REPO / "tests" / "data" / "bad"
MANIFEST: dict[str, dict] = yaml.safe_load((BAD / "MANIFEST.yaml").read_text(encoding="utf-8"))
INVALID = sorted(n for n, spec in MANIFEST.items() if spec["exit"])
NO_DOCS = ["-o", "validate.data_docs=false"]
runner = CliRunner()


def clean(r, where: str = "") -> str:
    """The output of a CliRunner result that ended by exit code, not by an exception."""
    assert r.exception is None or isinstance(r.exception, SystemExit), (where, r.exception, r.output)
    assert "Traceback" not in r.output, r.output
    return r.output


def has_fragments(output: str, path: Path, fragments: list[str]) -> None:
    for frag in fragments:
        assert f"{path}:{frag}" in output, f"missing {path}:{frag}\n{output}"


def test_manifest_lists_every_file():
    assert {p.name for p in BAD.glob("*.jsonl")} == set(MANIFEST)
    assert len(MANIFEST) >= 25 and {0, 1} == {spec["exit"] for spec in MANIFEST.values()}


def corpus_cli(cmd: str, name: str, out_option: str, out: Path):
    """`ftlib <cmd> FILE <out_option> OUT` on a corpus file: (spec, file, result, output)."""
    spec, f = MANIFEST[name], BAD / name
    r = runner.invoke(app, [cmd, str(f), out_option, str(out), *NO_DOCS, *spec.get("args", [])])
    return spec, f, r, clean(r, name)


@pytest.mark.parametrize("name", sorted(MANIFEST))
def test_validate_says_file_line_rule(name, tmp_path):
    out = tmp_path / "validated"
    spec, f, r, output = corpus_cli("validate", name, "--report-dir", out)
    assert r.exit_code == spec["exit"], output
    has_fragments(output, f, spec["expect"])
    for line in output.splitlines():  # every problem line has the contract's shape
        if line.startswith(f"{f}:"):
            assert re.match(rf"{re.escape(str(f))}:\d+: [a-z-]+: \S", line), line
    report = json.loads((out / "report.json").read_text(encoding="utf-8"))
    assert report["valid"] is (spec["exit"] == 0)
    quarantined = {json.loads(q)["line"] for q in (out / "quarantine.jsonl").read_text(encoding="utf-8").splitlines()}
    assert quarantined == {i["line"] for i in report["issues"] if i["severity"] == "error" and i["line"] > 0}


@pytest.mark.parametrize("name", sorted(MANIFEST))
def test_split_refuses_invalid_files_and_writes_nothing(name, tmp_path):
    splits = tmp_path / "splits"
    spec, f, r, output = corpus_cli("split", name, "--out-dir", splits)
    if spec["exit"]:
        assert r.exit_code == 1 and "refused" in output, output
        has_fragments(output, f, spec["expect"])
        assert not splits.exists()
    else:
        assert r.exit_code == 0, output
        assert sum(len((splits / f"{s}.jsonl").read_text(encoding="utf-8").splitlines()) for s in SPLITS) == 3


@pytest.mark.parametrize("name", sorted(MANIFEST))
def test_reader_refuses_unusable_lines_with_file_line_rule(name):
    """read_examples (evaluate --data, train's splits) refuses what cannot become an example."""
    spec, f = MANIFEST[name], BAD / name
    if spec["reader"] == "ok":
        assert read_examples(f)
        return
    with pytest.raises(ValueError) as e:
        read_examples(f)
    message = str(e.value)
    assert re.match(rf"{re.escape(str(f))}:\d+: [a-z-]+: \S", message), message
    has_fragments(message, f, spec["expect"])


@pytest.mark.parametrize("name", [n for n in sorted(MANIFEST) if MANIFEST[n]["reader"] == "error"])
def test_evaluate_refuses_bad_data_before_loading_a_model(name, tmp_path):
    f = BAD / name
    metrics = tmp_path / "metrics.json"
    r = runner.invoke(app, ["evaluate", "--model", "embedded:smollm2-135m-instruct", "--data", str(f), "--json", str(metrics)])
    output = clean(r, name)
    assert r.exit_code == 1 and "refused" in output and f"ftlib validate {f}" in output, output
    has_fragments(output, f, MANIFEST[name]["expect"][:1])
    assert not metrics.exists()


def test_unreadable_file(tmp_path):
    if os.geteuid() == 0:
        pytest.skip("root reads a chmod 000 file; test_dangling_symlink_is_unreadable covers `unreadable` for root")
    f = write_jsonl(tmp_path / "locked.jsonl", balanced(1))
    f.chmod(0)
    try:
        r = runner.invoke(app, ["validate", str(f), "--report-dir", str(tmp_path / "v"), *NO_DOCS])
        assert r.exit_code == 1 and f"{f}:0: unreadable: Permission denied" in clean(r)
        r = runner.invoke(app, ["split", str(f), "--out-dir", str(tmp_path / "s"), *NO_DOCS])
        assert r.exit_code == 1 and f"{f}:0: unreadable:" in clean(r) and not (tmp_path / "s").exists()
    finally:
        f.chmod(0o644)


def test_dangling_symlink_is_unreadable(tmp_path):
    """Works as root too: the link's target does not exist."""
    link = tmp_path / "gone.jsonl"
    link.symlink_to(tmp_path / "deleted-target.jsonl")
    r = runner.invoke(app, ["validate", str(link), "--report-dir", str(tmp_path / "v"), *NO_DOCS])
    assert r.exit_code == 1 and f"{link}:0: unreadable: No such file or directory" in clean(r)
    r = runner.invoke(app, ["split", str(link), "--out-dir", str(tmp_path / "s"), *NO_DOCS])
    assert r.exit_code == 1 and f"{link}:0: unreadable:" in clean(r) and not (tmp_path / "s").exists()


@pytest.mark.parametrize("kind", ["dangling", "loop"])
def test_a_bad_symlink_inside_the_raw_dir_is_unreadable_not_skipped(tmp_path, kind):
    """Issue 16: `ftlib validate data/raw` used to skip a dangling symlink or a symlink loop and exit 0."""
    raw = tmp_path / "raw"
    write_jsonl(raw / "good.jsonl", balanced(3))
    link = raw / "broken.jsonl"
    if kind == "dangling":
        link.symlink_to(raw / "deleted-target.jsonl")
    else:
        (raw / "other.jsonl").symlink_to(link)
        link.symlink_to(raw / "other.jsonl")
    r = runner.invoke(app, ["validate", str(raw), "--report-dir", str(tmp_path / "v"), *NO_DOCS])
    assert r.exit_code == 1 and f"{link}:0: unreadable:" in clean(r), clean(r)
    r = runner.invoke(app, ["split", str(raw), "--out-dir", str(tmp_path / "s"), *NO_DOCS])
    assert r.exit_code == 1 and not (tmp_path / "s").exists()


def test_nfc_and_nfd_copies_of_one_review_are_the_same_review(tmp_path):
    """Issue 16: the same text with composed (NFC) and decomposed (NFD) accents, opposite labels: a contradiction;
    same label: a duplicate."""
    import unicodedata

    text = "La atención fue pésima y el envío llegó roto."
    nfc, nfd = unicodedata.normalize("NFC", text), unicodedata.normalize("NFD", text)
    assert nfc != nfd
    row = {"instruction": "Clasifica el sentimiento", "input": nfc, "output": "NEGATIVO"}
    f = write_jsonl(tmp_path / "c.jsonl", [*balanced(3), row, {**row, "input": nfd, "output": "POSITIVO"}])
    r = runner.invoke(app, ["validate", str(f), "--report-dir", str(tmp_path / "v"), *NO_DOCS])
    assert r.exit_code == 1 and "contradiction" in clean(r), clean(r)
    f = write_jsonl(tmp_path / "d.jsonl", [*balanced(3), row, {**row, "input": nfd}])
    r = runner.invoke(app, ["validate", str(f), "--report-dir", str(tmp_path / "v2"), *NO_DOCS])
    assert r.exit_code == 1 and "duplicate" in clean(r), clean(r)


@pytest.mark.skipif(not Path("/proc/self/mem").exists(), reason="needs Linux /proc")
def test_read_error_midway_is_unreadable(tmp_path, tokenizer):
    """Works as root: reading /proc/self/mem at offset 0 fails with EIO after a successful open.
    (validate_paths directly, on files anywhere.)"""
    params = load_params(None, ["validate.data_docs=false"])
    result = validate_paths([Path("/proc/self/mem")], params, tmp_path / "v", tokenizer=tokenizer)
    assert [str(i) for i in result.issues] == ["/proc/self/mem:0: unreadable: Input/output error"]


def test_directory_instead_of_a_file(tmp_path):
    d = tmp_path / "data.jsonl"  # a directory with a data file's name and no *.jsonl inside
    d.mkdir()
    (d / "notes.txt").write_text("not data")
    r = runner.invoke(app, ["validate", str(d), "--report-dir", str(tmp_path / "v"), *NO_DOCS])
    assert r.exit_code == 2 and "directory has no *.jsonl files" in clean(r)
    r = runner.invoke(app, ["split", str(d), "--out-dir", str(tmp_path / "s"), *NO_DOCS])
    assert r.exit_code == 2 and "directory has no *.jsonl files" in clean(r) and not (tmp_path / "s").exists()
    r = runner.invoke(app, ["evaluate", "--data", str(d), "--json", str(tmp_path / "m.json")])
    assert r.exit_code == 2 and f"{d}: is a directory" in clean(r)
    # read directly, a directory is a whole-file problem
    assert [(i.line, i.rule) for i in read_rows(d)[1]] == [(0, "not-a-file")]


@pytest.mark.slow
def test_train_refuses_a_bad_split_cleanly(tmp_path, tiny_model):
    data = tmp_path / "splits"
    shutil.copy(BAD / "chat_no_assistant.jsonl", write_jsonl(data / "train.jsonl", []))
    write_jsonl(data / "validation.jsonl", balanced(2))
    r = runner.invoke(app, ["train", "--data-dir", str(data), "--no-compare", "--reports-dir", str(tmp_path / "reports"),
                            "-o", f"base_model={tiny_model}", "-o", f"train.output_dir={tmp_path / 'adapter'}",
                            "-o", f"train.checkpoint_dir={tmp_path / 'ckpt'}"])
    assert r.exit_code == 1, r.output
    assert f"{data / 'train.jsonl'}:3: chat-ends-with-assistant:" in clean(r)
    assert not (tmp_path / "adapter").exists()


@pytest.mark.slow
def test_real_cli_processes(tmp_path):
    """A few of the above as real `python -m ftlib` processes: exit codes and stderr as a user sees them."""
    def ftlib(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "ftlib", *args], cwd=REPO, capture_output=True, text=True, timeout=120)

    for name in ("malformed_json.jsonl", "bom_valid.jsonl", "utf16.jsonl"):
        p = ftlib("validate", str(BAD / name), "--report-dir", str(tmp_path / name), *NO_DOCS)
        assert p.returncode == MANIFEST[name]["exit"] and "Traceback" not in p.stdout + p.stderr, p.stderr
        has_fragments(p.stdout, BAD / name, MANIFEST[name]["expect"])
    p = ftlib("split", str(BAD / "lone_surrogate.jsonl"), "--out-dir", str(tmp_path / "splits"), *NO_DOCS)
    assert p.returncode == 1 and "Traceback" not in p.stdout + p.stderr and not (tmp_path / "splits").exists()
    has_fragments(p.stdout, BAD / "lone_surrogate.jsonl", MANIFEST["lone_surrogate.jsonl"]["expect"])
    p = ftlib("evaluate", "--data", str(BAD / "nan_value.jsonl"), "--json", str(tmp_path / "m.json"))
    assert p.returncode == 1 and "Traceback" not in p.stdout + p.stderr and not (tmp_path / "m.json").exists()
    has_fragments(p.stdout, BAD / "nan_value.jsonl", MANIFEST["nan_value.jsonl"]["expect"])


# ---------------------------------------------------------------------------
# Properties: whatever the bytes, a clean verdict.

PARAMS = load_params(None, ["validate.data_docs=false"])
ISSUE = re.compile(r"[a-z]+(-[a-z]+)*")

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=30),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4),
    max_leaves=12,
)
# Objects shaped like (broken) examples reach the field, role and content rules, not just `unknown-format`.
texts = st.sampled_from(["POSITIVO", "NEGATIVO", "NEUTRAL", "", "  ", "Clasifica", "x\u0007y"]) | st.text(max_size=20)
roles = st.sampled_from(["system", "user", "assistant", "bot"])
messages = st.lists(st.fixed_dictionaries({"role": roles, "content": texts}) | json_values, max_size=4)
example_like = (
    st.fixed_dictionaries({}, optional={"instruction": texts | json_values, "input": texts | json_values, "output": texts | json_values,
                                        "id": json_values})
    | st.fixed_dictionaries({"messages": messages | json_values}, optional={"extra": json_values})
)
lines = st.one_of(
    json_values.map(lambda v: json.dumps(v).encode()),
    example_like.flatmap(lambda o: st.booleans().map(lambda ascii: json.dumps(o, ensure_ascii=ascii).encode())),
    st.binary(max_size=40),
    st.sampled_from([b"", b"  ", b"\r", b"\xef\xbb\xbf{}", b'{"output": "\\ud800"}', b"NaN", b"[" * 3000, b"1" * 5000, b"{\"a\": 1e999}"]),
)
files = st.one_of(st.binary(max_size=300), st.lists(lines, max_size=8).map(b"\n".join))


LINE_RULES = {"encoding", "line-too-long", "json", "not-object", "unknown-format", "mixed-format"}


def non_blank_lines(data: bytes) -> set[int]:
    data = data.removeprefix(b"\xef\xbb\xbf")
    return {n for n, line in enumerate(data.split(b"\n"), 1) if line.strip()}


def assert_clean_verdict(path: Path, data: bytes, issues, row_lines: list[int]) -> None:
    """Issues name file, line and rule; every non-blank line is a row or a line-level issue, not both."""
    for i in issues:
        assert i.file == str(path) and i.line >= 0 and ISSUE.fullmatch(i.rule) and i.message, i
        assert str(i).startswith(f"{path}:{i.line}: {i.rule}: ")
    if {i.rule for i in issues if i.line == 0} & {"empty-file", "encoding", "unreadable"}:
        return  # a whole-file verdict: the lines are not looked at
    unparsed = {i.line for i in issues if i.rule in LINE_RULES}
    assert len(row_lines) == len(set(row_lines)) and not unparsed & set(row_lines)
    assert unparsed | set(row_lines) == non_blank_lines(data)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=files)
def test_reader_never_raises(tmp_path_factory, data):
    f = tmp_path_factory.mktemp("fuzz", numbered=True) / "f.jsonl"
    f.write_bytes(data)
    seen = []
    for number, obj, issue in iter_lines(f, 1000):
        assert (obj is None) != (issue is None)
        assert obj is None or isinstance(obj, dict)
        seen.append(number)
    assert seen == sorted(seen)
    rows, issues = read_rows(f, 1000)
    assert all(r.format in ("alpaca", "chat") for r in rows)
    assert_clean_verdict(f, data, issues, [r.line for r in rows])


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.lists(lines, min_size=1, max_size=8).map(b"\n".join), chunk_rows=st.integers(1, 3))
def test_validator_never_raises_and_chunks_change_nothing(tmp_path_factory, tokenizer, data, chunk_rows):
    d = tmp_path_factory.mktemp("fuzzv", numbered=True)
    f = d / "f.jsonl"
    f.write_bytes(data)
    result = validate_paths([f], PARAMS, d / "one", tokenizer=tokenizer)
    assert_clean_verdict(f, data, result.issues, [r.line for r in result.rows])
    assert result.ok == (not result.errors)
    chunked = validate_paths([f], PARAMS, d / "chunked", tokenizer=tokenizer, chunk_rows=chunk_rows)
    assert chunked.issues == result.issues
    for name in ("report.json", "quarantine.jsonl"):
        assert (d / "one" / name).read_bytes() == (d / "chunked" / name).read_bytes()
