"""Source assets: CRM contacts, ESP members and ESP engagement pulled by time window over
OAuth, the first-load snapshot, and the stream events landed by the ingest service."""


from datetime import datetime, timezone

import dagster as dg
import pandas as pd
import pyarrow as pa

from personalization_pipeline import settings
from personalization_pipeline.core.events import envelopes_to_canonical
from personalization_pipeline.core.identity import current_state
from personalization_pipeline.core.push import load_field_mapping
from personalization_pipeline.core.sources import (
    crm_contacts_to_canonical,
    crm_deletions_to_canonical,
    crm_merged_away_to_canonical,
    crm_vanished_to_canonical,
    merged_object_ids,
    reconcile_slice,
    drop_unchanged_versions,
    esp_engagement_to_canonical,
    esp_members_to_canonical,
)
from personalization_pipeline.partitions import SOURCE_FRESHNESS, landing_partition_key, source_partitions
from personalization_pipeline.resources.hubspot import HubSpotResource
from personalization_pipeline.resources.http import CircuitOpenError, VendorError
from personalization_pipeline.resources.lake import Lake, LakeResource
from personalization_pipeline.resources.landing_zone import LandingZoneResource, batch_id
from personalization_pipeline.resources.mailchimp import MailchimpResource
from personalization_pipeline.resources.runtime import RuntimeResource
from personalization_pipeline.resources.shop import ShopResource
from personalization_pipeline.assets.checks import validation_check_results, validation_check_specs
from personalization_pipeline.validation import validate_batch

EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)
BACKFILL_CHUNK = dg.BackfillPolicy.multi_run(max_partitions_per_run=24)
"""A backfill pulls a day per run: few runs, each a bounded pull, and live ticks keep going
between them (the run queue lets two backfill runs go at a time)."""
PULL_RETRY = dg.RetryPolicy(
    max_retries=2, delay=5, backoff=dg.Backoff.EXPONENTIAL, jitter=dg.Jitter.FULL
)
PULL_ASSET = dict(
    partitions_def=source_partitions,
    group_name="sources",
    freshness_policy=SOURCE_FRESHNESS,
    backfill_policy=BACKFILL_CHUNK,
    retry_policy=PULL_RETRY,
)
"""What every windowed pull shares: hourly partitions, freshness, backfill chunks, retries."""


def _echo_tags() -> tuple[str, ...]:
    return load_field_mapping(settings.CONFIG_DIR / "esp_field_mapping.yaml").tags


def _window(context: dg.AssetExecutionContext, runtime: RuntimeResource) -> tuple[datetime, datetime, datetime]:
    now = runtime.clock().now()
    window = context.partition_time_window
    end = min(window.end, now - pd.Timedelta(seconds=runtime.lag_seconds).to_pytimedelta())
    return window.start, end, now


def drop_echo(lake: Lake, source: str, frame: pd.DataFrame, drop_unchanged: bool) -> pd.DataFrame:
    """ESP members only: our own push bumps a member's last_changed without any new fact
    (the echo); such a version must not look newer than it is. CRM versions are staged as
    pulled, so a partition holds exactly the contacts modified in its hour."""
    return drop_unchanged_versions(frame, lake.read_staged(source)) if drop_unchanged else frame


def validate(lake: Lake, source: str, batch: str, frame: pd.DataFrame, kind: str, raw=None):
    """Great Expectations inside the staging step: returns the rows that passed and the
    outcome; refused rows go to the quarantine with the failed expectations (PRODUCT.md
    section 7). Staged history never sees a refused row."""
    outcome = validate_batch(frame, kind, raw=raw, partition=batch)
    lake.write_validation_quarantine(source, batch, outcome.quarantine)
    return outcome.staged, outcome


def validation_results(
    outcomes: list, context: dg.AssetExecutionContext | None = None, *, by_partition: bool = False, batches=None
) -> tuple[dict, list[dg.AssetCheckResult]]:
    """Metadata and check results over the batches of one run (a stream run has several);
    with ``context``, ``row_count_drift`` too (assets/checks.py)."""
    return validation_check_results(outcomes, context, by_partition=by_partition, batches=batches)


def validation_checks(asset: str) -> list[dg.AssetCheckSpec]:
    """quarantine_rate and rows_accounted (blocking), row_count_drift (WARN): assets/checks.py."""
    return validation_check_specs(asset)


def verdict_of(outcome) -> tuple[str, str | None]:
    """The manifest verdict of a validated batch: a batch whose quarantine check failed is
    held back from profiles and the push (PRODUCT.md section 7)."""
    if outcome is None or outcome.passed_threshold:
        return "passed", None
    return "failed", f"quarantine check failed: {outcome.rows_quarantined} of {outcome.rows_in} rows quarantined"


def _stage(
    lake: Lake, source: str, batch: str, frame: pd.DataFrame, drop_unchanged: bool = False, outcome=None
) -> dict[str, int]:
    before = len(frame)
    frame = drop_echo(lake, source, frame, drop_unchanged)
    counts = lake.write_staged(source, batch, frame, *verdict_of(outcome))
    return {"rows_unchanged": before - len(frame), **counts}


def _stage_partitions(
    lake: Lake,
    source: str,
    context: dg.AssetExecutionContext,
    frame: pd.DataFrame,
    drop_unchanged: bool = False,
    outcome=None,
) -> dict[str, int]:
    """Stage a pull over one or more hourly partitions (a backfill chunk is several): each
    partition's file gets exactly the versions observed in its hour."""
    before = len(frame)
    frame = drop_echo(lake, source, frame, drop_unchanged)
    totals = {"rows_unchanged": before - len(frame), "rows_new": 0, "rows_total": 0, "rows_held": 0, "partitions": 0}
    placed = 0
    for key in context.partition_keys:
        window = source_partitions.time_window_for_partition_key(key)
        part = frame[(frame["observed_at"] >= window.start) & (frame["observed_at"] < window.end)]
        counts = lake.write_staged(source, key, part, *verdict_of(outcome))
        placed += len(part)
        totals["rows_new"] += counts["rows_new"]
        totals["rows_total"] += counts["rows_total"]
        totals["rows_held"] += counts["rows_held"]
        totals["partitions"] += 1
    if placed != len(frame):
        raise dg.Failure(
            description=f"{len(frame) - placed} {source} records were observed outside the pulled window; "
            "the vendor answered outside the filter, nothing was staged for them"
        )
    return totals


def _validate_and_stage(
    lake: Lake,
    source: str,
    context: dg.AssetExecutionContext,
    frame: pd.DataFrame,
    kind: str,
    raw=None,
    drop_unchanged: bool = False,
):
    """What a windowed pull does with what it pulled: validate, stage the passing rows into
    their hourly partitions, and report. Returns (staged rows, counts, metadata, checks)."""
    staged, outcome = validate(lake, source, _batch_name(context), frame, kind, raw=raw)
    counts = _stage_partitions(lake, source, context, staged, drop_unchanged=drop_unchanged, outcome=outcome)
    validation, checks = validation_results([outcome], context, by_partition=True)
    return staged, counts, validation, checks


def _window_metadata(start: datetime, end: datetime, now: datetime) -> dict:
    return {
        "window_start": start.isoformat(),
        "window_end": max(start, end).isoformat(),
        "lag_seconds": round(max(0.0, (now - max(start, end)).total_seconds()), 1),
    }


def _batch_name(context: dg.AssetExecutionContext) -> str:
    keys = context.partition_keys
    return keys[0] if len(keys) == 1 else f"{keys[0]}..{keys[-1]}"


def _vendor_failure(exc: VendorError) -> dg.Failure:
    # The message is already safe for the UI (no credentials); no retries on config errors.
    if isinstance(exc, CircuitOpenError):
        # The vendor is down: a Dagster retry would only add calls. Nothing is
        # materialised, so downstream keeps the last good values until the breaker closes.
        return dg.Failure(description=str(exc), allow_retries=False, metadata=exc.as_metadata())
    return dg.Failure(description=str(exc), allow_retries=exc.status is None or exc.status >= 429)


@dg.asset(check_specs=validation_checks("crm_contacts"), kinds={"hubspot", "parquet"}, **PULL_ASSET)
def crm_contacts(
    context: dg.AssetExecutionContext, hubspot: HubSpotResource, lake: LakeResource, runtime: RuntimeResource
) -> dg.MaterializeResult:
    """HubSpot contacts whose `lastmodifieddate` falls in the partition's hour, staged as
    canonical rows (one per contact version; re-running never doubles a version). The
    hour in progress is filled up to now minus the configured lag. Contacts merged into a
    pulled contact (`hs_merged_object_ids`) are staged as deletion versions in the same
    hour, so a merged-away contact stops contributing."""
    start, end, now = _window(context, runtime)
    client = hubspot.get_client()
    records: list[dict] = []
    if end > start:
        try:
            for page in client.contacts_modified(start, end, tuple(hubspot.properties)):
                records.extend(page)
        except VendorError as exc:
            raise _vendor_failure(exc) from None
    frame, raw, merged = _crm_versions_with_merges(records, now)
    _, counts, validation, checks = _validate_and_stage(lake.get_lake(), "crm", context, frame, "crm_contact", raw=raw)
    return dg.MaterializeResult(
        check_results=checks,
        metadata={
            "dagster/row_count": counts["rows_total"],
            "rows_pulled": len(records),
            "merged_away": merged,
            **counts,
            **validation,
            **client.stats.as_metadata(),
            **_window_metadata(start, end, now),
        }
    )


def _crm_versions_with_merges(records: list[dict], now: datetime) -> tuple[pd.DataFrame, list[dict], int]:
    """Pulled contacts plus a deletion version per contact merged into them, with the raw
    record of each row (for the quarantine). A batch holds one version per contact: when a
    contact was paged and then merged away while the window was being pulled, the later
    of its version and its deletion is kept."""
    contacts = crm_contacts_to_canonical(records, now)
    merges = crm_merged_away_to_canonical(records, now)
    if merges.empty:
        return contacts, records, 0
    survivors = {m: r for r in records for m in merged_object_ids(r)}
    merged_raw = [
        {"id": i, "merged_into": str(survivors[i]["id"]),
         "properties": {"lastmodifieddate": (survivors[i].get("properties") or {}).get("lastmodifieddate")}}
        for i in merges["source_record_id"]
    ]
    deleted_at = dict(zip(merges["source_record_id"], merges["observed_at"]))
    keep_contact = [
        not (c in deleted_at and deleted_at[c] >= o) for c, o in zip(contacts["source_record_id"], contacts["observed_at"])
    ]
    kept_ids = set(contacts.loc[keep_contact, "source_record_id"])
    keep_merge = [i not in kept_ids for i in merges["source_record_id"]]
    frame = pd.concat([contacts[keep_contact], merges[keep_merge]], ignore_index=True)
    raw = [r for r, k in zip(records, keep_contact) if k] + [r for r, k in zip(merged_raw, keep_merge) if k]
    return frame, raw, int(sum(keep_merge))


def _lake_live_crm_ids(lake: Lake) -> list[str]:
    """The CRM contacts whose latest staged version is not a deletion (from the key
    columns only: versions equal on both times are told apart by those columns' hash)."""
    columns = ["source", "source_record_id", "observed_at", "received_at", "record_kind", "is_deleted"]
    staged = lake.read_staged_table("crm", columns).to_pandas(types_mapper={pa.bool_(): pd.BooleanDtype()}.get)
    if staged.empty:
        return []
    live = current_state(staged[staged["record_kind"] == "contact"])
    return live["source_record_id"].astype(str).tolist()


def _last_reconcile_cursor(context: dg.AssetExecutionContext) -> str | None:
    event = context.instance.get_latest_materialization_event(context.asset_key)
    entry = event.asset_materialization.metadata.get("reconcile_cursor") if event and event.asset_materialization else None
    value = getattr(entry, "value", None)
    return str(value) if value not in (None, "") else None


@dg.asset(group_name="sources", kinds={"hubspot", "parquet"}, retry_policy=PULL_RETRY)
def crm_deletions(
    context: dg.AssetExecutionContext, hubspot: HubSpotResource, lake: LakeResource, runtime: RuntimeResource
) -> dg.MaterializeResult:
    """Contacts that left HubSpot, staged as deletion versions so they stop contributing
    to profiles (search never returns them, so the window pulls cannot see them leave):

    - archived contacts, from the archived list, observed at `archivedAt`;
    - gdpr-deleted contacts, which vanish from every list: a rotating reconciliation
      batch-reads the contacts the lake believes live (100 per call, at most
      `reconcile_calls_per_run` calls per run) and stages a deletion, observed now, for
      each id HubSpot no longer has and did not archive. A merged-away id found this way
      (HubSpot answers it with the contact it went into) gets its deletion at the survivor's
      `lastmodifieddate`, as the window pull would have staged it.

    Runs with every pull; a deletion already staged is not staged twice."""
    now = runtime.clock().now()
    client = hubspot.get_client()
    target = lake.get_lake()
    try:
        records = [r for page in client.archived_contacts() for r in page]
        archived = {str(r["id"]) for r in records}
        cursor = _last_reconcile_cursor(context)
        live = [i for i in _lake_live_crm_ids(target) if i not in archived]
        checked, next_cursor = reconcile_slice(live, cursor, 100 * max(0, hubspot.reconcile_calls_per_run))
        gone, survivors = client.contacts_gone(checked, max_calls=hubspot.reconcile_calls_per_run)
    except VendorError as exc:
        raise _vendor_failure(exc) from None
    vanished = sorted(gone - archived)
    merged = crm_merged_away_to_canonical(survivors, now)
    merged = merged[merged["source_record_id"].isin(set(checked))]
    frame = pd.concat(
        [crm_deletions_to_canonical(records, now), crm_vanished_to_canonical(vanished, now, now), merged],
        ignore_index=True,
    )
    counts = _stage(target, "crm", "deletions", frame)
    return dg.MaterializeResult(
        metadata={
            "dagster/row_count": counts["rows_total"],
            "archived_contacts": len(records),
            "reconciled_contacts": len(checked),
            "vanished_contacts": len(vanished),
            "merged_away_found": len(merged),
            "reconcile_cursor": next_cursor or "",
            **counts,
            **client.stats.as_metadata(),
        }
    )


@dg.asset(check_specs=validation_checks("esp_members"), kinds={"mailchimp", "parquet"}, **PULL_ASSET)
def esp_members(
    context: dg.AssetExecutionContext, mailchimp: MailchimpResource, lake: LakeResource, runtime: RuntimeResource
) -> dg.MaterializeResult:
    """Mailchimp audience members whose `last_changed` falls in the partition's hour, staged
    as canonical rows. Merge fields the push writes are not read back (the echo)."""
    start, end, now = _window(context, runtime)
    client = mailchimp.get_client()
    members: list[dict] = []
    if end > start:
        try:
            for page in client.members_changed(mailchimp.list_id, start, end):
                members.extend(page)
        except VendorError as exc:
            raise _vendor_failure(exc) from None
    _, counts, validation, checks = _validate_and_stage(
        lake.get_lake(), "esp", context, esp_members_to_canonical(members, now, _echo_tags()), "esp_member",
        raw=members, drop_unchanged=True,
    )
    return dg.MaterializeResult(
        check_results=checks,
        metadata={
            **validation,
            "dagster/row_count": counts["rows_total"],
            "rows_pulled": len(members),
            **counts,
            **client.stats.as_metadata(),
            **_window_metadata(start, end, now),
        }
    )


@dg.asset(check_specs=validation_checks("esp_engagement"), kinds={"mailchimp", "parquet"}, **PULL_ASSET)
def esp_engagement(
    context: dg.AssetExecutionContext, mailchimp: MailchimpResource, lake: LakeResource, runtime: RuntimeResource
) -> dg.MaterializeResult:
    """Opens, clicks and unsubscribes whose time falls in the partition's hour, read from the
    email-activity reports of campaigns sent in the preceding `campaign_lookback_days`, and
    staged as canonical `esp` events (unsubscribes also observe `email_consent`). Each
    activity has a stable id, so re-running the hour never doubles an event. Bounces are
    counted, not staged: they are no event in the vocabulary."""
    start, end, now = _window(context, runtime)
    client = mailchimp.get_client()
    emails: list[dict] = []
    campaigns: list[dict] = []
    if end > start:
        lookback = pd.Timedelta(days=mailchimp.campaign_lookback_days).to_pytimedelta()
        try:
            campaigns = client.campaigns_sent_since(start - lookback, before=end, list_id=mailchimp.list_id)
            for campaign in campaigns:
                for page in client.email_activity(campaign["id"], start):
                    emails.extend(page)
        except VendorError as exc:
            raise _vendor_failure(exc) from None
    frame, activity = esp_engagement_to_canonical(emails, now, start, end)
    staged, counts, validation, checks = _validate_and_stage(lake.get_lake(), "engagement", context, frame, "event")
    events = staged["event_type"].value_counts()
    return dg.MaterializeResult(
        check_results=checks,
        metadata={
            **validation,
            "dagster/row_count": counts["rows_total"],
            "rows_pulled": len(frame),
            **counts,
            **activity,
            **{f"rows_{kind}": int(events.get(kind, 0)) for kind in ("email_opened", "email_clicked", "unsubscribed")},
            "campaigns": len(campaigns),
            **client.stats.as_metadata(),
            **_window_metadata(start, end, now),
        }
    )


@dg.asset(group_name="sources", kinds={"hubspot", "mailchimp", "parquet"}, retry_policy=PULL_RETRY)
def source_snapshot(
    hubspot: HubSpotResource, mailchimp: MailchimpResource, lake: LakeResource, runtime: RuntimeResource
) -> dg.MaterializeResult:
    """First load of an existing CRM and ESP: every contact and member last changed before
    the first partition, so history is not thousands of partitions. Re-running it adds
    nothing twice."""
    now = runtime.clock().now()
    until = source_partitions.start
    hub, chimp = hubspot.get_client(), mailchimp.get_client()
    try:
        contacts = [r for page in hub.contacts_modified(EPOCH, until, tuple(hubspot.properties)) for r in page]
        members = [m for page in chimp.members_changed(mailchimp.list_id, EPOCH, until) for m in page]
    except VendorError as exc:
        raise _vendor_failure(exc) from None
    target = lake.get_lake()
    crm_rows, crm_outcome = validate(
        target, "crm", "snapshot", crm_contacts_to_canonical(contacts, now), "crm_contact", raw=contacts
    )
    esp_rows, esp_outcome = validate(
        target, "esp", "snapshot", esp_members_to_canonical(members, now, _echo_tags()), "esp_member", raw=members
    )
    crm = _stage(target, "crm", "snapshot", crm_rows, outcome=crm_outcome)
    esp = _stage(target, "esp", "snapshot", esp_rows, drop_unchanged=True, outcome=esp_outcome)
    validation, _ = validation_results([crm_outcome, esp_outcome])
    return dg.MaterializeResult(
        metadata={
            "dagster/row_count": crm["rows_total"] + esp["rows_total"],
            "crm_contacts": crm["rows_total"],
            "esp_members": esp["rows_total"],
            "snapshot_until": until.isoformat(),
            **validation,
            "api_calls": hub.stats.api_calls + chimp.stats.api_calls,
            "http_429": hub.stats.http_429 + chimp.stats.http_429,
        }
    )


class StreamBatch(dg.Config):
    files: list[str] = []
    """Published landing files to stage (the sensor names them); empty means every file
    published in the partition's hour, so a re-run or backfill of an hour re-stages it."""


def landing_files_of_hour(landing_zone: LandingZoneResource, partition_key: str) -> list[str]:
    return [f for f in landing_zone.list_published() if landing_partition_key(f) == partition_key]


@dg.asset(
    check_specs=validation_checks("stream_events"),
    group_name="sources",
    kinds={"webhook", "parquet"},
    # No freshness policy: a quiet hour (a shop at night) is not an outage.
    partitions_def=source_partitions,
)
def stream_events(
    context: dg.AssetExecutionContext,
    config: StreamBatch,
    lake: LakeResource,
    shop: ShopResource,
    landing_zone: LandingZoneResource,
) -> dg.MaterializeResult:
    """Commerce webhooks and web track events from published landing files (local disk or
    S3), as canonical event rows, partitioned by the hour the files were received in (the
    pulls' windows). Each landing file is its own batch, so re-running a file rewrites the
    same rows, and de-duplication by delivery id happens across batches; what cannot be
    parsed is quarantined with the reason, never dropped."""
    target = lake.get_lake()
    files = config.files or landing_files_of_hour(landing_zone, context.partition_key)
    catalogue = shop.catalogue() if files else {}
    rows = rejected = 0
    by_source: dict[str, int] = {}
    outcomes = []
    for name in files:
        try:
            envelopes = landing_zone.read(name)
        except FileNotFoundError:
            raise dg.Failure(description=f"landing file {name} does not exist (moved by retention?)") from None
        # Unreadable lines come back as envelopes that parse into rejects, with the reason.
        frame, rejects = envelopes_to_canonical(envelopes, catalogue)
        raw = [envelopes[p] for p in frame.attrs.pop("envelope_positions", [])] or None
        staged, outcome = validate(target, "stream", batch_id(name), frame, "event", raw=raw)
        outcomes.append(outcome)
        target.write_staged("stream", batch_id(name), staged, *verdict_of(outcome))
        rejected += target.write_quarantine("stream", batch_id(name), rejects)
        rows += len(staged)
        for source, count in staged["source"].value_counts().items():
            by_source[str(source)] = by_source.get(str(source), 0) + int(count)
    context.log.info(f"staged {rows} events from {len(files)} landing files; {rejected} unparseable")
    validation, checks = validation_results(outcomes, context, batches=[batch_id(name) for name in files])
    return dg.MaterializeResult(
        check_results=checks,
        metadata={
            "dagster/row_count": rows,
            "landing_files": len(files),
            "rows_unparseable": rejected,
            **validation,
            **{f"rows_{k}": v for k, v in sorted(by_source.items())},
        },
    )
