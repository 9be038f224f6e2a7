"""Throughput of steered vs unsteered generation (tokens/s), on stories260K and SmolLM2-135M-Instruct.

Usage (from the repo root):

    python -m bench.bench_steering                       # both models, quick SAEs trained if needed
    python -m bench.bench_steering --models stories260k  # one model
    python -m bench.bench_steering --db PATH --sae-id ID # an SAE from a built featuredict database

Each measurement generates ``--max-new-tokens`` tokens greedily from the same prompt, unsteered (no hook at
all) and steered (one feature clamped at every position, one added), alternating ``--repeats`` times, and
reports the median tokens/s of each and their ratio. Generation stops only at ``--max-new-tokens`` (EOS is
ignored) so both runs produce the same number of tokens.

Without ``--db`` the SAEs are trained here with sae-lens (TopK, ``rescale_acts_by_decoder_norm=True``) and
cached under ``$FEATUREDICT_CACHE/bench``:
- stories260K: 512 features, k=8, ``model.layers.2``, 200k tokens of ../shared/corpora/tinystories (~5 s);
- smollm2-135m: 4608 features, k=32, ``model.layers.15``, ~60k tokens of ../shared/corpora/web_sample (~2 min).
These exist only to time the hook; they are not the demo database's SAE.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
STORIES = SHARED / "models" / "stories260K"
TINYSTORIES = SHARED / "corpora" / "tinystories_train_sample_2MB.txt"
WEB = SHARED / "corpora" / "web_sample_133KB.txt"

if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def bench_cache() -> Path:
    from featuredict.pipelines.models import cache_dir

    return cache_dir() / "bench"


def train_quick_sae(
    model_path: str,
    hook_name: str,
    texts: list[str],
    out_dir: Path,
    *,
    d_in: int,
    d_sae: int,
    k: int,
    training_tokens: int,
    context_size: int = 128,
) -> Path:
    """Train a small TopK SAE with sae-lens on ``texts`` and save it as a sae-lens folder at ``out_dir``."""
    import datasets
    from sae_lens import (
        LanguageModelSAERunnerConfig,
        LanguageModelSAETrainingRunner,
        LoggingConfig,
        TopKTrainingSAEConfig,
    )

    ds = datasets.Dataset.from_dict({"text": texts})
    cfg = LanguageModelSAERunnerConfig(
        sae=TopKTrainingSAEConfig(d_in=d_in, d_sae=d_sae, k=k),
        model_name=model_path,
        model_class_name="AutoModelForCausalLM",
        hook_name=hook_name,
        dataset_path="",
        is_dataset_tokenized=False,
        streaming=False,
        context_size=context_size,
        training_tokens=training_tokens,
        train_batch_size_tokens=1024,
        store_batch_size_prompts=8,
        n_batches_in_buffer=8,
        lr=4e-4,
        device="cpu",
        logger=LoggingConfig(log_to_wandb=False),
        checkpoint_path=None,
        output_path=None,
        verbose=False,
        n_batches_for_norm_estimate=10,
    )
    sae = LanguageModelSAETrainingRunner(cfg, override_dataset=ds).run()
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    tmp.mkdir(parents=True, exist_ok=True)
    sae.save_model(str(tmp))
    if out_dir.exists():
        import shutil

        shutil.rmtree(out_dir)
    tmp.rename(out_dir)
    return out_dir


def stories_sae() -> Path:
    out = bench_cache() / "stories260k-l2-topk512"
    if (out / "cfg.json").exists():
        return out
    texts = [t.strip() for t in TINYSTORIES.read_text(encoding="utf-8").split("<|endoftext|>") if t.strip()]
    print(f"training a quick TopK SAE on stories260K model.layers.2 -> {out}", flush=True)
    return train_quick_sae(str(STORIES), "model.layers.2", texts, out, d_in=64, d_sae=512, k=8, training_tokens=200_000)


def smollm2_sae() -> Path:
    from featuredict.pipelines.models import smollm2_folder

    out = bench_cache() / "smollm2-l15-topk4608"
    if (out / "cfg.json").exists():
        return out
    folder = smollm2_folder()
    lines = [ln.strip() for ln in WEB.read_text(encoding="utf-8").splitlines() if ln.strip()]
    print(f"training a quick TopK SAE on smollm2-135m model.layers.15 -> {out} (about 2 min)", flush=True)
    return train_quick_sae(
        str(folder), "model.layers.15", lines, out, d_in=576, d_sae=4608, k=32, training_tokens=60_000
    )


# ---- timing ---------------------------------------------------------------------------------------------
def pick_features(rt: Any, prompt_ids: torch.Tensor) -> tuple[int, int, float]:
    """Two features that fire on the prompt: (clamp target, add target, the first one's max activation)."""
    f = rt.feature_acts(prompt_ids)[0]  # [pos, d_sae]
    mx = f.max(0).values
    top = torch.argsort(mx, descending=True)
    return int(top[0]), int(top[1]), float(mx[top[0]])


def time_generation(rt: Any, config: Any, max_acts: dict[int, float], repeats: int) -> dict[str, Any]:
    """Median tokens/s of: unsteered (no hook at all), steered (edits only, as the CLI's steered run minus
    recording) and steered + recording (the dashboard's steered run: edits + the steered features'
    activations before/after the edit on every generated token). Runs alternate to share any drift."""
    from featuredict.pipelines.steering import generate, unsteered

    variants = {
        "unsteered": (unsteered(config), False, False),
        "steered": (config, True, False),
        "steered+record": (config, True, True),
    }
    rates: dict[str, list[float]] = {k: [] for k in variants}
    n_tokens: dict[str, int] = {}
    for cfg, steer, record in variants.values():  # warm-up
        generate(rt, cfg, steer=steer, max_acts=max_acts, record=record, stop_at_eos=False)
    for _ in range(repeats):
        for name, (cfg, steer, record) in variants.items():
            t0 = time.perf_counter()
            res = generate(rt, cfg, steer=steer, max_acts=max_acts, record=record, stop_at_eos=False)
            dt = time.perf_counter() - t0
            n_tokens[name] = len(res.token_ids)
            rates[name].append(len(res.token_ids) / dt)
    med = {k: statistics.median(v) for k, v in rates.items()}
    return {
        "unsteered_tok_s": med["unsteered"],
        "steered_tok_s": med["steered"],
        "steered_record_tok_s": med["steered+record"],
        "ratio": med["steered"] / med["unsteered"],
        "ratio_record": med["steered+record"] / med["unsteered"],
        "tokens": n_tokens,
        "all_rates": rates,
    }


def bench_one(
    name: str, rt: Any, prompt: str, max_new_tokens: int, repeats: int, max_acts: dict[int, float] | None = None
) -> dict[str, Any]:
    from featuredict.pipelines.steering import FeatureEdit, GenerationSettings, SteeringConfig, prompt_ids

    base = SteeringConfig(
        prompt=prompt,
        edits=(),
        chat_template=rt.loaded.is_chat,
        generation=GenerationSettings(max_new_tokens=max_new_tokens, temperature=0.0),
    )
    ids = prompt_ids(rt, base)
    f_clamp, f_add, mx = pick_features(rt, ids)
    acts = dict(max_acts or {})
    acts.setdefault(f_clamp, mx)
    acts.setdefault(f_add, mx)
    cfg = SteeringConfig(
        prompt=prompt,
        edits=(FeatureEdit(f_clamp, "clamp", 2.0 * mx), FeatureEdit(f_add, "add", 1.0)),
        chat_template=rt.loaded.is_chat,
        generation=base.generation,
    )
    torch.manual_seed(0)
    out = time_generation(rt, cfg, acts, repeats)
    out.update(
        model=name,
        hook=rt.site.hook_name,
        d_sae=rt.d_sae,
        prompt_tokens=int(ids.shape[1]),
        edits=[e.__dict__ for e in cfg.edits],
    )
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--models", nargs="+", default=["stories260k", "smollm2-135m"], choices=["stories260k", "smollm2-135m"]
    )
    p.add_argument("--db", default=None, help="featuredict database holding the smollm2 SAE (optional)")
    p.add_argument("--sae-id", default=None, help="sae_id in --db to use for smollm2-135m")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--json", default=None, help="write the results here as JSON")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    from featuredict.pipelines.runtime import load_runtime, runtime_from_row
    from featuredict.pipelines.saes import SaeSource

    results = []
    if "stories260k" in args.models:
        if not STORIES.exists():
            print(f"skipping stories260k: {STORIES} is absent")
        else:
            rt = load_runtime(str(STORIES), SaeSource(kind="folder", path=str(stories_sae())), device="cpu")
            results.append(
                {
                    **bench_one("stories260k", rt, "Once upon a time", args.max_new_tokens, args.repeats),
                    "sae": "quick TopK SAE trained by this bench",
                }
            )
    if "smollm2-135m" in args.models:
        max_acts: dict[int, float] = {}
        if args.db:
            from featuredict.db.presets import feature_max_acts
            from featuredict.db.store import Store

            store = Store(args.db, read_only=True)
            rows = store.df("SELECT * FROM saes WHERE sae_id = ?", [args.sae_id]).to_dict("records")
            if not rows:
                print(f"no SAE {args.sae_id!r} in {args.db}")
                return 2
            rt = runtime_from_row(rows[0], device="cpu")
            max_acts = feature_max_acts(store, args.sae_id)
            sae_desc = f"{args.sae_id} from {args.db}"
        else:
            rt = load_runtime("smollm2-135m", SaeSource(kind="folder", path=str(smollm2_sae())), device="cpu")
            sae_desc = "quick TopK SAE trained by this bench (no demo database given)"
        results.append(
            {
                **bench_one(
                    "smollm2-135m",
                    rt,
                    "Write a short story about a dragon.",
                    args.max_new_tokens,
                    args.repeats,
                    max_acts,
                ),
                "sae": sae_desc,
            }
        )

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {platform.processor() or platform.machine()}")
    for r in results:
        print(
            f"{r['model']:>14} {r['hook']} d_sae={r['d_sae']} prompt={r['prompt_tokens']} tok, "
            f"{r['tokens']['steered']} new tok, median of {args.repeats}: unsteered {r['unsteered_tok_s']:.1f} tok/s"
            f" | steered {r['steered_tok_s']:.1f} tok/s (ratio {r['ratio']:.3f})"
            f" | steered+record {r['steered_record_tok_s']:.1f} tok/s (ratio {r['ratio_record']:.3f})"
        )
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2), encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
