"""Re-validate quarantined rows with the suites in force now and stage the rows that pass
(PRODUCT.md section 7: "quarantined rows can be re-validated and replayed after a fix").

``quarantine_replay_job`` reads ``lake/quarantine/validation/<source>/<batch>.parquet`` for
the sources and batches its run config names, validates each file's canonical rows again
(``validate_batch`` with ``config/validation.yaml`` or ``$PP_VALIDATION_CONFIG`` as it is
now) and then, per quarantined batch:

1. stages the rows that now pass as a batch of their own,
   ``replay-<batch>-<digest of the replayed record keys>``, with the verdict ``passed``:
   the profile step applies it like any batch that arrived late;
2. rewrites the quarantine file with only the rows that still fail (with their current
   reasons), or removes it;
3. when the original batch was held back (verdict ``failed``, its rows in ``held/``) and
   what is left in its quarantine now passes the threshold, stages its held rows as a
   passing re-run of the batch would (``rows_released``);
4. records a materialisation of the source asset that owns the batch (metadata
   ``replay_of``), so ``profile_refresh_sensor`` rebuilds profiles and pushes for the pull
   sources; stream and Kafka replays are applied by the next stream or Kafka run.

Exactly once: the replay batch's name depends only on the replayed rows, so a run that
dies between 1 and 2 stages the same batch again with the same content; after 2 those
rows are gone from the quarantine, so a second replay stages nothing. Per batch and in
total, ``rows_in = rows_replayed + rows_still_quarantined + rows_duplicate`` holds (it is
asserted) and is the run's metadata.

Quarantine rows written before the ``row`` column existed have no canonical row to
re-validate; they stay quarantined and are counted as ``rows_not_replayable`` (and in
``rows_still_quarantined``).
"""


import hashlib
import json
from pathlib import Path
from typing import Any

import dagster as dg
import pandas as pd
import pyarrow.parquet as pq

from personalization_pipeline.assets.checks import REPLAY_MARK
from personalization_pipeline.assets.sources import drop_echo
from personalization_pipeline.core import canonical
from personalization_pipeline.partitions import source_partitions
from personalization_pipeline.resources.lake import Lake, LakeResource
from personalization_pipeline.validation import default_config, validate_batch

SOURCES = ("crm", "esp", "engagement", "stream")
"""Lake sources with a validation quarantine: crm (crm_contacts, snapshot), esp
(esp_members, snapshot), engagement (esp_engagement), stream (stream_events, kafka_events)."""

COUNTS = ("rows_in", "rows_replayed", "rows_still_quarantined", "rows_duplicate", "rows_not_replayable")


class QuarantineReplay(dg.Config):
    sources: list[str] = []
    """Lake sources to replay: crm, esp, engagement, stream. Empty: all of them."""
    batches: list[str] = []
    """Exact batch names (an hourly partition key such as 2026-11-28-10:00, a landing file's
    stem, a Kafka range kafka-<topic>-p<n>-<start>-<end>, snapshot). Empty: every batch
    in the range below."""
    batch_from: str = ""
    """First batch to replay, inclusive, compared as text (hourly partition keys sort in time)."""
    batch_to: str = ""
    """Last batch to replay, inclusive."""


def owning_asset(source: str, batch: str) -> str:
    """The source asset whose step staged ``batch`` of ``source``."""
    if batch == "snapshot":
        return "source_snapshot"
    if source == "stream":
        return "kafka_events" if batch.startswith("kafka-") else "stream_events"
    return {"crm": "crm_contacts", "esp": "esp_members", "engagement": "esp_engagement"}[source]


def replay_batch_name(batch: str, staged: pd.DataFrame) -> str:
    keys = sorted(
        f"{s}\x1f{r}\x1f{pd.Timestamp(o).isoformat()}"
        for s, r, o in zip(staged["source"], staged["source_record_id"], staged["observed_at"])
    )
    digest = hashlib.sha256("\n".join(keys).encode()).hexdigest()[:12]
    return f"replay-{batch}-{digest}"


def _selected(config: QuarantineReplay, batch: str) -> bool:
    if config.batches and batch not in config.batches:
        return False
    if config.batch_from and batch < config.batch_from:
        return False
    if config.batch_to and batch > config.batch_to:
        return False
    return True


def quarantine_files(lake: Lake, sources: list[str]) -> list[tuple[str, Path]]:
    base = lake.root / "quarantine" / "validation"
    return [(source, path) for source in sources for path in sorted((base / source).glob("*.parquet"))]


def replay_batch(lake: Lake, source: str, batch: str, quarantine: pd.DataFrame) -> dict[str, Any]:
    """Replay one quarantine file's rows; returns its counts and what it staged."""
    rows_in = len(quarantine)
    has_row = quarantine["row"].notna() if "row" in quarantine else pd.Series(False, index=quarantine.index)
    replayable = quarantine[has_row.to_numpy()].reset_index(drop=True)
    kept_back = quarantine[~has_row.to_numpy()]
    result: dict[str, Any] = {"source": source, "batch": batch, "replay_batch": None, "rows_released": 0}
    counts = dict.fromkeys(COUNTS, 0)
    counts["rows_in"] = rows_in
    counts["rows_not_replayable"] = len(kept_back)
    if replayable.empty:
        counts["rows_still_quarantined"] = len(kept_back)
        return {**result, **counts}

    kind = str(replayable["kind"].iloc[0])
    frame = pd.DataFrame([json.loads(text) for text in replayable["row"]])
    outcome = validate_batch(frame, kind, partition=batch)
    staged = outcome.staged
    unchanged = 0
    if source == "esp" and not staged.empty:
        # As the members pull does: a version with no new fact must not look newer.
        before = len(staged)
        staged = drop_echo(lake, source, canonical.to_frame(staged), drop_unchanged=True)
        unchanged = before - len(staged)
    if not staged.empty:
        name = replay_batch_name(batch, staged)
        reason = f"replay of {source}/{batch}: {len(staged)} quarantined rows pass the current suites"
        lake.write_staged(source, name, staged, "passed", reason)
        result["replay_batch"] = name

    # The rows that still fail stay, with the reasons of the suites in force now.
    still = replayable.iloc[outcome.quarantine["row_position"].to_numpy()].copy()
    still["failed_expectations"] = list(outcome.quarantine["failed_expectations"])
    remaining = pd.concat([kept_back, still], ignore_index=True)
    lake.write_validation_quarantine(source, batch, remaining)

    counts["rows_replayed"] = len(staged)
    counts["rows_duplicate"] = outcome.rows_duplicate + unchanged
    counts["rows_still_quarantined"] = len(remaining)
    assert counts["rows_in"] == counts["rows_replayed"] + counts["rows_still_quarantined"] + counts["rows_duplicate"], (
        f"replay of {source}/{batch} does not account for every row: {counts}"
    )
    result["rows_released"] = _release_held_batch(lake, source, batch, counts, result["replay_batch"])
    return {**result, **counts}


def _release_held_batch(
    lake: Lake, source: str, batch: str, counts: dict[str, int], replay: str | None
) -> int:
    """A batch held back by its quarantine check (its rows in ``held/``) is released when,
    after the replay, what is left in its quarantine passes the threshold: its held rows
    are staged as a passing re-run of the batch would stage them. Returns how many."""
    if replay is None:
        return 0
    held_batches = lake.batches("failed")
    if not ((held_batches["source"] == source) & (held_batches["batch"] == batch)).any():
        return 0
    held = lake.read_held(source, batch)
    validated = len(held) + counts["rows_in"] - counts["rows_duplicate"]
    if not default_config().thresholds.passed(validated, counts["rows_still_quarantined"]):
        return 0
    reason = f"released by replay {replay}: {counts['rows_still_quarantined']} rows still quarantined"
    lake.write_staged(source, batch, held, "passed", reason)
    return len(held)


def _partition_of(asset: str, batch: str) -> str | None:
    if asset not in ("crm_contacts", "esp_members", "esp_engagement"):
        return None
    try:
        source_partitions.time_window_for_partition_key(batch)
    except Exception:  # a backfill chunk ("a..b") or any other name: no single partition
        return None
    return batch


@dg.op(
    description="Re-validates quarantined rows with the current suites and stages the ones that now pass "
    "as replay batches (verdict passed), exactly once.",
    tags={"kind": "great_expectations"},
)
def replay_quarantine(context: dg.OpExecutionContext, config: QuarantineReplay, lake: LakeResource):
    unknown = sorted(set(config.sources) - set(SOURCES))
    if unknown:
        raise dg.Failure(description=f"unknown sources {unknown}; expected some of {list(SOURCES)}")
    target = lake.get_lake()
    totals = dict.fromkeys(COUNTS, 0)
    replayed: list[dict[str, Any]] = []
    for source, path in quarantine_files(target, list(config.sources) or list(SOURCES)):
        quarantine = pq.read_table(path).to_pandas()
        if quarantine.empty:
            continue
        batch = str(quarantine["partition"].dropna().iloc[0]) if quarantine["partition"].notna().any() else path.stem
        if not _selected(config, batch):
            continue
        outcome = replay_batch(target, source, batch, quarantine)
        for key in COUNTS:
            totals[key] += outcome[key]
        replayed.append(outcome)
        context.log.info(
            f"{source}/{batch}: {outcome['rows_replayed']} replayed, {outcome['rows_still_quarantined']} still "
            f"quarantined, {outcome['rows_duplicate']} duplicate"
        )
        if outcome["replay_batch"] is not None:
            asset = owning_asset(source, batch)
            yield dg.AssetMaterialization(
                asset_key=asset,
                partition=_partition_of(asset, batch),
                description=f"Quarantined rows of {source}/{batch} replayed after re-validation.",
                metadata={
                    REPLAY_MARK: batch,
                    "replay_batch": outcome["replay_batch"],
                    "source": source,
                    "rows_released": outcome["rows_released"],
                    **{k: outcome[k] for k in COUNTS},
                },
            )
    assert totals["rows_in"] == totals["rows_replayed"] + totals["rows_still_quarantined"] + totals["rows_duplicate"]
    yield dg.Output(
        None,
        metadata={
            **totals,
            "batches_examined": len(replayed),
            "replay_batches": dg.MetadataValue.json([o["replay_batch"] for o in replayed if o["replay_batch"]]),
            "rows_released": sum(o["rows_released"] for o in replayed),
            "batches_released": dg.MetadataValue.json(
                [f"{o['source']}/{o['batch']}" for o in replayed if o["rows_released"]]
            ),
        },
    )

