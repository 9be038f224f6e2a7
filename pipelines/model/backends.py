"""One adapter per model backend: everything the pipelines ask of a loaded causal LM, in one place.

``ModelBackend`` is the base class; ``HFBackend`` runs Hugging Face ``AutoModelForCausalLM`` models (hooks are
module names such as ``model.layers.15``) and ``TLBackend`` runs TransformerLens ``HookedTransformer`` models
(hooks are hook-point names such as ``blocks.8.hook_resid_pre``). ``BACKENDS`` maps each backend's name, which
is also the ``hook_kind`` stored in the database, to its class.

Each adapter owns: loading, resolving a hook name to a module, the full forward pass (logits), the one-step
KV-cached forward used by generation (or, where the backend has no incremental cache, a full recompute),
the unembedding matrix and final norm, the context length, the EOS ids, and the number of layers. Nothing
outside this module branches on the backend.
"""

from __future__ import annotations

import inspect
import re
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, cast

import torch

from featuredict.pipelines.model.loading import SMOLLM2_PRESET, ModelLoadError, resolve_hf_path

if TYPE_CHECKING:
    from transformer_lens import HookedTransformer
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

KVCache = Any  # a backend's opaque incremental-decoding state (a transformers Cache object, or None)


class ModelBackend(ABC):
    """A causal LM ready to run, with the backend-specific operations the pipelines need.

    ``model`` is the underlying torch module, ``tokenizer`` a Hugging Face tokenizer; ``spec`` is what the
    user asked for (enough to load it again), ``kwargs`` the extra loader arguments used.
    """

    kind: ClassVar[str]  # registry name, stored as saes.hook_kind
    incremental: ClassVar[bool]  # True when ``step`` continues from a KV cache; False: pass the whole sequence

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer: PreTrainedTokenizerBase,
        *,
        spec: str = "",
        name: str = "",
        device: torch.device | None = None,
        dtype: torch.dtype | None = None,
        kwargs: dict[str, Any] | None = None,
    ):
        first = next(model.parameters(), None)
        self.model = model
        self.tokenizer = tokenizer
        self.spec = spec
        self.name = name or spec
        self.device = device if device is not None else (first.device if first is not None else torch.device("cpu"))
        self.dtype = dtype if dtype is not None else (first.dtype if first is not None else torch.float32)
        self.kwargs = dict(kwargs or {})

    # ---- choosing and loading ---------------------------------------------------------------------------
    @classmethod
    @abstractmethod
    def claims_hook(cls, hook_name: str) -> bool:
        """True when ``hook_name`` is written in this backend's naming scheme."""

    @classmethod
    @abstractmethod
    def load(cls, spec: str, *, device: torch.device, dtype: torch.dtype, model_kwargs: dict[str, Any]) -> ModelBackend:
        """Load ``spec`` on ``device`` in ``dtype``; raise ModelLoadError (or any error, wrapped by the caller)."""

    @classmethod
    def sae_model_kwargs(cls, kwargs: dict[str, Any]) -> dict[str, Any]:
        """The part of an SAE's ``model_from_pretrained_kwargs`` this backend's loader takes."""
        return {}

    # ---- running ----------------------------------------------------------------------------------------
    @abstractmethod
    def hook_module(self, hook_name: str) -> torch.nn.Module:
        """The module whose forward output is the activation at ``hook_name``; ValueError if there is none."""

    @abstractmethod
    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Full forward pass without a cache: ``[batch, pos, vocab]`` logits (inputs already on the device)."""

    @abstractmethod
    def step(self, chunk: torch.Tensor, cache: KVCache) -> tuple[torch.Tensor, KVCache]:
        """One generation step on ``chunk`` ``[1, L]``: ``(last-position logits [vocab], new cache)``.

        With ``incremental`` True, ``chunk`` holds only the tokens after those in ``cache`` (``None`` at the
        start); with ``incremental`` False the caller passes the whole sequence each time and the cache is None.
        """

    def forward_after_prefix(self, prefix: torch.Tensor, rest: torch.Tensor) -> torch.Tensor:
        """Logits ``[B, 1 + L, vocab]`` of ``prefix + rest[b]`` for each row ``b`` of ``rest`` ``[B, L]``, at the
        prefix's last position and at each position of ``rest`` (inputs already on the device). Every row
        continues the same ``prefix`` ``[1, P]``; rows of ``rest`` may be right-padded, as positions are causal.

        This default runs the whole sequence per row; a backend with a KV cache runs the prefix once.
        """
        ids = torch.cat([prefix.expand(rest.shape[0], -1), rest], dim=1)
        return self.forward(ids)[:, prefix.shape[1] - 1 :]

    def forward_edited(
        self, input_ids: torch.Tensor, hook_name: str, edits: Sequence[Callable[[torch.Tensor], torch.Tensor]]
    ) -> list[torch.Tensor] | None:
        """``[plain logits, logits with edits[0], ...]``: each edit maps the activation at ``hook_name`` to what
        continues in its place, with the model run up to the hook once, not once per edit. The logits are the
        ones full passes with the edit in a hook give, bit for bit. None where this backend cannot continue a
        pass from that hook (the caller then runs full passes); this default always says None."""
        return None

    # ---- weights and facts ------------------------------------------------------------------------------
    @abstractmethod
    def unembedding_matrix(self) -> torch.Tensor:
        """The unembedding ``W_U`` ``[d_model, vocab]`` (float32, detached), without the final norm."""

    @abstractmethod
    def final_norm(self) -> torch.nn.Module | None:
        """The norm applied to the residual stream right before the unembedding, or None if none is found."""

    @abstractmethod
    def input_embedding_module(self) -> torch.nn.Module:
        """The module whose output is the token embeddings ``[batch, pos, d_model]`` (attribution's token nodes)."""

    @property
    @abstractmethod
    def context_length(self) -> int | None:
        """The model's maximum sequence length (positions), or None when unknown."""

    @property
    @abstractmethod
    def n_layers(self) -> int:
        """Number of transformer blocks."""

    @property
    def hook_kind(self) -> str:
        """What ``saes.hook_kind`` records for hooks of this backend."""
        return self.kind

    def eos_ids(self) -> set[int]:
        """Token ids that end a generation: the tokenizer's EOS plus the generation config's EOS ids."""
        ids: set[int] = set()
        tok_eos = getattr(self.tokenizer, "eos_token_id", None)
        if tok_eos is not None:
            ids.add(int(tok_eos))
        gc = getattr(self.model, "generation_config", None)
        e = getattr(gc, "eos_token_id", None) if gc is not None else None
        if isinstance(e, int):
            ids.add(e)
        elif isinstance(e, list | tuple):
            ids.update(int(i) for i in e)
        return ids

    @property
    def is_chat(self) -> bool:
        return bool(getattr(self.tokenizer, "chat_template", None))

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r}, device={self.device}, dtype={self.dtype})"


# ---- Hugging Face -------------------------------------------------------------------------------------------

_HF_FINAL_NORM_PATHS = (
    "model.norm",  # Llama, Mistral, Qwen, Gemma, SmolLM2
    "transformer.ln_f",  # GPT-2, GPT-J, Bloom, Falcon
    "gpt_neox.final_layer_norm",  # Pythia / GPT-NeoX
    "model.decoder.final_layer_norm",  # OPT
    "model.final_layernorm",  # Phi
)


class HFBackend(ModelBackend):
    """A Hugging Face ``AutoModelForCausalLM``; hooks are module names, read at the module's output
    (``output[0]`` for tuples), exactly what sae-lens's ``HookedProxyLM`` hooks when it trains."""

    kind = "hf_module"
    incremental = True
    model: PreTrainedModel

    def __init__(self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, **kw: Any):
        super().__init__(model, tokenizer, **kw)
        self._cache_kw: str | None = None

    @classmethod
    def claims_hook(cls, hook_name: str) -> bool:
        return not TLBackend.claims_hook(hook_name)

    @classmethod
    def load(cls, spec: str, *, device: torch.device, dtype: torch.dtype, model_kwargs: dict[str, Any]) -> HFBackend:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        path = resolve_hf_path(spec)
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, **model_kwargs)
        cast(torch.nn.Module, model).to(device)
        model.eval()
        name = "SmolLM2-135M-Instruct" if spec == SMOLLM2_PRESET else Path(spec).name or spec
        return cls(model, tokenizer, spec=spec, name=name, device=device, dtype=dtype, kwargs=model_kwargs)

    def hook_module(self, hook_name: str) -> torch.nn.Module:
        try:
            return self.model.get_submodule(hook_name)
        except AttributeError:
            layers = [n for n, _ in self.model.named_modules() if n.count(".") <= 2 and "layers." in n][:3]
            raise ValueError(
                f"hook {hook_name!r} is not a module of {self.name} (examples of module names: {layers})"
            ) from None

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits

    def _cache_kwarg(self) -> str:
        """Name of the KV-cache argument of ``model.forward``: ``cache`` (transformers >= 5.2x) or
        ``past_key_values`` (older)."""
        if self._cache_kw is None:
            params: Mapping[str, Any]
            try:
                params = inspect.signature(self.model.forward).parameters
            except (TypeError, ValueError):
                params = {}
            self._cache_kw = "cache" if "cache" in params else "past_key_values"
        return self._cache_kw

    def step(self, chunk: torch.Tensor, cache: KVCache) -> tuple[torch.Tensor, KVCache]:
        out = self.model(
            input_ids=chunk.to(self.device), use_cache=True, logits_to_keep=1, **{self._cache_kwarg(): cache}
        )
        new_cache = getattr(out, "cache", None)
        if new_cache is None:
            new_cache = getattr(out, "past_key_values", None)
        return out.logits[0, -1], new_cache

    def forward_after_prefix(self, prefix: torch.Tensor, rest: torch.Tensor) -> torch.Tensor:
        """The prefix runs once (batch 1); its KV cache is repeated over the rows of ``rest``. One row runs as one
        pass with logits only where asked (nothing to share)."""
        if rest.shape[0] == 1:
            ids = torch.cat([prefix, rest], dim=1)
            keep = int(rest.shape[1]) + 1
            return self.model(input_ids=ids, use_cache=False, logits_to_keep=keep).logits
        first, cache = self.step(prefix, None)
        cache.batch_repeat_interleave(int(rest.shape[0]))
        out = self.model(input_ids=rest, use_cache=True, **{self._cache_kwarg(): cache})
        return torch.cat([first.view(1, 1, -1).expand(rest.shape[0], 1, -1), out.logits], dim=1)

    # model types whose causal-LM forward is: blocks in order, the final norm, the unembedding, nothing after it
    # (no logit soft-capping or scaling), so the blocks after a hook can be run again on an edited activation
    RESUMABLE: ClassVar[frozenset[str]] = frozenset({"llama"})

    def forward_edited(
        self, input_ids: torch.Tensor, hook_name: str, edits: Sequence[Callable[[torch.Tensor], torch.Tensor]]
    ) -> list[torch.Tensor] | None:
        """For a hook on a whole block (``model.layers.N``) of a model type in ``RESUMABLE``: the plain pass runs
        with each later block's inputs recorded (the attention mask, the rotary embeddings: everything except
        the hidden state), then each edit runs only the blocks after the hook, the final norm and the
        unembedding, with those inputs. Same modules, same inputs: the same logits as a full pass, bit for bit
        (tested)."""
        where = self._block_of(hook_name)
        norm, head = self.final_norm(), self.model.get_output_embeddings()
        if where is None or norm is None or head is None:
            return None
        blocks, i = where
        after = list(blocks)[i + 1 :]
        calls: list[tuple[tuple[Any, ...], dict[str, Any]] | None] = [None] * len(after)
        got: dict[str, Any] = {}

        def record(j: int) -> Callable[..., None]:
            def fn(module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
                calls[j] = (args, kwargs)

            return fn

        def keep(module: torch.nn.Module, inputs: Any, output: Any) -> None:
            got["act"] = output[0] if isinstance(output, tuple) else output

        handles = [b.register_forward_pre_hook(record(j), with_kwargs=True) for j, b in enumerate(after)]
        handles.append(blocks[i].register_forward_hook(keep))
        try:
            plain = self.forward(input_ids)
        finally:
            for h in handles:
                h.remove()
        if "act" not in got or any(c is None for c in calls) or not isinstance(got["act"], torch.Tensor):
            return None

        def rest(act: torch.Tensor) -> torch.Tensor:
            h = act
            for block, call in zip(after, calls, strict=True):
                assert call is not None
                args, kwargs = call
                out = block(h, *args[1:], **kwargs) if args else block(**{**kwargs, "hidden_states": h})
                h = out[0] if isinstance(out, tuple) else out
            return head(norm(h))

        return [plain, *(rest(edit(got["act"])) for edit in edits)]

    def _block_of(self, hook_name: str) -> tuple[torch.nn.ModuleList, int] | None:
        """``(the model's blocks, index)`` when ``hook_name`` is a whole block of a ``RESUMABLE`` model type."""
        if getattr(self.model.config, "model_type", None) not in self.RESUMABLE:
            return None
        parent, _, index = hook_name.rpartition(".")
        if parent != "model.layers" or not index.isdigit():  # the blocks the model's own forward loops over
            return None
        try:
            blocks = self.model.get_submodule(parent)
        except AttributeError:
            return None
        if not isinstance(blocks, torch.nn.ModuleList) or int(index) >= len(blocks):
            return None
        return blocks, int(index)

    def unembedding_matrix(self) -> torch.Tensor:
        return self.model.get_output_embeddings().weight.detach().float().T

    def final_norm(self) -> torch.nn.Module | None:
        for path in _HF_FINAL_NORM_PATHS:
            try:
                return self.model.get_submodule(path)
            except AttributeError:
                continue
        norms = [m for _, m in self.model.named_modules() if "norm" in type(m).__name__.lower()]
        return norms[-1] if norms else None

    def input_embedding_module(self) -> torch.nn.Module:
        return self.model.get_input_embeddings()

    @property
    def context_length(self) -> int | None:
        n = getattr(self.model.config, "max_position_embeddings", None)
        return int(n) if n else None

    @property
    def n_layers(self) -> int:
        return int(self.model.config.num_hidden_layers)


# ---- TransformerLens ----------------------------------------------------------------------------------------

_TL_HOOK = re.compile(r"^(blocks\.\d+\.|hook_embed|hook_pos_embed|ln_final\.)")


class TLBackend(ModelBackend):
    """A TransformerLens ``HookedTransformer``; hooks are its ``HookPoint`` modules. It has no incremental
    cache here: generation recomputes the whole sequence each step."""

    kind = "transformer_lens"
    incremental = False
    model: HookedTransformer

    @classmethod
    def claims_hook(cls, hook_name: str) -> bool:
        return bool(_TL_HOOK.match(hook_name))

    @classmethod
    def load(cls, spec: str, *, device: torch.device, dtype: torch.dtype, model_kwargs: dict[str, Any]) -> TLBackend:
        """``from_pretrained_no_processing`` (what sae-lens uses to train), so activations at TL hook names
        match the SAE's training distribution."""
        from transformer_lens import HookedTransformer

        if Path(spec).expanduser().is_dir() or spec == SMOLLM2_PRESET:
            raise ModelLoadError(
                "TransformerLens hooks need a model name TransformerLens knows (e.g. gpt2); "
                f"for the local model {spec} use an SAE trained on Hugging Face module names"
            )
        model = HookedTransformer.from_pretrained_no_processing(
            spec, device=str(device), dtype=dtype, hf_model=None, tokenizer=None, **model_kwargs
        )
        model.eval()
        return cls(model, model.tokenizer, spec=spec, name=spec, device=device, dtype=dtype, kwargs=model_kwargs)

    @classmethod
    def sae_model_kwargs(cls, kwargs: dict[str, Any]) -> dict[str, Any]:
        return dict(kwargs)  # sae-lens passes them to from_pretrained_no_processing, as we do

    def hook_module(self, hook_name: str) -> torch.nn.Module:
        hooks = getattr(self.model, "hook_dict", {})
        if hook_name not in hooks:
            raise ValueError(f"hook {hook_name!r} is not a TransformerLens hook point of {self.name}")
        return hooks[hook_name]

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.model(input_ids, return_type="logits", attention_mask=attention_mask)

    def step(self, chunk: torch.Tensor, cache: KVCache) -> tuple[torch.Tensor, KVCache]:
        return self.model(chunk.to(self.device), return_type="logits")[0, -1], None

    def unembedding_matrix(self) -> torch.Tensor:
        return self.model.W_U.detach().float()

    def final_norm(self) -> torch.nn.Module | None:
        return getattr(self.model, "ln_final", None)

    def input_embedding_module(self) -> torch.nn.Module:
        return self.model.hook_dict["hook_embed"]

    @property
    def context_length(self) -> int | None:
        return int(self.model.cfg.n_ctx)

    @property
    def n_layers(self) -> int:
        return int(self.model.cfg.n_layers)


BACKENDS: dict[str, type[ModelBackend]] = {HFBackend.kind: HFBackend, TLBackend.kind: TLBackend}


def backend_for_hook(hook_name: str) -> type[ModelBackend]:
    """The backend whose hook naming ``hook_name`` follows (TransformerLens names first, else module names)."""
    for cls in (TLBackend, HFBackend):
        if cls.claims_hook(hook_name):
            return cls
    raise ValueError(f"no model backend recognises hook {hook_name!r}")


def get_backend(kind: str) -> type[ModelBackend]:
    """The backend class registered under ``kind`` (``hf_module`` or ``transformer_lens``)."""
    try:
        return BACKENDS[kind]
    except KeyError:
        raise ValueError(f"unknown model backend {kind!r}; use one of {sorted(BACKENDS)}") from None
