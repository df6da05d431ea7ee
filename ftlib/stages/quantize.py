"""Stage `quantize`: every deployable variant of a fine-tuned model, each a path `--model` accepts.

    models/merged/                      adapter folded into the base, fp16 safetensors
    models/quantized/model-f16.gguf     llama.cpp / Ollama, full 16-bit
    models/quantized/model-q8_0.gguf    8-bit, near-lossless
    models/quantized/model-q4_k_m.gguf  4-bit k-quant, the usual laptop choice
    models/quantized/Modelfile          `ollama create NAME -f Modelfile`
    models/quantized/bnb-int8/          bitsandbytes LLM.int8 (transformers)
    models/quantized/bnb-nf4/           bitsandbytes NF4 (transformers)
    models/quantized/torch-int8/        PyTorch dynamic int8 of the merged weights (CPU serving)
    models/quantized/variants.json      what was written: name, kind, runtime, path

GGUF files come from llama.cpp's own converter (convert_hf_to_gguf.py, taken from the
llama-cpp-python sdist that `make install` builds, so converter and runtime always match)
and its quantizer (llama_model_quantize through llama-cpp-python). Each runs in its own
subprocess: llama.cpp and torch in one process have segfaulted here (DESIGN.md).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

from ftlib.core.atomic import replacing
from ftlib.core.log import get as get_logger

log = get_logger(__name__)

GGUF_TYPES = ("f16", "q8_0", "q4_k_m")
TRANSFORMERS_VARIANTS = ("bnb-int8", "bnb-nf4", "torch-int8")
ALL_VARIANTS = (*GGUF_TYPES, *TRANSFORMERS_VARIANTS)


class QuantizeError(RuntimeError):
    """A variant could not be produced; the message says which and why."""


def converter_dir() -> Path:
    """Where llama.cpp's converter lives: $FTLIB_LLAMA_CPP, else <venv>/share/llama.cpp (Makefile)."""
    return Path(os.environ.get("FTLIB_LLAMA_CPP") or Path(sys.prefix) / "share" / "llama.cpp")


def _run(cmd: list[str], what: str, env: dict[str, str] | None = None) -> None:
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **(env or {})}, check=False)
    if proc.returncode != 0:
        raise QuantizeError(f"{what} failed (exit {proc.returncode}):\n{(proc.stderr or proc.stdout)[-2000:]}")


def to_gguf(hf_dir: Path, out: Path, outtype: str) -> Path:
    """convert_hf_to_gguf.py: HF safetensors -> GGUF with tokenizer and chat template embedded."""
    tools = converter_dir()
    script = tools / "convert_hf_to_gguf.py"
    if not script.is_file():
        raise QuantizeError(f"{script} missing: run `make install` (it extracts llama.cpp's converter) "
                            "or point FTLIB_LLAMA_CPP at a llama.cpp checkout")
    with replacing(out, f"GGUF {outtype}") as tmp:
        _run([sys.executable, str(script), str(hf_dir), "--outfile", str(tmp), "--outtype", outtype],
             f"GGUF conversion ({outtype})", env={"PYTHONPATH": str(tools / "gguf-py"), "NO_LOCAL_GGUF": ""})
    return out


def gguf_quantize(src: Path, out: Path, kind: str = "q4_k_m") -> Path:
    """llama.cpp's quantizer (k-quants need it: they are not in the Python converter)."""
    ftype = {"q4_k_m": "LLAMA_FTYPE_MOSTLY_Q4_K_M", "q8_0": "LLAMA_FTYPE_MOSTLY_Q8_0"}[kind]
    code = ("import llama_cpp as l, sys; p = l.llama_model_quantize_default_params(); "
            f"p.ftype = l.{ftype}; p.nthread = 0; "
            "sys.exit(l.llama_model_quantize(sys.argv[1].encode(), sys.argv[2].encode(), p))")
    with replacing(out, f"GGUF {kind}") as tmp:
        _run([sys.executable, "-c", code, str(src), str(tmp)], f"llama.cpp quantize ({kind})")
    return out


def modelfile(gguf_name: str, tokenizer: Any, params: dict[str, Any] | None = None) -> str:
    """An Ollama Modelfile: the GGUF, the prompt template in Ollama's Go syntax, stop tokens, parameters.

    Ollama needs its own template language; ftlib writes the two families it trains
    (ChatML as in SmolLM2/Qwen, and Llama 3 headers) from the tokenizer's special tokens.
    """
    chat = tokenizer.chat_template or ""
    if "<|start_header_id|>" in chat:  # Llama 3
        template = ('{{ if .System }}<|start_header_id|>system<|end_header_id|>\n\n{{ .System }}<|eot_id|>{{ end }}'
                    '<|start_header_id|>user<|end_header_id|>\n\n{{ .Prompt }}<|eot_id|>'
                    '<|start_header_id|>assistant<|end_header_id|>\n\n{{ .Response }}<|eot_id|>')
        stops = ["<|eot_id|>", "<|end_of_text|>"]
    else:  # ChatML
        template = ('{{ if .System }}<|im_start|>system\n{{ .System }}<|im_end|>\n{{ end }}'
                    '<|im_start|>user\n{{ .Prompt }}<|im_end|>\n<|im_start|>assistant\n{{ .Response }}<|im_end|>')
        stops = ["<|im_end|>", "<|im_start|>"]
    lines = ["# ollama create my-model -f Modelfile && ollama run my-model", f"FROM ./{gguf_name}",
             f'TEMPLATE """{template}"""']
    lines += [f'PARAMETER stop "{s}"' for s in stops]
    for k, v in {"temperature": 0, "num_ctx": 2048, **(params or {})}.items():
        lines.append(f"PARAMETER {k} {v}")
    return "\n".join(lines) + "\n"


def bnb_variant(hf_dir: Path, out: Path, kind: str) -> Path:
    """Quantize on load with bitsandbytes and save the quantized weights (transformers reloads them as is)."""
    import torch
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    q = (BitsAndBytesConfig(load_in_8bit=True) if kind == "bnb-int8" else
         BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                            bnb_4bit_compute_dtype=torch.bfloat16))
    model = AutoModelForCausalLM.from_pretrained(hf_dir, quantization_config=q, dtype=torch.bfloat16, use_safetensors=True)
    with replacing(out, f"{kind} model") as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        _copy_tokenizer(hf_dir, tmp)
    return out


def torch_int8_variant(hf_dir: Path, out: Path) -> Path:
    """A recipe, not weights: dynamic int8 quantizes at load time and has no safetensors form."""
    out.mkdir(parents=True, exist_ok=True)
    _copy_tokenizer(hf_dir, out)
    (out / "ftlib_variant.json").write_text(json.dumps(
        {"kind": "torch-int8", "source": os.path.relpath(hf_dir.resolve(), out.resolve())}, indent=2) + "\n")
    return out


def _copy_tokenizer(src: Path, dst: Path) -> None:
    dst.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens", "chat_template")) or f.name in ("ftlib_train.json", "generation_config.json"):
            shutil.copy2(f, dst / f.name)


def quantize(model: str | Path = "models/adapter", out_dir: str | Path = "models/quantized",
             merged_dir: str | Path = "models/merged", variants: list[str] | tuple[str, ...] = ALL_VARIANTS,
             merged_dtype: str = "float16", progress: Any = None, allow_pickle_weights: bool = False) -> list[dict[str, Any]]:
    """Write every requested variant of `model`; returns (and writes) the variants.json manifest.

    allow_pickle_weights reaches the merge only: every variant is written from safetensors.
    """
    progress = progress or log.info
    from ftlib.stages.merge import merge_adapter
    from ftlib.core.models import load_tokenizer, resolve
    from ftlib.core.security import check_model_dir

    unknown = sorted(set(variants) - set(ALL_VARIANTS))
    if unknown:
        raise QuantizeError(f"unknown variants {unknown}; known: {', '.join(ALL_VARIANTS)}")
    model, out = str(model), Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if (Path(model) / "adapter_config.json").is_file():
        progress(f"merging {model} -> {merged_dir} ({merged_dtype})")
        hf_dir = merge_adapter(model, merged_dir, merged_dtype, allow_pickle_weights)
    else:
        hf_dir = Path(resolve(model))
        check_model_dir(hf_dir)
    # The chat template is embedded in every GGUF: load_tokenizer checks it (sandbox) before anything is written.
    tokenizer = load_tokenizer(str(hf_dir))
    manifest = [{"name": "merged", "kind": f"merged-{merged_dtype}" if hf_dir == Path(merged_dir) else "hf",
                 "runtime": "transformers", "path": str(hf_dir)}]
    _copy_tokenizer(hf_dir, out)  # GGUF files beside it render prompts with the training template

    ggufs = [v for v in GGUF_TYPES if v in variants]
    if ggufs:
        f16 = out / "model-f16.gguf"
        progress(f"GGUF f16 <- {hf_dir}")
        to_gguf(hf_dir, f16, "f16")
        for kind in ggufs:
            path = out / f"model-{kind}.gguf"
            if kind == "q8_0":
                progress("GGUF q8_0 (converter)")
                to_gguf(hf_dir, path, "q8_0")
            elif kind == "q4_k_m":
                progress("GGUF q4_k_m (llama.cpp quantizer)")
                gguf_quantize(f16, path, "q4_k_m")
            manifest.append({"name": f"gguf-{kind}", "kind": f"gguf-{kind}", "runtime": "llama.cpp", "path": str(path)})
        if "f16" not in ggufs:
            f16.unlink()
        ship = next(f"model-{k}.gguf" for k in ("q4_k_m", "q8_0", "f16") if k in ggufs)
        (out / "Modelfile").write_text(modelfile(ship, tokenizer))
    for kind in (v for v in TRANSFORMERS_VARIANTS if v in variants):
        progress(f"{kind} <- {hf_dir}")
        path = torch_int8_variant(hf_dir, out / kind) if kind == "torch-int8" else bnb_variant(hf_dir, out / kind, kind)
        manifest.append({"name": kind, "kind": kind, "runtime": "transformers", "path": str(path)})
    (out / "variants.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest
