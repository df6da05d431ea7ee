"""Stage `validate`: data contracts for instruction data, enforced with Great Expectations.

Two passes:
  1. Lines that are not a JSON object (bad UTF-8, bad JSON, arrays, huge lines, empty
     files, unknown or mixed formats) are reported by ftlib.formats before GX runs.
  2. Every parsed row becomes one row of a pandas DataFrame (one per format) with a few
     derived columns (types, token length after templating, duplicate and contradiction
     keys, chat role problems); a GX suite of expectations runs over it. Each
     expectation carries its rule name, severity and message in `meta`, and GX's
     unexpected-row index maps a failure back to FILE:LINE.

Outputs (when out_dir is given): report.json, quarantine.jsonl (every bad row and its
reasons), data_docs/ (GX Data Docs HTML). Raw files are only read.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

from ftlib.config import Params
from ftlib.formats import Issue, Row, chat_problems, read_rows, render, render_texts, to_example, write_jsonl


class UsageError(ValueError):
    """A path that does not exist or holds no data files (exit code 2)."""


@dataclass
class ValidationResult:
    files: list[str]
    rows: list[Row]
    issues: list[Issue]
    n_lines: int
    elapsed_s: float = 0.0
    stats: dict[str, Any] = field(default_factory=dict)

    @property
    def errors(self) -> list[Issue]:
        return [i for i in self.issues if i.severity == "error"]

    @property
    def warnings(self) -> list[Issue]:
        return [i for i in self.issues if i.severity == "warning"]

    @property
    def ok(self) -> bool:
        return not self.errors

    def bad_lines(self) -> set[tuple[str, int]]:
        return {(i.file, i.line) for i in self.errors}

    def valid_rows(self) -> list[Row]:
        bad = self.bad_lines()
        return [r for r in self.rows if (r.file, r.line) not in bad]


def expand_paths(paths: list[str | Path]) -> list[Path]:
    """Files as given; directories expand to their *.jsonl files, sorted."""
    files: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            found = sorted(x for x in p.glob("*.jsonl") if x.is_file())
            if not found:
                raise UsageError(f"{p}: directory has no *.jsonl files")
            files += found
        elif p.exists() or p.is_symlink():
            files.append(p)
        else:
            raise UsageError(f"{p}: no such file or directory")
    return files


def content_key(*parts: Any) -> str:
    return hashlib.sha1(json.dumps(parts, ensure_ascii=False, sort_keys=True).encode()).hexdigest()


def prompt_key(obj: dict[str, Any]) -> str:
    """Identity of an example's prompt: used for contradictions and by the split."""
    if "messages" in obj:
        msgs = obj.get("messages")
        turns = msgs[:-1] if isinstance(msgs, list) else msgs
        return content_key(turns)
    inp = obj.get("input")
    return content_key(obj.get("instruction"), "" if inp is None else inp)


def _type(obj: dict[str, Any], name: str) -> str | None:
    return type(obj[name]).__name__ if name in obj else None


def _strip(v: Any) -> Any:
    return v.strip() if isinstance(v, str) else None


# C0/C1 control characters other than tab, newline and CR: legal JSON when escaped
# (\u0007), but in training text they are scraping debris the model would learn to emit.
_CONTROL = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]")


def _control_chars(fields: Iterable[tuple[str, Any]]) -> str | None:
    for name, value in fields:
        if isinstance(value, str) and (m := _CONTROL.search(value)):
            return f"control character U+{ord(m.group()):04X} in {name}; only tab, newline and CR belong in text"
    return None


def _frame(rows: list[Row], fmt: str, token_counts: dict[int, int]) -> Any:
    """One DataFrame row per parsed row, with the derived columns the suite checks."""
    import pandas as pd

    records = []
    for idx, r in enumerate(rows):
        if r.format != fmt:
            continue
        o = r.obj
        rec: dict[str, Any] = {"row": idx, "record_key": content_key(o), "prompt_key": prompt_key(o),
                               "n_tokens": token_counts.get(idx)}
        if fmt == "alpaca":
            rec |= {
                "instruction": _strip(o.get("instruction")), "output": _strip(o.get("output")),
                "instruction_present": o.get("instruction"), "output_present": o.get("output"),
                "instruction_type": _type(o, "instruction"), "input_type": _type(o, "input"),
                "output_type": _type(o, "output"),
                "extra_fields": ", ".join(sorted(set(o) - {"instruction", "input", "output"})) or None,
                "control_chars": _control_chars((f"`{k}`", o.get(k)) for k in ("instruction", "input", "output")),
            }
        else:
            msgs = o.get("messages")
            problems = chat_problems(msgs)
            last = msgs[-1] if isinstance(msgs, list) and msgs and isinstance(msgs[-1], dict) else {}
            answer = last.get("content") if last.get("role") == "assistant" else None
            contents = ((f"message {i}", m.get("content")) for i, m in enumerate(msgs, 1) if isinstance(m, dict)) if isinstance(msgs, list) else ()
            rec |= {"messages_present": msgs, "output": _strip(answer),
                    "extra_fields": ", ".join(sorted(set(o) - {"messages"})) or None, "control_chars": _control_chars(contents)}
            rec |= {f"{k}_problem": v for k, v in problems.items()}
        records.append(rec)
    df = pd.DataFrame.from_records(records)
    if len(df):
        # Contradiction: one prompt, several different outputs. Count per prompt.
        df["outputs_per_prompt"] = df.groupby("prompt_key")["output"].transform("nunique")
        df["output_len"] = df["output"].str.len()
    return df


def _expectations(fmt: str, params: Params) -> list[tuple[str, str, str, Any]]:
    """(rule, severity, message, expectation) for one format's suite."""
    import great_expectations.expectations as gxe

    v, labels = params.validate, params.data.labels
    rules: list[tuple[str, str, str, Any]] = []
    if fmt == "alpaca":
        for col in ("instruction", "output"):
            rules.append(("required-field", "error", f"missing or null `{col}`",
                          gxe.ExpectColumnValuesToNotBeNull(column=f"{col}_present")))
        rules += [
            ("type", "error", "`instruction` must be a string", gxe.ExpectColumnValuesToBeInSet(column="instruction_type", value_set=["str"])),
            ("type", "error", "`input` must be a string or null", gxe.ExpectColumnValuesToBeInSet(column="input_type", value_set=["str", "NoneType"])),
            ("type", "error", "`output` must be a string", gxe.ExpectColumnValuesToBeInSet(column="output_type", value_set=["str"])),
            ("non-empty", "error", "`instruction` is empty", gxe.ExpectColumnValueLengthsToBeBetween(column="instruction", min_value=1)),
        ]
    else:
        rules += [
            ("required-field", "error", "missing or null `messages`", gxe.ExpectColumnValuesToNotBeNull(column="messages_present")),
            ("type", "error", "{value}", gxe.ExpectColumnValuesToBeNull(column="structure_problem")),
            ("chat-roles", "error", "{value}", gxe.ExpectColumnValuesToBeNull(column="roles_problem")),
            ("chat-order", "error", "{value}", gxe.ExpectColumnValuesToBeNull(column="order_problem")),
            ("chat-ends-with-assistant", "error", "{value}", gxe.ExpectColumnValuesToBeNull(column="ends_problem")),
            ("non-empty", "error", "{value}", gxe.ExpectColumnValuesToBeNull(column="empty_problem")),
        ]
    rules += [
        ("extra-field", "warning", "unknown field(s) ignored: {value}", gxe.ExpectColumnValuesToBeNull(column="extra_fields")),
        ("control-char", "warning", "{value}", gxe.ExpectColumnValuesToBeNull(column="control_chars")),
        ("min-output-length", "error", f"output has {{value}} characters, fewer than min_output_chars={v.min_output_chars}",
         gxe.ExpectColumnValuesToBeBetween(column="output_len", min_value=v.min_output_chars)),
        ("max-tokens", "error", f"{{value}} tokens after the {params.template} template > max_seq_length={params.max_seq_length}",
         gxe.ExpectColumnValuesToBeBetween(column="n_tokens", max_value=params.max_seq_length)),
        ("duplicate", v.duplicates, "exact duplicate of another example", gxe.ExpectColumnValuesToBeUnique(column="record_key")),
        ("contradiction", v.contradictions, "same prompt as another example but a different output",
         gxe.ExpectColumnValuesToBeBetween(column="outputs_per_prompt", max_value=1)),
    ]
    if params.data.task == "classification":
        rules.append(("label", "error", f"output {{value!r}} is not a declared label ({', '.join(labels)})",
                      gxe.ExpectColumnValuesToBeInSet(column="output", value_set=list(labels))))
    return rules


class _GX:
    """An ephemeral GX context with one pandas data source and optional Data Docs site."""

    def __init__(self, docs_dir: Path | None):
        os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
        import great_expectations as gx
        from great_expectations.data_context.types.base import ProgressBarsConfig

        self.gx = gx
        self.ctx = gx.get_context(mode="ephemeral")
        self.ctx.variables.progress_bars = ProgressBarsConfig(globally=False)
        self.source = self.ctx.data_sources.add_pandas("ftlib")
        self.docs_dir = docs_dir
        if docs_dir is not None:
            self.ctx.add_data_docs_site(site_name="ftlib", site_config={
                "class_name": "SiteBuilder",
                "store_backend": {"class_name": "TupleFilesystemStoreBackend", "base_directory": str(docs_dir.resolve())},
                "site_index_builder": {"class_name": "DefaultSiteIndexBuilder"},
            })

    def run(self, name: str, df: Any, expectations: list[Any], index_col: str) -> Any:
        gx = self.gx
        batch = self.source.add_dataframe_asset(name).add_batch_definition_whole_dataframe("all")
        suite = self.ctx.suites.add(gx.ExpectationSuite(name=f"ftlib-{name}"))
        for e in expectations:
            suite.add_expectation(e)
        vd = self.ctx.validation_definitions.add(gx.ValidationDefinition(name=name, data=batch, suite=suite))
        fmt = {"result_format": "COMPLETE", "unexpected_index_column_names": [index_col],
               "return_unexpected_index_query": False}
        actions = [gx.checkpoint.UpdateDataDocsAction(name="docs", site_names=["ftlib"])] if self.docs_dir else []
        cp = self.ctx.checkpoints.add(gx.Checkpoint(name=name, validation_definitions=[vd], actions=actions, result_format=fmt))
        result = cp.run(batch_parameters={"dataframe": df})
        return next(iter(result.run_results.values()))


def _count_tokens(rows: list[Row], params: Params, tokenizer: Any, on_progress: Callable[[int], None]) -> tuple[dict[int, int], list[Issue]]:
    """Token length of each structurally valid row after templating (what training sees)."""
    examples, index, issues = [], [], []
    for idx, r in enumerate(rows):
        ex = to_example(r)
        if ex is None or ex.messages[-1]["role"] != "assistant":
            continue
        if params.template == "alpaca":
            try:
                render(ex, tokenizer, "alpaca")
            except ValueError as e:  # multi-turn chat under the alpaca template
                issues.append(Issue(r.file, r.line, "template", str(e).split(": ")[-1]))
                continue
        examples.append(ex)
        index.append(idx)
    fast = getattr(tokenizer, "_tokenizer", None)

    def encode(texts: list[str]) -> list[int]:
        if fast is not None and hasattr(fast, "encode_batch_fast"):
            return [len(e.ids) for e in fast.encode_batch_fast(texts, add_special_tokens=False)]
        return [len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]

    counts: list[int] = []
    step = 10_000
    for start in range(0, len(examples), step):
        texts = render_texts(examples[start:start + step], tokenizer, params.template)
        counts += encode(texts)
        on_progress(len(texts))
    return dict(zip(index, counts)), issues


def validate_paths(
    paths: list[str | Path],
    params: Params,
    out_dir: str | Path | None = None,
    tokenizer: Any = None,
    progress: Callable[[str, int, int], None] | None = None,
) -> ValidationResult:
    """Validate JSONL files; write report/quarantine/Data Docs to out_dir if given.

    progress(stage, advance, total) is called as work proceeds (the CLI draws bars).
    """
    t0 = time.perf_counter()
    tick = progress or (lambda *_: None)
    files = expand_paths(paths)
    rows: list[Row] = []
    issues: list[Issue] = []
    for f in files:
        r, i = read_rows(f, params.validate.max_line_bytes)
        rows += r
        issues += i
        tick("read", 1, len(files))
    n_lines = len(rows) + sum(1 for i in issues if i.line > 0)

    if tokenizer is None and rows:
        from ftlib.models import load_tokenizer

        tokenizer = load_tokenizer(params.base_model, params.trust_remote_code, light=True)
    counts, template_issues = _count_tokens(rows, params, tokenizer, lambda n: tick("tokens", n, len(rows))) if rows else ({}, [])
    issues += template_issues

    out = Path(out_dir) if out_dir is not None else None
    docs_dir = out / "data_docs" if out is not None and params.validate.data_docs else None
    if docs_dir is not None:
        import shutil

        shutil.rmtree(docs_dir, ignore_errors=True)
    gxr = _GX(docs_dir) if rows or docs_dir else None
    label_counts: Counter[str] = Counter()
    for fmt in ("alpaca", "chat"):
        df = _frame(rows, fmt, counts)
        if not len(df):
            continue
        rules = _expectations(fmt, params)
        result = gxr.run(fmt, df, [e for *_, e in rules], "row")
        for (rule, severity, message, _), res in zip(rules, result.results):
            if res.success:
                continue
            col = res.expectation_config.kwargs["column"]
            for hit in res.result.get("unexpected_index_list") or []:
                r = rows[int(hit["row"])]
                issues.append(Issue(r.file, r.line, rule, message.format(value=hit.get(col)), severity))
        if params.data.task == "classification":
            label_counts.update(o for o in df["output"] if isinstance(o, str))

    if params.data.task == "classification" and label_counts:
        issues += _class_balance(gxr, label_counts, params, files)
    issues = sorted(set(issues), key=lambda i: (i.file, i.line, i.rule, i.message))

    result = ValidationResult([str(f) for f in files], rows, issues, n_lines)
    result.stats = {
        "formats": dict(Counter(r.format for r in rows)),
        "labels": {k: label_counts.get(k, 0) for k in params.data.labels} if params.data.task == "classification" else {},
        "max_tokens": max(counts.values(), default=0),
    }
    result.elapsed_s = time.perf_counter() - t0
    if out is not None:
        write_outputs(result, params, out, files)
    return result


def _class_balance(gxr: _GX, label_counts: Counter[str], params: Params, files: list[Path]) -> list[Issue]:
    """GX over a per-label count table: every declared label has >= largest / max_class_imbalance."""
    import math

    import great_expectations.expectations as gxe
    import pandas as pd

    v = params.validate
    declared = {k: label_counts.get(k, 0) for k in params.data.labels}
    biggest = max(declared, key=declared.get)
    floor = math.ceil(declared[biggest] / v.max_class_imbalance)
    table = pd.DataFrame({"label": list(declared), "count": list(declared.values())})
    res = gxr.run("labels", table, [gxe.ExpectColumnValuesToBeBetween(column="count", min_value=floor)], "label")
    where = files[0] if len(files) == 1 else Path(os.path.commonpath([str(f) for f in files]))
    return [
        Issue(str(where), 0, "class-balance",
              f"label {hit['label']!r} has {declared[hit['label']]} examples, fewer than 1/{v.max_class_imbalance:g} "
              f"of {biggest!r} ({declared[biggest]})", v.class_balance)
        for r in res.results for hit in (r.result.get("unexpected_index_list") or [])
    ]


def _sha256(path: Path) -> str | None:
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()
    except OSError:
        return None


def write_outputs(result: ValidationResult, params: Params, out: Path, files: list[Path]) -> None:
    """report.json (deterministic: no timestamps, so DVC sees no change on a no-op rerun)
    and quarantine.jsonl with every bad line and its reasons."""
    out.mkdir(parents=True, exist_ok=True)
    reasons: dict[tuple[str, int], list[str]] = defaultdict(list)
    for i in result.errors:
        if i.line > 0:
            reasons[(i.file, i.line)].append(f"{i.rule}: {i.message}")
    by_line = {(r.file, r.line): r.obj for r in result.rows}
    quarantine = []
    for (file, line), why in sorted(reasons.items()):
        record = by_line.get((file, line))
        entry: dict[str, Any] = {"file": file, "line": line, "reasons": why}
        if record is not None:
            entry["record"] = record
        else:
            entry["raw"] = _raw_line(Path(file), line)
        quarantine.append(entry)
    write_jsonl(out / "quarantine.jsonl", quarantine)

    rules = Counter(f"{i.severity}:{i.rule}" for i in result.issues)
    report = {
        "valid": result.ok,
        "files": [{"path": str(f), "sha256": _sha256(f)} for f in files],
        "lines": result.n_lines,
        "examples_valid": len(result.valid_rows()),
        "errors": len(result.errors),
        "warnings": len(result.warnings),
        "lines_quarantined": len(quarantine),
        "rules": dict(sorted(rules.items())),
        **result.stats,
        "params": {"base_model": params.base_model, "template": params.template,
                   "max_seq_length": params.max_seq_length, "task": params.data.task},
        "issues": [{"file": i.file, "line": i.line, "rule": i.rule, "severity": i.severity, "message": i.message}
                   for i in result.issues[:10_000]],
        "data_docs": str(out / "data_docs" / "index.html") if params.validate.data_docs else None,
    }
    tmp = out / "report.json.tmp"
    tmp.write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    tmp.replace(out / "report.json")


def _raw_line(path: Path, line: int) -> str:
    """The undecoded text of a line that never parsed, kept so nothing is lost."""
    try:
        with path.open("rb") as f:
            for n, raw in enumerate(f, 1):
                if n == line:
                    return raw.rstrip(b"\r\n")[:10_000].decode("utf-8", errors="backslashreplace")
    except OSError:
        pass
    return ""
