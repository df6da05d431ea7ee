import pytest
import torch

from ftlib.core.models import load_model
from ftlib.stages.prune import prune_model


def test_prune_zeroes_the_requested_share_and_saves_a_loadable_model(tmp_path, tiny_adapter):
    r = prune_model(tiny_adapter, 0.3, tmp_path / "pruned")
    assert r.layers == 2 * 7  # q k v o gate up down in each of 2 layers; lm_head untouched
    assert abs(r.sparsity - 0.3) < 0.01 and 0 < r.total_sparsity < r.sparsity
    model, tok = load_model(r.out_dir)
    w = model.model.layers[0].self_attn.q_proj.weight
    assert abs((w == 0).float().mean().item() - 0.3) < 0.01
    with torch.no_grad():
        assert torch.isfinite(model(**tok("hola", return_tensors="pt")).logits).all()


def test_prune_rejects_bad_amounts(tmp_path, tiny_model):
    with pytest.raises(ValueError, match="amount"):
        prune_model(tiny_model, 1.5, tmp_path / "p")
