"""Staged history, quarantine and resolved tables as Parquet files (pyarrow).

Layout under the lake root:
  staged/<source>/<batch>.parquet      canonical rows; one file per partition or landing file
  quarantine/<source>/<batch>.parquet  rows that could not be staged, with the reason
  tables/<name>.parquet                resolved tables (identity map, profiles, provenance, ...)

Every write goes to a temporary file and is published with an atomic rename, so a killed
run never leaves half a file. Staged history is append-only by version: re-writing a
batch unions the new rows with the old and keeps one row per (source, source_record_id,
observed_at).
"""

from __future__ import annotations

import os
import re
import uuid
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


class Lake:
    def __init__(self, root: Path) -> None:
        self.root = root

    def staged_path(self, source: str, batch: str) -> Path:
        return self.root / "staged" / source / f"{_safe_name(batch)}.parquet"

    def write_staged(self, source: str, batch: str, frame: pd.DataFrame) -> dict[str, int]:
        """Union `frame` into the batch's file, one row per record version.

        Returns counts: rows_new (versions not seen before), rows_total (in the file).
        """
        path = self.staged_path(source, batch)
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
        return {"rows_new": len(merged) - len(old), "rows_total": len(merged)}

    @staticmethod
    def read_file(path: Path) -> pd.DataFrame:
        return canonical.to_frame(pq.read_table(path).to_pandas())

    def read_staged(self, source: Optional[str] = None) -> pd.DataFrame:
        """All staged versions (of one source, or all)."""
        base = self.root / "staged"
        files = sorted((base / source).glob("*.parquet") if source else base.glob("*/*.parquet"))
        if not files:
            return canonical.empty_frame()
        tables = [pq.read_table(f, schema=canonical.CANONICAL_SCHEMA) for f in files]
        return pa.concat_tables(tables).to_pandas(types_mapper={pa.int64(): pd.Int64Dtype()}.get)

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

    def write_table(self, name: str, frame: pd.DataFrame) -> None:
        write_atomic(pa.Table.from_pandas(frame, preserve_index=False), self.root / "tables" / f"{name}.parquet")

    def read_table(self, name: str) -> Optional[pd.DataFrame]:
        path = self.root / "tables" / f"{name}.parquet"
        return pq.read_table(path).to_pandas() if path.exists() else None


class LakeResource(dg.ConfigurableResource):
    """Where staged history, quarantine and resolved tables are kept (local Parquet)."""

    root: Optional[str] = Field(default=None, description="Defaults to $PP_DATA_DIR/lake.")

    def get_lake(self) -> Lake:
        return Lake(settings.lake_dir(self.root))
