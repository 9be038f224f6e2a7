"""The prompt a steering run feeds the model: chat template, BOS, and the checks that it fits the context."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

import torch

from .config import SteeringConfig, SteeringInputError, validate_config
from .edits import check_steerable

if TYPE_CHECKING:
    from ..runtime import Runtime


def format_prompt(rt: Runtime, config: SteeringConfig) -> str:
    """The prompt text fed to the model: the chat template applied for chat models when enabled."""
    tok = rt.tokenizer
    if config.chat_template and getattr(tok, "chat_template", None):
        return str(
            tok.apply_chat_template(
                [{"role": "user", "content": config.prompt}], add_generation_prompt=True, tokenize=False
            )
        )
    return config.prompt


def prompt_ids(rt: Runtime, config: SteeringConfig) -> torch.Tensor:
    """``[1, pos]`` prompt token ids; BOS prepended when the SAE was trained with it (not doubled when a
    chat template already starts with it)."""
    text = format_prompt(rt, config)
    ids = list(rt.tokenizer(text, add_special_tokens=False)["input_ids"])
    bos = getattr(rt.tokenizer, "bos_token_id", None)
    if rt.prepend_bos and bos is not None and (not ids or ids[0] != bos):
        ids = [int(bos), *ids]
    return torch.tensor([ids], dtype=torch.long)


def check_prompt(rt: Runtime, config: SteeringConfig, ids: torch.Tensor) -> list[str]:
    """Raise SteeringInputError when the prompt + generation cannot fit the model; return notes (strings)."""
    n = int(ids.shape[1])
    bos = getattr(rt.tokenizer, "bos_token_id", None)
    if n == 0 or (n == 1 and bos is not None and int(ids[0, 0]) == bos):
        raise SteeringInputError("the prompt is empty after tokenisation; type a prompt to continue")
    ctx = rt.loaded.context_length
    total = n + config.generation.max_new_tokens
    if ctx is not None and n >= ctx:
        raise SteeringInputError(f"the prompt is {n} tokens, longer than the model's context of {ctx} tokens")
    if ctx is not None and total > ctx:
        raise SteeringInputError(
            f"the prompt ({n} tokens) plus {config.generation.max_new_tokens} new tokens exceeds the model's "
            f"context of {ctx} tokens; shorten the prompt or lower max new tokens"
        )
    notes = []
    if total > rt.context_size:
        notes.append(
            f"prompt + generation is {total} tokens, beyond the {rt.context_size}-token contexts the SAE was "
            "trained on; later positions may steer less reliably"
        )
    return notes


def prepare(
    rt: Runtime, config: SteeringConfig, max_acts: Mapping[int, float] | None = None
) -> tuple[torch.Tensor, list[str]]:
    """Validate ``config`` for ``rt`` (raises SteeringInputError); return the prompt ids and notes."""
    check_steerable(rt.sae)
    validate_config(config, rt.d_sae, max_acts)
    ids = prompt_ids(rt, config)
    return ids, check_prompt(rt, config, ids)
