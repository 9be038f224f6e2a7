"""The advisory lock a build holds while it swaps a database file in."""

from __future__ import annotations

import errno
from pathlib import Path
from unittest import mock

import pytest

from featuredict.db.filelock import RebuildInProgress, lock_path, opening, replacing


def test_every_name_of_a_file_shares_one_lock(tmp_path: Path):
    db = tmp_path / "a.duckdb"
    db.write_text("x")
    link = tmp_path / "link.duckdb"
    link.symlink_to(db)
    assert lock_path(link) == lock_path(db)
    with replacing(db), pytest.raises(RebuildInProgress, match="a build is replacing"):
        with opening(link):
            pass
    with opening(link):  # free again after the build
        pass


def test_filesystems_without_locks_do_not_block_anyone(tmp_path: Path):
    db = tmp_path / "a.duckdb"
    db.write_text("x")

    def no_locks(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")  # e.g. NFS without lockd

    with mock.patch("fcntl.flock", no_locks), replacing(db), opening(db):
        pass
