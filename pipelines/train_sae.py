"""``featuredict train-sae``: train a TopK SAE with sae-lens on a local model and a local corpus.

Runs sae-lens's ``LanguageModelSAETrainingRunner`` with ``model_class_name="AutoModelForCausalLM"`` (its
``HookedProxyLM`` hooks Hugging Face module names such as ``model.layers.15``), no wandb, no hub; the corpus
is passed as an in-memory ``datasets.Dataset`` with a ``text`` column. The result is a sae-lens folder
(``cfg.json`` + ``sae_weights.safetensors``) that ``featuredict build --sae FOLDER`` reads.

The model runs in ``TrainConfig.dtype``, else ``default_dtype`` of the device (float32 on CPU): sae-lens loads it
with ``AutoModelForCausalLM.from_pretrained(**model_from_pretrained_kwargs)``, so the dtype travels there
(without it transformers keeps the checkpoint's stored dtype, fp16 for many checkpoints). The SAE's
``cfg.json`` metadata records it, and ``featuredict_train.json`` next to it records the run's summary.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from .corpus import CorpusSpec, batch_contexts, iter_contexts, iter_documents, validate
from .models import ModelLoadError, dtype_name, pick_device, resolve_dtype, resolve_hf_path

SUMMARY_FILE = "featuredict_train.json"


@dataclass
class TrainConfig:
    model: str
    corpus: CorpusSpec
    out: str
    hook: str = "model.layers.15"
    d_sae: int = 4608
    k: int = 32
    training_tokens: int = 100_000
    context_size: int = 128
    batch_tokens: int = 256
    lr: float = 3e-3  # measured: 4e-4 barely moves a TopK SAE in ~100k tokens (FVE 0.00 vs 0.81 on stories260K)
    device: str | None = None
    dtype: str | None = None  # model dtype; None: float32 on CPU, bfloat16 (else float16) on CUDA
    seed: int = 42
    max_docs: int | None = None


@dataclass
class TrainResult:
    out: Path
    fve: float
    l0: float
    dead_fraction: float
    seconds: float
    tokens_per_s: float
    dtype: str  # what the model ran in

    def summary(self) -> dict[str, float | str]:
        return {
            "fve": self.fve,
            "l0": self.l0,
            "dead_fraction": self.dead_fraction,
            "seconds": self.seconds,
            "tokens_per_s": self.tokens_per_s,
            "model_dtype": self.dtype,
        }


def _dataset(spec: CorpusSpec, max_docs: int | None, max_chars: int | None = None):
    """The documents sae-lens trains on, as an in-memory ``datasets.Dataset``.

    Reading stops after ``max_docs`` documents or ``max_chars`` characters, so a streamed Hugging Face dataset
    is read only as far as training needs (sae-lens cycles over the documents if it needs more tokens).
    """
    from datasets import Dataset

    docs, chars = [], 0
    for i, d in enumerate(iter_documents(spec)):
        if (max_docs is not None and i >= max_docs) or (max_chars is not None and chars >= max_chars):
            break
        docs.append(d)
        chars += len(d)
    if not docs:
        raise ValueError(f"corpus {spec.describe()} has no documents")
    return Dataset.from_dict({"text": docs})


def train_sae(cfg: TrainConfig, progress: bool = True) -> TrainResult:
    from sae_lens import LanguageModelSAERunnerConfig, LanguageModelSAETrainingRunner, LoggingConfig
    from sae_lens.saes.topk_sae import TopKTrainingSAEConfig
    from transformers import AutoConfig

    validate(cfg.corpus)
    if cfg.k < 1 or cfg.d_sae < cfg.k:
        raise ValueError(f"need 1 <= k <= d_sae (got k={cfg.k}, d_sae={cfg.d_sae})")
    path = resolve_hf_path(cfg.model)
    try:
        mcfg = AutoConfig.from_pretrained(path)
    except Exception as e:  # noqa: BLE001
        raise ModelLoadError(f"cannot read model config of {cfg.model!r}: {str(e).splitlines()[0]}") from e
    d_in = int(mcfg.hidden_size)
    dev = pick_device(cfg.device)
    device = str(dev)
    dtype = dtype_name(resolve_dtype(cfg.dtype, dev))
    if progress:
        print(f"model {cfg.model} runs in {dtype} on {device}; SAE in float32")
    # ~4 characters per token in English; read 3x the tokens training needs, then stop
    ds = _dataset(cfg.corpus, cfg.max_docs, max_chars=12 * cfg.training_tokens)
    work = Path(tempfile.mkdtemp(prefix="featuredict-train-"))
    steps = max(1, cfg.training_tokens // cfg.batch_tokens)
    runner_cfg = LanguageModelSAERunnerConfig(
        # Inputs scaled to norm sqrt(d_in) while training (sae-lens folds the factor into the saved weights):
        # residual streams such as SmolLM2's have large-norm outliers that otherwise blow up training.
        sae=TopKTrainingSAEConfig(
            d_in=d_in,
            d_sae=cfg.d_sae,
            k=cfg.k,
            dtype="float32",
            device=device,
            normalize_activations="expected_average_only_in",
        ),
        model_name=path,
        model_class_name="AutoModelForCausalLM",
        model_from_pretrained_kwargs={"dtype": dtype},  # else transformers keeps the checkpoint's dtype
        hook_name=cfg.hook,
        dataset_path="",
        is_dataset_tokenized=False,
        streaming=False,
        context_size=cfg.context_size,
        training_tokens=cfg.training_tokens,
        train_batch_size_tokens=cfg.batch_tokens,
        store_batch_size_prompts=8,
        n_batches_in_buffer=8,
        lr=cfg.lr,
        lr_warm_up_steps=max(1, steps // 20),
        dead_feature_window=max(10, steps // 4),
        feature_sampling_window=max(20, steps // 2),
        device=device,
        seed=cfg.seed,
        logger=LoggingConfig(log_to_wandb=False),
        output_path=str(work / "out"),
        checkpoint_path=str(work / "ckpt"),
        n_checkpoints=0,
        verbose=progress,
        n_batches_for_norm_estimate=10,
        exclude_special_tokens=True,  # BOS/pad are excluded from every statistic at harvest time too
    )
    t0 = time.perf_counter()
    logging.getLogger("sae_lens").setLevel(logging.WARNING)
    quiet = contextlib.redirect_stdout(io.StringIO()) if not progress else contextlib.nullcontext()
    try:
        with quiet:
            sae = LanguageModelSAETrainingRunner(runner_cfg, override_dataset=ds).run()
    except Exception as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if "hook" in first.lower() or "submodule" in first.lower() or isinstance(e, AttributeError):
            raise ValueError(f"cannot train at hook {cfg.hook!r} of {cfg.model}: {first}") from e
        raise
    finally:
        shutil.rmtree(work, ignore_errors=True)
    seconds = time.perf_counter() - t0
    out = Path(cfg.out)
    tmp = out.with_name(out.name + f".tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    sae.save_model(tmp)
    # Record the model spec (preset names load through featuredict, not plain transformers).
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    fve, l0, dead = evaluate(cfg, out, dtype=dtype)
    result = TrainResult(out, fve, l0, dead, seconds, cfg.training_tokens / max(seconds, 1e-9), dtype)
    (out / SUMMARY_FILE).write_text(json.dumps(result.summary()), encoding="utf-8")
    return result


@torch.no_grad()
def evaluate(
    cfg: TrainConfig, sae_dir: Path, max_tokens: int = 8192, dtype: str | None = None
) -> tuple[float, float, float]:
    """FVE, L0 and dead fraction of a saved SAE on the first ``max_tokens`` of the corpus (model in ``dtype``,
    else ``cfg.dtype``, else the device's default)."""
    from .harvest import HarvestConfig, HarvestState, update
    from .runtime import load_runtime
    from .saes import SaeSource

    rt = load_runtime(
        cfg.model, SaeSource(kind="folder", path=str(sae_dir)), device=cfg.device, dtype=dtype or cfg.dtype
    )
    tok = rt.tokenizer
    st = HarvestState.empty(
        HarvestConfig(top_k=1, samples_per_band=0), rt.d_sae, cfg.context_size, int(rt.sae.cfg.d_in)
    )
    ctx = 0
    for ids, mask in batch_contexts(
        iter_contexts(iter_documents(cfg.corpus), tok, cfg.context_size), 8, cfg.context_size, rt.pad_id
    ):
        x, f, valid = rt.encode(ids, mask)
        update(st, f, ids, valid, torch.arange(ctx, ctx + len(ids)), x, rt.sae.decode(f))
        ctx += len(ids)
        if st.n_tokens >= max_tokens:
            break
    return st.fve(), st.l0(), st.dead_fraction()
