"""One error vocabulary for featuredict: ``UserError`` for the errors users meet, and ``one_line``.

``UserError`` marks an error a user can act on (a bad path or option, a model, SAE or corpus that cannot be
loaded, an unusable database, an unknown SAE id). ``featuredict`` prints it as one ``error:`` line and exits
with status 2 (``pipelines/cli``); the dashboard shows it as one line. Every other exception is a bug and keeps
its traceback. The error classes of the other layers derive from it (``DatabaseError``, ``CorpusError``,
``ModelLoadError``, ``SaeLoadError``, ...); most also keep a builtin base (``ValueError``, ``RuntimeError``) so
that callers which catch those still do.

It lives in ``db/``, the lowest layer, so that every layer can raise and format it.
"""

from __future__ import annotations

import re

#: the longest message ``one_line`` returns, unless told otherwise
LINE_CAP = 300


class UserError(Exception):
    """An error a user meets and can fix; shown as one line, never as a traceback."""


def one_line(x: BaseException | str | None, cap: int = LINE_CAP, *, with_type: bool = False) -> str:
    """``x`` as one line of at most ``cap`` characters (cut with "…").

    An exception becomes the first non-empty line of its message (its type name when the message is empty;
    ``with_type`` puts the type name in front). A text has its whitespace collapsed.
    """
    if isinstance(x, BaseException):
        lines = [ln for ln in str(x).splitlines() if ln.strip()]
        text = " ".join(lines[0].split()) if lines else ""
        if with_type or not text:
            text = f"{type(x).__name__}: {text}" if text else type(x).__name__
    else:
        text = re.sub(r"\s+", " ", str(x or "")).strip()
    return text if len(text) <= cap else text[: max(cap - 1, 0)] + "…"
