"""The fast paths of ``core/identity.py`` against the plain ways they replace.

Each speed-up there must give exactly the same output as the slower code it stands for:
the Arrow tie sort as the pandas one, the gcd-compacted sort keys as the raw keys, the
single-pass id ranking as a stable argsort, the ASCII lower-casing as the Unicode one, the
run-built source column as a take, and the UTC timestamps as ``tz_localize``.
"""

from __future__ import annotations

import hashlib

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pytest

from personalization_pipeline.core import canonical
from personalization_pipeline.core.canonical import BLOCKED_VALUES
from personalization_pipeline.core.identity import (
    _argsort_distinct,
    _canonical_order,
    _compact_key,
    _profile_ids,
    _repeat_runs,
    _sort_ties,
    _stamps,
    normalise_values,
)

WORDS = ["", "a", "A", "b", "ab", "a b", "é", "e", "z", "ä", "Ä", "日本", "x\u00a0", "0", "00"]


def _random_strings(rng: np.random.Generator, n: int, null_share: float) -> list[str | None]:
    picked = rng.integers(0, len(WORDS), size=(n, 3))
    values: list[str | None] = ["".join(WORDS[i] for i in row) for row in picked]
    for i in np.flatnonzero(rng.random(n) < null_share):
        values[i] = None
    return values


@pytest.mark.parametrize("seed", range(5))
def test_the_arrow_tie_sort_matches_the_pandas_one(seed):
    rng = np.random.default_rng(seed)
    n = 2_000
    keys = [pa.array(_random_strings(rng, n, 0.1), type=pa.large_string()) for _ in range(2)]
    run = np.sort(rng.integers(0, 50, n))
    rows = rng.permutation(n)
    arrow = _sort_ties(run, rows, keys, None)
    # The same keys as Python objects go through pandas.
    objects = [np.asarray(key.to_pylist(), dtype=object) for key in keys]
    plain = _sort_ties(run, rows, objects, None)
    np.testing.assert_array_equal(arrow, plain)
    with_rows = rng.permutation(n)
    np.testing.assert_array_equal(
        _sort_ties(run, rows, keys, with_rows), _sort_ties(run, rows, objects, with_rows)
    )


@pytest.mark.parametrize("step", [1, 7, 1_000_000])
def test_compacted_keys_sort_like_the_raw_keys(step):
    rng = np.random.default_rng(step)
    n = 5_000
    observed = rng.integers(0, 300 * 86_400, n) * step + 1_700_000_000_000_000
    observed[rng.random(n) < 0.05] = np.iinfo(np.int64).min  # NaT
    source = rng.integers(0, 4, n)
    ids = pa.array([f"r{i % 977}" for i in range(n)], type=pa.large_string())
    order = _canonical_order([source, observed], [ids])
    record_ids = np.asarray(ids.to_pylist(), dtype=object)
    expected = np.lexsort((np.arange(n), record_ids, observed, source))
    np.testing.assert_array_equal(order, expected)
    np.testing.assert_array_equal(
        np.argsort(_compact_key(observed), kind="stable"), np.argsort(observed, kind="stable")
    )


def test_distinct_argsort_is_a_stable_argsort():
    rng = np.random.default_rng(0)
    for n in (1, 2, 3, 1_000, 50_000):
        for high in (2, 1_000, 2**40, 2**64 - 1):
            numbers = rng.integers(0, high, n, dtype=np.uint64, endpoint=True)
            np.testing.assert_array_equal(
                _argsort_distinct(numbers), np.argsort(numbers, kind="stable")
            )


def test_profile_ids_are_the_sha256_prefix_and_rank_like_the_strings():
    kinds = np.array([0, 1, 2, 3, 2, 3, 0], dtype=np.int64)
    values = pa.array(
        ["100", "900", "a@b.com", "anon-1", "ü@x.de", "anon-2", "101"], type=pa.large_string()
    )
    text, rank = _profile_ids(kinds, values)
    ids = [bytes(row).decode() for row in text]
    expected = [
        "p_" + hashlib.sha256(f"{canonical.IDENTIFIER_TYPES[k]}:{v}".encode()).hexdigest()[:16]
        for k, v in zip(kinds.tolist(), values.to_pylist())
    ]
    assert ids == expected
    assert [ids[i] for i in np.argsort(rank)] == sorted(expected)


def _normalise_values_reference(kind: str, values: pa.Array) -> pa.Array:
    """``normalise_values`` as it was before its ASCII and trim fast paths."""
    stripped = pc.utf8_trim_whitespace(values)
    if kind == "email":
        stripped = pc.utf8_lower(stripped)
    lowered = pc.utf8_lower(stripped)
    blocked = pc.or_(
        pc.is_in(lowered, value_set=pa.array(sorted(BLOCKED_VALUES), type=lowered.type)),
        pc.match_substring_regex(lowered, r"^[0-]*$"),
    )
    return pc.if_else(blocked, pa.scalar(None, type=stripped.type), stripped).cast(
        pa.large_string()
    )


@pytest.mark.parametrize("kind", canonical.IDENTIFIER_TYPES)
def test_normalisation_is_the_same_on_the_ascii_and_unicode_paths(kind):
    samples = [
        " 000-0 ", "--", "", "0", "-1", " NULL ", "None", "unknown", "Undefined ", None,
        "A@B.COM", " x@y.org\n", "0a", "-", "1-0", "0-0-0", "abc", "\t00\t", "0\n0",
    ]
    unicode_samples = [*samples, "İstanbul@X.com", "ÄBC@EXAMPLE.COM", "\u00a0000\u00a0", "Σ"]
    for batch in (samples, unicode_samples):
        values = pa.array(batch, type=pa.large_string())
        assert normalise_values(kind, values).equals(_normalise_values_reference(kind, values))
    # On ASCII text both equal the canonical Python helper too.
    got = normalise_values(kind, pa.array(samples, type=pa.large_string())).to_pylist()
    assert got == [canonical.normalise_identifier(kind, value) for value in samples]


def test_runs_build_the_same_column_as_a_take():
    uniques = pa.array(["web", "crm", "shop", "ünï"], type=pa.large_string())
    rng = np.random.default_rng(1)
    for codes in (
        np.array([], dtype=np.int64),
        np.repeat([1, 2, 0, -1], [5, 0, 3, 2]),
        np.repeat([3, 3, 1, -1, 0], [1, 2, 3, 4, 5]),
        rng.integers(-1, 4, 500),  # many runs: the take path
    ):
        expected = uniques.take(pa.array(codes, type=pa.int64(), mask=codes < 0))
        assert _repeat_runs(uniques, codes).equals(expected)


def test_stamps_equal_tz_localize():
    nat = np.iinfo(np.int64).max
    micros = np.array([0, 1_700_000_000_123_456, nat, -5, nat], dtype=np.int64)
    raw = np.where(micros == nat, np.iinfo(np.int64).min, micros)
    expected = pd.Series(raw.view("M8[us]")).dt.tz_localize("UTC")
    pd.testing.assert_series_equal(_stamps(micros, nat), expected)
