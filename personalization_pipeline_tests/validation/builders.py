"""Shared builders for the validation tests: good batches made by the real converters
(core/sources.py, core/events.py), so the corpus exercises what staging will hand over."""

from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone

import pandas as pd

from personalization_pipeline.core import canonical, events, sources

RECEIVED = datetime(2026, 11, 28, 12, 0, tzinfo=timezone.utc)
RECEIVED_ISO = "2026-11-28T12:00:00Z"
GOOD_ROWS = 6


def iso(when: datetime) -> str:
    return when.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def crm_record(i: int, **props) -> dict:
    base = {
        "lastmodifieddate": iso(RECEIVED - timedelta(minutes=30 + i)),
        "email": f"contact{i}@example.com",
        "firstname": f"First{i}",
        "lifecyclestage": "lead",
    }
    base.update(props)
    return {"id": str(1000 + i), "properties": base, "archived": False}


def esp_member(i: int, **fields) -> dict:
    base = {
        "id": f"hash{i:04d}",
        "email_address": f"member{i}@example.com",
        "status": "subscribed",
        "last_changed": iso(RECEIVED - timedelta(minutes=20 + i)),
        "merge_fields": {"FNAME": f"M{i}"},
    }
    base.update(fields)
    return base


def track_envelope(i: int, payload: dict | None = None, **envelope) -> dict:
    body = {
        "type": "track",
        "event": "Product Viewed",
        "messageId": f"msg-{i}",
        "anonymousId": f"anon-{i}",
        "timestamp": iso(RECEIVED - timedelta(minutes=1 + i)),
        "properties": {"product_id": f"p{i}", "category": "shoes"},
    }
    body.update(payload or {})
    env = {
        "v": 1,
        "delivery_id": f"dlv-{i}",
        "transport": "track",
        "topic": None,
        "received_at": RECEIVED_ISO,
        "headers": {},
        "payload": body,
    }
    env.update(envelope)
    return env


def order_envelope(i: int, **props) -> dict:
    base = {"order_id": f"o{i}", "total": "12.50", "currency": "EUR", "email": f"buyer{i}@example.com"}
    base.update(props)
    return track_envelope(i, {"event": "Order Completed", "userId": f"cust-{i}", "properties": base})


def good_crm() -> pd.DataFrame:
    return sources.crm_contacts_to_canonical([crm_record(i) for i in range(GOOD_ROWS)], RECEIVED)


def good_esp() -> pd.DataFrame:
    return sources.esp_members_to_canonical([esp_member(i) for i in range(GOOD_ROWS)], RECEIVED)


def events_frame(envelopes: list[dict]) -> pd.DataFrame:
    frame, rejects = events.envelopes_to_canonical(envelopes, {})
    assert rejects == [], rejects
    return frame


def good_events() -> pd.DataFrame:
    return events_frame([track_envelope(i) for i in range(GOOD_ROWS // 2)] + [order_envelope(i + 50) for i in range(GOOD_ROWS // 2)])


def canonical_row(kind: str, i: int = 900, **values) -> dict:
    """One canonical row (as a dict) of ``kind`` that passes its suite, then ``values``."""
    row = dict.fromkeys(canonical.CANONICAL_COLUMNS)
    row.update(received_at=RECEIVED, observed_at=RECEIVED - timedelta(minutes=3), is_deleted=False)
    if kind == "crm_contact":
        row.update(source="crm", source_class="crm", record_kind="contact", source_record_id=str(i),
                   crm_id=str(i), email=f"row{i}@example.com", lifecycle_stage="customer")
    elif kind == "esp_member":
        row.update(source="esp", source_class="esp", record_kind="member", source_record_id=f"m{i}",
                   email=f"row{i}@example.com", email_consent="subscribed")
    else:
        row.update(source="web", source_class="behavioral", record_kind="event", source_record_id=f"e{i}",
                   event_type="page_viewed", anonymous_id=f"anon-{i}")
    row.update(values)
    return row


def loose_frame(good: pd.DataFrame, rows: list[dict]) -> pd.DataFrame:
    """``good`` plus ``rows`` as given, untyped (object columns): what a careless or
    future converter could hand over, wrong types included."""
    extra = pd.DataFrame(rows)
    return pd.concat([good.astype(object), extra.astype(object)], ignore_index=True)


def raw_of(outcome, position: int) -> dict:
    row = outcome.quarantine.set_index("row_position").loc[position]
    return json.loads(row["raw"])
