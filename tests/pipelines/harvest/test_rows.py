"""The build's Arrow rows (pipelines.rows) against a plain per-example loop over the same harvest state."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import duckdb
import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
import torch

from featuredict.pipelines.harvest.config import BuildConfig
from featuredict.pipelines.harvest.corpus import CorpusSpec
from featuredict.pipelines.harvest.loop import harvest_corpus
from featuredict.pipelines.harvest.rows import band_choice, example_batches, top_text
from featuredict.pipelines.harvest.state import PAD_SLOT, HarvestConfig, choose_bands
from featuredict.pipelines.model.runtime import token_strings
from featuredict.pipelines.model.saes import SaeSource


def _trim(ids: list[int]) -> int:
    n = len(ids)
    while n > 1 and ids[n - 1] == PAD_SLOT:
        n -= 1
    return n


def plain_rows(sae_id: str, tok, state, n_bands_show: int) -> tuple[pd.DataFrame, list[list[str]], list[str]]:
    """The rows one example at a time: what the build wrote before it used Arrow."""
    cfg = state.cfg
    edges = cfg.band_edges()
    rows: list[dict[str, Any]] = []
    max_tokens: list[list[str]] = [[] for _ in range(state.d_sae)]

    def add(f, kind, band, lo, hi, rank, ctx, val, pos, ids_t, acts_t):
        ids = ids_t.tolist()
        n = _trim(ids)
        ids = ids[:n]
        strs = token_strings(tok, ids)
        rows.append(
            dict(sae_id=sae_id, feature=f, kind=kind, band=band, band_lo=lo, band_hi=hi, rank=rank, context_id=ctx,
                 max_act=val, max_pos=pos, token_ids=ids, tokens=strs, acts=acts_t[:n].tolist())
        )  # fmt: skip
        if kind == "top":
            max_tokens[f].append(strs[pos] if pos < len(strs) else "")

    top_ctx, smp_ctx = state.top.ctx.numpy(), state.smp.ctx.numpy()
    for f in range(state.d_sae):
        for r in range(top_ctx.shape[1]):
            if top_ctx[f, r] < 0:
                break
            add(f, "top", 0, None, None, r, int(top_ctx[f, r]), float(state.top.val[f, r]),
                int(state.top.pos[f, r]), state.top.tok[f, r], state.top.act[f, r])  # fmt: skip
        populated = [b for b in range(cfg.n_bands) if smp_ctx.shape[2] and smp_ctx[f, b, 0] >= 0]
        for b in choose_bands(populated, n_bands_show):
            lo = 0.0 if b == 0 else float(edges[b])
            hi = float("inf") if b == cfg.n_bands - 1 else float(edges[b + 1])
            for r in range(smp_ctx.shape[2]):
                if smp_ctx[f, b, r] < 0:
                    break
                add(f, "interval", b, lo, hi, r, int(smp_ctx[f, b, r]), float(state.smp.val[f, b, r]),
                    int(state.smp.pos[f, b, r]), state.smp.tok[f, b, r], state.smp.act[f, b, r])  # fmt: skip
    ex = pd.DataFrame(rows)
    parts: list[list[str]] = [[] for _ in range(state.d_sae)]
    top = ex[ex["kind"] == "top"]
    for f, toks, pos in zip(top["feature"], top["tokens"], top["max_pos"], strict=True):
        parts[f].append("".join(toks[max(0, pos - 6) : pos + 3]).strip())
    return ex, max_tokens, [" | ".join(p + ["logit"]) for p in parts]


def _through_duckdb(data: Any) -> pd.DataFrame:
    """Rows as DuckDB stores them (REAL, INTEGER[], ...), in order."""
    from featuredict.db.schema import create_schema

    con = duckdb.connect()
    create_schema(con)
    con.register("src", data)
    con.execute("INSERT INTO examples BY NAME SELECT * FROM src")
    out = con.execute("SELECT * FROM examples").df()
    con.close()
    return out


@pytest.fixture(scope="module")
def state_and_tok(tiny_model_dir: Path, tiny_sae_dir: Path, tiny_corpus: Path, tiny_runtime):
    cfg = BuildConfig(
        model=str(tiny_model_dir),
        sae=SaeSource(kind="folder", path=str(tiny_sae_dir)),
        corpus=CorpusSpec(str(tiny_corpus)),
        context_size=16,
        max_tokens=3_000,
        batch_size=4,
        harvest=HarvestConfig(top_k=5, samples_per_band=3),
        progress=False,
    )
    return harvest_corpus(tiny_runtime, cfg), tiny_runtime.tokenizer


@pytest.mark.parametrize("n_bands_show", [1, 3, 5, 40])
@pytest.mark.parametrize("block", [7, 2048])
def test_arrow_rows_are_the_plain_loops_rows(state_and_tok, n_bands_show: int, block: int):
    state, tok = state_and_tok
    ref, ref_max, ref_text = plain_rows("s", tok, state, n_bands_show)
    batches = list(example_batches("s", tok, state, n_bands_show, block=block))
    assert len(batches) == -(-state.d_sae // block)
    got = pa.Table.from_batches(batches)
    assert got.num_rows == len(ref) > 50
    assert set(ref["kind"]) == {"top", "interval"}
    pd.testing.assert_frame_equal(_through_duckdb(got), _through_duckdb(ref))
    max_tokens, text = top_text(tok, state, [["logit"]] * state.d_sae)
    assert max_tokens == ref_max
    assert text == ref_text


def test_windows_are_trimmed_of_padding_only_at_the_end(state_and_tok):
    state, tok = state_and_tok
    got = pa.Table.from_batches(list(example_batches("s", tok, state, 5))).to_pandas()
    for ids in got["token_ids"]:
        assert len(ids) >= 1 and (len(ids) == 1 or ids[-1] != PAD_SLOT)


def test_band_choice_is_choose_bands():
    table = band_choice(16, 5)
    for p in range(17):
        assert sorted(np.nonzero(table[p])[0].tolist(), reverse=True) == choose_bands(list(range(p)), 5)


def test_a_state_with_nothing_harvested_gives_no_rows(tiny_runtime):
    from featuredict.pipelines.harvest.state import HarvestState

    state = HarvestState.empty(HarvestConfig(top_k=3, samples_per_band=2), 10, 8, 4)
    batches = list(example_batches("s", tiny_runtime.tokenizer, state, 5))
    assert sum(b.num_rows for b in batches) == 0
    assert top_text(tiny_runtime.tokenizer, state, [[] for _ in range(10)]) == ([[] for _ in range(10)], [""] * 10)
    assert torch.all(state.top.ctx < 0)
