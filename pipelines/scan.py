"""Scan texts for watched features: which features of a watchlist fire over their threshold, where, how much.

``read_records`` streams records from a .txt (one record per non-empty line), .jsonl (a text field, or a chat
``messages`` list rendered with the tokenizer's chat template) or .parquet file (a text column), yielding a
``Record`` or a ``BadRecord`` (line / row number and why) one at a time, so memory stays flat in the number of
records. ``scan_text`` runs one text through ``Runtime.encode`` (the activation path of the build) and reports,
per watched feature whose activation reaches ``threshold x max_act`` on some valid token: the token spans over
threshold, the max and mean activation over the record's valid tokens, the severity, and a pooled score
(max activation / the feature's max activation). A record's score is the max of its hits' scores and its
severity the highest of its hits'.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from featuredict.pipelines.model.runtime import Runtime

SEVERITY_ORDER = ("low", "medium", "high", "critical")
MAX_TOKENS = 1024  # tokens scanned per record (longer records are cut; the report says so)


@dataclass(frozen=True)
class Record:
    line: int  # 1-based line (txt/jsonl) or row (parquet) number
    text: str


@dataclass(frozen=True)
class BadRecord:
    line: int
    reason: str


@dataclass(frozen=True)
class Watch:
    """The watched features: arrays over features (``q.watchlist`` columns)."""

    features: np.ndarray  # int
    thresholds: np.ndarray  # fraction of max_act
    severities: Sequence[str]
    max_acts: np.ndarray

    def __post_init__(self) -> None:
        bad = [s for s in self.severities if s not in SEVERITY_ORDER]
        if bad:
            raise ValueError(f"unknown severity {bad[0]!r}; use one of {', '.join(SEVERITY_ORDER)}")
        if not len(self.features):
            raise ValueError("the watchlist has no features of this SAE")

    @classmethod
    def from_frame(cls, df: pd.DataFrame) -> Watch:
        return cls(
            df["feature"].to_numpy(dtype=np.int64),
            df["threshold"].to_numpy(dtype=np.float64),
            [str(s) for s in df["severity"]],
            df["max_act"].to_numpy(dtype=np.float64),
        )


@dataclass
class ScanResult:
    line: int
    n_tokens: int
    truncated: bool
    tokens: list[str]
    hits: list[dict[str, Any]] = field(default_factory=list)

    @property
    def score(self) -> float:
        return max((h["score"] for h in self.hits), default=0.0)

    @property
    def severity(self) -> str | None:
        if not self.hits:
            return None
        return max((h["severity"] for h in self.hits), key=SEVERITY_ORDER.index)

    def to_json(self) -> dict[str, Any]:
        return {
            "line": self.line,
            "n_tokens": self.n_tokens,
            "truncated": self.truncated,
            "score": self.score,
            "severity": self.severity,
            "hits": self.hits,
        }


def _chat_text(messages: Any, tokenizer: Any) -> str:
    if not isinstance(messages, list) or not all(
        isinstance(m, dict) and isinstance(m.get("content"), str) for m in messages
    ):
        raise ValueError("'messages' must be a list of {role, content} objects")
    if tokenizer is None or not getattr(tokenizer, "chat_template", None):
        raise ValueError("a chat record needs a tokenizer with a chat template (this model's has none)")
    return str(tokenizer.apply_chat_template(messages, tokenize=False))


def _from_obj(obj: Any, line: int, text_field: str, tokenizer: Any) -> Record | BadRecord:
    if not isinstance(obj, dict):
        return BadRecord(line, "not a JSON object")
    try:
        if text_field in obj:
            text = obj[text_field]
            if not isinstance(text, str):
                return BadRecord(line, f"field {text_field!r} is not a string")
        elif "messages" in obj:
            text = _chat_text(obj["messages"], tokenizer)
        else:
            return BadRecord(line, f"missing field {text_field!r} (or 'messages')")
    except ValueError as e:
        return BadRecord(line, str(e))
    if not text.strip():
        return BadRecord(line, "empty text")
    return Record(line, text)


def read_records(path: str | Path, text_field: str = "text", tokenizer: Any = None) -> Iterator[Record | BadRecord]:
    """Stream the records of a .txt, .jsonl or .parquet file (see the module docstring). Raises ValueError
    for another suffix, OSError when the file cannot be read."""
    p = Path(path)
    suffix = p.suffix.lower()
    if suffix == ".txt":
        with p.open(encoding="utf-8", errors="replace") as fh:
            for i, line in enumerate(fh, 1):
                if line.strip():
                    yield Record(i, line.rstrip("\n"))
    elif suffix == ".jsonl":
        with p.open(encoding="utf-8", errors="replace") as fh:
            for i, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    yield BadRecord(i, f"invalid JSON: {e.msg}")
                    continue
                yield _from_obj(obj, i, text_field, tokenizer)
    elif suffix == ".parquet":
        import pyarrow.parquet as pq

        pf = pq.ParquetFile(p)
        cols = [c for c in (text_field, "messages") if c in pf.schema_arrow.names]
        if not cols:
            raise ValueError(f"{p} has no column {text_field!r} or 'messages'")
        row = 0
        for batch in pf.iter_batches(batch_size=256, columns=cols):
            for obj in batch.to_pylist():
                row += 1
                yield _from_obj({k: v for k, v in obj.items() if v is not None}, row, text_field, tokenizer)
    else:
        raise ValueError(f"cannot scan {p.name}: use a .txt, .jsonl or .parquet file")


def _spans(mask: np.ndarray) -> list[tuple[int, int]]:
    """[start, end) runs of True in ``mask``."""
    out: list[tuple[int, int]] = []
    start = None
    for i, m in enumerate(mask.tolist()):
        if m and start is None:
            start = i
        elif not m and start is not None:
            out.append((start, i))
            start = None
    if start is not None:
        out.append((start, len(mask)))
    return out


def scan_text(runtime: Runtime, text: str, watch: Watch, line: int = 0, max_len: int = MAX_TOKENS) -> ScanResult:
    """Scan one text (see the module docstring). Token positions count from the first token (BOS included when
    the SAE prepends it)."""
    full = runtime.tokenize(text)
    ids = full[:, :max_len]
    _, f, valid = runtime.encode(ids)
    acts = f[0][:, torch_index(watch.features, f.device)].float().cpu().numpy()  # [pos, n_watched]
    ok = valid[0].cpu().numpy().astype(bool)
    tokens = runtime.token_strings(ids[0].tolist())
    res = ScanResult(line=line, n_tokens=int(ids.shape[1]), truncated=full.shape[1] > max_len, tokens=tokens)
    n_valid = max(int(ok.sum()), 1)
    cuts = watch.thresholds * watch.max_acts  # [n_watched]
    over = ok[:, None] & (acts > 0) & (acts >= cuts[None, :])  # [pos, n_watched]
    hit_cols = np.flatnonzero(over.any(axis=0))
    if len(hit_cols):  # the per-feature work below runs only for the features that crossed
        masked = np.where(ok[:, None], acts[:, hit_cols], 0.0)
        peaks = masked.max(axis=0) if ok.any() else np.zeros(len(hit_cols))
        means = masked.sum(axis=0) / n_valid
    for k, j in enumerate(hit_cols.tolist()):
        a = acts[:, j]
        peak = float(watch.max_acts[j])
        res.hits.append(
            {
                "feature": int(watch.features[j]),
                "severity": watch.severities[j],
                "threshold": float(watch.thresholds[j]),
                "max_act": float(peaks[k]),
                "mean_act": float(means[k]),
                "score": float(peaks[k] / peak) if peak > 0 else 1.0,  # never fired in the corpus: at its max
                "spans": [
                    {"start": s, "end": e, "text": "".join(tokens[s:e]), "max_act": float(a[s:e].max())}
                    for s, e in _spans(over[:, j])
                ],
            }
        )
    res.hits.sort(key=lambda h: (-SEVERITY_ORDER.index(h["severity"]), -h["score"], h["feature"]))
    return res


def torch_index(features: np.ndarray, device: Any) -> Any:
    """``features`` as a long tensor on ``device`` (to pick the watched columns out of ``f``)."""
    import torch

    return torch.as_tensor(np.array(features, dtype=np.int64), device=device)  # a writable copy


def reaches(severity: str | None, fail_on: str | None) -> bool:
    """Whether a record of ``severity`` reaches the ``--fail-on`` level."""
    if severity is None or fail_on is None:
        return False
    return SEVERITY_ORDER.index(severity) >= SEVERITY_ORDER.index(fail_on)
