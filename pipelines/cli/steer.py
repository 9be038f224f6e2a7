"""``featuredict steer`` and ``featuredict sweep``: steering from the command line, for scripted demos.

    featuredict steer --db PATH --sae SAE_ID --prompt "..." --feature 123=8 --feature 456=add:1.5 \\
        [--max-new-tokens N --temperature T --top-p P --seed S --no-chat-template --generated-only]
        [--system TEXT] [--turn TEXT ...] [--json] [--no-scores] [--preset NAME] [--save-preset NAME]

    featuredict sweep --db PATH --prompt "..." --feature 456=add:1 \\
        [--strengths 0.5,1,2 | --min 0.5 --max 16 --steps 8] [--seeds 3] [--max-ppl-ratio 2] [--json]

Bad input (unknown SAE or feature, NaN/inf/absurd values, empty or too long prompt, malformed specs) prints
one line to stderr and exits with code 2, without a traceback.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, TextIO

from featuredict.pipelines.steering import (
    MIN_DISTINCT,
    MODE_HELP,
    GenerationResult,
    GenerationStream,
    SteeringConfig,
    SteeringInputError,
    SweepSettings,
    geometric_strengths,
    load_preset,
    prepare,
    save_preset,
    validate_config,
)

if TYPE_CHECKING:
    from featuredict.pipelines.model.runtime import Runtime
    from featuredict.pipelines.steering import Quality, SweepResult, Turn

EXIT_BAD_INPUT = 2


def _common_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--db", required=True, help="featuredict database (built by featuredict build/demo)")
    p.add_argument("--sae", default=None, help="sae_id in the database (default: its only SAE, or the preset's)")
    p.add_argument("--prompt", default=None, help="prompt text (the chat template is applied for chat models)")
    p.add_argument(
        "--feature",
        action="append",
        default=[],
        metavar="ID=[MODE:]VALUE",
        help="feature edit, repeatable: 123=8 (clamp to 8), 123=clamp:8, 123=add:1.5, 123=orthogonal:2, "
        "123=cap:0.5 (x max_act), 123=ablate",
    )
    p.add_argument("--max-new-tokens", type=str, default=None, help="default 40")
    p.add_argument("--temperature", type=str, default=None, help="0 = greedy (default)")
    p.add_argument("--top-p", type=str, default=None, help="nucleus sampling mass (default 1)")
    p.add_argument("--seed", type=str, default=None, help="sampling seed, shared by both runs (default 0)")
    p.add_argument("--no-chat-template", action="store_true", help="feed the prompt as raw text")
    p.add_argument("--system", default=None, help="system prompt for the chat template (default: none)")
    p.add_argument(
        "--generated-only",
        action="store_true",
        help="edit only from the last prompt token on (default: prompt and generated tokens)",
    )
    p.add_argument("--preset", default=None, help="start from a saved steering preset (flags given override it)")
    p.add_argument("--device", default=None, help="cpu / cuda (default: cuda when available)")
    p.add_argument("--json", action="store_true", help="print one JSON object (texts, settings, scores) instead")


def register(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add the ``steer`` and ``sweep`` subcommands to ``subparsers``; returns the ``steer`` parser."""
    methods = "; ".join(f"{m}: {h}" for m, h in MODE_HELP.items())
    p = subparsers.add_parser(
        "steer",
        help="generate baseline and steered text with SAE features edited, with quality scores",
        description=(
            "Generate from a prompt twice, without and with SAE feature edits, and print both with quality "
            f"scores (fluency, divergence, concept score). Methods: {methods}."
        ),
    )
    _common_args(p)
    p.add_argument(
        "--turn",
        action="append",
        default=[],
        metavar="TEXT",
        help="a further user turn, repeatable: multi-turn chat where baseline and steered keep their own replies",
    )
    p.add_argument("--save-preset", default=None, metavar="NAME", help="save this configuration as a preset")
    p.add_argument("--no-activations", action="store_true", help="do not print the steered features' activations")
    p.add_argument("--no-scores", action="store_true", help="skip the quality scores (one unedited pass fewer)")
    p.set_defaults(func=run)

    s = subparsers.add_parser(
        "sweep",
        help="run a steering set at a grid of strengths x seeds in one batch, score each, recommend a strength",
        description=(
            "Generate the baseline and the steered text at every strength (in units of each feature's max "
            "activation; clamp values become strength x max_act, ablated features stay ablated) x seed, as one "
            "batch, and score each. The recommended strength has the highest concept score whose perplexity "
            "stays within --max-ppl-ratio of the baseline's."
        ),
    )
    _common_args(s)
    s.add_argument("--strengths", default=None, metavar="A,B,...", help="explicit strengths (x max_act)")
    s.add_argument("--min", dest="lo", type=str, default="0.5", help="lowest strength (default 0.5)")
    s.add_argument("--max", dest="hi", type=str, default="16", help="highest strength (default 16)")
    s.add_argument("--steps", type=str, default="8", help="strengths, geometric from --min to --max (default 8)")
    s.add_argument("--seeds", type=str, default="1", help="seeds per strength, from --seed on (default 1)")
    s.add_argument("--max-ppl-ratio", type=str, default="2", help="perplexity factor for the recommendation (2)")
    s.set_defaults(func=run_sweep_cmd)
    return p


class _BadInput(Exception):
    pass


def build_config(args: argparse.Namespace, base: SteeringConfig | None = None) -> SteeringConfig:
    """The SteeringConfig the flags describe, on top of ``base`` (a preset) when given; flags not given keep
    ``base``'s settings."""
    turns = getattr(args, "turn", None) or []
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
            "system": args.system,
            "multi_turn": True if turns else None,
        },
        base=base,
    )


@dataclass
class _Setup:
    rt: Runtime
    sae_id: str
    config: SteeringConfig
    max_acts: dict[int, float]
    notes: list[str]


def _setup(args: argparse.Namespace, command: str) -> _Setup | int:
    """Read the database, build and validate the config, load the runtime; the exit code on bad input."""
    from featuredict.db import queries
    from featuredict.db.queries import PresetError, feature_max_acts
    from featuredict.db.schema import DatabaseError
    from featuredict.db.store import Store
    from featuredict.db.writes import check_preset_name
    from featuredict.pipelines.model.loading import ModelLoadError
    from featuredict.pipelines.model.runtime import cached_runtime_from_row
    from featuredict.pipelines.model.saes import SaeLoadError

    save = getattr(args, "save_preset", None)
    try:
        store = Store(args.db, read_only=not save)
        try:
            base = None
            sae_id = args.sae
            if args.preset:
                preset_sae, base = load_preset(store, args.preset)
                if sae_id is not None and sae_id != preset_sae:
                    raise _BadInput(f"preset {args.preset!r} is for SAE {preset_sae!r}, not {sae_id!r}")
                sae_id = preset_sae
            try:
                sae_id = queries.resolve_sae(store, sae_id, args.db)
            except queries.UnknownSae as e:
                raise _BadInput(str(e)) from None
            rec = queries.sae_record(store, sae_id)
            assert rec is not None  # resolve_sae found it
            config = build_config(args, base)
            if not config.edits:
                raise _BadInput("give at least one --feature ID=VALUE (or ID=MODE:VALUE), or a --preset")
            max_acts = feature_max_acts(store, sae_id)
            validate_config(config, rec.d_sae, max_acts)  # before the (slow) model load
            if save:
                check_preset_name(save)
            rt = cached_runtime_from_row(rec, device=args.device)
            _, notes = prepare(rt, config, max_acts)
            if save:
                name = save_preset(store, save, sae_id, config)
                print(f"saved preset {name!r} (open it at steer?preset={name})", file=sys.stderr)
        finally:
            store.close()
    except (_BadInput, SteeringInputError, PresetError, DatabaseError, ModelLoadError, SaeLoadError) as e:
        print(f"featuredict {command}: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    return _Setup(rt, sae_id, config, max_acts, notes)


def _stream(stream: GenerationStream, out: TextIO | None) -> GenerationResult:
    for piece in stream:
        if out is not None:
            out.write(piece)
            out.flush()
    if out is not None:
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


def _num(x: float, fmt: str = ".3g") -> str:
    return format(x, fmt) if math.isfinite(x) else "n/a"


def format_scores(base: Quality, steered: Quality) -> str:
    """The quality scores as text: fluency (both perplexities), divergence, distinct tokens and each feature's
    concept score."""
    ratio = steered.perplexity / base.perplexity if base.perplexity > 0 else float("nan")
    lines = [
        "quality (the unsteered model is the reference):",
        f"  fluency: perplexity under the unsteered model: baseline {_num(base.perplexity)} | steered "
        f"{_num(steered.perplexity)} (x{_num(ratio, '.2f')})",
        f"  divergence: mean KL(steered || unsteered) {_num(steered.divergence)} nats per generated token",
        f"  distinct tokens (share; below {MIN_DISTINCT:g} = collapsed into repeats): baseline {_num(base.distinct, '.2f')}"
        f" | steered {_num(steered.distinct, '.2f')}",
    ]
    cells = [
        f"#{f} baseline {_num(b)} | steered {_num(s)}"
        for f, b, s in zip(steered.features, base.concept, steered.concept, strict=True)
    ]
    lines.append("  concept score (mean activation / max_act, unedited pass): " + "; ".join(cells))
    return "\n".join(lines) + "\n"


def _scores(rt: Runtime, results: list[GenerationResult], max_acts: Mapping[int, float]) -> list[Quality]:
    from featuredict.pipelines.steering import score_rows

    return score_rows(rt, results, max_acts)


def _acts_json(res: GenerationResult, rt: Runtime) -> list[dict[str, Any]]:
    if res.acts_before is None or res.acts_after is None:
        return []
    toks = rt.token_strings(res.token_ids)
    return [
        {
            "token": toks[t],
            "before": dict(zip(map(str, res.features), b, strict=True)),
            "after": dict(zip(map(str, res.features), a, strict=True)),
        }
        for t, (b, a) in enumerate(zip(res.acts_before.tolist(), res.acts_after.tolist(), strict=True))
    ]


def run(args: argparse.Namespace) -> int:
    """Run ``featuredict steer``; 0 on success, 2 on bad input (one line on stderr)."""
    setup = _setup(args, "steer")
    if isinstance(setup, int):
        return setup
    rt, config, max_acts = setup.rt, setup.config, setup.max_acts
    as_json = bool(args.json)
    out = sys.stdout
    for n in setup.notes:
        print(f"note: {n}", file=sys.stderr)
    turns = [config.prompt, *args.turn]
    history: list[Turn] = []
    report: list[dict[str, Any]] = []
    chat = " (chat template applied)" if config.chat_template and getattr(rt.tokenizer, "chat_template", None) else ""
    try:
        for k, user in enumerate(turns):
            cfg = replace(config, prompt=user)
            if not as_json:
                head = f"turn {k + 1}, user" if len(turns) > 1 else f"prompt{chat}"
                out.write(f"{head}: {user}\n\n=== baseline ===\n")
            res, scores = _generate_both(rt, cfg, max_acts, history, None if as_json else out, not args.no_scores)
            from featuredict.pipelines.steering import Turn

            history.append(Turn(user, res[0].text, res[1].text))
            report.append(_turn_json(user, res, scores, rt, not args.no_activations))
            if not as_json:
                if scores is not None:
                    out.write("\n" + format_scores(*scores))
                if not args.no_activations:
                    out.write("\n")
                    _print_acts(res[1], rt, out)
                if k + 1 < len(turns):
                    out.write("\n")
    except SteeringInputError as e:  # raised mid-generation, e.g. NaN logits from an edit too large
        if not as_json:
            out.write("\n")
        print(f"featuredict steer: generation stopped: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    if as_json:
        obj: dict[str, Any] = {"sae": setup.sae_id, "settings": config.to_dict(), "notes": setup.notes}
        if len(turns) == 1:
            obj.update({k: v for k, v in report[0].items() if k != "user"})
        else:
            obj["turns"] = report
        out.write(json.dumps(obj, ensure_ascii=False, allow_nan=False) + "\n")
    return 0


def _turn_json(
    user: str,
    res: tuple[GenerationResult, GenerationResult],
    scores: tuple[Quality, Quality] | None,
    rt: Runtime,
    acts: bool,
) -> dict[str, Any]:
    def side(r: GenerationResult) -> dict[str, Any]:
        return {"text": r.text, "tokens": len(r.token_ids), "finish": r.finish}

    obj: dict[str, Any] = {"user": user, "baseline": side(res[0]), "steered": side(res[1])}
    if scores is not None:
        obj["scores"] = {"baseline": scores[0].to_dict(), "steered": scores[1].to_dict()}
    if acts:
        obj["activations"] = _acts_json(res[1], rt)
    return obj


def _generate_both(
    rt: Runtime,
    config: SteeringConfig,
    max_acts: Mapping[int, float],
    history: list[Turn],
    out: TextIO | None,
    scores: bool,
) -> tuple[tuple[GenerationResult, GenerationResult], tuple[Quality, Quality] | None]:
    """Baseline, then steered, streamed to ``out`` (None: quietly); returns both results and their scores."""
    from featuredict.pipelines.steering import chat_streams

    streams = chat_streams(rt, config, history, max_acts, keep_logits=scores)
    base = _stream(streams["baseline"], out)
    if out is not None:
        where = "generated tokens only" if config.positions == "generated" else "prompt and generated tokens"
        out.write(f"\n=== steered: {config.describe()} ({where}) ===\n")
    steered = _stream(streams["steered"], out)
    if not scores:
        return (base, steered), None
    b, s = _scores(rt, [base, steered], max_acts)
    return (base, steered), (b, s)


# ---- sweep --------------------------------------------------------------------------------------------------
def sweep_settings(args: argparse.Namespace, seed: int) -> SweepSettings:
    """The SweepSettings the flags describe (SteeringInputError on bad values)."""

    def number(flag: str, text: str) -> float:
        try:
            return float(text)
        except ValueError:
            raise SteeringInputError(f"{flag} {text!r} is not a number") from None

    def integer(flag: str, text: str) -> int:
        try:
            return int(text)
        except ValueError:
            raise SteeringInputError(f"{flag} {text!r} is not an integer") from None

    if args.strengths:
        strengths = tuple(number("--strengths", p.strip()) for p in args.strengths.split(",") if p.strip())
    else:
        strengths = geometric_strengths(
            number("--min", args.lo), number("--max", args.hi), integer("--steps", args.steps)
        )
    n_seeds = integer("--seeds", args.seeds)
    if not 1 <= n_seeds <= 8:
        raise SteeringInputError(f"--seeds must be 1..8, not {n_seeds}")
    return SweepSettings(
        strengths=strengths,
        seeds=tuple(range(seed, seed + n_seeds)),
        max_ppl_ratio=number("--max-ppl-ratio", args.max_ppl_ratio),
    )


def format_sweep(res: SweepResult, max_acts: Mapping[int, float], width: int = 60) -> str:
    """The sweep as a text table, the baseline, and the recommended strength with its feature flags."""
    base_ppl = res.baseline_perplexity
    lines = [f"baseline (seed {res.baselines[0].seed}): {res.baselines[0].result.text!r}"[: width + 30]]
    lines.append(f"baseline perplexity {_num(base_ppl)}, concept score {_num(res.baseline_concept)}")
    lines.append(
        f"{'strength':>9} {'concept':>8} {'perplexity':>10} {'x base':>7}  {'KL':>7} {'distinct':>8}  "
        f"text (seed {res.settings.seeds[0]})"
    )
    first = {r.strength: r for r in reversed(res.steered)}
    for row in res.summary():
        s = row["strength"]
        text = first[s].result.text.replace("\n", " ")
        text = text if len(text) <= width else text[: width - 1] + "…"
        ratio = row["perplexity"] / base_ppl if base_ppl > 0 else float("nan")
        mark = "" if row["within"] else " !"
        lines.append(
            f"{s:>9g} {_num(row['concept'], '.3f'):>8} {_num(row['perplexity'], '.3g'):>10} "
            f"{_num(ratio, '.2f'):>7}{mark:<2}{_num(row['divergence'], '.3f'):>7} {_num(row['distinct'], '.2f'):>8}  {text}"
        )
    rec = res.recommended
    if rec is None:
        lines.append(
            f"no strength keeps perplexity within {res.settings.max_ppl_ratio:g}x the baseline's with at least "
            f"{MIN_DISTINCT:g} distinct tokens (! marks)"
        )
    else:
        flags = " ".join(f"--feature {e.spec()}" for e in res.config_at(rec, max_acts).edits)
        lines.append(
            f"recommended strength: {rec:g} (highest concept score with perplexity <= "
            f"{res.settings.max_ppl_ratio:g}x the baseline's, not collapsed); use: {flags}"
        )
    return "\n".join(lines) + "\n"


def run_sweep_cmd(args: argparse.Namespace) -> int:
    """Run ``featuredict sweep``; 0 on success, 2 on bad input (one line on stderr)."""
    from featuredict.pipelines.steering import run_sweep

    try:
        settings = sweep_settings(args, 0)  # bad sweep flags fail before the model loads
    except SteeringInputError as e:
        print(f"featuredict sweep: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    setup = _setup(args, "sweep")
    if isinstance(setup, int):
        return setup
    seed = setup.config.generation.seed  # from --seed or the preset
    settings = replace(settings, seeds=tuple(range(seed, seed + len(settings.seeds))))
    try:
        res = run_sweep(setup.rt, setup.config, settings, setup.max_acts)
    except SteeringInputError as e:
        print(f"featuredict sweep: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    for n in res.notes:
        print(f"note: {n}", file=sys.stderr)
    if args.json:
        sys.stdout.write(json.dumps({"sae": setup.sae_id, **res.to_dict()}, ensure_ascii=False, allow_nan=False) + "\n")
    else:
        sys.stdout.write(f"prompt: {setup.config.prompt}\nsweeping: {setup.config.describe()}\n")
        sys.stdout.write(format_sweep(res, setup.max_acts))
    return 0
