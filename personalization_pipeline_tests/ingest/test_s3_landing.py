"""The S3 landing zone over real HTTP, against moto's server mode on loopback: the ingest
service uploads what it publishes, the sensor sees new objects tick by tick and hands each
over once, and ``stream_events`` stages exactly the events that were acknowledged."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator

import boto3
import dagster as dg
import pandas as pd
import pytest
import requests
from dagster_aws.s3 import S3Resource
from moto.server import ThreadedMotoServer

from personalization_pipeline.assets.sources import stream_events
from personalization_pipeline.ingest_service import IngestConfig, LandingWriter, list_ready_files, start_ingest_service
from personalization_pipeline.resources.lake import LakeResource
from personalization_pipeline.partitions import landing_partition_key
from personalization_pipeline.resources.landing_zone import (
    LocalLandingZoneResource,
    S3LandingZoneResource,
    landing_zone_from_env,
)
from personalization_pipeline.resources.shop import ShopResource
from personalization_pipeline.sensors import landing_zone_sensor

from .conftest import WRITE_KEY, make_config, shopify_headers, track_message, wait_for

CREDS = {"aws_access_key_id": "testing", "aws_secret_access_key": "testing", "region_name": "us-east-1"}


@pytest.fixture(scope="module")
def moto_url() -> Iterator[str]:
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    try:
        yield f"http://{host}:{port}"
    finally:
        server.stop()


@pytest.fixture(autouse=True)
def aws_env(monkeypatch: pytest.MonkeyPatch) -> None:
    # The ingest service's boto3 client reads credentials from the environment.
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")


def s3_client(url: str) -> Any:
    return boto3.client("s3", endpoint_url=url, **CREDS)


def keys(url: str, bucket: str) -> list[str]:
    pages = s3_client(url).get_paginator("list_objects_v2").paginate(Bucket=bucket)
    return sorted(o["Key"] for page in pages for o in page.get("Contents", []))


def s3_config(landing: Path, url: str, bucket: str, **extra: Any) -> IngestConfig:
    return make_config(
        landing, s3_bucket=bucket, s3_prefix="events/prod", s3_endpoint_url=url, rotate_seconds=0.3, **extra
    )


def zone(url: str, bucket: str) -> S3LandingZoneResource:
    return S3LandingZoneResource(s3=S3Resource(endpoint_url=url, **CREDS), bucket=bucket, prefix="events/prod")


def send_track(url: str, ids: list[str]) -> None:
    r = requests.post(f"{url}/v1/batch", json={"batch": [track_message(i) for i in ids]}, auth=(WRITE_KEY, ""))
    assert r.status_code == 200, r.text


def send_shopify(url: str, webhook_id: str) -> None:
    body = (
        b'{"id":820982911946154500,"email":"person1@example.com","created_at":"2026-11-28T10:00:00Z",'
        b'"currency":"GBP","total_price":"42.50","line_items":[{"product_id":9101,"quantity":1,"price":"42.50"}],'
        b'"customer":{"id":7002,"email":"person1@example.com"}}'
    )
    r = requests.post(f"{url}/webhooks/shopify", data=body, headers=shopify_headers(body, webhook_id=webhook_id))
    assert r.status_code == 200, r.text


def tick(resources: dict, cursor: str | None) -> dg.SensorResult:
    with dg.build_sensor_context(resources=resources, cursor=cursor) as context:
        return landing_zone_sensor(context)


def requested_files(result: dg.SensorResult) -> list[str]:
    return [f for r in result.run_requests for f in r.run_config["ops"]["stream_events"]["config"]["files"]]


def all_events(landing_zone: S3LandingZoneResource) -> list[dict]:
    return [e for f in landing_zone.list_published() for e in landing_zone.read(f)]


def test_ingest_to_s3_then_sensor_then_stream_events(tmp_path, moto_url, fake_shop):
    bucket = "pp-landing-e2e"
    s3_client(moto_url).create_bucket(Bucket=bucket)
    landing_zone = zone(moto_url, bucket)
    lake = LakeResource(root=str(tmp_path / "lake"))
    resources = {"lake": lake, "landing_zone": landing_zone}

    first = tick(resources, None)
    assert first.run_requests == [] and first.skip_reason

    with start_ingest_service(s3_config(tmp_path / "landing", moto_url, bucket)) as service:
        send_track(service.url, [f"t-{i}" for i in range(5)])
        send_shopify(service.url, "wh-s3-1")
        wait_for(lambda: len(keys(moto_url, bucket)) >= 1, timeout=10)
        second = tick(resources, first.cursor)
        batch_one = requested_files(second)
        assert batch_one and all(f.startswith(f"s3://{bucket}/events/prod/ready/") for f in batch_one)
        assert tick(resources, second.cursor).run_requests == []  # handed over: not again

        send_track(service.url, [f"u-{i}" for i in range(3)])
        wait_for(lambda: len(keys(moto_url, bucket)) > len(batch_one), timeout=10)
        third = tick(resources, second.cursor)
        batch_two = requested_files(third)
        assert batch_two and not set(batch_two) & set(batch_one)  # only the new objects
        health = requests.get(f"{service.url}/health").json()
        assert health["s3_upload"]["uploaded"] >= 2 and health["s3_upload"]["upload_errors"] == 0

    # Uploaded, then deleted locally: S3 is the landing zone now.
    assert list_ready_files(tmp_path / "landing") == []
    for key in keys(moto_url, bucket):
        assert key.startswith("events/prod/ready/2") and key.endswith(".jsonl")
    published = landing_zone.list_published()
    leftover = [f for f in published if f not in batch_one + batch_two]  # the file closed at stop

    with dg.instance_for_test() as instance:
        result = dg.materialize(
            [stream_events],
            resources={**resources, "shop": ShopResource(base_url=fake_shop.url)},
            instance=instance,
            # Files of one hour, or of the first partition when published before it starts.
            partition_key=landing_partition_key((batch_one + batch_two + leftover)[0]),
            run_config={"ops": {"stream_events": {"config": {"files": batch_one + batch_two + leftover}}}},
        )
    assert result.success
    staged = pd.read_parquet(tmp_path / "lake" / "staged" / "stream")
    expected = {f"t-{i}" for i in range(5)} | {f"u-{i}" for i in range(3)} | {"wh-s3-1"}
    assert sorted(staged["source_record_id"]) == sorted(expected)  # each exactly once
    batches = {p.stem for p in (tmp_path / "lake" / "staged" / "stream").glob("*.parquet")}
    assert batches == {Path(f).stem for f in published}  # the batch id is the file's stem

    # Staged now: the next tick requests nothing and forgets them.
    after = tick(resources, third.cursor)
    assert after.run_requests == [] and after.cursor == "{}"


def test_a_failed_upload_is_retried_and_nothing_is_lost(tmp_path, moto_url):
    bucket = "pp-landing-late"  # created only after the first uploads failed
    landing = tmp_path / "landing"
    with start_ingest_service(s3_config(landing, moto_url, bucket)) as service:
        send_track(service.url, [f"a-{i}" for i in range(4)])
        uploader = service.app.state.uploader
        assert wait_for(lambda: uploader.stats.upload_errors >= 2, timeout=10)
        assert list_ready_files(landing), "kept on disk while S3 refuses it"
        s3_client(moto_url).create_bucket(Bucket=bucket)
        send_track(service.url, [f"b-{i}" for i in range(4)])
        assert wait_for(lambda: uploader.pending() == 0 and uploader.stats.uploaded >= 2, timeout=15)
    assert list_ready_files(landing) == []
    ids = [e["delivery_id"] for e in all_events(zone(moto_url, bucket))]
    assert sorted(ids) == sorted([f"a-{i}" for i in range(4)] + [f"b-{i}" for i in range(4)])


def test_files_published_but_not_uploaded_go_at_the_next_start(tmp_path, moto_url):
    bucket = "pp-landing-restart"
    s3_client(moto_url).create_bucket(Bucket=bucket)
    landing = tmp_path / "landing"
    # A process that published and died before uploading (or ran with S3 unreachable).
    with LandingWriter(landing) as writer:
        writer.append([{"v": 1, "delivery_id": f"old-{i}", "payload": {}} for i in range(3)])
    assert len(list_ready_files(landing)) == 1
    with start_ingest_service(s3_config(landing, moto_url, bucket)) as service:
        send_track(service.url, ["new-0"])
    assert list_ready_files(landing) == []
    ids = sorted(e["delivery_id"] for e in all_events(zone(moto_url, bucket)))
    assert ids == ["new-0", "old-0", "old-1", "old-2"]


def test_the_s3_zone_reads_a_torn_last_line_like_the_local_one(tmp_path, moto_url):
    bucket = "pp-landing-torn"
    client = s3_client(moto_url)
    client.create_bucket(Bucket=bucket)
    data = b'{"v":1,"delivery_id":"ok-1","payload":{}}\n{"v":1,"delivery_id":"torn","pay'
    client.put_object(Bucket=bucket, Key="events/prod/ready/2026/11/28/10/x-1-000001.jsonl", Body=data)
    local = tmp_path / "landing" / "ready" / "2026" / "11" / "28" / "10" / "x-1-000001.jsonl"
    local.parent.mkdir(parents=True)
    local.write_bytes(data)
    s3_zone, local_zone = zone(moto_url, bucket), LocalLandingZoneResource(root=str(tmp_path / "landing"))
    (s3_file,), (local_file,) = s3_zone.list_published(), local_zone.list_published()
    from_s3, from_disk = s3_zone.read(s3_file), local_zone.read(local_file)
    assert [e.get("delivery_id") for e in from_s3] == ["ok-1", None]
    assert from_s3[1]["_unreadable"]["reason"] == from_disk[1]["_unreadable"]["reason"]
    with pytest.raises(FileNotFoundError):
        s3_zone.read(f"s3://{bucket}/events/prod/ready/2026/11/28/10/gone.jsonl")


def test_the_landing_zone_is_chosen_by_the_environment(monkeypatch, moto_url):
    monkeypatch.delenv("PP_LANDING_S3_BUCKET", raising=False)
    assert isinstance(landing_zone_from_env(), LocalLandingZoneResource)
    monkeypatch.setenv("PP_LANDING_S3_BUCKET", "b")
    monkeypatch.setenv("PP_LANDING_S3_PREFIX", "/events/prod/")
    monkeypatch.setenv("AWS_ENDPOINT_URL", moto_url)
    chosen = landing_zone_from_env()
    assert isinstance(chosen, S3LandingZoneResource)
    assert (chosen.bucket, chosen.ready_prefix(), chosen.s3.endpoint_url) == ("b", "events/prod/ready/", moto_url)
    config = IngestConfig.from_env(
        {
            "INGEST_LANDING_DIR": "/tmp/x",
            "INGEST_WRITE_KEYS": "k",
            "SHOPIFY_WEBHOOK_SECRET": "s",
            "MAILCHIMP_WEBHOOK_SECRET": "m",
            "PP_LANDING_S3_BUCKET": "b",
            "PP_LANDING_S3_PREFIX": "/events/prod/",
            "AWS_ENDPOINT_URL": moto_url,
        }
    )
    assert (config.s3_bucket, config.s3_prefix, config.s3_endpoint_url) == ("b", "events/prod", moto_url)
