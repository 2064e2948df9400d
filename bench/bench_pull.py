"""CRM pull throughput: the real HubSpot client (OAuth, shared rate limiter, keyset paging)
against the sandbox at its default limits (search 4 requests/s × 200 records).
Target (PRODUCT.md section 10): ≥ 720 records/s sustained.

The sandbox runs in its own process, as a vendor would: in the client's process the two
would share one interpreter lock and the server's arrival times would jitter with the
client's work."""

from __future__ import annotations

import subprocess
import sys
import tempfile
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import requests

from bench.common import Figure
from personalization_pipeline.ports import free_ports
from personalization_pipeline.resources.hubspot import HubSpotClient
from personalization_pipeline.resources.shared_state import SecretStore, SharedRateLimiter
from personalization_pipeline.sandbox.server import SandboxConfig

SIZES = {"small": 3_000, "full": 150_000}


def run(size: str) -> list[Figure]:
    people = SIZES[size]
    cfg = SandboxConfig()
    hub_port, mc_port, shop_port, alerts_port = free_ports(4)
    server = subprocess.Popen(
        [
            sys.executable, "-m", "personalization_pipeline.sandbox", "--size", str(people),
            "--hubspot-port", str(hub_port), "--mailchimp-port", str(mc_port),
            "--shop-port", str(shop_port), "--alerts-port", str(alerts_port),
        ],
        stdout=subprocess.DEVNULL,
    )
    base = f"http://127.0.0.1:{hub_port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                requests.get(f"{base}/_admin/auth", timeout=1)
                break
            except requests.RequestException:
                if time.monotonic() > deadline or server.poll() is not None:
                    raise RuntimeError("the sandbox did not start")
                time.sleep(0.2)
        with tempfile.TemporaryDirectory() as tmp:
            client = HubSpotClient(
                base_url=base,
                token_url=f"{base}/oauth/v1/token",
                client_id=cfg.hubspot_client_id,
                client_secret=cfg.hubspot_client_secret,
                refresh_token=cfg.hubspot_refresh_token,
                private_app_token=None,
                secret_store=SecretStore(Path(tmp) / "secrets.json"),
                limiter=SharedRateLimiter(Path(tmp) / "coordination.sqlite"),
            )
            end = datetime.now(timezone.utc) + timedelta(minutes=1)
            start = end - timedelta(days=400)
            t0 = time.perf_counter()
            records = sum(len(page) for page in client.contacts_modified(start, end))
            elapsed = time.perf_counter() - t0
    finally:
        server.terminate()
        server.wait(timeout=30)
    rate = records / elapsed
    return [
        Figure("pull", "HubSpot contacts pull throughput", round(rate, 1), "records/s", target=720,
               note=f"{records:,} contacts, {client.stats.pages} pages, {client.stats.http_429} × 429, {elapsed:.1f} s"),
    ]
