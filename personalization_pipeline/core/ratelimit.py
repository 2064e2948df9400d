"""Rate limiting and retry timing: pure arithmetic, no I/O.

`gcra_admit` is the Generic Cell Rate Algorithm (a token bucket expressed as one number, the
theoretical arrival time), so its state fits in one row of a shared store and every process
that talks to one vendor account can share it. `backoff_delay` is exponential backoff with
full jitter, bounded.
"""

from __future__ import annotations

import random
from dataclasses import dataclass


@dataclass(frozen=True)
class RateLimit:
    """`requests` per `per_seconds`, with bursts of up to `burst` back-to-back requests."""

    requests: float
    per_seconds: float
    burst: int = 1

    def __post_init__(self) -> None:
        if self.requests <= 0 or self.per_seconds <= 0 or self.burst < 1:
            raise ValueError(f"invalid rate limit {self!r}")

    @property
    def interval(self) -> float:
        return self.per_seconds / self.requests


def gcra_admit(tat: float, now: float, limit: RateLimit) -> tuple[float, float]:
    """One request at time `now`, given the stored theoretical arrival time `tat`.

    Returns (wait_seconds, new_tat): the caller sleeps `wait_seconds` (0 when admitted at
    once) and stores `new_tat`. Reserving the slot before sleeping keeps concurrent callers
    from all waking up at the same instant.
    """
    interval = limit.interval
    tolerance = interval * (limit.burst - 1)
    tat = max(tat, now)
    wait = max(0.0, tat - tolerance - now)
    return wait, tat + interval


def backoff_delay(
    attempt: int,
    base: float = 0.5,
    cap: float = 30.0,
    retry_after: float | None = None,
    rng: random.Random | None = None,
) -> float:
    """Delay before retry number `attempt` (1-based): full jitter, at least Retry-After."""
    rng = rng or random
    jittered = rng.uniform(0, min(cap, base * (2 ** (attempt - 1))))
    if retry_after is not None:
        return max(float(retry_after), jittered)
    return jittered


BACKFILL_TAG = "dagster/backfill"
"""The tag Dagster puts on every run a backfill launches (its value is the backfill id)."""


def is_backfill_run(tags: dict[str, str] | None) -> bool:
    """Whether a run's tags say a backfill launched it."""
    return bool(tags) and bool(tags.get(BACKFILL_TAG))


def backfill_share(limit: RateLimit, live_reserve: float) -> RateLimit:
    """The bucket that every backfill run of one account shares: the account's limit less
    the share reserved for live runs.

    Backfill requests pass this bucket first and then the account's bucket, so together
    they never take more than (1 - live_reserve) of the account's rate, however many
    backfill runs there are. Live requests pass the account's bucket only: it is never
    booked up ahead by backfill reservations, so a live request waits for about one slot
    at most, and live runs alone can still use the whole rate."""
    if not 0.0 <= live_reserve < 1.0:
        raise ValueError(f"live_reserve must be in [0, 1), got {live_reserve!r}")
    return RateLimit(limit.requests * (1.0 - live_reserve), limit.per_seconds, burst=1)
