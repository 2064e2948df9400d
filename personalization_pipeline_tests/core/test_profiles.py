"""Resolved profiles (PRODUCT.md section 6): conflict rules, aggregates, provenance.

Hand-made cases for each rule, then properties against a plain-Python reference of the
rules and for independence from row order.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from personalization_pipeline.core import canonical
from personalization_pipeline.core.canonical import SOURCES
from personalization_pipeline.core.identity import IdentityLimits, current_state, resolve_identities
from personalization_pipeline.core.profiles import AGGREGATE_COLUMNS, aligned_rows_of, build_profiles
from personalization_pipeline.core.rules import load_conflict_rules
from personalization_pipeline_tests.core.test_identity import pid, quick_frame, rec, ts

CONFIG = Path(__file__).resolve().parents[2] / "personalization_pipeline" / "config"
RULES = load_conflict_rules(CONFIG / "conflict_rules.yaml")


def build(*rows: dict, history: bool = False, limits: IdentityLimits = IdentityLimits(), **kwargs):
    frame = canonical.to_frame(list(rows))
    current = current_state(frame) if history else frame
    result = resolve_identities(current, limits)
    kwargs.setdefault("identity_map", result.identity_map)
    profiles, provenance = build_profiles(current, result.record_profiles, RULES, **kwargs)
    return profiles.set_index("profile_id", drop=False), provenance


def event(source: str, record_id: str, day: int, event_type: str, hour: int = 0, **fields) -> dict:
    return rec(source, record_id, day, record_kind="event", event_type=event_type,
               observed_at=ts(day, hour), **fields)


K1 = pid("customer_id", "k1")
C1 = pid("crm_id", "c1")


# conflict rules


def test_a_stale_crm_city_loses_to_a_newer_web_event():
    profiles, provenance = build(
        rec("crm", "101", 1, crm_id="c1", customer_id="k1", city="New York"),
        event("web", "w1", 5, "page_viewed", customer_id="k1", anonymous_id="a1", city="London"),
    )
    assert profiles.loc[C1, "city"] == "London"
    row = provenance[(provenance["profile_id"] == C1) & (provenance["attribute"] == "city")]
    assert row[["value", "source", "source_record_id", "tier"]].values.tolist() == [
        ["London", "web", "w1", 0]
    ]
    assert row["observed_at"].tolist() == [pd.Timestamp(ts(5))]


def test_a_newer_crm_city_beats_an_older_web_event():
    profiles, _ = build(
        event("web", "w1", 1, "page_viewed", customer_id="k1", city="London"),
        rec("crm", "101", 5, crm_id="c1", customer_id="k1", city="New York"),
    )
    assert profiles.loc[C1, "city"] == "New York"


def test_a_recent_purchase_beats_a_later_product_view():
    profiles, provenance = build(
        event("shop", "s1", 1, "order_completed", customer_id="k1", shop="main", order_id="o1",
              order_total_minor=100, category="shoes"),
        event("web", "w1", 9, "product_viewed", customer_id="k1", category="hats", product_id="p9"),
    )
    assert profiles.loc[K1, "next_best_category"] == "shoes"
    tier = provenance.set_index("attribute").loc["next_best_category", "tier"]
    assert tier == 0
    # Browsing fills in when there is no purchase.
    profiles, provenance = build(
        event("web", "w1", 9, "product_viewed", customer_id="k1", category="hats", product_id="p9"),
    )
    assert profiles.loc[K1, "next_best_category"] == "hats"
    assert provenance.set_index("attribute").loc["next_best_category", "tier"] == 1


def test_a_value_cleared_at_the_source_stops_counting():
    rows = [
        rec("crm", "101", 1, crm_id="c1", city="Paris", first_name="Ann"),
        rec("crm", "101", 3, crm_id="c1", city=None, first_name="Ann"),
    ]
    profiles, provenance = build(*rows, history=True)
    assert pd.isna(profiles.loc[C1, "city"])
    assert "city" not in set(provenance["attribute"])
    # Another source's older value takes over once the CRM value is gone.
    profiles, _ = build(
        *rows,
        event("web", "w1", 2, "page_viewed", crm_id=None, customer_id=None, anonymous_id="a1",
              email=None, city="Lyon"),
        rec("crm", "101", 4, crm_id="c1", anonymous_id="a1", city="", first_name="Ann"),
        history=True,
    )
    assert profiles.loc[C1, "city"] == "Lyon"


def test_empty_and_blank_values_never_win():
    profiles, _ = build(
        rec("crm", "101", 1, crm_id="c1", first_name="Ann"),
        rec("crm", "101", 2, crm_id="c1", first_name="   "),
        history=True,
    )
    assert C1 not in profiles.index or pd.isna(profiles.loc[C1, "first_name"])
    profiles, _ = build(
        rec("crm", "101", 1, crm_id="c1", customer_id="k1", first_name=" "),
        event("shop", "s1", 2, "order_completed", customer_id="k1", first_name="Anna"),
    )
    assert profiles.loc[C1, "first_name"] == "Anna"


def test_a_better_tier_beats_a_newer_observation():
    profiles, provenance = build(
        rec("crm", "101", 1, crm_id="c1", email="a@x.com", first_name="Ann", last_name="Lee"),
        rec("esp", "m1", 5, email="a@x.com", first_name="Annie", last_name="Leigh",
            email_consent="subscribed"),
        event("shop", "s1", 4, "order_completed", crm_id=None, email="a@x.com", last_name="Li"),
    )
    assert profiles.loc[C1, ["first_name", "last_name"]].tolist() == ["Ann", "Lee"]
    profiles, provenance = build(
        rec("esp", "m1", 1, email="a@x.com", first_name="Annie", last_name="Leigh"),
        event("shop", "s1", 4, "order_completed", email="a@x.com", first_name="Anna"),
    )
    e = pid("email", "a@x.com")
    assert profiles.loc[e, ["first_name", "last_name"]].tolist() == ["Anna", "Leigh"]
    tiers = provenance.set_index("attribute")["tier"].to_dict()
    assert tiers["first_name"] == 1 and tiers["last_name"] == 2


def test_classes_a_rule_does_not_name_are_ignored():
    profiles, _ = build(
        rec("esp", "m1", 5, email="a@x.com", city="Esp City", email_consent="unsubscribed",
            device_type="desktop", loyalty_tier="gold"),
        event("web", "w1", 1, "page_viewed", email="a@x.com", anonymous_id="a1",
              email_consent="subscribed", device_type="mobile"),
    )
    e = pid("email", "a@x.com")
    assert pd.isna(profiles.loc[e, "city"])
    assert pd.isna(profiles.loc[e, "loyalty_tier"])
    assert profiles.loc[e, "email_consent"] == "unsubscribed"
    assert profiles.loc[e, "device_type"] == "mobile"


def test_email_consent_latest_esp_observation_wins():
    profiles, _ = build(
        rec("esp", "m1", 1, email="a@x.com", email_consent="subscribed"),
        event("esp", "hook1", 3, "unsubscribed", email="a@x.com", email_consent="unsubscribed"),
        event("esp", "hook0", 2, "subscribed", email="a@x.com", email_consent="subscribed"),
    )
    assert profiles.loc[pid("email", "a@x.com"), "email_consent"] == "unsubscribed"


def test_ties_break_by_source_then_record_id_as_strings():
    same = dict(observed_at=ts(2))
    profiles, provenance = build(
        rec("web", "w9", 2, anonymous_id="a1", customer_id="k1", country="DE", **same),
        rec("shop", "s2", 2, customer_id="k1", country="FR", event_type="order_completed", **same),
        rec("shop", "s10", 2, customer_id="k1", country="GB", event_type="order_completed", **same),
    )
    # "shop" < "web", then "s10" < "s2" as strings.
    assert profiles.loc[K1, "country"] == "GB"
    assert provenance.set_index("attribute").loc["country", "source_record_id"] == "s10"


# aggregates


def order(record_id: str, day: int, order_id: str, total: int, source: str = "shop", **fields) -> dict:
    return event(source, record_id, day, "order_completed", customer_id="k1", shop="main",
                 order_id=order_id, order_total_minor=total, currency="EUR", **fields)


def cancel(record_id: str, day: int, order_id: str) -> dict:
    return event("shop", record_id, day, "order_cancelled", customer_id="k1", shop="main",
                 order_id=order_id)


def test_orders_count_once_per_shop_and_order_id_and_cancellations_subtract_once():
    profiles, _ = build(
        order("d1", 1, "o1", 1000),
        order("d2", 2, "o1", 1000),  # a second delivery of the same order
        order("d3", 3, "o2", 250),
        order("d4", 4, "o3", 400),
        cancel("d5", 5, "o3"),
        cancel("d6", 6, "o3"),  # cancelled twice: subtracts once
        cancel("d7", 6, "o-unknown"),  # never counted: subtracts nothing
        order("w1", 7, "o4", 9999, source="web"),  # a track "Order Completed" is no order
        event("shop", "d8", 8, "order_completed", customer_id="k1", shop="other", order_id="o1",
              order_total_minor=50),  # same order id in another shop is another order
    )
    assert profiles.loc[K1, "order_count"] == 3
    assert profiles.loc[K1, "lifetime_value"] == 1000 + 250 + 50
    assert profiles.loc[K1, "last_order_at"] == pd.Timestamp(ts(8))


def test_a_profile_whose_only_order_was_cancelled_has_no_orders():
    profiles, _ = build(order("d1", 1, "o1", 1000), cancel("d2", 2, "o1"))
    assert profiles.loc[K1, ["order_count", "lifetime_value"]].tolist() == [0, 0]
    assert pd.isna(profiles.loc[K1, "last_order_at"])


def test_open_cart_is_the_latest_checkout_after_the_last_order():
    checkout = lambda rid, day, value, items: event(  # noqa: E731
        "shop", rid, day, "checkout_started", customer_id="k1", cart_value_minor=value,
        cart_items=items)
    profiles, _ = build(checkout("c1", 1, 500, 1), order("d1", 2, "o1", 500),
                        checkout("c2", 3, 700, 2), checkout("c3", 4, 900, 3))
    assert profiles.loc[K1, ["cart_value", "cart_items"]].tolist() == [900, 3]
    assert profiles.loc[K1, "cart_started_at"] == pd.Timestamp(ts(4))
    profiles, _ = build(checkout("c1", 1, 500, 1), order("d1", 2, "o1", 500))
    assert pd.isna(profiles.loc[K1, "cart_value"]) and pd.isna(profiles.loc[K1, "cart_started_at"])
    assert profiles["cart_value"].dtype == "Int64"


def test_last_seen_viewed_and_email_engagement():
    profiles, _ = build(
        rec("esp", "m1", 1, email="a@x.com"),
        event("web", "w1", 2, "product_viewed", email="a@x.com", product_id="p1"),
        event("web", "w2", 3, "product_viewed", email="a@x.com", product_id="p2"),
        event("web", "w3", 4, "page_viewed", email="a@x.com"),
        event("esp", "e1", 5, "email_opened", email="a@x.com"),
        event("esp", "e2", 6, "email_clicked", email="a@x.com"),
        event("esp", "e3", 7, "email_opened", email="a@x.com"),
    )
    row = profiles.loc[pid("email", "a@x.com")]
    assert row["last_viewed_product"] == "p2"
    assert row["last_email_open_at"] == pd.Timestamp(ts(7))
    assert row["last_email_click_at"] == pd.Timestamp(ts(6))
    assert row["last_seen_at"] == pd.Timestamp(ts(7))
    assert row["order_count"] == 0 and row["lifetime_value"] == 0


# emails and profile membership


def test_primary_email_is_the_earliest_seen_and_emails_are_sorted():
    profiles, _ = build(
        event("shop", "s1", 3, "order_completed", customer_id="k1", email="b@x.com"),
        event("shop", "s2", 1, "order_completed", customer_id="k1", email="c@x.com"),
        event("shop", "s3", 1, "order_completed", customer_id="k1", email="Z@x.com"),
    )
    assert profiles.loc[K1, "primary_email"] == "c@x.com"
    assert profiles.loc[K1, "emails"] == ["b@x.com", "c@x.com", "z@x.com"]


def test_a_rejected_edge_keeps_the_shared_email_on_the_first_contact_only():
    rows = (
        rec("crm", "101", 1, crm_id="c1", email="family@x.com", first_name="Ann"),
        rec("crm", "102", 2, crm_id="c2", email="family@x.com", first_name="Bob"),
    )
    profiles, _ = build(*rows)
    c2 = pid("crm_id", "c2")
    assert profiles.loc[C1, "emails"] == ["family@x.com"]
    assert profiles.loc[c2, "emails"] == [] and pd.isna(profiles.loc[c2, "primary_email"])
    assert profiles.loc[c2, "first_name"] == "Bob"
    # Without the identity map the emails come from each profile's own records.
    profiles, _ = build(*rows, identity_map=None)
    assert profiles.loc[c2, "emails"] == ["family@x.com"]


def test_a_profile_with_identifiers_but_no_records_gets_a_row():
    rows = [order(f"s{d}", d, f"o{d}", 10, email=f"e{d}@x.com") for d in (1, 2, 3, 4)]
    profiles, _ = build(*rows)
    lonely = pid("email", "e4@x.com")
    assert profiles.loc[lonely, "emails"] == ["e4@x.com"]
    assert profiles.loc[lonely, "order_count"] == 0
    assert profiles.loc[K1, "order_count"] == 4


def test_columns_dtypes_and_an_empty_state():
    profiles, provenance = build(rec("crm", "101", 1, crm_id="c1", city="Oslo"))
    assert list(profiles.columns) == [
        "profile_id", "primary_email", "emails", *RULES.attributes, *AGGREGATE_COLUMNS
    ]
    assert str(profiles["order_count"].dtype) == "int64"
    assert str(profiles["lifetime_value"].dtype) == "int64"
    assert str(profiles["last_seen_at"].dtype) == "datetime64[us, UTC]"
    assert list(provenance.columns) == [
        "profile_id", "attribute", "value", "source", "source_record_id", "observed_at", "tier"
    ]
    empty = canonical.empty_frame()
    result = resolve_identities(empty, IdentityLimits())
    profiles, provenance = build_profiles(empty, result.record_profiles, RULES, result.identity_map)
    assert profiles.empty and provenance.empty
    assert list(profiles.columns) == [
        "profile_id", "primary_email", "emails", *RULES.attributes, *AGGREGATE_COLUMNS
    ]


# properties

VALUES = ["Paris", "Oslo", "", "  ", None, "Rome"]
EVENTS = ["page_viewed", "product_viewed", "checkout_started", "order_completed",
          "order_cancelled", "email_opened", "email_clicked"]


@st.composite
def current_states(draw):
    n = draw(st.integers(1, 12))
    rows = []
    for index in range(n):
        source = draw(st.sampled_from(SOURCES))
        row = rec(source, f"r{draw(st.integers(0, 3))}{index}", 1)
        row["observed_at"] = ts(draw(st.integers(1, 3)), draw(st.integers(0, 1)))
        if row["record_kind"] == "event":
            row["event_type"] = draw(st.sampled_from(EVENTS))
            row["shop"] = draw(st.sampled_from(["main", "other", None]))
            row["order_id"] = draw(st.sampled_from(["o1", "o2", None]))
            row["order_total_minor"] = draw(st.sampled_from([100, 250, None]))
            row["cart_value_minor"] = draw(st.sampled_from([10, None]))
            row["cart_items"] = draw(st.sampled_from([1, None]))
            row["product_id"] = draw(st.sampled_from(["p1", "p2", None, ""]))
        row["customer_id"] = draw(st.sampled_from(["k1", "k2", None]))
        row["email"] = draw(st.sampled_from(["a@x.com", "b@x.com", None]))
        row["anonymous_id"] = draw(st.sampled_from(["a1", None]))
        row["crm_id"] = draw(st.sampled_from(["c1", "c2", None])) if source == "crm" else None
        for column in ("first_name", "city", "country", "email_consent", "category", "device_type"):
            row[column] = draw(st.sampled_from(VALUES))
        rows.append(row)
    return quick_frame(rows)


def reference_attributes(current: pd.DataFrame, record_profiles: pd.DataFrame) -> dict:
    """Section 6 rules in plain Python: {(profile_id, attribute): (value, source, id, tier)}."""
    profile_of = dict(zip(zip(record_profiles["source"], record_profiles["source_record_id"]),
                          record_profiles["profile_id"]))
    best: dict = {}
    for row in current.to_dict("records"):
        profile = profile_of.get((row["source"], row["source_record_id"]))
        if profile is None:
            continue
        for attribute, tiers in RULES.attributes.items():
            for tier_index, tier in enumerate(tiers):
                column = tier.get(row["source_class"])
                if column is None:
                    continue
                value = row[column]
                if value is None or pd.isna(value) or not str(value).strip():
                    continue
                key = (tier_index, -row["observed_at"].value, row["source"], row["source_record_id"])
                if (profile, attribute) not in best or key < best[(profile, attribute)][0]:
                    best[(profile, attribute)] = (key, (value, row["source"], row["source_record_id"], tier_index))
    return {key: item[1] for key, item in best.items()}


def reference_orders(current: pd.DataFrame, record_profiles: pd.DataFrame) -> dict:
    profile_of = dict(zip(zip(record_profiles["source"], record_profiles["source_record_id"]),
                          record_profiles["profile_id"]))
    rows = [r for r in current.to_dict("records") if (r["source"], r["source_record_id"]) in profile_of]
    first: dict = {}
    for r in rows:
        if r["source"] == "shop" and r["event_type"] == "order_completed" and isinstance(r["order_id"], str):
            key = (r["shop"] if isinstance(r["shop"], str) else "", r["order_id"])
            candidate = (r["observed_at"], r["source_record_id"], r)
            if key not in first or candidate[:2] < first[key][:2]:
                first[key] = candidate
    cancelled = {
        (r["shop"] if isinstance(r["shop"], str) else "", r["order_id"])
        for r in rows
        if r["source"] == "shop" and r["event_type"] == "order_cancelled" and isinstance(r["order_id"], str)
    }
    totals: dict = {}
    for key, (_, _, r) in first.items():
        if key in cancelled:
            continue
        profile = profile_of[(r["source"], r["source_record_id"])]
        count, value = totals.get(profile, (0, 0))
        total = r["order_total_minor"]
        totals[profile] = (count + 1, value + (0 if pd.isna(total) else int(total)))
    return totals


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(current_states())
def test_attributes_and_orders_equal_the_reference(current):
    result = resolve_identities(current, IdentityLimits(1, 1, 1, 1))
    profiles, provenance = build_profiles(current, result.record_profiles, RULES, result.identity_map)
    expected = reference_attributes(current, result.record_profiles)
    got = {
        (row["profile_id"], row["attribute"]): (row["value"], row["source"], row["source_record_id"], row["tier"])
        for row in provenance.to_dict("records")
    }
    assert got == expected
    indexed = profiles.set_index("profile_id")
    for (profile, attribute), (value, *_) in expected.items():
        assert indexed.loc[profile, attribute] == value
    orders = reference_orders(current, result.record_profiles)
    for profile, row in indexed.iterrows():
        assert (row["order_count"], row["lifetime_value"]) == orders.get(profile, (0, 0))
    assert profiles["profile_id"].is_unique
    assert profiles["profile_id"].tolist() == sorted(profiles["profile_id"])
    assert set(profiles["profile_id"]) == set(result.identity_map["profile_id"])


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(current_states(), st.randoms(use_true_random=False), st.booleans())
def test_profiles_are_invariant_under_row_permutation(current, random, with_map):
    result = resolve_identities(current, IdentityLimits())
    identity_map = result.identity_map if with_map else None
    expected = build_profiles(current, result.record_profiles, RULES, identity_map)
    order = list(range(len(current)))
    random.shuffle(order)
    shuffled = current.iloc[order].reset_index(drop=True)
    assigned = result.record_profiles.sample(frac=1, random_state=random.randint(0, 1000))
    got = build_profiles(shuffled, assigned, RULES, identity_map)
    for got_frame, expected_frame in zip(got, expected):
        pd.testing.assert_frame_equal(got_frame, expected_frame)
    # The current state in its canonical order lines up with record_profiles by position.
    # record_profiles lines up with the current state by position, in any row order.
    for state in (current_state(shuffled), current_state(shuffled, sort=True)):
        state_result = resolve_identities(state, IdentityLimits())
        assert aligned_rows_of(state, state_result.record_profiles) is not None
        identity_map = state_result.identity_map if with_map else None
        aligned = build_profiles(state, state_result.record_profiles, RULES, identity_map)
        for got_frame, expected_frame in zip(aligned, expected):
            pd.testing.assert_frame_equal(got_frame, expected_frame)


def test_records_with_only_blocked_identifiers_fall_back_to_the_join():
    current = current_state(canonical.to_frame([
        rec("web", "w1", 1, anonymous_id="a1", city="Oslo"),
        rec("web", "w2", 2, anonymous_id="null", city="Rome"),
        rec("web", "w3", 3, anonymous_id="a1", device_type="tablet"),
    ]))
    result = resolve_identities(current, IdentityLimits())
    assert aligned_rows_of(current, result.record_profiles) is None
    profiles, _ = build_profiles(current, result.record_profiles, RULES, result.identity_map)
    assert profiles[["city", "device_type"]].values.tolist() == [["Oslo", "tablet"]]


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(current_states(), st.booleans())
def test_profile_ids_of_another_shape_give_the_same_profiles(current, drop_a_profile):
    # build_profiles reads p_<16 hex> ids as numbers; any other id goes the string way.
    result = resolve_identities(current, IdentityLimits())
    expected = build_profiles(current, result.record_profiles, RULES, result.identity_map)

    def renamed(frame):
        return frame.assign(profile_id=("person/" + frame["profile_id"]).astype("str"))

    identity_map = renamed(result.identity_map)
    drop_a_profile = drop_a_profile and not identity_map.empty
    if drop_a_profile:  # a record's profile missing from the map still gets its row
        first = identity_map["profile_id"].iloc[0]
        identity_map = identity_map[identity_map["profile_id"] != first]
    got = build_profiles(current, renamed(result.record_profiles), RULES, identity_map)
    for got_frame, expected_frame in zip(got, expected):
        back = got_frame.assign(profile_id=got_frame["profile_id"].str.removeprefix("person/"))
        if drop_a_profile:
            back = back.drop(columns=["primary_email", "emails"], errors="ignore")
            expected_frame = expected_frame.drop(
                columns=["primary_email", "emails"], errors="ignore"
            )
            keep = expected_frame["profile_id"].isin(back["profile_id"])
            expected_frame = expected_frame[keep].reset_index(drop=True)
        pd.testing.assert_frame_equal(back, expected_frame)
