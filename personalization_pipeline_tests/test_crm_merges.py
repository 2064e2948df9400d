"""Merged and gdpr-deleted HubSpot contacts stop contributing, over real HTTP against the
sandbox: the merge announces itself through the survivor's `hs_merged_object_ids` in the
window pull; a gdpr-deleted contact, in no list at all, is found by the bounded
reconciliation in `crm_deletions`."""

from __future__ import annotations

from datetime import datetime, timezone

import dagster as dg
import pandas as pd
import requests

from personalization_pipeline.assets.profiles import identity_and_profiles, open_store
from personalization_pipeline.assets.sources import crm_contacts, crm_deletions, esp_members, source_snapshot
from personalization_pipeline.core.identity import current_state
from personalization_pipeline.resources.hubspot import HubSpotResource
from personalization_pipeline.resources.lake import Lake
from personalization_pipeline_tests.test_pipeline_e2e import PARTITION, RUN_NOW, WORLD_NOW, world  # noqa: F401 (fixture)

MERGE_TIME = datetime(2026, 11, 28, 10, 30, tzinfo=timezone.utc)
CONTACTS = "/crm/v3/objects/contacts"


def _metadata(result: dg.ExecuteInProcessResult, key: str) -> dict:
    events = [e.materialization for e in result.get_asset_materialization_events() if e.asset_key == dg.AssetKey(key)]
    assert events, f"{key} was not materialised"
    return {k: v.value for k, v in events[-1].metadata.items()}


def _tables(tmp) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """identity_map, resolved_profiles and profile_attribute_provenance as published."""
    store = open_store(Lake(tmp / "lake"))
    return store.identity_map(), store.profiles(), store.provenance()


def _crm_ids(identity: pd.DataFrame) -> set[str]:
    return set(identity.loc[identity["identifier_type"] == "crm_id", "identifier_value"])


def _emails(identity: pd.DataFrame) -> set[str]:
    return set(identity.loc[identity["identifier_type"] == "email", "identifier_value"])


def _api(sandbox, config):
    session = requests.Session()
    session.headers["Authorization"] = f"Bearer {config.hubspot_private_app_token}"
    return session, sandbox.hubspot_url + CONTACTS


def _exclusive_contacts(tmp, identity: pd.DataFrame) -> dict[str, str]:
    """Live CRM contacts in the profiles whose email no other live record carries: when
    such a contact goes, its email must leave the profile tables with it."""
    live = current_state(pd.concat([pd.read_parquet(p) for p in (tmp / "lake" / "staged").glob("*/*.parquet")]))
    emails = live["email"].str.strip().str.lower()
    counts = emails.value_counts()
    crm = live[(live["source"] == "crm") & emails.notna()]
    return {
        cid: emails[i]
        for i, cid in crm["source_record_id"].items()
        if counts.get(emails[i], 0) == 1 and cid in _crm_ids(identity) and emails[i] in _emails(identity)
    }


def test_merged_and_gdpr_deleted_contacts_stop_contributing(world):  # noqa: F811
    sandbox, clock, resources, tmp, instance = world
    assert dg.materialize([source_snapshot], resources=resources, instance=instance).success
    assert dg.materialize([identity_and_profiles], resources=resources, instance=instance).success
    identity, _, provenance = _tables(tmp)
    exclusive = _exclusive_contacts(tmp, identity)
    assert len(exclusive) >= 3
    survivor, merged_away, erased = sorted(exclusive, key=int)[:3]
    assert {"crm"} <= set(provenance.loc[provenance["source_record_id"] == merged_away, "source"])

    # In HubSpot, weeks later: one duplicate merged into another, one contact gdpr-deleted.
    clock.advance((MERGE_TIME - WORLD_NOW).total_seconds())
    session, url = _api(sandbox, sandbox.config)
    merge = session.post(f"{url}/merge", json={"primaryObjectId": survivor, "objectIdToMerge": merged_away})
    assert merge.status_code == 200 and merge.json()["id"] == survivor
    assert session.post(f"{url}/gdpr-delete", json={"objectId": erased}).status_code == 204
    assert session.get(f"{url}/{merged_away}").json()["id"] == survivor  # HubSpot answers with the survivor

    # The hour's pull stages the survivor and, in the same partition, the merged id's deletion.
    pulled = dg.materialize([crm_contacts, esp_members], resources=resources, partition_key=PARTITION, instance=instance)
    assert pulled.success
    assert _metadata(pulled, "crm_contacts")["merged_away"] == 1
    staged = pd.read_parquet(tmp / "lake" / "staged" / "crm" / f"{PARTITION.replace(':', '-')}.parquet")
    deletion = staged[staged["source_record_id"] == merged_away]
    assert len(deletion) == 1 and bool(deletion["is_deleted"].iloc[0])
    assert deletion["observed_at"].iloc[0] == pd.Timestamp(MERGE_TIME)
    assert survivor in set(staged.loc[~staged["is_deleted"], "source_record_id"])

    # The sweep finds the gdpr-deleted contact (in no list) and nothing else.
    swept = dg.materialize([crm_deletions], resources=resources, instance=instance)
    meta = _metadata(swept, "crm_deletions")
    assert meta["vanished_contacts"] == 1 and meta["archived_contacts"] == 0
    assert meta["merged_away_found"] == 0  # the pull staged the merge already
    deletions = pd.read_parquet(tmp / "lake" / "staged" / "crm" / "deletions.parquet")
    assert set(deletions["source_record_id"]) == {erased} and deletions["is_deleted"].all()

    # The next profile run: both are gone from every profile table; the survivor stays.
    assert dg.materialize([identity_and_profiles], resources=resources, instance=instance).success
    identity, profiles, provenance = _tables(tmp)
    crm_ids = _crm_ids(identity)
    assert merged_away not in crm_ids and erased not in crm_ids and survivor in crm_ids
    emails = _emails(identity)
    assert exclusive[merged_away] not in emails and exclusive[erased] not in emails
    assert exclusive[survivor] in emails
    listed = {e for row in profiles["emails"] for e in row}
    assert exclusive[merged_away] not in listed and exclusive[erased] not in listed
    assert not provenance["source_record_id"].isin([merged_away, erased]).any()
    assert (provenance["source_record_id"] == survivor).any()

    # Nothing new on the next sweep: the lake no longer believes them live.
    again = _metadata(dg.materialize([crm_deletions], resources=resources, instance=instance), "crm_deletions")
    assert again["rows_new"] == 0 and again["vanished_contacts"] == 0


def test_reconciliation_is_bounded_per_run_and_covers_every_contact(world):  # noqa: F811
    sandbox, clock, resources, tmp, instance = world
    config = sandbox.config
    bounded = HubSpotResource(
        base_url=sandbox.hubspot_url,
        client_id=config.hubspot_client_id,
        client_secret=config.hubspot_client_secret,
        refresh_token=config.hubspot_refresh_token,
        reconcile_calls_per_run=1,
    )
    resources = {**resources, "hubspot": bounded}
    assert dg.materialize([source_snapshot], resources=resources, instance=instance).success
    live = current_state(pd.read_parquet(tmp / "lake" / "staged" / "crm" / "snapshot.parquet"))
    ids = sorted(live["source_record_id"], key=int)
    assert len(ids) > 200
    clock.advance((MERGE_TIME - WORLD_NOW).total_seconds())
    erased, merged_away, survivor = ids[-1], ids[-2], ids[0]  # checked in the last slice of the sweep
    hub = sandbox.hubspot_state
    hub.gdpr_delete({"objectId": erased})
    hub.merge({"primaryObjectId": survivor, "objectIdToMerge": merged_away})  # its window is never pulled here

    runs = -(-len(ids) // 100)
    checked: list[int] = []
    found = {}
    for run in range(runs):
        result = dg.materialize([crm_deletions], resources=resources, instance=instance)
        meta = _metadata(result, "crm_deletions")
        # One archived-list page and one batch read of at most 100 ids (plus the token).
        assert meta["reconciled_contacts"] <= 100
        assert meta["api_calls"] - meta.get("token_refreshes", 0) <= 2
        assert meta["http_429"] == 0
        checked.append(meta["reconciled_contacts"])
        found.update({k: meta[k] for k in ("vanished_contacts", "merged_away_found") if meta[k]})
        assert (meta["reconcile_cursor"] == "") == (run == runs - 1)
    assert sum(checked) == len(ids)
    assert found == {"vanished_contacts": 1, "merged_away_found": 1}
    deletions = pd.read_parquet(tmp / "lake" / "staged" / "crm" / "deletions.parquet").set_index("source_record_id")
    assert set(deletions.index) == {erased, merged_away}
    # The merged id's deletion is observed at the survivor's lastmodifieddate (the merge),
    # the gdpr-deleted one when the sweep found it gone (the run's clock).
    assert deletions.loc[merged_away, "observed_at"] == pd.Timestamp(MERGE_TIME)
    assert deletions.loc[erased, "observed_at"] == pd.Timestamp(RUN_NOW)
    assert deletions["is_deleted"].all()
