"""Data formats: read alpaca/chat JSONL, normalize to one record type, render for the model.

Two input formats (course notes 3.1):
  alpaca  {"instruction": ..., "input": ... (optional), "output": ...}
  chat    {"messages": [{"role": "system"|"user"|"assistant", "content": ...}, ...]}

Both become an `Example` whose `messages` end with the assistant turn to learn.
`render()` is the single place that turns an example into model text; training and
inference both call it, so there is no train/serve template skew.
"""

from __future__ import annotations

import itertools
import json
import math
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, Iterator, Literal

Format = Literal["alpaca", "chat"]
ROLES = ("system", "user", "assistant")

# Course notes 4.3, verbatim. EOS is appended after the response when training.
ALPACA_PROMPT = """Below is an instruction that describes a task, paired with an input that provides further context. Write a response that appropriately completes the request.

### Instruction:
{}

### Input:
{}

### Response:
{}"""


@dataclass(frozen=True, order=True)
class Issue:
    """One problem found in a data file, printed as `FILE:LINE: RULE: message`."""

    file: str
    line: int  # 1-based; 0 for whole-file problems (empty file, class balance)
    rule: str
    message: str
    severity: Literal["error", "warning"] = "error"

    def __str__(self) -> str:
        return f"{self.file}:{self.line}: {self.rule}: {self.message}"


@dataclass
class Row:
    """A line that parsed as a JSON object; fields are not checked yet."""

    file: str
    line: int
    obj: dict[str, Any]
    format: Format | None  # None when the object has neither `messages` nor `instruction`/`output`


@dataclass
class Example:
    """A structurally valid example in the one normalized form."""

    messages: list[dict[str, str]]
    format: Format
    file: str = ""
    line: int = 0
    raw: dict[str, Any] = field(default_factory=dict)

    @property
    def output(self) -> str:
        return self.messages[-1]["content"]

    @property
    def prompt_messages(self) -> list[dict[str, str]]:
        return self.messages[:-1]


def detect_format(obj: dict[str, Any]) -> Format | None:
    if "messages" in obj:
        return "chat"
    if "instruction" in obj or "output" in obj:
        return "alpaca"
    return None


# How much of a bad line quarantine.jsonl keeps, so nothing is lost but nothing explodes.
RAW_HEAD = 10_000
_BOM = b"\xef\xbb\xbf"
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")
_JSON_KIND = {list: "array", str: "string", int: "number", float: "number", bool: "boolean", type(None): "null"}


class _NotJSON(ValueError):
    """Python's json module accepts it; JSON (RFC 8259) and the tools downstream do not."""


def _constant(name: str) -> Any:
    raise _NotJSON(f"{name} is not a JSON value")


def _int(text: str) -> int:
    # Python refuses to convert longer digit strings (a ValueError that is not a JSONDecodeError)
    if len(text) > 4000:
        raise _NotJSON(f"a number with {len(text):,} digits")
    return int(text)


def _float(text: str) -> float:
    value = float(text)
    if math.isinf(value):  # 1e400 parses as inf and would be written back as `Infinity`
        raise _NotJSON(f"number {text[:20]} is out of range")
    return value


def _read_line(f: BinaryIO, cap: int) -> tuple[bytes, int, bool] | None:
    """The next line: (its first `cap` bytes, its length without the line end, blank?).

    A line longer than `cap` is consumed without holding it in memory.
    """
    head = f.readline(cap)
    if not head:
        return None
    total, tail, blank = len(head), head[-2:], not head.strip()
    if len(head) == cap and not head.endswith(b"\n"):
        while more := f.readline(1 << 20):
            total, tail = total + len(more), (tail + more)[-2:]
            blank = blank and not more.strip()
            if more.endswith(b"\n"):
                break
    if tail.endswith(b"\n"):
        total, tail = total - 1, tail[:-1]
    if tail.endswith(b"\r"):
        total -= 1
    return head, total, blank


def parse_line(raw: bytes) -> tuple[dict[str, Any] | None, str | None, str]:
    """(object, None, "") or (None, rule, message) for one line without its line end."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        return None, "encoding", f"not UTF-8: byte 0x{raw[e.start]:02x} at column {e.start + 1}"
    if text.startswith("\ufeff"):
        return None, "encoding", "UTF-8 byte-order mark inside the file (were files concatenated?)"
    try:
        obj = json.loads(text, parse_constant=_constant, parse_int=_int, parse_float=_float)
    except json.JSONDecodeError as e:
        return None, "json", f"invalid JSON: {e.msg.removesuffix(' at')} at column {e.colno}"
    except _NotJSON as e:
        return None, "json", f"invalid JSON: {e}"
    except RecursionError:
        return None, "json", "invalid JSON: nested too deeply"
    if not isinstance(obj, dict):
        return None, "not-object", f"expected a JSON object per line, got a JSON {_JSON_KIND.get(type(obj), type(obj).__name__)}"
    if _SURROGATE_ESCAPE.search(raw):
        try:  # a paired \ud83d\ude00 is one character; a lone half cannot be written as UTF-8
            json.dumps(obj, ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError:
            return None, "encoding", "a \\uD800-\\uDFFF escape without its pair is not a character"
    return obj, None, ""


def _binary_kind(head: bytes) -> str | None:
    """Whole files that are not UTF-8 text at all get one clear error, not one per line."""
    if head.startswith((b"\xff\xfe", b"\xfe\xff")):
        return "file is UTF-16 (it starts with a UTF-16 byte-order mark); save it as UTF-8"
    if head.startswith(b"\x1f\x8b"):
        return "file is gzip-compressed; decompress it first"
    return None


def scan_lines(path: Path, max_line_bytes: int) -> Iterator[tuple[int, bytes, dict[str, Any] | None, Issue | None]]:
    """Yield (line_number, raw, object, issue) for each non-blank line, streaming.

    raw is the line as stored (at most max(max_line_bytes, RAW_HEAD) + 2 bytes), kept for
    quarantine.jsonl. Accepts UTF-8 with or without BOM and LF or CRLF line ends. Exactly
    one of object / issue is set. Whole-file problems are yielded with line 0.
    """
    name = str(path)
    try:
        f = path.open("rb")
    except IsADirectoryError:
        yield 0, b"", None, Issue(name, 0, "not-a-file", "is a directory, expected a .jsonl file")
        return
    except OSError as e:
        yield 0, b"", None, Issue(name, 0, "unreadable", e.strerror or str(e))
        return
    cap = max(max_line_bytes, RAW_HEAD) + 2
    content = False
    with f:
        try:
            for number in itertools.count(1):
                line = _read_line(f, cap)
                if line is None:
                    break
                raw, length, blank = line
                if number == 1 and (kind := _binary_kind(raw)):
                    yield 0, b"", None, Issue(name, 0, "encoding", kind)
                    return
                body = raw[3:] if number == 1 and raw.startswith(_BOM) else raw
                if number == 1 and body is not raw:
                    length, blank = length - 3, not body.strip()
                if blank:
                    continue
                content = True
                if length > max_line_bytes:
                    yield number, raw, None, Issue(name, number, "line-too-long", f"{length:,} bytes > max_line_bytes {max_line_bytes:,}")
                    continue
                obj, rule, message = parse_line(body.rstrip(b"\n").removesuffix(b"\r"))
                yield number, raw, obj, None if rule is None else Issue(name, number, rule, message)
        except OSError as e:  # e.g. an I/O error half way through
            yield 0, b"", None, Issue(name, 0, "unreadable", e.strerror or str(e))
            return
    if not content:
        yield 0, b"", None, Issue(name, 0, "empty-file", "file has no examples")


def iter_lines(path: Path, max_line_bytes: int) -> Iterator[tuple[int, dict[str, Any] | None, Issue | None]]:
    """Yield (line_number, object, issue) for each non-blank line of a JSONL file (see scan_lines)."""
    for number, _, obj, issue in scan_lines(path, max_line_bytes):
        yield number, obj, issue


def majority(formats: Counter[Format]) -> Format | None:
    """In a file that mixes formats, the one kept (the other's lines are `mixed-format`); None if not mixed."""
    if formats["alpaca"] and formats["chat"]:
        return max(("alpaca", "chat"), key=lambda f: formats[f])
    return None


def mixed_issue(row: Row, major: Format) -> Issue:
    return Issue(row.file, row.line, "mixed-format", f"{row.format} example in a file that is mostly {major}")


def unknown_issue(file: str, line: int, obj: dict[str, Any]) -> Issue:
    keys = ", ".join(sorted(obj)) or "none"
    return Issue(file, line, "unknown-format", f"neither alpaca (instruction/output) nor chat (messages); keys: {keys}")


def read_rows(path: Path, max_line_bytes: int = 1_000_000) -> tuple[list[Row], list[Issue]]:
    """Parse a file into rows (JSON objects) and line-level issues.

    A file mixing formats is reported on the lines in the minority format.
    """
    rows: list[Row] = []
    issues: list[Issue] = []
    for number, obj, issue in iter_lines(path, max_line_bytes):
        if issue is not None:
            issues.append(issue)
            continue
        assert obj is not None
        fmt = detect_format(obj)
        if fmt is None:
            issues.append(unknown_issue(str(path), number, obj))
            continue
        rows.append(Row(str(path), number, obj, fmt))
    major = majority(Counter(r.format for r in rows))
    if major is not None:
        issues += [mixed_issue(r, major) for r in rows if r.format != major]
        rows = [r for r in rows if r.format == major]
    return rows, issues


def chat_problems(msgs: Any) -> dict[str, str | None]:
    """Role rules for one conversation; each value is a message or None when fine."""
    out: dict[str, str | None] = {"structure": None, "roles": None, "order": None, "ends": None, "empty": None}
    if not isinstance(msgs, list) or not msgs:
        out["structure"] = "`messages` must be a non-empty list" if msgs is not None else None
        return out
    for i, m in enumerate(msgs, 1):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            out["structure"] = f"message {i} must be an object with string `role` and `content`"
            return out
    roles = [m["role"] for m in msgs]
    unknown = [(i, r) for i, r in enumerate(roles, 1) if r not in ROLES]
    if unknown:
        out["roles"] = f"message {unknown[0][0]} has unknown role {unknown[0][1]!r} (allowed: system, user, assistant)"
    elif "system" in roles[1:]:
        out["roles"] = f"message {roles.index('system', 1) + 1}: a system message may only come first"
    turns = roles[1:] if roles[0] == "system" else roles
    if not out["roles"]:
        for i, r in enumerate(turns):
            expected = "user" if i % 2 == 0 else "assistant"
            if r != expected:
                pos = i + 1 + (roles[0] == "system")
                out["order"] = (f"message {pos} is {r!r} but a user turn must precede each assistant turn"
                                if r == "assistant" else f"message {pos}: two {r} turns in a row")
                break
    if roles[-1] != "assistant":
        out["ends"] = f"conversation ends with a {roles[-1]!r} turn; it must end with the assistant answer to learn"
    empty = [i for i, m in enumerate(msgs, 1) if not m["content"].strip()]
    if empty:
        out["empty"] = f"message {empty[0]} has empty content"
    return out


def to_example(row: Row) -> Example | None:
    """Normalize a row; None if its fields are missing or of the wrong type.

    Which field is wrong is the validator's job to report (ftlib.stages.validate).
    """
    obj = row.obj
    if row.format == "alpaca":
        instruction, inp, output = obj.get("instruction"), obj.get("input", ""), obj.get("output")
        if inp is None:
            inp = ""
        if not all(isinstance(v, str) for v in (instruction, inp, output)):
            return None
        user = instruction if not inp else f"{instruction}\n\n{inp}"
        messages = [{"role": "user", "content": user}, {"role": "assistant", "content": output}]
    else:
        msgs = obj.get("messages")
        if not isinstance(msgs, list) or not msgs:
            return None
        if not all(isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in msgs):
            return None
        messages = [{"role": m["role"], "content": m["content"]} for m in msgs]
    return Example(messages, row.format, row.file, row.line, obj)


def example_problem(row: Row) -> tuple[str, str] | None:
    """(rule, message) when a row cannot become a usable Example; the rule names are validate's."""
    obj = row.obj
    if row.format == "alpaca":
        for name in ("instruction", "output"):
            if obj.get(name) is None:
                return "required-field", f"missing or null `{name}`"
        for name, ok in (("instruction", (str,)), ("input", (str, type(None))), ("output", (str,))):
            if not isinstance(obj.get(name), ok):
                return "type", f"`{name}` must be a string" + (" or null" if name == "input" else "")
        return None
    if obj.get("messages") is None:
        return "required-field", "missing or null `messages`"
    problems = chat_problems(obj["messages"])
    for key, rule in (("structure", "type"), ("roles", "chat-roles"), ("order", "chat-order"), ("ends", "chat-ends-with-assistant")):
        if problems[key]:
            return rule, problems[key]
    return None


def read_examples(path: str | Path, max_line_bytes: int = 1_000_000) -> list[Example]:
    """Read a file that should be valid (a split written by ftlib, data to evaluate).

    Raises ValueError with one `FILE:LINE: RULE: message` per problem (the first 20) when a
    line is not a usable example; `ftlib validate` checks the rest of the contract.
    """
    rows, issues = read_rows(Path(path), max_line_bytes)
    examples = []
    for r in rows:
        problem = example_problem(r)
        if problem is not None:
            issues.append(Issue(r.file, r.line, *problem))
        elif (ex := to_example(r)) is not None:
            examples.append(ex)
    if issues:
        issues.sort()
        more = [f"... and {len(issues) - 20} more"] if len(issues) > 20 else []
        raise ValueError("\n".join([str(i) for i in issues[:20]] + more))
    return examples


# ---------------------------------------------------------------------------
# Rendering: the one function training and inference share.

def alpaca_fields(example: Example) -> tuple[str, str]:
    """(instruction, input) for the alpaca prompt."""
    raw = example.raw
    if example.format == "alpaca" and raw:
        return raw.get("instruction", ""), raw.get("input") or ""
    turns = example.prompt_messages
    if [m["role"] for m in turns if m["role"] != "system"] != ["user"]:
        raise ValueError(f"{example.file}:{example.line}: template: the alpaca template needs one user turn; use template: chat")
    system = "".join(m["content"] + "\n\n" for m in turns if m["role"] == "system")
    return system + turns[-1]["content"], ""


def render(example: Example, tokenizer: Any, template: str = "chat") -> tuple[str, str]:
    """Return (prompt, completion) text. The completion ends with the end-of-turn token.

    The loss is taken on the completion only; at inference the model is given the
    prompt and generates until that token.
    """
    if template == "alpaca":
        instruction, inp = alpaca_fields(example)
        return ALPACA_PROMPT.format(instruction, inp, ""), example.output + tokenizer.eos_token
    prompt = render_prompt(example.prompt_messages, tokenizer, template)
    full = tokenizer.apply_chat_template(example.messages, tokenize=False)
    if not full.startswith(prompt):  # a template that rewrites earlier turns; rare
        raise ValueError(f"{example.file}:{example.line}: template: chat template does not extend the prompt")
    return prompt, full[len(prompt):]


def render_texts(examples: list[Example], tokenizer: Any, template: str = "chat") -> list[str]:
    """prompt + completion for many examples at once: what `render` gives, ~7x faster.

    Validation counts tokens of every row, so it renders 100k examples at a time. For the
    chat template we compile the tokenizer's template once (transformers' own sandboxed
    compiler) and render each conversation in one pass, instead of two
    apply_chat_template calls per example. Our messages are plain JSON strings, which is
    what apply_chat_template's input sanitizing produces anyway. tests/test_formats.py
    checks the texts are identical to `render`.
    """
    if template == "alpaca":
        return ["".join(render(ex, tokenizer, template)) for ex in examples]
    try:
        from transformers.utils.chat_template_utils import _compile_jinja_template

        compiled = _compile_jinja_template(tokenizer.get_chat_template())
    except (ImportError, AttributeError):  # another transformers version: the slow, public path
        return [tokenizer.apply_chat_template(ex.messages, tokenize=False) for ex in examples]
    specials = dict(tokenizer.special_tokens_map)
    return [compiled.render(messages=ex.messages, add_generation_prompt=False, **specials) for ex in examples]


def render_prompt(messages: list[dict[str, str]], tokenizer: Any, template: str = "chat") -> str:
    """The prompt for generation: every turn so far plus the assistant header."""
    if template == "alpaca":
        ex = Example(messages + [{"role": "assistant", "content": ""}], "chat")
        instruction, inp = alpaca_fields(ex)
        return ALPACA_PROMPT.format(instruction, inp, "")
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def write_jsonl(path: Path, objects: list[dict[str, Any]]) -> None:
    """Write atomically: a reader never sees a half-written file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w", encoding="utf-8", newline="\n") as f:
        for obj in objects:
            f.write(json.dumps(obj, ensure_ascii=False) + "\n")
    tmp.replace(path)


# ---------------------------------------------------------------------------
# Token ids: the same encoding for training (prompt + completion) and inference (prompt).

def encode_prompt(prompt: str, tokenizer: Any, template: str = "chat") -> list[int]:
    """Prompt ids. A chat template writes its own BOS into the text; the alpaca prompt
    gets the tokenizer's usual special tokens (BOS for Llama)."""
    return tokenizer(prompt, add_special_tokens=(template == "alpaca"))["input_ids"]


def encode_example(example: Example, tokenizer: Any, template: str, max_length: int) -> dict[str, list[int]]:
    """input_ids + completion_mask (1 = supervised) for one example.

    The completion always ends with EOS so the model learns to stop; whatever a chat
    template writes after the end-of-turn token (ChatML's trailing newline) is dropped.
    """
    prompt, completion = render(example, tokenizer, template)
    p = encode_prompt(prompt, tokenizer, template)
    c = tokenizer(completion, add_special_tokens=False)["input_ids"]
    eos = tokenizer.eos_token_id
    c = c[: c.index(eos) + 1] if eos in c else c + [eos]
    ids, mask = (p + c)[:max_length], ([0] * len(p) + [1] * len(c))[:max_length]
    return {"input_ids": ids, "completion_mask": mask}
