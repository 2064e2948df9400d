"""A backfill of a range of hourly partitions, run in one chunk as the backfill policy
runs it: each partition holds exactly the contacts modified in its hour; re-running the
range adds nothing; the partitions outside the range are untouched."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import dagster as dg
import pandas as pd

from personalization_pipeline.assets.sources import crm_contacts, esp_members, source_snapshot
from personalization_pipeline.resources.runtime import RuntimeResource
from personalization_pipeline_tests.test_pipeline_e2e import WORLD_NOW, world  # noqa: F401 (fixture)

HOURS = [datetime(2026, 11, 28, h, tzinfo=timezone.utc) for h in (10, 11, 12)]


def _ms(moment: datetime) -> int:
    return int(moment.timestamp() * 1000)


def test_backfill_chunk_pulls_exactly_its_range(world):  # noqa: F811
    sandbox, clock, resources, tmp, instance = world
    hub = sandbox.hubspot_state
    assert dg.materialize([source_snapshot], resources=resources, instance=instance).success
    edited: dict[str, set[str]] = {}
    for hour in [*HOURS, HOURS[-1] + timedelta(hours=1)]:  # an edit after the range too
        clock.advance((hour + timedelta(minutes=20) - clock.now()).total_seconds())
        edited[hour.strftime("%Y-%m-%d-%H:00")] = set(hub.mutate(7))
    resources = {**resources, "runtime": RuntimeResource(lag_seconds=60, now_override="2026-11-28T14:00:00Z")}
    tags = {
        "dagster/asset_partition_range_start": "2026-11-28-10:00",
        "dagster/asset_partition_range_end": "2026-11-28-12:00",
    }
    first = dg.materialize([crm_contacts, esp_members], resources=resources, instance=instance, tags=tags)
    assert first.success
    for hour in HOURS:
        key = hour.strftime("%Y-%m-%d-%H:00")
        staged = pd.read_parquet(tmp / "lake" / "staged" / "crm" / f"{key.replace(':', '-')}.parquet")
        truth = {c["id"] for c in hub.ground_truth(_ms(hour), _ms(hour + timedelta(hours=1)))}
        assert set(staged["source_record_id"]) == truth
        assert truth and truth <= edited[key]  # (a contact edited again later belongs to the later hour)
    assert not (tmp / "lake" / "staged" / "crm" / "2026-11-28-13-00.parquet").exists()
    materialised = {
        e.partition for e in first.get_asset_materialization_events() if e.asset_key == dg.AssetKey("crm_contacts")
    }
    assert materialised == {h.strftime("%Y-%m-%d-%H:00") for h in HOURS}
    again = dg.materialize([crm_contacts], resources=resources, instance=instance, tags=tags)
    meta = [e.materialization.metadata for e in again.get_asset_materialization_events()][0]
    assert meta["rows_new"].value == 0 and meta["partitions"].value == 3
