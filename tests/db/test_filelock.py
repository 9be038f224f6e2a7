"""The reader/writer lock beside a database file (db/filelock.py), inside one process and across processes."""

from __future__ import annotations

import errno
import os
import subprocess
import sys
import threading
from pathlib import Path
from unittest import mock

import pytest

from featuredict.db import filelock
from featuredict.db.filelock import LockError, LockTimeout, lock_for, lock_path, lock_timeout


def _holder(db: Path, mode: str) -> subprocess.Popen:
    """Another process holding ``db``'s lock (``exclusive`` or ``shared``) until killed; ready when it prints."""
    code = (
        "import sys, time\n"
        "from featuredict.db.filelock import lock_for\n"
        f"lock = lock_for({str(db)!r})\n"
        f"with lock.{mode}():\n"
        "    print('held', flush=True)\n"
        "    time.sleep(120)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "held"
    return proc


def test_every_name_of_a_file_shares_one_lock(tmp_path: Path):
    db = tmp_path / "a.duckdb"
    db.write_text("x")
    link = tmp_path / "link.duckdb"
    link.symlink_to(db)
    assert lock_path(link) == lock_path(db)
    assert lock_for(link) is lock_for(db)


def test_threads_share_reads_and_a_writer_waits_for_them(tmp_path: Path):
    db = tmp_path / "t.duckdb"
    db.write_text("x")
    lock = lock_for(db)
    order: list[str] = []
    reading = threading.Event()
    release = threading.Event()

    def reader() -> None:
        with lock.shared():
            order.append("read start")
            reading.set()
            release.wait(10)
            order.append("read end")

    def writer() -> None:
        reading.wait(10)
        with lock.exclusive():
            order.append("write")

    threads = [threading.Thread(target=reader), threading.Thread(target=writer)]
    for t in threads:
        t.start()
    reading.wait(10)
    release.set()
    for t in threads:
        t.join(10)
    assert order == ["read start", "read end", "write"]
    with lock.shared(), pytest.raises(RuntimeError, match="inside a read"):
        with lock.exclusive():
            pass


def test_filesystems_without_locks_do_not_block_anyone(tmp_path: Path):
    db = tmp_path / "nolocks.duckdb"
    db.write_text("x")

    def no_locks(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")  # e.g. NFS without lockd

    with mock.patch("fcntl.flock", no_locks):
        lock = lock_for(db)
        with lock.shared():
            pass
        with lock.exclusive():
            pass
        assert lock.generation() == 1


def test_a_wait_says_so_on_one_line_and_gives_up_at_the_timeout(tmp_path: Path, monkeypatch, capsys):
    db = tmp_path / "busy.duckdb"
    db.write_text("x")
    holder = _holder(db, "exclusive")
    try:
        monkeypatch.setenv("FEATUREDICT_LOCK_TIMEOUT", "1.5")
        monkeypatch.setattr(filelock, "_said_at", [float("-inf")])  # no line printed recently in this process
        with pytest.raises(LockTimeout, match="gave up after 1.5 s waiting for another process writing it"):
            with lock_for(db).shared():
                pass
        lines = [ln for ln in capsys.readouterr().err.splitlines() if ln]
        assert len(lines) == 1 and lines[0].startswith("featuredict: waiting for another process writing it on ")
        assert "up to 1.5 s: FEATUREDICT_LOCK_TIMEOUT" in lines[0]
    finally:
        holder.kill()
        holder.wait()


def test_a_killed_holder_leaves_the_lock_free(tmp_path: Path, monkeypatch):
    db = tmp_path / "killed.duckdb"
    db.write_text("x")
    holder = _holder(db, "exclusive")
    holder.kill()  # SIGKILL: no cleanup runs in the holder
    holder.wait()
    monkeypatch.setenv("FEATUREDICT_LOCK_TIMEOUT", "5")
    lock = lock_for(db)
    before = lock.generation()
    with lock.exclusive():
        pass
    assert lock.generation() == before + 1


def test_a_reader_in_another_process_steps_aside_for_a_writer(tmp_path: Path, monkeypatch):
    """The other process holds its read lock (like an open dashboard); its watcher sees the queued writer."""
    db = tmp_path / "shared.duckdb"
    db.write_text("x")
    code = (
        "import sys, time\n"
        "from featuredict.db.filelock import lock_for\n"
        f"lock = lock_for({str(db)!r})\n"
        "with lock.shared():\n"
        "    pass\n"  # the process keeps the shared file lock after the read, as a Store keeps its connection
        "print('read', flush=True)\n"
        "time.sleep(120)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "read"
        monkeypatch.setenv("FEATUREDICT_LOCK_TIMEOUT", "20")
        with lock_for(db).exclusive():  # would raise LockTimeout if the reader kept its lock
            pass
    finally:
        proc.kill()
        proc.wait()


@pytest.mark.parametrize("value", ["soon", "-1", "nan"])
def test_a_bad_timeout_setting_is_one_line(monkeypatch, value):
    monkeypatch.setenv("FEATUREDICT_LOCK_TIMEOUT", value)
    with pytest.raises(LockError, match="FEATUREDICT_LOCK_TIMEOUT=.* is not a number of seconds"):
        lock_timeout()


def test_the_default_timeout(monkeypatch):
    monkeypatch.delenv("FEATUREDICT_LOCK_TIMEOUT", raising=False)
    assert lock_timeout() == 600.0
    assert os.environ.get("FEATUREDICT_LOCK_TIMEOUT") is None
