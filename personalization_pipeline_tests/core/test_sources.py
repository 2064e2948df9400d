from datetime import datetime, timezone

from personalization_pipeline.core.sources import (
    crm_contacts_to_canonical,
    drop_unchanged_versions,
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
