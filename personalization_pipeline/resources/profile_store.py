"""The profile store: the current state, identity and resolved profiles kept between runs,
so that each run applies only the new staged batches and recomputes only the profiles they
touch (PRODUCT.md sections 5, 6 and 12).

Storage: one SQLite database (WAL) read and written through the ADBC SQLite driver, which
moves Arrow tables in and out without a Python object per value. Why SQLite:

- the cost of an incremental run follows the batch: every lookup it makes (a record's
  stored version, an identifier's cluster, a cluster's records) is a B-tree probe, and
  the overlay's rows are clustered on disk by identity cluster, so a cluster's rows are
  read together (the base's rows, a shard of clusters at a time, by binary search in its
  key arrays). Measured figures are in bench/report.md (``bench_profiles``).
- the ledger of applied inputs and the output tables change in one transaction, so a run
  killed at any point leaves either the old state with the old ledger or the new state
  with the new ledger, never a mix (PRODUCT.md section 12);
- readers in other processes (the push, the UI's metadata, a serving API) read a
  consistent snapshot while a writer works (WAL);
- it is a file next to the lake: nothing more to run.

What a full rebuild computes is the exception: it writes records, the identity map and
the profiles to a base (``resources/record_base.py``: Arrow IPC files and sorted key
arrays next to the database), because SQLite's inserts made them two thirds of the
rebuild's time. The base never changes. An incremental run writes what it changes to the
tables below (the overlay) and marks what those supersede, in its transaction: the keys of
base records in ``base_dead``, and the clusters it recomputed in ``base_dead_clusters``
(their identifiers and profiles in the base are superseded as a whole). A record's current
row is its overlay row, else its base row unless superseded; a cluster's identifiers and
profiles are the overlay's if the cluster is marked, else the base's.

The full rebuild writes a new database file and base and switches ``CURRENT`` to them with
an atomic rename, so readers never see a half-built store. It reads the staged history
twice (the key and identifier columns pick each record's latest version and resolve
identity; then only the live rows are read in full), then builds and writes the profiles
one shard of clusters at a time (``ProfileStore.shard_rows``): clusters holding one order
share a shard, so every shard's profiles are exactly what one pass over everything gives.
A thread gathers shard k + 1 while the main thread builds shard k and a writer thread
writes shard k - 1.

Tables (the overlay; the base holds the same columns for records, identifiers, profiles):
  records      records written since the rebuild (tombstones too), with cluster and profile
  record_index record key -> cluster, for the rows of ``records``
  base_dead    keys of base records superseded since the rebuild
  base_dead_clusters  clusters whose base identifiers and profiles are superseded
  identifiers  the identity map: identifier -> profile, first_seen, by cluster (and by
               identifier key, a 64-bit hash: a collision only adds a cluster)
  conflicts    rejected edges, by cluster
  profiles     resolved_profiles by (cluster, profile_id) (and by profile_id), with its
               identifier count and the provenance of each attribute as columns
               (<attribute>__source, __record, __observed_at, __tier): one row per profile
  changes      every profile_id change (old -> new), when and in which run
  component_sizes  how many profiles have each identifier count (the largest-component check)
  stats        per run: profiles, profiles without email, conflicts, largest component
  ledger       the applied inputs: (source, batch, content_hash, verdict, applied_at, run_id)
  meta         config hash (rules, limits, mapping), format, when built
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import json
import os
import shutil
import sqlite3
import threading
import time
import uuid
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterator, Optional

import adbc_driver_sqlite.dbapi as adbc
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from personalization_pipeline.core import canonical
from personalization_pipeline.core.identity import (
    IdentityLimits,
    IdentityResult,
    profile_id_changes,
    resolve_identities,
)
from personalization_pipeline.core.incremental import (
    NO_CLUSTER,
    assert_keys_name_one_record,
    identifier_hashes,
    identifier_owners,
    key_order,
    latest_versions,
    normalised_identifiers,
    order_keys,
    profile_hashes,
    raw_clusters,
    record_hashes,
)
from personalization_pipeline.core.profiles import (
    PROVENANCE_COLUMNS,
    build_profiles,
    positions_in,
    profile_numbers_arrow,
)
from personalization_pipeline.core.rules import ConflictRules
from personalization_pipeline.resources.record_base import (
    IDENTIFIER_SCHEMA,
    STORE_SCHEMA,
    BaseTable,
    StoreBase,
    StoreBaseWriter,
    base_directory,
)

FORMAT = 3
_TS = pa.timestamp("us", tz="UTC")
_IDENTITY_COLUMNS = ["source", "source_record_id", "observed_at", *canonical.IDENTIFIER_TYPES]
"""The columns identity resolution reads."""
_BIG = {"adbc.sqlite.query.batch_rows": "1000000000"}
"""Read a whole result as one batch: the driver infers each column's type from the rows of
a batch, so smaller batches could disagree (a column null in the first rows)."""

_DDL = [
    "create table meta (key text primary key, value text not null)",
    "create table ledger (source text not null, batch text not null, verdict text not null, content_hash text not null,"
    " rows integer not null, reason text, applied_at text not null, run_id text,"
    " primary key (source, batch, verdict)) without rowid",
    # The overlay: the base's columns (STORE_SCHEMA), so rows of either read as one table.
    "create table records ("
    + ", ".join(
        f"{f.name} {'text' if pa.types.is_string(f.type) else 'integer'}{' not null' if f.name in ('cluster', 'rkey') else ''}"
        for f in STORE_SCHEMA
    )
    + ", primary key (cluster, rkey)) without rowid",
    "create table record_index (rkey integer primary key, cluster integer not null) without rowid",
    "create table identifiers (cluster integer not null, identifier_type text not null, identifier_value text not null,"
    " ikey integer not null, profile_id text not null, first_seen integer,"
    " primary key (cluster, identifier_type, identifier_value)) without rowid",
    "create table base_dead (rkey integer primary key) without rowid",
    "create table base_dead_clusters (cluster integer primary key) without rowid",
    "create table conflicts (cluster integer not null, from_type text, from_value text, to_type text,"
    " to_value text, reason text, trust_source text, first_seen integer)",
    "create table changes (changed_at text not null, run_id text, old_profile_id text, new_profile_id text)",
    "create table component_sizes (size integer primary key, profiles integer not null) without rowid",
    "create table stats (at text not null, run_id text, mode text, profiles integer, without_email integer,"
    " conflicts integer, largest_component integer)",
]
_INDEXES = [
    "create index records_okey on records (okey) where okey is not null",
    "create index identifiers_ikey on identifiers (ikey)",
    "create index conflicts_cluster on conflicts (cluster)",
]
"""Few on purpose: an incremental run's cost is mostly the B-tree pages it reads and dirties,
so the overlay tables are clustered by identity cluster (a cluster's records, identifiers
and profiles sit together and are read and rewritten as one range), with one index each
for the other lookups (records by order key, identifiers by key, profiles by id: made
with the profiles table, whose columns follow the rules)."""


class StoreError(RuntimeError):
    """The store cannot do what was asked; the message says why and what to run."""


@dataclass
class ApplyReport:
    """What one apply (or rebuild) did; shown as metadata on the materialisation."""

    mode: str  # incremental | rebuild | nothing-new
    batches_applied: int = 0
    batches_held: list[str] = field(default_factory=list)
    rows_read: int = 0
    versions_changed: int = 0
    clusters_touched: int = 0
    records_recomputed: int = 0
    records_written: int = 0
    profiles_written: int = 0
    profile_id_changes: int = 0
    largest_component: int = 0
    seconds: float = 0.0
    reason: str = ""
    sample_profile_id: Optional[str] = None
    totals: dict = field(default_factory=dict)
    stages: dict = field(default_factory=dict)

    def lap(self, stage: str, since: float) -> float:
        now = time.perf_counter()
        self.stages[stage] = round(self.stages.get(stage, 0.0) + now - since, 3)
        return now

    def as_metadata(self) -> dict:
        return {
            "mode": self.mode,
            "batches_applied": self.batches_applied,
            "batches_held": len(self.batches_held),
            "rows_read": self.rows_read,
            "versions_changed": self.versions_changed,
            "clusters_touched": self.clusters_touched,
            "records_recomputed": self.records_recomputed,
            "records_written": self.records_written,
            "profiles_written": self.profiles_written,
            "profile_id_changes": self.profile_id_changes,
            "step_seconds": round(self.seconds, 3),
            **({"rebuild_reason": self.reason} if self.reason else {}),
            **{f"seconds_{k}": v for k, v in self.stages.items()},
        }


class ProfileStore:
    """The store under ``directory``; ``rules``, ``limits`` and ``config_digest`` are the
    configuration its tables are built with (a different digest forces a rebuild)."""

    shard_rows = 250_000
    """Live records per shard of a full rebuild. Profiles are built and written one shard of
    clusters at a time, so memory holds the current state once (as Arrow) plus about three
    shards (one being gathered, one built in pandas, one written). 250k keeps a rebuild of
    ten million records under 4 GB; larger shards save a little time per shard."""

    def __init__(self, directory: Path, rules: ConflictRules, limits: IdentityLimits, config_digest: str) -> None:
        self.directory = Path(directory)
        self.rules = rules
        self.limits = limits
        self.digest = config_digest
        self.directory.mkdir(parents=True, exist_ok=True)

    # -- files, connections and the writer lock ------------------------------------------

    def current_path(self) -> Optional[Path]:
        pointer = self.directory / "CURRENT"
        if not pointer.exists():
            return None
        path = self.directory / pointer.read_text().strip()
        return path if path.exists() else None

    @contextlib.contextmanager
    def _writer(self) -> Iterator[None]:
        """One writer at a time, across processes (the run queue also limits profile runs
        to one; this holds even when someone launches one by hand)."""
        with open(self.directory / "writer.lock", "a+") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    @staticmethod
    def _connect(path: Path):
        conn = adbc.connect(str(path), autocommit=True)
        cur = conn.cursor()
        try:
            cur.execute("pragma busy_timeout=60000")  # first: the other pragmas may wait for a lock
            cur.execute("pragma synchronous=normal")
            cur.execute("pragma cache_size=-262144")
            cur.execute("pragma mmap_size=17179869184")
            cur.execute("pragma temp_store=memory")
            # Checkpoints happen when a writer closes (on a background thread), not mid-run.
            cur.execute("pragma wal_autocheckpoint=0")
        except BaseException:
            cur.close()
            conn.close()
            raise
        return conn, cur

    @contextlib.contextmanager
    def reader(self) -> Iterator:
        with self._snapshot() as (cur, _):
            yield cur

    @contextlib.contextmanager
    def _snapshot(self) -> Iterator:
        """(cursor, database path) of the current store: the path names its base. One read
        transaction: every query sees the same commit, so the overlay and what it marks
        superseded in the base always agree, even while a run commits meanwhile."""
        path = self.current_path()
        if path is None:
            raise StoreError("the profile store is empty: run the profile job (or full_rebuild_job) first")
        conn, cur = self._connect(path)
        try:
            cur.execute("begin")
            try:
                yield cur, path
            except BaseException:
                cur.execute("rollback")
                raise
            cur.execute("commit")
        finally:
            cur.close()
            conn.close()

    def meta(self) -> dict[str, str]:
        if self.current_path() is None:
            return {}
        with self.reader() as cur:
            return dict(zip(*_columns(_query(cur, "select key, value from meta"), "key", "value")))

    # -- the ledger ----------------------------------------------------------------------

    def ledger(self) -> pd.DataFrame:
        with self.reader() as cur:
            return _query(cur, "select * from ledger order by source, batch, verdict").to_pandas()

    @staticmethod
    def _pending(manifest: pd.DataFrame, ledger: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
        """(passed batches not applied at their current content hash, failed batches not yet
        recorded at their current hash)."""
        key = ["source", "batch", "verdict", "content_hash"]
        if ledger.empty:
            fresh = manifest
        else:
            merged = manifest.merge(ledger[key].drop_duplicates(), on=key, how="left", indicator=True)
            fresh = merged[merged["_merge"] == "left_only"].drop(columns="_merge")
        return fresh[fresh["verdict"] == "passed"], fresh[fresh["verdict"] == "failed"]

    # -- incremental apply ---------------------------------------------------------------

    def apply(self, lake, run_id: Optional[str] = None) -> ApplyReport:
        """Apply every passed batch not applied yet (at its current content hash); record
        failed batches as held. One transaction: outputs and ledger commit together."""
        with self._writer():
            path = self.current_path()
            stored = self.meta()
            if path is None:
                return self._rebuild(lake, run_id, "no store yet")
            if stored.get("config_hash") != self.digest:
                return self._rebuild(lake, run_id, "configuration changed (rules, limits or mapping)")
            if stored.get("format") != str(FORMAT):
                return self._rebuild(lake, run_id, f"store format {stored.get('format')} -> {FORMAT} (a new version)")
            started = time.perf_counter()
            manifest = lake.batches()
            conn, cur = self._connect(path)
            base = StoreBase(base_directory(path))
            try:
                ledger = _query(cur, "select source, batch, verdict, content_hash from ledger").to_pandas()
                todo, held = self._pending(manifest, ledger)
                report = ApplyReport(mode="incremental" if len(todo) else "nothing-new")
                report.batches_held = held_batches(manifest)
                frames = [lake.read_batch(s, b) for s, b in zip(todo["source"], todo["batch"])]
                tick = report.lap("read_batches", started)
                frames = [f for f in frames if not f.empty]
                new = pd.concat(frames, ignore_index=True) if frames else canonical.empty_frame()
                report.rows_read = len(new)
                report.batches_applied = len(todo)
                cur.execute("begin immediate")
                tick = report.lap("begin", tick)
                try:
                    if not new.empty:
                        self._apply_rows(cur, base, new, report, run_id)
                    tick = time.perf_counter()
                    _append_ledger(cur, pd.concat([todo, held]), run_id)
                    report.totals = _record_stats(cur, report, run_id)
                    tick = report.lap("ledger_and_stats", tick)
                    cur.execute("commit")
                    tick = report.lap("commit", tick)
                except BaseException:
                    cur.execute("rollback")
                    raise
            finally:
                _close_later(conn, cur)
            report.lap("close", tick)
            report.seconds = time.perf_counter() - started
            return report

    def _apply_rows(self, cur, base: StoreBase, new: pd.DataFrame, report: ApplyReport, run_id: Optional[str]) -> None:
        tick = time.perf_counter()
        rkeys = record_hashes(new)
        assert_keys_name_one_record(new, rkeys)
        winners = latest_versions(new, rkeys)
        incoming = new.iloc[winners].reset_index(drop=True)
        incoming_keys = rkeys[winners]

        # The stored version of each incoming record, if any: in the overlay, or in the base.
        _temp_keys(cur, "k", incoming_keys)
        stored_table = _query(
            cur,
            "select r.* from temp.k join record_index i on i.rkey = temp.k.k "
            "join records r on r.cluster = i.cluster and r.rkey = i.rkey",
        )
        records_base = base.records
        stored_table = _with_base(
            stored_table, records_base, _live_base_rows(cur, records_base, records_base.rows_of("rkey", incoming_keys))
        )
        stored, stored_meta = _records_from_store(stored_table)
        tick = report.lap("find_stored_versions", tick)

        both = pd.concat([stored, incoming], ignore_index=True)
        both_keys = np.concatenate([stored_meta["rkey"], incoming_keys])
        assert_keys_name_one_record(both, both_keys)  # a stored record under an incoming key
        picked = latest_versions(both, both_keys)
        changed_rows = picked[picked >= len(stored)] - len(stored)
        if len(changed_rows) == 0:
            return
        changed = incoming.iloc[changed_rows].reset_index(drop=True)
        changed_keys = incoming_keys[changed_rows]
        report.versions_changed = len(changed)

        replaced = np.isin(stored_meta["rkey"], changed_keys)
        touched = set(stored_meta["cluster"][replaced].tolist())
        live_changed = changed[~changed["is_deleted"].fillna(False).to_numpy(dtype=bool)]
        touched |= _identifier_clusters(cur, base.identifiers, live_changed)
        touched.discard(NO_CLUSTER)

        # Every record of the touched clusters, and of clusters that share an order with them.
        tick = report.lap("find_clusters", tick)
        records, records_meta = _fetch_clusters(cur, records_base, touched)
        tick = report.lap("fetch_records", tick)
        order_seen: set[int] = set()
        while True:
            okeys = set(records_meta["okey"].tolist()) | set(order_keys(changed).tolist())
            okeys |= set(stored_meta["okey"][replaced].tolist())
            okeys.discard(NO_CLUSTER)
            okeys -= order_seen
            if not okeys:
                break
            order_seen |= okeys
            wanted = np.fromiter(okeys, dtype=np.int64, count=len(okeys))
            _temp_keys(cur, "o", wanted)
            more = _query(cur, "select distinct cluster from records where okey in (select k from temp.o)")
            in_base = _live_base_rows(cur, records_base, records_base.rows_of("okey", wanted))
            extra = set(more.column("cluster").to_pylist()) | set(records_base.column("cluster", in_base).tolist())
            extra -= touched | {NO_CLUSTER}
            if not extra:
                break
            touched |= extra
            more_records, more_meta = _fetch_clusters(cur, records_base, extra)
            records = pd.concat([records, more_records], ignore_index=True)
            records_meta = {k: np.concatenate([records_meta[k], more_meta[k]]) for k in records_meta}
        report.clusters_touched = len(touched)

        keep = ~np.isin(records_meta["rkey"], changed_keys)
        subset = pd.concat([records[keep], live_changed], ignore_index=True)
        subset_keys = np.concatenate([records_meta["rkey"][keep], record_hashes(live_changed)])
        report.records_recomputed = len(subset)
        tick = report.lap("order_closure", tick)
        result = resolve_identities(subset, self.limits)
        profiles, provenance = build_profiles(subset, result.record_profiles, self.rules, identity_map=result.identity_map)
        clusters = raw_clusters(result)
        lookup = _ProfileLookup(clusters, _sizes(result))
        cluster_of, profile_of, _ = _assignment(len(subset), result, clusters)
        tick = report.lap("recompute", tick)
        assignment = (cluster_of, profile_of.to_numpy(zero_copy_only=False).astype(object))

        # Records: rewrite only rows whose version, cluster or profile changed.
        old_rows = pd.DataFrame(
            {
                "cluster": np.concatenate([records_meta["cluster"], stored_meta["cluster"][replaced]]),
                "rkey": np.concatenate([records_meta["rkey"], stored_meta["rkey"][replaced]]),
                "profile_id": np.concatenate([records_meta["profile_id"], stored_meta["profile_id"][replaced]]),
            }
        ).drop_duplicates(["cluster", "rkey"])
        new_assign = pd.DataFrame({"rkey": subset_keys, "cluster": assignment[0], "profile_id": assignment[1]})
        moved = old_rows.merge(new_assign, on="rkey", how="left", suffixes=("", "_new"))
        gone = (
            moved["rkey"].isin(changed_keys)
            | (moved["cluster"] != moved["cluster_new"])
            | (moved["profile_id"].fillna("") != moved["profile_id_new"].fillna(""))
        )
        gone_keys = moved.loc[gone, "rkey"].to_numpy(np.int64)
        _temp_pairs(cur, "d", moved.loc[gone, "cluster"].to_numpy(np.int64), gone_keys)
        cur.execute("delete from records where (cluster, rkey) in (select c, k from temp.d)")
        # A base row is never rewritten: its key goes to base_dead, and its new version (if
        # any) to the overlay, below.
        _temp_keys(cur, "bd", gone_keys[records_base.contains("rkey", gone_keys)])
        cur.execute("insert or ignore into base_dead (rkey) select k from temp.bd")
        stay = set(moved.loc[~gone, "rkey"].tolist())
        rewrite = ~np.isin(subset_keys, np.fromiter(stay, dtype=np.int64, count=len(stay)))
        dead = changed[changed["is_deleted"].fillna(False).to_numpy(dtype=bool)]
        dead_keys = record_hashes(dead)
        out_frame = pd.concat([subset[rewrite], dead], ignore_index=True)
        out_meta = {
            "cluster": np.concatenate([assignment[0][rewrite], np.full(len(dead), NO_CLUSTER, dtype=np.int64)]),
            "rkey": np.concatenate([subset_keys[rewrite], dead_keys]),
            "profile_id": np.concatenate([assignment[1][rewrite], np.full(len(dead), None, dtype=object)]),
        }
        written = _records_to_store(out_frame, out_meta)
        if written.num_rows:
            cur.adbc_ingest("records", written, mode="append")
            _temp_keys(cur, "ri", out_meta["rkey"])
            cur.execute("delete from record_index where rkey in (select k from temp.ri)")
            cur.adbc_ingest(
                "record_index", pa.table({"rkey": out_meta["rkey"], "cluster": out_meta["cluster"]}), mode="append"
            )
        report.records_written = written.num_rows
        tick = report.lap("write_records", tick)

        # Identity map, conflicts and profiles of the touched clusters: replaced as a whole.
        # The old profiles (the overlay's and the base's not yet superseded) are read by
        # cluster for the counters; the clusters' base rows are then marked superseded.
        touched_keys = np.fromiter(touched, dtype=np.int64, count=len(touched))
        _temp_keys(cur, "t", touched_keys)
        overlay_profiles = _query(
            cur,
            "select p.profile_id, p.cluster, p.size, p.primary_email is null as no_email "
            "from temp.t join profiles p on p.cluster = temp.t.k",
        ).to_pandas()
        rows = _live_cluster_rows(cur, base.profiles, base.profiles.rows_of("cluster", touched_keys))
        in_base = base.profiles.take(rows, ["profile_id", "cluster", "size", "primary_email"])
        old_profiles = pd.concat(
            [
                overlay_profiles.astype({"profile_id": object, "cluster": np.int64, "size": np.int64, "no_email": bool}),
                pd.DataFrame(
                    {
                        "profile_id": in_base.column("profile_id").to_numpy(zero_copy_only=False).astype(object),
                        "cluster": in_base.column("cluster").to_numpy(),
                        "size": in_base.column("size").to_numpy(),
                        "no_email": in_base.column("primary_email").is_null().to_numpy(zero_copy_only=False),
                    }
                ),
            ],
            ignore_index=True,
        )
        for table in ("profiles", "identifiers", "conflicts"):
            cur.execute(f"delete from {table} where cluster in (select k from temp.t)")
        based = base.profiles.contains("cluster", touched_keys) | base.identifiers.contains("cluster", touched_keys)
        _temp_keys(cur, "tb", touched_keys[based])
        cur.execute("insert or ignore into base_dead_clusters (cluster) select k from temp.tb")
        _adjust_counters(cur, old_profiles, sign=-1)
        _write_identity(cur, result, lookup)
        if len(profiles):
            _write_profile_rows(cur, _profile_rows(profiles, provenance, lookup, self.rules.attributes))
        _adjust_counters(cur, _new_counters(profiles, lookup), sign=+1)
        report.profiles_written = len(profiles)
        report.largest_component = int(result.components["size"].max()) if len(result.components) else 0
        report.sample_profile_id = _sample_id(profiles)
        tick = report.lap("write_outputs", tick)

        old_rp = pd.DataFrame(
            {
                "source": np.concatenate([records["source"].to_numpy(object), stored["source"][replaced].to_numpy(object)]),
                "source_record_id": np.concatenate(
                    [records["source_record_id"].to_numpy(object), stored["source_record_id"][replaced].to_numpy(object)]
                ),
                "profile_id": np.concatenate([records_meta["profile_id"], stored_meta["profile_id"][replaced]]),
            }
        )
        old_rp = old_rp[pd.notna(old_rp["profile_id"])].drop_duplicates(["source", "source_record_id"])
        changes = profile_id_changes(old_rp.astype(str), result.record_profiles)
        report.profile_id_changes = len(changes)
        _append_changes(cur, changes, run_id)
        report.lap("profile_id_changes", tick)

    # -- full rebuild --------------------------------------------------------------------

    def rebuild(self, lake, run_id: Optional[str] = None, reason: str = "requested") -> ApplyReport:
        """Recompute everything from staged history into a new database file, then switch
        to it atomically. The ledger of the new store names every batch it read."""
        with self._writer():
            return self._rebuild(lake, run_id, reason)

    def _rebuild(self, lake, run_id: Optional[str], reason: str) -> ApplyReport:
        started = tick = time.perf_counter()
        lake.register_unlisted()
        manifest = lake.batches()
        # Two passes over the staged files, so the whole history is never in memory at once.
        # The first reads the key and identifier columns: they pick each record's latest
        # version and resolve identity. Only then are the live rows read in full, and they
        # stay Arrow (pandas sees one shard at a time, below). Identity's working memory and
        # the live rows are never held at once.
        mapper = {pa.int64(): pd.Int64Dtype(), pa.bool_(): pd.BooleanDtype()}.get
        files = lake.staged_files()
        key_columns = ["source", "source_record_id", "observed_at", "received_at", "is_deleted"]
        key_columns += [c for c in _IDENTITY_COLUMNS + ["event_type", "shop", "order_id"] if c not in key_columns]
        key_schema = pa.schema([canonical.CANONICAL_SCHEMA.field(c) for c in key_columns])
        parts = [pq.read_table(f, columns=key_columns, schema=canonical.CANONICAL_SCHEMA).cast(key_schema) for f in files]
        sizes = np.array([t.num_rows for t in parts], dtype=np.int64)
        starts = np.concatenate([[0], np.cumsum(sizes)])
        keys = (pa.concat_tables(parts) if parts else key_schema.empty_table()).combine_chunks()
        del parts

        def read_rows(rows: np.ndarray) -> pa.Table:
            """Whole canonical rows at global positions, in the order given."""
            order = np.argsort(rows, kind="stable")
            ordered = rows[order]
            file_of = np.searchsorted(starts, ordered, side="right") - 1
            pieces = [
                _read_staged(files[number]).take(pa.array(ordered[file_of == number] - starts[number]))
                for number in np.unique(file_of)
            ]
            taken = pa.concat_tables(pieces) if pieces else canonical.CANONICAL_SCHEMA.empty_table()
            back = np.empty(len(rows), dtype=np.int64)
            back[order] = np.arange(len(rows))
            return taken.take(pa.array(back)).combine_chunks()

        def read_live_and_dead(live_rows: np.ndarray, dead_rows: np.ndarray) -> tuple[pa.Table, pa.Table]:
            """The live rows (sorted positions) with the low-cardinality text columns
            dictionary-encoded, and the tombstones (sorted positions) as canonical rows:
            one pass, each file read once."""
            live_file = np.searchsorted(starts, live_rows, side="right") - 1
            dead_file = np.searchsorted(starts, dead_rows, side="right") - 1
            live_pieces: list[pa.Table] = []
            dead_pieces: list[pa.Table] = []
            for number in np.unique(np.concatenate([live_file, dead_file])):
                table = _read_staged(files[number], compact=True)
                local = live_rows[live_file == number] - starts[number]
                if len(local) == table.num_rows:  # every row (an events file): no copy
                    live_pieces.append(table)
                elif len(local):
                    keep = np.zeros(table.num_rows, dtype=bool)
                    keep[local] = True
                    live_pieces.append(table.filter(pa.array(keep)))
                gone = dead_rows[dead_file == number] - starts[number]
                if len(gone):
                    dead_pieces.append(_expand(table.take(pa.array(gone))))
                del table
                _give_back_memory()  # the whole file's buffers, before the next file
            # The pieces are joined a column at a time, so the copy costs one column's
            # memory, not the table's.
            columns = [
                pa.chunked_array([c for p in live_pieces for c in p.column(i).chunks], _COMPACT_SCHEMA.field(i).type)
                for i in range(len(_COMPACT_SCHEMA))
            ]
            del live_pieces
            dead = pa.concat_tables(dead_pieces) if dead_pieces else canonical.CANONICAL_SCHEMA.empty_table()
            return _combine(columns, _COMPACT_SCHEMA), dead.cast(canonical.CANONICAL_SCHEMA)

        tick = time.perf_counter()
        report = ApplyReport(mode="rebuild", reason=reason, rows_read=keys.num_rows)
        report.stages["read"] = round(tick - started, 3)
        report.batches_applied = int((manifest["verdict"] == "passed").sum())
        report.batches_held = held_batches(manifest)
        # Every row's order key on a second thread (pandas) while this one hashes and sorts
        # the record keys (numpy, with the GIL free).
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="profile-store-orders") as side:
            all_okeys = side.submit(_order_keys_arrow, keys.select(["source", "event_type", "shop", "order_id"]))
            rkeys = record_hashes(keys)
            by_key = key_order(rkeys)  # one sort for both
            assert_keys_name_one_record(keys, rkeys, by_key)
            times = keys.select(["observed_at", "received_at"]).to_pandas()
            winners = latest_versions(
                times, rkeys, full_rows=lambda rows: read_rows(rows).to_pandas(types_mapper=mapper), order=by_key
            )
            del by_key
            all_okeys = all_okeys.result()
        deleted = keys.column("is_deleted").fill_null(False).to_numpy(zero_copy_only=False)[winners]
        # In file order, so the second pass reads each file once and needs no reordering.
        live_rows, dead_rows = np.sort(winners[~deleted]), np.sort(winners[deleted])
        live_keys, dead_keys = rkeys[live_rows], rkeys[dead_rows]
        report.versions_changed = len(winners)
        identity_input = keys.select(_IDENTITY_COLUMNS).take(pa.array(live_rows)).to_pandas(types_mapper=mapper)
        okeys = all_okeys[live_rows]
        del keys, rkeys, times, winners, deleted, all_okeys
        _give_back_memory()  # the key pass's buffers
        tick = report.lap("current_state", tick)
        # Records are joined to profiles by position below: no record_profiles table.
        result = resolve_identities(identity_input, self.limits, record_profiles=False)
        tick = report.lap("resolve_identities", tick)
        clusters = raw_clusters(result)
        lookup = _ProfileLookup(clusters, _sizes(result))
        # Each record's profile id, dictionary-encoded: 9M ids, 1M distinct.
        cluster_of, profile_of, rp_row = _assignment(len(identity_input), result, clusters)
        del identity_input
        result.record_rows = result.record_ranks = None
        _give_back_memory()
        identity = result.identity_map
        map_ranks = _map_ranks(result)  # each identity map row's profile, as a row of components
        identity_cluster = clusters.to_numpy(np.int64)[map_ranks]
        previous = self.current_path()
        path = self.directory / f"profiles-{datetime.now(timezone.utc):%Y%m%dT%H%M%S}-{uuid.uuid4().hex[:8]}.sqlite"
        _create(path)
        base = StoreBaseWriter(base_directory(path))

        # The shards are planned on a second thread (numpy's sorts release the GIL) while
        # this one reads the live rows. They stay in memory until their shard is written:
        # low-cardinality text (sources, kinds, names, cities...) is kept dictionary-
        # encoded, about half the bytes, and each shard's gather moves small integers.
        def plan_and_index() -> tuple:
            """The shards, then the records' key arrays by key and by cluster: the base's
            rows will be the tombstones, then the live records in placement order."""
            planned = _plan_shards(cluster_of, okeys, self.shard_rows, identity_cluster)
            placement = planned[1]
            base.records.give_index("rkey", np.concatenate([dead_keys, live_keys[placement]]))
            tombstones = np.full(len(dead_keys), NO_CLUSTER, dtype=np.int64)
            base.records.give_index("cluster", np.concatenate([tombstones, cluster_of[placement]]))
            return planned

        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="profile-store-plan") as planner:
            planned = planner.submit(plan_and_index)
            live, dead = read_live_and_dead(live_rows, dead_rows)
            del live_rows, dead_rows
            _give_back_memory()
            tick = report.lap("read_live_rows", tick)
            plan, placement, shard_bounds, identity_order, identity_bounds = planned.result()
        report.records_recomputed = live.num_rows
        report.clusters_touched = int(clusters.nunique())
        report.largest_component = int(result.components["size"].max()) if len(result.components) else 0
        tick = report.lap("clusters", tick)

        conn, cur = self._connect(path)
        try:
            # A new file no reader knows yet: no journal while it is filled (if the run dies,
            # the file is never named in CURRENT and is removed by the next rebuild).
            cur.execute("pragma journal_mode=off")
            cur.execute("pragma synchronous=off")
            # Appending needs no memory map and little cache: mapped or cached pages would
            # count in the step's memory.
            cur.execute("pragma mmap_size=0")
            cur.execute("pragma cache_size=-32768")
            cur.execute("begin immediate")
            # Three threads: one gathers shard k + 1, this one builds shard k's profiles, one
            # writes shard k - 1 (the base file, then SQLite's rows). Gathering, converting
            # and inserting release the GIL. Only the writer thread touches the connection
            # until the shards are done.
            with (
                ThreadPoolExecutor(max_workers=1, thread_name_prefix="profile-store-writer") as writer,
                ThreadPoolExecutor(max_workers=1, thread_name_prefix="profile-store-gather") as fetcher,
            ):
                written: list = []

                def write(call, *args) -> Future:
                    def timed():  # the writer's own time per kind of write, for the report
                        since = time.perf_counter()
                        out = call(*args)
                        report.lap(f"writer{call.__name__}", since)
                        return out

                    written.append(writer.submit(timed))
                    return written[-1]

                tombstones = {
                    "cluster": np.full(len(dead_keys), NO_CLUSTER, dtype=np.int64),
                    "rkey": dead_keys,
                    "profile_id": pa.nulls(len(dead_keys), pa.string()),
                }
                write(_add_to_base, base.records, dead, tombstones)
                del dead
                write(_identity_to_base, base.identifiers, cur, result, lookup, identity_cluster)
                outputs, samples = [], []

                def gather(shard: int) -> tuple:
                    """A shard's rows in key order, as the base takes them and as pandas
                    for ``build_profiles``, with its join to profiles: on a second thread
                    (Arrow's gather and conversion release the GIL) while this one builds
                    the shard before."""
                    rows = placement[shard_bounds[shard + 1] : shard_bounds[shard + 2]]
                    table = _expand(live.take(pa.array(rows)))
                    meta = {
                        "cluster": cluster_of[rows],
                        "rkey": live_keys[rows],
                        "profile_id": profile_of.take(pa.array(rows)).cast(pa.string()),
                        "okey": okeys[rows],
                    }
                    if shard < 0 or not len(rows):
                        return rows, table, meta, None, None
                    frame = table.to_pandas(types_mapper=mapper)
                    # The shard's records with a profile, in record_profiles' order.
                    assigned = rp_row[rows]
                    local = np.flatnonzero(assigned >= 0)
                    local = local[np.argsort(assigned[local])]
                    identity_rows = identity_order[identity_bounds[shard] : identity_bounds[shard + 1]]
                    return rows, table, meta, frame, codes.for_shard(rows, local, identity_rows)

                codes = _ShardCodes(profile_of, map_ranks)
                upcoming = fetcher.submit(gather, -1)
                for shard in range(-1, plan.count):  # -1: records with no usable identifier
                    rows, table, meta, frame, assignment = upcoming.result()
                    if shard + 1 < plan.count:
                        upcoming = fetcher.submit(gather, shard + 1)
                    write(_add_to_base, base.records, table, meta)
                    del table
                    if frame is None:
                        continue
                    shard_identity = identity.iloc[identity_order[identity_bounds[shard] : identity_bounds[shard + 1]]]
                    profiles, provenance = build_profiles(
                        frame, None, self.rules, identity_map=shard_identity, assignment=assignment
                    )
                    del frame, assignment
                    if not samples:
                        write(_create_output_tables, cur, profiles, provenance, lookup, self.rules.attributes)
                    outputs.append(
                        write(_shard_profiles_to_base, base.profiles, profiles, provenance, lookup, self.rules.attributes)
                    )
                    samples.append(_sample_candidates(profiles))
                    del profiles, provenance
                    _give_back_memory()  # the shard's pandas blocks, before the next one
                    # At most one shard queued ahead of the writer: memory stays a shard deep.
                    while len([f for f in written if not f.done()]) > 2:
                        next(f for f in written if not f.done()).result()
                fetcher.shutdown()
                # The per-record arrays are done with: their memory goes before the tail.
                del live, cluster_of, live_keys, profile_of, rp_row, okeys, placement, identity_order, codes
                _give_back_memory()  # before the base's key arrays are sorted
                no_profiles = build_profiles(canonical.empty_frame(), result.record_profiles.head(0), self.rules)
                write(_close_base, base, _profile_base_rows(*no_profiles, lookup, self.rules.attributes).schema)
                tick = report.lap("build_profiles_and_write", tick)
                for future in written:
                    future.result()
            _give_back_memory()
            tick = report.lap("writer_drain", tick)
            if not outputs:
                _create_output_tables(cur, *no_profiles, lookup, self.rules.attributes)
            counters = pa.concat_tables([future.result() for future in outputs]).to_pandas() if outputs else None
            if counters is not None:
                _adjust_counters(cur, counters, sign=+1)
            report.profiles_written = len(counters) if counters is not None else 0
            report.sample_profile_id = _pick_sample(samples)
            tick = report.lap("write_outputs", tick)
            for statement in _INDEXES:
                cur.execute(statement)
            tick = report.lap("indexes", tick)
            if previous is not None:
                _carry_changes(cur, previous, _assignments(cur, path), run_id)
            _append_ledger(cur, manifest, run_id)
            now = datetime.now(timezone.utc).isoformat()
            _set_meta(cur, {"config_hash": self.digest, "format": str(FORMAT), "built_at": now, "reason": reason})
            report.totals = _record_stats(cur, report, run_id)
            cur.execute("commit")
            cur.execute("pragma journal_mode=wal")
            tick = report.lap("commit", tick)
        finally:
            cur.close()
            conn.close()
        pointer = self.directory / f".CURRENT.{uuid.uuid4().hex}"
        pointer.write_text(path.name)
        os.replace(pointer, self.directory / "CURRENT")
        for old in self.directory.glob("profiles-*.sqlite*"):
            if not old.name.startswith(path.name):
                shutil.rmtree(old) if old.is_dir() else old.unlink(missing_ok=True)
        report.seconds = time.perf_counter() - started
        return report

    # -- reading the tables --------------------------------------------------------------

    def _kinds(self, cur) -> dict[str, str]:
        meta = dict(zip(*_columns(_query(cur, "select key, value from meta"), "key", "value")))
        return json.loads(meta["kinds:profiles"])

    def profiles(self, profile_ids: Optional[list[str]] = None) -> pd.DataFrame:
        """resolved_profiles (all, or the given ids), in the columns and dtypes
        ``core.profiles.build_profiles`` returns, sorted by profile_id."""
        with self._snapshot() as (cur, path):
            kinds = self._kinds(cur)
            table = _profile_table(cur, StoreBase(base_directory(path)).profiles, list(kinds), profile_ids)
        return _frame_from_store(table.sort_by("profile_id"), kinds)

    def provenance(self, profile_id: Optional[str] = None) -> pd.DataFrame:
        """profile_attribute_provenance (all, or one profile's): one row per profile and
        attribute with a winner, sorted by (attribute, profile_id)."""
        attributes = list(self.rules.attributes)
        with self._snapshot() as (cur, path):
            wanted = ["profile_id"] + [f"{a}{suffix}" for a in attributes for suffix in _PROVENANCE_SUFFIXES]
            wanted += attributes
            profiles = StoreBase(base_directory(path)).profiles
            table = _profile_table(cur, profiles, wanted, None if profile_id is None else [profile_id])
        parts = []
        for attribute in attributes:
            source = table.column(f"{attribute}__source").cast(pa.string())
            has = source.is_valid()
            if not pc.any(has).as_py():
                continue
            picked = table.filter(has)
            parts.append(
                pd.DataFrame(
                    {
                        "profile_id": pd.array(picked.column("profile_id").cast(pa.string()), dtype="str"),
                        "attribute": attribute,
                        "value": pd.array(picked.column(attribute).cast(pa.string()), dtype="str"),
                        "source": pd.array(picked.column(f"{attribute}__source").cast(pa.string()), dtype="str"),
                        "source_record_id": pd.array(picked.column(f"{attribute}__record").cast(pa.string()), dtype="str"),
                        "observed_at": picked.column(f"{attribute}__observed_at").cast(pa.int64()).cast(_TS).to_pandas(),
                        "tier": picked.column(f"{attribute}__tier").cast(pa.int64()).to_numpy(),
                    }
                )
            )
        if not parts:
            return pd.DataFrame({c: pd.Series(dtype="str") for c in PROVENANCE_COLUMNS})
        out = pd.concat(parts, ignore_index=True).astype({"attribute": "str"})
        order = {a: i for i, a in enumerate(sorted(attributes))}
        out = out.sort_values(["attribute", "profile_id"], key=lambda c: c.map(order) if c.name == "attribute" else c)
        return out.reset_index(drop=True)[list(PROVENANCE_COLUMNS)]

    def identity_map(self) -> pd.DataFrame:
        columns = ["identifier_type", "identifier_value", "profile_id", "first_seen"]
        with self._snapshot() as (cur, path):
            overlay = _query(cur, f"select {', '.join(columns)} from identifiers")
            base = _live_base_table(cur, StoreBase(base_directory(path)).identifiers, columns)
        frame = _frame_from_store(_overlay_and_base(overlay, base), {"first_seen": "ts"})
        return frame.sort_values(["profile_id", "identifier_type", "identifier_value"], kind="stable").reset_index(drop=True)

    def conflicts(self) -> pd.DataFrame:
        with self.reader() as cur:
            table = _query(cur, "select * from conflicts")
        frame = _frame_from_store(table, {"first_seen": "ts"}).drop(columns="cluster")
        return frame.sort_values(["from_type", "from_value", "to_type", "to_value"], kind="stable").reset_index(drop=True)

    def record_profiles(self) -> pd.DataFrame:
        with self._snapshot() as (cur, path):
            frame = _assignments(cur, path)
        return frame.sort_values(["source", "source_record_id"], kind="stable").reset_index(drop=True)

    def changes(self) -> pd.DataFrame:
        with self.reader() as cur:
            return _query(cur, "select * from changes").to_pandas()

    def stats(self, limit: int = 500) -> pd.DataFrame:
        """The per-run totals, newest last (profiles, without_email, conflicts, largest_component)."""
        with self.reader() as cur:
            table = _query(cur, f"select * from (select rowid as seq, * from stats order by rowid desc limit {int(limit)}) order by seq")
        return table.to_pandas()

    def counts(self) -> dict[str, int]:
        with self._snapshot() as (cur, path):
            meta = dict(zip(*_columns(_query(cur, "select key, value from meta where key like 'count:%'"), "key", "value")))
            identifiers = StoreBase(base_directory(path)).identifiers
            in_base = len(identifiers) - len(identifiers.rows_of("cluster", _dead_clusters(cur)))
            return {
                "profiles": int(meta.get("count:profiles", 0)),
                "profiles_without_email": int(meta.get("count:without_email", 0)),
                "identifiers": in_base + int(_query(cur, "select count(*) as n from identifiers").column("n")[0].as_py()),
                "conflicts": int(_query(cur, "select count(*) as n from conflicts").column("n")[0].as_py()),
            }


def held_batches(manifest: pd.DataFrame) -> list[str]:
    """"source/batch" of every batch whose latest write failed its check (held back until a
    later write of it passes)."""
    if manifest.empty:
        return []
    latest = manifest.sort_values("written_at").drop_duplicates(["source", "batch"], keep="last")
    failed = latest[latest["verdict"] == "failed"]
    return [f"{s}/{b}" for s, b in zip(failed["source"], failed["batch"])]


# -- conversions between canonical frames and store rows -----------------------------------


_closers: list[threading.Thread] = []


def _identity_rows(result: IdentityResult, lookup: "_ProfileLookup", identity_cluster: Optional[np.ndarray] = None) -> pa.Table:
    """The identity map as rows of ``identifiers`` (``IDENTIFIER_SCHEMA``).
    ``identity_cluster``: the cluster of each identity map row, if the caller has it."""
    identity = result.identity_map
    if identity_cluster is None:
        identity_cluster = lookup.cluster(pa.array(identity["profile_id"], pa.string(), from_pandas=True))
    return pa.table(
        {
            "cluster": pa.array(identity_cluster, pa.int64()),
            "identifier_type": pa.array(identity["identifier_type"], pa.string(), from_pandas=True),
            "identifier_value": pa.array(identity["identifier_value"], pa.string(), from_pandas=True),
            "ikey": pa.array(identifier_hashes(identity["identifier_type"], identity["identifier_value"])),
            "profile_id": pa.array(identity["profile_id"], pa.string(), from_pandas=True),
            "first_seen": _micros_array(identity["first_seen"]),
        },
        schema=IDENTIFIER_SCHEMA,
    )


def _write_conflicts(cur, result: IdentityResult, lookup: "_ProfileLookup") -> None:
    conflicts = result.conflicts
    if len(conflicts):
        owner, _ = identifier_owners(result.identity_map, conflicts)
        cur.adbc_ingest("conflicts", _frame_to_store(conflicts.assign(cluster=lookup.cluster(owner))), mode="append")


def _write_identity(cur, result: IdentityResult, lookup: "_ProfileLookup") -> None:
    """The identity map and conflicts of recomputed clusters, into the overlay."""
    table = _identity_rows(result, lookup)
    if table.num_rows:
        key = ["cluster", "identifier_type", "identifier_value"]
        cur.adbc_ingest("identifiers", table.sort_by([(c, "ascending") for c in key]), mode="append")
    _write_conflicts(cur, result, lookup)


def _identity_to_base(
    writer: BaseTableWriter, cur, result: IdentityResult, lookup: "_ProfileLookup", identity_cluster: np.ndarray
) -> None:
    """A rebuild's identity map, into the new base; its conflicts, into the database."""
    writer.add(_identity_rows(result, lookup, identity_cluster))
    writer.close()
    _write_conflicts(cur, result, lookup)


def _add_to_base(writer: BaseTableWriter, table: pa.Table, meta: dict) -> None:
    """Canonical rows plus their cluster, key, profile (and order key) -> the new base."""
    writer.add(_table_to_store(table, meta))


def _close_base(base: StoreBaseWriter, profile_schema: pa.Schema) -> None:
    """The last of a rebuild's writes (the records' key arrays by key and cluster were given
    while the live rows were read)."""
    base.records.close()
    base.profiles.close(profile_schema)


def _shard_profiles_to_base(
    writer: BaseTableWriter, profiles: pd.DataFrame, provenance: pd.DataFrame, lookup: "_ProfileLookup", attributes: tuple[str, ...]
) -> pa.Table:
    """A rebuild shard's profile rows, into the new base (on the writer thread: the
    conversion is Arrow work, which releases the GIL). Returns each profile's
    (size, no_email): the rows of the counters."""
    rows = _profile_base_rows(profiles, provenance, lookup, attributes)
    writer.add(rows)
    return pa.table({"size": rows.column("size"), "no_email": rows.column("primary_email").is_null()})


def _profile_base_rows(
    profiles: pd.DataFrame, provenance: pd.DataFrame, lookup: "_ProfileLookup", attributes: tuple[str, ...]
) -> pa.Table:
    """Profile rows for the base, with the key of each profile id."""
    rows = _profile_rows(profiles, provenance, lookup, attributes)
    return rows.append_column("pkey", pa.array(profile_hashes(rows.column("profile_id")), pa.int64()))


def _write_profile_rows(cur, table: pa.Table) -> None:
    if table.num_rows:
        cur.adbc_ingest("profiles", table.sort_by([("cluster", "ascending"), ("profile_id", "ascending")]), mode="append")



def _give_back_memory() -> None:
    """Return freed memory to the operating system: Arrow's pool keeps freed buffers, and
    glibc's heap keeps freed numpy and pandas blocks, so without this a rebuild's resident
    memory would be the sum of its stages' peaks rather than the largest of them."""
    pa.default_memory_pool().release_unused()
    if _LIBC is not None:
        _LIBC.malloc_trim(0)


def _load_libc():
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.malloc_trim  # glibc only
        return libc
    except (OSError, AttributeError):
        return None


_LIBC = _load_libc()


def _close_later(conn, cur) -> None:
    """Close a writer's connection on a background thread. The last connection to close
    copies the write-ahead log into the database file (a checkpoint): tens of megabytes
    after a large batch, and durable already (the WAL is), so the step does not wait for
    it; the thread is not a daemon, so the process still finishes it before exiting."""

    def close() -> None:
        try:
            cur.execute("pragma wal_checkpoint(passive)")
        finally:
            cur.close()
            conn.close()

    worker = threading.Thread(target=close, name="profile-store-checkpoint")
    worker.start()
    _closers.append(worker)
    _closers[:] = [t for t in _closers if t.is_alive()]


def _query(cur, sql: str, params=None) -> pa.Table:
    cur.adbc_statement.set_options(**_BIG)
    cur.execute(sql, params) if params is not None else cur.execute(sql)
    return cur.fetch_arrow_table()


def _columns(table: pa.Table, *names: str) -> list[list]:
    return [table.column(n).to_pylist() for n in names]


def _temp_keys(cur, name: str, keys: np.ndarray) -> None:
    cur.adbc_ingest(name, pa.table({"k": pa.array(np.asarray(keys, dtype=np.int64))}), mode="replace", temporary=True)


def _temp_strings(cur, name: str, keys: list[str]) -> None:
    cur.adbc_ingest(name, pa.table({"k": pa.array(list(keys), pa.string())}), mode="replace", temporary=True)


def _temp_pairs(cur, name: str, clusters: np.ndarray, keys: np.ndarray) -> None:
    cur.adbc_ingest(name, pa.table({"c": pa.array(clusters), "k": pa.array(keys)}), mode="replace", temporary=True)


def _micros_array(values: pd.Series) -> pa.Array:
    stamps = pd.Series(pd.to_datetime(values, utc=True))
    micros = stamps.dt.as_unit("us").array.asi8.copy()
    return pa.array(micros, mask=stamps.isna().to_numpy(), type=pa.int64())


def _records_to_store(frame: pd.DataFrame, meta: dict) -> pa.Table:
    table = canonical.to_table(frame) if len(frame) else canonical.CANONICAL_SCHEMA.empty_table()
    return _table_to_store(table, meta)


def _table_to_store(table: pa.Table, meta: dict) -> pa.Table:
    """Canonical Arrow rows plus their cluster, key and profile -> rows of ``records``."""
    okey = pa.array(meta["okey"] if "okey" in meta else _order_keys_arrow(table), pa.int64())
    columns: dict[str, pa.Array] = {
        "cluster": pa.array(meta["cluster"], pa.int64()),
        "rkey": pa.array(meta["rkey"], pa.int64()),
        "profile_id": pa.array(meta["profile_id"], pa.string(), from_pandas=True)
        if not isinstance(meta["profile_id"], (pa.Array, pa.ChunkedArray))
        else meta["profile_id"],
        "okey": pc.if_else(pc.equal(okey, NO_CLUSTER), pa.scalar(None, pa.int64()), okey),
    }
    for name in canonical.CANONICAL_COLUMNS:
        column = table.column(name)
        if column.type == _TS:
            column = column.cast(pa.int64())
        elif pa.types.is_boolean(column.type):
            column = column.cast(pa.int64())
        columns[name] = column
    return pa.table(columns)


_LOW_CARDINALITY = (
    "source", "source_class", "record_kind", "event_type", "first_name", "last_name", "city", "country",
    "loyalty_tier", "lifecycle_stage", "email_consent", "category", "device_type", "shop", "currency",
)


def _combine(columns: list, schema: pa.Schema) -> pa.Table:
    """A table of ``columns`` (chunked), each made one chunk in place (dictionaries
    unified): when the list holds the only reference, a column's chunks are released as
    soon as it is copied."""
    for i in range(len(columns)):
        column = columns[i]
        columns[i] = None
        if pa.types.is_dictionary(column.type):
            column = pa.table({"c": column}).unify_dictionaries().column(0)
        columns[i] = column.combine_chunks()
        del column
        pa.default_memory_pool().release_unused()  # the old chunks, before the next copy
    return pa.Table.from_arrays(columns, schema=schema)


def _compact(table: pa.Table) -> pa.Table:
    """Dictionary-encode the canonical columns that take few distinct values."""
    for name in _LOW_CARDINALITY:
        at = table.schema.get_field_index(name)
        table = table.set_column(at, name, pc.dictionary_encode(table.column(name)))
    return table


_COMPACT_SCHEMA = _compact(canonical.CANONICAL_SCHEMA.empty_table()).schema


def _read_staged(path: Path, compact: bool = False) -> pa.Table:
    """A staged file's canonical rows; ``compact``: as ``_compact`` makes them, with the
    low-cardinality columns read straight into dictionaries (Parquet stores them
    dictionary-encoded: three times faster than decoding the strings and encoding them
    again). A file written with another schema is read the long way."""
    if compact:
        table = pq.read_table(path, read_dictionary=list(_LOW_CARDINALITY))
        if table.schema.equals(_COMPACT_SCHEMA):
            return table
    table = pq.read_table(path, schema=canonical.CANONICAL_SCHEMA)
    return _compact(table) if compact else table


def _expand(table: pa.Table) -> pa.Table:
    """Undo ``_compact``: plain string columns again."""
    for at, field in enumerate(table.schema):
        if pa.types.is_dictionary(field.type):
            table = table.set_column(at, field.name, table.column(at).cast(field.type.value_type))
    return table


def _order_keys_arrow(table: pa.Table) -> np.ndarray:
    """``order_keys`` over an Arrow table, converting only the order rows to pandas."""
    if table.num_rows == 0:
        return np.empty(0, dtype=np.int64)
    is_order = pc.and_(
        pc.equal(table.column("source"), "shop"),
        pc.is_in(table.column("event_type"), value_set=pa.array(["order_completed", "order_cancelled"])),
    ).fill_null(False)
    out = np.full(table.num_rows, NO_CLUSTER, dtype=np.int64)
    rows = np.flatnonzero(is_order.to_numpy(zero_copy_only=False))
    if len(rows):
        picked = table.select(["source", "event_type", "shop", "order_id"]).take(pa.array(rows)).to_pandas()
        out[rows] = order_keys(picked)
    return out


def _records_from_store(table: pa.Table) -> tuple[pd.DataFrame, dict[str, np.ndarray]]:
    """Store rows -> (canonical frame, {cluster, rkey, profile_id, okey})."""
    arrays = {}
    for f in canonical.CANONICAL_SCHEMA:
        column = table.column(f.name) if table.num_rows else pa.array([], f.type)
        if table.num_rows:
            if f.type == _TS:
                column = column.cast(pa.int64()).cast(_TS)
            elif pa.types.is_boolean(f.type):
                column = pc.not_equal(column.cast(pa.int64()), 0)
            else:
                column = column.cast(f.type)
        arrays[f.name] = column
    canon = pa.table(arrays, schema=canonical.CANONICAL_SCHEMA)
    # The dtypes ``canonical.to_frame`` gives (a test holds them equal).
    frame = canon.to_pandas(types_mapper={pa.int64(): pd.Int64Dtype(), pa.bool_(): pd.BooleanDtype()}.get)

    def ints(name: str) -> np.ndarray:
        if not table.num_rows:
            return np.empty(0, dtype=np.int64)
        return table.column(name).cast(pa.int64()).fill_null(NO_CLUSTER).to_numpy()

    profile = (
        table.column("profile_id").cast(pa.string()).to_numpy(zero_copy_only=False)
        if table.num_rows
        else np.empty(0, dtype=object)
    )
    return frame, {"cluster": ints("cluster"), "rkey": ints("rkey"), "profile_id": profile, "okey": ints("okey")}


def _frame_kinds(frame: pd.DataFrame) -> dict[str, str]:
    kinds = {}
    for name, dtype in frame.dtypes.items():
        if isinstance(dtype, pd.DatetimeTZDtype) or pd.api.types.is_datetime64_any_dtype(dtype):
            kinds[name] = "ts"
        elif pd.api.types.is_bool_dtype(dtype):
            kinds[name] = "bool"
        elif pd.api.types.is_integer_dtype(dtype):
            kinds[name] = "Int64" if isinstance(dtype, pd.Int64Dtype) else "int"
        elif name == "emails":
            kinds[name] = "json"
        else:
            kinds[name] = "str"
    return kinds


def _frame_to_store(frame: pd.DataFrame) -> pa.Table:
    """A profile-store output frame -> Arrow columns SQLite keeps: timestamps as int64
    microseconds, booleans as 0/1, the email list as newline-joined text (an address never
    holds a newline: validation refuses it)."""
    table = pa.Table.from_pandas(frame, preserve_index=False)
    columns = {}
    for name, kind in _frame_kinds(frame).items():
        column = table.column(name)
        if kind == "ts":
            column = column.cast(_TS).cast(pa.int64())
        elif kind in ("int", "Int64", "bool"):
            column = column.cast(pa.int64())
        elif kind == "json":
            column = pc.binary_join(column.cast(pa.list_(pa.string())), "\n")
        else:
            column = column.cast(pa.string())
        columns[name] = column
    return pa.table(columns)


def _frame_from_store(table: pa.Table, kinds: dict[str, str]) -> pd.DataFrame:
    data = {}
    for name in table.column_names:
        column = table.column(name)
        kind = kinds.get(name, "str")
        if name == "cluster":
            data[name] = pd.Series(column.cast(pa.int64()).to_numpy(zero_copy_only=False))
        elif kind == "ts":
            data[name] = pd.Series(column.cast(pa.int64()).cast(_TS).to_pandas())
        elif kind == "int":
            data[name] = pd.Series(column.cast(pa.int64()).to_numpy(zero_copy_only=False)).astype(np.int64)
        elif kind == "Int64":
            data[name] = pd.Series(pd.array(column.cast(pa.int64()).to_pylist(), dtype="Int64"))
        elif kind == "bool":
            data[name] = pd.Series(column.cast(pa.int64()).to_numpy(zero_copy_only=False) != 0)
        elif kind == "json":
            text = column.cast(pa.string())
            lists = pc.if_else(pc.equal(text, ""), pa.scalar([], pa.list_(pa.string())), pc.split_pattern(text, "\n"))
            data[name] = pd.Series(lists.to_pylist(), dtype=object)
        else:
            data[name] = pd.Series(pd.array(column.cast(pa.string()), dtype="str"))
    return pd.DataFrame(data)


# -- small helpers -------------------------------------------------------------------------


def _create(path: Path) -> None:
    conn = sqlite3.connect(path)
    try:
        conn.execute("pragma page_size=4096")
        for statement in _DDL:
            conn.execute(statement)
        conn.commit()
    finally:
        conn.close()


_PROVENANCE_SUFFIXES = ("__source", "__record", "__observed_at", "__tier")


def _profile_rows(
    profiles: pd.DataFrame, provenance: pd.DataFrame, lookup: "_ProfileLookup", attributes: tuple[str, ...]
) -> pa.Table:
    """The rows of ``profiles``: the resolved profile, its cluster and identifier count, and
    the provenance of each attribute as four columns."""
    base = _frame_to_store(profiles)
    ids = base.column("profile_id")
    columns = {name: base.column(name) for name in base.column_names}
    at = lookup.positions(ids)  # once for both
    columns["cluster"] = pa.array(lookup.cluster(ids) if at is None else lookup.cluster_values[at], pa.int64())
    columns["size"] = pa.array(lookup.size(ids) if at is None else lookup.size_values[at], pa.int64())
    n = len(ids)
    table = pa.table(
        {
            "attribute": pa.array(provenance["attribute"], pa.string(), from_pandas=True),
            "profile_id": pa.array(provenance["profile_id"], pa.string(), from_pandas=True),
            "source": pa.array(provenance["source"], pa.string(), from_pandas=True),
            "record": pa.array(provenance["source_record_id"], pa.string(), from_pandas=True),
            "observed_at": _micros_array(provenance["observed_at"]).fill_null(0),
            "tier": pa.array(provenance["tier"].to_numpy(np.int64)),
        }
    )
    # Each profile's provenance row per attribute (or none): the rows are matched to the
    # profiles once, then one gather per attribute and column, no Python objects.
    of_row = _positions_of_ids(table.column("profile_id"), ids)
    attribute_of_row = pc.index_in(table.column("attribute"), value_set=pa.array(list(attributes), pa.string()))
    attribute_of_row = attribute_of_row.fill_null(-1).to_numpy(zero_copy_only=False)
    for number, attribute in enumerate(attributes):
        at = np.flatnonzero(attribute_of_row == number)
        of_profile = np.full(n, -1, dtype=np.int64)
        of_profile[of_row[at].astype(np.int64)] = at
        pick = pa.array(of_profile, mask=of_profile < 0)
        for name in ("source", "record", "observed_at", "tier"):
            columns[f"{attribute}__{name}"] = table.column(name).take(pick).combine_chunks()
    return pa.table(columns)


def _positions_of_ids(wanted: pa.ChunkedArray | pa.Array, ids: pa.ChunkedArray | pa.Array) -> np.ndarray:
    """The position in ``ids`` (sorted, distinct, holding every wanted id) of each wanted
    profile id: a search among their numbers (``profile_numbers_arrow``), else a hash join."""
    wanted, ids = (a.combine_chunks() if isinstance(a, pa.ChunkedArray) else a for a in (wanted, ids))
    wanted_numbers = profile_numbers_arrow(wanted.cast(pa.large_string()))
    id_numbers = profile_numbers_arrow(ids.cast(pa.large_string()))
    if wanted_numbers is None or id_numbers is None:
        return pc.index_in(wanted, value_set=ids).to_numpy(zero_copy_only=False).astype(np.int64)
    return np.searchsorted(id_numbers, wanted_numbers).astype(np.int64)


def _sizes(result: IdentityResult) -> pd.Series:
    """profile_id -> identifier count of its identity component."""
    components = result.components
    return pd.Series(components["size"].to_numpy(np.int64), index=components["profile_id"].astype(str).to_numpy())


def _lookup(series: pd.Series, keys: pd.Series, default: int = 0) -> np.ndarray:
    """``series[k]`` (int64) for each key, ``default`` where absent: through the index's
    hash table, built once per Series (a reindex would turn int64 into float64 when a key
    is absent, and cluster ids need all 64 bits)."""
    position = series.index.get_indexer(keys)
    values = series.to_numpy(np.int64)
    out = np.full(len(position), default, dtype=np.int64)
    found = position >= 0
    out[found] = values[position[found]]
    return out


def _create_output_tables(cur, profiles: pd.DataFrame, provenance: pd.DataFrame, lookup: "_ProfileLookup", attributes) -> None:
    frame_kinds = _frame_kinds(profiles)
    sample = _profile_rows(profiles.head(0), provenance.head(0), lookup, attributes)
    columns = ", ".join(
        f"{name} {'text' if pa.types.is_string(sample.schema.field(name).type) else 'integer'}"
        for name in sample.column_names
    )
    cur.execute(f"create table profiles ({columns}, primary key (cluster, profile_id)) without rowid")
    cur.execute("create index profiles_id on profiles (profile_id)")
    _set_meta(cur, {"kinds:profiles": json.dumps(frame_kinds)})


def _new_counters(profiles: pd.DataFrame, lookup: "_ProfileLookup") -> pd.DataFrame:
    ids = profiles["profile_id"].astype(str)
    return pd.DataFrame(
        {
            "profile_id": ids.to_numpy(),
            "size": lookup.size(pa.array(ids, pa.string(), from_pandas=True)),
            "no_email": profiles["primary_email"].isna().to_numpy(),
        }
    )


def _adjust_counters(cur, rows: pd.DataFrame, sign: int) -> None:
    """Keep the profile count, the count without email and the size histogram in step
    with the rows just removed (sign -1) or written (+1): the checks read them without a
    table scan."""
    if rows.empty:
        return
    sizes = rows["size"].astype(np.int64).value_counts()
    table = pa.table({"size": pa.array(sizes.index.to_numpy(np.int64)), "profiles": pa.array(sign * sizes.to_numpy(np.int64))})
    cur.adbc_ingest("size_delta", table, mode="replace", temporary=True)
    cur.execute(
        "insert into component_sizes select size, profiles from temp.size_delta where true "
        "on conflict (size) do update set profiles = profiles + excluded.profiles"
    )
    cur.execute("delete from component_sizes where profiles = 0")
    for key, delta in (("count:profiles", len(rows)), ("count:without_email", int(rows["no_email"].astype(bool).sum()))):
        cur.execute(
            "insert into meta values (?, ?) on conflict (key) do update set value = cast(value as integer) + ?",
            (key, str(sign * delta), sign * delta),
        )


def _set_meta(cur, values: dict[str, str]) -> None:
    table = pa.table({"key": list(values), "value": [str(v) for v in values.values()]})
    _temp_strings(cur, "mk", list(values))
    cur.execute("delete from meta where key in (select k from temp.mk)")
    cur.adbc_ingest("meta", table, mode="append")


def _append_ledger(cur, batches: pd.DataFrame, run_id: Optional[str]) -> None:
    if batches.empty:
        return
    rows = pa.table(
        {
            "source": pa.array(batches["source"].astype(str).tolist(), pa.string()),
            "batch": pa.array(batches["batch"].astype(str).tolist(), pa.string()),
            "verdict": pa.array(batches["verdict"].astype(str).tolist(), pa.string()),
            "content_hash": pa.array(batches["content_hash"].astype(str).tolist(), pa.string()),
            "rows": pa.array(batches["rows"].astype(np.int64).to_numpy(), pa.int64()),
            "reason": pa.array([None if pd.isna(r) else str(r) for r in batches["reason"]], pa.string()),
            "applied_at": pa.array([datetime.now(timezone.utc).isoformat()] * len(batches), pa.string()),
            "run_id": pa.array([run_id] * len(batches), pa.string()),
        }
    )
    cur.adbc_ingest("pending_ledger", rows, mode="replace", temporary=True)
    cur.execute(
        "insert into ledger select * from temp.pending_ledger where true "
        "on conflict (source, batch, verdict) do update set content_hash = excluded.content_hash, "
        "rows = excluded.rows, reason = excluded.reason, applied_at = excluded.applied_at, run_id = excluded.run_id"
    )


def _append_changes(cur, changes: pd.DataFrame, run_id: Optional[str]) -> None:
    if changes.empty:
        return
    now = datetime.now(timezone.utc).isoformat()
    cur.adbc_ingest(
        "changes",
        pa.table(
            {
                "changed_at": pa.array([now] * len(changes), pa.string()),
                "run_id": pa.array([run_id] * len(changes), pa.string()),
                "old_profile_id": pa.array(changes["old_profile_id"].astype(object), pa.string(), from_pandas=True),
                "new_profile_id": pa.array(changes["new_profile_id"].astype(object), pa.string(), from_pandas=True),
            }
        ),
        mode="append",
    )


def _carry_changes(cur, previous: Path, record_profiles: pd.DataFrame, run_id: Optional[str]) -> None:
    """Keep the old store's change log, and log the changes between its assignment and the
    rebuilt one (``record_profiles``: source, source_record_id, profile_id)."""
    old_conn, old_cur = ProfileStore._connect(previous)
    try:
        log = _query(old_cur, "select * from changes")
        old_rp = _assignments(old_cur, previous)
    finally:
        old_cur.close()
        old_conn.close()
    if log.num_rows:
        cur.adbc_ingest("changes", log.cast(pa.schema([(n, pa.string()) for n in log.column_names])), mode="append")
    if len(old_rp):
        _append_changes(cur, profile_id_changes(old_rp.astype(str), record_profiles.astype(str)), run_id)


def _record_stats(cur, report: ApplyReport, run_id: Optional[str]) -> dict[str, int]:
    """Totals after this run, from the counters (no table scan), appended to ``stats``."""
    meta = dict(zip(*_columns(_query(cur, "select key, value from meta where key like 'count:%'"), "key", "value")))
    largest = _query(cur, "select coalesce(max(size), 0) as n from component_sizes").column("n")[0].as_py()
    totals = {
        "profiles": int(meta.get("count:profiles", 0)),
        "without_email": int(meta.get("count:without_email", 0)),
        "conflicts": int(_query(cur, "select count(*) as n from conflicts").column("n")[0].as_py()),
        "largest_component": int(largest or 0),
    }
    cur.adbc_ingest(
        "stats",
        pa.table(
            {
                "at": pa.array([datetime.now(timezone.utc).isoformat()], pa.string()),
                "run_id": pa.array([run_id], pa.string()),
                "mode": pa.array([report.mode], pa.string()),
                **{name: pa.array([value], pa.int64()) for name, value in totals.items()},
            }
        ),
        mode="append",
    )
    return totals


def _sample_id(profiles: pd.DataFrame) -> Optional[str]:
    """The profile shown as a sample: the first (by profile_id) with an email, else the first."""
    return _pick_sample([_sample_candidates(profiles)])


def _sample_candidates(profiles: pd.DataFrame) -> tuple[Optional[str], Optional[str]]:
    """(first profile_id with an email, first profile_id) of one shard's profiles."""
    if profiles.empty:
        return None, None
    ids = profiles["profile_id"]  # sorted (build_profiles)
    has_email = profiles["primary_email"].notna().to_numpy()
    return (str(ids.iloc[int(has_email.argmax())]) if has_email.any() else None), str(ids.iloc[0])


def _pick_sample(candidates: list[tuple[Optional[str], Optional[str]]]) -> Optional[str]:
    with_email = [c for c, _ in candidates if c is not None]
    if with_email:
        return min(with_email)
    first = [c for _, c in candidates if c is not None]
    return min(first) if first else None


def _identifier_clusters(cur, identifiers: BaseTable, frame: pd.DataFrame) -> set[int]:
    """The clusters holding any identifier of ``frame``: the overlay's and the base's."""
    if frame.empty:
        return set()
    wanted = normalised_identifiers(frame)
    if wanted.empty:
        return set()
    ikeys = identifier_hashes(wanted["identifier_type"], wanted["identifier_value"])
    _temp_keys(cur, "ik", ikeys)
    found = _query(cur, "select distinct cluster from identifiers where ikey in (select k from temp.ik)")
    rows = _live_cluster_rows(cur, identifiers, identifiers.rows_of("ikey", ikeys))
    return set(found.column("cluster").to_pylist()) | set(identifiers.column("cluster", rows).tolist())


def _dead_clusters(cur, clusters: Optional[np.ndarray] = None) -> np.ndarray:
    """The clusters (of ``clusters``, or all) whose base identifiers and profiles an
    incremental run has superseded."""
    if clusters is None:
        found = _query(cur, "select cluster from base_dead_clusters")
    else:
        _temp_keys(cur, "bc", np.unique(clusters))
        found = _query(cur, "select cluster from base_dead_clusters where cluster in (select k from temp.bc)")
    return found.column("cluster").to_numpy().astype(np.int64) if found.num_rows else np.empty(0, dtype=np.int64)


def _live_cluster_rows(cur, table: BaseTable, rows: np.ndarray) -> np.ndarray:
    """The base rows (of identifiers or profiles) of clusters no incremental run has
    recomputed since the rebuild."""
    if not len(rows):
        return rows
    clusters = table.column("cluster", rows)
    dead = _dead_clusters(cur, clusters)
    return rows[~np.isin(clusters, dead)] if len(dead) else rows


def _live_base_table(cur, table: BaseTable, columns: list[str]) -> pa.Table:
    """Every live base row (``_live_cluster_rows``) of a table, in ``columns``."""
    whole = table.table.select(columns)
    dead = _dead_clusters(cur)
    if not len(dead):
        return whole
    return whole.filter(pa.array(~np.isin(table.table.column("cluster").to_numpy(), dead)))


def _profile_table(cur, profiles: BaseTable, columns: list[str], profile_ids: Optional[list[str]] = None) -> pa.Table:
    """Profile rows (all, or the given ids) in ``columns``: the overlay's and the base's live rows."""
    listed = ", ".join(columns)
    if profile_ids is None:
        overlay = _query(cur, f"select {listed} from profiles")
        return _overlay_and_base(overlay, _live_base_table(cur, profiles, columns))
    ids = pa.array(list(profile_ids), pa.string())
    _temp_strings(cur, "p", ids.to_pylist())
    overlay = _query(cur, f"select {listed} from profiles where profile_id in (select k from temp.p)")
    rows = _live_cluster_rows(cur, profiles, profiles.rows_of("pkey", profile_hashes(ids)))
    base = profiles.take(rows, columns)
    base = base.filter(pc.is_in(base.column("profile_id"), value_set=ids))  # not another id of the same hash
    return _overlay_and_base(overlay, base)


def _overlay_and_base(overlay: pa.Table, base: pa.Table) -> pa.Table:
    """Overlay rows (as the driver typed them) and base rows, as one table of the base's types."""
    if not overlay.num_rows:
        return base
    return pa.concat_tables([overlay.select(base.column_names).cast(base.schema), base])


def _fetch_clusters(cur, base: BaseTable, clusters: set[int]) -> tuple[pd.DataFrame, dict[str, np.ndarray]]:
    """Every record of ``clusters``: the overlay's rows and the base's live rows."""
    wanted = np.fromiter(clusters, dtype=np.int64, count=len(clusters))
    _temp_keys(cur, "c", wanted)
    table = _query(cur, "select r.* from temp.c join records r on r.cluster = temp.c.k")
    return _records_from_store(_with_base(table, base, _live_base_rows(cur, base, base.rows_of("cluster", wanted))))


def _live_base_rows(cur, base: BaseTable, rows: np.ndarray) -> np.ndarray:
    """The base rows not superseded by a later run (their keys are not in ``base_dead``)."""
    if not len(rows) or not _query(cur, "select exists (select 1 from base_dead) as n").column("n")[0].as_py():
        return rows
    keys = base.column("rkey", rows)
    _temp_keys(cur, "bk", keys)
    dead = _query(cur, "select rkey from base_dead where rkey in (select k from temp.bk)").column("rkey")
    return rows[~np.isin(keys, dead.to_numpy())] if len(dead) else rows


def _with_base(overlay: pa.Table, base: BaseTable, rows: np.ndarray) -> pa.Table:
    """Overlay records and the base's records at ``rows``, as one ``STORE_SCHEMA`` table."""
    return _overlay_and_base(overlay, base.take(rows)).combine_chunks()


def _assignments(cur, path: Path) -> pd.DataFrame:
    """(source, source_record_id, profile_id) of every live record with a profile, from the
    store at ``path`` (its overlay and its base's rows not superseded)."""
    overlay = _query(cur, "select source, source_record_id, profile_id from records where profile_id is not null")
    overlay = overlay.cast(pa.schema([(n, pa.string()) for n in overlay.column_names])) if overlay.num_rows else None
    base = StoreBase(base_directory(path)).records.assignments()
    dead = _query(cur, "select rkey from base_dead").column("rkey").to_numpy() if base.num_rows else []
    if len(dead):
        base = base.filter(pa.array(~np.isin(base.column("rkey").to_numpy(), dead)))
    parts = [base.select(["source", "source_record_id", "profile_id"])] + ([overlay] if overlay is not None else [])
    return pa.concat_tables(parts).to_pandas()


def _assignment(n_records: int, result: IdentityResult, clusters: pd.Series) -> tuple[np.ndarray, pa.DictionaryArray, np.ndarray]:
    """(cluster, profile_id, row of ``result.record_profiles``) of each record of the frame
    ``result`` resolved (NO_CLUSTER / null / -1 when it carries no usable identifier), by
    position (``IdentityResult.record_rows`` and ``record_ranks``): no record key or profile
    id is hashed. The profile ids come dictionary-encoded, a code being the profile's row
    in ``result.components`` (sorted ids), as ``_ShardCodes`` reads them."""
    rows, ranks = result.record_rows, result.record_ranks
    rp_row = np.full(n_records, -1, dtype=np.int64)
    rp_row[rows] = np.arange(len(rows))
    rank = np.full(n_records, -1, dtype=np.int32)
    rank[rows] = ranks
    has = rank >= 0
    cluster = np.full(n_records, NO_CLUSTER, dtype=np.int64)
    cluster[has] = clusters.to_numpy(np.int64)[rank[has]]
    ids = pa.array(result.components["profile_id"], pa.string(), from_pandas=True)
    profile = pa.DictionaryArray.from_arrays(pa.array(rank, pa.int32(), mask=~has), ids)
    return cluster, profile, rp_row


class _ProfileLookup:
    """profile_id -> (cluster, identifier count), for millions of ids at a time. Profile ids
    are ``p_`` + 16 hex digits, so a lookup is a search among sorted integers
    (``positions_in``), not a hash join of strings; ids of another shape fall back to
    pandas' index."""

    def __init__(self, clusters: pd.Series, sizes: Optional[pd.Series] = None) -> None:
        self.clusters = clusters
        self.sizes = sizes if sizes is not None else pd.Series(np.zeros(len(clusters), dtype=np.int64), index=clusters.index)
        ids = pa.array(clusters.index.to_numpy(object), pa.large_string())
        numbers = profile_numbers_arrow(ids)
        self.order = None if numbers is None else np.argsort(numbers)
        self.universe = None if numbers is None else numbers[self.order]
        self.cluster_values = clusters.to_numpy(np.int64)
        same = self.sizes.index.equals(clusters.index)  # both from result.components, in its order
        self.size_values = self.sizes.to_numpy(np.int64) if same else _lookup(self.sizes, clusters.index.to_series())

    def positions(self, profile_ids: pa.Array) -> Optional[np.ndarray]:
        """Positions in ``clusters`` of ids that are all there; None for another id shape."""
        if isinstance(profile_ids, pa.ChunkedArray):
            profile_ids = profile_ids.combine_chunks()
        wanted = None if self.universe is None else profile_numbers_arrow(profile_ids.cast(pa.large_string()))
        if wanted is None:
            return None
        if len(wanted) and not len(self.universe):
            raise StoreError("a profile has no identity cluster; please report this")
        return self.order[positions_in(self.universe, wanted)]

    def cluster(self, profile_ids: pa.Array) -> np.ndarray:
        at = self.positions(profile_ids)
        if at is None:
            return _lookup(self.clusters, pd.Series(profile_ids.to_numpy(zero_copy_only=False)), NO_CLUSTER)
        return self.cluster_values[at]

    def size(self, profile_ids: pa.Array) -> np.ndarray:
        at = self.positions(profile_ids)
        if at is None:
            return _lookup(self.sizes, pd.Series(profile_ids.to_numpy(zero_copy_only=False)))
        return self.size_values[at]


def _map_ranks(result: IdentityResult) -> np.ndarray:
    """Each identity map row's profile as its row of ``result.components``: both are sorted
    by profile id and a profile has ``size`` identifiers, so the rows line up by counting
    (checked: ``resolve_identities`` promises it)."""
    ranks = np.repeat(np.arange(len(result.components)), result.components["size"].to_numpy(np.int64))
    listed = pa.array(result.identity_map["profile_id"], pa.string(), from_pandas=True)
    ids = pa.array(result.components["profile_id"], pa.string(), from_pandas=True)
    if len(ranks) != len(listed) or not pc.all(pc.equal(ids.take(pa.array(ranks)), listed)).as_py():
        raise StoreError("the identity map and its components do not line up; please report this")
    return ranks


def _plan_shards(
    cluster_of: np.ndarray, okeys: np.ndarray, shard_rows: int, identity_cluster: np.ndarray
) -> tuple["_ShardPlan", np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(plan, placement, shard_bounds, identity_order, identity_bounds): the records in
    base order (shard by shard, -1 first, each in the order the live rows were read: a
    gather in that order reads memory forwards, four times faster than in cluster order),
    where each shard starts in it, and the same for the identity map's rows."""
    plan = _ShardPlan(cluster_of, okeys, shard_rows)
    by_cluster = key_order(cluster_of)
    in_order = cluster_of[by_cluster]
    first = np.ones(len(in_order), dtype=bool)
    first[1:] = in_order[1:] != in_order[:-1]
    starts = np.flatnonzero(first)  # each cluster's run: its shard is looked up once
    shard_of = np.empty(len(cluster_of), dtype=np.int16 if plan.count < (1 << 15) - 1 else np.int64)
    shard_of[by_cluster] = np.repeat(plan.shards(in_order[starts]), np.diff(np.append(starts, len(in_order))))
    del by_cluster, in_order, first, starts
    placement = np.argsort(shard_of, kind="stable")  # a radix sort for 16-bit shard numbers
    shard_bounds = np.searchsorted(shard_of[placement], np.arange(-1, plan.count + 1))
    identity_shard = plan.shards(identity_cluster)
    identity_order = np.argsort(identity_shard, kind="stable")
    identity_bounds = np.searchsorted(identity_shard[identity_order], np.arange(0, plan.count + 1))
    return plan, placement, shard_bounds, identity_order, identity_bounds


class _ShardCodes:
    """Each rebuild shard's join of records to profiles, as ``build_profiles`` takes it
    (``assignment``), from what the rebuild already holds: each record's profile as its row
    in ``result.components`` (sorted by id), and the same for each identity map row. A
    shard's codes then cost integer work alone, where joining would hash or parse its
    profile ids."""

    def __init__(self, profile_of: pa.DictionaryArray, map_ranks: np.ndarray) -> None:
        self.ids = profile_of.dictionary.cast(pa.large_string())
        self.indices = profile_of.indices.fill_null(0).to_numpy(zero_copy_only=False).astype(np.int64)
        self.map_ranks = map_ranks

    def for_shard(
        self, rows: np.ndarray, local: np.ndarray, identity_rows: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray, pa.Array, np.ndarray]:
        """``rows``: the shard's records; ``local``: positions among them of those with a
        profile, in record_profiles' order; ``identity_rows``: its identity map rows."""
        record_ranks = self.indices[rows[local]]
        map_ranks = self.map_ranks[identity_rows]
        # The shard's profiles: a mark per profile, then codes by counting (no sort).
        present = np.zeros(len(self.ids), dtype=bool)
        present[record_ranks] = True
        present[map_ranks] = True
        code = np.cumsum(present) - 1
        return local, code[record_ranks], self.ids.take(pa.array(np.flatnonzero(present))), code[map_ranks]


class _ShardPlan:
    """How a full rebuild splits the clusters into shards of about ``rows`` records.

    A cluster's profiles depend on its own records alone, except that an order counts once
    across the table: clusters holding deliveries of one order go into one shard (that of
    the smallest of them), as an incremental run recomputes them together. Otherwise a
    shard is a range of cluster ids, so its rows go into the cluster-ordered tables in
    order."""

    def __init__(self, cluster_of: np.ndarray, okeys: np.ndarray, rows: int) -> None:
        has = cluster_of != NO_CLUSTER
        ordered = np.sort(cluster_of[has])
        first = np.ones(len(ordered), dtype=bool)
        first[1:] = ordered[1:] != ordered[:-1]
        self.clusters = ordered[first]
        n = len(self.clusters)
        counts = np.diff(np.append(np.flatnonzero(first), len(ordered)))
        representative = np.arange(n)
        linked = has & (okeys != NO_CLUSTER)
        if linked.any():
            node = np.searchsorted(self.clusters, cluster_of[linked])
            _, order_node = np.unique(okeys[linked], return_inverse=True)
            size = n + int(order_node.max()) + 1
            graph = coo_matrix((np.ones(len(node), dtype=np.int8), (node, n + order_node)), shape=(size, size))
            _, labels = connected_components(graph, directed=False)
            smallest = np.full(int(labels.max()) + 1, n, dtype=np.int64)
            np.minimum.at(smallest, labels[:n], np.arange(n))
            representative = smallest[labels[:n]]
        per_representative = np.bincount(representative, weights=counts, minlength=n).astype(np.int64)
        before = np.cumsum(per_representative) - per_representative
        self.shard_of_cluster = (before // max(int(rows), 1))[representative]
        self.count = int(self.shard_of_cluster.max()) + 1 if n else 0

    def shards(self, clusters: np.ndarray) -> np.ndarray:
        """The shard of each cluster id; -1 for NO_CLUSTER (a record with no identifier)."""
        clusters = np.asarray(clusters, dtype=np.int64)
        out = np.full(len(clusters), -1, dtype=np.int64)
        known = clusters != NO_CLUSTER
        if not len(self.clusters) or not known.any():
            return out
        wanted = clusters[known]
        try:
            # Cluster ids are profile numbers (sha256 prefixes), spread evenly: a bucketed
            # search, as for profile ids (flipping the sign bit keeps the order as uint64).
            flip = np.uint64(1 << 63)
            at = positions_in(self.clusters.view(np.uint64) ^ flip, wanted.view(np.uint64) ^ flip)
            out[known] = self.shard_of_cluster[at]
        except ValueError:  # a cluster that holds no record: any shard will do
            at = np.minimum(np.searchsorted(self.clusters, wanted), len(self.clusters) - 1)
            out[known] = np.where(self.clusters[at] == wanted, self.shard_of_cluster[at], 0)
        return out
