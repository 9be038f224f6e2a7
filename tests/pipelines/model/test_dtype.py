"""On CPU every model runs in float32 unless the user asks otherwise, even when its checkpoint is stored in fp16.

CPUs without fast fp16 (AMD EPYC) run an fp16 model ~5x slower than fp32. The checks record the dtype of the
parameters each transformers module really computes with (a global forward hook), during a tiny train-sae
run and a tiny build on a model folder stored in fp16, where transformers alone would keep fp16.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

from featuredict.db.records import SaeRecord
from featuredict.pipelines.model.loading import default_dtype, dtype_name, load_model, resolve_dtype
from featuredict.pipelines.model.runtime import load_runtime
from featuredict.pipelines.model.saes import SaeSource
from tests.helpers import build_tiny_db, read_only, tiny_train_config


@pytest.fixture(scope="module")
def fp16_model_dir(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Path:
    """The tiny model saved in fp16, as the SmolLM2 preset used to be cached."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path_factory.mktemp("fp16_model")
    AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float16).save_pretrained(out)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(out)
    assert json.loads((out / "config.json").read_text())["dtype"] == "float16"
    return out


@contextmanager
def model_dtypes_in_forward() -> Iterator[list[torch.dtype]]:
    """Collect the dtype of the own parameters of every transformers module that runs a forward pass."""
    seen: list[torch.dtype] = []

    def hook(module: torch.nn.Module, args: object, output: object) -> None:
        if type(module).__module__.startswith("transformers."):
            seen.extend(p.dtype for p in module.parameters(recurse=False))

    handle = torch.nn.modules.module.register_module_forward_hook(hook)
    try:
        yield seen
    finally:
        handle.remove()


def test_default_dtype_is_fp32_on_cpu_and_half_precision_on_cuda(monkeypatch):
    assert default_dtype("cpu") == torch.float32 and default_dtype(torch.device("cpu")) == torch.float32
    assert resolve_dtype(None, "cpu") == torch.float32
    assert resolve_dtype("bf16", "cpu") == torch.bfloat16  # asked for explicitly: honoured
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: not including_emulation)
    assert default_dtype("cuda") == torch.bfloat16
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: False)
    assert default_dtype("cuda:0") == torch.float16
    assert dtype_name(torch.bfloat16) == "bfloat16"


def test_fp16_folder_loads_as_fp32_on_cpu(fp16_model_dir: Path, tiny_sae_dir: Path):
    loaded = load_model(str(fp16_model_dir), device="cpu")
    assert loaded.dtype == torch.float32
    assert {p.dtype for p in loaded.model.parameters()} == {torch.float32}
    rt = load_runtime(str(fp16_model_dir), SaeSource(kind="folder", path=str(tiny_sae_dir)), device="cpu")
    assert {p.dtype for p in rt.backend.model.parameters()} == {torch.float32}
    explicit = load_model(str(fp16_model_dir), device="cpu", dtype="bfloat16")
    assert {p.dtype for p in explicit.model.parameters()} == {torch.bfloat16}


def test_half_precision_model_feeds_the_sae_in_its_own_dtype(tiny_model_dir: Path, tiny_sae_dir: Path):
    rt = load_runtime(
        str(tiny_model_dir), SaeSource(kind="folder", path=str(tiny_sae_dir)), device="cpu", dtype="bfloat16"
    )
    assert {p.dtype for p in rt.backend.model.parameters()} == {torch.bfloat16}
    x, f, valid = rt.encode(rt.tokenize("The cat sat on the mat"))
    assert x.dtype == f.dtype == rt.sae.W_dec.dtype == torch.float32
    assert valid.dtype == torch.bool and not bool(valid[0, 0]) and (f[0, 1:] > 0).any()


@pytest.mark.parametrize("mode", ["stream", "cache"])
def test_train_sae_runs_the_model_in_fp32_on_cpu(tmp_path: Path, fp16_model_dir: Path, tiny_corpus: Path, mode: str):
    from featuredict.pipelines.train.sae import SUMMARY_FILE, train_sae

    cfg = tiny_train_config(
        fp16_model_dir,
        tiny_corpus,
        tmp_path / "sae",
        training_tokens=1024,
        context_size=16,
        batch_tokens=64,
        activations=mode,
    )
    with model_dtypes_in_forward() as seen:
        res = train_sae(cfg, progress=False)
    # the training's forward passes (sae-lens's per step, or the cache's once) and the evaluation's were seen
    assert len(seen) > (50 if mode == "stream" else 5)
    assert set(seen) == {torch.float32}
    assert res.dtype == "float32"
    assert json.loads((res.out / SUMMARY_FILE).read_text())["model_dtype"] == "float32"
    meta = json.loads((res.out / "cfg.json").read_text())["metadata"]
    assert meta["model_from_pretrained_kwargs"] == {"dtype": "float32"}


def test_build_runs_the_model_in_fp32_on_cpu_and_records_it(
    tmp_path: Path, fp16_model_dir: Path, tiny_sae_dir: Path, tiny_corpus: Path
):
    with model_dtypes_in_forward() as seen:
        db = build_tiny_db(tmp_path / "d.duckdb", fp16_model_dir, tiny_sae_dir, tiny_corpus, umap=False)
    assert seen and set(seen) == {torch.float32}
    with read_only(db) as con:
        dtype, config = con.execute("SELECT dtype, config_json FROM saes").fetchone()
    assert dtype == "float32" and json.loads(config)["dtype"] is None  # ran in fp32, chosen by default


def test_reloading_a_build_keeps_an_explicit_dtype_and_redoes_a_default_one():
    row = {"sae_id": "s", "model_spec": "m", "sae_source": "{}", "hook_name": "h", "d_in": 8, "d_sae": 16}
    auto = {**row, "dtype": "bfloat16", "config_json": json.dumps({"dtype": None})}  # built on a GPU by default
    assert SaeRecord.from_row(auto).reload_dtype is None  # so on a CPU it reloads in float32
    asked = {**row, "dtype": "float16", "config_json": json.dumps({"dtype": "float16"})}
    assert SaeRecord.from_row(asked).reload_dtype == "float16"
    legacy = {**row, "dtype": "float32", "config_json": "{}"}
    assert SaeRecord.from_row(legacy).reload_dtype == "float32"


def test_stale_fp16_smollm2_cache_is_not_used(tmp_path: Path, monkeypatch):
    from featuredict.pipelines.model import loading as models

    monkeypatch.setenv("FEATUREDICT_CACHE", str(tmp_path))

    class Dequantising(Exception):
        pass

    def gguf() -> Path:
        raise Dequantising

    monkeypatch.setattr(models, "smollm2_gguf_path", gguf)

    def fake_folder(name: str, dtype: str) -> Path:
        folder = tmp_path / "models" / name
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "config.json").write_text(json.dumps({"model_type": "llama", "dtype": dtype}))
        (folder / "model.safetensors").write_bytes(b"")
        return folder

    fake_folder("smollm2-135m-instruct-fp16", "float16")  # what older versions cached
    with pytest.raises(Dequantising):
        models.smollm2_folder(progress=False)
    stale = fake_folder("smollm2-135m-instruct-fp32", "float16")  # right name, fp16 weights
    with pytest.raises(Dequantising):
        models.smollm2_folder(progress=False)
    fake_folder(stale.name, "float32")
    assert models.smollm2_folder(progress=False) == stale  # a real fp32 cache is used as is
