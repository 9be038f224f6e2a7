"""Environment and every shared fixture: a tiny causal LM and tokenizer made in the test, a tiny SAE, the
database the real pipeline builds from them, the SYNTHETIC dashboard databases and a tiny TransformerLens runtime.

The tiny model is a randomly initialised 2-layer Llama (d_model 32) with a byte-level BPE tokenizer trained
here on a few sentences; the tiny SAE is a sae-lens TopK SAE (64 features, k=4) on ``model.layers.1`` with
random weights. Neither needs the network or ../shared. The builders and constants live in tests/helpers.py.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from tests.helpers import (  # noqa: E402 - after the offline settings
    TINY_TEXT,
    TL_HOOK,
    build_tiny_db,
    copy_db,
    inject_hostile,
    make_synth_db,
    make_tiny_model,
    make_tiny_sae,
    point_at_tiny_model,
)


# ---- the tiny model + SAE ------------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("tiny_model"))


@pytest.fixture(scope="session")
def tiny_sae_dir(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Path:
    return make_tiny_sae(tmp_path_factory.mktemp("tiny_sae"), tiny_model_dir)


@pytest.fixture(scope="session")
def tiny_corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("corpus") / "tiny.txt"
    path.write_text("\n<|endoftext|>\n".join(TINY_TEXT * 3), encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def tiny_runtime(tiny_model_dir: Path, tiny_sae_dir: Path):
    from featuredict.pipelines.model.runtime import load_runtime
    from featuredict.pipelines.model.saes import SaeSource

    return load_runtime(str(tiny_model_dir), SaeSource(kind="folder", path=str(tiny_sae_dir)), device="cpu")


@pytest.fixture(scope="session")
def tiny_db(
    tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path, tiny_sae_dir: Path, tiny_corpus: Path
) -> Path:
    """A DuckDB feature dictionary built by the real pipeline from the tiny model + SAE (session-wide, read it only)."""
    return build_tiny_db(tmp_path_factory.mktemp("db") / "tiny.duckdb", tiny_model_dir, tiny_sae_dir, tiny_corpus)


# ---- SYNTHETIC dashboard databases (bench/synth_db.py) ------------------------------------------------
@pytest.fixture(scope="session")
def synth_db_master(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Session master copy: 300 synthetic features + hostile content on feature 1 (never opened by tests)."""
    p = make_synth_db(tmp_path_factory.mktemp("synth") / "master.duckdb", n_features=300, seed=1)
    inject_hostile(p)
    return p


@pytest.fixture
def synth_db(synth_db_master: Path, tmp_path: Path) -> Path:
    """A private copy of the synthetic database for one test (writes allowed)."""
    return copy_db(synth_db_master, tmp_path / "synth.duckdb")


@pytest.fixture(scope="session")
def big_map_db(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """65,536 synthetic features with minimal examples (1 short top context each): for the map's row count."""
    return make_synth_db(
        tmp_path_factory.mktemp("bigmap") / "big.duckdb",
        n_features=65536,
        n_top=1,
        ctx_len=8,
        n_bands=0,
        per_band=0,
        d_in=8,
        n_labels=500,
        seed=2,
    )


@pytest.fixture(scope="session")
def model_db_master(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path, tiny_sae_dir: Path) -> Path:
    """64 synthetic features whose SAE row reloads the real tiny model + SAE (prompt/concept search run)."""
    p = make_synth_db(tmp_path_factory.mktemp("modeldb") / "model.duckdb", n_features=64, seed=3)
    point_at_tiny_model(p, tiny_model_dir, tiny_sae_dir)
    return p


@pytest.fixture
def model_db(model_db_master: Path, tmp_path: Path) -> Path:
    """A private copy of ``model_db_master`` for one test."""
    return copy_db(model_db_master, tmp_path / "model.duckdb")


@pytest.fixture
def store(synth_db: Path):
    """A Store on a private copy of the synthetic database."""
    from featuredict.db.store import Store

    s = Store(synth_db)
    yield s
    s.close()


# ---- TransformerLens -----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tl_runtime(tiny_model_dir: Path):
    """A tiny randomly initialised HookedTransformer (2 layers, d_model 32) + a random TopK SAE on TL_HOOK."""
    from sae_lens import TopKSAE, TopKSAEConfig
    from sae_lens.saes.sae import SAEMetadata
    from transformer_lens import HookedTransformer, HookedTransformerConfig
    from transformers import AutoTokenizer

    from featuredict.pipelines.model.backends import TLBackend
    from featuredict.pipelines.model.hooks import HookSite
    from featuredict.pipelines.model.runtime import Runtime
    from featuredict.pipelines.model.saes import SaeSource

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    cfg = HookedTransformerConfig(
        n_layers=2,
        d_model=32,
        n_ctx=64,
        d_head=8,
        n_heads=4,
        d_mlp=64,
        d_vocab=len(tok),
        act_fn="gelu",
        normalization_type="LN",
        seed=0,
    )
    model = HookedTransformer(cfg, tokenizer=tok).eval()
    loaded = TLBackend(model, model.tokenizer, spec="tiny-tl", device=torch.device("cpu"), dtype=torch.float32)
    torch.manual_seed(0)
    sae = TopKSAE(
        TopKSAEConfig(
            d_in=32,
            d_sae=48,
            k=4,
            metadata=SAEMetadata(model_name="tiny-tl", hook_name=TL_HOOK, context_size=32, prepend_bos=True),
        )
    )
    with torch.no_grad():
        sae.W_dec.normal_(0, 1.0 / 32**0.5)
        sae.W_enc.copy_(sae.W_dec.T * 2.0)
        sae.b_enc.zero_()
    return Runtime(
        backend=loaded,
        sae=sae,
        site=HookSite(loaded, TL_HOOK),
        source=SaeSource(kind="folder", path="-"),
        context_size=32,
    )
