"""HubSpot contact merges in the sandbox, over real HTTP: the primary keeps its id and
lists the merged ids in `hs_merged_object_ids`; the merged-away id leaves search and list;
reading it answers with the contact it went into."""

from __future__ import annotations

from .conftest import HUBSPOT
from .test_hubspot import CONTACTS, everything, pull, search, window

MERGED_PROPS = ["email", "firstname", "city", "lastmodifieddate", "hs_object_id", "hs_merged_object_ids"]


def _merge(http, sandbox, primary, merged):
    return http.post(
        f"{sandbox.hubspot_url}{CONTACTS}/merge",
        headers=HUBSPOT,
        json={"primaryObjectId": primary, "objectIdToMerge": merged},
    )


def test_merge_keeps_the_primary_and_retires_the_other_id(fresh, http, clock):
    url = fresh.hubspot_url + CONTACTS
    first, second, third = (c["id"] for c in everything(http, fresh)[:3])
    now = clock.advance(60)
    now_ms = int(now.timestamp() * 1000)

    r = _merge(http, fresh, first, second)
    assert r.status_code == 200, r.text
    answer = r.json()
    assert answer["id"] == first
    assert answer["properties"]["hs_merged_object_ids"] == second
    assert answer["updatedAt"] == answer["properties"]["lastmodifieddate"]

    # The survivor comes back in the window of the merge, with the merged id listed.
    found = search(http, fresh, {"filterGroups": window(now_ms, now_ms + 1), "properties": MERGED_PROPS}).json()
    found = found["results"]
    assert [x["id"] for x in found] == [first]
    assert found[0]["properties"]["hs_merged_object_ids"] == second
    # The merged-away id is in no search, no list (live or archived).
    everywhere = pull(http, fresh, window(0, now_ms + 1))
    assert second not in {x["id"] for x in everywhere}
    assert second not in {c["id"] for c in everything(http, fresh)}
    archived = http.get(url, params={"archived": "true", "limit": 100}, headers=HUBSPOT).json()["results"]
    assert second not in {x["id"] for x in archived}
    # Reading it answers with the survivor, under the survivor's id (GET and batch read).
    got = http.get(f"{url}/{second}", params={"properties": ",".join(MERGED_PROPS)}, headers=HUBSPOT)
    assert got.status_code == 200 and got.json()["id"] == first
    batch = http.post(f"{url}/batch/read", headers=HUBSPOT,
                      json={"inputs": [{"id": second}], "properties": MERGED_PROPS})
    assert batch.status_code == 200 and [x["id"] for x in batch.json()["results"]] == [first]
    # Writes to it, or merging it again, find nothing.
    assert http.patch(f"{url}/{second}", headers=HUBSPOT, json={"properties": {"city": "Oslo"}}).status_code == 404
    assert _merge(http, fresh, third, second).status_code == 404

    # Merges chain: the survivor merged into a third contact passes its list on.
    clock.advance(60)
    chained = _merge(http, fresh, third, first)
    assert chained.status_code == 200
    assert chained.json()["properties"]["hs_merged_object_ids"] == f"{second};{first}"
    assert http.get(f"{url}/{second}", headers=HUBSPOT).json()["id"] == third


def test_merge_fills_the_primarys_empty_values_and_refuses_bad_input(fresh, http, clock):
    url = fresh.hubspot_url + CONTACTS
    created = http.post(f"{url}/batch/create", headers=HUBSPOT, json={"inputs": [
        {"properties": {"email": "keep@example.org", "firstname": "Keep"}},
        {"properties": {"email": "dup@example.org", "firstname": "Dup", "city": "Lyon"}},
    ]}).json()["results"]
    keep, dup = created[0]["id"], created[1]["id"]
    clock.advance(5)
    merged = _merge(http, fresh, keep, dup).json()
    read = http.get(f"{url}/{keep}", params={"properties": ",".join(MERGED_PROPS)}, headers=HUBSPOT).json()
    assert read["properties"]["firstname"] == "Keep"  # the primary's value wins
    assert read["properties"]["city"] == "Lyon"  # an empty one is filled from the merged contact
    assert read["properties"]["email"] == "keep@example.org"
    assert merged["properties"]["hs_merged_object_ids"] == dup
    assert _merge(http, fresh, keep, keep).status_code == 400
    assert _merge(http, fresh, keep, "999999999999").status_code == 404
    bad = http.post(f"{url}/merge", headers=HUBSPOT, json={"primaryObjectId": keep})
    assert bad.status_code == 400
    # hs_merged_object_ids is HubSpot's to write.
    write = http.patch(f"{url}/{keep}", headers=HUBSPOT, json={"properties": {"hs_merged_object_ids": "1"}})
    assert write.status_code == 400


def test_admin_merge_merges_duplicate_pairs(fresh, http, clock):
    now = clock.advance(30)
    now_ms = int(now.timestamp() * 1000)
    r = http.post(f"{fresh.hubspot_url}/_admin/merge", json={"count": 3})
    assert r.status_code == 200, r.text
    pairs = r.json()["merged"]
    assert len(pairs) == 3
    truth = {c["id"]: c for c in everything(http, fresh)}
    for pair in pairs:
        assert pair["merged"] not in truth
        assert pair["merged"] in truth[pair["primary"]]["properties"]["hs_merged_object_ids"].split(";")
        assert truth[pair["primary"]]["lastmodifieddate_ms"] == now_ms
    # Naming the pair works too; reset brings the merged contacts back.
    first, second = list(truth)[:2]
    named = http.post(f"{fresh.hubspot_url}/_admin/merge", json={"primaryObjectId": first, "objectIdToMerge": second})
    assert named.json()["merged"] == [{"primary": first, "merged": second}]
    http.post(f"{fresh.hubspot_url}/_admin/reset")
    assert second in {c["id"] for c in everything(http, fresh)}
