"""Shared fixtures: a tiny causal LM and tokenizer made in the test, a tiny SAE, and paths to ../shared.

The tiny model is a randomly initialised 2-layer Llama (d_model 32) with a byte-level BPE tokenizer trained
here on a few sentences; the tiny SAE is a sae-lens TopK SAE (64 features, k=4) on ``model.layers.1`` with
random weights. Neither needs the network or ../shared.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
STORIES_MODEL = SHARED / "models" / "stories260K"
TINYSTORIES = SHARED / "corpora" / "tinystories_train_sample_2MB.txt"
WEB_SAMPLE = SHARED / "corpora" / "web_sample_133KB.txt"

TINY_TEXT = [
    "Once upon a time there was a little cat who liked to play in the garden.",
    "The stock market fell sharply today after the central bank raised interest rates.",
    "To bake bread, mix flour, water, salt and yeast, then let the dough rise for an hour.",
    "The assistant said it would never lie to the user, but it hid the truth about the error.",
    "Photosynthesis converts light energy into chemical energy stored in glucose molecules.",
    "def add(a, b):\n    return a + b\n\nprint(add(2, 3))",
    "She walked to the river, sat on a rock, and watched the boats drift slowly by.",
    "Never share your password with anyone who emails you asking for it urgently.",
]

TINY_HOOK = "model.layers.1"


def run_threads(worker, n: int) -> None:
    """Start ``worker(t)`` for t in 0..n-1 on n threads at once and wait for all of them."""
    import threading

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(n)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()


def require_shared(path: Path) -> Path:
    if not path.exists():
        pytest.skip(f"{path} is absent (../shared holds the real offline models and corpora)")
    return path


def make_tiny_model(folder: Path, seed: int = 0) -> Path:
    """Write a tiny random Llama + trained byte-level BPE tokenizer as a Hugging Face folder."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    folder.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<s>", "</s>", "<pad>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(TINY_TEXT * 4, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    fast.save_pretrained(folder)
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=len(fast),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        bos_token_id=fast.bos_token_id,
        eos_token_id=fast.eos_token_id,
        pad_token_id=fast.pad_token_id,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(cfg)
    with torch.no_grad():  # larger-than-default weights so the random model is not near-uniform
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.2)
    model.save_pretrained(folder)
    return folder


def make_tiny_sae(
    folder: Path,
    model_dir: Path | str,
    d_in: int = 32,
    d_sae: int = 64,
    k: int = 4,
    seed: int = 0,
    hook: str = TINY_HOOK,
    context_size: int = 32,
) -> Path:
    """Write a random sae-lens TopK SAE (on ``hook`` of the tiny model unless told otherwise)."""
    from sae_lens import TopKSAE, TopKSAEConfig
    from sae_lens.saes.sae import SAEMetadata

    torch.manual_seed(seed)
    cfg = TopKSAEConfig(
        d_in=d_in,
        d_sae=d_sae,
        k=k,
        metadata=SAEMetadata(
            model_name=str(model_dir),
            model_class_name="AutoModelForCausalLM",
            hook_name=hook,
            context_size=context_size,
            prepend_bos=True,
            model_from_pretrained_kwargs={},
        ),
    )
    sae = TopKSAE(cfg)
    with torch.no_grad():
        sae.W_dec.normal_(0, 1.0 / d_in**0.5)
        sae.W_enc.copy_(sae.W_dec.T * 2.0)
        sae.b_enc.zero_()
    sae.save_model(folder)
    return folder


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


def build_tiny_db(path: Path, model_dir: Path, sae_dir: Path, corpus: Path, **kw) -> Path:
    """Build a real database with the full pipeline from the tiny model + SAE (no network, ~seconds)."""
    from featuredict.pipelines.harvest.build import BuildConfig, build
    from featuredict.pipelines.harvest.corpus import CorpusSpec
    from featuredict.pipelines.harvest.state import HarvestConfig
    from featuredict.pipelines.model.saes import SaeSource

    cfg = BuildConfig(
        model=str(model_dir),
        sae=SaeSource(kind="folder", path=str(sae_dir)),
        corpus=CorpusSpec(str(corpus)),
        db=str(path),
        sae_name=kw.pop("sae_name", "tiny/model.layers.1/64"),
        context_size=kw.pop("context_size", 16),
        max_tokens=kw.pop("max_tokens", 5_000),
        batch_size=4,
        harvest=kw.pop("harvest", HarvestConfig(top_k=5, samples_per_band=3)),
        device="cpu",
        progress=False,
        **kw,
    )
    build(cfg)
    return path


@pytest.fixture(scope="session")
def tiny_db(
    tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path, tiny_sae_dir: Path, tiny_corpus: Path
) -> Path:
    """A DuckDB feature dictionary built by the real pipeline from the tiny model + SAE (session-wide, read it only)."""
    return build_tiny_db(tmp_path_factory.mktemp("db") / "tiny.duckdb", tiny_model_dir, tiny_sae_dir, tiny_corpus)
