"""The code location loads, and its graph is what we expect: an accidental change to the
asset keys, checks, jobs, schedules or sensors shows up here in review."""

from pathlib import Path
import subprocess
import sys

import dagster as dg

from personalization_pipeline.definitions import defs


def test_asset_keys():
    keys = {k.to_user_string() for k in defs.resolve_asset_graph().get_all_asset_keys()}
    assert keys == {
        "crm_contacts",
        "crm_deletions",
        "esp_members",
        "esp_engagement",
        "source_snapshot",
        "stream_events",
        "kafka_events",
        "identity_map",
        "identity_conflicts",
        "resolved_profiles",
        "profile_attribute_provenance",
        "esp_attribute_sync",
    }


def test_asset_checks():
    checks = {
        (k.asset_key.to_user_string(), k.name) for k in defs.resolve_asset_graph().asset_check_keys
    }
    validated = ("crm_contacts", "esp_members", "esp_engagement", "stream_events", "kafka_events")
    assert {(a, n) for a, n in checks if a in validated} == {
        (asset, name) for asset in validated for name in ("quarantine_rate", "rows_accounted", "row_count_drift")
    }
    assert {(a, n) for a, n in checks if a not in validated} == {
        ("resolved_profiles", "largest_identity_component"),
        ("resolved_profiles", "share_without_email"),
        ("identity_conflicts", "conflict_trend"),
    }
    graph = defs.resolve_asset_graph()
    # The validation checks: two blocking, the drift warning never blocks.
    blocking = {k.name for k in graph.asset_check_keys if k.asset_key.to_user_string() in validated and graph.get_check_spec(k).blocking}
    assert blocking == {"quarantine_rate", "rows_accounted"}


def test_jobs_schedules_sensors():
    assert {j.name for j in defs.resolve_all_job_defs()} >= {
        "source_pull_job", "snapshot_job", "profile_job", "stream_job", "kafka_stream_job", "quarantine_replay_job",
    }
    assert {s.name for s in defs.schedules} == {"source_pull_schedule"}
    assert {s.name for s in defs.sensors} == {
        "landing_zone_sensor", "kafka_offsets_sensor", "profile_refresh_sensor", "initial_snapshot_sensor", "run_failure_alert_sensor",
        "asset_check_alert_sensor",
    }


def test_partitions_and_upstream_edges():
    graph = defs.resolve_asset_graph()
    crm = graph.get(dg.AssetKey("crm_contacts"))
    assert isinstance(crm.partitions_def, dg.TimeWindowPartitionsDefinition)
    assert crm.partitions_def.cron_schedule == "0 * * * *"
    parents = {k.to_user_string() for k in graph.get(dg.AssetKey("resolved_profiles")).parent_keys}
    assert parents == {
        "crm_contacts", "crm_deletions", "esp_members", "esp_engagement", "source_snapshot", "stream_events",
        "kafka_events",
    }
    engagement = graph.get(dg.AssetKey("esp_engagement"))
    assert engagement.partitions_def == crm.partitions_def
    assert {k.to_user_string() for k in graph.get(dg.AssetKey("esp_attribute_sync")).parent_keys} == {
        "resolved_profiles", "identity_map",
    }


def test_jobs_run_in_process():
    for job in defs.resolve_all_job_defs():
        if not job.name.startswith("__"):
            assert job.executor_def.name == "in_process", job.name


def test_workspace_loads_with_the_dagster_cli(tmp_path):
    """What `dagster dev` does first: load workspace.yaml's code location."""
    result = subprocess.run(
        [sys.executable, "-m", "dagster", "definitions", "validate", "-w", "workspace.yaml"],
        capture_output=True,
        text=True,
        timeout=240,
        cwd=Path(__file__).resolve().parent.parent,
        env={**__import__("os").environ, "DAGSTER_HOME": str(tmp_path)},
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_sources_and_profiles_declare_freshness():
    graph = defs.resolve_asset_graph()
    for key in ("crm_contacts", "esp_members", "esp_engagement", "resolved_profiles"):
        policy = graph.get(dg.AssetKey(key)).freshness_policy
        assert policy is not None and policy.fail_window.to_timedelta().total_seconds() == 1800, key
