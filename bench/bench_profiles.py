"""The profile step on its production path: the profile store applying staged batches.

- Incremental: a micro-batch of 10k new records (new versions of existing contacts and
  members, events of known people, a few new people) applied to a store of about 100k
  profiles and to one of about 1M. Step wall time, reading the batch and committing the
  outputs and ledger included. Target (PRODUCT.md section 10): ≤ 3 s at 1M, and the 1M
  figure within 1.5× of the 100k one (the cost follows the batch, not the table).
- Full rebuild: every staged record (about 10M versions making about 1M profiles at full
  size) into a new store file. Target ≤ 60 s, peak memory ≤ 4 GB.

The history is ``bench_rebuild_core``'s synthetic generator, written as a lake; the
stages run in a fresh child process so its peak RSS is the step's alone.
"""

from __future__ import annotations

import multiprocessing
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from bench.bench_rebuild_core import _peak_rss_mb, write_history
from bench.common import Figure
from personalization_pipeline.core import canonical
from personalization_pipeline.resources.lake import Lake

SIZES = {"small": (8_000, 16_000), "full": (80_000, 800_000)}  # identified people: (small store, large store)
BATCH = {"small": 2_000, "full": 10_000}
REPEATS = 3
_VERSION = 1


def micro_batch(root: Path, size: int, seed: int) -> dict[str, pa.Table]:
    """A realistic micro-batch drawn from the history's own people: half new versions of
    existing contacts and members (a changed city or status, 30 s after the latest), half
    new web and shop events of known people, and about 2% brand-new visitors."""
    rng = np.random.default_rng(seed)
    out: dict[str, pa.Table] = {}
    now = np.datetime64("2026-11-28T12:00:00", "us").astype(np.int64) + seed * 60_000_000
    for source, share in (("crm", 0.3), ("esp", 0.2), ("web", 0.4), ("shop", 0.1)):
        files = sorted((root / "staged" / source).glob("history-*.parquet"))
        table = pq.read_table(files[int(rng.integers(0, len(files)))], schema=canonical.CANONICAL_SCHEMA)
        n = int(size * share)
        picked = table.take(pa.array(rng.integers(0, table.num_rows, n)))
        stamps = pa.array((now + rng.integers(0, 30_000_000, n)).astype("M8[us]"), pa.timestamp("us", tz="UTC"))
        picked = picked.set_column(picked.schema.get_field_index("observed_at"), "observed_at", stamps)
        picked = picked.set_column(picked.schema.get_field_index("received_at"), "received_at", stamps)
        picked = picked.set_column(
            picked.schema.get_field_index("is_deleted"), "is_deleted", pa.array(np.zeros(n, dtype=bool))
        )
        if source in ("web", "shop"):  # new events: new delivery ids
            ids = pc.binary_join_element_wise(f"bench{seed}-", pa.array(np.arange(n)).cast(pa.string()), "")
            picked = picked.set_column(picked.schema.get_field_index("source_record_id"), "source_record_id", ids)
        if source == "web":  # a few brand-new anonymous visitors
            fresh = rng.random(n) < 0.05
            anon = pc.if_else(
                pa.array(fresh),
                pc.binary_join_element_wise(f"new{seed}-", pa.array(np.arange(n)).cast(pa.string()), ""),
                picked.column("anonymous_id"),
            )
            picked = picked.set_column(picked.schema.get_field_index("anonymous_id"), "anonymous_id", anon)
        if source == "crm":
            city = pa.array(rng.choice(["Oslo", "Lyon", None], n).tolist(), pa.string())
            picked = picked.set_column(picked.schema.get_field_index("city"), "city", city)
        out[source] = picked
    return out


def _child(task: str, lake_root: str, store_root: str, batch: int, queue) -> None:
    try:
        queue.put(_run(task, lake_root, store_root, batch))
    except BaseException as exc:  # report, do not hang the parent
        queue.put({"error": repr(exc)})


def _run(task: str, lake_root: str, store_root: str, batch: int) -> dict:
    from personalization_pipeline.assets.profiles import LIMITS_FILE, RULES_FILE
    from personalization_pipeline.core.identity import IdentityLimits
    from personalization_pipeline.core.rules import load_conflict_rules
    from personalization_pipeline.resources.lake import Lake
    from personalization_pipeline.resources.profile_store import ProfileStore

    lake = Lake(Path(lake_root))
    store = ProfileStore(
        Path(store_root), load_conflict_rules(RULES_FILE), IdentityLimits.from_yaml(LIMITS_FILE), "bench"
    )
    if task == "rebuild":
        started = time.perf_counter()
        report = store.rebuild(lake)
        return {
            "seconds": time.perf_counter() - started,
            "peak_rss_mb": _peak_rss_mb(),
            "staged": report.rows_read,
            "profiles": report.totals.get("profiles", 0),
            "current": report.records_recomputed,
            "stages": report.stages,
        }
    times, touched, recomputed = [], [], []
    for seed in range(1, REPEATS + 1):
        for source, table in micro_batch(Path(lake_root), batch, seed).items():
            lake.write_staged(source, f"bench-{seed}", canonical.to_frame(table.to_pandas()))
        started = time.perf_counter()
        report = store.apply(lake)
        times.append(time.perf_counter() - started)
        touched.append(report.clusters_touched)
        recomputed.append(report.records_recomputed)
    return {
        "seconds": statistics.median(times),
        "all": times,
        "clusters_touched": int(statistics.median(touched)),
        "records_recomputed": int(statistics.median(recomputed)),
        "profiles": store.counts()["profiles"],
        "peak_rss_mb": _peak_rss_mb(),
    }


def _in_child(task: str, lake_root: Path, store_root: Path, batch: int = 0) -> dict:
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    child = context.Process(target=_child, args=(task, str(lake_root), str(store_root), batch, queue))
    child.start()
    result = queue.get()
    child.join()
    if "error" in result:
        raise RuntimeError(f"bench_profiles {task} failed: {result['error']}")
    return result


def _lake(people: int) -> Path:
    cache = Path(tempfile.gettempdir()) / f"pp_bench_profiles_v{_VERSION}_{people}"
    if not (cache / "done").exists():
        shutil.rmtree(cache, ignore_errors=True)
        write_history(cache / "lake", people, prefix="history-")
        (cache / "done").write_text("ok\n")
    return cache


def run(size: str) -> list[Figure]:
    small_people, large_people = SIZES[size]
    batch = BATCH[size]
    figures: list[Figure] = []
    results = {}
    for label, people in (("small", small_people), ("large", large_people)):
        cache = _lake(people)
        work = Path(tempfile.mkdtemp(prefix="pp_bench_profiles_"))
        try:
            lake_root = work / "lake"
            shutil.copytree(cache / "lake", lake_root)
            Lake(lake_root).register_unlisted()  # the staging steps register batches as they write them
            rebuild = _in_child("rebuild", lake_root, work / "store")
            incremental = _in_child("incremental", lake_root, work / "store", batch)
        finally:
            shutil.rmtree(work, ignore_errors=True)
        results[label] = (rebuild, incremental)

    rebuild, incremental = results["large"]
    small_inc = results["small"][1]
    scale = rebuild["staged"] / 10_000_000
    figures.append(Figure(
        "profiles", f"full rebuild into the store ({rebuild['profiles']:,} profiles)", round(rebuild["seconds"], 2), "s",
        target=round(60.0 * scale, 2), higher_is_better=False,
        note=f"{rebuild['staged']:,} staged versions, {rebuild['current']:,} live records; target 60 s per 10M; "
        + ", ".join(f"{k} {v:.1f}" for k, v in rebuild["stages"].items()),
    ))
    figures.append(Figure(
        "profiles", "full rebuild peak RSS", round(rebuild["peak_rss_mb"] / 1024, 2), "GB", target=4.0,
        higher_is_better=False,
    ))
    for label, (reb, inc) in (("small", results["small"]), ("large", results["large"])):
        figures.append(Figure(
            "profiles", f"incremental: {batch:,} records into {inc['profiles']:,} profiles", round(inc["seconds"], 3),
            "s", target=3.0 if label == "large" else None, higher_is_better=False,
            note=f"median of {REPEATS}: {', '.join(f'{t:.2f}' for t in inc['all'])} s; "
            f"{inc['clusters_touched']:,} clusters, {inc['records_recomputed']:,} records recomputed",
        ))
    figures.append(Figure(
        "profiles", "incremental large ÷ small (cost follows the batch)",
        round(incremental["seconds"] / small_inc["seconds"], 2), "×", target=1.5, higher_is_better=False,
    ))
    return figures
