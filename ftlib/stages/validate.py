"""Stage `validate`: data contracts for instruction data, enforced with Great Expectations.

Streaming, so memory stays flat however large the data (benchmarks/load_1m.py):
  pass 1  reads every line (ftlib.core.formats.scan_lines) and reports the lines that are not a
          JSON object in a known format (bad UTF-8, bad JSON, arrays, huge lines, empty
          files, unknown or mixed formats). Of each row it keeps only 16-byte digests of its
          content, prompt and output, from which the cross-row facts are counted: copies of
          a row (duplicates) and different outputs for one prompt (contradictions).
  pass 2  reads the rows again in chunks of `chunk_rows`. Each chunk becomes a pandas
          DataFrame per format with derived columns (types, token length after templating,
          the cross-row counts, chat role problems) and a GX suite of expectations runs over
          it. Each expectation carries its rule name, severity and message, and GX's
          unexpected-row index maps a failure back to FILE:LINE. Bad lines go to the
          quarantine as they are found, valid rows to an optional `sink` (`ftlib split`).

Outputs (when out_dir is given): report.json, quarantine.jsonl (every bad line and its
reasons), data_docs/ (GX Data Docs HTML, one validation per chunk). Raw files are only read.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import time
import unicodedata
from array import array
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

from ftlib.core.atomic import write_json
from ftlib.core.config import Params
from ftlib.core.formats import (Format, Issue, Row, chat_problems, detect_format, majority, mixed_issue, render, render_texts,
                           scan_lines, to_example, unknown_issue)

# Rows per GX run: memory grows with the chunk, not with the data, and GX's fixed cost per
# run is small at this size. Tests force tiny chunks to show that chunking changes nothing.
CHUNK_ROWS = 50_000

# Receives each chunk's valid rows in file order, each with True when an earlier row has the
# same content (a duplicate that `duplicates: warning` let through).
Sink = Callable[[list[tuple[Row, bool]]], None]


class UsageError(ValueError):
    """A path that does not exist or holds no data files (exit code 2)."""


@dataclass
class ValidationResult:
    """Counts and issues. Rows are not held: `rows` / `valid_rows()` read the files again."""

    files: list[str]
    issues: list[Issue]
    n_lines: int
    n_rows: int = 0
    n_valid: int = 0
    per_file: dict[str, dict[str, int]] = field(default_factory=dict)  # file -> {"lines": n, "valid": n}
    elapsed_s: float = 0.0
    stats: dict[str, Any] = field(default_factory=dict)
    max_line_bytes: int = 1_000_000
    keep: dict[str, Format | None] = field(default_factory=dict)  # file -> the format kept when it mixes formats

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

    def iter_rows(self) -> Iterator[Row]:
        """The parsed rows, streamed from the files again."""
        for f in self.files:
            for _, row, _ in _rows(Path(f), self.max_line_bytes, self.keep.get(f)):
                if row is not None:
                    yield row

    @property
    def rows(self) -> list[Row]:
        """Every parsed row, read again (small data, tests)."""
        return list(self.iter_rows())

    def valid_rows(self) -> list[Row]:
        bad = self.bad_lines()
        return [r for r in self.iter_rows() if (r.file, r.line) not in bad]


def expand_paths(paths: list[str | Path]) -> list[Path]:
    """Files as given; directories expand to their *.jsonl files, sorted."""
    files: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            # a dangling symlink or a symlink loop is listed too: reading it is an `unreadable` error, never a silent skip
            found = sorted(x for x in p.glob("*.jsonl") if x.is_file() or x.is_symlink())
            if not found:
                raise UsageError(f"{p}: directory has no *.jsonl files")
            files += found
        elif p.exists() or p.is_symlink():
            files.append(p)
        else:
            raise UsageError(f"{p}: no such file or directory")
    return files


def _nfc(value: Any) -> Any:
    """Strings in Unicode NFC, recursively: "é" typed as one code point or as e + a combining accent is the same text."""
    if isinstance(value, str):
        return value if unicodedata.is_normalized("NFC", value) else unicodedata.normalize("NFC", value)
    if isinstance(value, (list, tuple)):
        return [_nfc(v) for v in value]
    if isinstance(value, dict):
        return {_nfc(k): _nfc(v) for k, v in value.items()}
    return value


def _dumps(parts: tuple[Any, ...]) -> bytes:
    """The identity of rows, prompts and answers (duplicates, contradictions, the split): NFC, so a review copied
    from two sources with different accent encodings is one review (NFC text hashes as it always did)."""
    return json.dumps(_nfc(parts), ensure_ascii=False, sort_keys=True).encode()


def content_key(*parts: Any) -> str:
    return hashlib.sha1(_dumps(parts)).hexdigest()


def _prompt_parts(obj: dict[str, Any]) -> tuple[Any, ...]:
    if "messages" in obj:
        msgs = obj.get("messages")
        return (msgs[:-1] if isinstance(msgs, list) else msgs,)
    inp = obj.get("input")
    return obj.get("instruction"), "" if inp is None else inp


def prompt_key(obj: dict[str, Any]) -> str:
    """Identity of an example's prompt: used for contradictions and by the split."""
    return content_key(*_prompt_parts(obj))


def _digest(data: bytes) -> bytes:
    return hashlib.blake2b(data, digest_size=16).digest()  # 128 bits: collisions are not a practical concern


def _type(obj: dict[str, Any], name: str) -> str | None:
    return type(obj[name]).__name__ if name in obj else None


def _strip(v: Any) -> Any:
    return v.strip() if isinstance(v, str) else None


def _answer(obj: dict[str, Any], fmt: str) -> str | None:
    """The stripped output that the label, length and contradiction rules look at."""
    if fmt == "alpaca":
        return _strip(obj.get("output"))
    msgs = obj.get("messages")
    last = msgs[-1] if isinstance(msgs, list) and msgs and isinstance(msgs[-1], dict) else {}
    return _strip(last.get("content")) if last.get("role") == "assistant" else None


# C0/C1 control characters other than tab, newline and CR: legal JSON when escaped
# (\u0007), but in training text they are scraping debris the model would learn to emit.
_CONTROL = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]")


def _control_chars(fields: Iterable[tuple[str, Any]]) -> str | None:
    for name, value in fields:
        if isinstance(value, str) and (m := _CONTROL.search(value)):
            return f"control character U+{ord(m.group()):04X} in {name}; only tab, newline and CR belong in text"
    return None


def _frame(rows: list[Row], fmt: str, token_counts: dict[int, int], copies: Any, outputs_per_prompt: Any) -> Any:
    """One DataFrame row per parsed row of `fmt`, with the derived columns the suite checks.

    copies and outputs_per_prompt are aligned with `rows`: the cross-row counts of pass 1.
    """
    import pandas as pd

    records = []
    for idx, r in enumerate(rows):
        if r.format != fmt:
            continue
        o = r.obj
        rec: dict[str, Any] = {"row": idx, "copies": int(copies[idx]), "outputs_per_prompt": int(outputs_per_prompt[idx]),
                               "n_tokens": token_counts.get(idx), "output": _answer(o, fmt)}
        if fmt == "alpaca":
            rec |= {
                "instruction": _strip(o.get("instruction")),
                "instruction_present": o.get("instruction"), "output_present": o.get("output"),
                "instruction_type": _type(o, "instruction"), "input_type": _type(o, "input"),
                "output_type": _type(o, "output"),
                "extra_fields": ", ".join(sorted(set(o) - {"instruction", "input", "output"})) or None,
                "control_chars": _control_chars((f"`{k}`", o.get(k)) for k in ("instruction", "input", "output")),
            }
        else:
            msgs = o.get("messages")
            contents = ((f"message {i}", m.get("content")) for i, m in enumerate(msgs, 1) if isinstance(m, dict)) if isinstance(msgs, list) else ()
            rec |= {"messages_present": msgs, "extra_fields": ", ".join(sorted(set(o) - {"messages"})) or None,
                    "control_chars": _control_chars(contents)}
            rec |= {f"{k}_problem": v for k, v in chat_problems(msgs).items()}
        records.append(rec)
    df = pd.DataFrame.from_records(records)
    if len(df):
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
        # copies/outputs_per_prompt are counted over all rows in pass 1: a chunk alone cannot see them
        ("duplicate", v.duplicates, "exact duplicate of another example", gxe.ExpectColumnValuesToBeBetween(column="copies", max_value=1)),
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
        self.checkpoints: dict[str, Any] = {}
        if docs_dir is not None:
            self.ctx.add_data_docs_site(site_name="ftlib", site_config={
                "class_name": "SiteBuilder",
                "store_backend": {"class_name": "TupleFilesystemStoreBackend", "base_directory": str(docs_dir.resolve())},
                "site_index_builder": {"class_name": "DefaultSiteIndexBuilder"},
            })

    def run(self, name: str, df: Any, expectations: list[Any], index_col: str) -> Any:
        """Validate df. The suite and checkpoint `name` are built once, then run for every chunk."""
        gx = self.gx
        if name not in self.checkpoints:
            batch = self.source.add_dataframe_asset(name).add_batch_definition_whole_dataframe("all")
            suite = self.ctx.suites.add(gx.ExpectationSuite(name=f"ftlib-{name}"))
            for e in expectations:
                suite.add_expectation(e)
            vd = self.ctx.validation_definitions.add(gx.ValidationDefinition(name=name, data=batch, suite=suite))
            fmt = {"result_format": "COMPLETE", "unexpected_index_column_names": [index_col],
                   "return_unexpected_index_query": False}
            actions = [gx.checkpoint.UpdateDataDocsAction(name="docs", site_names=["ftlib"])] if self.docs_dir else []
            self.checkpoints[name] = self.ctx.checkpoints.add(
                gx.Checkpoint(name=name, validation_definitions=[vd], actions=actions, result_format=fmt))
        result = self.checkpoints[name].run(batch_parameters={"dataframe": df})
        return next(iter(result.run_results.values()))


def _count_tokens(rows: list[Row], params: Params, tokenizer: Any, on_progress: Callable[[int], None]) -> tuple[dict[int, int], list[tuple[int, Issue]]]:
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
                issues.append((idx, Issue(r.file, r.line, "template", str(e).split(": ")[-1])))
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


def _rows(path: Path, max_line_bytes: int, keep: Format | None) -> Iterator[tuple[bytes, Row | None, Issue | None]]:
    """(raw line, row, issue) per non-blank line: a row in a known format, or the line's issue.

    keep: in a file that mixes formats, the one kept (known after pass 1); None keeps both.
    """
    name = str(path)
    for number, raw, obj, issue in scan_lines(path, max_line_bytes):
        if obj is None:
            yield raw, None, issue
            continue
        fmt = detect_format(obj)
        if fmt is None:
            yield raw, None, unknown_issue(name, number, obj)
        elif keep is not None and fmt != keep:
            yield raw, None, mixed_issue(Row(name, number, obj, fmt), keep)
        else:
            yield raw, Row(name, number, obj, fmt), None


_FORMAT_CODE: dict[str, int] = {"alpaca": 0, "chat": 1}
_FORMATS: tuple[Format, Format] = ("alpaca", "chat")
_NO_DIGEST = bytes(16)


@dataclass
class _Pass1:
    """What pass 1 keeps: line-level issues, per-file facts, and ~55 bytes per row."""

    issues: list[Issue] = field(default_factory=list)
    keep: dict[str, Format | None] = field(default_factory=dict)
    rows_per_file: list[int] = field(default_factory=list)
    unparsed_per_file: list[int] = field(default_factory=list)
    signatures: list[tuple[int, int] | None] = field(default_factory=list)
    formats: Counter[str] = field(default_factory=Counter)
    lines: array = field(default_factory=lambda: array("I"))
    fmt: bytearray = field(default_factory=bytearray)
    record: bytearray = field(default_factory=bytearray)  # digest of the whole object
    prompt: bytearray = field(default_factory=bytearray)  # digest of prompt_key's parts
    output: bytearray = field(default_factory=bytearray)  # digest of the stripped answer
    has_output: bytearray = field(default_factory=bytearray)

    def add(self, row: Row) -> None:
        o = row.obj
        answer = _answer(o, row.format)
        self.lines.append(row.line)
        self.fmt.append(_FORMAT_CODE[row.format])
        self.record += _digest(_dumps((o,)))
        self.prompt += _digest(_dumps(_prompt_parts(o)))
        self.output += _NO_DIGEST if answer is None else _digest(_nfc(answer).encode())
        self.has_output.append(answer is not None)

    def drop_minority(self, name: str, start: int, keep: Format) -> int:
        """Turn this file's rows (from `start`) in the other format into `mixed-format` issues."""
        columns = [(self.lines, 1), (self.fmt, 1), (self.record, 16), (self.prompt, 16), (self.output, 16), (self.has_output, 1)]
        tails = [(buf, width, buf[start * width:]) for buf, width in columns]
        kept = [i for i in range(len(self.lines) - start) if _FORMATS[self.fmt[start + i]] == keep]
        dropped = [i for i in range(len(self.lines) - start) if _FORMATS[self.fmt[start + i]] != keep]
        self.issues += [mixed_issue(Row(name, self.lines[start + i], {}, _FORMATS[self.fmt[start + i]]), keep) for i in dropped]
        for buf, width, tail in tails:
            del buf[start * width:]
            for i in kept:
                buf.extend(tail[i * width:(i + 1) * width])
        return len(dropped)


def _signature(path: Path) -> tuple[int, int] | None:
    try:
        st = path.stat()
    except OSError:
        return None
    return st.st_size, st.st_mtime_ns


def _pass1(files: list[Path], params: Params, tick: Callable[[str, int, int], None]) -> _Pass1:
    p = _Pass1()
    for f in files:
        name, start, unparsed, counts = str(f), len(p.lines), 0, Counter()
        p.signatures.append(_signature(f))
        for _, row, issue in _rows(f, params.validate.max_line_bytes, None):
            if row is None:
                assert issue is not None
                p.issues.append(issue)
                unparsed += issue.line > 0
                continue
            counts[row.format] += 1
            p.add(row)
        keep = majority(counts)
        if keep is not None:
            unparsed += p.drop_minority(name, start, keep)
        p.keep[name] = keep
        p.formats.update({k: n for k, n in counts.items() if keep in (None, k)})
        p.rows_per_file.append(len(p.lines) - start)
        p.unparsed_per_file.append(unparsed)
        tick("read", 1, len(files))
    return p


def _group_ids(*cols: Any) -> Any:
    """One id per row; rows equal in every column share it."""
    import numpy as np

    n = len(cols[0])
    if not n:
        return np.zeros(0, np.int64)
    order = np.lexsort(cols[::-1])
    new = np.zeros(n, bool)
    new[0] = True
    for c in cols:
        s = c[order]
        new[1:] |= s[1:] != s[:-1]
    ids = np.empty(n, np.int64)
    ids[order] = np.cumsum(new) - 1
    return ids


def _cross_row(p: _Pass1) -> tuple[Any, Any, Any]:
    """Per row, over all files: copies of its content, distinct outputs of its prompt, and
    whether an earlier row has the same content (the copy split drops under `duplicates: warning`)."""
    import numpy as np

    n = len(p.lines)
    fmt = np.frombuffer(p.fmt, np.uint8)
    record, prompt, output = (np.frombuffer(b, np.uint64).reshape(-1, 2) for b in (p.record, p.prompt, p.output))
    rid = _group_ids(fmt, record[:, 0], record[:, 1])
    copies = np.bincount(rid)[rid] if n else np.zeros(0, np.int64)
    first = np.full(int(rid.max()) + 1 if n else 0, n, np.int64)
    np.minimum.at(first, rid, np.arange(n))
    repeat = first[rid] != np.arange(n)
    # contradictions: like pandas' groupby(prompt)[output].nunique(), null outputs not counted
    pid = _group_ids(fmt, prompt[:, 0], prompt[:, 1])
    answered = np.flatnonzero(np.frombuffer(p.has_output, np.uint8))
    outputs_per_prompt = np.zeros(n, np.int64)
    if len(answered):
        pair = _group_ids(pid[answered], output[answered, 0], output[answered, 1])
        pair_prompt = np.empty(int(pair.max()) + 1, np.int64)
        pair_prompt[pair] = pid[answered]
        outputs_per_prompt = np.bincount(pair_prompt, minlength=int(pid.max()) + 1)[pid]
    return copies, outputs_per_prompt, repeat


class _Quarantine:
    """quarantine.jsonl written as validation goes: one part per input file (appended chunk
    by chunk, in line order), joined in file-name order at the end."""

    def __init__(self, out: Path, files: list[Path]):
        import tempfile

        out.mkdir(parents=True, exist_ok=True)
        self.dir = Path(tempfile.mkdtemp(prefix=".quarantine-", dir=out))
        self.names = [str(f) for f in files]
        self.count = 0

    def add(self, entries: list[tuple[int, int, dict[str, Any]]]) -> None:
        """entries: (file index, line, entry)."""
        handles: dict[int, Any] = {}
        try:
            for fi, _, entry in sorted(entries, key=lambda e: (e[0], e[1])):
                if fi not in handles:
                    handles[fi] = (self.dir / f"{fi}.jsonl").open("a", encoding="utf-8", newline="\n")
                handles[fi].write(json.dumps(entry, ensure_ascii=False) + "\n")
                self.count += 1
        finally:
            for h in handles.values():
                h.close()

    def finish(self, path: Path) -> None:
        tmp = path.with_name(path.name + ".tmp")
        with tmp.open("wb") as dst:
            for fi in sorted(range(len(self.names)), key=lambda i: self.names[i]):
                part = self.dir / f"{fi}.jsonl"
                if part.is_file():
                    with part.open("rb") as src:
                        shutil.copyfileobj(src, dst)
        tmp.replace(path)
        self.discard()

    def discard(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)


def _raw_text(raw: bytes) -> str:
    """The undecoded text of a line that never parsed, kept so nothing is lost."""
    return raw.rstrip(b"\r\n")[:10_000].decode("utf-8", errors="backslashreplace")


@dataclass
class _Pass2:
    """Pass 2: rows in chunks through token counting and the GX suites."""

    files: list[Path]
    params: Params
    p1: _Pass1
    cross: tuple[Any, Any, Any]
    tokenizer: Any
    gxr: Any
    quarantine: _Quarantine | None
    sink: Sink | None
    tick: Callable[[str, int, int], None]
    issues: list[Issue] = field(default_factory=list)
    label_counts: Counter[str] = field(default_factory=Counter)
    valid_per_file: Counter[int] = field(default_factory=Counter)
    changed: set[int] = field(default_factory=set)
    max_tokens: int = 0
    rules: dict[str, list[tuple[str, str, str, Any]]] = field(default_factory=dict)

    def run(self, chunk_rows: int) -> None:
        chunk: list[tuple[int, int, Row]] = []  # (file index, row index over all files, row)
        pending: list[tuple[int, int, dict[str, Any]]] = []  # quarantine entries of lines that never parsed
        gi = 0
        for fi, f in enumerate(self.files):
            end = gi + self.p1.rows_per_file[fi]
            if gi == end and (self.quarantine is None or not self.p1.unparsed_per_file[fi]):
                continue  # nothing to check or to quarantine here
            for raw, row, issue in _rows(f, self.params.validate.max_line_bytes, self.p1.keep[str(f)]):
                if row is None:
                    assert issue is not None
                    if issue.line > 0 and self.quarantine is not None:
                        pending.append((fi, issue.line, {"file": issue.file, "line": issue.line,
                                                         "reasons": [f"{issue.rule}: {issue.message}"], "raw": _raw_text(raw)}))
                    continue
                if gi >= end or self.p1.lines[gi] != row.line:
                    break  # the file changed since pass 1 (reported as `changed`)
                chunk.append((fi, gi, row))
                gi += 1
                if len(chunk) >= chunk_rows:
                    self.flush(chunk, pending)
                    chunk, pending = [], []
            if gi != end:
                self.changed.add(fi)
                gi = end
        self.flush(chunk, pending)

    def flush(self, chunk: list[tuple[int, int, Row]], pending: list[tuple[int, int, dict[str, Any]]]) -> None:
        """Check one chunk; pass on its valid rows; quarantine its bad lines (and `pending`)."""
        rows = [r for *_, r in chunk]
        copies, outputs_per_prompt, repeat = (a[[g for _, g, _ in chunk]] for a in self.cross)
        found = self.check(rows, copies, outputs_per_prompt) if rows else []
        self.issues += [i for _, i in found]
        errors: dict[int, set[Issue]] = {}
        for k, i in found:
            if i.severity == "error":
                errors.setdefault(k, set()).add(i)
        valid = [k for k in range(len(chunk)) if k not in errors]
        self.valid_per_file.update(chunk[k][0] for k in valid)
        if self.sink is not None and valid:
            self.sink([(rows[k], bool(repeat[k])) for k in valid])
        if self.quarantine is not None:
            self.quarantine.add(pending + [
                (chunk[k][0], rows[k].line, {"file": rows[k].file, "line": rows[k].line,
                                             "reasons": [f"{i.rule}: {i.message}" for i in sorted(bad)], "record": rows[k].obj})
                for k, bad in errors.items()])

    def check(self, rows: list[Row], copies: Any, outputs_per_prompt: Any) -> list[tuple[int, Issue]]:
        """Token counts and the GX suites over one chunk: (index in chunk, issue) for each problem."""
        params = self.params
        counts, found = _count_tokens(rows, params, self.tokenizer, lambda n: self.tick("tokens", n, len(self.p1.lines)))
        self.max_tokens = max(self.max_tokens, max(counts.values(), default=0))
        for fmt in _FORMATS:
            df = _frame(rows, fmt, counts, copies, outputs_per_prompt)
            if not len(df):
                continue
            rules = self.rules.setdefault(fmt, _expectations(fmt, params))
            result = self.gxr.run(fmt, df, [e for *_, e in rules], "row")
            for (rule, severity, message, _), res in zip(rules, result.results):
                if res.success:
                    continue
                col = res.expectation_config.kwargs["column"]
                for hit in res.result.get("unexpected_index_list") or []:
                    k = int(hit["row"])
                    value = hit.get(col)
                    if isinstance(value, float) and value.is_integer():  # a chunk with a non-string output makes lengths float
                        value = int(value)
                    found.append((k, Issue(rows[k].file, rows[k].line, rule, message.format(value=value), severity)))
            if params.data.task == "classification":
                self.label_counts.update(o for o in df["output"] if isinstance(o, str))
        return found


def validate_paths(
    paths: list[str | Path],
    params: Params,
    out_dir: str | Path | None = None,
    tokenizer: Any = None,
    progress: Callable[[str, int, int], None] | None = None,
    *,
    chunk_rows: int = CHUNK_ROWS,
    sink: Sink | None = None,
) -> ValidationResult:
    """Validate JSONL files; write report/quarantine/Data Docs to out_dir if given.

    progress(stage, advance, total) is called as work proceeds (the CLI draws bars).
    sink, if given, receives the valid rows chunk by chunk (see `Sink`); whether the data
    as a whole is valid is only known when this returns.
    """
    t0 = time.perf_counter()
    tick = progress or (lambda *_: None)
    files = expand_paths(paths)
    names = [str(f) for f in files]
    p1 = _pass1(files, params, tick)
    n_rows = len(p1.lines)
    n_lines = n_rows + sum(1 for i in p1.issues if i.line > 0)

    if tokenizer is None and n_rows:
        from ftlib.core.models import load_tokenizer

        tokenizer = load_tokenizer(params.base_model, params.trust_remote_code, light=True)
    out = Path(out_dir) if out_dir is not None else None
    docs_dir = out / "data_docs" if out is not None and params.validate.data_docs else None
    if docs_dir is not None:
        shutil.rmtree(docs_dir, ignore_errors=True)
    gxr = _GX(docs_dir) if n_rows or docs_dir else None
    quarantine = _Quarantine(out, files) if out is not None else None
    p2 = _Pass2(files, params, p1, _cross_row(p1), tokenizer, gxr, quarantine, sink, tick)
    try:
        p2.run(max(1, chunk_rows))
    except BaseException:
        if quarantine is not None:
            quarantine.discard()
        raise
    p2.changed |= {fi for fi, f in enumerate(files) if _signature(f) != p1.signatures[fi]}
    issues = p1.issues + p2.issues
    issues += [Issue(names[fi], 0, "changed", "the file changed while it was being validated; run again") for fi in sorted(p2.changed)]
    if params.data.task == "classification" and p2.label_counts:
        issues += _class_balance(gxr, p2.label_counts, params, files)
    issues = sorted(set(issues), key=lambda i: (i.file, i.line, i.rule, i.message))

    per_file: dict[str, dict[str, int]] = {}
    for fi, name in enumerate(names):
        n = per_file.setdefault(name, {"lines": 0, "valid": 0})
        n["lines"] += p1.rows_per_file[fi] + p1.unparsed_per_file[fi]
        n["valid"] += p2.valid_per_file[fi]
    result = ValidationResult(names, issues, n_lines, n_rows, sum(p2.valid_per_file.values()), per_file,
                              max_line_bytes=params.validate.max_line_bytes, keep=p1.keep)
    result.stats = {
        "formats": dict(p1.formats),
        "labels": {k: p2.label_counts.get(k, 0) for k in params.data.labels} if params.data.task == "classification" else {},
        "max_tokens": p2.max_tokens,
    }
    result.elapsed_s = time.perf_counter() - t0
    if out is not None and quarantine is not None:
        quarantine.finish(out / "quarantine.jsonl")
        write_outputs(result, params, out, files, quarantine.count)
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
        with path.open("rb") as f:
            return hashlib.file_digest(f, "sha256").hexdigest()
    except OSError:
        return None


def write_outputs(result: ValidationResult, params: Params, out: Path, files: list[Path], lines_quarantined: int) -> None:
    """report.json, deterministic: no timestamps, so DVC sees no change on a no-op rerun
    (quarantine.jsonl is written by validate_paths as it goes)."""
    out.mkdir(parents=True, exist_ok=True)
    rules = Counter(f"{i.severity}:{i.rule}" for i in result.issues)
    report = {
        "valid": result.ok,
        "files": [{"path": str(f), "sha256": _sha256(f)} for f in files],
        "lines": result.n_lines,
        "examples_valid": result.n_valid,
        "errors": len(result.errors),
        "warnings": len(result.warnings),
        "lines_quarantined": lines_quarantined,
        "rules": dict(sorted(rules.items())),
        **result.stats,
        "params": {"base_model": params.base_model, "template": params.template,
                   "max_seq_length": params.max_seq_length, "task": params.data.task},
        "issues": [{"file": i.file, "line": i.line, "rule": i.rule, "severity": i.severity, "message": i.message}
                   for i in result.issues[:10_000]],
        "data_docs": str(out / "data_docs" / "index.html") if params.validate.data_docs else None,
    }
    write_json(out / "report.json", report)
