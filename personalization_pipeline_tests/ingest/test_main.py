"""The service as a process: start-up errors, graceful stop, and kill -9 under load."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import requests

from personalization_pipeline.ingest_service import start_ingest_service

from .conftest import WRITE_KEY, env_for, landed, make_config, shopify_headers, track_message

MODULE = "personalization_pipeline.ingest_service"
REPO = Path(__file__).resolve().parents[2]


def run_cli(args: list[str], env: dict[str, str], timeout: float = 20) -> subprocess.CompletedProcess:
    full_env = {"PATH": os.environ.get("PATH", ""), "PYTHONPATH": str(REPO), **env}
    return subprocess.run([sys.executable, "-m", MODULE, *args], env=full_env, cwd=REPO,
                          capture_output=True, text=True, timeout=timeout)


def start_process(landing_dir: Path, **extra_env: str) -> tuple[subprocess.Popen, str]:
    env = {"PATH": os.environ.get("PATH", ""), "PYTHONPATH": str(REPO),
           **env_for(landing_dir, **extra_env)}
    proc = subprocess.Popen([sys.executable, "-m", MODULE, "--port", "0", "--log-level", "info"],
                            env=env, cwd=REPO, stderr=subprocess.PIPE, text=True)
    assert proc.stderr is not None
    deadline = time.monotonic() + 20
    url = None
    for line in proc.stderr:
        match = re.search(r"listening on (http://\S+?),", line)
        if match:
            url = match.group(1)
            break
        assert time.monotonic() < deadline, "service did not start"
    assert url, "service exited before listening"
    threading.Thread(target=lambda: [None for _ in proc.stderr], daemon=True).start()  # drain
    for _ in range(200):
        try:
            if requests.get(f"{url}/health", timeout=1).status_code == 200:
                return proc, url
        except requests.ConnectionError:
            time.sleep(0.05)
    raise AssertionError("service never became healthy")


def test_missing_configuration_is_one_clear_line(tmp_path):
    env = env_for(tmp_path)
    del env["SHOPIFY_WEBHOOK_SECRET"]
    result = run_cli([], env)
    assert result.returncode == 2
    assert "SHOPIFY_WEBHOOK_SECRET" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert "Traceback" not in result.stderr


def test_port_in_use_is_one_clear_line(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = run_cli(["--host", "127.0.0.1", "--port", str(port)], env_for(tmp_path))
    assert result.returncode == 2
    assert result.stderr.strip() == f"ingest: cannot listen on 127.0.0.1:{port}: address already in use"


def test_unwritable_landing_dir_is_one_clear_line(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    result = run_cli([], env_for(blocker / "landing"))
    assert result.returncode == 2
    assert "landing dir" in result.stderr and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_sigterm_stops_gracefully_and_publishes(tmp_path):
    landing_dir = tmp_path / "landing"
    proc, url = start_process(landing_dir)
    try:
        r = requests.post(f"{url}/v1/batch", json={"batch": [track_message("term-1")]},
                          auth=(WRITE_KEY, ""))
        assert r.status_code == 200
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=15) == 0
    assert [e["delivery_id"] for e in landed(landing_dir)] == ["term-1"]
    assert list((landing_dir / "open").iterdir()) == []


def _load_then_kill(landing_dir: Path) -> tuple[Path, list[str], list[str]]:
    """Six clients post webhooks and track batches; the service is SIGKILLed mid-load.
    Returns (landing dir, acknowledged ids, sent ids)."""
    proc, url = start_process(landing_dir, INGEST_ROTATE_BYTES="20000")
    acked: list[str] = []
    sent: list[str] = []
    lock = threading.Lock()
    stop = threading.Event()

    def client(n: int) -> None:
        with requests.Session() as s:
            i = 0
            while not stop.is_set():
                mid = f"k{n}-{i}"
                i += 1
                with lock:
                    sent.append(mid)
                try:
                    if i % 2:
                        body = json.dumps({"id": i, "client": n}).encode()
                        r = s.post(f"{url}/webhooks/shopify", data=body, timeout=5,
                                   headers=shopify_headers(body, webhook_id=mid))
                    else:
                        r = s.post(f"{url}/v1/batch", json={"batch": [track_message(mid)]},
                                   auth=(WRITE_KEY, ""), timeout=5)
                except requests.RequestException:
                    return
                if r.status_code == 200:
                    with lock:
                        acked.append(mid)

    threads = [threading.Thread(target=client, args=(n,)) for n in range(6)]
    for t in threads:
        t.start()
    time.sleep(1.2)
    proc.kill()
    proc.wait(timeout=10)
    stop.set()
    for t in threads:
        t.join(timeout=10)
    return landing_dir, acked, sent


def test_kill_9_under_load_loses_no_acknowledged_event(tmp_path):
    """Acknowledged = durable: after SIGKILL mid-load, a restart publishes the leftover
    open file and every 2xx'd event is there exactly once."""
    # The kill can land just after a rotation, before the next event opens a new file;
    # then nothing is left to recover and the scenario is run again (at most three times).
    for attempt in range(3):
        landing_dir, acked, sent = _load_then_kill(tmp_path / f"landing-{attempt}")
        if list((landing_dir / "open").iterdir()):
            break
    assert len(acked) > 100
    assert list((landing_dir / "open").iterdir()), "the killed process left its open file"
    with start_ingest_service(make_config(landing_dir)):
        pass  # start-up publishes the leftovers; stop publishes nothing new
    ids = [e.get("delivery_id") for e in landed(landing_dir)]
    assert set(acked) <= set(ids)
    assert len(ids) == len(set(ids))  # each sent once, so each landed at most once
    assert set(ids) <= set(sent) | {None}  # None: a torn last line, reported as a reject
    assert list((landing_dir / "open").iterdir()) == []
