"""The landing writer: durability, group commit, rotation, publication, crash leftovers."""

from __future__ import annotations

import errno
import os
import re
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

import pytest

from personalization_pipeline.core.events import UNREADABLE_KEY, envelopes_to_canonical, read_landing_file
from personalization_pipeline.ingest_service import landing as landing_mod
from personalization_pipeline.ingest_service.landing import (
    LandingClosedError,
    LandingWriter,
    encode_lines,
    list_ready_files,
)

from .conftest import wait_for

READY_NAME = re.compile(
    r"ready/(\d{4})/(\d{2})/(\d{2})/(\d{2})/(\d{8}T\d{6}\.\d{6}Z)-(\d+)-(\d{6})\.jsonl$"
)


def records(prefix: str, n: int) -> list[dict]:
    return [{"v": 1, "delivery_id": f"{prefix}-{i}", "payload": {"i": i}} for i in range(n)]


def ids_in(landing: Path) -> list[str]:
    return [e["delivery_id"] for p in list_ready_files(landing) for e in read_landing_file(p)]


def test_append_is_durable_and_close_publishes(tmp_path):
    writer = LandingWriter(tmp_path, rotate_seconds=60)
    writer.start()
    writer.append(records("a", 3))
    (open_file,) = list((tmp_path / "open").iterdir())
    assert open_file.read_bytes().count(b"\n") == 3  # on disk before append() returned
    assert list_ready_files(tmp_path) == []
    writer.close()
    assert ids_in(tmp_path) == ["a-0", "a-1", "a-2"]
    assert list((tmp_path / "open").iterdir()) == []
    with pytest.raises(LandingClosedError):
        writer.append(records("late", 1))


def test_ready_layout_uses_publication_time(tmp_path):
    fixed = datetime(2026, 11, 28, 9, 5, 7, 654321, tzinfo=timezone.utc).timestamp()
    with LandingWriter(tmp_path, clock=lambda: fixed) as writer:
        writer.append(records("x", 1))
    (path,) = list_ready_files(tmp_path)
    match = READY_NAME.search(path.as_posix())
    assert match, path
    assert match.groups()[:5] == ("2026", "11", "28", "09", "20261128T090507.654321Z")
    assert int(match.group(6)) == os.getpid()


def test_empty_files_are_never_published(tmp_path):
    with LandingWriter(tmp_path, rotate_seconds=0.05) as writer:
        time.sleep(0.2)
        writer.rotate()
    assert list_ready_files(tmp_path) == []
    assert list((tmp_path / "open").iterdir()) == []


def test_rotation_by_size(tmp_path):
    with LandingWriter(tmp_path, rotate_bytes=300, rotate_seconds=60) as writer:
        for i in range(20):
            writer.append(records(f"s{i}", 2))
    files = list_ready_files(tmp_path)
    assert len(files) >= 5
    sizes = [p.stat().st_size for p in files]
    assert all(size >= 300 for size in sizes[:-1])
    assert all(size < 300 + 200 for size in sizes)  # rotated right after crossing the limit
    assert ids_in(tmp_path) == [f"s{i}-{j}" for i in range(20) for j in range(2)]


def test_rotation_by_age_without_traffic(tmp_path):
    with LandingWriter(tmp_path, rotate_seconds=0.5) as writer:
        writer.append(records("quiet", 1))
        published = wait_for(lambda: list_ready_files(tmp_path), timeout=4)
        assert published, "a quiet stream must still publish within seconds"
        assert writer.running
        writer.append(records("later", 1))
    assert ids_in(tmp_path) == ["quiet-0", "later-0"]


def test_leftovers_from_a_crash_are_published_at_start(tmp_path):
    open_dir = tmp_path / "open"
    open_dir.mkdir(parents=True)
    (open_dir / "20261128T100000.000000Z-111-000001.jsonl").write_bytes(encode_lines(records("old", 2)))
    (open_dir / "20261128T100001.000000Z-111-000002.jsonl").write_bytes(b"")
    torn = encode_lines(records("torn", 1)) + b'{"v":1,"delivery_id":"torn-1","pay'
    (open_dir / "20261128T100002.000000Z-111-000003.jsonl").write_bytes(torn)
    writer = LandingWriter(tmp_path)
    published = writer.start()
    writer.close()
    assert len(published) == 2
    assert list(open_dir.iterdir()) == []
    envelopes = [e for p in list_ready_files(tmp_path) for e in read_landing_file(p)]
    assert [e.get("delivery_id") for e in envelopes] == ["old-0", "old-1", "torn-0", None]
    assert envelopes[-1][UNREADABLE_KEY]["reason"].startswith("torn last line")
    _, rejects = envelopes_to_canonical(envelopes, {})
    assert [r["reason"] for r in rejects][-1].startswith("torn last line")


def test_a_live_writers_open_file_is_not_taken_by_another_process_start(tmp_path):
    first = LandingWriter(tmp_path, rotate_seconds=60)
    first.start()
    first.append(records("live", 1))
    second = LandingWriter(tmp_path, rotate_seconds=60)
    assert second.start() == []  # the flock says: someone is writing it
    assert len(list((tmp_path / "open").iterdir())) == 1
    second.close()
    first.close()
    assert ids_in(tmp_path) == ["live-0"]


def test_group_commit_shares_fsyncs(tmp_path, monkeypatch):
    real_fsync = os.fsync

    def slow_fsync(fd):
        time.sleep(0.02)
        real_fsync(fd)

    monkeypatch.setattr(landing_mod.os, "fsync", slow_fsync)
    with LandingWriter(tmp_path, rotate_seconds=60) as writer:
        barrier = threading.Barrier(30)

        def one(i):
            barrier.wait()
            writer.append(records(f"g{i}", 1))

        threads = [threading.Thread(target=one, args=(i,)) for i in range(30)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert writer.stats.appends == 30
        assert writer.stats.fsyncs < 15
    assert sorted(ids_in(tmp_path)) == sorted(f"g{i}-0" for i in range(30))


def test_a_failed_write_is_not_acknowledged_and_not_kept(tmp_path, monkeypatch):
    real_write = os.write
    calls = {"n": 0}

    def flaky_write(fd, data):
        calls["n"] += 1
        if calls["n"] == 2:
            real_write(fd, bytes(data)[:10])  # a partial write, then the disk is full
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(fd, data)

    monkeypatch.setattr(landing_mod.os, "write", flaky_write)
    with LandingWriter(tmp_path, rotate_seconds=60) as writer:
        writer.append(records("ok", 1))
        with pytest.raises(OSError):
            writer.append(records("lost", 1))
        writer.append(records("after", 1))
        assert writer.stats.write_errors == 1
    assert ids_in(tmp_path) == ["ok-0", "after-0"]


def test_async_append(tmp_path):
    import asyncio

    async def main(writer):
        await asyncio.gather(*(writer.append_async(records(f"as{i}", 2)) for i in range(10)))

    with LandingWriter(tmp_path) as writer:
        asyncio.run(main(writer))
    assert len(ids_in(tmp_path)) == 20


@pytest.mark.parametrize("sync_in_thread", [True, False])
def test_async_appends_share_fsyncs(tmp_path, monkeypatch, sync_in_thread):
    import asyncio

    real_fsync = os.fsync

    def slow_fsync(fd):
        time.sleep(0.01)
        real_fsync(fd)

    monkeypatch.setattr(landing_mod.os, "fsync", slow_fsync)

    async def main(writer):
        async def one(i):
            await asyncio.sleep(0.001 * (i % 7))
            await writer.append_async(records(f"l{i}", 1))

        await asyncio.gather(*(one(i) for i in range(200)))

    with LandingWriter(tmp_path, rotate_seconds=60, sync_in_thread=sync_in_thread) as writer:
        asyncio.run(main(writer))
        assert writer.stats.appends == 200
        assert writer.stats.fsyncs <= 20
    assert sorted(ids_in(tmp_path)) == sorted(f"l{i}-0" for i in range(200))
