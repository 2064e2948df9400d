"""Webhook ingest throughput and latency: one signed Shopify webhook per request, from a
load generator in this process to the ingest service in its own process, on loopback.
An event counts only when the service answered 2xx, i.e. after its fsync; every
acknowledged delivery is then checked to be in the published landing files.
Targets (PRODUCT.md section 10): ≥ 2,000 events/s durable, p99 ≤ 50 ms."""

from __future__ import annotations

import signal
import tempfile
from pathlib import Path

from bench.common import Figure
from bench.loadgen import run_load, spawn_service
from personalization_pipeline.core.events import read_landing_file
from personalization_pipeline.ingest_service.landing import list_ready_files

SIZES = {"small": 3_000, "full": 40_000}
CONCURRENCY = 16
SECRET = "bench-secret"


def run(size: str) -> list[Figure]:
    n = SIZES[size]
    with tempfile.TemporaryDirectory() as tmp:
        proc, url = spawn_service(Path(tmp), SECRET)
        try:
            run_load(url, SECRET, min(1000, n // 3), CONCURRENCY)  # warm-up
            result = run_load(url, SECRET, n, CONCURRENCY)
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=30)
        landed = {e.get("delivery_id") for p in list_ready_files(tmp) for e in read_landing_file(p)}
    acked = set(result["acked_ids"])
    missing = len(acked - landed)
    if missing:
        raise RuntimeError(f"{missing} acknowledged deliveries are missing from the landing files")
    note = f"{n:,} requests, concurrency {CONCURRENCY}, statuses {result['statuses']}, all acknowledged events landed"
    return [
        Figure("ingest", "webhook ingest throughput (durable)", result["acked_per_s"], "events/s",
               target=2000, note=note),
        Figure("ingest", "webhook ingest p99 latency", result["p99_ms"], "ms", target=50, higher_is_better=False,
               note=f"p50 {result['p50_ms']} ms, max {result['max_ms']} ms"),
    ]
