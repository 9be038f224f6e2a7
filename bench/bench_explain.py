"""Throughput of ``featuredict explain``: the ``tokens`` explainer on every feature of a 65,536-feature SAE, and
the ``openai:`` explainer at concurrency 8 against the localhost test server (features/minute).

Usage::

    python bench/synth_db.py /tmp/fd/full.duckdb            # SYNTHETIC 65,536 features (~1 min), once
    python bench/bench_explain.py /tmp/fd/full.duckdb [--http-features 256] [--latency 0 0.5]

The database is copied first (explanations are written into the copy). The HTTP server is the TEST DOUBLE of
``tests/pipelines/explain/test_explain.py`` (no model: it names the commonest marked token), so the HTTP figure is the client's
own throughput plus the server latency given by ``--latency`` (seconds per answer, to mimic an LLM).
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from featuredict.db import queries as q  # noqa: E402
from featuredict.db.store import Store  # noqa: E402
from featuredict.pipelines.explain import ExplainConfig, run_explain  # noqa: E402
from featuredict.pipelines.explain.clients import ChatSettings  # noqa: E402
from tests.helpers import FakeLLM  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("db", help="a featuredict database (e.g. from bench/synth_db.py); it is copied, not changed")
    ap.add_argument("--http-features", type=int, default=256, help="features explained over HTTP per latency")
    ap.add_argument("--latency", type=float, nargs="*", default=[0.0, 0.5], help="server seconds per answer")
    ap.add_argument("--concurrency", type=int, default=8)
    args = ap.parse_args(argv)

    with tempfile.TemporaryDirectory() as tmp:
        db = Path(tmp) / "bench.duckdb"
        shutil.copyfile(args.db, db)
        s = Store(db)
        sae = q.sae_ids(s)[0]
        n = q.feature_count(s, sae)
        n_ex = s.rows("SELECT count(*) FROM examples WHERE sae_id = ?", [sae])[0][0]
        s.write(lambda c: c.execute("DELETE FROM explanations"))
        t0 = time.perf_counter()
        q.sae_fingerprint(s, sae)
        fp_s = time.perf_counter() - t0
        s.close()
        print(f"database: {n:,} features, {n_ex:,} example rows; fingerprint of the decoders {fp_s:.1f}s")

        t0 = time.perf_counter()
        r = run_explain(ExplainConfig(db=str(db), all_features=True, explainer="tokens", progress=False))
        wall = time.perf_counter() - t0
        print(f"tokens explainer: {r.explained:,} features in {wall:.1f}s end to end ({r.explained / wall:,.0f}/s)")

        for latency in args.latency:
            server = FakeLLM(delay=latency)
            try:
                chat = ChatSettings(concurrency=args.concurrency, retries=0, timeout_s=30)
                t0 = time.perf_counter()
                r = run_explain(
                    ExplainConfig(
                        db=str(db),
                        features=f"0-{args.http_features - 1}",
                        explainer=f"openai:{server.url}",
                        model="test-double",
                        force=True,
                        chat=chat,
                        progress=False,
                    )
                )
                wall = time.perf_counter() - t0
            finally:
                server.close()
            print(
                f"openai: explainer, concurrency {args.concurrency}, server latency {latency:g}s: {r.explained} "
                f"features in {wall:.1f}s = {60 * r.explained / wall:,.0f} features/minute ({r.failed} failed)"
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
