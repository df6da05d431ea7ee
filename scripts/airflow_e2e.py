"""Airflow for real, end to end: `airflow standalone` (api-server, scheduler, dag-processor,
triggerer) on SQLite, the retraining DAG triggered through the REST API v2 with a conf,
data dropped into the landing folder triggering a run through the asset (real scheduler),
and a screenshot of the DAG's trigger form in headless Chromium.

It works in a throwaway project (a copy of params.yaml/dvc.yaml/data with a 2-layer tiny
model as base_model), so each run takes minutes, not the embedded model's 20.

    python scripts/airflow_e2e.py [--screenshot docs/img/trigger_form.png] [--keep]

Needs Debian's chromium + chromium-driver and `pip install selenium` for the screenshot
(skipped with a message when they are missing). Prints one JSON line at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_project(tmp: Path) -> Path:
    """A project dir whose params.yaml trains a tiny random Llama for 2 steps."""
    sys.path.insert(0, str(ROOT))
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from ftlib.core.models import load_tokenizer

    proj = tmp / "project"
    proj.mkdir()
    for name in ("dvc.yaml",):
        shutil.copy(ROOT / name, proj / name)
    shutil.copytree(ROOT / "data" / "raw", proj / "data" / "raw")
    tok = load_tokenizer("embedded:smollm2-135m-instruct")
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=1024, tie_word_embeddings=True,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).save_pretrained(tmp / "tiny")
    tok.save_pretrained(tmp / "tiny")
    write_tiny_params(proj / "params.yaml", str(tmp / "tiny"), "e2e-model")
    return proj


def write_tiny_params(path: Path, base_model: str, model_name: str) -> None:
    """params.yaml for a run in minutes: 2 training steps, Q8_0 only, a short benchmark, no gate threshold."""
    import yaml

    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["base_model"] = base_model
    params["validate"]["data_docs"] = False
    params["train"].update(max_steps=2, eval_steps=0, per_device_train_batch_size=4)
    params["quantize"]["variants"] = ["q8_0"]
    params["benchmark"].update(include_base=False, max_examples=3, decode_tokens=4, max_new_tokens=4)
    params["register"].update(model_name=model_name, accuracy_threshold=0.0, f1_threshold=0.0, baseline_margin=None,
                              check_base_model=False, log_merged=False)
    path.write_text(yaml.safe_dump(params, sort_keys=False))


def api(base: str, token: str, method: str, path: str, body: dict | None = None) -> dict:
    req = urllib.request.Request(base + path, method=method, data=json.dumps(body).encode() if body is not None else None,
                                 headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.loads(r.read() or b"{}")


def wait(what: str, check, timeout: float, every: float = 3.0):
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            value = check()
            if value:
                return value
        except OSError:
            pass
        time.sleep(every)
    raise SystemExit(f"timed out after {timeout:.0f}s waiting for {what}")


def stop(proc: subprocess.Popen) -> None:
    """Stop `airflow standalone` and every process it started (its own session)."""
    os.killpg(proc.pid, 15)
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, 9)


def standalone_env(home: Path, dags: Path, port: int, **extra: str) -> dict[str, str]:
    """The environment of `airflow standalone` on SQLite in `home`, with the DAGs in `dags`, the api-server on
    `port`, the DAG folder re-read every 5 s, anyone an admin; `extra` on top."""
    return {**os.environ, "AIRFLOW_HOME": str(home), "AIRFLOW__CORE__DAGS_FOLDER": str(dags),
            "AIRFLOW__CORE__LOAD_EXAMPLES": "False", "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_ALL_ADMINS": "True",
            "AIRFLOW__API__PORT": str(port), "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"http://localhost:{port}/execution/",
            "AIRFLOW__DAG_PROCESSOR__REFRESH_INTERVAL": "5",
            "PATH": str(Path(sys.executable).parent) + os.pathsep + os.environ["PATH"], **extra}


@contextmanager
def standalone(env: dict[str, str], log: Path, dags: int, unpause: tuple[str, ...] = ()) -> Iterator[tuple[str, str]]:
    """Run `airflow standalone` with `env` (standalone_env), its output in `log`; once the api-server answers
    and `dags` DAGs are parsed, unpause `unpause` and yield (base URL, API token). Stops it all on exit."""
    with log.open("w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "airflow", "standalone"], env=env, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)
    base = f"http://localhost:{env['AIRFLOW__API__PORT']}"
    try:
        wait("the api-server", lambda: urllib.request.urlopen(base + "/api/v2/version", timeout=5).status == 200, 300)
        token = json.loads(urllib.request.urlopen(base + "/auth/token", timeout=10).read())["access_token"]
        wait("the DAGs to be parsed", lambda: api(base, token, "GET", "/api/v2/dags?dag_id_pattern=%")["total_entries"] >= dags,
             300)
        for dag_id in unpause:
            api(base, token, "PATCH", f"/api/v2/dags/{dag_id}", {"is_paused": False})
        yield base, token
    finally:
        stop(proc)


def screenshot(base: str, out: Path) -> str:
    try:
        from selenium import webdriver
        from selenium.webdriver.common.by import By
    except ImportError:
        return "skipped: pip install selenium"
    if not shutil.which("chromedriver"):
        return "skipped: apt install chromium chromium-driver"
    opts = webdriver.ChromeOptions()
    for a in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1400,1300"):
        opts.add_argument(a)
    driver = webdriver.Chrome(options=opts)
    try:
        driver.get(f"{base}/dags/finetune_llama3")
        time.sleep(4)
        buttons = [b for b in driver.find_elements(By.TAG_NAME, "button") if b.text.strip().lower() == "trigger"]
        if buttons:
            buttons[0].click()
            time.sleep(3)
        out.parent.mkdir(parents=True, exist_ok=True)
        driver.save_screenshot(str(out))
        return str(out)
    finally:
        driver.quit()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--screenshot", type=Path, default=ROOT / "docs" / "img" / "trigger_form.png")
    ap.add_argument("--keep", action="store_true", help="Keep the temp dir (logs, project).")
    ap.add_argument("--screenshot-only", action="store_true", help="Only start Airflow and take the screenshot.")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="ftlib-e2e-"))
    proj = make_project(tmp)
    env = standalone_env(tmp / "airflow", ROOT / "dags", free_port(), AIRFLOW__CORE__PLUGINS_FOLDER=str(ROOT / "plugins"),
                         AIRFLOW__SCHEDULER__MIN_FILE_PROCESS_INTERVAL="5", FTLIB_PROJECT_DIR=str(proj),
                         FTLIB_LANDING_DIR=str(proj / "data" / "landing"), FTLIB_LANDING_QUIET_S="5",
                         MLFLOW_TRACKING_URI=f"sqlite:///{tmp / 'mlflow.db'}")
    result: dict = {"airflow_home": str(tmp / "airflow")}
    t0 = time.time()
    unpause = () if args.screenshot_only else ("finetune_llama3", "data_landing")
    try:
        with standalone(env, tmp / "standalone.log", dags=3, unpause=unpause) as (base, token):
            if args.screenshot_only:
                result["screenshot"] = screenshot(base, args.screenshot)
                return

            # 1. the REST API v2 with a conf
            run = api(base, token, "POST", "/api/v2/dags/finetune_llama3/dagRuns",
                      {"logical_date": None, "conf": {"lora_r": 8, "learning_rate": 0.005, "max_steps": 2}})
            run_id = run["dag_run_id"]
            state = wait("the triggered run", lambda: (s := api(base, token, "GET", f"/api/v2/dags/finetune_llama3/dagRuns/{run_id}")["state"])
                         in ("success", "failed") and s, 900, 5)
            result |= {"rest_run_id": run_id, "rest_run_state": state, "rest_run_s": round(time.time() - t0, 1)}

            # 2. data lands -> the landing watcher (triggerer) claims the settled burst -> one data_landing run moves
            #    it and emits the ftlib_raw_data event -> an asset-triggered run
            landing = proj / "data" / "landing"
            landing.mkdir(parents=True, exist_ok=True)
            rows = [json.loads(line) for line in (ROOT / "data" / "raw" / "sentiment.jsonl").read_text().splitlines()[:3]]
            for i, row in enumerate(rows):
                row["input"] = f"{row['input']} (landed batch {i})"
                (landing / f"landed-{i}.jsonl").write_text(json.dumps(row) + "\n")
                os.utime(landing / f"landed-{i}.jsonl", (time.time() - 10, time.time() - 10))
            t1 = time.time()

            def asset_run():
                runs = api(base, token, "GET", "/api/v2/dags/finetune_llama3/dagRuns?order_by=-start_date")["dag_runs"]
                done = [r for r in runs if r["run_type"] == "asset_triggered" and r["state"] in ("success", "failed")]
                return done[0] if done else None

            arun = wait("an asset-triggered run", asset_run, 900, 5)
            result |= {"asset_run_id": arun["dag_run_id"], "asset_run_state": arun["state"], "asset_run_s": round(time.time() - t1, 1),
                       "landed_files_in_raw": sorted(p.name for p in (proj / "data" / "raw").glob("landed-*.jsonl")),
                       "landing_left": sorted(p.relative_to(landing).as_posix() for p in landing.rglob("*.jsonl")),
                       "data_landing_runs": [r["run_type"] for r in
                                             api(base, token, "GET", "/api/v2/dags/data_landing/dagRuns")["dag_runs"]],
                       "finetune_runs": sorted(r["run_type"] for r in
                                               api(base, token, "GET", "/api/v2/dags/finetune_llama3/dagRuns")["dag_runs"])}
            result["screenshot"] = screenshot(base, args.screenshot)
    finally:
        if not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)
        print(json.dumps(result))


if __name__ == "__main__":
    main()
