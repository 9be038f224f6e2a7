"""Scoring explanations, Delphi style: registry name -> class.

- **Detection.** The scorer gets the explanation and a shuffled mix of held-out activating contexts (ones the
  explainer never saw) and non-activating contexts, and says for each whether the feature fires in it. Score:
  balanced accuracy, (hit rate on activating + correct-rejection rate on non-activating) / 2; 0.5 = chance.
- **Fuzzing.** The scorer gets held-out activating contexts with tokens marked <<like this>>: half marked where
  the feature really fires, half with as many marks at random non-firing positions, and says for each whether
  the marks fit the explanation. Score: balanced accuracy over right vs wrong marks.

Scorers:
- ``openai:URL`` / ``hf:MODEL`` (``LLMScorer``): an LLM answers a JSON list of 0/1 per batch of contexts.
- ``embedding`` (``EmbeddingScorer``): Delphi's embedding scorer, no LLM. The explanation and each detection
  context (held-out activating and non-activating, unmarked) are embedded with all-MiniLM-L6-v2; the score
  is the AUROC of the cosine for telling the activating contexts from the others (0.5 = chance, 1 = every
  activating context closer to the explanation than every other one). It rewards meaning, not shared tokens.
  Stored as the detection score of scorer ``embedding``; it has no fuzzing score.
- ``keyword`` (``KeywordScorer``): deterministic, no LLM. It takes the explanation's quoted words (or else its
  content words) and says "fires" when one of them occurs in the context (detection), or among the marked
  tokens (fuzzing). It measures only whether the explanation *names the right tokens*; it cannot credit an
  explanation of a concept the words do not spell out, so LLM-written phrases score lower under it than they
  deserve. It is a lexical baseline, not an LLM's judgement, and is stored as scorer ``keyword``.

Negative contexts are not verified to be free of the feature (see ``explain_data``).
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from featuredict.pipelines.explain.clients import BadAnswer, HFChat, Messages, OpenAIChat
from featuredict.pipelines.explain.data import Context, FeatureData, activating, render, window

DETECTION_SYSTEM = (
    "You check explanations of a feature of a language model. You get an explanation of when the feature fires "
    "and numbered text excerpts. For each excerpt, decide whether the feature fires somewhere in it, according "
    "to the explanation. Reply with only a JSON list of 0s and 1s, one per excerpt in order (1 = fires), "
    "for example [1, 0, 0, 1]."
)
FUZZING_SYSTEM = (
    "You check explanations of a feature of a language model. You get an explanation of when the feature fires "
    "and numbered text excerpts in which some tokens are marked <<like this>>. For each excerpt, decide whether "
    "the marked tokens are what the explanation describes (1) or are marked in the wrong places (0). Reply "
    "with only a JSON list of 0s and 1s, one per excerpt in order, for example [1, 0, 0, 1]."
)


@dataclass(frozen=True)
class Item:
    """One context to judge: its text (marked or not), the marked spans, and the right answer."""

    text: str
    marked: tuple[str, ...]
    label: int


def balanced_accuracy(labels: Sequence[int], preds: Sequence[int]) -> float | None:
    """(TPR + TNR) / 2; None unless both classes are present."""
    y, p = np.asarray(labels, dtype=int), np.asarray(preds, dtype=int)
    if not (y == 1).any() or not (y == 0).any():
        return None
    return float(((p[y == 1] == 1).mean() + (p[y == 0] == 0).mean()) / 2)


def _spans(ctx: Context, lo: int, hi: int, marks: np.ndarray) -> tuple[str, ...]:
    out, cur = [], []
    for i in range(lo, hi):
        if marks[i]:
            cur.append(ctx.tokens[i])
        elif cur:
            out.append("".join(cur))
            cur = []
    if cur:
        out.append("".join(cur))
    return tuple(out)


def detection_items(fd: FeatureData, skip_first: bool, seed: int) -> list[Item]:
    """Held-out activating (label 1) and negative (label 0) contexts, unmarked, shuffled."""
    items = [Item(render(c, *window(c, skip_first)), (), 1) for c in fd.held_out]
    items += [Item(render(c, *window(c, skip_first)), (), 0) for c in fd.negatives]
    order = np.random.default_rng([seed, fd.feature, 1]).permutation(len(items))
    return [items[i] for i in order]


def fuzzing_items(fd: FeatureData, skip_first: bool, seed: int) -> list[Item]:
    """Held-out activating contexts, alternately marked where the feature fires (label 1) and with as many
    marks at random non-firing positions of the window (label 0); shuffled."""
    rng = np.random.default_rng([seed, fd.feature, 2])
    items: list[Item] = []
    for j, c in enumerate(fd.held_out):
        lo, hi = window(c, skip_first)
        right = activating(c)
        right[:lo] = False
        right[hi:] = False
        k = int(right.sum())
        if k == 0:
            continue
        if j % 2 == 0:
            items.append(Item(render(c, lo, hi, right), _spans(c, lo, hi, right), 1))
            continue
        a = np.asarray(c.acts, dtype=np.float64)
        free = np.flatnonzero(a[lo:hi] <= 0) + lo
        if len(free) < k:
            continue
        wrong = np.zeros(len(c.tokens), dtype=bool)
        wrong[rng.choice(free, size=k, replace=False)] = True
        items.append(Item(render(c, lo, hi, wrong), _spans(c, lo, hi, wrong), 0))
    order = rng.permutation(len(items))
    return [items[i] for i in order]


def scoring_messages(kind: str, explanation: str, items: Sequence[Item]) -> Messages:
    system = DETECTION_SYSTEM if kind == "detection" else FUZZING_SYSTEM
    body = [f"Explanation: {explanation}", "", "Excerpts:"]
    body += [f"{i}. {it.text}" for i, it in enumerate(items, 1)]
    body += ["", f"Answer with a JSON list of exactly {len(items)} numbers (0 or 1)."]
    return [{"role": "system", "content": system}, {"role": "user", "content": "\n".join(body)}]


_LIST_RE = re.compile(r"\[[^\[\]]*\]")


def parse_binary_list(answer: str, n: int) -> list[int]:
    """The first JSON list of ``n`` 0/1 values (true/false and "1"/"0" accepted) in ``answer``; BadAnswer else."""
    for m in _LIST_RE.finditer(answer or ""):
        try:
            vals = json.loads(m.group(0).replace("'", '"'))
        except ValueError:
            continue
        if not isinstance(vals, list) or len(vals) != n:
            continue
        out = []
        for v in vals:
            v = v.strip() if isinstance(v, str) else v
            if v in (1, "1", True):
                out.append(1)
            elif v in (0, "0", False):
                out.append(0)
            else:
                break
        if len(out) == n:
            return out
    raise BadAnswer(f"no JSON list of {n} zeros and ones in the answer")


@dataclass(frozen=True)
class Scores:
    detection: float | None
    fuzzing: float | None
    tokens_used: int


class LLMScorer:
    """Detection and fuzzing judged by a chat backend, ``batch`` contexts per call."""

    def __init__(self, backend: OpenAIChat | HFChat, batch: int = 10):
        self.backend = backend
        self.name = f"{backend.kind}:{backend.model}"
        self.parallel = backend.parallel
        self.batch = max(1, int(batch))

    def _judge(self, kind: str, explanation: str, items: list[Item]) -> tuple[list[int], int]:
        preds: list[int] = []
        used = 0
        for lo in range(0, len(items), self.batch):
            part = items[lo : lo + self.batch]
            n = len(part)

            def parse(answer: str, n: int = n) -> list[int]:
                return parse_binary_list(answer, n)

            ans, u = self.backend.complete(scoring_messages(kind, explanation, part), 8 + 4 * n, parse)
            preds += ans
            used += u
        return preds, used

    def score(self, explanation: str, fd: FeatureData, skip_first: bool, seed: int) -> Scores:
        det_items = detection_items(fd, skip_first, seed)
        fuz_items = fuzzing_items(fd, skip_first, seed)
        det = fuz = None
        used = 0
        if det_items:
            preds, u = self._judge("detection", explanation, det_items)
            det, used = balanced_accuracy([i.label for i in det_items], preds), used + u
        if fuz_items:
            preds, u = self._judge("fuzzing", explanation, fuz_items)
            fuz, used = balanced_accuracy([i.label for i in fuz_items], preds), used + u
        return Scores(det, fuz, used)


_STOP = frozenset(
    "a an the of to in on at for and or but is are was were be been being it its this that these those with "
    "as by from into about than then so such not no any all some which who whom whose what when where why how "
    "feature fires fire firing detects detect token tokens word words text mentions mention related relating "
    "references reference often usually after before promotes promote like e g eg i e ie".split()
)
_QUOTED = re.compile(r"\"([^\"]+)\"|“([^”]+)”")
_WORD = re.compile(r"[^\W_]{3,}")


def keywords(explanation: str) -> list[str]:
    """What ``keyword`` scoring looks for: the quoted strings of the explanation, else its content words;
    lower-cased, stop words dropped."""
    quoted = [(a or b).strip().lower() for a, b in _QUOTED.findall(explanation or "")]
    words = quoted or _WORD.findall((explanation or "").lower())
    return list(dict.fromkeys(w for w in words if w and w not in _STOP))


def _has(text: str, kws: Sequence[str]) -> bool:
    low = text.lower()
    return any(re.search(r"(?<!\w)" + re.escape(k) + r"(?!\w)", low) for k in kws)


class KeywordScorer:
    """Deterministic lexical scorer (no LLM); see the module docstring for what it can and cannot measure."""

    name = "keyword"
    parallel = 1

    def score(self, explanation: str, fd: FeatureData, skip_first: bool, seed: int) -> Scores:
        kws = keywords(explanation)
        det_items = detection_items(fd, skip_first, seed)
        fuz_items = fuzzing_items(fd, skip_first, seed)
        det = balanced_accuracy([i.label for i in det_items], [int(_has(i.text, kws)) for i in det_items])
        fuz = balanced_accuracy(
            [i.label for i in fuz_items], [int(any(_has(s, kws) for s in i.marked)) for i in fuz_items]
        )
        return Scores(det, fuz, 0)


def auroc(labels: Sequence[int], scores: Sequence[float]) -> float | None:
    """Area under the ROC curve (ties count half); None unless both classes are present."""
    y = np.asarray(labels, dtype=int)
    s = np.asarray(scores, dtype=np.float64)
    pos, neg = s[y == 1], s[y == 0]
    if not len(pos) or not len(neg):
        return None
    greater = (pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()
    return float(greater / (len(pos) * len(neg)))


class EmbeddingScorer:
    """Delphi-style embedding scorer: AUROC of explanation-context cosine (see the module docstring)."""

    name = "embedding"
    parallel = 1

    def __init__(self, embedder: object | None = None):
        from featuredict.pipelines.model.embedder import load_embedder

        self.embedder = embedder if embedder is not None else load_embedder()  # EmbedModelError: one line

    def score(self, explanation: str, fd: FeatureData, skip_first: bool, seed: int) -> Scores:
        items = detection_items(fd, skip_first, seed)
        if not items or not (explanation or "").strip():
            return Scores(None, None, 0)
        vecs = self.embedder.encode([explanation, *(i.text for i in items)])  # type: ignore[attr-defined]
        cos = vecs[1:] @ vecs[0]
        return Scores(auroc([i.label for i in items], cos.tolist()), None, 0)


SCORERS: dict[str, type[LLMScorer] | type[KeywordScorer] | type[EmbeddingScorer]] = {
    "keyword": KeywordScorer,
    "embedding": EmbeddingScorer,
    "openai": LLMScorer,
    "hf": LLMScorer,
}
