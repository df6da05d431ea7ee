import json

import pytest
import torch

from ftlib.stages.merge import merge_adapter
from ftlib.core.models import load_model


def test_merged_model_computes_what_base_plus_adapter_computes(tmp_path, tiny_adapter):
    out = merge_adapter(tiny_adapter, tmp_path / "merged", dtype="float32")
    assert (out / "model.safetensors").is_file() and not (out / "adapter_config.json").exists()
    info = json.loads((out / "ftlib_train.json").read_text())
    assert info["merged_from"] == tiny_adapter and info["dtype"] == "float32"
    adapter, tok = load_model(tiny_adapter)
    merged, _ = load_model(str(out))
    ids = tok("Clasifica el sentimiento: genial", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        assert torch.allclose(adapter(input_ids=ids).logits, merged(input_ids=ids).logits, atol=1e-4)
        base, _ = load_model(info["base_model"])
        assert not torch.allclose(base(input_ids=ids).logits, merged(input_ids=ids).logits, atol=1e-4)


def test_merge_refuses_non_adapters(tmp_path, tiny_model):
    with pytest.raises(ValueError, match="not an adapter"):
        merge_adapter(tiny_model, tmp_path / "m")
