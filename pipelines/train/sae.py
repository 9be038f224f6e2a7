"""``featuredict train-sae``: train a TopK SAE with sae-lens on a local model and a local corpus.

Two ways to feed sae-lens's trainer (``TrainConfig.activations``):

- ``stream``: sae-lens's ``LanguageModelSAETrainingRunner`` with ``model_class_name="AutoModelForCausalLM"`` (its
  ``HookedProxyLM`` hooks Hugging Face module names such as ``model.layers.15``); the corpus is passed as an
  in-memory ``datasets.Dataset`` with a ``text`` column and the model runs for every training token, cycling
  over the corpus when training needs more tokens than it has.
- ``cache``: the model runs ONCE over the corpus (up to the training budget), through the same hook and the same
  valid-token rule as the build (BOS/pad and attention-sink norm outliers excluded, ``runtime.valid_mask``); the
  activations stay in memory and sae-lens's ``SAETrainer`` trains on shuffled batches of them, a fresh shuffle
  per epoch. A small corpus then costs one forward pass, not one per epoch, so the same time buys many more
  training steps: on the demo's ~31k-token corpus, 8 epochs reach FVE 0.84 where 3 streamed epochs reached 0.65.
- ``auto`` (default): ``cache`` when the activations it would hold fit in ``cache_bytes`` (2 GiB), else ``stream``
  (``TrainConfig.mode``).

Either way the SAE is sae-lens's ``TopKTrainingSAE`` with its own AuxK loss, activation-norm scaling and
metadata, saved as a sae-lens folder (``cfg.json`` + ``sae_weights.safetensors``) that ``featuredict build
--sae FOLDER`` reads.

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
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from featuredict.db.errors import one_line
from featuredict.pipelines.harvest.corpus import CorpusSpec, batch_contexts, iter_contexts, iter_documents, validate
from featuredict.pipelines.model.loading import ModelLoadError, dtype_name, pick_device, resolve_dtype, resolve_hf_path
from featuredict.pipelines.model.saes import SaeRunStats

SUMMARY_FILE = "featuredict_train.json"


Activations = Literal["auto", "stream", "cache"]
ACTIVATION_MODES: tuple[str, ...] = ("auto", "stream", "cache")
CACHE_BYTES = 2 * 2**30  # ``auto`` caches when the training tokens' activations fit in this
# (batch tokens, lr, lr decay fraction) when not given, per activation source (measured: see TrainConfig)
CACHED_DEFAULTS: tuple[int, float, float] = (512, 2e-3, 0.2)
STREAMED_DEFAULTS: tuple[int, float, float] = (256, 3e-3, 0.0)


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
    # None: the measured default of the mode (docs/cli.md): streamed 256 tokens at 3e-3, constant (4e-4 barely
    # moves a TopK SAE in ~100k tokens: FVE 0.00 vs 0.81 on stories260K); cached 512 tokens at 2e-3, the last 20%
    # of steps decaying linearly to a tenth (demo corpus, 8 epochs: FVE 0.84 / dead 3%; 6 epochs at 4e-3: 0.76,
    # at 1e-3: 0.77 with 54% dead; constant 3e-3 at 256 tokens: 0.74).
    batch_tokens: int | None = None
    lr: float | None = None
    lr_decay: float | None = None  # fraction of the steps, at the end, over which the lr decays to lr / 10
    activations: Activations = "auto"
    cache_bytes: int = CACHE_BYTES
    device: str | None = None
    dtype: str | None = None  # model dtype; None: float32 on CPU, bfloat16 (else float16) on CUDA
    seed: int = 42
    max_docs: int | None = None

    def __post_init__(self) -> None:
        if self.activations not in ACTIVATION_MODES:
            raise ValueError(f"activations must be one of {', '.join(ACTIVATION_MODES)} (got {self.activations!r})")
        if self.k < 1 or self.d_sae < self.k:
            raise ValueError(f"need 1 <= k <= d_sae (got k={self.k}, d_sae={self.d_sae})")
        if self.training_tokens < 1:
            raise ValueError("training_tokens must be at least 1")
        if self.batch_tokens is not None and self.batch_tokens < 1:
            raise ValueError("batch_tokens must be at least 1")
        if self.lr is not None and not self.lr > 0:
            raise ValueError("lr must be positive")
        if self.lr_decay is not None and not 0 <= self.lr_decay <= 1:
            raise ValueError("lr_decay is a fraction of the steps, from 0 to 1")

    def mode(self, d_in: int) -> Literal["stream", "cache"]:
        """The activation source this run uses (``auto`` resolved for a model of width ``d_in``): ``cache`` when
        the most tokens it could cache fit in ``cache_bytes`` at float32. That is the training tokens, or for a
        local file the file's size in bytes when smaller (a token is never shorter than a byte)."""
        if self.activations != "auto":
            return self.activations
        bound = self.training_tokens
        local = Path(self.corpus.source)
        if local.is_file() and not self.max_docs:
            bound = min(bound, local.stat().st_size)
        return "cache" if bound * d_in * 4 <= self.cache_bytes else "stream"

    def settings(self, d_in: int) -> tuple[int, float, float]:
        """``(batch_tokens, lr, lr_decay)`` with the mode's defaults filled in."""
        batch, lr, decay = CACHED_DEFAULTS if self.mode(d_in) == "cache" else STREAMED_DEFAULTS
        return (
            self.batch_tokens or batch,
            self.lr or lr,
            self.lr_decay if self.lr_decay is not None else decay,
        )


@dataclass
class TrainResult(SaeRunStats):
    out: Path
    mode: str = "stream"  # where the activations came from: stream / cache
    corpus_tokens: int | None = None  # cache: the valid tokens cached (training cycles over them)

    def summary(self) -> dict[str, float | str | int | None]:
        return {
            "fve": self.fve,
            "l0": self.l0,
            "dead_fraction": self.dead_fraction,
            "seconds": self.seconds,
            "tokens_per_s": self.tokens_per_s,
            "model_dtype": self.dtype,
            "activations": self.mode,
            "cached_tokens": self.corpus_tokens,
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
    from sae_lens import LanguageModelSAERunnerConfig, LoggingConfig
    from sae_lens.saes.topk_sae import TopKTrainingSAEConfig
    from transformers import AutoConfig

    validate(cfg.corpus)
    path = resolve_hf_path(cfg.model)
    try:
        mcfg = AutoConfig.from_pretrained(path)
    except Exception as e:  # noqa: BLE001
        raise ModelLoadError(f"cannot read model config of {cfg.model!r}: {one_line(e)}") from e
    d_in = int(mcfg.hidden_size)
    dev = pick_device(cfg.device)
    device = str(dev)
    dtype = dtype_name(resolve_dtype(cfg.dtype, dev))
    mode = cfg.mode(d_in)
    batch_tokens, lr, lr_decay = cfg.settings(d_in)
    if progress:
        how = "activations cached in memory" if mode == "cache" else "activations streamed by sae-lens"
        print(f"model {cfg.model} runs in {dtype} on {device}; SAE in float32; {how}")
    work = Path(tempfile.mkdtemp(prefix="featuredict-train-"))
    steps = max(1, cfg.training_tokens // batch_tokens)
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
        train_batch_size_tokens=batch_tokens,
        store_batch_size_prompts=8,
        n_batches_in_buffer=8,
        lr=lr,
        lr_end=lr / 10,
        lr_warm_up_steps=max(1, steps // 20),
        lr_decay_steps=int(steps * lr_decay),
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
    cached: int | None = None
    try:
        with quiet:
            if mode == "cache":
                sae, cached = _train_cached(cfg, runner_cfg, dtype, progress)
            else:
                sae = _train_streamed(cfg, runner_cfg)
    except Exception as e:
        first = one_line(e)
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
    result = TrainResult(
        fve=fve,
        l0=l0,
        dead_fraction=dead,
        seconds=seconds,
        tokens_per_s=cfg.training_tokens / max(seconds, 1e-9),
        dtype=dtype,
        out=out,
        mode=mode,
        corpus_tokens=cached,
    )
    (out / SUMMARY_FILE).write_text(json.dumps(result.summary()), encoding="utf-8")
    return result


def _train_streamed(cfg: TrainConfig, runner_cfg: Any) -> Any:
    """sae-lens's own runner: its activation store runs the model for every training token."""
    from sae_lens import LanguageModelSAETrainingRunner

    # ~4 characters per token in English; read 3x the tokens training needs, then stop
    ds = _dataset(cfg.corpus, cfg.max_docs, max_chars=12 * cfg.training_tokens)
    return LanguageModelSAETrainingRunner(runner_cfg, override_dataset=ds).run()


@torch.no_grad()
def cache_activations(cfg: TrainConfig, dtype: str, progress: bool = True) -> torch.Tensor:
    """The hook activations ``[n, d_in]`` (float32, on the training device) of the corpus's valid tokens, in
    corpus order, stopping at ``cfg.training_tokens`` tokens or ``cfg.max_docs`` documents: contexts of
    ``cfg.context_size`` with BOS, batches of 8, the model run only up to the hook, BOS/pad and norm outliers
    dropped (``runtime.valid_mask``, the build's rule)."""
    from itertools import islice

    from tqdm.auto import tqdm

    from featuredict.pipelines.model.hooks import HookSite
    from featuredict.pipelines.model.loading import load_model
    from featuredict.pipelines.model.runtime import pad_token_id, special_ids, valid_mask

    loaded = load_model(cfg.model, device=cfg.device, dtype=dtype)
    site = HookSite(loaded, cfg.hook)
    tok = loaded.tokenizer
    specials = special_ids(tok)
    docs = iter_documents(cfg.corpus)
    if cfg.max_docs is not None:
        docs = islice(docs, cfg.max_docs)
    chunks: list[torch.Tensor] = []
    n = 0
    bar = tqdm(total=cfg.training_tokens, unit="tok", unit_scale=True, desc="caching activations", disable=not progress)
    for ids, mask in batch_contexts(iter_contexts(docs, tok, cfg.context_size), 8, cfg.context_size, pad_token_id(tok)):
        x = site.activations(ids, mask)
        keep = valid_mask(ids, specials, mask, x).to(x.device)
        rows = x[keep].float().to(pick_device(cfg.device))
        chunks.append(rows[: cfg.training_tokens - n])
        n += len(chunks[-1])
        bar.update(len(chunks[-1]))
        if n >= cfg.training_tokens:
            break
    bar.close()
    if n == 0:
        raise ValueError(f"corpus {cfg.corpus.describe()} has no tokens to train on")
    return torch.cat(chunks)


def shuffled_batches(acts: torch.Tensor, batch: int, seed: int) -> Iterator[torch.Tensor]:
    """Endless ``[batch, d_in]`` batches of ``acts``: every row once per epoch, a fresh shuffle each epoch
    (a batch may span two epochs). The trainer's data provider in ``cache`` mode."""
    gen = torch.Generator().manual_seed(seed)
    n = acts.shape[0]
    order = torch.randperm(n, generator=gen)
    pos = 0
    while True:
        take: list[torch.Tensor] = []
        need = batch
        while need:
            if pos == n:
                order, pos = torch.randperm(n, generator=gen), 0
            step = order[pos : pos + need]
            take.append(step)
            pos += len(step)
            need -= len(step)
        yield acts[torch.cat(take).to(acts.device)]


def _train_cached(cfg: TrainConfig, runner_cfg: Any, dtype: str, progress: bool) -> tuple[Any, int]:
    """sae-lens's ``SAETrainer`` on an in-memory activation cache; returns (trained SAE, cached tokens)."""
    from sae_lens.saes.sae import TrainingSAE, TrainingSAEConfig
    from sae_lens.training.sae_trainer import SAETrainer

    acts = cache_activations(cfg, dtype, progress)
    if progress:
        print(f"      cached {len(acts):,} tokens; training {cfg.training_tokens / len(acts):.1f} epochs over them")
    torch.manual_seed(cfg.seed)
    sae = TrainingSAE.from_dict(TrainingSAEConfig.from_dict(runner_cfg.get_training_sae_cfg_dict()).to_dict())
    sae.to(runner_cfg.device)
    meta = sae.cfg.metadata  # what sae-lens's runner records, so both modes load the same way
    for key in (
        "dataset_path",
        "hook_name",
        "model_name",
        "model_class_name",
        "hook_head_index",
        "context_size",
        "seqpos_slice",
        "model_from_pretrained_kwargs",
        "prepend_bos",
        "exclude_special_tokens",
        "sequence_separator_token",
        "disable_concat_sequences",
    ):
        setattr(meta, key, getattr(runner_cfg, key))
    trainer = SAETrainer(
        runner_cfg.to_sae_trainer_config(),
        sae,
        shuffled_batches(acts, runner_cfg.train_batch_size_tokens, cfg.seed),
    )
    return trainer.fit(), len(acts)


@torch.no_grad()
def evaluate(
    cfg: TrainConfig, sae_dir: Path, max_tokens: int = 8192, dtype: str | None = None
) -> tuple[float, float, float]:
    """FVE, L0 and dead fraction of a saved SAE on the first ``max_tokens`` of the corpus (model in ``dtype``,
    else ``cfg.dtype``, else the device's default)."""
    from featuredict.pipelines.harvest.state import HarvestConfig, HarvestState, update
    from featuredict.pipelines.model.runtime import load_runtime
    from featuredict.pipelines.model.saes import SaeSource

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
        update(st, f, ids, valid, torch.arange(ctx, ctx + len(ids)), x, rt.decode(f))
        ctx += len(ids)
        if st.n_tokens >= max_tokens:
            break
    return st.fve(), st.l0(), st.dead_fraction()
