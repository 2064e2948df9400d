"""Vendor records -> canonical rows (PRODUCT.md section 4). Pure functions, no I/O."""

from __future__ import annotations

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


def crm_contacts_to_canonical(records: Iterable[dict], received_at: datetime) -> pd.DataFrame:
    """HubSpot search results -> canonical contact rows (one per contact version)."""
    rows = []
    for record in records:
        props = record.get("properties") or {}
        row = {
            "source": "crm",
            "source_class": "crm",
            "source_record_id": str(record["id"]),
            "observed_at": props.get("lastmodifieddate") or record.get("updatedAt"),
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
