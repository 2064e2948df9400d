"""The whole loop in-process over real HTTP: sandbox HubSpot and Mailchimp over OAuth, the
ingest service and simulator, staging, identity, profiles and the push."""

from __future__ import annotations

from datetime import datetime, timezone

import dagster as dg
import pandas as pd
import pytest

from personalization_pipeline.assets.profiles import identity_and_profiles, open_store
from personalization_pipeline.assets.sources import (
    crm_contacts,
    crm_deletions,
    esp_members,
    source_snapshot,
    stream_events,
)
from personalization_pipeline.assets.sync import esp_attribute_sync
from personalization_pipeline.core.clock import ManualClock
from personalization_pipeline.partitions import landing_partition_key
from personalization_pipeline.ingest_service.app import start_ingest_service
from personalization_pipeline.ingest_service.config import IngestConfig
from personalization_pipeline.resources.lake import Lake
from personalization_pipeline.sandbox.server import SandboxConfig, start_sandbox
from personalization_pipeline.sandbox.wiring import sandbox_resources
from personalization_pipeline.simulator import run_simulator

WORLD_NOW = datetime(2026, 10, 31, 20, 0, tzinfo=timezone.utc)  # history ends before the first partition
EDIT_TIME = datetime(2026, 11, 28, 10, 30, tzinfo=timezone.utc)
PARTITION = "2026-11-28-10:00"
RUN_NOW = "2026-11-28T10:50:00Z"


def _ms(moment: datetime) -> int:
    return int(moment.timestamp() * 1000)


@pytest.fixture
def world(tmp_path, monkeypatch):
    monkeypatch.setenv("PP_DATA_DIR", str(tmp_path))
    clock = ManualClock(WORLD_NOW)
    config = SandboxConfig(seed=11, size=400, history_days=20, clock=clock.now, world_now=WORLD_NOW)
    with start_sandbox(config) as sandbox:
        resources = sandbox_resources(sandbox, config, RUN_NOW)
        with dg.instance_for_test() as instance:
            yield sandbox, clock, resources, tmp_path, instance


def _metadata(result: dg.ExecuteInProcessResult, key: str) -> dict:
    events = [e.materialization for e in result.get_asset_materialization_events() if e.asset_key == dg.AssetKey(key)]
    assert events, f"{key} was not materialised"
    return {k: v.value for k, v in events[-1].metadata.items()}


def test_whole_loop_over_real_http(world):
    sandbox, clock, resources, tmp, instance = world
    hub, chimp = sandbox.hubspot_state, sandbox.mailchimp_state

    # First load: everything changed before the first partition.
    snap = dg.materialize([source_snapshot], resources=resources, instance=instance)
    assert snap.success
    meta = _metadata(snap, "source_snapshot")
    assert meta["crm_contacts"] == len(hub.ground_truth(None, _ms(datetime(2026, 11, 1, tzinfo=timezone.utc))))
    assert meta["esp_members"] == len(chimp.ground_truth(None, _ms(datetime(2026, 11, 1, tzinfo=timezone.utc))))

    # Weeks later the CRM and the ESP change; the hour's partition pulls exactly those records.
    clock.advance((EDIT_TIME - WORLD_NOW).total_seconds())
    edited_contacts = set(hub.mutate(25))
    edited_members = set(chimp.mutate(20))
    pulled = dg.materialize([crm_contacts, esp_members], resources=resources, partition_key=PARTITION, instance=instance)
    assert pulled.success
    crm_meta = _metadata(pulled, "crm_contacts")
    truth = {c["id"] for c in hub.ground_truth(_ms(EDIT_TIME.replace(minute=0)), _ms(EDIT_TIME.replace(minute=49)))}
    assert truth == edited_contacts
    assert crm_meta["rows_pulled"] == len(truth)
    assert crm_meta["api_calls"] >= 1 and crm_meta["http_429"] == 0
    assert _metadata(pulled, "esp_members")["rows_pulled"] == len(edited_members)
    staged = pd.read_parquet(tmp / "lake" / "staged" / "crm" / "2026-11-28-10-00.parquet")
    assert set(staged["source_record_id"]) <= edited_contacts and len(staged) > 0

    # Events through the real ingest service, published as landing files.
    ingest_config = IngestConfig(
        landing_dir=tmp / "landing",
        write_keys={"test-write-key"},
        shopify_secret="test-shopify-secret",
        mailchimp_webhook_secret="test-mc-secret",
        rotate_seconds=0.5,
    )
    with start_ingest_service(ingest_config) as ingest:
        stats = run_simulator(
            ingest.url, sandbox.shop_url, "test-write-key", "test-shopify-secret", rate=400, count=300, seed=5
        )
    assert stats.failed == 0
    # One run per hour of landing files, as the landing-zone sensor requests them.
    by_hour: dict[str, list[str]] = {}
    for name in resources["landing_zone"].list_published():
        by_hour.setdefault(landing_partition_key(name), []).append(name)
    staged_rows = 0
    for hour, names in by_hour.items():
        streamed = dg.materialize(
            [stream_events], resources=resources, instance=instance, partition_key=hour,
            run_config={"ops": {"stream_events": {"config": {"files": names}}}},
        )
        assert streamed.success
        staged_rows += _metadata(streamed, "stream_events")["dagster/row_count"]
    assert staged_rows >= 250

    # Profiles and the push.
    profiles_run = dg.materialize([identity_and_profiles, esp_attribute_sync], resources=resources, instance=instance)
    assert profiles_run.success
    profiles = open_store(Lake(tmp / "lake")).profiles()
    assert 0 < len(profiles) < 400 * 3
    assert profiles["profile_id"].str.match(r"^p_[0-9a-f]{16}$").all()
    assert profiles["profile_id"].is_unique
    assert (profiles["order_count"].fillna(0) > 0).any()
    sync = _metadata(profiles_run, "esp_attribute_sync")
    assert sync["members_acknowledged"] > 0 and sync["members_failed"] == 0
    assert sync["batch_calls"] == -(-sync["members_sent"] // 500)

    pushes = chimp.pushes
    batch_pushes = [p for p in pushes if p["members"]]
    assert batch_pushes
    sent = [m for p in batch_pushes for m in p["members"]]
    assert all(p["result"]["total_created"] == 0 for p in batch_pushes)  # never creates an address
    assert all("status" not in m and "status_if_new" not in m for m in sent)  # never writes consent
    assert {"CITY", "LTV", "ORDERS", "NEXTCAT"} <= set(sent[0]["merge_fields"])
    assert any(m["merge_fields"]["ORDERS"] not in ("", 0) for m in sent)

    # Nothing changed: the next push sends nothing.
    again = dg.materialize([identity_and_profiles, esp_attribute_sync], resources=resources, instance=instance)
    assert _metadata(again, "esp_attribute_sync")["members_sent"] == 0
    assert len([p for p in chimp.pushes if p["members"]]) == len(batch_pushes)

    # A contact archived in the CRM stops contributing; its history stays staged.
    identity = open_store(Lake(tmp / "lake")).identity_map()
    crm_ids = set(identity.loc[identity["identifier_type"] == "crm_id", "identifier_value"])
    gone = sorted(crm_ids - edited_contacts)[0]
    hub.archive(gone)
    swept = dg.materialize([crm_deletions, identity_and_profiles], resources=resources, instance=instance)
    assert _metadata(swept, "crm_deletions")["archived_contacts"] >= 1
    identity = open_store(Lake(tmp / "lake")).identity_map()
    assert gone not in set(identity.loc[identity["identifier_type"] == "crm_id", "identifier_value"])
    again = dg.materialize([crm_deletions], resources=resources, instance=instance)
    assert _metadata(again, "crm_deletions")["rows_new"] == 0  # the deletion is staged once

    # No secret and no clear-text address reached Dagster's event log.
    config = sandbox.config
    secrets = [
        config.hubspot_client_secret, config.hubspot_refresh_token, config.mailchimp_access_token,
        "test-write-key", "test-shopify-secret",
        *list(sandbox.hubspot_auth._access),  # every access token the sandbox issued
    ]
    member_emails = [m["email_address"] for m in sent[:50]]
    assert len(secrets) > 5
    scanned = 0
    for run in instance.get_runs():
        for record in instance.all_logs(run.run_id):
            scanned += 1
            text = str(record)
            for secret in secrets:
                assert secret not in text, "a secret reached the event log"
            for email in member_emails:
                assert email not in text, "a clear-text address reached the event log"
    assert scanned > 50
