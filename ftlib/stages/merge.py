"""Stage `merge`: fold a LoRA adapter into its base model and save plain safetensors."""

from __future__ import annotations

import json
from pathlib import Path


def merge_adapter(adapter: str | Path = "models/adapter", out_dir: str | Path = "models/merged", dtype: str = "float16",
                  allow_pickle_weights: bool = False) -> Path:
    """Load base + adapter in full precision, merge_and_unload, save in `dtype` (safetensors).

    allow_pickle_weights (params.yaml) lets a pickle-only base or adapter load; the merged model is safetensors.
    """
    import torch

    from ftlib.core.atomic import replacing
    from ftlib.core.models import load_model, train_info

    info = train_info(str(adapter))
    if info is None or not (Path(adapter) / "adapter_config.json").is_file():
        raise ValueError(f"{adapter}: not an adapter directory written by `ftlib train` (no adapter_config.json/ftlib_train.json)")
    if info.get("method") == "prompt_tuning":
        raise ValueError(f"{adapter}: a prompt-tuning adapter has no weights to merge; serve it with the base model")
    model, tokenizer = load_model(str(adapter), "float32", allow_pickle_weights=allow_pickle_weights)
    merged = model.merge_and_unload().to(getattr(torch, dtype))
    out = Path(out_dir)
    with replacing(out, "merged model") as tmp:
        merged.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        (tmp / "ftlib_train.json").write_text(json.dumps({**info, "merged_from": str(adapter), "dtype": dtype}, indent=2) + "\n")
    return out
