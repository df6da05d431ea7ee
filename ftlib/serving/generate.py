"""Inference: generate answers with any model form, and score classification accuracy.

Prompts are built by ftlib.core.formats (render_prompt + encode_prompt), the same code the
trainer uses, so a fine-tuned model sees at inference exactly the text it learned from.

`load_predictor(model)` gives one interface over both runtimes ftlib serves with:
transformers (base, adapter, merged, bitsandbytes and torch-int8 variants) and
llama.cpp (GGUF files). Evaluation and benchmarks only talk to that interface.
"""

from __future__ import annotations

import math
import time
import unicodedata
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from ftlib.core.formats import Example, encode_example, encode_prompt, render_prompt


def user_messages(instruction: str, input_text: str = "", system: str | None = None) -> list[dict[str, str]]:
    """The messages of an alpaca-style request, normalized like ftlib.core.formats does."""
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


def _label_pattern(label: str) -> str:
    """A folded label as a whole-word regex; '_', '-' and spaces inside it match each other."""
    import re

    parts = [re.escape(p) for p in re.split(r"[\s_\-]+", _fold(label).strip()) if p]
    # Whole word: no letter or digit on either side ('_' is a boundary, for markdown _italics_).
    return r"(?<![^\W_])" + r"[\s_\-]+".join(parts) + r"(?![^\W_])" if parts else r"(?!)"


def extract_label(text: str, labels: Iterable[str]) -> str | None:
    """The declared label a generated answer names, or None.

    Case and accents are ignored ('Positívo.' -> POSITIVO), markdown and punctuation
    around the label too ('El sentimiento es **positivo**'), and so is what follows it
    ('NEUTRAL - no opina'). The label must be a whole word ('POSITIVOS' is not POSITIVO).
    When several labels appear, the first one wins ('NEGATIVO, aunque empieza positivo');
    at the same position the longer label wins ('muy positivo' over 'positivo').
    """
    import re

    folded = _fold(text)
    hits = []
    for label in labels:
        m = re.search(_label_pattern(label), folded)
        if m:
            hits.append((m.start(), -len(m.group()), label))
    return min(hits)[2] if hits else None


def label_budget(tokenizer: Any, labels: list[str]) -> int:
    """New tokens a classification answer gets, everywhere ftlib scores one (evaluate, the gate, the
    validation metrics during training, the train-time test comparison): the longest label + 8, room
    for "El sentimiento es POSITIVO" and EOS."""
    return max(len(tokenizer(label, add_special_tokens=False)["input_ids"]) for label in labels) + 8


def classification_accuracy(model: Any, tokenizer: Any, examples: list[Example], labels: list[str], template: str,
                            batch_size: int = 16, progress: Any = None) -> dict[str, Any]:
    """Greedy-generate each answer, read the label out of it, and compare."""
    max_new = label_budget(tokenizer, labels)
    answers = generate(model, tokenizer, [e.prompt_messages for e in examples], template,
                       max_new_tokens=max_new, batch_size=batch_size, progress=progress)
    predictions = [extract_label(a, labels) for a in answers]
    gold = [e.output.strip() for e in examples]
    correct = sum(p == g for p, g in zip(predictions, gold))
    return {"accuracy": correct / len(gold) if gold else 0.0, "n": len(gold),
            "off_label": sum(p is None for p in predictions), "predictions": predictions, "answers": answers}


# ---------------------------------------------------------------------------
# One interface over transformers and llama.cpp

@dataclass
class Answer:
    text: str
    stopped: bool  # ended with EOS within the token budget
    new_tokens: int
    seconds: float  # wall time of the batch this answer was generated in, shared evenly


def answer_ids(label: str, messages: list[dict[str, str]], tokenizer: Any, template: str) -> tuple[list[int], list[int]]:
    """(prompt ids, answer ids incl. EOS) exactly as training tokenizes an answer `label`."""
    enc = encode_example(Example(messages=[*messages, {"role": "assistant", "content": label}], format="chat"),
                         tokenizer, template, max_length=1 << 30)
    n = enc["completion_mask"].index(1)
    return enc["input_ids"][:n], enc["input_ids"][n:]


def decode_rate(run: Any, tokens: int, repeats: int = 3) -> float | None:
    """Pure decode speed: tokens / (time(1 + tokens new tokens) - time(1 new token)), EOS suppressed.

    `run(n)` generates n tokens for one fixed prompt. A warm-up call first (weights paged
    in, llama.cpp's prompt cache filled, so neither timing pays for it), then the best of
    `repeats` for each length: a busy machine only ever makes a run slower. A difference
    that is not positive (a stall during the short runs) is measured again, up to 3 rounds;
    None when it never is (the machine was too noisy to measure).
    """
    run(1)
    best = {1: float("inf"), tokens + 1: float("inf")}
    for _ in range(3):
        for n in best:
            for _ in range(repeats):
                t = time.perf_counter()
                run(n)
                best[n] = min(best[n], time.perf_counter() - t)
        gap = best[tokens + 1] - best[1]
        if gap > 0:
            return tokens / gap
    return None


class HFPredictor:
    """A transformers model (any torch weights: fp32, merged bf16, bitsandbytes, torch int8)."""

    runtime = "transformers"

    def __init__(self, model: Any, tokenizer: Any, template: str):
        self.model, self.tokenizer, self.template = model, tokenizer, template

    def generate(self, conversations: list[list[dict[str, str]]], max_new_tokens: int = 256, batch_size: int = 16,
                 temperature: float = 0.0, min_new_tokens: int = 0, progress: Any = None) -> list[Answer]:
        import torch

        tok, eos = self.tokenizer, self.tokenizer.eos_token_id
        pad = tok.pad_token_id if tok.pad_token_id is not None else eos
        answers: list[Answer] = []
        for start in range(0, len(conversations), batch_size):
            batch = [encode_prompt(render_prompt(m, tok, self.template), tok, self.template)
                     for m in conversations[start:start + batch_size]]
            width = max(len(ids) for ids in batch)
            input_ids = torch.tensor([[pad] * (width - len(ids)) + ids for ids in batch])
            attention = torch.tensor([[0] * (width - len(ids)) + [1] * len(ids) for ids in batch])
            sampling = {"do_sample": True, "temperature": temperature} if temperature > 0 else {"do_sample": False}
            t = time.perf_counter()
            with torch.no_grad():
                out = self.model.generate(input_ids=input_ids.to(self.model.device), attention_mask=attention.to(self.model.device),
                                          max_new_tokens=max_new_tokens, min_new_tokens=min_new_tokens, pad_token_id=pad,
                                          eos_token_id=eos, **sampling)
            seconds = (time.perf_counter() - t) / len(batch)
            for row in out[:, width:].tolist():
                n = row.index(eos) + 1 if eos in row else len(row)
                answers.append(Answer(tok.decode(row[:n], skip_special_tokens=True).strip(), eos in row, n, seconds))
            if progress is not None:
                progress(len(batch))
        return answers

    def _left_padded(self, prompts: list[list[int]], pad: int) -> tuple[Any, Any, Any]:
        """(input_ids, attention_mask, position_ids) of token lists padded on the left, on the model's device."""
        import torch

        width = max(len(p) for p in prompts)
        ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts], device=self.model.device)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=self.model.device)
        return ids, mask, (mask.cumsum(-1) - 1).clamp(min=0)

    def label_logliks(self, conversations: list[list[dict[str, str]]], labels: list[str], batch_size: int = 16,
                      progress: Any = None) -> list[list[float]]:
        """log p(label + EOS | prompt) for every conversation x label: never off-label.

        The prompt batch runs once; each label continues from a copy of its KV cache, so
        L labels cost one prompt pass plus L passes over a few answer tokens.
        """
        import copy

        import torch

        pad = self.tokenizer.pad_token_id or 0
        out: list[list[float]] = []
        for start in range(0, len(conversations), batch_size):
            convs = conversations[start:start + batch_size]
            prompts = [answer_ids(labels[0], m, self.tokenizer, self.template)[0] for m in convs]
            answers = [answer_ids(label, convs[0], self.tokenizer, self.template)[1] for label in labels]
            ids, mask, pos = self._left_padded(prompts, pad)
            with torch.no_grad():
                first = self.model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True)
                last = torch.log_softmax(first.logits[:, -1].float(), dim=-1)
                rows = []
                for answer in answers:
                    score = last[:, answer[0]].clone()
                    if len(answer) > 1:
                        cont = torch.tensor([answer[:-1]] * len(convs), device=ids.device)
                        cmask = torch.cat([mask, torch.ones_like(cont)], dim=1)
                        cpos = pos[:, -1:] + 1 + torch.arange(cont.shape[1], device=ids.device)
                        logits = self.model(input_ids=cont, attention_mask=cmask, position_ids=cpos,
                                            past_key_values=copy.deepcopy(first.past_key_values), use_cache=True).logits
                        logp = torch.log_softmax(logits.float(), dim=-1)
                        score += logp.gather(-1, torch.tensor(answer[1:], device=ids.device).expand(len(convs), -1)[..., None])[..., 0].sum(-1)
                    rows.append(score)
            out += torch.stack(rows, dim=1).tolist()
            if progress is not None:
                progress(len(convs))
        return out

    def greedy_labels(self, conversations: list[list[dict[str, str]]], labels: list[str],
                      batch_size: int = 16) -> list[str | None] | None:
        """The label each greedy answer is, in two forward passes instead of label + 8 decode steps.

        When every label starts with its own token (SmolLM2: POS|IT|IV|O, N|EG|AT|IV|O, NE|UT|R|AL),
        the first greedy token names the only label the answer can be; a second pass over that label's
        tokens, from the prompt's KV cache, checks that greedy decoding writes exactly them and then EOS.
        An answer that is not exactly one label then EOS is None (off-label): that is what a fine-tuned
        model is trained to write, so for it this equals generating and reading the label. Returns None when two labels share their first token: then only generation can tell.
        """
        import torch

        tok, template = self.tokenizer, self.template
        starts: dict[int, str] = {}
        for label in labels:
            first = answer_ids(label, conversations[0], tok, template)[1][0]
            if first in starts:
                return None
            starts[first] = label
        pad = tok.pad_token_id or 0
        out: list[str | None] = []
        for start in range(0, len(conversations), batch_size):
            convs = conversations[start:start + batch_size]
            prompts = [answer_ids(labels[0], m, tok, template)[0] for m in convs]
            ids, mask, pos = self._left_padded(prompts, pad)
            with torch.no_grad():
                first = self.model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True, logits_to_keep=1)
                firsts = first.logits[:, -1].argmax(-1).tolist()
                guess = [starts.get(t) for t in firsts]
                if any(guess):
                    # the second pass continues from the prompts' KV cache over each guessed answer (minus its EOS):
                    # the argmax after every answer token must be the next one, EOS last
                    answers = [answer_ids(g or labels[0], m, tok, template)[1] for g, m in zip(guess, convs)]
                    steps = max(len(a) for a in answers) - 1
                    nexts = [[] for _ in convs]
                    if steps > 0:
                        cont = torch.tensor([a[:-1] + [pad] * (steps + 1 - len(a)) for a in answers], device=ids.device)
                        logits = self.model(input_ids=cont, attention_mask=torch.cat([mask, torch.ones_like(cont)], dim=1),
                                            position_ids=pos[:, -1:] + 1 + torch.arange(steps, device=ids.device),
                                            past_key_values=first.past_key_values, use_cache=True).logits
                        nexts = logits.argmax(-1).tolist()
                    for i, answer in enumerate(answers):
                        if guess[i] is not None and [firsts[i], *nexts[i][:len(answer) - 1]] != answer:
                            guess[i] = None
            out += guess
        return out

    def decode_tokens_per_s(self, conversation: list[dict[str, str]], tokens: int = 64) -> float | None:
        return decode_rate(lambda n: self.generate([conversation], max_new_tokens=n, min_new_tokens=n, batch_size=1), tokens)


class GGUFPredictor:
    """A GGUF file served by llama.cpp (llama-cpp-python), prompts rendered by ftlib's own code."""

    runtime = "llama.cpp"

    def __init__(self, path: str, tokenizer: Any, template: str, n_ctx: int = 2048, threads: int | None = None):
        import os

        from llama_cpp import Llama

        self.tokenizer, self.template = tokenizer, template
        self.llm = Llama(model_path=path, n_ctx=n_ctx, n_threads=threads or os.cpu_count(), logits_all=False, verbose=False)
        self.eos = self.llm.token_eos()

    def _ids(self, conversation: list[dict[str, str]]) -> list[int]:
        return encode_prompt(render_prompt(conversation, self.tokenizer, self.template), self.tokenizer, self.template)

    def _logits(self) -> Any:
        """Next-token logits after the last eval (llama.cpp keeps only the last row unless logits_all)."""
        import numpy as np

        return np.ctypeslib.as_array(self.llm._ctx.get_logits(), shape=(self.llm.n_vocab(),)).astype(np.float64)

    def _decode(self, prompt: list[int], max_new_tokens: int, suppress_eos: bool) -> tuple[list[int], bool]:
        """Greedy decoding, token by token (the same argmax rule as transformers' greedy search)."""
        self.llm.reset()
        self.llm.eval(prompt)
        out: list[int] = []
        for _ in range(max_new_tokens):
            logits = self._logits()
            if suppress_eos:
                logits[self.eos] = -math.inf
            token = int(logits.argmax())
            out.append(token)
            if token == self.eos:
                return out, True
            self.llm.eval([token])
        return out, False

    def generate(self, conversations: list[list[dict[str, str]]], max_new_tokens: int = 256, batch_size: int = 1,
                 temperature: float = 0.0, min_new_tokens: int = 0, progress: Any = None) -> list[Answer]:
        if temperature > 0:
            raise ValueError("GGUF evaluation is greedy; use temperature 0")
        answers = []
        for conv in conversations:
            t = time.perf_counter()
            ids, stopped = self._decode(self._ids(conv), max_new_tokens, suppress_eos=min_new_tokens > 0)
            text = self.tokenizer.decode([i for i in ids if i != self.eos], skip_special_tokens=True).strip()
            answers.append(Answer(text, stopped, len(ids), time.perf_counter() - t))
            if progress is not None:
                progress(1)
        return answers

    def label_logliks(self, conversations: list[list[dict[str, str]]], labels: list[str], batch_size: int = 1,
                      progress: Any = None) -> list[list[float]]:
        import numpy as np

        out = []
        for conv in conversations:
            row = []
            for label in labels:
                prompt, answer = answer_ids(label, conv, self.tokenizer, self.template)
                self.llm.reset()
                self.llm.eval(prompt)
                total = 0.0
                for tok in answer:
                    logits = self._logits()
                    top = logits.max()
                    total += float(logits[tok] - top - np.log(np.exp(logits - top).sum()))
                    self.llm.eval([tok])
                row.append(total)
            out.append(row)
            if progress is not None:
                progress(1)
        return out

    def decode_tokens_per_s(self, conversation: list[dict[str, str]], tokens: int = 64) -> float | None:
        prompt = self._ids(conversation)
        return decode_rate(lambda n: self._decode(prompt, n, suppress_eos=True), tokens)


def load_predictor(model: str, template: str = "chat", dtype: str = "float32") -> HFPredictor | GGUFPredictor:
    """A predictor for any --model form, GGUF files included."""
    from ftlib.core.models import gguf_tokenizer, load_model, template_of

    if str(model).endswith(".gguf"):
        tokenizer, template = gguf_tokenizer(model, template)
        return GGUFPredictor(model, tokenizer, template)
    m, tok = load_model(model, dtype)
    return HFPredictor(m, tok, template_of(model, template))
