"""Time windows shared by the pulls (PRODUCT.md section 12).

Hourly partitions keep the count manageable for years (8,760 a year); the current hour is
filled in few-minute slices by the pull schedule, and stays the unit a backfill selects.
"""

from __future__ import annotations

import os
import re
from datetime import timedelta

import dagster as dg

DEFAULT_PARTITION_START = "2026-11-01-00:00"


def partition_start() -> str:
    """PP_PARTITION_START, `YYYY-MM-DD-HH:MM` UTC. Records older than this come in through the
    snapshot step, not through thousands of partitions."""
    return os.environ.get("PP_PARTITION_START", "").strip() or DEFAULT_PARTITION_START


_READY_HOUR = re.compile(r"ready/(\d{4})/(\d{2})/(\d{2})/(\d{2})/")


def landing_partition_key(path: str) -> str:
    """The hourly partition of a landing file: the hour it was published in (its
    `ready/YYYY/MM/DD/HH/` folder, on disk or in S3), which is the hour it was received.
    Files from before the first partition belong to the first one."""
    match = _READY_HOUR.search(path.replace("\\", "/"))
    if not match:
        raise ValueError(f"{path} is not under ready/YYYY/MM/DD/HH/")
    year, month, day, hour = match.groups()
    key = f"{year}-{month}-{day}-{hour}:00"
    first = source_partitions.get_first_partition_key()
    return max(key, first) if first else key


source_partitions = dg.HourlyPartitionsDefinition(
    start_date=partition_start(),
    timezone="UTC",
    # The hour in progress is a partition too: the schedule fills it every few minutes.
    end_offset=1,
)


def _minutes(name: str, default: float) -> timedelta:
    return timedelta(minutes=float(os.environ.get(name, "").strip() or default))


SOURCE_FRESHNESS = dg.FreshnessPolicy.time_window(
    fail_window=_minutes("PP_SOURCE_FRESHNESS_FAIL_MINUTES", 30),
    warn_window=_minutes("PP_SOURCE_FRESHNESS_WARN_MINUTES", 15),
)
"""A pull that has not landed for this long marks the source stale in the UI (an open
circuit breaker or an outage); downstream keeps the last good values meanwhile."""

PROFILE_FRESHNESS = dg.FreshnessPolicy.time_window(
    fail_window=_minutes("PP_PROFILE_FRESHNESS_FAIL_MINUTES", 30),
    warn_window=_minutes("PP_PROFILE_FRESHNESS_WARN_MINUTES", 10),
)
