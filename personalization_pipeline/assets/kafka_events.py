"""Events from Kafka: explicit offset ranges -> staged canonical rows, and the sensor that
hands each new range to a run exactly once.

Offsets live in Dagster, not in a consumer group: the sensor's cursor holds the next
offset per partition, and each run's config names the ranges it reads. A range is staged
as its own batch (``kafka-<topic>-p<partition>-<start>-<end>``), so re-running or replaying
it rewrites the same file; a replay over different boundaries is de-duplicated by
delivery id when profiles read the current state.
"""

import json
from datetime import datetime, timedelta, timezone
from typing import Any, Iterable

import dagster as dg

from personalization_pipeline.assets.sources import validate, validation_checks, validation_results, verdict_of
from personalization_pipeline.core.events import UNREADABLE_KEY, envelopes_to_canonical
from personalization_pipeline.jobs import kafka_stream_job
from personalization_pipeline.resources.kafka import KafkaReadError, KafkaRecord, KafkaResource
from personalization_pipeline.resources.lake import LakeResource
from personalization_pipeline.resources.shop import ShopResource
from personalization_pipeline.schedules import default_status

SENSOR_INTERVAL_SECONDS = 15
MAX_RANGE_ATTEMPTS = 3
"""A range whose run failed is requested again until it has had this many runs; then the
run-failure alert and a manual re-execution take over."""
RETRY_LOOKBACK_SECONDS = 86_400


class KafkaRanges(dg.Config):
    ranges: dict[str, list[int]] = {}
    """partition -> [start, end): the offsets to read (end exclusive). Empty: nothing."""


def kafka_batch_name(topic: str, partition: int, start: int, end: int) -> str:
    return f"kafka-{topic}-p{partition}-{start}-{end}"


def records_to_envelopes(records: Iterable[KafkaRecord], topic: str) -> list[Any]:
    """Message values -> envelopes; a value that is not JSON becomes an unreadable marker,
    which ``envelopes_to_canonical`` turns into a reject with the reason."""
    out: list[Any] = []
    for record in records:
        raw = record.value or b""
        try:
            out.append(json.loads(raw))
        except (ValueError, RecursionError):
            out.append(
                {
                    UNREADABLE_KEY: {
                        "file": f"kafka:{topic}/{record.partition}",
                        "line": record.offset,
                        "reason": "Kafka message value is not valid JSON",
                        "text": raw.decode("utf-8", "replace"),
                    }
                }
            )
    return out


def _parse_ranges(ranges: dict[str, list[int]]) -> list[tuple[int, int, int]]:
    out = []
    for key, bounds in sorted(ranges.items(), key=lambda kv: int(kv[0])):
        if len(bounds) != 2 or bounds[0] < 0 or bounds[1] < bounds[0]:
            raise dg.Failure(description=f"partition {key}: range must be [start, end) with 0 <= start <= end, got {bounds}")
        out.append((int(key), int(bounds[0]), int(bounds[1])))
    return out


@dg.asset(
    check_specs=validation_checks("kafka_events"),
    group_name="sources",
    kinds={"kafka", "parquet"},
    retry_policy=dg.RetryPolicy(max_retries=2, delay=2, backoff=dg.Backoff.EXPONENTIAL, jitter=dg.Jitter.FULL),
)
def kafka_events(
    context: dg.AssetExecutionContext,
    config: KafkaRanges,
    kafka: KafkaResource,
    lake: LakeResource,
    shop: ShopResource,
) -> dg.MaterializeResult:
    """Track events and Shopify webhooks published to Kafka (one envelope per message),
    read by explicit offset ranges and staged as canonical event rows. Each partition's
    range is its own batch, so re-running or replaying a range rewrites the same rows.
    Each batch is validated with the event suite (Great Expectations) like landing files:
    refused rows go to the validation quarantine with the failed expectations, messages
    that cannot be parsed to the quarantine with the reason, and both count as quarantined
    in the batch's verdict and checks. Offsets are never
    committed to a consumer group: the `kafka_offsets_sensor` cursor and the run config
    are the record of what was read."""
    ranges = _parse_ranges(config.ranges)
    if ranges and not kafka.configured:
        raise dg.Failure(description="KAFKA_BOOTSTRAP_SERVERS is not set", allow_retries=False)
    target = lake.get_lake()
    catalogue = shop.catalogue() if any(end > start for _, start, end in ranges) else {}
    messages = rows = rejected = 0
    offsets: dict[str, str] = {}
    by_source: dict[str, int] = {}
    outcomes, batches = [], []
    for partition, start, end in ranges:
        try:
            records = kafka.read_range(partition, start, end)
        except KafkaReadError as exc:
            raise dg.Failure(description=str(exc), allow_retries=not exc.permanent) from None
        batch = kafka_batch_name(kafka.topic, partition, start, end)
        envelopes = records_to_envelopes(records, kafka.topic)
        frame, rejects = envelopes_to_canonical(envelopes, catalogue)
        raw = [envelopes[p] for p in frame.attrs.pop("envelope_positions", [])] or None
        staged, outcome = validate(target, "stream", batch, frame, "event", raw=raw)
        outcome = outcome.with_unparseable(len(rejects))
        outcomes.append(outcome)
        batches.append(batch)
        target.write_staged("stream", batch, staged, *verdict_of(outcome))
        rejected += target.write_quarantine("stream", batch, rejects)
        messages += len(records)
        rows += len(staged)
        offsets[f"offsets_p{partition}"] = f"{start}-{end}"
        for source, count in staged["source"].value_counts().items():
            by_source[str(source)] = by_source.get(str(source), 0) + int(count)
    validation, checks = validation_results(outcomes, context, batches=batches)
    context.log.info(
        f"staged {rows} events from {messages} Kafka messages in {len(ranges)} ranges; "
        f"{validation['rows_quarantined']} quarantined ({rejected} unparseable)"
    )
    return dg.MaterializeResult(
        check_results=checks,
        metadata={
            "dagster/row_count": rows,
            "messages": messages,
            **validation,
            "rows_unparseable": rejected,
            "topic": kafka.topic,
            **offsets,
            **{f"rows_{k}": v for k, v in sorted(by_source.items())},
        }
    )


def offset_requests(
    topic: str, watermarks: dict[int, tuple[int, int]], cursor: str | None, max_per_partition: int
) -> tuple[dg.RunRequest | None, str]:
    """One run request for every partition's offsets past the cursor (at most
    ``max_per_partition`` each), and the advanced cursor.

    The cursor is ``{"topic", "next": {partition: next offset}}``; a partition first seen
    starts at its low watermark, so nothing published is skipped. The run key names the
    ranges, so a tick evaluated twice cannot launch the same range twice."""
    state = json.loads(cursor) if cursor else {}
    nxt = {int(p): int(o) for p, o in state.get("next", {}).items()} if state.get("topic") == topic else {}
    ranges: dict[str, list[int]] = {}
    for partition, (low, high) in sorted(watermarks.items()):
        start = max(nxt.get(partition, low), low)
        end = min(high, start + max_per_partition)
        if end > start:
            ranges[str(partition)] = [start, end]
        nxt[partition] = max(end, start)
    new_state = {"topic": topic, "next": {str(p): o for p, o in sorted(nxt.items())}}
    if state.get("topic") == topic and state.get("retried"):
        new_state["retried"] = state["retried"]
    new_cursor = json.dumps(new_state, sort_keys=True)
    if not ranges:
        return None, new_cursor
    return _range_request(topic, ranges, attempt=1), new_cursor


def _range_request(topic: str, ranges: dict[str, list[int]], attempt: int) -> dg.RunRequest:
    key = ",".join(f"p{p}={s}-{e}" for p, (s, e) in sorted(ranges.items(), key=lambda kv: int(kv[0])))
    return dg.RunRequest(
        run_key=f"kafka:{topic}:{key}" + (f":attempt{attempt}" if attempt > 1 else ""),
        run_config={"ops": {"kafka_events": {"config": {"ranges": ranges}}}},
        tags={
            "pp/trigger": "kafka_offsets_sensor",
            "pp/kafka_topic": topic,
            "pp/kafka_ranges": key,
            "pp/kafka_attempt": str(attempt),
            "pp/kafka_messages": str(sum(e - s for s, e in ranges.values())),
        },
    )


def retry_requests(topic: str, failed_runs: Iterable[Any], cursor: str) -> tuple[list[dg.RunRequest], str]:
    """Requests for the ranges of failed sensor-requested runs (each failed run once, up
    to MAX_RANGE_ATTEMPTS runs per range), so a failure never skips a range; the cursor
    remembers which failed runs were handled. Runs the daemon retries itself
    (``dagster/will_retry``) are left to it."""
    state = json.loads(cursor)
    retried: list[str] = list(state.get("retried", []))
    seen = set(retried)
    requests = []
    for run in failed_runs:
        if run.run_id in seen or run.tags.get("dagster/will_retry") == "true":
            continue
        retried.append(run.run_id)
        attempt = int(run.tags.get("pp/kafka_attempt", "1"))
        ranges = (((run.run_config or {}).get("ops") or {}).get("kafka_events") or {}).get("config", {}).get("ranges")
        if ranges and attempt < MAX_RANGE_ATTEMPTS:
            requests.append(_range_request(topic, ranges, attempt + 1))
    state["retried"] = retried[-200:]
    return requests, json.dumps(state, sort_keys=True)


@dg.sensor(
    job=kafka_stream_job,
    minimum_interval_seconds=SENSOR_INTERVAL_SECONDS,
    default_status=dg.DefaultSensorStatus(default_status().value),
    description="Every 15 s: Kafka offsets past the cursor go through staging, profiles and the push in one run.",
)
def kafka_offsets_sensor(context: dg.SensorEvaluationContext, kafka: KafkaResource):
    if not kafka.configured:
        return dg.SkipReason("Kafka is not configured (KAFKA_BOOTSTRAP_SERVERS is empty)")
    try:
        watermarks = kafka.high_watermarks()
    except Exception as exc:  # KafkaReadError, KafkaException: the broker is away; try next tick
        return dg.SkipReason(f"cannot read offsets of {kafka.topic}: {exc}")
    state = json.loads(context.cursor) if context.cursor else {}
    previous = state.get("next", {}) if state.get("topic") == kafka.topic else {}
    for partition, (low, _) in watermarks.items():
        if int(previous.get(str(partition), low)) < low:
            context.log.warning(
                f"{kafka.topic}[{partition}]: offsets {previous[str(partition)]}-{low} were deleted "
                "(retention) before they were read"
            )
    request, cursor = offset_requests(kafka.topic, watermarks, context.cursor, kafka.max_messages_per_run)
    failed = context.instance.get_runs(
        filters=dg.RunsFilter(
            statuses=[dg.DagsterRunStatus.FAILURE],
            tags={"pp/trigger": "kafka_offsets_sensor", "pp/kafka_topic": kafka.topic},
            updated_after=datetime.now(timezone.utc) - timedelta(seconds=RETRY_LOOKBACK_SECONDS),
        ),
        limit=50,
    )
    retries, cursor = retry_requests(kafka.topic, failed, cursor)
    run_requests = retries + ([request] if request is not None else [])
    if not run_requests:
        return dg.SensorResult(skip_reason=f"no new messages on {kafka.topic}", cursor=cursor)
    return dg.SensorResult(run_requests=run_requests, cursor=cursor)
