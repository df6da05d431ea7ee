"""`ftlib serve` (issue 16): strict validation (400, never 500), the body cap (413), prompts longer than the
context, max_tokens clamped, the bounded queue (503), the bearer token. The app runs in process (FastAPI's
TestClient) on a real tiny model; benchmarks/serve_load.py drives the real uvicorn server with concurrent
clients and idle connections."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
from fastapi.testclient import TestClient

from ftlib.serving.serve import FtlibModel, Limits, build_app
from tests.conftest import LABELS


@pytest.fixture(scope="module")
def loaded(tiny_model):
    from ftlib.core.models import load_model
    from ftlib.serving.generate import HFPredictor

    m = FtlibModel()
    model, tok = load_model(tiny_model)
    m.predictor = HFPredictor(model, tok, "chat")
    m.config = {"labels": LABELS, "instruction": "Clasifica el sentimiento", "max_new_tokens": 16}
    return m


def client(model: FtlibModel, **limits) -> TestClient:
    return TestClient(build_app(model, SimpleNamespace(name="m", version=1), "models:/m/1", "transformers", Limits(**limits)))


def test_answers_chat_invocations_and_content_parts(loaded):
    c = client(loaded)
    r = c.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "great"}]})
    assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] in LABELS
    parts = [{"type": "text", "text": "great"}, {"type": "text", "text": "product"}]
    r = c.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": parts}]})
    assert r.status_code == 200 and r.json()["ftlib"]["label"] in LABELS
    r = c.post("/invocations", json={"inputs": ["great", {"instruction": "Clasifica el sentimiento", "input": "awful"}]})
    assert r.status_code == 200 and all(p in LABELS for p in r.json()["predictions"])
    assert c.get("/health").json()["queued"] == 0


@pytest.mark.parametrize("path, body", [
    ("/v1/chat/completions", {"messages": "zzz"}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": None}]}),
    ("/v1/chat/completions", {"messages": [{"role": "user"}]}),
    ("/v1/chat/completions", {"messages": [{"role": "robot", "content": "x"}]}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "max_tokens": 0}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "max_tokens": True}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "temperature": "hot"}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "mode": "guess"}),
    ("/invocations", {"inputs": "great"}),
    ("/invocations", {"inputs": []}),
    ("/invocations", {"inputs": [5]}),
    ("/invocations", {"inputs": [{"instruction": 1, "input": "x"}]}),
    ("/invocations", {"inputs": ["x"], "params": "zzz"}),
    ("/invocations", {"inputs": ["x"], "params": {"max_new_tokens": -1}}),
    ("/invocations", {"inputs": ["x"] * 65}),
])
def test_a_client_mistake_is_a_400_never_a_500(loaded, path, body):
    r = client(loaded).post(path, json=body)
    assert r.status_code == 400 and r.json()["error"]["message"], r.text


@pytest.mark.parametrize("raw", [b"not json", b"[1, 2]", b'{"messages": [{"role": "user", "content": "x"}], "temperature": NaN}'])
def test_bad_json_is_a_400(loaded, raw):
    r = client(loaded).post("/v1/chat/completions", content=raw, headers={"Content-Type": "application/json"})
    assert r.status_code == 400, r.text


def test_a_prompt_longer_than_the_context_is_a_400(loaded):
    context = loaded.context_tokens()
    r = client(loaded).post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "palabra " * context}]})
    assert r.status_code == 400 and f"the model's context is {context}" in r.json()["error"]["message"]


def test_max_tokens_is_clamped(loaded):
    r = client(loaded, max_new_tokens=3).post("/v1/chat/completions", json={
        "messages": [{"role": "user", "content": "x"}], "max_tokens": 100000, "mode": "generate"})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] <= 3


def test_a_body_over_the_cap_is_refused_unread(loaded):
    c = client(loaded, max_body_bytes=1000)
    r = c.post("/invocations", content=json.dumps({"inputs": ["x" * 2000]}).encode(), headers={"Content-Type": "application/json"})
    assert r.status_code == 413
    r = c.post("/invocations", content=b"{}", headers={"Content-Length": str(100 * 2**30), "Content-Type": "application/json"})
    assert r.status_code == 413


def test_a_full_queue_is_a_503_with_retry_after(loaded):
    r = client(loaded, max_queue=0).post("/invocations", json={"inputs": ["x"]})
    assert r.status_code == 503 and r.headers["retry-after"] and "waiting for the model" in r.json()["error"]["message"]


def test_the_bearer_token_guards_everything_but_health(loaded):
    app = build_app(loaded, SimpleNamespace(name="m", version=1), "models:/m/1", "transformers", Limits(), token="s3cret")
    c = TestClient(app)
    assert c.get("/health").status_code == 200
    assert c.get("/v1/models").status_code == 401
    assert c.post("/invocations", json={"inputs": ["x"]}).status_code == 401
    ok = c.post("/invocations", json={"inputs": ["x"]}, headers={"Authorization": "Bearer s3cret"})
    assert ok.status_code == 200


def test_the_port_is_checked_before_the_model_loads():
    import socket

    from ftlib.serving.serve import check_port

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        with pytest.raises(ValueError, match="pick another --port"):
            check_port("127.0.0.1", s.getsockname()[1])
