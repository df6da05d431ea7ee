"""The landing watcher's trigger, run for real: its async run() against a temp landing folder that a
writer coroutine fills, with a short quiet period; then data_landing's move of what it claimed."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import time
from pathlib import Path

import pytest
from airflow._shared.module_loading import import_string  # the triggerer's own loader

from ftlib.airflow.landing import SETTLED, LandingTrigger, collect_settled

QUIET = 0.8


def trigger(landing: Path, **kw) -> LandingTrigger:
    return LandingTrigger(str(landing), quiet_s=QUIET, poll_s=0.05, **kw)


def restarted(t: LandingTrigger) -> LandingTrigger:
    """A new instance built the way the triggerer builds one: the trigger as the DAG processor stores it,
    then the class from its classpath and the decoded kwargs."""
    from airflow.serialization.decoders import smart_decode_trigger_kwargs
    from airflow.serialization.encoders import encode_trigger

    stored = json.loads(json.dumps(encode_trigger(t)))
    return import_string(stored["classpath"])(**{k: smart_decode_trigger_kwargs(v) for k, v in stored["kwargs"].items()})


async def watch(t: LandingTrigger, seconds: float, writer=None) -> tuple[list[tuple[float, dict]], float]:
    """Run t.run() while `writer` (a coroutine returning when it last wrote) runs, then `seconds` more;
    the events (seconds since the start, payload) and the writer's last write (seconds since the start)."""
    t0 = time.monotonic()
    events: list[tuple[float, dict]] = []

    async def consume():
        async for event in t.run():
            events.append((time.monotonic() - t0, event.payload))

    task = asyncio.create_task(consume())
    last = (await writer) - t0 if writer else 0.0
    await asyncio.sleep(seconds)
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    return events, last


def jsonl(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.glob("*.jsonl"))


def claims(landing: Path) -> list[Path]:
    return sorted(p for p in (landing / SETTLED).iterdir() if not p.name.startswith("."))


def test_one_event_for_a_burst_written_over_time(tmp_path):
    landing = tmp_path / "landing"
    landing.mkdir()

    async def writer() -> float:
        (landing / "a.jsonl").write_text('{"n": 1}\n')
        await asyncio.sleep(0.3)
        with (landing / "b.jsonl").open("w") as f:  # written in two parts, 0.3 s apart
            f.write('{"n": 2}\n')
            f.flush()
            await asyncio.sleep(0.3)
            f.write('{"n": 3}\n')
        await asyncio.sleep(0.3)
        (landing / "c.jsonl").write_text('{"n": 4}\n')
        (landing / "notes.txt").write_text("not data")
        return time.monotonic()

    events, last_write = asyncio.run(watch(trigger(landing), 4 * QUIET, writer()))
    assert len(events) == 1, events  # one burst, one event, and nothing more for the files it claimed
    at, payload = events[0]
    assert at >= last_write + QUIET  # only once nothing had changed for the quiet period
    assert payload["files"] == ["a.jsonl", "b.jsonl", "c.jsonl"] and payload["again"] is False
    (claim,) = claims(landing)
    assert claim.name == payload["claim"] and jsonl(claim) == payload["files"]
    assert (claim / "b.jsonl").read_text() == '{"n": 2}\n{"n": 3}\n'  # whole
    assert jsonl(landing) == [] and (landing / "notes.txt").exists()


def test_a_file_still_being_written_is_not_announced(tmp_path):
    landing = tmp_path / "landing"
    landing.mkdir()
    lines = [f'{{"n": {i}}}\n' for i in range(12)]

    async def writer() -> float:  # appends for 3 s in all, each gap shorter than the quiet period
        with (landing / "slow.jsonl").open("w") as f:
            for i, line in enumerate(lines):
                await asyncio.sleep(0.25 if i else 0)
                f.write(line)
                f.flush()
        return time.monotonic()

    events, last_write = asyncio.run(watch(trigger(landing), 3 * QUIET, writer()))
    assert len(events) == 1, events
    assert events[0][0] >= last_write + QUIET
    (claim,) = claims(landing)
    assert (claim / "slow.jsonl").read_text() == "".join(lines)


def test_a_restarted_trigger_does_not_announce_the_same_files_again(tmp_path):
    landing, raw = tmp_path / "landing", tmp_path / "raw"
    landing.mkdir()
    for name in ("a.jsonl", "b.jsonl"):
        (landing / name).write_text("{}\n")
    first = trigger(landing)

    async def until_first_event() -> dict:
        async for event in first.run():
            return event.payload  # the trigger is closed right after its event, as on a triggerer restart

    payload = asyncio.run(until_first_event())
    assert payload["files"] == ["a.jsonl", "b.jsonl"]

    async def new_file_later() -> float:
        await asyncio.sleep(3 * QUIET)  # the restarted trigger sees only the claimed burst for a while
        (landing / "c.jsonl").write_text("{}\n")
        return time.monotonic()

    second = restarted(first)
    events, landed = asyncio.run(watch(second, 2 * QUIET, new_file_later()))
    assert [(p["files"], p["again"]) for _, p in events] == [(["c.jsonl"], False)]  # only the new file
    assert events[0][0] >= landed + QUIET
    assert [jsonl(c) for c in claims(landing)] == [["a.jsonl", "b.jsonl"], ["c.jsonl"]]

    moved = collect_settled(landing, raw)  # data_landing's task
    assert sorted(p.name for p in moved) == jsonl(raw) == ["a.jsonl", "b.jsonl", "c.jsonl"]
    assert claims(landing) == [] and jsonl(landing) == []
    events, _ = asyncio.run(watch(restarted(second), 2 * QUIET))
    assert events == []


def test_a_claim_never_published_or_never_moved_is_announced_again(tmp_path):
    landing = tmp_path / "landing"
    settled = landing / SETTLED
    # a trigger stopped while building a claim: the claim was never announced
    (settled / ".tmp-20260101T000000.000000Z-abcdef").mkdir(parents=True)
    (settled / ".tmp-20260101T000000.000000Z-abcdef" / "e.jsonl").write_text("{}\n")
    # a claim announced an hour ago and still not moved (the event was lost, or the DAG was paused)
    (settled / "old").mkdir()
    (settled / "old" / "f.jsonl").write_text("{}\n")
    os.utime(settled / "old", (time.time() - 3600, time.time() - 3600))
    # a claim announced just now: data_landing will move it, nothing to repeat
    (settled / "new").mkdir()
    (settled / "new" / "g.jsonl").write_text("{}\n")

    events, _ = asyncio.run(watch(trigger(landing, refire_s=1.0), 1.6))
    got = [(round(at), p["claim"], p["files"], p["again"]) for at, p in events]
    assert got[:2] == [(0, "20260101T000000.000000Z-abcdef", ["e.jsonl"], False), (0, "old", ["f.jsonl"], True)]
    # one second later (refire_s) the two unmoved older claims come round again, the new one too
    assert sorted((p["claim"], p["again"]) for _, p in events[2:]) == [
        ("20260101T000000.000000Z-abcdef", True), ("new", True), ("old", True)]
    assert all(at >= 1.0 for at, _ in events[2:])
    assert [c.name for c in claims(landing)] == ["20260101T000000.000000Z-abcdef", "new", "old"]


def test_collect_settled_moves_claims_only_and_never_overwrites(tmp_path):
    landing, raw = tmp_path / "landing", tmp_path / "raw"
    for folder, name in (("c1", "a.jsonl"), ("c2", "a.jsonl"), (".tmp-c3", "b.jsonl")):
        (landing / SETTLED / folder).mkdir(parents=True)
        (landing / SETTLED / folder / name).write_text(f"{folder}\n")
    (landing / "unclaimed.jsonl").write_text("{}\n")
    assert collect_settled(tmp_path / "missing", raw) == []
    moved = collect_settled(landing, raw)
    assert len(moved) == 2 and sorted(p.read_text() for p in moved) == ["c1\n", "c2\n"]  # same name: both kept
    assert [p.name for p in (landing / SETTLED).iterdir()] == [".tmp-c3"]  # not published yet: not moved
    assert jsonl(landing) == ["unclaimed.jsonl"]  # the watcher has not claimed it: it stays


PROBE = '''
import os
from pathlib import Path
from airflow.sdk import dag, task
from ftlib.airflow.orchestrate import raw_data_asset

PROJECT = os.environ["FTLIB_PROJECT_DIR"]


@dag(dag_id="probe", schedule=[raw_data_asset(PROJECT)], max_active_runs=1)
def probe():
    @task
    def seen() -> list[str]:
        return sorted(p.name for p in Path(PROJECT, "data", "raw").glob("*.jsonl"))

    seen()


probe()
'''


@pytest.mark.slow
def test_real_triggerer_one_data_landing_run_per_burst(tmp_path):
    """`airflow standalone` (scheduler, dag-processor, triggerer, api-server) on SQLite with the real
    data_landing DAG and a probe DAG scheduled on ftlib_raw_data: no data_landing run while nothing
    lands; a burst of 3 files written over 2 s gives one watcher event, one data_landing run and one
    probe run, which sees all 3 files."""
    import json
    import re
    import shutil

    from scripts.airflow_e2e import api, free_port, standalone, standalone_env, wait
    from tests.conftest import REPO

    dags, proj = tmp_path / "dags", tmp_path / "project"
    dags.mkdir()
    shutil.copy(REPO / "dags" / "data_landing.py", dags / "data_landing.py")
    (dags / "probe.py").write_text(PROBE)
    landing = proj / "data" / "landing"
    landing.mkdir(parents=True)
    env = standalone_env(tmp_path / "airflow", dags, free_port(), AIRFLOW__SCHEDULER__MIN_FILE_PROCESS_INTERVAL="5",
                         FTLIB_PROJECT_DIR=str(proj), FTLIB_LANDING_DIR=str(landing), FTLIB_LANDING_QUIET_S="3",
                         PYTHONPATH=str(REPO))
    log = tmp_path / "standalone.log"
    with standalone(env, log, dags=2, unpause=("data_landing", "probe")) as (base, token):
        def runs(dag_id: str) -> list[dict]:
            return api(base, token, "GET", f"/api/v2/dags/{dag_id}/dagRuns?limit=100")["dag_runs"]

        # the watcher starts once the DAG processor has seen data_landing unpaused
        wait("the landing watcher", lambda: re.search(r"triggerer .* trigger ID \d+ starting", log.read_text()), 120, 2)
        time.sleep(10)
        idle = runs("data_landing")
        for i in range(3):  # a burst written over 2 s
            (landing / f"batch{i}.jsonl").write_text(json.dumps({"instruction": "x", "input": str(i), "output": "POSITIVO"}) + "\n")
            time.sleep(1)
        done = wait("the probe run", lambda: [r for r in runs("probe") if r["state"] in ("success", "failed")], 300, 2)
        time.sleep(15)  # time for any extra event or run to show
        landing_runs, probe_runs = runs("data_landing"), runs("probe")
        seen = api(base, token, "GET",
                   f"/api/v2/dags/probe/dagRuns/{done[0]['dag_run_id']}/taskInstances/seen/xcomEntries/return_value")
    assert idle == []  # no DAG run while nothing landed
    assert [(r["run_type"], r["state"]) for r in landing_runs] == [("asset_triggered", "success")]
    assert [(r["run_type"], r["state"]) for r in probe_runs] == [("asset_triggered", "success")]
    assert seen["value"] == ["batch0.jsonl", "batch1.jsonl", "batch2.jsonl"]
    assert sorted(p.name for p in (proj / "data" / "raw").iterdir()) == seen["value"]
    assert not list(landing.rglob("*.jsonl"))
