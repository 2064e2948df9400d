"""quarantine_replay_job: after a suite change (a lifecycle stage added through
PP_VALIDATION_CONFIG), the quarantined rows that now pass are staged exactly once as a
passed replay batch, leave the quarantine, release the held-back batch, and every row is
accounted for; replaying again (or after a crash mid-replay) stages nothing twice."""

from __future__ import annotations

import shutil

import dagster as dg
import pandas as pd
import pyarrow.parquet as pq
import pytest
import yaml

from personalization_pipeline.assets.sources import validate, verdict_of
from personalization_pipeline.core import events, sources
from personalization_pipeline.jobs import quarantine_replay_job
from personalization_pipeline.resources.lake import Lake, LakeResource
from personalization_pipeline.validation.suites import CONFIG_ENV, CONFIG_FILE
from personalization_pipeline_tests.validation.builders import RECEIVED, crm_record, track_envelope

PARTITION = "2026-11-28-12:00"
OTHER = "2026-11-28-13:00"


def _quarantine(lake: Lake, source: str, batch: str) -> pd.DataFrame:
    path = lake.root / "quarantine" / "validation" / source / f"{batch.replace(':', '-')}.parquet"
    return pq.read_table(path).to_pandas() if path.exists() else pd.DataFrame()


def _stage_crm(lake: Lake, batch: str, partner: int, offset: int = 0):
    """What crm_contacts does with a pull: 8 good contacts, ``partner`` with a lifecycle
    stage the portal added, one with a broken address."""
    records = [crm_record(offset + i) for i in range(8)]
    records += [crm_record(offset + 100 + i, lifecyclestage="partner") for i in range(partner)]
    records += [crm_record(offset + 200, email="broken@")]
    frame = sources.crm_contacts_to_canonical(records, RECEIVED)
    staged, outcome = validate(lake, "crm", batch, frame, "crm_contact", raw=records)
    lake.write_staged("crm", batch, staged, *verdict_of(outcome))
    return outcome


def _replay(lake_root, instance, **config) -> dg.ExecuteInProcessResult:
    result = quarantine_replay_job.execute_in_process(
        run_config={"ops": {"replay_quarantine": {"config": config}}},
        resources={"lake": LakeResource(root=str(lake_root))},
        instance=instance,
    )
    assert result.success
    return result


def _totals(result: dg.ExecuteInProcessResult) -> dict:
    [output] = [e for e in result.all_events if e.event_type_value == "STEP_OUTPUT"]
    return {k: v.value for k, v in output.event_specific_data.metadata.items()}


@pytest.fixture
def partner_config(tmp_path, monkeypatch):
    """The suite change, through the configuration the validation module reads."""
    data = yaml.safe_load(CONFIG_FILE.read_text())
    data["lifecycle_stages"].append("partner")
    path = tmp_path / "validation.yaml"
    path.write_text(yaml.safe_dump(data))
    return lambda: monkeypatch.setenv(CONFIG_ENV, str(path))


def test_fixed_rows_are_staged_exactly_once_as_a_passed_replay_batch(tmp_path, partner_config):
    lake = Lake(tmp_path / "lake")
    outcome = _stage_crm(lake, PARTITION, partner=12)
    assert (outcome.rows_quarantined, outcome.passed_threshold) == (13, False)
    _stage_crm(lake, OTHER, partner=2, offset=1000)  # outside the replayed range
    assert list(lake.batches("failed")["batch"]) == [PARTITION]  # held back
    assert lake.read_batch("crm", PARTITION).empty

    with dg.instance_for_test() as instance:
        # Before the fix the replay changes nothing, and says so.
        before = _replay(lake.root, instance, sources=["crm"], batch_from=PARTITION, batch_to=PARTITION)
        assert _totals(before)["rows_in"] == 13 and _totals(before)["rows_replayed"] == 0
        assert _totals(before)["rows_still_quarantined"] == 13
        assert len(lake.batches("passed")) == 1 and len(_quarantine(lake, "crm", PARTITION)) == 13
        assert not instance.fetch_materializations(dg.AssetKey("crm_contacts"), limit=1).records

        partner_config()
        saved = tmp_path / "quarantine-before-replay.parquet"
        shutil.copy(lake.root / "quarantine" / "validation" / "crm" / "2026-11-28-12-00.parquet", saved)
        result = _replay(lake.root, instance, sources=["crm"], batch_from=PARTITION, batch_to=PARTITION)
        totals = _totals(result)
        assert {k: totals[k] for k in ("rows_in", "rows_replayed", "rows_still_quarantined", "rows_duplicate")} == {
            "rows_in": 13, "rows_replayed": 12, "rows_still_quarantined": 1, "rows_duplicate": 0,
        }
        assert totals["rows_in"] == totals["rows_replayed"] + totals["rows_still_quarantined"] + totals["rows_duplicate"]
        [replay_batch] = totals["replay_batches"]
        assert replay_batch.startswith(f"replay-{PARTITION}-")
        # One row left in the quarantine passes the threshold: the held batch is released.
        assert totals["batches_released"] == [f"crm/{PARTITION}"] and totals["rows_released"] == 8

        passed = lake.batches("passed").set_index("batch")
        assert set(passed.index) == {PARTITION, OTHER, replay_batch}
        assert passed.loc[replay_batch, "rows"] == 12 and passed.loc[PARTITION, "rows"] == 8
        assert len(_quarantine(lake, "crm", OTHER)) == 3  # outside the range: untouched
        staged = lake.read_batch("crm", replay_batch)
        assert set(staged["lifecycle_stage"]) == {"partner"}
        assert set(staged["source_record_id"]) == {str(1100 + i) for i in range(12)}
        left = _quarantine(lake, "crm", PARTITION)
        assert list(left["source_record_id"]) == ["1200"]
        assert [list(v) for v in left["failed_expectations"]] == [["email_well_formed"]]

        # The source asset records the late arrival, so the profile refresh picks it up.
        [record] = instance.fetch_materializations(dg.AssetKey("crm_contacts"), limit=5).records
        materialization = record.asset_materialization
        assert materialization.partition == PARTITION
        assert materialization.metadata["replay_of"].value == PARTITION
        assert materialization.metadata["rows_replayed"].value == 12

        # Again: nothing is staged twice.
        files = {p.name: p.read_bytes() for p in (lake.root / "staged" / "crm").glob("*.parquet")}
        again = _totals(_replay(lake.root, instance, sources=["crm"], batch_from=PARTITION, batch_to=PARTITION))
        assert (again["rows_in"], again["rows_replayed"], again["rows_still_quarantined"]) == (1, 0, 1)
        assert again["replay_batches"] == []
        assert {p.name: p.read_bytes() for p in (lake.root / "staged" / "crm").glob("*.parquet")} == files
        assert len(lake.batches("passed")) == 3

        # A run that died after staging and before rewriting the quarantine: the retry
        # stages the same batch with the same rows, nothing new.
        shutil.copy(saved, lake.root / "quarantine" / "validation" / "crm" / "2026-11-28-12-00.parquet")
        retry = _totals(_replay(lake.root, instance, batches=[PARTITION]))
        assert retry["replay_batches"] == [replay_batch] and retry["rows_replayed"] == 12
        assert {p.name: p.read_bytes() for p in (lake.root / "staged" / "crm").glob("*.parquet")} == files
        assert len(lake.batches("passed")) == 3 and len(_quarantine(lake, "crm", PARTITION)) == 1


def test_stream_rows_replay_into_their_own_batch_and_reach_the_kafka_asset(tmp_path, monkeypatch):
    lake = Lake(tmp_path / "lake")
    envelopes = [track_envelope(i) for i in range(8)]
    frame, rejects = events.envelopes_to_canonical(envelopes, {})
    assert rejects == []
    # A producer started sending an event type the vocabulary does not know yet.
    frame.loc[frame["source_record_id"].isin(["msg-5", "msg-6", "msg-7"]), "event_type"] = "wishlist_added"
    raw = [envelopes[p] for p in frame.attrs.get("envelope_positions", [])] or None
    staged, outcome = validate(lake, "stream", "kafka-pp.events-p0-0-8", frame, "event", raw=raw)
    lake.write_staged("stream", "kafka-pp.events-p0-0-8", staged, *verdict_of(outcome))
    assert outcome.rows_quarantined == 3

    data = yaml.safe_load(CONFIG_FILE.read_text())
    data["event_types"].append("wishlist_added")
    path = tmp_path / "validation.yaml"
    path.write_text(yaml.safe_dump(data))
    monkeypatch.setenv(CONFIG_ENV, str(path))
    with dg.instance_for_test() as instance:
        totals = _totals(_replay(lake.root, instance, sources=["stream"]))
        assert (totals["rows_in"], totals["rows_replayed"], totals["rows_still_quarantined"]) == (3, 3, 0)
        assert not _quarantine(lake, "stream", "kafka-pp.events-p0-0-8").shape[0]
        [record] = instance.fetch_materializations(dg.AssetKey("kafka_events"), limit=5).records
        assert record.asset_materialization.metadata["replay_of"].value == "kafka-pp.events-p0-0-8"
    [batch] = totals["replay_batches"]
    assert batch in set(lake.batches("passed")["batch"])
    assert set(lake.read_batch("stream", batch)["event_type"]) == {"wishlist_added"}


def test_unknown_sources_are_refused(tmp_path):
    with dg.instance_for_test() as instance:
        result = quarantine_replay_job.execute_in_process(
            run_config={"ops": {"replay_quarantine": {"config": {"sources": ["crm", "tweets"]}}}},
            resources={"lake": LakeResource(root=str(tmp_path))},
            instance=instance,
            raise_on_error=False,
        )
    assert not result.success
