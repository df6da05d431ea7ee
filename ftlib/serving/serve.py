"""Deploy: the registered model as an MLflow pyfunc, and an OpenAI-compatible HTTP server (FastAPI on uvicorn).

`FtlibModel` is the pyfunc every registered version carries (ftlib/serving/pyfunc_model.py
logs it as code). `predict(["text", ...])` returns one answer per text: for a
classification model the declared label it finds most likely (log-likelihood of each
label, never off-label; params={"mode": "generate"} reads it out of a greedy answer
instead, as `ftlib evaluate` does), for a generation model the generated text. A text is sent with the instruction (and system prompt) the training data
shared, so callers send only the input; a dict {"instruction", "input"} or
{"messages": [...]} is sent as is.

`serve()` resolves models:/NAME@ALIAS to a version when it starts (so restarting it
after `ftlib promote` or a rollback serves the new champion, no code change), loads
that version's pyfunc and answers on localhost:

    GET  /health                 {"status": "ok", "model": ..., "version": ..., "runtime": ..., "queued": N}
    GET  /v1/models              OpenAI model list
    POST /v1/chat/completions    OpenAI chat completions (messages in, one choice out; text content parts accepted)
    POST /invocations            MLflow scoring protocol: {"inputs": [...]} -> {"predictions": [...]}

uvicorn's event loop takes every connection; the model answers one request at a time in a worker
thread (one model on the CPU), so /health stays quick under load and with idle connections open.
`Limits` bounds everything a client controls: the body (413), the number of inputs, the prompt (400
when longer than the model's context), max_tokens (clamped), the queue (503 with Retry-After when
full) and the time a request waits for the model (503). A client's mistake is a 400, never a 500.
FTLIB_SERVE_TOKEN, when set, is the bearer token every route but /health requires.
The same pyfunc also runs under `mlflow models serve -m models:/NAME@champion --env-manager local`.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import math
import os
import time
from dataclasses import dataclass
from typing import Any

import mlflow
from starlette.requests import Request  # module level: FastAPI resolves the handlers' (string) annotations here

RUNTIMES = ("transformers", "llama.cpp")


def conversation(item: Any, config: dict[str, Any]) -> list[dict[str, str]]:
    """One request item -> the messages the model was trained on (ending with the user turn)."""
    from ftlib.serving.generate import user_messages

    if isinstance(item, dict) and isinstance(item.get("messages"), list):
        msgs = [{"role": m["role"], "content": m["content"]} for m in item["messages"]]
        return msgs[:-1] if msgs and msgs[-1]["role"] == "assistant" else msgs
    if isinstance(item, dict):
        return user_messages(str(item.get("instruction", config.get("instruction", ""))), str(item.get("input", "")),
                             config.get("system"))
    text = str(item)
    if config.get("instruction"):
        return user_messages(config["instruction"], text, config.get("system"))
    return ([{"role": "system", "content": config["system"]}] if config.get("system") else []) + [{"role": "user", "content": text}]


class FtlibModel(mlflow.pyfunc.PythonModel):
    """Base model + LoRA adapter (transformers), or the shipped GGUF (llama.cpp, model_config runtime)."""

    def load_context(self, context: Any) -> None:
        from ftlib.serving.generate import GGUFPredictor, HFPredictor
        from ftlib.core.models import load_model, load_tokenizer

        self.config = dict(context.model_config or {})
        runtime = self.config.get("runtime", "transformers")
        if runtime not in RUNTIMES:
            raise ValueError(f"model_config runtime: one of {RUNTIMES}, got {runtime!r}")
        adapter, template = context.artifacts["adapter"], self.config.get("template", "chat")
        if runtime == "llama.cpp":
            if "gguf" not in context.artifacts:
                raise ValueError("this version carries no GGUF file (none passed the benchmark's parity rule)")
            import torch  # noqa: F401  (llama_cpp must load after torch's OpenMP runtime)

            self.predictor = GGUFPredictor(context.artifacts["gguf"], load_tokenizer(adapter), template)
        else:
            model, tok = load_model(adapter)
            self.predictor = HFPredictor(model, tok, template)

    def answer(self, conversations: list[list[dict[str, str]]], max_new_tokens: int | None = None,
               mode: str | None = None) -> list[dict[str, Any]]:
        """One {"text", "label", "tokens"} per conversation.

        A classifier answers in `loglik` mode by default: the declared label the model finds
        most likely (log p(label + EOS | prompt)), so a request never gets an off-label
        answer; `generate` reads the label out of a greedy answer as `ftlib evaluate` does.
        """
        from ftlib.serving.generate import extract_label

        labels = self.config.get("labels") or []
        mode = mode or ("loglik" if labels else "generate")
        if labels and mode == "loglik":
            scores = self.predictor.label_logliks(conversations, labels, batch_size=8)
            best = [labels[max(range(len(row)), key=row.__getitem__)] for row in scores]
            return [{"text": b, "label": b, "tokens": 0, "logliks": dict(zip(labels, row))} for b, row in zip(best, scores)]
        out = self.predictor.generate(conversations, max_new_tokens=max_new_tokens or self.config.get("max_new_tokens", 256),
                                      batch_size=8)
        return [{"text": a.text, "label": extract_label(a.text, labels) if labels else None, "tokens": a.new_tokens} for a in out]

    def prompt_tokens(self, conversation: list[dict[str, str]]) -> int:
        """Tokens of a conversation's prompt, rendered exactly as for answering it."""
        from ftlib.core.formats import encode_prompt, render_prompt

        tok = self.predictor.tokenizer
        return len(encode_prompt(render_prompt(conversation, tok, self.predictor.template), tok, self.predictor.template))

    def context_tokens(self) -> int:
        """The longest prompt + answer the loaded model takes (llama.cpp: its n_ctx)."""
        if hasattr(self.predictor, "llm"):
            return int(self.predictor.llm.n_ctx())
        return int(getattr(self.predictor.model.config, "max_position_embeddings", 2048))

    def predict(self, model_input: list[str], params: dict[str, Any] | None = None) -> list[str]:
        return self.predict_items(model_input, params)

    def predict_items(self, items: list[Any], params: dict[str, Any] | None = None) -> list[str]:
        """predict() for texts, {"instruction", "input"} or {"messages"} items (MLflow validates predict's input as texts)."""
        params = params or {}
        rows = self.answer([conversation(x, self.config) for x in items], params.get("max_new_tokens"), params.get("mode"))
        return [r["label"] if r["label"] is not None else r["text"] for r in rows]


@dataclass
class Limits:
    """What one client may ask of the server (`ftlib serve` options)."""

    max_body_bytes: int = 1 << 20
    """Largest request body; a bigger one (or a Content-Length announcing one) is refused with 413 unread."""
    max_inputs: int = 64
    """Most items in one /invocations request."""
    max_new_tokens: int = 512
    """max_tokens is clamped to this, and to what the model's context leaves after the prompt."""
    max_queue: int = 32
    """Requests waiting for the model (besides the one it is answering); one more gets 503 + Retry-After."""
    deadline_s: float = 120.0
    """A request still waiting for the model after this many seconds gets 503."""
    keepalive_s: int = 5
    """An idle connection (no request, or none after the last answer) is closed after this many seconds."""
    max_connections: int = 1024
    """Open connections uvicorn accepts before answering 503 itself."""


class ClientError(Exception):
    """A request the client must fix (400), or a limit it hit (413, 503): the status and a message."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.headers = status, headers or {}


def _text(content: Any, where: str) -> str:
    """Message content: a string, or OpenAI content parts [{"type": "text", "text": ...}, ...] joined by newlines."""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and content and all(isinstance(p, dict) for p in content):
        if any(p.get("type") != "text" or not isinstance(p.get("text"), str) for p in content):
            raise ClientError(400, f"{where}: only text content parts ({{\"type\": \"text\", \"text\": ...}}) are supported")
        return "\n".join(p["text"] for p in content)
    raise ClientError(400, f"{where}: content must be a string or a list of text parts, got {json.dumps(content)[:80]}")


def _messages(msgs: Any, where: str = "messages") -> list[dict[str, str]]:
    if not isinstance(msgs, list) or not msgs:
        raise ClientError(400, f"{where}: a non-empty list of {{role, content}}")
    out = []
    for i, m in enumerate(msgs):
        if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant") or "content" not in m:
            raise ClientError(400, f"{where}[{i}]: {{\"role\": system|user|assistant, \"content\": ...}}")
        out.append({"role": m["role"], "content": _text(m["content"], f"{where}[{i}].content")})
    return out


def _item(x: Any, i: int) -> Any:
    """One /invocations input: a text, {"instruction", "input"} (strings) or {"messages": [...]}."""
    if isinstance(x, str):
        return x
    if isinstance(x, dict) and "messages" in x:
        return {"messages": _messages(x["messages"], f"inputs[{i}].messages")}
    if isinstance(x, dict) and all(isinstance(x.get(k, ""), str) for k in ("instruction", "input")) and set(x) <= {"instruction", "input"}:
        return x
    raise ClientError(400, f"inputs[{i}]: a text, {{\"instruction\", \"input\"}} (strings) or {{\"messages\": [...]}}")


def _int_field(body: dict[str, Any], key: str) -> int | None:
    v = body.get(key)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise ClientError(400, f"{key}: a positive integer, got {json.dumps(v)[:40]}")
    return v


def _finite_field(body: dict[str, Any], key: str) -> None:
    v = body.get(key)
    if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v)):
        raise ClientError(400, f"{key}: a finite number, got {json.dumps(v)[:40]}")


def build_app(model: FtlibModel, mv: Any, uri: str, runtime: str, limits: Limits | None = None,
              token: str | None = None) -> Any:
    """The FastAPI app serving one loaded version."""
    from fastapi import FastAPI
    from fastapi.responses import JSONResponse
    from starlette.concurrency import run_in_threadpool

    limits = limits or Limits()
    model_id = f"{mv.name}/{mv.version}"
    app = FastAPI(title="ftlib serve", docs_url=None, redoc_url=None, openapi_url=None)
    state = {"waiting": 0, "lock": None}
    context = model.context_tokens()

    @app.exception_handler(ClientError)
    async def client_error(_: Request, e: ClientError) -> JSONResponse:
        return JSONResponse({"error": {"message": str(e)}}, status_code=e.status, headers=e.headers)

    @app.exception_handler(404)
    async def not_found(request: Request, _: Exception) -> JSONResponse:
        return JSONResponse({"error": {"message": f"no route {request.url.path}; try /health, /v1/models, "
                                                  "/v1/chat/completions, /invocations"}}, status_code=404)

    @app.exception_handler(405)
    async def wrong_method(request: Request, _: Exception) -> JSONResponse:
        return JSONResponse({"error": {"message": f"{request.method} {request.url.path}: method not allowed"}}, status_code=405)

    def authorize(request: Request) -> None:
        if token and not hmac.compare_digest(request.headers.get("authorization", ""), f"Bearer {token}"):
            raise ClientError(401, "missing or wrong bearer token (Authorization: Bearer $FTLIB_SERVE_TOKEN)",
                              {"WWW-Authenticate": "Bearer"})

    async def read_json(request: Request) -> dict[str, Any]:
        authorize(request)
        declared = request.headers.get("content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > limits.max_body_bytes):
            raise ClientError(413 if declared.isdigit() else 400, f"body over {limits.max_body_bytes} bytes"
                              if declared.isdigit() else "invalid Content-Length")
        data = bytearray()
        async for chunk in request.stream():  # chunked bodies: counted as they arrive
            data += chunk
            if len(data) > limits.max_body_bytes:
                raise ClientError(413, f"body over {limits.max_body_bytes} bytes")
        try:
            body = json.loads(data or b"{}", parse_constant=lambda c: (_ for _ in ()).throw(ValueError(f"{c} is not JSON")))
        except (ValueError, UnicodeDecodeError) as e:
            raise ClientError(400, f"invalid JSON body: {e}") from None
        if not isinstance(body, dict):
            raise ClientError(400, "the body must be a JSON object")
        return body

    def fits(conv: list[dict[str, str]], where: str) -> int:
        """Prompt tokens of a conversation; 400 when the context cannot hold it and one answer token."""
        n = model.prompt_tokens(conv)
        if n >= context:
            raise ClientError(400, f"{where}: the prompt is {n} tokens; the model's context is {context}")
        return n

    async def on_model(fn: Any) -> Any:
        """Run fn in a worker thread once the model is free; 503 when the queue is full or the wait too long."""
        if state["lock"] is None:
            state["lock"] = asyncio.Lock()
        if state["waiting"] >= limits.max_queue:
            raise ClientError(503, f"busy: {state['waiting']} requests are waiting for the model; retry later",
                              {"Retry-After": "1"})
        state["waiting"] += 1
        try:
            await asyncio.wait_for(state["lock"].acquire(), timeout=limits.deadline_s)
        except TimeoutError:
            raise ClientError(503, f"waited {limits.deadline_s:.0f} s for the model; retry later", {"Retry-After": "5"}) from None
        finally:
            state["waiting"] -= 1
        try:
            return await run_in_threadpool(fn)
        finally:
            state["lock"].release()

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "model": mv.name, "version": str(mv.version), "uri": uri, "runtime": runtime,
                "queued": state["waiting"]}

    @app.get("/v1/models")
    async def models(request: Request) -> dict[str, Any]:
        authorize(request)
        return {"object": "list", "data": [{"id": model_id, "object": "model", "owned_by": "ftlib"}]}

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> dict[str, Any]:
        body = await read_json(request)
        msgs = _messages(body.get("messages"))
        wanted = _int_field(body, "max_tokens")
        for key in ("temperature", "top_p"):  # decoding is greedy; a value must still be a number
            _finite_field(body, key)
        mode = body.get("mode")
        if mode not in (None, "loglik", "generate"):
            raise ClientError(400, f"mode: loglik or generate, got {json.dumps(mode)[:40]}")
        if len(msgs) == 1 and msgs[0]["role"] == "user" and model.config.get("instruction"):
            conv = conversation(msgs[0]["content"], model.config)  # only the text: add the trained instruction
        else:
            conv = conversation({"messages": msgs}, model.config)
        room = context - fits(conv, "messages")
        max_new = min(wanted or model.config.get("max_new_tokens", 256), limits.max_new_tokens, room)
        r = (await on_model(lambda: model.answer([conv], max_new, mode)))[0]
        return {"id": f"chatcmpl-{time.time_ns()}", "object": "chat.completion", "created": int(time.time()),
                "model": model_id, "choices": [{"index": 0, "message": {"role": "assistant", "content": r["text"]},
                                                "finish_reason": "stop"}],
                "usage": {"completion_tokens": r["tokens"]}, "ftlib": {k: r[k] for k in ("label", "logliks") if k in r}}

    @app.post("/invocations")
    async def invocations(request: Request) -> dict[str, Any]:
        body = await read_json(request)
        items = body.get("inputs", body.get("instances"))
        if not isinstance(items, list) or not items:
            raise ClientError(400, 'expected {"inputs": [text or {instruction, input} or {messages}, ...]}')
        if len(items) > limits.max_inputs:
            raise ClientError(400, f"inputs: at most {limits.max_inputs} per request, got {len(items)}")
        items = [_item(x, i) for i, x in enumerate(items)]
        params = body.get("params") or {}
        if not isinstance(params, dict) or set(params) - {"max_new_tokens", "mode"}:
            raise ClientError(400, 'params: {"max_new_tokens": N, "mode": "loglik" | "generate"}')
        if params.get("mode") not in (None, "loglik", "generate"):
            raise ClientError(400, "params.mode: loglik or generate")
        wanted = _int_field(params, "max_new_tokens")
        longest = max(fits(conversation(x, model.config), f"inputs[{i}]") for i, x in enumerate(items))
        params = {**params, "max_new_tokens": min(wanted or model.config.get("max_new_tokens", 256),
                                                  limits.max_new_tokens, context - longest)}
        return {"predictions": await on_model(lambda: model.predict_items(items, params))}

    return app


def check_port(host: str, port: int) -> None:
    """Fail before loading a model when the address is taken (Airflow's webserver uses 8080 too)."""
    import socket

    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        try:
            s.bind((host, port))
        except OSError as e:
            raise ValueError(f"cannot listen on {host}:{port} ({e.strerror}); pick another --port") from None


def serve(model: FtlibModel, mv: Any, uri: str, host: str = "127.0.0.1", port: int = 8000,
          runtime: str = "transformers", limits: Limits | None = None) -> None:
    """Serve a loaded registered version (ftlib.registry.pull.load_version) until interrupted."""
    import uvicorn

    from ftlib.core.log import get as get_logger

    limits, token = limits or Limits(), os.environ.get("FTLIB_SERVE_TOKEN") or None
    if host not in ("127.0.0.1", "localhost", "::1") and not token:
        get_logger("serve").warning(f"serving on {host} without FTLIB_SERVE_TOKEN: anyone who reaches this port "
                                    "can use the model; set a token or bind 127.0.0.1")
    print(f"serving {uri} -> {mv.name} v{mv.version} ({runtime}) on http://{host}:{port}", flush=True)
    uvicorn.run(build_app(model, mv, uri, runtime, limits, token), host=host, port=port, log_level="warning",
                timeout_keep_alive=limits.keepalive_s, limit_concurrency=limits.max_connections, access_log=False,
                timeout_graceful_shutdown=5)
