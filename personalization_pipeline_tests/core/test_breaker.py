"""Circuit breaker transitions, stepped with a manual clock."""

from __future__ import annotations

from datetime import datetime, timezone

import pytest

from personalization_pipeline.core.breaker import (
    CLOSED,
    HALF_OPEN,
    OPEN,
    BreakerPolicy,
    BreakerState,
    admit,
    record,
)
from personalization_pipeline.core.clock import ManualClock

POLICY = BreakerPolicy(failure_threshold=3, cooldown_seconds=60)


class Driver:
    """Applies the pure functions to one state, as the shared store does under its lock."""

    def __init__(self, policy: BreakerPolicy = POLICY) -> None:
        self.policy = policy
        self.clock = ManualClock(datetime(2026, 11, 28, 12, 0, tzinfo=timezone.utc))
        self.state = BreakerState()

    def now(self) -> float:
        return self.clock.now().timestamp()

    def admit(self):
        admission, self.state = admit(self.state, self.now(), self.policy)
        return admission

    def outcome(self, admission, ok, error=""):
        self.state = record(self.state, admission, ok, self.now(), self.policy, error)

    def request(self, ok: bool) -> bool:
        admission = self.admit()
        if admission.allowed:
            self.outcome(admission, ok, "" if ok else "HTTP 500")
        return admission.allowed


def test_opens_after_n_consecutive_failures_only():
    d = Driver()
    assert d.request(False) and d.request(False)
    assert d.request(True)  # a success resets the count
    assert d.state.state == CLOSED and d.state.failures == 0
    for _ in range(2):
        d.request(False)
    assert d.state.state == CLOSED and d.state.failures == 2
    d.request(False)
    assert d.state.state == OPEN and d.state.failures == 3
    assert d.state.opened_at == d.now() and d.state.last_error == "HTTP 500"
    assert d.state.retry_at(POLICY) == d.now() + 60


def test_open_refuses_until_the_cool_down_then_admits_one_probe():
    d = Driver()
    for _ in range(3):
        d.request(False)
    d.clock.advance(59.9)
    assert not d.admit().allowed
    d.clock.advance(0.1)
    probe = d.admit()
    assert probe.allowed and probe.probe and d.state.state == HALF_OPEN
    # While the probe is out, everyone else is refused.
    assert not d.admit().allowed
    d.outcome(probe, True)
    assert d.state.state == CLOSED and d.state.failures == 0 and d.state.opened_at is None
    assert d.request(True)


def test_a_failed_probe_reopens_for_another_cool_down():
    d = Driver()
    for _ in range(3):
        d.request(False)
    d.clock.advance(60)
    probe = d.admit()
    d.clock.advance(5)
    d.outcome(probe, False, "timed out")
    assert d.state.state == OPEN and d.state.opened_at == d.now() and d.state.last_error == "timed out"
    d.clock.advance(59)
    assert not d.admit().allowed
    d.clock.advance(1)
    assert d.admit().probe


def test_a_probe_that_never_reports_back_is_replaced_after_its_lease():
    d = Driver(BreakerPolicy(failure_threshold=1, cooldown_seconds=10, probe_lease_seconds=30))
    d.request(False)
    d.clock.advance(10)
    first = d.admit()
    assert first.probe
    d.clock.advance(29)
    assert not d.admit().allowed
    d.clock.advance(1)
    second = d.admit()
    assert second.allowed and second.probe
    d.outcome(second, True)
    assert d.state.state == CLOSED


def test_a_probe_ending_for_an_unrelated_reason_frees_the_probe():
    d = Driver(BreakerPolicy(failure_threshold=1, cooldown_seconds=10))
    d.request(False)
    d.clock.advance(10)
    probe = d.admit()
    d.outcome(probe, None)
    assert d.state.state == HALF_OPEN
    assert d.admit().probe


def test_outcomes_of_requests_admitted_before_a_transition_change_nothing():
    d = Driver()
    slow = d.admit()  # admitted while closed, answers late
    for _ in range(3):
        d.request(False)
    assert d.state.state == OPEN
    d.outcome(slow, True)
    assert d.state.state == OPEN
    d.clock.advance(60)
    probe = d.admit()
    d.outcome(slow, False)
    d.outcome(d.admit(), True)  # refused admission: not an outcome either
    assert d.state.state == HALF_OPEN
    d.outcome(probe, True)
    assert d.state.state == CLOSED


def test_neutral_outcomes_do_not_count_while_closed():
    d = Driver()
    d.request(False)
    d.outcome(d.admit(), None)
    assert d.state.failures == 1


@pytest.mark.parametrize("kwargs", [{"failure_threshold": 0}, {"cooldown_seconds": -1}])
def test_invalid_policies_are_refused(kwargs):
    with pytest.raises(ValueError):
        BreakerPolicy(**kwargs)
