"""Live steering with SAE features: typed configs, the exact activation edit, and streamed generation.

- ``config``: ``SteeringConfig`` / ``FeatureEdit`` / ``GenerationSettings`` (checked on construction), the one
  reader ``SteeringConfig.from_mapping`` (CLI flags, preset JSON, URL parameters) and ``validate_config``
  (what needs the SAE: feature ids, max_act for ``add``, value limits).
- ``edits``: the activation edits (clamp, add, ablate in SAE space; orthogonal and cap along the decoder
  direction), pure torch on the SAE.
- ``prompts``: chat template, BOS and context checks; ``prepare`` validates a config for a runtime.
- ``generation``: token-by-token baseline and steered streams sharing one seed; ``BatchStream`` runs many
  rows (strengths x seeds) in lockstep with one KV cache.
- ``quality``: fluency (perplexity under the unsteered model), divergence (KL) and concept scores.
- ``sweep``: strength sweeps as one batch, with a recommended strength.
- ``chat``: multi-turn chat, where baseline and steered keep their own conversations.
- ``presets``: named presets as ``SteeringConfig`` (stored as JSON by ``featuredict.db.queries``).
"""

from featuredict.db.queries import PresetError
from featuredict.pipelines.model.saes import NORM_SCALED, fast_encoder
from featuredict.pipelines.steering.chat import MAX_TURNS, Turn, chat_streams, side_history
from featuredict.pipelines.steering.config import (
    MAX_ABS_VALUE,
    MAX_ACT_UNITS,
    MAX_ADD,
    MAX_CLAMP_MULTIPLE,
    MAX_FEATURES,
    MAX_NEW_TOKENS,
    MAX_SWEEP_SEEDS,
    MAX_SWEEP_STRENGTHS,
    MAX_TEMPERATURE,
    MIN_TEMPERATURE,
    MODE_HELP,
    MODES,
    POSITIONS,
    FeatureEdit,
    GenerationSettings,
    Mode,
    Positions,
    SteeringConfig,
    SteeringInputError,
    SweepSettings,
    check_edit,
    geometric_strengths,
    parse_feature_list,
    unsteered,
    validate_config,
)
from featuredict.pipelines.steering.edits import (
    EditPlan,
    check_steerable,
    decoder_directions,
    output_scale,
    plan_values,
    steer_activations,
)
from featuredict.pipelines.steering.formatting import (
    chat_messages,
    check_prompt,
    format_prompt,
    has_chat_template,
    prepare,
    prompt_ids,
)
from featuredict.pipelines.steering.generation import (
    BatchStream,
    GenerationResult,
    GenerationStream,
    RowSpec,
    generate,
    interleave,
    paired_streams,
    side_by_side,
)
from featuredict.pipelines.steering.presets import Preset, list_presets, load_preset, save_preset
from featuredict.pipelines.steering.quality import MIN_DISTINCT, Quality, score_rows
from featuredict.pipelines.steering.sweep import (
    SweepResult,
    SweepRow,
    edits_at,
    qualifies,
    recommend,
    run_sweep,
    swept_features,
)

__all__ = [
    "BatchStream",
    "EditPlan",
    "FeatureEdit",
    "GenerationResult",
    "GenerationSettings",
    "GenerationStream",
    "MAX_ABS_VALUE",
    "MAX_ACT_UNITS",
    "MAX_ADD",
    "MAX_CLAMP_MULTIPLE",
    "MAX_FEATURES",
    "MAX_NEW_TOKENS",
    "MAX_SWEEP_SEEDS",
    "MAX_SWEEP_STRENGTHS",
    "MAX_TEMPERATURE",
    "MAX_TURNS",
    "MIN_DISTINCT",
    "MIN_TEMPERATURE",
    "MODES",
    "MODE_HELP",
    "Mode",
    "NORM_SCALED",
    "POSITIONS",
    "Positions",
    "Preset",
    "PresetError",
    "Quality",
    "RowSpec",
    "SteeringConfig",
    "SteeringInputError",
    "SweepResult",
    "SweepRow",
    "SweepSettings",
    "Turn",
    "chat_messages",
    "chat_streams",
    "check_edit",
    "check_prompt",
    "check_steerable",
    "decoder_directions",
    "edits_at",
    "fast_encoder",
    "format_prompt",
    "generate",
    "geometric_strengths",
    "has_chat_template",
    "interleave",
    "list_presets",
    "load_preset",
    "output_scale",
    "paired_streams",
    "parse_feature_list",
    "plan_values",
    "prepare",
    "prompt_ids",
    "qualifies",
    "recommend",
    "run_sweep",
    "save_preset",
    "score_rows",
    "side_by_side",
    "side_history",
    "steer_activations",
    "swept_features",
    "unsteered",
    "validate_config",
]
