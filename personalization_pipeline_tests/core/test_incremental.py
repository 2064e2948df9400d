"""The incremental profile step (PRODUCT.md sections 6 and 12), on its production path: the
profile store applying staged batches through its ledger, compared row for row with a full
rebuild and with the pure functions run over the whole current state."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from personalization_pipeline.core import canonical
from personalization_pipeline.core.identity import IdentityLimits, current_state, resolve_identities
from personalization_pipeline.core.incremental import _hash_strings, key_order
from personalization_pipeline.core.profiles import build_profiles
from personalization_pipeline.core.rules import load_conflict_rules
from personalization_pipeline.resources.lake import Lake
from personalization_pipeline.resources.profile_store import ProfileStore
from personalization_pipeline.resources.record_base import base_directory
from personalization_pipeline_tests.core.test_identity import rec, ts

CONFIG = Path(__file__).resolve().parents[2] / "personalization_pipeline" / "config"
RULES = load_conflict_rules(CONFIG / "conflict_rules.yaml")

POOLS = {
    "crm_id": ["c1", "c2", "c3"],
    "customer_id": ["k1", "k2", "k3"],
    "email": ["a@x.com", "b@x.com", " B@x.com", "c@x.com", "info@x.com", "null"],
    "anonymous_id": ["a1", "a2", "a3", "a4"],
}
IDENTIFIERS_BY_SOURCE = {
    "crm": ("crm_id", "email"),
    "esp": ("email",),
    "shop": ("customer_id", "email"),
    "web": ("anonymous_id", "customer_id"),
}


def store(root: Path, limits: IdentityLimits = IdentityLimits(), digest: str = "test") -> ProfileStore:
    return ProfileStore(root, RULES, limits, digest)


def tables(target: ProfileStore) -> dict[str, pd.DataFrame]:
    return {
        "profiles": target.profiles(),
        "provenance": target.provenance(),
        "identity_map": target.identity_map(),
        "conflicts": target.conflicts(),
        "record_profiles": target.record_profiles(),
    }


def assert_same(left: dict[str, pd.DataFrame], right: dict[str, pd.DataFrame]) -> None:
    for name in left:
        pd.testing.assert_frame_equal(
            left[name].reset_index(drop=True), right[name].reset_index(drop=True), obj=name, check_dtype=True
        )


@st.composite
def record_batches(draw):
    """Random source records over small identifier pools (so merges and limit breaks are
    common), with several versions of one record, deletions, orders and cancellations, and
    late versions observed before ones already applied; split into random batches."""
    rows = []
    n = draw(st.integers(1, 28))
    for index in range(n):
        source = draw(st.sampled_from(["crm", "esp", "shop", "web"]))
        versions = draw(st.integers(1, 3)) if source in ("crm", "esp") else 1
        record_id = f"{source}-{draw(st.integers(0, 5)) if source in ('crm', 'esp') else index}"
        for _ in range(versions):
            row = rec(source, record_id, draw(st.integers(1, 9)))
            row["received_at"] = ts(draw(st.integers(10, 12)))
            for kind in IDENTIFIERS_BY_SOURCE[source]:
                if draw(st.integers(0, 3)):
                    row[kind] = draw(st.sampled_from(POOLS[kind]))
            row["city"] = draw(st.sampled_from([None, "Paris", "Rome", ""]))
            row["first_name"] = draw(st.sampled_from([None, "Ann", "Bo"]))
            if source == "esp":
                row["email_consent"] = draw(st.sampled_from(["subscribed", "unsubscribed"]))
            if source in ("crm", "esp") and draw(st.integers(0, 6)) == 0:
                row["is_deleted"] = True
            if source == "shop":
                kind = draw(st.sampled_from(["order_completed", "order_cancelled", "checkout_started"]))
                row["event_type"] = kind
                row["shop"] = "main"
                row["order_id"] = draw(st.sampled_from(["o1", "o2", "o3"]))
                row["order_total_minor"] = draw(st.integers(0, 500))
                row["category"] = draw(st.sampled_from(["shoes", "hats"]))
                row["cart_value_minor"] = 100
                row["cart_items"] = 2
            if source == "web":
                row["event_type"] = draw(st.sampled_from(["page_viewed", "product_viewed"]))
                row["product_id"] = draw(st.sampled_from(["p1", "p2"]))
                row["category"] = draw(st.sampled_from(["shoes", "hats", None]))
            rows.append(row)
    batches = draw(st.integers(1, min(5, len(rows))))
    cut = draw(st.lists(st.integers(0, batches - 1), min_size=len(rows), max_size=len(rows)))
    split = [[row for row, b in zip(rows, cut) if b == k] for k in range(batches)]
    return [batch for batch in split if batch]


def stage(lake: Lake, name: str, rows: list[dict]) -> None:
    frame = canonical.to_frame(rows)
    for source, part in frame.groupby("source"):
        lake.write_staged(str(source), name, part)


LIMITS = [IdentityLimits(), IdentityLimits(1, 1, 2, 2), IdentityLimits(1, 1, 1, 1)]
BACKGROUND = [
    row
    for i in range(20)
    for row in (
        rec("crm", f"bg-{i}", 1, crm_id=f"bg-c{i}", email=f"bg{i}@y.com", city="Lima"),
        rec("web", f"bg-w{i}", 2, anonymous_id=f"bg-a{i}", customer_id=f"bg-k{i}", event_type="page_viewed"),
    )
]


@settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck))
@given(record_batches(), st.sampled_from(LIMITS), st.randoms(use_true_random=False))
def test_incremental_batches_in_any_order_equal_the_full_rebuild(tmp_path_factory, batches, limits, rnd):
    root = tmp_path_factory.mktemp("inc")
    lake = Lake(root / "lake")
    incremental = store(root / "store", limits)
    # People no random batch can reach: an incremental run that recomputes any of them is a
    # full rebuild in disguise.
    stage(lake, "background", BACKGROUND)
    incremental.apply(lake)
    order = list(range(len(batches)))
    rnd.shuffle(order)
    for position in order:
        stage(lake, f"b{position}", batches[position])
        report = incremental.apply(lake)
        batch_records = len({(r["source"], r["source_record_id"]) for r in batches[position]})
        # A changed record reaches its old cluster and its identifiers' clusters; orders
        # reach every cluster holding a delivery of the same order.
        shop_rows = sum(1 for b in batches for r in b if r["source"] == "shop")
        assert report.clusters_touched <= 3 * batch_records + shop_rows
        assert report.records_recomputed <= sum(len(b) for b in batches)  # never a background record
    full = store(root / "full", limits)
    # The rebuild builds profiles shard by shard (clusters sharing an order in one shard):
    # one record per shard, a few, or all in one must all give the same tables.
    full.shard_rows = rnd.choice([1, 3, 1_000_000])
    full.rebuild(lake)
    assert_same(tables(incremental), tables(full))

    # And both equal the pure functions over the whole current state of staged history.
    current = current_state(lake.read_staged())
    result = resolve_identities(current, limits)
    profiles, provenance = build_profiles(current, result.record_profiles, RULES, identity_map=result.identity_map)
    pd.testing.assert_frame_equal(full.profiles(), profiles, check_dtype=False)
    pd.testing.assert_frame_equal(full.provenance(), provenance.reset_index(drop=True), check_dtype=False)
    counts = incremental.counts()
    assert counts["profiles"] == len(profiles)
    assert counts["profiles_without_email"] == int(profiles["primary_email"].isna().sum())
    assert incremental.stats()["largest_component"].iloc[-1] == (result.components["size"].max() if len(profiles) else 0)


def test_an_applied_batch_is_not_applied_twice_and_a_rewritten_one_is_reapplied(tmp_path):
    lake = Lake(tmp_path / "lake")
    target = store(tmp_path / "store")
    stage(lake, "h1", [rec("crm", "1", 1, crm_id="c1", email="a@x.com", city="Paris")])
    first = target.apply(lake)
    assert first.mode == "rebuild"
    again = target.apply(lake)
    assert again.mode == "nothing-new" and again.rows_read == 0
    stage(lake, "h1", [rec("crm", "1", 2, crm_id="c1", email="a@x.com", city="Rome")])
    third = target.apply(lake)
    assert third.mode == "incremental" and third.batches_applied == 1 and third.versions_changed == 1
    assert target.profiles()["city"].tolist() == ["Rome"]
    ledger = target.ledger()
    assert ledger[["source", "batch", "verdict"]].values.tolist() == [["crm", "h1", "passed"]]


def test_a_failed_batch_is_held_back_and_recorded_while_a_good_one_goes_on(tmp_path):
    lake = Lake(tmp_path / "lake")
    target = store(tmp_path / "store")
    stage(lake, "good", [rec("crm", "1", 1, crm_id="c1", email="a@x.com", city="Paris")])
    target.apply(lake)
    bad = canonical.to_frame([rec("crm", "2", 2, crm_id="c2", email="b@x.com", city="Rome")])
    lake.write_staged("crm", "bad", bad, verdict="failed", reason="quarantine check failed")
    good = canonical.to_frame([rec("web", "w1", 3, anonymous_id="a1", customer_id="k9", city="Oslo")])
    lake.write_staged("web", "good2", good)
    report = target.apply(lake)
    assert report.batches_held == ["crm/bad"] and report.batches_applied == 1
    profiles = target.profiles()
    assert sorted(profiles["city"].dropna()) == ["Oslo", "Paris"]  # not Rome
    ledger = target.ledger().set_index(["source", "batch"])
    assert ledger.loc[("crm", "bad"), "verdict"] == "failed"
    assert ledger.loc[("web", "good2"), "verdict"] == "passed"
    # Still held on the next run (listed, not applied again), until a passing write.
    assert target.apply(lake).batches_held == ["crm/bad"]
    lake.write_staged("crm", "bad", bad)
    report = target.apply(lake)
    assert report.batches_held == [] and report.batches_applied == 1
    assert "Rome" in set(target.profiles()["city"])


def test_touched_rows_follow_the_batch_not_the_table(tmp_path):
    lake = Lake(tmp_path / "lake")
    target = store(tmp_path / "store")
    people = [
        rec("crm", str(i), 1, crm_id=f"c{i}", email=f"p{i}@x.com", city="Paris") for i in range(300)
    ] + [rec("web", f"w{i}", 2, anonymous_id=f"a{i}", customer_id=f"k{i}") for i in range(300)]
    stage(lake, "base", people)
    target.apply(lake)
    # One person's new email: one profile touched, a handful of records read.
    stage(lake, "one", [rec("crm", "7", 3, crm_id="c7", email="new7@x.com", city="Rome")])
    report = target.apply(lake)
    assert report.clusters_touched == 1
    assert report.records_recomputed <= 2
    assert report.profiles_written == 1
    # A merge of two profiles through a shared customer id touches exactly those two.
    stage(lake, "merge", [rec("shop", "s1", 4, customer_id="k5", email="p6@x.com", record_kind="event",
                              event_type="order_completed", shop="main", order_id="o1", order_total_minor=5)])
    report = target.apply(lake)
    assert report.clusters_touched == 2
    assert report.records_recomputed <= 5


def test_a_configuration_change_forces_a_rebuild(tmp_path):
    lake = Lake(tmp_path / "lake")
    stage(lake, "h1", [rec("crm", "1", 1, crm_id="c1", email="a@x.com")])
    store(tmp_path / "store", digest="one").apply(lake)
    report = store(tmp_path / "store", digest="two").apply(lake)
    assert report.mode == "rebuild" and "configuration" in report.reason


def test_profile_id_changes_are_recorded_when_an_email_joins_an_anonymous_profile(tmp_path):
    lake = Lake(tmp_path / "lake")
    target = store(tmp_path / "store")
    stage(lake, "b1", [rec("web", "w1", 1, anonymous_id="a1")])
    target.apply(lake)
    before = target.profiles()["profile_id"].tolist()
    stage(lake, "b2", [rec("esp", "m1", 2, email="a@x.com", anonymous_id=None),
                       rec("web", "w2", 3, anonymous_id="a1", customer_id="k1")])
    report = target.apply(lake)
    after = target.profiles()["profile_id"].tolist()
    assert report.profile_id_changes >= 1
    changes = target.changes()
    assert set(changes["old_profile_id"]) >= set(before) - set(after)
    assert set(changes["new_profile_id"].dropna()) <= set(after)


@pytest.mark.parametrize("seed", [1, 2])
def test_a_backfill_delivering_old_partitions_after_newer_ones_gives_the_same_table(tmp_path, seed):
    rng = random.Random(seed)
    hours = []
    for hour in range(6):
        hours.append([
            rec("crm", str(rng.randrange(8)), 1 + hour, crm_id=f"c{rng.randrange(8)}",
                email=f"p{rng.randrange(10)}@x.com", city=rng.choice(["Paris", "Rome", None]))
            for _ in range(6)
        ])
    forward, backward = Lake(tmp_path / "f"), Lake(tmp_path / "b")
    in_order, backfilled = store(tmp_path / "sf"), store(tmp_path / "sb")
    for index in range(6):
        stage(forward, f"h{index}", hours[index])
        in_order.apply(forward)
    for index in [5, 4, 0, 1, 3, 2]:  # live hours first, then the outage backfilled
        stage(backward, f"h{index}", hours[index])
        backfilled.apply(backward)
    assert_same(tables(in_order), tables(backfilled))


def test_incremental_runs_leave_the_rebuilt_base_as_it_was(tmp_path):
    """A full rebuild writes records, identifiers and profiles to immutable base files; a
    later run writes a changed record to the database and marks its base row superseded,
    and replaces its cluster's identifiers and profiles in the database, marking the
    cluster; all in its transaction. Reads by id and in full see the overlay over the
    base. The next rebuild starts a new base and removes the old one."""
    lake = Lake(tmp_path / "lake")
    target = store(tmp_path / "store")
    stage(lake, "b1", [rec("crm", "1", 1, crm_id="c1", email="a@x.com", city="Paris"),
                       rec("crm", "2", 1, crm_id="c2", email="b@x.com", city="Oslo")])
    assert target.apply(lake).mode == "rebuild"
    path = target.current_path()
    base = base_directory(path)
    before = {f.name: f.read_bytes() for f in base.iterdir()}
    stage(lake, "b2", [rec("crm", "1", 2, crm_id="c1", email="a@x.com", city="Rome")])
    report = target.apply(lake)
    assert report.mode == "incremental" and target.current_path() == path
    assert {f.name: f.read_bytes() for f in base.iterdir()} == before
    with target.reader() as cur:
        dead = cur.execute("select count(*) from base_dead").fetchone()[0]
        overlay = cur.execute("select source_record_id, city from records").fetchall()
        dead_clusters = cur.execute("select count(*) from base_dead_clusters").fetchone()[0]
        overlay_profiles = cur.execute("select city from profiles").fetchall()
        overlay_identifiers = cur.execute("select identifier_value from identifiers order by 1").fetchall()
    assert dead == 1 and overlay == [("1", "Rome")]
    assert dead_clusters == 1 and overlay_profiles == [("Rome",)]
    assert overlay_identifiers == [("a@x.com",), ("c1",)]
    profiles = target.profiles()
    assert sorted(profiles["city"]) == ["Oslo", "Rome"]
    assert len(target.record_profiles()) == 2
    # By id: the recomputed profile from the overlay, the other from the base; never both.
    for profile_id, city in zip(profiles["profile_id"], profiles["city"]):
        assert target.profiles([profile_id])["city"].tolist() == [city]
        assert target.provenance(profile_id).query("attribute == 'city'")["value"].tolist() == [city]
    assert target.profiles(["p_0000000000000000"]).empty
    assert sorted(target.identity_map()["identifier_value"]) == ["a@x.com", "b@x.com", "c1", "c2"]
    assert target.counts()["identifiers"] == 4 and target.counts()["profiles"] == 2
    rebuilt = target.rebuild(lake)
    assert rebuilt.mode == "rebuild" and not base.exists() and not path.exists()
    assert sorted(target.profiles()["city"]) == ["Oslo", "Rome"]
    with target.reader() as cur:
        assert cur.execute("select count(*) from base_dead").fetchone()[0] == 0
        assert cur.execute("select count(*) from base_dead_clusters").fetchone()[0] == 0
        assert cur.execute("select count(*) from records").fetchone()[0] == 0
        assert cur.execute("select count(*) from profiles").fetchone()[0] == 0


def test_a_store_of_an_older_format_is_rebuilt(tmp_path):
    lake = Lake(tmp_path / "lake")
    stage(lake, "h1", [rec("crm", "1", 1, crm_id="c1", email="a@x.com")])
    target = store(tmp_path / "store")
    target.apply(lake)
    with target.reader() as cur:
        cur.execute("update meta set value = '1' where key = 'format'")
    report = target.apply(lake)
    assert report.mode == "rebuild" and "format 1 -> " in report.reason


def test_key_order_is_a_stable_argsort_of_the_keys():
    """The packed sort equals numpy's stable argsort, with repeated keys and keys that
    share their high bits (chance matches the packing must put back in order)."""
    rng = np.random.default_rng(5)
    for n in (100, 70_000, 300_000):
        keys = rng.integers(np.iinfo(np.int64).min, np.iinfo(np.int64).max, n, dtype=np.int64)
        keys[n // 3 : n // 2] = keys[: n // 2 - n // 3]  # repeated keys
        keys[:40] = (keys[:40] & ~np.int64(0xFFFFFF)) | rng.integers(0, 0xFFFFFF, 40)
        keys[40:80] = keys[:40] ^ 1  # same high bits, different keys
        keys[80:90] = np.iinfo(np.int64).min
        keys = keys[rng.permutation(n)]
        assert np.array_equal(key_order(keys), np.argsort(keys, kind="stable"))


def test_string_hashes_are_fixed_and_tell_strings_apart():
    """The store's keys are these hashes: they must not change between versions (a stored
    store would no longer find its rows), and must tell apart strings that differ only in
    a partial last word, a trailing NUL or a byte past the eighth."""
    values = ["", "a", "ab", "abcdefgh", "abcdefghi", "abcdefgh\x00", "é", "crm\x1f123", "crm\x1f124"]
    hashes = _hash_strings(pa.array(values, pa.string()))
    assert len(set(hashes.tolist())) == len(values)
    assert hashes.tolist() == [
        7175312947680778460, -8336818752232849737, -5044979702302016773, 4055049404976090046, 1362786803196676507,
        1490208158366124588, -1313532290294299350, -8157479688088278597, -3526783592082643485,
    ]
    # The same from a pandas Series, an offset slice and a chunked array; null as "".
    assert np.array_equal(hashes, _hash_strings(pd.Series(values, dtype=object)))
    assert np.array_equal(hashes, _hash_strings(pa.array(["x"] + values, pa.large_string()).slice(1)))
    assert np.array_equal(hashes, _hash_strings(pa.chunked_array([pa.array(values[:4]), pa.array(values[4:])])))
    assert _hash_strings(pa.array([None, ""], pa.string())).tolist() == [hashes[0], hashes[0]]
    many = pa.array([f"web\x1fevent-{i}" for i in range(200_000)], pa.large_string())
    assert len(np.unique(_hash_strings(many))) == 200_000


def test_identity_result_lines_records_and_profiles_up_by_position():
    frame = canonical.to_frame(
        pd.DataFrame(
            [rec("crm", "1", 1, crm_id="c1", email="a@x.com"), rec("web", "e1", 2, anonymous_id="anon1"),
             rec("esp", "m1", 3, email="a@x.com"), rec("web", "e2", 4), rec("shop", "o1", 5, email="b@x.com")]
        )
    )
    result = resolve_identities(frame, IdentityLimits())
    rp = result.record_profiles
    assert len(result.record_rows) == len(result.record_ranks) == len(rp) == 4
    assert frame["source_record_id"].iloc[result.record_rows].tolist() == rp["source_record_id"].tolist()
    assert result.components["profile_id"].iloc[result.record_ranks].tolist() == rp["profile_id"].tolist()
    # Without the record_profiles table (the store's rebuild): the same positions, the rest equal.
    lean = resolve_identities(frame, IdentityLimits(), record_profiles=False)
    assert lean.record_profiles.empty and list(lean.record_profiles.columns) == list(rp.columns)
    assert lean.record_rows.tolist() == result.record_rows.tolist()
    assert lean.record_ranks.tolist() == result.record_ranks.tolist()
    pd.testing.assert_frame_equal(lean.identity_map, result.identity_map)
    pd.testing.assert_frame_equal(lean.components, result.components)
