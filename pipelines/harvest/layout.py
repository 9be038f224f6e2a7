"""Decoder-direction neighbours and the 2-D map, from the decoder weights alone (numpy; no torch import).

``cosine_knn`` is the exact k-nearest-neighbour graph of the decoder directions by cosine, by blocked matrix
product and a per-row top-k: O(d_sae^2 x d_in) flops in blocks of bounded memory, which BLAS runs at full speed.
The build uses it twice: its first columns (without the feature itself) are the ``neighbours`` the feature pages
list, and the whole graph is umap-learn's ``precomputed_knn``, so UMAP skips its approximate NN-descent (whose
numba compilation alone costs about a minute in a fresh process) and the map is laid out on exactly the
neighbours the pages show.

``import_umap`` turns on numba's on-disk cache for umap-learn's kernels (under ``$NUMBA_CACHE_DIR``, else
``$FEATUREDICT_CACHE/numba``), so a second process does not compile them again.

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


def import_umap() -> Any:
    """``import umap`` with numba's on-disk cache on for the kernels umap-learn and pynndescent define.

    umap-learn compiles its kernels with numba without ``cache=True``; each new process compiles them again
    (seconds per build). While umap is first imported here, ``numba.njit``/``numba.jit`` default to
    ``cache=True`` for functions of those two packages, with the cache under ``numba_cache_dir()``.
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
                if str(getattr(f, "__module__", "")).startswith(("umap", "pynndescent")):
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
        return reducer.fit_transform(w).astype(np.float32)
