"""Sensors: new landing files -> the stream job; new source materialisations -> the
profile job; the first snapshot; run-failure alerts to a JSON webhook."""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path

import dagster as dg
import requests

from personalization_pipeline.partitions import landing_partition_key
from personalization_pipeline.jobs import profile_job, snapshot_job, stream_job
from personalization_pipeline.resources.lake import LakeResource
from personalization_pipeline.resources.landing_zone import LandingZoneResource, batch_id
from personalization_pipeline.schedules import default_status

MAX_FILES_PER_RUN = 200
PENDING_RETRY_SECONDS = 600
SOURCE_KEYS = ("crm_contacts", "crm_deletions", "esp_members", "esp_engagement", "source_snapshot")


def _sensor_status() -> dg.DefaultSensorStatus:
    return dg.DefaultSensorStatus(default_status().value)


def published_landing_files(landing_root: Path) -> list[str]:
    """Published files (absolute paths) in publication-name order."""
    ready = landing_root / "ready"
    if not ready.exists():
        return []
    return sorted(str(p) for p in ready.rglob("*.jsonl"))


def landing_requests(
    files: list[str], is_staged, cursor: str | None, now: float
) -> tuple[list[dg.RunRequest], str]:
    """Run requests for published files that are neither staged nor handed to a run in the
    last PENDING_RETRY_SECONDS; returns the new cursor.

    The cursor is the set of files handed to runs and not yet staged, with when they were
    handed over. Unlike a high-water mark over file names, it cannot skip a file that a
    second ingest process publishes late; a run that failed gets its files again after
    PENDING_RETRY_SECONDS.
    """
    pending: dict[str, float] = json.loads(cursor) if cursor else {}
    unstaged = [f for f in files if not is_staged(f)]
    pending = {f: t for f, t in pending.items() if f in set(unstaged) and now - t < PENDING_RETRY_SECONDS}
    todo = [f for f in unstaged if f not in pending]
    by_hour: dict[str, list[str]] = {}
    for name in todo:
        by_hour.setdefault(landing_partition_key(name), []).append(name)
    run_requests = []
    for hour, names in sorted(by_hour.items()):
        for start in range(0, len(names), MAX_FILES_PER_RUN):
            chunk = names[start : start + MAX_FILES_PER_RUN]
            digest = hashlib.sha256("\n".join(chunk).encode()).hexdigest()[:16]
            run_requests.append(
                dg.RunRequest(
                    run_key=f"landing:{Path(chunk[-1]).name}:{len(chunk)}:{digest}:{int(now)}",
                    partition_key=hour,
                    run_config={"ops": {"stream_events": {"config": {"files": chunk}}}},
                    tags={"pp/trigger": "landing_zone_sensor", "pp/landing_files": str(len(chunk))},
                )
            )
            pending.update({f: now for f in chunk})
    return run_requests, json.dumps(pending, sort_keys=True)


@dg.sensor(
    job=stream_job,
    minimum_interval_seconds=15,
    default_status=_sensor_status(),
    description="Every 15 s: newly published landing files (local disk or S3) go through staging, profiles and the push in one run.",
)
def landing_zone_sensor(
    context: dg.SensorEvaluationContext, lake: LakeResource, landing_zone: LandingZoneResource
):
    target = lake.get_lake()
    run_requests, cursor = landing_requests(
        landing_zone.list_published(),
        lambda f: target.staged_path("stream", batch_id(f)).exists(),
        context.cursor,
        time.time(),
    )
    if not run_requests:
        return dg.SensorResult(skip_reason="no new landing files", cursor=cursor)
    return dg.SensorResult(run_requests=run_requests, cursor=cursor)


def latest_storage_ids(instance: dg.DagsterInstance) -> dict[str, int]:
    latest = {}
    for key in SOURCE_KEYS:
        result = instance.fetch_materializations(dg.AssetKey(key), limit=1)
        if result.records:
            latest[key] = result.records[0].storage_id
    return latest


@dg.sensor(
    job=profile_job,
    minimum_interval_seconds=30,
    default_status=_sensor_status(),
    description="When the CRM or ESP pulls stage new data, resolve profiles and push.",
)
def profile_refresh_sensor(context: dg.SensorEvaluationContext):
    seen = json.loads(context.cursor) if context.cursor else {}
    latest = latest_storage_ids(context.instance)
    newer = {k: v for k, v in latest.items() if v > seen.get(k, -1)}
    if not newer:
        return dg.SkipReason("no new source materialisations")
    run_key = "profiles:" + ",".join(f"{k}={v}" for k, v in sorted(latest.items()))
    return dg.SensorResult(
        run_requests=[dg.RunRequest(run_key=run_key, tags={"pp/trigger": "profile_refresh_sensor"})],
        cursor=json.dumps(latest, sort_keys=True),
    )


@dg.sensor(
    job=snapshot_job,
    minimum_interval_seconds=30,
    default_status=_sensor_status(),
    description="Requests the first-load snapshot once, when it has never been materialised.",
)
def initial_snapshot_sensor(context: dg.SensorEvaluationContext):
    if context.instance.fetch_materializations(dg.AssetKey("source_snapshot"), limit=1).records:
        return dg.SkipReason("snapshot already loaded")
    return dg.RunRequest(run_key="initial-snapshot", tags={"pp/trigger": "initial_snapshot_sensor"})


@dg.run_failure_sensor(
    default_status=_sensor_status(),
    description="Posts failed runs to the JSON webhook in PP_ALERT_WEBHOOK_URL (and logs them).",
)
def run_failure_alert_sensor(context: dg.RunFailureSensorContext):
    url = os.environ.get("PP_ALERT_WEBHOOK_URL", "").strip()
    payload = {
        "kind": "run_failure",
        "job": context.dagster_run.job_name,
        "run_id": context.dagster_run.run_id,
        "message": (context.failure_event.message or "")[:1000],
        "tags": {k: v for k, v in context.dagster_run.tags.items() if k.startswith("pp/") or k == "dagster/partition"},
    }
    context.log.warning(f"run failed: {payload['job']} {payload['run_id']}")
    if url:
        requests.post(url, json=payload, timeout=10).raise_for_status()
