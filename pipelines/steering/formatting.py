"""The prompt a steering run feeds the model: chat template (one turn, or a whole conversation), BOS, and the
checks that it fits the context."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

import torch

from featuredict.pipelines.steering.config import SteeringConfig, SteeringInputError, validate_config
from featuredict.pipelines.steering.edits import check_steerable

if TYPE_CHECKING:
    from featuredict.pipelines.model.runtime import Runtime


Message = dict[str, str]  # {"role": "system" | "user" | "assistant", "content": text}


def chat_messages(config: SteeringConfig, history: Sequence[tuple[str, str]] = ()) -> list[Message]:
    """The conversation the chat template gets: the system prompt (when given), the earlier turns
    ``history`` as (user, assistant) pairs, then ``config.prompt`` as the user's new turn."""
    msgs: list[Message] = [{"role": "system", "content": config.system}] if config.system else []
    for user, reply in history:
        msgs += [{"role": "user", "content": user}, {"role": "assistant", "content": reply}]
    return [*msgs, {"role": "user", "content": config.prompt}]


def has_chat_template(rt: Runtime) -> bool:
    return bool(getattr(rt.tokenizer, "chat_template", None))


def format_prompt(rt: Runtime, config: SteeringConfig, history: Sequence[tuple[str, str]] = ()) -> str:
    """The prompt text fed to the model: the chat template applied for chat models when enabled (to the
    conversation ``chat_messages`` builds), else the raw prompt. ``history`` needs the chat template."""
    tok = rt.tokenizer
    if config.chat_template and has_chat_template(rt):
        msgs = chat_messages(config, history)
        return str(tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False))
    if history or config.multi_turn:
        raise SteeringInputError("this model's tokenizer has no chat template, which multi-turn chat needs")
    return config.prompt


def prompt_ids(rt: Runtime, config: SteeringConfig, history: Sequence[tuple[str, str]] = ()) -> torch.Tensor:
    """``[1, pos]`` prompt token ids; BOS prepended when the SAE was trained with it (not doubled when a
    chat template already starts with it). ``history``: earlier (user, assistant) turns of a chat."""
    text = format_prompt(rt, config, history)
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
    ctx = rt.backend.context_length
    total = n + config.generation.max_new_tokens
    if ctx is not None and n >= ctx:
        what = "conversation" if config.multi_turn else "prompt"
        raise SteeringInputError(f"the {what} is {n} tokens, longer than the model's context of {ctx} tokens")
    if ctx is not None and total > ctx:
        fix = "start a new conversation" if config.multi_turn else "shorten the prompt"
        what = "conversation" if config.multi_turn else "prompt"
        raise SteeringInputError(
            f"the {what} ({n} tokens) plus {config.generation.max_new_tokens} new tokens exceeds the model's "
            f"context of {ctx} tokens; {fix} or lower max new tokens"
        )
    notes = []
    if total > rt.context_size:
        notes.append(
            f"prompt + generation is {total} tokens, beyond the {rt.context_size}-token contexts the SAE was "
            "trained on; later positions may steer less reliably"
        )
    return notes


def prepare(
    rt: Runtime,
    config: SteeringConfig,
    max_acts: Mapping[int, float] | None = None,
    history: Sequence[tuple[str, str]] = (),
) -> tuple[torch.Tensor, list[str]]:
    """Validate ``config`` for ``rt`` (raises SteeringInputError); return the prompt ids and notes.
    ``history``: earlier (user, assistant) turns of a chat, in this run's own conversation."""
    check_steerable(rt.sae)
    validate_config(config, rt.d_sae, max_acts)
    ids = prompt_ids(rt, config, history)
    return ids, check_prompt(rt, config, ids)
