"""Every variant `ftlib quantize` writes is a path the other commands load and generate from."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from ftlib.serving.generate import load_predictor, user_messages
from ftlib.stages.quantize import ALL_VARIANTS, QuantizeError, modelfile, quantize

CONV = user_messages("Clasifica el sentimiento", "me encanta")


@pytest.fixture(scope="module")
def variants(tiny_adapter, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("quantized")
    manifest = quantize(tiny_adapter, tmp / "quantized", tmp / "merged", ALL_VARIANTS, "bfloat16", progress=lambda m: None)
    return {v["name"]: v for v in manifest}


def test_manifest_lists_every_variant_and_files_exist(variants):
    assert sorted(variants) == sorted(["merged", "gguf-f16", "gguf-q8_0", "gguf-q4_k_m", "bnb-int8", "bnb-nf4", "torch-int8"])
    for v in variants.values():
        assert Path(v["path"]).exists(), v
    out = Path(variants["gguf-q8_0"]["path"]).parent
    assert json.loads((out / "variants.json").read_text())[0]["name"] == "merged"
    # the 4-bit and 8-bit files are smaller than the 16-bit one
    sizes = {k: Path(variants[k]["path"]).stat().st_size for k in ("gguf-f16", "gguf-q8_0", "gguf-q4_k_m")}
    assert sizes["gguf-q4_k_m"] < sizes["gguf-q8_0"] < sizes["gguf-f16"]


@pytest.mark.parametrize("name", ["merged", "bnb-int8", "bnb-nf4", "torch-int8"])
def test_transformers_variants_load_and_generate(variants, name):
    predictor = load_predictor(variants[name]["path"])
    answer = predictor.generate([CONV], max_new_tokens=4, batch_size=1)[0]
    assert answer.new_tokens >= 1
    if name == "torch-int8":
        import torch
        from torch.ao.nn.quantized.dynamic import Linear as DynamicInt8Linear

        layers = [m for n, m in predictor.model.named_modules() if ".layers." in n]
        assert any(isinstance(m, DynamicInt8Linear) for m in layers)
        assert not any(type(m) is torch.nn.Linear for m in layers)
    if name.startswith("bnb"):
        assert json.loads((Path(variants[name]["path"]) / "config.json").read_text())["quantization_config"]


def test_gguf_files_open_with_llama_cpp_carry_the_chat_template_and_generate(variants, tokenizer):
    """llama.cpp (through `ftlib generate`, its own process) loads each GGUF and answers; gguf-py sees the template."""
    from gguf import GGUFReader

    for kind in ("gguf-f16", "gguf-q8_0", "gguf-q4_k_m"):
        path = variants[kind]["path"]
        field = GGUFReader(path).fields["tokenizer.chat_template"]
        assert bytes(field.parts[field.data[0]]).decode() == tokenizer.chat_template
        r = subprocess.run([sys.executable, "-m", "ftlib", "generate", "--model", path, "Clasifica el sentimiento",
                            "--input", "me encanta", "--max-new-tokens", "4"], capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stderr[-2000:]


def test_gguf_greedy_matches_transformers_on_f16(variants):
    """Same prompt text, same argmax rule: llama.cpp f16 and transformers agree on the first tokens."""
    code = f"""
import json, torch
from ftlib.serving.generate import load_predictor, user_messages
conv = user_messages("Clasifica el sentimiento", "me encanta")
hf = load_predictor({variants['merged']['path']!r}, dtype="float32").generate([conv], max_new_tokens=3)[0].text
gg = load_predictor({variants['gguf-f16']['path']!r}).generate([conv], max_new_tokens=3)[0].text
print("RESULT " + json.dumps([hf, gg]))
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    line = [l for l in r.stdout.splitlines() if l.startswith("RESULT ")]
    assert line, r.stderr[-2000:]
    hf, gg = json.loads(line[0][7:])
    assert hf == gg


def test_modelfile_has_template_stops_and_parameters(tokenizer):
    text = modelfile("model-q4_k_m.gguf", tokenizer)
    assert "FROM ./model-q4_k_m.gguf" in text and "<|im_start|>assistant" in text
    assert 'PARAMETER stop "<|im_end|>"' in text and "PARAMETER temperature 0" in text


def test_unknown_variant_is_refused(tiny_adapter, tmp_path):
    with pytest.raises(QuantizeError, match="unknown variants"):
        quantize(tiny_adapter, tmp_path / "q", tmp_path / "m", ["q2_k"], progress=lambda m: None)
