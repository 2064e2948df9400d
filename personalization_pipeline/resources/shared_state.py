"""State shared by every run and process that talks to one vendor account.

Rate-limit buckets, circuit breakers and connection-slot leases live in a small SQLite
file (the coordination file), updated under `BEGIN IMMEDIATE` so concurrent processes
serialise on it. Secrets that rotate (OAuth tokens) live in the secret
store: a 0600 JSON file locally, read and written under an exclusive file lock.
"""

from __future__ import annotations

import fcntl
import json
import os
import random
import socket
import sqlite3
import threading
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

from personalization_pipeline.core.breaker import CLOSED, Admission, BreakerPolicy, BreakerState
from personalization_pipeline.core.breaker import admit as breaker_admit
from personalization_pipeline.core.breaker import record as breaker_record
from personalization_pipeline.core.clock import SYSTEM_CLOCK, Clock
from personalization_pipeline.core.ratelimit import RateLimit, backfill_share, gcra_admit


def connect_wal(path: str | os.PathLike, **kwargs) -> sqlite3.Connection:
    """A connection in WAL mode (autocommit unless `isolation_level` is given).

    Switching the journal mode takes an exclusive lock and does not wait on the busy
    timeout, so with many processes opening the file at once it is done only when the file
    is not in WAL mode yet (the mode is persistent), retrying briefly.
    """
    kwargs.setdefault("isolation_level", None)
    conn = sqlite3.connect(path, timeout=30, **kwargs)
    for attempt in range(50):
        try:
            if conn.execute("PRAGMA journal_mode").fetchone()[0].lower() != "wal":
                conn.execute("PRAGMA journal_mode=WAL")
            return conn
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) and "busy" not in str(exc):
                raise
            time.sleep(0.01 * (attempt + 1))
    raise sqlite3.OperationalError(f"could not open {path} in WAL mode: it stayed locked")


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
            conn = connect_wal(self._path)
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

    def acquire_shared(self, key: str, limit: RateLimit, backfill: bool, live_reserve: float) -> float:
        """`acquire` for a run that may be a backfill: a backfill's request first waits
        in the bucket all backfill runs of the account share (`backfill_share`), so live
        pulls keep `live_reserve` of the rate and never queue behind a backfill's backlog.
        Returns the seconds waited."""
        waited = 0.0
        if backfill and live_reserve > 0:
            waited += self.acquire(f"{key}:backfill", backfill_share(limit, live_reserve))
        return waited + self.acquire(key, limit)

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



class _CoordinationFile:
    """A per-thread connection to the coordination file, and short write transactions."""

    def __init__(self, db_path: str | os.PathLike, clock: Clock) -> None:
        self._path = str(db_path)
        Path(self._path).parent.mkdir(parents=True, exist_ok=True)
        self._clock = clock
        self._local = threading.local()

    def _connect(self) -> sqlite3.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = connect_wal(self._path)
            self._local.conn = conn
        return conn

    @contextmanager
    def _immediate(self) -> Iterator[sqlite3.Connection]:
        conn = self._connect()
        conn.execute("BEGIN IMMEDIATE")
        try:
            yield conn
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise


_BREAKER_COLUMNS = ("state", "failures", "opened_at", "probe_until", "generation", "last_error")


class SharedCircuitBreaker(_CoordinationFile):
    """One vendor account's circuit breaker, kept in the coordination file so that every
    run and process sees the same state (see `core.breaker` for the transitions)."""

    def __init__(
        self,
        db_path: str | os.PathLike,
        key: str,
        policy: BreakerPolicy | None = None,
        clock: Clock = SYSTEM_CLOCK,
    ) -> None:
        super().__init__(db_path, clock)
        self.key = key
        self.policy = policy or BreakerPolicy()
        with self._immediate() as conn:
            conn.execute(
                "CREATE TABLE IF NOT EXISTS breakers (key TEXT PRIMARY KEY, state TEXT NOT NULL, "
                "failures INTEGER NOT NULL, opened_at REAL, probe_until REAL NOT NULL, "
                "generation INTEGER NOT NULL, last_error TEXT NOT NULL)"
            )

    def _read(self, conn: sqlite3.Connection) -> BreakerState:
        row = conn.execute(
            f"SELECT {', '.join(_BREAKER_COLUMNS)} FROM breakers WHERE key = ?", (self.key,)
        ).fetchone()
        return BreakerState(*row) if row else BreakerState()

    def _write(self, conn: sqlite3.Connection, state: BreakerState) -> None:
        conn.execute(
            f"INSERT OR REPLACE INTO breakers (key, {', '.join(_BREAKER_COLUMNS)}) VALUES (?, ?, ?, ?, ?, ?, ?)",
            (self.key, state.state, state.failures, state.opened_at, state.probe_until, state.generation,
             state.last_error),
        )

    def state(self) -> BreakerState:
        return self._read(self._connect())

    def admit(self) -> tuple[Admission, BreakerState]:
        now = self._clock.now().timestamp()
        conn = self._connect()
        current = self._read(conn)
        if current.state == CLOSED:
            # The common case needs no write lock.
            return Admission(True, current.generation), current
        with self._immediate() as conn:
            current = self._read(conn)
            admission, new = breaker_admit(current, now, self.policy)
            if new != current:
                self._write(conn, new)
        return admission, new

    def record(self, admission: Admission, ok: bool | None, error: str = "") -> BreakerState:
        now = self._clock.now().timestamp()
        conn = self._connect()
        current = self._read(conn)
        if breaker_record(current, admission, ok, now, self.policy, error) == current:
            return current
        with self._immediate() as conn:
            current = self._read(conn)
            new = breaker_record(current, admission, ok, now, self.policy, error)
            if new != current:
                self._write(conn, new)
        return new

    def reset(self) -> None:
        """Close the breaker by hand (an operator who knows the vendor is back)."""
        with self._immediate() as conn:
            current = self._read(conn)
            self._write(conn, BreakerState(generation=current.generation + 1))


class SlotWaitTimeout(TimeoutError):
    pass


@dataclass(frozen=True)
class Lease:
    key: str
    slot: int
    holder: str


class SharedConnectionSlots(_CoordinationFile):
    """At most `limit` requests in flight per key across every process using the file.

    A lease is a row (key, slot) with an expiry, so a process killed mid-request frees its
    slot after `lease_seconds` at the latest; a holder on this host whose process is gone
    is reclaimed at once. Acquire polls with a short jittered sleep.
    """

    def __init__(
        self,
        db_path: str | os.PathLike,
        clock: Clock = SYSTEM_CLOCK,
        poll_seconds: float = 0.01,
    ) -> None:
        super().__init__(db_path, clock)
        self._poll = poll_seconds
        self._host = socket.gethostname()
        with self._immediate() as conn:
            conn.execute(
                "CREATE TABLE IF NOT EXISTS connection_leases (key TEXT NOT NULL, slot INTEGER NOT NULL, "
                "holder TEXT NOT NULL, host TEXT NOT NULL, pid INTEGER NOT NULL, expires_at REAL NOT NULL, "
                "PRIMARY KEY (key, slot))"
            )

    def try_acquire(self, key: str, limit: int, lease_seconds: float) -> Lease | None:
        now = self._clock.now().timestamp()
        with self._immediate() as conn:
            rows = conn.execute(
                "SELECT slot, host, pid, expires_at FROM connection_leases WHERE key = ?", (key,)
            ).fetchall()
            taken = {slot for slot, host, pid, expires in rows if expires > now and not self._dead(host, pid)}
            free = next((slot for slot in range(limit) if slot not in taken), None)
            if free is None:
                return None
            holder = uuid.uuid4().hex
            conn.execute(
                "INSERT OR REPLACE INTO connection_leases (key, slot, holder, host, pid, expires_at) "
                "VALUES (?, ?, ?, ?, ?, ?)",
                (key, free, holder, self._host, os.getpid(), now + lease_seconds),
            )
        return Lease(key, free, holder)

    def acquire(self, key: str, limit: int, lease_seconds: float, timeout: float | None = None) -> tuple[Lease, float]:
        """Wait for a free slot; returns the lease and the seconds waited."""
        started = self._clock.monotonic()
        while True:
            lease = self.try_acquire(key, limit, lease_seconds)
            waited = self._clock.monotonic() - started
            if lease is not None:
                return lease, waited
            if timeout is not None and waited >= timeout:
                raise SlotWaitTimeout(f"no free connection slot for {key} after {waited:.1f}s")
            self._clock.sleep(random.uniform(0.5, 1.5) * self._poll)

    def release(self, lease: Lease) -> None:
        with self._immediate() as conn:
            conn.execute(
                "DELETE FROM connection_leases WHERE key = ? AND slot = ? AND holder = ?",
                (lease.key, lease.slot, lease.holder),
            )

    def in_use(self, key: str) -> int:
        now = self._clock.now().timestamp()
        rows = self._connect().execute(
            "SELECT host, pid FROM connection_leases WHERE key = ? AND expires_at > ?", (key, now)
        ).fetchall()
        return sum(1 for host, pid in rows if not self._dead(host, pid))

    def _dead(self, host: str, pid: int) -> bool:
        if host != self._host:
            return False
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        except PermissionError:
            return False
        return False
