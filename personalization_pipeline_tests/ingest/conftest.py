"""Fixtures for the ingest service tests: a running service on a free port, request
helpers that sign like the vendors do, and a small fake of the sandbox shop."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import threading
import time
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest
import requests

from personalization_pipeline.core.events import read_landing_file
from personalization_pipeline.ingest_service import (
    IngestConfig,
    list_ready_files,
    start_ingest_service,
)

WRITE_KEY = "wk_test_7f3a9c"
SHOPIFY_SECRET = "shpss_test_0d9e8f7a"
MAILCHIMP_SECRET = "mc_test_c0ffee42"
SECRETS = (WRITE_KEY, SHOPIFY_SECRET, MAILCHIMP_SECRET)


def make_config(landing_dir: Path, **overrides: Any) -> IngestConfig:
    settings: dict[str, Any] = dict(
        landing_dir=landing_dir,
        write_keys={WRITE_KEY, "wk_second_source"},
        shopify_secret=SHOPIFY_SECRET,
        mailchimp_webhook_secret=MAILCHIMP_SECRET,
        replay_window_seconds=300,  # the tests probe the window's edges at minutes
    )
    settings.update(overrides)
    return IngestConfig(**settings)


def env_for(landing_dir: Path, **extra: str) -> dict[str, str]:
    return {
        "INGEST_LANDING_DIR": str(landing_dir),
        "INGEST_WRITE_KEYS": f"{WRITE_KEY},wk_second_source",
        "SHOPIFY_WEBHOOK_SECRET": SHOPIFY_SECRET,
        "MAILCHIMP_WEBHOOK_SECRET": MAILCHIMP_SECRET,
        **extra,
    }


def now_iso() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def shopify_headers(
    body: bytes,
    *,
    topic: str = "orders/create",
    webhook_id: str = "wh-1",
    triggered_at: str | None = None,
    secret: str = SHOPIFY_SECRET,
    shop: str = "sandbox-shop.myshopify.com",
) -> dict[str, str]:
    signature = base64.b64encode(hmac.new(secret.encode(), body, hashlib.sha256).digest()).decode()
    return {
        "Content-Type": "application/json",
        "X-Shopify-Topic": topic,
        "X-Shopify-Hmac-Sha256": signature,
        "X-Shopify-Webhook-Id": webhook_id,
        "X-Shopify-Triggered-At": triggered_at or now_iso(),
        "X-Shopify-Shop-Domain": shop,
    }


def track_message(message_id: str, event: str = "Page Viewed", **extra: Any) -> dict[str, Any]:
    return {
        "type": "track",
        "messageId": message_id,
        "event": event,
        "anonymousId": "anon-1",
        "timestamp": now_iso(),
        "sentAt": now_iso(),
        "context": {"userAgent": "Mozilla/5.0 (iPhone; CPU iPhone OS 18_1 like Mac OS X) Mobile"},
        "properties": {},
        **extra,
    }


def landed(landing_dir: Path) -> list[dict[str, Any]]:
    """Every envelope in the published landing files, in publication order."""
    out: list[dict[str, Any]] = []
    for path in list_ready_files(landing_dir):
        out.extend(read_landing_file(path))
    return out


def wait_for(predicate: Callable[[], Any], timeout: float = 5.0, interval: float = 0.05) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(interval)


@pytest.fixture
def landing_dir(tmp_path: Path) -> Path:
    return tmp_path / "landing"


@pytest.fixture
def service(landing_dir: Path) -> Iterator[Any]:
    """A running ingest service with small limits so that the tests stay fast."""
    config = make_config(landing_dir, max_body_bytes=64 * 1024)
    handle = start_ingest_service(config)
    try:
        yield handle
    finally:
        handle.stop()


@pytest.fixture
def http() -> Iterator[requests.Session]:
    with requests.Session() as session:
        yield session


# --------------------------------------------------------------------------- fake shop

FAKE_CUSTOMERS = [
    {
        "id": 7001 + i,
        "email": f"person{i}@example.com",
        "first_name": f"First{i}",
        "last_name": f"Last{i}",
        "default_address": {"city": city, "country_code": cc},
        "anonymous_ids": [f"anon-{i}-a", f"anon-{i}-b"],
    }
    for i, (city, cc) in enumerate(
        [("London", "GB"), ("Leeds", "GB"), ("Paris", "FR"), ("Austin", "US"), ("Osaka", "JP")]
    )
]
FAKE_VISITORS = [
    {"anonymous_id": f"visitor-{i}", "customer_id": None, "email": None} for i in range(6)
] + [{"anonymous_id": "anon-0-a", "customer_id": 7001, "email": "person0@example.com"}]
FAKE_PRODUCTS = [
    {
        "id": 9100 + i,
        "title": f"Product {i}",
        "product_type": ["Shoes", "Bags", "Coats", "Hats"][i % 4],
        "variants": [{"price": f"{10 + 7 * i}.{i % 10}9"}],
    }
    for i in range(12)
]


class FakeShop:
    """The sandbox-shop endpoints the simulator reads, paging products by 5 with a Link
    header like Shopify does."""

    def __init__(self) -> None:
        shop = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                path, _, query = self.path.partition("?")
                if path == "/_admin/customers":
                    self._json({"customers": FAKE_CUSTOMERS})
                elif path == "/_admin/visitors":
                    self._json({"total": len(FAKE_VISITORS), "visitors": FAKE_VISITORS})
                elif path == "/admin/api/2024-10/products.json":
                    page = int(dict(p.split("=") for p in query.split("&") if "=" in p).get("page_info", 0))
                    chunk = FAKE_PRODUCTS[page * 5 : page * 5 + 5]
                    headers = {}
                    if (page + 1) * 5 < len(FAKE_PRODUCTS):
                        nxt = f"{shop.url}/admin/api/2024-10/products.json?limit=5&page_info={page + 1}"
                        headers["Link"] = f'<{nxt}>; rel="next"'
                    self._json({"products": chunk}, headers)
                else:
                    self.send_error(404)

            def _json(self, doc: Any, headers: dict[str, str] | None = None) -> None:
                body = json.dumps(doc).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(body)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def fake_shop() -> Iterator[FakeShop]:
    shop = FakeShop()
    try:
        yield shop
    finally:
        shop.close()


@pytest.fixture(scope="module")
def shared_service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """One service for the tests that only look at responses (stopping costs ~0.2 s)."""
    config = make_config(tmp_path_factory.mktemp("landing"), max_body_bytes=64 * 1024)
    handle = start_ingest_service(config)
    try:
        yield handle
    finally:
        handle.stop()


@pytest.fixture(scope="session")
def broker():
    """One Kafka-protocol broker (Tansu) for every Kafka test; each test makes its own topic."""
    from personalization_pipeline.broker import start_broker

    with start_broker() as running:
        yield running
