"""The resolved profile: conflict-resolved attributes plus event aggregates (PRODUCT.md section 6).

``build_profiles`` is a pure function of the current state (``identity.current_state``),
the record -> profile assignment (``identity.resolve_identities``) and the conflict rules
(``rules.load_conflict_rules``). It returns one row per profile and, for every profile and
resolved attribute, the provenance of the winning value. No Dagster import here.

Decisions the brief leaves open, made here and tested:

- Orders are Shopify ``order_completed`` rows (source ``shop``) with an order id, counted
  once per (shop, order_id); the first delivery (earliest observed_at, then smallest
  source_record_id) supplies the total and the profile. An ``order_cancelled`` row from
  ``shop`` for a counted order removes it once. ``order_count``, ``lifetime_value`` and
  ``last_order_at`` all describe the counted orders that are not cancelled, so a profile
  whose only order was cancelled has 0 orders, value 0 and no last order.
- The open cart is the latest ``checkout_started`` from ``shop`` strictly after the
  profile's latest ``order_completed`` from ``shop`` (cancelled or not: the checkout did
  complete). With no such checkout the three cart columns are null.
- An attribute value that is empty or only whitespace counts as absent; a winning value
  is returned as observed.
- Ties among the latest product views / checkouts break like the rules: smallest source,
  then smallest source_record_id, as strings.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Callable

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from personalization_pipeline.core.canonical import IDENTIFIER_TYPES, SOURCES
from personalization_pipeline.core.identity import (
    _I64_MAX,
    _I64_MIN,
    _arrow_strings,
    _canonical_order,
    _encode,
    _group_argmin,
    _id_strings,
    _micros,
    _sorted_codes,
    _stamps,
    _str_series,
    _take_low_cardinality,
    _take_objects,
    normalised_codes,
    record_keys,
    record_order,
)
from personalization_pipeline.core.rules import AGGREGATE_COLUMNS, ConflictRules
PROVENANCE_COLUMNS = (
    "profile_id",
    "attribute",
    "value",
    "source",
    "source_record_id",
    "observed_at",
    "tier",
)


def profile_columns(rules: ConflictRules) -> list[str]:
    """The columns of resolved_profiles under these rules, in order."""
    return ["profile_id", "primary_email", "emails", *rules.attributes, *AGGREGATE_COLUMNS]


def build_profiles(
    current: pd.DataFrame,
    record_profiles: pd.DataFrame | None,
    rules: ConflictRules,
    identity_map: pd.DataFrame | None = None,
    assignment: tuple[np.ndarray, np.ndarray, pa.Array, np.ndarray | None] | None = None,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Build (resolved_profiles, provenance) from the current state.

    ``current`` is the current state (canonical columns, (source, source_record_id)
    unique); ``record_profiles`` assigns its records to profiles (one row per record;
    records it leaves out, those with no identifier, take part in no profile). Pass
    ``identity_map`` (``IdentityResult.identity_map``) whenever you have it: a profile's
    ``emails`` are then the email identifiers of its identity component, and
    ``primary_email`` the one with the earliest first-seen (ties: smallest value).
    Without it, the emails are those carried by the profile's own records (first-seen
    over those records). The two differ only where an edge was rejected: an email whose
    edge to a second CRM contact was rejected belongs to the first contact's profile, but
    without the map it also shows on the second's. Profiles of the identity map that own
    no record get a row with their emails and nulls elsewhere.

    ``resolved_profiles``: one row per profile_id, sorted by it; columns ``profile_id,
    primary_email, emails`` (a sorted list), one column per rule attribute in the rules'
    order, then ``order_count, lifetime_value`` (int64, minor units), ``last_order_at,
    cart_value, cart_items`` (nullable Int64), ``cart_started_at, last_viewed_product,
    last_email_open_at, last_email_click_at, last_seen_at``.

    ``provenance``: one row per profile and attribute that has a winner: ``profile_id,
    attribute, value, source, source_record_id, observed_at, tier`` (0-based index into
    the attribute's tiers), sorted by (attribute, profile_id).

    ``assignment``: the join of records to profiles, when the caller has it (a full
    rebuild knows every record's profile and the order of all profile ids):
    ``(rows, codes, profile_ids, map_codes)``, the row in ``current`` of each record
    ``record_profiles`` lists, in its order, and that record's profile code; the sorted
    distinct profile ids the codes index (every profile of ``identity_map`` among them);
    the code of each ``identity_map`` row. ``record_profiles`` is then not read.
    """
    current = current.reset_index(drop=True)
    rule_columns = sorted(
        {
            column
            for tiers in rules.attributes.values()
            for tier in tiers
            for column in tier.values()
        }
        & set(current.columns)
    )
    # Arrow's kernels and numpy's sorts release the GIL: the records' alignment with
    # ``record_profiles`` and which values are blank in every column the rules read are
    # worked out on other threads while the profile ids are coded.
    with ThreadPoolExecutor(max_workers=2) as pool:
        blank_checks = {
            column: pool.submit(_non_blank, _arrow_strings(current[column]))
            for column in rule_columns
        }
        if assignment is None:
            aligned = pool.submit(aligned_rows_of, current, record_profiles)
            assignment = _assign(current, record_profiles, identity_map, aligned.result)
        non_blank = {column: future.result() for column, future in blank_checks.items()}
    rows, profile_of_row, profile_ids, map_profiles = assignment
    n_profiles = len(profile_ids)
    observed_all = _micros(current["observed_at"], _I64_MIN)
    observed = observed_all[rows]
    source_rank = _sorted_codes(current["source"])[rows]
    record_ids = _arrow_strings(current["source_record_id"])

    def best_per_profile(candidates: np.ndarray, int_keys: list[np.ndarray]) -> np.ndarray:
        """Positions in ``candidates`` of each profile's smallest (int keys, source, id).

        Source and source_record_id compare as strings; the record id is only looked at
        when everything before it ties.
        """
        return _group_argmin(
            profile_of_row[candidates],
            n_profiles,
            [*int_keys, source_rank[candidates]],
            tiebreak=lambda picked: [_take_objects(record_ids, rows[candidates[picked]])],
        )

    columns: dict[str, pd.Series] = {"profile_id": _str_series(profile_ids)}
    columns["primary_email"], columns["emails"] = _emails(
        current, rows, profile_of_row, n_profiles, identity_map, map_profiles
    )

    class_codes, class_names = _encode(_arrow_strings(current["source_class"]))
    class_of_row = class_codes[rows]
    class_code = {name: code for code, name in enumerate(class_names.to_pylist())}
    present_cache: dict[str, np.ndarray] = {}

    def present(column: str) -> np.ndarray:
        if column not in present_cache:
            if column not in non_blank:
                non_blank[column] = _non_blank(_arrow_strings(current[column]))
            present_cache[column] = non_blank[column][rows]
        return present_cache[column]

    provenance_parts = []
    for attribute, tiers in rules.attributes.items():
        candidates, tier_of, column_of, used_columns = [], [], [], []
        for tier_index, tier in enumerate(tiers):
            for source_class, column in tier.items():
                if source_class not in class_code:
                    continue
                members = np.flatnonzero(
                    (class_of_row == class_code[source_class]) & present(column)
                )
                candidates.append(members)
                tier_of.append(np.full(len(members), tier_index, dtype=np.int64))
                # One number per distinct column: a column several classes read (city,
                # country) is then taken once for all its winners.
                if column not in used_columns:
                    used_columns.append(column)
                column_of.append(
                    np.full(len(members), used_columns.index(column), dtype=np.int64)
                )
        candidate = _concat(candidates)
        tier_of_candidate = _concat(tier_of)
        column_of_candidate = _concat(column_of)
        # The rule's key: (tier index, -observed_at, source, source_record_id).
        winners = best_per_profile(candidate, [tier_of_candidate, ~observed[candidate]])
        win = candidate[winners]
        win_profiles = profile_of_row[win]
        resolved = pa.nulls(n_profiles, type=pa.large_string())
        for number in np.flatnonzero(np.bincount(column_of_candidate[winners], minlength=1)):
            which = column_of_candidate[winners] == number
            index = np.full(n_profiles, -1, dtype=np.int64)
            index[win_profiles[which]] = rows[win[which]]
            resolved = pc.coalesce(
                resolved, _take_nullable(_arrow_strings(current[used_columns[number]]), index)
            )
        columns[attribute] = _str_series(resolved)
        provenance_parts.append(
            (attribute, win_profiles, resolved, rows[win], tier_of_candidate[winners])
        )

    columns.update(
        _aggregates(current, rows, profile_of_row, n_profiles, observed, best_per_profile)
    )
    resolved_profiles = pd.DataFrame(columns)[profile_columns(rules)]
    provenance = _provenance(current, provenance_parts, profile_ids, observed_all)
    return resolved_profiles, provenance


def _assign(
    current: pd.DataFrame,
    record_profiles: pd.DataFrame,
    identity_map: pd.DataFrame | None,
    aligned_rows: Callable[[], np.ndarray | None] | None = None,
) -> tuple[np.ndarray, np.ndarray, pa.Array, np.ndarray | None]:
    """Join records to profiles.

    Returns, for each assigned record, its row in ``current`` and its profile code; the
    sorted profile ids (a code indexes them); and the profile code of every row of
    ``identity_map`` (None without one). Every profile of ``identity_map`` is included,
    even one that owns no record.
    """
    record_ids = _arrow_strings(record_profiles["profile_id"])
    map_ids = None if identity_map is None else _arrow_strings(identity_map["profile_id"])
    coded = _profile_codes_from_numbers(record_ids, map_ids)
    if coded is None:
        coded = _profile_codes_from_strings(record_ids, map_ids)
    record_codes, map_codes, profile_ids = coded
    # ``aligned_rows``: the same as ``aligned_rows_of(current, record_profiles)``, computed
    # by the caller on another thread while the codes above were worked out.
    position = (
        aligned_rows() if aligned_rows is not None else aligned_rows_of(current, record_profiles)
    )
    if position is None:
        position = (
            pc.index_in(record_keys(record_profiles), value_set=record_keys(current))
            .fill_null(-1)
            .to_numpy(zero_copy_only=False)
            .astype(np.int64)
        )
    found = (position >= 0) & (record_codes >= 0)
    return position[found], record_codes[found], profile_ids, map_codes


def _profile_codes_from_numbers(
    record_ids: pa.Array, map_ids: pa.Array | None
) -> tuple[np.ndarray, np.ndarray | None, pa.Array] | None:
    """Profile codes without hashing strings: ``p_`` + 16 hex digits read as a uint64.

    The numbers sort like the id strings. Returns None if any id has another shape.
    """
    record_numbers = profile_numbers_arrow(record_ids)
    map_numbers = None if map_ids is None else profile_numbers_arrow(map_ids)
    if record_numbers is None or (map_ids is not None and map_numbers is None):
        return None
    parts = [record_numbers] if map_numbers is None else [record_numbers, map_numbers]
    universe = np.sort(np.concatenate(parts))
    if len(universe) > 1:
        universe = universe[np.concatenate([[True], universe[1:] != universe[:-1]])]
    codes = [positions_in(universe, part) for part in parts]
    profile_ids = profile_ids_of_numbers(universe)
    return codes[0], (codes[1] if map_numbers is not None else None), profile_ids


def profile_ids_of_numbers(numbers: np.ndarray) -> pa.Array:
    """The inverse of ``profile_numbers_arrow``: ``p_`` + 16 hex digits of each number."""
    numbers = np.asarray(numbers, dtype=np.uint64)
    text = np.empty((len(numbers), 18), dtype=np.uint8)
    text[:, 0], text[:, 1] = ord("p"), ord("_")
    digits = numbers.astype(">u8").view(np.uint8).reshape(-1, 8)
    hex_digits = np.frombuffer(b"0123456789abcdef", dtype=np.uint8)
    text[:, 2::2] = hex_digits[digits >> 4]
    text[:, 3::2] = hex_digits[digits & 15]
    return pa.LargeStringArray.from_buffers(
        len(numbers),
        pa.py_buffer(np.arange(len(numbers) + 1, dtype=np.int64) * 18),
        pa.py_buffer(text.tobytes()),
    )


def positions_in(universe: np.ndarray, needles: np.ndarray) -> np.ndarray:
    """``np.searchsorted(universe, needles)`` for a sorted, distinct ``universe`` that
    holds every needle.

    Profile numbers are sha256 prefixes, spread evenly over 64 bits, so their top bits
    say almost exactly where each one sits: start at its bucket's first element and step
    to it (rarely more than a step or two). A binary search over a million numbers per
    record costs several times more. Uneven numbers fall back to the binary search.
    """
    n = len(universe)
    if n == 0 or len(needles) == 0:
        return np.searchsorted(universe, needles).astype(np.int64)
    bits = min(n.bit_length() + 1, 26)
    shift = np.uint64(64 - bits)
    counts = np.bincount((universe >> shift).astype(np.int64), minlength=1 << bits)
    if counts.max() > 64:
        return np.searchsorted(universe, needles).astype(np.int64)
    start = np.zeros(len(counts), dtype=np.int64)
    np.cumsum(counts[:-1], out=start[1:])
    position = start[(needles >> shift).astype(np.int64)]
    pending = np.flatnonzero(universe[np.minimum(position, n - 1)] != needles)
    for _ in range(int(counts.max())):
        if len(pending) == 0:
            break
        position[pending] += 1
        pending = pending[universe[np.minimum(position[pending], n - 1)] != needles[pending]]
    if len(pending):  # a needle outside the universe: the caller broke the contract
        raise ValueError("profile number not found in the universe of profile ids")
    return position


def profile_numbers_arrow(ids: pa.Array) -> np.ndarray | None:
    """``p_`` + 16 lower-case hex digits -> uint64, or None if any id is not like that."""
    if ids.null_count:
        return None
    n = len(ids)
    if n == 0:
        return np.empty(0, dtype=np.uint64)
    buffers = ids.buffers()
    offsets = np.frombuffer(buffers[1], dtype=np.int64, count=n + 1 + ids.offset)[ids.offset:]
    if not (np.diff(offsets) == 18).all():
        return None
    data = np.frombuffer(buffers[2], dtype=np.uint8)[offsets[0] : offsets[-1]].reshape(n, 18)
    if not ((data[:, 0] == ord("p")) & (data[:, 1] == ord("_"))).all():
        return None
    nibble = np.full(256, 255, dtype=np.uint8)
    nibble[np.frombuffer(b"0123456789", dtype=np.uint8)] = np.arange(10)
    nibble[np.frombuffer(b"abcdef", dtype=np.uint8)] = np.arange(10, 16)
    values = nibble[data[:, 2:]]
    if (values == 255).any():
        return None
    packed = (values[:, 0::2] << 4) | values[:, 1::2]
    return packed.reshape(-1).view(">u8").astype(np.uint64)


def _profile_codes_from_strings(
    record_ids: pa.Array, map_ids: pa.Array | None
) -> tuple[np.ndarray, np.ndarray | None, pa.Array]:
    record_codes, record_uniques = _sorted_unique_codes(record_ids)
    if map_ids is None:
        return record_codes, None, record_uniques
    map_codes, map_uniques = _sorted_unique_codes(map_ids)
    profile_ids, (record_to_all, map_to_all) = _sorted_union(record_uniques, map_uniques)
    record_codes = np.where(record_codes >= 0, record_to_all[record_codes], -1)
    map_codes = np.where(map_codes >= 0, map_to_all[map_codes], -1)
    return record_codes, map_codes, profile_ids


def _emails(
    current: pd.DataFrame,
    rows: np.ndarray,
    profile_of_row: np.ndarray,
    n_profiles: int,
    identity_map: pd.DataFrame | None,
    map_profiles: np.ndarray | None,
) -> tuple[pd.Series, pd.Series]:
    if identity_map is not None:
        is_email = pc.equal(_arrow_strings(identity_map["identifier_type"]), "email")
        selected = np.flatnonzero(
            is_email.fill_null(False).to_numpy(zero_copy_only=False) & (map_profiles >= 0)
        )
        profile = map_profiles[selected]
        values = _arrow_strings(identity_map["identifier_value"]).take(pa.array(selected))
        first_seen = _micros(identity_map["first_seen"], _I64_MAX)[selected]
    else:
        emails = _arrow_strings(current["email"]).take(pa.array(rows))
        codes, uniques = normalised_codes("email", emails)
        has = codes >= 0
        width = np.int64(max(len(uniques), 1))
        pair_codes, pairs = _encode(pa.array(profile_of_row[has] * width + codes[has]))
        pairs = pairs.to_numpy()
        first_seen = np.full(len(pairs), _I64_MAX, dtype=np.int64)
        observed = _micros(current["observed_at"], _I64_MAX)[rows][has]
        np.minimum.at(first_seen, pair_codes, observed)
        profile = pairs // width
        values = uniques.take(pa.array(pairs % width))

    winners = _group_argmin(
        profile, n_profiles, [first_seen], tiebreak=lambda picked: [_take_objects(values, picked)]
    )
    index = np.full(n_profiles, -1, dtype=np.int64)
    index[profile[winners]] = winners
    primary = _take_nullable(values, index)

    order = _canonical_order([profile], [values])
    offsets = np.zeros(n_profiles + 1, dtype=np.int64)
    offsets[1:] = np.cumsum(np.bincount(profile, minlength=n_profiles))
    lists = pa.LargeListArray.from_arrays(
        pa.array(offsets), values.take(pa.array(order)).cast(pa.string())
    )
    return _str_series(primary), pd.Series(lists.to_pylist(), dtype=object)


def _aggregates(
    current: pd.DataFrame,
    rows: np.ndarray,
    profile_of_row: np.ndarray,
    n_profiles: int,
    observed: np.ndarray,
    best_per_profile: Callable[[np.ndarray, list[np.ndarray]], np.ndarray],
) -> dict[str, pd.Series]:
    is_event = _equals(current["record_kind"], "event")[rows]
    event_codes, event_names = _encode(_arrow_strings(current["event_type"]))
    event_code = {name: code for code, name in enumerate(event_names.to_pylist())}
    event_type = np.where(is_event, event_codes[rows], -1)

    def of_type(name: str) -> np.ndarray:
        return event_type == event_code.get(name, -2)

    is_shop = _equals(current["source"], "shop")[rows]

    def latest(mask: np.ndarray) -> np.ndarray:
        """Latest observed_at per profile among the masked rows (I64_MIN if none)."""
        out = np.full(n_profiles, _I64_MIN, dtype=np.int64)
        np.maximum.at(out, profile_of_row[mask], observed[mask])
        return out

    # Orders: Shopify topics only, once per (shop, order_id).
    has_order_id = _non_blank(_arrow_strings(current["order_id"]))[rows]
    completed = np.flatnonzero(is_shop & of_type("order_completed") & has_order_id)
    cancelled = np.flatnonzero(is_shop & of_type("order_cancelled") & has_order_id)
    order_group, order_keys = _encode(_order_keys(current, rows[completed]))
    first_delivery = completed[
        _group_argmin(
            order_group,
            len(order_keys),
            [observed[completed]],
            tiebreak=lambda picked: [
                _take_objects(_arrow_strings(current["source_record_id"]), rows[completed[picked]])
            ],
        )
    ]
    was_cancelled = pc.is_in(
        _order_keys(current, rows[first_delivery]),
        value_set=_order_keys(current, rows[cancelled]),
    ).to_numpy(zero_copy_only=False)
    counted = first_delivery[~was_cancelled]
    counted_profiles = profile_of_row[counted]
    order_count = np.bincount(counted_profiles, minlength=n_profiles).astype(np.int64)
    totals = pd.array(current["order_total_minor"].take(rows[counted]), dtype="Int64")
    lifetime_value = np.zeros(n_profiles, dtype=np.int64)
    np.add.at(lifetime_value, counted_profiles, totals.fillna(0).to_numpy(dtype=np.int64))
    is_counted = np.zeros(len(rows), dtype=bool)
    is_counted[counted] = True

    # Open cart: the latest checkout strictly after the latest completed order.
    last_completed = latest(is_shop & of_type("order_completed"))
    checkouts = np.flatnonzero(is_shop & of_type("checkout_started"))
    checkouts = checkouts[observed[checkouts] > last_completed[profile_of_row[checkouts]]]
    cart = checkouts[best_per_profile(checkouts, [~observed[checkouts]])]
    cart_rows, cart_profiles = rows[cart], profile_of_row[cart]
    cart_started = np.full(n_profiles, _I64_MIN, dtype=np.int64)
    cart_started[cart_profiles] = observed[cart]

    has_product = _non_blank(_arrow_strings(current["product_id"]))[rows]
    views = np.flatnonzero(of_type("product_viewed") & has_product)
    viewed = views[best_per_profile(views, [~observed[views]])]
    viewed_index = np.full(n_profiles, -1, dtype=np.int64)
    viewed_index[profile_of_row[viewed]] = rows[viewed]

    return {
        "order_count": pd.Series(order_count),
        "lifetime_value": pd.Series(lifetime_value),
        "last_order_at": _stamps(latest(is_counted), _I64_MIN),
        "cart_value": _nullable_ints(
            current["cart_value_minor"], cart_rows, cart_profiles, n_profiles
        ),
        "cart_items": _nullable_ints(current["cart_items"], cart_rows, cart_profiles, n_profiles),
        "cart_started_at": _stamps(cart_started, _I64_MIN),
        "last_viewed_product": _str_series(
            _take_nullable(_arrow_strings(current["product_id"]), viewed_index)
        ),
        "last_email_open_at": _stamps(latest(of_type("email_opened")), _I64_MIN),
        "last_email_click_at": _stamps(latest(of_type("email_clicked")), _I64_MIN),
        "last_seen_at": _stamps(latest(is_event), _I64_MIN),
    }


def _provenance(
    current: pd.DataFrame,
    parts: list[tuple[str, np.ndarray, pa.Array, np.ndarray, np.ndarray]],
    profile_ids: pa.Array,
    observed_all: np.ndarray,
) -> pd.DataFrame:
    """Provenance rows sorted by (attribute, profile_id).

    Each part already lists its winners in profile order, so sorting the parts by
    attribute is all the sorting there is.
    """
    parts = sorted(parts, key=lambda part: part[0])
    names = pa.array([part[0] for part in parts], type=pa.large_string())
    name_index, profiles, current_rows, tiers, values = [], [], [], [], []
    for number, (_, win_profiles, resolved, win_rows, win_tiers) in enumerate(parts):
        name_index.append(np.full(len(win_profiles), number, dtype=np.int64))
        profiles.append(win_profiles)
        current_rows.append(win_rows)
        tiers.append(win_tiers)
        values.append(resolved.take(pa.array(win_profiles, type=pa.int64())))
    source_rows = _concat(current_rows)
    taken = pa.array(source_rows, type=pa.int64())
    record_ids = _arrow_strings(current["source_record_id"])
    return pd.DataFrame(
        {
            "profile_id": _str_series(_take_fixed_width(profile_ids, _concat(profiles))),
            "attribute": _str_series(names.take(pa.array(_concat(name_index)))),
            "value": _str_series(
                pa.concat_arrays(values) if values else pa.array([], type=pa.large_string())
            ),
            "source": _str_series(_take_low_cardinality(current["source"], source_rows)),
            "source_record_id": _str_series(record_ids.take(taken)),
            "observed_at": _stamps(observed_all[source_rows], _I64_MIN),
            "tier": pd.Series(_concat(tiers), dtype=np.int64),
        }
    )


def aligned_rows_of(current: pd.DataFrame, record_profiles: pd.DataFrame) -> np.ndarray | None:
    """Rows of ``current`` that ``record_profiles`` lists, found by position if possible.

    ``record_profiles`` lists the records that carry an identifier, in ``record_order``.
    Sorting the records of ``current`` that carry any identifier value the same way and
    comparing keys costs far less than hashing ten million keys. When the keys do not
    line up (a record whose identifiers are all blocked values, a source outside
    ``SOURCES``, or a ``record_profiles`` from another state) this returns None and the
    caller joins on the keys.
    """
    candidates = np.zeros(len(current), dtype=bool)
    for kind in IDENTIFIER_TYPES:
        candidates |= current[kind].notna().to_numpy(dtype=bool)
    rows = np.flatnonzero(candidates)
    if len(rows) != len(record_profiles):
        return None
    if len(rows) == 0:
        return rows
    rows = rows[record_order(current, rows)]
    sources = pa.array(SOURCES, type=pa.large_string())
    current_sources = pc.index_in(_arrow_strings(current["source"]), value_set=sources)
    listed_sources = pc.index_in(_arrow_strings(record_profiles["source"]), value_set=sources)
    current_codes = current_sources.fill_null(-1).to_numpy(zero_copy_only=False)[rows]
    listed_codes = listed_sources.fill_null(-2).to_numpy(zero_copy_only=False)
    if not np.array_equal(current_codes, listed_codes):
        return None
    same = pc.equal(
        _arrow_strings(current["source_record_id"]).take(pa.array(rows, type=pa.int64())),
        _arrow_strings(record_profiles["source_record_id"]),
    )
    if not pc.all(same.fill_null(False)).as_py():
        return None
    return rows


def _sorted_unique_codes(array: pa.Array) -> tuple[np.ndarray, pa.Array]:
    """Codes into the sorted distinct values (-1 for null).

    A column that is already sorted (record_profiles and identity_map are sorted by
    profile_id) is coded by comparing neighbours, without hashing a single string.
    """
    n = len(array)
    if n == 0:
        return np.empty(0, dtype=np.int64), array
    if array.null_count == 0 and (
        n == 1 or pc.all(pc.less_equal(array[:-1], array[1:])).as_py()
    ):
        starts = np.ones(n, dtype=bool)
        if n > 1:
            starts[1:] = pc.not_equal(array[1:], array[:-1]).to_numpy(zero_copy_only=False)
        return np.cumsum(starts) - 1, array.filter(pa.array(starts))
    codes, uniques = _encode(array)
    order = pc.sort_indices(uniques).to_numpy()
    rank = np.empty(len(uniques) + 1, dtype=np.int64)
    rank[order] = np.arange(len(uniques))
    rank[-1] = -1
    return rank[codes], uniques.take(pa.array(order))


def _sorted_union(
    first: pa.Array, second: pa.Array
) -> tuple[pa.Array, tuple[np.ndarray, np.ndarray]]:
    """Sorted union of two sorted distinct arrays, and where each element went."""
    position = pc.index_in(first, value_set=second)
    if position.null_count == 0:
        return second, (
            position.to_numpy(zero_copy_only=False).astype(np.int64),
            np.arange(len(second), dtype=np.int64),
        )
    union = pc.unique(pa.concat_arrays([first, second]))
    union = union.take(pc.sort_indices(union))
    return union, tuple(
        pc.index_in(part, value_set=union).to_numpy(zero_copy_only=False).astype(np.int64)
        for part in (first, second)
    )


def _order_keys(current: pd.DataFrame, rows: np.ndarray) -> pa.Array:
    taken = pa.array(rows, type=pa.int64())
    return pc.binary_join_element_wise(
        _arrow_strings(current["shop"]).take(taken).fill_null(""),
        _arrow_strings(current["order_id"]).take(taken),
        pa.scalar("\x1f", pa.large_string()),
    )


def _non_blank(array: pa.Array) -> np.ndarray:
    """True where the value is present and not empty or whitespace only."""
    blank = pc.or_(pc.equal(pc.binary_length(array), 0), pc.utf8_is_space(array))
    return pc.and_(pc.is_valid(array), pc.invert(blank)).fill_null(False).to_numpy(
        zero_copy_only=False
    )


def _equals(column: pd.Series, value: str) -> np.ndarray:
    return pc.equal(_arrow_strings(column), value).fill_null(False).to_numpy(zero_copy_only=False)


def _take_fixed_width(array: pa.Array, index: np.ndarray) -> pa.Array:
    """``array.take(index)`` for strings; ids that all have one width (profile ids) are
    gathered as fixed-size rows by numpy, several times faster than Arrow's take."""
    array = _arrow_strings(array)
    n = len(array)
    if n == 0 or array.null_count:
        return array.take(pa.array(index, type=pa.int64()))
    buffers = array.buffers()
    offsets = np.frombuffer(buffers[1], dtype=np.int64, count=n + 1 + array.offset)[array.offset:]
    width = int(offsets[1] - offsets[0])
    if width == 0 or not (np.diff(offsets) == width).all():
        return array.take(pa.array(index, type=pa.int64()))
    data = np.frombuffer(buffers[2], dtype=np.uint8)[offsets[0] : offsets[-1]].reshape(n, width)
    return _id_strings(data, index)


def _take_nullable(array: pa.Array, index: np.ndarray) -> pa.Array:
    """array[index] with null where index is -1."""
    return array.take(pa.array(index, type=pa.int64(), mask=index < 0))


def _nullable_ints(
    column: pd.Series, source_rows: np.ndarray, profiles: np.ndarray, n_profiles: int
) -> pd.Series:
    taken = pd.array(column.take(source_rows), dtype="Int64")
    data = np.zeros(n_profiles, dtype=np.int64)
    mask = np.ones(n_profiles, dtype=bool)
    data[profiles] = taken.fillna(0).to_numpy(dtype=np.int64)
    mask[profiles] = taken.isna()
    return pd.Series(pd.arrays.IntegerArray(data, mask))


def _concat(parts: list[np.ndarray]) -> np.ndarray:
    return np.concatenate(parts) if parts else np.empty(0, dtype=np.int64)
