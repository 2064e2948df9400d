"""Identity resolution: which current records belong to the same person (PRODUCT.md section 5).

Pure functions over canonical frames (``core/canonical.py``); no Dagster import.

The steps, and why they are shaped this way:

1. ``current_state`` reduces the append-only staged history to the state that resolution
   reads: the latest version of each source record, minus deleted ones.
2. ``resolve_identities`` turns identifiers into integer-coded nodes, links each record's
   highest-type identifier to its other identifiers (a star), and finds connected
   components with scipy. A component within every limit is final as it is, because
   merging only ever raises counts. Only components that break a limit are replayed edge
   by edge, in the canonical edge order, with a union-find that rejects the merges that
   would break a limit. The result is a pure function of the current state: no input row
   order, batch order or arrival order can change it.
3. ``profile_id_changes`` compares two record -> profile assignments so that the push
   ledger, the serving store and the API can follow a profile id that changed.

Every output frame is sorted by a canonical key, so the same current state gives
byte-identical frames whatever the order of its rows.
"""

from __future__ import annotations

import hashlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from os import PathLike
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import yaml
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from personalization_pipeline.core.canonical import (
    BLOCKED_VALUES,
    IDENTIFIER_TYPES,
    SOURCES,
)

try:  # CPython's own SHA-256: the same digest, without OpenSSL's per-call set-up cost
    from _sha256 import sha256 as _SHA256
except ImportError:  # pragma: no cover - Python 3.12 renamed the module
    try:
        from _sha2 import sha256 as _SHA256
    except ImportError:
        _SHA256 = hashlib.sha256

_I64_MAX = np.iinfo(np.int64).max
_I64_MIN = np.iinfo(np.int64).min

IDENTITY_MAP_COLUMNS = ("identifier_type", "identifier_value", "profile_id", "first_seen")
RECORD_PROFILE_COLUMNS = ("source", "source_record_id", "profile_id")
CONFLICT_COLUMNS = (
    "from_type",
    "from_value",
    "to_type",
    "to_value",
    "reason",
    "trust_source",
    "first_seen",
)
COMPONENT_COLUMNS = ("profile_id", "size", *(f"n_{kind}" for kind in IDENTIFIER_TYPES))
PROFILE_CHANGE_COLUMNS = ("old_profile_id", "new_profile_id")


@dataclass(frozen=True)
class IdentityLimits:
    """Merge protection: the most identifiers of each type one profile may hold."""

    crm_id: int = 1
    customer_id: int = 1
    email: int = 3
    anonymous_id: int = 50

    def __post_init__(self) -> None:
        for kind in IDENTIFIER_TYPES:
            value = getattr(self, kind)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"identity limit {kind} must be an integer >= 1, got {value!r}")

    @classmethod
    def from_yaml(cls, path: str | PathLike[str]) -> "IdentityLimits":
        """Read ``config/identity_limits.yaml``: a mapping identifier type -> limit.

        Types left out keep their default; an unknown type or a limit that is not an
        integer >= 1 is an error naming the file.
        """
        text = Path(path).read_text(encoding="utf-8")
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise ValueError(f"{path}: not valid YAML: {exc}") from exc
        if data is None:
            data = {}
        if not isinstance(data, dict):
            raise ValueError(f"{path}: expected a mapping of identifier type to limit")
        unknown = sorted(str(key) for key in data if key not in IDENTIFIER_TYPES)
        if unknown:
            raise ValueError(
                f"{path}: unknown identifier type(s) {unknown}; known: {list(IDENTIFIER_TYPES)}"
            )
        try:
            return cls(**data)
        except ValueError as exc:
            raise ValueError(f"{path}: {exc}") from exc

    def as_array(self) -> np.ndarray:
        """The limits in ``IDENTIFIER_TYPES`` order."""
        return np.array([getattr(self, kind) for kind in IDENTIFIER_TYPES], dtype=np.int64)


@dataclass
class IdentityResult:
    """What ``resolve_identities`` returns.

    - ``identity_map``: every identifier of the current state -> its profile, with its
      first-seen time (earliest ``observed_at`` of a current record carrying it). Sorted by
      (profile_id, identifier type rank, first_seen, identifier_value).
    - ``record_profiles``: one row per current record that carries at least one usable
      identifier -> the profile of its highest-type identifier. Sorted by (source,
      observed_at, source_record_id): ``record_order``, which ``build_profiles`` uses to
      line it up with the current state.
    - ``conflicts``: the rejected edges, in the canonical edge order, with the limit that
      rejected them.
    - ``components``: one row per profile with its identifier counts, sorted by profile_id.
    - ``record_rows`` and ``record_ranks``, for each row of ``record_profiles``: its
      record's row in the frame resolved, and its profile's row in ``components``. They
      let a caller join records to profiles by position (the profile store does).
    """

    identity_map: pd.DataFrame
    record_profiles: pd.DataFrame
    conflicts: pd.DataFrame
    components: pd.DataFrame
    record_rows: np.ndarray | None = None
    record_ranks: np.ndarray | None = None


def current_state(history: pd.DataFrame, sort: bool = False) -> pd.DataFrame:
    """The current state that resolution reads (PRODUCT.md section 4).

    For every (source, source_record_id) the latest version wins: the largest
    ``observed_at``, then the largest ``received_at``; versions equal on both (a
    re-delivery) are told apart by a hash of the whole row, so the pick never depends on
    row order. A record whose latest version ``is_deleted`` (archived, deleted or merged
    away at the source) is dropped. The same rule de-duplicates events: an exact
    re-delivery of one delivery id keeps one row.

    The result keeps the canonical columns and dtypes, with a fresh index. Its rows keep
    the order they had in ``history`` (a filter, which at ten million rows is several
    times cheaper than a reordering gather); ``sort=True`` puts them in the canonical
    record order (source, observed_at, source_record_id) instead, which makes the frame
    itself independent of the history's row order. Nothing downstream depends on the
    row order: ``resolve_identities`` and ``build_profiles`` sort their outputs.
    """
    frame = history.reset_index(drop=True)
    if frame.empty:
        return frame.copy()
    missing = frame["source"].isna() | frame["source_record_id"].isna()
    if missing.any():
        raise ValueError(
            f"current_state: {int(missing.sum())} row(s) have no source or source_record_id"
        )
    groups, n_groups = _record_groups(frame)
    observed = _micros(frame["observed_at"], _I64_MIN)
    received = _micros(frame["received_at"], _I64_MIN)

    def row_hash(rows: np.ndarray) -> list[np.ndarray]:
        return [pd.util.hash_pandas_object(frame.iloc[rows], index=False).to_numpy()]

    # `~x` orders descending without the overflow that `-x` has at the int64 minimum.
    latest = _group_argmin(groups, n_groups, [~observed, ~received], tiebreak=row_hash)
    keep = np.zeros(len(frame), dtype=bool)
    keep[latest] = True
    keep &= ~frame["is_deleted"].fillna(False).to_numpy(dtype=bool)
    if sort:
        rows = np.flatnonzero(keep)
        return frame.iloc[rows[record_order(frame, rows)]].reset_index(drop=True)
    if keep.all():
        return frame
    return _filter_rows(frame, keep)


def _filter_rows(frame: pd.DataFrame, keep: np.ndarray) -> pd.DataFrame:
    """``frame[keep].reset_index(drop=True)``, with Arrow-backed columns filtered by Arrow.

    pandas turns a boolean mask into a take, and a take of ten million strings pays a
    cache miss per row; Arrow's filter copies runs of kept rows instead, several times
    faster. Columns keep their dtypes; Arrow-backed ones come out in a single chunk.
    """
    if frame.columns.has_duplicates:
        return frame[keep].reset_index(drop=True)
    mask = pa.array(keep)
    columns = {}
    for name in frame.columns:
        array = frame[name].array
        if isinstance(array, pd.arrays.ArrowExtensionArray) or isinstance(
            array, pd.arrays.ArrowStringArray
        ):
            # One chunk: every later read of the column is then zero-copy.
            kept = pa.array(array).filter(mask)
            if isinstance(kept, pa.ChunkedArray):
                kept = kept.combine_chunks()
            columns[name] = pd.array(kept, dtype=array.dtype)
        else:
            columns[name] = array[keep]
    return pd.DataFrame(columns, columns=frame.columns)


def _record_groups(frame: pd.DataFrame) -> tuple[np.ndarray, int]:
    """A group number per row for its record (source, source_record_id), and the count.

    The record ids are encoded source by source, two sources at a time (Arrow's hash
    kernel releases the GIL), instead of hashing ten million joined key strings.
    """
    source_codes, sources = _encode(_arrow_strings(frame["source"]))
    record_ids = _arrow_strings(frame["source_record_id"])

    def encode(code: int) -> tuple[np.ndarray, np.ndarray, int]:
        mask = source_codes == code
        codes, uniques = _encode(record_ids.filter(pa.array(mask)))
        return np.flatnonzero(mask), codes, len(uniques)

    with ThreadPoolExecutor(max_workers=2) as pool:
        parts = list(pool.map(encode, range(len(sources))))
    groups = np.empty(len(frame), dtype=np.int64)
    offset = 0
    for rows, codes, count in parts:
        groups[rows] = codes + offset
        offset += count
    return groups, offset


def resolve_identities(
    current: pd.DataFrame, limits: IdentityLimits, record_profiles: bool = True
) -> IdentityResult:
    """Resolve the current state into profiles (PRODUCT.md section 5).

    ``current`` is a canonical frame holding the current state (see ``current_state``);
    (source, source_record_id) is assumed unique in it.

    Identifiers are normalised first (strip; emails lower-cased); blocked values count as
    absent. A record with no usable identifier at all belongs to no profile and is left
    out of ``record_profiles``.

    ``record_profiles=False`` leaves that table empty (its columns only): a caller that
    joins records to profiles by ``record_rows`` and ``record_ranks`` (the profile store's
    full rebuild) is spared a row of strings per record.
    """
    limit_array = limits.as_array()
    frame = current.reset_index(drop=True)
    # Arrow's kernels and numpy's sorts and gathers release the GIL, so independent steps
    # run side by side on two threads. Along the critical path (the identifier encodes,
    # the graph, the profile id hashes, the output columns) the pool meanwhile sorts the
    # records into record order and gathers their ids while the graph is solved, and
    # sorts the identity map while the ids are hashed (the one long step that holds the
    # GIL); the output columns are then built on both threads.
    with ThreadPoolExecutor(max_workers=2) as pool:
        return _resolve(frame, limit_array, pool, record_profiles)


def _resolve(
    frame: pd.DataFrame, limit_array: np.ndarray, pool: ThreadPoolExecutor, with_record_profiles: bool = True
) -> IdentityResult:
    n_records = len(frame)
    n_types = len(IDENTIFIER_TYPES)
    encoding = [pool.submit(normalised_codes, kind, frame[kind]) for kind in IDENTIFIER_TYPES]
    # Each record key column is read once, for every use below. A NaT is the int64 minimum
    # in pandas, so the two NaT conventions (last in record order, "never" for
    # first-seen) come from one conversion.
    observed_or_min = _micros(frame["observed_at"], _I64_MIN)
    observed = np.where(observed_or_min == _I64_MIN, _I64_MAX, observed_or_min)
    source_codes, sources = _encode(_arrow_strings(frame["source"]))
    trust = _trust_table(sources)[source_codes]
    record_ids = _arrow_strings(frame["source_record_id"])

    # Integer-code the identifiers: node ids are contiguous per type, in type order. One
    # column of node ids per type (-1: none), not a records x types matrix, whose strided
    # writes and reads cost more than everything done with it.
    record_nodes: list[np.ndarray] = []
    node_values: list[pa.Array] = []
    offset = 0
    for future in encoding:
        codes, uniques = future.result()
        if offset:
            np.add(codes, offset, out=codes, where=codes >= 0)
        record_nodes.append(codes)
        node_values.append(uniques)
        offset += len(uniques)
    n_nodes = offset
    node_type = np.repeat(np.arange(n_types), [len(values) for values in node_values])
    values = pa.concat_arrays(node_values)

    # Each record's highest-type node (-1: none) and that type.
    top_node = record_nodes[0].copy()
    top_type = np.zeros(n_records, dtype=np.int64)
    for position in range(1, n_types):
        fill = np.flatnonzero((top_node < 0) & (record_nodes[position] >= 0))
        top_node[fill] = record_nodes[position][fill]
        top_type[fill] = position
    has_identifier = top_node >= 0
    in_record_order = pool.submit(
        _records_in_order,
        _sorted_rank_table(sources)[source_codes],
        observed_or_min,
        record_ids,
        has_identifier,
        source_codes,
        sources,
        with_record_profiles,
    )

    first_seen = pool.submit(_first_seen, record_nodes, observed, n_nodes)

    # Every record's star edges, duplicates included: components do not care, and only
    # the edges of components that break a limit need their trust and first-seen.
    edge_high, edge_low, edge_record = _star_edges(record_nodes, top_type, top_node)
    graph = coo_matrix(
        (np.ones(len(edge_high), dtype=np.int8), (edge_high, edge_low)),
        shape=(n_nodes, n_nodes),
    ).tocsr()
    n_components, labels = connected_components(graph, directed=False)
    counts = _type_counts(labels, node_type, n_components)
    broken = (counts > limit_array).any(axis=1)

    edges = _distinct_edges(*(np.empty(0, dtype=np.int64) for _ in range(4)), n_nodes)
    rejected = np.empty(0, dtype=np.int64)
    rejected_reasons: list[str] = []
    if broken.any():
        in_broken = broken[labels[edge_high]]
        records = edge_record[in_broken]
        edges = _distinct_edges(
            edge_high[in_broken], edge_low[in_broken], trust[records], observed[records], n_nodes
        )
        labels, rejected, rejected_reasons = _replay_broken(
            labels, broken, n_components, node_type, values, edges, limit_array
        )
        used = np.zeros(int(labels.max()) + 1, dtype=bool)
        used[labels] = True
        labels = (np.cumsum(used) - 1)[labels]
    n_profiles = int(labels.max()) + 1 if n_nodes else 0

    # The anchor: highest type, then earliest first-seen, then smallest value.
    node_first_seen = first_seen.result()
    anchors = _group_argmin(
        labels,
        n_profiles,
        [node_type, node_first_seen],
        tiebreak=lambda rows: [_take_objects(values, rows)],
    )
    # The identity map's order within each profile does not depend on the profile ids:
    # sort and gather its columns by label on the pool while the ids are hashed, then
    # move the profiles into id order.
    by_label = pool.submit(_by_label, labels, n_profiles, node_type, node_first_seen, values)
    # The profile label of each identified record, in record order.
    record_labels = pool.submit(lambda: labels[top_node[in_record_order.result()[0]]])
    profile_ids, profile_rank = _profile_ids(node_type[anchors], values.take(pa.array(anchors)))
    by_rank = np.empty(n_profiles, dtype=np.int64)
    by_rank[profile_rank] = np.arange(n_profiles)  # the ranks are a permutation
    ranked_ids = np.take(profile_ids, by_rank, axis=0)  # the ids in sorted order

    record_profiles = pool.submit(
        lambda: _record_profiles(
            in_record_order.result(),
            record_labels.result() if with_record_profiles else record_labels.result()[:0],
            profile_ids,
        )
    )
    # The identity map's columns moved into profile id order; its two string columns are
    # taken on the pool while everything else is built here.
    counts, types_by_label, first_seen_by_label, values_by_label = by_label.result()
    sizes = counts.sum(axis=0)
    positions = _regroup(sizes, by_rank)
    identifier_values = pool.submit(
        lambda: _str_series(values_by_label.take(pa.array(positions)))
    )
    identifier_types = pool.submit(lambda: _type_names(types_by_label[positions]))
    first_seen_column = _stamps(first_seen_by_label[positions], _I64_MAX)
    ids = np.repeat(ranked_ids, sizes[by_rank], axis=0)
    conflicts = _conflicts(edges, rejected, rejected_reasons, node_type, values)
    components = _components(counts, ranked_ids, by_rank)
    identity_map = pd.DataFrame(
        {
            "identifier_type": identifier_types.result(),
            "identifier_value": identifier_values.result(),
            "profile_id": _str_series(_matrix_strings(ids)),
            "first_seen": first_seen_column,
        }
    )
    return IdentityResult(
        identity_map,
        record_profiles.result(),
        conflicts,
        components,
        record_rows=in_record_order.result()[0],
        record_ranks=profile_rank[record_labels.result()],
    )


def profile_id_changes(
    old_record_profiles: pd.DataFrame, new_record_profiles: pd.DataFrame
) -> pd.DataFrame:
    """Profile ids that changed between two record -> profile assignments.

    One row (old_profile_id, new_profile_id) for every distinct pair where a record
    present in both assignments moved from the old profile to a different one: an anchor
    change (an email joins an anonymous-only profile), a merge (two old ids -> one new id)
    or a split (one old id -> several). An old profile id that no longer exists and none
    of whose records survive (every record deleted) gets one row with a null
    new_profile_id, so that the serving store and the ledger can drop it. Sorted by
    (old_profile_id, new_profile_id).
    """
    old_ids = _arrow_strings(old_record_profiles["profile_id"])
    new_ids = _arrow_strings(new_record_profiles["profile_id"])
    position = (
        pc.index_in(record_keys(old_record_profiles), value_set=record_keys(new_record_profiles))
        .fill_null(-1)
        .to_numpy(zero_copy_only=False)
        .astype(np.int64)
    )
    both = np.flatnonzero(position >= 0)
    before = old_ids.take(pa.array(both, type=pa.int64()))
    after = new_ids.take(pa.array(position[both], type=pa.int64()))
    moved = pc.not_equal(before, after).fill_null(True).to_numpy(zero_copy_only=False)
    pairs = pd.DataFrame(
        {
            "old_profile_id": _str_series(before.filter(pa.array(moved))),
            "new_profile_id": _str_series(after.filter(pa.array(moved))),
        }
    ).drop_duplicates()
    old_unique = pc.unique(old_ids.drop_null())
    gone = pc.invert(
        pc.or_(
            pc.is_in(old_unique, value_set=new_ids),
            pc.is_in(old_unique, value_set=_arrow_strings(pairs["old_profile_id"])),
        )
    )
    vanished = pd.DataFrame(
        {
            "old_profile_id": _str_series(old_unique.filter(gone)),
            "new_profile_id": pd.Series([None] * gone.true_count, dtype="str"),
        }
    )
    changes = pd.concat([pairs, vanished], ignore_index=True)
    return changes.sort_values(
        ["old_profile_id", "new_profile_id"], na_position="last", kind="stable"
    ).reset_index(drop=True)[list(PROFILE_CHANGE_COLUMNS)]


def _profile_ids(kinds: np.ndarray, values: pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """profile_id of each anchor, as an (n, 18) byte matrix, and each id's rank in sorted order.

    profile_id = "p_" + the first 16 hex digits of sha256("type:value"). The rank comes
    from the same 8 digest bytes read as a big-endian integer, which sorts exactly like
    the hex strings, so a million ids are ordered without a string sort. The ids stay a
    fixed-width byte matrix so that every output column of ids is a row gather
    (``_id_strings``) instead of a string take.

    The digests are the one step that holds the GIL for long: one C call per key, chained
    with ``map`` so that no Python bytecode runs per key (a quarter faster than a loop).
    """
    n = len(kinds)
    if n == 0:
        return np.empty((0, 18), dtype=np.uint8), np.empty(0, dtype=np.int64)
    prefixes = pa.array([f"{kind}:" for kind in IDENTIFIER_TYPES], type=pa.large_string())
    keys = pc.binary_join_element_wise(
        prefixes.take(pa.array(kinds, type=pa.int64())),
        values,
        pa.scalar("", pa.large_string()),
    )
    keys = keys.cast(pa.large_binary()).to_pylist()
    digest = type(_SHA256(b"")).digest
    # In slices: a C-level loop never lets another thread take the GIL, and the pool
    # is meanwhile sorting the identity map with GIL-releasing calls that need it briefly.
    step = 4096
    digests = np.frombuffer(
        b"".join(
            [
                b"".join(map(digest, map(_SHA256, keys[start : start + step])))
                for start in range(0, n, step)
            ]
        ),
        dtype=np.uint8,
    )
    head = np.ascontiguousarray(digests.reshape(n, -1)[:, :8])
    text = np.empty((n, 18), dtype=np.uint8)
    text[:, 0], text[:, 1] = ord("p"), ord("_")
    text[:, 2:] = _HEX_PAIRS[head].view(np.uint8).reshape(n, 16)
    numbers = head.view(">u8").reshape(n).astype(np.uint64)
    order = _argsort_distinct(numbers)
    ordered = numbers[order]
    if n > 1 and (ordered[1:] == ordered[:-1]).any():
        raise ValueError(
            "two different anchors hash to the same profile_id (a 64-bit sha256 prefix "
            "collision); widen the profile id"
        )
    rank = np.empty(n, dtype=np.int64)
    rank[order] = np.arange(n)
    return text, rank


# Byte -> its two lower-case hex digits, as one little-endian uint16 (first digit first).
_HEX_PAIRS = np.array(
    [ord(f"{byte:02x}"[0]) | ord(f"{byte:02x}"[1]) << 8 for byte in range(256)], dtype="<u2"
)


def _argsort_distinct(numbers: np.ndarray) -> np.ndarray:
    """Argsort of uint64 numbers that are nearly all distinct (hash prefixes).

    One ``np.sort`` pass of the high bits with the row position packed into the low
    bits; the rare runs whose high bits tie are then put in full-number order. Equal
    numbers (which callers reject) end up adjacent, in row order.
    """
    n = len(numbers)
    index_bits = max(int(n - 1).bit_length(), 1)
    shift = np.uint64(index_bits)
    packed = (numbers >> shift) << shift
    packed |= np.arange(n, dtype=np.uint64)
    packed.sort()
    order = (packed & np.uint64((1 << index_bits) - 1)).astype(np.int64)
    high = packed >> shift
    tied = np.flatnonzero(high[1:] == high[:-1])
    if len(tied):
        in_tie = np.zeros(n, dtype=bool)
        in_tie[tied] = in_tie[tied + 1] = True
        run = np.cumsum(np.concatenate([[True], high[1:] != high[:-1]]))[in_tie]
        rows = order[in_tie]
        order[in_tie] = rows[np.lexsort((rows, numbers[rows], run))]
    return order


def _id_strings(text: np.ndarray, index: np.ndarray) -> pa.Array:
    """Rows ``index`` of a fixed-width byte matrix as a large_string array."""
    # A row take of the 2-D byte matrix: numpy copies each row with one fixed-size move,
    # faster than a take of opaque ``V<width>`` items.
    return _matrix_strings(
        np.take(np.ascontiguousarray(text), np.asarray(index, dtype=np.int64), axis=0)
    )


def _matrix_strings(text: np.ndarray) -> pa.Array:
    """Each row of a fixed-width byte matrix as one string of a large_string array."""
    n, width = text.shape
    return pa.LargeStringArray.from_buffers(
        n,
        pa.py_buffer(np.arange(n + 1, dtype=np.int64) * width),
        pa.py_buffer(np.ascontiguousarray(text)),
    )


def _first_seen(
    record_nodes: Sequence[np.ndarray], observed: np.ndarray, n_nodes: int
) -> np.ndarray:
    """Each node's first-seen: the earliest ``observed`` of the records that carry it."""
    first_seen = np.full(n_nodes, _I64_MAX, dtype=np.int64)
    for nodes in record_nodes:
        mask = nodes >= 0
        np.minimum.at(first_seen, nodes[mask], observed[mask])
    return first_seen


def _star_edges(
    record_nodes: Sequence[np.ndarray], top_type: np.ndarray, top_node: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Each record's edges (its highest-type node -> each other node), with the record.

    ``record_nodes``: one array of node ids (-1: none) per identifier type, in type order.
    """
    highs, lows, records = [], [], []
    for position in range(1, len(record_nodes)):
        rows = np.flatnonzero((record_nodes[position] >= 0) & (top_type < position))
        highs.append(top_node[rows])
        lows.append(record_nodes[position][rows])
        records.append(rows)
    return np.concatenate(highs), np.concatenate(lows), np.concatenate(records)


def _distinct_edges(
    high: np.ndarray, low: np.ndarray, trust: np.ndarray, observed: np.ndarray, n_nodes: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Distinct edges (high node, low node) with their trust and first-seen.

    Trust is the most trusted source among the records that carry the edge, first-seen
    the earliest observed_at among them.
    """
    key = high * np.int64(max(n_nodes, 1)) + low
    codes, uniques = pd.factorize(key)
    n_edges = len(uniques)
    edge_trust = np.full(n_edges, _I64_MAX, dtype=np.int64)
    np.minimum.at(edge_trust, codes, trust)
    edge_first_seen = np.full(n_edges, _I64_MAX, dtype=np.int64)
    np.minimum.at(edge_first_seen, codes, observed)
    uniques = np.asarray(uniques, dtype=np.int64)
    return uniques // max(n_nodes, 1), uniques % max(n_nodes, 1), edge_trust, edge_first_seen


def _type_counts(labels: np.ndarray, node_type: np.ndarray, n_components: int) -> np.ndarray:
    n_types = len(IDENTIFIER_TYPES)
    flat = np.bincount(labels * n_types + node_type, minlength=n_components * n_types)
    return flat.reshape(n_components, n_types)


def _replay_broken(
    labels: np.ndarray,
    broken: np.ndarray,
    n_components: int,
    node_type: np.ndarray,
    values: pa.Array,
    edges: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray],
    limit_array: np.ndarray,
) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """The ordered union-find pass over the components that break a limit.

    Returns the new node labels and the indices of the rejected edges, in the canonical
    edge order, with the reason for each.
    """
    edge_high, edge_low, edge_trust, edge_first_seen = edges
    nodes = np.flatnonzero(broken[labels])
    # Rank the nodes of broken components by (type rank, value): the edge order compares
    # ends that way, and the local union-find works on these ranks.
    table = pa.table({"type": node_type[nodes], "value": values.take(pa.array(nodes))})
    ranked_nodes = nodes[
        pc.sort_indices(table, [("type", "ascending"), ("value", "ascending")]).to_numpy()
    ]
    local = np.full(len(labels), -1, dtype=np.int64)
    local[ranked_nodes] = np.arange(len(ranked_nodes))

    edge_ids = np.flatnonzero(broken[labels[edge_high]])
    high = local[edge_high[edge_ids]]
    low = local[edge_low[edge_ids]]
    order = np.lexsort((low, high, edge_first_seen[edge_ids], edge_trust[edge_ids]))

    n_local = len(ranked_nodes)
    n_types = len(IDENTIFIER_TYPES)
    parent = list(range(n_local))
    counts = [[0] * n_types for _ in range(n_local)]
    for index, kind in enumerate(node_type[ranked_nodes].tolist()):
        counts[index][kind] = 1
    limits = limit_array.tolist()

    def find(node: int) -> int:
        root = node
        while parent[root] != root:
            root = parent[root]
        while parent[node] != root:
            parent[node], node = root, parent[node]
        return root

    rejected: list[int] = []
    reasons: list[str] = []
    highs = high[order].tolist()
    lows = low[order].tolist()
    for position, (a, b) in enumerate(zip(highs, lows)):
        root_a, root_b = find(a), find(b)
        if root_a == root_b:
            continue
        merged = [x + y for x, y in zip(counts[root_a], counts[root_b])]
        broken_types = [k for k in range(n_types) if merged[k] > limits[k]]
        if broken_types:
            rejected.append(position)
            reasons.append(
                "; ".join(
                    f"{IDENTIFIER_TYPES[k]} limit {limits[k]} exceeded "
                    f"(merge would give {merged[k]})"
                    for k in broken_types
                )
            )
            continue
        if root_a < root_b:
            root_a, root_b = root_b, root_a
        parent[root_b] = root_a
        counts[root_a] = merged

    roots = np.fromiter((find(i) for i in range(n_local)), dtype=np.int64, count=n_local)
    new_labels = labels.copy()
    new_labels[ranked_nodes] = n_components + roots
    rejected_edges = edge_ids[order][np.asarray(rejected, dtype=np.int64)]
    return new_labels, rejected_edges, reasons


def _by_label(
    labels: np.ndarray,
    n_profiles: int,
    node_type: np.ndarray,
    node_first_seen: np.ndarray,
    values: pa.Array,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, pa.Array]:
    """What the outputs need of each profile before its id is known, by label.

    The nodes of each type per label (types x labels), then the identity map grouped by
    label, in label order, each profile's nodes in map order (type rank, first-seen,
    value): the type (as bytes), first-seen and value columns. The labels follow the node
    numbering, so these gathers read nearly in sequence, several times faster than
    gathers in id order; the move into id order (``_regroup``) then reads each profile's
    nodes together.
    """
    # The nodes are numbered type by type: one count over each type's slice of labels.
    bounds = np.searchsorted(node_type, np.arange(len(IDENTIFIER_TYPES) + 1))
    counts = np.stack(
        [
            np.bincount(labels[start:end], minlength=n_profiles)
            for start, end in zip(bounds[:-1], bounds[1:])
        ]
    )
    order = _canonical_order([labels, node_type, node_first_seen], [values])
    return (
        counts,
        node_type.astype(np.int8)[order],
        node_first_seen[order],
        values.take(pa.array(order)),
    )


def _regroup(sizes: np.ndarray, by_rank: np.ndarray) -> np.ndarray:
    """Positions that move label-ordered groups (``sizes[label]`` rows each) into profile
    id order: ``by_rank[r]`` is the label of the profile ranked ``r``.

    This gives the identity map's order (profile id, type rank, first-seen, value) from
    the label order of ``_by_label``, without a second sort of every node. Sorted by
    profile id first, the map's id column is then each id repeated, a sequential copy
    instead of a gather at random.
    """
    starts = np.cumsum(sizes) - sizes
    sizes = sizes[by_rank]
    shift = starts[by_rank] - (np.cumsum(sizes) - sizes)
    return np.arange(int(sizes.sum())) + np.repeat(shift, sizes)


def record_order(frame: pd.DataFrame, rows: np.ndarray) -> np.ndarray:
    """The canonical record order of ``frame.iloc[rows]``: (source, observed_at, id).

    Returns positions into ``rows``. ``record_profiles`` is in this order, and so is
    ``current_state(..., sort=True)``; ``build_profiles`` uses it to line records up by
    position instead of joining ten million string keys.
    """
    observed = _micros(frame["observed_at"], _I64_MIN)[rows]
    # Codes of the whole column order the subset the same way; the record ids are only
    # read for rows that tie on (source, observed_at).
    return _canonical_order(
        [_sorted_codes(frame["source"])[rows], observed],
        [_arrow_strings(frame["source_record_id"])],
        str_rows=rows,
    )


def _records_in_order(
    source_rank: np.ndarray,
    observed: np.ndarray,
    record_ids: pa.Array,
    keep: np.ndarray,
    source_codes: np.ndarray,
    sources: pa.Array,
    columns: bool = True,
) -> tuple[np.ndarray, tuple[pd.Series, pd.Series]]:
    """The rows ``keep`` in record order (``record_order``), and their (source,
    source_record_id) columns of ``record_profiles`` (with ``columns=False``, empty).

    Every record is sorted, then the kept ones are picked out: the order is total
    (source, observed_at, source_record_id, row), so the kept rows come out in their own
    record order. The rows sort by source first, so the source column is a handful of
    runs: built from the runs, not gathered row by row.
    """
    order = _canonical_order([source_rank, observed], [record_ids])
    rows = order[keep[order]]
    listed = rows if columns else rows[:0]
    return rows, (
        _str_series(_repeat_runs(sources, source_codes[listed])),
        _str_series(record_ids.take(pa.array(listed, type=pa.int64()))),
    )


def _repeat_runs(uniques: pa.Array, codes: np.ndarray) -> pa.Array:
    """``uniques[codes]`` (code -1: null) as large_string, built run by run when the
    codes come in a few runs; a plain take otherwise."""
    n = len(codes)
    starts = np.flatnonzero(np.concatenate([[True], codes[1:] != codes[:-1]])) if n else []
    if len(starts) > 64 or not pa.types.is_large_string(uniques.type):
        return _arrow_strings(uniques.take(pa.array(codes, type=pa.int64(), mask=codes < 0)))
    pieces = [pa.array([], type=pa.large_string())]
    for start, end in zip(starts, [*starts[1:], n]):
        count, code = int(end - start), int(codes[start])
        if code < 0:
            pieces.append(pa.nulls(count, type=pa.large_string()))
            continue
        text = uniques[code].as_py().encode("utf-8")
        pieces.append(
            pa.LargeStringArray.from_buffers(
                count,
                pa.py_buffer(np.arange(count + 1, dtype=np.int64) * len(text)),
                pa.py_buffer(text * count),
            )
        )
    return pa.concat_arrays(pieces)


def _record_profiles(
    records: tuple[np.ndarray, tuple[pd.Series, pd.Series]],
    record_labels: np.ndarray,
    profile_ids: np.ndarray,
) -> pd.DataFrame:
    """``records``: the rows and columns from ``_records_in_order``; ``record_labels``:
    the profile label of each of those rows (that of its highest-type node)."""
    _, (sources, record_ids) = records
    return pd.DataFrame(
        {
            "source": sources,
            "source_record_id": record_ids,
            "profile_id": _str_series(_id_strings(profile_ids, record_labels)),
        }
    )


def _conflicts(
    edges: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray],
    rejected: np.ndarray,
    reasons: list[str],
    node_type: np.ndarray,
    values: pa.Array,
) -> pd.DataFrame:
    edge_high, edge_low, edge_trust, edge_first_seen = edges
    source_names = np.asarray([*SOURCES, None], dtype=object)
    high = edge_high[rejected]
    low = edge_low[rejected]
    return pd.DataFrame(
        {
            "from_type": _type_names(node_type[high]),
            "from_value": _str_series(values.take(pa.array(high, type=pa.int64()))),
            "to_type": _type_names(node_type[low]),
            "to_value": _str_series(values.take(pa.array(low, type=pa.int64()))),
            "reason": pd.Series(np.asarray(reasons, dtype=object), dtype="str"),
            "trust_source": pd.Series(
                source_names[np.minimum(edge_trust[rejected], len(SOURCES))], dtype="str"
            ),
            "first_seen": _stamps(edge_first_seen[rejected], _I64_MAX),
        }
    )


def _components(counts: np.ndarray, ranked_ids: np.ndarray, by_rank: np.ndarray) -> pd.DataFrame:
    """One row per profile, sorted by id: ``counts``, the nodes of each type per label
    (types x labels), ``ranked_ids``, the ids in that order, and ``by_rank[r]``, the label
    of the profile ranked ``r``.

    The counts are gathered into rank order and laid out as the frame's single int64
    block, so the frame is built without a consolidation copy.
    """
    block = np.empty((1 + len(counts), len(by_rank)), dtype=np.int64)
    for position, of_type in enumerate(counts):
        block[1 + position] = of_type[by_rank]
    block[0] = block[1:].sum(axis=0)
    data = pd.DataFrame(
        block.T, columns=["size", *(f"n_{kind}" for kind in IDENTIFIER_TYPES)], copy=False
    )
    data.insert(0, "profile_id", _str_series(_matrix_strings(ranked_ids)))
    return data


def normalised_codes(kind: str, column: pd.Series) -> tuple[np.ndarray, pa.Array]:
    """Integer codes of one identifier column after normalisation, and the distinct values.

    Code -1 marks an absent or blocked value. The raw values are dictionary-encoded first
    and only the distinct ones are normalised, which is much cheaper when values repeat
    (a visitor's anonymous id is on every one of their events).
    """
    raw_codes, raw_uniques = _encode(_arrow_strings(column))
    if len(raw_uniques) == 0:
        return raw_codes, pa.array([], type=pa.large_string())
    normalised = normalise_values(kind, raw_uniques)
    unchanged = pc.equal(normalised, raw_uniques.cast(pa.large_string()))
    if pc.all(unchanged.fill_null(True)).as_py():
        # Clean data: normalising merged nothing, so only blocked values need dropping.
        kept = np.flatnonzero(unchanged.is_valid().to_numpy(zero_copy_only=False))
        if len(kept) == len(raw_uniques):  # and nothing blocked: the codes stand as they are
            return raw_codes, normalised
        mapping = np.full(len(raw_uniques) + 1, -1, dtype=np.int64)
        mapping[kept] = np.arange(len(kept))
        return mapping[raw_codes], normalised.take(pa.array(kept, type=pa.int64()))
    norm_codes, norm_uniques = _encode(normalised)
    mapping = np.append(norm_codes, -1)  # a null raw value (code -1) stays -1
    return mapping[raw_codes], norm_uniques


def normalise_values(kind: str, values: pa.Array) -> pa.Array:
    """Arrow-vectorised ``canonical.normalise_identifier`` (null where blocked).

    The same steps as ``canonical.normalise_identifiers`` (strip, lower-case emails, the
    blocked list and ``^[0-]*$`` compared lower-cased), on Arrow kernels: several times
    faster than the pandas string path at millions of values. A test holds the two equal.
    Pure-ASCII text (the usual case) is lower-cased by the ASCII kernel, which gives the
    same bytes several times faster, and ``^[0-]*$`` is tested by trimming ``0`` and
    ``-`` (empty after the trim), not by a regular expression: a third of the cost.
    """
    stripped = pc.utf8_trim_whitespace(values)
    ascii_only = pc.all(pc.string_is_ascii(stripped)).as_py() is not False
    lower = pc.ascii_lower if ascii_only else pc.utf8_lower
    if kind == "email":
        stripped = lower(stripped)
    lowered = lower(stripped)
    zeros_and_dashes = pc.equal(pc.binary_length(pc.utf8_trim(lowered, characters="0-")), 0)
    blocked = pc.or_(
        pc.is_in(lowered, value_set=pa.array(sorted(BLOCKED_VALUES), type=lowered.type)),
        zeros_and_dashes,
    )
    return pc.if_else(blocked, pa.scalar(None, type=stripped.type), stripped).cast(
        pa.large_string()
    )


def record_keys(frame: pd.DataFrame) -> pa.Array:
    """One string per record, ``source`` + U+001F + ``source_record_id``."""
    return pc.binary_join_element_wise(
        _arrow_strings(frame["source"]),
        _arrow_strings(frame["source_record_id"]),
        pa.scalar("\x1f", pa.large_string()),
    )


def _encode(array: pa.Array) -> tuple[np.ndarray, pa.Array]:
    """Dictionary-encode: int64 codes (-1 for null) and the distinct values, unsorted."""
    encoded = pc.dictionary_encode(array)
    codes = encoded.indices.fill_null(-1).to_numpy(zero_copy_only=False).astype(np.int64)
    return codes, encoded.dictionary




def _trust_table(uniques: pa.Array) -> np.ndarray:
    """The trust rank of each distinct source, then one (last) for a null (code -1)."""
    rank = {source: position for position, source in enumerate(SOURCES)}
    return np.array(
        [rank.get(u, len(SOURCES)) for u in uniques.to_pylist()] + [len(SOURCES)],
        dtype=np.int64,
    )


def _take_low_cardinality(column: pd.Series, rows: np.ndarray) -> pa.Array:
    """``column[rows]`` as Arrow strings, taken from the column's few distinct values:
    a gather from a tiny dictionary instead of millions of cache misses."""
    codes, uniques = _encode(_arrow_strings(column))
    picked = codes[rows]
    return uniques.take(pa.array(picked, type=pa.int64(), mask=picked < 0))


def _sorted_codes(column: pd.Series) -> np.ndarray:
    """Codes whose order is the values' order, nulls last (for low-cardinality columns)."""
    codes, uniques = _encode(_arrow_strings(column))
    return _sorted_rank_table(uniques)[codes]


def _sorted_rank_table(uniques: pa.Array) -> np.ndarray:
    """The rank of each distinct value in sorted order, then one (last) for a null."""
    rank = np.empty(len(uniques) + 1, dtype=np.int64)
    rank[pc.sort_indices(uniques).to_numpy()] = np.arange(len(uniques))
    rank[-1] = len(uniques)
    return rank


def _arrow_strings(column: pd.Series | pa.Array) -> pa.Array:
    """A column as one Arrow large_string array (zero-copy for pandas ``str`` columns)."""
    array = column if isinstance(column, (pa.Array, pa.ChunkedArray)) else pa.array(
        column, from_pandas=True
    )
    if isinstance(array, pa.ChunkedArray):
        array = array.combine_chunks()
    if array.type != pa.large_string():
        array = array.cast(pa.large_string())
    return array


def _str_series(array: pa.Array) -> pd.Series:
    return pd.Series(pd.array(array, dtype="str"))


def _type_names(node_type: np.ndarray) -> pd.Series:
    names = pa.array(list(IDENTIFIER_TYPES), type=pa.large_string())
    return _str_series(names.take(pa.array(node_type)))


def _take_objects(key: pa.Array | pd.Series | np.ndarray, rows: np.ndarray) -> np.ndarray:
    """The given rows of a key column as a numpy object array."""
    if isinstance(key, (pa.Array, pa.ChunkedArray)):
        return key.take(pa.array(rows, type=pa.int64())).to_numpy(zero_copy_only=False)
    if isinstance(key, pd.Series):
        return key.take(rows).to_numpy(dtype=object)
    return np.asarray(key)[rows]


def _micros(values: pd.Series, nat: int) -> np.ndarray:
    """Timestamps as int64 microseconds since the epoch (UTC); NaT becomes ``nat``."""
    stamps = pd.Series(pd.to_datetime(values, utc=True))
    micros = stamps.dt.as_unit("us").array.asi8.copy()
    micros[stamps.isna().to_numpy()] = nat
    return micros


def _stamps(micros: np.ndarray, nat: int) -> pd.Series:
    """Inverse of ``_micros``: int64 microseconds -> a UTC timestamp Series."""
    raw = np.where(micros == nat, np.iinfo(np.int64).min, micros).astype(np.int64, copy=False)
    # Naive values given the UTC dtype are read as UTC: the same Series as
    # ``.dt.tz_localize("UTC")``, without its copy and checks (several times faster).
    return pd.Series(raw.view("M8[us]"), dtype="datetime64[us, UTC]")


def _canonical_order(
    int_keys: Sequence[np.ndarray],
    str_keys: Sequence[pa.Array | pd.Series | np.ndarray],
    str_rows: np.ndarray | None = None,
) -> np.ndarray:
    """Row order by the integer keys, then the string keys, all ascending.

    Integer keys are packed into as few int64 words as their ranges allow and sorted one
    ``np.sort`` pass per word (``_sort_packed``; ``np.argsort`` and ``np.lexsort`` are
    several times slower). Strings are compared only
    inside runs where every integer key ties, so a string sort is paid for the ties alone.
    Rows equal on every key keep an arbitrary order: give keys that identify a row.
    With ``str_rows``, row ``i`` reads its strings at ``str_rows[i]`` of the string keys.
    """
    n = len(int_keys[0])
    if n == 0:
        return np.empty(0, dtype=np.int64)
    packed = _pack_keys(
        [_compact_key(np.asarray(key, dtype=np.int64)) for key in int_keys], _sort_budget(n)
    )
    order, leading = _sort_packed_leading(packed, n)
    # Ties: equal on the leading word (read off the last sort pass, not gathered), then
    # on each other word, compared only where every word before it ties.
    if leading is None:
        same = np.ones(n - 1, dtype=bool)
    else:
        same = leading[1:] == leading[:-1]
    for key in packed[1:]:
        pairs = np.flatnonzero(same)
        same[pairs] = key[order[pairs]] == key[order[pairs + 1]]
    if not same.any() or not str_keys:
        return order
    in_tie = np.zeros(n, dtype=bool)
    in_tie[1:] |= same
    in_tie[:-1] |= same
    run = np.cumsum(np.concatenate([[True], ~same]))
    rows = order[in_tie]
    order = order.copy()
    order[in_tie] = _sort_ties(run[in_tie], rows, str_keys, str_rows)
    return order


def _compact_key(key: np.ndarray) -> np.ndarray:
    """The key with the same order and ties in fewer bits, when its values share a step.

    The offsets from the minimum are divided by their greatest common divisor: whole-
    second timestamps in microseconds lose 20 bits, so (source, observed_at) packs into
    one sort word instead of two. The key is returned as it is when there is no common
    step (one pass of ``np.gcd``, a few percent of a sort pass).
    """
    if len(key) < 2:
        return key
    low = int(key.min())
    offsets = key.view(np.uint64) - np.uint64(low & ((1 << 64) - 1))
    step = int(np.gcd.reduce(offsets))
    if step <= 1:
        return key
    return (offsets // np.uint64(step)).view(np.int64)


def _sort_ties(
    run: np.ndarray,
    rows: np.ndarray,
    str_keys: Sequence[pa.Array | pd.Series | np.ndarray],
    str_rows: np.ndarray | None,
) -> np.ndarray:
    """``rows`` sorted by (run, the string keys, row), nulls last (``_canonical_order``).

    Arrow string keys are sorted by Arrow, several times faster than pandas on Python
    strings and the same order: UTF-8 bytes compare like code points, and the row makes
    the order total. Other keys (Python objects of any type) go through pandas.
    """
    taken = rows if str_rows is None else str_rows[rows]
    if all(
        isinstance(key, (pa.Array, pa.ChunkedArray))
        and (pa.types.is_string(key.type) or pa.types.is_large_string(key.type))
        for key in str_keys
    ):
        indices = pa.array(taken, type=pa.int64())
        columns = {"run": run}
        for position, key in enumerate(str_keys):
            columns[f"key{position}"] = key.take(indices)
        columns["row"] = rows
        sort_keys = [(name, "ascending", "at_end") for name in columns]
        picked = pc.sort_indices(pa.table(columns), sort_keys=sort_keys)
        return rows[picked.to_numpy()]
    ties = pd.DataFrame({"run": run, "row": rows})
    names = []
    for position, key in enumerate(str_keys):
        name = f"key{position}"
        ties[name] = _take_objects(key, taken)
        names.append(name)
    ties = ties.sort_values(["run", *names, "row"], kind="stable", na_position="last")
    return ties["row"].to_numpy()


def _sort_budget(n: int) -> int:
    """Bits left for a sort key once a row index of ``n`` rows is packed beside it."""
    return 63 - max(int(n - 1).bit_length(), 1)


def _pack_keys(keys: list[np.ndarray], budget: int = 62) -> list[np.ndarray]:
    """Non-negative int64 words of at most ``budget`` bits, most significant first, whose
    lexicographic order is the keys' order (keys most significant first).

    Each key is shifted to start at 0 and its bits are laid end to end, most significant
    key first, then cut into words of ``budget`` bits: as few words as the keys' ranges
    allow. A key that never changes is left out: it cannot order anything.
    """
    fields: list[tuple[np.ndarray, int]] = []
    for key in keys:
        key = np.asarray(key, dtype=np.int64)
        if len(key) == 0:
            continue
        low, high = int(key.min()), int(key.max())
        bits = (high - low).bit_length()
        if bits == 0:
            continue
        # Order-preserving map to uint64, so a range of 64 bits cannot overflow. A key
        # already starting at 0 is used as it is (a view: never written to).
        unsigned = key.view(np.uint64)
        if low:
            unsigned = unsigned - np.uint64(low & ((1 << 64) - 1))
        fields.append((unsigned, bits))
    words: list[np.ndarray] = []
    word: np.ndarray | None = None
    free = budget
    for value, bits in fields:
        remaining = bits
        while remaining:
            take = min(remaining, free)
            remaining -= take
            # The next ``take`` bits of the value; the mask is only needed once a split
            # has already consumed its higher bits.
            part = value >> np.uint64(remaining) if remaining else value
            if remaining + take < bits:
                part = part & np.uint64((1 << take) - 1)
            if word is None:
                word = part.copy() if part is value else part
            else:
                word <<= np.uint64(take)
                word |= part
            free -= take
            if free == 0:
                words.append(word.view(np.int64))
                word, free = None, budget
    if word is not None:
        words.append(word.view(np.int64))
    return words


def _sort_packed(words: list[np.ndarray], n: int) -> np.ndarray:
    """Stable argsort by the words (most significant first, each within ``_sort_budget``).

    Each pass sorts the word with the row position packed into its low bits: ``np.sort``
    on int64 is vectorised and several times faster than ``np.argsort``, and the packed
    position makes every pass stable, so least-significant-first passes compose.
    """
    return _sort_packed_leading(words, n)[0]


def _sort_packed_leading(words: list[np.ndarray], n: int) -> tuple[np.ndarray, np.ndarray | None]:
    """``_sort_packed``, and the leading (most significant) word in sorted order, which
    the last pass has in hand (None without words)."""
    index_bits = 63 - _sort_budget(n)
    mask = np.int64((1 << index_bits) - 1)
    positions = np.arange(n, dtype=np.int64)
    order: np.ndarray | None = None
    leading: np.ndarray | None = None
    for number, word in enumerate(reversed(words)):
        packed = np.left_shift(word if order is None else word[order], np.int64(index_bits))
        packed |= positions
        packed.sort()
        if number == len(words) - 1:
            leading = packed >> np.int64(index_bits)
        packed &= mask
        order = packed if order is None else order[packed]
    return (positions if order is None else order), leading




def _group_argmin(
    groups: np.ndarray,
    n_groups: int,
    int_keys: Sequence[np.ndarray],
    tiebreak: Callable[[np.ndarray], list[np.ndarray]] | None = None,
) -> np.ndarray:
    """For each non-empty group, the row with the lexicographically smallest key.

    The integer keys are compared one after the other with O(n) passes; rows still tied
    after them are ordered by ``tiebreak(rows)`` (a list of sortable arrays for those
    rows), which callers use for string keys so that strings are only compared on ties.
    Returns the winning row indices in group order (empty groups are skipped).
    """
    rows = np.arange(len(groups))
    # Keys packed into as few words as their ranges allow: one pass per word, not per key.
    words = _pack_keys(list(int_keys), 63) if len(rows) else []
    for number, word in enumerate(words):
        best = np.full(n_groups, _I64_MAX, dtype=np.int64)
        if number == 0:
            np.minimum.at(best, groups, word)
            rows = np.flatnonzero(word == best[groups])
            continue
        group_rows, word_rows = groups[rows], word[rows]
        np.minimum.at(best, group_rows, word_rows)
        rows = rows[word_rows == best[group_rows]]
    per_group = np.bincount(groups[rows], minlength=n_groups)
    winner = np.full(n_groups, -1, dtype=np.int64)
    single = per_group[groups[rows]] == 1
    winner[groups[rows[single]]] = rows[single]
    tied = rows[~single]
    if len(tied):
        extra = tiebreak(tied) if tiebreak is not None else []
        ties = pd.DataFrame({"group": groups[tied], "row": tied})
        names = []
        for position, key in enumerate(extra):
            name = f"key{position}"
            ties[name] = np.asarray(key)
            names.append(name)
        ties = ties.sort_values(["group", *names], kind="stable", na_position="last")
        first = ties.drop_duplicates("group")
        winner[first["group"].to_numpy()] = first["row"].to_numpy()
    return winner[winner >= 0]
