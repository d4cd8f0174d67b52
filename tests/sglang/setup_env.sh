#!/usr/bin/env bash
# Set up the optional SGLang test group's own virtual environment (default .venv-sglang).
#
# Why a separate venv: sglang 0.5.23 pins torch==2.14.1 and many GPU-only packages. Its dispatcher,
# elastic_ep, eplb and plugin modules import on CPU with torch 2.13 when the wheel is installed with
# --no-deps beside a short list of its pure-Python requirements. torchvision must stay absent: its
# CPU wheel fails to import there and transformers would then try to use it.
#
# Idempotent: a stamp file records the requirement list; a second run with the same list is a no-op.
# Usage: bash tests/sglang/setup_env.sh [VENV_DIR]        (EEP_SGLANG_VENV overrides the default)
set -euo pipefail
cd "$(dirname "$0")/../.."
VENV="${1:-${EEP_SGLANG_VENV:-.venv-sglang}}"
PYTHON="${PYTHON:-python3}"
PY="$VENV/bin/python"

TORCH_REQ="torch==2.13.0"
SGLANG_REQ="sglang==0.5.23"
# sglang's pure-Python requirements that its CPU-importable modules need (pinned where it pins).
DEPS=(numpy orjson psutil pybase64 requests packaging pillow starlette typing_extensions msgspec
      triton pydantic pyzmq tqdm ipython aiohttp dill einops gguf partial-json-parser
      "transformers==5.19.0" "compressed-tensors==0.18.0" "apache-tvm-ffi==0.1.11"
      "openai==2.8.0" "sentencepiece==0.2.1" pytest safetensors)
STAMP="$VENV/.eep-sglang-installed"
WANT="$TORCH_REQ $SGLANG_REQ ${DEPS[*]} pyproject:$(sha256sum pyproject.toml | cut -c1-16)"

if [[ -f "$STAMP" && "$(cat "$STAMP")" == "$WANT" ]] && "$PY" -c "import importlib.util as u; assert u.find_spec('sglang') and u.find_spec('eep')" 2>/dev/null; then
  echo "setup_env: $VENV is up to date"
  exit 0
fi

[[ -x "$PY" ]] || "$PYTHON" -m venv "$VENV"
PIP=("$PY" -m pip install -q)
# torch first, so nothing below pulls a CUDA build (the CPU wheel lies on local disk).
"$PY" -c "import torch" 2>/dev/null || "${PIP[@]}" "$TORCH_REQ"
"${PIP[@]}" --no-deps "$SGLANG_REQ"
"${PIP[@]}" "$TORCH_REQ" "${DEPS[@]}"
"${PIP[@]}" --no-deps -e .
# transformers must see torchvision as absent (its CPU wheel breaks imports here).
"$PY" -m pip uninstall -q -y torchvision 2>/dev/null || true
"$PY" -c "import sys; sys.path.insert(0, 'tests/sglang'); import sglang_shims; sglang_shims.install()
import sglang.srt.layers.moe.token_dispatcher, sglang.srt.elastic_ep.elastic_ep, sglang.srt.plugins, eep" 2>/dev/null \
  || { echo "setup_env: sglang modules do not import in $VENV" >&2; exit 1; }
echo "$WANT" > "$STAMP"
echo "setup_env: $VENV ready"
