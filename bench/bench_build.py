"""A whole ``featuredict build`` against its physical limit: a fresh process that loads the model and runs the
same tokens forward to the hook, nothing else.

    python bench/bench_build.py --model smollm2-135m --sae $SAE --corpus CORPUS --tokens 30000 --repeats 2
    python bench/bench_build.py --model smollm2-135m --random-sae 65536 --corpus CORPUS --tokens 100000 \
        --repeats 1 --time-v

Both sides are fresh processes timed from start to exit (interpreter, imports, model load included), run in
turn (limit, build, limit, build, ...) so a busy machine slows both alike; the ratio build / limit is the
figure (target: at most 1.25). The CPU time (user + system) of each side is reported too: on a machine other
jobs keep busy it is steadier than the wall time (``--threads 1`` steadies it further: no threads spinning
while others wait for a core). The limit side tokenises and batches the corpus exactly as the build does
(``pipelines.corpus``) and stops at the same token budget. The build side is the real ``featuredict build``
command; its stage line (``stages: ...``) is printed too. ``--dictionary-only`` leaves out what the command
runs after the dictionary is written (the quality eval through the splice and the words: explanations and the
meaning index), which came after the target was set.

``--random-sae D_SAE`` writes a random TopK SAE (k 32) of that width at ``--hook`` (W_enc = W_dec^T, so every
token has k active features) for scale checks; ``--time-v`` runs the build under ``/usr/bin/time -v`` for its
peak RSS.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve()


def limit_child(args: argparse.Namespace) -> None:
    """Load model (+ SAE, for the hook and BOS settings) and run the budget's batches forward to the hook."""
    import torch

    from featuredict.pipelines.harvest.corpus import CorpusSpec, batch_contexts, iter_contexts, iter_documents
    from featuredict.pipelines.model.runtime import load_runtime
    from featuredict.pipelines.model.saes import SaeSource

    rt = load_runtime(args.model, SaeSource.parse(args.sae), device=args.device)
    contexts = iter_contexts(iter_documents(CorpusSpec(args.corpus)), rt.tokenizer, args.context_size, rt.prepend_bos)
    seen = 0
    specials = rt.special_ids()
    with torch.no_grad():
        for ids, mask in batch_contexts(contexts, args.batch_size, args.context_size, rt.pad_id):
            rt.site.activations(ids, mask)
            valid = mask.bool()
            for s in specials:
                valid &= ids != s
            seen += int(valid.sum())
            if seen >= args.tokens:
                break
    print(json.dumps({"tokens": seen}))


def random_sae(folder: Path, model: str, hook: str, d_in: int, d_sae: int, k: int = 32, seed: int = 0) -> Path:
    """A random sae-lens TopK SAE folder (the tests' tiny SAE, at this model's hook and width), kept once written."""
    if (folder / "cfg.json").exists():
        return folder
    sys.path.insert(0, str(HERE.parents[1]))
    from tests.helpers import make_tiny_sae

    return make_tiny_sae(folder, model, d_in=d_in, d_sae=d_sae, k=k, seed=seed, hook=hook, context_size=64)


def _timed(cmd: list[str], env: dict[str, str]) -> tuple[float, float, str]:
    """(wall seconds, CPU seconds user + system, output) of one child process."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - t
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if p.returncode != 0:
        sys.exit(f"failed ({p.returncode}): {' '.join(cmd)}\n{p.stderr[-3000:]}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return wall, cpu, p.stdout + p.stderr


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True)
    p.add_argument("--sae", help="SAE folder (or RELEASE:ID)")
    p.add_argument("--random-sae", type=int, default=None, metavar="D_SAE", help="build a random TopK SAE this wide")
    p.add_argument("--hook", default="model.layers.15", help="hook of --random-sae (default model.layers.15)")
    p.add_argument("--d-in", type=int, default=576, help="width at the hook for --random-sae (SmolLM2: 576)")
    p.add_argument("--corpus", required=True)
    p.add_argument("--tokens", type=int, default=30_000)
    p.add_argument("--context-size", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--device", default=None)
    p.add_argument("--work", default="/tmp/featuredict-bench-build", help="folder for databases and random SAEs")
    p.add_argument("--no-umap", action="store_true")
    p.add_argument(
        "--dictionary-only",
        action="store_true",
        help="the build without the quality eval and the words it runs after the dictionary (--eval-contexts 0 "
        "--no-words): the stages the target was set for",
    )
    p.add_argument("--time-v", action="store_true", help="run the build under /usr/bin/time -v (peak RSS)")
    p.add_argument("--threads", type=int, default=None, help="torch threads of both sides (OMP_NUM_THREADS)")
    p.add_argument("--limit-child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.limit_child:
        limit_child(args)
        return
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    if args.random_sae:
        args.sae = str(
            random_sae(work / f"random_sae_{args.random_sae}", args.model, args.hook, args.d_in, args.random_sae)
        )
    if not args.sae:
        sys.exit("give --sae or --random-sae")
    env = dict(os.environ)
    env.setdefault("NUMBA_CACHE_DIR", str(work / "numba"))
    if args.threads:
        env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(args.threads)
    common = ["--model", args.model, "--sae", args.sae, "--corpus", args.corpus, "--context-size", str(args.context_size),
              "--batch-size", str(args.batch_size)]  # fmt: skip
    dev = ["--device", args.device] if args.device else []
    limit_cmd = [sys.executable, str(HERE), "--limit-child", *common, "--tokens", str(args.tokens), *dev]
    featuredict = shutil.which("featuredict") or str(Path(sys.executable).with_name("featuredict"))
    db = work / "bench.duckdb"
    build_cmd = [featuredict, "build", *common, "--db", str(db), "--max-tokens", str(args.tokens), *dev]
    build_cmd += ["--no-umap"] if args.no_umap else []
    build_cmd += ["--eval-contexts", "0", "--no-words"] if args.dictionary_only else []
    if args.time_v:
        build_cmd = ["/usr/bin/time", "-v", *build_cmd]
    limits, builds, limit_cpu, build_cpu, stage_lines, rss = [], [], [], [], [], []
    for _ in range(args.repeats):
        w, c, _out = _timed(limit_cmd, env)
        limits.append(w)
        limit_cpu.append(c)
        for f in (db, Path(str(db) + ".wal")):
            f.unlink(missing_ok=True)
        w, c, out = _timed(build_cmd, env)
        builds.append(w)
        build_cpu.append(c)
        stage_lines += [ln for ln in out.splitlines() if ln.startswith("stages: ")]
        m = re.search(r"Maximum resident set size \(kbytes\): (\d+)", out)
        if m:
            rss.append(int(m.group(1)) / 1024)
        print(
            f"limit {limits[-1]:.1f} s wall / {limit_cpu[-1]:.1f} s CPU, build {builds[-1]:.1f} s wall / "
            f"{build_cpu[-1]:.1f} s CPU ({builds[-1] / limits[-1]:.2f}x wall, {build_cpu[-1] / limit_cpu[-1]:.2f}x CPU)",
            flush=True,
        )
    lim, bld, lc, bc = min(limits), min(builds), min(limit_cpu), min(build_cpu)
    print(
        "\n| tokens | d_sae | limit wall (s) | build wall (s) | build / limit (wall) | limit CPU (s) | build CPU (s) "
        "| build / limit (CPU) | peak RSS (MB) |\n|---|---|---|---|---|---|---|---|---|"
    )
    d_sae = args.random_sae or "SAE"
    peak = f"{max(rss):,.0f}" if rss else "–"
    print(
        f"| {args.tokens:,} | {d_sae} | {lim:.1f} | {bld:.1f} | {bld / lim:.2f}x | {lc:.1f} | {bc:.1f} | {bc / lc:.2f}x "
        f"| {peak} |"
    )
    print("\nlimits:", " ".join(f"{x:.1f}" for x in limits), "· builds:", " ".join(f"{x:.1f}" for x in builds))
    for ln in stage_lines:
        print(ln)


if __name__ == "__main__":
    main()
