"""A stored context (table ``examples``: raw token strings, the position of the feature's max) as plain text.

Tokenizers mark a leading space or a line break inside the token string (SentencePiece ``▁``, byte-level BPE
``Ġ`` and ``Ċ``); these helpers turn the marks back into spaces and line breaks. The text is raw corpus text:
escape it before it becomes HTML.
"""

from __future__ import annotations

from collections.abc import Sequence

SPACE_MARKS = str.maketrans({"\u2581": " ", "\u0120": " ", "\u010a": "\n"})


def context_text(tokens: Sequence[str]) -> str:
    """A stored context's tokens as plain text (space and line-break marks as spaces and line breaks)."""
    return "".join(str(t) for t in tokens).translate(SPACE_MARKS)


def window_text(tokens: Sequence[str], max_pos: int, before: int, after: int, skip_first: bool) -> str:
    """The text of the tokens from ``before`` tokens before ``max_pos`` to ``after`` tokens after it (never
    position 0 when ``skip_first``: it is BOS)."""
    lo = max(1 if skip_first else 0, int(max_pos) - before)
    hi = min(len(tokens), int(max_pos) + after + 1)
    return context_text(tokens[lo:hi])
