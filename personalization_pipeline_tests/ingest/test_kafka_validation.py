"""kafka_events validates each offset range with the event suite (Great Expectations), like
stream_events does with landing files: refused rows go to the validation quarantine with
the failed expectations, the verdict goes to the manifest (a failed range is held back),
and the three checks carry the counts. On the real Kafka-protocol broker."""

from __future__ import annotations

import json
import uuid

import dagster as dg
import pyarrow.parquet as pq
import pytest

from personalization_pipeline.assets.kafka_events import kafka_batch_name, kafka_events
from personalization_pipeline.broker import create_topic
from personalization_pipeline.resources.kafka import KafkaResource
from personalization_pipeline.resources.lake import Lake, LakeResource
from personalization_pipeline_tests.validation.builders import order_envelope, track_envelope

from .test_kafka import CatalogueShop, _produce


@pytest.fixture
def topic(broker) -> str:
    name = f"pp.test.{uuid.uuid4().hex[:8]}"
    assert create_topic(broker.bootstrap_servers, name, 1)
    return name


def _materialize(kafka, lake_root, instance, start: int, end: int) -> dg.ExecuteInProcessResult:
    resources = {"kafka": kafka, "lake": LakeResource(root=str(lake_root)), "shop": CatalogueShop(base_url="http://x")}
    config = {"ops": {"kafka_events": {"config": {"ranges": {"0": [start, end]}}}}}
    return dg.materialize([kafka_events], run_config=config, resources=resources, instance=instance, raise_on_error=False)


def test_each_range_is_validated_quarantined_with_reasons_and_checked(broker, topic, tmp_path):
    kafka = KafkaResource(bootstrap_servers=broker.bootstrap_servers, topic=topic, timeout_seconds=15)
    good = [track_envelope(i) for i in range(30)]
    bad = [order_envelope(100 + i, currency="euro") for i in range(12)]
    messages = [("p", json.dumps(e).encode()) for e in good + bad] + [("p", b'{"v": 1, not json')]
    _produce(broker.bootstrap_servers, topic, messages)
    lake_root = tmp_path / "lake"
    lake = Lake(lake_root)

    with dg.instance_for_test() as instance:
        # 13 of 43 refused (12 by the suite, 1 unreadable): above the count for a small
        # batch, so the blocking check fails the run and the range is held back.
        result = _materialize(kafka, lake_root, instance, 0, 43)
        assert not result.success
        checks = {e.check_name: e for e in result.get_asset_check_evaluations()}
        assert set(checks) == {"quarantine_rate", "rows_accounted", "row_count_drift"}
        quarantine = checks["quarantine_rate"]
        assert not quarantine.passed and quarantine.blocking
        assert quarantine.metadata["failed_expectations"].value == {"currency_three_upper_letters": 12, "unparseable": 1}
        assert {k: quarantine.metadata[k].value for k in ("rows_in", "rows_staged", "rows_quarantined", "rows_duplicate")} == {
            "rows_in": 43, "rows_staged": 30, "rows_quarantined": 13, "rows_duplicate": 0,
        }
        batch = kafka_batch_name(topic, 0, 0, 43)
        assert quarantine.metadata["failed_batches"].value == [batch]
        assert all(s["email"].startswith("b***@") for s in quarantine.metadata["sample_rows"].value)
        assert checks["rows_accounted"].passed and checks["row_count_drift"].passed

        [record] = instance.fetch_materializations(dg.AssetKey("kafka_events"), limit=5).records
        metadata = {k: v.value for k, v in record.asset_materialization.metadata.items()}
        assert (metadata["messages"], metadata["rows_quarantined"], metadata["rows_unparseable"]) == (43, 13, 1)

        refused = pq.read_table(lake_root / "quarantine" / "validation" / "stream" / f"{batch}.parquet").to_pandas()
        assert len(refused) == 12
        assert all(list(r) == ["currency_three_upper_letters"] for r in refused["failed_expectations"])
        assert set(refused["source_record_id"]) == {f"msg-{100 + i}" for i in range(12)}
        assert json.loads(refused["raw"].iloc[0])["delivery_id"].startswith("dlv-1")  # the envelope as read
        assert list(lake.batches("failed")["batch"]) == [batch]
        assert lake.read_batch("stream", batch).empty  # held back from profiles and the push

        # A clean range passes and is staged.
        _produce(broker.bootstrap_servers, topic, [("p", json.dumps(track_envelope(500 + i)).encode()) for i in range(5)])
        clean = _materialize(kafka, lake_root, instance, 43, 48)
        assert clean.success
        assert all(e.passed for e in clean.get_asset_check_evaluations())
        assert len(lake.read_batch("stream", kafka_batch_name(topic, 0, 43, 48))) == 5
        assert kafka_batch_name(topic, 0, 43, 48) in set(lake.batches("passed")["batch"])
