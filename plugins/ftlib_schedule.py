"""Airflow plugin: registers ftlib's retraining timetable (NoBacklogCronTimetable, ftlib/airflow/schedule.py).

Airflow serializes a timetable that is not built in only if a plugin registers it: without this file in the
plugins folder the DAG processor could not store finetune_llama3, so ftlib.airflow.schedule.retrain_timetable()
then falls back to the plain CronTriggerTimetable (and logs it). Every Airflow component that reads the stored
DAG (DAG processor, scheduler, API server) needs this plugin; the images carry it in /opt/airflow/plugins.
"""

from __future__ import annotations

from airflow.plugins_manager import AirflowPlugin

from ftlib.airflow.schedule import NoBacklogCronTimetable


class FtlibSchedulePlugin(AirflowPlugin):
    name = "ftlib_schedule"
    timetables = [NoBacklogCronTimetable]
