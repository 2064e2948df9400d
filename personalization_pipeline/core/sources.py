"""Vendor records -> canonical rows (PRODUCT.md section 4). Pure functions, no I/O."""

from __future__ import annotations

import hashlib
from datetime import datetime
from typing import Iterable

import pandas as pd

from personalization_pipeline.core import canonical

CRM_FIELDS = {
    "email": "email",
    "firstname": "first_name",
    "lastname": "last_name",
    "city": "city",
    "country": "country",
    "lifecyclestage": "lifecycle_stage",
    "loyalty_tier": "loyalty_tier",
}

ESP_MERGE_FIELDS = {"FNAME": "first_name", "LNAME": "last_name"}
"""Merge fields read as source data, unless the push writes them (the echo)."""

CONTENT_COLUMNS = tuple(
    c
    for c in canonical.CANONICAL_COLUMNS
    if c not in ("observed_at", "received_at", "source_record_id", "source", "source_class", "record_kind")
)


def _blank_to_none(value: object) -> object:
    if value is None:
        return None
    text = str(value).strip()
    return text if text else None


def _hubspot_time(value: object) -> object:
    """HubSpot dates are ISO 8601 strings, but epoch milliseconds (as numbers or digit
    strings) appear too; an unparseable value becomes null and fails validation."""
    if isinstance(value, (int, float)) or (isinstance(value, str) and value.strip().isdigit()):
        return pd.Timestamp(int(float(value)), unit="ms", tz="UTC")
    try:
        return pd.Timestamp(value).tz_convert("UTC") if value else None
    except (ValueError, TypeError):
        return None


def crm_contacts_to_canonical(records: Iterable[dict], received_at: datetime) -> pd.DataFrame:
    """HubSpot search results -> canonical contact rows (one per contact version)."""
    rows = []
    for record in records:
        props = record.get("properties") or {}
        row = {
            "source": "crm",
            "source_class": "crm",
            "source_record_id": str(record["id"]),
            "observed_at": _hubspot_time(props.get("lastmodifieddate") or record.get("updatedAt")),
            "received_at": received_at,
            "record_kind": "contact",
            "is_deleted": bool(record.get("archived", False)),
            "crm_id": str(record["id"]),
        }
        for prop, column in CRM_FIELDS.items():
            row[column] = _blank_to_none(props.get(prop))
        if row["country"]:
            row["country"] = str(row["country"]).upper()
        rows.append(row)
    return canonical.to_frame(rows) if rows else canonical.empty_frame()


def esp_members_to_canonical(
    members: Iterable[dict], received_at: datetime, echo_tags: Iterable[str] = ()
) -> pd.DataFrame:
    """Mailchimp members -> canonical member rows. Merge tags in `echo_tags` (those the
    push writes) are never read back, or every push would return as a fresh observation."""
    echo = {tag.upper() for tag in echo_tags}
    rows = []
    for member in members:
        merge = member.get("merge_fields") or {}
        location = member.get("location") or {}
        status = member.get("status")
        row = {
            "source": "esp",
            "source_class": "esp",
            "source_record_id": str(member["id"]),
            "observed_at": member.get("last_changed"),
            "received_at": received_at,
            "record_kind": "member",
            "is_deleted": status == "archived",
            "email": member.get("email_address"),
            "email_consent": status,
            "country": (_blank_to_none(location.get("country_code")) or None),
        }
        if row["country"]:
            row["country"] = str(row["country"]).upper()
        for tag, column in ESP_MERGE_FIELDS.items():
            if tag not in echo:
                row[column] = _blank_to_none(merge.get(tag))
        rows.append(row)
    return canonical.to_frame(rows) if rows else canonical.empty_frame()


def drop_unchanged_versions(new: pd.DataFrame, existing: pd.DataFrame) -> pd.DataFrame:
    """Drop versions in `new` whose content equals the record's latest earlier version.

    A vendor bumps its change time for edits we do not read (and for our own pushes, in
    the ESP): such a version carries no new fact and must not look newer than it is.
    """
    if new.empty or existing.empty:
        return new
    latest = (
        existing.sort_values(["observed_at", "received_at"])
        .drop_duplicates(["source", "source_record_id"], keep="last")
        .set_index(["source", "source_record_id"])
    )
    keys = pd.MultiIndex.from_frame(new[["source", "source_record_id"]])
    known = keys.isin(latest.index)
    if not known.any():
        return new
    prior = latest.reindex(keys)
    same = pd.Series(True, index=new.index)
    for column in CONTENT_COLUMNS:
        left = new[column].astype(object).where(new[column].notna(), None).to_numpy()
        right = prior[column].astype(object).where(prior[column].notna(), None).to_numpy()
        same &= pd.Series(left == right, index=new.index)
    newer = pd.Series(new["observed_at"].to_numpy() > prior["observed_at"].to_numpy(), index=new.index)
    return new[~(known & same & newer)]


ESP_ACTIVITY_EVENTS = {"open": "email_opened", "click": "email_clicked", "unsub": "unsubscribed"}
"""Mailchimp email-activity actions -> canonical event types. Bounces are no event in the
vocabulary: they are counted, not staged."""


def esp_activity_record_id(campaign_id: str, recipient: str, action: str, timestamp: datetime) -> str:
    """A stable id for one activity, so a re-pull writes the same row. `recipient` is the
    subscriber hash (md5 of the lower-cased email), which is Mailchimp's `email_id`."""
    stamp = pd.Timestamp(timestamp).tz_convert("UTC").strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    digest = hashlib.sha256(f"{campaign_id}|{recipient}|{action}|{stamp}".encode("utf-8")).hexdigest()
    return f"mc-activity:{digest[:32]}"


def esp_engagement_to_canonical(
    emails: Iterable[dict],
    received_at: datetime,
    start: datetime | None = None,
    end: datetime | None = None,
) -> tuple[pd.DataFrame, dict[str, int]]:
    """Mailchimp email-activity entries (`{campaign_id, email_id, email_address,
    activity: [{action, timestamp}]}`) -> canonical event rows, one per open, click or
    unsubscribe with its timestamp in [start, end). An unsubscribe also observes
    `email_consent` = unsubscribed. Returns the rows and counts for the run's metadata:
    activity_total, activity_outside_window, bounces, activity_unknown, activity_duplicate.
    """
    counts = dict.fromkeys(
        ("activity_total", "activity_outside_window", "bounces", "activity_unknown", "activity_duplicate"), 0
    )
    lo = pd.Timestamp(start).tz_convert("UTC") if start is not None else None
    hi = pd.Timestamp(end).tz_convert("UTC") if end is not None else None
    rows: dict[str, dict] = {}
    for entry in emails:
        email = _blank_to_none(entry.get("email_address"))
        recipient = _blank_to_none(entry.get("email_id")) or (
            hashlib.md5(email.lower().encode("utf-8")).hexdigest() if email else None
        )
        campaign_id = str(entry.get("campaign_id") or "")
        for act in entry.get("activity") or []:
            counts["activity_total"] += 1
            action = str(act.get("action") or "").lower()
            try:
                moment = pd.Timestamp(act.get("timestamp"))
                moment = moment.tz_localize("UTC") if moment.tzinfo is None else moment.tz_convert("UTC")
            except (TypeError, ValueError):
                moment = None
            if moment is not None and ((lo is not None and moment < lo) or (hi is not None and moment >= hi)):
                counts["activity_outside_window"] += 1
                continue
            if action == "bounce":
                counts["bounces"] += 1
                continue
            event_type = ESP_ACTIVITY_EVENTS.get(action)
            if event_type is None or moment is None or email is None or recipient is None:
                counts["activity_unknown"] += 1
                continue
            record_id = esp_activity_record_id(campaign_id, recipient, action, moment)
            if record_id in rows:
                counts["activity_duplicate"] += 1
                continue
            rows[record_id] = {
                "source": "esp",
                "source_class": "esp",
                "source_record_id": record_id,
                "observed_at": moment,
                "received_at": received_at,
                "record_kind": "event",
                "event_type": event_type,
                "is_deleted": False,
                "email": email,
                "email_consent": "unsubscribed" if event_type == "unsubscribed" else None,
            }
    frame = canonical.to_frame(list(rows.values())) if rows else canonical.empty_frame()
    return frame, counts


def crm_deletions_to_canonical(records: Iterable[dict], received_at: datetime) -> pd.DataFrame:
    """Archived HubSpot contacts -> deletion versions (is_deleted, observed at `archivedAt`),
    so the contact stops contributing from then on. Its staged history is kept."""
    rows = [
        _crm_deletion(
            str(record["id"]),
            record.get("archivedAt") or (record.get("properties") or {}).get("lastmodifieddate"),
            received_at,
        )
        for record in records
    ]
    return canonical.to_frame(rows) if rows else canonical.empty_frame()


def merged_object_ids(record: dict) -> list[str]:
    """The ids HubSpot merged into `record` (`hs_merged_object_ids`, semicolon-separated),
    without the record's own id (a merge that creates a new id lists both old ones)."""
    raw = (record.get("properties") or {}).get("hs_merged_object_ids")
    own = str(record.get("id"))
    ids = [part.strip() for part in str(raw or "").split(";")]
    return list(dict.fromkeys(i for i in ids if i and i != own))


def crm_merged_away_to_canonical(records: Iterable[dict], received_at: datetime) -> pd.DataFrame:
    """HubSpot contacts (search or batch-read results) -> one deletion version per contact
    merged into them, observed at the surviving contact's `lastmodifieddate`, so it lands
    in the same hourly partition as the survivor's version that announced the merge.

    A merged-away id leaves search for good, so without this its last version would keep
    contributing. Every later version of the survivor lists it again: the deletion is
    re-stated, never undone."""
    rows = []
    for record in records:
        props = record.get("properties") or {}
        observed = _hubspot_time(props.get("lastmodifieddate") or record.get("updatedAt"))
        for merged_id in merged_object_ids(record):
            rows.append(_crm_deletion(merged_id, observed, received_at))
    if not rows:
        return canonical.empty_frame()
    frame = canonical.to_frame(rows)
    # A batch holds one version per record: an id listed by two survivors (merges chain)
    # keeps its latest statement.
    frame = frame.sort_values(["source_record_id", "observed_at"], kind="stable")
    return frame.drop_duplicates(["source_record_id"], keep="last").reset_index(drop=True)


def crm_vanished_to_canonical(contact_ids: Iterable[str], observed_at: datetime, received_at: datetime) -> pd.DataFrame:
    """Contacts HubSpot no longer has at all (gdpr-deleted: in no list, not archived) ->
    deletion versions observed when the reconciliation found them gone (HubSpot keeps no
    trace of when), so they stop contributing from then on."""
    ids = list(dict.fromkeys(str(i) for i in contact_ids))
    rows = [_crm_deletion(contact_id, observed_at, received_at) for contact_id in ids]
    return canonical.to_frame(rows) if rows else canonical.empty_frame()


def _crm_deletion(contact_id: str, observed_at, received_at: datetime) -> dict:
    """A deletion version of one HubSpot contact (archived, merged away or gdpr-deleted)."""
    return {
        "source": "crm",
        "source_class": "crm",
        "source_record_id": contact_id,
        "observed_at": observed_at,
        "received_at": received_at,
        "record_kind": "contact",
        "is_deleted": True,
        "crm_id": contact_id,
    }


def _id_order(value: str) -> tuple[int, int | str]:
    text = str(value)
    return (0, int(text)) if text.isdigit() else (1, text)


def reconcile_slice(live_ids: Iterable[str], after: str | None, max_ids: int) -> tuple[list[str], str | None]:
    """The next slice of a rotating sweep over `live_ids` (the CRM ids the lake believes
    live): up to `max_ids` ids after the cursor `after`, in id order. Returns (slice, next
    cursor); the cursor is None once the sweep reached the end, so the next run starts a
    new sweep from the lowest id. A sweep of N ids takes ceil(N / max_ids) runs, whatever N."""
    if max_ids < 1:
        return [], after
    ordered = sorted({str(i) for i in live_ids}, key=_id_order)
    start = 0
    if after is not None:
        cursor = _id_order(after)
        start = next((n for n, i in enumerate(ordered) if _id_order(i) > cursor), len(ordered))
    chosen = ordered[start : start + max_ids]
    done = start + max_ids >= len(ordered)
    return chosen, (None if done or not chosen else chosen[-1])
