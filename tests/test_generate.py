"""Inference: label reading, EOS stopping, the CLI, prompts identical to training."""

import pytest
from typer.testing import CliRunner

from ftlib.cli import app
from ftlib.serving.generate import extract_label, generate, user_messages
from tests.conftest import alpaca, train_params, write_jsonl

LABELS = ["POSITIVO", "NEGATIVO", "NEUTRAL"]


@pytest.mark.parametrize("text, label", [
    ("POSITIVO", "POSITIVO"), ("positivo", "POSITIVO"), ("Negativo.", "NEGATIVO"), ("NEUTRAL - no opina", "NEUTRAL"),
    ("El sentimiento es negativo, claramente", "NEGATIVO"), ("positívo", "POSITIVO"),
    ("NEGATIVO, aunque empieza positivo", "NEGATIVO"), ("no sé", None), ("POSITIVOS", None), ("", None),
])
def test_extract_label(text, label):
    assert extract_label(text, LABELS) == label


@pytest.fixture(scope="module")
def parrot(tmp_path_factory, tiny_model):
    """The tiny model fully fine-tuned until it answers one prompt with one label and stops."""
    from ftlib.stages.train import train

    tmp = tmp_path_factory.mktemp("parrot")
    rows = [alpaca("una reseña cualquiera", "POSITIVO")] * 4
    write_jsonl(tmp / "s" / "train.jsonl", rows)
    write_jsonl(tmp / "s" / "validation.jsonl", rows[:1])
    p = train_params(tiny_model, tmp, "train.method=full", "train.learning_rate=3e-3", "train.max_steps=40",
                     "train.lr_scheduler_type=constant", "validate.duplicates=warning")
    train(p, tmp / "s", tmp / "reports")
    return p.train.output_dir


def test_generation_stops_at_eos(parrot):
    from ftlib.core.models import load_model

    model, tok = load_model(parrot)
    out = generate(model, tok, [user_messages("Clasifica el sentimiento", "una reseña cualquiera")], max_new_tokens=30)
    assert out == ["POSITIVO"]  # learned the answer AND the EOS after it: nothing follows


def test_batched_left_padded_generation_matches_one_by_one(parrot):
    from ftlib.core.models import load_model

    model, tok = load_model(parrot)
    prompts = [user_messages("Clasifica el sentimiento", t) for t in ("una reseña cualquiera", "otra mucho más larga " * 5, "x")]
    assert generate(model, tok, prompts, max_new_tokens=6, batch_size=3) == \
        [generate(model, tok, [p], max_new_tokens=6, batch_size=1)[0] for p in prompts]


def test_generate_cli(parrot):
    r = CliRunner().invoke(app, ["generate", "-m", parrot, "Clasifica el sentimiento", "--input", "una reseña cualquiera", "--no-stream"])
    assert r.exit_code == 0, r.output
    assert r.output.strip().endswith("POSITIVO")  # (transformers may print a loading bar first)
    r = CliRunner().invoke(app, ["generate", "-m", "./no/such/model", "hola"])
    assert r.exit_code == 2 and "no such directory" in r.output


def test_decode_rate_is_the_marginal_speed_and_none_when_unmeasurable():
    import time as _time

    from ftlib.serving.generate import decode_rate

    calls = []

    def run(n: int) -> None:  # 2 ms of "prompt", then 1 ms per new token
        calls.append(n)
        _time.sleep(0.002 + 0.001 * n)

    rate = decode_rate(run, 20)
    assert calls[0] == 1 and len(calls) == 7  # warm-up, then best of 3 for each length
    assert 500 < rate <= 1000  # sleep only overshoots, so never faster than 1000 tokens/s
    assert decode_rate(lambda n: _time.sleep(0.01 if n == 1 else 0.0), 20) is None
