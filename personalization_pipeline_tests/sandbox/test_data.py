"""The synthetic world: determinism, realistic overlap and messiness, ground truth."""

from __future__ import annotations

import hashlib
import re
from datetime import datetime, timezone

import numpy as np
import pytest

from personalization_pipeline.sandbox.data import (
    CITIES,
    FIRST_NAMES,
    PRODUCT_CATEGORIES,
    SortedIndex,
    generate_world,
)

NOW = datetime(2026, 11, 28, 10, 0, 0, tzinfo=timezone.utc)


def _arrays(world):
    out = {"emails": world.emails, "first": world.first, "last": world.last, "city": world.city}
    for table in ("contacts", "members", "customers", "web", "activity"):
        part = getattr(world, table)
        for name in part.__dataclass_fields__:
            out[f"{table}.{name}"] = getattr(part, name)
    return out


def test_same_seed_gives_the_same_world_and_another_seed_does_not():
    a, b = generate_world(7, 3000, NOW), generate_world(7, 3000, NOW)
    arrays_a, arrays_b = _arrays(a), _arrays(b)
    for name in arrays_a:
        assert np.array_equal(arrays_a[name], arrays_b[name]), name
    assert a.products == b.products and a.campaigns == b.campaigns
    assert a.ground_truth().equals(b.ground_truth())
    c = generate_world(8, 3000, NOW)
    assert not np.array_equal(a.contacts.person, c.contacts.person)
    assert not np.array_equal(a.emails, c.emails)


@pytest.fixture(scope="module")
def world():
    return generate_world(11, 20_000, NOW)


def test_overlap_between_systems_is_realistic(world):
    stats = world.overlap()
    assert stats["crm_fraction"] == pytest.approx(0.70, abs=0.02)
    assert stats["esp_fraction"] == pytest.approx(0.75, abs=0.02)
    assert stats["shop_fraction"] == pytest.approx(0.50, abs=0.02)
    assert 0.15 < stats["in_one_system"] < 0.35
    assert stats["in_three_systems"] > 0.2
    # The awkward cases exist.
    assert stats["crm_shared_addresses"] >= 20
    assert stats["recycled_addresses"] >= 20
    assert stats["crm_people_with_two_contacts"] >= 20
    assert stats["crm_emails_with_whitespace"] > 200
    assert stats["crm_emails_with_case_change"] > 200


def test_shared_addresses_belong_to_different_people(world):
    c = world.contacts
    refs, counts = np.unique(c.email_ref[c.email_ref >= 0], return_counts=True)
    shared = refs[counts > 1]
    families = [r for r in shared if world.email(int(r)).startswith("info")]
    assert families
    for ref in families[:20]:
        people = c.person[c.email_ref == ref]
        assert len(set(people.tolist())) == 2
        assert world.email(int(ref)).endswith("-family.net")


def test_names_cities_and_emails_vary_between_systems(world):
    c = world.contacts
    canonical = FIRST_NAMES.canonical[world.first[c.person]]
    spelled = c.firstname
    differs = (spelled >= 0) & (spelled != canonical)
    assert differs.mean() > 0.05
    spellings = {FIRST_NAMES.strings[i] for i in spelled[differs][:5000]}
    assert {"Bill", "Liz", "Bob"} & spellings  # nicknames
    assert any(s.isupper() for s in spellings) and any(s.islower() for s in spellings)  # case
    assert any(s in spellings for s in ("Jose", "Zoe", "Francois", "Renee", "Soren"))  # accents dropped
    # Cities: some contacts live elsewhere than the person, or are spelled another way.
    person_city = CITIES.canonical[world.city[c.person]]
    has_city = c.city >= 0
    assert 0.1 < (c.city[has_city] != person_city[has_city]).mean() < 0.4
    # Emails: the CRM keeps whitespace and case; normalised, they are the person's address.
    raw = [world.contact_properties(i)["email"] for i in range(2000)]
    assert any(e != e.strip() for e in raw) and any(e.strip() != e.strip().lower() for e in raw)
    for i, e in enumerate(raw):
        if e:
            assert world.find_email(e) == c.email_ref[i]


def test_member_addresses_are_unique_and_hashes_match(world):
    m = world.members
    assert len(np.unique(m.email_ref)) == len(m)
    for j in range(0, len(m), 997):
        email = world.member_email(j)
        assert email == email.strip()
        assert world.member_hashes[j] == hashlib.md5(email.lower().encode()).hexdigest()


def test_ground_truth_covers_every_record(world):
    truth = world.ground_truth()
    assert len(truth) == len(world.contacts) + len(world.members) + len(world.customers) + len(world.web)
    assert set(truth["source"]) == {"crm", "esp", "shop", "web"}
    assert not truth.duplicated(["source", "source_record_id"]).any()
    assert truth["person_id"].between(0, world.size - 1).all()
    # Most people in both CRM and ESP share the address (normalised).
    both = np.intersect1d(world.contacts.person, world.members.person)
    crm_ref = dict(zip(world.contacts.person.tolist(), world.contacts.email_ref.tolist()))
    esp_ref = dict(zip(world.members.person.tolist(), world.members.email_ref.tolist()))
    same = np.mean([crm_ref[p] == esp_ref[p] for p in both.tolist()])
    assert 0.6 < same < 0.98


def test_timestamps_fall_in_the_history_window(world):
    now_ms = int(NOW.timestamp() * 1000)
    start = now_ms - 30 * 86_400_000
    c, m = world.contacts, world.members
    assert c.lastmodifieddate.min() >= start and c.lastmodifieddate.max() < now_ms
    assert (c.createdate <= c.lastmodifieddate).all()
    assert m.last_changed.min() >= start - 1000 and m.last_changed.max() < now_ms
    assert (m.last_changed % 1000 == 0).all()
    # Bulk updates: a few instants shared by many records.
    _, counts = np.unique(c.lastmodifieddate, return_counts=True)
    assert counts.max() > 0.03 * len(c)


def test_catalogue_and_campaigns(world):
    assert len(world.products) == 200
    assert {p["product_type"] for p in world.products} == set(PRODUCT_CATEGORIES)
    assert all(re.fullmatch(r"\d+\.\d{2}", p["price"]) for p in world.products)
    assert len({p["id"] for p in world.products}) == 200
    assert len(world.campaigns) >= 2 and len(world.activity) > 0
    assert set(np.unique(world.activity.action).tolist()) <= {0, 1, 2, 3}
    assert world.activity.timestamp.max() < int(NOW.timestamp() * 1000)
    customer = world.customer_record(0)
    assert customer["default_address"]["country_code"] and 1 <= len(customer["anonymous_ids"]) <= 3


def test_generate_rejects_naive_now():
    with pytest.raises(ValueError):
        generate_world(1, 10, datetime(2026, 1, 1))


def test_sorted_index_stays_exact_under_moves():
    rng = np.random.default_rng(3)
    keys = rng.integers(0, 50, 500).astype(np.int64)
    index = SortedIndex(keys)
    for _ in range(30):
        rows = np.unique(rng.integers(0, 500, 20))
        new = rng.integers(0, 60, len(rows)).astype(np.int64)
        index.move(rows, keys[rows], new)
        keys[rows] = new
        expected = np.lexsort((np.arange(500), keys))
        assert np.array_equal(index.rows, expected)
        assert np.array_equal(index.keys, keys[expected])
    a, b = index.span(10, 20)
    assert set(index.rows[a:b].tolist()) == set(np.flatnonzero((keys >= 10) & (keys <= 20)).tolist())
