"""The gate, idempotent registration, the pyfunc, promotion/rollback and registry errors,
against a real local MLflow store (SQLite + local artifacts) and, for the unreachable
server case, a real `mlflow server` process."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path

import pytest
from typer.testing import CliRunner

from ftlib.cli import app
from ftlib.core.config import load_params
from tests.conftest import GATE_MECHANICS_ONLY, LABELS, REPO, make_splits

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def scored(tmp_path_factory, tiny_adapter):
    """Splits + the tiny adapter's real test-split metrics (reports/metrics.json), made once."""
    from ftlib.stages.evaluate import evaluate

    root = tmp_path_factory.mktemp("scored")
    data = make_splits(root / "data" / "splits")
    m = evaluate(tiny_adapter, data / "test.jsonl", labels=LABELS, progress=False)
    (root / "reports").mkdir()
    (root / "reports" / "metrics.json").write_text(json.dumps({k: v for k, v in m.items() if k != "predictions"}))
    return root


@pytest.fixture
def work(tmp_path, monkeypatch, scored):
    """A project directory to run in: data/splits and reports/ copied from `scored`."""
    shutil.copytree(scored, tmp_path / "proj")
    monkeypatch.chdir(tmp_path / "proj")
    return tmp_path / "proj"


def reg_params(tiny_model: str, name: str, *overrides: str):
    return load_params(REPO / "params.yaml", [f"base_model={tiny_model}", f"register.model_name={name}",
                                              "register.accuracy_threshold=0", "register.min_improvement=0",
                                              "register.log_merged=false", *GATE_MECHANICS_ONLY, *overrides])


def name() -> str:
    return f"test-{uuid.uuid4().hex[:8]}"


def versions_of(model_name: str) -> list:
    from mlflow import MlflowClient

    return MlflowClient().search_model_versions(f"name = '{model_name}'")


def runs_with_key(key: str) -> list:
    from mlflow import MlflowClient

    from ftlib.registry.register import KEY_TAG, _experiment_id

    c = MlflowClient()
    return c.search_runs([_experiment_id(c)], filter_string=f"tags.`{KEY_TAG}` = '{key}'")


def test_gate_refusal_is_logged_never_registered(work, tiny_model, tiny_adapter):
    from ftlib.registry.register import register

    n = name()
    r = register(reg_params(tiny_model, n, "register.accuracy_threshold=1.0"), Path(tiny_adapter))
    assert r.status == "refused" and r.version is None
    assert "accuracy_threshold 1.000" in r.messages[0]
    assert versions_of(n) == []
    run = runs_with_key(r.gate.key)
    assert len(run) == 1 and run[0].data.tags["ftlib.gate"] == "failed"
    assert "accuracy_threshold" in run[0].data.tags["ftlib.gate.reason"]
    gate = json.loads((work / "reports" / "gate.json").read_text())
    assert gate["passed"] is False and gate["key"] == r.gate.key


def test_register_once_pyfunc_answers_and_card(work, tiny_model, tiny_adapter):
    import mlflow

    from ftlib.registry.register import register

    n = name()
    p = reg_params(tiny_model, n)
    first = register(p, Path(tiny_adapter))
    assert first.status == "registered" and first.version == "1"
    again = register(p, Path(tiny_adapter))  # an Airflow retry / a rerun
    assert again.status == "exists" and again.version == "1"
    assert len(versions_of(n)) == 1 and len(runs_with_key(first.gate.key)) == 1

    mv = mlflow.MlflowClient().get_model_version_by_alias(n, "challenger")
    assert str(mv.version) == "1" and mv.tags["ftlib.registered"] == "true" and mv.tags["ftlib.gate"] == "passed"
    for tag in ("git.commit", "data.train.md5", "data.test.md5", "params.hash", "params", "base_model", "base_model.revision",
                "libraries", "hardware", "dvc.lock"):
        assert f"ftlib.lineage.{tag}" in mv.tags, tag
    assert json.loads(mv.tags["ftlib.lineage.params"])["register"]["model_name"] == n
    assert "## Intended use" in mv.description and "## Limitations" in mv.description

    model = mlflow.pyfunc.load_model(f"models:/{n}@challenger")
    answers = model.predict(["great product, works well", "broke after a day"])
    assert len(answers) == 2 and all(a in LABELS for a in answers)  # a classifier answers with a declared label
    artifacts = {a.path for a in mlflow.MlflowClient().list_artifacts(first.run_id)}
    assert {"model_card.md", "params.json", "reports"} <= artifacts


def test_interrupted_attempts_finish_on_rerun(work, tiny_model, tiny_adapter, monkeypatch):
    import mlflow

    import ftlib.registry.register as reg

    n = name()
    p = reg_params(tiny_model, n)

    def killed(*a, **k):
        raise KeyboardInterrupt("worker killed")

    # 1. dies after the run and the model were logged, before the version exists
    with monkeypatch.context() as m, pytest.raises(KeyboardInterrupt):
        m.setattr(mlflow, "register_model", killed)
        reg.register(p, Path(tiny_adapter))
    key = reg.register_key(p, Path("data/splits"), Path(tiny_adapter))
    assert versions_of(n) == [] and len(runs_with_key(key)) == 1

    # 2. the retry dies after creating the version, before the alias
    with monkeypatch.context() as m, pytest.raises(KeyboardInterrupt):
        m.setattr(reg, "_finish", killed)
        reg.register(p, Path(tiny_adapter))
    assert len(versions_of(n)) == 1 and "ftlib.registered" not in versions_of(n)[0].tags

    # 3. the next retry finishes the same version: one run, one version, alias set
    r = reg.register(p, Path(tiny_adapter))
    assert r.status == "exists" and r.version == "1"
    [mv] = versions_of(n)
    assert mv.tags["ftlib.registered"] == "true" and len(runs_with_key(key)) == 1
    assert str(mlflow.MlflowClient().get_model_version_by_alias(n, "challenger").version) == "1"


def test_champion_is_rescored_promotion_and_rollback(work, tiny_model, tiny_adapter):
    from mlflow import MlflowClient

    from ftlib.registry.promote import promote, rollback, versions
    from ftlib.registry.register import RegistryError, register

    c, n = MlflowClient(), name()
    v1 = register(reg_params(tiny_model, n), Path(tiny_adapter))
    promote(c, n, alias="challenger", reason="first model")
    c.set_model_version_tag(n, "1", "ftlib.accuracy", "0.9999")  # a stale claim the gate must not trust

    # same model again (different params -> different key): must beat the re-scored champion by 0.05
    refused = register(reg_params(tiny_model, n, "register.min_improvement=0.05"), Path(tiny_adapter))
    assert refused.status == "refused"
    champ = refused.gate.champion
    assert champ["version"] == "1" and champ["score"] == pytest.approx(v1.gate.candidate["score"])  # re-scored, not 0.9999
    assert "does not beat champion v1" in refused.gate.reasons[0]

    # a negative min_improvement loosens the gate: refused unless forced, and the forced version promotes only with --force
    loose = register(reg_params(tiny_model, n, "register.min_improvement=-1"), Path(tiny_adapter))
    assert loose.status == "refused" and "register.min_improvement=-1 accepts a candidate worse" in loose.gate.reasons[0]
    assert loose.gate.overrides["register.min_improvement"] == {"value": -1.0, "default": 0.01}
    v2 = register(reg_params(tiny_model, n, "register.min_improvement=-1"), Path(tiny_adapter), force=True,
                  reason="ties v1, newer data")
    assert v2.status == "registered" and v2.version == "2"
    assert str(c.get_model_version_by_alias(n, "challenger").version) == "2"
    assert json.loads(c.get_model_version(n, "2").tags["ftlib.gate.overrides"])["register.min_improvement"]["value"] == -1
    with pytest.raises(RegistryError, match="failed the gate"):
        promote(c, n, version="2", reason="ties v1, newer data")

    r = promote(c, n, version="2", reason="ties v1, newer data", force=True)
    assert r == {"version": "2", "previous": "1", "changed": True}
    assert str(c.get_model_version_by_alias(n, "champion").version) == "2"
    assert str(c.get_model_version_by_alias(n, "previous-champion").version) == "1"
    tags = c.get_model_version(n, "2").tags
    assert tags["ftlib.promotion_reason"] == "ties v1, newer data" and tags["ftlib.promoted_from"] == "1"
    assert tags["ftlib.promoted_by"] and tags["ftlib.promoted_at"]

    back = rollback(c, n, reason="complaints")
    assert back == {"version": "1", "previous": "2", "changed": True}
    assert str(c.get_model_version_by_alias(n, "champion").version) == "1"
    assert c.get_model_version(n, "2").tags["ftlib.rollback_reason"] == "complaints"
    with pytest.raises(RegistryError, match="no previous champion"):
        rollback(c, n)
    rows = versions(c, n)
    assert [r["version"] for r in rows] == ["2", "1"] and rows[1]["aliases"] == ["champion"]

    runner = CliRunner()
    listed = runner.invoke(app, ["models", "list", n], env={"COLUMNS": "250"})
    assert listed.exit_code == 0 and "champion" in listed.output and rows[0]["test_md5"] in listed.output


def test_forced_version_needs_force_to_promote(work, tiny_model, tiny_adapter):
    from mlflow import MlflowClient

    from ftlib.registry.promote import promote
    from ftlib.registry.register import RegistryError, register

    c, n = MlflowClient(), name()
    p = reg_params(tiny_model, n, "register.accuracy_threshold=1.0")
    with pytest.raises(RegistryError, match="--reason"):
        register(p, Path(tiny_adapter), force=True)
    r = register(p, Path(tiny_adapter), force=True, reason="needed for a demo")
    assert r.status == "registered"
    assert c.get_model_version(n, r.version).tags["ftlib.forced"] == "true"
    with pytest.raises(RegistryError, match="failed the gate"):
        promote(c, n, version=r.version)
    with pytest.raises(RegistryError, match="--reason"):
        promote(c, n, version=r.version, force=True)
    assert promote(c, n, version=r.version, force=True, reason="accepting the risk")["changed"]

    runner = CliRunner()
    res = runner.invoke(app, ["promote", n, "--alias", "challenger"])  # challenger alias moved away on promotion
    assert res.exit_code == 2 and "no alias 'challenger'" in res.output


def test_unknown_names_and_aliases_are_clear(work):
    runner = CliRunner()
    r = runner.invoke(app, ["lineage", "models:/no-such-model@champion"])
    assert r.exit_code == 2 and "no registered model named 'no-such-model'" in r.output
    r = runner.invoke(app, ["promote", "no-such-model", "--version", "1"])
    assert r.exit_code == 2 and "no registered model" in r.output
    r = runner.invoke(app, ["lineage", "models:/x/latest"])
    assert r.exit_code == 2 and "expected models:/NAME/VERSION" in r.output


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, proc: subprocess.Popen, seconds: float = 90) -> None:
    deadline = time.time() + seconds
    while time.time() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"server exited with {proc.returncode}: {proc.stdout.read() if proc.stdout else ''}")
        try:
            urllib.request.urlopen(url, timeout=2).read()
            return
        except OSError:
            time.sleep(0.5)
    raise AssertionError(f"{url} did not answer in {seconds}s")


def test_unreachable_server_then_real_server(work, tiny_model, tiny_adapter, tmp_path, monkeypatch):
    """Server down: a clear error at once and nothing written; the same command succeeds once it is up."""
    from ftlib.registry.register import RegistryError, register

    port = free_port()
    uri = f"http://127.0.0.1:{port}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    n = name()
    p = reg_params(tiny_model, n)
    t = time.perf_counter()
    with pytest.raises(RegistryError, match="unreachable"):
        register(p, Path(tiny_adapter))
    assert time.perf_counter() - t < 15
    assert not (work / "reports" / "gate.json").exists()

    store = tmp_path / "server"
    store.mkdir()
    server = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
         "--backend-store-uri", f"sqlite:///{store / 'mlflow.db'}", "--artifacts-destination", str(store / "artifacts")],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_http(uri + "/health", server)
        r = register(p, Path(tiny_adapter))
        assert r.status == "registered" and r.version == "1"
        assert register(p, Path(tiny_adapter)).status == "exists"
        assert len(versions_of(n)) == 1
        assert list((store / "artifacts").rglob("adapter_config.json"))  # artifacts went through the server
    finally:
        server.terminate()
        server.wait(timeout=30)


def test_serve_answers_with_a_label_and_follows_the_alias(work, tiny_model, tiny_adapter):
    from mlflow import MlflowClient

    from ftlib.registry.promote import promote, rollback
    from ftlib.registry.register import register

    c, n = MlflowClient(), name()
    register(reg_params(tiny_model, n), Path(tiny_adapter))
    register(reg_params(tiny_model, n, "register.min_improvement=-1"), Path(tiny_adapter), force=True, reason="a second version")
    promote(c, n, version="1")
    promote(c, n, version="2", force=True, reason="a second version")

    def start() -> tuple[subprocess.Popen, str]:
        port = free_port()
        proc = subprocess.Popen([sys.executable, "-m", "ftlib", "serve", "--model", f"models:/{n}@champion", "--port", str(port)],
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=dict(os.environ))
        wait_http(f"http://127.0.0.1:{port}/health", proc)
        return proc, f"http://127.0.0.1:{port}"

    def post(url: str, body: dict) -> dict:
        req = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
        return json.loads(urllib.request.urlopen(req, timeout=60).read())

    proc, base = start()
    try:
        assert json.loads(urllib.request.urlopen(base + "/health").read())["version"] == "2"
        chat = post(base + "/v1/chat/completions", {"messages": [{"role": "user", "content": "great product, works well"}]})
        assert chat["choices"][0]["message"]["content"] in LABELS and chat["ftlib"]["label"] in LABELS
        inv = post(base + "/invocations", {"inputs": ["great", {"instruction": "Clasifica el sentimiento", "input": "awful"}]})
        assert len(inv["predictions"]) == 2 and all(p in LABELS for p in inv["predictions"])
        with pytest.raises(urllib.error.HTTPError) as bad:
            post(base + "/v1/chat/completions", {"messages": "not a list"})
        assert bad.value.code == 400
    finally:
        proc.terminate()
        print(proc.returncode, proc.communicate(timeout=30)[0])  # the server's log, shown when the test fails

    rollback(c, n, reason="serve the old one")  # a restart picks up the rolled-back champion
    proc, base = start()
    try:
        assert json.loads(urllib.request.urlopen(base + "/health").read())["version"] == "1"
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_gguf_deploy_runtime_pull_and_llama_cpp_server(work, tiny_model, tiny_adapter, tmp_path):
    """The shipped GGUF: served by `ftlib serve --runtime llama.cpp`, pulled with its Modelfile,
    and answered by llama.cpp's own OpenAI-compatible server (llama-cpp-python[server])."""
    from ftlib.stages.quantize import quantize

    quantize(tiny_adapter, work / "models" / "quantized", work / "models" / "merged", ["q8_0"], "float16", progress=lambda m: None)
    n = name()
    r = CliRunner().invoke(app, ["register", "-o", f"base_model={tiny_model}", "-o", f"register.model_name={n}",
                                 "-o", "register.accuracy_threshold=0", *[a for o in GATE_MECHANICS_ONLY for a in ("-o", o)], "--adapter", tiny_adapter, "--json", "reports/reg.json"])
    assert r.exit_code == 0, r.output
    assert json.loads((work / "reports" / "reg.json").read_text())["uri"] == f"models:/{n}/1"

    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "ftlib", "serve", "-m", f"models:/{n}/1", "--runtime", "llama.cpp",
                             "--port", str(port)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_http(f"http://127.0.0.1:{port}/health", proc)
        req = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", json.dumps({"inputs": ["great", "awful"]}).encode())
        preds = json.loads(urllib.request.urlopen(req, timeout=60).read())["predictions"]
        assert len(preds) == 2 and all(p in LABELS for p in preds)
    finally:
        proc.terminate()
        proc.wait(timeout=30)

    deploy = tmp_path / "deploy"
    pulled = CliRunner().invoke(app, ["models", "pull", f"models:/{n}/1", "--out", str(deploy)])
    assert pulled.exit_code == 0, pulled.output
    assert (deploy / "model-q8_0.gguf").is_file()
    assert "FROM ./model-q8_0.gguf" in (deploy / "Modelfile").read_text()

    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "llama_cpp.server", "--model", str(deploy / "model-q8_0.gguf"),
                               "--host", "127.0.0.1", "--port", str(port), "--n_ctx", "512"],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_http(f"http://127.0.0.1:{port}/v1/models", server)
        body = {"messages": [{"role": "user", "content": "Clasifica el sentimiento\n\ngreat"}], "max_tokens": 4, "temperature": 0}
        req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/chat/completions", json.dumps(body).encode(),
                                     {"Content-Type": "application/json"})
        answer = json.loads(urllib.request.urlopen(req, timeout=60).read())
        assert isinstance(answer["choices"][0]["message"]["content"], str) and answer["usage"]["completion_tokens"] >= 1
    finally:
        server.terminate()
        server.wait(timeout=30)


# ---------------------------------------------------------------------------
# The gate's quality criteria (defaults of params.yaml, no thresholds switched off)

@pytest.fixture(scope="module")
def demo_splits(tmp_path_factory, tokenizer):
    """The shipped demo data (data/raw), split exactly as the pipeline splits it."""
    from ftlib.stages.split import split_paths

    out = tmp_path_factory.mktemp("demo") / "splits"
    split_paths([REPO / "data" / "raw"], load_params(REPO / "params.yaml", ["validate.data_docs=false"]), out, tokenizer)
    return out


def test_default_gate_refuses_a_model_that_only_matches_tfidf(demo_splits, monkeypatch, tmp_path):
    """The candidate here *is* TF-IDF + logistic regression: its real predictions on the demo test split,
    scored like `ftlib evaluate` scores a model. The default gate must refuse it."""
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline

    from ftlib.stages.evaluate import classification_metrics
    from ftlib.core.formats import read_examples
    from ftlib.registry.register import decide

    monkeypatch.chdir(tmp_path)
    params = load_params(REPO / "params.yaml", [f"register.model_name={name()}", "register.check_base_model=false"])

    def xy(f):
        ex = read_examples(demo_splits / f)
        return [" ".join(m["content"] for m in e.prompt_messages) for e in ex], [e.output for e in ex]

    (xtr, ytr), (xte, yte) = xy("train.jsonl"), xy("test.jsonl")
    clf = make_pipeline(TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True), LogisticRegression(max_iter=2000, C=10.0)).fit(xtr, ytr)
    metrics = classification_metrics(yte, list(clf.predict(xte)), LABELS)
    g = decide(params, metrics, demo_splits / "test.jsonl", "k")
    assert not g.passed
    baseline = next(c for c in g.criteria if c["name"].startswith("beats TF-IDF"))
    assert baseline["reference"] == pytest.approx(metrics["accuracy"], abs=1e-4) and not baseline["passed"]
    assert any("does not beat the TF-IDF + logistic regression baseline" in r for r in g.reasons)
    # the same figures half a margin better still fail that criterion; a full margin better passes it
    for extra, ok in ((params.register.baseline_margin / 2, False), (params.register.baseline_margin + 0.01, True)):
        better = {**metrics, "accuracy": metrics["accuracy"] + extra}
        crit = next(c for c in decide(params, better, demo_splits / "test.jsonl", "k").criteria if c["name"].startswith("beats TF-IDF"))
        assert crit["passed"] is ok


def test_gate_json_and_table_show_every_criterion(work, tiny_model, tiny_adapter):
    """Default bars on the tiny model: refused, and gate.json + the CLI table name each criterion with both scores."""
    n = name()
    params = ["-o", f"base_model={tiny_model}", "-o", f"register.model_name={n}"]
    r = CliRunner().invoke(app, ["gate", *params, "--adapter", tiny_adapter])
    assert r.exit_code == 3, r.output
    g = json.loads(Path("reports/gate.json").read_text())
    names = [c["name"] for c in g["criteria"]]
    assert names[:2] == ["accuracy >= accuracy_threshold", "f1_macro >= f1_threshold"]
    assert any(x.startswith("beats TF-IDF baseline") for x in names) and any(x.startswith("beats base model") for x in names)
    assert g["baseline"]["score"] == pytest.approx(next(c for c in g["criteria"] if c["name"].startswith("beats TF-IDF"))["reference"], abs=1e-4)
    for row in ("accuracy >= accuracy_threshold", "beats TF-IDF baseline", "beats base model"):
        assert row in r.output


def test_concurrent_registers_of_one_candidate_make_one_version(work, tiny_model, tiny_adapter):
    """Issue 16: two `ftlib register` of the same candidate at once used to make versions 2 and 3 with one run key."""
    n = name()
    args = [sys.executable, "-m", "ftlib", "register", "-o", f"base_model={tiny_model}", "-o", f"register.model_name={n}",
            "-o", "register.accuracy_threshold=0", *[a for o in GATE_MECHANICS_ONLY for a in ("-o", o)],
            "-o", "register.log_merged=false", "--adapter", tiny_adapter]
    procs = [subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for _ in range(3)]
    outs = [p.communicate(timeout=600)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], outs
    assert len(versions_of(n)) == 1, outs
    assert sum("already registered" in o for o in outs) == 2, outs


def test_concurrent_promotions_never_lose_a_history_event(work, tiny_model, tiny_adapter):
    """Issue 16: 9 concurrent `ftlib promote` all exited 0 and 2 events were missing from the champion history."""
    from mlflow import MlflowClient

    from ftlib.registry.promote import HISTORY_TAG
    from ftlib.registry.register import register

    n = name()
    register(reg_params(tiny_model, n), Path(tiny_adapter))
    register(reg_params(tiny_model, n, "benchmark.decode_tokens=5"), Path(tiny_adapter))  # other params: another run key
    vs = sorted(int(v.version) for v in versions_of(n))
    assert vs == [1, 2]
    cmds = [[sys.executable, "-m", "ftlib", "promote", n, "--version", str(vs[i % 2]), "--reason", f"round {i}"]
            for i in range(9)]
    procs = [subprocess.Popen(c, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for c in cmds]
    outs = [p.communicate(timeout=600)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    history = json.loads(MlflowClient().get_registered_model(n).tags[HISTORY_TAG])
    # every promotion that moved the alias is an event (one that found its version already champion changed nothing)
    changed = sorted(f"round {i}" for i, o in enumerate(outs) if "promoted:" in o)
    assert changed and sorted(e["reason"] for e in history) == changed, (history, outs)
    stack = json.loads(MlflowClient().get_registered_model(n).tags["ftlib.champion_stack"])
    assert stack[-1] == history[-1]["version"] == str(MlflowClient().get_model_version_by_alias(n, "champion").version)


def test_the_champion_rerun_is_not_rescored_and_its_run_never_rewritten(work, tiny_model, tiny_adapter):
    """Issue 17: after `ftlib promote`, a rerun on unchanged data re-scored the champion against itself, refused it,
    and wrote ftlib.gate=failed onto the champion's run. The same candidate now keeps its recorded decision."""
    from mlflow import MlflowClient

    from ftlib.registry.promote import promote
    from ftlib.registry.register import gate, register

    c, n = MlflowClient(), name()
    p = reg_params(tiny_model, n)
    v1 = register(p, Path(tiny_adapter))
    promote(c, n, version="1", reason="first")
    before = c.get_run(v1.run_id).data.tags

    def never(model: str) -> dict:
        raise AssertionError(f"re-scored {model}")

    g = gate(p, Path("reports/metrics.json"), Path("data/splits"), Path(tiny_adapter), Path("reports/gate.json"), rescore=never)
    assert g.passed and g.already == "v1 (@champion)" and g.run_id == v1.run_id
    assert c.get_run(v1.run_id).data.tags == before  # nothing rewritten
    assert json.loads(Path("reports/gate.json").read_text())["already"] == "v1 (@champion)"
    again = CliRunner().invoke(app, ["gate", "-o", f"base_model={tiny_model}", "-o", f"register.model_name={n}",
                                     "-o", "register.accuracy_threshold=0", "-o", "register.min_improvement=0",
                                     "-o", "register.log_merged=false", *[a for o in GATE_MECHANICS_ONLY for a in ("-o", o)],
                                     "--adapter", tiny_adapter])
    assert again.exit_code == 0 and "already registered as v1 (@champion)" in again.output, again.output
