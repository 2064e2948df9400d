import random

from personalization_pipeline.core.ratelimit import RateLimit, backoff_delay, gcra_admit


def test_gcra_paces_to_the_rate():
    limit = RateLimit(4, 1.0)
    tat, now, starts = 0.0, 100.0, []
    for _ in range(8):
        wait, tat = gcra_admit(tat, now, limit)
        starts.append(now + wait)
    gaps = [b - a for a, b in zip(starts, starts[1:])]
    assert all(abs(g - 0.25) < 1e-9 for g in gaps)


def test_gcra_allows_a_burst_then_paces():
    limit = RateLimit(10, 10.0, burst=3)
    tat, waits = 0.0, []
    for _ in range(5):
        wait, tat = gcra_admit(tat, 50.0, limit)
        waits.append(wait)
    assert waits == [0, 0, 0, 1.0, 2.0]


def test_backoff_is_full_jitter_bounded_and_honours_retry_after():
    rng = random.Random(1)
    delays = [backoff_delay(a, base=0.5, cap=4, rng=rng) for a in range(1, 12)]
    assert all(0 <= d <= 4 for d in delays)
    assert backoff_delay(1, base=0.5, cap=4, retry_after=7, rng=rng) >= 7
