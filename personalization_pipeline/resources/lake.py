"""Staged history, held batches, quarantine and resolved tables as Parquet files (pyarrow).

Layout under the lake root:
  staged/<source>/<batch>.parquet      canonical rows; one file per partition or landing file
  held/<source>/<batch>.parquet        rows of writes whose batch failed its blocking check
  manifest.sqlite                      one row per staged or held batch: content hash, rows,
                                       verdict (passed = staged, failed = held) and reason
  quarantine/<source>/<batch>.parquet  rows that could not be staged, with the reason
  (the resolved tables live in the profile store, resources/profile_store.py)

Every write goes to a temporary file and is published with an atomic rename, so a killed
run never leaves half a file. Staged history is append-only by version: re-writing a
batch unions the new rows with the old and keeps one row per (source, source_record_id,
observed_at).

A batch that fails its blocking quarantine check (PRODUCT.md section 7) is held back: its
rows go to ``held/``, never into staged history, so profiles and the push never see them,
and the staged file of the same partition keeps what earlier, passing writes put there.
Staged history therefore only ever grows by passing batches, which is what lets the
profile step's ledger apply each (batch, content hash) once and still equal a full
rebuild. A re-run of the partition that passes (after a fix upstream, or a suite change)
stages its rows as usual; held files stay for inspection.

The manifest row is written after the file is published, so a batch the manifest names
always has its file; a staged file that a crash left unregistered is registered by
``register_unlisted`` (the full rebuild calls it).
"""

from __future__ import annotations

import hashlib
import os
import re
import sqlite3
import uuid
from datetime import datetime, timezone
from pathlib import Path
from typing import Optional

import dagster as dg
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import Field

from personalization_pipeline import settings
from personalization_pipeline.core import canonical

_SAFE = re.compile(r"[^A-Za-z0-9_.:=-]")


def _safe_name(batch: str) -> str:
    return _SAFE.sub("_", batch).replace(":", "-")


def write_atomic(table: pa.Table, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    pq.write_table(table, tmp, compression="zstd")
    os.replace(tmp, path)


VERDICTS = ("passed", "failed")
"""A batch write's verdict: ``passed`` rows are staged; ``failed`` ones are held back."""

_MANIFEST_DDL = """
create table if not exists batches (
    source text not null,
    batch text not null,
    verdict text not null,
    content_hash text not null,
    rows integer not null,
    reason text,
    written_at text not null,
    primary key (source, batch, verdict)
)
"""


def content_hash(frame: pd.DataFrame) -> str:
    """A digest of a batch's rows (a canonical frame, as ``Lake.read_file`` returns it)."""
    if frame.empty:
        return "empty"
    rows = pd.util.hash_pandas_object(frame[list(canonical.CANONICAL_COLUMNS)], index=False)
    return hashlib.sha256(rows.to_numpy().tobytes()).hexdigest()[:32]


class Lake:
    def __init__(self, root: Path) -> None:
        self.root = root

    # -- the manifest of batches -------------------------------------------------------

    def _manifest(self) -> sqlite3.Connection:
        self.root.mkdir(parents=True, exist_ok=True)
        conn = sqlite3.connect(self.root / "manifest.sqlite", timeout=60, isolation_level=None)
        conn.execute("pragma journal_mode=wal")
        conn.execute(_MANIFEST_DDL)
        return conn

    def _register(
        self, source: str, batch: str, verdict: str, digest: str, rows: int, reason: Optional[str]
    ) -> None:
        conn = self._manifest()
        try:
            conn.execute(
                "insert into batches values (?, ?, ?, ?, ?, ?, ?) on conflict (source, batch, verdict) do update "
                "set content_hash = excluded.content_hash, rows = excluded.rows, reason = excluded.reason, "
                "written_at = excluded.written_at",
                (source, batch, verdict, digest, rows, reason, datetime.now(timezone.utc).isoformat()),
            )
        finally:
            conn.close()

    def batches(self, verdict: Optional[str] = None) -> pd.DataFrame:
        """Batches in the manifest (all, or of one verdict): source, batch, verdict,
        content_hash, rows, reason, written_at."""
        conn = self._manifest()
        try:
            if verdict is None:
                return pd.read_sql_query("select * from batches order by source, batch, verdict", conn)
            return pd.read_sql_query(
                "select * from batches where verdict = ? order by source, batch", conn, params=(verdict,)
            )
        finally:
            conn.close()

    def register_unlisted(self) -> int:
        """Register staged files the manifest does not name (staged before the manifest
        existed, or by a run that stopped between publishing and registering). Only rows
        that passed validation are ever written to ``staged/``, so they count as passed.
        Returns how many were registered."""
        listed = self.batches("passed")
        known = {(s, _safe_name(b)) for s, b in zip(listed["source"], listed["batch"])}
        added = 0
        for path in sorted((self.root / "staged").glob("*/*.parquet")):
            if (path.parent.name, path.stem) in known:
                continue
            frame = self.read_file(path)
            self._register(
                path.parent.name, path.stem, "passed", content_hash(frame), len(frame), "registered from disk"
            )
            added += 1
        return added

    def read_batch(self, source: str, batch: str) -> pd.DataFrame:
        """A staged batch's rows (empty when it has no file)."""
        path = self.staged_path(source, batch)
        return self.read_file(path) if path.exists() else canonical.empty_frame()

    def read_held(self, source: str, batch: str) -> pd.DataFrame:
        path = self.held_path(source, batch)
        return self.read_file(path) if path.exists() else canonical.empty_frame()

    # -- staged history ----------------------------------------------------------------

    def staged_path(self, source: str, batch: str) -> Path:
        return self.root / "staged" / source / f"{_safe_name(batch)}.parquet"

    def held_path(self, source: str, batch: str) -> Path:
        return self.root / "held" / source / f"{_safe_name(batch)}.parquet"

    def write_staged(
        self,
        source: str,
        batch: str,
        frame: pd.DataFrame,
        verdict: str = "passed",
        reason: Optional[str] = None,
    ) -> dict[str, int]:
        """Union `frame` into the batch's file, one row per record version, and record the
        batch in the manifest with its content hash.

        `verdict` is the outcome of the batch's blocking check: ``passed`` stages the rows;
        ``failed`` holds them back in ``held/`` (profiles and the push never see them) and
        leaves the staged file as it was.

        Returns counts: rows_new (versions not seen before), rows_total (in the file), and
        rows_held (rows of this write held back: all of them, or 0).
        """
        if verdict not in VERDICTS:
            raise ValueError(f"verdict must be one of {VERDICTS}, got {verdict!r}")
        path = self.staged_path(source, batch) if verdict == "passed" else self.held_path(source, batch)
        incoming = canonical.to_frame(frame) if not frame.empty else canonical.empty_frame()
        if path.exists():
            old = self.read_file(path)
            both = pd.concat([old, incoming], ignore_index=True)
        else:
            old = canonical.empty_frame()
            both = incoming
        # Keep the first receipt of each version, so a re-run rewrites the same bytes.
        both = both.sort_values([*canonical.RECORD_KEY, "received_at"], kind="stable")
        merged = both.drop_duplicates(list(canonical.RECORD_KEY), keep="first").reset_index(drop=True)
        write_atomic(canonical.to_table(merged), path)
        self._register(source, batch, verdict, content_hash(merged), len(merged), reason)
        if verdict == "failed":
            return {"rows_new": 0, "rows_total": len(merged), "rows_held": len(incoming)}
        return {"rows_new": len(merged) - len(old), "rows_total": len(merged), "rows_held": 0}

    @staticmethod
    def read_file(path: Path) -> pd.DataFrame:
        return canonical.to_frame(pq.read_table(path).to_pandas())

    def read_staged(self, source: Optional[str] = None) -> pd.DataFrame:
        """All staged versions (of one source, or all)."""
        return self.read_staged_table(source).to_pandas(types_mapper={pa.int64(): pd.Int64Dtype()}.get)

    def staged_files(self, source: Optional[str] = None) -> list[Path]:
        base = self.root / "staged"
        return sorted((base / source).glob("*.parquet") if source else base.glob("*/*.parquet"))

    def read_staged_table(self, source: Optional[str] = None, columns: Optional[list[str]] = None) -> pa.Table:
        """All staged versions as one Arrow table (canonical schema, or those ``columns``)."""
        schema = canonical.CANONICAL_SCHEMA
        if columns is not None:
            schema = pa.schema([schema.field(c) for c in columns])
        files = self.staged_files(source)
        if not files:
            return schema.empty_table()
        tables = [pq.read_table(f, columns=columns, schema=canonical.CANONICAL_SCHEMA).cast(schema) for f in files]
        return pa.concat_tables(tables).combine_chunks()

    def write_quarantine(self, source: str, batch: str, rejects: list[dict]) -> int:
        path = self.root / "quarantine" / source / f"{_safe_name(batch)}.parquet"
        if not rejects:
            if path.exists():
                path.unlink()
            return 0
        frame = pd.DataFrame(
            {
                "source": source,
                "batch": batch,
                "delivery_id": [str(r.get("delivery_id")) for r in rejects],
                "reason": [str(r.get("reason")) for r in rejects],
                "received_at": [str(r.get("received_at")) for r in rejects],
                "raw": [repr(r.get("raw")) if not isinstance(r.get("raw"), str) else r["raw"] for r in rejects],
            }
        )
        write_atomic(pa.Table.from_pandas(frame, preserve_index=False), path)
        return len(frame)

    def write_validation_quarantine(self, source: str, batch: str, quarantine: pd.DataFrame) -> int:
        """Rows a validation suite refused, with the failed expectations and the raw record;
        one file per batch, rewritten (or removed) when the batch is re-validated."""
        path = self.root / "quarantine" / "validation" / source / f"{_safe_name(batch)}.parquet"
        if quarantine.empty:
            if path.exists():
                path.unlink()
            return 0
        frame = quarantine.assign(
            observed_at=quarantine["observed_at"].astype(str), received_at=quarantine["received_at"].astype(str)
        )
        write_atomic(pa.Table.from_pandas(frame, preserve_index=False), path)
        return len(frame)


class LakeResource(dg.ConfigurableResource):
    """Where staged history, quarantine and resolved tables are kept (local Parquet)."""

    root: Optional[str] = Field(default=None, description="Defaults to $PP_DATA_DIR/lake.")

    def get_lake(self) -> Lake:
        return Lake(settings.lake_dir(self.root))
