"""Generate a SYNTHETIC featuredict database (exact schema, made-up content) for tests and benchmarks.

Nothing here comes from a model: ``sae_id`` and ``corpus`` are ``'synthetic'`` and the model spec says so.
Shapes at the default size: 65,536 features; ``examples`` holds 20 top contexts + ``n_bands * per_band``
interval samples per live feature, each ``ctx_len`` (64) tokens with per-token activations.

Structure that makes the data look like a dictionary: features belong to clusters (``n_features / 128``);
each cluster has a few theme words that appear at the max-activating position of its features' contexts;
decoders are cluster centre + noise (so decoder-cosine neighbours are mostly same-cluster); UMAP positions
are the cluster's 2-D centre + noise; densities are log-normal (median ~3e-4) with ~2% dead features.

Usage::

    python bench/synth_db.py OUT.duckdb [--features 65536] [--seed 0]

Everything is vectorised (numpy + pyarrow bulk inserts, chunked by feature); 65,536 features take about
a minute on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import duckdb
import numpy as np
import pyarrow as pa

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from featuredict.db.schema import create_schema  # noqa: E402

SAE_ID = "synthetic"
BOS = "<s>"
COMMON_WORDS = (
    "the of and to in a is that for it as was with be by on not he I this are or his from at which but "
    "have an they you were her she there been one all we their has would when if so no will more can who "
    "time people year way day man thing woman life child world school state family student group country "
    "problem hand part place case week company system program question work government number night point "
    "home water room mother area money story fact month lot right study book eye job word business issue "
    "side kind head house service friend father power hour game line end member law car city community name"
).split()
THEME_WORDS = (
    "deception lie lying deceive trick mislead conceal hide secret betray scam fraud phishing password "
    "urgent wire transfer bitcoin refund account verify login bank virus pathogen toxin anthrax protein "
    "enzyme gene dna cell vaccine bread flour yeast dough oven bake recipe salt sugar butter cat dog kitten "
    "garden river boat rock ocean forest mountain weather rain storm snow market stock price interest rate "
    "inflation bond dollar euro python function return print import class variable loop array string "
    "photosynthesis glucose energy light chlorophyll molecule atom electron quantum physics gravity planet "
    "star galaxy moon rocket music song guitar piano violin drum dance poem novel chapter author poetry "
    "football soccer goal match team player coach league hospital doctor nurse patient surgery medicine "
    "court judge lawyer verdict trial crime police prison election vote senate president minister war army "
    "weapon soldier battle peace treaty"
).split()
SYLLABLES = ("ka", "lo", "mi", "ne", "ru", "ta", "shi", "vo", "pe", "zu", "ba", "de", "fi", "go", "ha", "ju")


def make_vocab(n_pseudo: int, rng: np.random.Generator) -> np.ndarray:
    """Vocabulary of token strings ``[V]``: common words, theme words, then pseudo-words (all ' '-prefixed)."""
    syl = np.array(SYLLABLES)
    parts = syl[rng.integers(0, len(syl), size=(n_pseudo, 3))]
    pseudo = ["".join(p) for p in parts]
    words = list(dict.fromkeys([*COMMON_WORDS, *THEME_WORDS, *pseudo]))
    return np.array([" " + w for w in words], dtype=object)


def _lognormal_densities(n: int, n_tokens: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """``density [n]`` (float64) and ``fire_count [n]`` (int64); ~2% dead (zero)."""
    log10d = np.clip(rng.normal(-3.5, 0.8, size=n), -6.0, -0.5)
    density = 10.0**log10d
    dead = rng.random(n) < 0.02
    fire = np.maximum(1, np.round(density * n_tokens)).astype(np.int64)
    fire[dead] = 0
    return fire / n_tokens, fire


def _features_table(
    n: int,
    d_in: int,
    n_tokens: int,
    hist_edges: np.ndarray,
    vocab: np.ndarray,
    theme: np.ndarray,
    rng: np.random.Generator,
) -> tuple[pa.Table, dict[str, np.ndarray]]:
    """The ``features`` rows as an Arrow table, plus arrays the examples need (shapes in comments)."""
    n_clusters = max(1, n // 128)
    cluster = rng.integers(0, n_clusters, size=n)  # [n]
    density, fire = _lognormal_densities(n, n_tokens, rng)  # [n], [n]
    dead = fire == 0
    max_act = rng.lognormal(1.5, 0.6, size=n).astype(np.float32)  # [n]
    max_act[dead] = 0.0
    mean_act = (max_act * rng.uniform(0.15, 0.4, size=n)).astype(np.float32)

    # Histogram: firing counts spread as a log-normal bump around mean_act over the log-spaced bins.
    centres = np.sqrt(hist_edges[:-1] * hist_edges[1:])  # [B]
    z = (np.log(centres)[None, :] - np.log(np.maximum(mean_act, 1e-6))[:, None]) / 0.7
    w = np.exp(-0.5 * z**2) * (centres[None, :] <= max_act[:, None] * 1.05)
    w = w / np.maximum(w.sum(1, keepdims=True), 1e-12)
    hist = np.floor(w * fire[:, None]).astype(np.int64)  # [n, B]

    # Decoders: cluster centre + noise, unit norm. Neighbours: best of 32 same-cluster candidates.
    centres_d = rng.normal(size=(n_clusters, d_in)).astype(np.float32)
    dec = centres_d[cluster] + 0.8 * rng.normal(size=(n, d_in)).astype(np.float32)
    dec /= np.linalg.norm(dec, axis=1, keepdims=True)  # [n, d_in]
    order = np.argsort(cluster, kind="stable")
    starts = np.searchsorted(cluster[order], np.arange(n_clusters))
    counts = np.bincount(cluster, minlength=n_clusters)
    k_nb, n_cand = 10, 32
    neigh = np.empty((n, k_nb), dtype=np.int32)
    ncos = np.empty((n, k_nb), dtype=np.float32)
    for lo in range(0, n, 8192):
        idx = np.arange(lo, min(n, lo + 8192))
        c = cluster[idx]
        r0 = rng.integers(0, np.maximum(counts[c], 1))[:, None]
        pick = starts[c][:, None] + (r0 + np.arange(n_cand)[None, :]) % np.maximum(counts[c], 1)[:, None]
        cand = order[pick]  # [b, n_cand]
        cand = np.where(cand == idx[:, None], (cand + 1) % n, cand)
        cos = np.einsum("bd,bkd->bk", dec[idx], dec[cand])  # [b, n_cand]
        dup = ((cand[:, :, None] == cand[:, None, :]) & np.tri(n_cand, k=-1, dtype=bool)[None]).any(2)
        cos[dup | (cand == idx[:, None])] = -np.inf
        top = np.argsort(-cos, axis=1)[:, :k_nb]
        neigh[idx] = np.take_along_axis(cand, top, 1)
        ncos[idx] = np.take_along_axis(cos, top, 1)

    ang = rng.uniform(0, 2 * np.pi, size=n_clusters)
    rad = np.sqrt(rng.uniform(0, 1, size=n_clusters)) * 12
    umap = np.stack([rad * np.cos(ang), rad * np.sin(ang)], 1)[cluster] + rng.normal(0, 0.35, size=(n, 2))

    # Theme words: 4 per cluster from THEME_WORDS, plus a per-feature pseudo-word.
    cl_words = theme[rng.integers(0, len(theme), size=(n_clusters, 4))]  # [n_clusters, 4] vocab ids
    own = np.arange(n) % (len(vocab) - len(theme) - len(COMMON_WORDS)) + len(theme) + len(COMMON_WORDS)
    feat_words = np.concatenate([cl_words[cluster], own[:, None]], 1)  # [n, 5] vocab ids
    pos_ids = np.concatenate([feat_words, rng.integers(0, len(vocab), size=(n, 5))], 1)  # [n, 10]
    neg_ids = rng.integers(0, len(vocab), size=(n, 10))
    pos_vals = -np.sort(-rng.uniform(0.2, 1.5, size=(n, 10)), 1).astype(np.float32)
    neg_vals = np.sort(-rng.uniform(0.2, 1.5, size=(n, 10)), 1).astype(np.float32)

    def str_lists(ids: np.ndarray) -> pa.Array:
        flat = pa.array(vocab[ids.ravel()].tolist(), pa.string())
        return pa.ListArray.from_arrays(pa.array(np.arange(0, ids.size + 1, ids.shape[1], dtype=np.int32)), flat)

    def num_lists(vals: np.ndarray, typ: pa.DataType) -> pa.Array:
        off = pa.array(np.arange(0, vals.size + 1, vals.shape[1], dtype=np.int32))
        return pa.ListArray.from_arrays(off, pa.array(vals.ravel(), typ))

    tbl = pa.table(
        {
            "sae_id": pa.array([SAE_ID] * n, pa.string()),
            "feature": pa.array(np.arange(n, dtype=np.int32)),
            "max_act": pa.array(max_act),
            "fire_count": pa.array(fire),
            "density": pa.array(density),
            "mean_act": pa.array(np.where(dead, np.nan, mean_act).astype(np.float32), from_pandas=True),
            "dead": pa.array(dead),
            "hist_counts": num_lists(hist, pa.int64()),
            "pos_tokens": str_lists(pos_ids),
            "pos_values": num_lists(pos_vals, pa.float32()),
            "neg_tokens": str_lists(neg_ids),
            "neg_values": num_lists(neg_vals, pa.float32()),
            "decoder": num_lists(dec, pa.float32()),
            "decoder_norm": pa.array(np.ones(n, dtype=np.float32)),
            "neighbours": num_lists(neigh, pa.int32()),
            "neighbour_cos": num_lists(ncos, pa.float32()),
            "umap_x": pa.array(umap[:, 0].astype(np.float32)),
            "umap_y": pa.array(umap[:, 1].astype(np.float32)),
        }
    )
    extra = {"max_act": max_act, "dead": dead, "feat_words": feat_words, "pos_ids": pos_ids}
    return tbl, extra


def _examples_chunk(
    feats: np.ndarray,
    max_act: np.ndarray,
    feat_words: np.ndarray,
    vocab_size: int,
    n_top: int,
    n_bands: int,
    per_band: int,
    ctx_len: int,
    rng: np.random.Generator,
) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Example rows for live features ``feats [f]`` (R = f * (n_top + n_bands * per_band) rows).

    Returns (columns, token_ids): columns maps names to arrays ``[R]`` ('acts' is ``[R, ctx_len]``
    float32); token_ids is ``[R, ctx_len]`` int32 vocab ids (position 0 = BOS).
    """
    per_feat = n_top + n_bands * per_band
    f = np.repeat(feats, per_feat)  # [R]
    r = len(f)
    slot = np.tile(np.arange(per_feat), len(feats))  # [R]
    is_top = slot < n_top
    band = np.where(is_top, 0, (slot - n_top) // max(per_band, 1))
    rank = np.where(is_top, slot, (slot - n_top) % max(per_band, 1))
    fmax = max_act[f]
    # top: descending fractions of the feature max; interval: uniform inside the band.
    top_frac = 1.0 - np.sort(rng.uniform(0, 0.6, size=(len(feats), n_top)), 1).ravel()
    frac = np.zeros(r)
    frac[is_top] = top_frac
    lo_frac = band / max(n_bands, 1)
    hi_frac = (band + 1) / max(n_bands, 1)
    frac[~is_top] = (lo_frac + rng.uniform(0.05, 0.95, size=r) * (hi_frac - lo_frac))[~is_top]
    ex_max = (fmax * frac).astype(np.float32)
    band_lo = np.where(is_top, np.nan, fmax * lo_frac).astype(np.float32)
    band_hi = np.where(is_top, np.nan, fmax * hi_frac).astype(np.float32)

    # Zipf-ish background tokens; the feature's theme words around the max position.
    ids = (rng.zipf(1.3, size=(r, ctx_len)) - 1) % (vocab_size - 1) + 1  # never BOS (id 0)
    ids[:, 0] = 0  # BOS
    max_pos = rng.integers(4, ctx_len - 2, size=r)
    local = feat_words[f]  # [R, 5]
    rows = np.arange(r)
    ids[rows, max_pos] = local[rows, rng.integers(0, local.shape[1], size=r)]
    ids[rows, max_pos - 1] = local[rows, rng.integers(0, local.shape[1], size=r)]
    acts = np.zeros((r, ctx_len), dtype=np.float32)
    sprinkle = rng.random((r, ctx_len)) < 0.05
    acts[sprinkle] = (rng.uniform(0, 0.3, size=(r, ctx_len)) * ex_max[:, None])[sprinkle]
    acts[rows, max_pos - 1] = ex_max * rng.uniform(0.2, 0.7, size=r)
    acts[rows, max_pos + 1] = ex_max * rng.uniform(0.0, 0.5, size=r)
    acts[rows, max_pos] = ex_max
    acts[:, 0] = 0.0
    cols = {
        "f": f,
        "kind_top": is_top,
        "band": band.astype(np.int32),
        "band_lo": band_lo,
        "band_hi": band_hi,
        "rank": rank.astype(np.int32),
        "context_id": rng.integers(0, 10**7, size=r).astype(np.int64),
        "max_act": ex_max,
        "max_pos": max_pos.astype(np.int32),
        "acts": acts,
    }
    return cols, ids.astype(np.int32)


def build_synthetic_db(
    path: str | Path,
    n_features: int = 65536,
    n_top: int = 20,
    ctx_len: int = 64,
    n_bands: int = 3,
    per_band: int = 4,
    d_in: int = 64,
    n_labels: int | None = None,
    seed: int = 0,
    chunk: int = 4096,
    verbose: bool = False,
) -> Path:
    """Write a synthetic database at ``path`` (overwritten) and return the path.

    ``n_labels`` labelled features (default 1%, at least 3) get a label/tags/notes by author
    'synthetic-generator' so that label filters and colour-by-tag have something to show.
    """
    t0 = time.perf_counter()
    path = Path(path)
    for p in (path, Path(str(path) + ".wal")):
        if p.exists():
            p.unlink()
    rng = np.random.default_rng(seed)
    vocab = make_vocab(4000, rng)
    vocab[0] = BOS
    theme = np.array([i for i, w in enumerate(vocab) if w.strip() in set(THEME_WORDS)])
    n_contexts = 200_000
    n_tokens = n_contexts * ctx_len
    hist_edges = np.logspace(-2, 2, 25)

    con = duckdb.connect(str(path))
    create_schema(con)
    con.execute(
        """INSERT INTO saes (sae_id, model_spec, model_name, model_kwargs, dtype, sae_source, hook_name, hook_kind,
           architecture, d_in, d_sae, context_size, prepend_bos, corpus, n_tokens, n_contexts, fve, l0,
           dead_fraction, hist_edges, build_seconds, built_at, tool_version, config_json)
           VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, now(), ?, ?)""",
        [
            SAE_ID,
            "synthetic (no model: made-up data for tests and benchmarks)",
            "synthetic",
            "{}",
            "float32",
            json.dumps({"kind": "folder", "path": "synthetic"}),
            "synthetic.hook",
            "hf_module",
            "synthetic",
            d_in,
            n_features,
            ctx_len,
            True,
            "synthetic",
            n_tokens,
            n_contexts,
            0.0,
            0.0,
            0.0,
            hist_edges.tolist(),
            0.0,
            "synthetic",
            json.dumps({"synthetic": True, "seed": seed}),
        ],
    )

    ftbl, extra = _features_table(n_features, d_in, n_tokens, hist_edges, vocab, theme, rng)
    max_act, dead, feat_words, pos_ids = extra["max_act"], extra["dead"], extra["feat_words"], extra["pos_ids"]
    vocab_arr = pa.array(vocab.tolist(), pa.string())

    # Examples, chunked by feature; collect search text (tokens around each top max position).
    search_text = np.empty(n_features, dtype=object)
    max_tokens: list[list[str] | None] = [None] * n_features
    live = np.flatnonzero(~dead)
    for lo in range(0, len(live), chunk):
        feats = live[lo : lo + chunk]
        cols, ids = _examples_chunk(feats, max_act, feat_words, len(vocab), n_top, n_bands, per_band, ctx_len, rng)
        r = len(cols["f"])
        off = pa.array(np.arange(0, r * ctx_len + 1, ctx_len, dtype=np.int32))
        tokens = pa.ListArray.from_arrays(off, vocab_arr.take(pa.array(ids.ravel())))
        batch = pa.table(
            {
                "sae_id": pa.array([SAE_ID] * r, pa.string()),
                "feature": pa.array(cols["f"].astype(np.int32)),
                "kind": pa.array(np.where(cols["kind_top"], "top", "interval").tolist(), pa.string()),
                "band": pa.array(cols["band"]),
                "band_lo": pa.array(cols["band_lo"], from_pandas=True),
                "band_hi": pa.array(cols["band_hi"], from_pandas=True),
                "rank": pa.array(cols["rank"]),
                "context_id": pa.array(cols["context_id"]),
                "max_act": pa.array(cols["max_act"]),
                "max_pos": pa.array(cols["max_pos"]),
                "token_ids": pa.ListArray.from_arrays(off, pa.array(ids.ravel())),
                "tokens": tokens,
                "acts": pa.ListArray.from_arrays(off, pa.array(cols["acts"].ravel())),
            }
        )
        con.register("ex_batch", batch)
        con.execute("INSERT INTO examples SELECT * FROM ex_batch")
        con.unregister("ex_batch")
        # search text: tokens max_pos-3 .. max_pos+2 of each top example, then the promoted tokens.
        top = cols["kind_top"]
        per = n_top
        mp = cols["max_pos"][top].reshape(-1, per)  # [f, n_top]
        tid = ids[top].reshape(len(feats), per, ctx_len)
        win = np.clip(mp[:, :, None] + np.arange(-3, 3)[None, None, :], 1, ctx_len - 1)
        wid = np.take_along_axis(tid, win, 2)  # [f, n_top, 6]
        wtxt = vocab[wid]
        mtok = vocab[np.take_along_axis(tid, mp[:, :, None], 2)[:, :, 0]]
        for j, fe in enumerate(feats):
            parts = ["".join(w).strip() for w in wtxt[j]]
            search_text[fe] = " | ".join(parts) + " || " + " ".join(vocab[pos_ids[fe]]).strip()
            max_tokens[fe] = list(mtok[j])
        if verbose:
            print(f"  examples {lo + len(feats)}/{len(live)} features  {time.perf_counter() - t0:.1f}s", flush=True)
    for fe in np.flatnonzero(dead):
        search_text[fe] = None

    ftbl = ftbl.append_column("max_tokens", pa.array(max_tokens, pa.list_(pa.string())))
    ftbl = ftbl.append_column("search_text", pa.array(search_text.tolist(), pa.string()))
    con.register("feat_tbl", ftbl)
    con.execute("INSERT INTO features SELECT * FROM feat_tbl")
    con.unregister("feat_tbl")

    n_lab = max(3, n_features // 100) if n_labels is None else n_labels
    if n_lab:
        tags_pool = ["deception", "bio", "finance", "code", "syntax", "safety", "food", "nature"]
        lab_feats = rng.choice(live, size=min(n_lab, len(live)), replace=False)
        labels = pa.table(
            {
                "sae_id": pa.array([SAE_ID] * len(lab_feats)),
                "feature": pa.array(lab_feats.astype(np.int32)),
                "label": pa.array(
                    [
                        f"synthetic: {vocab[feat_words[f, 0]].strip()} / {vocab[feat_words[f, 1]].strip()}"
                        for f in lab_feats
                    ]
                ),
                "tags": pa.array(
                    [[tags_pool[(int(f) * 7) % len(tags_pool)]] for f in lab_feats], pa.list_(pa.string())
                ),
                "notes": pa.array(["made-up label from bench/synth_db.py"] * len(lab_feats)),
                "author": pa.array(["synthetic-generator"] * len(lab_feats)),
            }
        )
        con.register("lab_tbl", labels)
        con.execute("INSERT INTO labels SELECT *, now() FROM lab_tbl")
        con.unregister("lab_tbl")
    # Statistics consistent with the made-up data: L0 = expected active features per token = sum of
    # densities; FVE is unknown without a model (NULL).
    con.execute(
        "UPDATE saes SET l0 = ?, dead_fraction = ?, fve = NULL WHERE sae_id = ?",
        [float(ftbl.column("density").to_numpy().sum()), float(dead.mean()), SAE_ID],
    )
    con.execute("CHECKPOINT")
    con.close()
    if verbose:
        print(f"wrote {path} ({path.stat().st_size / 2**20:.0f} MiB) in {time.perf_counter() - t0:.1f}s")
    return path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out", help="DuckDB file to write (overwritten)")
    ap.add_argument("--features", type=int, default=65536)
    ap.add_argument("--top", type=int, default=20)
    ap.add_argument("--ctx", type=int, default=64)
    ap.add_argument("--bands", type=int, default=3)
    ap.add_argument("--per-band", type=int, default=4)
    ap.add_argument("--d-in", type=int, default=64)
    ap.add_argument("--labels", type=int, default=None)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    build_synthetic_db(
        args.out,
        args.features,
        args.top,
        args.ctx,
        args.bands,
        args.per_band,
        args.d_in,
        args.labels,
        args.seed,
        verbose=True,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
