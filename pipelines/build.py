"""``featuredict build``: (causal LM, SAE, corpus) -> DuckDB feature dictionary.

Steps: load model + SAE at the SAE's hook; stream the corpus as contexts; run the model only up to the hook,
encode with the SAE and fold each batch into a mergeable ``HarvestState``; then compute logit effects,
decoder-cosine neighbours and a UMAP layout from the weights, and write everything for this SAE into the
database. The write goes to a temporary file (other SAEs and all user tables copied over from the existing
file) that replaces the database only on success, so a failed or interrupted build leaves it intact.
"""

from __future__ import annotations

import json
import logging
import os
import time
import warnings
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import duckdb
import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from featuredict.db.filelock import replacing
from featuredict.db.schema import copy_kept_rows, create_schema

from . import __version__
from .corpus import CorpusSpec, batch_contexts, iter_contexts, iter_documents, validate
from .harvest import HarvestConfig, HarvestState, choose_bands, update
from .models import dtype_name
from .runtime import Runtime, load_runtime, token_strings
from .saes import SaeSource

log = logging.getLogger(__name__)
FVE_WARN = 0.5


@dataclass
class BuildConfig:
    model: str
    sae: SaeSource
    corpus: CorpusSpec
    db: str = "featuredict.duckdb"
    sae_name: str | None = None  # sae_id in the database; default derived from model + hook + d_sae
    hook: str | None = None  # override the SAE's hook_name (rarely right)
    context_size: int = 64
    max_tokens: int = 200_000
    batch_size: int = 16
    harvest: HarvestConfig = field(default_factory=HarvestConfig)
    n_interval_bands: int = 5
    n_logits: int = 10
    n_neighbours: int = 10
    umap: bool = True
    outlier_norm_ratio: float = 10.0  # see Runtime.outlier_norm_ratio; 0 disables
    device: str | None = None
    dtype: str | None = None  # model dtype; None: float32 on CPU, bfloat16 (else float16) on CUDA
    corpus_description: str | None = None
    progress: bool = True


@dataclass
class BuildResult:
    db: Path
    sae_id: str
    n_tokens: int
    n_contexts: int
    d_sae: int
    fve: float
    l0: float
    dead_fraction: float
    seconds: float
    tokens_per_s: float
    dtype: str  # what the model ran in

    def summary(self) -> str:
        return (
            f"{self.sae_id}: {self.n_tokens:,} tokens in {self.n_contexts:,} contexts, d_sae={self.d_sae}, "
            f"FVE={self.fve:.3f}, L0={self.l0:.1f}, dead={self.dead_fraction:.1%}, "
            f"{self.seconds:.1f}s ({self.tokens_per_s:,.0f} tok/s harvest, model in {self.dtype}) -> {self.db}"
        )


# ---- harvesting -----------------------------------------------------------------------------------------


def harvest_corpus(rt: Runtime, cfg: BuildConfig, ctx_offset: int = 0) -> HarvestState:
    """Stream the corpus through model + SAE into a HarvestState (context ids start at ``ctx_offset``)."""
    tok = rt.tokenizer
    d_in = int(rt.sae.cfg.d_in)
    state = HarvestState.empty(cfg.harvest, rt.d_sae, cfg.context_size, d_in)
    contexts = iter_contexts(iter_documents(cfg.corpus), tok, cfg.context_size, rt.prepend_bos)
    bar = tqdm(total=cfg.max_tokens, unit="tok", unit_scale=True, desc="harvest", disable=not cfg.progress)
    seen = 0
    ctx_next = ctx_offset
    t0 = time.perf_counter()
    with torch.no_grad():
        for ids, mask in batch_contexts(contexts, cfg.batch_size, cfg.context_size, rt.pad_id):
            x, f, valid = rt.encode(ids, mask)
            recon = rt.sae.decode(f)  # FVE reads valid positions only, where f is not zeroed
            ctx_ids = torch.arange(ctx_next, ctx_next + ids.shape[0], dtype=torch.int64)
            ctx_next += ids.shape[0]
            # padding is stored as PAD_SLOT (not a token id), so stored windows end exactly where the text does
            update(state, f, ids.masked_fill(~mask.bool(), PAD_SLOT), valid, ctx_ids, x, recon)
            n = int(valid.sum())  # the budget counts the tokens statistics count (no BOS, pad or outliers)
            seen += n
            bar.update(n)
            if seen >= cfg.max_tokens:
                break
    bar.total = max(bar.total, bar.n)  # the last batch may overshoot the token budget
    bar.refresh()
    bar.close()
    state.harvest_seconds = time.perf_counter() - t0
    if state.n_contexts == 0:
        raise ValueError(f"the corpus {cfg.corpus.describe()} gave no tokens")
    return state


# ---- weight-based statistics ----------------------------------------------------------------------------


def unembedding(rt: Runtime) -> tuple[torch.Tensor, bool]:
    """``([d_model, vocab] unembedding with the final norm's scale folded in, centre)``.

    ``centre`` is True when the final norm is a LayerNorm, which subtracts the mean over ``d_model`` before
    scaling: decoder directions must then be centred too (RMSNorm does not centre). The norm's 1/rms factor
    is positive and the same for every token, so it does not change which tokens a direction promotes.
    """
    w_u = rt.loaded.unembedding_matrix()
    norm = rt.loaded.final_norm()
    name = type(norm).__name__.lower() if norm is not None else ""
    centre = "layernorm" in name and "rms" not in name
    scale = None
    if norm is not None:
        scale = getattr(norm, "weight", None)
        if scale is None:
            scale = getattr(norm, "w", None)  # TransformerLens LayerNorm / RMSNorm
    if isinstance(scale, torch.Tensor) and scale.shape == (w_u.shape[0],):
        scale = scale.detach().float().to(w_u.device)
        if type(norm).__name__.startswith("Gemma"):  # Gemma's RMSNorm multiplies by (1 + weight)
            scale = 1.0 + scale
        w_u = w_u * scale[:, None]
    return w_u, centre


def logit_effects(
    w_dec: torch.Tensor, w_u: torch.Tensor, n: int, chunk: int = 512
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-n promoted and suppressed tokens of each decoder direction through the unembedding.

    w_dec: [d_sae, d_model], w_u: [d_model, vocab] -> (pos_val, pos_idx, neg_val, neg_idx), each [d_sae, n];
    neg_* ascending (most suppressed first).
    """
    outs = []
    n = min(n, w_u.shape[1])
    for i in range(0, w_dec.shape[0], chunk):
        logits = w_dec[i : i + chunk].float() @ w_u
        pv, pi = logits.topk(n, dim=1)
        nv, ni = logits.topk(n, dim=1, largest=False)
        outs.append((pv, pi, nv, ni))
    return tuple(torch.cat(t) for t in zip(*outs, strict=True))  # type: ignore[return-value]


def decoder_neighbours(w_dec: torch.Tensor, n: int, chunk: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-n cosine neighbours of each decoder row, excluding itself: (cos [d_sae, n], idx [d_sae, n])."""
    w = torch.nn.functional.normalize(w_dec.float(), dim=1)
    F = w.shape[0]
    n = min(n, F - 1)
    cos_out, idx_out = [], []
    for i in range(0, F, chunk):
        sims = w[i : i + chunk] @ w.T
        rows = torch.arange(i, min(i + chunk, F))
        sims[rows - i, rows] = -torch.inf
        c, j = sims.topk(n, dim=1)
        cos_out.append(c)
        idx_out.append(j)
    return torch.cat(cos_out), torch.cat(idx_out)


def umap_layout(w_dec: torch.Tensor, seed: int = 0) -> np.ndarray | None:
    """2-D UMAP of decoder directions (cosine); None when there are too few features."""
    F = w_dec.shape[0]
    if F < 8:
        return None
    import umap

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reducer = umap.UMAP(n_components=2, metric="cosine", n_neighbors=min(15, F - 1), random_state=seed)
        return reducer.fit_transform(w_dec.float().numpy()).astype(np.float32)


# ---- tables ---------------------------------------------------------------------------------------------


PAD_SLOT = -1  # token id stored for padding positions of a harvested window


def _trim(ids: list[int], pad: int | None = PAD_SLOT) -> int:
    """Length of a stored window without its trailing padding."""
    n = len(ids)
    while n > 1 and pad is not None and ids[n - 1] == pad:
        n -= 1
    return n


def _example_rows(
    sae_id: str, rt: Runtime, state: HarvestState, n_bands_show: int
) -> tuple[pd.DataFrame, list[list[str]]]:
    tok = rt.tokenizer
    pad = PAD_SLOT
    cfg = state.cfg
    edges = cfg.band_edges()
    rows: dict[str, list[Any]] = {
        k: []
        for k in (
            "sae_id",
            "feature",
            "kind",
            "band",
            "band_lo",
            "band_hi",
            "rank",
            "context_id",
            "max_act",
            "max_pos",
            "token_ids",
            "tokens",
            "acts",
        )
    }
    max_tokens: list[list[str]] = [[] for _ in range(state.d_sae)]

    def add(f: int, kind: str, band: int, lo, hi, rank: int, ctx: int, val: float, pos: int, ids_t, acts_t):
        ids = ids_t.tolist()
        n = _trim(ids, pad)
        ids = ids[:n]
        strs = token_strings(tok, ids)
        for k, v in (
            ("sae_id", sae_id),
            ("feature", f),
            ("kind", kind),
            ("band", band),
            ("band_lo", lo),
            ("band_hi", hi),
            ("rank", rank),
            ("context_id", ctx),
            ("max_act", val),
            ("max_pos", pos),
            ("token_ids", ids),
            ("tokens", strs),
            ("acts", acts_t[:n].tolist()),
        ):
            rows[k].append(v)
        if kind == "top":
            max_tokens[f].append(strs[pos] if pos < len(strs) else "")

    top_ctx = state.top.ctx.numpy()
    smp_ctx = state.smp.ctx.numpy()
    for f in range(state.d_sae):
        for r in range(top_ctx.shape[1]):
            if top_ctx[f, r] < 0:
                break
            add(
                f,
                "top",
                0,
                None,
                None,
                r,
                int(top_ctx[f, r]),
                float(state.top.val[f, r]),
                int(state.top.pos[f, r]),
                state.top.tok[f, r],
                state.top.act[f, r],
            )
        populated = [b for b in range(cfg.n_bands) if smp_ctx.shape[2] and smp_ctx[f, b, 0] >= 0]
        for b in choose_bands(populated, n_bands_show):
            lo = 0.0 if b == 0 else float(edges[b])
            hi = float("inf") if b == cfg.n_bands - 1 else float(edges[b + 1])
            for r in range(smp_ctx.shape[2]):
                if smp_ctx[f, b, r] < 0:
                    break
                add(
                    f,
                    "interval",
                    b,
                    lo,
                    hi,
                    r,
                    int(smp_ctx[f, b, r]),
                    float(state.smp.val[f, b, r]),
                    int(state.smp.pos[f, b, r]),
                    state.smp.tok[f, b, r],
                    state.smp.act[f, b, r],
                )
    return pd.DataFrame(rows), max_tokens


def _search_text(ex: pd.DataFrame, d_sae: int, pos_tokens: list[list[str]]) -> list[str]:
    """Per feature: text around the max token of each top example, plus promoted logit tokens."""
    parts: list[list[str]] = [[] for _ in range(d_sae)]
    top = ex[ex["kind"] == "top"]
    for f, toks, pos in zip(top["feature"], top["tokens"], top["max_pos"], strict=True):
        parts[f].append("".join(toks[max(0, pos - 6) : pos + 3]).strip())
    return [" | ".join(p + [" ".join(t.strip() for t in pos_tokens[f])]) for f, p in enumerate(parts)]


def feature_frames(
    rt: Runtime, state: HarvestState, cfg: BuildConfig, sae_id: str
) -> tuple[pd.DataFrame, pd.DataFrame]:
    w_dec = rt.sae.W_dec.detach().float().cpu()
    F = w_dec.shape[0]
    say = print if cfg.progress else (lambda *a, **k: None)
    say(f"logit effects and decoder-cosine neighbours of {F:,} features...", flush=True)
    w_u, centre = unembedding(rt)
    w_dir = w_dec - w_dec.mean(dim=1, keepdim=True) if centre else w_dec  # LayerNorm centres the residual
    pv, pi, nv, ni = logit_effects(w_dir, w_u.cpu(), cfg.n_logits)
    nc, nidx = decoder_neighbours(w_dec, cfg.n_neighbours)
    if cfg.umap:
        say(f"UMAP layout of {F:,} decoder vectors (cosine; ~1 min for 4,608 on 2 cores)...", flush=True)
    layout = umap_layout(w_dec) if cfg.umap else None
    say("writing examples and features...", flush=True)
    tok = rt.tokenizer
    pos_tokens = [token_strings(tok, r) for r in pi.tolist()]
    neg_tokens = [token_strings(tok, r) for r in ni.tolist()]
    ex, max_tokens = _example_rows(sae_id, rt, state, cfg.n_interval_bands)
    mean = state.mean_act()
    feats = pd.DataFrame(
        {
            "sae_id": sae_id,
            "feature": np.arange(F, dtype=np.int32),
            "max_act": state.max_act.numpy().astype(np.float32),
            "fire_count": state.fire_count.numpy(),
            "density": state.density().numpy(),
            "mean_act": [None if np.isnan(m) else float(m) for m in mean.numpy()],
            "dead": (state.fire_count == 0).numpy(),
            "hist_counts": list(state.hist.numpy()),
            "pos_tokens": pos_tokens,
            "pos_values": list(pv.numpy()),
            "neg_tokens": neg_tokens,
            "neg_values": list(nv.numpy()),
            "decoder": list(w_dec.numpy()),
            "decoder_norm": w_dec.norm(dim=1).numpy(),
            "neighbours": list(nidx.numpy().astype(np.int32)),
            "neighbour_cos": list(nc.numpy()),
            "umap_x": layout[:, 0] if layout is not None else None,
            "umap_y": layout[:, 1] if layout is not None else None,
            "max_tokens": max_tokens,
            "search_text": _search_text(ex, F, pos_tokens),
        }
    )
    return feats, ex


# ---- atomic database write ------------------------------------------------------------------------------


def write_database(path: Path, sae_row: dict[str, Any], feats: pd.DataFrame, ex: pd.DataFrame) -> None:
    """Write one SAE's tables into ``path`` atomically, keeping other SAEs and every user table."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    for p in (tmp, Path(str(tmp) + ".wal")):
        p.unlink(missing_ok=True)
    sae_id = sae_row["sae_id"]
    with replacing(path):  # openers and other builds of this file wait out the whole read-write-swap
        _write_and_swap(path, tmp, sae_id, sae_row, feats, ex)


def _write_and_swap(
    path: Path, tmp: Path, sae_id: str, sae_row: dict[str, Any], feats: pd.DataFrame, ex: pd.DataFrame
) -> None:
    try:
        con = duckdb.connect(str(tmp))
        try:
            create_schema(con)
            if path.exists() and path.stat().st_size > 0:
                copy_kept_rows(con, path, sae_id)  # other SAEs and every user table
            con.register("new_saes", pd.DataFrame([sae_row]))
            con.execute("INSERT INTO saes BY NAME SELECT * FROM new_saes")
            con.register("new_features", feats)
            con.execute("INSERT INTO features BY NAME SELECT * FROM new_features")
            con.register("new_examples", ex)
            con.execute("INSERT INTO examples BY NAME SELECT * FROM new_examples")
            con.execute("CHECKPOINT")
        finally:
            con.close()
        os.replace(tmp, path)
        # A WAL left by a writer that died (its contents were replayed into `old` and copied above) no longer
        # matches the new file and would stop it from opening.
        Path(str(path) + ".wal").unlink(missing_ok=True)
    finally:
        tmp.unlink(missing_ok=True)
        Path(str(tmp) + ".wal").unlink(missing_ok=True)


# ---- entry point ----------------------------------------------------------------------------------------


def default_sae_name(model: str, hook: str, d_sae: int) -> str:
    return f"{Path(model).name or model}/{hook}/{d_sae}"


def build(cfg: BuildConfig, rt: Runtime | None = None) -> BuildResult:
    """Run the whole build; raise on bad input before touching the database."""
    t0 = time.perf_counter()
    validate(cfg.corpus)
    if cfg.context_size < 4:
        raise ValueError("--context-size must be at least 4")
    if cfg.max_tokens < 1:
        raise ValueError("--max-tokens must be positive")
    if cfg.batch_size < 1:
        raise ValueError("--batch-size must be at least 1")
    if rt is None:
        rt = load_runtime(cfg.model, cfg.sae, hook_name=cfg.hook, device=cfg.device, dtype=cfg.dtype)
    rt.outlier_norm_ratio = cfg.outlier_norm_ratio
    hook = rt.site.hook_name
    sae_id = cfg.sae_name or default_sae_name(cfg.model, hook, rt.d_sae)
    dtype = dtype_name(rt.loaded.dtype)
    if cfg.progress:
        print(f"model {rt.loaded.name} runs in {dtype} on {rt.loaded.device}; SAE in {dtype_name(rt.sae.W_dec.dtype)}")
    state = harvest_corpus(rt, cfg)
    fve = state.fve()
    if not np.isnan(fve) and fve < FVE_WARN:
        msg = (
            f"WARNING: reconstruction FVE is {fve:.3f} (< {FVE_WARN}): activations are probably not taken where "
            f"the SAE was trained (hook {hook}, model {cfg.model}). Feature statistics may be meaningless."
        )
        warnings.warn(msg, stacklevel=2)
        print("\n" + "!" * 80 + "\n" + msg + "\n" + "!" * 80)
    feats, ex = feature_frames(rt, state, cfg, sae_id)
    seconds = time.perf_counter() - t0
    arch = rt.sae.cfg.architecture() if hasattr(rt.sae.cfg, "architecture") else type(rt.sae).__name__
    config = asdict(cfg)
    config["sae"] = json.loads(cfg.sae.to_json())
    row = {
        "sae_id": sae_id,
        "model_spec": cfg.model,
        "model_name": rt.loaded.name,
        "model_kwargs": json.dumps(rt.loaded.kwargs),
        "dtype": dtype,  # what the model ran in (config_json keeps what was asked for: null = the default)
        "sae_source": cfg.sae.to_json(),
        "hook_name": hook,
        "hook_kind": rt.site.kind,
        "architecture": str(arch),
        "d_in": int(rt.sae.cfg.d_in),
        "d_sae": rt.d_sae,
        "context_size": cfg.context_size,
        "prepend_bos": bool(rt.prepend_bos and rt.tokenizer.bos_token_id is not None),  # contexts start with BOS
        "corpus": cfg.corpus_description or cfg.corpus.describe(),
        "n_tokens": state.n_tokens,
        "n_contexts": state.n_contexts,
        "fve": None if np.isnan(fve) else fve,
        "l0": state.l0(),
        "dead_fraction": state.dead_fraction(),
        "hist_edges": list(cfg.harvest.hist_edges()),
        "build_seconds": seconds,
        "built_at": datetime.now(UTC).replace(tzinfo=None),
        "tool_version": __version__,
        "config_json": json.dumps(config, default=str),
    }
    write_database(Path(cfg.db), row, feats, ex)
    hs = state.harvest_seconds or seconds
    return BuildResult(
        Path(cfg.db),
        sae_id,
        state.n_tokens,
        state.n_contexts,
        rt.d_sae,
        fve,
        state.l0(),
        state.dead_fraction(),
        time.perf_counter() - t0,
        state.n_tokens / max(hs, 1e-9),
        dtype,
    )
