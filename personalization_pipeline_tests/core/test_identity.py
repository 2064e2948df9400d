"""Identity resolution (PRODUCT.md sections 4 and 5): hand-made cases and properties.

The properties compare ``resolve_identities`` with a plain-Python reference that replays
every edge in the canonical order, so the fast path (components, then an ordered pass over
only the components that break a limit) is held to the rule as written.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from personalization_pipeline.core import canonical
from personalization_pipeline.core.canonical import IDENTIFIER_TYPES, SOURCE_CLASS, SOURCES
from personalization_pipeline.core.identity import (
    IdentityLimits,
    _canonical_order,
    _pack_keys,
    current_state,
    normalise_values,
    profile_id_changes,
    resolve_identities,
)

CONFIG = Path(__file__).resolve().parents[2] / "personalization_pipeline" / "config"
KIND = {"crm": "contact", "esp": "member", "shop": "event", "web": "event"}


def ts(day: int, hour: int = 0, micro: int = 0) -> str:
    return f"2025-03-{day:02d}T{hour:02d}:00:00.{micro:06d}Z"


def rec(source: str, record_id: str, day: int, **fields) -> dict:
    row = {
        "source": source,
        "source_class": SOURCE_CLASS[source],
        "source_record_id": record_id,
        "observed_at": ts(day),
        "received_at": ts(day, 1),
        "record_kind": KIND[source],
        "event_type": "page_viewed" if KIND[source] == "event" else None,
    }
    row.update(fields)
    return row


def frame(*rows: dict) -> pd.DataFrame:
    return canonical.to_frame(list(rows))


def quick_frame(rows: list[dict]) -> pd.DataFrame:
    """``canonical.to_frame`` for the property tests, about twice as fast (same result)."""
    data = {}
    for field in canonical.CANONICAL_SCHEMA:
        values = [row.get(field.name) for row in rows]
        if pa.types.is_timestamp(field.type):
            data[field.name] = pd.to_datetime(
                pd.Series(values, dtype=object), utc=True, format="ISO8601"
            ).astype("datetime64[us, UTC]")
        elif pa.types.is_boolean(field.type):
            data[field.name] = pd.Series([bool(v) for v in values], dtype="boolean")
        elif pa.types.is_integer(field.type):
            data[field.name] = pd.Series(values, dtype="Int64")
        else:
            data[field.name] = pd.Series(values, dtype="str")
    return pd.DataFrame(data)


def test_quick_frame_is_to_frame():
    rows = [
        rec("crm", "1", 1, crm_id="x", order_total_minor=5, city=None),
        rec("web", "2", 2, anonymous_id="a", is_deleted=True, cart_items=3),
    ]
    pd.testing.assert_frame_equal(quick_frame(rows), canonical.to_frame(rows))


def pid(kind: str, value: str) -> str:
    return "p_" + hashlib.sha256(f"{kind}:{value}".encode()).hexdigest()[:16]


def profiles_of(result) -> dict[tuple[str, str], str]:
    rp = result.record_profiles
    return dict(zip(zip(rp["source"], rp["source_record_id"]), rp["profile_id"]))


def identity_of(result) -> dict[tuple[str, str], str]:
    im = result.identity_map
    return dict(zip(zip(im["identifier_type"], im["identifier_value"]), im["profile_id"]))


# current_state


def test_current_state_keeps_the_latest_version_and_drops_deleted_records():
    history = frame(
        rec("crm", "1", 1, crm_id="1", city="Paris"),
        rec("crm", "1", 3, crm_id="1", city=None),
        rec("crm", "1", 2, crm_id="1", city="Rome"),
        rec("crm", "2", 1, crm_id="2"),
        rec("crm", "2", 2, crm_id="2", is_deleted=True),
        rec("crm", "3", 1, crm_id="3", is_deleted=True),
        rec("crm", "3", 2, crm_id="3", city="Oslo"),
        rec("esp", "m1", 1, email="a@x.com", email_consent="subscribed"),
    )
    current = current_state(history, sort=True)
    # Sorted by (source, observed_at, source_record_id).
    assert list(zip(current["source"], current["source_record_id"])) == [
        ("crm", "3"),
        ("crm", "1"),
        ("esp", "m1"),
    ]
    assert current.loc[0, "city"] == "Oslo"
    assert pd.isna(current.loc[1, "city"])  # cleared in the latest version
    assert list(current.columns) == list(canonical.CANONICAL_COLUMNS)
    assert current.dtypes.equals(history.dtypes)
    # Unsorted, the surviving versions keep their order in the history.
    unsorted = current_state(history)
    assert list(zip(unsorted["source_record_id"], unsorted["observed_at"].dt.day)) == [
        ("1", 3),
        ("3", 2),
        ("m1", 1),
    ]


def test_current_state_breaks_observed_at_ties_by_received_at():
    early = rec("crm", "1", 1, crm_id="1", city="Early")
    late = rec("crm", "1", 1, crm_id="1", city="Late", received_at=ts(2))
    for rows in ([early, late], [late, early]):
        assert current_state(frame(*rows))["city"].tolist() == ["Late"]


def test_current_state_drops_exact_event_redeliveries():
    event = rec("web", "d1", 1, anonymous_id="a1")
    again = dict(event)
    other = rec("web", "d2", 1, anonymous_id="a1")
    current = current_state(frame(event, other, again))
    assert sorted(current["source_record_id"]) == ["d1", "d2"]


def test_current_state_is_independent_of_row_order():
    rows = [
        rec("crm", "1", 1, crm_id="1", city="A"),
        rec("crm", "1", 1, crm_id="1", city="B"),  # same version twice, different content
        rec("web", "e1", 2, anonymous_id="x"),
        rec("web", "e0", 2, anonymous_id="y"),
        rec("shop", "s1", 2, customer_id="k"),
    ]
    expected = current_state(frame(*rows), sort=True)
    for permutation in ([4, 3, 2, 1, 0], [1, 0, 3, 4, 2], [2, 4, 0, 3, 1]):
        got = current_state(frame(*[rows[i] for i in permutation]), sort=True)
        pd.testing.assert_frame_equal(got, expected)
        unsorted = current_state(frame(*[rows[i] for i in permutation]))
        pd.testing.assert_frame_equal(
            unsorted.sort_values(["source", "source_record_id"]).reset_index(drop=True),
            expected.sort_values(["source", "source_record_id"]).reset_index(drop=True),
        )


def test_current_state_of_nothing_is_empty():
    assert current_state(canonical.empty_frame()).empty


# resolve_identities: edges, normalisation, blocked values


def test_a_record_links_its_highest_identifier_to_the_others():
    current = frame(
        rec("crm", "101", 1, crm_id="101", email=" Ann@Example.COM "),
        rec("esp", "m1", 2, email="ann@example.com"),
        rec("web", "w1", 3, anonymous_id="a1", email="ANN@example.com"),
    )
    result = resolve_identities(current, IdentityLimits())
    expected = pid("crm_id", "101")
    assert set(profiles_of(result).values()) == {expected}
    assert identity_of(result) == {
        ("crm_id", "101"): expected,
        ("email", "ann@example.com"): expected,
        ("anonymous_id", "a1"): expected,
    }
    first_seen = dict(zip(result.identity_map["identifier_value"], result.identity_map["first_seen"]))
    assert first_seen["ann@example.com"] == pd.Timestamp(ts(1))
    assert first_seen["a1"] == pd.Timestamp(ts(3))
    assert result.conflicts.empty
    assert result.components.to_dict("records") == [
        {
            "profile_id": expected,
            "size": 3,
            "n_crm_id": 1,
            "n_customer_id": 0,
            "n_email": 1,
            "n_anonymous_id": 1,
        }
    ]


def test_edges_form_a_star_not_every_pair():
    # The web record's star is customer_id -> anonymous_id; email -> anonymous_id is not
    # an edge, so the second customer with the same email stays apart.
    current = frame(
        rec("shop", "s1", 1, customer_id="k1", email="shared@x.com"),
        rec("shop", "s2", 2, customer_id="k2", email="shared@x.com"),
    )
    result = resolve_identities(current, IdentityLimits())
    profiles = profiles_of(result)
    assert profiles[("shop", "s1")] == pid("customer_id", "k1")
    assert profiles[("shop", "s2")] == pid("customer_id", "k2")
    assert len(result.conflicts) == 1


@pytest.mark.parametrize(
    "blocked",
    ["", "   ", "null", "NULL", " None ", "undefined", "Unknown", "0", "-1", "000", "--", "0-0-"],
)
def test_blocked_values_never_link(blocked):
    current = frame(
        rec("web", "w1", 1, anonymous_id="a1", email=blocked, customer_id=blocked),
        rec("web", "w2", 2, anonymous_id="a2", email=blocked, customer_id=blocked),
        rec("web", "w3", 3, anonymous_id=blocked, email=blocked),
    )
    result = resolve_identities(current, IdentityLimits())
    profiles = profiles_of(result)
    assert profiles == {
        ("web", "w1"): pid("anonymous_id", "a1"),
        ("web", "w2"): pid("anonymous_id", "a2"),
    }  # w3 has no usable identifier: it belongs to no profile
    assert set(result.identity_map["identifier_value"]) == {"a1", "a2"}


def test_arrow_normalisation_matches_the_canonical_helpers():
    samples = [
        " A@B.com ", "a@b.com", "\tX\n", "null", "NuLL", " none", "undefined", "UNKNOWN",
        "0", "-1", "-0-", "0000", "", "  ", "abc", "Ünïcode@Ex.com", "0a", "1-0", None,
    ]
    for kind in IDENTIFIER_TYPES:
        got = normalise_values(kind, pa.array(samples, type=pa.large_string())).to_pylist()
        assert got == [canonical.normalise_identifier(kind, value) for value in samples]
        helper = canonical.normalise_identifiers(
            pd.DataFrame({name: samples if name == kind else [None] * len(samples) for name in IDENTIFIER_TYPES})
        )[kind]
        assert got == [None if pd.isna(value) else value for value in helper]


@settings(max_examples=200, deadline=None)
@given(st.lists(st.text(alphabet=" \t0-aAbBnulNUL@.", max_size=8), max_size=20))
def test_arrow_normalisation_matches_the_canonical_helpers_on_random_text(samples):
    for kind in ("email", "anonymous_id"):
        got = normalise_values(kind, pa.array(samples, type=pa.large_string())).to_pylist()
        assert got == [canonical.normalise_identifier(kind, value) for value in samples]


# limits and conflicts


def test_the_crm_id_limit_rejects_the_shared_email_and_both_contacts_keep_a_profile():
    current = frame(
        rec("crm", "101", 1, crm_id="101", email="family@x.com"),
        rec("crm", "102", 2, crm_id="102", email="Family@x.com"),
        rec("esp", "m1", 3, email="family@x.com"),
    )
    result = resolve_identities(current, IdentityLimits())
    profiles = profiles_of(result)
    first, second = pid("crm_id", "101"), pid("crm_id", "102")
    assert profiles == {("crm", "101"): first, ("crm", "102"): second, ("esp", "m1"): first}
    assert identity_of(result)[("email", "family@x.com")] == first
    conflict = result.conflicts.to_dict("records")
    assert len(conflict) == 1
    assert conflict[0]["from_type"] == "crm_id" and conflict[0]["from_value"] == "102"
    assert conflict[0]["to_type"] == "email" and conflict[0]["to_value"] == "family@x.com"
    assert conflict[0]["trust_source"] == "crm"
    assert conflict[0]["first_seen"] == pd.Timestamp(ts(2))
    assert "crm_id limit 1" in conflict[0]["reason"]


def test_the_email_limit_rejects_the_fourth_address():
    rows = [
        rec("shop", f"s{day}", day, customer_id="k1", email=f"e{day}@x.com") for day in (1, 2, 3, 4)
    ]
    result = resolve_identities(frame(*rows), IdentityLimits())
    profiles = profiles_of(result)
    assert set(profiles.values()) == {pid("customer_id", "k1")}  # every record keeps k1
    identity = identity_of(result)
    assert identity[("email", "e4@x.com")] == pid("email", "e4@x.com")  # left on its own
    assert [identity[("email", f"e{d}@x.com")] for d in (1, 2, 3)] == [pid("customer_id", "k1")] * 3
    assert result.conflicts["reason"].tolist() == ["email limit 3 exceeded (merge would give 4)"]


def test_limits_are_configurable():
    rows = [rec("web", f"w{d}", d, customer_id="k1", anonymous_id=f"a{d}") for d in (1, 2, 3)]
    result = resolve_identities(frame(*rows), IdentityLimits(anonymous_id=2))
    assert len(result.conflicts) == 1
    assert result.conflicts.loc[0, "to_value"] == "a3"
    assert "anonymous_id limit 2" in result.conflicts.loc[0, "reason"]


def test_the_more_trusted_edge_wins_even_when_seen_later():
    # Both CRM contacts claim the email; the ESP-carried edge is not in play (esp member
    # has only the email). The shop customer k1 saw it first, but crm edges go first.
    current = frame(
        rec("shop", "s1", 1, customer_id="k1", email="e@x.com"),
        rec("crm", "101", 5, crm_id="101", email="e@x.com"),
        rec("crm", "102", 9, crm_id="102", customer_id="k1"),
    )
    result = resolve_identities(current, IdentityLimits())
    # Edges: crm 101-e (crm, day 5), crm 102-k1 (crm, day 9), shop k1-e (shop, day 1).
    # Both crm edges go in; the shop edge would merge two crm_ids and is rejected.
    assert result.conflicts[["from_value", "to_value", "trust_source"]].values.tolist() == [
        ["k1", "e@x.com", "shop"]
    ]
    profiles = profiles_of(result)
    assert profiles[("shop", "s1")] == pid("crm_id", "102")
    assert identity_of(result)[("email", "e@x.com")] == pid("crm_id", "101")


def test_the_earlier_edge_wins_within_a_trust_level():
    current = frame(
        rec("crm", "102", 2, crm_id="102", email="e@x.com"),
        rec("crm", "101", 3, crm_id="101", email="e@x.com"),
    )
    result = resolve_identities(current, IdentityLimits())
    assert identity_of(result)[("email", "e@x.com")] == pid("crm_id", "102")
    assert result.conflicts.loc[0, "from_value"] == "101"


def test_edge_ties_break_by_the_higher_end_value():
    current = frame(
        rec("crm", "b", 2, crm_id="b", email="e@x.com"),
        rec("crm", "a", 2, crm_id="a", email="e@x.com"),
    )
    result = resolve_identities(current, IdentityLimits())
    assert identity_of(result)[("email", "e@x.com")] == pid("crm_id", "a")


# anchors and profile ids


def test_anchor_is_highest_type_then_earliest_then_smallest():
    current = frame(
        rec("web", "w1", 1, anonymous_id="zzz", email="late@x.com"),
        rec("web", "w2", 2, anonymous_id="aaa", email="late@x.com"),
    )
    result = resolve_identities(current, IdentityLimits())
    assert set(profiles_of(result).values()) == {pid("email", "late@x.com")}
    anon_only = frame(
        rec("web", "w1", 2, anonymous_id="aaa", customer_id=None),
        rec("web", "w2", 1, anonymous_id="zzz"),
    )
    result = resolve_identities(anon_only, IdentityLimits())
    assert set(profiles_of(result).values()) == {pid("anonymous_id", "aaa"), pid("anonymous_id", "zzz")}


def test_the_profile_id_changes_when_an_email_joins_an_anonymous_profile():
    before = frame(rec("web", "w1", 1, anonymous_id="a1"), rec("web", "w2", 2, anonymous_id="a1"))
    after = frame(
        rec("web", "w1", 1, anonymous_id="a1"),
        rec("web", "w2", 2, anonymous_id="a1"),
        rec("web", "w3", 3, anonymous_id="a1", email="new@x.com"),
    )
    old = resolve_identities(before, IdentityLimits()).record_profiles
    new = resolve_identities(after, IdentityLimits()).record_profiles
    assert set(old["profile_id"]) == {pid("anonymous_id", "a1")}
    assert set(new["profile_id"]) == {pid("email", "new@x.com")}
    changes = profile_id_changes(old, new)
    assert changes.to_dict("records") == [
        {"old_profile_id": pid("anonymous_id", "a1"), "new_profile_id": pid("email", "new@x.com")}
    ]
    assert profile_id_changes(new, new).empty


def test_profile_id_changes_records_merges_and_vanished_profiles():
    before = frame(
        rec("web", "w1", 1, anonymous_id="a1"),
        rec("web", "w2", 2, anonymous_id="a2"),
        rec("web", "w3", 3, anonymous_id="a3"),
    )
    after = frame(
        rec("web", "w1", 1, anonymous_id="a1", customer_id="k"),
        rec("web", "w2", 2, anonymous_id="a2", customer_id="k"),
    )
    old = resolve_identities(before, IdentityLimits()).record_profiles
    new = resolve_identities(after, IdentityLimits()).record_profiles
    changes = profile_id_changes(old, new)
    k = pid("customer_id", "k")
    expected = sorted(
        [
            (pid("anonymous_id", "a1"), k),
            (pid("anonymous_id", "a2"), k),
            (pid("anonymous_id", "a3"), None),
        ]
    )
    got = [(o, None if pd.isna(n) else n) for o, n in changes.itertuples(index=False)]
    assert got == expected


def test_records_without_identifiers_and_empty_input():
    result = resolve_identities(canonical.empty_frame(), IdentityLimits())
    for name, expected in (
        ("identity_map", ["identifier_type", "identifier_value", "profile_id", "first_seen"]),
        ("record_profiles", ["source", "source_record_id", "profile_id"]),
        ("components", ["profile_id", "size", "n_crm_id", "n_customer_id", "n_email", "n_anonymous_id"]),
    ):
        assert list(getattr(result, name).columns) == expected
        assert getattr(result, name).empty


# IdentityLimits


def test_identity_limits_from_the_default_yaml():
    assert IdentityLimits.from_yaml(CONFIG / "identity_limits.yaml") == IdentityLimits(1, 1, 3, 50)


def test_identity_limits_reject_bad_files(tmp_path):
    bad = tmp_path / "limits.yaml"
    bad.write_text("crm_id: 1\nphone: 2\n")
    with pytest.raises(ValueError, match="limits.yaml.*phone"):
        IdentityLimits.from_yaml(bad)
    bad.write_text("email: 0\n")
    with pytest.raises(ValueError, match="email"):
        IdentityLimits.from_yaml(bad)
    bad.write_text("email: 2\n")
    assert IdentityLimits.from_yaml(bad) == IdentityLimits(email=2)


# sorting helpers


@settings(max_examples=100, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.integers(-3, 3),
            st.sampled_from([np.iinfo(np.int64).min, -(2**62), 0, 5, 2**61, np.iinfo(np.int64).max]),
            st.integers(0, 2),
            st.text(alphabet="ab", max_size=3),
        ),
        min_size=1,
        max_size=30,
        unique=True,
    )
)
def test_canonical_order_sorts_like_python(rows):
    keys = [np.array([row[i] for row in rows], dtype=np.int64) for i in range(3)]
    strings = np.array([row[3] for row in rows], dtype=object)
    order = _canonical_order(keys, [strings])
    assert [rows[i] for i in order] == sorted(rows)
    packed = _pack_keys(keys)
    assert len(packed) <= 3


# properties

POOLS = {
    "crm_id": ["c1", "c2", "c3", " c1", "null"],
    "customer_id": ["k1", "k2", "k3", "0"],
    "email": ["a@x.com", "A@x.com ", "b@x.com", "c@x.com", "d@x.com", "e@x.com", "unknown"],
    "anonymous_id": ["a1", "a2", "a3", "a4", "-1"],
}


@st.composite
def current_states(draw, max_records=14):
    n = draw(st.integers(0, max_records))
    rows = []
    for index in range(n):
        source = draw(st.sampled_from(SOURCES))
        row = rec(source, f"r{index}", draw(st.integers(1, 4)))
        row["observed_at"] = ts(draw(st.integers(1, 3)), draw(st.integers(0, 1)))
        for kind, pool in POOLS.items():
            if draw(st.integers(0, 2)) == 0:
                row[kind] = draw(st.sampled_from(pool))
        rows.append(row)
    return quick_frame(rows) if rows else canonical.empty_frame()


def reference_resolve(current: pd.DataFrame, limits: IdentityLimits):
    """PRODUCT.md section 5 in plain Python: every edge replayed in the canonical order."""
    trust = {source: rank for rank, source in enumerate(SOURCES)}
    type_rank = {kind: rank for rank, kind in enumerate(IDENTIFIER_TYPES)}
    limit = {kind: getattr(limits, kind) for kind in IDENTIFIER_TYPES}
    first_seen: dict = {}
    edges: dict = {}
    records = {}
    for row in current.to_dict("records"):
        nodes = []
        for kind in IDENTIFIER_TYPES:
            value = canonical.normalise_identifier(kind, row[kind])
            if value is not None:
                nodes.append((kind, value))
        for node in nodes:
            first_seen[node] = min(first_seen.get(node, row["observed_at"]), row["observed_at"])
        if nodes:
            records[(row["source"], row["source_record_id"])] = nodes[0]
            for other in nodes[1:]:
                old = edges.get((nodes[0], other), (99, pd.Timestamp.max.tz_localize("UTC")))
                edges[(nodes[0], other)] = (
                    min(old[0], trust[row["source"]]),
                    min(old[1], row["observed_at"]),
                )
    parent = {node: node for node in first_seen}
    members = {node: [node] for node in first_seen}

    def find(node):
        while parent[node] != node:
            node = parent[node]
        return node

    def end(node):
        return (type_rank[node[0]], node[1])

    rejected = []
    for (high, low), (edge_trust, seen) in sorted(
        edges.items(), key=lambda item: (item[1][0], item[1][1], end(item[0][0]), end(item[0][1]))
    ):
        a, b = find(high), find(low)
        if a == b:
            continue
        merged = members[a] + members[b]
        if any(sum(1 for n in merged if n[0] == kind) > limit[kind] for kind in IDENTIFIER_TYPES):
            rejected.append((high, low))
            continue
        parent[b] = a
        members[a] = merged
        del members[b]
    node_profile = {}
    for root, nodes in members.items():
        anchor = min(nodes, key=lambda n: (type_rank[n[0]], first_seen[n], n[1]))
        for node in nodes:
            node_profile[node] = pid(*anchor)
    record_profile = {key: node_profile[node] for key, node in records.items()}
    return node_profile, record_profile, rejected


@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(current_states(), st.sampled_from([IdentityLimits(), IdentityLimits(1, 1, 2, 2), IdentityLimits(2, 1, 1, 1)]))
def test_resolution_equals_the_reference_replay(current, limits):
    result = resolve_identities(current, limits)
    nodes, records, rejected = reference_resolve(current, limits)
    assert identity_of(result) == nodes
    assert profiles_of(result) == records
    conflicts = result.conflicts
    assert list(
        zip(
            zip(conflicts["from_type"], conflicts["from_value"]),
            zip(conflicts["to_type"], conflicts["to_value"]),
        )
    ) == rejected


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(current_states(), st.randoms(use_true_random=False))
def test_resolution_is_invariant_under_row_permutation(current, random):
    expected = resolve_identities(current, IdentityLimits())
    order = list(range(len(current)))
    random.shuffle(order)
    shuffled = current.iloc[order].reset_index(drop=True)
    got = resolve_identities(shuffled, IdentityLimits())
    for name in ("identity_map", "record_profiles", "conflicts", "components"):
        pd.testing.assert_frame_equal(getattr(got, name), getattr(expected, name))


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(current_states(max_records=20), st.sampled_from([IdentityLimits(), IdentityLimits(1, 1, 1, 1)]))
def test_limits_hold_and_every_identified_record_has_exactly_one_profile(current, limits):
    result = resolve_identities(current, limits)
    counts = result.identity_map.groupby(["profile_id", "identifier_type"]).size()
    for (_, kind), count in counts.items():
        assert count <= getattr(limits, kind)
    components = result.components.set_index("profile_id")
    for kind in IDENTIFIER_TYPES:
        assert (components[f"n_{kind}"] <= getattr(limits, kind)).all()
    assert components["size"].sum() == len(result.identity_map)

    rp = result.record_profiles
    assert not rp.duplicated(["source", "source_record_id"]).any()
    identified = {
        (row["source"], row["source_record_id"])
        for row in current.to_dict("records")
        if any(canonical.normalise_identifier(k, row[k]) is not None for k in IDENTIFIER_TYPES)
    }
    assert set(zip(rp["source"], rp["source_record_id"])) == identified
    assert set(rp["profile_id"]) <= set(result.identity_map["profile_id"])
    # Every rejected edge joins two different profiles.
    identity = identity_of(result)
    for row in result.conflicts.to_dict("records"):
        assert identity[(row["from_type"], row["from_value"])] != identity[(row["to_type"], row["to_value"])]
