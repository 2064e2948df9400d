"""CRM pull throughput: the real HubSpot client (OAuth, shared rate limiter, keyset paging)
against the sandbox at its default limits (search 4 requests/s × 200 records).
Target (PRODUCT.md section 10): ≥ 720 records/s sustained."""

from __future__ import annotations

import tempfile
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

from bench.common import Figure
from personalization_pipeline.resources.hubspot import HubSpotClient
from personalization_pipeline.resources.shared_state import SecretStore, SharedRateLimiter
from personalization_pipeline.sandbox.server import SandboxConfig, start_sandbox

SIZES = {"small": 3_000, "full": 150_000}


def run(size: str) -> list[Figure]:
    people = SIZES[size]
    with tempfile.TemporaryDirectory() as tmp, start_sandbox(SandboxConfig(size=people)) as sandbox:
        cfg = sandbox.config
        client = HubSpotClient(
            base_url=sandbox.hubspot_url,
            token_url=f"{sandbox.hubspot_url}/oauth/v1/token",
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
    rate = records / elapsed
    return [
        Figure("pull", "HubSpot contacts pull throughput", round(rate, 1), "records/s", target=720,
               note=f"{records:,} contacts, {client.stats.pages} pages, {client.stats.http_429} × 429, {elapsed:.1f} s"),
    ]
