"""`make demo`: the whole loop on one machine, no accounts anywhere.

Starts the sandbox (HubSpot, Mailchimp, shop, alert sink), the ingest service, the Kafka
broker (Tansu, in memory), the event simulator (a share of its events over Kafka, the
rest over HTTP) and `dagster dev` with schedules and sensors running; prints the URLs; stops
every child process on Ctrl-C.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import psutil
import requests

from personalization_pipeline.ports import PortInUse, check_port_free

REPO = Path(__file__).resolve().parent.parent

SANDBOX_CREDENTIALS = {
    "HUBSPOT_CLIENT_ID": "sandbox-hubspot-client",
    "HUBSPOT_CLIENT_SECRET": "sandbox-hubspot-secret",
    "HUBSPOT_REFRESH_TOKEN": "sandbox-hubspot-refresh",
    "MAILCHIMP_ACCESS_TOKEN": "sandbox-mailchimp-token",
    "MAILCHIMP_LIST_ID": "5f1a3c9e2b",
    "INGEST_WRITE_KEYS": "sandbox-write-key",
    "SHOPIFY_WEBHOOK_SECRET": "sandbox-shopify-secret",
    "MAILCHIMP_WEBHOOK_SECRET": "sandbox-mc-webhook",
}


KAFKA_TOPIC = "pp.events"
KAFKA_SHARE = 0.3
"""The share of the simulator's requests published to Kafka; the rest go over HTTP."""


def wait_http(url: str, seconds: float, proc: subprocess.Popen, name: str) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{name} exited with code {proc.returncode} while starting (see its output above)")
        try:
            if requests.get(url, timeout=1).status_code < 500:
                return
        except requests.RequestException:
            pass
        time.sleep(0.3)
    raise RuntimeError(f"{name} did not answer at {url} within {seconds:.0f} s")


def wait_kafka(port: int, topic: str, seconds: float, proc: subprocess.Popen) -> None:
    """Until the broker answers metadata with the topic (the broker CLI creates it)."""
    from confluent_kafka.admin import AdminClient

    admin = AdminClient({"bootstrap.servers": f"127.0.0.1:{port}", "log_level": 0})
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the Kafka broker exited with code {proc.returncode} while starting")
        try:
            if topic in admin.list_topics(timeout=1).topics:
                return
        except Exception:  # KafkaException while it starts
            pass
        time.sleep(0.3)
    raise RuntimeError(f"the Kafka broker did not offer topic {topic} on port {port} within {seconds:.0f} s")


def demo_environment(args: argparse.Namespace, root: Path) -> dict[str, str]:
    data = root / "data"
    home = root / "dagster_home"
    home.mkdir(parents=True, exist_ok=True)
    shutil.copy(REPO / "dagster.yaml", home / "dagster.yaml")
    start_file = root / "partition_start"
    if not start_file.exists():
        # Records changed before the first partition arrive through the snapshot step.
        start_file.write_text(datetime.now(timezone.utc).strftime("%Y-%m-%d-%H:00"))
    host = "http://127.0.0.1"
    env = dict(os.environ)
    env.update(SANDBOX_CREDENTIALS)
    env.update(
        {
            "DAGSTER_HOME": str(home.resolve()),
            "PP_DATA_DIR": str(data.resolve()),
            "INGEST_LANDING_DIR": str((data / "landing").resolve()),
            "PP_PARTITION_START": start_file.read_text().strip(),
            "PP_PULL_CRON": args.pull_cron,
            "PP_PULL_LAG_SECONDS": "10",
            "HUBSPOT_BASE_URL": f"{host}:{args.hubspot_port}",
            "MAILCHIMP_METADATA_URL": f"{host}:{args.mailchimp_port}/oauth2/metadata",
            "SHOP_BASE_URL": f"{host}:{args.shop_port}",
            "PP_ALERT_WEBHOOK_URL": f"{host}:{args.alerts_port}/alerts",
            "KAFKA_BOOTSTRAP_SERVERS": f"127.0.0.1:{args.kafka_port}",
            "KAFKA_TOPIC": KAFKA_TOPIC,
            "PYTHONUNBUFFERED": "1",
        }
    )
    return env


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="pp-demo", description=__doc__)
    parser.add_argument("--ui-port", type=int, default=3000)
    parser.add_argument("--hubspot-port", type=int, default=8701)
    parser.add_argument("--mailchimp-port", type=int, default=8702)
    parser.add_argument("--shop-port", type=int, default=8703)
    parser.add_argument("--alerts-port", type=int, default=8704)
    parser.add_argument("--ingest-port", type=int, default=8710)
    parser.add_argument("--kafka-port", type=int, default=9092, help="the Kafka-protocol broker (Tansu)")
    parser.add_argument("--size", type=int, default=2000, help="synthetic people in the sandbox")
    parser.add_argument("--rate", type=float, default=3.0, help="simulated events per second")
    parser.add_argument("--edits-per-minute", type=float, default=30, help="sandbox CRM/ESP edits per minute")
    parser.add_argument("--pull-cron", default="* * * * *", help="pull schedule (production default: */5)")
    parser.add_argument("--dir", default=str(REPO / ".demo"), help="where the demo keeps its data")
    args = parser.parse_args(argv)

    try:
        for flag, port in (
            ("--ui-port", args.ui_port),
            ("--hubspot-port", args.hubspot_port),
            ("--mailchimp-port", args.mailchimp_port),
            ("--shop-port", args.shop_port),
            ("--alerts-port", args.alerts_port),
            ("--ingest-port", args.ingest_port),
            ("--kafka-port", args.kafka_port),
        ):
            check_port_free(port, flag)
    except PortInUse as exc:
        print(f"pp-demo: {exc}", file=sys.stderr)
        return 2

    root = Path(args.dir).resolve()
    env = demo_environment(args, root)
    python = sys.executable
    children: list[tuple[str, subprocess.Popen]] = []

    def spawn(name: str, cmd: list[str]) -> subprocess.Popen:
        proc = subprocess.Popen(cmd, env=env, cwd=REPO, start_new_session=True)
        children.append((name, proc))
        return proc

    def stop_all() -> None:
        # Remember every descendant first: dagster dev's code servers outlive it otherwise.
        family: list[psutil.Process] = []
        for _, proc in children:
            try:
                family.extend(psutil.Process(proc.pid).children(recursive=True))
            except psutil.NoSuchProcess:
                pass
        # Dagster first, so no run is cut off from the servers it talks to; then the rest.
        for name, proc in reversed(children):
            if proc.poll() is None:
                # dagster dev shuts its daemon, webserver and code servers down on SIGINT.
                proc.send_signal(signal.SIGINT if name == "dagster dev" else signal.SIGTERM)
            try:
                proc.wait(timeout=30 if name == "dagster dev" else 10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=5)
        for leftover in family:
            try:
                leftover.terminate()
            except psutil.NoSuchProcess:
                pass
        _, alive = psutil.wait_procs(family, timeout=5)
        for leftover in alive:
            leftover.kill()

    stopping = {"flag": False}

    def on_signal(signum, _frame):
        stopping["flag"] = True

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    host = "http://127.0.0.1"
    try:
        sandbox = spawn(
            "sandbox",
            [
                python, "-m", "personalization_pipeline.sandbox",
                "--hubspot-port", str(args.hubspot_port),
                "--mailchimp-port", str(args.mailchimp_port),
                "--shop-port", str(args.shop_port),
                "--alerts-port", str(args.alerts_port),
                "--size", str(args.size),
                "--edits-per-minute", str(args.edits_per_minute),
            ],
        )
        wait_http(f"{host}:{args.shop_port}/_admin/products", 60, sandbox, "the sandbox")
        ingest = spawn(
            "ingest service",
            [python, "-m", "personalization_pipeline.ingest_service", "--host", "127.0.0.1", "--port", str(args.ingest_port), "--log-level", "warning"],
        )
        wait_http(f"{host}:{args.ingest_port}/health", 30, ingest, "the ingest service")
        kafka = spawn(
            "kafka broker",
            [python, "-m", "personalization_pipeline.broker", "--port", str(args.kafka_port), "--topic", KAFKA_TOPIC],
        )
        wait_kafka(args.kafka_port, KAFKA_TOPIC, 30, kafka)
        spawn(
            "simulator",
            [
                python, "-m", "personalization_pipeline.simulator",
                "--ingest-url", f"{host}:{args.ingest_port}",
                "--shop-url", f"{host}:{args.shop_port}",
                "--rate", str(args.rate),
                "--kafka-bootstrap", f"127.0.0.1:{args.kafka_port}",
                "--kafka-topic", KAFKA_TOPIC,
                "--kafka-share", str(KAFKA_SHARE),
            ],
        )
        ui = spawn(
            "dagster dev",
            [python, "-m", "dagster", "dev", "-w", str(REPO / "workspace.yaml"), "-h", "127.0.0.1", "-p", str(args.ui_port)],
        )
        wait_http(f"{host}:{args.ui_port}/server_info", 180, ui, "dagster dev")
        print(
            "\n".join(
                [
                    "",
                    "personalization_pipeline demo is running:",
                    f"  Dagster UI        {host}:{args.ui_port}  (schedules and sensors are on)",
                    f"  HubSpot sandbox   {host}:{args.hubspot_port}",
                    f"  Mailchimp sandbox {host}:{args.mailchimp_port}  (pushes: /_admin/pushes)",
                    f"  shop sandbox      {host}:{args.shop_port}",
                    f"  alert sink        {host}:{args.alerts_port}/_admin/alerts",
                    f"  ingest service    {host}:{args.ingest_port}  (health: /health)",
                    f"  Kafka broker      127.0.0.1:{args.kafka_port}  (topic {KAFKA_TOPIC}, {KAFKA_SHARE:.0%} of the events)",
                    f"  data              {root}",
                    "Press Ctrl-C to stop everything.",
                    "",
                ]
            ),
            flush=True,
        )
        while not stopping["flag"]:
            for name, proc in children:
                if proc.poll() is not None:
                    print(f"pp-demo: {name} exited with code {proc.returncode}; stopping the demo", file=sys.stderr)
                    stopping["flag"] = True
                    break
            time.sleep(0.5)
        return 0 if all(p.poll() in (None, 0, -signal.SIGTERM) for _, p in children) else 1
    except RuntimeError as exc:
        print(f"pp-demo: {exc}", file=sys.stderr)
        return 1
    finally:
        print("pp-demo: stopping…", file=sys.stderr)
        stop_all()


if __name__ == "__main__":
    sys.exit(main())
