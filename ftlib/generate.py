"""Inference: generate answers with any model form, and score classification accuracy.

Prompts are built by ftlib.formats (render_prompt + encode_prompt), the same code the
trainer uses, so a fine-tuned model sees at inference exactly the text it learned from.
"""

from __future__ import annotations

import unicodedata
from typing import Any, Iterable

from ftlib.formats import Example, encode_prompt, render_prompt


def user_messages(instruction: str, input_text: str = "", system: str | None = None) -> list[dict[str, str]]:
    """The messages of an alpaca-style request, normalized like ftlib.formats does."""
    msgs = [{"role": "system", "content": system}] if system else []
    msgs.append({"role": "user", "content": instruction if not input_text else f"{instruction}\n\n{input_text}"})
    return msgs


def generate(
    model: Any,
    tokenizer: Any,
    prompts: list[list[dict[str, str]]],
    template: str = "chat",
    max_new_tokens: int = 256,
    temperature: float = 0.0,
    top_p: float = 1.0,
    batch_size: int = 16,
    streamer: Any = None,
    progress: Any = None,
) -> list[str]:
    """Answers for a list of conversations (each ending with a user turn).

    Batched with left padding; greedy when temperature == 0; stops at EOS.
    """
    import torch

    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    answers: list[str] = []
    for start in range(0, len(prompts), batch_size):
        batch = [encode_prompt(render_prompt(m, tokenizer, template), tokenizer, template) for m in prompts[start:start + batch_size]]
        width = max(len(ids) for ids in batch)
        input_ids = torch.tensor([[pad] * (width - len(ids)) + ids for ids in batch])
        attention = torch.tensor([[0] * (width - len(ids)) + [1] * len(ids) for ids in batch])
        sampling = {"do_sample": True, "temperature": temperature, "top_p": top_p} if temperature > 0 else {"do_sample": False}
        with torch.no_grad():
            out = model.generate(input_ids=input_ids.to(model.device), attention_mask=attention.to(model.device),
                                 max_new_tokens=max_new_tokens, pad_token_id=pad, eos_token_id=tokenizer.eos_token_id,
                                 streamer=streamer, **sampling)
        answers += tokenizer.batch_decode(out[:, width:], skip_special_tokens=True)
        if progress is not None:
            progress(len(batch))
    return [a.strip() for a in answers]


def _fold(text: str) -> str:
    """Case- and accent-insensitive form: 'Positívo.' -> 'positivo.'"""
    return "".join(c for c in unicodedata.normalize("NFKD", text.casefold()) if not unicodedata.combining(c))


def extract_label(text: str, labels: Iterable[str]) -> str | None:
    """The declared label a generated answer names: the one that appears first as a word."""
    import re

    folded = _fold(text)
    hits = []
    for label in labels:
        m = re.search(rf"(?<!\w){re.escape(_fold(label))}(?!\w)", folded)
        if m:
            hits.append((m.start(), label))
    return min(hits)[1] if hits else None


def classification_accuracy(model: Any, tokenizer: Any, examples: list[Example], labels: list[str], template: str,
                            batch_size: int = 16, progress: Any = None) -> dict[str, Any]:
    """Greedy-generate each answer, read the label out of it, and compare."""
    max_new = max(len(tokenizer(l, add_special_tokens=False)["input_ids"]) for l in labels) + 4
    answers = generate(model, tokenizer, [e.prompt_messages for e in examples], template,
                       max_new_tokens=max_new, batch_size=batch_size, progress=progress)
    predictions = [extract_label(a, labels) for a in answers]
    gold = [e.output.strip() for e in examples]
    correct = sum(p == g for p, g in zip(predictions, gold))
    return {"accuracy": correct / len(gold) if gold else 0.0, "n": len(gold),
            "off_label": sum(p is None for p in predictions), "predictions": predictions, "answers": answers}
