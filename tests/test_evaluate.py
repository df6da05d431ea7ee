"""Evaluation: metrics against hand-computed values, label reading, log-likelihood scoring, the CLI."""

import csv
import json

import pytest
from typer.testing import CliRunner

from ftlib.cli import app
from ftlib.stages.evaluate import (
    classification_metrics,
    evaluate,
    generation_metrics,
    is_valid_python,
    lcs_length,
    rouge_l,
)
from ftlib.serving.generate import extract_label, user_messages
from tests.conftest import REPO, make_splits, write_jsonl

LABELS = ["POSITIVO", "NEGATIVO", "NEUTRAL"]
runner = CliRunner()


# ---------------------------------------------------------------------------
# Classification metrics, computed by hand

def test_classification_metrics_by_hand():
    gold = ["A", "A", "B", "B", "C"]
    pred = ["A", "B", "B", None, "A"]  # None: the answer named no label
    m = classification_metrics(gold, pred, ["A", "B", "C"])
    # A: TP 1 (row 0), FP 1 (row 4), FN 1 (row 1) -> P 1/2, R 1/2, F1 1/2
    # B: TP 1 (row 2), FP 1 (row 1), FN 1 (row 3, off-label) -> 1/2, 1/2, 1/2
    # C: TP 0, FN 1 -> 0, 0, 0
    assert m["accuracy"] == pytest.approx(2 / 5)
    assert m["precision"] == pytest.approx((2 * 0.5 + 2 * 0.5 + 1 * 0) / 5)
    assert m["recall"] == pytest.approx(2 / 5)
    assert m["f1"] == pytest.approx(0.4)
    assert m["f1_macro"] == pytest.approx((0.5 + 0.5 + 0) / 3)
    assert m["n"] == 5 and m["off_label"] == 1
    assert m["per_class"]["A"]["precision"] == pytest.approx(0.5) and m["per_class"]["C"]["support"] == 1
    assert m["confusion_labels"] == ["A", "B", "C"] and m["confusion_columns"] == ["A", "B", "C", "(none)"]
    assert m["confusion_matrix"] == [[1, 1, 0, 0],
                                     [0, 1, 0, 1],
                                     [1, 0, 0, 0]]
    json.dumps(m)  # plain Python numbers only


def test_classification_metrics_perfect_and_absent_labels():
    m = classification_metrics(["A", "B", "B"], ["A", "B", "B"], ["A", "B", "C"])
    assert (m["accuracy"], m["f1"], m["f1_macro"], m["off_label"]) == (1.0, 1.0, 1.0, 0)
    assert m["confusion_columns"] == ["A", "B", "C"]  # no off-label column when nothing is off-label
    assert m["confusion_matrix"] == [[1, 0, 0], [0, 2, 0], [0, 0, 0]]
    # C never occurs: it does not drag the macro average; A: P 1/2 R 1 F1 2/3, B: 0
    m = classification_metrics(["A", "B"], ["A", "A"], ["A", "B", "C"])
    assert m["f1_macro"] == pytest.approx((2 / 3 + 0) / 2)
    assert m["f1"] == pytest.approx((2 / 3 + 0) / 2)


@pytest.mark.parametrize("text, label", [
    ("Positivo.", "POSITIVO"), ("El sentimiento es **positivo**", "POSITIVO"), ("_Neutral_", "NEUTRAL"),
    ("Sentimiento: NEGATIVO\nExplicación: el cliente se queja", "NEGATIVO"), ("«NEUTRAL»", "NEUTRAL"),
    ("NEGATÍVO!!", "NEGATIVO"), ("neutralmente bueno", None), ("NEGATIVE", None),
])
def test_extract_label_robust(text, label):
    assert extract_label(text, LABELS) == label


def test_extract_label_multiword_labels():
    labels = ["positive", "very positive", "NOT_SURE"]
    assert extract_label("Very positive, I'd say", labels) == "very positive"  # same start: longer label wins
    assert extract_label("very-positive", labels) == "very positive"
    assert extract_label("I am not sure", labels) == "NOT_SURE"
    assert extract_label("anything", []) is None


# ---------------------------------------------------------------------------
# Generation metrics, computed by hand

def test_generation_metrics_by_hand():
    assert lcs_length(["a", "b", "c", "d"], ["a", "c", "d"]) == 3
    assert lcs_length([], ["a"]) == 0
    # LCS of 'the cat on the mat' in 'the cat sat on the mat' is 5: P = 5/5, R = 5/6
    assert rouge_l("the cat sat on the mat", "the cat on the mat") == pytest.approx(2 * 1 * (5 / 6) / (1 + 5 / 6))
    assert rouge_l("a b", "c d") == 0.0 and rouge_l("", "") == 1.0 and rouge_l("a", "") == 0.0

    m = generation_metrics(["hola mundo", "the cat sat on the mat"], [" hola mundo ", "the cat on the mat"])
    assert m["exact_match"] == 0.5 and m["n"] == 2 and "syntax_valid_rate" not in m
    assert m["rouge_l"] == pytest.approx((1 + 10 / 11) / 2)
    same = generation_metrics(["the cat sat on the mat"], ["the cat sat on the mat"])
    assert same["bleu"] == pytest.approx(100.0) and same["chrf"] == pytest.approx(100.0)
    assert 0 < m["chrf"] < 100 and 0 <= m["bleu"] < 100


def test_syntax_valid_rate():
    assert is_valid_python("```python\ndef f(x):\n    return x\n```")  # fences stripped
    assert is_valid_python("Aquí tienes:\n```\nx = [1, 2]\n```\nListo.")
    assert not is_valid_python("def f(:\n    pass")
    assert not is_valid_python("x = 1\x00")
    hyps = ["print('hi')", "def f(:", "```py\nimport os\n```", "usa corchetes"]
    m = generation_metrics(["print('hi')"] * 4, hyps, code=True)
    assert m["syntax_valid_rate"] == pytest.approx(2 / 4)


# ---------------------------------------------------------------------------
# The model: log-likelihood scoring and end-to-end evaluation on the tiny Llama

def test_label_logliks_match_a_direct_computation(tiny_model):
    import torch

    from ftlib.serving.generate import answer_ids, load_predictor

    predictor = load_predictor(tiny_model)
    conv = user_messages("Clasifica el sentimiento", "me encanta")
    scores = predictor.label_logliks([conv, user_messages("Clasifica", "otra reseña más larga que la primera")],
                                     LABELS, batch_size=4)
    prompt, answer = answer_ids("NEGATIVO", conv, predictor.tokenizer, "chat")
    assert answer[-1] == predictor.tokenizer.eos_token_id  # the label is scored with its EOS
    with torch.no_grad():
        logits = predictor.model(torch.tensor([prompt + answer])).logits[0].float()
    logp = torch.log_softmax(logits, dim=-1)
    direct = sum(float(logp[len(prompt) - 1 + i, tok]) for i, tok in enumerate(answer))
    assert scores[0][1] == pytest.approx(direct, abs=1e-3)
    # batching (right padding) does not change a score
    assert predictor.label_logliks([conv], LABELS, batch_size=1)[0] == pytest.approx(scores[0], abs=1e-3)


def test_greedy_labels_are_what_greedy_generation_answers(tiny_model, tmp_path):
    """Two batched passes (left padding) give, row by row, the label greedy generation writes: on a tiny model
    trained until it answers its training prompts with labels, and on prompts it answers with something else."""
    from ftlib.core.formats import read_examples
    from ftlib.serving.generate import label_budget, load_predictor
    from ftlib.stages.train import train
    from tests.conftest import train_params

    data = make_splits(tmp_path / "s", n_train=12, n_val=6)
    # 60 steps: some answers are exactly a label + EOS, others start like one and go astray ("POSUTRAL")
    p = train_params(tiny_model, tmp_path, "train.method=full", "train.learning_rate=1e-2", "train.max_steps=60",
                     "train.balanced_batches=false")
    train(p, data, None)
    predictor = load_predictor(p.train.output_dir)
    convs = [e.prompt_messages for f in ("train", "validation") for e in read_examples(data / f"{f}.jsonl")]
    convs.append(user_messages("Escribe un poema largo", "sobre el mar"))
    generated = [extract_label(a.text, LABELS) if a.text in LABELS and a.stopped else None
                 for a in predictor.generate(convs, max_new_tokens=label_budget(predictor.tokenizer, LABELS), batch_size=1)]
    assert sum(g is not None for g in generated) >= 6, generated
    assert predictor.greedy_labels(convs, LABELS, batch_size=5) == generated
    # two labels that start with the same token: the first token does not decide, so no answer
    assert predictor.greedy_labels(convs, ["NEUTRAL", "NEUTRALIDAD"], batch_size=4) is None


@pytest.fixture(scope="module")
def splits(tmp_path_factory):
    return make_splits(tmp_path_factory.mktemp("eval-splits"), n_test=6)


def test_evaluate_both_modes(tiny_model, splits, tmp_path):
    loglik = evaluate(tiny_model, splits / "test.jsonl", LABELS, mode="loglik", progress=False)
    assert loglik["n"] == 6 and loglik["off_label"] == 0
    assert all(p["predicted"] in LABELS for p in loglik["predictions"])  # never off-label
    assert all(set(p["logliks"]) == set(LABELS) for p in loglik["predictions"])

    seen = []
    gen = evaluate(tiny_model, splits / "test.jsonl", LABELS, mode="generate", max_new_tokens=4,
                   predictions_csv=tmp_path / "p.csv", progress=seen.append)
    assert sum(seen) == 6  # the progress callback saw every example
    assert sum(map(sum, gen["confusion_matrix"])) == 6
    assert gen["off_label"] == sum(p["predicted"] == "(none)" for p in gen["predictions"])
    with (tmp_path / "p.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["actual", "predicted", "answer", "line"] and len(rows) == 6
    assert {r["actual"] for r in rows} <= set(LABELS) and rows[0]["line"] == "1"


# ---------------------------------------------------------------------------
# The CLI, end to end on the tiny adapter

def test_evaluate_cli_writes_json_png_csv(tiny_adapter, splits, tmp_path):
    out = tmp_path / "reports"
    r = runner.invoke(app, ["evaluate", "--model", tiny_adapter, "--data", str(splits / "test.jsonl"),
                            "--json", str(out / "metrics.json"), "--plot", str(out / "plots" / "confusion.png"),
                            "--predictions", str(out / "predictions.csv"), "-p", str(REPO / "params.yaml")],
                      env={"COLUMNS": "200"})
    assert r.exit_code == 0, r.output
    m = json.loads((out / "metrics.json").read_text())
    for key in ("accuracy", "precision", "recall", "f1", "f1_macro", "n"):  # the DESIGN contract
        assert isinstance(m[key], (int, float)), key
    assert m["n"] == 6 and "predictions" not in m and m["mode"] == "generate"
    assert (out / "plots" / "confusion.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (out / "predictions.csv").read_text().startswith("actual,predicted,answer,line")
    assert "accuracy" in r.output and "confusion matrix" in r.output

    r = runner.invoke(app, ["evaluate", "-m", tiny_adapter, "-d", str(splits / "test.jsonl"), "--json", str(out / "ll.json"),
                            "--mode", "loglik", "-p", str(REPO / "params.yaml")])
    assert r.exit_code == 0, r.output
    assert json.loads((out / "ll.json").read_text())["off_label"] == 0


def test_evaluate_cli_code_task(tiny_model, tmp_path):
    data = write_jsonl(tmp_path / "code.jsonl", [
        {"instruction": "Genera código Python", "input": "suma", "output": "def suma(a, b):\n    return a + b"},
        {"instruction": "Genera código Python", "input": "lista", "output": "xs = [1, 2, 3]"},
    ])
    r = runner.invoke(app, ["evaluate", "-m", tiny_model, "-d", str(data), "--json", str(tmp_path / "m.json"),
                            "--max-new-tokens", "4", "-o", "data.task=code"])
    assert r.exit_code == 0, r.output
    m = json.loads((tmp_path / "m.json").read_text())
    assert {"exact_match", "chrf", "bleu", "rouge_l", "syntax_valid_rate"} <= set(m) and m["n"] == 2


def test_evaluate_cli_errors(tiny_model, tmp_path):
    bad = write_jsonl(tmp_path / "bad.jsonl", ['{"instruction": "x", "output": "POSITIVO"}', "[1, 2]"])
    r = runner.invoke(app, ["evaluate", "-m", tiny_model, "-d", str(bad), "--json", str(tmp_path / "m.json")])
    assert r.exit_code == 1 and f"{bad}:2: not-object:" in r.output and not (tmp_path / "m.json").exists()
    good = write_jsonl(tmp_path / "good.jsonl", [{"instruction": "x", "output": "POSITIVO"}])
    cases = [
        (["-d", str(tmp_path / "missing.jsonl")], "no such file"),
        (["-d", str(good), "-m", str(tmp_path / "no-model")], "no such directory"),
        (["-d", str(good), "--mode", "loglik", "-o", "data.task=generation"], "needs classification data"),
        (["-d", str(good), "--mode", "vote"], "--mode"),
        (["-d", str(good), "-o", "data.task=poetry"], "data.task"),
    ]
    for args, message in cases:
        r = runner.invoke(app, ["evaluate", "-m", tiny_model, "--json", str(tmp_path / "m.json"), *args])
        assert r.exit_code == 2 and message in r.output and "Traceback" not in r.output, (args, r.output)
