"""Reading and editing activations at an SAE's hook site, thread-safely and without leaking hooks.

A ``HookSite`` asks the model's backend adapter (``backends.py``) for the module behind a hook name and reads
its output (or ``output[0]`` for tuples):
- Hugging Face module names (``model.layers.15``): exactly what sae-lens's ``HookedProxyLM`` hooks when it
  trains on an ``AutoModelForCausalLM``.
- TransformerLens hook names (``blocks.8.hook_resid_pre``): the ``HookPoint`` module of that name.

Interventions are per thread: one dispatching forward hook is registered while at least one thread has an
intervention active, and it applies only the calling thread's function. Two sessions steering one shared model
at once each get their own edit; when the last intervention exits (normally, by error, or by a closed
generator) the hook is removed and the model runs hook-free.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch.utils.hooks import RemovableHandle

from featuredict.pipelines.model.backends import ModelBackend

ActFn = Callable[[torch.Tensor], torch.Tensor | None]  # [batch, pos, d_in] -> same, or None for unchanged


class _StopForward(Exception):
    """Raised inside a hook to stop the forward pass once the activation is captured."""

    def __init__(self, act: torch.Tensor):
        super().__init__()
        self.act = act


class HookSite:
    def __init__(self, backend: ModelBackend, hook_name: str):
        self.backend = backend
        self.hook_name = hook_name
        self.module = backend.hook_module(hook_name)  # ValueError naming the problem when there is none
        self._lock = threading.Lock()
        self._fns: dict[int, ActFn] = {}  # thread id -> active function
        self._handle: RemovableHandle | None = None

    @property
    def kind(self) -> str:
        """The hook kind the database stores (``hf_module`` or ``transformer_lens``)."""
        return self.backend.hook_kind

    # ---- dispatching hook -------------------------------------------------------------------------------
    def _dispatch(self, module: torch.nn.Module, inputs: Any, output: Any) -> Any:
        fn = self._fns.get(threading.get_ident())
        if fn is None:
            return None
        if isinstance(output, torch.Tensor):
            new = fn(output)
            return None if new is None else new
        if isinstance(output, tuple) and output and isinstance(output[0], torch.Tensor):
            new = fn(output[0])
            return None if new is None else (new, *output[1:])
        raise TypeError(f"cannot read activations from output of type {type(output).__name__} at {self.hook_name}")

    @contextmanager
    def intervene(self, fn: ActFn) -> Iterator[None]:
        """Apply ``fn`` to the hook's activation on every forward pass this thread runs inside the block."""
        tid = threading.get_ident()
        with self._lock:
            if tid in self._fns:
                raise RuntimeError("an intervention is already active on this thread at this hook")
            self._fns[tid] = fn
            if self._handle is None:
                self._handle = self.module.register_forward_hook(self._dispatch)
        try:
            yield
        finally:
            with self._lock:
                self._fns.pop(tid, None)
                if not self._fns and self._handle is not None:
                    self._handle.remove()
                    self._handle = None

    @property
    def active(self) -> bool:
        """True while any thread has an intervention registered."""
        return self._handle is not None

    # ---- running ----------------------------------------------------------------------------------------
    @torch.no_grad()
    def activations(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Activations at the hook, ``[batch, pos, d_in]``; the model runs only up to the hook."""

        def stop(act: torch.Tensor) -> torch.Tensor:
            raise _StopForward(act)

        with self.intervene(stop):
            try:
                self.backend.forward(input_ids.to(self.backend.device), _to(attention_mask, self.backend.device))
            except _StopForward as s:
                return s.act
        raise RuntimeError(f"the forward pass never reached hook {self.hook_name}")

    @torch.no_grad()
    def logits(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        fn: ActFn | None = None,
    ) -> torch.Tensor:
        """Full forward pass, ``[batch, pos, vocab]`` logits, with ``fn`` applied at the hook if given."""
        ids = input_ids.to(self.backend.device)
        mask = _to(attention_mask, self.backend.device)
        if fn is None:
            return self.backend.forward(ids, mask)
        with self.intervene(fn):
            return self.backend.forward(ids, mask)

    @torch.no_grad()
    def logits_after_prefix(self, prefix: torch.Tensor, rest: torch.Tensor, fn: ActFn | None = None) -> torch.Tensor:
        """``ModelBackend.forward_after_prefix`` (logits at the prefix's last position and over ``rest``), with
        ``fn`` applied at the hook on every pass it runs. The last activation ``fn`` sees covers ``rest``'s
        positions at its end (``act[:, -rest.shape[1]:]``), whether or not the backend re-ran the prefix."""
        dev = self.backend.device
        if fn is None:
            return self.backend.forward_after_prefix(prefix.to(dev), rest.to(dev))
        with self.intervene(fn):
            return self.backend.forward_after_prefix(prefix.to(dev), rest.to(dev))


def _to(t: torch.Tensor | None, device: torch.device) -> torch.Tensor | None:
    return None if t is None else t.to(device)
