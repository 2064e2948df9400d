"""Keyed pipeline state in SQLite: the push ledger and sync failures.

The ledger is keyed by (list_id, member_hash) and records the payload the ESP
acknowledged; it is committed per acknowledged batch, so a run killed mid-push resends
only what was not acknowledged.
"""

from __future__ import annotations

import json
import sqlite3
from contextlib import closing
from datetime import datetime
from pathlib import Path
from typing import Iterable, Optional

import dagster as dg
from pydantic import Field

from personalization_pipeline import settings
from personalization_pipeline.resources.shared_state import connect_wal

_SCHEMA = """
CREATE TABLE IF NOT EXISTS push_ledger (
    list_id TEXT NOT NULL,
    member_hash TEXT NOT NULL,
    profile_id TEXT NOT NULL,
    payload_hash TEXT NOT NULL,
    payload TEXT NOT NULL,
    acknowledged_at TEXT NOT NULL,
    PRIMARY KEY (list_id, member_hash)
);
CREATE TABLE IF NOT EXISTS sync_failures (
    list_id TEXT NOT NULL,
    member_hash TEXT NOT NULL,
    payload_hash TEXT NOT NULL,
    error_code TEXT,
    message TEXT,
    attempts INTEGER NOT NULL,
    first_failed_at TEXT NOT NULL,
    last_failed_at TEXT NOT NULL,
    dead_lettered INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (list_id, member_hash)
);
"""


class StateStore:
    def __init__(self, path: Path) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        with closing(self._connect()) as conn, conn:
            conn.executescript(_SCHEMA)

    def _connect(self) -> sqlite3.Connection:
        # Default isolation: the ledger commits per batch in one transaction.
        conn = connect_wal(self.path, isolation_level="")
        return conn

    def acknowledged(self, list_id: str) -> dict[str, str]:
        with closing(self._connect()) as conn:
            rows = conn.execute(
                "SELECT member_hash, payload_hash FROM push_ledger WHERE list_id = ?", (list_id,)
            ).fetchall()
        return dict(rows)

    def dead_lettered(self, list_id: str) -> dict[str, str]:
        """member_hash -> payload_hash given up on; not retried until the payload changes."""
        with closing(self._connect()) as conn:
            rows = conn.execute(
                "SELECT member_hash, payload_hash FROM sync_failures WHERE list_id = ? AND dead_lettered = 1",
                (list_id,),
            ).fetchall()
        return dict(rows)

    def record_batch(
        self,
        list_id: str,
        acknowledged: Iterable[tuple[str, str, str, dict]],
        failed: Iterable[tuple[str, str, str, str]],
        now: datetime,
        dead_letter_after: int,
    ) -> None:
        """One transaction per acknowledged batch.

        acknowledged: (member_hash, profile_id, payload_hash, fields)
        failed: (member_hash, payload_hash, error_code, message)
        """
        stamp = now.isoformat()
        with closing(self._connect()) as conn, conn:
            for member_hash, profile_id, digest, fields in acknowledged:
                conn.execute(
                    "INSERT INTO push_ledger VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT(list_id, member_hash) "
                    "DO UPDATE SET profile_id=excluded.profile_id, payload_hash=excluded.payload_hash, "
                    "payload=excluded.payload, acknowledged_at=excluded.acknowledged_at",
                    (list_id, member_hash, profile_id, digest, json.dumps(fields, sort_keys=True), stamp),
                )
                conn.execute(
                    "DELETE FROM sync_failures WHERE list_id = ? AND member_hash = ?", (list_id, member_hash)
                )
            for member_hash, digest, code, message in failed:
                conn.execute(
                    "INSERT INTO sync_failures VALUES (?, ?, ?, ?, ?, 1, ?, ?, 0) "
                    "ON CONFLICT(list_id, member_hash) DO UPDATE SET "
                    "attempts = CASE WHEN sync_failures.payload_hash = excluded.payload_hash "
                    "THEN sync_failures.attempts + 1 ELSE 1 END, "
                    "payload_hash = excluded.payload_hash, error_code = excluded.error_code, "
                    "message = excluded.message, last_failed_at = excluded.last_failed_at",
                    (list_id, member_hash, digest, code, message, stamp, stamp),
                )
                conn.execute(
                    "UPDATE sync_failures SET dead_lettered = 1 WHERE list_id = ? AND member_hash = ? "
                    "AND attempts >= ?",
                    (list_id, member_hash, dead_letter_after),
                )

    def failures(self, list_id: str) -> list[dict]:
        with closing(self._connect()) as conn:
            conn.row_factory = sqlite3.Row
            rows = conn.execute("SELECT * FROM sync_failures WHERE list_id = ?", (list_id,)).fetchall()
        return [dict(r) for r in rows]


class StateStoreResource(dg.ConfigurableResource):
    """Keyed pipeline state (push ledger, sync failures): SQLite locally."""

    path: Optional[str] = Field(default=None, description="Defaults to $PP_DATA_DIR/state/pipeline.sqlite.")

    def get_store(self) -> StateStore:
        return StateStore(Path(self.path) if self.path else settings.state_dir() / "pipeline.sqlite")
