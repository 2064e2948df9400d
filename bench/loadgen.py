"""Load generator for the ingest service: one signed Shopify webhook per request.

A benchmark helper, not a test: ``python -m bench.loadgen
--spawn --requests 20000 --concurrency 32`` starts the service as its own process (temp
landing dir), drives it from this process over keep-alive loopback connections with
pre-built, pre-signed requests, stops it, checks that every 2xx'd delivery is in the
published landing files, and prints throughput and latency percentiles as JSON.
``--url`` targets an already running service instead (then set ``--secret``).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import hashlib
import hmac
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from datetime import datetime, timezone
from pathlib import Path
from urllib.parse import urlsplit

REPO = Path(__file__).resolve().parents[1]


def build_requests(n: int, host: str, secret: str) -> tuple[list[bytes], list[str]]:
    now = datetime.now(timezone.utc)
    triggered = now.strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    created = now.isoformat(timespec="seconds")
    key = secret.encode()
    out, ids = [], []
    for i in range(n):
        webhook_id = str(uuid.uuid4())
        body = json.dumps({
            "id": 6_000_000 + i, "email": f"load{i % 5000}@example.com", "created_at": created,
            "updated_at": created, "currency": "USD", "total_price": "42.50",
            "line_items": [{"product_id": 9100 + i % 12, "title": "Thing", "quantity": 1,
                            "price": "42.50", "sku": "SKU"}],
            "customer": {"id": 7000 + i % 5000, "email": f"load{i % 5000}@example.com",
                         "first_name": "Load", "last_name": "Test",
                         "default_address": {"city": "London", "country_code": "GB"}},
        }, separators=(",", ":")).encode()
        signature = base64.b64encode(hmac.new(key, body, hashlib.sha256).digest()).decode()
        head = (
            f"POST /webhooks/shopify HTTP/1.1\r\nHost: {host}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
            f"X-Shopify-Topic: orders/create\r\nX-Shopify-Hmac-Sha256: {signature}\r\n"
            f"X-Shopify-Webhook-Id: {webhook_id}\r\nX-Shopify-Triggered-At: {triggered}\r\n"
            f"X-Shopify-Shop-Domain: load.myshopify.com\r\n\r\n"
        ).encode()
        out.append(head + body)
        ids.append(webhook_id)
    return out, ids


async def _drive(url: str, requests: list[bytes], ids: list[str], concurrency: int) -> dict:
    parts = urlsplit(url)
    latencies: list[float] = []
    statuses: dict[int, int] = {}
    acked: list[str] = []
    next_index = 0

    async def worker() -> None:
        nonlocal next_index
        reader, writer = await asyncio.open_connection(parts.hostname, parts.port)
        try:
            while next_index < len(requests):
                i = next_index
                next_index += 1
                started = time.perf_counter()
                writer.write(requests[i])
                head = await reader.readuntil(b"\r\n\r\n")
                status = int(head[9:12])
                length = int(re.search(rb"(?i)content-length: *(\d+)", head).group(1))
                await reader.readexactly(length)
                latencies.append(time.perf_counter() - started)
                statuses[status] = statuses.get(status, 0) + 1
                if 200 <= status < 300:
                    acked.append(ids[i])
        finally:
            writer.close()

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    elapsed = time.perf_counter() - started
    latencies.sort()

    def pct(p: float) -> float:
        return round(latencies[min(len(latencies) - 1, int(p * len(latencies)))] * 1000, 2)

    return {
        "requests": len(requests),
        "concurrency": concurrency,
        "elapsed_s": round(elapsed, 3),
        "acked_per_s": round(len(acked) / elapsed, 1),
        "p50_ms": pct(0.50), "p95_ms": pct(0.95), "p99_ms": pct(0.99), "max_ms": pct(1.0),
        "statuses": statuses,
        "acked_ids": acked,
    }


def run_load(url: str, secret: str, n: int, concurrency: int) -> dict:
    """Send ``n`` webhooks over ``concurrency`` keep-alive connections; returns the figures
    and the acknowledged delivery ids."""
    host = urlsplit(url).netloc
    requests, ids = build_requests(n, host, secret)
    try:
        import uvloop

        return uvloop.run(_drive(url, requests, ids, concurrency))
    except ImportError:
        return asyncio.run(_drive(url, requests, ids, concurrency))


def spawn_service(
    landing_dir: Path, secret: str, extra_env: dict[str, str] | None = None
) -> tuple[subprocess.Popen, str]:
    env = {
        "PATH": os.environ.get("PATH", ""), "PYTHONPATH": str(REPO),
        "INGEST_LANDING_DIR": str(landing_dir), "INGEST_WRITE_KEYS": "load-key",
        "SHOPIFY_WEBHOOK_SECRET": secret, "MAILCHIMP_WEBHOOK_SECRET": "load-mc",
        **(extra_env or {}),
    }
    proc = subprocess.Popen(
        [sys.executable, "-m", "personalization_pipeline.ingest_service", "--port", "0",
         "--log-level", "warning"],
        env=env, cwd=REPO, stderr=subprocess.PIPE, text=True,
    )
    # at warning level nothing is printed on start: find the port from /proc instead
    deadline = time.monotonic() + 20
    import requests as http

    while time.monotonic() < deadline:
        port = _listening_port(proc.pid)
        if port:
            url = f"http://127.0.0.1:{port}"
            try:
                if http.get(f"{url}/health", timeout=1).status_code == 200:
                    threading.Thread(target=proc.stderr.read, daemon=True).start()
                    return proc, url
            except http.ConnectionError:
                pass
        time.sleep(0.05)
    proc.kill()
    raise RuntimeError("ingest service did not start")


def _cpu_seconds(pid: int) -> float:
    """utime + stime of a process (all its threads), from /proc."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _listening_port(pid: int) -> int | None:
    inodes = set()
    try:
        for fd in os.listdir(f"/proc/{pid}/fd"):
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
            if target.startswith("socket:["):
                inodes.add(target[8:-1])
        with open("/proc/net/tcp") as f:
            for line in f.readlines()[1:]:
                fields = line.split()
                if fields[3] == "0A" and fields[9] in inodes:  # LISTEN
                    return int(fields[1].split(":")[1], 16)
    except OSError:
        return None
    return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url")
    parser.add_argument("--spawn", action="store_true")
    parser.add_argument("--secret", default="load-secret")
    parser.add_argument("--requests", type=int, default=20000)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--warmup", type=int, default=1000)
    args = parser.parse_args(argv)
    if not (args.url or args.spawn):
        parser.error("give --url or --spawn")

    from personalization_pipeline.core.events import read_landing_file
    from personalization_pipeline.ingest_service.landing import list_ready_files

    tmp = tempfile.TemporaryDirectory() if args.spawn else None
    proc = None
    try:
        if args.spawn:
            proc, url = spawn_service(Path(tmp.name), args.secret)
        else:
            url = args.url
        if args.warmup:
            run_load(url, args.secret, args.warmup, args.concurrency)
        server_cpu = _cpu_seconds(proc.pid) if proc is not None else None
        client_cpu = time.process_time()
        result = run_load(url, args.secret, args.requests, args.concurrency)
        acked = result.pop("acked_ids")
        result["client_cpu_ms_per_request"] = round(
            (time.process_time() - client_cpu) * 1000 / args.requests, 3)
        if proc is not None:
            used = _cpu_seconds(proc.pid) - server_cpu
            result["server_cpu_ms_per_request"] = round(used * 1000 / args.requests, 3)
            result["server_capacity_per_cpu_core"] = round(args.requests / used) if used else None
        result["load_average_1m"] = os.getloadavg()[0]
        if proc is not None:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=30)
            landed = {e.get("delivery_id") for p in list_ready_files(tmp.name) for e in read_landing_file(p)}
            result["acked_missing_from_landing"] = len(set(acked) - landed)
        print(json.dumps(result))
    finally:
        if proc is not None and proc.poll() is None:
            proc.kill()
        if tmp is not None:
            tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
