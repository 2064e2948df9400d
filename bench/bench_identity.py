"""Identity resolution: `resolve_identities` over synthetic canonical records whose stars
add up to about 5M edges at full size, with shared addresses that break the merge limits.
Target (PRODUCT.md section 10): 5M edges ≤ 10 s."""

from __future__ import annotations

import time

import numpy as np
import pandas as pd

from bench.common import Figure
from personalization_pipeline.core import canonical
from personalization_pipeline.core.identity import IdentityLimits, resolve_identities

SIZES = {"small": 40_000, "full": 2_000_000}  # people


def synthetic_records(people: int, seed: int = 3) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    ids = np.arange(people)
    base = pd.Timestamp("2026-01-01", tz="UTC")

    def block(mask, source, kind, event, **identifiers):
        n = int(mask.sum())
        frame = pd.DataFrame(
            {
                "source": source,
                "source_class": canonical.SOURCE_CLASS[source],
                "source_record_id": [f"{source}-{kind}-{i}" for i in range(n)],
                "observed_at": base + pd.to_timedelta(rng.integers(0, 300 * 86400, n), unit="s"),
                "received_at": base,
                "record_kind": kind,
                "event_type": event,
                "is_deleted": False,
            }
        )
        for name, values in identifiers.items():
            frame[name] = values[mask] if values is not None else None
        return frame

    email = np.array([f"person{i}@example.com" for i in ids], dtype=object)
    shared = rng.random(people) < 0.002  # family and info@ addresses shared by several people
    email[shared] = [f"info@family{i % 500}.net" for i in np.flatnonzero(shared)]
    crm = np.array([f"{100000 + i}" for i in ids], dtype=object)
    customer = np.array([f"{900000 + i}" for i in ids], dtype=object)
    anon = np.array([f"anon-{i:x}" for i in ids], dtype=object)
    anon2 = np.array([f"anon2-{i:x}" for i in ids], dtype=object)
    frames = [
        block(rng.random(people) < 0.7, "crm", "contact", None, crm_id=crm, email=email),
        block(rng.random(people) < 0.75, "esp", "member", None, email=email),
        block(rng.random(people) < 0.5, "shop", "event", "order_completed", customer_id=customer, email=email),
        block(rng.random(people) < 0.8, "web", "event", "page_viewed", anonymous_id=anon, customer_id=customer),
        block(rng.random(people) < 0.6, "web", "event", "product_viewed", anonymous_id=anon2, customer_id=customer),
    ]
    frame = pd.concat(frames, ignore_index=True)
    for column in canonical.CANONICAL_COLUMNS:
        if column not in frame:
            frame[column] = None
    return frame[list(canonical.CANONICAL_COLUMNS)]


def run(size: str) -> list[Figure]:
    records = synthetic_records(SIZES[size])
    identifiers = records[list(canonical.IDENTIFIER_TYPES)].notna().sum(axis=1)
    edges = int((identifiers - 1).clip(lower=0).sum())
    t0 = time.perf_counter()
    result = resolve_identities(records, IdentityLimits())
    elapsed = time.perf_counter() - t0
    # Scale the target to the size run, so the small run's ratio means the same thing.
    target = 10.0 * edges / 5_000_000
    return [
        Figure(
            "identity",
            f"identity resolution of {edges / 1e6:.2f}M edges",
            round(elapsed, 2),
            "s",
            target=round(target, 3),
            higher_is_better=False,
            note=f"{len(records):,} records → {len(result.components):,} profiles, "
            f"{len(result.conflicts):,} rejected edges; target 10 s per 5M edges",
        )
    ]
