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
import time
import warnings
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from featuredict.db import writes
from featuredict.pipelines import __version__
from featuredict.pipelines.harvest.config import FVE_WARN, BuildConfig, BuildResult, default_sae_name
from featuredict.pipelines.harvest.corpus import (
    validate,
)
from featuredict.pipelines.harvest.layout import warm_umap
from featuredict.pipelines.harvest.loop import harvest_corpus
from featuredict.pipelines.harvest.rows import feature_frames
from featuredict.pipelines.harvest.sharding import (
    RayOptions,
    check_reachable,
    require_ray,
)
from featuredict.pipelines.harvest.spans import harvest_on_ray
from featuredict.pipelines.harvest.stages import StageTimes
from featuredict.pipelines.harvest.weights import decoder_knn
from featuredict.pipelines.model.loading import dtype_name
from featuredict.pipelines.model.runtime import Runtime, load_runtime

log = logging.getLogger(__name__)


def build(cfg: BuildConfig, rt: Runtime | None = None, *, ray: RayOptions | None = None) -> BuildResult:
    """Run the whole build; raise on bad input before touching the database.

    With ``ray``, the harvest runs as shards on a Ray cluster (``harvest_on_ray``; each shard loads its own model
    and SAE from ``cfg``) and gives the same tables; everything else (weight statistics, the atomic write under
    the lock) runs here, as without it.
    """
    t0 = time.perf_counter()
    stages = StageTimes()
    validate(cfg.corpus)
    if cfg.context_size < 4:
        raise ValueError("--context-size must be at least 4")
    if cfg.max_tokens < 1:
        raise ValueError("--max-tokens must be positive")
    if cfg.batch_size < 1:
        raise ValueError("--batch-size must be at least 1")
    if ray is not None:
        ray.validate()
        require_ray()  # a missing extra or a cluster that does not answer fails before any model is loaded
        check_reachable(ray)
    if cfg.umap:
        warm_umap()  # a fresh numba cache: the map's kernels compile in what CPU the model load leaves idle
    if rt is None:
        with stages.timed("model_load"):
            rt = load_runtime(cfg.model, cfg.sae, hook_name=cfg.hook, device=cfg.device, dtype=cfg.dtype)
    rt.outlier_norm_ratio = cfg.outlier_norm_ratio
    with stages.timed("neighbours"):  # weights only: before the harvest, so a failure costs no forward pass
        knn = decoder_knn(rt, cfg)
    hook = rt.site.hook_name
    sae_id = cfg.sae_name or default_sae_name(cfg.model, hook, rt.d_sae)
    dtype = dtype_name(rt.backend.dtype)  # with Ray: replaced below by the dtype the shards ran in
    if cfg.progress:
        print(
            f"model {rt.backend.name} runs in {dtype} on {rt.backend.device}; SAE in {dtype_name(rt.sae.W_dec.dtype)}"
        )
    ran: dict[str, Any] | None = None
    if ray is None:
        state = harvest_corpus(rt, cfg, stages=stages)
        harvest_wall = state.harvest_seconds
    else:
        th = time.perf_counter()
        state, ran = harvest_on_ray(rt, cfg, ray)
        harvest_wall = time.perf_counter() - th  # state.harvest_seconds sums the shards' own loops
        stages.add("harvest", harvest_wall)
        dtype = ran.pop("dtype")
    fve = state.fve()
    if not np.isnan(fve) and fve < FVE_WARN:
        msg = (
            f"WARNING: reconstruction FVE is {fve:.3f} (< {FVE_WARN}): activations are probably not taken where "
            f"the SAE was trained (hook {hook}, model {cfg.model}). Feature statistics may be meaningless."
        )
        warnings.warn(msg, stacklevel=2)
        print("\n" + "!" * 80 + "\n" + msg + "\n" + "!" * 80)
    feats, ex = feature_frames(rt, state, cfg, sae_id, stages, knn)
    try:
        seconds = time.perf_counter() - t0
        arch = rt.sae.cfg.architecture() if hasattr(rt.sae.cfg, "architecture") else type(rt.sae).__name__
        config = asdict(cfg)
        config["sae"] = json.loads(cfg.sae.to_json())
        if ran is not None:
            config["ray"] = ran
        row = {
            "sae_id": sae_id,
            "model_spec": cfg.model,
            "model_name": rt.backend.name,
            "model_kwargs": json.dumps(rt.backend.kwargs),
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
            "build_seconds": seconds,  # updated with the write's time once the rows are in (``final``)
            "stage_seconds": stages.to_json(),
            "built_at": datetime.now(UTC).replace(tzinfo=None),
            "tool_version": __version__,
            "config_json": json.dumps(config, default=str),
        }
        t_write, before = time.perf_counter(), stages.get("rows") + stages.get("umap")

        def final() -> dict[str, Any]:  # the rows are in: the write's own time (the examples stream made meanwhile
            # counts as ``rows`` and the wait for the map as ``umap``, not ``write``) and the build's total
            waited = stages.get("rows") + stages.get("umap") - before
            stages.add("write", time.perf_counter() - t_write - waited)
            return {"stage_seconds": stages.to_json(), "build_seconds": time.perf_counter() - t0}

        writes.write_sae_tables(Path(cfg.db), row, feats, ex, final=final)
        hs = harvest_wall or seconds
        return BuildResult(
            db=Path(cfg.db),
            sae_id=sae_id,
            n_tokens=state.n_tokens,
            n_contexts=state.n_contexts,
            d_sae=rt.d_sae,
            fve=fve,
            l0=state.l0(),
            dead_fraction=state.dead_fraction(),
            seconds=time.perf_counter() - t0,
            tokens_per_s=state.n_tokens / max(hs, 1e-9),
            dtype=dtype,
            shards=ran["shards"] if ran else 0,
            stages=stages,
            runtime=rt,
        )
    finally:
        feats.close()  # a write that failed does not wait for the map
