"""The pull schedule: every few minutes, the hour in progress (PRODUCT.md section 12)."""

from __future__ import annotations

import os
from datetime import datetime, timedelta, timezone

import dagster as dg

from personalization_pipeline.jobs import source_pull_job
from personalization_pipeline.partitions import source_partitions

PULL_CRON = os.environ.get("PP_PULL_CRON", "*/5 * * * *")
PULL_LAG_SECONDS = float(os.environ.get("PP_PULL_LAG_SECONDS", "60"))
CLOSE_SECONDS = float(os.environ.get("PP_PULL_CLOSE_SECONDS", "900"))
"""For this long into a new hour, ticks also re-pull the previous hour, so its last minutes
and the vendor's late commits are not left behind."""


def default_status() -> dg.DefaultScheduleStatus:
    stopped = os.environ.get("PP_AUTOMATION", "running").lower() == "stopped"
    return dg.DefaultScheduleStatus.STOPPED if stopped else dg.DefaultScheduleStatus.RUNNING


def pull_requests(tick: datetime, lag_seconds: float, close_seconds: float) -> list[dg.RunRequest]:
    """The partitions a tick at `tick` fills: the hour holding tick - lag, and early in an
    hour the previous one too."""
    tick = tick.astimezone(timezone.utc)
    edge = tick - timedelta(seconds=lag_seconds)
    hours = {edge.replace(minute=0, second=0, microsecond=0)}
    hours.add((edge - timedelta(seconds=close_seconds)).replace(minute=0, second=0, microsecond=0))
    requests = []
    for hour in sorted(hours):
        key = hour.strftime("%Y-%m-%d-%H:%M")
        if hour < source_partitions.start:
            continue
        requests.append(
            dg.RunRequest(
                partition_key=key,
                run_key=f"{key}@{tick.strftime('%Y-%m-%dT%H:%M')}",
                tags={"pp/trigger": "schedule"},
            )
        )
    return requests


@dg.schedule(
    job=source_pull_job,
    cron_schedule=PULL_CRON,
    execution_timezone="UTC",
    default_status=default_status(),
    description="Pulls the CRM and ESP for the hour in progress (and closes the previous hour).",
)
def source_pull_schedule(context: dg.ScheduleEvaluationContext):
    tick = context.scheduled_execution_time or datetime.now(timezone.utc)
    return pull_requests(tick, PULL_LAG_SECONDS, CLOSE_SECONDS)
