"""Circuit breaker state transitions: pure, no I/O; the caller passes the time in.

One breaker per vendor account. Closed, it counts consecutive failed logical requests
(the request loop's own retries already spent); at `failure_threshold` it opens. Open, no
request is sent until `cooldown_seconds` have passed; then it is half-open and admits one
probe. The probe's success closes it, its failure opens it again for another cool-down.

The state is one small record, so every process that talks to the account can keep it in
a shared store and apply these functions under a lock. Each transition bumps
`generation`: an outcome that arrives from a request admitted before the last transition
(a slow request still in flight when the breaker opened) changes nothing.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

CLOSED = "closed"
OPEN = "open"
HALF_OPEN = "half_open"


@dataclass(frozen=True)
class BreakerPolicy:
    failure_threshold: int = 5
    cooldown_seconds: float = 60.0
    probe_lease_seconds: float | None = None
    """How long a probe may take before another caller may probe instead (the prober
    may have died); defaults to the cool-down."""

    def __post_init__(self) -> None:
        if self.failure_threshold < 1 or self.cooldown_seconds < 0:
            raise ValueError(f"invalid breaker policy {self!r}")

    @property
    def probe_lease(self) -> float:
        return self.cooldown_seconds if self.probe_lease_seconds is None else self.probe_lease_seconds


@dataclass(frozen=True)
class BreakerState:
    state: str = CLOSED
    failures: int = 0
    """Consecutive failed logical requests (reset by a success)."""
    opened_at: float | None = None
    """Epoch seconds of the last transition to open."""
    probe_until: float = 0.0
    """While half-open: the current probe's lease; nobody else probes before then."""
    generation: int = 0
    last_error: str = ""

    def retry_at(self, policy: BreakerPolicy) -> float | None:
        """When the next request will be let through (epoch seconds), or None if now."""
        if self.state == OPEN and self.opened_at is not None:
            return self.opened_at + policy.cooldown_seconds
        if self.state == HALF_OPEN:
            return self.probe_until
        return None


@dataclass(frozen=True)
class Admission:
    allowed: bool
    generation: int
    probe: bool = False


def admit(state: BreakerState, now: float, policy: BreakerPolicy) -> tuple[Admission, BreakerState]:
    """May a request be sent at `now`? Returns the decision and the new state."""
    if state.state == CLOSED:
        return Admission(True, state.generation), state
    if state.state == OPEN:
        opened_at = state.opened_at if state.opened_at is not None else now
        if now < opened_at + policy.cooldown_seconds:
            return Admission(False, state.generation), state
        probing = replace(state, state=HALF_OPEN, probe_until=now + policy.probe_lease, generation=state.generation + 1)
        return Admission(True, probing.generation, probe=True), probing
    if now < state.probe_until:
        return Admission(False, state.generation), state
    # The previous probe never reported back within its lease: let this caller probe.
    probing = replace(state, probe_until=now + policy.probe_lease)
    return Admission(True, probing.generation, probe=True), probing


def record(
    state: BreakerState,
    admission: Admission,
    ok: bool | None,
    now: float,
    policy: BreakerPolicy,
    error: str = "",
) -> BreakerState:
    """The outcome of an admitted request: True (the vendor answered), False (a logical
    request failed: 5xx, timeouts or dropped connections after the retries), or None (it
    ended for a reason that says nothing about the vendor; a probe's lease is released)."""
    if not admission.allowed or admission.generation != state.generation:
        return state
    if state.state == CLOSED:
        if ok is None:
            return state
        if ok:
            return state if state.failures == 0 else replace(state, failures=0, last_error="")
        failures = state.failures + 1
        if failures >= policy.failure_threshold:
            return replace(
                state, state=OPEN, failures=failures, opened_at=now, generation=state.generation + 1, last_error=error
            )
        return replace(state, failures=failures, last_error=error)
    if state.state == HALF_OPEN and admission.probe:
        if ok is None:
            return replace(state, probe_until=0.0)
        if ok:
            return BreakerState(generation=state.generation + 1)
        return replace(
            state,
            state=OPEN,
            failures=state.failures + 1,
            opened_at=now,
            probe_until=0.0,
            generation=state.generation + 1,
            last_error=error,
        )
    return state
