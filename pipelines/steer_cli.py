"""``featuredict steer``: baseline and steered generation from the command line, for scripted demos.

    featuredict steer --db PATH --sae SAE_ID --prompt "..." --feature 123=8 --feature 456=add:1.5 \\
        [--max-new-tokens N --temperature T --top-p P --seed S --no-chat-template --generated-only]
        [--preset NAME] [--save-preset NAME]

Bad input (unknown SAE or feature, NaN/inf/absurd values, empty or too long prompt, malformed specs) prints
one line to stderr and exits with code 2, without a traceback.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Mapping
from typing import TYPE_CHECKING, TextIO

from .steering import (
    GenerationResult,
    GenerationStream,
    SteeringConfig,
    SteeringInputError,
    load_preset,
    prepare,
    save_preset,
    validate_config,
)

if TYPE_CHECKING:
    import torch

    from .runtime import Runtime

EXIT_BAD_INPUT = 2


def register(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add the ``steer`` subcommand to ``subparsers`` (an ``argparse`` sub-parsers action)."""
    p = subparsers.add_parser(
        "steer",
        help="generate baseline and steered text with SAE features clamped or added",
        description=(
            "Generate from a prompt twice, without and with SAE feature edits, and print both. "
            "clamp (ID=VALUE or ID=clamp:VALUE) sets the feature's activation to VALUE at every edited position, "
            "keeping the SAE's error term; add (ID=add:VALUE) adds VALUE x the feature's max observed activation "
            "along its decoder direction."
        ),
    )
    p.add_argument("--db", required=True, help="featuredict database (built by featuredict build/demo)")
    p.add_argument("--sae", default=None, help="sae_id in the database (default: its only SAE, or the preset's)")
    p.add_argument("--prompt", default=None, help="prompt text (the chat template is applied for chat models)")
    p.add_argument(
        "--feature",
        action="append",
        default=[],
        metavar="ID=[MODE:]VALUE",
        help="feature edit, repeatable: 123=8 (clamp to 8), 123=clamp:8, 123=add:1.5 (x max_act)",
    )
    p.add_argument("--max-new-tokens", type=str, default=None, help="default 40")
    p.add_argument("--temperature", type=str, default=None, help="0 = greedy (default)")
    p.add_argument("--top-p", type=str, default=None, help="nucleus sampling mass (default 1)")
    p.add_argument("--seed", type=str, default=None, help="sampling seed, shared by both runs (default 0)")
    p.add_argument("--no-chat-template", action="store_true", help="feed the prompt as raw text")
    p.add_argument(
        "--generated-only",
        action="store_true",
        help="edit only from the last prompt token on (default: prompt and generated tokens)",
    )
    p.add_argument("--preset", default=None, help="start from a saved steering preset (flags given override it)")
    p.add_argument("--save-preset", default=None, metavar="NAME", help="save this configuration as a preset")
    p.add_argument("--device", default=None, help="cpu / cuda (default: cuda when available)")
    p.add_argument("--no-activations", action="store_true", help="do not print the steered features' activations")
    p.set_defaults(func=run)
    return p


class _BadInput(Exception):
    pass


def build_config(args: argparse.Namespace, base: SteeringConfig | None = None) -> SteeringConfig:
    """The SteeringConfig the flags describe, on top of ``base`` (a preset) when given; flags not given keep
    ``base``'s settings."""
    return SteeringConfig.from_mapping(
        {
            "prompt": args.prompt,
            "edits": args.feature or None,
            "positions": "generated" if args.generated_only else None,
            "chat_template": False if args.no_chat_template else None,
            "max_new_tokens": args.max_new_tokens,
            "temperature": args.temperature,
            "top_p": args.top_p,
            "seed": args.seed,
        },
        base=base,
    )


def _stream(stream: GenerationStream, out: TextIO) -> GenerationResult:
    for piece in stream:
        out.write(piece)
        out.flush()
    out.write("\n")
    return stream.result


def _print_acts(res: GenerationResult, rt: Runtime, out: TextIO) -> None:
    if res.acts_before is None or res.acts_after is None or not res.features or not res.token_ids:
        return
    toks = rt.token_strings(res.token_ids)
    head = "".join(f" | {'#' + str(f) + ' before':>14} {'after':>7}" for f in res.features)
    out.write(
        f"steered features' activations on the generated tokens (before / after the edit):\n{'token':>14}{head}\n"
    )
    for t, (b, a) in enumerate(zip(res.acts_before.tolist(), res.acts_after.tolist(), strict=True)):
        cells = "".join(f" | {x:>14.3f} {y:>7.3f}" for x, y in zip(b, a, strict=True))
        out.write(f"{toks[t]!r:>14}{cells}\n")


def run(args: argparse.Namespace) -> int:
    """Run ``featuredict steer``; 0 on success, 2 on bad input (one line on stderr)."""
    from featuredict.db import queries
    from featuredict.db.presets import PresetError, check_preset_name, feature_max_acts
    from featuredict.db.schema import DatabaseError
    from featuredict.db.store import Store

    from .models import ModelLoadError
    from .runtime import cached_runtime_from_row
    from .saes import SaeLoadError

    out = sys.stdout
    try:
        store = Store(args.db, read_only=not args.save_preset)
        try:
            base = None
            sae_id = args.sae
            if args.preset:
                preset_sae, base = load_preset(store, args.preset)
                if sae_id is not None and sae_id != preset_sae:
                    raise _BadInput(f"preset {args.preset!r} is for SAE {preset_sae!r}, not {sae_id!r}")
                sae_id = preset_sae
            if sae_id is None:
                ids = queries.sae_ids(store)
                if len(ids) != 1:
                    raise _BadInput(f"give --sae: the database holds {len(ids)} SAEs ({', '.join(ids) or 'none'})")
                sae_id = ids[0]
            row = queries.sae_info(store, sae_id)
            if row is None:
                known = ", ".join(queries.sae_ids(store)) or "none"
                raise _BadInput(f"no SAE {sae_id!r} in {args.db} (it holds: {known})")
            config = build_config(args, base)
            if not config.edits:
                raise _BadInput("give at least one --feature ID=VALUE (or ID=add:VALUE), or a --preset")
            max_acts = feature_max_acts(store, sae_id)
            validate_config(config, int(row["d_sae"]), max_acts)  # before the (slow) model load
            if args.save_preset:
                check_preset_name(args.save_preset)
            rt = cached_runtime_from_row(row, device=args.device)
            ids, notes = prepare(rt, config, max_acts)
            if args.save_preset:
                name = save_preset(store, args.save_preset, sae_id, config)
                print(f"saved preset {name!r} (open it at steer?preset={name})", file=sys.stderr)
        finally:
            store.close()
    except (_BadInput, SteeringInputError, PresetError, DatabaseError, ModelLoadError, SaeLoadError) as e:
        print(f"featuredict steer: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT

    for n in notes:
        print(f"note: {n}", file=sys.stderr)
    chat = " (chat template applied)" if config.chat_template and getattr(rt.tokenizer, "chat_template", None) else ""
    out.write(f"prompt{chat}: {config.prompt}\n\n=== baseline ===\n")
    try:
        res = _generate_both(rt, config, max_acts, ids, notes, out)
    except SteeringInputError as e:  # raised mid-generation, e.g. NaN logits from an edit too large
        out.write("\n")
        print(f"featuredict steer: generation stopped: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    if not args.no_activations:
        out.write("\n")
        _print_acts(res, rt, out)
    return 0


def _generate_both(
    rt: Runtime,
    config: SteeringConfig,
    max_acts: Mapping[int, float],
    ids: torch.Tensor,
    notes: list[str],
    out: TextIO,
) -> GenerationResult:
    """Baseline, then steered, streamed to ``out``; returns the steered result."""
    _stream(GenerationStream(rt, config, steer=False, max_acts=max_acts, record=False, ids=ids, notes=notes), out)
    where = "generated tokens only" if config.positions == "generated" else "prompt and generated tokens"
    out.write(f"\n=== steered: {config.describe()} ({where}) ===\n")
    return _stream(GenerationStream(rt, config, steer=True, max_acts=max_acts, ids=ids, notes=notes), out)
