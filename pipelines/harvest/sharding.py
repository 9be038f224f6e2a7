"""Run a job over a Ray cluster: split it into shards, map them over Ray tasks, fold the results as they arrive.

Ray is an optional extra (``pip install 'featuredict[ray]'``); nothing here imports it at module level, so the
rest of featuredict works without it, and a missing extra is one line (``RayMissingError``).

``map_shards`` is the one generic piece, and the extension point for every command that can be split:

- ``build --ray`` (``pipelines/harvest/build.py``): shards are runs of consecutive corpus contexts; each task loads the
  model + SAE once, harvests its run into a ``HarvestState`` and returns it; ``fold`` is ``harvest.merge``,
  which is exact, so the result equals a single-process build.
- ``explain`` (features split across workers) and ``scan`` (records split across workers): shards are ranges of
  feature ids or of records; ``fn`` loads what it needs once per task and returns that range's rows; ``fold``
  appends them (or writes them out), so the driver holds one shard's rows at a time.

``fn(shard, report)`` runs in a Ray task. It may call ``report(done)`` with the work it has done so far (tokens,
features, records: any unit); the driver shows the sum over shards in one progress bar (``on_progress``). A
retried shard starts again from 0, so the bar never counts an attempt twice.

Faults: a task that raises, or whose worker process dies, is retried up to ``RayOptions.max_retries`` times by
Ray. A shard that still fails stops the job with one line naming the shard (``ShardFailedError``); the other
tasks are cancelled and nothing has been written by then.

Memory: results are fetched one at a time as they finish (``ray.wait``) and folded at once, so the driver holds
the accumulator and one result, whatever the number of shards. Results wait in Ray's object store (spilled to
disk when it fills) until the driver takes them.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from types import ModuleType
from typing import Any, TypeVar

from featuredict.db.errors import UserError, one_line

S = TypeVar("S")  # a shard description (small, picklable)
R = TypeVar("R")  # what one shard returns
A = TypeVar("A")  # what the results fold into

INSTALL = "pip install 'featuredict[ray]'"


class DistributedError(UserError, RuntimeError):
    """A distributed run that cannot go on, with a one-line message fit to show a user."""


class RayMissingError(DistributedError):
    """The ``ray`` extra is not installed."""


class ShardFailedError(DistributedError):
    """A shard failed on every attempt."""


def require_ray() -> ModuleType:
    """The ``ray`` module, or a one-line ``RayMissingError`` naming the install command."""
    try:
        import ray
    except ImportError as e:
        raise RayMissingError(f"--ray needs Ray, which is not installed here: {INSTALL}") from e
    return ray


@dataclass(frozen=True)
class RayOptions:
    """Where and how to run shards.

    ``address``: ``auto`` (a running cluster: ``RAY_ADDRESS`` or the latest ``ray start`` on this machine, else a
    new local Ray), ``local`` (always a new local Ray) or a cluster address (``HOST:PORT``, ``ray://HOST:10001``).
    ``shards``: None = as many as the cluster runs at once. ``gpus_per_shard``: None = 1 when the cluster has
    GPUs and the job wants CUDA, else 0. ``worker_hook(shard_index, done)`` runs in the worker at the start of
    every attempt (done = 0) and on every ``report`` (worker-side setup, telemetry, fault injection in tests).
    """

    address: str = "auto"
    shards: int | None = None
    gpus_per_shard: float | None = None
    cpus_per_shard: float = 1.0
    max_retries: int = 2
    worker_hook: Callable[[int, int], None] | None = None
    poll_seconds: float = 0.5

    def validate(self) -> None:
        if self.shards is not None and self.shards < 1:
            raise ValueError(f"--shards must be at least 1 (got {self.shards})")
        if self.gpus_per_shard is not None and self.gpus_per_shard < 0:
            raise ValueError(f"--gpus-per-shard must be 0 or more (got {self.gpus_per_shard})")
        if self.cpus_per_shard <= 0:
            raise ValueError(f"--cpus-per-shard must be positive (got {self.cpus_per_shard})")
        if self.max_retries < 0:
            raise ValueError(f"--max-retries must be 0 or more (got {self.max_retries})")

    def resolve(self, ray: ModuleType, want_gpu: bool) -> tuple[int, float, float]:
        """``(shards, gpus_per_shard, cpus_per_shard)`` on the connected cluster, defaults filled in."""
        res = ray.cluster_resources()
        gpus = self.gpus_per_shard
        if gpus is None:
            gpus = 1.0 if want_gpu and res.get("GPU", 0) >= 1 else 0.0
        cpus = float(self.cpus_per_shard)
        if self.shards is not None:
            n = self.shards
        else:
            n = int(res.get("GPU", 0) // gpus) if gpus > 0 else int(res.get("CPU", 0) // cpus)
        return max(n, 1), float(gpus), cpus


def check_reachable(opts: RayOptions, timeout_s: float = 5.0) -> None:
    """One line at once when an explicit cluster address does not answer (``ray.init`` retries for minutes)."""
    if opts.address in ("auto", "local"):
        return
    host, _, port = opts.address.split("://", 1)[-1].rpartition(":")
    host = host.strip("[]")  # [::1]:6379
    if not host or not port.isdigit():
        raise DistributedError(f"--ray {opts.address}: give auto, local, HOST:PORT or ray://HOST:PORT")
    try:
        socket.create_connection((host, int(port)), timeout=timeout_s).close()
    except OSError as e:
        raise DistributedError(f"cannot reach the Ray cluster at {opts.address}: {e.strerror or e}") from e


@contextmanager
def ray_session(opts: RayOptions) -> Iterator[ModuleType]:
    """Ray, connected: an existing connection is used as it is; one made here is shut down on exit.

    Worker output stays in the workers' log files (``/tmp/ray/session_latest/logs``) rather than on this
    terminal, so retries and failures read as one line each.
    """
    ray = require_ray()
    if ray.is_initialized():
        yield ray
        return
    check_reachable(opts)
    address = None if opts.address == "auto" else opts.address
    try:
        ray.init(address=address, include_dashboard=False, log_to_driver=False)
    except (ConnectionError, RuntimeError, ValueError) as e:
        where = "a local Ray" if address in (None, "local") else f"the Ray cluster at {opts.address}"
        raise DistributedError(f"cannot start or reach {where}: {_task_error(e)}") from e
    try:
        yield ray
    finally:
        ray.shutdown()


class _Progress:
    """Ray actor: each shard's latest ``done``; an attempt that starts again resets its shard to 0."""

    def __init__(self) -> None:
        self.done: dict[int, int] = {}

    def set(self, shard: int, done: int) -> None:
        self.done[shard] = done

    def total(self) -> int:
        return sum(self.done.values())


def _run_shard(
    fn: Callable[[Any, Callable[[int], None]], Any],
    index: int,
    shard: Any,
    progress: Any,
    hook: Callable[[int, int], None] | None,
    every_s: float,
) -> Any:
    """The Ray task: run ``fn`` on one shard, sending its progress to the progress actor at most every ``every_s``."""
    sent = [0.0, 0]  # time of the last report sent, latest done

    def report(done: int) -> None:
        sent[1] = done
        if hook is not None:
            hook(index, done)
        now = time.monotonic()
        if progress is not None and (done == 0 or now - sent[0] >= every_s):
            sent[0] = now
            progress.set.remote(index, done)

    report(0)
    out = fn(shard, report)
    if progress is not None:  # the final count, delivered before the result: the driver reads it after the result
        import ray

        ray.get(progress.set.remote(index, sent[1]))
    return out


def _task_error(e: BaseException) -> str:
    cause = getattr(e, "cause", None)  # RayTaskError: the exception the task raised
    if isinstance(cause, BaseException):
        e = cause
    return one_line(e, with_type=True)


def map_shards(
    fn: Callable[[S, Callable[[int], None]], R],
    shards: Sequence[S],
    fold: Callable[[A | None, R], A],
    opts: RayOptions,
    *,
    gpus_per_shard: float = 0.0,
    cpus_per_shard: float = 1.0,
    initial: A | None = None,
    on_progress: Callable[[int], None] | None = None,
    describe: Callable[[S], str] = str,
) -> A | None:
    """``fold`` over ``fn(shard, report)`` for every shard, each run as a Ray task, in the order they finish.

    Needs a Ray connection (``ray_session``). ``fn`` and the shards are pickled to the workers: use a
    module-level function (``functools.partial`` of one binds settings). ``fold(acc, result)`` starts from
    ``initial`` and must not depend on arrival order for the outcome to be deterministic (``harvest.merge`` does
    not). ``on_progress(done)`` gets the sum of the shards' latest reports about every ``opts.poll_seconds``.
    Raises ``ShardFailedError`` (one line, naming the shard) when a shard fails on every attempt; the tasks
    still running are cancelled. Returns ``initial`` when there are no shards.
    """
    ray = require_ray()
    if not shards:
        return initial
    # resources in the decorator (not .options): Ray then ends a GPU task's worker when the task ends (max_calls=1),
    # so no idle worker keeps a model or a CUDA context on a GPU
    task = ray.remote(
        num_cpus=cpus_per_shard, num_gpus=gpus_per_shard, max_retries=opts.max_retries, retry_exceptions=True
    )(_run_shard)
    progress = ray.remote(num_cpus=0)(_Progress).remote() if on_progress is not None else None
    every_s = max(opts.poll_seconds / 2, 0.05)
    pending = {task.remote(fn, i, s, progress, opts.worker_hook, every_s): i for i, s in enumerate(shards)}
    acc = initial
    n = len(shards)
    try:
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1, timeout=opts.poll_seconds, fetch_local=False)
            if progress is not None and on_progress is not None:
                on_progress(ray.get(progress.total.remote()))
            for ref in ready:
                i = pending.pop(ref)
                try:
                    result = ray.get(ref)
                except ray.exceptions.RayError as e:
                    raise ShardFailedError(
                        f"shard {i + 1}/{n} ({describe(shards[i])}) failed after {opts.max_retries + 1} attempts: "
                        f"{_task_error(e)}"
                    ) from e
                acc = fold(acc, result)
                del result
        if progress is not None and on_progress is not None:
            on_progress(ray.get(progress.total.remote()))
    finally:
        for ref in pending:
            try:
                ray.cancel(ref, force=True)
            except Exception:  # noqa: BLE001 - a task that already finished cannot be cancelled
                pass
        if progress is not None:
            ray.kill(progress)
    return acc
