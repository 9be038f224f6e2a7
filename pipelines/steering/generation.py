"""Streamed generation with and without steering: our own token loop around the model.

Generation runs our own token loop (KV cache for Hugging Face models) so that baseline and steered runs are
streamed token by token, share the sampling seed, and the steered features' activations on the generated
tokens are measured inside the steered run. The hook is entered around each forward pass only (never across a
``yield``), so an abandoned or closed stream never leaves a hook behind, and interleaving a baseline and a
steered stream in one thread cannot mix them.

Positions: ``all`` edits every prompt and generated position; ``generated`` edits from the last prompt token
on (the positions whose outputs predict the generated tokens), leaving the prompt's other positions (and so
its cached keys/values) untouched. BOS/pad positions are never edited: the SAE statistics exclude them and
their activations are outliers.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from ..saes import to_sae
from .config import GenerationSettings, SteeringConfig, SteeringInputError
from .edits import EditPlan, fast_encoder, steer_activations
from .prompts import prepare

if TYPE_CHECKING:
    from sae_lens import SAE
    from transformers import PreTrainedTokenizerBase

    from ..runtime import Runtime


class _Halt(Exception):
    """Raised by the hook to end a forward pass once the activation it needs is recorded."""


class _StepHook:
    """The per-forward-pass function given to ``HookSite.intervene``: edits and/or records activations.

    The loop sets ``start`` (absolute position of the chunk's first token) and ``chunk`` (``[1, L]`` ids)
    before each forward pass; ``act`` arrives as ``[1, L, d_in]``.
    """

    def __init__(
        self,
        sae: SAE[Any],
        plan: EditPlan | None,
        edit_from: int,
        special: set[int],
        record_features: torch.Tensor | None,
        record_from: int,
    ):
        self.sae = sae
        self.encode = fast_encoder(sae)
        self.plan = plan
        self.edit_from = edit_from  # first absolute position edited
        self.special = special
        self.record_features = record_features  # [n] or None
        self.record_from = record_from  # absolute position of the first generated token
        self.start = 0
        self.chunk: torch.Tensor = torch.zeros(1, 0, dtype=torch.long)
        self.halt = False
        self.pre_x: list[torch.Tensor] = []  # per generated token: [d_in] activation arriving at the hook
        self.post_x: list[torch.Tensor | None] = []  # per generated token: [d_in] edited activation (None: unedited)

    @torch.no_grad()
    def finalize(self, n: int, chunk: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
        """The recorded features' activations on the first ``n`` generated tokens: ``(before, after)``, each
        ``[n, n_features]`` float32 on CPU; before = ``encode(x)``, after = ``encode(x_edited)``."""
        assert self.record_features is not None
        feats = self.record_features
        k = int(feats.numel())
        n = min(n, len(self.pre_x))
        if n == 0:
            return torch.zeros(0, k), torch.zeros(0, k)

        def enc(rows: list[torch.Tensor]) -> torch.Tensor:
            parts = [self.encode(torch.stack(rows[i : i + chunk]))[:, feats] for i in range(0, len(rows), chunk)]
            return torch.cat(parts).float().cpu()

        before = enc(self.pre_x[:n])
        after = before.clone()
        edited = [i for i in range(n) if self.post_x[i] is not None]
        if edited:
            after[edited] = enc([self.post_x[i] for i in edited])  # type: ignore[misc]
        return before, after

    def _encode(self, x: torch.Tensor) -> torch.Tensor:
        w = self.sae.W_dec
        return self.encode(x if (x.dtype == w.dtype and x.device == w.device) else x.to(w.device, w.dtype))

    def __call__(self, act: torch.Tensor) -> torch.Tensor | None:
        L = act.shape[1]
        rec_lo = self.record_from + len(self.pre_x)
        plan = self.plan if self.plan is not None and self.plan.features.numel() else None
        if L == 1:  # decode step: plain Python ints, no position tensors
            p = self.start
            edit = plan is not None and p >= self.edit_from and int(self.chunk[0, 0]) not in self.special
            rec_idx = slice(0, 1) if self.record_features is not None and p >= rec_lo else None
            mask = None
        else:
            pos = torch.arange(self.start, self.start + L)
            keep = pos >= self.edit_from
            for sid in self.special:
                keep &= self.chunk[0].cpu() != sid
            edit = plan is not None and bool(keep.any())
            mask = keep.unsqueeze(0)
            rec_idx = None
            if self.record_features is not None:
                r = (pos >= rec_lo).nonzero().flatten()
                rec_idx = r if r.numel() else None
        out = None
        if edit:
            assert plan is not None
            f = self._encode(act) if plan.needs_encode else None
            out, _ = steer_activations(self.sae, act, plan, mask, f=f)
        if rec_idx is not None:
            # keep the activations; finalize() encodes them all at once (same values, far cheaper per token)
            pre = to_sae(self.sae, act[0, rec_idx].detach()).clone()
            self.pre_x.extend(pre)
            if out is None:
                self.post_x.extend([None] * pre.shape[0])
            else:
                self.post_x.extend(to_sae(self.sae, out[0, rec_idx].detach()).clone())
        if self.halt:
            raise _Halt()
        return out


@dataclass
class GenerationResult:
    """One finished (or stopped) generation."""

    steered: bool
    prompt_ids: list[int]
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    finish: str = ""  # 'eos' | 'length' | 'closed' | 'error'
    features: list[int] = field(default_factory=list)
    # [n_generated, n_features], filled when the stream finishes or is closed (None while running / on error)
    acts_before: torch.Tensor | None = None  # before the edit (in the steered run)
    acts_after: torch.Tensor | None = None  # [n_generated, n_features] after the edit
    notes: list[str] = field(default_factory=list)


def _sample(logits: torch.Tensor, g: GenerationSettings, gen: torch.Generator) -> int:
    """Next token from ``[vocab]`` logits: argmax when temperature is 0, else temperature + top-p."""
    logits = logits.float().cpu()
    if bool(torch.isnan(logits).any()) or bool(torch.isposinf(logits).any()) or not bool(torch.isfinite(logits).any()):
        raise SteeringInputError(
            "the model produced NaN/inf logits: the edit is too large for this model or dtype; use a smaller value"
        )
    if g.temperature <= 0:
        return int(torch.argmax(logits))
    probs = torch.softmax(logits / g.temperature, dim=-1)
    if g.top_p < 1.0:
        sp, si = torch.sort(probs, descending=True)
        keep = (torch.cumsum(sp, 0) - sp) < g.top_p  # always keeps the top token
        sp = sp * keep
        choice = int(torch.multinomial(sp / sp.sum(), 1, generator=gen))
        return int(si[choice])
    return int(torch.multinomial(probs, 1, generator=gen))


def _decode(tok: PreTrainedTokenizerBase, ids: list[int]) -> str:
    return str(tok.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False))


def _common_prefix(a: str, b: str) -> int:
    """Length of the common prefix of ``a`` and ``b`` (decoding is normally prefix-stable; if a tokenizer
    rewrites earlier text, the stream emits only the new tail and ``result.text`` stays exact)."""
    if b.startswith(a):
        return len(a)
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


class GenerationStream:
    """Token-by-token generation; iterate for text pieces, read ``result`` any time (filled as it runs).

    ``steer=False`` runs the unedited model (hook-free unless ``record`` asks for the steered features'
    natural activations); ``steer=True`` applies ``config.edits``. ``close()`` (or dropping the stream) stops
    it; no hook outlives a forward pass.
    """

    def __init__(
        self,
        rt: Runtime,
        config: SteeringConfig,
        *,
        steer: bool = True,
        max_acts: Mapping[int, float] | None = None,
        record: bool = True,
        stop_at_eos: bool = True,
        ids: torch.Tensor | None = None,
        notes: list[str] | None = None,
    ):
        if ids is None:
            ids, notes = prepare(rt, config, max_acts)
        self.rt = rt
        self.config = config
        self.steer = steer
        self.stop_at_eos = stop_at_eos
        feats = [e.feature for e in config.edits]
        self.result = GenerationResult(
            steered=steer, prompt_ids=ids[0].tolist(), features=feats, notes=list(notes or [])
        )
        n_prompt = int(ids.shape[1])
        plan = EditPlan.build(rt.sae, config.edits, max_acts) if steer and config.edits else None
        want_rec = record and bool(feats)
        self._hook: _StepHook | None = None
        if plan is not None or want_rec:
            self._hook = _StepHook(
                rt.sae,
                plan,
                edit_from=0 if config.positions == "all" else n_prompt - 1,
                special=rt.special_ids(),
                record_features=torch.tensor(feats, dtype=torch.long, device=rt.sae.W_dec.device) if want_rec else None,
                record_from=n_prompt,
            )
        self._ids = ids
        self._step = rt.loaded.step
        self._incremental = rt.loaded.incremental
        self._it = self._run()

    # iterator protocol
    def __iter__(self) -> Iterator[str]:
        return self

    def __next__(self) -> str:
        return next(self._it)

    def close(self) -> None:
        self._it.close()

    def _forward(self, chunk: torch.Tensor, start: int, cache: Any, halt: bool = False) -> tuple[torch.Tensor, Any]:
        """One forward pass over ``chunk`` ``[1, L]`` at absolute ``start``; returns last logits ``[vocab]``."""
        dev = self.rt.loaded.device
        hook = self._hook
        with torch.no_grad():
            if hook is not None:
                hook.start, hook.chunk, hook.halt = start, chunk, halt
                with self.rt.site.intervene(hook):
                    return self._step(chunk.to(dev), cache)
            return self._step(chunk.to(dev), cache)

    def _run(self) -> Iterator[str]:
        res = self.result
        g = self.config.generation
        tok = self.rt.tokenizer
        incremental = self._incremental
        stops = self.rt.loaded.eos_ids() if self.stop_at_eos else set()
        gen = torch.Generator(device="cpu").manual_seed(int(g.seed))
        ids = self._ids
        all_ids = ids[0].tolist()
        res.finish = "closed"
        shown = ""
        try:
            logits, cache = self._forward(ids, 0, None)
            for _ in range(g.max_new_tokens):
                nxt = _sample(logits, g, gen)
                if nxt in stops:
                    res.finish = "eos"
                    break
                all_ids.append(nxt)
                res.token_ids.append(nxt)
                text = _decode(tok, res.token_ids)
                if not text.endswith("\ufffd"):  # hold back half of a multi-byte character
                    piece = text[_common_prefix(shown, text) :]
                    shown = text
                    res.text = text
                    if piece:
                        yield piece
                if len(res.token_ids) == g.max_new_tokens:
                    res.finish = "length"
                    break
                step = torch.tensor([[nxt]], dtype=torch.long)
                if incremental:
                    logits, cache = self._forward(step, len(all_ids) - 1, cache)
                else:
                    logits, _ = self._forward(torch.tensor([all_ids]), 0, None)
            res.text = _decode(tok, res.token_ids)
            if res.text != shown and res.text[_common_prefix(shown, res.text) :]:
                yield res.text[_common_prefix(shown, res.text) :]
            # activation on the last generated token: one more pass, stopped at the hook
            hook = self._hook
            if hook is not None and hook.record_features is not None and len(hook.pre_x) < len(res.token_ids):
                last = torch.tensor([[all_ids[-1]]]) if incremental else torch.tensor([all_ids])
                try:
                    self._forward(last, len(all_ids) - 1 if incremental else 0, cache, halt=True)
                except _Halt:
                    pass
        except GeneratorExit:
            res.finish = "closed"
            raise
        except BaseException:
            res.finish = "error"
            raise
        finally:
            hook = self._hook
            if hook is not None and hook.record_features is not None and res.finish != "error":
                res.acts_before, res.acts_after = hook.finalize(len(res.token_ids))


def generate(
    rt: Runtime,
    config: SteeringConfig,
    *,
    steer: bool = True,
    max_acts: Mapping[int, float] | None = None,
    record: bool = True,
    stop_at_eos: bool = True,
) -> GenerationResult:
    """Run a whole generation (see ``GenerationStream``) and return its result."""
    s = GenerationStream(rt, config, steer=steer, max_acts=max_acts, record=record, stop_at_eos=stop_at_eos)
    for _ in s:
        pass
    return s.result


def paired_streams(
    rt: Runtime,
    config: SteeringConfig,
    max_acts: Mapping[int, float] | None = None,
    *,
    record: bool = True,
) -> dict[str, GenerationStream]:
    """``{'baseline': ..., 'steered': ...}`` streams on the same prompt ids and sampling seed (validated once;
    raises SteeringInputError)."""
    ids, notes = prepare(rt, config, max_acts)
    return {
        "baseline": GenerationStream(rt, config, steer=False, max_acts=max_acts, record=record, ids=ids, notes=notes),
        "steered": GenerationStream(rt, config, steer=True, max_acts=max_acts, record=record, ids=ids, notes=notes),
    }


def interleave(streams: Mapping[str, GenerationStream]) -> Iterator[tuple[str, str]]:
    """Advance the streams in turn, one token each, yielding ``(name, piece)`` until all are done. Closing
    this generator closes every stream."""
    live = dict(streams)
    try:
        while live:
            for name in list(live):
                try:
                    piece = next(live[name])
                except StopIteration:
                    del live[name]
                    continue
                yield name, piece
    finally:
        for s in streams.values():
            s.close()


def side_by_side(
    rt: Runtime,
    config: SteeringConfig,
    max_acts: Mapping[int, float] | None = None,
    *,
    record: bool = True,
) -> Iterator[tuple[str, str, GenerationStream]]:
    """Baseline and steered generation interleaved token by token: yields ``(which, piece, stream)`` with
    ``which`` in {'baseline', 'steered'}. Closing this generator closes both streams."""
    streams = paired_streams(rt, config, max_acts, record=record)
    events = interleave(streams)
    try:
        for name, piece in events:
            yield name, piece, streams[name]
    finally:
        events.close()
