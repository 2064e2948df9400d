"""The pure parts of the incremental profile step (PRODUCT.md sections 4-6 and 12).

The profile store (``resources/profile_store.py``) keeps the current state, the identity
map and the profiles between runs, and applies each new batch of staged rows by
recomputing only what the batch touches. What it needs that is pure logic lives here, with
no I/O and no Dagster import:

- ``record_hashes`` / ``identifier_hashes``: 64-bit keys under which the store indexes
  records and identifiers.
- ``latest_versions``: the one version of each source record that the current state holds
  (the same pick as ``identity.current_state``), keeping deleted versions as tombstones so
  that a late, older version can never bring a deleted record back.
- ``raw_clusters``: the connected components of the identity graph *before* the merge
  limits, which is the unit of recomputation. Resolution of one raw component depends on
  that component's records alone (its edges, their trust and first-seen, its anchors), so
  recomputing every raw component a batch touches, and nothing else, gives exactly what a
  full rebuild gives. A component within the limits is one profile; one that breaks a
  limit is several profiles joined by the rejected edges in ``identity_conflicts``.
- ``order_keys``: orders are counted once per (shop, order_id) across the whole table, so
  the store also recomputes every cluster holding a delivery of an order the batch touches.

Cluster ids are stable: the smallest profile number (the first 16 hex digits of the
profile id, as an integer) among the component's profiles. A cluster keeps its id until
its anchor changes, so an incremental run rewrites few stored rows.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from personalization_pipeline.core import canonical
from personalization_pipeline.core.canonical import IDENTIFIER_TYPES
from personalization_pipeline.core.identity import IdentityResult, _arrow_strings, normalise_values, record_keys

NO_CLUSTER = np.iinfo(np.int64).min
"""The cluster of a stored record that belongs to no profile: a tombstone (its latest
version is deleted) or a record with no usable identifier."""

_SEP = "\x1f"


_HASH_CHUNK = 1 << 20
_M1, _M2 = np.uint64(0x87C37B91114253D5), np.uint64(0x4CF5AD432745937F)
_F1, _F2 = np.uint64(0xFF51AFD7ED558CCD), np.uint64(0xC4CEB9FE1A85EC53)
_SEED = np.uint64(0x9E3779B97F4A7C15)


def _rotl(x: np.ndarray, r: int) -> np.ndarray:
    return (x << np.uint64(r)) | (x >> np.uint64(64 - r))


def _fmix(h: np.ndarray) -> np.ndarray:
    """MurmurHash3's 64-bit finaliser: every input bit reaches every output bit."""
    h ^= h >> np.uint64(33)
    h *= _F1
    h ^= h >> np.uint64(33)
    h *= _F2
    h ^= h >> np.uint64(33)
    return h


def _hash_strings(values: pa.Array | pa.ChunkedArray | pd.Series) -> np.ndarray:
    """Deterministic 64-bit hashes of strings (their UTF-8 bytes; a null hashes like "").

    MurmurHash3's 64-bit mixing over 8-byte words, vectorised across strings in numpy
    straight from the Arrow buffers: no Python object per string, and the GIL is free
    while it runs. Strings are taken a million at a time, and word by word only while
    some are that long, so the cost follows the bytes hashed. Collisions are as rare as
    for any 64-bit hash; the store checks the keys it relies on
    (``assert_keys_name_one_record``)."""
    if isinstance(values, pd.Series):
        values = pa.array(values.to_numpy(dtype=object), pa.large_string(), from_pandas=True)
    values = values.cast(pa.large_string())
    if isinstance(values, pa.ChunkedArray):
        values = values.combine_chunks()
    out = np.empty(len(values), dtype=np.int64)
    for start in range(0, len(values), _HASH_CHUNK):
        out[start : start + _HASH_CHUNK] = _hash_chunk(values.slice(start, _HASH_CHUNK).fill_null(""))
    return out


def _hash_chunk(values: pa.LargeStringArray) -> np.ndarray:
    n = len(values)
    if n == 0:
        return np.empty(0, dtype=np.int64)
    _, offsets_buffer, data_buffer = values.buffers()
    offsets = np.frombuffer(offsets_buffer, dtype=np.int64, count=n + 1, offset=8 * values.offset)
    lengths = np.diff(offsets).astype(np.uint64)
    first = int(offsets[0])
    size = int(offsets[-1]) - first
    padded = np.zeros(size + 8, dtype=np.uint8)  # a word read past the last string's end stays inside
    if size:
        padded[:size] = np.frombuffer(data_buffer, dtype=np.uint8, count=size, offset=first)
    # An 8-byte little-endian word starting at every byte.
    words = np.ndarray((size + 1,), dtype="<u8", buffer=padded, strides=(1,))
    starts = (offsets[:-1] - first).astype(np.int64)
    h = _fmix(lengths * _M1 + _SEED)
    active = np.flatnonzero(lengths > 0)
    step = 0
    while len(active):
        word = words[starts[active] + 8 * step]
        left = lengths[active] - np.uint64(8 * step)
        short = left < np.uint64(8)
        if short.any():  # the last, partial word: only the string's own bytes count
            word[short] &= (np.uint64(1) << (left[short] * np.uint64(8))) - np.uint64(1)
        k = _rotl(word * _M1, 31) * _M2
        state = _rotl(h[active] ^ k, 27) * np.uint64(5) + np.uint64(0x52DCE729)
        h[active] = state
        step += 1
        active = active[lengths[active] > np.uint64(8 * step)]
    return _fmix(h ^ lengths).view(np.int64)


def record_hashes(frame: pd.DataFrame | pa.Table) -> np.ndarray:
    """The store's key of each record: a 64-bit hash of (source, source_record_id)."""
    if len(frame) == 0:
        return np.empty(0, dtype=np.int64)
    return _hash_strings(record_keys(frame))


def profile_hashes(profile_ids: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """The store's key of each profile id: a 64-bit hash (a lookup compares the ids too)."""
    return _hash_strings(profile_ids.cast(pa.large_string())) if len(profile_ids) else np.empty(0, dtype=np.int64)


def key_order(keys: np.ndarray) -> np.ndarray:
    """``np.argsort(keys, kind="stable")`` for 64-bit hashes, several times faster on big
    inputs: the high bits of each key and its position are packed into one integer, which
    sorts by value (a SIMD sort, not an argsort). Runs that share the high bits (every
    repeated key, plus a few chance matches) are then put in full-key order."""
    keys = np.asarray(keys, dtype=np.int64)
    n = len(keys)
    if n < 1 << 16:
        return np.argsort(keys, kind="stable")
    bits = int(n - 1).bit_length()
    low = np.uint64((1 << bits) - 1)
    packed = (keys.view(np.uint64) ^ np.uint64(1 << 63)) & ~low  # unsigned order = signed order
    packed |= np.arange(n, dtype=np.uint64)
    packed.sort()
    order = (packed & low).astype(np.int64)
    same = (packed[1:] >> np.uint64(bits)) == (packed[:-1] >> np.uint64(bits))
    del packed
    # A run of one repeated key is in position order already: only runs mixing keys that
    # share their high bits (chance matches, a few dozen in ten million) are re-sorted.
    mixed = same & (keys[order[1:]] != keys[order[:-1]])
    if mixed.any():
        in_run = np.zeros(n, dtype=bool)
        in_run[1:] = same
        in_run[:-1] |= same  # every position in a run of equal high bits
        at = np.flatnonzero(in_run)
        first = np.ones(len(at), dtype=bool)
        first[1:] = ~same[at[1:] - 1]
        run = np.cumsum(first)
        hit = np.isin(run, run[np.searchsorted(at, np.flatnonzero(mixed))])
        at, run = at[hit], run[hit]
        members = order[at]
        order[at] = members[np.lexsort((members, keys[members], run))]
    return order


def assert_keys_name_one_record(rows: pd.DataFrame | pa.Table, rkeys: np.ndarray, order: np.ndarray | None = None) -> None:
    """Rows sharing a 64-bit store key are versions of one (source, source_record_id):
    compared only where keys repeat (a collision was never seen; if it happened the store
    could not keep the two records apart, so it stops instead of mixing them). ``order``:
    ``key_order(rkeys)``, if the caller has it."""
    if len(rkeys) < 2:
        return
    order = key_order(rkeys) if order is None else order
    ordered = rkeys[order]
    repeat = np.flatnonzero(ordered[1:] == ordered[:-1])
    del ordered
    if not len(repeat):
        return
    left, right = pa.array(order[repeat]), pa.array(order[repeat + 1])
    for name in ("source", "source_record_id"):
        column = _arrow_strings(rows[name])
        if not pc.all(pc.equal(column.take(left), column.take(right))).as_py():
            raise ValueError("two different source records share a 64-bit store key; please report this")


def identifier_hashes(kinds: pd.Series, values: pd.Series) -> np.ndarray:
    """The store's key of each identifier: a 64-bit hash of (type, normalised value)."""
    if len(kinds) == 0:
        return np.empty(0, dtype=np.int64)
    joined = pc.binary_join_element_wise(
        pa.array(kinds, type=pa.large_string()),
        pa.array(values, type=pa.large_string()),
        pa.scalar(_SEP, pa.large_string()),
    )
    return _hash_strings(joined)


def normalised_identifiers(frame: pd.DataFrame) -> pd.DataFrame:
    """Every usable identifier the records carry: (identifier_type, identifier_value),
    normalised like identity resolution does, distinct."""
    parts = []
    for kind in IDENTIFIER_TYPES:
        values = normalise_values(kind, pa.array(frame[kind], type=pa.large_string(), from_pandas=True))
        values = pc.unique(values.drop_null())
        parts.append(pd.DataFrame({"identifier_type": kind, "identifier_value": values.to_pylist()}))
    out = pd.concat(parts, ignore_index=True)
    return out.astype({"identifier_type": str, "identifier_value": str})


def row_hashes(frame: pd.DataFrame) -> np.ndarray:
    """A hash of each whole canonical row, for telling apart versions equal on
    (observed_at, received_at). Computed over the canonical form, so a row hashes the same
    whether it was read from staged Parquet or from the store."""
    if frame.empty:
        return np.empty(0, dtype=np.uint64)
    return pd.util.hash_pandas_object(canonical.to_frame(frame), index=False).to_numpy()


def latest_versions(
    frame: pd.DataFrame,
    codes: np.ndarray,
    full_rows: Callable[[np.ndarray], pd.DataFrame] | None = None,
    order: np.ndarray | None = None,
) -> np.ndarray:
    """Positions of the one version per record that the current state holds: the largest
    ``observed_at``, then the largest ``received_at``, then the smallest row hash (the
    rule ``identity.current_state`` uses). Deleted versions take part like any other, so
    a record whose latest version is deleted keeps that tombstone.

    ``codes`` identify the records (the store keys, ``record_hashes``). ``frame`` needs
    only the time columns when ``full_rows`` is given: it returns the whole canonical rows
    at some positions, which are only needed to break ties; ``order``:
    ``key_order(codes)``, if the caller has it. Returns positions sorted by code.
    """
    n = len(frame)
    if n == 0:
        return np.empty(0, dtype=np.int64)
    rkeys = np.asarray(codes, dtype=np.int64)
    # Most records have one version (every event): a sort by key finds them, and only the
    # records with several versions are sorted by time.
    by_key = key_order(rkeys) if order is None else order
    keys = rkeys[by_key]
    starts = np.ones(n, dtype=bool)
    starts[1:] = keys[1:] != keys[:-1]
    group_of_sorted = np.cumsum(starts) - 1
    n_groups = int(group_of_sorted[-1]) + 1
    group = np.empty(n, dtype=np.int64)
    group[by_key] = group_of_sorted
    several = np.bincount(group_of_sorted, minlength=n_groups)[group_of_sorted] > 1
    winners = np.empty(n_groups, dtype=np.int64)  # one per record, in key order
    single = by_key[~several]
    winners[group[single]] = single

    rows = by_key[several]
    if len(rows):
        observed = _micros(frame["observed_at"].iloc[rows])
        received = _micros(frame["received_at"].iloc[rows])
        order = np.lexsort((~received, ~observed, rkeys[rows]))
        m = len(rows)
        keys, observed, received = rkeys[rows][order], observed[order], received[order]
        first = np.ones(m, dtype=bool)
        first[1:] = keys[1:] != keys[:-1]
        tied_next = np.zeros(m, dtype=bool)
        tied_next[:-1] = (keys[1:] == keys[:-1]) & (observed[1:] == observed[:-1]) & (received[1:] == received[:-1])
        best = rows[order[first]]
        winners[group[best]] = best
        contested = first & tied_next
        if contested.any():
            # Versions equal on both times: the smallest row hash wins, whatever the row order.
            in_tie = np.zeros(m, dtype=bool)
            for start in np.flatnonzero(contested):
                stop = start + 1
                while stop < m and keys[stop] == keys[start] and tied_next[stop - 1]:
                    stop += 1
                in_tie[start:stop] = True
            tied = rows[order[in_tie]]
            whole = full_rows(tied) if full_rows is not None else frame.iloc[tied]
            ties = pd.DataFrame({"key": rkeys[tied], "hash": row_hashes(whole), "row": tied})
            picked = ties.sort_values(["key", "hash"], kind="stable").drop_duplicates("key")["row"].to_numpy()
            winners[group[picked]] = picked
    return winners


def raw_clusters(result: IdentityResult) -> pd.Series:
    """profile_id -> cluster id: profiles joined by a rejected edge share a raw component
    of the identity graph; its id is the smallest profile number among them."""
    profiles = result.components["profile_id"].astype(str).to_numpy()
    numbers = profile_numbers(profiles)
    if len(profiles) == 0:
        return pd.Series(numbers, index=pd.Index(profiles, name="profile_id"), dtype=np.int64)
    conflicts = result.conflicts
    if conflicts.empty:
        return pd.Series(numbers, index=pd.Index(profiles, name="profile_id"))
    # Each rejected edge's two ends -> their profiles' positions, by hash joins on Arrow
    # strings (a pandas MultiIndex over millions of identifiers costs seconds to build).
    owners = identifier_owners(result.identity_map, conflicts)
    profile_position = pa.array(profiles, pa.string())
    a, b = (
        pc.index_in(owner, value_set=profile_position).to_numpy(zero_copy_only=False).astype(np.int64)
        for owner in owners
    )
    graph = coo_matrix((np.ones(len(a), dtype=np.int8), (a, b)), shape=(len(profiles), len(profiles)))
    _, labels = connected_components(graph, directed=False)
    smallest = np.full(labels.max() + 1, np.iinfo(np.int64).max, dtype=np.int64)
    np.minimum.at(smallest, labels, numbers)
    return pd.Series(smallest[labels], index=pd.Index(profiles, name="profile_id"))


def identifier_owners(identity_map: pd.DataFrame, conflicts: pd.DataFrame) -> tuple[pa.Array, pa.Array]:
    """The profile_id owning each rejected edge's ``from`` and ``to`` identifier (every
    end of a rejected edge is in the identity map)."""
    # Only identity map rows whose value ends some rejected edge can match: a probe of the
    # few thousand values first, then the exact (type, value) join on those rows alone.
    values = pa.array(identity_map["identifier_value"], pa.large_string(), from_pandas=True)
    ends_values = pa.concat_arrays(
        [pa.array(conflicts[f"{side}_value"], pa.large_string(), from_pandas=True) for side in ("from", "to")]
    )
    near = pc.is_in(values, value_set=pc.unique(ends_values)).fill_null(False)
    candidates = np.flatnonzero(near.to_numpy(zero_copy_only=False))
    joined = pc.binary_join_element_wise(
        pa.array(identity_map["identifier_type"], pa.large_string(), from_pandas=True).take(candidates),
        values.take(candidates),
        pa.scalar(_SEP, pa.large_string()),
    )
    owner = pa.array(identity_map["profile_id"], pa.string(), from_pandas=True).take(candidates)
    ends = []
    for side in ("from", "to"):
        keys = pc.binary_join_element_wise(
            pa.array(conflicts[f"{side}_type"], pa.large_string(), from_pandas=True),
            pa.array(conflicts[f"{side}_value"], pa.large_string(), from_pandas=True),
            pa.scalar(_SEP, pa.large_string()),
        )
        ends.append(owner.take(pc.index_in(keys, value_set=joined)))
    return ends[0], ends[1]


def profile_numbers(profile_ids: np.ndarray) -> np.ndarray:
    """``p_<16 hex digits>`` -> the digits as a signed 64-bit integer (order preserved)."""
    if len(profile_ids) == 0:
        return np.empty(0, dtype=np.int64)
    text = np.asarray(profile_ids, dtype="S18").view(np.uint8).reshape(-1, 18)[:, 2:]
    digits = np.where(text >= ord("a"), text - ord("a") + 10, text - ord("0")).astype(np.uint64)
    unsigned = np.zeros(len(text), dtype=np.uint64)
    for position in range(16):
        unsigned = (unsigned << np.uint64(4)) | digits[:, position]
    return (unsigned ^ np.uint64(1 << 63)).view(np.int64)


def order_keys(frame: pd.DataFrame) -> np.ndarray:
    """64-bit key of (shop, order_id) for Shopify order events, ``NO_CLUSTER`` elsewhere.

    Orders are counted once per (shop, order_id) over the whole table (the first delivery
    supplies the profile; a cancellation anywhere removes it), so every record carrying
    one order must be recomputed together."""
    if frame.empty:
        return np.empty(0, dtype=np.int64)
    is_order = (
        (frame["source"] == "shop")
        & frame["event_type"].isin(["order_completed", "order_cancelled"])
        & frame["order_id"].notna()
        & (frame["order_id"].astype(str).str.strip() != "")
    ).to_numpy(dtype=bool)
    out = np.full(len(frame), NO_CLUSTER, dtype=np.int64)
    if is_order.any():
        picked = frame.loc[is_order]
        out[is_order] = _hash_strings((picked["shop"].astype(str) + _SEP + picked["order_id"].astype(str)).astype(object))
    return out


def _micros(values: pd.Series) -> np.ndarray:
    stamps = pd.Series(pd.to_datetime(values, utc=True))
    micros = stamps.dt.as_unit("us").array.asi8.copy()
    micros[stamps.isna().to_numpy()] = np.iinfo(np.int64).min
    return micros
