"""Starting and stopping the sandbox, the command line, churn, the shop and the alert sink."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path

import pytest
import requests

from personalization_pipeline.sandbox import PortInUseError, SandboxConfig, start_sandbox
from personalization_pipeline.sandbox.server import Churn

from .conftest import HUBSPOT, MAILCHIMP, WORLD_NOW, FakeClock

REPO = Path(__file__).resolve().parents[2]


def busy_port() -> socket.socket:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(1)
    return sock


def test_start_serves_all_apps_on_free_ports_and_stops(http):
    with start_sandbox(SandboxConfig(world_now=WORLD_NOW)) as sandbox:
        urls = sandbox.urls
        assert len({u.rsplit(":", 1)[1] for u in urls.values()}) == 4
        assert http.get(f"{sandbox.shop_url}/_admin/products").status_code == 200
        assert http.get(f"{sandbox.hubspot_url}/crm/v3/objects/contacts", headers=HUBSPOT).status_code == 200
        assert http.get(f"{sandbox.mailchimp_url}/3.0/ping", headers=MAILCHIMP).status_code == 200
        assert http.get(f"{sandbox.alerts_url}/_admin/alerts").json() == {"total": 0, "alerts": []}
        assert sandbox.world.size == 2000 and len(sandbox.hubspot_state.ids) == len(sandbox.world.contacts)
    with pytest.raises(requests.ConnectionError):
        requests.get(f"{urls['shop']}/_admin/products", timeout=2)


def test_a_port_in_use_is_a_clear_error():
    taken = busy_port()
    port = taken.getsockname()[1]
    try:
        with pytest.raises(PortInUseError) as info:
            start_sandbox(SandboxConfig(world_now=WORLD_NOW), ports={"mailchimp": port})
        assert str(info.value) == f"mailchimp port {port} on 127.0.0.1 is already in use"
        assert info.value.port == port
    finally:
        taken.close()


def _cli(*args: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.Popen([sys.executable, "-m", "personalization_pipeline.sandbox", *args], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_cli_port_in_use_exits_2_with_one_line():
    taken = busy_port()
    port = taken.getsockname()[1]
    try:
        proc = _cli("--hubspot-port", str(port), "--mailchimp-port", "0", "--shop-port", "0", "--alerts-port", "0")
        out, err = proc.communicate(timeout=60)
    finally:
        taken.close()
    assert proc.returncode == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and f"hubspot port {port} on 127.0.0.1 is already in use" in lines[0]
    assert "Traceback" not in err


def test_cli_prints_urls_and_stops_on_sigterm():
    proc = _cli("--hubspot-port", "0", "--mailchimp-port", "0", "--shop-port", "0", "--alerts-port", "0",
                "--size", "300", "--edits-per-minute", "30")
    try:
        lines = [proc.stdout.readline() for _ in range(5)]
        assert lines[0].startswith("sandbox running")
        urls = dict(line.split() for line in lines[1:])
        assert set(urls) == {"hubspot", "mailchimp", "shop", "alerts"}
        assert requests.get(f"{urls['shop']}/_admin/products", timeout=5).status_code == 200
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err
    assert "sandbox stopped" in out


def test_churn_follows_the_clock():
    clock = FakeClock(WORLD_NOW)
    with start_sandbox(SandboxConfig(world_now=WORLD_NOW, clock=clock, size=500)) as sandbox:
        churn = Churn(sandbox.hubspot_state, sandbox.mailchimp_state, edits_per_minute=30, clock=clock)
        assert churn.tick() == 0
        clock.advance(20)
        assert churn.tick() == 10
        now_ms = int(clock().timestamp() * 1000)
        assert int((sandbox.hubspot_state.lmd == now_ms).sum()) == 10
        assert int((sandbox.mailchimp_state.last_changed == now_ms).sum()) == 10
        assert churn.tick() == 0


def test_background_churn_runs_with_the_configured_rate():
    clock = FakeClock(WORLD_NOW)
    config = SandboxConfig(world_now=WORLD_NOW, clock=clock, size=500, edits_per_minute=60, churn_poll_seconds=0.02)
    with start_sandbox(config) as sandbox:
        clock.advance(5)
        deadline = time.monotonic() + 5
        while sandbox.churn.done < 5 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert sandbox.churn.done == 5
        since = WORLD_NOW + timedelta(seconds=5)
        changed = requests.get(f"{sandbox.mailchimp_url}/_admin/members",
                               params={"since_last_changed": since.isoformat()}).json()
        assert changed["total_items"] == 5


def test_shop_catalogue_pages_through_link_headers(fresh, http):
    url = f"{fresh.shop_url}/admin/api/2024-10/products.json"
    products, params = [], {"limit": 60, "fields": "id,product_type"}
    while url:
        r = http.get(url, params=params)
        products.extend(r.json()["products"])
        url = r.links.get("next", {}).get("url")
        params = None
    assert len(products) == 200 and set(products[0]) == {"id", "product_type"}
    full = http.get(f"{fresh.shop_url}/admin/api/2024-10/products.json", params={"limit": 250}).json()["products"]
    assert full[0]["variants"][0]["price"] == fresh.world.products[0]["price"]
    assert http.get(f"{fresh.shop_url}/admin/api/2024-10/products.json", params={"page": 2}).json()["products"][0][
        "id"] == fresh.world.products[50]["id"]
    assert http.get(f"{fresh.shop_url}/admin/api/2024-10/products.json", params={"limit": 251}).status_code == 400
    one = http.get(f"{fresh.shop_url}/admin/api/2024-10/products/{full[3]['id']}.json").json()["product"]
    assert one["title"] == full[3]["title"]
    flat = http.get(f"{fresh.shop_url}/_admin/products").json()
    assert flat["total"] == 200 and {"id", "title", "product_type", "price"} <= set(flat["products"][0])
    customers = http.get(f"{fresh.shop_url}/_admin/customers", params={"limit": 5}).json()
    assert customers["total"] == len(fresh.world.customers) and len(customers["customers"]) == 5
    customer = customers["customers"][0]
    assert {"id", "email", "first_name", "last_name", "default_address", "anonymous_ids"} <= set(customer)
    visitors = http.get(f"{fresh.shop_url}/_admin/visitors", params={"offset": 10, "limit": 20}).json()
    assert visitors["total"] == len(fresh.world.web) and len(visitors["visitors"]) == 20


def test_alert_sink_records_json(fresh, http):
    url = fresh.alerts_url
    http.delete(f"{url}/_admin/alerts")
    assert http.post(f"{url}/alerts", json={"text": "check failed", "severity": "error"}).json() == {"ok": True}
    assert http.post(f"{url}/alerts/slack", json={"text": "second"}).status_code == 200
    assert http.post(f"{url}/alerts", data="not json").status_code == 400
    alerts = http.get(f"{url}/_admin/alerts").json()
    assert alerts["total"] == 2 and alerts["alerts"][0]["body"]["text"] == "check failed"
    assert alerts["alerts"][1]["path"] == "/alerts/slack"
