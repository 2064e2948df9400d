"""The share of a rate limit that backfill runs leave to live runs: pure arithmetic over
`gcra_admit`, simulated with a virtual clock (no sleeping)."""

from __future__ import annotations

import heapq

import pytest

from personalization_pipeline.core.ratelimit import (
    BACKFILL_TAG,
    RateLimit,
    backfill_share,
    gcra_admit,
    is_backfill_run,
)

LIMIT = RateLimit(4, 1.0)


def test_backfill_runs_are_recognised_by_dagsters_tag():
    assert BACKFILL_TAG == "dagster/backfill"
    assert is_backfill_run({"dagster/backfill": "abcd1234", "pp/trigger": "x"})
    assert not is_backfill_run({"pp/trigger": "schedule"})
    assert not is_backfill_run({"dagster/backfill": ""})
    assert not is_backfill_run(None) and not is_backfill_run({})


def test_the_backfill_bucket_is_the_limit_less_the_live_reserve():
    share = backfill_share(LIMIT, 0.25)
    assert share.requests == pytest.approx(3.0) and share.per_seconds == 1.0 and share.burst == 1
    assert share.interval == pytest.approx(1 / 3)
    assert backfill_share(LIMIT, 0.0).requests == LIMIT.requests
    for bad in (-0.1, 1.0, 1.5):
        with pytest.raises(ValueError):
            backfill_share(LIMIT, bad)


def simulate(backfill_runs: int, live_reserve: float, seconds: float = 30.0, live_every: float = 2.0):
    """`backfill_runs` callers that always have a request ready (a long backfill, each run
    sequential) and one live caller that needs one request every `live_every` seconds.
    Returns (live waits, backfill requests sent, all send times)."""
    tat = tat_backfill = 0.0
    share = backfill_share(LIMIT, live_reserve) if live_reserve else None
    # (time ready, order, kind, id): a backfill request passes its share, then the bucket.
    ready = [(0.0, n, "backfill", n) for n in range(backfill_runs)]
    ready += [(0.5 + k * live_every, 1000 + k, "live", k) for k in range(int(seconds / live_every))]
    heapq.heapify(ready)
    live_waits, sends, backfill_sent, order = [], [], 0, 10_000
    while ready:
        now, _, kind, ident = heapq.heappop(ready)
        if now > seconds:
            break
        if kind == "backfill" and share is not None:
            wait, tat_backfill = gcra_admit(tat_backfill, now, share)
            order += 1
            heapq.heappush(ready, (now + wait, order, "backfill-admitted", ident))
            continue
        wait, tat = gcra_admit(tat, now, LIMIT)
        sends.append(now + wait)
        if kind == "live":
            live_waits.append(wait)
        else:
            backfill_sent += 1
            order += 1
            heapq.heappush(ready, (now + wait, order, "backfill", ident))  # its next request
    return live_waits, backfill_sent, sorted(sends)


def test_without_a_reserve_live_requests_queue_behind_every_backfill_run():
    waits, _, _ = simulate(backfill_runs=4, live_reserve=0.0)
    # FIFO: one outstanding reservation per backfill run is ahead of each live request.
    assert max(waits) >= 3 * LIMIT.interval


@pytest.mark.parametrize("runs", [1, 2, 4, 16])
def test_with_a_reserve_live_requests_wait_about_one_slot_however_many_backfill_runs(runs):
    waits, backfill_sent, sends = simulate(backfill_runs=runs, live_reserve=0.25)
    assert waits and max(waits) <= LIMIT.interval + 1e-9
    # The backfill still gets its share of the rate: (1 - reserve) x 4/s over 30 s.
    assert backfill_sent >= 0.9 * 0.75 * 4 * 30
    # And the account's limit holds for everyone together.
    gaps = [b - a for a, b in zip(sends, sends[1:])]
    assert min(gaps) >= LIMIT.interval - 1e-9


def test_live_runs_alone_can_use_the_whole_rate():
    # The reserve limits backfills only: with no backfill running, nothing holds live back.
    waits, _, sends = simulate(backfill_runs=0, live_reserve=0.25, live_every=LIMIT.interval)
    assert max(waits) <= 1e-9 and len(sends) >= 4 * 30 - 2
