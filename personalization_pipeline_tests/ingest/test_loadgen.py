"""The ingest load generator at a small size, so that the benchmark never rots."""

from __future__ import annotations

from .conftest import SHOPIFY_SECRET, landed
from bench.loadgen import run_load


def test_loadgen_smoke(service, landing_dir):
    result = run_load(service.url, SHOPIFY_SECRET, n=300, concurrency=8)
    assert result["statuses"] == {200: 300}
    assert result["p99_ms"] > 0 and result["acked_per_s"] > 0
    service.stop()
    assert sorted(e["delivery_id"] for e in landed(landing_dir)) == sorted(result["acked_ids"])
