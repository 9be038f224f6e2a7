"""Quality scores of a steered (or baseline) continuation: fluency, divergence and concept score.

For a continuation ``y_1..y_N`` of prompt ids ``p`` (``P`` tokens), with ``u_t`` the UNSTEERED model's logits at
the position that predicts ``y_t`` (prefix ``p + y_<t``) and ``s_t`` the logits the run chose ``y_t`` from:

- **fluency**: ``perplexity = exp(-(1/N) Σ_t log softmax(u_t)[y_t])``, the continuation's perplexity under the
  unsteered model (temperature 1, whatever the sampling temperature was; EOS not included);
- **divergence**: ``(1/N) Σ_t KL(softmax(s_t) || softmax(u_t))`` in nats: how far the run's next-token
  distributions are from the unsteered model's on the same prefixes (0 for an unsteered run, by definition);
- **concept score** of feature ``i``: ``(1/N) Σ_t f_i(x_t) / max_act_i``, the feature's activation on the
  generated tokens measured in an UNEDITED pass (``x_t`` is the hook's activation at ``y_t``'s position with no
  edit anywhere), in units of its max observed activation (NaN when ``max_act_i`` is not positive);
- **distinct tokens**: ``|{y_t}| / N``, the share of distinct token ids in the continuation (NaN when empty). A
  text collapsed into one repeated token scores ~1/N; perplexity alone can miss that (48 repeated no-break
  spaces had perplexity 2.45 under SmolLM2, as low as fluent text), so sweeps also require ``MIN_DISTINCT``.

Cost: the run's own logits give ``s_t`` (``keep_logits``). An unsteered run's logits are ``u_t`` themselves, and
its recorded activations are unedited, so it needs no extra pass. A steered run needs one unedited forward pass
over ``p + y``, batched with the other rows of the same prompt: the prompt runs once and its KV cache serves
every row (``ModelBackend.forward_after_prefix``; continuations right-padded, which causal attention makes
exact). It gives ``u_t`` and, through a read-only hook at the SAE's hook, the concept activations.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from featuredict.pipelines.model.saes import fast_encoder, to_sae

if TYPE_CHECKING:
    from featuredict.pipelines.model.runtime import Runtime
    from featuredict.pipelines.steering.generation import GenerationResult

PASS_BYTES = 256 * 2**20  # logits held at once by the unedited pass (rows are processed in groups under this)
MIN_DISTINCT = 0.5  # below this share of distinct tokens a continuation counts as collapsed (fluent text: ~0.6-0.9)


def _nan_none(x: float) -> float | None:
    return None if not math.isfinite(x) else float(x)


@dataclass(frozen=True)
class Quality:
    """Scores of one continuation (see the module docstring); ``concept`` is aligned with ``features``."""

    n_tokens: int
    perplexity: float
    divergence: float
    features: tuple[int, ...]
    concept: tuple[float, ...]
    distinct: float = float("nan")  # share of distinct token ids in the continuation

    def concept_mean(self, features: Sequence[int] | None = None) -> float:
        """Mean concept score over ``features`` (default: all) with a finite score; NaN when there is none."""
        pick = set(self.features if features is None else features)
        vals = [c for f, c in zip(self.features, self.concept, strict=True) if f in pick and math.isfinite(c)]
        return sum(vals) / len(vals) if vals else float("nan")

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready (NaN -> None): tokens, perplexity, divergence_kl, distinct_tokens, concept {feature: score}."""
        return {
            "tokens": self.n_tokens,
            "perplexity": _nan_none(self.perplexity),
            "divergence_kl": _nan_none(self.divergence),
            "distinct_tokens": _nan_none(self.distinct),
            "concept": {str(f): _nan_none(c) for f, c in zip(self.features, self.concept, strict=True)},
        }


def _concept(acts: torch.Tensor, features: Sequence[int], max_acts: Mapping[int, float] | None) -> tuple[float, ...]:
    """Per feature: mean of ``acts [N, k]`` over tokens / max_act (NaN without tokens or a positive max_act)."""
    out = []
    for j, f in enumerate(features):
        mx = float(max_acts.get(f, 0.0)) if max_acts is not None else 0.0
        if acts.shape[0] == 0 or not (mx > 0 and math.isfinite(mx)):
            out.append(float("nan"))
        else:
            out.append(float(acts[:, j].double().mean()) / mx)
    return tuple(out)


def distinct_share(tokens: Sequence[int]) -> float:
    """Share of distinct ids in ``tokens`` (NaN when empty)."""
    return len(set(tokens)) / len(tokens) if tokens else float("nan")


def _fluency(own: torch.Tensor, unsteered: torch.Tensor, tokens: list[int], kl: bool) -> tuple[float, float]:
    """(perplexity of ``tokens`` under ``unsteered`` ``[N, V]`` logits, mean KL(softmax(own) || softmax(unsteered)))."""
    n = len(tokens)
    if n == 0:
        return float("nan"), float("nan")
    lu = torch.log_softmax(unsteered.float(), dim=-1)
    nll = -lu.gather(1, torch.tensor(tokens, dtype=torch.long).unsqueeze(1)).double().mean()
    ppl = float(torch.exp(nll))
    if not kl:
        return ppl, 0.0
    ls = torch.log_softmax(own.float(), dim=-1)
    div = float((ls.exp() * (ls - lu)).sum(-1, dtype=torch.float64).mean())
    return ppl, div


def score_rows(
    rt: Runtime,
    results: Sequence[GenerationResult],
    max_acts: Mapping[int, float] | None,
    features: Sequence[int] | None = None,
    *,
    pass_bytes: int = PASS_BYTES,
) -> list[Quality]:
    """The quality scores of each result (each run with ``keep_logits``; see the module docstring).

    ``features``: the features whose concept score is measured (default: each result's ``features``, the
    steered ones). Results may have different prompts (chat). Steered results, and unsteered ones without
    recorded activations, share one unedited forward pass, in groups of rows whose logits fit ``pass_bytes``.
    """
    feats = [list(features) if features is not None else list(r.features) for r in results]
    out: list[Quality | None] = [None] * len(results)
    need: list[int] = []
    for i, res in enumerate(results):
        if res.logits is None:
            raise ValueError("quality scores need the run's logits: generate with keep_logits=True")
        recorded = res.acts_before is not None and list(res.features) == feats[i]
        if not res.steered and (recorded or not feats[i] or not res.token_ids):
            ppl, _ = _fluency(res.logits, res.logits, res.token_ids, kl=False)
            acts = res.acts_before if recorded else torch.zeros(len(res.token_ids), 0)
            assert acts is not None
            concept = _concept(acts, feats[i], max_acts) if feats[i] else ()
            div = 0.0 if res.token_ids else float("nan")
            out[i] = Quality(len(res.token_ids), ppl, div, tuple(feats[i]), concept, distinct_share(res.token_ids))
        elif not res.token_ids:
            nan = float("nan")
            out[i] = Quality(0, nan, nan, tuple(feats[i]), tuple(nan for _ in feats[i]))
        else:
            need.append(i)
    if need:
        vocab = int(results[need[0]].logits.shape[-1])  # type: ignore[union-attr]
        by_prompt: dict[tuple[int, ...], list[int]] = {}
        for i in need:
            by_prompt.setdefault(tuple(results[i].prompt_ids), []).append(i)
        for rows in by_prompt.values():
            group: list[int] = []
            longest = 0
            for i in rows:
                n = len(results[i].token_ids) + 1
                if group and (len(group) + 1) * max(longest, n) * vocab * 4 > pass_bytes:
                    _unedited_pass(rt, results, group, feats, max_acts, out)
                    group, longest = [], 0
                group.append(i)
                longest = max(longest, n)
            _unedited_pass(rt, results, group, feats, max_acts, out)
    assert all(q is not None for q in out)
    return [q for q in out if q is not None]


@torch.no_grad()
def _unedited_pass(
    rt: Runtime,
    results: Sequence[GenerationResult],
    rows: list[int],
    feats: list[list[int]],
    max_acts: Mapping[int, float] | None,
    out: list[Quality | None],
) -> None:
    """One unedited forward pass over ``prompt + tokens`` of ``rows`` (all with the same prompt, run once; the
    continuations right-padded), reading the hook."""
    width = max(len(results[i].token_ids) for i in rows)
    rest = torch.full((len(rows), width), rt.pad_id, dtype=torch.long)
    for k, i in enumerate(rows):
        rest[k, : len(results[i].token_ids)] = torch.tensor(results[i].token_ids)
    prefix = torch.tensor([results[rows[0]].prompt_ids], dtype=torch.long)
    seen: list[torch.Tensor] = []

    def read(act: torch.Tensor) -> None:  # read-only: the activation passes unchanged
        seen.append(act.detach())

    logits = rt.site.logits_after_prefix(prefix, rest, fn=read)  # [rows, 1 + width, vocab]
    x = to_sae(rt.sae, seen[-1][:, -width:])
    encode = fast_encoder(rt.sae)
    for k, i in enumerate(rows):
        res = results[i]
        n = len(res.token_ids)
        unsteered = logits[k, :n].float().cpu()  # position t predicts token t (0: the prompt's last position)
        assert res.logits is not None
        ppl, div = _fluency(res.logits, unsteered, res.token_ids, kl=res.steered)
        if not res.steered:
            div = 0.0
        fi = torch.tensor(feats[i], dtype=torch.long, device=x.device)
        acts = encode(x[k, :n])[:, fi].float().cpu() if feats[i] else torch.zeros(n, 0)
        out[i] = Quality(
            n, ppl, div, tuple(feats[i]), _concept(acts, feats[i], max_acts), distinct_share(res.token_ids)
        )
