"""Attribution of one output to SAE features, error nodes and input tokens: activation x gradient.

For a scalar target ``T`` (see ``Target``) and an SAE at hook ``l`` with activations ``x_l[p]`` (position ``p``),
``x_l[p] = s(x) * sum_i f_i D_i + b(x) + e[p]`` (features ``f``, effective decoder rows ``D``, the decoder's
constant part ``b`` and the error ``e``). With ``g[p] = dT/dx_l[p]`` from one backward pass:

    grad(f_i at p)  = s(x) * (D_i . g[p])          attribution = f_i * grad
    error node at p = e[p] . g[p]
    token at p      = emb[p] . dT/demb[p]            (the input embedding, the graph's token nodes)

This is attribution patching against the zero baseline (Marks et al., "Sparse Feature Circuits"): the linear
estimate of the change of ``T`` when the node is removed. Each SAE's nodes are taken in the plain model (the
splice ``decode(encode(x)) + error`` is the identity in value and in gradient), so several SAEs do not change
one another's figures. ``mode='direct'`` takes the gradient on the model with attention patterns and norm
scales frozen at their clean values (``freeze.frozen``, circuit-tracer's linearisation); ``'full'`` on the model
as it is.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager, nullcontext
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import torch

from featuredict.pipelines.attribution.freeze import end_recording, frozen
from featuredict.pipelines.attribution.splice import Slot
from featuredict.pipelines.model.backends import ModelBackend
from featuredict.pipelines.model.runtime import token_strings
from featuredict.pipelines.model.saes import to_sae
from featuredict.pipelines.steering.edits import decoder_directions, output_scale

Mode = Literal["full", "direct"]
MODES: tuple[Mode, ...] = ("full", "direct")
MAX_PROMPT_TOKENS = 512


class AttributionInputError(ValueError):
    """Input the attribution cannot use (one line, fit for a user)."""


@dataclass(frozen=True)
class Target:
    """What is explained, read from the logits at ``position`` (the position whose next token is predicted).

    kind ``logprob``: ``log softmax(logits)[token]``; ``logit``: ``logits[token]``; ``contrast``:
    ``logits[token] - logits[other]``.
    """

    kind: Literal["logprob", "logit", "contrast"]
    position: int
    token: int
    other: int | None = None
    label: str = ""

    def value(self, logits: torch.Tensor) -> torch.Tensor:
        """``[batch]`` target values from logits ``[batch, pos, vocab]``."""
        row = logits[:, self.position].float()
        if self.kind == "logprob":
            return torch.log_softmax(row, dim=-1)[:, self.token]
        if self.kind == "logit":
            return row[:, self.token]
        assert self.other is not None
        return row[:, self.token] - row[:, self.other]

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Prompt:
    """Token ids ``[1, T]`` with their display strings and, for a chat, the assistant spans ``[start, end)``."""

    ids: torch.Tensor
    tokens: list[str]
    text: str
    assistant_spans: list[tuple[int, int]] = field(default_factory=list)

    @property
    def length(self) -> int:
        return int(self.ids.shape[1])


def one_token(tokenizer: Any, text: str) -> int:
    """The id of ``text`` when it is exactly one token (AttributionInputError otherwise)."""
    if text.startswith("#") and text[1:].isdigit():
        tid = int(text[1:])
        if tid >= len(tokenizer):
            raise AttributionInputError(f"token id {tid} is past the vocabulary ({len(tokenizer)})")
        return tid
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if len(ids) != 1:
        pieces = token_strings(tokenizer, ids)
        raise AttributionInputError(
            f"target {text!r} is {len(ids)} tokens {pieces!r}, not one; give one token (or #ID)"
        )
    return int(ids[0])


def prompt_from_text(tokenizer: Any, text: str, prepend_bos: bool = True, limit: int = MAX_PROMPT_TOKENS) -> Prompt:
    if not text.strip():
        raise AttributionInputError("the prompt is empty")
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    bos = getattr(tokenizer, "bos_token_id", None)
    if prepend_bos and bos is not None:
        ids = [bos, *ids]
    _check_length(len(ids), limit)
    return Prompt(torch.tensor([ids], dtype=torch.long), token_strings(tokenizer, ids), text)


def _check_length(n: int, limit: int) -> None:
    if n > limit:
        raise AttributionInputError(f"the prompt is {n} tokens, over the limit of {limit} (--max-tokens)")


def read_chat(path: str) -> list[dict[str, str]]:
    """A chat file: a JSON list of ``{"role", "content"}`` messages (or ``{"messages": [...]}``)."""
    try:
        with open(path, encoding="utf-8") as fh:
            data = json.load(fh)
    except OSError as e:
        raise AttributionInputError(f"cannot read chat file {path}: {e.strerror or e}") from None
    except ValueError as e:
        raise AttributionInputError(f"chat file {path} is not JSON: {e}") from None
    msgs = data.get("messages") if isinstance(data, dict) else data
    if not isinstance(msgs, list) or not msgs:
        raise AttributionInputError("a chat file holds a non-empty JSON list of {role, content} messages")
    for m in msgs:
        if (
            not isinstance(m, dict)
            or m.get("role") not in ("system", "user", "assistant")
            or not isinstance(m.get("content"), str)
        ):
            raise AttributionInputError("each chat message needs a role (system/user/assistant) and text content")
    if not any(m["role"] == "assistant" for m in msgs):
        raise AttributionInputError("the chat has no assistant turn to explain")
    return msgs


def prompt_from_chat(tokenizer: Any, messages: list[dict[str, str]], limit: int = MAX_PROMPT_TOKENS) -> Prompt:
    """The chat template applied to ``messages``; each assistant turn's reply tokens are an assistant span."""
    if not getattr(tokenizer, "chat_template", None):
        raise AttributionInputError("this model's tokenizer has no chat template; use --prompt")

    def ids_of(msgs: list[dict[str, str]], gen: bool) -> list[int]:
        text = tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen)
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])

    full = ids_of(messages, False)
    _check_length(len(full), limit)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] == "assistant":
            start = len(ids_of(messages[:i], True))
            end = len(ids_of(messages[: i + 1], False))
            reply = tokenizer(m["content"], add_special_tokens=False)["input_ids"]
            spans.append((start, min(end, start + max(len(reply), 1))))
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    return Prompt(torch.tensor([full], dtype=torch.long), token_strings(tokenizer, full), text, spans)


def make_target(
    tokenizer: Any,
    prompt: Prompt,
    logits: torch.Tensor,
    *,
    target: str | None = None,
    contrast: tuple[str, str] | None = None,
    position: int | None = None,
) -> Target:
    """The target the user asked for (see ``Target``), checked against the prompt.

    ``position`` counts tokens from 0 (BOS included); negative counts from the end; default: the last position,
    or with a chat the position before the first token of the last assistant reply. Without ``target`` or
    ``contrast``: the log-probability of the token that actually follows ``position`` in the prompt, or at the
    last position the model's own prediction (its argmax).
    """
    n = prompt.length
    if position is None:
        position = prompt.assistant_spans[-1][0] - 1 if prompt.assistant_spans else n - 1
    if position < 0:
        position += n
    if not 0 <= position < n:
        raise AttributionInputError(f"position {position} is past the end of the prompt ({n} tokens, 0..{n - 1})")
    if prompt.assistant_spans and target is None and contrast is None and position < n - 1:
        if not any(s <= position + 1 < e for s, e in prompt.assistant_spans):
            raise AttributionInputError(
                f"token {position + 1} is not in an assistant turn (assistant tokens: "
                + ", ".join(f"{s}..{e - 1}" for s, e in prompt.assistant_spans)
                + "); pick --position N with N+1 in a reply"
            )
    if contrast is not None:
        a, b = (one_token(tokenizer, t) for t in contrast)
        if a == b:
            raise AttributionInputError("--contrast needs two different tokens")
        sa, sb = token_strings(tokenizer, [a, b])
        return Target("contrast", position, a, b, f"logit({sa!r}) - logit({sb!r}) at position {position}")
    if target is not None:
        t = one_token(tokenizer, target)
        return Target("logit", position, t, None, f"logit({token_strings(tokenizer, [t])[0]!r}) at position {position}")
    if position < n - 1:
        t = int(prompt.ids[0, position + 1])
        how = "the next token"
    else:
        t = int(logits[0, position].argmax())
        how = "the model's prediction"
    return Target(
        "logprob", position, t, None, f"log p({token_strings(tokenizer, [t])[0]!r}) at position {position} ({how})"
    )


@dataclass
class SaeNodes:
    """One SAE's nodes: active features (flattened over positions), its error nodes and validity per position."""

    name: str
    hook: str
    positions: torch.Tensor  # [n] long
    features: torch.Tensor  # [n] long
    activation: torch.Tensor  # [n]
    gradient: torch.Tensor  # [n]  dT/df
    attribution: torch.Tensor  # [n]  activation * gradient
    error_attr: torch.Tensor  # [T]  e[p] . g[p]
    error_norm: torch.Tensor  # [T]  ||e[p]||
    valid: torch.Tensor  # [T] bool

    def top(self, k: int) -> list[int]:
        """Indices into the node arrays of the ``k`` largest ``|attribution|``."""
        k = min(k, int(self.attribution.numel()))
        return self.attribution.abs().topk(k).indices.tolist() if k else []


@dataclass
class Attribution:
    mode: Mode
    target: Target
    target_value: float
    ids: torch.Tensor  # [1, T]
    tokens: list[str]
    saes: list[SaeNodes]
    token_attr: torch.Tensor  # [T]
    grads: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)  # hook -> g [1, T, d_in]
    acts: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)  # hook -> x [1, T, d_in]
    errors: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)  # hook -> error [T, d_in]
    emb: torch.Tensor | None = field(default=None, repr=False)  # [1, T, d_model] token embeddings
    top_predictions: list[tuple[str, float]] = field(default_factory=list)

    def ranked(self, k: int | None = None) -> list[dict[str, Any]]:
        """Feature nodes of every SAE, largest ``|attribution|`` first."""
        rows: list[dict[str, Any]] = []
        for s in self.saes:
            for j in range(int(s.features.numel())):
                rows.append(
                    {
                        "sae": s.name,
                        "feature": int(s.features[j]),
                        "position": int(s.positions[j]),
                        "token": self.tokens[int(s.positions[j])],
                        "activation": float(s.activation[j]),
                        "gradient": float(s.gradient[j]),
                        "attribution": float(s.attribution[j]),
                    }
                )
        rows.sort(key=lambda r: -abs(r["attribution"]))
        return rows if k is None else rows[:k]


@contextmanager
def _capture(loaded: ModelBackend, slots: Sequence[Slot], store: dict[str, torch.Tensor]) -> Iterator[None]:
    """Keep each hook's activation and the input embeddings of the passes run inside (graph kept)."""

    def keep(name: str):
        def fn(act: torch.Tensor) -> None:
            store[name] = act
            return None

        return fn

    handle = loaded.input_embedding_module().register_forward_hook(lambda m, i, o: store.__setitem__("<emb>", o))
    try:
        with ExitStack() as stack:
            for s in slots:
                stack.enter_context(s.site.intervene(keep(s.hook)))
            yield
    finally:
        handle.remove()


def gradients(
    loaded: ModelBackend, slots: Sequence[Slot], ids: torch.Tensor, target: Target
) -> tuple[torch.Tensor, dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """One forward and backward pass: ``(logits [1,T,V] detached, {hook or '<emb>': (activation, gradient)}...)``.

    Returns logits, a dict of activations (detached) and a dict of gradients, keyed by hook and ``'<emb>'``.
    """
    store: dict[str, torch.Tensor] = {}
    with torch.enable_grad(), _capture(loaded, slots, store):
        logits = loaded.forward(ids.to(loaded.device))
        value = target.value(logits)[0]
        keys = ["<emb>", *[s.hook for s in slots]]
        missing = [k for k in keys if k not in store]
        if missing:
            raise RuntimeError(f"the forward pass never reached {missing}")
        tensors = [store[k] for k in keys]
        grads = torch.autograd.grad(value, tensors, allow_unused=True)
    acts = {k: t.detach() for k, t in zip(keys, tensors, strict=True)}
    gs = {k: (torch.zeros_like(t) if g is None else g.detach()) for k, t, g in zip(keys, tensors, grads, strict=True)}
    return logits.detach(), acts, gs


def sae_nodes(slot: Slot, ids: torch.Tensor, x: torch.Tensor, g: torch.Tensor) -> tuple[SaeNodes, torch.Tensor]:
    """Activation x gradient for one SAE from its activations ``x`` and ``g = dT/dx`` (both ``[1, T, d_in]``);
    also returns the error vectors ``[T, d_in]``."""
    with torch.no_grad():
        xs = to_sae(slot.sae, x)
        gs = to_sae(slot.sae, g)
        valid = slot.valid(ids, xs)
        f, _, err = slot.parts(xs, valid)
        pos, feat = f[0].nonzero(as_tuple=True)
        act = f[0, pos, feat]
        dirs = decoder_directions(slot.sae, feat)
        grad = (dirs * gs[0, pos]).sum(-1)
        s = output_scale(slot.sae, xs)
        if s is not None:
            grad = grad * s[0, pos, 0]
        return SaeNodes(
            name=slot.name,
            hook=slot.hook,
            positions=pos.cpu(),
            features=feat.cpu(),
            activation=act.float().cpu(),
            gradient=grad.float().cpu(),
            attribution=(act * grad).float().cpu(),
            error_attr=(err[0] * gs[0]).sum(-1).float().cpu(),
            error_norm=err[0].norm(dim=-1).float().cpu(),
            valid=valid[0].cpu(),
        ), err[0]


def linearised(loaded: ModelBackend, mode: Mode, ids: torch.Tensor):
    """The block attribution and its checks run in: nothing for ``full``; for ``direct`` a frozen block whose
    recording pass (the clean prompt) has run."""
    if mode not in MODES:
        raise AttributionInputError(f"unknown mode {mode!r}; use full or direct")
    if mode == "full":
        return nullcontext()
    return _frozen_recorded(loaded, ids)


@contextmanager
def _frozen_recorded(loaded: ModelBackend, ids: torch.Tensor) -> Iterator[None]:
    with frozen(loaded) as st:
        with torch.no_grad():
            loaded.forward(ids.to(loaded.device))
        end_recording(st)
        yield


def attribute(
    loaded: ModelBackend, slots: Sequence[Slot], prompt: Prompt, target: Target, mode: Mode = "full"
) -> Attribution:
    """Attribute ``target`` to every active feature, error node and input token (see the module docstring).

    Call inside ``linearised(loaded, mode, ids)`` for ``direct`` (``run`` does that for you)."""
    ids = prompt.ids
    logits, acts, gs = gradients(loaded, slots, ids, target)
    pairs = [sae_nodes(s, ids, acts[s.hook], gs[s.hook]) for s in slots]
    nodes = [n for n, _ in pairs]
    emb, gemb = acts["<emb>"], gs["<emb>"]
    token_attr = (emb.float() * gemb.float()).sum(-1)[0].cpu()
    probs = torch.softmax(logits[0, target.position].float(), -1)
    top = probs.topk(5)
    preds = list(zip(token_strings(loaded.tokenizer, top.indices.tolist()), top.values.tolist(), strict=True))
    return Attribution(
        mode=mode,
        target=target,
        target_value=float(target.value(logits)[0]),
        ids=ids,
        tokens=prompt.tokens,
        saes=nodes,
        token_attr=token_attr,
        grads={s.hook: gs[s.hook] for s in slots},
        top_predictions=preds,
        acts={s.hook: acts[s.hook] for s in slots},
        errors={s.hook: e for s, (_, e) in zip(slots, pairs, strict=True)},
        emb=emb,
    )
