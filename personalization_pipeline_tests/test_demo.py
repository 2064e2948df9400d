"""`make demo` as a new user meets it: one command brings up the sandbox, the ingest
service, the simulator and dagster dev; schedules and sensors (not a launch at start-up)
materialise the whole graph and the ESP sandbox receives attributes; Ctrl-C stops it all."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import dagster as dg
import psutil
import pytest
import requests

from personalization_pipeline.demo import check_port_free, PortInUse
from personalization_pipeline.ports import free_ports

REPO = Path(__file__).resolve().parent.parent
ALL_ASSETS = [
    "source_snapshot", "crm_contacts", "crm_deletions", "esp_members", "esp_engagement", "stream_events", "kafka_events", "identity_map",
    "identity_conflicts", "resolved_profiles", "profile_attribute_provenance", "esp_attribute_sync",
]


def test_a_busy_port_is_a_clear_message_not_a_traceback():
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with pytest.raises(PortInUse, match=f"port {port} .* already in use.*--ui-port"):
            check_port_free(port, "--ui-port")
        result = subprocess.run(
            [sys.executable, "-m", "personalization_pipeline.demo", "--ui-port", str(port)],
            capture_output=True, text=True, timeout=60, cwd=REPO,
        )
    assert result.returncode == 2
    assert f"port {port} on 127.0.0.1 is already in use" in result.stderr
    assert "Traceback" not in result.stderr


def _materialised(home: Path) -> set[str]:
    instance = dg.DagsterInstance.from_config(str(home))
    try:
        done = set()
        for key in ALL_ASSETS:
            if instance.fetch_materializations(dg.AssetKey(key), limit=1).records:
                done.add(key)
        return done
    finally:
        instance.dispose()


def test_demo_materialises_the_graph_from_schedules_and_sensors(tmp_path):
    ui, hub, chimp, shop, alerts, ingest, kafka = free_ports(7)
    cmd = [
        sys.executable, "-m", "personalization_pipeline.demo", "--dir", str(tmp_path),
        "--ui-port", str(ui), "--hubspot-port", str(hub), "--mailchimp-port", str(chimp),
        "--shop-port", str(shop), "--alerts-port", str(alerts), "--ingest-port", str(ingest),
        "--kafka-port", str(kafka),
        "--size", "600",
    ]
    log = open(tmp_path / "demo.log", "w")
    demo = subprocess.Popen(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
    family: list[psutil.Process] = []
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                if requests.get(f"http://127.0.0.1:{ui}/server_info", timeout=2).ok:
                    break
            except requests.RequestException:
                pass
            assert demo.poll() is None, (tmp_path / "demo.log").read_text()[-3000:]
            time.sleep(1)
        ui_up = time.monotonic()
        home = tmp_path / "dagster_home"
        done: set[str] = set()
        pushed = 0
        while time.monotonic() - ui_up < 180:
            family = psutil.Process(demo.pid).children(recursive=True)
            done = _materialised(home)
            pushes = requests.get(f"http://127.0.0.1:{chimp}/_admin/pushes", timeout=5).json()
            pushed = sum(len(p["members"]) for p in pushes["pushes"])
            if done == set(ALL_ASSETS) and pushed > 0:
                break
            time.sleep(5)
        assert done == set(ALL_ASSETS), f"missing after 3 minutes: {set(ALL_ASSETS) - done}"
        assert pushed > 0
        instance = dg.DagsterInstance.from_config(str(home))
        runs = instance.get_runs()
        instance.dispose()
        assert runs and all(
            r.tags.get("dagster/schedule_name") or r.tags.get("dagster/sensor_name") for r in runs
        ), "every run was started by a schedule or a sensor"
    finally:
        demo.send_signal(signal.SIGINT)
        try:
            demo.wait(timeout=60)
        finally:
            log.close()
    _, alive = psutil.wait_procs(family, timeout=15)
    assert not alive, f"processes left behind: {[p.pid for p in alive]}"
    assert demo.returncode == 0, (tmp_path / "demo.log").read_text()[-3000:]
