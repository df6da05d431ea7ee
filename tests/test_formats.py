import json
from pathlib import Path

import pytest

from ftlib.core.formats import ALPACA_PROMPT, Example, read_examples, read_rows, render, render_prompt, to_example
from tests.conftest import alpaca, write_jsonl

CHAT = {"messages": [
    {"role": "system", "content": "Eres un asistente experto en Python"},
    {"role": "user", "content": "¿Cómo creo una lista?"},
    {"role": "assistant", "content": "Usa corchetes: mi_lista = [1, 2, 3]"},
]}

# Meta's Llama 3 Instruct chat template (as shipped in its tokenizer_config.json).
LLAMA3_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}"
    "{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)


def test_alpaca_and_chat_normalize_to_one_record_type(tmp_path: Path):
    f = write_jsonl(tmp_path / "a.jsonl", [alpaca("Me encanta", "POSITIVO"), {"instruction": "Saluda", "output": "Hola, ¿qué tal?"}])
    a, b = read_examples(f)
    assert a.messages == [{"role": "user", "content": "Clasifica el sentimiento\n\nMe encanta"},
                          {"role": "assistant", "content": "POSITIVO"}]
    assert b.prompt_messages == [{"role": "user", "content": "Saluda"}] and b.output == "Hola, ¿qué tal?"
    c = read_examples(write_jsonl(tmp_path / "c.jsonl", [CHAT]))[0]
    assert isinstance(c, Example) and c.format == "chat" and c.output.startswith("Usa corchetes")
    assert [m["role"] for m in c.prompt_messages] == ["system", "user"]


def test_bom_and_crlf_are_accepted(tmp_path: Path):
    lines = [json.dumps(alpaca(f"texto {i}")) for i in range(3)]
    f = tmp_path / "bom.jsonl"
    f.write_bytes(b"\xef\xbb\xbf" + "\r\n".join(lines).encode() + b"\r\n")
    rows, issues = read_rows(f)
    assert issues == [] and [r.line for r in rows] == [1, 2, 3]
    assert rows[0].obj["instruction"] == "Clasifica el sentimiento"


@pytest.mark.parametrize("raw, rule", [
    (b'{"instruction": "x", ', "json"),
    (b'[1, 2, 3]', "not-object"),
    (b'"just a string"', "not-object"),
    (b'{"instruction": "caf\xe9", "output": "hello"}', "encoding"),
    (b'{"prompt": "x", "completion": "y"}', "unknown-format"),
])
def test_unparseable_lines_are_reported_with_line_and_rule(tmp_path: Path, raw: bytes, rule: str):
    f = write_jsonl(tmp_path / "bad.jsonl", [alpaca("ok one"), raw])
    rows, issues = read_rows(f)
    assert len(rows) == 1 and len(issues) == 1
    assert issues[0].line == 2 and issues[0].rule == rule
    assert str(issues[0]).startswith(f"{f}:2: {rule}: ")


def test_mixed_formats_flag_the_minority(tmp_path: Path):
    f = write_jsonl(tmp_path / "mixed.jsonl", [alpaca("uno"), alpaca("dos"), CHAT])
    rows, issues = read_rows(f)
    assert [i.rule for i in issues] == ["mixed-format"] and issues[0].line == 3 and len(rows) == 2


def test_alpaca_template_is_the_course_prompt_with_eos(tokenizer):
    ex = to_example_from(alpaca("Este producto superó todas mis expectativas!", "POSITIVO"))
    prompt, completion = render(ex, tokenizer, "alpaca")
    assert prompt == ALPACA_PROMPT.format("Clasifica el sentimiento", "Este producto superó todas mis expectativas!", "")
    assert prompt.endswith("### Response:\n")
    assert completion == "POSITIVO" + tokenizer.eos_token


def test_chat_template_is_chatml_for_smollm2_and_prompt_matches_inference(tokenizer):
    ex = to_example_from(CHAT)
    prompt, completion = render(ex, tokenizer, "chat")
    assert prompt.startswith("<|im_start|>system\nEres un asistente experto en Python<|im_end|>")
    assert prompt.endswith("<|im_start|>assistant\n")
    assert completion.startswith("Usa corchetes") and tokenizer.eos_token in completion
    # Inference builds its prompt with the same function: no train/serve skew.
    assert render_prompt(ex.prompt_messages, tokenizer, "chat") == prompt


def test_llama3_template_is_used_when_the_tokenizer_carries_it(tokenizer):
    import copy

    tok = copy.deepcopy(tokenizer)
    tok.chat_template = LLAMA3_TEMPLATE
    prompt, completion = render(to_example_from(alpaca("Muy decepcionado", "NEGATIVO")), tok, "chat")
    assert "<|start_header_id|>user<|end_header_id|>\n\nClasifica el sentimiento\n\nMuy decepcionado<|eot_id|>" in prompt
    assert prompt.endswith("<|start_header_id|>assistant<|end_header_id|>\n\n")
    assert completion == "NEGATIVO<|eot_id|>"


def test_alpaca_template_refuses_multi_turn_chat(tokenizer):
    multi = {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
                          {"role": "user", "content": "c"}, {"role": "assistant", "content": "d"}]}
    with pytest.raises(ValueError, match="template: chat"):
        render(to_example_from(multi), tokenizer, "alpaca")


def to_example_from(obj):
    from ftlib.core.formats import Row, detect_format

    ex = to_example(Row("mem.jsonl", 1, obj, detect_format(obj)))
    assert ex is not None
    return ex


@pytest.mark.parametrize("template", ["chat", "alpaca"])
def test_batch_render_equals_render_on_all_sample_sets(tokenizer, template):
    from ftlib.core.formats import render_texts
    from tests.conftest import REPO

    for name in ("raw/sentiment.jsonl", "samples/support_chat.jsonl", "samples/python_code.jsonl"):
        examples = read_examples(REPO / "data" / name)
        if template == "alpaca":
            examples = [e for e in examples if len(e.messages) <= 3]
        assert render_texts(examples, tokenizer, template) == ["".join(render(e, tokenizer, template)) for e in examples]
