"""Training on a tiny random Llama: every method learns, masking, resume after SIGKILL, OOM back-off, tracking."""

import csv
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from ftlib.core.formats import encode_example, read_examples
from ftlib.core.models import load_tokenizer
from ftlib.stages.train import build_dataset, run_key, train
from tests.conftest import LABELS, REPO, alpaca, make_splits, train_params, write_jsonl


def losses(result_dir: Path) -> list[float]:
    rows = list(csv.DictReader((result_dir / "reports" / "train_loss.csv").open()))
    return [float(r["loss"]) for r in rows if r["loss"]]


# A soft prompt can only steer a random 2-layer model a little: its bar is lower.
@pytest.mark.parametrize("method, lr, drop", [("qlora", "5e-3", 0.25), ("lora", "5e-3", 0.25), ("full", "1e-3", 0.25),
                                              ("prompt_tuning", "0.3", 0.05)])
def test_each_method_learns_a_repeated_batch(tmp_path, tiny_model, method, lr, drop):
    data = tmp_path / "splits"
    rows = [alpaca("me encanta, funciona de maravilla", "POSITIVO"), alpaca("se rompió al segundo día", "NEGATIVO"),
            alpaca("llegó el martes en caja normal", "NEUTRAL"), alpaca("excelente servicio y rapidez", "POSITIVO")]
    write_jsonl(data / "train.jsonl", rows)
    write_jsonl(data / "validation.jsonl", rows[:2])
    p = train_params(tiny_model, tmp_path, f"train.method={method}", f"train.learning_rate={lr}", "train.max_steps=12",
                     "train.lr_scheduler_type=constant")
    result = train(p, data, tmp_path / "reports")
    loss = losses(tmp_path)
    assert result.global_step == 12 and len(loss) == 12
    assert loss[0] - sum(loss[-3:]) / 3 > drop, loss  # clearly learning, not noise
    out = Path(p.train.output_dir)
    info = json.loads((out / "ftlib_train.json").read_text())
    assert info["method"] == method and info["global_step"] == 12 and info["base_model"] == tiny_model
    if method == "full":
        assert (out / "model.safetensors").is_file()
    else:
        assert (out / "adapter_model.safetensors").is_file() and (out / "adapter_config.json").is_file()
    assert (out / "tokenizer.json").is_file()


def test_loss_is_on_the_answer_only_and_ends_with_eos(tmp_path, tokenizer, tiny_model):
    """The labels TRL's SFTTrainer actually trains on: only 'NEGATIVO<|im_end|>' is supervised."""
    from trl import SFTTrainer

    from ftlib.core.formats import render_prompt
    from ftlib.stages.train import load_for_training, sft_config

    src = REPO / "data" / "raw" / "sentiment.jsonl"
    ex = read_examples(src)[0]
    write_jsonl(tmp_path / "one.jsonl", [json.loads(src.read_text(encoding="utf-8").splitlines()[0])])
    p = train_params(tiny_model, tmp_path, "train.method=lora")
    model, tok = load_for_training(p, bf16=False)
    trainer = SFTTrainer(model=model, args=sft_config(p, tmp_path / "ckpt", 1, 1, False, False),
                         train_dataset=build_dataset(tmp_path / "one.jsonl", tok, p), processing_class=tok)
    row = trainer.train_dataset[0]
    labels = row["labels"]
    supervised = [t for t in labels if t != -100]
    assert tokenizer.decode(supervised) == ex.output + tokenizer.eos_token
    assert supervised[-1] == tokenizer.eos_token_id
    first = labels.index(supervised[0])
    assert all(t == -100 for t in labels[:first]) and len(supervised) == len(labels) - first
    # the unsupervised prefix is exactly the prompt inference renders
    assert tokenizer.decode(row["input_ids"][:first]) == render_prompt(ex.prompt_messages, tokenizer, "chat")

    alp = encode_example(ex, tokenizer, "alpaca", 512)
    sup = [t for t, m in zip(alp["input_ids"], alp["completion_mask"]) if m]
    assert tokenizer.decode(sup) == ex.output + tokenizer.eos_token


def test_run_key_tracks_data_and_learning_params(tmp_path, tiny_model):
    data = make_splits(tmp_path / "s")
    p = train_params(tiny_model, tmp_path)
    key = run_key(p, data)
    assert run_key(train_params(tiny_model, tmp_path, "train.logging_steps=5"), data) == key  # cosmetic
    assert run_key(train_params(tiny_model, tmp_path, "train.lora_r=8"), data) != key
    write_jsonl(data / "train.jsonl", [alpaca("otro texto distinto", "NEUTRAL")])
    assert run_key(p, data) != key


def test_oom_halves_batch_doubles_accumulation_and_finishes(tmp_path, tiny_model):
    import torch
    from transformers import TrainerCallback

    class OOMOnce(TrainerCallback):
        fired = False

        def on_step_begin(self, args, state, control, **kw):
            if state.global_step == 2 and args.per_device_train_batch_size == 4 and not OOMOnce.fired:
                OOMOnce.fired = True
                raise torch.OutOfMemoryError("simulated: CUDA out of memory")

    data = make_splits(tmp_path / "s", n_train=16)
    p = train_params(tiny_model, tmp_path, "train.method=lora", "train.max_steps=6", "train.save_steps=1")
    result = train(p, data, tmp_path / "reports", extra_callbacks=[OOMOnce()])
    assert OOMOnce.fired
    assert result.oom_backoffs == [{"from_batch": 4, "from_accum": 1, "to_batch": 2, "to_accum": 2}]
    assert result.global_step == 6
    info = json.loads((Path(p.train.output_dir) / "ftlib_train.json").read_text())
    assert info["oom_backoffs"] == result.oom_backoffs


def test_tracking_goes_to_mlflow_and_dvc_plots(tmp_path, tiny_model):
    import mlflow

    data = make_splits(tmp_path / "s")
    p = train_params(tiny_model, tmp_path, "train.method=lora", "train.max_steps=4", "train.eval_steps=2", "train.save_steps=2")
    result = train(p, data, tmp_path / "reports")
    run = mlflow.get_run(result.mlflow_run_id)
    for m in ("loss", "eval_loss", "learning_rate", "examples_per_s", "peak_rss_mb"):
        assert m in run.data.metrics, (m, sorted(run.data.metrics))
    assert run.data.params["ftlib.train.method"] == "lora" and run.data.params["ftlib.train.lora_r"] == "16"
    assert run.data.tags["ftlib.run_key"] == result.run_key
    history = mlflow.tracking.MlflowClient().get_metric_history(result.mlflow_run_id, "loss")
    assert [h.step for h in history] == [1, 2, 3, 4]
    rows = list(csv.DictReader((tmp_path / "reports" / "train_loss.csv").open()))
    assert [int(r["step"]) for r in rows] == [1, 2, 3, 4] and rows[1]["eval_loss"] and rows[3]["eval_loss"]


@pytest.mark.slow
def test_sigkill_midway_then_rerun_resumes_and_finishes(tmp_path, tiny_model):
    data = make_splits(tmp_path / "s", n_train=32)
    ckpt = tmp_path / "ckpt"
    cmd = [sys.executable, "-m", "ftlib", "train", "--no-compare", "--data-dir", str(data), "--reports-dir", str(tmp_path / "reports"),
           "-p", str(REPO / "params.yaml"), "-o", f"base_model={tiny_model}", "-o", f"train.output_dir={tmp_path / 'adapter'}",
           "-o", f"train.checkpoint_dir={ckpt}", "-o", "train.method=lora", "-o", "train.max_steps=40", "-o", "train.save_steps=2",
           "-o", "train.eval_steps=0", "-o", "train.save_total_limit=3", "-o", "train.per_device_train_batch_size=2"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=tmp_path)
    deadline = time.time() + 300
    while time.time() < deadline and not list(ckpt.glob("*/checkpoint-6/trainer_state.json")):
        assert proc.poll() is None, proc.stdout.read()[-3000:]
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not (tmp_path / "adapter").exists()
    # the kill may land in the middle of writing the next checkpoint: only complete ones count
    def complete(state: Path) -> bool:  # a state file cut off mid-write does not count
        try:
            return json.loads(state.read_text()).get("global_step") is not None
        except ValueError:
            return False

    steps_done = max(int(c.parent.name.split("-")[1]) for c in ckpt.glob("*/checkpoint-*/trainer_state.json") if complete(c))
    assert 6 <= steps_done < 40

    rerun = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=tmp_path, timeout=600)
    assert rerun.returncode == 0, rerun.stdout[-3000:] + rerun.stderr[-3000:]
    assert f"resuming from {ckpt}" in rerun.stderr
    resumed_at = int(rerun.stderr.split("resuming from ")[1].split("checkpoint-")[1].split()[0])
    assert resumed_at == steps_done
    info = json.loads((tmp_path / "adapter" / "ftlib_train.json").read_text())
    assert info["global_step"] == 40
    logged = [int(r["step"]) for r in csv.DictReader((tmp_path / "reports" / "train_loss.csv").open()) if r["loss"]]
    assert logged[-1] == 40 and min(logged) <= steps_done + 1


def test_build_dataset_masks_prompt_tokens(tmp_path, tokenizer):
    from ftlib.core.config import load_params

    f = write_jsonl(tmp_path / "t.jsonl", [alpaca("hola que tal", "POSITIVO")])
    ds = build_dataset(f, tokenizer, load_params(None))
    row = ds[0]
    answer = tokenizer("POSITIVO", add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    assert len(row["input_ids"]) == len(row["completion_mask"]) and sum(row["completion_mask"]) == len(answer)
    assert [t for t, m in zip(row["input_ids"], row["completion_mask"]) if m] == answer


@pytest.mark.slow
def test_method_auto_is_qlora_on_cuda_and_lora_on_a_cpu(tmp_path, tiny_model):
    """train.method: auto resolves once, and the adapter and the result record what was used."""
    from ftlib.stages.train import has_cuda

    data = make_splits(tmp_path / "s", n_train=8)
    p = train_params(tiny_model, tmp_path, "train.max_steps=1")
    assert p.train.method == "auto"
    result = train(p, data, None)
    assert result.method == ("qlora" if has_cuda() else "lora")
    assert json.loads((Path(p.train.output_dir) / "ftlib_train.json").read_text())["method"] == result.method


def test_embedded_model_trains_a_few_qlora_steps(tmp_path):
    from ftlib.serving.generate import generate, user_messages
    from ftlib.core.models import load_model

    data = make_splits(tmp_path / "s", n_train=8, n_val=2)
    p = train_params("embedded:smollm2-135m-instruct", tmp_path, "train.max_steps=2", "train.method=qlora")
    result = train(p, data, tmp_path / "reports")
    assert result.method == "qlora" and result.global_step == 2 and all(l == l for l in losses(tmp_path))  # finite
    model, tok = load_model(p.train.output_dir)
    answer = generate(model, tok, [user_messages("Clasifica el sentimiento", "me encanta")], max_new_tokens=8)[0]
    assert answer


def test_speed_settings_do_not_change_what_is_learned(tmp_path, tiny_model):
    """bf16 autocast, length grouping, gradient checkpointing and LM-head chunking are speed/memory levers only."""
    data = make_splits(tmp_path / "s", n_train=16, n_val=8)
    results = {}
    for name, flags in {"plain": ["train.bf16=false", "train.group_by_length=false", "train.gradient_checkpointing=false",
                                  "train.lm_head_chunk=32768"],
                        "fast": ["train.bf16=true", "train.group_by_length=true", "train.gradient_checkpointing=true",
                                 "train.gradient_checkpointing_fraction=0.5"]}.items():
        p = train_params(tiny_model, tmp_path / name, "train.method=lora", "train.max_steps=8", "train.learning_rate=5e-3",
                         "train.eval_steps=8", "train.save_steps=8", *flags)
        results[name] = train(p, data, tmp_path / name / "reports").metrics["eval_loss"]
    assert abs(results["plain"] - results["fast"]) < 0.02 * results["plain"], results


@pytest.mark.parametrize("method", ["qlora", "lora", "full"])
def test_gradient_checkpointing_covers_the_first_fraction_of_layers(tiny_model, tmp_path, method):
    from ftlib.stages.train import load_for_training

    def flags(fraction: float) -> list[bool]:
        p = train_params(tiny_model, tmp_path, f"train.method={method}", "train.gradient_checkpointing=true",
                         f"train.gradient_checkpointing_fraction={fraction}")
        model, _ = load_for_training(p, bf16=False)
        return [m.gradient_checkpointing for m in model.modules() if type(m).__name__ == "LlamaDecoderLayer"]

    assert flags(1.0) == [True, True] and flags(0.5) == [True, False] and flags(0.0) == [False, False]


def test_the_trainer_keeps_the_checkpointing_ftlib_set_up(tiny_model, tmp_path):
    """TRL turns checkpointing on for every layer by default; train.gradient_checkpointing (auto: off on a CPU)
    and the fraction must be what the layers have when training starts."""
    from transformers import TrainerCallback

    data = make_splits(tmp_path / "s", n_train=8, n_val=4)
    seen = {}

    class Layers(TrainerCallback):
        def on_train_begin(self, args, state, control, model=None, **kw):
            seen[name] = [m.gradient_checkpointing for m in model.modules() if type(m).__name__ == "LlamaDecoderLayer"]

    for name, flags in {"auto": [], "half": ["train.gradient_checkpointing=true", "train.gradient_checkpointing_fraction=0.5"]}.items():
        p = train_params(tiny_model, tmp_path / name, "train.method=lora", "train.max_steps=1", "train.eval_steps=0", *flags)
        train(p, data, None, extra_callbacks=[Layers()])
    assert seen == {"auto": [False, False], "half": [True, False]}


@pytest.mark.parametrize("method", ["qlora", "lora"])
def test_lora_layers_adapts_only_the_top_layers(tiny_model, tmp_path, method):
    import torch

    from ftlib.stages.train import load_for_training

    def adapted(top: int) -> tuple[set[int], Any]:
        p = train_params(tiny_model, tmp_path, f"train.method={method}", f"train.lora_layers={top}")
        model, _ = load_for_training(p, bf16=False)
        return {int(n.split("layers.")[1].split(".")[0]) for n, _ in model.named_parameters() if "lora_" in n}, model

    assert adapted(0)[0] == {0, 1} and adapted(5)[0] == {0, 1}  # 0 or more than the model has: every layer
    layers, model = adapted(1)
    assert layers == {1}
    ids = torch.randint(0, 100, (2, 8))
    model(input_ids=ids, labels=ids).loss.backward()
    grads = {n: p.grad is not None for n, p in model.named_parameters() if p.requires_grad}
    assert grads and all(grads.values()), grads  # every trainable (top-layer) LoRA weight got a gradient


def test_compact_lm_head_scores_only_answer_positions_with_the_same_loss(tiny_model, tokenizer):
    """On CPU the fused LM head projects only labelled positions: same loss and gradients as scoring every position."""
    import torch
    import trl.trainer.utils as trl_utils
    from transformers import AutoModelForCausalLM

    from ftlib.stages.train import _tune_lm_head

    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    trl_utils.add_fused_lm_head(model)
    ids = torch.randint(0, len(tokenizer), (2, 24), generator=torch.Generator().manual_seed(0))
    labels = torch.full_like(ids, -100)
    labels[:, -3:] = ids[:, -3:]  # an answer of 3 tokens
    original = trl_utils._use_triton

    def loss_and_grad():
        model.zero_grad()
        loss = model(input_ids=ids, labels=labels, fused_lm_head=True).loss
        loss.backward()
        return loss.item(), model.lm_head.weight.grad.clone()

    try:
        trl_utils._use_triton = lambda device: False  # TRL's CPU behaviour: every position
        full = loss_and_grad()
        _tune_lm_head(256)
        assert trl_utils._use_triton(ids.device)
        compact = loss_and_grad()
    finally:
        trl_utils._use_triton = original
    reference = torch.nn.functional.cross_entropy(
        model(input_ids=ids).logits[:, :-1].reshape(-1, len(tokenizer)), labels[:, 1:].reshape(-1), ignore_index=-100)
    assert abs(full[0] - compact[0]) < 1e-5 and abs(compact[0] - reference.item()) < 1e-4
    assert (full[1] - compact[1]).norm() < 1e-4 * full[1].norm()  # float summation order only


def test_partial_checkpoint_is_skipped_and_previous_good_one_used(tmp_path):
    import torch
    from safetensors.torch import save_file

    from ftlib.stages.train import last_good_checkpoint

    dirs = [tmp_path / f"checkpoint-{n}" for n in (2, 4, 10, 12, 14)]
    good, partial, corrupt, truncated, garbage = dirs
    for d in dirs:
        d.mkdir()
        save_file({"w": torch.ones(64, 64)}, str(d / "adapter_model.safetensors"))
        (d / "trainer_state.json").write_text('{"global_step": 2}')
    (partial / "trainer_state.json").unlink()  # killed before the Trainer wrote its state
    (corrupt / "trainer_state.json").write_text('{"global_st')  # truncated state
    w = truncated / "adapter_model.safetensors"
    w.write_bytes(w.read_bytes()[:-100])  # truncated weights
    (garbage / "adapter_model.safetensors").write_bytes(b"x")  # not safetensors at all
    assert last_good_checkpoint(tmp_path) == str(good)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-2"] + sorted(f"partial-{d.name}" for d in dirs[1:])
    assert last_good_checkpoint(tmp_path / "nothing-here") is None


@pytest.mark.slow
def test_rerun_after_success_mid_epoch_trains_no_extra_step(tmp_path, tiny_model):
    """A retry of a finished run (its last checkpoint sits mid-epoch at max_steps) loads it, same weights."""
    from safetensors.torch import load_file

    data = make_splits(tmp_path / "s", n_train=24)
    p = train_params(tiny_model, tmp_path, "train.method=lora", "train.max_steps=2", "train.save_steps=2")
    first = train(p, data, None)
    w1 = load_file(str(Path(p.train.output_dir) / "adapter_model.safetensors"))
    again = train(p, data, None)
    w2 = load_file(str(Path(p.train.output_dir) / "adapter_model.safetensors"))
    assert first.global_step == again.global_step == 2
    assert all((w1[k] - w2[k]).abs().max() == 0 for k in w1)
    assert first.mlflow_run_id and again.mlflow_run_id == first.mlflow_run_id  # lineage keeps the training run
    # the rerun trained nothing: it reports the figures of the run that did, never 0 examples/s
    assert first.examples_per_s and first.examples_per_s > 0
    assert (again.examples_per_s, again.train_seconds, again.seconds) == (first.examples_per_s, first.train_seconds, first.seconds)


def test_rerun_without_recorded_figures_reports_none(tmp_path, tiny_model):
    """A finished run from before train_stats.json existed: no throughput figure, rather than a false 0.0."""
    data = make_splits(tmp_path / "s", n_train=8)
    p = train_params(tiny_model, tmp_path, "train.method=lora", "train.max_steps=2", "train.save_steps=2")
    first = train(p, data, None)
    (tmp_path / "ckpt" / first.run_key / "train_stats.json").unlink()
    again = train(p, data, None)
    assert again.global_step == 2 and again.examples_per_s is None and again.seconds is None


def test_validation_label_metrics_pick_the_checkpoint_and_reach_mlflow(tmp_path, tiny_model):
    """Every evaluation scores the label the model generates on validation.jsonl (what the gate measures);
    the best checkpoint is the one with the highest validation accuracy, and the metrics are in MLflow and the CSV."""
    import mlflow

    from ftlib.stages.evaluate import evaluate

    data = make_splits(tmp_path / "s", n_train=12, n_val=6)
    p = train_params(tiny_model, tmp_path, "train.method=full", "train.learning_rate=3e-3", "train.max_steps=8",
                     "train.eval_steps=2", "train.save_steps=2", "train.save_total_limit=1", "train.early_stopping_patience=0")
    result = train(p, data, tmp_path / "reports")
    history = mlflow.tracking.MlflowClient().get_metric_history(result.mlflow_run_id, "eval_accuracy")
    per_step = {h.step: h.value for h in history}
    assert sorted(per_step)[:4] == [2, 4, 6, 8]
    for m in ("eval_f1_macro", "eval_min_recall"):
        assert m in mlflow.get_run(result.mlflow_run_id).data.metrics
    last = max((tmp_path / "ckpt" / result.run_key).glob("checkpoint-*"), key=lambda c: int(c.name.split("-")[1]))
    state = json.loads((last / "trainer_state.json").read_text())
    best_step = int(state["best_model_checkpoint"].rsplit("-", 1)[1])
    assert state["best_metric"] == pytest.approx(max(per_step[s] for s in (2, 4, 6, 8)))
    assert per_step[best_step] == max(per_step[s] for s in (2, 4, 6, 8)) and best_step == min(
        s for s in (2, 4, 6, 8) if per_step[s] == state["best_metric"])  # ties keep the earliest
    # the saved model is that checkpoint: scoring validation.jsonl as `ftlib evaluate` does gives the same accuracy
    m = evaluate(p.train.output_dir, data / "validation.jsonl", labels=LABELS, progress=False)
    assert m["accuracy"] == pytest.approx(state["best_metric"]) == pytest.approx(result.metrics["eval_accuracy"])
    rows = list(csv.DictReader((tmp_path / "reports" / "train_loss.csv").open()))
    assert [r["eval_accuracy"] != "" for r in rows if int(r["step"]) in (2, 4, 6, 8)].count(True) == 4


@pytest.mark.slow
def test_a_reset_mlflow_store_leaves_no_dangling_training_run_id(tmp_path, tiny_model, monkeypatch):
    """A finished checkpoint remembers its MLflow run; against a new store that id means nothing."""
    data = make_splits(tmp_path / "s", n_train=24)
    p = train_params(tiny_model, tmp_path, "train.method=lora", "train.max_steps=2", "train.save_steps=2")
    first = train(p, data, None)
    assert first.mlflow_run_id
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'fresh.db'}")
    again = train(p, data, None)
    assert again.global_step == 2 and again.mlflow_run_id is None


def test_padding_free_batches_are_exact_with_the_default_attention(tiny_model, tokenizer):
    """Rows laid end to end with restarting position_ids (TRL's padding-free collator) give each row the
    logits it gets alone: transformers' packed-sequence mask keeps rows apart, so train.packing is exact
    without FlashAttention (the GPU token budget relies on this; issue 14)."""
    import torch
    from transformers import AutoModelForCausalLM
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    model = AutoModelForCausalLM.from_pretrained(tiny_model).eval()
    model.config.use_cache = False  # as in training; with a cache transformers does not look for packed rows
    rows = [{"input_ids": tokenizer(t)["input_ids"]} for t in ("me encanta", "no me gustó nada el final", "normal")]
    flat = DataCollatorForLanguageModeling(pad_token_id=tokenizer.pad_token_id, padding_free=True)(rows)
    assert flat["input_ids"].shape[0] == 1 and int(flat["position_ids"][0, 0]) == 0
    with torch.no_grad():
        packed = model(input_ids=flat["input_ids"], position_ids=flat["position_ids"]).logits[0]
        offset = 0
        for r in rows:
            alone = model(input_ids=torch.tensor([r["input_ids"]])).logits[0]
            n = len(r["input_ids"])
            assert torch.allclose(alone, packed[offset:offset + n], atol=1e-5)
            offset += n


def test_token_budget_is_a_gpu_decision_and_keeps_the_optimization_comparable():
    from ftlib.core.config import TrainConfig
    from ftlib.stages.train import resolve_batch_tokens, token_budget_plan

    # auto: off on a CPU (no GPU memory) or without padding-free; by memory on a GPU; never below a row
    assert resolve_batch_tokens("auto", padding_free=False, gpu_gb=None, max_seq_length=512) == 0
    assert resolve_batch_tokens("auto", padding_free=True, gpu_gb=None, max_seq_length=512) == 0
    assert resolve_batch_tokens("auto", padding_free=True, gpu_gb=141, max_seq_length=512) == 16384
    assert resolve_batch_tokens("auto", padding_free=True, gpu_gb=24, max_seq_length=512) == 8192
    assert resolve_batch_tokens("auto", padding_free=True, gpu_gb=16, max_seq_length=8192) == 8192
    assert resolve_batch_tokens("0", padding_free=True, gpu_gb=141, max_seq_length=512) == 0
    with pytest.raises(ValueError, match="padding-free"):
        resolve_batch_tokens("4096", padding_free=False, gpu_gb=None, max_seq_length=512)

    cfg = TrainConfig(learning_rate=2e-4, warmup_steps=5, eval_steps=32, save_steps=64)
    plan = token_budget_plan([80] * 1000, 8000, batch=8, accum=1, cfg=cfg)  # 100 rows of 80 tokens per bin
    assert plan.rows_per_step == 100 and plan.scale == 12.5
    assert plan.learning_rate == pytest.approx(2e-4 * 12.5 ** 0.5)  # square-root rule
    assert (plan.warmup_steps, plan.eval_steps, plan.save_steps) == (0, 3, 5)  # same rows between them
    small = token_budget_plan([80] * 10, 8000, batch=8, accum=1, cfg=cfg)  # a bin holds the whole split
    assert small.rows_per_step == 10


def test_token_budget_packs_micro_batches_and_trains(tmp_path, tiny_model):
    """The GPU path (packed micro-batches up to train.batch_tokens), run on a CPU: it trains, evaluates
    row-batched, and the adapter records the plan it used."""
    data = make_splits(tmp_path / "s", n_train=24, n_val=4)
    p = train_params(tiny_model, tmp_path, "train.method=lora", "train.packing=true", "train.batch_tokens=512",
                     "train.num_train_epochs=2", "train.eval_steps=1", "train.save_steps=1", "train.learning_rate=5e-3",
                     "train.early_stopping_patience=0")
    result = train(p, data, tmp_path / "reports")
    plan = result.token_budget
    assert plan["budget"] == 512 and plan["rows_per_step"] > 4 and plan["scale"] > 1
    assert plan["learning_rate"] == pytest.approx(5e-3 * plan["scale"] ** 0.5, rel=1e-3)
    # 24 rows of ~57 tokens fill 3 bins of 512: 3 steps per epoch, where rows of 4 would take 6
    tokens = sum(len(ids) for ids in build_dataset(data / "train.jsonl", load_tokenizer(tiny_model), p)["input_ids"])
    assert result.global_step == 2 * math.ceil(tokens / 512) < 2 * 24 / 4 and "eval_loss" in result.metrics
    assert all(l == l for l in losses(tmp_path))
    info = json.loads((Path(p.train.output_dir) / "ftlib_train.json").read_text())
    assert info["token_budget"]["budget"] == 512
