"""The retraining cron: a CronTriggerTimetable that never schedules a cron point missed during a pause.

Airflow 3.3's CronTriggerTimetable with catchup=False schedules, after a pause that spans cron points, the
latest missed one (`_TriggerTimetable.next_dagrun_info` takes the max of the latest past point and the
point after the last run), so unpausing queues that run at once, ahead of a run the user triggers. There
is no setting for it. NoBacklogCronTimetable returns the next cron point from now instead of a point
more than `grace` in the past. The DAG processor asks the timetable again at every parse
(DagModel.calculate_dagrun_date_fields from dag_processing/collection.py), also while the DAG is paused,
so by the time it is unpaused the stored next run (dag.next_dagrun_create_after, what the scheduler
acts on) is already the next future point. `grace` (5 min) keeps the point the scheduler is about to
act on from being dropped by a reparse in between.

A timetable that is not built into Airflow is serialized only if a plugin registers it
(plugins/ftlib_schedule.py). `retrain_timetable()` falls back to the plain CronTriggerTimetable, with a
warning, where the configured plugins folder does not hold that plugin, so the DAG still parses there.
Light at import: DAG files call it at parse time.
"""

from __future__ import annotations

import datetime
import logging
from pathlib import Path
from typing import Any

from airflow._shared.timezones.timezone import coerce_datetime, parse_timezone, utcnow
from airflow.timetables.base import DagRunInfo, DataInterval, TimeRestriction
from airflow.timetables.trigger import CronTriggerTimetable

log = logging.getLogger(__name__)

PLUGIN_FILE = "ftlib_schedule.py"  # the plugin that registers NoBacklogCronTimetable
DEFAULT_GRACE = datetime.timedelta(minutes=5)


class NoBacklogCronTimetable(CronTriggerTimetable):
    """CronTriggerTimetable (run_immediately=0: the first run is the next cron point) whose next run is
    never a cron point more than `grace` in the past: after a pause, the next cron point from now.
    With catchup=True it is the plain CronTriggerTimetable."""

    def __init__(self, cron: str, *, timezone: Any = "UTC", interval: datetime.timedelta = datetime.timedelta(),
                 grace: datetime.timedelta = DEFAULT_GRACE) -> None:
        super().__init__(cron, timezone=timezone, interval=interval, run_immediately=datetime.timedelta(0))
        self.grace = grace

    def next_dagrun_info(self, *, last_automated_data_interval: DataInterval | None,
                         restriction: TimeRestriction) -> DagRunInfo | None:
        info = super().next_dagrun_info(last_automated_data_interval=last_automated_data_interval,
                                        restriction=restriction)
        if info is None or restriction.catchup:
            return info
        now = coerce_datetime(utcnow())
        if info.run_after >= now - self.grace:
            return info
        point = self._align_to_next(now)
        if restriction.latest is not None and restriction.latest < point:
            return None
        return DagRunInfo.interval(coerce_datetime(point - self._interval), point)

    def serialize(self) -> dict[str, Any]:
        from airflow.serialization.encoders import encode_interval

        data = super().serialize()
        del data["run_immediately"]
        return {**data, "grace": encode_interval(self.grace)}

    @classmethod
    def deserialize(cls, data: dict[str, Any]) -> NoBacklogCronTimetable:
        from airflow.serialization.decoders import decode_interval

        return cls(data["expression"], timezone=parse_timezone(data["timezone"]), interval=decode_interval(data["interval"]),
                   grace=decode_interval(data["grace"]) if "grace" in data else DEFAULT_GRACE)


def plugin_loaded() -> bool:
    """Whether Airflow's plugins folder holds the plugin that registers NoBacklogCronTimetable (a file check:
    loading the plugins here would cost every parse, on workers too, an import of the FastAPI app)."""
    from airflow.configuration import conf

    folder = conf.get("core", "plugins_folder", fallback=None)
    return bool(folder) and (Path(folder) / PLUGIN_FILE).is_file()


def retrain_timetable(cron: str):
    """NoBacklogCronTimetable on `cron` (UTC) where its plugin is loaded, else the plain CronTriggerTimetable
    with run_immediately=0 (no run for a past point before the first scheduled run, one for the latest
    missed point after a pause), with a warning."""
    if plugin_loaded():
        return NoBacklogCronTimetable(cron, timezone="UTC")
    from airflow.sdk import CronTriggerTimetable as Plain

    log.warning("plugins/%s is not in Airflow's plugins folder: finetune_llama3 uses the plain CronTriggerTimetable, "
                "so unpausing after a pause that spans a cron point runs that point", PLUGIN_FILE)
    return Plain(cron, timezone="UTC", run_immediately=datetime.timedelta(0))
