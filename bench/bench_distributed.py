"""``build --ray`` against a one-process build on the same tokens: speed, Ray's fixed costs, break-even, and the
driver's peak memory as the number of shards grows.

    python bench/bench_distributed.py                       # stories260K + TinyStories from ../shared if present
    python bench/bench_distributed.py --tokens 60000 --d-sae 4096 --memory-shards 1 2 4 8

The SAE is a random TopK SAE (made here, like the tests' one) on ``model.layers.2``: its statistics are
meaningless, but the harvest does exactly the same work as with a trained one. Without ../shared the tiny random
Llama of ``tests/helpers.py`` is made instead. Every figure comes from a fresh process (``--child``), so each
build pays its own start-up, as ``featuredict build`` would:

- ``single``: ``build(cfg)`` in one process, with torch on one thread and on every core (on a busy machine one
  thread can beat two: idle OpenMP threads spin while others wait for a core).
- ``ray``: a local Ray with ``--cpus`` CPUs and ``--shards`` shards of one CPU each: a build of ``--tokens``
  tokens on cold workers (what ``featuredict build --ray`` does: its whole run is timed from process start), then
  warm builds of ``--small`` and ``--tokens`` tokens. The two warm sizes give Ray's harvest rate and its fixed
  cost per build (task start + one model load per shard + planning + merge); cold minus warm is the workers'
  start-up (a Python process each, importing torch, transformers and sae-lens).
- ``memory``: the driver's peak memory in a Ray build of ``--tokens`` tokens with N shards, for each N in
  ``--memory-shards`` (results are merged as they arrive, so this should stay flat). Sampled every 20 ms from
  /proc: private memory (RssAnon: the states being merged, the tables being written) and shared memory
  (RssShmem: pages of Ray's object store the driver has read, which stay mapped after a result is freed).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
STORIES = SHARED / "models" / "stories260K"
TINYSTORIES = SHARED / "corpora" / "tinystories_train_sample_2MB.txt"


def _cpu_name() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        return next(line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name"))
    except (OSError, subprocess.CalledProcessError, StopIteration):
        return platform.processor() or "unknown CPU"


class _Sampler:
    """Peak RssAnon and RssShmem of this process (MB), sampled from /proc/self/status in a thread."""

    def __init__(self, every_s: float = 0.02) -> None:
        self.peak = {"RssAnon": 0.0, "RssShmem": 0.0}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(every_s,), daemon=True)

    @staticmethod
    def now() -> dict[str, float]:
        out = {}
        for line in Path("/proc/self/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in ("RssAnon", "RssShmem"):
                out[key] = int(value.split()[0]) / 1024
        return out

    def _run(self, every_s: float) -> None:
        while not self._stop.is_set():
            for k, v in self.now().items():
                self.peak[k] = max(self.peak[k], v)
            time.sleep(every_s)

    def __enter__(self) -> _Sampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def make_inputs(work: Path, d_sae: int, k: int) -> tuple[str, str, str, str]:
    """(model, sae folder, corpus, hook): stories260K + TinyStories where ../shared has them, else the tiny model;
    the SAE is a random TopK SAE (timing does not depend on training)."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from tests.helpers import TINY_HOOK, TINY_TEXT, make_tiny_model, make_tiny_sae

    if STORIES.exists() and TINYSTORIES.exists():
        model, corpus, hook, d_in = str(STORIES), str(TINYSTORIES), "model.layers.2", 64
    else:
        model, hook, d_in = str(make_tiny_model(work / "model")), TINY_HOOK, 32
        corpus = str(work / "corpus.txt")
        Path(corpus).write_text("\n<|endoftext|>\n".join(TINY_TEXT * 2000), encoding="utf-8")
    make_tiny_sae(work / "sae", model, d_in=d_in, d_sae=d_sae, k=k, hook=hook, context_size=64)
    return model, str(work / "sae"), corpus, hook


def _cfg(args, tokens: int, db: str):
    from featuredict.pipelines.harvest.config import BuildConfig
    from featuredict.pipelines.harvest.corpus import CorpusSpec
    from featuredict.pipelines.model.saes import SaeSource

    return BuildConfig(
        model=args.model,
        sae=SaeSource(kind="folder", path=args.sae),
        corpus=CorpusSpec(args.corpus),
        db=db,
        sae_name="bench",
        max_tokens=tokens,
        context_size=64,
        batch_size=16,
        umap=False,
        device="cpu",
        progress=False,
    )


def child(args) -> dict:
    """One measurement in this fresh process; prints JSON."""
    t_start = time.perf_counter()
    from featuredict.pipelines.harvest.build import build
    from featuredict.pipelines.harvest.sharding import RayOptions
    from featuredict.pipelines.model.runtime import load_runtime
    from featuredict.pipelines.model.saes import SaeSource

    out: dict = {"import_s": time.perf_counter() - t_start}
    work = Path(args.work)
    if args.child == "single":
        import torch

        torch.set_num_threads(args.threads)
        r = build(_cfg(args, args.tokens, str(work / f"single{args.threads}.duckdb")))
        out.update(tokens=r.n_tokens, harvest_s=r.n_tokens / r.tokens_per_s, total_s=time.perf_counter() - t_start)
        return out
    import ray

    t = time.perf_counter()
    load_runtime(args.model, SaeSource(kind="folder", path=args.sae), device="cpu")
    out["model_load_s"] = time.perf_counter() - t
    t = time.perf_counter()
    ray.init(num_cpus=args.cpus, include_dashboard=False, log_to_driver=False)
    out["ray_init_s"] = time.perf_counter() - t

    def ray_build(tokens: int, shards: int, name: str) -> tuple[int, float, float]:
        t0 = time.perf_counter()
        r = build(_cfg(args, tokens, str(work / f"{name}.duckdb")), ray=RayOptions(shards=shards))
        return r.n_tokens, r.n_tokens / r.tokens_per_s, time.perf_counter() - t0

    try:
        if args.child == "ray":
            out["cold_large"] = ray_build(args.tokens, args.shards, "cold")
            out["whole_s"] = time.perf_counter() - t_start
            out["warm_small"] = ray_build(args.small, args.shards, "small")
            out["warm_large"] = ray_build(args.tokens, args.shards, "large")
        else:  # memory
            out["before"] = _Sampler.now()
            with _Sampler() as sampler:
                out["build"] = ray_build(args.tokens, args.memory_n, "mem")
            out["peak"] = sampler.peak
    finally:
        ray.shutdown()
    return out


def _run_child(args, mode: str, **extra) -> dict:
    cmd = [sys.executable, __file__, "--child", mode, "--model", args.model, "--sae", args.sae, "--corpus"]
    cmd += [args.corpus, "--work", args.work, "--tokens", str(args.tokens), "--small", str(args.small)]
    cmd += ["--shards", str(args.shards), "--cpus", str(args.cpus)]
    for k, v in extra.items():
        cmd += [f"--{k.replace('_', '-')}", str(v)]
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1")
    res = subprocess.run(cmd, capture_output=True, text=True, env=env)
    lines = [line for line in res.stdout.splitlines() if line.startswith("{")]
    if res.returncode != 0 or not lines:
        sys.exit(f"{mode} run failed:\n{res.stderr[-3000:]}")
    return json.loads(lines[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=60_000, help="tokens of the compared builds (default 60k)")
    p.add_argument("--small", type=int, default=2_000, help="tokens of the small build that measures fixed costs")
    p.add_argument("--shards", type=int, default=2)
    p.add_argument("--cpus", type=int, default=2, help="CPUs of the local Ray (default 2)")
    p.add_argument("--d-sae", type=int, default=4096)
    p.add_argument("--k", type=int, default=16)
    p.add_argument("--memory-shards", type=int, nargs="*", default=[1, 2, 4, 8])
    p.add_argument("--child", choices=["single", "ray", "memory"], help=argparse.SUPPRESS)
    p.add_argument("--memory-n", type=int, default=1, help=argparse.SUPPRESS)
    p.add_argument("--threads", type=int, default=1, help=argparse.SUPPRESS)
    p.add_argument("--model", help=argparse.SUPPRESS)
    p.add_argument("--sae", help=argparse.SUPPRESS)
    p.add_argument("--corpus", help=argparse.SUPPRESS)
    p.add_argument("--work", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(json.dumps(child(args)))
        return
    with tempfile.TemporaryDirectory(prefix="bench_distributed_") as work:
        args.work = work
        args.model, args.sae, args.corpus, hook = make_inputs(Path(work), args.d_sae, args.k)
        print(
            f"CPU: {_cpu_name()} ({os.cpu_count()} cores visible); model {Path(args.model).name} at {hook}, "
            f"random TopK SAE d_sae={args.d_sae} k={args.k}; corpus {Path(args.corpus).name}"
        )
        singles = {t: _run_child(args, "single", threads=t) for t in sorted({1, os.cpu_count() or 1})}
        ray_ = _run_child(args, "ray")
        n_small, hs_small, _ = ray_["warm_small"]
        n_large, hs_large, _ = ray_["warm_large"]
        n_cold, hs_cold, _ = ray_["cold_large"]
        rate_ray = (n_large - n_small) / max(hs_large - hs_small, 1e-9)
        fixed_warm = hs_small - n_small / rate_ray
        cold_extra = hs_cold - hs_large
        single = min(singles.values(), key=lambda r: r["harvest_s"])  # the faster one-process build
        rate_single = single["tokens"] / single["harvest_s"]
        overhead = ray_["ray_init_s"] + cold_extra + fixed_warm
        print(f"\n| build of {single['tokens']:,} tokens | harvest s | harvest tok/s | whole run s |")
        print("|---|---:|---:|---:|")
        for t, r in singles.items():
            rate = r["tokens"] / r["harvest_s"]
            print(f"| one process, {t} torch thread(s) | {r['harvest_s']:.1f} | {rate:,.0f} | {r['total_s']:.1f} |")
        print(
            f"| Ray, {args.shards} shards x 1 CPU, cold workers | {hs_cold:.1f} | {n_cold / hs_cold:,.0f} | {ray_['whole_s']:.1f} |"
        )
        print(f"| Ray, {args.shards} shards x 1 CPU, warm workers | {hs_large:.1f} | {n_large / hs_large:,.0f} | |")
        print(
            f"\nratio Ray / the faster one-process build, harvest time: {hs_cold / single['harvest_s']:.2f}x cold, "
            f"{hs_large / single['harvest_s']:.2f}x warm; whole run: {ray_['whole_s'] / single['total_s']:.2f}x"
        )
        print(f"Ray's harvest rate from the two warm sizes: {rate_ray:,.0f} tok/s (one process: {rate_single:,.0f})")
        print(
            f"fixed costs: ray.init {ray_['ray_init_s']:.1f} s; worker start-up (imports, cold) {cold_extra:.1f} s; "
            f"per build, warm (tasks + model load per shard + plan + merge) {fixed_warm:.1f} s; "
            f"first model + SAE load in a process (lazy imports included) {ray_['model_load_s']:.2f} s"
        )
        if rate_ray > rate_single:
            n_star = overhead / (1 / rate_single - 1 / rate_ray)
            print(f"break-even: ~{n_star:,.0f} tokens (fixed {overhead:.1f} s / time saved per token)")
        else:
            print(
                f"break-even: none here: {args.shards} Ray shards harvest no faster than one process; Ray pays off "
                f"when shards add hardware (GPUs, machines), past ~{overhead:.0f} s of fixed cost"
            )
        print(
            "\n| shards | driver private MB before the harvest | peak private MB | peak shared (object store) MB | harvest s |"
        )
        print("|---:|---:|---:|---:|---:|")
        for n in args.memory_shards:
            m = _run_child(args, "memory", memory_n=n)
            b, pk = m["before"], m["peak"]
            print(f"| {n} | {b['RssAnon']:.0f} | {pk['RssAnon']:.0f} | {pk['RssShmem']:.0f} | {m['build'][1]:.1f} |")


if __name__ == "__main__":
    main()
