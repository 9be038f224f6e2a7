"""Steering benchmarks on stories260K and SmolLM2-135M-Instruct: throughput of steered vs unsteered generation
(tokens/s) for every edit method, the cost of the quality scores, and a batched strength sweep vs one
steered generation.

Usage (from the repo root):

    python -m bench.bench_steering                       # both models, quick SAEs trained if needed
    python -m bench.bench_steering --models stories260k  # one model
    python -m bench.bench_steering --db PATH --sae-id ID # an SAE from a built featuredict database
    python -m bench.bench_steering --random-sae          # untrained SAEs of the same shapes (timing only)

Each measurement generates ``--max-new-tokens`` tokens greedily from the same prompt; variants alternate
``--repeats`` times and the medians are reported. Generation stops only at ``--max-new-tokens`` (EOS is
ignored) so every run produces the same number of tokens.

- throughput: unsteered (no hook at all) vs steered (one feature clamped at every position, one added) vs
  steered + recording, then each method alone (clamp, add, orthogonal, cap, ablate on one feature);
- quality overhead: what the scores add to a steered generation (kept logits + the unedited pass of
  ``quality.score_rows``; the baseline's scores come from its own run), as a fraction of the steered
  generation's time;
- sweep: ``run_sweep`` with 8 strengths x 1 seed (plus the baseline row) x ``--sweep-tokens`` tokens, scores
  included, vs one steered generation of the same length.

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
    from featuredict.pipelines.model.loading import cache_dir

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


def random_sae(model_path: str, hook_name: str, d_in: int, d_sae: int, k: int) -> Path:
    """An untrained sae-lens TopK SAE of the given shape (the tests' tiny SAE), cached (for timing only: the
    hook's cost does not depend on what the SAE learned)."""
    from tests.helpers import make_tiny_sae

    out = bench_cache() / f"random-{Path(model_path).name}-{hook_name}-{d_sae}-k{k}"
    if (out / "cfg.json").exists():
        return out
    out.mkdir(parents=True, exist_ok=True)
    return make_tiny_sae(out, model_path, d_in=d_in, d_sae=d_sae, k=k, hook=hook_name, context_size=128)


def smollm2_sae() -> Path:
    from featuredict.pipelines.model.loading import smollm2_folder

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
STAT = "median"  # or "best" (fastest run: the least disturbed by other processes on a shared machine)


def summary_rate(xs: list[float]) -> float:
    """Tokens/s of several runs: their median, or the highest with ``--stat best``."""
    return max(xs) if STAT == "best" else statistics.median(xs)


def summary_time(xs: list[float]) -> float:
    """Seconds of several runs: their median, or the lowest with ``--stat best``."""
    return min(xs) if STAT == "best" else statistics.median(xs)


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
    med = {k: summary_rate(v) for k, v in rates.items()}
    return {
        "unsteered_tok_s": med["unsteered"],
        "steered_tok_s": med["steered"],
        "steered_record_tok_s": med["steered+record"],
        "ratio": med["steered"] / med["unsteered"],
        "ratio_record": med["steered+record"] / med["unsteered"],
        "tokens": n_tokens,
        "all_rates": rates,
    }


def _median_time(fn: Any, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return summary_time(times)


def time_methods(rt: Any, config: Any, feature: int, max_acts: dict[int, float], repeats: int) -> dict[str, Any]:
    """Steered / unsteered tokens/s for each edit method alone on ``feature`` (runs alternate)."""
    from dataclasses import replace

    from featuredict.pipelines.steering import FeatureEdit, generate, unsteered

    values = {"clamp": 2.0 * max_acts[feature], "add": 1.0, "orthogonal": 2.0, "cap": 0.5, "ablate": 0.0}
    variants = {"unsteered": (unsteered(config), False)}
    for m, v in values.items():
        variants[m] = (replace(config, edits=(FeatureEdit(feature, m, v),)), True)
    rates: dict[str, list[float]] = {k: [] for k in variants}
    for cfg, steer in variants.values():  # warm-up
        generate(rt, cfg, steer=steer, max_acts=max_acts, record=False, stop_at_eos=False)
    for _ in range(repeats):
        for name, (cfg, steer) in variants.items():
            t0 = time.perf_counter()
            res = generate(rt, cfg, steer=steer, max_acts=max_acts, record=False, stop_at_eos=False)
            rates[name].append(len(res.token_ids) / (time.perf_counter() - t0))
    med = {k: summary_rate(v) for k, v in rates.items()}
    return {m: {"tok_s": med[m], "ratio": med[m] / med["unsteered"]} for m in med}


def time_quality(rt: Any, config: Any, max_acts: dict[int, float], repeats: int) -> dict[str, Any]:
    """What the quality scores add to a steered generation: the steered run keeping its logits plus the
    unedited pass (the baseline keeps its logits too, and needs no pass), vs the steered run alone."""
    from featuredict.pipelines.steering import generate, score_rows

    base = generate(rt, config, steer=False, max_acts=max_acts, record=True, stop_at_eos=False, keep_logits=True)
    plain, kept, scoring = [], [], []
    generate(rt, config, max_acts=max_acts, record=True, stop_at_eos=False)  # warm-up
    for _ in range(repeats):
        t0 = time.perf_counter()
        generate(rt, config, max_acts=max_acts, record=True, stop_at_eos=False)
        plain.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        steered = generate(rt, config, max_acts=max_acts, record=True, stop_at_eos=False, keep_logits=True)
        kept.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        score_rows(rt, [base, steered], max_acts)
        scoring.append(time.perf_counter() - t0)
    p, k, sc = (summary_time(x) for x in (plain, kept, scoring))
    return {"steered_s": p, "steered_keep_logits_s": k, "scores_s": sc, "overhead": (k - p + sc) / p}


def time_sweep(
    rt: Any, config: Any, max_acts: dict[int, float], repeats: int, tokens: int, steps: int = 8
) -> dict[str, Any]:
    """``run_sweep`` (``steps`` strengths x 1 seed + the baseline row, scores included) vs one steered
    generation of ``tokens`` tokens, with and without its scores; also the sweep's batched generation alone."""
    from dataclasses import replace

    from featuredict.pipelines.steering import (
        BatchStream,
        RowSpec,
        SweepSettings,
        edits_at,
        generate,
        geometric_strengths,
        prompt_ids,
        run_sweep,
        score_rows,
    )

    cfg = replace(config, generation=replace(config.generation, max_new_tokens=tokens))
    settings = SweepSettings(strengths=geometric_strengths(0.5, 16.0, steps))
    ids = prompt_ids(rt, cfg)
    rows = [RowSpec(False, 0)] + [RowSpec(True, 0, edits_at(cfg.edits, s, max_acts)) for s in settings.strengths]

    def scored() -> None:
        res = generate(rt, cfg, max_acts=max_acts, record=False, stop_at_eos=False, keep_logits=True)
        score_rows(rt, [res], max_acts)

    def batch() -> None:
        kw = {"record": False, "stop_at_eos": False, "keep_logits": True, "stream": False, "row_errors": "stop"}
        BatchStream(rt, cfg, rows, ids=ids, max_acts=max_acts, **kw).run()

    one = _median_time(lambda: generate(rt, cfg, max_acts=max_acts, record=False, stop_at_eos=False), repeats)
    one_scored = _median_time(scored, repeats)
    gen = _median_time(batch, repeats)
    sweep = _median_time(lambda: run_sweep(rt, cfg, settings, max_acts, stop_at_eos=False), repeats)
    return {
        "tokens": tokens,
        "strengths": steps,
        "one_steered_s": one,
        "one_steered_scored_s": one_scored,
        "sweep_generation_s": gen,
        "sweep_s": sweep,
        "ratio": sweep / one,
        "ratio_generation": gen / one,
        "ratio_scored": sweep / one_scored,
    }


def bench_one(
    name: str,
    rt: Any,
    prompt: str,
    max_new_tokens: int,
    repeats: int,
    max_acts: dict[int, float] | None = None,
    sweep_tokens: int = 40,
    parts: tuple[str, ...] = ("throughput", "methods", "quality", "sweep"),
) -> dict[str, Any]:
    from featuredict.pipelines.steering import FeatureEdit, GenerationSettings, SteeringConfig, prompt_ids

    base = SteeringConfig(
        prompt=prompt,
        edits=(),
        chat_template=rt.backend.is_chat,
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
        chat_template=rt.backend.is_chat,
        generation=base.generation,
    )
    torch.manual_seed(0)
    out = time_generation(rt, cfg, acts, repeats) if "throughput" in parts else {}
    if "methods" in parts:
        out["methods"] = time_methods(rt, base, f_add, acts, repeats)
    if "quality" in parts:
        out["quality"] = time_quality(rt, cfg, acts, repeats)
    if "sweep" in parts:
        one = SteeringConfig(
            prompt=prompt,
            edits=(FeatureEdit(f_add, "add", 1.0),),
            chat_template=rt.backend.is_chat,
            generation=base.generation,
        )
        out["sweep"] = time_sweep(rt, one, acts, max(1, repeats // 2 + 1), sweep_tokens)
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
    p.add_argument(
        "--stat",
        choices=["median", "best"],
        default="median",
        help="median of the repeats, or the best (fastest) one, which other processes disturb least",
    )
    p.add_argument("--random-sae", action="store_true", help="untrained SAEs of the bench's shapes (timing only)")
    p.add_argument("--sweep-tokens", type=int, default=40, help="new tokens per sweep row (default 40)")
    p.add_argument(
        "--parts",
        nargs="+",
        default=["throughput", "methods", "quality", "sweep"],
        choices=["throughput", "methods", "quality", "sweep"],
    )
    args = p.parse_args(argv)
    global STAT
    STAT = args.stat
    if args.threads:
        torch.set_num_threads(args.threads)

    from featuredict.pipelines.model.runtime import load_runtime, runtime_from_row
    from featuredict.pipelines.model.saes import SaeSource

    results = []
    if "stories260k" in args.models:
        if not STORIES.exists():
            print(f"skipping stories260k: {STORIES} is absent")
        else:
            folder = random_sae(str(STORIES), "model.layers.2", 64, 512, 8) if args.random_sae else stories_sae()
            rt = load_runtime(str(STORIES), SaeSource(kind="folder", path=str(folder)), device="cpu")
            results.append(
                {
                    **bench_one(
                        "stories260k",
                        rt,
                        "Once upon a time",
                        args.max_new_tokens,
                        args.repeats,
                        sweep_tokens=args.sweep_tokens,
                        parts=tuple(args.parts),
                    ),
                    "sae": "untrained TopK SAE (timing only)"
                    if args.random_sae
                    else "quick TopK SAE trained by this bench",
                }
            )
    if "smollm2-135m" in args.models:
        max_acts: dict[int, float] = {}
        if args.db:
            from featuredict.db.queries import feature_max_acts
            from featuredict.db.store import Store

            store = Store(args.db, read_only=True)
            rows = store.df("SELECT * FROM saes WHERE sae_id = ?", [args.sae_id]).to_dict("records")
            if not rows:
                print(f"no SAE {args.sae_id!r} in {args.db}")
                return 2
            rt = runtime_from_row(rows[0], device="cpu")
            max_acts = feature_max_acts(store, args.sae_id)
            sae_desc = f"{args.sae_id} from {args.db}"
        elif args.random_sae:
            from featuredict.pipelines.model.loading import smollm2_folder

            folder = random_sae(str(smollm2_folder()), "model.layers.15", 576, 4608, 32)
            rt = load_runtime("smollm2-135m", SaeSource(kind="folder", path=str(folder)), device="cpu")
            sae_desc = "untrained TopK SAE d_sae 4608 k 32 (timing only)"
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
                    sweep_tokens=args.sweep_tokens,
                    parts=tuple(args.parts),
                ),
                "sae": sae_desc,
            }
        )

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {platform.processor() or platform.machine()}")
    for r in results:
        head = f"{r['model']:>14} {r['hook']} d_sae={r['d_sae']} prompt={r['prompt_tokens']} tok"
        if "ratio" in r:
            print(
                f"{head}, {r['tokens']['steered']} new tok, {args.stat} of {args.repeats}: unsteered "
                f"{r['unsteered_tok_s']:.1f} tok/s | steered {r['steered_tok_s']:.1f} tok/s (ratio {r['ratio']:.3f})"
                f" | steered+record {r['steered_record_tok_s']:.1f} tok/s (ratio {r['ratio_record']:.3f})"
            )
        if "methods" in r:
            cells = ", ".join(f"{m} {v['ratio']:.3f}" for m, v in r["methods"].items() if m != "unsteered")
            print(f"{head}: steered/unsteered by method ({r['methods']['unsteered']['tok_s']:.1f} tok/s): {cells}")
        if "quality" in r:
            q = r["quality"]
            print(
                f"{head}: quality scores add {100 * q['overhead']:.1f}% to a steered generation "
                f"({q['steered_s']:.3f} s; kept logits {q['steered_keep_logits_s']:.3f} s, scores {q['scores_s']:.3f} s)"
            )
        if "sweep" in r:
            w = r["sweep"]
            print(
                f"{head}: sweep {w['strengths']} strengths x 1 seed x {w['tokens']} tok: {w['sweep_s']:.2f} s "
                f"(its batched generation {w['sweep_generation_s']:.2f} s) vs one steered generation "
                f"{w['one_steered_s']:.2f} s (with its scores {w['one_steered_scored_s']:.2f} s): ratio "
                f"{w['ratio']:.2f} (generation alone {w['ratio_generation']:.2f}; both scored {w['ratio_scored']:.2f})"
            )
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2), encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
