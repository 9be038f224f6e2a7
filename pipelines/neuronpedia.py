"""Neuronpedia interop: import its explanation exports, export a dictionary in its batch-file format.

Neuronpedia publishes (and its own export script writes) one folder per source::

    {modelId}/{layer}/features/batch-N.jsonl.gz       one row per feature (table Neuron)
    {modelId}/{layer}/activations/batch-N.jsonl.gz    stored activating contexts (table Activation)
    {modelId}/{layer}/explanations/batch-N.jsonl.gz   words for features (table Explanation)

where ``layer`` is Neuronpedia's source id (e.g. ``6-res-jb``) and ``index`` the feature index, both strings.
Field names here are the columns that export writes (see docs/neuronpedia.md for which ones we fill).

Import (``import_neuronpedia``) reads explanation rows and stores them as ``explanations`` with method
``import``, ``explainer_model`` = ``explanationModelName`` and ``source`` = ``neuronpedia:MODEL/LAYER
type=TYPE id=ID``. Rows are mapped to one SAE by an explicit ``MODEL/LAYER``: rows of any other model or layer,
with an index that is not an integer or not a feature of the SAE, or without a description, are counted and
reported, never guessed. Re-importing the same file adds nothing (duplicates are counted).

Export (``export_neuronpedia``) writes the three folders for one SAE, plus ``featuredict-export.json`` (what
was written, and from which SAE). Labels are exported as explanations of type ``featuredict-label``.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import math
import re
import shutil
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from featuredict.db import queries as q
from featuredict.db import writes
from featuredict.db.errors import UserError
from featuredict.db.store import Store
from featuredict.pipelines import __version__

IMPORT_METHOD = "import"
SOURCE_PREFIX = "neuronpedia:"
LABEL_TYPE = "featuredict-label"
BATCH_SIZE = 1024  # features (and explanations) per batch file, as Neuronpedia's export
MAX_TEXT = 2000  # characters kept of an imported description
FOLDERS = ("features", "activations", "explanations")
_ID_RE = re.compile(r"^[A-Za-z0-9_.-]{1,128}$")  # Neuronpedia model and source ids (no '/')
_BATCH_RE = re.compile(r"batch-(\d+)\.jsonl(\.gz)?$")


class InteropError(UserError, ValueError):
    """Bad interop input (message fit to show as is)."""


def parse_source(source: str) -> tuple[str, str]:
    """``MODEL/LAYER`` (a Neuronpedia model id and source id, e.g. ``gpt2-small/6-res-jb``) -> (model, layer)."""
    parts = (source or "").strip().split("/")
    if len(parts) != 2 or not all(_ID_RE.match(p) for p in parts):
        raise InteropError(
            f"--source must be MODEL/LAYER as Neuronpedia names them (e.g. gpt2-small/6-res-jb); got {source!r}"
        )
    return parts[0], parts[1]


def source_tag(model: str, layer: str, type_name: Any = None, np_id: Any = None) -> str:
    """The ``explanations.source`` of an imported row: ``neuronpedia:MODEL/LAYER`` [`` type=T``] [`` id=I``]."""
    s = f"{SOURCE_PREFIX}{model}/{layer}"
    for key, v in (("type", type_name), ("id", np_id)):
        if v:
            s += f" {key}=" + re.sub(r"\s+", "_", str(v))[:100]
    return s


def parse_source_tag(source: str | None) -> dict[str, str]:
    """Inverse of ``source_tag``: {model, layer, type, id} (those present); {} for other sources."""
    if not source or not source.startswith(SOURCE_PREFIX):
        return {}
    head, *rest = source[len(SOURCE_PREFIX) :].split(" ")
    out: dict[str, str] = {}
    if "/" in head:
        out["model"], out["layer"] = head.split("/", 1)
    for part in rest:
        k, _, v = part.partition("=")
        if k in ("type", "id") and v:
            out[k] = v
    return out


# ---------------------------------------------------------------------------------------------- import


@dataclass
class ImportReport:
    source: str
    sae_id: str
    files: list[str] = field(default_factory=list)
    rows: int = 0
    imported: int = 0
    duplicates: int = 0  # already stored (or repeated in the files)
    other_source: Counter = field(default_factory=Counter)  # (modelId, layer) -> rows that do not match --source
    unknown_feature: int = 0  # index not a feature of the SAE
    bad_index: int = 0  # index missing or not an integer
    no_text: int = 0  # empty description
    bad_lines: int = 0  # not a JSON object

    @property
    def unmatched(self) -> int:
        return sum(self.other_source.values()) + self.unknown_feature + self.bad_index + self.no_text + self.bad_lines

    def summary(self) -> str:
        lines = [
            f"read {self.rows:,} rows from {len(self.files)} file(s); imported {self.imported:,} explanations of "
            f"{self.source} into {self.sae_id} ({self.duplicates:,} already there)"
        ]
        if self.unmatched:
            lines.append(f"not imported: {self.unmatched:,} rows")
            for (m, lay), n in self.other_source.most_common(5):
                lines.append(f"  {n:,} rows of another source: {m}/{lay}")
            if len(self.other_source) > 5:
                lines.append(f"  ... and {len(self.other_source) - 5} more sources")
            for n, why in (
                (self.unknown_feature, "index is not a feature of the SAE"),
                (self.bad_index, "index missing or not an integer"),
                (self.no_text, "empty description"),
                (self.bad_lines, "line is not a JSON object"),
            ):
                if n:
                    lines.append(f"  {n:,} rows: {why}")
        return "\n".join(lines)


def batch_files(paths: Sequence[str | Path], folder: str = "explanations") -> list[Path]:
    """The batch files ``paths`` name: files as given; a folder's ``batch-N.jsonl[.gz]`` files, or those of its
    ``folder`` subfolder (a Neuronpedia source folder). Sorted by batch number within a folder."""
    out: list[Path] = []
    for raw in paths:
        p = Path(raw).expanduser()
        if p.is_file():
            out.append(p)
            continue
        if not p.is_dir():
            raise FileNotFoundError(f"no file or folder {p}")
        d = p / folder if (p / folder).is_dir() else p
        found = [f for f in d.iterdir() if f.is_file() and _BATCH_RE.search(f.name)]
        if not found:
            raise FileNotFoundError(f"no batch-N.jsonl.gz files in {d}")
        out += sorted(found, key=lambda f: int(_BATCH_RE.search(f.name).group(1)))  # type: ignore[union-attr]
    return out


def read_jsonl(path: Path) -> Iterator[dict[str, Any] | None]:
    """Rows of a .jsonl or .jsonl.gz file; None for a line that is not a JSON object (blank lines skipped)."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rt", encoding="utf-8") as fh:
            for line in fh:
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    yield None
                    continue
                yield row if isinstance(row, dict) else None
    except (OSError, EOFError, UnicodeDecodeError) as e:
        raise InteropError(f"cannot read {path}: {e}") from e


def _feature_index(v: Any) -> int | None:
    if isinstance(v, bool):
        return None
    if isinstance(v, int):
        return v
    if isinstance(v, str) and re.fullmatch(r"\s*\d+\s*", v):
        return int(v)
    return None


def _created(v: Any) -> datetime | None:
    if not isinstance(v, str):
        return None
    try:
        d = datetime.fromisoformat(v.replace("Z", "+00:00"))
    except ValueError:
        return None
    return d.astimezone(UTC).replace(tzinfo=None) if d.tzinfo else d


def import_neuronpedia(
    store: Store,
    sae_id: str,
    source: str,
    paths: Sequence[str | Path],
    author: str | None = None,
    progress: bool = True,
) -> ImportReport:
    """Import the explanation rows of Neuronpedia batch files (``paths``: files or folders) whose (modelId,
    layer) is ``source`` (``MODEL/LAYER``) into ``sae_id``'s explanations. Everything else is counted in the
    report, not imported. Raises InteropError / FileNotFoundError / ValueError (one line) on bad input."""
    model, layer = parse_source(source)
    q.resolve_sae(store, sae_id)
    known = set(q.feature_range(store, sae_id))
    files = batch_files(paths)
    rep = ImportReport(source=f"{model}/{layer}", sae_id=sae_id, files=[str(f) for f in files])
    pending: list[dict[str, Any]] = []

    def flush() -> None:
        ins, dup = writes.insert_explanations(store, pending)
        rep.imported += ins
        rep.duplicates += dup
        pending.clear()

    for f in tqdm(files, unit="file", desc="importing", disable=not progress):
        for row in read_jsonl(f):
            rep.rows += 1
            if row is None:
                rep.bad_lines += 1
                continue
            m, lay = str(row.get("modelId", "")), str(row.get("layer", ""))
            if (m, lay) != (model, layer):
                rep.other_source[(m, lay)] += 1
                continue
            idx = _feature_index(row.get("index"))
            if idx is None:
                rep.bad_index += 1
                continue
            if idx not in known:
                rep.unknown_feature += 1
                continue
            text = str(row.get("description") or "").strip()[:MAX_TEXT]
            if not text:
                rep.no_text += 1
                continue
            expl_model = row.get("explanationModelName")
            pending.append(
                {
                    "sae_id": sae_id,
                    "feature": idx,
                    "text": text,
                    "method": IMPORT_METHOD,
                    "explainer_model": str(expl_model)[:300] if expl_model else None,
                    "author": (author or "").strip()[:200] or None,
                    "source": source_tag(model, layer, row.get("typeName"), row.get("id")),
                    "created_at": _created(row.get("createdAt")),
                }
            )
            if len(pending) >= 5000:
                flush()
    flush()
    return rep


# ---------------------------------------------------------------------------------------------- export


@dataclass
class ExportReport:
    out: Path
    features: int
    activations: int
    explanations: int
    files: int

    def summary(self) -> str:
        return (
            f"wrote {self.features:,} features, {self.activations:,} activations and {self.explanations:,} "
            f"explanations in {self.files} batch files under {self.out}"
        )


def _f(x: Any) -> float | None:
    """A float for JSON: float32 precision written short (7 significant digits); None for NaN/inf/None."""
    if x is None:
        return None
    v = float(x)
    return float(f"{v:.7g}") if math.isfinite(v) else None


def _floats(xs: Any) -> list[float | None]:
    return [] if xs is None else [_f(x) for x in np.asarray(xs, dtype=np.float64).tolist()]


def _strs(xs: Any) -> list[str]:
    return [] if xs is None else [str(x) for x in list(xs)]


def _ints(xs: Any) -> list[int]:
    return [] if xs is None else [int(x) for x in list(xs)]


def _np_id(*parts: Any) -> str:
    """A stable 25-character id (Neuronpedia ids are 25-character cuids): 'fd' + 23 hex digits of sha1."""
    return "fd" + hashlib.sha1("\x1f".join(str(p) for p in parts).encode()).hexdigest()[:23]


def _write_batch(path: Path, rows: list[dict[str, Any]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with gzip.open(tmp, "wt", encoding="utf-8", compresslevel=5) as fh:
        for r in rows:
            fh.write(json.dumps(r, ensure_ascii=False, allow_nan=False) + "\n")
    tmp.replace(path)


def export_neuronpedia(
    store: Store,
    sae_id: str,
    source: str,
    out: str | Path,
    batch_size: int = BATCH_SIZE,
    include_labels: bool = True,
    creator_id: str | None = None,
    force: bool = False,
    progress: bool = True,
) -> ExportReport:
    """Write ``sae_id`` as Neuronpedia batch files under ``out/MODEL/LAYER/`` (``source`` = ``MODEL/LAYER``, the
    ids it gets on Neuronpedia): features, activations (every stored top and interval context) and explanations
    (every explanation with text, and labels unless ``include_labels`` is False). ``creator_id`` fills
    ``creatorId`` (and ``authorId`` where the row has no author). Refuses to write into a folder that already
    holds batch files unless ``force`` (then they are replaced)."""
    model, layer = parse_source(source)
    if batch_size < 1:
        raise InteropError("--batch-size must be at least 1")
    info = q.sae_info(store, q.resolve_sae(store, sae_id))
    assert info is not None
    root = Path(out).expanduser() / model / layer
    existing = [p for d in FOLDERS for p in (root / d).glob("batch-*.jsonl*")] if root.exists() else []
    if existing and not force:
        raise InteropError(f"{root} already holds Neuronpedia batch files; pass --force to replace them")
    for d in FOLDERS:
        if (root / d).exists() and force:
            shutil.rmtree(root / d)
    source_set = layer.split("-", 1)[1] if re.match(r"^\d+-.", layer) else layer
    edges = np.asarray(info["hist_edges"], dtype=np.float64)
    centres: np.ndarray | list[float] = (
        np.sqrt(np.clip(edges[:-1], 1e-30, None) * np.clip(edges[1:], 1e-30, None)) if len(edges) > 1 else []
    )
    data_source = (info.get("corpus") or None) and str(info["corpus"])[:500]
    ids = q.feature_range(store, sae_id)
    n_feat = n_act = n_files = 0
    starts = list(range(0, len(ids), batch_size))
    for b, i in enumerate(tqdm(starts, unit="batch", desc="exporting", disable=not progress)):
        lo, hi = ids[i], ids[min(i + batch_size, len(ids)) - 1] + 1
        feats = q.features_for_export(store, sae_id, lo, hi)
        rows = [
            {
                "modelId": model,
                "layer": layer,
                "index": str(int(r.feature)),
                "maxActApprox": _f(r.max_act),
                "creatorId": creator_id,
                "frac_nonzero": _f(r.density),
                "freq_hist_data_bar_heights": _floats(r.hist_counts),
                "freq_hist_data_bar_values": _floats(centres),
                "logits_hist_data_bar_heights": [],
                "logits_hist_data_bar_values": [],
                "neuron_alignment_indices": [],
                "neuron_alignment_l1": [],
                "neuron_alignment_values": [],
                "correlated_neurons_indices": [],
                "correlated_neurons_l1": [],
                "correlated_neurons_pearson": [],
                "decoder_weights_dist": [],
                "neg_str": _strs(r.neg_tokens),
                "neg_values": _floats(r.neg_values),
                "pos_str": _strs(r.pos_tokens),
                "pos_values": _floats(r.pos_values),
                "sourceSetName": source_set,
                "topkCosSimIndices": _ints(r.neighbours),
                "topkCosSimValues": _floats(r.neighbour_cos),
                "vector": [],
                "vectorLabel": None,
                "hookName": None,
                "vectorDefaultSteerStrength": None,
                "hasVector": False,
            }
            for r in feats.itertuples()
        ]
        _write_batch(root / "features" / f"batch-{b}.jsonl.gz", rows)
        n_feat += len(rows)
        ex = q.examples_for_export(store, sae_id, lo, hi)
        acts = []
        for r in ex.itertuples():
            values = _floats(r.acts)
            interval = r.kind == "interval"
            acts.append(
                {
                    "id": _np_id(sae_id, int(r.feature), r.kind, int(r.band), int(r.rank), int(r.context_id)),
                    "modelId": model,
                    "layer": layer,
                    "index": str(int(r.feature)),
                    "creatorId": creator_id,
                    "dataSource": data_source,
                    "tokens": _strs(r.tokens),
                    "maxValue": _f(r.max_act),
                    "minValue": min((v for v in values if v is not None), default=0.0),
                    "values": values,
                    "maxValueTokenIndex": int(r.max_pos),
                    "dfaValues": [],
                    "dfaMaxValue": None,
                    "dfaTargetIndex": None,
                    "binContains": None,
                    "binMin": _f(r.band_lo) if interval else None,
                    "binMax": _f(r.band_hi) if interval else None,
                }
            )
        _write_batch(root / "activations" / f"batch-{b}.jsonl.gz", acts)
        n_act += len(acts)
        n_files += 2
    expl = _explanation_rows(store, sae_id, model, layer, include_labels, creator_id)
    for b, i in enumerate(range(0, len(expl), batch_size)):
        _write_batch(root / "explanations" / f"batch-{b}.jsonl.gz", expl[i : i + batch_size])
        n_files += 1
    manifest = {
        "tool": f"featuredict {__version__}",
        "sae_id": sae_id,
        "model_spec": info.get("model_spec"),
        "hook_name": info.get("hook_name"),
        "d_sae": info.get("d_sae"),
        "corpus": info.get("corpus"),
        "modelId": model,
        "layer": layer,
        "features": n_feat,
        "activations": n_act,
        "explanations": len(expl),
        "labels_included": include_labels,
        "format": "Neuronpedia export batch files; see featuredict docs/neuronpedia.md",
    }
    root.mkdir(parents=True, exist_ok=True)
    (root / "featuredict-export.json").write_text(json.dumps(manifest, indent=2, default=str), encoding="utf-8")
    return ExportReport(root, n_feat, n_act, len(expl), n_files)


def _explanation_rows(
    store: Store, sae_id: str, model: str, layer: str, include_labels: bool, creator_id: str | None
) -> list[dict[str, Any]]:
    """Explanation rows of the export: explanations with text (an imported Neuronpedia row keeps its type and
    id), then labels as type ``featuredict-label``; ordered by feature."""
    rows: list[tuple[int, int, dict[str, Any]]] = []
    for r in q.explanations_for_export(store, sae_id).itertuples():
        tag = parse_source_tag(r.source) if r.method == IMPORT_METHOD else {}
        same = tag.get("model") == model and tag.get("layer") == layer
        rows.append(
            (
                int(r.feature),
                0,
                {
                    "id": tag["id"] if same and "id" in tag else _np_id(sae_id, "explanation", int(r.id)),
                    "modelId": model,
                    "layer": layer,
                    "index": str(int(r.feature)),
                    "authorId": _str_or(r.author, creator_id),
                    "description": str(r.text),
                    "embedding": None,
                    "typeName": tag.get("type") or f"featuredict-{r.method}",
                    "explanationModelName": _str_or(r.explainer_model, None),
                    "umap_x": None,
                    "umap_y": None,
                    "umap_cluster": None,
                    "umap_log_feature_sparsity": None,
                },
            )
        )
    if include_labels:
        for r in q.labels_for_export(store, sae_id).itertuples():
            rows.append(
                (
                    int(r.feature),
                    1,
                    {
                        "id": _np_id(sae_id, "label", int(r.feature), r.label),
                        "modelId": model,
                        "layer": layer,
                        "index": str(int(r.feature)),
                        "authorId": _str_or(r.author, creator_id),
                        "description": str(r.label),
                        "embedding": None,
                        "typeName": LABEL_TYPE,
                        "explanationModelName": None,
                        "umap_x": None,
                        "umap_y": None,
                        "umap_cluster": None,
                        "umap_log_feature_sparsity": None,
                    },
                )
            )
    rows.sort(key=lambda t: (t[0], t[1]))
    return [r for _, _, r in rows]


def _str_or(v: Any, default: str | None) -> str | None:
    if v is None or v is pd.NA or (isinstance(v, float) and v != v):
        return default
    s = str(v).strip()
    return s or default
