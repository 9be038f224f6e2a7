"""Peak memory of ``featuredict scan`` against the number of records: it must stay flat (records stream).

    python bench/bench_scan_memory.py --db ~/.cache/featuredict/demo/smollm2-demo.duckdb \
        --input ../shared/corpora/web_sample_133KB.txt --records 1000,10000

For each record count, a fresh Python process runs the real ``featuredict scan`` CLI (every live feature
watched at 0.5 x its max activation, a .jsonl report written to a file) over a .jsonl of that many records
(the input's lines, cycled) on a copy of the database, and reports its peak resident memory
(``ru_maxrss``). Prints one JSON line: records, seconds and peak MiB per count, and the ratio of the largest
count's peak to the smallest's (flat = about 1.0).
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def child(argv: list[str]) -> None:
    from featuredict.pipelines.cli import main

    rc = main(argv)
    print(json.dumps({"rc": rc, "peak_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        child(sys.argv[2:])
        return
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--db", required=True)
    ap.add_argument("--sae", default=None, help="SAE id (default: the first)")
    ap.add_argument("--input", required=True, help=".txt, one record per non-empty line")
    ap.add_argument("--records", default="1000,10000", help="record counts, comma-separated")
    ap.add_argument("--max-tokens", type=int, default=64, help="tokens scanned per record")
    args = ap.parse_args()
    sys.path.insert(0, str(Path(__file__).parent))
    from bench_train import cpu_model

    from featuredict.db.store import Store

    lines = [ln.strip() for ln in Path(args.input).read_text(encoding="utf-8").splitlines() if ln.strip()]
    out: dict = {"cpu": cpu_model(), "max_tokens": args.max_tokens, "runs": []}
    with tempfile.TemporaryDirectory() as tmp:
        db = Path(tmp) / "scan.duckdb"
        shutil.copy(args.db, db)
        store = Store(str(db))
        sae = args.sae or str(store.df("SELECT sae_id FROM saes ORDER BY sae_id")["sae_id"][0])
        live = store.df("SELECT feature FROM features WHERE sae_id = ? AND max_act > 0", [sae])["feature"]
        store.close()
        feats = ",".join(str(int(f)) for f in live)
        cli = [sys.executable, __file__, "--child"]
        subprocess.run(
            [*cli, "watch", "--db", str(db), "--sae", sae, "--watchlist", "all", "--features", feats,
             "--threshold", "0.5", "--severity", "low"],
            check=True, stdout=subprocess.DEVNULL,
        )  # fmt: skip
        out["watched"] = len(live)
        for n in sorted(int(x) for x in args.records.split(",")):
            src = Path(tmp) / f"records_{n}.jsonl"
            with src.open("w", encoding="utf-8") as fh:
                for i in range(n):
                    fh.write(json.dumps({"text": lines[i % len(lines)]}) + "\n")
            t0 = time.perf_counter()
            r = subprocess.run(
                [*cli, "scan", "--db", str(db), "--sae", sae, "--watchlist", "all", "--input", str(src),
                 "--out", str(Path(tmp) / f"report_{n}.jsonl"), "--max-tokens", str(args.max_tokens)],
                check=True, capture_output=True, text=True,
            )  # fmt: skip
            res = json.loads(r.stdout.strip().splitlines()[-1])
            out["runs"].append({"records": n, "seconds": round(time.perf_counter() - t0, 1),
                                "peak_mib": round(res["peak_mib"], 1)})  # fmt: skip
    out["peak_ratio"] = round(out["runs"][-1]["peak_mib"] / out["runs"][0]["peak_mib"], 3)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
