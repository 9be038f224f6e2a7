"""Multi-turn chat: the baseline and the steered model each keep their own conversation.

Every user turn goes to both. The baseline's next prompt is the chat template applied to (system prompt, the
earlier user turns with the BASELINE's replies, the new user turn); the steered one's uses the STEERED replies.
Each turn is an ordinary baseline/steered pair of generations on those two prompts, so quality scores,
recording and the hook's safety work per turn as for one prompt. With positions ``all`` the steered run edits
the whole conversation it re-reads (its earlier turns included); with ``generated`` only the new reply.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from featuredict.pipelines.steering.config import SteeringConfig, SteeringInputError
from featuredict.pipelines.steering.formatting import prepare
from featuredict.pipelines.steering.generation import GenerationStream

if TYPE_CHECKING:
    from featuredict.pipelines.model.runtime import Runtime

MAX_TURNS = 32


@dataclass(frozen=True)
class Turn:
    """One finished exchange: the user's message and each side's reply."""

    user: str
    baseline: str
    steered: str

    def __post_init__(self) -> None:
        for name in ("user", "baseline", "steered"):
            if not isinstance(getattr(self, name), str):
                raise SteeringInputError(f"a chat turn's {name} text must be text")


def side_history(history: Sequence[Turn], side: str) -> list[tuple[str, str]]:
    """``(user, reply)`` pairs of one side's conversation (``side`` is ``baseline`` or ``steered``)."""
    if side not in ("baseline", "steered"):
        raise ValueError(f"side must be 'baseline' or 'steered', not {side!r}")
    return [(t.user, t.baseline if side == "baseline" else t.steered) for t in history]


def chat_streams(
    rt: Runtime,
    config: SteeringConfig,
    history: Sequence[Turn] = (),
    max_acts: Mapping[int, float] | None = None,
    *,
    record: bool = True,
    keep_logits: bool = False,
) -> dict[str, GenerationStream]:
    """``{'baseline': ..., 'steered': ...}`` streams answering ``config.prompt`` as the next user turn after
    ``history``, each in its own conversation, with the same sampling seed (raises SteeringInputError)."""
    if history and not config.multi_turn:
        raise SteeringInputError("earlier turns need multi-turn chat; turn chat mode on")
    if len(history) >= MAX_TURNS:
        raise SteeringInputError(f"a conversation holds at most {MAX_TURNS} turns; start a new one")
    out = {}
    for side in ("baseline", "steered"):
        ids, notes = prepare(rt, config, max_acts, side_history(history, side))
        out[side] = GenerationStream(
            rt,
            config,
            steer=side == "steered",
            max_acts=max_acts,
            record=record,
            ids=ids,
            notes=notes,
            keep_logits=keep_logits,
        )
    return out
