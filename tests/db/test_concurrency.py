"""Many processes on one dictionary file at once: a real ``featuredict serve``, concurrent writers, every CLI
command, a writer killed mid-batch, and read-only serving (issue 19)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import duckdb
import pytest

from featuredict.db import queries as q
from featuredict.db import writes
from featuredict.db.filelock import lock_for
from featuredict.db.store import ReadOnlyError, Store
from tests.helpers import CHROMIUM, CHROMIUM_ARGS, SAE_ID, free_port, stop, wait_healthy

TINY_SAE = "tiny/model.layers.1/64"  # conftest.build_tiny_db's SAE name
FEATUREDICT = str(Path(sys.executable).with_name("featuredict"))
N_WRITERS, N_WRITES = 4, 50


@contextmanager
def serving(db: Path, *extra: str) -> Iterator[tuple[str, subprocess.Popen]]:
    """A real ``featuredict serve --db DB`` on a free local port; yields its base URL and process."""
    port = free_port()
    cmd = [FEATUREDICT, "serve", "--db", str(db), "--headless", "--port", str(port), "--address", "127.0.0.1", *extra]
    env = {**os.environ, "STREAMLIT_BROWSER_GATHER_USAGE_STATS": "false"}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(base, proc, timeout=120)
        yield base, proc
    finally:
        stop(proc)


@contextmanager
def browser_page() -> Iterator[object | None]:
    """A headless Chromium page, or None where no browser is installed (the writers' checks still run)."""
    if CHROMIUM is None:
        yield None
        return
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        yield None
        return
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            yield browser.new_page(viewport={"width": 1400, "height": 1000})
        finally:
            browser.close()


def _show_feature(page, base: str, fid: int) -> None:
    page.goto(f"{base}/feature?sae={SAE_ID}&feature={fid}", wait_until="domcontentloaded")
    page.get_by_role("heading", name=f"Feature {fid}").wait_for(timeout=60_000)
    assert not page.locator("text=Traceback").count()
    assert not page.get_by_text("locked", exact=False).count()


WRITER = """
import sys, time
from pathlib import Path
from featuredict.db.store import Store
from featuredict.db import writes
db, w, n, go = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), Path(sys.argv[4])
while not go.exists():
    time.sleep(0.01)
s = Store(db)
for i in range(n):
    kind = i % 3
    if kind == 0:  # labels: every writer on the same 10 features (a contended row; history keeps every change)
        writes.update_label(s, {sae!r}, i % 10, label=f"w{{w}}-{{i}}", author=f"writer{{w}}")
    elif kind == 1:  # reviews: a feature of its own per write
        writes.set_review(s, {sae!r}, 100 + w * n + i, "concerning", reason=f"w{{w}}-{{i}}", reviewer=f"writer{{w}}")
    else:
        writes.add_explanations(
            s, [{{"sae_id": {sae!r}, "feature": i % 10, "text": f"w{{w}}-{{i}}", "method": "import"}}], replace=False
        )
    s.rows("SELECT count(*) FROM labels")  # and reads in between, as a command does
print("done", flush=True)
"""


def _expected(kind: int) -> set[str]:
    return {f"w{w}-{i}" for w in range(N_WRITERS) for i in range(N_WRITES) if i % 3 == kind}


def test_concurrent_writers_lose_nothing_while_serve_answers_reads(synth_db: Path, tmp_path: Path):
    go = tmp_path / "go"
    code = WRITER.format(sae=SAE_ID)
    with serving(synth_db) as (base, server), browser_page() as page:
        if page is not None:
            _show_feature(page, base, 3)  # the server holds its read connection open, as a dashboard does
        procs = [
            subprocess.Popen(
                [sys.executable, "-c", code, str(synth_db), str(w), str(N_WRITES), str(go)],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            for w in range(N_WRITERS)
        ]
        go.touch()
        shown = 0
        while any(p.poll() is None for p in procs):
            if page is not None:  # the dashboard keeps answering page loads during the writes
                _show_feature(page, base, 20 + shown % 50)
                shown += 1
            else:
                time.sleep(0.2)
        results = [p.communicate(timeout=300) for p in procs]
        for p, (out, err) in zip(procs, results, strict=True):
            assert p.returncode == 0 and out.strip() == "done", err
            assert "locked" not in err
        assert server.poll() is None
        s = Store(synth_db, read_only=True)
        try:
            hist = s.df("SELECT field, new_value, author, action FROM history WHERE author LIKE 'writer%'")
            labels = {json.loads(v) for v in hist[hist.field == "label"].new_value}
            assert labels == _expected(0)  # every label change is in the history, none lost
            assert (hist.action == "set").all()
            reviews = s.df("SELECT reason FROM reviews WHERE reviewer LIKE 'writer%'")
            assert set(reviews.reason) == _expected(1)
            assert len(hist[hist.field == "review"]) == len(_expected(1))
            expl = s.df("SELECT text FROM explanations WHERE method = 'import'")
            assert sorted(expl.text) == sorted(_expected(2))  # no duplicate, none lost
            last = {f: q.label(s, SAE_ID, f)["label"] for f in range(10)}
            assert all(v in _expected(0) for v in last.values())
        finally:
            s.close()
        if page is not None:  # the open dashboard shows another process's label on its next run
            writes.update_label(Store(synth_db), SAE_ID, 7, label="written by another process")
            page.goto(f"{base}/feature?sae={SAE_ID}&feature=7", wait_until="domcontentloaded")
            page.get_by_role("heading", name="written by another process").wait_for(timeout=60_000)
        assert shown > 0 or page is None


def test_every_command_at_once(tiny_db: Path, tiny_model_dir: Path, tiny_sae_dir: Path, tiny_corpus: Path, tmp_path):
    db = Path(shutil.copyfile(tiny_db, tmp_path / "all.duckdb"))
    s = Store(db)
    writes.set_watch(s, "wl", TINY_SAE, list(range(64)), 0.05, "high")
    writes.update_label(s, TINY_SAE, 5, label="kept through it all")
    s.close()
    assert subprocess.run([FEATUREDICT, "embed", "--db", str(db)], capture_output=True, text=True).returncode == 0
    inp = tmp_path / "in.jsonl"
    inp.write_text("\n".join(json.dumps({"text": t}) for t in ("the quick brown fox", "def add(a, b): return a")))
    commands = {
        "explain": [FEATUREDICT, "explain", "--db", str(db), "--all", "--explainer", "tokens", "--force", "--no-progress"],
        "search": [FEATUREDICT, "search", "--db", str(db), "--mode", "meaning", "numbers", "and", "code", "--json"],
        "scan": [FEATUREDICT, "scan", "--db", str(db), "--sae", TINY_SAE, "--watchlist", "wl", "--input", str(inp)],
        "build": [
            FEATUREDICT, "build", "--model", str(tiny_model_dir), "--sae", str(tiny_sae_dir), "--corpus",
            str(tiny_corpus), "--db", str(db), "--name", "second", "--context-size", "16", "--max-tokens", "2000",
            "--batch-size", "4", "--no-umap", "--device", "cpu",
        ],
        "embed": [FEATUREDICT, "embed", "--db", str(db), "--sae", TINY_SAE],
        "watch": [
            FEATUREDICT, "watch", "--db", str(db), "--sae", TINY_SAE, "--watchlist", "second list", "--features",
            "1,2,3", "--severity", "critical",
        ],
    }  # fmt: skip
    with serving(db) as (base, server), browser_page() as page:
        if page is not None:
            page.goto(f"{base}/feature?sae={TINY_SAE}&feature=5", wait_until="domcontentloaded")
            page.get_by_role("heading", name="kept through it all").wait_for(timeout=60_000)
        procs = {
            k: subprocess.Popen(c, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for k, c in commands.items()
        }
        outs = {k: p.communicate(timeout=600) for k, p in procs.items()}
        for k, p in procs.items():
            assert p.returncode == 0, (k, outs[k][1])
            assert "locked" not in outs[k][1], (k, outs[k][1])
        assert server.poll() is None
        if page is not None:  # after the build swap the open dashboard lists the new SAE, without a restart
            page.goto(f"{base}/feature?sae=second&feature=1", wait_until="domcontentloaded")
            page.get_by_role("heading", name="Feature 1").wait_for(timeout=60_000)
    got = json.loads(outs["search"][0])
    assert got["mode"] == "meaning" and got["results"], got
    s = Store(db, read_only=True)
    try:
        assert set(q.sae_ids(s)) == {TINY_SAE, "second"}
        assert q.label(s, TINY_SAE, 5)["label"] == "kept through it all"
        assert q.watchlist(s, "second list", TINY_SAE)["severity"].tolist() == ["critical"] * 3
        n_tokens = s.rows("SELECT count(*) FROM explanations WHERE method = 'tokens' AND sae_id = ?", [TINY_SAE])
        assert n_tokens[0][0] == 64  # explain's rows survived the build's swap (copied as kept rows, or after)
    finally:
        s.close()


KILLED = """
import sys
from featuredict.db.store import Store
from featuredict.db import writes
db, sae = sys.argv[1], sys.argv[2]
s = Store(db)
for b in range(3):  # three whole batches
    writes.add_explanations(s, [{"sae_id": sae, "feature": f, "text": f"b{b}", "method": "import"}
                                for f in range(100)], replace=False)
def stall(cur):
    cur.execute("INSERT INTO explanations (id, sae_id, feature, text, method, created_at) "
                "SELECT 1000000 + range, ?, range % 100, 'half', 'import', now() FROM range(50)", [sae])
    print("mid-batch", flush=True)
    sys.stdin.readline()  # killed here, inside the write, holding the exclusive lock
s.write(stall)
"""


def test_a_writer_killed_mid_batch_leaves_whole_batches_and_a_free_lock(synth_db: Path, monkeypatch):
    proc = subprocess.Popen(
        [sys.executable, "-c", KILLED, str(synth_db), SAE_ID],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None and proc.stdout.readline().strip() == "mid-batch", proc.stderr
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    monkeypatch.setenv("FEATUREDICT_LOCK_TIMEOUT", "10")  # a held lock would fail this test, not hang it
    s = Store(synth_db)  # the next process: opens, reads, writes
    try:
        texts = s.df("SELECT text, count(*) AS n FROM explanations WHERE method = 'import' GROUP BY text")
        assert dict(zip(texts.text, texts.n, strict=True)) == {"b0": 100, "b1": 100, "b2": 100}
        writes.update_label(s, SAE_ID, 1, label="after the crash")
        assert q.label(s, SAE_ID, 1)["label"] == "after the crash"
    finally:
        s.close()
    with lock_for(synth_db).exclusive():  # and the lock is free
        pass


def test_read_only_serving_refuses_every_write(synth_db: Path):
    """``serve --read-only`` opens read-only: its Store refuses writes, while other processes still write."""
    ro = Store(synth_db, read_only=True)
    try:
        for attempt in (
            lambda: writes.update_label(ro, SAE_ID, 2, label="x"),
            lambda: writes.set_review(ro, SAE_ID, 2, "benign"),
            lambda: writes.add_to_list(ro, "l", SAE_ID, [2]),
            lambda: writes.set_watch(ro, "l", SAE_ID, [2], 0.5, "high"),
            lambda: writes.add_explanations(ro, [{"sae_id": SAE_ID, "feature": 2, "text": "t", "method": "import"}]),
            lambda: ro.write(lambda cur: cur.execute("DELETE FROM labels")),
        ):
            with pytest.raises(ReadOnlyError, match="open read-only"):
                attempt()
        with pytest.raises(duckdb.Error), ro.reading() as cur:  # its own connection is read-only too
            cur.execute("DELETE FROM labels")
    finally:
        ro.close()
    with serving(synth_db, "--read-only") as (base, server), browser_page() as page:
        # another process writes while the read-only server is up: the server does not block it
        out = subprocess.run(
            [sys.executable, "-c", WRITER.format(sae=SAE_ID), str(synth_db), "0", "3", str(synth_db)],
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert out.returncode == 0, out.stderr
        if page is not None:
            page.goto(f"{base}/feature?sae={SAE_ID}&feature=0", wait_until="domcontentloaded")
            page.get_by_role("heading", name="w0-0").wait_for(timeout=60_000)  # it sees the other write
            page.get_by_text("Read-only server", exact=False).first.wait_for(timeout=60_000)
        assert server.poll() is None


def test_a_command_that_waits_too_long_gives_one_line_and_exit_code_2(synth_db: Path):
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time\nfrom featuredict.db.filelock import lock_for\n"
            "with lock_for(sys.argv[1]).exclusive():\n    print('held', flush=True)\n    time.sleep(120)\n",
            str(synth_db),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        out = subprocess.run(
            [FEATUREDICT, "search", "--db", str(synth_db), "--mode", "text", "the"],
            capture_output=True,
            text=True,
            timeout=300,
            env={**os.environ, "FEATUREDICT_LOCK_TIMEOUT": "2"},
        )
    finally:
        holder.kill()
        holder.wait()
    lines = out.stderr.strip().splitlines()
    assert out.returncode == 2, out.stderr
    assert lines[0].startswith("featuredict: waiting for another process writing it on ")  # the one waiting line
    assert len(lines) == 2 and "gave up after 2 s waiting for another process writing it" in lines[1], lines
    assert "Traceback" not in out.stderr
