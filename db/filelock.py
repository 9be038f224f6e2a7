"""An advisory lock beside a database file (``<db>.lock``) that keeps openers out while a build replaces it.

A build writes a new file and swaps it in with ``os.replace``. DuckDB's own file lock covers the old file only
while the build reads it, so a dashboard opening it after that could write labels into the file about to be
replaced, and two builds into one path could drop each other's SAE. ``replacing(path)`` holds an exclusive
``flock`` for the whole write-and-swap. ``opening(path)`` takes it shared while a connection opens, and fails
at once, with a one-line message, if a build holds it. Where no lock file can be created (a read-only folder)
the lock is skipped: nobody can build there either.
"""

from __future__ import annotations

import fcntl
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from featuredict.db.errors import UserError


class RebuildInProgress(UserError, RuntimeError):
    """Another process is replacing the database file right now."""


def lock_path(path: str | Path) -> Path:
    """``<db>.lock`` beside the real file (symlinks resolved, so every name for one file shares one lock)."""
    p = Path(path).expanduser().resolve()
    return p.with_name(p.name + ".lock")


def _flock(fd: int, op: int) -> bool:
    """``flock``; False where the filesystem cannot lock (NFS without lockd, some FUSE/SMB mounts): no lock then."""
    try:
        fcntl.flock(fd, op)
    except BlockingIOError:
        raise
    except OSError:
        return False
    return True


def _open(path: str | Path) -> int | None:
    try:
        return os.open(lock_path(path), os.O_RDWR | os.O_CREAT, 0o644)
    except OSError:
        return None


@contextmanager
def replacing(path: str | Path) -> Iterator[None]:
    """Exclusive lock for a build's write-and-swap; waits (saying so) for another build of the same file."""
    fd = _open(path)
    try:
        if fd is not None:
            try:
                _flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                print(f"waiting for another build to finish writing {path}...", file=sys.stderr, flush=True)
                _flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        if fd is not None:
            os.close(fd)  # releases the lock


@contextmanager
def opening(path: str | Path) -> Iterator[None]:
    """Shared lock while a connection opens; raises RebuildInProgress if a build is replacing the file."""
    fd = _open(path)
    try:
        if fd is not None:
            try:
                _flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:
                raise RebuildInProgress(
                    f"a build is replacing {path} right now; open it again when the build has finished"
                ) from None
        yield
    finally:
        if fd is not None:
            os.close(fd)
