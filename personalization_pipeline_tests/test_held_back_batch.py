"""A batch over the quarantine threshold is held back from profiles and the push, and
alerts, while a good batch next to it goes through (PRODUCT.md section 7, issue 5). Over
real HTTP: the Mailchimp sandbox receives the push, the alert sink receives the alert."""

from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone
from pathlib import Path

import dagster as dg
import requests

from personalization_pipeline.assets.profiles import identity_and_profiles, open_store
from personalization_pipeline.assets.sources import source_snapshot, stream_events
from personalization_pipeline.assets.sync import esp_attribute_sync
from personalization_pipeline.definitions import defs
from personalization_pipeline.resources.lake import Lake
from personalization_pipeline.sensors import asset_check_alert_sensor
from personalization_pipeline_tests.test_pipeline_e2e import world  # noqa: F401 (fixture)

PARTITION = "2026-11-28-12:00"
RECEIVED = datetime(2026, 11, 28, 12, 0, tzinfo=timezone.utc)


def _iso(moment: datetime) -> str:
    return moment.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _track(i: int, email: str | None, city: str, currency: str = "EUR") -> dict:
    body = {
        "type": "track",
        "event": "Order Completed" if currency != "EUR" else "Product Viewed",
        "messageId": f"held-test-{i}",
        "anonymousId": f"anon-held-{i}",
        "timestamp": _iso(RECEIVED - timedelta(minutes=2)),
        "context": {"location": {"city": city}},
        "properties": {"product_id": f"p{i}", "category": "shoes", "currency": currency, "total": "5.00",
                       **({"email": email} if email else {})},
    }
    return {"v": 1, "delivery_id": f"dlv-held-{i}", "transport": "track", "topic": None,
            "received_at": _iso(RECEIVED), "headers": {}, "payload": body}


def _landing_file(tmp: Path, name: str, envelopes: list[dict]) -> str:
    path = tmp / "landing" / "ready" / "2026" / "11" / "28" / "12" / f"{name}.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(e) + "\n" for e in envelopes))
    return str(path)


def _stream(resources, instance, path: str) -> dg.ExecuteInProcessResult:
    return dg.materialize(
        [stream_events], resources=resources, instance=instance, partition_key=PARTITION, raise_on_error=False,
        run_config={"ops": {"stream_events": {"config": {"files": [path]}}}},
    )


def test_a_failed_batch_is_held_back_from_profiles_and_the_push_and_alerts(world, monkeypatch):  # noqa: F811
    sandbox, clock, resources, tmp, instance = world
    monkeypatch.setenv("PP_ALERT_WEBHOOK_URL", f"{sandbox.alerts_url}/alerts")
    chimp = sandbox.mailchimp_state
    assert dg.materialize([source_snapshot], resources=resources, instance=instance).success
    subscribed = [m["email_address"] for m in chimp.ground_truth(None, None, status="subscribed")]
    good_email, held_email = subscribed[0], subscribed[1]

    # A good batch: one event for a known member, from Goodville.
    good = _stream(resources, instance, _landing_file(tmp, "good", [_track(1, good_email, "Goodville")]))
    assert good.success
    # A bad batch: 240 rows, 20 of them refused (a currency that is not three letters), and
    # one valid event for another member, from Heldtown: the batch fails its blocking check.
    rows = [_track(100 + i, None, "Elsewhere") for i in range(219)]
    rows += [_track(400 + i, None, "Elsewhere", currency="euro") for i in range(20)]
    rows += [_track(999, held_email, "Heldtown")]
    bad = _stream(resources, instance, _landing_file(tmp, "bad", rows))
    assert not bad.success
    [check] = [c for c in bad.get_asset_check_evaluations() if c.check_name == "quarantine_rate"]
    assert not check.passed and check.blocking

    # The profile run (as profile_refresh_sensor or the next stream run starts it) applies the
    # good batch, holds the bad one back, and the push sends only what the good batch brought.
    run = dg.materialize([identity_and_profiles, esp_attribute_sync], resources=resources, instance=instance)
    assert run.success
    meta = {
        k: v.value
        for e in run.get_asset_materialization_events() if e.asset_key == dg.AssetKey("resolved_profiles")
        for k, v in e.materialization.metadata.items()
    }
    assert meta["batches_held"] == 1
    assert "stream/bad" in meta["held_batches"]
    store = open_store(Lake(tmp / "lake"))
    cities = set(store.profiles()["city"].dropna())
    assert "Goodville" in cities and "Heldtown" not in cities and "Elsewhere" not in cities
    ledger = store.ledger().set_index(["source", "batch"])
    assert ledger.loc[("stream", "bad"), "verdict"] == "failed"
    assert ledger.loc[("stream", "good"), "verdict"] == "passed"

    pushed = {m["email_address"]: m["merge_fields"] for p in chimp.pushes for m in p["members"]}
    assert pushed[good_email]["CITY"] == "Goodville"
    assert all(fields.get("CITY") != "Heldtown" for fields in pushed.values())

    # The failed check reaches the alert path, naming the check and the batch.
    asset_check_alert_sensor(dg.build_sensor_context(instance=instance, cursor=None, definitions=defs))
    alerts = [a["body"] for a in requests.get(f"{sandbox.alerts_url}/_admin/alerts", timeout=5).json()["alerts"]]
    [alert] = [a for a in alerts if a.get("check") == "quarantine_rate"]
    assert alert["asset"] == "stream_events" and alert["batches"] == ["bad"]
    assert held_email not in json.dumps(alerts)
