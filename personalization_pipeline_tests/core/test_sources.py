import hashlib
from datetime import datetime, timedelta, timezone

from personalization_pipeline.core.sources import (
    crm_contacts_to_canonical,
    drop_unchanged_versions,
    esp_engagement_to_canonical,
    esp_members_to_canonical,
)

NOW = datetime(2026, 11, 28, 12, tzinfo=timezone.utc)


def contact(cid, modified, **props):
    return {"id": cid, "properties": {"lastmodifieddate": modified, "hs_object_id": cid, **props}, "archived": False}


def test_crm_contact_to_canonical():
    frame = crm_contacts_to_canonical(
        [contact("7", "2026-11-28T10:00:00.123Z", email=" Ann@X.com ", city="", country="gb", firstname="Ann")], NOW
    )
    row = frame.iloc[0]
    assert row["source"] == "crm" and row["source_class"] == "crm" and row["crm_id"] == "7"
    assert row["observed_at"].isoformat() == "2026-11-28T10:00:00.123000+00:00"
    assert row["email"] == "Ann@X.com"  # stripped; lower-casing is identity normalisation
    assert row["city"] is None or row["city"] != row["city"]  # blank -> null
    assert row["country"] == "GB" and row["first_name"] == "Ann"


def test_esp_echo_fields_are_not_read_back():
    member = {
        "id": "abc",
        "email_address": "a@x.com",
        "status": "subscribed",
        "merge_fields": {"FNAME": "Ann", "LNAME": "Lee", "CITY": "Paris"},
        "location": {"country_code": "fr"},
        "last_changed": "2026-11-28T10:00:00+00:00",
    }
    plain = esp_members_to_canonical([member], NOW).iloc[0]
    assert plain["first_name"] == "Ann" and plain["email_consent"] == "subscribed" and plain["country"] == "FR"
    echoed = esp_members_to_canonical([member], NOW, echo_tags=["FNAME", "LNAME", "CITY"]).iloc[0]
    assert echoed["first_name"] is None or echoed["first_name"] != echoed["first_name"]


def test_a_version_with_nothing_new_is_dropped_but_a_change_is_kept():
    old = crm_contacts_to_canonical([contact("1", "2026-11-28T09:00:00Z", city="Leeds")], NOW)
    new = crm_contacts_to_canonical(
        [
            contact("1", "2026-11-28T10:00:00Z", city="Leeds"),  # bumped time, same content
            contact("2", "2026-11-28T10:00:00Z", city="York"),  # unknown record
        ],
        NOW,
    )
    kept = drop_unchanged_versions(new, old)
    assert list(kept["source_record_id"]) == ["2"]
    changed = crm_contacts_to_canonical([contact("1", "2026-11-28T10:00:00Z", city="Hull")], NOW)
    assert len(drop_unchanged_versions(changed, old)) == 1


def test_engagement_becomes_canonical_events_with_stable_ids():
    start = datetime(2026, 11, 28, 10, tzinfo=timezone.utc)
    entry = {
        "campaign_id": "c1",
        "email_id": hashlib.md5(b"ann@example.com").hexdigest(),
        "email_address": "Ann@Example.com",
        "activity": [
            {"action": "open", "timestamp": "2026-11-28T10:00:00+00:00"},
            {"action": "click", "timestamp": "2026-11-28T10:05:00+00:00", "url": "https://shop/x"},
            {"action": "bounce", "timestamp": "2026-11-28T10:06:00+00:00", "type": "hard"},
            {"action": "unsub", "timestamp": "2026-11-28T10:59:59+00:00"},
            {"action": "open", "timestamp": "2026-11-28T11:00:00+00:00"},  # the next window's
            {"action": "open", "timestamp": "2026-11-28T09:59:59+00:00"},  # the previous window's
            {"action": "open", "timestamp": "2026-11-28T10:00:00Z"},  # the same open again
            {"action": "ecomm", "timestamp": "2026-11-28T10:10:00+00:00"},
        ],
    }
    received = datetime(2026, 11, 28, 12, tzinfo=timezone.utc)
    frame, counts = esp_engagement_to_canonical([entry], received, start, start + timedelta(hours=1))
    assert list(frame["event_type"]) == ["email_opened", "email_clicked", "unsubscribed"]
    assert list(frame["email_consent"].fillna("-")) == ["-", "-", "unsubscribed"]
    assert (frame["source"] == "esp").all() and (frame["source_class"] == "esp").all()
    assert (frame["record_kind"] == "event").all() and frame["source_record_id"].is_unique
    assert counts == {
        "activity_total": 8,
        "activity_outside_window": 2,
        "bounces": 1,
        "activity_unknown": 1,
        "activity_duplicate": 1,
    }
    # The id depends on what happened, not on the pull: without `email_id` (derived from
    # the address), in another timestamp spelling, received later, the ids are the same.
    again = {**entry, "email_id": None, "activity": [{"action": "open", "timestamp": "2026-11-28T10:00:00.000Z"}]}
    frame2, _ = esp_engagement_to_canonical([again], received + timedelta(days=1), start, start + timedelta(hours=1))
    assert frame2["source_record_id"].iloc[0] == frame["source_record_id"].iloc[0]
