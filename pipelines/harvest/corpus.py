"""Streaming text corpora and cutting them into fixed-length token contexts.

Sources: a local ``.txt`` (documents split on a separator, ``<|endoftext|>`` by default, or blank lines with
``separator="blank"``), ``.jsonl`` (a text field), ``.parquet`` (a text column), or a Hugging Face dataset name
(streamed; needs the network). Contexts are ``[bos, t_1 .. t_{n-1}]`` chunks of one document each, so a
context never spans two documents; the BOS position is excluded from every statistic downstream.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from featuredict.db.errors import UserError, one_line


class CorpusError(UserError, RuntimeError):
    """A corpus that cannot be read, with a one-line message fit to show a user."""


@dataclass(frozen=True)
class CorpusSpec:
    source: str  # path or HF dataset name
    text_field: str = "text"
    separator: str = "<|endoftext|>"  # for .txt; "blank" = split on blank lines; "line" = one doc per line
    split: str = "train"  # for HF datasets
    dataset_config: str | None = None

    def describe(self) -> str:
        return self.source


def _txt_docs(path: Path, separator: str) -> Iterator[str]:
    text = path.read_text(encoding="utf-8-sig", errors="replace")  # -sig: a leading byte-order mark is dropped
    if separator == "blank":
        parts = re.split(r"\n\s*\n", text)
    elif separator == "line":
        parts = re.split(r"\r\n|\r|\n", text)  # line breaks only (splitlines also splits on \f, U+2028, ...)
    else:
        parts = text.split(separator)
    for p in parts:
        p = p.strip()
        if p:
            yield p


def _jsonl_docs(path: Path, field: str) -> Iterator[str]:
    with path.open(encoding="utf-8-sig", errors="replace") as fh:  # BOM dropped; bad bytes become U+FFFD
        for n, line in enumerate(fh, 1):
            line = line.strip()
            if not line:
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise CorpusError(f"{path}:{n}: not valid JSON ({e.msg})") from e
            if not isinstance(obj, dict) or field not in obj:
                raise CorpusError(f"{path}:{n}: no {field!r} field (use --text-field)")
            if isinstance(obj[field], str) and obj[field].strip():
                yield obj[field]


def _parquet_docs(path: Path, field: str) -> Iterator[str]:
    import pyarrow.parquet as pq

    pf = pq.ParquetFile(path)
    if field not in pf.schema_arrow.names:
        raise CorpusError(f"{path} has no column {field!r} (columns: {pf.schema_arrow.names}; use --text-field)")
    for batch in pf.iter_batches(columns=[field], batch_size=1024):
        for t in batch.column(0).to_pylist():
            if isinstance(t, str) and t.strip():
                yield t


def _hf_docs(spec: CorpusSpec) -> Iterator[str]:
    from datasets import load_dataset

    try:
        ds = load_dataset(spec.source, spec.dataset_config, split=spec.split, streaming=True)
    except Exception as e:  # noqa: BLE001
        raise CorpusError(f"cannot stream dataset {spec.source!r}: {one_line(e)}") from e
    for row in ds:
        t = row.get(spec.text_field)
        if t is None:
            raise CorpusError(f"dataset {spec.source!r} has no {spec.text_field!r} field (use --text-field)")
        if isinstance(t, str) and t.strip():
            yield t


def validate(spec: CorpusSpec) -> None:
    """Fail fast (before loading any model) on a corpus that cannot be read."""
    path = Path(spec.source).expanduser()
    suffix = path.suffix.lower()
    if suffix in {".txt", ".jsonl", ".parquet", ".json"} or path.exists():
        if not path.exists():
            raise CorpusError(f"corpus file {path} does not exist")
        if path.is_dir():
            raise CorpusError(f"corpus {path} is a folder; give a .txt, .jsonl or .parquet file")
        if suffix not in {".txt", ".jsonl", ".parquet"}:
            raise CorpusError(f"corpus {path}: unsupported extension {suffix!r} (use .txt, .jsonl or .parquet)")
        if path.stat().st_size == 0:
            raise CorpusError(f"corpus file {path} is empty")


def iter_documents(spec: CorpusSpec) -> Iterator[str]:
    validate(spec)
    path = Path(spec.source).expanduser()
    suffix = path.suffix.lower()
    if path.exists():
        if suffix == ".txt":
            return _txt_docs(path, spec.separator)
        if suffix == ".jsonl":
            return _jsonl_docs(path, spec.text_field)
        return _parquet_docs(path, spec.text_field)
    return _hf_docs(spec)


def iter_contexts(
    docs: Iterator[str],
    tokenizer: Any,
    context_size: int,
    prepend_bos: bool = True,
    min_tokens: int = 2,
) -> Iterator[list[int]]:
    """Token contexts of at most ``context_size`` ids; each starts with BOS when ``prepend_bos``.

    Long documents are cut into consecutive chunks; a trailing chunk shorter than ``min_tokens`` real
    tokens is dropped. Contexts shorter than ``context_size`` are padded later (and masked).
    """
    bos = getattr(tokenizer, "bos_token_id", None)
    use_bos = prepend_bos and bos is not None
    body = context_size - 1 if use_bos else context_size
    if body < 1:
        raise ValueError("context_size too small")
    for doc in docs:
        ids = tokenizer(doc, add_special_tokens=False)["input_ids"]
        for start in range(0, len(ids), body):
            chunk = ids[start : start + body]
            if len(chunk) < min_tokens:
                continue
            yield ([bos] if use_bos else []) + chunk


def batch_contexts(
    contexts: Iterator[list[int]], batch_size: int, context_size: int, pad_id: int
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """``(input_ids [batch, context_size], attention_mask [batch, context_size])``, right-padded."""
    buf: list[list[int]] = []
    for c in contexts:
        buf.append(c)
        if len(buf) == batch_size:
            yield _pad(buf, context_size, pad_id)
            buf = []
    if buf:
        yield _pad(buf, context_size, pad_id)


def _pad(batch: list[list[int]], context_size: int, pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.full((len(batch), context_size), pad_id, dtype=torch.long)
    mask = torch.zeros((len(batch), context_size), dtype=torch.long)
    for i, c in enumerate(batch):
        ids[i, : len(c)] = torch.tensor(c, dtype=torch.long)
        mask[i, : len(c)] = 1
    return ids, mask
