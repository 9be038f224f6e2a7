"""HTML rendering of token sequences with activation highlighting. Pure functions (no Streamlit).

Every corpus or user string is passed through ``html.escape`` before it is put in HTML; nothing raw is
ever interpolated. Attributes are quoted with escaped quotes.
"""

from __future__ import annotations

import html
import re
from collections.abc import Sequence

import numpy as np

# The one colour ramp: white -> orange; alpha = activation / scale (clipped to [0, 1]).
HIGHLIGHT_RGB = (255, 140, 0)
CONTEXT_CSS = (
    "font-family: ui-monospace, SFMono-Regular, Menlo, monospace; font-size: 0.86rem; line-height: 1.75; "
    "white-space: pre-wrap; word-break: break-word; margin: 0.15rem 0 0.5rem 0; padding: 0.35rem 0.5rem; "
    "border-left: 3px solid #eee; background: #fcfcfc; color: #222;"
)


def visible_token(tok: str, mark_spaces: bool = False) -> str:
    """Token text made visible, not yet escaped: newlines as '↵', tabs as '⇥', empty as '∅', and with
    ``mark_spaces`` (token buttons, tables) an all-space token as '␣'."""
    if tok == "":
        return "∅"
    if mark_spaces and tok.strip(" ") == "":
        return "␣" * len(tok)
    return tok.replace("\r", "").replace("\n", "↵").replace("\t", "⇥")


def token_span(tok: str, act: float, scale: float, is_max: bool = False) -> str:
    """One ``<span>``: background alpha by ``act/scale``, activation in the escaped title attribute."""
    alpha = 0.0 if scale <= 0 or not np.isfinite(act) else float(min(1.0, max(0.0, act / scale)))
    r, g, b = HIGHLIGHT_RGB
    style = f"background-color: rgba({r},{g},{b},{alpha:.3f}); border-radius: 2px;"
    if is_max:
        style += " border-bottom: 2px solid #c0392b; font-weight: 600;"
    title = html.escape(f"{tok!r}  act {act:.3f}", quote=True)
    return f'<span style="{style}" title="{title}">{html.escape(visible_token(tok), quote=True)}</span>'


def context_html(
    tokens: Sequence[str],
    acts: Sequence[float] | np.ndarray,
    scale: float,
    max_pos: int | None = None,
    window: tuple[int, int] | None = None,
    skip_first: bool = True,
    prefix: str = "",
) -> str:
    """One context as a ``<div>`` of highlighted token spans.

    ``tokens [pos]`` (raw strings), ``acts [pos]`` (the feature's activation per token); ``scale`` is the
    activation that gets full colour (the feature's max_act). ``window=(before, after)`` shows only that many
    tokens around ``max_pos`` (with '…' marks). ``skip_first`` (set it when position 0 is BOS) drops position 0 when its act is 0.
    ``prefix`` is plain text shown first (escaped too).
    """
    toks = list(tokens)
    a = np.asarray(acts, dtype=np.float64)
    if len(a) != len(toks):
        raise ValueError(f"tokens ({len(toks)}) and acts ({len(a)}) differ in length")
    lo, hi = 0, len(toks)
    if skip_first and toks and a[0] == 0:
        lo = 1
    if window is not None and max_pos is not None:
        lo = max(lo, max_pos - window[0])
        hi = min(hi, max_pos + window[1] + 1)
    parts = [f'<span style="color:#888">{html.escape(prefix)}</span>'] if prefix else []
    if lo > (1 if skip_first else 0):
        parts.append('<span style="color:#aaa">…</span>')
    parts += [token_span(toks[i], float(a[i]), scale, i == max_pos) for i in range(lo, hi)]
    if hi < len(toks):
        parts.append('<span style="color:#aaa">…</span>')
    return f'<div style="{CONTEXT_CSS}">{"".join(parts)}</div>'


def contexts_html(
    rows: Sequence[tuple[Sequence[str], Sequence[float], int, float]],
    scale: float,
    window: tuple[int, int] | None = None,
    skip_first: bool = True,
) -> str:
    """Several contexts: ``rows`` of (tokens, acts, max_pos, max_act); each prefixed by its max act.
    ``skip_first``: position 0 is BOS (the SAE's ``prepend_bos``), so it is not shown."""
    return "".join(
        context_html(t, a, scale, max_pos=int(mp), window=window, skip_first=skip_first, prefix=f"{float(ma):7.2f}  ")
        for t, a, mp, ma in rows
    )


_MD_SPECIAL = re.compile(r"([\\`*_\[\]{}<>~$|:!])")
_MD_LINE_START = re.compile(r"^(\s*)([#+\-=>]|\d+[.)])", re.MULTILINE)


def md(text: object) -> str:
    """User/corpus text for Streamlit markdown (titles, captions, alerts, widget labels): HTML-escaped, then
    markdown syntax (emphasis, links, directives like :red[...], $latex$, headings) backslash-escaped, so it
    shows literally."""
    s = html.escape("" if text is None else str(text), quote=False)
    s = _MD_SPECIAL.sub(r"\\\1", s)
    return _MD_LINE_START.sub(
        lambda m: (
            m.group(1) + (m.group(2)[:-1] + "\\" + m.group(2)[-1] if m.group(2)[0].isdigit() else "\\" + m.group(2))
        ),
        s,
    )


def escape_text(text: str | None) -> str:
    """Plain text for HTML (escaped); None -> ''."""
    return html.escape(text or "", quote=True)


def text_block(text: str, style: str) -> str:
    """Plain text (model output, corpus text) as one escaped ``<div>`` for ``st.markdown(unsafe_allow_html=True)``.

    Line breaks become ``<br>``: a markdown HTML block ends at a blank line, and whatever followed it would be
    parsed as markdown (``**bold**``, links, remote images) instead of shown as written.
    """
    body = html.escape(text).replace("\r\n", "\n").replace("\r", "\n").replace("\n", "<br>")
    return f'<div style="{html.escape(style)}">{body}</div>'


# ------------------------------------------------------------------------------------------ explanations

EXPLANATION_CSS = (
    "margin: 0.2rem 0 0.45rem 0; padding: 0.3rem 0.5rem; border-left: 3px solid #8e7cc3; background: #faf9fd; "
    "color: #222; font-size: 0.92rem; line-height: 1.45; white-space: pre-wrap; word-break: break-word;"
)
META_CSS = "color: #777; font-size: 0.78rem; margin-top: 0.15rem;"
STALE_CSS = "color: #a05a00; font-weight: 600;"


def score_text(detection: float | None, fuzzing: float | None) -> str:
    """'detection 0.81 · fuzzing 0.66' for the scores present (balanced accuracies), else 'unscored'."""
    parts = [
        f"{name} {float(v):.2f}"
        for name, v in (("detection", detection), ("fuzzing", fuzzing))
        if v is not None and np.isfinite(float(v))
    ]
    return " · ".join(parts) or "unscored"


def _present(v: object) -> bool:
    """False for None, NaN, NaT and pandas' NA (what a DataFrame record holds for SQL NULL)."""
    if v is None or (isinstance(v, float) and np.isnan(v)):
        return False
    return type(v).__name__ not in ("NaTType", "NAType")


def explanation_meta(row: dict) -> str:
    """One plain-text line about an explanation row (``queries.explanations`` columns): method, model, scores
    and scorer, author, source and date. Not escaped (callers escape)."""
    method = str(row.get("method") or "?")
    model = row.get("explainer_model")
    parts = [method + (f" ({model})" if _present(model) else "")]
    det, fuz = row.get("detection"), row.get("fuzzing")
    parts.append(score_text(det if _present(det) else None, fuz if _present(fuz) else None))
    if _present(row.get("scorer_model")) and (_present(det) or _present(fuz)):
        parts[-1] += f" by {row['scorer_model']}"
    for key, name in (("author", "by"), ("source", "from")):
        if _present(row.get(key)):
            parts.append(f"{name} {row[key]}")
    created = row.get("created_at")
    if _present(created):
        try:
            parts.append(f"{created:%Y-%m-%d %H:%M}")
        except (TypeError, ValueError):
            parts.append(str(created))
    return " · ".join(parts)


def explanations_html(rows: Sequence[dict]) -> str:
    """Explanation rows (``queries.explanations`` as records; text from an LLM or an import, so untrusted) as
    escaped HTML blocks: the text, then a grey line of method / model / scores / date, and a stale marker for
    ones made for other SAE weights. Rows without text (failed) are left out."""
    out = []
    for r in rows:
        text = r.get("text")
        if not _present(text):
            continue
        stale = (
            f'<span style="{STALE_CSS}" title="made for other SAE weights (fingerprint '
            f'{html.escape(str(r.get("sae_fingerprint") or "?"), quote=True)})">stale · </span>'
            if bool(r.get("stale"))
            else ""
        )
        out.append(
            f'<div style="{EXPLANATION_CSS}">{html.escape(str(text), quote=True)}'
            f'<div style="{META_CSS}">{stale}{html.escape(explanation_meta(r), quote=True)}</div></div>'
        )
    return "".join(out)
