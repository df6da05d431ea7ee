"""Data formats: read alpaca/chat JSONL, normalize to one record type, render for the model.

Two input formats (course notes 3.1):
  alpaca  {"instruction": ..., "input": ... (optional), "output": ...}
  chat    {"messages": [{"role": "system"|"user"|"assistant", "content": ...}, ...]}

Both become an `Example` whose `messages` end with the assistant turn to learn.
`render()` is the single place that turns an example into model text; training and
inference both call it, so there is no train/serve template skew.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Literal

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


def iter_lines(path: Path, max_line_bytes: int) -> Iterator[tuple[int, dict[str, Any] | None, Issue | None]]:
    """Yield (line_number, object, issue) for each non-blank line of a JSONL file.

    Accepts UTF-8 with or without BOM and LF or CRLF line ends. Exactly one of
    object / issue is set. Whole-file problems are yielded with line 0.
    """
    name = str(path)
    try:
        data = path.read_bytes()
    except IsADirectoryError:
        yield 0, None, Issue(name, 0, "not-a-file", "is a directory, expected a .jsonl file")
        return
    except OSError as e:
        yield 0, None, Issue(name, 0, "unreadable", e.strerror or str(e))
        return
    if data.startswith(b"\xef\xbb\xbf"):
        data = data[3:]
    if not data.strip():
        yield 0, None, Issue(name, 0, "empty-file", "file has no examples")
        return
    for number, raw in enumerate(data.split(b"\n"), start=1):
        if raw.endswith(b"\r"):
            raw = raw[:-1]
        if not raw.strip():
            continue
        if len(raw) > max_line_bytes:
            yield number, None, Issue(name, number, "line-too-long", f"{len(raw):,} bytes > max_line_bytes {max_line_bytes:,}")
            continue
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            yield number, None, Issue(name, number, "encoding", f"not UTF-8: byte 0x{raw[e.start]:02x} at column {e.start + 1}")
            continue
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as e:
            yield number, None, Issue(name, number, "json", f"invalid JSON: {e.msg} at column {e.colno}")
            continue
        except RecursionError:
            yield number, None, Issue(name, number, "json", "invalid JSON: nested too deeply")
            continue
        if not isinstance(obj, dict):
            kind = "array" if isinstance(obj, list) else type(obj).__name__
            yield number, None, Issue(name, number, "not-object", f"expected a JSON object per line, got a JSON {kind}")
            continue
        yield number, obj, None


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
            keys = ", ".join(sorted(obj)) or "none"
            issues.append(Issue(str(path), number, "unknown-format",
                                f"neither alpaca (instruction/output) nor chat (messages); keys: {keys}"))
            continue
        rows.append(Row(str(path), number, obj, fmt))
    formats = [r.format for r in rows]
    if "alpaca" in formats and "chat" in formats:
        major = max(("alpaca", "chat"), key=formats.count)
        for r in rows:
            if r.format != major:
                issues.append(Issue(r.file, r.line, "mixed-format", f"{r.format} example in a file that is mostly {major}"))
        rows = [r for r in rows if r.format == major]
    return rows, issues


def to_example(row: Row) -> Example | None:
    """Normalize a row; None if its fields are missing or of the wrong type.

    Which field is wrong is the validator's job to report (ftlib.validate).
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


def read_examples(path: str | Path, max_line_bytes: int = 1_000_000) -> list[Example]:
    """Read a file that is known to be valid (e.g. a split written by ftlib)."""
    rows, issues = read_rows(Path(path), max_line_bytes)
    examples = [to_example(r) for r in rows]
    bad = issues + [Issue(r.file, r.line, "fields", "missing or mistyped fields") for r, e in zip(rows, examples) if e is None]
    if bad:
        raise ValueError("\n".join(str(i) for i in bad[:20]))
    return [e for e in examples if e is not None]


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
