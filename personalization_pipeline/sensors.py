"""Sensors: new landing files -> the stream job; new source materialisations -> the
profile job; the first snapshot; run-failure and asset-check alerts to a JSON webhook."""

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


CHECK_ALERT_INTERVAL_SECONDS = 30
CHECK_ALERT_LOOKBACK_SECONDS = 3600
"""A check the cursor does not know yet (the sensor's first tick, a new check): evaluations
older than this are not posted, so turning the sensor on does not replay months of history."""
CHECK_ALERT_STALE_PLANNED_SECONDS = 86_400
"""A planned evaluation of a run that is still not finished after this (its process died
without the run being marked) stops holding the cursor back."""
CHECK_ALERT_PAGE = 100
_ALERT_COUNT_KEYS = ("rows_in", "rows_staged", "rows_quarantined", "rows_duplicate", "quarantine_rate",
                     "expected_rows", "history_median", "ratio", "history_batches")


def _plain(value):
    return getattr(value, "value", value)


def _check_name(key: dg.AssetCheckKey) -> str:
    return f"{key.asset_key.to_user_string()}:{key.name}"


def check_alert_payload(execution, run=None) -> dict | None:
    """The alert for one asset check execution record (evaluated), or None when the check
    passed. Names the asset, the check, the partition or batches and the counts; no sample
    rows (the check's page in the UI has them, masked)."""
    evaluation = execution.event.dagster_event.event_specific_data
    if evaluation.passed:
        return None
    metadata = {k: _plain(v) for k, v in evaluation.metadata.items()}
    tags = dict(run.tags) if run is not None else {}
    partition = evaluation.partition or execution.partition or tags.get("dagster/partition")
    if partition is None and tags.get("dagster/asset_partition_range_start"):
        partition = f"{tags['dagster/asset_partition_range_start']}...{tags.get('dagster/asset_partition_range_end')}"
    batches = metadata.get("failed_batches") or ([tags["pp/kafka_ranges"]] if "pp/kafka_ranges" in tags else [])
    return {
        "kind": "asset_check",
        "alert_id": f"check:{_check_name(execution.key)}:{execution.id}",
        "asset": evaluation.asset_key.to_user_string(),
        "check": evaluation.check_name,
        "severity": evaluation.severity.value,
        "blocking": bool(evaluation.blocking),
        "partition": partition,
        "batches": batches,
        "counts": {k: metadata[k] for k in _ALERT_COUNT_KEYS if k in metadata},
        "failed_expectations": metadata.get("failed_expectations") or {},
        "description": (evaluation.description or "")[:1000],
        "run_id": execution.run_id,
        "job": run.job_name if run is not None else None,
        "tags": {k: v for k, v in tags.items() if k.startswith("pp/") or k == "dagster/partition"},
    }


def _executions_after(storage, key: dg.AssetCheckKey, after: int | None, now: float) -> tuple[list, int]:
    """The check's executions after the watermark ``after``, oldest first, and the
    watermark to use (for a check first seen: just before its last hour of executions)."""
    page = list(storage.get_asset_check_execution_history(key, limit=CHECK_ALERT_PAGE))
    if after is None:
        old = [r.id for r in page if r.create_timestamp < now - CHECK_ALERT_LOOKBACK_SECONDS]
        after = max(old) if old else (min(r.id for r in page) - 1 if len(page) == CHECK_ALERT_PAGE else 0)
        return sorted((r for r in page if r.id > after), key=lambda r: r.id), after
    found = [r for r in page if r.id > after]
    while len(page) == CHECK_ALERT_PAGE and page[-1].id > after:
        page = list(storage.get_asset_check_execution_history(key, limit=CHECK_ALERT_PAGE, cursor=page[-1].id))
        found.extend(r for r in page if r.id > after)
    return sorted(found, key=lambda r: r.id), after


@dg.sensor(
    minimum_interval_seconds=CHECK_ALERT_INTERVAL_SECONDS,
    default_status=_sensor_status(),
    description="Posts every failed or warning asset check evaluation (quarantine_rate, rows_accounted, "
    "row_count_drift, any other check of this code location) once to the JSON webhook in "
    "PP_ALERT_WEBHOOK_URL (and logs it). A WARN check never fails its run, so the run-failure alert "
    "never sees it; a failed blocking check fails its run, which the run-failure alert reports too.",
)
def asset_check_alert_sensor(context: dg.SensorEvaluationContext):
    """The cursor holds, per check, a watermark over its execution records (ids in the
    instance's check-execution table, global on SQLite and PostgreSQL alike) and the ids
    above it already handled, so each evaluation is posted once even when evaluations
    finish out of order."""
    if context.repository_def is None:
        return dg.SkipReason("no code location to read the checks from")
    url = os.environ.get("PP_ALERT_WEBHOOK_URL", "").strip()
    state: dict = json.loads(context.cursor) if context.cursor else {}
    storage = context.instance.event_log_storage
    now = time.time()
    runs: dict[str, object] = {}
    posted = 0
    failure = None
    keys = sorted(context.repository_def.asset_graph.asset_check_keys, key=_check_name)
    for key in keys:
        name = _check_name(key)
        entry = state.get(name, {})
        executions, after = _executions_after(storage, key, entry.get("after"), now)
        seen = set(entry.get("seen", []))
        for execution in executions:
            if execution.id in seen:
                continue
            if execution.run_id not in runs:
                runs[execution.run_id] = context.instance.get_run_by_id(execution.run_id)
            if execution.status.value == "PLANNED" or execution.event is None:
                # A planned row of a finished run never resolves (for a partitioned asset
                # Dagster 1.13 records the evaluation as a row of its own): nothing to post.
                run = runs[execution.run_id]
                if run is None or run.is_finished or now - execution.create_timestamp > CHECK_ALERT_STALE_PLANNED_SECONDS:
                    seen.add(execution.id)
                continue
            payload = check_alert_payload(execution, runs[execution.run_id])
            if payload is not None:
                context.log.warning(
                    f"check {payload['severity']}: {payload['asset']}:{payload['check']} "
                    f"partition={payload['partition']} run={payload['run_id']}"
                )
                if url:
                    try:
                        requests.post(url, json=payload, timeout=10).raise_for_status()
                    except requests.RequestException as exc:
                        # Not marked as handled: the next tick posts it again. The URL may
                        # carry a token, so only the kind of error is reported.
                        status = getattr(getattr(exc, "response", None), "status_code", None)
                        failure = f"alert webhook failed ({type(exc).__name__}{f' {status}' if status else ''})"
                        break
                posted += 1
            seen.add(execution.id)
        for execution in executions:  # the watermark moves over the handled prefix
            if execution.id not in seen:
                break
            after = execution.id
        state[name] = {"after": after, "seen": sorted(i for i in seen if i > after)}
        if failure:
            break
    cursor = json.dumps(state, sort_keys=True)
    if failure:
        context.log.error(failure)
        return dg.SensorResult(skip_reason=failure, cursor=cursor)
    return dg.SensorResult(skip_reason=f"{posted} check alerts posted", cursor=cursor)


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
