from datetime import datetime, timezone

import pandas as pd
import pytest

from personalization_pipeline import settings
from personalization_pipeline.core.push import (
    FieldMappingError,
    changed_members,
    chunks,
    convert,
    desired_member_fields,
    load_field_mapping,
    mask_email,
)

MAPPING = load_field_mapping(settings.CONFIG_DIR / "esp_field_mapping.yaml")


def test_default_mapping_has_the_product_tags():
    assert set(MAPPING.tags) == {
        "FNAME", "LNAME", "CITY", "COUNTRY", "LTV", "ORDERS", "LASTORDER", "CARTVALUE", "CARTITEMS", "NEXTCAT", "LOYALTY",
    }


def test_conversion_by_type():
    by_tag = {f.tag: f for f in MAPPING.fields}
    assert convert(12345, by_tag["LTV"]) == 123.45
    assert convert(1200, by_tag["LTV"]) == 12
    assert convert(3, by_tag["ORDERS"]) == 3
    assert convert(pd.Timestamp("2026-11-28T10:00:00Z"), by_tag["LASTORDER"]) == "2026-11-28"
    assert convert(None, by_tag["CITY"]) == ""
    assert convert(pd.NA, by_tag["LTV"]) == ""
    assert convert("x" * 300, by_tag["CITY"]) == "x" * 255


def test_bad_mapping_names_the_file(tmp_path):
    bad = tmp_path / "m.yaml"
    bad.write_text("fields:\n  - {column: city, tag: city, type: text}\n")
    with pytest.raises(FieldMappingError, match=r"m\.yaml: field #1: tag 'city'"):
        load_field_mapping(bad)
    bad.write_text("fields:\n  - {column: city, tag: CITY, type: blob}\n")
    with pytest.raises(FieldMappingError, match="type must be one of"):
        load_field_mapping(bad)


def _inputs():
    profiles = pd.DataFrame(
        {
            "profile_id": ["p_1", "p_2"],
            "first_name": ["Ann", "Bob"],
            "last_name": [None, "Ray"],
            "city": ["London", None],
            "country": ["GB", "US"],
            "lifetime_value": [1999, 0],
            "order_count": [1, 0],
            "last_order_at": [pd.Timestamp("2026-11-01", tz="UTC"), pd.NaT],
            "cart_value": [None, None],
            "cart_items": [None, None],
            "next_best_category": ["shoes", None],
            "loyalty_tier": ["gold", None],
        }
    )
    identity = pd.DataFrame(
        {
            "identifier_type": ["email", "email", "email", "crm_id"],
            "identifier_value": ["ann@example.com", "ann.work@example.com", "bob@example.com", "17"],
            "profile_id": ["p_1", "p_1", "p_2", "p_1"],
        }
    )
    members = pd.DataFrame(
        {
            "member_hash": ["h_ann", "h_annw", "h_bob", "h_cleaned", "h_stranger"],
            "email": [" Ann@Example.com", "ann.work@example.com", "bob@example.com", "c@example.com", "z@example.com"],
            "status": ["subscribed", "unsubscribed", "subscribed", "cleaned", "subscribed"],
        }
    )
    identity.loc[len(identity)] = ["email", "c@example.com", "p_2"]
    return profiles, identity, members


def test_every_member_of_a_profile_gets_its_fields_and_strangers_none():
    desired = desired_member_fields(*_inputs(), MAPPING)
    assert list(desired["member_hash"]) == ["h_ann", "h_annw", "h_bob"]  # cleaned skipped, stranger unknown
    ann = desired.iloc[0]
    assert ann["profile_id"] == "p_1"
    assert ann["fields"]["CITY"] == "London" and ann["fields"]["LTV"] == 19.99
    assert ann["fields"]["LASTORDER"] == "2026-11-01" and ann["fields"]["LNAME"] == ""
    assert desired.iloc[1]["payload_hash"] == ann["payload_hash"]


def test_only_changed_members_are_sent():
    desired = desired_member_fields(*_inputs(), MAPPING)
    acked = {"h_ann": desired.iloc[0]["payload_hash"], "h_bob": "stale"}
    changed = changed_members(desired, acked)
    assert list(changed["member_hash"]) == ["h_annw", "h_bob"]
    assert changed_members(desired, dict(zip(desired["member_hash"], desired["payload_hash"]))).empty


def test_chunks_respect_the_batch_limit():
    frame = pd.DataFrame({"a": range(1201)})
    sizes = [len(c) for c in chunks(frame, 500)]
    assert sizes == [500, 500, 201]


def test_mask_email():
    assert mask_email("jane.doe@example.com") == "j***@example.com"
    assert mask_email(None) == "***"
