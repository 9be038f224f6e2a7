"""Every write to featuredict's tables: labels, tags, notes, reviews, lists and watch settings from the dashboard
and the CLI; explanations (``featuredict explain``, Neuronpedia import); feature vectors (``featuredict embed``);
steering presets; and a build's tables (``write_sae_tables``, the atomic swap). Reads live in ``queries.py``.

Every user-table function goes through ``Store.write`` (one process-wide lock + one transaction), so edits from several
browser sessions at once are serialised and none is lost. Edits are merges, not blind overwrites:
``update_label`` changes only the fields it is given and adds/removes individual tags against the row as it
is *inside* the transaction, so two people tagging the same feature at the same time both keep their tag.
Statements are constants; values travel as parameters.
"""

from __future__ import annotations

import json
import numbers
import os
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal, cast, get_args

import duckdb
import numpy as np
import pandas as pd
import pyarrow as pa

from featuredict.db.filelock import LockError, lock_for
from featuredict.db.queries import PresetError, id_list
from featuredict.db.schema import REVIEW_STATUSES, SEVERITIES, DatabaseError, copy_kept_rows, create_schema
from featuredict.db.store import Store, scalar

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


HistoryField = Literal["label", "notes", "tags", "review", "list"]
HistoryAction = Literal["set", "conflict"]


@dataclass(frozen=True)
class Change:
    """One ``history`` row to append: ``old`` / ``new`` are stored as JSON text (None stays NULL)."""

    sae_id: str
    feature: int
    field: HistoryField
    old: Any
    new: Any
    author: str | None = None
    action: HistoryAction = "set"

    def __post_init__(self) -> None:
        if self.field not in get_args(HistoryField):
            raise ValueError(f"unknown history field {self.field!r}")
        if self.action not in get_args(HistoryAction):
            raise ValueError(f"unknown history action {self.action!r}")


def _json(v: Any) -> str | None:
    return None if v is None else json.dumps(v, ensure_ascii=False, default=str)


def _log(cur: duckdb.DuckDBPyConnection, changes: Sequence[Change]) -> None:
    """Append ``changes`` to ``history`` inside the caller's write transaction (ids: max + 1 under the lock)."""
    if not changes:
        return
    base = int(scalar(cur, "SELECT coalesce(max(id), 0) FROM history"))
    cur.executemany(
        """INSERT INTO history (id, sae_id, feature, field, old_value, new_value, author, action, changed_at)
           VALUES (?, ?, ?, ?, ?, ?, ?, ?, now()::TIMESTAMP)""",
        [
            [base + 1 + i, c.sae_id, int(c.feature), c.field, _json(c.old), _json(c.new), _text(c.author), c.action]
            for i, c in enumerate(changes)
        ],
    )


def _apply_label(
    cur: duckdb.DuckDBPyConnection,
    sae_id: str,
    feature: int,
    label: str | None,
    notes: str | None,
    add: list[str],
    remove: set[str],
    author: str | None,
) -> dict[str, Any]:
    """Merge one edit into the ``labels`` row inside the caller's transaction, logging each changed field."""
    row = cur.execute(
        "SELECT label, tags, notes, author FROM labels WHERE sae_id = ? AND feature = ?", [sae_id, int(feature)]
    ).fetchone()
    old_label, old_tags, old_notes, old_author = row if row else (None, None, None, None)
    tags = [t for t in (old_tags or []) if t not in remove]
    tags += [t for t in add if t not in tags]
    new_label = old_label if label is _UNSET else _text(label)
    new_notes = old_notes if notes is _UNSET else _text(notes)
    new_author = _text(author) or old_author
    changes = [
        Change(sae_id, int(feature), cast(HistoryField, name), old, new, _text(author))
        for name, old, new in (
            ("label", old_label, new_label),
            ("notes", old_notes, new_notes),
            ("tags", list(old_tags or []) or None, tags or None),
        )
        if old != new
    ]
    _log(cur, changes)
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
    if out is None:
        raise ValueError(f"no label row for feature {int(feature)} of SAE {sae_id}")
    d = dict(zip(("label", "tags", "notes", "author", "updated_at"), out, strict=True))
    d["tags"] = list(d["tags"] or [])
    return d


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
    Every changed field is appended to ``history``. Returns dict(label, tags, notes, author, updated_at).
    """
    add, remove = clean_tags(add_tags), set(clean_tags(remove_tags))
    return store.write(lambda cur: _apply_label(cur, sae_id, feature, label, notes, add, remove, author))


@dataclass(frozen=True)
class LabelSave:
    """What ``save_label_edit`` did: ``row`` is the labels row after the save; ``conflicts`` maps each field the
    form changed that someone else had changed since the form was loaded to ``{"theirs": ..., "mine": ...}``
    (those fields were NOT written; the refused values are in ``history`` with action 'conflict')."""

    row: dict[str, Any]
    conflicts: dict[str, dict[str, Any]] = field(default_factory=dict)


def save_label_edit(
    store: Store,
    sae_id: str,
    feature: int,
    before: dict[str, Any] | None,
    label: str | None,
    tags: Iterable[str] | str | None,
    notes: str | None,
    author: str | None = None,
) -> LabelSave:
    """Save what a form changed relative to ``before`` (the row the form was loaded with).

    Only fields the user changed are written, and tags as added/removed ones, so a concurrent edit of
    another field or tag by someone else survives. Optimistic concurrency: under the write lock, a label or
    notes the user changed that is no longer what ``before`` holds (someone saved in between) is not
    overwritten but reported in ``LabelSave.conflicts`` with both versions; tags always merge. To keep
    "mine" after a conflict, save again with ``before`` = the current row.
    """
    before = before or {}
    old_tags = clean_tags(before.get("tags") or [])
    new_tags = clean_tags(tags)
    add = [t for t in new_tags if t not in old_tags]
    remove = {t for t in old_tags if t not in new_tags}
    wanted: dict[str, str | None] = {}
    if (_text(label) or None) != (before.get("label") or None):
        wanted["label"] = _text(label)
    if (_text(notes) or None) != (before.get("notes") or None):
        wanted["notes"] = _text(notes)

    def fn(cur: duckdb.DuckDBPyConnection) -> LabelSave:
        row = cur.execute(
            "SELECT label, notes FROM labels WHERE sae_id = ? AND feature = ?", [sae_id, int(feature)]
        ).fetchone()
        stored = {"label": row[0], "notes": row[1]} if row else {"label": None, "notes": None}
        conflicts = {
            k: {"theirs": stored[k], "mine": v}
            for k, v in wanted.items()
            if stored[k] != (before.get(k) or None) and stored[k] != v
        }
        _log(
            cur,
            [
                Change(sae_id, int(feature), k, c["theirs"], c["mine"], _text(author), "conflict")  # type: ignore[arg-type]
                for k, c in conflicts.items()
            ],
        )
        apply = {k: v for k, v in wanted.items() if k not in conflicts}
        if conflicts and not apply and not add and not remove:  # nothing of mine left to write
            out = cur.execute(
                "SELECT label, tags, notes, author, updated_at FROM labels WHERE sae_id = ? AND feature = ?",
                [sae_id, int(feature)],
            ).fetchone()
            keys = ("label", "tags", "notes", "author", "updated_at")
            after = dict(zip(keys, out, strict=True)) if out else dict.fromkeys(keys)
            after["tags"] = list(after["tags"] or [])
            return LabelSave(after, conflicts)
        after = _apply_label(
            cur, sae_id, feature, apply.get("label", _UNSET), apply.get("notes", _UNSET), add, remove, author
        )
        return LabelSave(after, conflicts)

    return store.write(fn)


ReviewStatus = Literal["unreviewed", "benign", "concerning", "needs second look"]
assert get_args(ReviewStatus) == REVIEW_STATUSES


@dataclass(frozen=True)
class ReviewSave:
    """What ``set_review`` did: ``row`` is the review after the call (the stored one when refused);
    ``conflict`` is None when written, else ``{"theirs": stored review, "mine": the refused one}``."""

    row: dict[str, Any]
    conflict: dict[str, dict[str, Any]] | None = None


_REVIEW_KEYS = ("status", "reviewer", "reason", "version", "updated_at")


def _review_row(cur: duckdb.DuckDBPyConnection, sae_id: str, feature: int) -> dict[str, Any]:
    r = cur.execute(
        "SELECT status, reviewer, reason, version, updated_at FROM reviews WHERE sae_id = ? AND feature = ?",
        [sae_id, int(feature)],
    ).fetchone()
    if r is None:
        return {"status": "unreviewed", "reviewer": None, "reason": None, "version": 0, "updated_at": None}
    return dict(zip(_REVIEW_KEYS, r, strict=True))


def set_review(
    store: Store,
    sae_id: str,
    feature: int,
    status: str,
    reason: str | None = None,
    reviewer: str | None = None,
    expected_version: int | None = None,
) -> ReviewSave:
    """Set a feature's review status (one of ``REVIEW_STATUSES``) with reviewer and reason, logging it to history.

    ``expected_version``: the review ``version`` the form was loaded with (0: none yet). When the stored version
    differs, someone saved in between: nothing is written, the refused review is logged with action 'conflict'
    and both versions come back in ``ReviewSave.conflict``. None writes unconditionally (scripts, batch actions).
    Raises ValueError for an unknown status or a feature the SAE does not have.
    """
    if status not in REVIEW_STATUSES:
        raise ValueError(f"review status must be one of {', '.join(REVIEW_STATUSES)}; got {status!r}")
    mine = {"status": status, "reviewer": _clean(reviewer, 200), "reason": _text(reason)}

    def fn(cur: duckdb.DuckDBPyConnection) -> ReviewSave:
        if not scalar(cur, "SELECT count(*) FROM features WHERE sae_id = ? AND feature = ?", [sae_id, int(feature)]):
            raise ValueError(f"SAE {sae_id} has no feature {int(feature)}")
        cur_row = _review_row(cur, sae_id, feature)
        old = {k: cur_row[k] for k in ("status", "reviewer", "reason")} if cur_row["version"] else None
        if expected_version is not None and int(expected_version) != int(cur_row["version"]):
            _log(cur, [Change(sae_id, int(feature), "review", old, mine, mine["reviewer"], "conflict")])
            return ReviewSave(cur_row, {"theirs": cur_row, "mine": mine})
        _log(cur, [Change(sae_id, int(feature), "review", old, mine, mine["reviewer"])])
        cur.execute(
            """INSERT INTO reviews (sae_id, feature, status, reviewer, reason, version, updated_at)
               VALUES (?, ?, ?, ?, ?, ?, now()::TIMESTAMP)
               ON CONFLICT (sae_id, feature) DO UPDATE SET status = excluded.status, reviewer = excluded.reviewer,
                   reason = excluded.reason, version = excluded.version, updated_at = excluded.updated_at""",
            [sae_id, int(feature), status, mine["reviewer"], mine["reason"], int(cur_row["version"]) + 1],
        )
        return ReviewSave(_review_row(cur, sae_id, feature))

    return store.write(fn)


def clean_list_name(name: str) -> str:
    """A list name stripped and capped; raises ValueError when blank."""
    name = re.sub(r"\s+", " ", str(name or "")).strip()[:200]
    if not name:
        raise ValueError("a list needs a name")
    return name


def add_to_list(
    store: Store,
    list_name: str,
    sae_id: str,
    features: int | Sequence[int],
    note: str | None = None,
    author: str | None = None,
) -> int:
    """Add features (one id or many) to a list, creating it; existing members keep their note and time
    unless a note is given. Returns how many were new. Raises ValueError for ids the SAE does not have."""
    name = clean_list_name(list_name)
    ids = [int(features)] if isinstance(features, numbers.Integral) else [int(f) for f in cast(Sequence[int], features)]
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
        present = {
            int(f)
            for (f,) in cur.execute(
                "SELECT feature FROM lists WHERE list_name = ? AND sae_id = ? AND feature IN (SELECT unnest(?::INTEGER[]))",
                [name, sae_id, ids],
            ).fetchall()
        }
        _log(cur, [Change(sae_id, f, "list", None, name, author) for f in ids if f not in present])
        for f in ids:
            cur.execute(
                """INSERT INTO lists (list_name, sae_id, feature, note, added_at) VALUES (?, ?, ?, ?, now())
                   ON CONFLICT (list_name, sae_id, feature)
                   DO UPDATE SET note = coalesce(excluded.note, lists.note)""",
                [name, sae_id, f, _text(note)],
            )
        return len(ids) - len(present)

    return store.write(fn)


def set_watch(
    store: Store,
    list_name: str,
    sae_id: str,
    features: int | Sequence[int],
    threshold: float,
    severity: str,
    author: str | None = None,
) -> int:
    """Make ``features`` watched members of the list ``list_name`` (added to the list when missing): a scan
    reports them where their activation reaches ``threshold`` x their max activation, with ``severity`` (one
    of ``SEVERITIES``). Returns how many features were set. Raises ValueError on a bad threshold or severity."""
    if severity not in SEVERITIES:
        raise ValueError(f"severity must be one of {', '.join(SEVERITIES)}; got {severity!r}")
    t = float(threshold)
    if not 0.0 < t <= 10.0:  # NaN fails too
        raise ValueError(f"threshold is a fraction of the feature's max activation in (0, 10]; got {threshold!r}")
    ids = [int(features)] if isinstance(features, numbers.Integral) else [int(f) for f in cast(Sequence[int], features)]
    add_to_list(store, list_name, sae_id, ids, author=author)
    name = clean_list_name(list_name)

    def fn(cur: duckdb.DuckDBPyConnection) -> int:
        for f in ids:
            cur.execute(
                """INSERT INTO watch_settings (list_name, sae_id, feature, threshold, severity, updated_at)
                   VALUES (?, ?, ?, ?, ?, now()::TIMESTAMP)
                   ON CONFLICT (list_name, sae_id, feature) DO UPDATE SET threshold = excluded.threshold,
                       severity = excluded.severity, updated_at = excluded.updated_at""",
                [name, sae_id, f, t, severity],
            )
        return len(ids)

    return store.write(fn)


def remove_from_list(store: Store, list_name: str, sae_id: str, feature: int, author: str | None = None) -> None:
    def fn(cur: duckdb.DuckDBPyConnection) -> None:
        gone = cur.execute(
            "DELETE FROM lists WHERE list_name = ? AND sae_id = ? AND feature = ? RETURNING feature",
            [list_name, sae_id, int(feature)],
        ).fetchall()
        _log(cur, [Change(sae_id, int(feature), "list", list_name, None, author) for _ in gone])
        cur.execute(
            "DELETE FROM watch_settings WHERE list_name = ? AND sae_id = ? AND feature = ?",
            [list_name, sae_id, int(feature)],
        )

    store.write(fn)


def delete_list(store: Store, list_name: str, author: str | None = None) -> int:
    """Delete a whole list; returns how many members it had."""

    def fn(cur: duckdb.DuckDBPyConnection) -> int:
        gone = cur.execute("DELETE FROM lists WHERE list_name = ? RETURNING sae_id, feature", [list_name]).fetchall()
        _log(cur, [Change(sid, int(f), "list", list_name, None, author) for sid, f in gone])
        cur.execute("DELETE FROM watch_settings WHERE list_name = ?", [list_name])
        return len(gone)

    return store.write(fn)


def rename_list(store: Store, old: str, new: str, author: str | None = None) -> None:
    """Rename a list; members already in a list called ``new`` are merged (no duplicates)."""
    new_name = clean_list_name(new)

    def fn(cur: duckdb.DuckDBPyConnection) -> None:
        if new_name != old:
            members = cur.execute("SELECT sae_id, feature FROM lists WHERE list_name = ?", [old]).fetchall()
            _log(cur, [Change(sid, int(f), "list", old, new_name, author) for sid, f in members])
            cur.execute(
                """INSERT INTO watch_settings SELECT ?, sae_id, feature, threshold, severity, updated_at
                   FROM watch_settings WHERE list_name = ? ON CONFLICT DO NOTHING""",
                [new_name, old],
            )
            cur.execute("DELETE FROM watch_settings WHERE list_name = ?", [old])
        cur.execute(
            """INSERT INTO lists (list_name, sae_id, feature, note, added_at)
               SELECT ?, sae_id, feature, note, added_at FROM lists WHERE list_name = ?
               ON CONFLICT (list_name, sae_id, feature) DO NOTHING""",
            [new_name, old],
        )
        if new_name != old:
            cur.execute("DELETE FROM lists WHERE list_name = ?", [old])

    store.write(fn)


# ------------------------------------------------------------------------------------------- explanations

#: the columns an explanation row may set, with their Arrow types (the insert goes through one Arrow table)
EXPLANATION_TYPES: dict[str, pa.DataType] = {
    "sae_id": pa.string(),
    "feature": pa.int32(),
    "text": pa.string(),
    "method": pa.string(),
    "explainer_model": pa.string(),
    "detection": pa.float32(),
    "fuzzing": pa.float32(),
    "scorer_model": pa.string(),
    "error": pa.string(),
    "author": pa.string(),
    "source": pa.string(),
    "sae_fingerprint": pa.string(),
    "tokens_used": pa.int32(),
    "created_at": pa.timestamp("us"),
}
EXPLANATION_FIELDS = tuple(k for k in EXPLANATION_TYPES if k != "created_at")
MAX_EXPLANATION = 2_000  # characters kept of an explanation's text
MAX_ERROR = 500


def _clean(v: object, cap: int) -> str | None:
    if v is None:
        return None
    s = re.sub(r"\s+", " ", str(v)).strip()[:cap]
    return s or None


def _score(v: object) -> float | None:
    if v is None:
        return None
    x = float(v)  # type: ignore[arg-type]
    if not 0.0 <= x <= 1.0:  # NaN fails too
        raise ValueError(f"a score is a balanced accuracy in [0, 1]; got {v!r}")
    return x


def _explanation_row(r: Mapping[str, Any]) -> dict[str, Any]:
    unknown = set(r) - set(EXPLANATION_FIELDS) - {"created_at"}
    if unknown:
        raise ValueError(f"unknown explanation fields: {', '.join(sorted(unknown))}")
    method = _clean(r.get("method"), 100)
    if not method:
        raise ValueError("an explanation needs a method")
    if not r.get("sae_id"):
        raise ValueError("an explanation needs an sae_id")
    text = r.get("text")
    text = None if text is None else (str(text).strip()[:MAX_EXPLANATION] or None)
    error = _clean(r.get("error"), MAX_ERROR)
    if text is None and error is None:
        error = "empty explanation"
    tokens_used = r.get("tokens_used")
    return {
        "sae_id": str(r["sae_id"]),
        "feature": int(r["feature"]),
        "text": text,
        "method": method,
        "explainer_model": _clean(r.get("explainer_model"), 300),
        "detection": _score(r.get("detection")),
        "fuzzing": _score(r.get("fuzzing")),
        "scorer_model": _clean(r.get("scorer_model"), 300),
        "error": None if text is not None else error,
        "author": _clean(r.get("author"), 200),
        "source": _clean(r.get("source"), 1000),
        "sae_fingerprint": _clean(r.get("sae_fingerprint"), 200),
        "tokens_used": None if tokens_used is None else int(tokens_used),
        "created_at": r.get("created_at"),
    }


def add_explanations(store: Store, rows: Sequence[Mapping[str, Any]], replace: bool = True) -> list[int]:
    """Insert explanation rows (dicts with keys from ``EXPLANATION_FIELDS``, optional ``created_at``; ``text``
    or ``error`` given) in one transaction; returns their new ids, in order.

    Ids are ``max(id) + 1, + 2, ...`` read under the store's write lock, so concurrent writers never collide.
    ``replace``: first delete the rows these replace, those with the same (sae_id, feature, method,
    explainer_model): a re-run, a ``--force`` or a retried failure leaves one row per explainer and feature.
    Text is stored as given (capped at MAX_EXPLANATION): it is untrusted, readers escape it. Raises ValueError
    on a row without method or sae_id, or a score outside [0, 1].
    """
    clean = [_explanation_row(r) for r in rows]
    if not clean:
        return []
    columns = {k: pa.array([r[k] for r in clean], t) for k, t in EXPLANATION_TYPES.items()}
    tbl = pa.table({**columns, "ord": pa.array(range(len(clean)), pa.int64())})

    def fn(cur: duckdb.DuckDBPyConnection) -> list[int]:
        cur.register("_new_explanations", tbl)
        try:
            if replace:
                cur.execute(
                    """DELETE FROM explanations e USING (SELECT DISTINCT sae_id, feature, method, explainer_model
                                                         FROM _new_explanations) n
                       WHERE e.sae_id = n.sae_id AND e.feature = n.feature AND e.method = n.method
                         AND e.explainer_model IS NOT DISTINCT FROM n.explainer_model"""
                )
            base = int(scalar(cur, "SELECT coalesce(max(id), 0) FROM explanations"))
            cur.execute(
                """INSERT INTO explanations (id, sae_id, feature, text, method, explainer_model, detection, fuzzing,
                       scorer_model, error, author, source, sae_fingerprint, tokens_used, created_at)
                   SELECT ? + 1 + ord, sae_id, feature, text, method, explainer_model, detection, fuzzing,
                       scorer_model, error, author, source, sae_fingerprint, tokens_used,
                       coalesce(created_at, now()::TIMESTAMP)
                   FROM _new_explanations ORDER BY ord""",
                [base],
            )
        finally:
            cur.unregister("_new_explanations")
        return [base + 1 + i for i in range(len(clean))]

    return store.write(fn)


def set_explanation_scores(store: Store, scores: Sequence[tuple[int, float | None, float | None, str | None]]) -> int:
    """Store scores: ``(id, detection, fuzzing, scorer_model)`` per explanation (a None score stays NULL); one
    transaction. Returns how many rows were updated (ids that no longer exist are skipped)."""
    clean = [(int(i), _score(d), _score(f), _clean(m, 300)) for i, d, f, m in scores]

    def fn(cur: duckdb.DuckDBPyConnection) -> int:
        n = 0
        for i, d, f, m in clean:
            hit = cur.execute(
                "UPDATE explanations SET detection = ?, fuzzing = ?, scorer_model = ? WHERE id = ? RETURNING id",
                [d, f, m, i],
            ).fetchall()
            n += len(hit)
        return n

    return store.write(fn)


def delete_explanation(store: Store, explanation_id: int) -> int:
    """Delete one explanation row by id; returns 1 when it existed, else 0."""
    return store.write(
        lambda cur: len(
            cur.execute("DELETE FROM explanations WHERE id = ? RETURNING id", [int(explanation_id)]).fetchall()
        )
    )


EVAL_FIGURES = ("ce_clean", "ce_sae", "ce_zero", "delta_lm_loss", "loss_recovered", "kl", "fve", "l0")


def set_sae_eval(
    store: Store, sae_id: str, method: str, figures: Mapping[str, Any], n_contexts: int, context_size: int
) -> None:
    """Replace the ``sae_evals`` row of (``sae_id``, ``method``) with ``figures`` (keys ``EVAL_FIGURES`` and
    ``tokens``; missing figures are NULL)."""
    from datetime import UTC, datetime

    def num(k: str) -> float | None:
        v = figures.get(k)
        return None if v is None or v != v else float(v)  # NaN -> NULL

    values = [sae_id, method, int(figures["tokens"]), int(n_contexts), int(context_size)]
    values += [num(k) for k in EVAL_FIGURES]
    values.append(datetime.now(UTC).replace(tzinfo=None))

    def fn(cur: duckdb.DuckDBPyConnection) -> None:
        cur.execute("DELETE FROM sae_evals WHERE sae_id = ? AND method = ?", [sae_id, method])
        cur.execute("INSERT INTO sae_evals VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", values)

    store.write(fn)


# ------------------------------------------------------------------------------------------ build tables

#: ``saes`` columns a build may set once its rows are written (``write_sae_tables``'s ``final``)
FINAL_COLUMNS = frozenset({"stage_seconds", "build_seconds"})


def write_sae_tables(
    path: str | Path,
    sae_row: Mapping[str, Any],
    feats: pd.DataFrame | pa.Table | Callable[[], pd.DataFrame | pa.Table],
    ex: pd.DataFrame | pa.Table | pa.RecordBatchReader,
    final: Callable[[], Mapping[str, Any]] | None = None,
) -> None:
    """Write one SAE's build tables (``saes``, ``features``, ``examples``) into ``path`` atomically, keeping
    other SAEs and every user table.

    The new SAE's rows go into a temporary file without any lock; only the copy of the kept rows from the
    current file and the swap (``os.replace``) run under the file's exclusive lock, so dashboards and other
    commands keep working on the old file until then and reopen the new one on their next read. ``ex`` may be a
    stream (made while DuckDB reads it), and ``feats`` a callable, called once the examples are in (a build's
    map is still laid out meanwhile). ``final``, called once the rows are in (before the swap), returns
    ``saes`` columns of ``FINAL_COLUMNS`` to set: the build's stage times with the write's own time.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    for p in (tmp, Path(str(tmp) + ".wal")):
        p.unlink(missing_ok=True)
    sae_id = str(sae_row["sae_id"])
    try:
        con = duckdb.connect(str(tmp))
        try:
            create_schema(con)
            for name, frame, table in (
                ("new_saes", pd.DataFrame([dict(sae_row)]), "saes"),
                ("new_examples", ex, "examples"),
                ("new_features", feats, "features"),
            ):
                con.register(name, frame() if callable(frame) else frame)
                con.execute(f"INSERT INTO {table} BY NAME SELECT * FROM {name}")  # noqa: S608 - constants
                con.unregister(name)
            with lock_for(path).exclusive():  # readers close; other builds and writers of this file wait
                if path.exists() and path.stat().st_size > 0:
                    copy_kept_rows(con, path, sae_id)  # other SAEs and every user table
                if final is not None:
                    cols = dict(final())
                    unknown = set(cols) - FINAL_COLUMNS
                    if unknown:
                        raise ValueError(f"final columns must be among {sorted(FINAL_COLUMNS)}; got {sorted(unknown)}")
                    if cols:
                        sets = ", ".join(f"{c} = ?" for c in sorted(cols))  # names checked above
                        con.execute(
                            f"UPDATE saes SET {sets} WHERE sae_id = ?", [*(cols[c] for c in sorted(cols)), sae_id]
                        )
                con.execute("CHECKPOINT")
                con.close()
                os.replace(tmp, path)
                # A WAL left by a writer that died (its contents were replayed into `old` and copied above) no
                # longer matches the new file and would stop it from opening.
                Path(str(path) + ".wal").unlink(missing_ok=True)
        finally:
            con.close()
    except LockError as e:
        raise DatabaseError(str(e)) from None
    finally:
        tmp.unlink(missing_ok=True)
        Path(str(tmp) + ".wal").unlink(missing_ok=True)


# ------------------------------------------------------------------------------ search by meaning (feature_embeddings)


def utc_now() -> datetime:
    """Naive UTC now (the convention of ``saes.built_at``)."""
    return datetime.now(UTC).replace(tzinfo=None)


def upsert_embeddings(
    store: Store,
    sae_id: str,
    model: str,
    features: Sequence[int],
    texts: Sequence[str],
    hashes: Sequence[str],
    vectors: np.ndarray,
) -> int:
    """Insert or replace the vectors of ``features`` (one transaction). ``vectors [n, dim]`` float32,
    L2-normalised. Returns the number of rows written."""
    n = len(features)
    if not (len(texts) == len(hashes) == n == len(vectors)):
        raise ValueError("features, texts, hashes and vectors differ in length")
    if n == 0:
        return 0
    v = np.ascontiguousarray(vectors, dtype=np.float32)
    tbl = pa.table(
        {
            "feature": pa.array(id_list(features), pa.int32()),
            "text": pa.array([str(t) for t in texts], pa.string()),
            "text_hash": pa.array([str(h) for h in hashes], pa.string()),
            "vector": pa.FixedSizeListArray.from_arrays(pa.array(v.reshape(-1)), v.shape[1]).cast(
                pa.list_(pa.float32())
            ),
        }
    )
    now = utc_now()

    def fn(cur: duckdb.DuckDBPyConnection) -> int:
        cur.register("_new_embeddings", tbl)
        try:
            cur.execute(
                """INSERT INTO feature_embeddings (sae_id, feature, model, text, text_hash, vector, updated_at)
                   SELECT ?, feature, ?, text, text_hash, vector, ? FROM _new_embeddings
                   ON CONFLICT (sae_id, feature, model) DO UPDATE SET text = excluded.text,
                       text_hash = excluded.text_hash, vector = excluded.vector, updated_at = excluded.updated_at""",
                [sae_id, model, now],
            )
        finally:
            cur.unregister("_new_embeddings")
        return n

    return store.write(fn)


def _on_features(store: Store, head: str, params: list[Any], sae_id: str, model: str, features: Sequence[int]) -> int:
    """Run ``head`` (a constant UPDATE/DELETE on feature_embeddings) on the rows of ``features``; how many."""
    ids = id_list(features)
    if not ids:
        return 0
    sql = head + " WHERE sae_id = ? AND model = ? AND feature IN (SELECT unnest(?::INTEGER[])) RETURNING feature"
    return store.write(lambda cur: len(cur.execute(sql, [*params, sae_id, model, ids]).fetchall()))


def touch_embeddings(store: Store, sae_id: str, model: str, features: Sequence[int]) -> int:
    """Mark stored vectors as verified current (their text did not change): sets ``updated_at`` to now."""
    return _on_features(store, "UPDATE feature_embeddings SET updated_at = ?", [utc_now()], sae_id, model, features)


def delete_embeddings(store: Store, sae_id: str, model: str, features: Sequence[int]) -> int:
    """Delete the stored vectors of ``features`` (features without words or contexts any more)."""
    return _on_features(store, "DELETE FROM feature_embeddings", [], sae_id, model, features)


# --------------------------------------------------------------------------------------- Neuronpedia import and export


IMPORT_FIELDS = ("sae_id", "feature", "text", "method", "explainer_model", "author", "source", "created_at")


def insert_explanations(store: Store, rows: Sequence[Mapping[str, Any]]) -> tuple[int, int]:
    """Insert explanation rows (keys ``IMPORT_FIELDS``; ``created_at`` optional, default now) that are not
    stored yet, in one transaction. Returns (inserted, skipped as already present, within the rows or in the
    table). The caller checks that features exist; text is stored as given (untrusted: readers escape it)."""
    if not rows:
        return 0, 0
    for r in rows:
        if not r.get("sae_id") or not r.get("method") or not str(r.get("text") or "").strip():
            raise ValueError("an imported explanation needs sae_id, method and text")
    created: list[datetime | None] = [r.get("created_at") for r in rows]
    tbl = pa.table(
        {
            "sae_id": pa.array([str(r["sae_id"]) for r in rows], pa.string()),
            "feature": pa.array([int(r["feature"]) for r in rows], pa.int32()),
            "text": pa.array([str(r["text"]) for r in rows], pa.string()),
            "method": pa.array([str(r["method"]) for r in rows], pa.string()),
            "explainer_model": pa.array([r.get("explainer_model") for r in rows], pa.string()),
            "author": pa.array([r.get("author") for r in rows], pa.string()),
            "source": pa.array([r.get("source") for r in rows], pa.string()),
            "created_at": pa.array(created, pa.timestamp("us")),
            "ord": pa.array(range(len(rows)), pa.int64()),
        }
    )

    def fn(cur: duckdb.DuckDBPyConnection) -> tuple[int, int]:
        cur.register("_import_rows", tbl)
        try:
            base = int(scalar(cur, "SELECT coalesce(max(id), 0) FROM explanations"))
            inserted = cur.execute(
                """INSERT INTO explanations (id, sae_id, feature, text, method, explainer_model, author, source,
                       created_at)
                   SELECT ? + row_number() OVER (ORDER BY ord), sae_id, feature, text, method, explainer_model,
                          author, source, coalesce(created_at, now()::TIMESTAMP)
                   FROM (SELECT * FROM _import_rows n
                         QUALIFY row_number() OVER (PARTITION BY sae_id, feature, method, text, explainer_model
                                                    ORDER BY ord) = 1) n
                   WHERE NOT EXISTS (
                       SELECT 1 FROM explanations e
                       WHERE e.sae_id = n.sae_id AND e.feature = n.feature AND e.method = n.method
                         AND e.text = n.text AND e.explainer_model IS NOT DISTINCT FROM n.explainer_model)
                   RETURNING id""",
                [base],
            ).fetchall()
        finally:
            cur.unregister("_import_rows")
        return len(inserted), len(rows) - len(inserted)

    return store.write(fn)


# ---------------------------------------------------------------------------------------------------- steering presets


PRESET_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9 _.\-]{0,79}")


def check_preset_name(name: str) -> str:
    """``name`` stripped; PresetError unless it is 1-80 letters, digits, spaces, '_', '-' or '.'."""
    name = (name or "").strip()
    if not PRESET_NAME.fullmatch(name):
        raise PresetError(
            f"preset name {name!r} is not allowed: use 1-80 letters, digits, spaces, '_', '-' or '.', "
            "starting with a letter or digit"
        )
    return name


def write_preset(store: Store, name: str, sae_id: str, config: Mapping[str, Any], overwrite: bool = False) -> str:
    """Store the JSON object ``config`` under ``name`` for ``sae_id``; refuses to replace an existing preset
    unless ``overwrite``. Returns the cleaned name."""
    name = check_preset_name(name)
    try:
        payload = json.dumps(dict(config), sort_keys=True, allow_nan=False)
    except (TypeError, ValueError) as e:
        raise PresetError(f"preset {name!r} cannot be stored as JSON: {e}") from None
    now = datetime.now(UTC).replace(tzinfo=None)

    def write(cur: Any) -> None:
        exists = cur.execute("SELECT count(*) FROM steering_presets WHERE name = ?", [name]).fetchone()[0]
        if exists and not overwrite:
            raise PresetError(f"a preset named {name!r} already exists; pick another name or overwrite it")
        cur.execute(
            "INSERT INTO steering_presets (name, sae_id, config_json, created_at) VALUES (?, ?, ?, ?) "
            "ON CONFLICT (name) DO UPDATE SET sae_id = excluded.sae_id, config_json = excluded.config_json, "
            "created_at = excluded.created_at",
            [name, sae_id, payload, now],
        )

    store.write(write)
    return name


def delete_preset(store: Store, name: str) -> bool:
    """Delete preset ``name``; True when it existed."""

    def write(cur: Any) -> bool:
        n = cur.execute("SELECT count(*) FROM steering_presets WHERE name = ?", [name]).fetchone()[0]
        cur.execute("DELETE FROM steering_presets WHERE name = ?", [name])
        return bool(n)

    return store.write(write)
