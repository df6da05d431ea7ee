"""`ftlib serve` under load: concurrent clients, then idle connections held open while /health is polled.

Starts the real server (FastAPI on uvicorn, ftlib.serving.serve.build_app) on 127.0.0.1 in a child process,
on a local model dir (default models/adapter from `make demo`, else the embedded base model), then:

  1. --clients threads (default 200) each send /invocations requests for --seconds (default 20): latency
     p50/p95 of the answered ones, requests/s, and every other outcome by kind (503 busy, connection reset,
     timeout, other status). A 503 client waits its Retry-After and tries again.
  2. --idle raw TCP connections (default 50) opened and left silent while /health is polled 100 times:
     /health p99. (The old http.server answered nothing while one such connection was open.)
  3. The server's RSS before, between and after (VmRSS).

Targets (issue 16): 0 connection resets with 200 concurrent clients (each answered or 503), /health p99
< 1 s with 50 idle connections open, RSS flat. Bounded: --seconds, a 30 s timeout per request; the server
refuses (503) a request still queued after 10 s.
The last line is one JSON object: requests_ok, errors, p95_s, health_p99_s_under_idle_conns, ...

    python benchmarks/serve_load.py
    python benchmarks/serve_load.py --clients 50 --seconds 10 --model embedded:smollm2-135m-instruct
"""

from __future__ import annotations

import argparse
import collections
import http.client
import json
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def serve_local(model_path: str, port: int) -> None:
    """Child process: the real server on a local model dir (no registry needed)."""
    from types import SimpleNamespace

    from ftlib.core.config import load_params
    from ftlib.core.models import load_model
    from ftlib.serving.generate import HFPredictor
    from ftlib.serving.serve import FtlibModel, Limits, serve

    params = load_params(ROOT / "params.yaml")
    m = FtlibModel()
    model, tok = load_model(model_path)
    m.predictor = HFPredictor(model, tok, params.template)
    m.config = {"labels": list(params.data.labels), "instruction": "Clasifica el sentimiento", "max_new_tokens": 16}
    # a request still queued after 10 s gets 503, before the clients' 30 s timeout: every request is answered or refused
    serve(m, SimpleNamespace(name=Path(model_path).name, version="local"), model_path, "127.0.0.1", port,
          limits=Limits(deadline_s=10.0))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def request(port: int, method: str, path: str, body: dict | None = None, timeout: float = 30.0) -> tuple[str, float, dict]:
    """(outcome, seconds, headers): outcome is the status code as text, or the error's kind."""
    t = time.perf_counter()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request(method, path, body=json.dumps(body).encode() if body is not None else None,
                     headers={"Content-Type": "application/json"})
        r = conn.getresponse()
        r.read()
        return str(r.status), time.perf_counter() - t, dict(r.getheaders())
    except ConnectionResetError:
        return "connection reset", time.perf_counter() - t, {}
    except (TimeoutError, socket.timeout):
        return "timeout", time.perf_counter() - t, {}
    except OSError as e:
        return type(e).__name__, time.perf_counter() - t, {}
    finally:
        conn.close()


def load(port: int, clients: int, seconds: float) -> tuple[collections.Counter, list[float]]:
    outcomes: collections.Counter = collections.Counter()
    latencies: list[float] = []
    lock = threading.Lock()
    stop = time.time() + seconds
    texts = ["Me encantó, volvería mañana mismo.", "Never again: cold food, rude staff.", "The shop opens at nine."]

    def client(i: int) -> None:
        while time.time() < stop:
            outcome, s, headers = request(port, "POST", "/invocations", {"inputs": [texts[i % 3]]})
            with lock:
                outcomes[outcome] += 1
                if outcome == "200":
                    latencies.append(s)
            if outcome == "503":
                time.sleep(float(headers.get("retry-after", headers.get("Retry-After", 1))))

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return outcomes, latencies


def idle_health(port: int, idle: int, polls: int = 100) -> tuple[list[float], collections.Counter]:
    socks = [socket.create_connection(("127.0.0.1", port)) for _ in range(idle)]
    try:
        times, outcomes = [], collections.Counter()
        for _ in range(polls):
            outcome, s, _ = request(port, "GET", "/health", timeout=10)
            outcomes[outcome] += 1
            times.append(s)
            time.sleep(0.02)
        return times, outcomes
    finally:
        for s in socks:
            s.close()


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))] if xs else float("nan")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="local model or adapter dir (default models/adapter, else the embedded base)")
    ap.add_argument("--clients", type=int, default=200)
    ap.add_argument("--seconds", type=float, default=20.0)
    ap.add_argument("--idle", type=int, default=50)
    ap.add_argument("--serve", nargs=2, metavar=("MODEL", "PORT"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.serve:
        return serve_local(args.serve[0], int(args.serve[1]))

    model = args.model or (str(ROOT / "models" / "adapter") if (ROOT / "models" / "adapter").is_dir() else "embedded:smollm2-135m-instruct")
    port = free_port()
    import tempfile

    log = tempfile.NamedTemporaryFile("w+", suffix=".log", prefix="serve_load-")  # a pipe nobody reads would fill and block
    server = subprocess.Popen([sys.executable, __file__, "--serve", model, str(port)], stdout=log, stderr=subprocess.STDOUT,
                              text=True)
    try:
        deadline = time.time() + 300
        while request(port, "GET", "/health", timeout=2)[0] != "200":
            if server.poll() is not None or time.time() > deadline:
                log.seek(0)
                raise SystemExit(f"the server did not start: {log.read()[-2000:]}")
            time.sleep(0.5)
        request(port, "POST", "/invocations", {"inputs": ["warm-up"]}, timeout=120)  # first answer allocates once
        rss = [rss_mb(server.pid)]
        print(f"server on 127.0.0.1:{port} ({model}); {args.clients} clients for {args.seconds:.0f} s ...", flush=True)
        t = time.perf_counter()
        outcomes, latencies = load(port, args.clients, args.seconds)
        wall = time.perf_counter() - t
        rss.append(rss_mb(server.pid))
        print(f"{args.idle} idle connections open, polling /health ...", flush=True)
        health, health_outcomes = idle_health(port, args.idle)
        rss.append(rss_mb(server.pid))
    finally:
        server.terminate()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()

    ok = outcomes.pop("200", 0)
    busy = outcomes.pop("503", 0)
    print(f"\n{'answered (200)':<34}{ok:>10}")
    print(f"{'busy (503, then retried)':<34}{busy:>10}")
    for kind, n in sorted(outcomes.items()):
        print(f"{'error: ' + kind:<34}{n:>10}")
    print(f"{'latency p50 / p95 (s, answered)':<34}{pct(latencies, .5):>10.2f} / {pct(latencies, .95):.2f}")
    print(f"{'requests/s (answered)':<34}{ok / wall:>10.2f}")
    print(f"{'/health p50 / p99 under idle conns':<34}{statistics.median(health):>10.3f} / {pct(health, .99):.3f} s"
          f"  ({dict(health_outcomes)})")
    print(f"{'server RSS start / after load / end':<34}{rss[0]:>10.0f} / {rss[1]:.0f} / {rss[2]:.0f} MB")
    resets = outcomes.get("connection reset", 0)
    print("targets: 0 connection resets " + ("met" if resets == 0 else f"NOT met ({resets})") +
          "; /health p99 < 1 s " + ("met" if pct(health, .99) < 1 else "NOT met"))
    print(json.dumps({"requests_ok": ok, "busy_503": busy, "errors": dict(outcomes), "connection_resets": resets,
                      "p50_s": round(pct(latencies, .5), 3), "p95_s": round(pct(latencies, .95), 3),
                      "requests_per_s": round(ok / wall, 2), "health_p99_s_under_idle_conns": round(pct(health, .99), 4),
                      "health_errors": {k: v for k, v in health_outcomes.items() if k != "200"},
                      "rss_mb": [round(x) for x in rss], "clients": args.clients, "seconds": args.seconds, "idle": args.idle}))


if __name__ == "__main__":
    main()
