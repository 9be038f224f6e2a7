"""A handle on a featuredict database that any number of processes can hold at once.

Reads share one read-only DuckDB connection per file and process (every thread, each Streamlit browser
session, takes its own cursor on it) under the shared side of the file's reader/writer lock
(``db.filelock``). Every write takes the exclusive side: this process's read connection and every other
process's are closed, a short read-write connection opens, ``fn`` runs in one transaction, commits and the
connection closes (DuckDB checkpoints it into the file), then the generation counter goes up
(``Store.generation``) and readers reopen on their next query. So concurrent label / list / review / preset
edits from several sessions and processes all land, one after the other.

A write costs a connection open and close (milliseconds on a small write); a reader pays a reopen after
every write anywhere. Long writers (``explain``, ``embed``) therefore write in batches, each its own
``write`` call, and the lock is free in between.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import duckdb
import pandas as pd

from featuredict.db.errors import UserError
from featuredict.db.filelock import FileLock, LockError, lock_for
from featuredict.db.schema import DatabaseError, check_file, connect, missing_user_tables

T = TypeVar("T")


def scalar(cur: duckdb.DuckDBPyConnection, sql: str, params: Sequence[Any] = ()) -> Any:
    """The first column of the first row of ``sql`` (a query that always returns one row, like ``count(*)``)."""
    row = cur.execute(sql, list(params)).fetchone()
    if row is None:
        raise DatabaseError(f"no row from: {sql.split()[0]} ...")
    return row[0]


class ReadOnlyError(UserError, PermissionError):
    """A write refused because the store was opened read-only (``featuredict serve --read-only``)."""


class _Reader:
    """The one read-only connection of a file in this process, opened on demand, closed by the lock."""

    def __init__(self, path: Path, lock: FileLock):
        self.path = path
        self._con: duckdb.DuckDBPyConnection | None = None
        self._mu = threading.Lock()
        lock.on_release(self.close)

    def con(self) -> duckdb.DuckDBPyConnection:
        with self._mu:
            if self._con is None:
                self._con = connect(self.path, read_only=True)  # raises DatabaseError
            return self._con

    def close(self) -> None:
        with self._mu:
            if self._con is not None:
                con, self._con = self._con, None
                con.close()


_READERS: dict[Path, _Reader] = {}
_READERS_GUARD = threading.Lock()


def _reader(path: Path, lock: FileLock) -> _Reader:
    with _READERS_GUARD:
        r = _READERS.get(lock.path)
        if r is None:
            r = _READERS[lock.path] = _Reader(path, lock)
        return r


class Store:
    def __init__(self, path: str | Path, read_only: bool = False):
        self.path = Path(path)
        self.read_only = read_only
        check_file(self.path)  # before any lock file is made beside a path that holds no database
        self._lock = lock_for(self.path)
        self._reader = _reader(self.path, self._lock)
        with self.reading() as cur:  # raises DatabaseError: not a featuredict file, wrong version, ...
            missing = missing_user_tables(cur)
        if missing and not read_only:
            self.write(lambda cur: None)  # a read-write open adds the user tables the file lacks

    @contextmanager
    def reading(self) -> Iterator[duckdb.DuckDBPyConnection]:
        """A cursor for the calling thread on the shared read-only connection, under the shared lock."""
        try:
            with self._lock.shared():
                cur = self._reader.con().cursor()
                try:
                    yield cur
                finally:
                    cur.close()
        except LockError as e:
            raise DatabaseError(str(e)) from None

    def df(self, sql: str, params: Sequence[Any] | None = None) -> pd.DataFrame:
        """Run a parameterised read query and return a DataFrame."""
        with self.reading() as cur:
            return cur.execute(sql, list(params or [])).df()

    def rows(self, sql: str, params: Sequence[Any] | None = None) -> list[tuple]:
        with self.reading() as cur:
            return cur.execute(sql, list(params or [])).fetchall()

    def write(self, fn: Callable[[duckdb.DuckDBPyConnection], T]) -> T:
        """Run ``fn(connection)`` alone (this process and every other), in one transaction on a short
        read-write connection; the generation counts up afterwards."""
        if self.read_only:
            raise ReadOnlyError(f"{self.path} is open read-only (featuredict serve --read-only): nothing was saved")
        try:
            with self._lock.exclusive():
                con = connect(self.path)  # raises DatabaseError
                try:
                    con.execute("BEGIN TRANSACTION")
                    try:
                        out = fn(con)
                    except Exception:
                        con.execute("ROLLBACK")
                        raise
                    con.execute("COMMIT")
                    return out
                finally:
                    con.close()
        except LockError as e:
            raise DatabaseError(str(e)) from None

    def generation(self) -> int:
        """A number that changes whenever any process writes to the file or swaps in a rebuilt one."""
        return self._lock.generation()

    def close(self) -> None:
        """Done reading for now: close this process's read connection and let other processes' writers in
        (the next read reopens it)."""
        self._lock.release()
