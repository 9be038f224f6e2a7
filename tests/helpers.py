"""Helpers and constants the tests share; the fixtures live in conftest.py.

Tiny model + SAE builders (no network, no ../shared), the SYNTHETIC dashboard databases (bench/synth_db.py) with
hostile content, Streamlit AppTest and real-browser helpers, the SAE variants of the steering tests, the tiny
steering database, and the localhost chat-completions test double of the explain tests. Import by name:
``from tests.helpers import ROOT, make_synth_db``.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import TYPE_CHECKING

import duckdb
import pytest
import torch

if TYPE_CHECKING:
    from streamlit.testing.v1 import AppTest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # bench/ (synth_db) is imported from the repository root
    sys.path.insert(0, str(ROOT))

from bench.synth_db import SAE_ID, build_synthetic_db  # noqa: E402

# ---- ../shared: the real offline models and corpora ---------------------------------------------------------
SHARED = ROOT.parent / "shared"
STORIES_MODEL = SHARED / "models" / "stories260K"
TINYSTORIES = SHARED / "corpora" / "tinystories_train_sample_2MB.txt"
WEB_SAMPLE = SHARED / "corpora" / "web_sample_133KB.txt"


def require_shared(path: Path) -> Path:
    if not path.exists():
        pytest.skip(f"{path} is absent (../shared holds the real offline models and corpora)")
    return path


# ---- the tiny model + SAE and the database the real pipeline builds from them ------------------------------
TINY_TEXT = [
    "Once upon a time there was a little cat who liked to play in the garden.",
    "The stock market fell sharply today after the central bank raised interest rates.",
    "To bake bread, mix flour, water, salt and yeast, then let the dough rise for an hour.",
    "The assistant said it would never lie to the user, but it hid the truth about the error.",
    "Photosynthesis converts light energy into chemical energy stored in glucose molecules.",
    "def add(a, b):\n    return a + b\n\nprint(add(2, 3))",
    "She walked to the river, sat on a rock, and watched the boats drift slowly by.",
    "Never share your password with anyone who emails you asking for it urgently.",
]

TINY_HOOK = "model.layers.1"


def make_tiny_model(folder: Path, seed: int = 0) -> Path:
    """Write a tiny random Llama + trained byte-level BPE tokenizer as a Hugging Face folder."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    folder.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<s>", "</s>", "<pad>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(TINY_TEXT * 4, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    fast.save_pretrained(folder)
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=len(fast),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        bos_token_id=fast.bos_token_id,
        eos_token_id=fast.eos_token_id,
        pad_token_id=fast.pad_token_id,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(cfg)
    with torch.no_grad():  # larger-than-default weights so the random model is not near-uniform
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.2)
    model.save_pretrained(folder)
    return folder


def make_tiny_sae(
    folder: Path,
    model_dir: Path | str,
    d_in: int = 32,
    d_sae: int = 64,
    k: int = 4,
    seed: int = 0,
    hook: str = TINY_HOOK,
    context_size: int = 32,
) -> Path:
    """Write a random sae-lens TopK SAE (on ``hook`` of the tiny model unless told otherwise)."""
    from sae_lens import TopKSAE, TopKSAEConfig
    from sae_lens.saes.sae import SAEMetadata

    torch.manual_seed(seed)
    cfg = TopKSAEConfig(
        d_in=d_in,
        d_sae=d_sae,
        k=k,
        metadata=SAEMetadata(
            model_name=str(model_dir),
            model_class_name="AutoModelForCausalLM",
            hook_name=hook,
            context_size=context_size,
            prepend_bos=True,
            model_from_pretrained_kwargs={},
        ),
    )
    sae = TopKSAE(cfg)
    with torch.no_grad():
        sae.W_dec.normal_(0, 1.0 / d_in**0.5)
        sae.W_enc.copy_(sae.W_dec.T * 2.0)
        sae.b_enc.zero_()
    sae.save_model(folder)
    return folder


def tiny_train_config(model: Path, corpus: Path, out: Path, **kw):
    """The ``TrainConfig`` of a small TopK SAE (64 features, k 4) on layer 1 of ``model`` (CPU); ``kw`` overrides."""
    from featuredict.pipelines.harvest.corpus import CorpusSpec
    from featuredict.pipelines.train.sae import TrainConfig

    base = dict(hook="model.layers.1", d_sae=64, k=4, training_tokens=4096, context_size=32, device="cpu")
    return TrainConfig(model=str(model), corpus=CorpusSpec(str(corpus)), out=str(out), **{**base, **kw})


def tiny_build_config(path: Path, model_dir: Path, sae_dir: Path, corpus: Path, **kw):
    """The ``BuildConfig`` of the tiny model + SAE on ``corpus`` into ``path`` (CPU, small batches); ``kw`` overrides."""
    from featuredict.pipelines.harvest.config import BuildConfig
    from featuredict.pipelines.harvest.corpus import CorpusSpec
    from featuredict.pipelines.harvest.state import HarvestConfig
    from featuredict.pipelines.model.saes import SaeSource

    return BuildConfig(
        model=str(model_dir),
        sae=SaeSource(kind="folder", path=str(sae_dir)),
        corpus=CorpusSpec(str(corpus)),
        db=str(path),
        sae_name=kw.pop("sae_name", "tiny/model.layers.1/64"),
        context_size=kw.pop("context_size", 16),
        max_tokens=kw.pop("max_tokens", 5_000),
        batch_size=4,
        harvest=kw.pop("harvest", HarvestConfig(top_k=5, samples_per_band=3)),
        device="cpu",
        progress=False,
        **kw,
    )


def tiny_build_argv(db: Path, model_dir: Path, sae_dir: Path, corpus: Path, *extra: str) -> list[str]:
    """The ``featuredict build`` arguments of the tiny model + SAE on ``corpus`` into ``db``, then ``extra``."""
    return ["build", "--model", str(model_dir), "--sae", str(sae_dir), "--corpus", str(corpus), "--db", str(db), *extra]


def build_tiny_db(path: Path, model_dir: Path, sae_dir: Path, corpus: Path, **kw) -> Path:
    """Build a real database with the full pipeline from the tiny model + SAE (no network, ~seconds)."""
    from featuredict.pipelines.harvest.build import build

    build(tiny_build_config(path, model_dir, sae_dir, corpus, **kw))
    return path


# ---- threads ---------------------------------------------------------------------------------------------
def run_threads(worker, n: int) -> None:
    """Start ``worker(t)`` for t in 0..n-1 on n threads at once and wait for all of them."""
    threads = [threading.Thread(target=worker, args=(t,)) for t in range(n)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()


# ---- SYNTHETIC dashboard databases (bench/synth_db.py) --------------------------------------------------
APP = str(ROOT / "dashboard" / "app.py")
HOSTILE_SCRIPT = "<script>alert(1)</script>"
HOSTILE_IMG = "<img src=x onerror=alert(1)>"
HOSTILE_FEATURE = 1


def make_synth_db(path: Path, n_features: int = 300, **kw) -> Path:
    """A small synthetic database (labelled synthetic: sae_id 'synthetic')."""
    return build_synthetic_db(path, n_features=n_features, **kw)


def inject_hostile(path: Path, feature: int = HOSTILE_FEATURE) -> None:
    """Put script/img-onerror strings into a feature's top contexts, search text, max tokens, logit tokens,
    label, tags and notes, and into a list name."""
    con = duckdb.connect(str(path))
    try:
        con.execute(
            """UPDATE examples SET tokens = list_concat(tokens[1:max_pos], [?], tokens[max_pos + 2:])
               WHERE sae_id = ? AND feature = ? AND kind = 'top'""",
            [HOSTILE_SCRIPT, SAE_ID, feature],
        )
        con.execute(
            """UPDATE examples SET tokens = list_concat(tokens[1:max_pos - 1], [?], tokens[max_pos + 1:])
               WHERE sae_id = ? AND feature = ? AND kind = 'top'""",
            [HOSTILE_IMG, SAE_ID, feature],
        )
        con.execute(
            """UPDATE features SET search_text = ? || ' ' || ? || ' ' || search_text,
                   max_tokens = list_concat([?], max_tokens[2:]), pos_tokens = list_concat([?], pos_tokens[2:])
               WHERE sae_id = ? AND feature = ?""",
            [HOSTILE_SCRIPT, HOSTILE_IMG, HOSTILE_SCRIPT, HOSTILE_IMG, SAE_ID, feature],
        )
        con.execute("DELETE FROM labels WHERE sae_id = ? AND feature = ?", [SAE_ID, feature])
        con.execute(
            "INSERT INTO labels VALUES (?, ?, ?, [?], ?, ?, now())",
            [SAE_ID, feature, f"evil {HOSTILE_SCRIPT}", HOSTILE_IMG, f"note {HOSTILE_IMG}", HOSTILE_SCRIPT],
        )
        con.execute(
            "INSERT INTO lists VALUES (?, ?, ?, ?, now())", [f"list {HOSTILE_SCRIPT}", SAE_ID, feature, HOSTILE_IMG]
        )
    finally:
        con.close()


def point_at_tiny_model(path: Path, model_dir: Path, sae_dir: Path, d_in: int = 32) -> None:
    """Make the synthetic SAE row reload the tiny test model + SAE (64 features, hook model.layers.1)."""
    con = duckdb.connect(str(path))
    try:
        con.execute(
            """UPDATE saes SET model_spec = ?, model_name = 'tiny test model (random weights)', sae_source = ?,
                   hook_name = ?, hook_kind = 'hf_module', d_in = ?, context_size = 32, prepend_bos = true
               WHERE sae_id = ?""",
            [
                str(model_dir),
                json.dumps({"kind": "folder", "path": str(sae_dir), "release": None, "sae_id": None}),
                TINY_HOOK,
                d_in,
                SAE_ID,
            ],
        )
    finally:
        con.close()


@contextmanager
def read_only(path: Path | str) -> Iterator[duckdb.DuckDBPyConnection]:
    """A read-only DuckDB connection to ``path`` for a test's checks, closed however the block ends."""
    con = duckdb.connect(str(path), read_only=True)
    try:
        yield con
    finally:
        con.close()


@contextmanager
def raw_connection(path: Path) -> Iterator[duckdb.DuckDBPyConnection]:
    """A plain read-write DuckDB connection to ``path`` taken the way featuredict writers take one (under the
    file's exclusive lock): a Store of this process closes its read connection first, and reopens after."""
    from featuredict.db.filelock import lock_for

    with lock_for(path).exclusive():
        con = duckdb.connect(str(path))
        try:
            yield con
        finally:
            con.close()


def copy_db(src: Path, dst: Path) -> Path:
    shutil.copyfile(src, dst)
    return dst


# ---- Streamlit AppTest ------------------------------------------------------------------------------------
def open_app(monkeypatch, db, page: str | None = None, **params: str) -> AppTest:
    """Run app.py on ``db``; then (optionally) switch to ``views/<page>.py`` with query ``params``."""
    from streamlit.testing.v1 import AppTest

    monkeypatch.setenv("FEATUREDICT_DB", str(db))
    at = AppTest.from_file(APP, default_timeout=90)
    at.run()
    if page:
        for k, v in params.items():
            at.query_params[k] = v
        at.switch_page(f"views/{page}.py")
        at.run()
    return at


def assert_clean(at: AppTest) -> None:
    """No uncaught exception (traceback) on the page."""
    assert not at.exception, [e.message for e in at.exception]


def htmls(at: AppTest) -> str:
    return "\n".join(h.value for h in at.get("html"))


def texts(at: AppTest) -> str:
    """All markdown / caption / title / error text of the page."""
    parts = [m.value for m in at.markdown] + [c.value for c in at.caption] + [t.value for t in at.title]
    parts += [e.value for e in at.error] + [w.value for w in at.warning] + [i.value for i in at.info]
    return "\n".join(parts)


def frame(at: AppTest, key: str):
    """The dataframe shown under widget ``key`` (dataframes with on_select carry their key in the id)."""
    for d in at.dataframe:
        if key in (d.proto.id or ""):
            return d.value
    raise AssertionError(f"no dataframe {key!r}")


def widget(items, label: str):
    for w in items:
        if w.label == label:
            return w
    raise AssertionError(f"no widget labelled {label!r}: {[w.label for w in items]}")


def press(at: AppTest, label: str) -> None:
    """Click the button labelled ``label``, rerun the page and check it ran clean (no exception, no traceback)."""
    widget(at.button, label).click()
    at.run()
    assert_clean(at)


# ---- real-browser tests -----------------------------------------------------------------------------------
CHROMIUM = next(
    (
        p
        for p in ("/usr/bin/chromium", "/usr/bin/chromium-browser", shutil.which("chromium") or "")
        if p and Path(p).exists()
    ),
    None,
)
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
SCREENS = Path("/tmp/fd/screens")  # screenshots are copied here for humans


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_healthy(base: str, proc: subprocess.Popen, timeout: float = 60) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"streamlit exited with {proc.returncode}: {proc.stdout.read() if proc.stdout else ''}")
        try:
            with urllib.request.urlopen(f"{base}/_stcore/health", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.3)
    raise TimeoutError("streamlit did not become healthy")


@contextmanager
def running_app(db: Path, *streamlit_args: str) -> Iterator[str]:
    """``streamlit run dashboard/app.py -- --db DB`` on a free local port; yields its base URL, stops it after."""
    port = free_port()
    env = {**os.environ, "STREAMLIT_BROWSER_GATHER_USAGE_STATS": "false"}
    cmd = [sys.executable, "-m", "streamlit", "run", APP, "--server.headless", "true", "--server.port", str(port)]
    cmd += ["--server.address", "127.0.0.1", *streamlit_args, "--", "--db", str(db)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=ROOT)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(base, proc)
        yield base
    finally:
        stop(proc)


def stop(proc: subprocess.Popen) -> None:
    """SIGTERM, then SIGKILL after 10 s."""
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def screenshot(page, tmp_path: Path, name: str) -> Path:
    """Full-page screenshot into the test's tmp dir, copied to SCREENS when that is writable."""
    p = tmp_path / f"{name}.png"
    page.screenshot(path=str(p), full_page=True)
    try:
        SCREENS.mkdir(parents=True, exist_ok=True)
        shutil.copy(p, SCREENS / p.name)
    except OSError:
        pass
    return p


def wait_until_idle(page, timeout_ms: int = 60_000) -> None:
    """Wait until the app has finished its current run (Streamlit's "Running..." status is gone). A click
    that lands while a rerun is still going can make Streamlit's frontend send every number_input back at its
    default (streamlit/streamlit#9056): the test waits, as a user sees the status and waits."""
    from playwright.sync_api import TimeoutError as PlaywrightTimeout

    status = page.locator("[data-testid='stStatusWidget']")
    try:  # the rerun the last input started has begun (on a loaded machine that can take a while)
        status.wait_for(state="attached", timeout=3_000)
    except PlaywrightTimeout:  # the run was over before we looked
        pass
    status.wait_for(state="detached", timeout=timeout_ms)


# ---- steering: SAE variants and the tiny steering database --------------------------------------------
SAE_KINDS = ["topk_rescale", "topk", "constant_norm_rescale", "layer_norm", "jumprelu"]


def natural_max_acts(rt) -> dict[int, float]:
    """features.max_act as a build computes it: the max activation over a small corpus (BOS excluded)."""
    mx = torch.zeros(rt.d_sae)
    for text in TINY_TEXT:
        mx = torch.maximum(mx, rt.feature_acts(rt.tokenize(text))[0].amax(0))
    return {i: float(v) for i, v in enumerate(mx)}


def assert_recorded_acts_are_the_steered_run(rt, res, edits, feature: int, max_acts=None) -> None:
    """A generation's recorded activations of ``feature`` (before and after the edit) equal one forward pass of the
    whole steered sequence with the same edits at the hook, BOS left alone."""
    from featuredict.pipelines.steering import EditPlan, steer_activations

    full = torch.tensor([res.prompt_ids + res.token_ids])
    plan = EditPlan.build(rt.sae, edits, max_acts)
    mask = torch.ones_like(full, dtype=torch.bool)
    mask[0, 0] = False  # BOS
    before, after = [], []

    def fn(a: torch.Tensor) -> torch.Tensor:
        new, _ = steer_activations(rt.sae, a, plan, mask)
        before.append(rt.sae.encode(a)[0, :, feature])
        after.append(rt.sae.encode(new)[0, :, feature])
        return new

    rt.site.logits(full, fn=fn)
    n = len(res.prompt_ids)
    torch.testing.assert_close(res.acts_before[:, 0], before[0][n:], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(res.acts_after[:, 0], after[0][n:], atol=1e-4, rtol=1e-4)


def make_sae(kind: str, d_in: int = 24, d_sae: int = 48, seed: int = 0):
    """Random sae-lens SAEs covering the decode variants: TopK with rescale_acts_by_decoder_norm and
    non-unit decoder norms, Standard with constant_norm_rescale / layer_norm, JumpReLU."""
    from sae_lens import (
        JumpReLUSAE,
        JumpReLUSAEConfig,
        StandardSAE,
        StandardSAEConfig,
        TopKSAE,
        TopKSAEConfig,
    )

    torch.manual_seed(seed)
    if kind == "topk_rescale":
        sae = TopKSAE(TopKSAEConfig(d_in=d_in, d_sae=d_sae, k=6, rescale_acts_by_decoder_norm=True))
    elif kind == "topk":
        sae = TopKSAE(TopKSAEConfig(d_in=d_in, d_sae=d_sae, k=6))
    elif kind in ("constant_norm_rescale", "layer_norm"):
        sae = StandardSAE(StandardSAEConfig(d_in=d_in, d_sae=d_sae, normalize_activations=kind))
    elif kind == "jumprelu":
        sae = JumpReLUSAE(JumpReLUSAEConfig(d_in=d_in, d_sae=d_sae))
    else:
        raise ValueError(kind)
    with torch.no_grad():
        # decoder rows with norms far from 1 (0.1 .. 3), so a missed rescale shows
        sae.W_dec.copy_(torch.randn(d_sae, d_in) * torch.linspace(0.1, 3.0, d_sae).unsqueeze(1) / d_in**0.5)
        sae.W_enc.copy_(torch.randn(d_in, d_sae) / d_in**0.5)
        sae.b_dec.copy_(torch.randn(d_in) * 0.3)
        if hasattr(sae, "b_enc"):
            sae.b_enc.copy_(torch.rand(d_sae) * 0.2)
        if hasattr(sae, "threshold"):
            sae.threshold.fill_(0.05)
    sae.eval()
    return sae


def decode_after_encode(sae, x, f):
    """``sae.decode(f)`` for input ``x``: sae-lens' normalising decode needs the preceding encode's state."""
    sae.encode(x)
    return sae.decode(f)


STEER_SAE_ID = "tiny-l1"  # the SAE of the tiny steering database (build_steer_db)


def build_steer_db(path: Path, rt, model_dir: Path, sae_dir: Path) -> Path:
    """A featuredict DuckDB with one SAE row and one row per feature, statistics measured on TINY_TEXT."""
    from featuredict.db.schema import create_schema
    from featuredict.pipelines.model.saes import SaeSource

    acts = [rt.feature_acts(rt.tokenize(t))[0, 1:] for t in TINY_TEXT]  # [pos, d_sae], BOS dropped
    f = torch.cat(acts)
    n_tok = f.shape[0]
    wu = rt.backend.model.lm_head.weight.detach()
    con = duckdb.connect(str(path))
    create_schema(con)
    con.execute(
        "INSERT INTO saes (sae_id, model_spec, model_name, model_kwargs, dtype, sae_source, hook_name, hook_kind, "
        "architecture, d_in, d_sae, context_size, prepend_bos, corpus, n_tokens, n_contexts, hist_edges, built_at) "
        "VALUES (?, ?, 'tiny', '{}', 'float32', ?, ?, 'hf_module', 'topk', 32, ?, 32, true, 'TINY_TEXT', ?, ?, ?, ?)",
        [
            STEER_SAE_ID,
            str(model_dir),
            SaeSource(kind="folder", path=str(sae_dir)).to_json(),
            TINY_HOOK,
            rt.d_sae,
            n_tok,
            len(TINY_TEXT),
            [0.01, 0.1, 1.0, 10.0],
            datetime.now(),
        ],
    )
    for i in range(rt.d_sae):
        col = f[:, i]
        fire = int((col > 0).sum())
        dec = rt.sae.W_dec[i].detach()
        top = torch.topk(wu @ dec, 3).indices.tolist()
        con.execute(
            "INSERT INTO features (sae_id, feature, max_act, fire_count, density, mean_act, dead, hist_counts, "
            "pos_tokens, decoder, decoder_norm, search_text) VALUES (?, ?, ?, ?, ?, ?, ?, [], ?, ?, ?, ?)",
            [
                STEER_SAE_ID,
                i,
                float(col.max()),
                fire,
                fire / n_tok,
                float(col[col > 0].mean()) if fire else None,
                fire == 0,
                rt.token_strings(top),
                dec.tolist(),
                float(dec.norm()),
                f"feature {i}",
            ],
        )
    con.execute("INSERT INTO labels VALUES (?, 3, 'bread and baking', [], '', 'test', now())", [STEER_SAE_ID])
    con.close()
    return path


def live_feature(path: Path, rank: int = 0) -> int:
    with read_only(path) as con:
        return int(con.execute("SELECT feature FROM features WHERE NOT dead ORDER BY max_act DESC").fetchall()[rank][0])


# ---- explain: the localhost chat-completions test double ---------------------------------------------
def judge_keywords(explanation: str) -> list[str]:
    quoted = re.findall(r'"([^"]+)"', explanation)
    words = quoted or re.findall(r"[a-z]{4,}", explanation.lower())
    return [w.strip().lower() for w in words if w.strip()]


class FakeLLM:
    """A localhost chat-completions server (test double, not a model). ``faults`` maps a word to a failure
    mode for every request whose prompt contains it: '500', '429', 'timeout', 'malformed', 'empty', 'nochoices',
    'flaky' (the first two tries fail with 500, then a good answer), '401'."""

    def __init__(self, faults: dict[str, str] | None = None, delay: float = 0.0):
        self.faults = dict(faults or {})
        self.delay = delay
        self.hits: Counter[str] = Counter()
        self.requests = 0
        self.auth: list[str | None] = []
        self.lock = threading.Lock()
        llm = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a: object) -> None:
                pass

            def do_POST(self) -> None:  # noqa: N802
                try:
                    body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                    llm.serve(self, body)
                except (BrokenPipeError, ConnectionResetError):
                    pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def _send(self, h: BaseHTTPRequestHandler, code: int, payload: bytes, headers: dict | None = None) -> None:
        h.send_response(code)
        h.send_header("Content-Type", "application/json")
        h.send_header("Content-Length", str(len(payload)))
        for k, v in (headers or {}).items():
            h.send_header(k, v)
        h.end_headers()
        h.wfile.write(payload)

    def _answer(self, h: BaseHTTPRequestHandler, content: str | None) -> None:
        msg = {"choices": [{"message": {"role": "assistant", "content": content}}], "usage": {"total_tokens": 10}}
        self._send(h, 200, json.dumps(msg).encode())

    def serve(self, h: BaseHTTPRequestHandler, body: dict) -> None:
        system, user = body["messages"][0]["content"], body["messages"][-1]["content"]
        with self.lock:
            self.requests += 1
            self.auth.append(h.headers.get("Authorization"))
            fault = next((mode for word, mode in self.faults.items() if word in user), None)
            if fault:
                self.hits[fault] += 1
                n = self.hits[fault]
        if self.delay:
            time.sleep(self.delay)
        if fault == "flaky" and n % 3 != 0:
            fault = "500"
        elif fault == "flaky":
            fault = None
        if fault in ("500", "429", "401"):
            return self._send(h, int(fault), b'{"error": "nope"}', {"Retry-After": "0"} if fault == "429" else None)
        if fault == "timeout":
            time.sleep(1.5)
            return self._answer(h, "EXPLANATION: too late")
        if fault == "malformed":
            return self._send(h, 200, b'{"choices": [ this is not json')
        if fault == "empty":
            return self._answer(h, "   ")
        if fault == "nochoices":
            return self._send(h, 200, b'{"usage": {"total_tokens": 3}}')
        if "JSON list" in system:  # a scoring request: judge each excerpt by keyword matching
            expl = re.search(r"^Explanation: (.*)$", user, re.M).group(1)
            kws = judge_keywords(expl)
            items = re.findall(r"^\d+\. (.*)$", user.split("Excerpts:", 1)[1], re.M)
            if "marked" in system:
                preds = [int(any(k in m.lower() for m in re.findall(r"<<(.+?)>>", t) for k in kws)) for t in items]
            else:
                preds = [int(any(k in t.lower() for k in kws)) for t in items]
            return self._answer(h, f"Here you go: {json.dumps(preds)}")
        marked = Counter(w for m in re.findall(r"<<(.+?)>>", user) for w in m.lower().split())
        word = marked.most_common(1)[0][0] if marked else "nothing"
        return self._answer(h, f'Thinking...\nEXPLANATION: the word "{word}".')


# ---- TransformerLens ------------------------------------------------------------------------------------
TL_HOOK = "blocks.1.hook_resid_pre"  # the hook of the tiny HookedTransformer (conftest.tl_runtime)


# ---- attribution: two SAEs of the tiny model and one of another model in one file
L0, L1 = "tiny/model.layers.0/64", "tiny/model.layers.1/64"


def make_two_sae_db(root: Path, tiny_model_dir: Path, tiny_corpus: Path) -> Path:
    """SAEs at layers 0 and 1 of the tiny model, and one SAE of another tiny model, in one database."""
    db = root / "two.duckdb"
    s1 = make_tiny_sae(root / "s1", tiny_model_dir, hook="model.layers.1", seed=5, k=6)
    s0 = make_tiny_sae(root / "s0", tiny_model_dir, hook="model.layers.0", seed=6, k=6)
    build_tiny_db(db, tiny_model_dir, s1, tiny_corpus, sae_name=L1, umap=False)
    build_tiny_db(db, tiny_model_dir, s0, tiny_corpus, sae_name=L0, umap=False)
    other = make_tiny_model(root / "other_model", seed=1)
    so = make_tiny_sae(root / "so", other, hook="model.layers.1", seed=7)
    build_tiny_db(db, other, so, tiny_corpus, sae_name="other/model.layers.1/64", umap=False)
    return db


def page_maker(page: Path, db: Path, monkeypatch, timeout: float = 120):
    """``make(**query_params)``: an AppTest of one page file on ``db`` (set as $FEATUREDICT_DB), not yet run."""
    from streamlit.testing.v1 import AppTest

    monkeypatch.setenv("FEATUREDICT_DB", str(db))

    def make(**params: str) -> AppTest:
        at = AppTest.from_file(str(page), default_timeout=timeout)
        for k, v in params.items():
            at.query_params[k] = v
        return at

    return make
