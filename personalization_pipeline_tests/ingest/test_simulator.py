"""The traffic simulator against the real ingest service and a fake sandbox shop."""

from __future__ import annotations

import collections
import json
import os
import signal
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from personalization_pipeline.core.events import envelopes_to_canonical
from personalization_pipeline.ingest_service import start_ingest_service
from personalization_pipeline.simulator import (
    ShopUnavailableError,
    TrafficModel,
    fetch_shop_data,
    run_simulator,
)

from .conftest import (
    FAKE_CUSTOMERS,
    FAKE_PRODUCTS,
    FAKE_VISITORS,
    SHOPIFY_SECRET,
    WRITE_KEY,
    env_for,
    landed,
    make_config,
)

REPO = Path(__file__).resolve().parents[2]
CATALOGUE = {str(p["id"]): p["product_type"] for p in FAKE_PRODUCTS}


def test_fetch_shop_data_reads_customers_and_all_product_pages(fake_shop):
    customers, products = fetch_shop_data(fake_shop.url)
    assert [c["id"] for c in customers] == [c["id"] for c in FAKE_CUSTOMERS]
    assert [p["id"] for p in products] == [p["id"] for p in FAKE_PRODUCTS]  # 3 pages of 5


def test_visitors_are_optional(fake_shop):
    from personalization_pipeline.simulator import fetch_anonymous_visitors

    assert fetch_anonymous_visitors(fake_shop.url) == [f"visitor-{i}" for i in range(6)]
    assert fetch_anonymous_visitors(fake_shop.url + "/nothing-here") == []


def test_shop_down_is_a_clear_error():
    with pytest.raises(ShopUnavailableError, match="cannot read the shop"):
        fetch_shop_data("http://127.0.0.1:9", attempts=1, timeout=1)


def test_end_to_end_every_acknowledged_delivery_lands(fake_shop, landing_dir):
    with start_ingest_service(make_config(landing_dir)) as svc:
        stats = run_simulator(svc.url, fake_shop.url, WRITE_KEY, SHOPIFY_SECRET, rate=1000,
                              count=250, seed=7, record_deliveries=True, redelivery_rate=0.3)
    assert stats.events_acked == 250
    assert stats.failed == stats.rejected == stats.abandoned == 0
    envelopes = landed(landing_dir)
    assert sorted(e["delivery_id"] for e in envelopes) == sorted(stats.acked_delivery_ids)
    topics = collections.Counter(e["topic"] for e in envelopes)
    assert topics["track"] == stats.track_messages
    assert topics["orders/create"] >= 1 and topics["checkouts/create"] >= 1
    if stats.redeliveries:  # Shopify-style retries: same id, same body
        webhook_ids = collections.Counter(e["delivery_id"] for e in envelopes if e["transport"] == "shopify")
        assert max(webhook_ids.values()) >= 2

    frame, rejects = envelopes_to_canonical(envelopes, CATALOGUE)
    assert rejects == []
    people = {str(c["id"]) for c in FAKE_CUSTOMERS}
    known_anon = {a for c in FAKE_CUSTOMERS for a in c["anonymous_ids"]}
    assert set(frame["customer_id"].dropna()) <= people
    web = frame[frame["source"] == "web"]
    assert web["anonymous_id"].notna().all()
    visitors = {v["anonymous_id"] for v in FAKE_VISITORS if v["customer_id"] is None}
    assert set(web["anonymous_id"]) <= known_anon | visitors  # all the shop's people
    assert known_anon & set(web["anonymous_id"]) and visitors & set(web["anonymous_id"])
    assert set(web["event_type"]) >= {"page_viewed", "product_viewed"}
    assert set(web["device_type"].dropna()) <= {"desktop", "mobile", "tablet"}
    assert web["country"].notna().all()  # full names normalised to alpha-2
    viewed = web[web["event_type"] == "product_viewed"]
    assert viewed["category"].notna().all() and viewed["product_id"].isin(CATALOGUE).all()
    orders = frame[(frame["source"] == "shop") & (frame["event_type"] == "order_completed")]
    assert orders["order_total_minor"].gt(0).all() and orders["category"].notna().all()
    # Skew correction brings device time back to within seconds of receipt.
    lag = (web["received_at"] - web["observed_at"]).dt.total_seconds()
    assert lag.abs().max() < 30


def test_same_seed_same_traffic():
    def sample(seed):
        model = TrafficModel(FAKE_CUSTOMERS, FAKE_PRODUCTS, write_key="k", shopify_secret="s", seed=seed)
        return [(item.kind, item.topic, tuple(item.delivery_ids)) for item, _ in zip(model, range(60))]

    assert sample(1) == sample(1)
    assert sample(1) != sample(2)


def test_rate_is_respected(fake_shop, landing_dir):
    with start_ingest_service(make_config(landing_dir)) as svc:
        stats = run_simulator(svc.url, fake_shop.url, WRITE_KEY, SHOPIFY_SECRET, rate=60,
                              count=30, seed=1)
    assert stats.events_acked == 30
    assert stats.elapsed_seconds >= 0.4  # the 30th event is due at 29/60 s


def test_permanent_4xx_is_counted_not_retried(fake_shop, landing_dir):
    with start_ingest_service(make_config(landing_dir)) as svc:
        stats = run_simulator(svc.url, fake_shop.url, WRITE_KEY, "wrong-secret", rate=2000,
                              count=150, seed=3)
    assert stats.rejected > 0 and stats.retries == 0
    assert stats.rejected == 150 - stats.events_acked
    assert sum(stats.webhooks.values()) == 0


class FlakyIngest:
    """Fails the first ``failures`` POSTs (503 + Retry-After: 0, then a dropped
    connection), then accepts everything."""

    def __init__(self, failures: int) -> None:
        state = {"n": 0}
        self.accepted = 0
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                self.rfile.read(int(self.headers.get("Content-Length", 0)))
                state["n"] += 1
                if state["n"] <= failures:
                    if state["n"] % 2:
                        self.send_response(503)
                        self.send_header("Retry-After", "0")
                        self.send_header("Content-Length", "0")
                        self.end_headers()
                    else:
                        self.close_connection = True
                        self.connection.close()
                    return
                outer.accepted += 1
                self.send_response(200)
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"{}")

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


def test_retries_with_backoff_on_5xx_and_dropped_connections(fake_shop):
    flaky = FlakyIngest(failures=4)
    try:
        stats = run_simulator(flaky.url, fake_shop.url, WRITE_KEY, SHOPIFY_SECRET, rate=1000,
                              count=10, seed=5, backoff_base=0.01)
    finally:
        flaky.server.shutdown()
    assert stats.retries == 4
    assert stats.events_acked == 10 and stats.failed == 0


def test_cli_stops_cleanly_on_sigterm(fake_shop, landing_dir):
    with start_ingest_service(make_config(landing_dir)) as svc:
        env = {"PATH": os.environ.get("PATH", ""), "PYTHONPATH": str(REPO),
               "INGEST_WRITE_KEYS": env_for(landing_dir)["INGEST_WRITE_KEYS"],
               "SHOPIFY_WEBHOOK_SECRET": SHOPIFY_SECRET}
        proc = subprocess.Popen(
            [sys.executable, "-m", "personalization_pipeline.simulator", "--ingest-url", svc.url,
             "--shop-url", fake_shop.url, "--rate", "40", "--seed", "1"],
            env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        deadline = time.monotonic() + 20
        while svc.app.state.counters.events_accepted["track"] < 5:
            assert time.monotonic() < deadline and proc.poll() is None, proc.stderr.read()
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=10)
    assert proc.returncode == 0, err
    summary = json.loads(out.strip().splitlines()[-1])
    assert summary["events_acked"] >= 5 and summary["failed"] == 0
    assert "Traceback" not in err
    assert len([e for e in landed(landing_dir)]) == summary["events_acked"]


def test_cli_without_secrets_is_one_clear_line(fake_shop):
    result = subprocess.run(
        [sys.executable, "-m", "personalization_pipeline.simulator", "--ingest-url", "http://x",
         "--shop-url", fake_shop.url],
        env={"PATH": os.environ.get("PATH", ""), "PYTHONPATH": str(REPO)},
        cwd=REPO, capture_output=True, text=True, timeout=20,
    )
    assert result.returncode == 2
    assert result.stderr.strip() == "simulator: INGEST_WRITE_KEY (or INGEST_WRITE_KEYS) is not set"


def test_cli_shop_down_is_one_clear_line():
    result = subprocess.run(
        [sys.executable, "-m", "personalization_pipeline.simulator", "--ingest-url", "http://x",
         "--shop-url", "http://127.0.0.1:9", "--shop-attempts", "1"],
        env={"PATH": os.environ.get("PATH", ""), "PYTHONPATH": str(REPO),
             "INGEST_WRITE_KEY": WRITE_KEY, "SHOPIFY_WEBHOOK_SECRET": SHOPIFY_SECRET},
        cwd=REPO, capture_output=True, text=True, timeout=20,
    )
    assert result.returncode == 2
    assert result.stderr.startswith("simulator: cannot read the shop at http://127.0.0.1:9")
    assert len(result.stderr.strip().splitlines()) == 1
