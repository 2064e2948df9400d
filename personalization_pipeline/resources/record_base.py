"""The base of a profile store: what the last full rebuild computed, in Arrow IPC files next
to the store's database, with sorted key arrays that find rows by binary search. Three
tables: every record's latest version, the identity map, and the resolved profiles.

Why files and not the database's tables: a full rebuild writes ten million records, three
million identifiers and a million wide profile rows, and SQLite inserts about a million
narrow rows a second at best (``bench/report.md``: records were half a 92-115 s rebuild,
the identity map and profiles 40 s more). An IPC file is written at the speed of the disk
cache, and read by memory map: a lookup touches only the pages of the rows it takes. The
base never changes after the rebuild. An incremental run writes what it changes to the
database (the overlay tables) and marks what those supersede (``base_dead`` for records,
by key; ``base_dead_clusters`` for identifiers and profiles, whose clusters it recomputes
whole), in the run's transaction, so the ledger and the outputs still commit together and
the base stays what it was when the rebuild named it in ``CURRENT``.

Files, under ``<database file>.base/``, for each table (records, identifiers, profiles):
  <table>.arrow                       the rows, a shard of clusters at a time
  <table>.<index>.npy, <table>.<index>.rows.npy   an index column's values, sorted, and the
                                      row of each (records: rkey, cluster, okey;
                                      identifiers: cluster, ikey; profiles: cluster, pkey)
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Iterator, Optional

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from personalization_pipeline.core import canonical
from personalization_pipeline.core.incremental import NO_CLUSTER, key_order

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

RECORD_INDEXES = ("rkey", "cluster", "okey")
IDENTIFIER_INDEXES = ("cluster", "ikey")
PROFILE_INDEXES = ("cluster", "pkey")  # pkey: a 64-bit hash of the profile id
IDENTIFIER_SCHEMA = pa.schema(
    [
        pa.field("cluster", pa.int64()),
        pa.field("identifier_type", pa.string()),
        pa.field("identifier_value", pa.string()),
        pa.field("ikey", pa.int64()),
        pa.field("profile_id", pa.string()),
        pa.field("first_seen", pa.int64()),
    ]
)
"""A row of the identity map: first_seen in int64 microseconds."""
_SPARSE = ("okey",)
"""Indexes of a column that only some rows have (order keys): rows without one are left out."""


def base_directory(database: Path) -> Path:
    return database.with_name(database.name + ".base")


class BaseTableWriter:
    """Writes one table of a new base: rows in the order given (the rebuild gives a shard
    at a time), then the sorted key arrays on ``close``. Without a
    ``schema`` the first rows added give it (profiles: their columns follow the rules)."""

    def __init__(self, directory: Path, name: str, indexes: tuple[str, ...], schema: Optional[pa.Schema] = None) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.directory, self.name, self.indexes, self.schema = directory, name, indexes, schema
        self._sink = self._writer = None
        self._keys: dict[str, list[np.ndarray]] = {index: [] for index in indexes}
        self._given: dict[str, int] = {}  # index -> rows it covers, for indexes given up front
        self._rows = 0

    def add(self, rows: pa.Table) -> None:
        if self.schema is None:
            self.schema = rows.schema
        rows = rows.select(self.schema.names).cast(self.schema)
        if self._writer is None:
            self._sink = pa.OSFile(str(self.directory / f"{self.name}.arrow"), "wb")
            self._writer = pa.ipc.new_file(self._sink, self.schema)
        self._writer.write_table(rows)
        self._rows += rows.num_rows
        for index in self.indexes:
            if index not in self._given:
                self._keys[index].append(rows.column(index).fill_null(NO_CLUSTER).to_numpy())

    def give_index(self, index: str, keys: np.ndarray) -> None:
        """Sort and save an index now, from ``keys``: the column's value in every row the
        table will hold, in order (a rebuild knows them before writing a row, and sorts
        them while other work waits on reading)."""
        self._given[index] = len(keys)
        self._save(index, np.asarray(keys, dtype=np.int64))

    def close(self, schema: Optional[pa.Schema] = None, threads: int = 1) -> None:
        """Finish the files; ``schema``: the table's, if no rows were added; ``threads``:
        how many key arrays to sort at once (numpy's sorts release the GIL; each sort
        holds a few times its keys' memory)."""
        if self._writer is None:
            self.add((self.schema or schema).empty_table())
        self._writer.close()
        self._sink.close()
        for index, covered in self._given.items():
            if covered != self._rows:
                raise ValueError(f"the {self.name} index {index} was given for {covered} rows; {self._rows} were written")
        pending = [index for index in self.indexes if index not in self._given]
        with ThreadPoolExecutor(max_workers=threads, thread_name_prefix="base-index") as pool:
            for done in [pool.submit(self._save_index, index) for index in pending]:
                done.result()

    def _save_index(self, index: str) -> None:
        keys = np.concatenate(self._keys[index])
        self._keys[index] = []
        self._save(index, keys)

    def _save(self, index: str, keys: np.ndarray) -> None:
        rows = np.arange(len(keys), dtype=np.int64)
        if index in _SPARSE:
            rows = rows[keys != NO_CLUSTER]
            keys = keys[rows]
        order = key_order(keys)
        np.save(self.directory / f"{self.name}.{index}.npy", keys[order])
        np.save(self.directory / f"{self.name}.{index}.rows.npy", rows[order])


class BaseWriter(BaseTableWriter):
    """The records of a new base."""

    def __init__(self, directory: Path) -> None:
        super().__init__(directory, "records", RECORD_INDEXES, STORE_SCHEMA)


class BaseTable:
    """One table of a base, mapped read-only. A store without it reads as empty (with
    ``schema``, or none at all)."""

    def __init__(self, directory: Path, name: str, indexes: tuple[str, ...], schema: Optional[pa.Schema] = None) -> None:
        self.directory = directory
        path = directory / f"{name}.arrow"
        if path.exists():
            reader = pa.ipc.open_file(pa.memory_map(str(path), "r"))
            self._batches = [reader.get_batch(i) for i in range(reader.num_record_batches)]
            self.schema = reader.schema
            self._sorted = {index: np.load(directory / f"{name}.{index}.npy", mmap_mode="r") for index in indexes}
            self._rows = {index: np.load(directory / f"{name}.{index}.rows.npy", mmap_mode="r") for index in indexes}
        else:
            self._batches = []
            self.schema = schema if schema is not None else pa.schema([(index, pa.int64()) for index in indexes])
            self._sorted = {index: np.empty(0, dtype=np.int64) for index in indexes}
            self._rows = {index: np.empty(0, dtype=np.int64) for index in indexes}
        self.table = pa.Table.from_batches(self._batches, schema=self.schema)
        self._starts = np.cumsum([0] + [batch.num_rows for batch in self._batches]).astype(np.int64)

    def __len__(self) -> int:
        return self.table.num_rows

    def rows_of(self, index: str, keys: np.ndarray) -> np.ndarray:
        """The rows whose ``index`` column is one of ``keys``, in row order."""
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

    def contains(self, index: str, keys: np.ndarray) -> np.ndarray:
        """Whether each key has a row in the table."""
        keys = np.asarray(keys, dtype=np.int64)
        sorted_keys = self._sorted[index]
        if not len(sorted_keys):
            return np.zeros(len(keys), dtype=bool)
        at = np.minimum(np.searchsorted(sorted_keys, keys), len(sorted_keys) - 1)
        return np.asarray(sorted_keys[at] == keys)

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

    def take(self, rows: np.ndarray, columns: Optional[list[str]] = None) -> pa.Table:
        """The rows at ``rows``, in that order (fastest sorted, as ``rows_of`` gives them)."""
        schema = self.schema if columns is None else pa.schema([self.schema.field(c) for c in columns])
        pieces = [
            (batch if columns is None else batch.select(columns)).take(local) for batch, local in self._runs(rows)
        ]
        return pa.Table.from_batches(pieces, schema=schema).combine_chunks()

    def column(self, name: str, rows: np.ndarray) -> np.ndarray:
        """An integer column at ``rows``, nulls as NO_CLUSTER."""
        parts = [batch.column(name).take(local) for batch, local in self._runs(rows)]
        if not parts:
            return np.empty(0, dtype=np.int64)
        return pa.concat_arrays(parts).fill_null(NO_CLUSTER).to_numpy()


class RecordBase(BaseTable):
    """The records of a base."""

    def __init__(self, directory: Path) -> None:
        super().__init__(directory, "records", RECORD_INDEXES, STORE_SCHEMA)

    def assignments(self) -> pa.Table:
        """(rkey, source, source_record_id, profile_id) of every row with a profile."""
        table = self.table.select(["rkey", "source", "source_record_id", "profile_id"])
        return table.filter(pc.is_valid(table.column("profile_id")))


class StoreBase:
    """The three tables of a base, mapped read-only."""

    def __init__(self, directory: Path) -> None:
        self.records = RecordBase(directory)
        self.identifiers = BaseTable(directory, "identifiers", IDENTIFIER_INDEXES, IDENTIFIER_SCHEMA)
        self.profiles = BaseTable(directory, "profiles", PROFILE_INDEXES)


class StoreBaseWriter:
    """The three tables of a new base, written side by side."""

    def __init__(self, directory: Path) -> None:
        self.records = BaseWriter(directory)
        self.identifiers = BaseTableWriter(directory, "identifiers", IDENTIFIER_INDEXES, IDENTIFIER_SCHEMA)
        self.profiles = BaseTableWriter(directory, "profiles", PROFILE_INDEXES)
