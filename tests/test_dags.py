"""The Airflow DAG: parses with no import errors and no heavy imports, and runs with SQLite."""

import json
import os
import subprocess
import sys
import textwrap
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from tests.conftest import REPO, balanced, write_jsonl

DAGS = REPO / "dags"


def airflow_env(home: Path) -> dict[str, str]:
    return {**os.environ, "AIRFLOW_HOME": str(home), "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
            "AIRFLOW__CORE__DAGS_FOLDER": str(DAGS), "AIRFLOW__CORE__UNIT_TEST_MODE": "False",
            "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}


@pytest.mark.parametrize("dag_file", ["finetune_llama3.py", "data_landing.py", "promote_model.py"])
def test_dag_file_imports_nothing_heavy_at_parse_time(tmp_path, dag_file):
    code = textwrap.dedent(f"""
        import sys, runpy, time
        t = time.perf_counter()
        runpy.run_path({str(DAGS / dag_file)!r})
        heavy = [m for m in ("torch", "transformers", "great_expectations", "trl", "peft", "mlflow",
                             "airflow.providers.cncf.kubernetes.operators.pod", "kubernetes.client") if m in sys.modules]
        print(heavy)
    """)
    r = subprocess.run([sys.executable, "-c", code], env=airflow_env(tmp_path / "af"), capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().splitlines()[-1] == "[]"


def dag_script(env: dict[str, str], body: str) -> dict:
    """Run `body` (Python; `bag` is the DagBag of dags/, `stored(dag_id)` the DAG as the DAG processor
    stores it, i.e. serialized and read back) in a fresh process; the dict it prints as its RESULT line."""
    code = textwrap.dedent(f"""
        import json
        from airflow.dag_processing.dagbag import DagBag
        from airflow.serialization.serialized_objects import DagSerialization
        bag = DagBag(dag_folder={str(DAGS)!r})
        def stored(dag_id):
            return DagSerialization.from_dict(DagSerialization.to_dict(bag.dags[dag_id]))
        out = {{"errors": {{k: str(v) for k, v in bag.import_errors.items()}}, "dags": sorted(bag.dags)}}
    """) + textwrap.dedent(body) + '\nprint("RESULT " + json.dumps(out))\n'
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    line = [l for l in r.stdout.splitlines() if l.startswith("RESULT ")]
    assert line, r.stdout[-3000:] + r.stderr[-3000:]
    return json.loads(line[0][7:])


def test_dags_parse_and_the_landing_asset_is_watched(tmp_path):
    """data_landing is scheduled on the landing folder's asset, whose watcher is the landing trigger on
    FTLIB_LANDING_DIR; it emits ftlib_raw_data, which schedules finetune_llama3."""
    env = {**airflow_env(tmp_path / "af"), "FTLIB_LANDING_DIR": str(tmp_path / "landing"), "FTLIB_LANDING_QUIET_S": "12"}
    out = dag_script(env, """
        land, finetune = stored("data_landing"), stored("finetune_llama3")
        out["landing"] = [{"name": a.name, "uri": a.uri, "watchers": [{"name": w.name, **w.trigger} for w in a.watchers]}
                          for _, a in land.timetable.asset_condition.iter_assets()]
        out["outlets"] = [a.name for a in land.get_task("collect").outlets]
        out["finetune_assets"] = [k.name for k, _ in finetune.timetable.asset_condition.iter_assets()]
        out["max_active_runs"] = land.max_active_runs
    """)
    assert out["errors"] == {} and out["dags"] == ["data_landing", "finetune_llama3", "promote_model"]
    landing = str(tmp_path / "landing")
    assert out["landing"] == [{"name": "ftlib_landing", "uri": f"file://{landing}", "watchers": [{
        "name": "ftlib_landing_settled", "classpath": "ftlib.airflow.landing.LandingTrigger",
        "kwargs": {"directory": landing, "quiet_s": 12.0, "poll_s": 2.4, "refire_s": 600.0}}]}]
    assert out["outlets"] == out["finetune_assets"] == ["ftlib_raw_data"] and out["max_active_runs"] == 1


@pytest.mark.parametrize("plugins", [True, False], ids=["plugin", "no-plugin"])
def test_unpausing_finetune_schedules_no_run_for_a_past_cron_point(tmp_path, plugins):
    """What the scheduler computes for finetune_llama3 with no scheduled run yet (first unpause) when
    "now" is just after a cron point: the next cron point, not the one that just passed. The cron is
    a daily one that fired 2-3 minutes ago; the old schedule (a start_date, run_immediately left
    False) gives the past point, the run that unpausing used to start ahead of the user's. Holds with
    the ftlib_schedule plugin loaded and without it (the plain CronTriggerTimetable fallback)."""
    now = datetime.now(timezone.utc)
    point = (now - timedelta(minutes=2)).replace(second=0, microsecond=0)
    env = {**airflow_env(tmp_path / "af"), "FTLIB_RETRAIN_CRON": f"{point.minute} {point.hour} * * *",
           "AIRFLOW__CORE__PLUGINS_FOLDER": str(REPO / "plugins" if plugins else tmp_path / "no_plugins")}
    out = dag_script(env, f"""
        import pendulum
        from airflow.timetables.base import TimeRestriction
        from airflow.timetables.trigger import CronTriggerTimetable
        dag = stored("finetune_llama3")
        out["type"] = type(dag.timetable.timetable).__name__
        # the DAG processor's call (DagModel.calculate_dagrun_date_fields) for a DAG with no scheduled run
        out["next"] = dag.next_dagrun_info(last_automated_run_info=None).run_after.isoformat()
        out["timetable"] = dag.timetable.next_dagrun_info(last_automated_data_interval=None,
                                                          restriction=dag._time_restriction).run_after.isoformat()
        old = CronTriggerTimetable({env["FTLIB_RETRAIN_CRON"]!r}, timezone="UTC")
        out["old"] = old.next_dagrun_info(last_automated_data_interval=None, restriction=TimeRestriction(
            pendulum.datetime(2026, 1, 1, tz="UTC"), None, False)).run_after.isoformat()
    """)
    assert out["errors"] == {}
    assert out["type"] == ("NoBacklogCronTimetable" if plugins else "CronTriggerTimetable")
    assert datetime.fromisoformat(out["next"]) == datetime.fromisoformat(out["timetable"]) == point + timedelta(days=1)
    assert datetime.fromisoformat(out["old"]) == point < now


def test_unpausing_finetune_after_a_pause_schedules_no_missed_cron_point(tmp_path):
    """After scheduled runs, a pause that spans cron points: the DAG processor's call (the same
    DagModel.calculate_dagrun_date_fields, with the last scheduled run) gives the next cron point
    from now, not the point missed 10 minutes ago (which plain CronTriggerTimetable with
    catchup=False gives, and the scheduler would run on unpause). Without a pause every cron point
    still runs, including one the scheduler is a few minutes late for. The DAG as the DAG processor
    stores it, with the plugins folder set: its timetable and the serialized round trip."""
    now = datetime.now(timezone.utc)
    point = (now - timedelta(minutes=10)).replace(second=0, microsecond=0)  # a daily point, past the 5 min grace
    late = (now - timedelta(minutes=2)).replace(second=0, microsecond=0)    # one within it
    env = {**airflow_env(tmp_path / "af"), "FTLIB_RETRAIN_CRON": f"{point.minute} {point.hour} * * *",
           "AIRFLOW__CORE__PLUGINS_FOLDER": str(REPO / "plugins")}
    out = dag_script(env, f"""
        from datetime import timedelta
        import pendulum
        from airflow.timetables.base import DagRunInfo, TimeRestriction
        from airflow.timetables.trigger import CronTriggerTimetable
        from ftlib.airflow.schedule import NoBacklogCronTimetable
        dag = stored("finetune_llama3")
        data = DagSerialization.to_dict(bag.dags["finetune_llama3"])
        from airflow.serialization.encoders import encode_timetable
        out["roundtrip"] = encode_timetable(DagSerialization.from_dict(data).timetable) == data["dag"]["timetable"]
        out["stored"] = data["dag"]["timetable"]["__var"]["timetable"]
        out["type"] = type(dag.timetable.timetable).__name__
        point = pendulum.parse({point.isoformat()!r})
        def ran(at):  # the last scheduled run's info, as calculate_dagrun_date_fields passes it
            return DagRunInfo.interval(at, at)
        def nxt(last, timetable=None):
            if timetable is None:
                info = dag.next_dagrun_info(last_automated_run_info=ran(last))
            else:
                info = timetable.next_dagrun_info(last_automated_data_interval=ran(last).data_interval,
                                                  restriction=TimeRestriction(None, None, False))
            return info.run_after.isoformat()
        out["paused"] = nxt(point - timedelta(weeks=3))    # last ran 3 weeks ago, paused since
        out["missed_one"] = nxt(point - timedelta(days=1))  # last ran at the previous point, this one missed
        out["ran"] = nxt(point)                             # ran at this point: the next one
        out["old"] = nxt(point - timedelta(weeks=3), CronTriggerTimetable({env["FTLIB_RETRAIN_CRON"]!r}, timezone="UTC"))
        late = pendulum.parse({late.isoformat()!r})
        out["late"] = nxt(late - timedelta(days=1), NoBacklogCronTimetable(f"{{late.minute}} {{late.hour}} * * *"))
        out["catchup"] = NoBacklogCronTimetable({env["FTLIB_RETRAIN_CRON"]!r}).next_dagrun_info(
            last_automated_data_interval=ran(point - timedelta(weeks=3)).data_interval,
            restriction=TimeRestriction(None, None, True)).run_after.isoformat()
    """)
    assert out["errors"] == {}
    nxt = point + timedelta(days=1)
    assert {k: datetime.fromisoformat(out[k]) for k in ("paused", "missed_one", "ran")} == {
        "paused": nxt, "missed_one": nxt, "ran": nxt}
    assert datetime.fromisoformat(out["old"]) == point < now   # what the old schedule ran on unpause
    assert datetime.fromisoformat(out["late"]) == late          # the scheduler a few minutes late: still runs
    assert datetime.fromisoformat(out["catchup"]) == point - timedelta(weeks=3) + timedelta(days=1)
    assert out["type"] == "NoBacklogCronTimetable" and out["roundtrip"]
    assert out["stored"]["__type"] == "ftlib.airflow.schedule.NoBacklogCronTimetable"
    assert out["stored"]["__var"]["grace"] == 300.0


@pytest.mark.slow
def test_dagbag_and_dag_test_on_sqlite(tmp_path, tiny_model):
    home = tmp_path / "af"
    env = airflow_env(home)
    subprocess.run([sys.executable, "-m", "airflow", "db", "migrate"], env=env, check=True, capture_output=True, timeout=300)
    good = write_jsonl(tmp_path / "good" / "d.jsonl", balanced(10))
    bad = write_jsonl(tmp_path / "bad" / "d.jsonl", balanced(3) + ['{"instruction": "x", "output": 5}'])
    ok_params, refuse_params = tmp_path / "params_ok.yaml", tmp_path / "params_refuse.yaml"
    dag_params(ok_params, tiny_model, tmp_path / "adapter", accuracy_threshold=0.0)
    dag_params(refuse_params, tiny_model, tmp_path / "adapter_refused", accuracy_threshold=1.0)
    script = textwrap.dedent(f"""
        import json, sys
        from airflow.dag_processing.dagbag import DagBag
        bag = DagBag(dag_folder={str(DAGS)!r})
        dag = bag.dags["finetune_llama3"]
        out = {{"errors": {{k: str(v) for k, v in bag.import_errors.items()}}, "dags": sorted(bag.dags),
               "tasks": [t.task_id for t in dag.tasks], "max_active_runs": dag.max_active_runs}}
        tmp = {str(tmp_path)!r}
        # the gate and output paths come from a params file (the form's overrides may not set them: issue 16)
        runs = (("good", {str(good.parent)!r}, {str(ok_params)!r}), ("bad", {str(bad.parent)!r}, {str(ok_params)!r}),
                ("refused", {str(good.parent)!r}, {str(refuse_params)!r}),
                ("passwd", "../" * 30 + "etc/passwd", {str(ok_params)!r}))  # the form path that once read /etc/passwd
        for name, raw, params_file in runs:
            run = dag.test(run_conf={{"raw_dir": raw, "validated_dir": tmp + "/out_" + name + "/validated",
                                     "splits_dir": tmp + "/out_" + name + "/splits", "params_file": params_file,
                                     "overrides": ["train.per_device_train_batch_size=4"],
                                     "reports_dir": tmp + "/reports_" + name, "merged_dir": tmp + "/merged",
                                     "quantized_dir": tmp + "/quantized"}})
            out[name] = {{"state": str(run.state), "tis": {{ti.task_id: str(ti.state) for ti in run.get_task_instances()}}}}
        run = dag.test(run_conf={{"overrides": ["trust_remote_code=true"]}})
        out["widen"] = {{ti.task_id: str(ti.state) for ti in run.get_task_instances()}}

        # promotion DAG: promote the challenger, then a rollback with nothing to roll back to fails clearly
        promote = bag.dags["promote_model"]
        def conf(**kw):  # every key each time: dag.test() keeps the previous run's conf in the DAG's params
            return {{"model_name": "dag-test", "action": "promote", "version": None, "alias": "challenger",
                    "reason": "", "force": False, **kw}}
        for name, c in (("promote", conf(reason="dag test")), ("rollback", conf(action="rollback"))):
            out[name] = str(promote.test(run_conf=c).state)
        from mlflow import MlflowClient
        c = MlflowClient()
        out["champion"] = str(c.get_model_version_by_alias("dag-test", "champion").version)
        out["promoted_by"] = c.get_model_version("dag-test", "1").tags.get("ftlib.promoted_by", "")
        c.set_model_version_tag("dag-test", "1", "ftlib.gate", "failed")  # as if it had failed the gate
        out["promote_refused"] = str(promote.test(run_conf=conf(version=1)).state)
        out["promote_forced"] = str(promote.test(run_conf=conf(version=1, force=True, reason="accepting the risk")).state)

        print("RESULT " + json.dumps(out))
    """)
    r = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=1500)  # 435 s here on 2 idle cores; CI machines are slower
    line = [l for l in r.stdout.splitlines() if l.startswith("RESULT ")]
    assert line, r.stdout[-3000:] + r.stderr[-3000:]
    out = json.loads(line[0][7:])
    assert out["errors"] == {} and out["dags"] == ["data_landing", "finetune_llama3", "promote_model"]
    tasks = ["validate", "split", "train", "quantize_and_benchmark", "evaluate", "gate", "register", "summary"]
    assert out["tasks"] == tasks and out["max_active_runs"] == 1
    assert out["good"]["state"] == "success", out["good"]
    assert out["good"]["tis"] == dict.fromkeys(tasks, "success")
    bench = json.loads((tmp_path / "reports_good" / "benchmark.json").read_text())
    assert [v["kind"] for v in bench["variants"]] == ["adapter-fp32", "merged-fp32", "gguf-q8_0", "torch-int8", "classical"]
    assert (tmp_path / "quantized" / "model-q8_0.gguf").is_file()
    metrics = json.loads((tmp_path / "reports_good" / "metrics.json").read_text())
    assert metrics["n"] == len((tmp_path / "out_good" / "splits" / "test.jsonl").read_text().splitlines())
    info = json.loads((tmp_path / "adapter" / "ftlib_train.json").read_text())
    assert info["global_step"] == 2 and info["base_model"] == tiny_model
    splits = tmp_path / "out_good" / "splits"
    assert sum(len((splits / f"{s}.jsonl").read_text().splitlines()) for s in ("train", "validation", "test")) == 30
    registration = json.loads((tmp_path / "reports_good" / "registration.json").read_text())
    assert registration["status"] == "registered" and registration["uri"] == "models:/dag-test/1"
    from mlflow import MlflowClient

    mv = MlflowClient(tracking_uri=env["MLFLOW_TRACKING_URI"]).get_model_version("dag-test", "1")
    assert mv.tags["ftlib.lineage.airflow.dag_id"] == "finetune_llama3" and mv.tags["ftlib.lineage.airflow.run_id"]
    assert out["refused"]["tis"] == {**dict.fromkeys(tasks, "success"), "register": "skipped"}
    summary = (tmp_path / "reports_refused" / "summary.md").read_text()
    assert "| gate | refused |" in summary and "| registered | - |" in summary
    assert "| registered | models:/dag-test/1 |" in (tmp_path / "reports_good" / "summary.md").read_text()
    assert json.loads((tmp_path / "reports_refused" / "gate.json").read_text())["passed"] is False
    assert json.loads((tmp_path / "adapter_refused" / "ftlib_train.json").read_text())["global_step"] == 2
    assert out["promote"] == "success" and out["champion"] == "1" and out["promoted_by"].startswith("airflow:")
    assert out["rollback"] == "failed"  # no previous champion: a clear refusal, not a silent no-op
    assert out["promote_refused"] == "failed" and out["promote_forced"] == "success"
    assert out["bad"]["state"] == "failed"
    assert out["bad"]["tis"] == {"validate": "failed", **dict.fromkeys(tasks[1:], "upstream_failed")}
    assert not (tmp_path / "out_bad" / "splits").exists()
    # raw_dir=../../etc/passwd: validate fails on the path before reading anything; nothing of passwd is copied
    assert out["passwd"]["tis"] == {"validate": "failed", **dict.fromkeys(tasks[1:], "upstream_failed")}
    assert "outside the allowed roots" in r.stdout + r.stderr
    assert not (tmp_path / "out_passwd").exists()
    assert not [f for f in tmp_path.rglob("*") if f.is_file() and b"root:x:0:0" in f.read_bytes()]
    assert out["widen"]["validate"] == "failed" and "not allowed from the DAG form" in r.stdout + r.stderr


@pytest.mark.slow
def test_landing_dag_on_sqlite(tmp_path):
    """A burst of three files: the watcher's trigger (rebuilt from the stored DAG, as the triggerer does)
    claims it with one event; data_landing then moves all three into data/raw and emits one
    ftlib_raw_data event. A second run has nothing claimed: skipped, no event."""
    proj, landing = tmp_path / "proj", tmp_path / "landing"
    env = {**airflow_env(tmp_path / "af"), "FTLIB_PROJECT_DIR": str(proj), "FTLIB_LANDING_DIR": str(landing),
           "FTLIB_LANDING_QUIET_S": "0.5"}
    subprocess.run([sys.executable, "-m", "airflow", "db", "migrate"], env=env, check=True, capture_output=True, timeout=300)
    landing.mkdir()
    for i in range(3):
        (landing / f"batch{i}.jsonl").write_text("{}\n")
    out = dag_script(env, """
        import asyncio
        from airflow._shared.module_loading import import_string
        from airflow.models.asset import AssetEvent
        from airflow.serialization.decoders import smart_decode_trigger_kwargs
        from airflow.utils.session import create_session
        (_, asset), = stored("data_landing").timetable.asset_condition.iter_assets()
        stored_trigger = asset.watchers[0].trigger
        trigger = import_string(stored_trigger["classpath"])(
            **{k: smart_decode_trigger_kwargs(v) for k, v in stored_trigger["kwargs"].items()})

        async def first_event():
            async for event in trigger.run():
                return event.payload

        out["event"] = asyncio.run(first_event())
        with create_session() as s:
            before = s.query(AssetEvent).count()
        out["tis"] = {}
        for attempt in ("burst", "nothing claimed"):
            run = bag.dags["data_landing"].test()
            out["tis"][attempt] = {ti.task_id: str(ti.state) for ti in run.get_task_instances()}
        with create_session() as s:
            out["events"] = [e.asset.name for e in s.query(AssetEvent).all()][before:]
    """)
    assert out["errors"] == {}
    assert out["event"]["files"] == ["batch0.jsonl", "batch1.jsonl", "batch2.jsonl"]
    assert out["tis"] == {"burst": {"collect": "success"}, "nothing claimed": {"collect": "skipped"}}
    assert out["events"] == ["ftlib_raw_data"]  # one event for the burst, none for the empty run
    assert sorted(p.name for p in (proj / "data" / "raw").iterdir()) == ["batch0.jsonl", "batch1.jsonl", "batch2.jsonl"]
    assert sorted(p.name for p in landing.rglob("*")) == [".settled"]  # nothing left behind


def dag_params(path: Path, base_model: str, adapter: Path, accuracy_threshold: float) -> None:
    """A tiny run's params file: 2 steps, Q8_0 + torch-int8, a 3-row benchmark, only the accuracy bar of the gate."""
    import yaml

    p = yaml.safe_load((REPO / "params.yaml").read_text())
    p["base_model"] = base_model
    p["validate"]["data_docs"] = False
    p["train"].update(max_steps=2, eval_steps=0, output_dir=str(adapter), checkpoint_dir=str(adapter.parent / "ckpt"))
    p["quantize"]["variants"] = ["q8_0", "torch-int8"]
    p["benchmark"].update(include_base=False, max_examples=3, decode_tokens=4, max_new_tokens=4)
    p["register"].update(model_name="dag-test", accuracy_threshold=accuracy_threshold, f1_threshold=0.0, baseline_margin=None,
                         check_base_model=False, log_merged=False)
    path.write_text(yaml.safe_dump(p, sort_keys=False))


@pytest.mark.slow
def test_unchanged_rerun_reuses_dvc_cache(tmp_path, tiny_model):
    """With dvc.yaml's paths and params.yaml's values, the DAG runs the stages as `dvc repro`:
    a second run on the same data, with the adapter deleted (a fresh worker), restores it
    from DVC's cache and trains nothing."""
    import shutil

    from scripts.airflow_e2e import write_tiny_params

    home = tmp_path / "af"
    env = {**airflow_env(home), "FTLIB_PROJECT_DIR": str(tmp_path / "proj")}
    root = tmp_path / "proj"
    root.mkdir()
    shutil.copy(REPO / "dvc.yaml", root / "dvc.yaml")
    shutil.copytree(REPO / "ftlib", root / "ftlib", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(REPO / ".dvc", root / ".dvc", ignore=shutil.ignore_patterns("tmp", "cache"))
    write_tiny_params(root / "params.yaml", tiny_model, "dag-dvc")
    subprocess.run(["git", "init", "-q"], cwd=root, check=True)
    subprocess.run([sys.executable, "-m", "dvc", "remote", "modify", "local", "url", str(tmp_path / "remote")],
                   cwd=root, check=True)
    write_jsonl(root / "data" / "raw" / "reviews.jsonl", balanced(10))
    subprocess.run([sys.executable, "-m", "airflow", "db", "migrate"], env=env, check=True, capture_output=True, timeout=300)
    script = textwrap.dedent(f"""
        import json, shutil
        from airflow.dag_processing.dagbag import DagBag
        dag = DagBag(dag_folder={str(DAGS)!r}).dags["finetune_llama3"]
        out = {{}}
        for name in ("first", "rerun", "smoke"):
            if name == "rerun":
                shutil.rmtree({str(root / "models" / "adapter")!r})
            print(f"=== {{name}} ===", flush=True)
            # the project is the deployment's: FTLIB_PROJECT_DIR
            run = dag.test(run_conf={{"profile": "smoke"}} if name == "smoke" else {{"profile": "full"}})
            out[name] = {{ti.task_id: str(ti.state) for ti in run.get_task_instances()}}
        print("RESULT " + json.dumps(out))
    """)
    r = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=1500)
    line = [l for l in r.stdout.splitlines() if l.startswith("RESULT ")]
    assert line, r.stdout[-3000:] + r.stderr[-3000:]
    out = json.loads(line[0][7:])
    tasks = ["validate", "split", "train", "quantize_and_benchmark", "evaluate", "gate", "register", "summary"]
    assert out["first"] == dict.fromkeys(tasks, "success") and out["rerun"] == out["first"], out
    log = r.stdout + r.stderr
    first, rerun = log.split("=== rerun ===")
    rerun, smoke = rerun.split("=== smoke ===")
    for stage in ("validate", "split", "train", "quantize", "benchmark", "evaluate"):
        assert f"dvc repro {stage}: ran" in first, stage
    assert "dvc repro train: restored from cache" in rerun
    for stage in ("validate", "split", "quantize", "benchmark", "evaluate"):
        assert f"dvc repro {stage}: unchanged" in rerun, stage
    assert "Running stage" not in rerun and "calling ftlib directly" not in first + rerun
    assert json.loads((root / "models" / "adapter" / "ftlib_train.json").read_text())["global_step"] == 2
    assert [p for p in (tmp_path / "remote").rglob("*") if p.is_file()]  # the splits were pushed
    status = subprocess.run([sys.executable, "-m", "dvc", "status"], cwd=root, capture_output=True, text=True)
    assert "up to date" in status.stdout, status.stdout  # dvc.lock records what the DAG ran
    registration = json.loads((root / "reports" / "registration.json").read_text())
    assert registration["uri"] == "models:/dag-dvc/1"  # the rerun found the version the first run made
    # profile smoke (issue 17): every stage for real, cut short, into runs/smoke/; DVC's outputs and the registry untouched
    assert out["smoke"] == {**dict.fromkeys(tasks, "success"), "register": "skipped"}, out["smoke"]
    assert "calling ftlib directly, DVC's cache is not used: profile smoke" in smoke and "dvc repro" not in smoke
    assert "neither scored against the gate nor registered" in smoke
    assert "\r" not in smoke and "{'loss'" not in smoke and "it/s]" not in smoke  # line mode: no bars, no per-step dicts
    runs = root / "runs" / "smoke"
    assert json.loads((runs / "models" / "adapter" / "ftlib_train.json").read_text())["global_step"] == 8
    assert json.loads((root / "models" / "adapter" / "ftlib_train.json").read_text())["global_step"] == 2
    assert (runs / "models" / "quantized" / "model-q8_0.gguf").is_file() and (runs / "reports" / "metrics.json").is_file()
    assert "| gate | not run |" in (runs / "reports" / "summary.md").read_text()
    assert "up to date" in subprocess.run([sys.executable, "-m", "dvc", "status"], cwd=root, capture_output=True, text=True).stdout
    from mlflow import MlflowClient

    assert [v.version for v in MlflowClient(tracking_uri=env["MLFLOW_TRACKING_URI"]).search_model_versions("name='dag-dvc'")] == [1]
