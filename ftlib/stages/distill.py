"""Stage `distill` (course notes 5.3): train a student to imitate a teacher.

loss = alpha * T^2 * KL(softmax(teacher/T) || softmax(student/T)) + (1 - alpha) * CE(student, labels)

over the answer tokens only (the same completion mask as `ftlib train`). The loop is the
transformers Trainer; only compute_loss is ours, because that is where KD differs.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ftlib.core.atomic import replacing
from ftlib.core.config import Params


@dataclass
class DistillResult:
    out_dir: str
    student_params: int
    teacher_params: int
    global_step: int
    final_loss: float


def shrink(model: Any, layers: int) -> Any:
    """Keep the first `layers` decoder layers: a smaller student from the same family."""
    import torch

    if layers <= 0 or layers >= model.config.num_hidden_layers:
        return model
    model.model.layers = torch.nn.ModuleList(list(model.model.layers)[:layers])
    model.config.num_hidden_layers = layers
    if getattr(model.config, "layer_types", None):
        model.config.layer_types = model.config.layer_types[:layers]
    return model


def _collate(pad: int):
    import torch

    def collate(rows: list[dict[str, list[int]]]) -> dict[str, Any]:
        width = max(len(r["input_ids"]) for r in rows)
        ids = torch.tensor([r["input_ids"] + [pad] * (width - len(r["input_ids"])) for r in rows])
        attn = torch.tensor([[1] * len(r["input_ids"]) + [0] * (width - len(r["input_ids"])) for r in rows])
        mask = torch.tensor([r["completion_mask"] + [0] * (width - len(r["completion_mask"])) for r in rows])
        labels = ids.masked_fill(mask == 0, -100)
        return {"input_ids": ids, "attention_mask": attn, "labels": labels}

    return collate


def distill(params: Params, teacher: str, student: str, out_dir: str | Path = "models/distilled",
            data_dir: str | Path = "data/splits", temperature: float = 2.0, alpha: float = 0.5,
            student_layers: int = 0, max_steps: int = -1) -> DistillResult:
    import torch
    import torch.nn.functional as F
    from transformers import Trainer, TrainingArguments

    from ftlib.core.formats import encode_example, read_examples
    from ftlib.core.models import load_model
    from ftlib.stages.train import use_bf16

    teacher_model, tokenizer = load_model(teacher, allow_pickle_weights=params.allow_pickle_weights)
    teacher_model.eval()
    student_model, _ = load_model(student, allow_pickle_weights=params.allow_pickle_weights)
    if hasattr(student_model, "merge_and_unload"):
        student_model = student_model.merge_and_unload()
    student_model = shrink(student_model, student_layers)
    student_model.train()
    if teacher_model.config.vocab_size != student_model.config.vocab_size:
        raise ValueError("teacher and student must share a tokenizer/vocabulary for token-level distillation")

    from datasets import Dataset

    rows = [encode_example(e, tokenizer, params.template, params.max_seq_length) for e in read_examples(Path(data_dir) / "train.jsonl")]
    dataset = Dataset.from_list(rows)

    class KDTrainer(Trainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            labels = inputs.pop("labels")
            out = model(**inputs)
            with torch.no_grad():
                t_logits = teacher_model(**inputs).logits
            # position t predicts token t+1: align logits with the next-token labels
            s, t, y = out.logits[:, :-1], t_logits[:, :-1], labels[:, 1:]
            keep = y != -100
            s, t, y = s[keep].float(), t[keep].float(), y[keep]
            soft = F.kl_div(F.log_softmax(s / temperature, -1), F.softmax(t / temperature, -1), reduction="batchmean")
            loss = alpha * soft * temperature**2 + (1 - alpha) * F.cross_entropy(s, y)
            return (loss, out) if return_outputs else loss

    cfg = params.train
    out = Path(out_dir)
    args = TrainingArguments(
        output_dir=str(out.with_name(out.name + ".checkpoints")), per_device_train_batch_size=cfg.per_device_train_batch_size,
        gradient_accumulation_steps=cfg.gradient_accumulation_steps, learning_rate=cfg.learning_rate,
        lr_scheduler_type=cfg.lr_scheduler_type, warmup_steps=cfg.warmup_steps, weight_decay=cfg.weight_decay,
        max_grad_norm=cfg.max_grad_norm, seed=cfg.seed, num_train_epochs=cfg.num_train_epochs, max_steps=max_steps,
        logging_steps=cfg.logging_steps, save_strategy="no", bf16=use_bf16(cfg.bf16), use_cpu=not torch.cuda.is_available(),
        report_to=[], remove_unused_columns=False, dataloader_num_workers=0,
    )
    trainer = KDTrainer(model=student_model, args=args, train_dataset=dataset,
                        data_collator=_collate(tokenizer.pad_token_id or tokenizer.eos_token_id))
    state = trainer.train()

    with replacing(out) as tmp:
        student_model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        (tmp / "ftlib_train.json").write_text(json.dumps({
            "base_model": student, "method": "distilled", "teacher": teacher, "template": params.template,
            "temperature": temperature, "alpha": alpha, "student_layers": student_layers or student_model.config.num_hidden_layers,
            "global_step": trainer.state.global_step,
        }, indent=2) + "\n")
    return DistillResult(str(out), student_model.num_parameters(), teacher_model.num_parameters(),
                         trainer.state.global_step, float(state.training_loss))
