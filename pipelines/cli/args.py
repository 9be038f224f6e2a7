"""Argument helpers every command shares: the corpus, the device and dtype, and defaults read from configs."""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

from featuredict.pipelines.harvest.corpus import CorpusSpec

T = TypeVar("T")


def default(config: type, name: str) -> Any:
    """The default of field ``name`` of the config dataclass ``config``: the one place a default is written."""
    for f in dataclasses.fields(config):
        if f.name == name:
            if f.default is not dataclasses.MISSING:
                return f.default
            if f.default_factory is not dataclasses.MISSING:
                return f.default_factory()
            break
    raise KeyError(f"{config.__name__} has no field {name!r} with a default")


def config_from(
    args: argparse.Namespace, config: Callable[..., T], rename: Mapping[str, str] | None = None, **given: Any
) -> T:
    """``config`` (a dataclass) from the parsed flags: each field takes ``args.<field>`` (or the flag ``rename``
    names for it) where the parser has one, else keeps its default; ``given`` sets the rest (and wins)."""
    rename = rename or {}
    kw = dict(given)
    for f in dataclasses.fields(config):  # type: ignore[arg-type]
        flag = rename.get(f.name, f.name)
        if f.name not in kw and hasattr(args, flag):
            kw[f.name] = getattr(args, flag)
    return config(**kw)


def add_option(
    p: argparse.ArgumentParser | argparse._ArgumentGroup,
    flag: str,
    config: type,
    field: str,
    help: str,
    fmt: str = "",
    **kw: Any,
) -> None:
    """``p.add_argument(flag)`` whose default is ``config``'s default for ``field`` (typed like it), with the
    default shown at the end of ``help`` (formatted with ``fmt``, e.g. "," for 200,000)."""
    value = default(config, field)
    if value is not None and "type" not in kw and "action" not in kw and not isinstance(value, str):
        kw["type"] = type(value)
    p.add_argument(flag, default=value, help=f"{help} (default {value:{fmt}})", **kw)


def add_corpus_args(p: argparse.ArgumentParser, required: bool = True) -> None:
    p.add_argument(
        "--corpus",
        required=required,
        help="a .txt / .jsonl / .parquet file, or a Hugging Face dataset name (streamed; needs network)",
    )
    p.add_argument("--text-field", default="text", help="text field of .jsonl/.parquet/HF rows (default: text)")
    p.add_argument(
        "--separator",
        default="<|endoftext|>",
        help="document separator for .txt: a string, 'blank' (blank lines) or 'line' (default: <|endoftext|>)",
    )
    p.add_argument("--split", default="train", help="HF dataset split (default: train)")


def add_db_args(p: argparse.ArgumentParser, sae: str = "optional", db_help: str = "featuredict database") -> None:
    """``--db`` (required) and ``--sae``: ``optional`` (default: the database's only SAE), ``required``, or
    ``repeat`` (one or more; required)."""
    p.add_argument("--db", required=True, help=db_help)
    if sae == "optional":
        p.add_argument("--sae", default=None, help="sae_id in the database (default: its only SAE)")
    elif sae == "required":
        p.add_argument("--sae", required=True, help="sae_id in the database")
    elif sae == "repeat":
        p.add_argument("--sae", action="append", required=True, help="sae_id in the database; repeat for several")
    else:
        raise ValueError(f"sae must be optional, required or repeat; got {sae!r}")


def add_watchlist_args(p: argparse.ArgumentParser, read_write: bool) -> None:
    """What ``watch`` and ``scan`` share: ``--db``, ``--sae`` (required) and ``--watchlist``."""
    add_db_args(p, "required", "featuredict DuckDB file" + (" (opened read-write)" if read_write else ""))
    p.add_argument("--watchlist", required=True, help="name of the list used as a watchlist")


def add_device_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default=None, help="cpu / cuda (default: cuda when present)")
    p.add_argument(
        "--dtype",
        default=None,
        help="model dtype: float32 / bfloat16 / float16 (default: float32 on CPU; on CUDA bfloat16 where the GPU "
        "supports it, else float16)",
    )


def corpus_spec(args: argparse.Namespace) -> CorpusSpec:
    """The ``CorpusSpec`` of the ``add_corpus_args`` flags."""
    return CorpusSpec(args.corpus, text_field=args.text_field, separator=args.separator, split=args.split)
