"""User writes from the dashboard: labels, tags, notes and saved lists.

Every function goes through ``Store.write`` (one process-wide lock + one transaction), so edits from several
browser sessions at once are serialised and none is lost. Edits are merges, not blind overwrites:
``update_label`` changes only the fields it is given and adds/removes individual tags against the row as it
is *inside* the transaction, so two people tagging the same feature at the same time both keep their tag.
Statements are constants; values travel as parameters.
"""

from __future__ import annotations

import numbers
import re
from collections.abc import Iterable, Sequence
from typing import Any

import duckdb

from .store import Store

MAX_TEXT = 10_000  # characters kept of a label / note / list name
MAX_TAG = 64
_UNSET: Any = object()


def clean_tags(tags: Iterable[str] | str | None) -> list[str]:
    """Normalise tags: split a comma string, strip, drop empties and duplicates, cap length. Order kept."""
    if tags is None:
        return []
    if isinstance(tags, str):
        tags = tags.split(",")
    out: list[str] = []
    for t in tags:
        t = re.sub(r"\s+", " ", str(t)).strip()[:MAX_TAG]
        if t and t not in out:
            out.append(t)
    return out


def _text(v: str | None) -> str | None:
    if v is None:
        return None
    v = str(v)[:MAX_TEXT]
    return v if v.strip() else None


def update_label(
    store: Store,
    sae_id: str,
    feature: int,
    *,
    label: str | None = _UNSET,
    notes: str | None = _UNSET,
    add_tags: Iterable[str] = (),
    remove_tags: Iterable[str] = (),
    author: str | None = None,
) -> dict[str, Any]:
    """Merge an edit into the feature's ``labels`` row (created if absent) and return the row after it.

    ``label`` / ``notes``: set when given (None or blank clears); left as stored when omitted. An edit that
    leaves label, notes and tags all empty deletes the row, so the feature counts as unlabelled again.
    Tags: ``remove_tags`` are taken out and ``add_tags`` appended to the tags stored at commit time.
    Returns dict(label, tags, notes, author, updated_at).
    """
    add, remove = clean_tags(add_tags), set(clean_tags(remove_tags))

    def fn(cur: duckdb.DuckDBPyConnection) -> dict[str, Any]:
        row = cur.execute(
            "SELECT label, tags, notes, author FROM labels WHERE sae_id = ? AND feature = ?", [sae_id, int(feature)]
        ).fetchone()
        old_label, old_tags, old_notes, old_author = row if row else (None, None, None, None)
        tags = [t for t in (old_tags or []) if t not in remove]
        tags += [t for t in add if t not in tags]
        new_label = old_label if label is _UNSET else _text(label)
        new_notes = old_notes if notes is _UNSET else _text(notes)
        new_author = _text(author) or old_author
        if new_label is None and new_notes is None and not tags:  # everything cleared: unlabelled again
            cur.execute("DELETE FROM labels WHERE sae_id = ? AND feature = ?", [sae_id, int(feature)])
            return {"label": None, "tags": [], "notes": None, "author": None, "updated_at": None}
        cur.execute(
            """INSERT INTO labels (sae_id, feature, label, tags, notes, author, updated_at)
               VALUES (?, ?, ?, ?, ?, ?, now())
               ON CONFLICT (sae_id, feature) DO UPDATE SET label = excluded.label, tags = excluded.tags,
                   notes = excluded.notes, author = excluded.author, updated_at = excluded.updated_at""",
            [sae_id, int(feature), new_label, tags, new_notes, new_author],
        )
        out = cur.execute(
            "SELECT label, tags, notes, author, updated_at FROM labels WHERE sae_id = ? AND feature = ?",
            [sae_id, int(feature)],
        ).fetchone()
        return dict(zip(("label", "tags", "notes", "author", "updated_at"), out, strict=True))

    return store.write(fn)


def save_label_edit(
    store: Store,
    sae_id: str,
    feature: int,
    before: dict[str, Any] | None,
    label: str | None,
    tags: Iterable[str] | str | None,
    notes: str | None,
    author: str | None = None,
) -> dict[str, Any]:
    """Save what a form changed relative to ``before`` (the row the form was shown with).

    Only fields the user changed are written, and tags as added/removed ones, so a concurrent edit of
    another field or tag by someone else survives. Returns the row after the save.
    """
    before = before or {}
    old_tags = clean_tags(before.get("tags") or [])
    new_tags = clean_tags(tags)
    kwargs: dict[str, Any] = {}
    if (_text(label) or None) != (before.get("label") or None):
        kwargs["label"] = label
    if (_text(notes) or None) != (before.get("notes") or None):
        kwargs["notes"] = notes
    return update_label(
        store,
        sae_id,
        feature,
        add_tags=[t for t in new_tags if t not in old_tags],
        remove_tags=[t for t in old_tags if t not in new_tags],
        author=author,
        **kwargs,
    )


def clean_list_name(name: str) -> str:
    """A list name stripped and capped; raises ValueError when blank."""
    name = re.sub(r"\s+", " ", str(name or "")).strip()[:200]
    if not name:
        raise ValueError("a list needs a name")
    return name


def add_to_list(
    store: Store, list_name: str, sae_id: str, features: int | Sequence[int], note: str | None = None
) -> int:
    """Add features (one id or many) to a list, creating it; existing members keep their note and time
    unless a note is given. Returns how many were new. Raises ValueError for ids the SAE does not have."""
    name = clean_list_name(list_name)
    ids = [int(features)] if isinstance(features, numbers.Integral) else [int(f) for f in features]
    ids = list(dict.fromkeys(ids))
    if any(not -(2**31) <= f < 2**31 for f in ids):
        raise ValueError(f"feature ids must be between 0 and 2^31; got {max(ids, key=abs)}")

    def fn(cur: duckdb.DuckDBPyConnection) -> int:
        known = {
            int(f)
            for (f,) in cur.execute(
                "SELECT feature FROM features WHERE sae_id = ? AND feature IN (SELECT unnest(?::INTEGER[]))",
                [sae_id, ids],
            ).fetchall()
        }
        unknown = [f for f in ids if f not in known]
        if unknown:
            shown = ", ".join(map(str, unknown[:10])) + (" ..." if len(unknown) > 10 else "")
            raise ValueError(f"SAE {sae_id} has no feature {shown}")
        before = cur.execute(
            "SELECT count(*) FROM lists WHERE list_name = ? AND sae_id = ? AND feature IN (SELECT unnest(?::INTEGER[]))",
            [name, sae_id, ids],
        ).fetchone()[0]
        for f in ids:
            cur.execute(
                """INSERT INTO lists (list_name, sae_id, feature, note, added_at) VALUES (?, ?, ?, ?, now())
                   ON CONFLICT (list_name, sae_id, feature)
                   DO UPDATE SET note = coalesce(excluded.note, lists.note)""",
                [name, sae_id, f, _text(note)],
            )
        return len(ids) - int(before)

    return store.write(fn)


def remove_from_list(store: Store, list_name: str, sae_id: str, feature: int) -> None:
    store.write(
        lambda cur: cur.execute(
            "DELETE FROM lists WHERE list_name = ? AND sae_id = ? AND feature = ?", [list_name, sae_id, int(feature)]
        )
    )


def delete_list(store: Store, list_name: str) -> int:
    """Delete a whole list; returns how many members it had."""

    def fn(cur: duckdb.DuckDBPyConnection) -> int:
        n = cur.execute("SELECT count(*) FROM lists WHERE list_name = ?", [list_name]).fetchone()[0]
        cur.execute("DELETE FROM lists WHERE list_name = ?", [list_name])
        return int(n)

    return store.write(fn)


def rename_list(store: Store, old: str, new: str) -> None:
    """Rename a list; members already in a list called ``new`` are merged (no duplicates)."""
    new_name = clean_list_name(new)

    def fn(cur: duckdb.DuckDBPyConnection) -> None:
        cur.execute(
            """INSERT INTO lists (list_name, sae_id, feature, note, added_at)
               SELECT ?, sae_id, feature, note, added_at FROM lists WHERE list_name = ?
               ON CONFLICT (list_name, sae_id, feature) DO NOTHING""",
            [new_name, old],
        )
        if new_name != old:
            cur.execute("DELETE FROM lists WHERE list_name = ?", [old])

    store.write(fn)
