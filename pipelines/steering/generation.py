"""Streamed generation with and without steering: our own token loop around the model.

Generation runs our own token loop (KV cache for Hugging Face models) so that baseline and steered runs are
streamed token by token, share the sampling seed, and the steered features' activations on the generated
tokens are measured inside the steered run. The hook is entered around each forward pass only (never across a
``yield``), so an abandoned or closed stream never leaves a hook behind, and interleaving a baseline and a
steered stream in one thread cannot mix them.

Batches: ``BatchStream`` runs several rows from the same prompt in lockstep (one forward pass per token for
all of them, one KV cache), each with its own edit values (a per-row tensor in the edit plan), its own
sampling generator, or no edit at all (the hook's per-row mask); ``GenerationStream`` is its one-row case.
Sweeps use it to run a grid of strengths x seeds as one batch.

Positions: ``all`` edits every prompt and generated position; ``generated`` edits from the last prompt token
on (the positions whose outputs predict the generated tokens), leaving the prompt's other positions (and so
its cached keys/values) untouched. BOS/pad positions are never edited: the SAE statistics exclude them and
their activations are outliers.
"""

from __future__ import annotations

import threading
from collections.abc import Generator, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, Literal

import torch

from featuredict.pipelines.model.saes import fast_encoder, to_sae
from featuredict.pipelines.steering.config import FeatureEdit, GenerationSettings, SteeringConfig, SteeringInputError
from featuredict.pipelines.steering.edits import EditPlan, plan_values, steer_activations
from featuredict.pipelines.steering.formatting import prepare

if TYPE_CHECKING:
    from sae_lens import SAE
    from transformers import PreTrainedTokenizerBase

    from featuredict.pipelines.model.backends import ModelBackend
    from featuredict.pipelines.model.runtime import Runtime


class _Halt(Exception):
    """Raised by the hook to end a forward pass once the activation it needs is recorded."""


@dataclass(frozen=True)
class RowSpec:
    """One row of a batched generation: steered or not, its sampling seed and, for a steered row, its own
    edits (the config's features and methods, other values, as a sweep makes them; None: the config's)."""

    steer: bool
    seed: int
    edits: tuple[FeatureEdit, ...] | None = None


class _StepHook:
    """The per-forward-pass function given to ``HookSite.intervene``: edits and/or records activations.

    The loop sets ``start`` (absolute position of the chunk's first token) and ``chunk`` (``[rows, L]`` ids)
    before each forward pass; ``act`` arrives as ``[rows, L, d_in]``. ``row_on`` (``[rows]`` bool, None: all)
    says which rows are edited; the others pass unchanged (exactly: ``torch.where``).
    """

    def __init__(
        self,
        sae: SAE[Any],
        plan: EditPlan | None,
        edit_from: int,
        special: set[int],
        record_features: torch.Tensor | None,
        record_from: int,
        row_on: list[bool] | None = None,
    ):
        self.sae = sae
        self.encode = fast_encoder(sae)
        self.plan = plan if plan is not None and plan.features.numel() else None
        self.edit_from = edit_from  # first absolute position edited
        self.special = special
        self.record_features = record_features  # [n] or None
        self.record_from = record_from  # absolute position of the first generated token
        self.row_on = row_on
        self._row_on_t = None if row_on is None else torch.tensor(row_on, dtype=torch.bool)
        self.start = 0
        self.chunk: torch.Tensor = torch.zeros(1, 0, dtype=torch.long)
        self.halt = False
        self.n_rec = 0  # generated positions recorded so far (the same for every row)
        self.pre_x: list[torch.Tensor] = []  # per recorded chunk: [rows, l, d_in] activations arriving at the hook
        self.post_x: list[torch.Tensor | None] = []  # per recorded chunk: edited activations (None: unedited)

    @torch.no_grad()
    def finalize(self, counts: list[int], chunk: int = 256) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The recorded features' activations on each row's first ``counts[r]`` generated tokens:
        ``(before, after)`` per row, each ``[n, n_features]`` float32 on CPU; before = ``encode(x)``, after =
        ``encode(x_edited)`` (= before where nothing was edited)."""
        assert self.record_features is not None
        feats = self.record_features
        k = int(feats.numel())
        if not self.pre_x:
            return [(torch.zeros(0, k), torch.zeros(0, k)) for _ in counts]
        pre = torch.cat(self.pre_x, dim=1)  # [rows, T, d_in]
        edited = any(p is not None for p in self.post_x)
        post = torch.cat([p if p is not None else x for p, x in zip(self.post_x, self.pre_x, strict=True)], 1)

        def enc(rows: torch.Tensor) -> torch.Tensor:
            if rows.shape[0] == 0:
                return torch.zeros(0, k)
            parts = [self.encode(rows[i : i + chunk])[:, feats] for i in range(0, rows.shape[0], chunk)]
            return torch.cat(parts).float().cpu()

        out = []
        for r, n in enumerate(counts):
            n = min(n, pre.shape[1])
            before = enc(pre[r, :n])
            out.append((before, enc(post[r, :n]) if edited and (self.row_on is None or self.row_on[r]) else before))
        return out

    def _encode(self, x: torch.Tensor) -> torch.Tensor:
        w = self.sae.W_dec
        return self.encode(x if (x.dtype == w.dtype and x.device == w.device) else x.to(w.device, w.dtype))

    def _mask(self, L: int) -> tuple[bool, torch.Tensor | None]:
        """(edit at all, ``[rows, L]`` bool mask or None for every position of every row)."""
        plan, chunk = self.plan, self.chunk
        if plan is None:
            return False, None
        rows = chunk.shape[0]
        if L == 1 and rows == 1:  # single decode step: plain Python ints, no position tensors
            on = self.start >= self.edit_from and int(chunk[0, 0]) not in self.special
            return on and (self.row_on is None or self.row_on[0]), None
        pos = torch.arange(self.start, self.start + L)
        keep = (pos >= self.edit_from).unsqueeze(0).expand(rows, L)
        ids = chunk.cpu()
        for sid in self.special:
            keep = keep & (ids != sid)
        if self._row_on_t is not None:
            keep = keep & self._row_on_t.unsqueeze(1)
        return bool(keep.any()), keep

    def __call__(self, act: torch.Tensor) -> torch.Tensor | None:
        L = act.shape[1]
        rec_lo = self.record_from + self.n_rec
        if L == 1:
            rec_idx: slice | torch.Tensor | None = (
                slice(0, 1) if self.record_features is not None and self.start >= rec_lo else None
            )
        else:
            rec_idx = None
            if self.record_features is not None:
                r = (torch.arange(self.start, self.start + L) >= rec_lo).nonzero().flatten()
                rec_idx = r if r.numel() else None
        edit, mask = self._mask(L)
        out = None
        if edit:
            assert self.plan is not None
            f = self._encode(act) if self.plan.needs_encode else None
            out, _ = steer_activations(self.sae, act, self.plan, mask, f=f)
        if rec_idx is not None:
            # keep the activations; finalize() encodes them all at once (same values, far cheaper per token)
            pre = to_sae(self.sae, act[:, rec_idx].detach()).clone()
            self.pre_x.append(pre)
            self.post_x.append(None if out is None else to_sae(self.sae, out[:, rec_idx].detach()).clone())
            self.n_rec += pre.shape[1]
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
    seed: int = 0
    edits: tuple[FeatureEdit, ...] = ()  # the edits this run applied (empty when unsteered)
    # [n_generated, vocab] float32 on CPU: the logits each generated token was chosen from (keep_logits only)
    logits: torch.Tensor | None = None
    error: str = ""  # the one-line reason when a row of a batch stopped on an error


def _sample(logits: torch.Tensor, g: GenerationSettings, gen: torch.Generator) -> int:
    """Next token from ``[vocab]`` logits: argmax when temperature is 0, else temperature + top-p."""
    logits = logits.float().cpu()
    if bool(torch.isnan(logits).any()) or bool(torch.isposinf(logits).any()) or not bool(torch.isfinite(logits).any()):
        raise SteeringInputError(NAN_MESSAGE)
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


NAN_MESSAGE = "the model produced NaN/inf logits: the edit is too large for this model or dtype; use a smaller value"


def _sample_rows(
    logits: torch.Tensor, g: GenerationSettings, gens: list[torch.Generator], live: list[int]
) -> dict[int, int | None]:
    """Next token of each live row from ``[rows, vocab]`` logits (None: the row's logits are NaN/inf). Greedy
    rows are chosen in one argmax; sampled rows one by one with their own generator (as ``_sample``)."""
    if g.temperature > 0:
        out: dict[int, int | None] = {}
        for r in live:
            try:
                out[r] = _sample(logits[r], g, gens[r])
            except SteeringInputError:
                out[r] = None
        return out
    lf = logits.float().cpu()
    bad = (torch.isnan(lf).any(-1) | torch.isposinf(lf).any(-1) | ~torch.isfinite(lf).any(-1)).tolist()
    best = torch.argmax(lf, dim=-1).tolist()
    return {r: None if bad[r] else int(best[r]) for r in live}


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


def _model_logits(output: Any) -> torch.Tensor | None:
    """``[rows, pos, vocab]`` logits from a model's forward output (a tensor, or an object with ``logits``)."""
    if isinstance(output, torch.Tensor):
        return output
    t = getattr(output, "logits", None)
    if isinstance(t, torch.Tensor):
        return t
    if isinstance(output, tuple) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    return None


def step_rows(loaded: ModelBackend, chunk: torch.Tensor, cache: Any) -> tuple[torch.Tensor, Any]:
    """``loaded.step`` for ``[rows, L]`` chunks: ``([rows, vocab]`` last-position logits, new cache).

    The adapter's ``step`` returns row 0's logits only, so for more than one row the model's own output is
    read by a forward hook on the model, active for this thread and this call only (removed in ``finally``).
    """
    if chunk.shape[0] == 1:
        logits, cache = loaded.step(chunk, cache)
        return logits.unsqueeze(0), cache
    tid = threading.get_ident()
    seen: list[torch.Tensor] = []

    def grab(module: torch.nn.Module, inputs: Any, output: Any) -> None:
        if threading.get_ident() == tid:
            t = _model_logits(output)
            if t is not None:
                seen.append(t)

    handle = loaded.model.register_forward_hook(grab)
    try:
        _, cache = loaded.step(chunk, cache)
    finally:
        handle.remove()
    if not seen or seen[-1].shape[0] != chunk.shape[0]:
        raise RuntimeError("could not read every row's logits from the model's output")
    return seen[-1][:, -1], cache


class BatchStream:
    """Generation of several rows in lockstep from one prompt (shared KV cache batch, one forward pass per
    token for all rows); iterate for ``(row, piece)`` text pieces, read ``results`` any time.

    Every row starts from the same prompt ids, so no padding is needed: rows differ only in whether they are
    steered (the hook's per-row mask), their edits' values (``EditPlan.values`` ``[rows, 1, n]``) and their
    sampling seed (one generator per row, consumed exactly as a one-row run consumes it). A row that ends
    (EOS, or NaN logits with ``row_errors='stop'``) is fed padding until every row is done; its result stops
    where it ended. ``stream=False`` skips the per-token decoding (iterate to run, or call ``run``).
    """

    def __init__(
        self,
        rt: Runtime,
        config: SteeringConfig,
        rows: Sequence[RowSpec],
        *,
        ids: torch.Tensor,
        notes: list[str] | None = None,
        max_acts: Mapping[int, float] | None = None,
        record: bool = True,
        stop_at_eos: bool = True,
        keep_logits: bool = False,
        stream: bool = True,
        row_errors: Literal["raise", "stop"] = "raise",
        max_logit_bytes: int | None = None,
    ):
        if not rows:
            raise ValueError("a batch needs at least one row")
        if row_errors not in ("raise", "stop"):
            raise ValueError(f"row_errors must be 'raise' or 'stop', not {row_errors!r}")
        self.rt = rt
        self.config = config
        self.rows = tuple(rows)
        self.stop_at_eos = stop_at_eos
        self.keep_logits = keep_logits
        self.stream = stream
        self.row_errors = row_errors
        self.max_logit_bytes = max_logit_bytes
        feats = [e.feature for e in config.edits]
        self.results = [
            GenerationResult(
                steered=r.steer,
                prompt_ids=ids[0].tolist(),
                features=feats,
                notes=list(notes or []),
                seed=r.seed,
                edits=(r.edits if r.edits is not None else config.edits) if r.steer else (),
            )
            for r in self.rows
        ]
        n_prompt = int(ids.shape[1])
        plan = self._plan(max_acts)
        want_rec = record and bool(feats)
        self._hook: _StepHook | None = None
        if plan is not None or want_rec:
            row_on = None if all(r.steer for r in self.rows) else [r.steer for r in self.rows]
            self._hook = _StepHook(
                rt.sae,
                plan,
                edit_from=0 if config.positions == "all" else n_prompt - 1,
                special=rt.special_ids(),
                record_features=torch.tensor(feats, dtype=torch.long, device=rt.sae.W_dec.device) if want_rec else None,
                record_from=n_prompt,
                row_on=row_on,
            )
        self._ids = ids
        self._step = rt.backend.step
        self._incremental = rt.backend.incremental
        self._it = self._run()

    def _plan(self, max_acts: Mapping[int, float] | None) -> EditPlan | None:
        steered = [r for r in self.rows if r.steer]
        edits = self.config.edits
        if not steered or not edits:
            return None
        plan = EditPlan.build(self.rt.sae, edits, max_acts)
        own = [r.edits for r in self.rows if r.steer and r.edits is not None]
        for e in own:
            if [(x.feature, x.mode) for x in e] != [(x.feature, x.mode) for x in edits]:
                raise ValueError("a row's edits must have the config's features and methods, in order")
        if not own:
            return plan
        values = [plan_values(r.edits if r.edits is not None else edits, max_acts) for r in self.rows]
        if len(self.rows) == 1:
            return replace(plan, values=plan.values.new_tensor(values[0]))
        return replace(plan, values=plan.values.new_tensor(values).unsqueeze(1))  # [rows, 1, n]

    # iterator protocol
    def __iter__(self) -> Iterator[tuple[int, str]]:
        return self

    def __next__(self) -> tuple[int, str]:
        return next(self._it)

    def close(self) -> None:
        self._it.close()

    def run(self) -> list[GenerationResult]:
        """Run to the end; return ``results``."""
        for _ in self:
            pass
        return self.results

    def _forward(self, chunk: torch.Tensor, start: int, cache: Any, halt: bool = False) -> tuple[torch.Tensor, Any]:
        """One forward pass over ``chunk`` ``[rows, L]`` at absolute ``start``; ``([rows, vocab]`` last logits,
        cache)."""
        dev = self.rt.backend.device
        hook = self._hook
        with torch.no_grad():
            if chunk.shape[0] == 1:  # one row: the adapter's own step, no output hook
                if hook is not None:
                    hook.start, hook.chunk, hook.halt = start, chunk, halt
                    with self.rt.site.intervene(hook):
                        logits, cache = self._step(chunk.to(dev), cache)
                else:
                    logits, cache = self._step(chunk.to(dev), cache)
                return logits.unsqueeze(0), cache
            if hook is not None:
                hook.start, hook.chunk, hook.halt = start, chunk, halt
                with self.rt.site.intervene(hook):
                    return step_rows(self.rt.backend, chunk.to(dev), cache)
            return step_rows(self.rt.backend, chunk.to(dev), cache)

    def _check_memory(self, vocab: int) -> None:
        need = len(self.rows) * self.config.generation.max_new_tokens * vocab * 4
        if self.keep_logits and self.max_logit_bytes is not None and need > self.max_logit_bytes:
            raise SteeringInputError(
                f"{len(self.rows)} rows x {self.config.generation.max_new_tokens} tokens would keep "
                f"{need / 2**20:.0f} MiB of logits for the quality scores (limit {self.max_logit_bytes / 2**20:.0f} "
                "MiB); use fewer strengths or seeds, or fewer new tokens"
            )

    def _run(self) -> Generator[tuple[int, str], None, None]:
        """The token loop: sample every live row, accept the picks, stream the new text, advance one step."""
        results = self.results
        n_rows = len(self.rows)
        gens = [torch.Generator(device="cpu").manual_seed(int(r.seed)) for r in self.rows]
        ids = self._ids.expand(n_rows, -1).contiguous() if n_rows > 1 else self._ids
        seqs = [ids[0].tolist() for _ in range(n_rows)]
        kept: list[list[torch.Tensor]] = [[] for _ in range(n_rows)]
        shown = [""] * n_rows
        live = list(range(n_rows))
        stops = self.rt.backend.eos_ids() if self.stop_at_eos else set()
        vocab = 0
        for res in results:
            res.finish = "closed"
        try:
            logits, cache = self._forward(ids, 0, None)
            vocab = int(logits.shape[-1])
            self._check_memory(vocab)
            while live:
                self._accept(self._pick(logits, gens, live), logits, live, kept, stops)
                if self.stream:
                    yield from self._new_pieces(shown)
                if not live:
                    break
                logits, cache = self._advance(seqs, live, cache)
            yield from self._final_texts(shown)
            self._record_last(results, seqs, cache)
        except GeneratorExit:
            for res in results:
                res.finish = "closed" if res.finish not in ("eos", "length") else res.finish
            raise
        except BaseException:
            for res in results:
                res.finish = "error"
            raise
        finally:
            self._collect(kept, vocab)

    def _pick(self, logits: torch.Tensor, gens: list[torch.Generator], live: list[int]) -> dict[int, int | None]:
        """The next token of every live row (None where its logits are NaN/inf)."""
        g = self.config.generation
        if len(self.rows) > 1:
            return _sample_rows(logits, g, gens, live)
        try:
            return {0: _sample(logits[0], g, gens[0])}
        except SteeringInputError:  # NaN/inf logits
            return {0: None}

    def _accept(
        self,
        picks: dict[int, int | None],
        logits: torch.Tensor,
        live: list[int],
        kept: list[list[torch.Tensor]],
        stops: set[int],
    ) -> None:
        """Append each row's pick, or end the row (error, EOS, length); ended rows leave ``live``."""
        max_new = self.config.generation.max_new_tokens
        for r in list(live):
            res, nxt = self.results[r], picks[r]
            if nxt is None:
                if self.row_errors == "raise":
                    raise SteeringInputError(NAN_MESSAGE)
                res.finish, res.error = "error", NAN_MESSAGE
                live.remove(r)
                continue
            if nxt in stops:
                res.finish = "eos"
                live.remove(r)
                continue
            res.token_ids.append(nxt)
            if self.keep_logits:
                kept[r].append(logits[r].clone())  # a copy: the step's logits may view a larger tensor
            if len(res.token_ids) == max_new:
                res.finish = "length"
                live.remove(r)

    def _new_pieces(self, shown: list[str]) -> Iterator[tuple[int, str]]:
        tok = self.rt.tokenizer
        for r in range(len(self.rows)):
            piece = self._piece(r, tok, shown)
            if piece:
                yield r, piece

    def _advance(self, seqs: list[list[int]], live: list[int], cache: Any) -> tuple[torch.Tensor, Any]:
        """One forward step: each live row's last token (ended rows get padding) through the KV cache, or the
        whole sequences again where the model has no incremental path."""
        step = [self.results[r].token_ids[-1] if r in live else self.rt.pad_id for r in range(len(self.rows))]
        for r, seq in enumerate(seqs):
            seq.append(step[r])
        if self._incremental:
            return self._forward(torch.tensor(step).unsqueeze(1), len(seqs[0]) - 1, cache)
        logits, _ = self._forward(torch.tensor(seqs), 0, None)
        return logits, cache

    def _final_texts(self, shown: list[str]) -> Iterator[tuple[int, str]]:
        """Decode every row's tokens; when streaming, yield what the pieces held back (a split character)."""
        tok = self.rt.tokenizer
        for r, res in enumerate(self.results):
            res.text = _decode(tok, res.token_ids)
            if self.stream and res.text != shown[r] and res.text[_common_prefix(shown[r], res.text) :]:
                yield r, res.text[_common_prefix(shown[r], res.text) :]

    def _collect(self, kept: list[list[torch.Tensor]], vocab: int) -> None:
        """Hand the recorded activations and kept logits to the results (also after an early close)."""
        results = self.results
        hook = self._hook
        if hook is not None and hook.record_features is not None and not any(r.finish == "error" for r in results):
            for res, (before, after) in zip(results, hook.finalize([len(r.token_ids) for r in results]), strict=True):
                res.acts_before, res.acts_after = before, after
        if self.keep_logits:
            for res, rows in zip(results, kept, strict=True):
                res.logits = torch.stack(rows).float().cpu() if rows else torch.zeros(0, vocab)

    def _piece(self, r: int, tok: PreTrainedTokenizerBase, shown: list[str]) -> str:
        res = self.results[r]
        text = _decode(tok, res.token_ids)
        if text.endswith("\ufffd") or text == shown[r]:  # hold back half of a multi-byte character
            return ""
        piece = text[_common_prefix(shown[r], text) :]
        shown[r] = text
        res.text = text
        return piece

    def _record_last(self, results: list[GenerationResult], seqs: list[list[int]], cache: Any) -> None:
        """The activation on each row's last generated token: one more pass, stopped at the hook."""
        hook = self._hook
        if hook is None or hook.record_features is None:
            return
        if not any(hook.n_rec < len(res.token_ids) for res in results):
            return
        last = [res.token_ids[-1] if res.token_ids else seqs[r][-1] for r, res in enumerate(results)]
        full = [s + [last[r]] for r, s in enumerate(seqs)]
        try:
            if self._incremental:
                self._forward(torch.tensor(last).unsqueeze(1), len(full[0]) - 1, cache, halt=True)
            else:
                self._forward(torch.tensor(full), 0, None, halt=True)
        except _Halt:
            pass


class GenerationStream:
    """Token-by-token generation; iterate for text pieces, read ``result`` any time (filled as it runs).

    ``steer=False`` runs the unedited model (hook-free unless ``record`` asks for the steered features'
    natural activations); ``steer=True`` applies ``config.edits``. ``keep_logits`` keeps the logits each token
    was chosen from (for ``quality.score_rows``). ``close()`` (or dropping the stream) stops it; no hook
    outlives a forward pass. A one-row ``BatchStream``.
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
        keep_logits: bool = False,
    ):
        if ids is None:
            ids, notes = prepare(rt, config, max_acts)
        self.rt = rt
        self.config = config
        self.steer = steer
        self._batch = BatchStream(
            rt,
            config,
            [RowSpec(steer, config.generation.seed)],
            ids=ids,
            notes=notes,
            max_acts=max_acts,
            record=record,
            stop_at_eos=stop_at_eos,
            keep_logits=keep_logits,
        )
        self.result = self._batch.results[0]

    # iterator protocol
    def __iter__(self) -> Iterator[str]:
        return self

    def __next__(self) -> str:
        return next(self._batch)[1]

    def close(self) -> None:
        self._batch.close()


def generate(rt: Runtime, config: SteeringConfig, **options: Any) -> GenerationResult:
    """Run a whole generation and return its result; ``options`` are ``GenerationStream``'s (``steer``,
    ``max_acts``, ``record``, ``stop_at_eos``, ``keep_logits``)."""
    s = GenerationStream(rt, config, **options)
    for _ in s:
        pass
    return s.result


def paired_streams(
    rt: Runtime,
    config: SteeringConfig,
    max_acts: Mapping[int, float] | None = None,
    *,
    record: bool = True,
    keep_logits: bool = False,
) -> dict[str, GenerationStream]:
    """``{'baseline': ..., 'steered': ...}`` streams on the same prompt ids and sampling seed (validated once;
    raises SteeringInputError). ``keep_logits`` for ``quality.score_rows``."""
    ids, notes = prepare(rt, config, max_acts)
    kw: dict[str, Any] = {
        "max_acts": max_acts,
        "record": record,
        "ids": ids,
        "notes": notes,
        "keep_logits": keep_logits,
    }
    return {
        "baseline": GenerationStream(rt, config, steer=False, **kw),
        "steered": GenerationStream(rt, config, steer=True, **kw),
    }


def interleave(streams: Mapping[str, GenerationStream]) -> Generator[tuple[str, str], None, None]:
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
