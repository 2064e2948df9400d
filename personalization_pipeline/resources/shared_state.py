"""State shared by every run and process that talks to one vendor account.

Rate-limit buckets live in a small SQLite file, updated under `BEGIN IMMEDIATE` so
concurrent processes serialise on it. Secrets that rotate (OAuth tokens) live in the secret
store: a 0600 JSON file locally, read and written under an exclusive file lock.
"""

from __future__ import annotations

import fcntl
import json
import os
import sqlite3
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

from personalization_pipeline.core.clock import SYSTEM_CLOCK, Clock
from personalization_pipeline.core.ratelimit import RateLimit, gcra_admit


class SharedRateLimiter:
    """A GCRA bucket per key in a SQLite file; every process using the file shares it."""

    def __init__(self, db_path: str | os.PathLike, clock: Clock = SYSTEM_CLOCK) -> None:
        self._path = str(db_path)
        Path(self._path).parent.mkdir(parents=True, exist_ok=True)
        self._clock = clock
        self._local = threading.local()
        with self._connect() as conn:
            conn.execute("CREATE TABLE IF NOT EXISTS buckets (key TEXT PRIMARY KEY, tat REAL NOT NULL)")

    def _connect(self) -> sqlite3.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = sqlite3.connect(self._path, timeout=30, isolation_level=None)
            conn.execute("PRAGMA journal_mode=WAL")
            self._local.conn = conn
        return conn

    def reserve(self, key: str, limit: RateLimit) -> float:
        """Reserve the next slot for `key`; returns how long the caller must wait first."""
        # Wall time, not monotonic: the value is compared across processes.
        now = self._clock.now().timestamp()
        conn = self._connect()
        conn.execute("BEGIN IMMEDIATE")
        try:
            row = conn.execute("SELECT tat FROM buckets WHERE key = ?", (key,)).fetchone()
            wait, new_tat = gcra_admit(row[0] if row else now, now, limit)
            conn.execute(
                "INSERT INTO buckets (key, tat) VALUES (?, ?) "
                "ON CONFLICT(key) DO UPDATE SET tat = excluded.tat",
                (key, new_tat),
            )
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        return wait

    def acquire(self, key: str, limit: RateLimit) -> float:
        """Wait for a slot; returns the seconds waited.

        After the wait the next slot is re-anchored on the moment we actually go: a
        sleep that overran (a busy machine) must not let the next request follow this
        one closer than the interval, or the vendor's rolling window counts one too many.
        """
        wait = self.reserve(key, limit)
        self._clock.sleep(wait)
        if limit.burst == 1:
            self.push_back(key, limit.interval)
        return wait

    def push_back(self, key: str, seconds: float) -> None:
        """After a 429 with Retry-After: nobody sharing the bucket sends before then."""
        until = self._clock.now().timestamp() + seconds
        conn = self._connect()
        conn.execute("BEGIN IMMEDIATE")
        try:
            conn.execute(
                "INSERT INTO buckets (key, tat) VALUES (?, ?) "
                "ON CONFLICT(key) DO UPDATE SET tat = max(tat, excluded.tat)",
                (key, until),
            )
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise


class SecretStore:
    """A JSON file with mode 0600 holding secrets that rotate (OAuth tokens).

    Values never leave through `repr` or logs; callers read them by name.
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self._path = Path(path)

    def __repr__(self) -> str:
        return f"SecretStore({str(self._path)!r})"

    @contextmanager
    def _locked(self) -> Iterator[dict]:
        self._path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self._path, os.O_RDWR | os.O_CREAT, 0o600)
        os.fchmod(fd, 0o600)
        with os.fdopen(fd, "r+") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            raw = handle.read()
            data = json.loads(raw) if raw.strip() else {}
            before = json.dumps(data, sort_keys=True)
            yield data
            after = json.dumps(data, sort_keys=True)
            if after != before:
                handle.seek(0)
                handle.truncate()
                handle.write(after)
                handle.flush()
                os.fsync(handle.fileno())

    def get(self, name: str) -> object | None:
        with self._locked() as data:
            return data.get(name)

    def put(self, name: str, value: object) -> None:
        with self._locked() as data:
            data[name] = value

    def update(self, name: str, fn: Callable[[object | None], object]) -> object:
        """Replace `name` with fn(current) while holding the lock (read-modify-write).

        Used for OAuth refreshes, so two processes never both spend one refresh token.
        """
        with self._locked() as data:
            data[name] = fn(data.get(name))
            return data[name]

    def delete(self, name: str) -> None:
        with self._locked() as data:
            data.pop(name, None)

