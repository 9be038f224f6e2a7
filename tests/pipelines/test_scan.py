"""``featuredict scan``: watchlist settings, record reading (txt / jsonl / chat / parquet, bad records), scan
results against a fresh ``Runtime.encode`` run on the tiny model, exit codes, and reports that keep hostile
text as text."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from featuredict.db import queries as q
from featuredict.db import writes
from featuredict.db.store import Store
from featuredict.pipelines.cli import main as cli_main
from featuredict.pipelines.scan import BadRecord, Record, Watch, read_records, scan_text
from tests.helpers import HOSTILE_IMG, HOSTILE_SCRIPT, SAE_ID, assert_clean, htmls, open_app, press, widget

TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "Send your bank password to claim the prize now!",
    "def add(a, b): return a + b",
]


def _watch_all(db: Path, threshold: float = 0.05, severity: str = "high", features=range(64)) -> None:
    s = Store(db)
    try:
        writes.set_watch(s, "wl", SAE_ID, list(features), threshold, severity)
    finally:
        s.close()


def test_watch_settings_defaults_and_validation(model_db):
    s = Store(model_db)
    try:
        writes.add_to_list(s, "wl", SAE_ID, [1, 2])
        writes.set_watch(s, "wl", SAE_ID, [2, 3], 0.3, "critical")
        wl = q.watchlist(s, "wl", SAE_ID)
        assert wl["feature"].tolist() == [1, 2, 3]
        assert wl["threshold"].round(3).tolist() == [q.DEFAULT_THRESHOLD, 0.3, 0.3]
        assert wl["severity"].tolist() == [q.DEFAULT_SEVERITY, "critical", "critical"]
        with pytest.raises(ValueError, match="severity must be one of"):
            writes.set_watch(s, "wl", SAE_ID, [1], 0.5, "urgent")
        with pytest.raises(ValueError, match="threshold"):
            writes.set_watch(s, "wl", SAE_ID, [1], float("nan"), "low")
        writes.rename_list(s, "wl", "wl2")
        assert q.watchlist(s, "wl2", SAE_ID)["severity"].tolist() == [q.DEFAULT_SEVERITY, "critical", "critical"]
        writes.remove_from_list(s, "wl2", SAE_ID, 3)
        writes.add_to_list(s, "wl2", SAE_ID, [3])  # re-added: the old settings are gone
        assert q.watchlist(s, "wl2", SAE_ID)["severity"].tolist()[-1] == q.DEFAULT_SEVERITY
    finally:
        s.close()


def test_read_records_reports_bad_lines(tmp_path):
    p = tmp_path / "in.jsonl"
    p.write_text(
        "\n".join(
            [
                json.dumps({"text": "fine"}),
                "{not json",
                json.dumps({"other": "x"}),
                json.dumps({"text": "   "}),
                json.dumps({"text": 5}),
                json.dumps([1, 2]),
                "",
                json.dumps({"messages": [{"role": "user", "content": "hi"}]}),
            ]
        )
    )
    got = list(read_records(p))
    assert got[0] == Record(1, "fine")
    bad = {r.line: r.reason for r in got if isinstance(r, BadRecord)}
    assert bad[2].startswith("invalid JSON") and "missing field 'text'" in bad[3] and bad[4] == "empty text"
    assert "not a string" in bad[5] and bad[6] == "not a JSON object" and "chat template" in bad[8]

    class ChatTok:  # a tokenizer with a chat template
        chat_template = "x"

        def apply_chat_template(self, messages, tokenize=False):
            return "".join(f"<{m['role']}>{m['content']}" for m in messages)

    assert list(read_records(p, tokenizer=ChatTok()))[-1] == Record(8, "<user>hi")
    t = tmp_path / "in.txt"
    t.write_text("a\n\nb\n")
    assert list(read_records(t)) == [Record(1, "a"), Record(3, "b")]
    pq.write_table(pa.table({"text": ["x", None, ""]}), tmp_path / "in.parquet")
    got = list(read_records(tmp_path / "in.parquet"))
    assert got[0] == Record(1, "x") and isinstance(got[1], BadRecord) and got[2] == BadRecord(3, "empty text")
    with pytest.raises(ValueError, match="use a .txt"):
        list(read_records(tmp_path / "in.csv"))


def test_scan_matches_a_fresh_run(model_db, tiny_runtime):
    _watch_all(model_db, threshold=0.05)
    s = Store(model_db, read_only=True)
    wl = q.watchlist(s, "wl", SAE_ID)
    s.close()
    watch = Watch.from_frame(wl)
    n_hits = 0
    for text in TEXTS:
        res = scan_text(tiny_runtime, text, watch)
        ids = tiny_runtime.tokenize(text)
        _, f, valid = tiny_runtime.encode(ids)
        a = f[0].float().numpy()
        ok = valid[0].numpy().astype(bool)
        expect = {}
        for feat, thr, mx in zip(wl["feature"], wl["threshold"], wl["max_act"], strict=True):
            over = ok & (a[:, feat] > 0) & (a[:, feat] >= thr * mx)
            if over.any():
                expect[int(feat)] = (float(a[ok, feat].max()), np.flatnonzero(over).tolist())
        got = {h["feature"]: h for h in res.hits}
        assert set(got) == set(expect)
        for feat, (mx, pos) in expect.items():
            assert got[feat]["max_act"] == pytest.approx(mx, rel=1e-5)
            covered = [i for sp in got[feat]["spans"] for i in range(sp["start"], sp["end"])]
            assert covered == pos
        n_hits += len(got)
    assert n_hits > 0  # the check compared something


def test_cli_exit_codes_report_and_bad_records(model_db, tmp_path, capsys):
    _watch_all(model_db, threshold=0.05, severity="high")
    inp = tmp_path / "in.jsonl"
    hostile = f"{HOSTILE_SCRIPT} {HOSTILE_IMG} the quick brown fox"
    inp.write_text(json.dumps({"text": TEXTS[0]}) + "\n{bad\n" + json.dumps({"text": hostile}) + "\n")
    out = tmp_path / "report.jsonl"
    base = ["scan", "--db", str(model_db), "--sae", SAE_ID, "--watchlist", "wl", "--input", str(inp)]
    assert cli_main([*base, "--out", str(out), "--fail-on", "high"]) == 1
    err = capsys.readouterr().err
    assert "line 2: invalid JSON" in err and "2 records scanned" in err
    lines = [json.loads(x) for x in out.read_text().splitlines()]
    assert [r["line"] for r in lines] == [1, 3] and lines[0]["severity"] == "high" and lines[0]["hits"]
    assert cli_main([*base, "--out", str(out), "--fail-on", "critical"]) == 0
    assert cli_main(base) == 0  # no --fail-on: report only (stdout)
    rep = tmp_path / "report.html"
    assert cli_main([*base, "--out", str(rep)]) == 0
    body = rep.read_text()
    assert "<script" not in body and "<img" not in body  # hostile transcript text stays text
    assert "&lt;" in body  # the hostile record's '<' tokens are in spans, escaped
    assert cli_main([*base[:-1], str(tmp_path / "missing.jsonl")]) == 2
    assert cli_main(["scan", "--db", str(model_db), "--sae", SAE_ID, "--watchlist", "nope", "--input", str(inp)]) == 2


def test_scan_page_results_highlight_and_export(monkeypatch, model_db, tiny_runtime):
    _watch_all(model_db, threshold=0.05, severity="critical", features=range(0, 64, 2))
    s = Store(model_db)
    watch = Watch.from_frame(q.watchlist(s, "wl", SAE_ID))
    s.close()
    at = open_app(monkeypatch, model_db, "scan", sae=SAE_ID, list="wl")
    assert_clean(at)
    assert widget(at.selectbox, "Watchlist").value == "wl"
    hostile = f"{HOSTILE_SCRIPT} {HOSTILE_IMG} the quick brown fox"
    widget(at.text_area, "Text to scan (one record)").set_value(hostile)
    press(at, "Scan")
    table = at.dataframe[0].value
    expect = scan_text(tiny_runtime, hostile, watch)
    assert table["feature"].tolist() == [h["feature"] for h in expect.hits] and len(table) > 0
    assert set(table["severity"]) == {"critical"}
    body = htmls(at)
    assert "<script" not in body and "<img" not in body and "&lt;" in body
    assert f"feature?sae={SAE_ID}&amp;feature={expect.hits[0]['feature']}" in body  # highlighted tokens link
    assert [b.label for b in at.get("download_button")] == ["Export CSV", "Export JSON"]


def test_watch_cli_sets_members(model_db, capsys):
    base = ["watch", "--db", str(model_db), "--sae", SAE_ID, "--watchlist", "w2"]
    assert cli_main([*base, "--features", "3, 4", "--threshold", "0.25", "--severity", "critical"]) == 0
    s = Store(model_db)
    wl = q.watchlist(s, "w2", SAE_ID)
    s.close()
    assert wl["feature"].tolist() == [3, 4] and set(wl["severity"]) == {"critical"}
    assert wl["threshold"].round(3).tolist() == [0.25, 0.25]
    assert cli_main([*base, "--features", "x"]) == 2
    assert cli_main([*base, "--features", "999"]) == 2  # not a feature of the SAE
    assert "has no feature 999" in capsys.readouterr().err


def test_scan_cli_one_line_errors(synth_db, tmp_path, capsys):
    """The synthetic SAE row points at no loadable model: one line and exit 2, no traceback."""
    s = Store(synth_db)
    writes.add_to_list(s, "wl", SAE_ID, [1])
    s.close()
    inp = tmp_path / "in.txt"
    inp.write_text("hello\n")
    base = ["scan", "--db", str(synth_db), "--sae", SAE_ID, "--watchlist", "wl", "--input", str(inp)]
    assert cli_main(base) == 2
    err = capsys.readouterr().err
    assert "cannot load the model and SAE" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert cli_main([*base, "--out", str(tmp_path / "r.csv")]) == 2
    assert cli_main([*base[:2], str(tmp_path / "none.duckdb"), *base[3:]]) == 2
