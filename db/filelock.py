"""A cross-process reader/writer lock beside a database file, so any number of featuredict processes share it.

DuckDB lets one process hold a file read-write, or any number hold it read-only, never both. featuredict
processes therefore take turns through two advisory ``flock`` files next to the database:

- ``<db>.lock``: held *shared* by every process that has a read-only connection open, *exclusive* by the one
  process that writes (a short read-write connection: open, write, commit, close) or swaps in a rebuilt file.
  Its content is the generation counter, counted up by every writer (``generation``), so readers' caches know
  that something changed.
- ``<db>.lock-queue``: held exclusive by a writer from the moment it wants the file until it is done. Readers
  take it shared for an instant before they take ``<db>.lock``, so a queued writer holds new readers back
  (writer preference: a busy dashboard cannot starve a writer), and every reader's watcher thread, which tries
  it every ``WATCH_EVERY_S``, sees the writer and closes its connection so the writer gets in.

Inside one process a ``FileLock`` (one per file, ``lock_for``) is also a thread-level reader/writer lock:
threads share the one read-only connection; a writing thread waits for them to finish and the connection is
closed (the ``on_release`` hooks) before the process asks for the exclusive file lock. A process that has
read nothing for ``IDLE_CLOSE_S`` lets its shared lock go, so an idle dashboard costs a writer nothing.

Every wait is bounded: ``$FEATUREDICT_LOCK_TIMEOUT`` seconds (default ``DEFAULT_TIMEOUT_S``), then
``LockTimeout``. A wait longer than ``SAY_AFTER_S`` prints one line on stderr: what it waits for and how long
it will wait. The kernel drops a ``flock`` when its process dies, so a killed holder never leaves the file
locked. Where no lock file can be made (a read-only folder) or the filesystem has no ``flock`` (NFS without
lockd, some FUSE/SMB mounts), only the in-process lock applies: nobody can write there anyway, or the user
runs one process.
"""

from __future__ import annotations

import atexit
import fcntl
import os
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from featuredict.db.errors import UserError

LOCK_TIMEOUT_ENV = "FEATUREDICT_LOCK_TIMEOUT"
DEFAULT_TIMEOUT_S = 600.0
SAY_AFTER_S = 0.5  # a wait longer than this says so, on one line
WATCH_EVERY_S = 0.02  # how often a reader looks for a queued writer
IDLE_CLOSE_S = 30.0  # a reader that read nothing for this long lets its shared lock go
SAY_AGAIN_S = 10.0  # a process repeats the waiting line at most this often (a busy file: one line, not many)

_said_at = [float("-inf")]  # when this process last printed a waiting line


class LockError(UserError, RuntimeError):
    """The database's lock cannot be taken (a bad timeout setting, or the wait ran out); one line for a user."""


class LockTimeout(LockError):
    """Waited ``$FEATUREDICT_LOCK_TIMEOUT`` seconds for the lock and gave up."""


def lock_path(path: str | Path) -> Path:
    """``<db>.lock`` beside the real file (symlinks resolved, so every name for one file shares one lock)."""
    p = Path(path).expanduser().resolve()
    return p.with_name(p.name + ".lock")


def queue_path(path: str | Path) -> Path:
    """``<db>.lock-queue``: held by a writer waiting for, or holding, ``<db>.lock``."""
    p = lock_path(path)
    return p.with_name(p.name + "-queue")


def lock_timeout() -> float:
    """Seconds a lock wait may last: ``$FEATUREDICT_LOCK_TIMEOUT`` (default ``DEFAULT_TIMEOUT_S``)."""
    raw = os.environ.get(LOCK_TIMEOUT_ENV, "").strip()
    if not raw:
        return DEFAULT_TIMEOUT_S
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not value >= 0:  # also catches nan
        raise LockError(f"{LOCK_TIMEOUT_ENV}={raw!r} is not a number of seconds (0 or more)")
    return value


class _Wait:
    """One bounded wait: says so once after ``SAY_AFTER_S``, raises ``LockTimeout`` after the timeout."""

    def __init__(self, path: Path, timeout: float):
        self.path, self.timeout = path, timeout
        self.t0 = time.monotonic()
        self.said = False

    def check(self, what: str) -> None:
        waited = time.monotonic() - self.t0
        if waited >= self.timeout:
            raise LockTimeout(
                f"gave up after {self.timeout:g} s waiting for {what} on {self.path}; "
                f"set {LOCK_TIMEOUT_ENV} (seconds) to wait longer"
            )
        if not self.said and waited >= SAY_AFTER_S:
            self.said = True
            if time.monotonic() - _said_at[0] < SAY_AGAIN_S:
                return
            _said_at[0] = time.monotonic()
            print(
                f"featuredict: waiting for {what} on {self.path} "
                f"({waited:.1f} s so far, up to {self.timeout:g} s: {LOCK_TIMEOUT_ENV})...",
                file=sys.stderr,
                flush=True,
            )


def _try(fd: int, op: int) -> bool | None:
    """One non-blocking ``flock``: True taken, False busy, None where the filesystem cannot lock."""
    try:
        fcntl.flock(fd, op | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    except OSError:
        return None
    return True


def _unlock(fd: int) -> None:
    try:
        fcntl.flock(fd, fcntl.LOCK_UN)
    except OSError:
        pass


class FileLock:
    """The reader/writer lock of one database file in this process (get it with ``lock_for``)."""

    def __init__(self, path: Path):
        self.path = path
        self._fd, self._qfd = self._open(lock_path(path)), self._open(queue_path(path))
        self._probe = self._open(queue_path(path))  # the watcher's own descriptor: flock locks are per descriptor
        self._cross = None not in (self._fd, self._qfd, self._probe)  # False: in-process lock only
        self._cond = threading.Condition()
        self._local = threading.local()
        self._active = 0  # threads inside a shared section
        self._writer = False  # a thread of this process holds the exclusive section
        self._writers_waiting = 0
        self._acquiring = False  # one thread is taking the shared file lock for the process
        self._draining = False  # the watcher is letting the shared file lock go
        self._shared_held = False  # this process holds <db>.lock shared
        self._last_used = time.monotonic()
        self._hooks: list[Callable[[], None]] = []
        self._watcher: threading.Thread | None = None
        self._stopping = False  # the interpreter is exiting: the watcher stops, connections close

    @staticmethod
    def _open(p: Path) -> int | None:
        """The lock file, made when missing (mode 0o666 less the umask, so other users' processes share it);
        read-only where it belongs to someone else (``flock`` works on that too)."""
        try:
            return os.open(p, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
        except OSError:
            pass
        try:
            return os.open(p, os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            return None

    def on_release(self, hook: Callable[[], None]) -> None:
        """Call ``hook`` (close a connection) whenever this process lets its shared lock go."""
        with self._cond:
            self._hooks.append(hook)

    # ---- generation -------------------------------------------------------------------------------------

    def generation(self) -> int:
        """The write counter kept in ``<db>.lock`` (0 before the first write, or without a lock file)."""
        if self._fd is None:
            return 0
        try:
            raw = os.pread(self._fd, 32, 0)
        except OSError:
            return 0
        try:
            return int(raw.decode("ascii").strip() or 0)
        except ValueError:  # a torn or foreign content: treat as changed
            return -1

    def _bump(self) -> None:
        if self._fd is None:
            return
        try:
            data = f"{max(self.generation(), 0) + 1}\n".encode("ascii")
            os.pwrite(self._fd, data.ljust(21), 0)  # fixed width: never shorter than what it replaces
        except OSError:
            pass

    # ---- cross-process steps ----------------------------------------------------------------------------

    def _poll(self, fd: int, op: int, wait: _Wait, what: str) -> bool:
        delay = 0.001
        while True:
            got = _try(fd, op)
            if got is None:
                return False
            if got:
                return True
            wait.check(what)
            time.sleep(delay)
            delay = min(delay * 2, WATCH_EVERY_S)

    def _take_shared_file_lock(self, wait: _Wait) -> None:
        if not self._cross:
            return
        assert self._fd is not None and self._qfd is not None
        if not self._poll(self._qfd, fcntl.LOCK_SH, wait, "another process writing it"):
            self._cross = False
            return
        try:
            if not self._poll(self._fd, fcntl.LOCK_SH, wait, "another process writing it"):
                self._cross = False
        finally:
            _unlock(self._qfd)

    def _writer_queued(self) -> bool:
        """Whether another process's writer holds the queue (tried without waiting)."""
        if not self._cross or self._probe is None:
            return False
        got = _try(self._probe, fcntl.LOCK_SH)
        if got:
            _unlock(self._probe)
        return got is False

    def _let_go_locked(self) -> None:
        """Close connections and drop the shared file lock; the caller holds ``_cond`` and no reader is active."""
        for hook in list(self._hooks):
            hook()
        if self._shared_held and self._fd is not None:
            _unlock(self._fd)
        self._shared_held = False

    def _watch(self) -> None:
        """While the process holds the shared lock: let it go when a writer queues or after idling."""
        while True:
            time.sleep(WATCH_EVERY_S)
            with self._cond:
                if not self._shared_held or self._stopping:
                    self._watcher = None
                    return
                idle = self._active == 0 and time.monotonic() - self._last_used >= IDLE_CLOSE_S
            if idle or self._writer_queued():
                with self._cond:
                    self._draining = True
                    try:
                        while self._active:
                            self._cond.wait()
                        if self._shared_held and not self._writer:
                            self._let_go_locked()
                    finally:
                        self._draining = False
                        self._cond.notify_all()

    # ---- the two sections -------------------------------------------------------------------------------

    def _depth(self) -> tuple[int, int]:
        return getattr(self._local, "shared", 0), getattr(self._local, "exclusive", 0)

    @contextmanager
    def shared(self) -> Iterator[None]:
        """A read: many threads and processes at once, never while a writer writes (a queued one goes first)."""
        sh, ex = self._depth()
        if sh or ex:  # nested in this thread's own read or write: already covered
            self._local.shared = sh + 1
            try:
                yield
            finally:
                self._local.shared = sh
            return
        wait = _Wait(self.path, lock_timeout())
        take = False
        with self._cond:
            while True:
                if not (self._writer or self._writers_waiting or self._draining or self._acquiring):
                    if self._shared_held or not self._cross:
                        self._active += 1
                        break
                    self._acquiring = take = True
                    break
                self._cond.wait(0.05)
                wait.check("another process writing it")
        if take:
            try:
                self._take_shared_file_lock(wait)
            except BaseException:
                with self._cond:
                    self._acquiring = False
                    self._cond.notify_all()
                raise
            with self._cond:
                self._acquiring = False
                self._shared_held = self._cross
                self._active += 1
                if self._shared_held and self._watcher is None and not self._stopping:
                    self._watcher = threading.Thread(target=self._watch, name="featuredict-lock-watch", daemon=True)
                    self._watcher.start()
                self._cond.notify_all()
        self._local.shared = 1
        try:
            yield
        finally:
            self._local.shared = 0
            with self._cond:
                self._active -= 1
                self._last_used = time.monotonic()
                self._cond.notify_all()

    @contextmanager
    def exclusive(self) -> Iterator[None]:
        """A write: this thread alone in every process; counts the generation up when it ends."""
        sh, ex = self._depth()
        if ex:
            self._local.exclusive = ex + 1
            try:
                yield
            finally:
                self._local.exclusive = ex
            return
        if sh:
            raise RuntimeError("a write cannot start inside a read of the same database in the same thread")
        wait = _Wait(self.path, lock_timeout())
        with self._cond:
            self._writers_waiting += 1
            try:
                while self._writer or self._active or self._acquiring or self._draining:
                    self._cond.wait(0.05)
                    wait.check("this process's other readers and writers")
                self._writer = True
                self._let_go_locked()  # our own read connection must close before a read-write one opens
            finally:
                self._writers_waiting -= 1
        queued = locked = False
        try:
            if self._cross:
                assert self._fd is not None and self._qfd is not None
                queued = self._poll(self._qfd, fcntl.LOCK_EX, wait, "another process writing it")
                locked = queued and self._poll(self._fd, fcntl.LOCK_EX, wait, "other processes to close it")
            self._local.exclusive = 1
            try:
                yield
            finally:
                self._local.exclusive = 0
                self._bump()
        finally:
            if locked and self._fd is not None:
                _unlock(self._fd)
            if queued and self._qfd is not None:
                _unlock(self._qfd)
            with self._cond:
                self._writer = False
                self._last_used = time.monotonic()
                self._cond.notify_all()

    def release(self) -> None:
        """Let the shared lock go now (a command is done reading), once this process's readers finish."""
        with self._cond:
            while self._active or self._writer or self._acquiring:
                self._cond.wait(0.05)
            self._let_go_locked()

    def shutdown(self) -> None:
        """At interpreter exit: stop the watcher and close connections from the main thread (a daemon thread
        must not be inside DuckDB while the interpreter tears down)."""
        with self._cond:
            self._stopping = True
            watcher = self._watcher
        if watcher is not None:
            watcher.join(timeout=1.0)
        with self._cond:
            if not self._active and not self._writer:
                self._let_go_locked()


_LOCKS: dict[Path, FileLock] = {}
_LOCKS_GUARD = threading.Lock()


@atexit.register
def _shutdown_all() -> None:
    with _LOCKS_GUARD:
        locks = list(_LOCKS.values())
    for lock in locks:
        lock.shutdown()


def lock_for(path: str | Path) -> FileLock:
    """The one ``FileLock`` of ``path`` in this process (every name of a file gives the same one)."""
    key = Path(path).expanduser().resolve()
    with _LOCKS_GUARD:
        lock = _LOCKS.get(key)
        if lock is None:
            lock = _LOCKS[key] = FileLock(key)
        return lock
