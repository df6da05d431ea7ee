"""Stage `prune` (course notes 5.2): L1 unstructured magnitude pruning of the linear layers."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from ftlib.core.atomic import replacing


@dataclass
class PruneResult:
    out_dir: str
    amount: float
    layers: int
    sparsity: float  # zeros / weights over the pruned layers
    total_sparsity: float  # zeros / all parameters


def prune_model(model_spec: str, amount: float = 0.3, out_dir: str | Path = "models/pruned") -> PruneResult:
    """Zero the `amount` smallest-magnitude weights of every decoder nn.Linear; save safetensors.

    lm_head is left alone: in Llama-style models it is often tied to the input embeddings,
    and pruning it would prune the vocabulary too.
    """
    if not 0.0 <= amount < 1.0:
        raise ValueError(f"--amount must be in [0, 1), got {amount}")
    import torch
    import torch.nn.utils.prune as prune

    from ftlib.core.models import load_model, train_info

    model, tokenizer = load_model(model_spec)
    if hasattr(model, "merge_and_unload"):  # an adapter: prune the merged weights
        model = model.merge_and_unload()
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and not n.endswith("lm_head")]
    for _, module in layers:
        prune.l1_unstructured(module, name="weight", amount=amount)
        prune.remove(module, "weight")  # make it permanent: plain tensors with zeros
    zeros = sum(int((m.weight == 0).sum()) for _, m in layers)
    weights = sum(m.weight.numel() for _, m in layers)
    total_zeros = sum(int((p == 0).sum()) for p in model.parameters())
    total = sum(p.numel() for p in model.parameters())

    out = Path(out_dir)
    info = dict(train_info(model_spec) or {"template": "chat"})
    info.update({"method": "pruned", "pruned_from": model_spec, "prune_amount": amount,
                 "sparsity": zeros / weights})
    with replacing(out) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        (tmp / "ftlib_train.json").write_text(json.dumps(info, indent=2) + "\n")
    return PruneResult(str(out), amount, len(layers), zeros / weights, total_zeros / total)
