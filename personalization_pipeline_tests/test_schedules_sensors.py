"""Schedules and sensors evaluated tick by tick, without sleeping."""

from __future__ import annotations

import json
import os
from datetime import datetime, timezone
from pathlib import Path

import dagster as dg

from personalization_pipeline.resources.lake import LakeResource
from personalization_pipeline.resources.landing_zone import LocalLandingZoneResource
from personalization_pipeline.schedules import pull_requests, source_pull_schedule
from personalization_pipeline.sensors import (
    PENDING_RETRY_SECONDS,
    initial_snapshot_sensor,
    landing_requests,
    landing_zone_sensor,
    profile_refresh_sensor,
)


def _tick(minute: int, hour: int = 10) -> datetime:
    return datetime(2026, 11, 28, hour, minute, tzinfo=timezone.utc)


def test_schedule_fills_the_hour_in_progress():
    context = dg.build_schedule_context(scheduled_execution_time=_tick(30))
    requests = source_pull_schedule(context)
    assert [r.partition_key for r in requests] == ["2026-11-28-10:00"]
    assert requests[0].run_key == "2026-11-28-10:00@2026-11-28T10:30"


def test_early_in_an_hour_the_previous_hour_is_closed_too():
    context = dg.build_schedule_context(scheduled_execution_time=_tick(5))
    keys = [r.partition_key for r in source_pull_schedule(context)]
    assert keys == ["2026-11-28-09:00", "2026-11-28-10:00"]


def test_lag_keeps_the_tick_in_the_previous_hour():
    keys = [r.partition_key for r in pull_requests(_tick(0, 11), lag_seconds=60, close_seconds=0)]
    assert keys == ["2026-11-28-10:00"]


def test_each_tick_has_its_own_run_key():
    keys = {r.run_key for m in range(20, 60, 5) for r in pull_requests(_tick(m), 60, 900)}
    assert len(keys) == 8


def _publish(root: Path, name: str) -> str:
    path = root / "ready" / "2026" / "11" / "28" / "10" / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text('{"v":1}\n')
    return str(path)


def test_landing_requests_hand_each_file_over_once(tmp_path):
    a, b = _publish(tmp_path, "20261128T100000-1-1.jsonl"), _publish(tmp_path, "20261128T100005-1-2.jsonl")
    staged: set[str] = set()
    requests, cursor = landing_requests([a, b], staged.__contains__, None, now=1000.0)
    assert len(requests) == 1
    assert requests[0].run_config["ops"]["stream_events"]["config"]["files"] == [a, b]
    assert requests[0].partition_key == "2026-11-28-10:00"  # the hour the files were published in
    # Not staged yet, but already handed over: no second request.
    again, cursor = landing_requests([a, b], staged.__contains__, cursor, now=1010.0)
    assert again == []
    # A second ingest process publishes a file whose name sorts earlier: not skipped.
    early = _publish(tmp_path, "20261128T095959-2-1.jsonl")
    staged.update([a, b])
    late, cursor = landing_requests(sorted([a, b, early]), staged.__contains__, cursor, now=1020.0)
    assert [r.run_config["ops"]["stream_events"]["config"]["files"] for r in late] == [[early]]
    assert json.loads(cursor) == {early: 1020.0}


def test_a_failed_runs_files_are_requested_again_after_the_retry_delay(tmp_path):
    a = _publish(tmp_path, "x.jsonl")
    _, cursor = landing_requests([a], lambda f: False, None, now=0.0)
    assert landing_requests([a], lambda f: False, cursor, now=PENDING_RETRY_SECONDS - 1)[0] == []
    retry, _ = landing_requests([a], lambda f: False, cursor, now=PENDING_RETRY_SECONDS + 1)
    assert len(retry) == 1 and retry[0].run_key != landing_requests([a], lambda f: False, None, now=0.0)[0][0].run_key


def test_landing_zone_sensor_tick_by_tick(tmp_path, monkeypatch):
    monkeypatch.setenv("PP_DATA_DIR", str(tmp_path))
    resources = {"lake": LakeResource(root=str(tmp_path / "lake")), "landing_zone": LocalLandingZoneResource()}
    with dg.build_sensor_context(resources=resources) as context:
        first = landing_zone_sensor(context)
        assert first.run_requests == [] and first.skip_reason is not None
    f = _publish(tmp_path / "landing", "20261128T100000-1-1.jsonl")
    with dg.build_sensor_context(resources=resources, cursor=first.cursor) as context:
        second = landing_zone_sensor(context)
    assert len(second.run_requests) == 1
    assert second.run_requests[0].run_config["ops"]["stream_events"]["config"]["files"] == [f]
    with dg.build_sensor_context(resources=resources, cursor=second.cursor) as context:
        assert landing_zone_sensor(context).run_requests == []


def test_profile_sensor_requests_once_per_new_source_materialisation():
    with dg.instance_for_test() as instance:
        context = dg.build_sensor_context(instance=instance)
        assert isinstance(profile_refresh_sensor(context), dg.SkipReason)
        instance.report_runless_asset_event(dg.AssetMaterialization("crm_contacts"))
        first = profile_refresh_sensor(dg.build_sensor_context(instance=instance))
        assert len(first.run_requests) == 1
        again = profile_refresh_sensor(dg.build_sensor_context(instance=instance, cursor=first.cursor))
        assert isinstance(again, dg.SkipReason)
        instance.report_runless_asset_event(dg.AssetMaterialization("esp_members"))
        third = profile_refresh_sensor(dg.build_sensor_context(instance=instance, cursor=first.cursor))
        assert len(third.run_requests) == 1 and third.run_requests[0].run_key != first.run_requests[0].run_key


def test_snapshot_sensor_requests_the_first_load_once():
    with dg.instance_for_test() as instance:
        request = initial_snapshot_sensor(dg.build_sensor_context(instance=instance))
        assert request.run_key == "initial-snapshot"
        instance.report_runless_asset_event(dg.AssetMaterialization("source_snapshot"))
        assert isinstance(initial_snapshot_sensor(dg.build_sensor_context(instance=instance)), dg.SkipReason)


def test_landing_files_of_different_hours_go_to_their_own_partitions(tmp_path):
    ten = _publish(tmp_path, "20261128T105959-1-1.jsonl")
    eleven = tmp_path / "ready" / "2026" / "11" / "28" / "11" / "20261128T110001-1-2.jsonl"
    eleven.parent.mkdir(parents=True)
    eleven.write_text("{}\n")
    old = tmp_path / "ready" / "2026" / "10" / "02" / "07" / "20261002T070000-1-1.jsonl"
    old.parent.mkdir(parents=True)
    old.write_text("{}\n")
    requests, _ = landing_requests([str(old), ten, str(eleven)], lambda f: False, None, now=5.0)
    by_partition = {r.partition_key: r.run_config["ops"]["stream_events"]["config"]["files"] for r in requests}
    assert by_partition == {
        "2026-11-01-00:00": [str(old)],  # before the first partition: the first one
        "2026-11-28-10:00": [ten],
        "2026-11-28-11:00": [str(eleven)],
    }
