import json
import math
from pathlib import Path

from ftlib.stages.distill import distill
from tests.conftest import make_splits, train_params


def test_distill_trains_a_smaller_student_from_a_teacher(tmp_path, tiny_adapter, tiny_model):
    data = make_splits(tmp_path / "s", n_train=8)
    p = train_params(tiny_model, tmp_path)
    r = distill(p, teacher=tiny_adapter, student=tiny_model, out_dir=tmp_path / "student", data_dir=data,
                temperature=2.0, alpha=0.5, student_layers=1, max_steps=3)
    assert r.global_step == 3 and math.isfinite(r.final_loss)
    assert r.student_params < r.teacher_params
    cfg = json.loads((Path(r.out_dir) / "config.json").read_text())
    assert cfg["num_hidden_layers"] == 1
    info = json.loads((Path(r.out_dir) / "ftlib_train.json").read_text())
    assert info["teacher"] == tiny_adapter and info["alpha"] == 0.5
