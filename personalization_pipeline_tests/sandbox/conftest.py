"""Fixtures for the sandbox tests: a running sandbox (real HTTP on loopback) with a clock
the tests control, and the default credentials as headers."""

from __future__ import annotations

import threading
from datetime import datetime, timedelta, timezone

import pytest
import requests

from personalization_pipeline.sandbox import SandboxConfig, start_sandbox

WORLD_NOW = datetime(2026, 11, 28, 10, 0, 0, tzinfo=timezone.utc)
HUBSPOT = {"Authorization": "Bearer sandbox-hubspot-private-app"}
MAILCHIMP = {"Authorization": "Bearer sandbox-mailchimp-token"}
LIST_ID = "5f1a3c9e2b"


class FakeClock:
    """A settable clock for the sandbox: writes are stamped with `clock()`."""

    def __init__(self, start: datetime) -> None:
        self._now = start
        self._lock = threading.Lock()

    def __call__(self) -> datetime:
        with self._lock:
            return self._now

    def advance(self, seconds: float) -> datetime:
        with self._lock:
            self._now += timedelta(seconds=seconds)
            return self._now

    def ms(self) -> int:
        return int(self().timestamp() * 1000)


@pytest.fixture(scope="module")
def clock() -> FakeClock:
    return FakeClock(WORLD_NOW + timedelta(minutes=5))


@pytest.fixture(scope="module")
def sandbox(clock):
    """A sandbox with generous rate limits (the rate-limit tests start their own)."""
    config = SandboxConfig(
        seed=7,
        size=2000,
        world_now=WORLD_NOW,
        clock=clock,
        hubspot_requests_per_10s=100_000,
        hubspot_search_per_second=100_000,
    )
    with start_sandbox(config) as running:
        yield running


@pytest.fixture
def fresh(sandbox, clock):
    """The shared sandbox, reset to the generated world before the test."""
    sandbox.reset()
    for app in sandbox.apps.values():
        app.stats.clear()
    yield sandbox


@pytest.fixture(scope="module")
def http():
    with requests.Session() as session:
        yield session
