"""The asset checks every validated source asset carries, built from the validation
outcomes of one run (PRODUCT.md section 7):

- ``quarantine_rate`` (blocking): the batch's quarantine rate against the thresholds;
- ``rows_accounted`` (blocking): rows_in = rows_staged + rows_quarantined + rows_duplicate;
- ``row_count_drift`` (WARN, not blocking): rows_in against the median of the asset's
  recent batches (``validation/drift.py``; settings in ``config/validation.yaml``).

Check metadata names the failed expectations with counts and shows a few refused rows,
with emails masked and names as initials: Dagster's event log cannot be erased, so no PII
goes there in the clear (PRODUCT.md section 11).

Where the batch-size history lives: in the asset's own materialisation metadata
(``rows_in``), read back through ``context.instance``. It is durable wherever the event log
is (PostgreSQL in production), costs no new table, storage or clean-up, survives a lake
rebuild, and is what the UI already plots. Two bounded queries per check: the latest
materialisation id per partition (pulls) or the last few materialisations (stream and
Kafka batches), then those records by id.
"""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any, Sequence

import dagster as dg

from personalization_pipeline.validation import default_config, judge_row_count
from personalization_pipeline.validation.validate import SAMPLE_ROWS

COUNT_KEYS = ("rows_in", "rows_staged", "rows_quarantined", "rows_duplicate")
CHECK_NAMES = ("quarantine_rate", "rows_accounted", "row_count_drift")
REPLAY_MARK = "replay_of"
"""Metadata key on materialisations the quarantine replay emits; they are no batch of the
source and stay out of the drift history."""


def validation_check_specs(asset: str) -> list[dg.AssetCheckSpec]:
    return [
        dg.AssetCheckSpec(
            "quarantine_rate",
            asset=asset,
            blocking=True,
            description="Fails when the batch's quarantine rate passes the threshold in config/validation.yaml "
            "(5% of batches of at least 200 rows, a count below that). Metadata: the failed expectations "
            "with counts and a few refused rows (emails masked, names as initials).",
        ),
        dg.AssetCheckSpec(
            "rows_accounted",
            asset=asset,
            blocking=True,
            description="rows_in = rows_staged + rows_quarantined + rows_duplicate.",
        ),
        dg.AssetCheckSpec(
            "row_count_drift",
            asset=asset,
            blocking=False,
            description="Warns (never blocks) when the batch's rows_in strays more than `factor` times from the "
            "median of the asset's recent batches (row_count_drift in config/validation.yaml); no verdict "
            "before `min_history` earlier batches.",
        ),
    ]


def _counts(outcomes: Sequence[Any]) -> dict[str, int]:
    return {k: int(sum(getattr(o, k) for o in outcomes)) for k in COUNT_KEYS}


def _failures(outcomes: Sequence[Any]) -> dict[str, int]:
    failures: dict[str, int] = {}
    for outcome in outcomes:
        for name, count in outcome.failure_counts.items():
            failures[name] = failures.get(name, 0) + int(count)
    return dict(sorted(failures.items(), key=lambda kv: (-kv[1], kv[0])))


def _samples(outcomes: Sequence[Any], batches: Sequence[str | None] | None) -> list[dict[str, Any]]:
    """A few refused rows over the run's batches, as ``validate_batch`` masked them."""
    out: list[dict[str, Any]] = []
    for i, outcome in enumerate(outcomes):
        for sample in outcome.samples:
            if len(out) >= SAMPLE_ROWS:
                return out
            row = {k: v for k, v in sample.items() if k != "row_position"}
            if batches is not None and batches[i] is not None:
                row = {"batch": batches[i], **row}
            out.append(row)
    return out


def validation_metadata(outcomes: Sequence[Any]) -> dict[str, Any]:
    """Materialisation metadata over the batches of one run: counts, rate, failed expectations."""
    counts = _counts(outcomes)
    rate = counts["rows_quarantined"] / max(1, counts["rows_in"] - counts["rows_duplicate"])
    return {**counts, "quarantine_rate": round(rate, 6), "failed_expectations": _failures(outcomes)}


def _metadata_value(record: Any, key: str) -> Any:
    entry = record.asset_materialization.metadata.get(key) if record.asset_materialization else None
    return getattr(entry, "value", None)


def _batch_sizes(records: Sequence[Any]) -> list[int]:
    """rows_in of each record, oldest first; replay materialisations and records without a
    count (from before validation existed) are skipped."""
    sizes = []
    for record in sorted(records, key=lambda r: r.storage_id):
        if _metadata_value(record, REPLAY_MARK) is not None:
            continue
        value = _metadata_value(record, "rows_in")
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            sizes.append(int(value))
    return sizes


def batch_history(
    context: dg.AssetExecutionContext, window: int, by_partition: bool
) -> tuple[list[int], float, bool]:
    """(earlier batch sizes oldest first, span of this run in batches, window still open).

    ``by_partition``: a batch is an hourly partition (the pulls, which re-pull the hour in
    progress every few minutes): the history is the latest materialisation of each of the
    ``window`` partitions before this run's first, and a run over a backfill chunk spans
    as many batches as it has partitions. Otherwise every materialisation is a batch (a
    stream run, a Kafka range)."""
    instance = context.instance
    key = context.asset_key
    if by_partition and (context.has_partition_key or context.has_partition_key_range):
        current = list(context.partition_keys)
        latest = instance.event_log_storage.get_latest_storage_id_by_partition(
            key, dg.DagsterEventType.ASSET_MATERIALIZATION
        )
        earlier = sorted(p for p in latest if p < current[0])[-window:]
        ids = [latest[p] for p in earlier]
        records = (
            instance.fetch_materializations(dg.AssetRecordsFilter(asset_key=key, storage_ids=ids), limit=len(ids)).records
            if ids
            else []
        )
        window_open = context.partition_time_window.end > datetime.now(timezone.utc)
        return _batch_sizes(records), float(len(current)), window_open
    # A few spare records: replay materialisations are skipped.
    records = instance.fetch_materializations(key, limit=window + 8).records
    return _batch_sizes(records)[-window:], 1.0, False


def drift_check_result(
    context: dg.AssetExecutionContext, rows_in: int, by_partition: bool = False
) -> dg.AssetCheckResult:
    settings = default_config().drift_for(context.asset_key.to_user_string())
    history, span, window_open = batch_history(context, settings.window, by_partition)
    verdict = judge_row_count(rows_in, history, settings, span=span, window_open=window_open)
    return dg.AssetCheckResult(
        asset_key=context.asset_key,
        check_name="row_count_drift",
        passed=not verdict.drifted,
        severity=dg.AssetCheckSeverity.WARN,
        description=verdict.reason,
        metadata={
            **verdict.metadata(),
            "window": settings.window,
            "factor": settings.factor,
            "min_history": settings.min_history,
            "min_rows": settings.min_rows,
            "span_batches": span,
            "window_open": window_open,
        },
    )


def validation_check_results(
    outcomes: Sequence[Any],
    context: dg.AssetExecutionContext | None = None,
    *,
    by_partition: bool = False,
    batches: Sequence[str | None] | None = None,
) -> tuple[dict[str, Any], list[dg.AssetCheckResult]]:
    """Materialisation metadata and check results over the batches of one run (a stream run
    has several; none at all is a run with nothing to stage). With ``context`` the
    ``row_count_drift`` check is judged too. ``batches`` names each outcome's batch in the
    sample rows."""
    metadata = validation_metadata(outcomes)
    counts = {k: metadata[k] for k in COUNT_KEYS}
    failures = metadata["failed_expectations"]
    passed = all(o.passed_threshold for o in outcomes)
    failed_batches = [b for b, o in zip(batches or [None] * len(outcomes), outcomes) if not o.passed_threshold]
    quarantine_meta: dict[str, Any] = {
        **counts,
        "quarantine_rate": metadata["quarantine_rate"],
        "failed_expectations": failures,
        "sample_rows": dg.MetadataValue.json(_samples(outcomes, batches)),
        "batches": len(outcomes),
    }
    if any(b is not None for b in failed_batches):
        quarantine_meta["failed_batches"] = dg.MetadataValue.json([b for b in failed_batches if b is not None][:20])
    description = (
        None
        if passed
        else f"{counts['rows_quarantined']} of {counts['rows_in']} rows quarantined; "
        + ", ".join(f"{name}: {count}" for name, count in list(failures.items())[:5])
    )
    checks = [
        dg.AssetCheckResult(check_name="quarantine_rate", passed=passed, metadata=quarantine_meta, description=description),
        dg.AssetCheckResult(
            check_name="rows_accounted",
            passed=counts["rows_in"] == counts["rows_staged"] + counts["rows_quarantined"] + counts["rows_duplicate"]
            and all(o.identity_holds for o in outcomes),
            metadata=counts,
        ),
    ]
    if context is not None:
        checks.append(drift_check_result(context, counts["rows_in"], by_partition=by_partition))
    return metadata, checks
