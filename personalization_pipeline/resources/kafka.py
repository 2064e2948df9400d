"""Kafka: the event stream the simulator (or a real producer) publishes envelopes to.

Offsets are tracked in Dagster (the sensor's cursor and each run's config), never in a
consumer group: the consumer assigns partitions and seeks to explicit offsets, and never
commits, so any offset range can be read again (replay).

High watermarks are read from a fetch response (the partition-EOF event), not only from
ListOffsets: Tansu 0.6 answers ListOffsets(latest) with the last record batch's base
offset + 1, which is short of the end when a batch holds several records. Reading the
last batch costs one small fetch per partition and gives the true end on any broker.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Optional

import dagster as dg
from pydantic import Field


@dataclass(frozen=True)
class KafkaRecord:
    partition: int
    offset: int
    key: Optional[bytes]
    value: Optional[bytes]
    timestamp_ms: Optional[int]


class KafkaReadError(RuntimeError):
    """An offset range could not be read completely (broker down, range gone by retention).

    ``permanent``: retrying cannot help (the range ends past the partition's end)."""

    def __init__(self, message: str, permanent: bool = False) -> None:
        super().__init__(message)
        self.permanent = permanent


class KafkaResource(dg.ConfigurableResource):
    """The Kafka cluster and topic carrying event envelopes (one envelope per message).

    `bootstrap_servers` empty means Kafka is not configured: the sensor skips."""

    bootstrap_servers: str = Field(default="", description="host:port[,host:port]; empty = Kafka not used")
    topic: str = Field(default="pp.events")
    group_id: str = Field(
        default="personalization-pipeline",
        description="Only to satisfy the client: partitions are assigned by hand, offsets never committed.",
    )
    security_protocol: Optional[str] = Field(default=None, description="e.g. SASL_SSL for a managed Kafka")
    sasl_mechanism: Optional[str] = Field(default=None, description="e.g. PLAIN, SCRAM-SHA-512")
    sasl_username: Optional[str] = None
    sasl_password: Optional[str] = None
    timeout_seconds: float = Field(default=30.0, description="Longest wait for a range or the watermarks.")
    max_messages_per_run: int = Field(default=20_000, description="Per partition, in one sensor-requested run.")

    @property
    def configured(self) -> bool:
        return bool(self.bootstrap_servers.strip())

    def client_config(self) -> dict:
        config = {"bootstrap.servers": self.bootstrap_servers}
        for key, value in (
            ("security.protocol", self.security_protocol),
            ("sasl.mechanism", self.sasl_mechanism),
            ("sasl.username", self.sasl_username),
            ("sasl.password", self.sasl_password),
        ):
            if value:
                config[key] = value
        return config

    def consumer(self):
        from confluent_kafka import Consumer

        return Consumer(
            {
                **self.client_config(),
                "group.id": self.group_id,
                "enable.auto.commit": False,
                "enable.auto.offset.store": False,
                "enable.partition.eof": True,
                # A range that is gone (retention) must fail the run, not be silently skipped.
                "auto.offset.reset": "error",
            }
        )

    def partitions(self, consumer=None) -> list[int]:
        own = consumer is None
        consumer = consumer or self.consumer()
        try:
            meta = consumer.list_topics(self.topic, timeout=self.timeout_seconds).topics.get(self.topic)
            if meta is None or meta.error is not None:
                raise KafkaReadError(f"topic {self.topic!r}: {getattr(meta, 'error', 'not found')}")
            return sorted(meta.partitions)
        finally:
            if own:
                consumer.close()

    def high_watermarks(self) -> dict[int, tuple[int, int]]:
        """partition -> (low, high): the next offset that will be written is ``high``."""
        from confluent_kafka import KafkaError, TopicPartition

        consumer = self.consumer()
        try:
            out: dict[int, tuple[int, int]] = {}
            probe = []
            for p in self.partitions(consumer):
                low, listed = consumer.get_watermark_offsets(
                    TopicPartition(self.topic, p), timeout=self.timeout_seconds, cached=False
                )
                out[p] = (low, listed)
                if listed > low:
                    probe.append(TopicPartition(self.topic, p, listed - 1))
            if not probe:
                return out
            consumer.assign(probe)
            waiting = {tp.partition for tp in probe}
            deadline = time.monotonic() + self.timeout_seconds
            while waiting and time.monotonic() < deadline:
                msg = consumer.poll(0.2)
                if msg is None:
                    continue
                if msg.error() is not None:
                    if msg.error().code() == KafkaError._PARTITION_EOF:
                        p = msg.partition()
                        out[p] = (out[p][0], max(out[p][1], msg.offset()))
                        waiting.discard(p)
                        continue
                    raise KafkaReadError(f"reading the end of {self.topic}: {msg.error()}")
            if waiting:
                raise KafkaReadError(f"no end-of-partition answer for partitions {sorted(waiting)} of {self.topic}")
            return out
        finally:
            consumer.close()

    def read_range(self, partition: int, start: int, end: int) -> list[KafkaRecord]:
        """Every record with ``start <= offset < end`` in one partition, in offset order."""
        if end <= start:
            return []
        from confluent_kafka import KafkaError, TopicPartition

        consumer = self.consumer()
        try:
            consumer.assign([TopicPartition(self.topic, partition, start)])
            records: list[KafkaRecord] = []
            deadline = time.monotonic() + self.timeout_seconds
            while time.monotonic() < deadline:
                for msg in consumer.consume(num_messages=1000, timeout=0.2):
                    err = msg.error()
                    if err is not None:
                        if err.code() == KafkaError._PARTITION_EOF:
                            if msg.offset() < end:
                                raise KafkaReadError(
                                    f"{self.topic}[{partition}] ends at {msg.offset()}, before the range end {end}",
                                    permanent=True,
                                )
                            continue
                        raise KafkaReadError(f"reading {self.topic}[{partition}] {start}-{end}: {err}")
                    if msg.offset() < start:
                        continue
                    if msg.offset() >= end:
                        return records
                    ts_type, ts = msg.timestamp()
                    records.append(KafkaRecord(partition, msg.offset(), msg.key(), msg.value(), ts if ts_type else None))
                    if msg.offset() == end - 1:
                        return records
            raise KafkaReadError(
                f"{self.topic}[{partition}]: read {len(records)} records of {start}-{end} in {self.timeout_seconds:.0f} s"
            )
        finally:
            consumer.close()
