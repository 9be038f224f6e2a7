"""``featuredict explain``: write explanations of SAE features into the database and score them.

    run_explain(ExplainConfig(db=..., sae_id=..., features="0-499", explainer="tokens"))

One run: pick the features, skip those that already have an explanation from this explainer (method + model)
made for the current SAE weights (unless ``force``), explain the rest with a progress bar, and (``score``) score
new and existing explanations. A feature the explainer fails on gets an error row (one line) and the run goes
on; a failure no retry can fix (a bad API key, a wrong URL or model), or ``max_failures_in_a_row`` failures in a
row, stops it. Rows are written in small batches as they come, so an interrupted run keeps what it did and the
same command resumes it. Explainers: ``methods``; scorers: ``scoring``; LLM clients:
``llm``; what a feature's contexts look like to them: ``data``.

Every explanation is stamped with ``queries.sae_fingerprint`` (a hash of the decoder rows stored in the
database): one made for other weights shows as stale, and a run explains such features again.
"""

from __future__ import annotations

import re
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from typing import Any, Literal, TextIO

import pandas as pd
from tqdm.auto import tqdm

from featuredict.db import queries as q
from featuredict.db import writes
from featuredict.db.errors import UserError, one_line
from featuredict.db.store import Store
from featuredict.pipelines.explain.clients import ChatFatal, ChatSettings, HFChat, OpenAIChat, make_backend, split_spec
from featuredict.pipelines.explain.data import FeatureData, load_features, negative_pool
from featuredict.pipelines.explain.explainers import EXPLAINERS, LLMExplainer, TokensExplainer
from featuredict.pipelines.explain.scorers import SCORERS, EmbeddingScorer, KeywordScorer, LLMScorer

Method = Literal["tokens", "phrases", "openai", "hf"]
BULK = ("tokens", "phrases")  # offline explainers that explain many features per query
FLUSH_EVERY = 32  # rows buffered before a write
WRITE_BATCH = 2048  # most rows in one write: the file's lock is free between writes (other processes get in)
LOAD_CHUNK = 128  # features whose contexts are read in one query


class ExplainStopped(UserError, RuntimeError):
    """The run stopped early (a failure retrying cannot fix, or too many failures in a row)."""


@dataclass(frozen=True)
class ExplainConfig:
    """One ``featuredict explain`` run. ``explainer``: ``tokens``, ``openai:URL`` (with ``model``) or
    ``hf:MODEL``; None with ``score`` scores existing explanations only. ``features``: ranges like
    ``0-499,1000``; or ``all_features``. ``scorer``: ``keyword``, ``openai:URL`` (with ``scorer_model``) or
    ``hf:MODEL``; by default the explainer's own LLM."""

    db: str
    sae_id: str | None = None
    features: str | None = None
    all_features: bool = False
    explainer: str | None = None
    model: str | None = None
    force: bool = False
    score: bool = False
    scorer: str | None = None
    scorer_model: str | None = None
    chat: ChatSettings = field(default_factory=ChatSettings)
    top_examples: int = 10
    interval_examples: int = 5
    score_examples: int = 10
    score_batch: int = 10
    max_new_tokens: int = 80
    author: str | None = None
    seed: int = 0
    max_failures_in_a_row: int = 25
    pool_size: int = 4000
    progress: bool = True

    def __post_init__(self) -> None:
        if self.explainer is None and not self.score:
            raise ValueError("give --explainer tokens|openai:URL|hf:MODEL, or --score to score existing explanations")
        if self.explainer is not None and self.method not in EXPLAINERS:
            raise ValueError(f"unknown explainer {self.explainer!r}: use tokens, phrases, openai:URL or hf:MODEL")
        if self.method in BULK and split_spec(self.explainer or "")[1]:
            raise ValueError(f"the {self.method} explainer takes no argument (use --explainer {self.method})")
        if self.method == "openai" and not self.model:
            raise ValueError("--explainer openai:URL needs --model NAME")
        if bool(self.features) == bool(self.all_features):
            raise ValueError("give --features RANGES (e.g. 0-499,1000) or --all")
        if self.scorer is not None and split_spec(self.scorer)[0] not in SCORERS:
            raise ValueError(f"unknown scorer {self.scorer!r}: use keyword, embedding, openai:URL or hf:MODEL")
        if self.score and self.scorer is None and self.method in (None, *BULK):
            raise ValueError(
                "--score needs a scorer: --scorer openai:URL --scorer-model NAME, --scorer hf:MODEL, --scorer "
                "keyword (deterministic, lexical) or --scorer embedding (sentence-embedding AUROC)"
            )
        if self.scorer is not None and split_spec(self.scorer)[0] == "openai" and not (self.scorer_model or self.model):
            raise ValueError("--scorer openai:URL needs --scorer-model NAME")
        for name, lo, hi in (
            ("top_examples", 1, 100),
            ("interval_examples", 0, 100),
            ("score_examples", 1, 200),
            ("score_batch", 1, 100),
            ("max_new_tokens", 8, 4096),
            ("max_failures_in_a_row", 0, 10**9),
            ("pool_size", 10, 10**6),
        ):
            v = getattr(self, name)
            if not isinstance(v, int) or not lo <= v <= hi:
                raise ValueError(f"{name.replace('_', '-')} must be an integer in {lo}..{hi}; got {v!r}")

    @property
    def method(self) -> Method | None:
        return split_spec(self.explainer)[0] if self.explainer else None  # type: ignore[return-value]


@dataclass
class ExplainSummary:
    sae_id: str
    explained: int = 0
    failed: int = 0
    skipped_done: int = 0
    skipped_dead: int = 0
    scored: int = 0
    score_failed: int = 0
    unscorable: int = 0
    seconds: float = 0.0
    explain_seconds: float = 0.0
    tokens_used: int = 0
    stopped: str | None = None
    errors: dict[str, int] = field(default_factory=dict)
    ran_explainer: bool = False
    ran_scorer: bool = False

    def lines(self) -> list[str]:
        out: list[str] = []
        if self.ran_explainer:
            rate = self.explained / self.explain_seconds if self.explain_seconds > 0 else 0.0
            speed = f"{rate:,.1f} features/s" if rate >= 1 else f"{rate * 60:,.1f} features/min"
            out.append(
                f"explained {self.explained:,}, failed {self.failed:,}, skipped "
                f"{self.skipped_done + self.skipped_dead:,} ({self.skipped_done:,} already explained, "
                f"{self.skipped_dead:,} dead) in {self.explain_seconds:.1f}s"
                + (f" ({speed})" if self.explained else "")
            )
        if self.ran_scorer:
            out.append(
                f"scored {self.scored:,}, scoring failed {self.score_failed:,}, unscorable {self.unscorable:,} "
                "(too few held-out or contrast contexts)"
            )
        out.append(f"total {self.seconds:.1f}s; LLM tokens used {self.tokens_used:,}")
        for err, n in sorted(self.errors.items(), key=lambda kv: -kv[1])[:3]:
            out.append(f"  {n:,} x {err}")
        if self.stopped:
            out.append(f"stopped early: {self.stopped}")
        return out


_RANGE = re.compile(r"^\s*(\d+)\s*(?:-\s*(\d+))?\s*$")


def parse_features(spec: str, d_sae: int) -> list[int]:
    """``'0-499,1000'`` -> sorted unique ids; ValueError for bad syntax or ids outside ``[0, d_sae)``."""
    out: set[int] = set()
    for part in str(spec).split(","):
        if not part.strip():
            continue
        m = _RANGE.match(part)
        if not m:
            raise ValueError(f"--features: {part.strip()!r} is not an id or a range like 0-499")
        lo = int(m.group(1))
        hi = int(m.group(2)) if m.group(2) is not None else lo
        if hi < lo:
            raise ValueError(f"--features: range {part.strip()!r} ends before it starts")
        if hi >= d_sae:
            raise ValueError(f"--features: {hi} is not a feature of this SAE (it has 0 to {d_sae - 1})")
        out.update(range(lo, hi + 1))
    if not out:
        raise ValueError("--features names no feature")
    return sorted(out)


def _explainer_model(c: ExplainConfig) -> str | None:
    """The ``explainer_model`` stamped on the explanations of ``c``'s explainer."""
    method = c.method or "tokens"
    if method == "tokens":
        return None
    if method == "phrases":
        from featuredict.pipelines.model.embedder import DEFAULT_MODEL

        return DEFAULT_MODEL
    return c.model if method == "openai" else split_spec(c.explainer or "")[1]


def _chunks(xs: Sequence[Any], n: int) -> Iterator[Sequence[Any]]:
    for i in range(0, len(xs), n):
        yield xs[i : i + n]


class _Run:
    """State of one run: the store, the SAE, the summary and the output streams."""

    def __init__(self, cfg: ExplainConfig, store: Store, out: TextIO):
        self.cfg, self.store, self.out = cfg, store, out
        sae_id = q.resolve_sae(store, cfg.sae_id, cfg.db)
        info = q.sae_info(store, sae_id)
        assert info is not None
        self.sae_id = sae_id
        self.skip_first = bool(info.get("prepend_bos"))
        self.summary = ExplainSummary(sae_id=sae_id)
        d_sae = int(info["d_sae"])
        present = store.df("SELECT feature, dead FROM features WHERE sae_id = ? ORDER BY feature", [sae_id])
        dead = {int(f) for f, d in zip(present["feature"], present["dead"], strict=True) if d}
        if cfg.all_features:
            wanted = [int(f) for f in present["feature"]]
        else:
            wanted = parse_features(cfg.features or "", d_sae)
            known = {int(f) for f in present["feature"]}
            wanted = [f for f in wanted if f in known]
        self.features = wanted
        self.live = [f for f in wanted if f not in dead]
        self.summary.skipped_dead = len(wanted) - len(self.live)
        self.fingerprint = q.sae_fingerprint(store, sae_id)
        self._pool = None
        self._backends: dict[tuple[str, str | None], OpenAIChat | HFChat] = {}

    def backend(self, spec: str, model: str | None) -> OpenAIChat | HFChat:
        """One backend per (spec, model) for the run (an hf: model loads once, before any feature is sent)."""
        key = (spec, model)
        if key not in self._backends:
            b = make_backend(spec, model, self.cfg.chat)
            if isinstance(b, HFChat):
                b.load()
            self._backends[key] = b
        return self._backends[key]

    def pool(self) -> pd.DataFrame:
        if self._pool is None:
            self._pool = negative_pool(self.store, self.sae_id, self.cfg.pool_size, self.cfg.seed)
        return self._pool

    def load(self, features: Sequence[int]) -> dict[int, FeatureData]:
        c = self.cfg
        return load_features(
            self.store,
            self.sae_id,
            features,
            self.pool(),
            c.top_examples,
            c.interval_examples,
            c.score_examples,
            c.seed,
        )

    def bar(self, total: int, desc: str) -> tqdm:
        return tqdm(total=total, unit="feature", desc=desc, disable=not self.cfg.progress, file=sys.stderr)

    def row(self, feature: int, text: str | None, method: str, model: str | None, **kw: Any) -> dict[str, Any]:
        return {
            "sae_id": self.sae_id,
            "feature": int(feature),
            "text": text,
            "method": method,
            "explainer_model": model,
            "author": self.cfg.author,
            "sae_fingerprint": self.fingerprint,
            **kw,
        }

    # ------------------------------------------------------------------------------------------ explain
    def explain(self) -> None:
        c, s = self.cfg, self.summary
        method = c.method or "tokens"
        model = _explainer_model(c)
        done = set() if c.force else q.explained_features(self.store, self.sae_id, method, model, self.fingerprint)
        todo = [f for f in self.live if f not in done]
        s.skipped_done = len(self.live) - len(todo)
        if not todo:
            return
        t0 = time.perf_counter()
        try:
            if method == "tokens":
                self._explain_tokens(TokensExplainer(), todo)
            elif method == "phrases":
                from featuredict.pipelines.explain.phrases import PhrasesExplainer

                self._explain_tokens(PhrasesExplainer(seed=c.seed), todo)
            else:
                self._explain_llm(LLMExplainer(self.backend(c.explainer or "", c.model), c.max_new_tokens), todo)
        finally:
            s.explain_seconds = time.perf_counter() - t0

    def _explain_tokens(self, explainer: Any, todo: list[int]) -> None:
        """A bulk explainer (``tokens`` or ``phrases``): ``explain_many`` per chunk, rows written per chunk."""
        s = self.summary
        method, model = explainer.method, explainer.model
        with self.bar(len(todo), f"explain ({method})") as bar:
            for chunk in _chunks(todo, explainer.CHUNK):
                df = explainer.explain_many(self.store, self.sae_id, chunk, self.skip_first)
                rows = []
                for f, text in zip(df["feature"], df["text"], strict=True):
                    if text:
                        rows.append(self.row(f, text, method, model))
                        s.explained += 1
                    else:
                        err = "nothing to summarise: no stored contexts and no promoted tokens"
                        rows.append(self.row(f, None, method, model, error=err))
                        s.failed += 1
                        s.errors[err] = s.errors.get(err, 0) + 1
                for part in _chunks(rows, WRITE_BATCH):
                    writes.add_explanations(self.store, part)
                bar.update(len(chunk))

    def _pooled(
        self,
        workers: int,
        desc: str,
        chunks: Iterator[tuple[Sequence[Any], dict[int, FeatureData]]],
        total: int,
        submit: Callable[[Any, FeatureData], Any],
        key: Callable[[Any], int],
        handle: Callable[[Any, Future | None, BaseException | None, list[Any]], None],
        write: Callable[[list[Any]], object],
    ) -> None:
        """Run ``submit(item, data)`` on a thread pool for every item of every chunk whose feature (``key``) has
        data, and give each finished call to ``handle(item, future, error, rows)``, which appends the rows to
        write (an error it re-raises stops the run). Rows are written ``FLUSH_EVERY`` at a time, the rest at
        the end or on a stop."""
        buf: list[Any] = []
        with self.bar(total, desc) as bar, ThreadPoolExecutor(max_workers=workers) as pool:
            try:
                for chunk, data in chunks:
                    futs: dict[Future, Any] = {
                        pool.submit(submit, item, data[key(item)]): item for item in chunk if key(item) in data
                    }
                    pending = set(futs)
                    while pending:
                        finished, pending = wait(pending, return_when=FIRST_COMPLETED)
                        for fut in finished:
                            try:
                                err = fut.exception()
                                if err is not None and not isinstance(err, Exception):
                                    raise err  # KeyboardInterrupt and the like stop the run as they are
                                handle(futs[fut], fut if err is None else None, err, buf)
                            except BaseException:
                                for p in pending:
                                    p.cancel()
                                raise
                            bar.update(1)
                            if len(buf) >= FLUSH_EVERY:
                                write(buf)
                                buf.clear()
            finally:
                if buf:
                    write(buf)

    def _explain_llm(self, explainer: LLMExplainer, todo: list[int]) -> None:
        s, c = self.summary, self.cfg
        in_a_row = 0

        def handle(f: int, fut: Future | None, e: BaseException | None, rows: list[Any]) -> None:
            nonlocal in_a_row
            if fut is not None:
                text, used = fut.result()
                rows.append(self.row(f, text, explainer.method, explainer.model, tokens_used=used))
                s.explained += 1
                s.tokens_used += used
                in_a_row = 0
                return
            if isinstance(e, ChatFatal):
                raise ExplainStopped(one_line(e)) from None
            err = one_line(e or RuntimeError("no answer"))  # one bad feature never stops the run
            rows.append(self.row(f, None, explainer.method, explainer.model, error=err))
            s.failed += 1
            s.errors[err] = s.errors.get(err, 0) + 1
            in_a_row += 1
            if c.max_failures_in_a_row and in_a_row >= c.max_failures_in_a_row:
                raise ExplainStopped(f"{in_a_row} features in a row failed (last: {err})") from None

        self._pooled(
            explainer.backend.parallel,
            f"explain ({explainer.method}:{explainer.model})",
            ((chunk, self.load(chunk)) for chunk in _chunks(todo, LOAD_CHUNK)),
            len(todo),
            lambda f, data: explainer.explain(data, self.skip_first),
            int,
            handle,
            lambda rows: writes.add_explanations(self.store, rows),
        )

    # -------------------------------------------------------------------------------------------- score
    def score(self) -> None:
        c, s = self.cfg, self.summary
        if c.scorer is not None:
            spec, model = c.scorer, c.scorer_model or (c.model if split_spec(c.scorer)[0] == "openai" else None)
        else:
            spec, model = c.explainer or "", c.model
        if split_spec(spec)[0] == "keyword":
            scorer: KeywordScorer | LLMScorer | EmbeddingScorer = KeywordScorer()
        elif split_spec(spec)[0] == "embedding":
            scorer = EmbeddingScorer()
        else:
            scorer = LLMScorer(self.backend(spec, model), c.score_batch)
        method = c.method
        exp_model = _explainer_model(c) if method is not None else None
        todo = q.explanations_to_score(
            self.store, self.sae_id, self.live, scorer.name, method, exp_model, rescore=c.force
        )
        rows = list(zip(todo["id"].tolist(), todo["feature"].tolist(), todo["text"].tolist(), strict=True))

        def handle(row: tuple[int, int, str], fut: Future | None, e: BaseException | None, out: list[Any]) -> None:
            if fut is not None:
                r = fut.result()
                s.tokens_used += r.tokens_used
                if r.detection is None and r.fuzzing is None:
                    s.unscorable += 1
                else:
                    out.append((row[0], r.detection, r.fuzzing, scorer.name))
                    s.scored += 1
                return
            if isinstance(e, ChatFatal):
                raise ExplainStopped(one_line(e)) from None
            err = "scoring: " + one_line(e or RuntimeError("no answer"))  # one bad answer never stops the run
            s.score_failed += 1
            s.errors[err] = s.errors.get(err, 0) + 1

        self._pooled(
            scorer.parallel,
            f"score ({scorer.name})",
            ((chunk, self.load(sorted({int(f) for _, f, _ in chunk}))) for chunk in _chunks(rows, LOAD_CHUNK)),
            len(rows),
            lambda row, data: scorer.score(row[2], data, self.skip_first, c.seed),
            lambda row: int(row[1]),
            handle,
            lambda out: writes.set_explanation_scores(self.store, out),
        )


def run_explain(cfg: ExplainConfig, out: TextIO | None = None) -> ExplainSummary:
    """Run one ``featuredict explain`` (see the module docstring); returns its summary, printed to ``out``.
    Raises ValueError / DatabaseError / ModelLoadError with one line on bad input; a stopped run returns with
    ``summary.stopped`` set."""
    out = out or sys.stdout
    t0 = time.perf_counter()
    store = Store(cfg.db)
    try:
        run = _Run(cfg, store, out)
        try:
            if cfg.explainer is not None:
                run.summary.ran_explainer = True
                run.explain()
            if cfg.score:
                run.summary.ran_scorer = True
                run.score()
        except ExplainStopped as e:
            run.summary.stopped = str(e)
        run.summary.seconds = time.perf_counter() - t0
        for line in run.summary.lines():
            print(line, file=out)
        return run.summary
    finally:
        store.close()
