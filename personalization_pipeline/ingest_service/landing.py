"""The durable landing zone the ingest service writes and the stream sensor reads.

Layout under ``landing_dir``::

    open/<utc-timestamp>-<pid>-<seq>.jsonl               being appended to (never read downstream)
    ready/YYYY/MM/DD/HH/<utc-timestamp>-<pid>-<seq>.jsonl published, immutable

Each line is one envelope (see ``app.py``). A request is acknowledged only after its
lines are written and ``fsync``ed, with group commit: one ``fsync`` releases every
request that wrote before it (see ``LandingWriter``).

Files are published by ``os.rename`` into ``ready/`` (then the directories are
``fsync``ed) when they reach ``rotate_bytes`` or are ``rotate_seconds`` old, checked by a
background thread's own timer, so a quiet stream still publishes within seconds. The directory
and timestamp in a published name are those of publication, so listing ``ready/`` in name
order gives files in the order one process published them. Empty files are never
published. At start-up, files left in ``open/`` by a crashed process are published: every
acknowledged line in them is durable. A live writer holds an exclusive ``flock`` on its
open file, so a second process sharing the landing dir never publishes it from under it.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import errno
import fcntl
import json
import logging
import os
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

log = logging.getLogger(__name__)

OPEN_DIR = "open"
READY_DIR = "ready"
SUFFIX = ".jsonl"


class LandingClosedError(RuntimeError):
    """Raised when appending to a writer that is closed or was never started."""


_dumps = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"), allow_nan=False).encode
_dumps_ascii = json.JSONEncoder(ensure_ascii=True, separators=(",", ":"), allow_nan=False).encode


def encode_lines(records: Iterable[Mapping[str, Any]]) -> bytes:
    """Envelopes -> JSON Lines bytes (compact UTF-8, one trailing newline per record).

    A record holding a lone surrogate (legal in JSON text, not in UTF-8) is written with
    ASCII escapes instead, so it still round-trips. Raises ``ValueError`` for NaN or
    infinities and ``RecursionError`` for absurd nesting.
    """
    parts = []
    for record in records:
        try:
            parts.append((_dumps(record) + "\n").encode("utf-8"))
        except UnicodeEncodeError:
            parts.append((_dumps_ascii(record) + "\n").encode("ascii"))
    return b"".join(parts)


def _utc_stamp(epoch: float) -> tuple[datetime, str]:
    when = datetime.fromtimestamp(epoch, timezone.utc)
    return when, when.strftime("%Y%m%dT%H%M%S.%fZ")


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _makedirs_durable(path: Path) -> None:
    """Create ``path`` and any missing parents, fsyncing each parent that gained an entry."""
    missing = []
    p = path
    while not p.exists():
        missing.append(p)
        p = p.parent
    for d in reversed(missing):
        try:
            os.mkdir(d)
        except FileExistsError:
            continue
        _fsync_dir(d.parent)


@dataclass(eq=False)
class _OpenFile:
    path: Path
    fd: int
    opened_monotonic: float
    size: int = 0


@dataclass
class _LoopSync:
    """Per event loop: appends waiting for a sync, and whether one is queued or running."""

    pending: list[tuple[int, asyncio.Future]] = field(default_factory=list)
    scheduled: bool = False
    inflight: bool = False


@dataclass
class LandingStats:
    appends: int = 0
    lines: int = 0
    bytes_written: int = 0
    fsyncs: int = 0
    files_published: int = 0
    leftovers_published: int = 0
    write_errors: int = 0
    fsync_errors: int = 0
    publish_errors: int = 0
    last_published: str | None = None
    fsync_seconds_sum: float = 0.0
    fsync_seconds_max: float = 0.0

    def note_fsync(self, seconds: float) -> None:
        self.fsyncs += 1
        self.fsync_seconds_sum += seconds
        self.fsync_seconds_max = max(self.fsync_seconds_max, seconds)


class LandingWriter:
    """Appends JSON Lines durably under ``landing_dir`` and publishes rotated files.

    Use ``start()`` before appending and ``close()`` at the end (it publishes the open
    file). ``append`` / ``append_bytes`` return once the data is fsynced;
    ``append_async`` / ``append_bytes_async`` await the same from an event loop.

    Group commit: every append writes its lines into the open file under a lock (a
    page-cache copy, microseconds) and gets a sequence number; one ``fsync`` settles every
    write made before it began. On an event loop, the appends of one loop iteration are
    synced together by one job on a single fsync thread; whatever arrives while that job
    runs waits and goes in the next job, together, so under load each ``fsync`` serves
    many requests and the loop keeps serving while the disk works. Each job costs one
    thread hand-off, not one per request: hand-offs per request (a first version) cost
    150-250 us of CPU per request at 2k requests/s, mostly waiting for the GIL.
    ``sync_in_thread=False`` runs the ``fsync`` on the loop itself instead (about as fast
    when fsync takes ~0.2 ms, worse when the disk is slow, since the loop then idles).
    Threads calling ``append`` sync themselves; concurrent ones share an ``fsync`` too.

    A background thread rotates the open file by age (its own timer, so a quiet stream
    still publishes within seconds) and by size, and retries failed publications.
    ``on_publish`` is called with each published path (under the writer's lock: keep it
    quick, e.g. ``S3Uploader.submit``).
    """

    def __init__(
        self,
        landing_dir: str | os.PathLike[str],
        *,
        rotate_bytes: int = 8 << 20,
        rotate_seconds: float = 5.0,
        clock: Callable[[], float] = time.time,
        sync_in_thread: bool = True,
        on_publish: Callable[[Path], None] | None = None,
    ) -> None:
        self.landing_dir = Path(landing_dir)
        self._on_publish = on_publish  # called with each published path (e.g. the S3 uploader)
        self.open_dir = self.landing_dir / OPEN_DIR
        self.ready_dir = self.landing_dir / READY_DIR
        self.rotate_bytes = int(rotate_bytes)
        self.rotate_seconds = float(rotate_seconds)
        self._clock = clock
        self._pid = os.getpid()
        self._seq = 0
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)  # the rotation thread waits here
        self._synced = threading.Condition(self._lock)  # callers wait here for a sync
        self._file: _OpenFile | None = None
        self._dirty = False  # the open file has writes not yet fsynced
        self._write_seq = 0  # number of appends written
        self._synced_seq = 0  # appends up to here are settled: durable, or failed below
        self._failed: list[tuple[int, int]] = []  # (after, upto] lost to a failed fsync
        self._loops: dict[asyncio.AbstractEventLoop, _LoopSync] = {}
        self._executor = (
            concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="landing-fsync")
            if sync_in_thread
            else None
        )
        self._unpublished: list[Path] = []
        self._syncing = False  # an fsync is running outside the lock
        self._closing = False
        self._started = False
        self._thread: threading.Thread | None = None
        self.stats = LandingStats()

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> list[Path]:
        """Create the directories, publish leftovers from a crash, start the rotation thread.

        Returns the paths of the leftover files that were published.
        """
        if self._started:
            raise RuntimeError("LandingWriter already started")
        _makedirs_durable(self.open_dir)
        _makedirs_durable(self.ready_dir)
        published = self._publish_leftovers()
        self._started = True
        self._thread = threading.Thread(
            target=self._run, name=f"landing-rotate-{self.landing_dir.name}", daemon=True
        )
        self._thread.start()
        return published

    def close(self, timeout: float | None = 30.0) -> None:
        """Stop accepting appends, sync and publish the open file, stop the thread."""
        with self._cond:
            already = self._closing
            self._closing = True
            if self._started and not already:
                self._retire_locked()
            self._cond.notify_all()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)
        if self._executor is not None:
            self._executor.shutdown(wait=False)

    def __enter__(self) -> "LandingWriter":
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def running(self) -> bool:
        return bool(self._started and not self._closing and self._thread and self._thread.is_alive())

    def writable(self) -> bool:
        """True when the writer runs and both landing directories accept new files."""
        return (
            self.running
            and os.access(self.open_dir, os.W_OK | os.X_OK)
            and os.access(self.ready_dir, os.W_OK | os.X_OK)
        )

    # ------------------------------------------------------------------ appending

    def append_bytes(self, data: bytes) -> None:
        """Write complete lines and return once they are fsynced (``OSError`` if not)."""
        if not data:
            return
        seq = self._append(data)
        error = self._sync_and_check([seq])[0]
        if error is not None:
            raise error

    def append(self, records: Iterable[Mapping[str, Any]]) -> None:
        """Append envelopes as JSON Lines and return once they are fsynced."""
        self.append_bytes(encode_lines(records))

    async def append_bytes_async(self, data: bytes) -> None:
        """Write complete lines now; return once a sync on this loop made them durable."""
        if not data:
            return
        loop = asyncio.get_running_loop()
        seq = self._append(data)
        fut = loop.create_future()
        state = self._loops.get(loop)
        if state is None:
            state = self._loops[loop] = _LoopSync()
        state.pending.append((seq, fut))
        if not state.scheduled and not state.inflight:
            state.scheduled = True
            loop.call_soon(self._loop_sync, loop, state)
        await fut

    async def append_async(self, records: Iterable[Mapping[str, Any]]) -> None:
        await self.append_bytes_async(encode_lines(records))

    def rotate(self) -> None:
        """Sync and publish the open file now (if it holds anything)."""
        with self._cond:
            if not self._started or self._closing:
                raise LandingClosedError("landing writer is not running")
            self._retire_locked()

    def _append(self, data: bytes) -> int:
        with self._cond:
            if not self._started or self._closing:
                raise LandingClosedError("landing writer is not running")
            f = self._file or self._open_new()
            start = f.size
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(f.fd, view) :]
            except OSError as exc:
                # Not acknowledged, so not kept: cut the partial write off, then stop
                # using the file (its earlier lines are synced and published), so that a
                # failed cut can never glue a torn line to an acknowledged one.
                self.stats.write_errors += 1
                log.error("landing write failed: %s", exc)
                try:
                    os.ftruncate(f.fd, start)
                    f.size = start
                except OSError:
                    pass
                self._retire_locked()
                raise
            f.size += len(data)
            self._dirty = True
            self._write_seq += 1
            self.stats.appends += 1
            self.stats.lines += data.count(b"\n")
            self.stats.bytes_written += len(data)
            seq = self._write_seq
            if f.size >= self.rotate_bytes:
                self._retire_locked()  # once per rotate_bytes: keeps files near the limit
            return seq

    def _loop_sync(self, loop: asyncio.AbstractEventLoop, state: "_LoopSync") -> None:
        state.scheduled = False
        batch, state.pending = state.pending, []
        if not batch:
            return
        seqs = [seq for seq, _ in batch]
        if self._executor is None:
            self._settle(batch, self._sync_and_check(seqs))
            return
        state.inflight = True
        job = self._executor.submit(self._sync_and_check, seqs)

        def done(job: concurrent.futures.Future) -> None:
            try:
                loop.call_soon_threadsafe(self._loop_synced, loop, state, batch, job)
            except RuntimeError:  # the loop is closed; nobody is waiting any more
                pass

        job.add_done_callback(done)

    def _loop_synced(self, loop, state: "_LoopSync", batch, job: concurrent.futures.Future) -> None:
        state.inflight = False
        try:
            errors = job.result()
        except Exception as exc:  # noqa: BLE001
            errors = [OSError(f"landing sync failed: {exc}")] * len(batch)
        self._settle(batch, errors)
        if state.pending and not state.scheduled:
            # Everything that arrived during that sync goes in the next one, together.
            state.scheduled = True
            self._loop_sync(loop, state)

    @staticmethod
    def _settle(batch: list[tuple[int, asyncio.Future]], errors: list[OSError | None]) -> None:
        for (_, fut), error in zip(batch, errors):
            if fut.done():  # the request was cancelled (client went away)
                continue
            if error is None:
                fut.set_result(None)
            else:
                fut.set_exception(error)

    def _sync_and_check(self, seqs: list[int]) -> list[OSError | None]:
        self._sync_upto(max(seqs))
        with self._cond:
            if not self._failed:
                return [None] * len(seqs)
            return [
                OSError("landing fsync failed; the event was not stored durably")
                if any(after < seq <= upto for after, upto in self._failed)
                else None
                for seq in seqs
            ]

    def _sync_upto(self, seq: int) -> None:
        """Return once appends up to ``seq`` are settled. One caller at a time fsyncs,
        outside the lock (on a duplicate descriptor, so a rotation meanwhile is harmless);
        the others wait for it, and its sync covers every write made before it began."""
        with self._cond:
            while seq > self._synced_seq and self._syncing:
                self._synced.wait()
            if seq <= self._synced_seq:
                return
            self._syncing = True
            target = self._write_seq
            f = self._file if self._dirty else None
            after = self._synced_seq
            self._dirty = False
            fd = os.dup(f.fd) if f is not None else None
        error: OSError | None = None
        started = time.perf_counter()
        try:
            if fd is not None:
                os.fsync(fd)
        except OSError as exc:
            error = exc
        finally:
            if fd is not None:
                os.close(fd)
            with self._cond:
                self._syncing = False
                if error is None:
                    if fd is not None:
                        self.stats.note_fsync(time.perf_counter() - started)
                else:
                    self.stats.fsync_errors += 1
                    log.error("landing fsync failed: %s", error)
                    self._failed = self._failed[-99:] + [(after, target)]
                    if self._file is f:
                        self._file = None
                        self._publish_file(f)
                self._synced_seq = max(self._synced_seq, target)
                # Only callers are woken: waking the rotation thread here (it shares the
                # lock) made every sync a GIL hand-off, ~150 us of CPU per request.
                self._synced.notify_all()

    def _sync_locked(self) -> None:
        """Sync the open file while holding the lock (rotation, close). Also when a sync
        outside the lock is still running: it may not have reached the disk yet."""
        target = self._write_seq
        f = self._file
        if f is not None and (self._dirty or self._syncing):
            try:
                started = time.perf_counter()
                os.fsync(f.fd)
                self.stats.note_fsync(time.perf_counter() - started)
            except OSError as exc:
                # After a failed fsync the kernel may have dropped the dirty pages: nothing
                # written since the last good sync counts as stored, and the file is retired.
                self.stats.fsync_errors += 1
                log.error("landing fsync failed: %s", exc)
                self._failed = self._failed[-99:] + [(self._synced_seq, target)]
                self._file = None
                self._publish_file(f)
            self._dirty = False
        self._synced_seq = target

    def _retire_locked(self) -> None:
        """Sync the open file, then publish it (or drop it when empty)."""
        self._sync_locked()
        f, self._file = self._file, None
        if f is not None:
            self._publish_file(f)

    # ------------------------------------------------------------------ rotation thread

    def _run(self) -> None:
        while True:
            try:
                with self._cond:
                    if self._closing:
                        return
                    f = self._file
                    if f is not None and (
                        f.size >= self.rotate_bytes
                        or time.monotonic() - f.opened_monotonic >= self.rotate_seconds
                    ):
                        self._retire_locked()
                        f = None
                    timeout = None
                    if f is not None:
                        timeout = f.opened_monotonic + self.rotate_seconds - time.monotonic()
                    if self._unpublished:
                        self._retry_unpublished()
                        timeout = 1.0 if timeout is None else min(timeout, 1.0)
                    if timeout is None or timeout > 0:
                        self._cond.wait(timeout)
            except Exception:  # keep the thread alive whatever happens
                log.exception("landing rotation error")
                time.sleep(0.05)

    # ------------------------------------------------------------------ files

    def _next_name(self) -> tuple[datetime, str]:
        self._seq += 1
        when, stamp = _utc_stamp(self._clock())
        return when, f"{stamp}-{self._pid}-{self._seq:06d}{SUFFIX}"

    def _open_new(self) -> _OpenFile:
        _, name = self._next_name()
        path = self.open_dir / name
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND | os.O_CLOEXEC, 0o640)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            _fsync_dir(self.open_dir)  # the new name itself must survive a crash
        except BaseException:
            os.close(fd)
            raise
        self._file = _OpenFile(path, fd, time.monotonic())
        self._dirty = False
        self._cond.notify()  # the rotation thread's age timer now has a deadline
        return self._file

    def _ready_path(self) -> Path:
        while True:
            when, name = self._next_name()
            folder = self.ready_dir / f"{when:%Y}" / f"{when:%m}" / f"{when:%d}" / f"{when:%H}"
            path = folder / name
            if not path.exists():
                return path

    def _publish_path(self, src: Path) -> Path:
        dest = self._ready_path()
        _makedirs_durable(dest.parent)
        os.rename(src, dest)
        _fsync_dir(dest.parent)
        _fsync_dir(src.parent)
        self.stats.files_published += 1
        self.stats.last_published = str(dest)
        if self._on_publish is not None:
            try:
                self._on_publish(dest)
            except Exception:  # the file is published; a start-up scan picks it up again
                log.exception("on_publish hook failed for %s", dest.name)
        return dest

    def _publish_file(self, f: _OpenFile) -> Path | None:
        try:
            if f.size == 0:
                os.unlink(f.path)
                return None
            try:
                return self._publish_path(f.path)
            except OSError as exc:
                self.stats.publish_errors += 1
                log.error("publishing %s failed (will retry): %s", f.path.name, exc)
                self._unpublished.append(f.path)
                return None
        finally:
            os.close(f.fd)  # releases the flock only after the rename

    def _retry_unpublished(self) -> None:
        still = []
        for path in self._unpublished:
            try:
                if path.exists():
                    self._publish_path(path)
            except OSError:
                still.append(path)
        self._unpublished = still

    def _publish_leftovers(self) -> list[Path]:
        published = []
        for path in sorted(self.open_dir.glob(f"*{SUFFIX}")):
            try:
                fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
            except FileNotFoundError:
                continue
            try:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except OSError as exc:
                    if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                        continue  # a live writer in another process owns it
                    raise
                if os.fstat(fd).st_size == 0:
                    os.unlink(path)
                    continue
                os.fsync(fd)  # a crashed process may have left it only in the page cache
                dest = self._publish_path(path)
                self.stats.leftovers_published += 1
                published.append(dest)
                log.info("published leftover landing file %s", dest.name)
            finally:
                os.close(fd)
        return published

    def snapshot(self) -> dict[str, Any]:
        """Counters for the health endpoint."""
        s = self.stats
        f = self._file
        return {
            "appends": s.appends,
            "lines": s.lines,
            "bytes_written": s.bytes_written,
            "fsyncs": s.fsyncs,
            "files_published": s.files_published,
            "leftovers_published": s.leftovers_published,
            "write_errors": s.write_errors,
            "fsync_errors": s.fsync_errors,
            "publish_errors": s.publish_errors,
            "open_file_bytes": f.size if f else 0,
            # Landing lag: how long the oldest unpublished event has waited to be published.
            "open_file_age_seconds": round(time.monotonic() - f.opened_monotonic, 3) if f else 0.0,
            "fsync_seconds_sum": round(s.fsync_seconds_sum, 6),
            "fsync_seconds_max": round(s.fsync_seconds_max, 6),
            "pending_appends": self._write_seq - self._synced_seq,
            "last_published": Path(s.last_published).name if s.last_published else None,
        }


def list_ready_files(landing_dir: str | os.PathLike[str]) -> list[Path]:
    """Every published file under ``landing_dir/ready`` in name (publication) order."""
    ready = Path(landing_dir) / READY_DIR
    return sorted(ready.glob(f"*/*/*/*/*{SUFFIX}"), key=lambda p: p.relative_to(ready).as_posix())
