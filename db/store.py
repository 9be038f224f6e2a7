"""One process-wide handle on a featuredict database: concurrent reads, one serialized writer path.

DuckDB lets a single process hold a file read-write; inside it, every thread (each Streamlit browser
session) takes its own cursor for reads, and all writes go through ``Store.write`` which holds a lock and
runs in a transaction, so concurrent label / list / preset edits from several sessions never lose data.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import duckdb
import pandas as pd

from featuredict.db.errors import UserError
from featuredict.db.schema import DatabaseError, connect

T = TypeVar("T")


def scalar(cur: duckdb.DuckDBPyConnection, sql: str, params: Sequence[Any] = ()) -> Any:
    """The first column of the first row of ``sql`` (a query that always returns one row, like ``count(*)``)."""
    row = cur.execute(sql, list(params)).fetchone()
    if row is None:
        raise DatabaseError(f"no row from: {sql.split()[0]} ...")
    return row[0]


class ReadOnlyError(UserError, PermissionError):
    """A write refused because the store was opened read-only (``featuredict serve --read-only``)."""


class Store:
    def __init__(self, path: str | Path, read_only: bool = False):
        self.path = Path(path)
        self.read_only = read_only
        self._con = connect(self.path, read_only=read_only)  # raises schema.DatabaseError
        self._write_lock = threading.Lock()

    def cursor(self) -> duckdb.DuckDBPyConnection:
        """A cursor for the calling thread (DuckDB connections must not be shared across threads)."""
        return self._con.cursor()

    def df(self, sql: str, params: Sequence[Any] | None = None) -> pd.DataFrame:
        """Run a parameterised read query and return a DataFrame."""
        cur = self.cursor()
        try:
            return cur.execute(sql, list(params or [])).df()
        finally:
            cur.close()

    def rows(self, sql: str, params: Sequence[Any] | None = None) -> list[tuple]:
        cur = self.cursor()
        try:
            return cur.execute(sql, list(params or [])).fetchall()
        finally:
            cur.close()

    def write(self, fn: Callable[[duckdb.DuckDBPyConnection], T]) -> T:
        """Run ``fn(cursor)`` under the process-wide write lock inside one transaction."""
        if self.read_only:
            raise ReadOnlyError(f"{self.path} is open read-only (featuredict serve --read-only): nothing was saved")
        with self._write_lock:
            cur = self.cursor()
            try:
                cur.execute("BEGIN TRANSACTION")
                try:
                    out = fn(cur)
                except Exception:
                    cur.execute("ROLLBACK")
                    raise
                cur.execute("COMMIT")
                return out
            finally:
                cur.close()

    def close(self) -> None:
        self._con.close()
