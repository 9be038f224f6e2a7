"""Live steering with SAE features: typed configs, the exact activation edit, and streamed generation.

- ``config``: ``SteeringConfig`` / ``FeatureEdit`` / ``GenerationSettings`` (checked on construction), the one
  reader ``SteeringConfig.from_mapping`` (CLI flags, preset JSON, URL parameters) and ``validate_config``
  (what needs the SAE: feature ids, max_act for ``add``, value limits).
- ``edits``: the activation edit ``x + decode(f') - decode(f)`` in closed form, pure torch on the SAE.
- ``prompts``: chat template, BOS and context checks; ``prepare`` validates a config for a runtime.
- ``generation``: token-by-token baseline and steered streams sharing one seed.
- ``presets``: named presets as ``SteeringConfig`` (stored as JSON by ``featuredict.db.presets``).
"""

from featuredict.db.presets import PresetError

from .config import (
    MAX_ABS_VALUE,
    MAX_ADD,
    MAX_CLAMP_MULTIPLE,
    MAX_FEATURES,
    MAX_NEW_TOKENS,
    MAX_TEMPERATURE,
    MIN_TEMPERATURE,
    MODES,
    POSITIONS,
    FeatureEdit,
    GenerationSettings,
    Mode,
    Positions,
    SteeringConfig,
    SteeringInputError,
    check_edit,
    parse_feature_list,
    unsteered,
    validate_config,
)
from .edits import (
    NORM_SCALED,
    EditPlan,
    check_steerable,
    decoder_directions,
    fast_encoder,
    output_scale,
    steer_activations,
)
from .generation import GenerationResult, GenerationStream, generate, interleave, paired_streams, side_by_side
from .presets import Preset, list_presets, load_preset, save_preset
from .prompts import check_prompt, format_prompt, prepare, prompt_ids

__all__ = [
    "MAX_ABS_VALUE",
    "MAX_ADD",
    "MAX_CLAMP_MULTIPLE",
    "MAX_FEATURES",
    "MAX_NEW_TOKENS",
    "MAX_TEMPERATURE",
    "MIN_TEMPERATURE",
    "MODES",
    "NORM_SCALED",
    "POSITIONS",
    "EditPlan",
    "FeatureEdit",
    "GenerationResult",
    "GenerationSettings",
    "GenerationStream",
    "Mode",
    "Positions",
    "Preset",
    "PresetError",
    "SteeringConfig",
    "SteeringInputError",
    "check_edit",
    "check_prompt",
    "check_steerable",
    "decoder_directions",
    "fast_encoder",
    "format_prompt",
    "generate",
    "interleave",
    "list_presets",
    "load_preset",
    "output_scale",
    "paired_streams",
    "parse_feature_list",
    "prepare",
    "prompt_ids",
    "save_preset",
    "side_by_side",
    "steer_activations",
    "unsteered",
    "validate_config",
]
