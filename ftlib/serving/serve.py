"""Deploy: the registered model as an MLflow pyfunc, and a small OpenAI-compatible HTTP server.

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

    GET  /health                 {"status": "ok", "model": ..., "version": ..., "runtime": ...}
    GET  /v1/models              OpenAI model list
    POST /v1/chat/completions    OpenAI chat completions (messages in, one choice out)
    POST /invocations            MLflow scoring protocol: {"inputs": [...]} -> {"predictions": [...]}

One request at a time (one model on CPU), greedy decoding. The same pyfunc also runs
under `mlflow models serve -m models:/NAME@champion --env-manager local`.
"""

from __future__ import annotations

import json
import time
from http.server import BaseHTTPRequestHandler, HTTPServer
from typing import Any

import mlflow

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

    def predict(self, model_input: list[str], params: dict[str, Any] | None = None) -> list[str]:
        return self.predict_items(model_input, params)

    def predict_items(self, items: list[Any], params: dict[str, Any] | None = None) -> list[str]:
        """predict() for texts, {"instruction", "input"} or {"messages"} items (MLflow validates predict's input as texts)."""
        params = params or {}
        rows = self.answer([conversation(x, self.config) for x in items], params.get("max_new_tokens"), params.get("mode"))
        return [r["label"] if r["label"] is not None else r["text"] for r in rows]


def make_handler(model: FtlibModel, mv: Any, uri: str, runtime: str) -> type[BaseHTTPRequestHandler]:
    model_id = f"{mv.name}/{mv.version}"

    class Handler(BaseHTTPRequestHandler):
        def _send(self, code: int, body: dict[str, Any]) -> None:
            data = json.dumps(body, ensure_ascii=False).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, fmt: str, *args: Any) -> None:  # one line per request, no reverse DNS
            print(f"{self.address_string()} {fmt % args}", flush=True)

        def do_GET(self) -> None:
            if self.path == "/health":
                self._send(200, {"status": "ok", "model": mv.name, "version": str(mv.version), "uri": uri, "runtime": runtime})
            elif self.path == "/v1/models":
                self._send(200, {"object": "list", "data": [{"id": model_id, "object": "model", "owned_by": "ftlib"}]})
            else:
                self._send(404, {"error": {"message": f"no route {self.path}; try /health, /v1/models, /v1/chat/completions, /invocations"}})

        def do_POST(self) -> None:
            try:
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
                if not isinstance(body, dict):
                    raise ValueError("the body must be a JSON object")
            except ValueError as e:
                return self._send(400, {"error": {"message": f"invalid JSON body: {e}"}})
            try:
                if self.path == "/v1/chat/completions":
                    msgs = body.get("messages")
                    if not isinstance(msgs, list) or not msgs or not all(isinstance(m, dict) and "content" in m for m in msgs):
                        return self._send(400, {"error": {"message": "messages: a non-empty list of {role, content}"}})
                    if len(msgs) == 1 and msgs[0].get("role") == "user" and model.config.get("instruction"):
                        conv = conversation(msgs[0]["content"], model.config)  # only the text: add the trained instruction
                    else:
                        conv = conversation({"messages": msgs}, model.config)
                    r = model.answer([conv], body.get("max_tokens"), body.get("mode"))[0]
                    return self._send(200, {
                        "id": f"chatcmpl-{time.time_ns()}", "object": "chat.completion", "created": int(time.time()),
                        "model": model_id, "choices": [{"index": 0, "message": {"role": "assistant", "content": r["text"]},
                                                        "finish_reason": "stop"}],
                        "usage": {"completion_tokens": r["tokens"]}, "ftlib": {k: r[k] for k in ("label", "logliks") if k in r}})
                if self.path == "/invocations":
                    items = body.get("inputs", body.get("instances"))
                    if not isinstance(items, list):
                        return self._send(400, {"error": {"message": 'expected {"inputs": [text or {instruction, input} or {messages}, ...]}'}})
                    return self._send(200, {"predictions": model.predict_items(items, body.get("params"))})
            except (KeyError, TypeError, ValueError) as e:
                return self._send(400, {"error": {"message": str(e)}})
            except Exception as e:  # noqa: BLE001  (keep serving; the client gets the reason)
                return self._send(500, {"error": {"message": f"{type(e).__name__}: {e}"}})
            self._send(404, {"error": {"message": f"no route {self.path}"}})

    return Handler


def serve(model: FtlibModel, mv: Any, uri: str, host: str = "127.0.0.1", port: int = 8080,
          runtime: str = "transformers") -> None:
    """Serve a loaded registered version (ftlib.registry.pull.load_version) until interrupted."""
    httpd = HTTPServer((host, port), make_handler(model, mv, uri, runtime))
    print(f"serving {uri} -> {mv.name} v{mv.version} ({runtime}) on http://{host}:{httpd.server_port}", flush=True)
    try:
        httpd.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        httpd.server_close()
