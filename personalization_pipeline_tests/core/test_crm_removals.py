"""Merged-away and vanished HubSpot contacts -> deletion versions; the rotating
reconciliation slice. Pure functions, no I/O."""

from __future__ import annotations

from datetime import datetime, timezone

import pandas as pd

from personalization_pipeline.core.identity import current_state
from personalization_pipeline.core.sources import (
    crm_contacts_to_canonical,
    crm_merged_away_to_canonical,
    crm_vanished_to_canonical,
    merged_object_ids,
    reconcile_slice,
)

RECEIVED = datetime(2026, 11, 28, 10, 50, tzinfo=timezone.utc)


def _contact(cid, lmd, merged=None, email=None):
    props = {"lastmodifieddate": lmd, "hs_object_id": cid, "email": email, "hs_merged_object_ids": merged}
    return {"id": cid, "properties": props, "archived": False}


def test_merged_object_ids_split_trim_and_leave_out_the_record_itself():
    assert merged_object_ids(_contact("7", "2026-11-28T10:30:00.000Z", " 5; 6;;5 ")) == ["5", "6"]
    # A merge that creates a new id lists both old ones; neither is the record itself.
    assert merged_object_ids(_contact("9", "2026-11-28T10:30:00.000Z", "7;8;9")) == ["7", "8"]
    assert merged_object_ids(_contact("7", "2026-11-28T10:30:00.000Z", None)) == []
    assert merged_object_ids({"id": "7"}) == []


def test_each_merged_id_becomes_a_deletion_observed_at_the_survivors_lastmodifieddate():
    records = [
        _contact("7", "2026-11-28T10:30:00.000Z", "5;6", email="a@example.com"),
        _contact("8", "1795869000000", None),  # epoch ms, no merges
    ]
    frame = crm_merged_away_to_canonical(records, RECEIVED)
    assert sorted(frame["source_record_id"]) == ["5", "6"]
    assert (frame["source"] == "crm").all() and (frame["source_class"] == "crm").all()
    assert frame["is_deleted"].all()
    assert (frame["record_kind"] == "contact").all()
    assert (frame["crm_id"] == frame["source_record_id"]).all()
    assert (frame["observed_at"] == pd.Timestamp("2026-11-28T10:30:00Z")).all()
    assert (frame["received_at"] == pd.Timestamp(RECEIVED)).all()
    assert frame["email"].isna().all()  # a deletion carries no identifier but its id
    assert crm_merged_away_to_canonical([records[1]], RECEIVED).empty
    assert crm_merged_away_to_canonical([], RECEIVED).empty


def test_an_id_listed_by_two_versions_keeps_the_latest_statement():
    records = [
        _contact("7", "2026-11-28T10:30:00.000Z", "5"),
        _contact("9", "2026-11-28T10:40:00.000Z", "5;7"),  # 7 (with 5) merged into 9 later
    ]
    frame = crm_merged_away_to_canonical(records, RECEIVED).set_index("source_record_id")
    assert sorted(frame.index) == ["5", "7"]
    assert frame.loc["5", "observed_at"] == pd.Timestamp("2026-11-28T10:40:00Z")


def test_a_merged_contact_stops_contributing_and_the_survivor_stays():
    history = pd.concat(
        [
            crm_contacts_to_canonical(
                [_contact("5", "2026-11-28T09:00:00.000Z", email="old@example.com"),
                 _contact("7", "2026-11-28T09:10:00.000Z", email="keep@example.com")],
                RECEIVED,
            ),
            crm_contacts_to_canonical([_contact("7", "2026-11-28T10:30:00.000Z", "5", email="keep@example.com")], RECEIVED),
            crm_merged_away_to_canonical([_contact("7", "2026-11-28T10:30:00.000Z", "5")], RECEIVED),
        ],
        ignore_index=True,
    )
    live = current_state(history)
    assert sorted(live["source_record_id"]) == ["7"]
    assert "old@example.com" not in set(live["email"])


def test_vanished_contacts_become_deletions_observed_when_found_gone():
    found = datetime(2026, 11, 28, 10, 45, tzinfo=timezone.utc)
    frame = crm_vanished_to_canonical(["12", "3", "12"], found, RECEIVED)
    assert list(frame["source_record_id"]) == ["12", "3"]
    assert frame["is_deleted"].all() and (frame["source"] == "crm").all()
    assert (frame["observed_at"] == pd.Timestamp(found)).all()
    assert crm_vanished_to_canonical([], found, RECEIVED).empty
    history = pd.concat(
        [crm_contacts_to_canonical([_contact("3", "2026-11-28T09:00:00.000Z", email="x@example.com")], RECEIVED), frame],
        ignore_index=True,
    )
    assert current_state(history).empty


def test_reconcile_slice_sweeps_every_id_in_bounded_slices_then_starts_over():
    ids = [str(i) for i in (5, 100, 7, 23, 1000, 8, 9, 42, 11)]  # numeric order, not string order
    seen, cursor, runs = [], None, 0
    while True:
        chosen, cursor = reconcile_slice(ids, cursor, 4)
        assert len(chosen) <= 4
        seen.extend(chosen)
        runs += 1
        if cursor is None:
            break
    assert seen == ["5", "7", "8", "9", "11", "23", "42", "100", "1000"]
    assert runs == 3  # ceil(9 / 4)
    again, _ = reconcile_slice(ids, None, 4)
    assert again == ["5", "7", "8", "9"]
    # The cursor is an id, not a position: ids that left or arrived meanwhile shift nothing.
    chosen, cursor = reconcile_slice(["5", "6", "9", "11", "23"], "8", 2)
    assert chosen == ["9", "11"] and cursor == "11"
    assert reconcile_slice([], None, 4) == ([], None)
    assert reconcile_slice(ids, "1000", 4) == ([], None)
    assert reconcile_slice(ids, None, 0) == ([], None)
