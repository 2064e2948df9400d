"""Validation: `validate_batch` (Great Expectations suites plus the split into staged,
quarantined and duplicate rows) over synthetic canonical event and CRM batches, clean and
with 2% bad rows. Target (issue 5, PRODUCT.md section 10): ≤ 0.25 s per 10k rows on the
micro-batch path. The one-off GX import (3-4 s per process) is measured apart."""

from __future__ import annotations

import time

import numpy as np
import pandas as pd

from bench.common import Figure
from personalization_pipeline.core import canonical

SIZES = {"small": [10_000], "full": [10_000, 100_000, 1_000_000]}
TARGET_PER_10K = 0.25
BAD_SHARE = 0.02


def synthetic_events(rows: int, bad_share: float = 0.0, seed: int = 5) -> pd.DataFrame:
    """Canonical web/shop event rows; ``bad_share`` of them broken in one of six ways."""
    rng = np.random.default_rng(seed)
    received = pd.Timestamp("2026-11-28T12:00:00Z")
    types = np.array(canonical.EVENT_TYPES, dtype=object)
    frame = pd.DataFrame(
        {
            "source": np.where(rng.random(rows) < 0.7, "web", "shop").astype(object),
            "source_record_id": np.char.add("evt-", np.arange(rows).astype(str)).astype(object),
            "observed_at": received - pd.to_timedelta(rng.integers(0, 3600, rows), unit="s"),
            "received_at": received,
            "record_kind": "event",
            "event_type": types[rng.integers(0, len(types), rows)],
            "is_deleted": False,
            "anonymous_id": np.char.add("anon-", rng.integers(0, rows, rows).astype(str)).astype(object),
            "email": np.char.add(np.char.add("p", np.arange(rows).astype(str)), "@example.com").astype(object),
            "order_total_minor": pd.array(rng.integers(0, 100_000, rows), dtype="Int64"),
            "currency": "EUR",
        }
    )
    frame["source_class"] = frame["source"].map(canonical.SOURCE_CLASS)
    frame = frame.reindex(columns=list(canonical.CANONICAL_COLUMNS))
    bad = np.flatnonzero(rng.random(rows) < bad_share)
    for i, position in enumerate(bad):
        how = i % 6
        if how == 0:
            frame.iat[position, frame.columns.get_loc("source_record_id")] = None
        elif how == 1:
            frame.iat[position, frame.columns.get_loc("event_type")] = "teleported"
        elif how == 2:
            frame.iat[position, frame.columns.get_loc("observed_at")] = received + pd.Timedelta(hours=1)
        elif how == 3:
            frame.iat[position, frame.columns.get_loc("order_total_minor")] = -100
        elif how == 4:
            frame.iat[position, frame.columns.get_loc("currency")] = "eur"
        else:
            frame.iat[position, frame.columns.get_loc("anonymous_id")] = None
            frame.iat[position, frame.columns.get_loc("email")] = None
    return frame


def _per_10k(frame: pd.DataFrame, config, repeats: int) -> tuple[float, float, object]:
    from personalization_pipeline.validation import validate_batch

    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        outcome = validate_batch(frame, "event", config)
        times.append(time.perf_counter() - started)
    assert outcome.identity_holds
    return min(times) * 10_000 / len(frame), min(times), outcome


def run(size: str) -> list[Figure]:
    t0 = time.perf_counter()
    from personalization_pipeline.validation import ValidationConfig, validate_batch
    from personalization_pipeline.validation.suites import load_gx

    load_gx()
    import_seconds = time.perf_counter() - t0
    config = ValidationConfig.load()
    validate_batch(synthetic_events(200), "event", config)  # warm-up: first context and suite
    figures = [
        Figure("validation", "GX import, once per process", round(import_seconds, 2), "s", note="not per batch")
    ]
    for rows in SIZES[size]:
        for label, share in (("clean", 0.0), ("2% bad", BAD_SHARE)):
            frame = synthetic_events(rows, share)
            repeats = 3 if rows <= 10_000 else 1
            per_10k, whole, outcome = _per_10k(frame, config, repeats)
            figures.append(
                Figure(
                    "validation",
                    f"events, {rows:,} rows, {label}: s per 10k rows",
                    round(per_10k, 4),
                    "s",
                    target=TARGET_PER_10K,
                    higher_is_better=False,
                    note=f"whole batch {whole:.3f} s; staged {outcome.rows_staged:,}, "
                    f"quarantined {outcome.rows_quarantined:,}; "
                    f"failed expectations {len(outcome.failure_counts)}",
                )
            )
    return figures
