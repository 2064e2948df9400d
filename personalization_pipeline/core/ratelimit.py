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
