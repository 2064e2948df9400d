"""The record base of a profile store: every record's latest version as of the last full
rebuild, in one Arrow IPC file next to the store's database, with sorted key arrays that
find a record, a cluster's records and an order's records by binary search.

Why a file and not the database's ``records`` table: a full rebuild writes ten million
records, and SQLite inserts about a million rows a second at best (``bench/report.md``:
36 s of a 92-115 s rebuild went to inserting records, 9 s more to their key index). An IPC
file is written at the speed of the disk cache, and read by memory map: a lookup touches
only the pages of the rows it takes. The base never changes after the rebuild. An
incremental run that changes a record writes it to the database (the ``records`` table,
the overlay) and puts its key in ``base_dead``, in the run's transaction, so the ledger
and the records still commit together and the base stays what it was when the rebuild
named it in ``CURRENT``.

Files, under ``<database file>.base/``:
  records.arrow         store rows (``STORE_SCHEMA``), a cluster's rows together
  rkey.npy, rkey_rows.npy            record keys, sorted, and the row of each
  cluster.npy, cluster_rows.npy      clusters, sorted, and the row of each
  okey.npy, okey_rows.npy            order keys (order rows only), sorted, and the row of each
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from personalization_pipeline.core import canonical
from personalization_pipeline.core.incremental import NO_CLUSTER

STORE_SCHEMA = pa.schema(
    [
        pa.field("cluster", pa.int64()),
        pa.field("rkey", pa.int64()),
        pa.field("profile_id", pa.string()),
        pa.field("okey", pa.int64()),
        *(
            pa.field(f.name, pa.string() if pa.types.is_string(f.type) else pa.int64())
            for f in canonical.CANONICAL_SCHEMA
        ),
    ]
)
"""A row of the store's records, in the base and in the database alike: timestamps as
int64 microseconds, booleans as 0/1."""

_INDEXES = ("rkey", "cluster", "okey")


def base_directory(database: Path) -> Path:
    return database.with_name(database.name + ".base")


class BaseWriter:
    """Writes a new base: rows in the order given (the rebuild gives a shard at a time,
    each in cluster order), then the sorted key arrays on ``close``."""

    def __init__(self, directory: Path) -> None:
        directory.mkdir(parents=True)
        self.directory = directory
        self._sink = pa.OSFile(str(directory / "records.arrow"), "wb")
        self._writer = pa.ipc.new_file(self._sink, STORE_SCHEMA)
        self._keys: dict[str, list[np.ndarray]] = {name: [] for name in _INDEXES}

    def add(self, rows: pa.Table) -> None:
        rows = rows.select(STORE_SCHEMA.names).cast(STORE_SCHEMA)
        self._writer.write_table(rows)
        for name in _INDEXES:
            self._keys[name].append(rows.column(name).fill_null(NO_CLUSTER).to_numpy())

    def close(self) -> None:
        self._writer.close()
        self._sink.close()
        for name in _INDEXES:
            keys = np.concatenate(self._keys[name]) if self._keys[name] else np.empty(0, dtype=np.int64)
            rows = np.arange(len(keys), dtype=np.int64)
            if name == "okey":  # only order rows have one
                rows = rows[keys != NO_CLUSTER]
                keys = keys[rows]
            order = np.argsort(keys, kind="stable")
            np.save(self.directory / f"{name}.npy", keys[order])
            np.save(self.directory / f"{name}_rows.npy", rows[order])
            self._keys[name] = []


class RecordBase:
    """A base, mapped read-only. A store without one (no base directory) reads as empty."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        path = directory / "records.arrow"
        if path.exists():
            reader = pa.ipc.open_file(pa.memory_map(str(path), "r"))
            self._batches = [reader.get_batch(i) for i in range(reader.num_record_batches)]
            self.table = pa.Table.from_batches(self._batches, schema=STORE_SCHEMA)
            self._sorted = {name: np.load(directory / f"{name}.npy", mmap_mode="r") for name in _INDEXES}
            self._rows = {name: np.load(directory / f"{name}_rows.npy", mmap_mode="r") for name in _INDEXES}
        else:
            self._batches = []
            self.table = STORE_SCHEMA.empty_table()
            self._sorted = {name: np.empty(0, dtype=np.int64) for name in _INDEXES}
            self._rows = {name: np.empty(0, dtype=np.int64) for name in _INDEXES}
        self._starts = np.cumsum([0] + [batch.num_rows for batch in self._batches]).astype(np.int64)

    def __len__(self) -> int:
        return self.table.num_rows

    def rows_of(self, index: str, keys: np.ndarray) -> np.ndarray:
        """The rows whose ``index`` column ("rkey", "cluster" or "okey") is one of ``keys``."""
        keys = np.unique(np.asarray(keys, dtype=np.int64))
        sorted_keys = self._sorted[index]
        if not len(keys) or not len(sorted_keys):
            return np.empty(0, dtype=np.int64)
        low = np.searchsorted(sorted_keys, keys, side="left")
        high = np.searchsorted(sorted_keys, keys, side="right")
        counts = high - low
        hit = counts > 0
        low, counts = low[hit], counts[hit]
        if not len(low):
            return np.empty(0, dtype=np.int64)
        # The ranges [low, high) as one array of positions in the sorted keys.
        starts = np.repeat(low - np.cumsum(counts) + counts, counts)
        positions = starts + np.arange(int(counts.sum()))
        return np.sort(np.asarray(self._rows[index][positions], dtype=np.int64))

    def contains(self, rkeys: np.ndarray) -> np.ndarray:
        """Whether each record key has a row in the base."""
        rkeys = np.asarray(rkeys, dtype=np.int64)
        sorted_keys = self._sorted["rkey"]
        if not len(sorted_keys):
            return np.zeros(len(rkeys), dtype=bool)
        at = np.minimum(np.searchsorted(sorted_keys, rkeys), len(sorted_keys) - 1)
        return np.asarray(sorted_keys[at] == rkeys)

    def _runs(self, rows: np.ndarray) -> Iterator[tuple[pa.RecordBatch, pa.Array]]:
        """(batch, positions in it) for each run of ``rows`` in one mapped batch, in order.
        Rows are taken batch by batch: a take over the whole chunked table would join the
        mapped chunks first."""
        rows = np.asarray(rows, dtype=np.int64)
        batch_of = np.searchsorted(self._starts, rows, side="right") - 1
        bounds = np.flatnonzero(np.diff(batch_of)) + 1
        for part, at in zip(np.split(rows, bounds), np.split(batch_of, bounds)):
            if len(part):
                yield self._batches[int(at[0])], pa.array(part - self._starts[at[0]])

    def take(self, rows: np.ndarray) -> pa.Table:
        """The rows at ``rows``, in that order (fastest sorted, as ``rows_of`` gives them)."""
        pieces = [batch.take(local) for batch, local in self._runs(rows)]
        return pa.Table.from_batches(pieces, schema=STORE_SCHEMA).combine_chunks()

    def column(self, name: str, rows: np.ndarray) -> np.ndarray:
        """An integer column ("rkey", "cluster", "okey") at ``rows``, nulls as NO_CLUSTER."""
        parts = [batch.column(name).take(local) for batch, local in self._runs(rows)]
        if not parts:
            return np.empty(0, dtype=np.int64)
        return pa.concat_arrays(parts).fill_null(NO_CLUSTER).to_numpy()

    def assignments(self) -> pa.Table:
        """(rkey, source, source_record_id, profile_id) of every row with a profile."""
        table = self.table.select(["rkey", "source", "source_record_id", "profile_id"])
        return table.filter(pc.is_valid(table.column("profile_id")))
