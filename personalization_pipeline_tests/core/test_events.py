"""core.events: envelopes -> canonical rows, rejects instead of exceptions."""

from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone

import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from personalization_pipeline.core import canonical
from personalization_pipeline.core.events import (
    ERASURE_REASON,
    TRACK_EVENT_TYPES,
    UNREADABLE_KEY,
    device_type_from_user_agent,
    envelopes_to_canonical,
    normalise_country,
    read_landing_file,
    to_minor_units,
    top_line_item_product,
)

RECEIVED = "2026-11-28T10:00:05.000000Z"
CATALOGUE = {"101": "Shoes", "102": "Bags", "103": "Coats", "7": "Hats"}


def ts(text: str) -> pd.Timestamp:
    return pd.Timestamp(text)


def track(event: str = "Page Viewed", **fields) -> dict:
    payload = {
        "type": "track",
        "messageId": "msg-1",
        "event": event,
        "anonymousId": "anon-1",
        "userId": "7001",
        "timestamp": "2026-11-28T10:00:00.000Z",
        "context": {
            "userAgent": "Mozilla/5.0 (Windows NT 10.0; Win64; x64) Chrome/130.0 Safari/537.36",
            "ip": "203.0.113.9",
            "locale": "en-GB",
            "location": {"city": "London", "country": "United Kingdom"},
        },
        "properties": {},
    }
    payload.update(fields)
    return {"v": 1, "delivery_id": payload.get("messageId"), "transport": "track",
            "topic": "track", "received_at": RECEIVED, "headers": {}, "payload": payload}


def shopify(topic: str, payload: dict, delivery_id: str = "wh-1") -> dict:
    return {"v": 1, "delivery_id": delivery_id, "transport": "shopify", "topic": topic,
            "received_at": RECEIVED,
            "headers": {"shop_domain": "sandbox-shop.myshopify.com",
                        "triggered_at": "2026-11-28T10:00:04Z"},
            "payload": payload}


def mailchimp(kind: str, data: dict, fired_at: str = "2026-11-28 09:59:00") -> dict:
    return {"v": 1, "delivery_id": "sha-1", "transport": "mailchimp", "topic": kind,
            "received_at": RECEIVED, "headers": {},
            "payload": {"type": kind, "fired_at": fired_at, "data": data}}


CUSTOMER = {"id": 7001, "email": "Ann@Example.com", "first_name": "Ann", "last_name": "Lee",
            "default_address": {"city": "Leeds", "country_code": "gb"}}


def order(**fields) -> dict:
    payload = {
        "id": 5001, "email": "ann@example.com", "created_at": "2026-11-28T04:59:00-05:00",
        "updated_at": "2026-11-28T05:00:00-05:00", "currency": "USD", "total_price": "59.97",
        "line_items": [
            {"product_id": 101, "title": "Shoe", "quantity": 1, "price": "19.99", "sku": "S"},
            {"product_id": 102, "title": "Bag", "quantity": 2, "price": "19.99", "sku": "B"},
        ],
        "customer": CUSTOMER,
    }
    payload.update(fields)
    return payload


def one_row(envelope: dict) -> dict:
    frame, rejects = envelopes_to_canonical([envelope], CATALOGUE)
    assert rejects == [], rejects
    assert len(frame) == 1
    return frame.iloc[0].to_dict()


# --------------------------------------------------------------------------- track


@pytest.mark.parametrize("name,event_type", sorted(TRACK_EVENT_TYPES.items()))
def test_every_track_event_name_maps(name, event_type):
    row = one_row(track(name))
    assert row["event_type"] == event_type
    assert (row["source"], row["source_class"], row["record_kind"]) == ("web", "behavioral", "event")


def test_every_canonical_event_type_is_reachable_from_track():
    assert set(TRACK_EVENT_TYPES.values()) == set(canonical.EVENT_TYPES)


@pytest.mark.parametrize("name", ["product viewed", "  Product   Viewed ", "product_viewed", "PRODUCT VIEWED"])
def test_track_names_are_matched_leniently(name):
    assert one_row(track(name))["event_type"] == "product_viewed"


def test_track_fields():
    row = one_row(track(
        "Product Viewed",
        properties={"product_id": 101, "category": "Shoes", "price": 19.99, "email": "a@b.c"},
    ))
    assert row["source_record_id"] == "msg-1"
    assert row["anonymous_id"] == "anon-1" and row["customer_id"] == "7001"
    assert row["email"] == "a@b.c"
    assert (row["city"], row["country"]) == ("London", "GB")
    assert row["device_type"] == "desktop"
    assert (row["product_id"], row["category"]) == ("101", "Shoes")
    assert row["observed_at"] == ts("2026-11-28T10:00:00Z")  # no sentAt: no correction
    assert row["received_at"] == ts(RECEIVED)
    assert row["is_deleted"] is False or row["is_deleted"] == False  # noqa: E712
    assert pd.isna(row["order_total_minor"]) and pd.isna(row["shop"])


def test_category_only_for_product_viewed():
    row = one_row(track("Product Added", properties={"product_id": "101", "category": "Shoes"}))
    assert row["product_id"] == "101" and pd.isna(row["category"])


def test_email_from_traits():
    row = one_row(track("Identify", type="identify", traits={"email": "t@example.com"}))
    assert row["event_type"] == "profile_updated" and row["email"] == "t@example.com"


def test_skew_correction_uses_message_sent_at():
    # The device clock runs 2 minutes fast: timestamp and sentAt are both 2 min ahead.
    row = one_row(track(timestamp="2026-11-28T10:01:58.000Z", sentAt="2026-11-28T10:02:04.000Z"))
    # observed = timestamp + (received - sentAt) = 10:01:58 + (10:00:05 - 10:02:04)
    assert row["observed_at"] == ts("2026-11-28T09:59:59Z")


def test_skew_correction_falls_back_to_batch_sent_at():
    env = track(timestamp="2026-11-28T09:59:00.000Z")
    env["headers"] = {"batch_sent_at": "2026-11-28T09:59:05.000Z"}
    assert one_row(env)["observed_at"] == ts("2026-11-28T10:00:00Z")


def test_unparseable_times_become_null_not_rejects():
    row = one_row(track(timestamp="yesterday-ish", sentAt="2026-11-28T09:59:05Z"))
    assert pd.isna(row["observed_at"])
    env = track(sentAt="garbage")
    env["received_at"] = "not a time"
    row = one_row(env)
    assert row["observed_at"] == ts("2026-11-28T10:00:00Z") and pd.isna(row["received_at"])


def test_track_order_completed_carries_order_facts():
    row = one_row(track("Order Completed",
                        properties={"order_id": 5001, "total": 59.97, "currency": "usd"}))
    assert (row["order_id"], row["order_total_minor"], row["currency"]) == ("5001", 5997, "USD")
    assert row["source"] == "web"  # a behavioural signal; aggregates count shop orders only


def test_track_checkout_started_cart():
    row = one_row(track("Checkout Started", properties={
        "value": "39.98", "currency": "USD",
        "products": [{"product_id": "101", "quantity": 2}, {"product_id": "7", "quantity": "1"}]}))
    assert (row["cart_value_minor"], row["cart_items"]) == (3998, 3)


def test_missing_identifiers_are_not_rejected_here():
    env = track(messageId=None, anonymousId=None, userId=None)
    env["delivery_id"] = None
    row = one_row(env)
    assert pd.isna(row["source_record_id"]) and pd.isna(row["anonymous_id"])


def test_page_message_type():
    assert one_row(track(event=None, type="page"))["event_type"] == "page_viewed"


@pytest.mark.parametrize(
    "fields,reason",
    [
        ({"event": "Rocket Launched"}, "unknown event type"),
        ({"event": None}, "unknown event type"),
        ({"event": 12}, "unknown event type"),
        ({"type": "screen"}, "unsupported message type"),
    ],
)
def test_unknown_track_events_are_rejected(fields, reason):
    frame, rejects = envelopes_to_canonical([track(**fields)], CATALOGUE)
    assert len(frame) == 0
    (reject,) = rejects
    assert reason in reject["reason"]
    assert reject["delivery_id"] == "msg-1" and reject["transport"] == "track"
    assert reject["received_at"] == RECEIVED and reject["raw"]["payload"]["type"] in ("track", "screen")


# --------------------------------------------------------------------------- shopify


def test_orders_create():
    row = one_row(shopify("orders/create", order()))
    assert (row["source"], row["source_class"], row["event_type"]) == ("shop", "transactional", "order_completed")
    assert row["source_record_id"] == "wh-1"
    assert row["shop"] == "sandbox-shop.myshopify.com"
    assert row["observed_at"] == ts("2026-11-28T09:59:00Z")
    assert (row["customer_id"], row["email"]) == ("7001", "ann@example.com")
    assert (row["first_name"], row["last_name"]) == ("Ann", "Lee")
    assert (row["city"], row["country"]) == ("Leeds", "GB")
    assert (row["order_id"], row["order_total_minor"], row["currency"]) == ("5001", 5997, "USD")
    assert row["category"] == "Bags"  # 2 x 19.99 beats 1 x 19.99


def test_order_email_falls_back_to_customer_email():
    assert one_row(shopify("orders/create", order(email=None)))["email"] == "Ann@Example.com"
    assert one_row(shopify("orders/create", order(email="")))["email"] == "Ann@Example.com"


@pytest.mark.parametrize(
    "total,currency,minor",
    [("59.97", "USD", 5997), ("1500", "JPY", 1500), ("12.345", "KWD", 12345),
     ("0.10", "KWD", 100), ("1500.00", "JPY", 1500), ("-5.00", "USD", -500),
     ("12.345", "USD", None), ("12.5", "JPY", None), ("abc", "USD", None), (None, "USD", None),
     ("10.00", "XYZ", 1000), ("10.00", None, 1000)],
)
def test_order_total_in_minor_units_exactly(total, currency, minor):
    row = one_row(shopify("orders/create", order(total_price=total, currency=currency)))
    assert (None if pd.isna(row["order_total_minor"]) else row["order_total_minor"]) == minor


def test_to_minor_units_never_uses_float_maths():
    assert to_minor_units("0.29", "USD") == 29  # float: 0.29 * 100 = 28.999999999999996
    assert to_minor_units("1.005", "KWD") == 1005
    assert to_minor_units("9007199254740993.01", "USD") == 900719925474099301
    assert to_minor_units("1e30", "USD") is None  # does not fit int64
    assert to_minor_units(True, "USD") is None


def test_bad_currency_passes_through_for_validation():
    row = one_row(shopify("orders/create", order(currency="dollars")))
    assert row["currency"] == "dollars"


def test_top_line_item_ties_go_to_the_smallest_product_id():
    items = [
        {"product_id": 103, "price": "10.00", "quantity": 2},
        {"product_id": 7, "price": "20.00", "quantity": 1},
        {"product_id": 102, "price": "5.00", "quantity": 4},
    ]
    assert top_line_item_product(items) == "7"  # numeric order: 7 < 102 < 103
    row = one_row(shopify("orders/create", order(line_items=items)))
    assert row["category"] == "Hats"


def test_top_line_item_skips_unusable_items_and_unknown_products():
    items = [
        {"product_id": None, "price": "99.00", "quantity": 1},  # custom item
        {"product_id": 101, "price": "bad", "quantity": 1},
        {"product_id": 102, "price": "1.00", "quantity": "x"},
        {"product_id": 103, "price": "2.00", "quantity": 1},
        "not an item",
    ]
    assert top_line_item_product(items) == "103"
    row = one_row(shopify("orders/create", order(line_items=[{"product_id": 999, "price": "1", "quantity": 1}])))
    assert pd.isna(row["category"])  # not in the catalogue
    assert top_line_item_product(None) is None


def test_orders_cancelled():
    row = one_row(shopify("orders/cancelled", order(cancelled_at="2026-11-28T12:00:00Z")))
    assert row["event_type"] == "order_cancelled"
    assert row["observed_at"] == ts("2026-11-28T12:00:00Z")
    assert row["order_id"] == "5001" and pd.isna(row["category"])
    row = one_row(shopify("orders/cancelled", order(cancelled_at=None)))
    assert row["observed_at"] == ts("2026-11-28T10:00:00Z")  # updated_at


def test_checkouts_create():
    payload = order(total_price="60.00")
    payload.pop("id")
    payload["id"] = 30001
    row = one_row(shopify("checkouts/create", payload))
    assert row["event_type"] == "checkout_started"
    assert (row["cart_value_minor"], row["cart_items"]) == (6000, 3)
    assert row["observed_at"] == ts("2026-11-28T09:59:00Z")
    assert pd.isna(row["order_id"]) and row["customer_id"] == "7001"


def test_customers_update():
    payload = {**CUSTOMER, "updated_at": "2026-11-28T11:00:00+01:00",
               "default_address": {"city": " York ", "country_code": "GB"}}
    row = one_row(shopify("customers/update", payload))
    assert row["event_type"] == "profile_updated"
    assert (row["customer_id"], row["email"], row["city"], row["country"]) == ("7001", "Ann@Example.com", "York", "GB")
    assert row["observed_at"] == ts("2026-11-28T10:00:00Z")


def test_customers_redact_is_rejected_for_the_erase_path():
    frame, rejects = envelopes_to_canonical(
        [shopify("customers/redact", {"customer": {"id": 7001}})], CATALOGUE)
    assert len(frame) == 0 and rejects[0]["reason"] == ERASURE_REASON


def test_unknown_shopify_topic_is_rejected():
    _, rejects = envelopes_to_canonical([shopify("products/update", {"id": 1})], CATALOGUE)
    assert "unknown shopify topic" in rejects[0]["reason"]


# --------------------------------------------------------------------------- mailchimp


@pytest.mark.parametrize(
    "kind,event_type,consent",
    [("subscribe", "subscribed", "subscribed"), ("unsubscribe", "unsubscribed", "unsubscribed"),
     ("cleaned", "unsubscribed", "cleaned"), ("profile", "profile_updated", None)],
)
def test_mailchimp_types(kind, event_type, consent):
    row = one_row(mailchimp(kind, {"email": "ann@example.com", "list_id": "L1",
                                   "merges": {"FNAME": "Ann", "LNAME": "Lee"}}))
    assert (row["source"], row["source_class"]) == ("esp", "esp")
    assert row["event_type"] == event_type
    assert (None if pd.isna(row["email_consent"]) else row["email_consent"]) == consent
    assert row["email"] == "ann@example.com" and row["source_record_id"] == "sha-1"
    assert (row["first_name"], row["last_name"]) == ("Ann", "Lee")
    assert row["observed_at"] == ts("2026-11-28T09:59:00Z")  # fired_at is UTC


def test_mailchimp_upemail_uses_the_new_address():
    row = one_row(mailchimp("upemail", {"new_email": "new@example.com", "old_email": "old@example.com"}))
    assert row["event_type"] == "profile_updated" and row["email"] == "new@example.com"


def test_mailchimp_unknown_type_and_missing_topic():
    _, rejects = envelopes_to_canonical([mailchimp("campaign", {})], CATALOGUE)
    assert "unknown mailchimp type" in rejects[0]["reason"]
    env = mailchimp("subscribe", {"email": "a@b.c"})
    del env["topic"]
    assert one_row(env)["event_type"] == "subscribed"  # taken from the form's type


# --------------------------------------------------------------------------- helpers


@pytest.mark.parametrize(
    "value,code",
    [("United Kingdom", "GB"), ("gb", "GB"), ("GBR", "GB"), ("UK", "GB"), (" united  states ", "US"),
     ("U.S.A.", "US"), ("Deutschland", "DE"), ("jp", "JP"), ("Narnia", None), ("", None),
     (None, None), (44, None), ("ZZ", None)],
)
def test_normalise_country(value, code):
    assert normalise_country(value) == code


@pytest.mark.parametrize(
    "ua,kind",
    [
        ("Mozilla/5.0 (iPhone; CPU iPhone OS 18_1 like Mac OS X) Mobile/15E148 Safari/604.1", "mobile"),
        ("Mozilla/5.0 (Linux; Android 14; Pixel 8) Chrome/130.0 Mobile Safari/537.36", "mobile"),
        ("Mozilla/5.0 (iPad; CPU OS 17_7 like Mac OS X) Mobile/15E148 Safari/604.1", "tablet"),
        ("Mozilla/5.0 (Linux; Android 13; SM-X710) Chrome/130.0 Safari/537.36", "tablet"),
        ("Mozilla/5.0 (Macintosh; Intel Mac OS X 14_6_1) Version/18.1 Safari/605.1.15", "desktop"),
        ("Mozilla/5.0 (X11; Linux x86_64; rv:132.0) Gecko/20100101 Firefox/132.0", "desktop"),
        ("Mozilla/5.0 (compatible; Googlebot/2.1; +http://www.google.com/bot.html)", "bot"),
        ("curl/8.5.0", "bot"),
        ("SomethingElse/1.0", "other"),
        (None, None),
    ],
)
def test_device_type(ua, kind):
    assert device_type_from_user_agent(ua) == kind


# --------------------------------------------------------------------------- garbage


@pytest.mark.parametrize(
    "envelope,reason",
    [
        ("a string", "not a JSON object"),
        ([1, 2], "not a JSON object"),
        (None, "not a JSON object"),
        ({"v": 2, "transport": "track", "payload": {}}, "unsupported envelope version"),
        ({"v": 1, "transport": "kafka", "payload": {}}, "unknown transport"),
        ({"v": 1, "transport": "track", "payload": [1]}, "payload is not a JSON object"),
        ({"v": 1, "transport": "shopify", "payload": {}}, "missing shopify topic"),
    ],
)
def test_structural_garbage_is_rejected(envelope, reason):
    frame, rejects = envelopes_to_canonical([envelope], CATALOGUE)
    assert len(frame) == 0 and reason in rejects[0]["reason"]
    assert rejects[0]["raw"] == envelope


def test_odd_field_types_become_nulls():
    env = track("Product Viewed", userId={"nested": 1}, anonymousId=["x"], timestamp=[],
                context={"userAgent": 5, "location": "London"},
                properties={"product_id": 1.0, "category": ["x"], "email": False})
    row = one_row(env)
    assert pd.isna(row["customer_id"]) and pd.isna(row["anonymous_id"]) and pd.isna(row["observed_at"])
    assert row["product_id"] == "1" and pd.isna(row["category"]) and pd.isna(row["email"])
    payload = order(customer="nope", line_items={"a": 1}, total_price=1e400, created_at=12)
    row = one_row(shopify("orders/create", payload))
    assert pd.isna(row["customer_id"]) and pd.isna(row["category"]) and pd.isna(row["order_total_minor"])


def test_mixed_batch_keeps_counts_and_order():
    envelopes = [track(messageId="a"), "junk", shopify("orders/create", order()),
                 mailchimp("subscribe", {"email": "x@y.z"}), track("Nope", messageId="b")]
    frame, rejects = envelopes_to_canonical(envelopes, CATALOGUE)
    assert list(frame["source"]) == ["web", "shop", "esp"]
    assert len(frame) + len(rejects) == len(envelopes)
    assert list(frame.columns) == list(canonical.CANONICAL_COLUMNS)
    assert str(frame["observed_at"].dtype) == "datetime64[us, UTC]"


def test_empty_input():
    frame, rejects = envelopes_to_canonical([], CATALOGUE)
    assert len(frame) == 0 and rejects == []
    assert list(frame.columns) == list(canonical.CANONICAL_COLUMNS)


def test_extreme_times_do_not_break_the_frame():
    env = track(timestamp="0001-01-01T00:00:00Z", sentAt="9999-12-31T23:59:59Z")
    row = one_row(env)
    assert pd.isna(row["observed_at"])  # the skew correction overflowed: null, row kept
    row = one_row(track(timestamp=1e20))
    assert pd.isna(row["observed_at"])


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=5),
    max_leaves=30,
)
key_values = {
    "v": st.sampled_from([1, 1, 1, 2, "1", None]),
    "transport": st.sampled_from(["track", "shopify", "mailchimp", "x", None]),
    "topic": st.sampled_from(["track", "orders/create", "orders/cancelled", "checkouts/create",
                              "customers/update", "customers/redact", "subscribe", "cleaned",
                              "upemail", "profile", None]),
    "delivery_id": json_values,
    "received_at": st.sampled_from([RECEIVED, "garbage", None, 12]),
    "headers": json_values,
    "payload": st.dictionaries(
        st.sampled_from(["type", "event", "messageId", "timestamp", "sentAt", "context",
                         "properties", "customer", "line_items", "total_price", "currency",
                         "created_at", "data", "fired_at", "id", "email", "userId"]),
        json_values | st.sampled_from(["Product Viewed", "track", "2026-11-28T10:00:00Z", "12.5"]),
        max_size=10,
    ) | json_values,
}


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.fixed_dictionaries({}, optional=key_values) | json_values, max_size=12))
def test_random_input_never_raises_and_nothing_is_dropped(envelopes):
    frame, rejects = envelopes_to_canonical(envelopes, CATALOGUE)
    assert len(frame) + len(rejects) == len(envelopes)
    assert list(frame.columns) == list(canonical.CANONICAL_COLUMNS)
    for reject in rejects:
        assert set(reject) == {"delivery_id", "transport", "topic", "received_at", "reason", "raw"}
        assert reject["reason"]
    json.dumps([r["reason"] for r in rejects])


# --------------------------------------------------------------------------- files


def test_read_landing_file_tolerates_a_torn_last_line(tmp_path):
    good = [track(messageId=f"m{i}") for i in range(2)]
    path = tmp_path / "f.jsonl"
    path.write_bytes(b"".join(json.dumps(e).encode() + b"\n" for e in good) + b'{"v":1,"deliv')
    envelopes = read_landing_file(path)
    assert envelopes[:2] == good
    assert envelopes[2][UNREADABLE_KEY]["reason"].startswith("torn last line")
    assert envelopes[2][UNREADABLE_KEY]["line"] == 3
    frame, rejects = envelopes_to_canonical(envelopes, CATALOGUE)
    assert len(frame) == 2 and len(rejects) == 1
    assert rejects[0]["raw"][UNREADABLE_KEY]["text"] == '{"v":1,"deliv'


def test_read_landing_file_corrupt_middle_line_and_missing_final_newline(tmp_path):
    path = tmp_path / "g.jsonl"
    path.write_bytes(json.dumps(track()).encode() + b"\n\xff\xfe garbage\n\n" + json.dumps(track()).encode())
    envelopes = read_landing_file(path)
    assert len(envelopes) == 3
    assert envelopes[1][UNREADABLE_KEY]["reason"] == "landing line is not valid JSON"
    assert envelopes[2] == track()  # complete, only the newline was missing


def test_timezone_is_always_utc():
    row = one_row(shopify("orders/create", order(created_at="2026-11-28T23:30:00+09:00")))
    assert row["observed_at"] == pd.Timestamp(datetime(2026, 11, 28, 14, 30, tzinfo=timezone.utc))
    assert row["observed_at"].tzinfo is not None
    assert row["received_at"] - row["observed_at"] > timedelta(hours=-24)


def test_rows_point_back_to_their_envelopes():
    envelopes = ["junk", track(messageId="a"), track("Nope"), shopify("orders/create", order())]
    frame, _ = envelopes_to_canonical(envelopes, CATALOGUE)
    assert frame.attrs["envelope_positions"] == [1, 3]
    assert list(frame["source_record_id"]) == ["a", "wh-1"]
