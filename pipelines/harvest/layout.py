"""Decoder-direction neighbours and the 2-D map, from the decoder weights alone (numpy; no torch import).

``cosine_knn`` is the exact k-nearest-neighbour graph of the decoder directions by cosine, by blocked matrix
product and a per-row top-k: O(d_sae^2 x d_in) flops in blocks of bounded memory, which BLAS runs at full speed.
The build uses it twice: its first columns (without the feature itself) are the ``neighbours`` the feature pages
list, and the whole graph is umap-learn's ``precomputed_knn``, so UMAP skips its approximate NN-descent (whose
numba compilation alone costs about a minute in a fresh process) and the map is laid out on exactly the
neighbours the pages show.

``import_umap`` turns on numba's on-disk cache for umap-learn's kernels (under ``$NUMBA_CACHE_DIR``, else
``$FEATUREDICT_CACHE/numba``), so a second process does not compile them again; ``warm_umap`` fills that cache
in the background, at the lowest CPU priority, while a fresh cache's first build or demo does other work.

``umap_layout`` is deterministic: a fixed ``random_state`` (umap-learn then runs its layout single-threaded)
and an exact, tie-stable kNN graph give the same coordinates on every run on the same machine. It runs
``UMAP_EPOCHS`` optimisation epochs at every size: umap-learn's own choice above 10,000 points. Below that
umap-learn runs 500, which on the demo's 4,608 features took 4.1 s against 1.6 s for 200, for a map that
keeps almost as much of the neighbourhood structure (trustworthiness at 15 neighbours 0.599 against 0.611;
bench/RESULTS.md).
"""

from __future__ import annotations

import os
import sys
import warnings
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

UMAP_NEIGHBOURS = 15  # umap-learn's default n_neighbors
MIN_UMAP_FEATURES = 8  # fewer features get no map
UMAP_EPOCHS = 200  # layout epochs (umap-learn's default for large data; see the module docstring)
OWN_PROCESS_MIN_FEATURES = 2048  # smaller maps take well under a second: ``UmapJob`` lays them out in process


class Knn(NamedTuple):
    """Each row's nearest decoder directions by cosine, the row itself first: ``idx`` int64 and ``cos`` float32,
    both ``[d_sae, k + 1]``, most similar first (ties: lower index first)."""

    idx: np.ndarray
    cos: np.ndarray

    def neighbours(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        """``(cos, idx)`` of the top ``n`` neighbours without the feature itself, each ``[d_sae, n]``."""
        return self.cos[:, 1 : n + 1], self.idx[:, 1 : n + 1]

    def umap_graph(self, n_neighbors: int) -> tuple[np.ndarray, np.ndarray]:
        """``(indices, cosine distances)`` of the first ``n_neighbors`` columns (self included), float32."""
        idx = np.ascontiguousarray(self.idx[:, :n_neighbors])
        dist = np.ascontiguousarray(np.clip(1.0 - self.cos[:, :n_neighbors], 0.0, 2.0).astype(np.float32))
        dist[:, 0] = 0.0  # the point itself
        return idx, dist


def normalised(w: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length (zero rows stay zero), float32."""
    w = np.asarray(w, dtype=np.float32)
    norms = np.linalg.norm(w, axis=1, keepdims=True)
    return w / np.where(norms > 0, norms, 1.0)


def cosine_knn(w_dec: np.ndarray, k: int, block: int = 512) -> Knn:
    """Exact top-``k`` cosine neighbours of every row of ``w_dec`` ``[d_sae, d_in]`` (plus the row itself, first).

    Blocks of ``block`` rows against all rows: memory ``block x d_sae`` floats at a time.
    """
    w = normalised(w_dec)
    n = w.shape[0]
    k = max(0, min(k, n - 1))
    idx = np.empty((n, k + 1), dtype=np.int64)
    cos = np.empty((n, k + 1), dtype=np.float32)
    wt = np.ascontiguousarray(w.T)
    for i in range(0, n, block):
        j = min(i + block, n)
        sims = w[i:j] @ wt  # [b, n]
        rows = np.arange(j - i)
        sims[rows, np.arange(i, j)] = np.inf  # the row itself ranks first, whatever its norm
        if k + 1 < n:
            part = np.argpartition(-sims, k, axis=1)[:, : k + 1]
        else:
            part = np.broadcast_to(np.arange(n), (j - i, n))
        vals = np.take_along_axis(sims, part, axis=1)
        # most similar first; among equal cosines the lower feature index first (lexsort: last key is primary)
        order = np.lexsort((part, -vals), axis=1)
        idx[i:j] = np.take_along_axis(part, order, axis=1)
        cos[i:j] = np.take_along_axis(vals, order, axis=1)
        cos[i:j, 0] = 1.0
    return Knn(idx, cos)


def numba_cache_dir() -> Path:
    """Where numba keeps compiled umap-learn kernels: ``$NUMBA_CACHE_DIR``, else ``$FEATUREDICT_CACHE/numba``."""
    env = os.environ.get("NUMBA_CACHE_DIR")
    if env:
        return Path(env)
    base = os.environ.get("FEATUREDICT_CACHE")
    return (Path(base) if base else Path.home() / ".cache" / "featuredict") / "numba"


DEFERRED: set[str] = set()  # the pynndescent kernels ``import_umap`` declared without their signatures
_CACHED_IN: list[Path] = []  # the cache folder ``import_umap`` gave numba (empty: compiled in memory)


def import_umap() -> Any:
    """``import umap`` with numba's on-disk cache on for the kernels umap-learn and pynndescent define.

    umap-learn compiles its kernels with numba without ``cache=True``; each new process compiles them again
    (seconds per build). While umap is first imported here, ``numba.njit``/``numba.jit`` default to
    ``cache=True`` for functions of those two packages, with the cache under ``numba_cache_dir()``.

    pynndescent (which umap imports) declares explicit signatures, so numba compiles its approximate-NN kernels
    when the module is imported: 12 of the 13.6 s a first import took on 2 cores with an empty cache, for kernels a
    layout on ``precomputed_knn`` never calls. Its functions are declared here without their signatures, so each
    compiles when first called (never, in ``umap_layout``): the first import takes 2.0 s. umap-learn's own kernels
    keep theirs, and the layout is the same, bit for bit (bench/RESULTS.md; tested).
    """
    if "umap" in sys.modules:
        return sys.modules["umap"]
    import numba
    import numba.core.config

    where = numba_cache_dir()
    try:
        where.mkdir(parents=True, exist_ok=True)
        numba.core.config.CACHE_DIR = str(where)  # type: ignore[attr-defined]  # set at import from the env
        os.environ.setdefault("NUMBA_CACHE_DIR", str(where))  # a spawned UMAP process uses the same cache
        caching = True
        _CACHED_IN[:] = [where]
    except OSError:  # no writable cache: compile in memory, as umap-learn does by itself
        caching = False
    originals = (numba.njit, numba.jit)

    def with_cache(decorator: Any) -> Any:
        def wrapped(*args: Any, **kws: Any) -> Any:
            fn = args[0] if args and callable(args[0]) else None
            if fn is not None:
                if str(getattr(fn, "__module__", "")).startswith(("umap", "pynndescent")):
                    kws.setdefault("cache", True)
                return decorator(*args, **kws)

            inner = decorator(*args, **kws)

            def deco(f: Any) -> Any:
                module = str(getattr(f, "__module__", ""))
                if module.startswith("pynndescent"):  # no signatures: compiled when first called, if ever
                    if args:
                        DEFERRED.add(f"{module}.{f.__qualname__}")
                    return decorator(**{"cache": True, **kws})(f)
                if module.startswith("umap"):
                    return decorator(*args, **{"cache": True, **kws})(f)
                return inner(f)

            return deco

        return wrapped

    if caching:
        numba.njit, numba.jit = with_cache(numba.njit), with_cache(numba.jit)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import umap
    finally:
        numba.njit, numba.jit = originals
    return umap


def umap_layout(w_dec: np.ndarray, knn: Knn | None = None, seed: int = 0) -> np.ndarray | None:
    """2-D UMAP of decoder directions on their exact cosine kNN graph, ``[d_sae, 2]`` float32; None when there
    are fewer than ``MIN_UMAP_FEATURES`` features. ``knn`` (from ``cosine_knn``, at least ``UMAP_NEIGHBOURS``
    columns, self included) is computed when not given."""
    w = np.asarray(w_dec, dtype=np.float32)
    n = w.shape[0]
    if n < MIN_UMAP_FEATURES:
        return None
    k = min(UMAP_NEIGHBOURS, n - 1)  # umap-learn's n_neighbors counts the point itself
    if knn is None or knn.idx.shape[1] < k:
        knn = cosine_knn(w, k - 1)
    idx, dist = knn.umap_graph(k)
    umap = import_umap()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "no NNDescent search index" (we never transform new points)
        reducer = umap.UMAP(
            n_components=2,
            metric="cosine",
            n_neighbors=k,
            random_state=seed,
            n_epochs=UMAP_EPOCHS,
            precomputed_knn=(idx, dist, None),
        )
        out = reducer.fit_transform(w).astype(np.float32)
    _mark_warm()
    return out


def _mark_warm() -> None:
    """A layout ran: its kernels are compiled into the cache ``import_umap`` gave numba (``warm_umap`` need not
    run for that cache again)."""
    if not _CACHED_IN:  # umap was imported elsewhere, or compiled in memory
        return
    try:
        _warm_marker(_CACHED_IN[0]).write_text("umap-learn kernels compiled into this folder's numba cache\n")
    except OSError:
        pass


def _umap_worker(folder: str) -> None:
    """The body of ``UmapJob``'s process: ``folder/in.npz`` -> ``folder/out.npy`` (or ``folder/error.txt``)."""
    where = Path(folder)
    try:
        with np.load(where / "in.npz") as d:
            knn = Knn(d["idx"], d["cos"]) if "idx" in d else None
            layout = umap_layout(d["w"], knn, int(d["seed"]))
        np.save(where / "part.npy", np.zeros((0, 2), np.float32) if layout is None else layout)
        os.replace(where / "part.npy", where / "out.npy")  # whole or not at all
    except BaseException as e:  # noqa: BLE001 - any failure goes back to the parent, which lays out itself
        (where / "error.txt").write_text(f"{type(e).__name__}: {e}")
        raise SystemExit(1) from None


WARM_SAMPLE = 64  # points of the warm-up layout: enough to run every kernel a real layout runs


def _warm_marker(cache: Path | None = None) -> Path:
    """The file a finished warm-up leaves in numba's cache folder (``numba_cache_dir()`` when not given), named
    by the umap-learn and numba versions (an upgrade compiles again)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        tag = f"umap-{version('umap-learn')}-numba-{version('numba')}"
    except PackageNotFoundError:  # pragma: no cover - umap-learn is a core dependency
        tag = "unknown"
    return (cache or numba_cache_dir()) / f"warm-{tag}"


def _warm_worker() -> None:
    """The body of ``warm_umap``'s process: lowest CPU priority, then a tiny layout through ``umap_layout`` (the
    import and every kernel a real layout compiles, into numba's cache), then the marker."""
    if hasattr(os, "nice"):
        os.nice(19)
    rng = np.random.default_rng(0)
    w = rng.standard_normal((WARM_SAMPLE, 16)).astype(np.float32)
    umap_layout(w, cosine_knn(w, UMAP_NEIGHBOURS), 0)  # leaves the marker


_WARMING: list[Any] = []  # the running warm-up process, if any (one per process that started it)


def warm_umap() -> bool:
    """Start compiling umap-learn's kernels into numba's on-disk cache in a background process at the lowest CPU
    priority, unless a warm-up already finished for this cache (its marker) or is running. True when one starts.

    A fresh cache costs a first map about 6.5 s of numba compilation on 2 cores (the import 2.0 s, the first
    layout's kernels 4.5 s), which a build or the demo would otherwise wait for after the harvest. Started when a
    build or the demo begins, the warm-up takes only the CPU left idle: the model load's, and in the demo the
    single-threaded dequantisation of the GGUF (a harvest leaves none: measured). ``UmapJob`` stops it when the map
    is due (what it compiled by then stays cached: numba writes each cache file to a temporary name and renames
    it). Nothing here changes a layout: the cache holds the kernels' machine code, not results."""
    import subprocess

    if _WARMING and _WARMING[0].poll() is None:
        return False
    _WARMING.clear()
    try:
        if _warm_marker().exists():
            return False
        numba_cache_dir().mkdir(parents=True, exist_ok=True)
        code = "from featuredict.pipelines.harvest.layout import _warm_worker; _warm_worker()"
        proc = subprocess.Popen(
            [sys.executable, "-c", code],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            env={**os.environ, "NUMBA_CACHE_DIR": str(numba_cache_dir())},
        )
    except OSError:  # no writable cache or no subprocesses: the first map compiles its kernels itself
        return False
    _WARMING.append(proc)
    return True


def stop_warming() -> None:
    """Stop a running warm-up (``warm_umap``): the map is due, and its own process compiles what is left."""
    for proc in _WARMING:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
    _WARMING.clear()


class UmapJob:
    """``umap_layout(w_dec, knn, seed)`` in a process of its own, started at once; ``result()`` waits for it.

    umap-learn lays out single-threaded (see ``umap_layout``), and so is most of what a build does after the
    harvest (turning the state into rows), so on two cores the two overlap. The child is a fresh interpreter
    (``python -c``: no fork of a process that holds a model and torch's threads, and no re-import of the
    caller's main module); it reads the inputs from a temporary folder and writes the layout there, so its
    coordinates are ``umap_layout``'s own (tested). Where the process cannot start or fails, ``result()`` lays
    out in this process instead, with a warning: the map never costs the build. ``own_process`` None: in a
    process of its own from ``OWN_PROCESS_MIN_FEATURES`` features up, else here (when ``result()`` is called).
    """

    def __init__(
        self, w_dec: np.ndarray, knn: Knn | None = None, seed: int = 0, own_process: bool | None = None
    ) -> None:
        import subprocess
        import tempfile

        stop_warming()  # whatever a warm-up compiled is cached; the layout compiles the rest (at full priority)
        self._args = (np.ascontiguousarray(w_dec, dtype=np.float32), knn, seed)
        self._proc: subprocess.Popen[bytes] | None = None
        self._dir: tempfile.TemporaryDirectory[str] | None = None
        n = self._args[0].shape[0]
        if n < MIN_UMAP_FEATURES or not (n >= OWN_PROCESS_MIN_FEATURES if own_process is None else own_process):
            return  # no map, or a small one: laid out here, by result()
        try:
            self._dir = tempfile.TemporaryDirectory(prefix="featuredict-umap-")
            into = Path(self._dir.name) / "in.npz"
            if knn is None:
                np.savez(into, w=self._args[0], seed=np.array(seed))
            else:
                np.savez(into, w=self._args[0], seed=np.array(seed), idx=knn.idx, cos=knn.cos)
            code = (
                "import sys; from featuredict.pipelines.harvest.layout import _umap_worker; _umap_worker(sys.argv[1])"
            )
            self._proc = subprocess.Popen(
                [sys.executable, "-c", code, self._dir.name],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                env={**os.environ, "NUMBA_CACHE_DIR": str(numba_cache_dir())},
            )
        except OSError as e:  # no temporary space, no subprocesses in this sandbox
            warnings.warn(f"UMAP runs in this process: its own could not start ({e})", stacklevel=2)
            self.close()

    def result(self) -> np.ndarray | None:
        """The layout (None below ``MIN_UMAP_FEATURES`` features); blocks until the child has written it."""
        if self._args[0].shape[0] < MIN_UMAP_FEATURES:
            return None
        if self._proc is not None and self._dir is not None:
            where = Path(self._dir.name)
            try:
                code = self._proc.wait()
                if code == 0 and (where / "out.npy").exists():
                    return np.load(where / "out.npy")
                err = where / "error.txt"
                why = err.read_text() if err.exists() else f"exit status {code}"
            finally:
                self.close()
            warnings.warn(f"UMAP in its own process failed ({why}); laying out in this process", stacklevel=2)
        return umap_layout(*self._args)

    def close(self) -> None:
        """Stop the child if it still runs (a build that failed does not wait for its map); safe to call twice."""
        if self._proc is not None:
            if self._proc.poll() is None:
                self._proc.kill()
            self._proc.wait()
            self._proc = None
        if self._dir is not None:
            self._dir.cleanup()
            self._dir = None
