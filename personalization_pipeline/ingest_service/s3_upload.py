"""Ships published landing files to S3 (the production landing zone).

Durability before the 2xx stays the local ``fsync`` (``landing.py``); S3 is where files go
*after* publication. ``S3Uploader`` keeps a queue of published files and uploads each one
from a background thread to ``s3://<bucket>/<prefix>/ready/YYYY/MM/DD/HH/<name>.jsonl``
(the same relative path as under the local ``ready/``), with ``Content-MD5`` so S3 checks
the bytes. The local copy is deleted only after S3 confirmed the upload; a failed upload is
retried with exponential backoff, forever. On start, every file still under ``ready/`` (a
previous process stopped or crashed before uploading it) is queued first.

A crash between the upload and the delete uploads the same bytes to the same key again:
an overwrite with identical content, so the zone never holds a file twice.
"""

from __future__ import annotations

import base64
import hashlib
import logging
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .landing import READY_DIR, _fsync_dir, list_ready_files

log = logging.getLogger(__name__)


def ready_key(prefix: str, relative: str) -> str:
    """``<prefix>/ready/<relative>`` with no empty path segment."""
    prefix = prefix.strip("/")
    return f"{prefix}/{READY_DIR}/{relative}" if prefix else f"{READY_DIR}/{relative}"


def make_s3_client(endpoint_url: str | None = None) -> Any:
    import boto3
    from botocore.config import Config

    return boto3.client(
        "s3",
        endpoint_url=endpoint_url or None,
        region_name=os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1",
        config=Config(connect_timeout=3, read_timeout=15, retries={"max_attempts": 2, "mode": "standard"}),
    )


@dataclass
class UploadStats:
    uploaded: int = 0
    uploaded_bytes: int = 0
    upload_errors: int = 0
    last_uploaded: str | None = None
    last_error: str | None = None


class S3Uploader:
    """Uploads published landing files to S3, then deletes the local copies.

    ``submit(path)`` queues a file (``LandingWriter(on_publish=uploader.submit)``);
    ``start()`` queues what is already under ``ready/`` and starts the thread; ``close()``
    stops it after trying the queue for up to ``timeout`` seconds (what is left stays on
    disk and goes at the next start).
    """

    def __init__(
        self,
        landing_dir: str | os.PathLike[str],
        bucket: str,
        prefix: str = "",
        *,
        endpoint_url: str | None = None,
        client: Any = None,
        retry_initial: float = 0.2,
        retry_max: float = 5.0,
    ) -> None:
        self.ready_dir = Path(landing_dir) / READY_DIR
        self.bucket = bucket
        self.prefix = prefix
        self.endpoint_url = endpoint_url
        self._client = client
        self.retry_initial = retry_initial
        self.retry_max = retry_max
        self._cond = threading.Condition()
        self._queue: list[Path] = []
        self._queued: set[Path] = set()
        self._attempts: dict[Path, int] = {}
        self._not_before: dict[Path, float] = {}
        self._closing = False
        self._drain_deadline: float | None = None
        self._thread: threading.Thread | None = None
        self.stats = UploadStats()

    def key_for(self, path: Path) -> str:
        return ready_key(self.prefix, Path(path).relative_to(self.ready_dir).as_posix())

    def start(self) -> int:
        """Queue the files already under ``ready/`` and start the thread; returns how many."""
        leftovers = list_ready_files(self.ready_dir.parent) if self.ready_dir.exists() else []
        for path in leftovers:
            self.submit(path)
        if leftovers:
            log.info("uploading %d landing file(s) left from an earlier run", len(leftovers))
        self._thread = threading.Thread(target=self._run, name="landing-s3-upload", daemon=True)
        self._thread.start()
        return len(leftovers)

    def submit(self, path: Path) -> None:
        path = Path(path)
        with self._cond:
            if path in self._queued:
                return
            self._queued.add(path)
            self._queue.append(path)
            self._cond.notify()

    def close(self, timeout: float = 10.0) -> None:
        with self._cond:
            self._closing = True
            self._drain_deadline = time.monotonic() + timeout
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout + 5)
        if self.pending():
            log.warning("%d landing file(s) not uploaded yet; they go at the next start", self.pending())

    def pending(self) -> int:
        with self._cond:
            return len(self._queue)

    def snapshot(self) -> dict[str, Any]:
        s = self.stats
        return {
            "bucket": self.bucket,
            "uploaded": s.uploaded,
            "uploaded_bytes": s.uploaded_bytes,
            "upload_errors": s.upload_errors,
            "pending_uploads": self.pending(),
            "last_uploaded": s.last_uploaded,
            "last_error": s.last_error,
        }

    # ------------------------------------------------------------------ thread

    def _next(self) -> Path | None:
        """The first queued file whose retry time has come; None when closing is done."""
        with self._cond:
            while True:
                now = time.monotonic()
                if self._closing and (not self._queue or now >= (self._drain_deadline or 0)):
                    return None
                due = [p for p in self._queue if self._not_before.get(p, 0) <= now]
                if due:
                    return due[0]
                waits = [self._not_before.get(p, 0) - now for p in self._queue]
                timeout = min(waits) if waits else None
                if self._closing:
                    timeout = min(timeout or 1.0, max(0.0, self._drain_deadline - now))
                self._cond.wait(timeout)

    def _done(self, path: Path) -> None:
        with self._cond:
            self._queue.remove(path)
            self._queued.discard(path)
            self._attempts.pop(path, None)
            self._not_before.pop(path, None)

    def _run(self) -> None:
        while True:
            path = self._next()
            if path is None:
                return
            try:
                self._upload(path)
            except FileNotFoundError:
                self._done(path)  # already uploaded and deleted (a duplicate submit)
            except Exception as exc:  # noqa: BLE001 -- any failure: keep the file, retry
                with self._cond:
                    n = self._attempts[path] = self._attempts.get(path, 0) + 1
                    delay = min(self.retry_max, self.retry_initial * 2 ** (n - 1))
                    self._not_before[path] = time.monotonic() + delay
                self.stats.upload_errors += 1
                self.stats.last_error = f"{type(exc).__name__}: {exc}"[:300]
                log.warning("upload of %s failed (attempt %d, retry in %.1fs): %s", path.name, n, delay, exc)
            else:
                self._done(path)

    def _upload(self, path: Path) -> None:
        data = path.read_bytes()
        if self._client is None:
            self._client = make_s3_client(self.endpoint_url)
        md5 = base64.b64encode(hashlib.md5(data).digest()).decode("ascii")
        self._client.put_object(
            Bucket=self.bucket,
            Key=self.key_for(path),
            Body=data,
            ContentMD5=md5,
            ContentType="application/x-ndjson",
        )
        # put_object returned: S3 has the object (it checked the MD5). Only now delete.
        os.unlink(path)
        _fsync_dir(path.parent)
        self.stats.uploaded += 1
        self.stats.uploaded_bytes += len(data)
        self.stats.last_uploaded = self.key_for(path)
