"""Full rebuild of the pure core: staged history -> current state -> identities -> profiles.

The synthetic staged history has about 10M record versions making about 1M profiles at
full size: CRM contacts and ESP members with several versions each (some cleared fields,
some deleted at the source), Shopify orders (re-delivered, some cancelled), checkouts,
web events from one to three devices per person with logins that link them, ESP
engagement, anonymous-only visitors, and family addresses shared by several people that
break the merge limits. Identifiers sometimes arrive with stray case and whitespace.

Each stage is timed on its own, as the asset runs it: read the staged Parquet files,
``current_state``, ``resolve_identities``, ``build_profiles``, write the five tables.
The stages run in a fresh child process so that its peak RSS is the pipeline's alone,
not the generator's. Target (PRODUCT.md section 10): ≤ 60 s, peak memory ≤ 4 GB.

The generated history is cached in the temp directory (it is a pure function of the
size and the seed), so repeated runs time the pipeline, not the generator.
"""

from __future__ import annotations

import multiprocessing
import resource
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from bench.common import Figure
from personalization_pipeline.core import canonical

SIZES = {"small": 20_000, "full": 800_000}  # identified people; anonymous visitors on top
_GENERATOR_VERSION = 4
_RULES = Path(__file__).resolve().parents[1] / "personalization_pipeline" / "config" / "conflict_rules.yaml"
_START = np.datetime64("2026-01-01T00:00:00", "us").astype(np.int64)
_SPAN = 330 * 86_400 * 1_000_000  # microseconds of history


def _text(prefix: str, numbers: np.ndarray, suffix: str = "") -> pa.Array:
    """prefix + decimal number + suffix for every element, built by Arrow kernels."""
    digits = pa.array(np.asarray(numbers, dtype=np.int64)).cast(pa.string())
    return pc.binary_join_element_wise(prefix, digits, suffix, "")


def _pick(rng: np.random.Generator, choices: list[str], n: int, p: list[float] | None = None) -> pa.Array:
    table = pa.array(choices, type=pa.string())
    return table.take(pa.array(rng.choice(len(choices), size=n, p=p)))


def _blank_some(rng: np.random.Generator, array: pa.Array, share: float) -> pa.Array:
    """Null out a random share of the values (a source that lacks the field)."""
    drop = rng.random(len(array)) < share
    return pc.if_else(pa.array(drop), pa.scalar(None, pa.string()), array)


def _messy(rng: np.random.Generator, array: pa.Array, share: float) -> pa.Array:
    """Upper-case and pad a share of the identifiers: normalisation must undo it."""
    messy = pc.binary_join_element_wise(" ", pc.utf8_upper(array), "  ", "")
    return pc.if_else(pa.array(rng.random(len(array)) < share), messy, array)


def _table(source: str, kind: str, n: int, observed: np.ndarray, record_ids: pa.Array, rng, **columns) -> pa.Table:
    delay = rng.integers(1_000_000, 600_000_000, n)
    data = {
        "source": pa.array([source] * n, type=pa.string()) if n else pa.array([], pa.string()),
        "source_class": pa.array([canonical.SOURCE_CLASS[source]] * n, type=pa.string()),
        "source_record_id": record_ids,
        "observed_at": pa.array(observed.astype("M8[us]"), type=pa.timestamp("us", tz="UTC")),
        "received_at": pa.array((observed + delay).astype("M8[us]"), type=pa.timestamp("us", tz="UTC")),
        "record_kind": pa.array([kind] * n, type=pa.string()),
        "is_deleted": pa.array(np.zeros(n, dtype=bool)),
    }
    data.update(columns)
    arrays = [
        data[field.name].cast(field.type) if field.name in data else pa.nulls(n, field.type)
        for field in canonical.CANONICAL_SCHEMA
    ]
    return pa.Table.from_arrays(arrays, schema=canonical.CANONICAL_SCHEMA)


def synthetic_history(people: int, seed: int = 11) -> list[tuple[str, pa.Table]]:
    """(source, staged history) pairs: about 11 record versions per identified person."""
    rng = np.random.default_rng(seed)
    first_names = ["Ana", "Ben", "Chloé", "Dev", "Eva", "Finn", "Gita", "Hugo", "Ines", "Jon", "Kai", "Lea"]
    last_names = ["Ng", "Smith", "García", "Okafor", "Müller", "Rossi", "Kim", "Dubois", "Silva", "Berg"]
    cities = ["London", "Paris", "Berlin", "Madrid", "Rome", "Lisbon", "Dublin", "Oslo", "Vienna", "Prague"]
    countries = ["GB", "FR", "DE", "ES", "IT", "PT", "IE", "NO", "AT", "CZ"]
    categories = ["shoes", "coats", "bags", "hats", "shirts", "jeans", "socks", "scarves"]

    email_number = np.arange(people)
    shared = rng.random(people) < 0.002  # family and info@ addresses shared by several people
    family = rng.integers(0, max(people // 2000, 1), people)

    def emails(person: np.ndarray) -> pa.Array:
        own = _text("person", email_number[person], "@example.com")
        fam = _text("info@family", family[person], ".net")
        return pc.if_else(pa.array(shared[person]), fam, own)

    def versions(owners: np.ndarray, mean_extra: float) -> tuple[np.ndarray, np.ndarray]:
        """Repeat each owner for 1 + Poisson versions; returns (owner per row, version number)."""
        count = 1 + rng.poisson(mean_extra, len(owners))
        rows = np.repeat(owners, count)
        first = np.cumsum(count) - count
        number = np.arange(len(rows)) - np.repeat(first, count)
        return rows, number

    def stamps(n: int) -> np.ndarray:
        return _START + rng.integers(0, _SPAN, n)

    tables: list[tuple[str, pa.Table]] = []

    # HubSpot contacts: several versions; a later version may clear the city; 1% deleted.
    contact_person = np.flatnonzero(rng.random(people) < 0.7)
    duplicates = contact_person[rng.random(len(contact_person)) < 0.004]  # a second contact
    contact_of = np.concatenate([contact_person, duplicates])
    contact_number = np.arange(len(contact_of))
    row_contact, version = versions(contact_number, 0.8)
    person = contact_of[row_contact]
    n = len(person)
    base = stamps(len(contact_of))
    observed = base[row_contact] + version * rng.integers(3_600_000_000, 30 * 86_400_000_000, n)
    last = np.r_[row_contact[1:] != row_contact[:-1], True]
    deleted = last & (rng.random(n) < 0.01)
    tables.append(("crm", _table(
        "crm", "contact", n, observed, _text("c", row_contact), rng,
        is_deleted=pa.array(deleted),
        crm_id=_text("", 100_000 + row_contact),
        email=_messy(rng, emails(person), 0.03),
        first_name=_pick(rng, first_names, n),
        last_name=_pick(rng, last_names, n),
        city=_blank_some(rng, _pick(rng, cities, n), 0.2),
        country=_pick(rng, countries, n),
        loyalty_tier=_blank_some(rng, _pick(rng, ["bronze", "silver", "gold"], n), 0.4),
        lifecycle_stage=_pick(rng, ["subscriber", "lead", "customer", "evangelist"], n),
    )))

    # Mailchimp members: keyed by subscriber hash, a few versions with status changes.
    member_person = np.flatnonzero(rng.random(people) < 0.75)
    row_member, _ = versions(member_person, 0.5)
    n = len(row_member)
    tables.append(("esp", _table(
        "esp", "member", n, stamps(n), _text("m", row_member), rng,
        email=emails(row_member),
        first_name=_blank_some(rng, _pick(rng, first_names, n), 0.5),
        last_name=_blank_some(rng, _pick(rng, last_names, n), 0.5),
        country=_blank_some(rng, _pick(rng, countries, n), 0.6),
        email_consent=_pick(rng, ["subscribed", "unsubscribed", "cleaned", "pending"], n, [0.8, 0.12, 0.05, 0.03]),
    )))

    # Mailchimp engagement and webhooks.
    engaged = member_person[rng.random(len(member_person)) < 0.5]
    row_engage, _ = versions(engaged, 0.8)
    n = len(row_engage)
    tables.append(("esp", _table(
        "esp", "event", n, stamps(n), _text("e", np.arange(n)), rng,
        event_type=_pick(rng, ["email_opened", "email_clicked", "unsubscribed"], n, [0.75, 0.24, 0.01]),
        email=emails(row_engage),
    )))

    # Shopify: orders (2% re-delivered under a new delivery id, 3% cancelled), checkouts.
    has_account = rng.random(people) < 0.8
    buyers = np.flatnonzero(has_account & (rng.random(people) < 0.7))
    order_person = np.repeat(buyers, 1 + rng.poisson(0.5, len(buyers)))
    n_orders = len(order_person)
    redelivered = np.flatnonzero(rng.random(n_orders) < 0.02)
    order_rows = np.concatenate([np.arange(n_orders), redelivered])
    cancelled = np.flatnonzero(rng.random(n_orders) < 0.03)
    checkout_person = np.repeat(buyers, rng.poisson(1.0, len(buyers)))
    account = np.flatnonzero(has_account)  # customers/update: links customer_id and email
    kinds = (
        ["order_completed"] * len(order_rows)
        + ["order_cancelled"] * len(cancelled)
        + ["checkout_started"] * len(checkout_person)
        + ["profile_updated"] * len(account)
    )
    order_of_row = np.concatenate(
        [order_rows, cancelled, np.full(len(checkout_person) + len(account), -1)]
    )
    person = np.concatenate(
        [order_person[order_rows], order_person[cancelled], checkout_person, account]
    )
    n = len(person)
    order_time = stamps(n_orders)
    has_order = order_of_row >= 0
    later = np.zeros(n, dtype=np.int64)
    later[len(order_rows) : len(order_rows) + len(cancelled)] = 86_400_000_000  # cancelled next day
    observed = np.where(has_order, order_time[np.maximum(order_of_row, 0)] + later, stamps(n))
    is_checkout = np.zeros(n, dtype=bool)
    is_checkout[len(order_rows) + len(cancelled) : len(order_rows) + len(cancelled) + len(checkout_person)] = True
    tables.append(("shop", _table(
        "shop", "event", n, observed, _text("d", np.arange(n)), rng,
        event_type=pa.array(kinds, type=pa.string()),
        customer_id=_text("", 900_000 + person),
        email=_blank_some(rng, _messy(rng, emails(person), 0.03), 0.1),
        first_name=_pick(rng, first_names, n),
        last_name=_pick(rng, last_names, n),
        city=_pick(rng, cities, n),
        country=_pick(rng, countries, n),
        category=pc.if_else(pa.array(has_order), _pick(rng, categories, n), pa.scalar(None, pa.string())),
        shop=pa.array(["main.myshopify.com"] * n, type=pa.string()),
        order_id=pc.if_else(pa.array(has_order), _text("o", np.maximum(order_of_row, 0)), pa.scalar(None, pa.string())),
        order_total_minor=pa.array(np.where(has_order, rng.integers(500, 50_000, n), 0), mask=~has_order),
        currency=pa.array(["EUR"] * n, type=pa.string()),
        cart_value_minor=pa.array(rng.integers(500, 30_000, n), mask=~is_checkout),
        cart_items=pa.array(rng.integers(1, 6, n), mask=~is_checkout),
    )))

    # Web events: one to three devices per person, some events logged in (customer_id);
    # plus anonymous-only visitors who never identify themselves.
    visitors = people // 15
    devices = 1 + rng.binomial(2, 0.3, people + visitors)
    device_owner = np.repeat(np.arange(people + visitors), devices)
    events_per_device = 1 + rng.poisson(3.2, len(device_owner))
    device = np.repeat(np.arange(len(device_owner)), events_per_device)
    person = device_owner[device]
    n = len(device)
    logged_in = (person < people) & np.r_[has_account, np.zeros(visitors, bool)][person] & (rng.random(n) < 0.6)
    kind = rng.choice(3, size=n, p=[0.55, 0.35, 0.10])
    event = pa.array(["page_viewed", "product_viewed", "added_to_cart"], type=pa.string()).take(pa.array(kind))
    product = rng.integers(1, 5_000, n)
    is_product = kind > 0
    tables.append(("web", _table(
        "web", "event", n, stamps(n), _text("w", np.arange(n)), rng,
        event_type=event,
        anonymous_id=_text("anon-", device),
        customer_id=pc.if_else(pa.array(logged_in), _text("", 900_000 + person), pa.scalar(None, pa.string())),
        city=_blank_some(rng, _pick(rng, cities, n), 0.3),
        country=_blank_some(rng, _pick(rng, countries, n), 0.3),
        device_type=_pick(rng, ["desktop", "mobile", "tablet"], n, [0.45, 0.5, 0.05]),
        category=pc.if_else(pa.array(is_product), _pick(rng, categories, n), pa.scalar(None, pa.string())),
        product_id=pc.if_else(pa.array(is_product), _text("prod-", product), pa.scalar(None, pa.string())),
    )))
    return tables


def write_history(directory: Path, people: int, prefix: str = "") -> int:
    """Write the staged history as the lake keeps it: several Parquet files per source."""
    rows = 0
    for number, (source, table) in enumerate(synthetic_history(people)):
        chunk = max(len(table) // 4, 1)
        for part, start in enumerate(range(0, len(table), chunk)):
            path = directory / "staged" / source / f"{prefix}{number:02d}-{part:02d}.parquet"
            path.parent.mkdir(parents=True, exist_ok=True)
            pq.write_table(table.slice(start, chunk), path, compression="zstd")
        rows += len(table)
    return rows


def _peak_rss_mb() -> float:
    """This process's peak RSS. VmHWM, not ru_maxrss: Linux carries ru_maxrss over from
    the parent across fork and exec, so it would report the generator's peak."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: kilobytes


def _pipeline(directory: str, out: str) -> dict[str, float]:
    """The rebuild, stage by stage, in the child process; seconds per stage and counts."""
    from personalization_pipeline.core.identity import IdentityLimits, current_state, resolve_identities
    from personalization_pipeline.core.profiles import build_profiles
    from personalization_pipeline.core.rules import load_conflict_rules

    rules = load_conflict_rules(_RULES)
    times: dict[str, float] = {"rss_start_mb": _peak_rss_mb()}
    t0 = time.perf_counter()
    files = sorted(Path(directory).glob("staged/*/*.parquet"))
    tables = [pq.read_table(f, schema=canonical.CANONICAL_SCHEMA) for f in files]
    history = pa.concat_tables(tables).to_pandas(types_mapper={pa.int64(): pd.Int64Dtype()}.get)
    del tables
    t1 = time.perf_counter()
    times["peak_after_read_mb"] = _peak_rss_mb()
    current = current_state(history)
    staged = len(history)
    del history
    t2 = time.perf_counter()
    times["peak_after_current_state_mb"] = _peak_rss_mb()
    result = resolve_identities(current, IdentityLimits())
    t3 = time.perf_counter()
    times["peak_after_resolve_identities_mb"] = _peak_rss_mb()
    profiles, provenance = build_profiles(current, result.record_profiles, rules, identity_map=result.identity_map)
    t4 = time.perf_counter()
    times["peak_after_build_profiles_mb"] = _peak_rss_mb()
    target = Path(out)
    target.mkdir(parents=True, exist_ok=True)
    for name, frame in [
        ("identity_map", result.identity_map),
        ("identity_conflicts", result.conflicts),
        ("record_profiles", result.record_profiles),
        ("profile_attribute_provenance", provenance),
        ("resolved_profiles", profiles),
    ]:
        pq.write_table(pa.Table.from_pandas(frame, preserve_index=False), target / f"{name}.parquet", compression="zstd")
    t5 = time.perf_counter()
    times.update(
        read=t1 - t0, current_state=t2 - t1, resolve_identities=t3 - t2, build_profiles=t4 - t3,
        write=t5 - t4, total=t5 - t0, peak_rss_mb=_peak_rss_mb(), staged=staged,
        current=len(current), profiles=len(profiles), conflicts=len(result.conflicts),
    )
    return times


def _child(directory: str, out: str, queue) -> None:
    queue.put(_pipeline(directory, out))


def run(size: str) -> list[Figure]:
    people = SIZES[size]
    cache = Path(tempfile.gettempdir()) / f"pp_bench_rebuild_core_v{_GENERATOR_VERSION}_{people}"
    if not (cache / "done").exists():
        shutil.rmtree(cache, ignore_errors=True)
        write_history(cache, people)
        (cache / "done").write_text("ok\n")
    out = Path(tempfile.mkdtemp(prefix="pp_bench_rebuild_out_"))
    try:
        context = multiprocessing.get_context("spawn")
        queue = context.Queue()
        child = context.Process(target=_child, args=(str(cache), str(out), queue))
        child.start()
        times = queue.get()
        child.join()
    finally:
        shutil.rmtree(out, ignore_errors=True)

    # Scale the targets to the size run, so the small run's ratio means the same thing.
    scale = times["staged"] / 10_000_000
    counts = (
        f"{times['staged']:,} staged versions → {times['current']:,} current records → "
        f"{times['profiles']:,} profiles, {times['conflicts']:,} rejected edges"
    )
    figures = [
        Figure("rebuild_core", "full rebuild, read → current state → identities → profiles → write",
               round(times["total"], 2), "s", target=round(60.0 * scale, 3), higher_is_better=False,
               note=f"{counts}; target 60 s per 10M staged records"),
        Figure("rebuild_core", "full rebuild peak RSS", round(times["peak_rss_mb"] / 1024, 2), "GB",
               target=4.0, higher_is_better=False,
               note=f"child process, {times['rss_start_mb']:.0f} MB after imports"),
    ]
    for stage in ("read", "current_state", "resolve_identities", "build_profiles", "write"):
        peak = times.get(f"peak_after_{stage}_mb", times["peak_rss_mb"])
        figures.append(
            Figure("rebuild_core", f"stage {stage}", round(times[stage], 2), "s",
                   note=f"peak RSS so far {peak / 1024:.2f} GB")
        )
    return figures
