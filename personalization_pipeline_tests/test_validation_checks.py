"""The validation checks in Dagster runs: row_count_drift warns without blocking, a failed
quarantine_rate fails the run, check metadata carries failed expectations and masked
samples and never PII in the clear, and asset_check_alert_sensor posts every failed or
warning evaluation exactly once to the alert webhook (the sandbox alert sink, real HTTP)."""


import json
from datetime import datetime, timedelta, timezone
from pathlib import Path

import dagster as dg
import pytest
import requests

from personalization_pipeline.assets.checks import drift_check_result, validation_check_results
from personalization_pipeline.assets.sources import stream_events
from personalization_pipeline.definitions import defs
from personalization_pipeline.resources.lake import LakeResource
from personalization_pipeline.resources.landing_zone import LocalLandingZoneResource
from personalization_pipeline.resources.shop import ShopResource
from personalization_pipeline.sandbox.server import SandboxConfig, start_sandbox
from personalization_pipeline.sensors import asset_check_alert_sensor, run_failure_alert_sensor
from personalization_pipeline.validation import ValidationConfig, validate_batch
from personalization_pipeline_tests.validation.builders import canonical_row, good_crm, loose_frame, order_envelope, track_envelope

PARTITION = "2026-11-28-12:00"


class CatalogueShop(ShopResource):
    def catalogue(self) -> dict[str, str]:
        return {}


@pytest.fixture
def world(tmp_path):
    resources = {
        "lake": LakeResource(root=str(tmp_path / "lake")),
        "shop": CatalogueShop(base_url="http://127.0.0.1:9"),
        "landing_zone": LocalLandingZoneResource(root=str(tmp_path / "landing")),
    }
    with dg.instance_for_test() as instance:
        yield tmp_path, resources, instance


def _landing_file(tmp: Path, name: str, envelopes: list[dict]) -> str:
    path = tmp / "landing" / "ready" / "2026" / "11" / "28" / "12" / f"{name}.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(e) + "\n" for e in envelopes))
    return str(path)


def _stage(world, name: str, envelopes: list[dict]) -> dg.ExecuteInProcessResult:
    tmp, resources, instance = world
    path = _landing_file(tmp, name, envelopes)
    return dg.materialize(
        [stream_events], resources=resources, instance=instance, partition_key=PARTITION, raise_on_error=False,
        run_config={"ops": {"stream_events": {"config": {"files": [path]}}}},
    )


def _tracks(first: int, n: int) -> list[dict]:
    return [track_envelope(i) for i in range(first, first + n)]


def _evaluations(result: dg.ExecuteInProcessResult) -> dict[str, dg.AssetCheckEvaluation]:
    return {e.check_name: e for e in result.get_asset_check_evaluations()}


def _tick(instance, cursor):
    result = asset_check_alert_sensor(dg.build_sensor_context(instance=instance, cursor=cursor, definitions=defs))
    return result.cursor


def _alerts(sandbox) -> list[dict]:
    body = requests.get(f"{sandbox.alerts_url}/_admin/alerts", timeout=5).json()
    return [a["body"] for a in body["alerts"]]


def _all_text(instance: dg.DagsterInstance) -> str:
    return "\n".join(str(r) for run in instance.get_runs() for r in instance.all_logs(run.run_id))


def test_drift_warns_a_bad_batch_fails_and_each_evaluation_alerts_once(world, monkeypatch):
    tmp, resources, instance = world
    with start_sandbox(SandboxConfig(size=50)) as sandbox:
        monkeypatch.setenv("PP_ALERT_WEBHOOK_URL", f"{sandbox.alerts_url}/alerts")

        # Six ordinary batches: the drift check has no verdict until min_history (6) exist.
        for n in range(6):
            result = _stage(world, f"normal-{n}", _tracks(n * 100, 60))
            assert result.success
            drift = _evaluations(result)["row_count_drift"]
            assert drift.passed and drift.metadata["judged"].value is False
            assert drift.metadata["history_batches"].value == n
        cursor = _tick(instance, None)
        assert _alerts(sandbox) == []  # nothing failed, nothing posted

        # Ten times the usual size: a WARN, and the run still succeeds (not blocking).
        spike = _stage(world, "spike", _tracks(10_000, 600))
        assert spike.success
        checks = _evaluations(spike)
        assert checks["quarantine_rate"].passed and checks["rows_accounted"].passed
        drift = checks["row_count_drift"]
        assert not drift.passed and drift.severity == dg.AssetCheckSeverity.WARN and drift.blocking is False
        assert drift.metadata["history_median"].value == 60 and drift.metadata["rows_in"].value == 600

        cursor = _tick(instance, cursor)
        [alert] = _alerts(sandbox)
        assert alert["kind"] == "asset_check" and alert["asset"] == "stream_events"
        assert alert["check"] == "row_count_drift" and alert["severity"] == "WARN" and alert["blocking"] is False
        assert alert["partition"] == PARTITION and alert["run_id"] == spike.run_id
        assert alert["counts"]["rows_in"] == 600 and alert["counts"]["history_median"] == 60
        assert _tick(instance, cursor) == cursor and len(_alerts(sandbox)) == 1  # once per evaluation

        # Half the batch refused: the blocking check fails the step, and so the run (the
        # run-failure alert sees it); the check alert names the check and the counts.
        bad = [order_envelope(20_000 + i, currency="euro") for i in range(20)]
        failed = _stage(world, "bad", _tracks(30_000, 40) + bad)
        assert not failed.success
        quarantine = _evaluations(failed)["quarantine_rate"]
        assert not quarantine.passed and quarantine.blocking
        assert quarantine.metadata["failed_expectations"].value == {"currency_three_upper_letters": 20}
        samples = quarantine.metadata["sample_rows"].value
        assert len(samples) == 5 and all(s["batch"] == "bad" for s in samples)
        assert all(s["email"].startswith("b***@") for s in samples)
        assert quarantine.metadata["failed_batches"].value == ["bad"]

        cursor = _tick(instance, cursor)
        alerts = _alerts(sandbox)
        assert [(a["check"], a["severity"], a["blocking"]) for a in alerts[1:]] == [("quarantine_rate", "ERROR", True)]
        assert alerts[1]["counts"]["rows_quarantined"] == 20 and alerts[1]["counts"]["rows_in"] == 60
        assert alerts[1]["failed_expectations"] == {"currency_three_upper_letters": 20}
        assert alerts[1]["batches"] == ["bad"] and alerts[1]["partition"] == PARTITION

        # The webhook is down: nothing is lost, the next tick posts it, once.
        spike2 = _stage(world, "spike-2", _tracks(40_000, 700))
        assert spike2.success
        monkeypatch.setenv("PP_ALERT_WEBHOOK_URL", "http://127.0.0.1:9/alerts")
        cursor = _tick(instance, cursor)
        assert len(_alerts(sandbox)) == 2
        monkeypatch.setenv("PP_ALERT_WEBHOOK_URL", f"{sandbox.alerts_url}/alerts")
        cursor = _tick(instance, cursor)
        assert _tick(instance, cursor) == cursor
        # The cursor stays small: a watermark per check, nothing pending behind it.
        assert all(entry["seen"] == [] for entry in json.loads(cursor).values())
        alerts = _alerts(sandbox)
        assert [a["check"] for a in alerts] == ["row_count_drift", "quarantine_rate", "row_count_drift"]
        assert alerts[2]["run_id"] == spike2.run_id
        assert len({a["alert_id"] for a in alerts}) == 3

        # The failed blocking check failed its run, so the run-failure alert reports the run
        # too (Dagster 1.13: the step fails after the materialisation and checks are stored).
        failure = next(e for e in failed.all_events if e.event_type_value == "PIPELINE_FAILURE")
        run_failure_alert_sensor(
            dg.build_run_status_sensor_context(
                sensor_name="run_failure_alert_sensor", dagster_instance=instance,
                dagster_run=failed.dagster_run, dagster_event=failure,
            ).for_run_failure()
        )
        alerts = _alerts(sandbox)
        assert alerts[-1]["kind"] == "run_failure" and alerts[-1]["run_id"] == failed.run_id
        assert len(alerts) == 4

    # No address of a refused row reached the event log or an alert in the clear.
    emails = [f"buyer{20_000 + i}@example.com" for i in range(20)]
    text = _all_text(instance) + json.dumps(alerts)
    assert "b***@example.com" in text
    for email in emails:
        assert email not in text


def test_check_metadata_masks_emails_and_shows_names_as_initials():
    config = ValidationConfig.load()
    rows = [
        canonical_row("crm_contact", 900 + i, email=f"jane.doe{i}@example.com", first_name="Jane", last_name="Doe",
                      lifecycle_stage="partner")
        for i in range(3)
    ] + [canonical_row("crm_contact", 990, email="not-an-address@", source_record_id="leaked@example.com")]
    outcome = validate_batch(loose_frame(good_crm(), rows), "crm_contact", config)
    metadata, checks = validation_check_results([outcome], batches=["2026-11-28-12:00"])
    quarantine = next(c for c in checks if c.check_name == "quarantine_rate")
    assert quarantine.metadata["failed_expectations"].value == {"lifecycle_stage_in_set": 3, "email_well_formed": 1}
    samples = quarantine.metadata["sample_rows"].value
    assert [s["name"] for s in samples] == ["J. D."] * 3 + [None]
    assert [s["email"] for s in samples] == ["j***@example.com"] * 3 + ["n***@"]
    assert samples[3]["source_record_id"] == "l***@example.com"
    text = json.dumps([metadata, [{k: str(v) for k, v in c.metadata.items()} for c in checks]])
    for clear in ("jane.doe0@example.com", "jane.doe2@example.com", "leaked@example.com", "Jane", "Doe"):
        assert clear not in text


HOURLY = dg.HourlyPartitionsDefinition(start_date="2026-11-01-00:00", end_offset=1)  # as the pulls: the open hour too


class Rows(dg.Config):
    rows: int


@dg.asset(partitions_def=HOURLY, check_specs=[dg.AssetCheckSpec("row_count_drift", asset="hourly_pull", blocking=False)])
def hourly_pull(context: dg.AssetExecutionContext, config: Rows) -> dg.MaterializeResult:
    """A pull-shaped asset: one batch per hourly partition, re-pulled while the hour is open."""
    return dg.MaterializeResult(
        metadata={"rows_in": config.rows},
        check_results=[drift_check_result(context, config.rows, by_partition=True)],
    )


def _pull(instance, partition: str, rows: int) -> dg.AssetCheckEvaluation:
    result = dg.materialize(
        [hourly_pull], instance=instance, partition_key=partition,
        run_config={"ops": {"hourly_pull": {"config": {"rows": rows}}}},
    )
    [evaluation] = result.get_asset_check_evaluations()
    return evaluation


def test_pull_history_is_the_latest_batch_of_each_earlier_partition():
    with dg.instance_for_test() as instance:
        for hour in range(7):
            # The hour is pulled while open (a partial count), then once more when it closes.
            _pull(instance, f"2026-11-28-{hour:02d}:00", 3)
            _pull(instance, f"2026-11-28-{hour:02d}:00", 400)
        # A replay materialisation is no batch of the source.
        instance.report_runless_asset_event(
            dg.AssetMaterialization("hourly_pull", partition="2026-11-28-06:00", metadata={"replay_of": "x", "rows_in": 1})
        )
        spike = _pull(instance, "2026-11-28-07:00", 2_500)
        assert not spike.passed and spike.severity == dg.AssetCheckSeverity.WARN
        assert spike.metadata["history_batches"].value == 6  # partition 06:00's latest is the replay
        assert spike.metadata["history_median"].value == 400
        assert _pull(instance, "2026-11-28-07:00", 1_900).passed  # a re-pull of the same hour: 4.75x
        # A backfill of an early hour is judged against the hours before it only.
        early = _pull(instance, "2026-11-28-02:00", 10_000)
        assert early.metadata["judged"].value is False and early.metadata["history_batches"].value == 2
        # A closed hour that came in nearly empty warns; the open hour never does for that.
        assert not _pull(instance, "2026-11-28-08:00", 0).passed
        now = datetime.now(timezone.utc)
        for h in range(1, 7):
            _pull(instance, (now - timedelta(hours=h)).strftime("%Y-%m-%d-%H:00"), 400)
        opened = _pull(instance, now.strftime("%Y-%m-%d-%H:00"), 0)  # the hour in progress
        assert opened.passed and opened.metadata["window_open"].value is True
