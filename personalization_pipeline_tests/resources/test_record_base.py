"""The record base (resources/record_base.py): rows found by record key, cluster and order
key equal a brute-force scan, across several written batches and repeated keys."""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from personalization_pipeline.core.incremental import NO_CLUSTER
from personalization_pipeline.resources.record_base import (
    PROFILE_INDEXES,
    STORE_SCHEMA,
    BaseTable,
    BaseTableWriter,
    BaseWriter,
    RecordBase,
)


def rows(rkeys, clusters, okeys) -> pa.Table:
    n = len(rkeys)
    columns = {
        "cluster": pa.array(clusters, pa.int64()),
        "rkey": pa.array(rkeys, pa.int64()),
        "profile_id": pa.array([f"p_{c}" if c != NO_CLUSTER else None for c in clusters], pa.string()),
        "okey": pa.array([o if o != NO_CLUSTER else None for o in okeys], pa.int64()),
    }
    for field in STORE_SCHEMA:
        if field.name not in columns:
            columns[field.name] = pa.array([f"{field.name}-{k}" for k in rkeys] if field.type == pa.string() else list(range(n)), field.type)
    return pa.table(columns)


def test_lookups_equal_a_scan(tmp_path):
    rng = np.random.default_rng(3)
    writer = BaseWriter(tmp_path / "b")
    batches = []
    for size in (0, 7, 40, 1, 25):
        rkeys = rng.choice(10**6, size, replace=False) + len(batches) * 10**6  # distinct across batches
        clusters = rng.choice([NO_CLUSTER, 5, 9, 11, -3], size)
        okeys = rng.choice([NO_CLUSTER, NO_CLUSTER, 100, 200], size)
        batches.append((rkeys, clusters, okeys))
        writer.add(rows(rkeys, clusters, okeys))
    writer.close()
    base = RecordBase(tmp_path / "b")
    rkey = np.concatenate([b[0] for b in batches])
    cluster = np.concatenate([b[1] for b in batches])
    okey = np.concatenate([b[2] for b in batches])
    assert len(base) == len(rkey) == 73
    for index, column, probes in (
        ("rkey", rkey, [rkey[[0, 5, 72]], np.array([-1, 2 * 10**7]), rkey]),
        ("cluster", cluster, [np.array([5]), np.array([9, 11, 12, -3]), np.array([NO_CLUSTER])]),
        ("okey", okey, [np.array([100]), np.array([200, 100, 300])]),
    ):
        for probe in probes:
            expected = np.flatnonzero(np.isin(column, probe) & ((column != NO_CLUSTER) | (index != "okey")))
            assert base.rows_of(index, probe).tolist() == expected.tolist(), (index, probe)
    picked = base.rows_of("cluster", np.array([9]))
    assert base.take(picked).column("rkey").to_pylist() == rkey[cluster == 9].tolist()
    assert base.contains("rkey", np.array([rkey[3], -5, rkey[-1]])).tolist() == [True, False, True]
    assert base.assignments().num_rows == int((cluster != NO_CLUSTER).sum())


def test_a_store_without_a_base_reads_as_empty(tmp_path):
    base = RecordBase(tmp_path / "none")
    assert len(base) == 0
    assert base.rows_of("cluster", np.array([1, 2])).tolist() == []
    assert base.contains("rkey", np.array([1])).tolist() == [False]
    assert base.take(np.empty(0, dtype=np.int64)).schema == STORE_SCHEMA


def test_rows_come_back_in_the_order_asked(tmp_path):
    writer = BaseWriter(tmp_path / "b")
    for start in (0, 4, 9):
        keys = list(range(start * 10, start * 10 + 5))
        writer.add(rows(keys, [7] * 5, [NO_CLUSTER] * 5))
    writer.close()
    base = RecordBase(tmp_path / "b")
    asked = np.array([14, 0, 3, 9, 10, 2])
    assert base.take(asked).column("rkey").to_pylist() == base.table.column("rkey").take(pa.array(asked)).to_pylist()
    assert base.column("rkey", asked).tolist() == base.table.column("rkey").take(pa.array(asked)).to_pylist()


def test_a_table_takes_its_schema_from_its_first_rows_or_from_close(tmp_path):
    """Profiles' columns follow the rules: the writer takes the first rows' schema, casts
    later rows to it, and writes an empty table with the schema given at close."""
    writer = BaseTableWriter(tmp_path / "b", "profiles", PROFILE_INDEXES)
    first = pa.table({"cluster": pa.array([4, 2], pa.int64()), "pkey": pa.array([7, 9], pa.int64()), "city": ["Oslo", None]})
    writer.add(first)
    writer.add(pa.table({"cluster": pa.array([3], pa.int32()), "pkey": pa.array([1], pa.int64()), "city": pa.nulls(1)}))
    writer.close()
    table = BaseTable(tmp_path / "b", "profiles", PROFILE_INDEXES)
    assert table.schema == first.schema and len(table) == 3
    assert table.rows_of("cluster", np.array([2, 3])).tolist() == [1, 2]
    assert table.take(table.rows_of("pkey", np.array([9])), ["city"]).column("city").to_pylist() == [None]
    assert table.contains("cluster", np.array([4, 5])).tolist() == [True, False]

    empty = BaseTableWriter(tmp_path / "e", "profiles", PROFILE_INDEXES)
    empty.close(first.schema)
    table = BaseTable(tmp_path / "e", "profiles", PROFILE_INDEXES)
    assert table.schema == first.schema and len(table) == 0
    assert table.rows_of("pkey", np.array([7])).tolist() == []
