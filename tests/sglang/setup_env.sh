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

LOG="$(mktemp -t eep-sglang-setup.XXXXXX)"
trap 'rm -f "$LOG"' EXIT
# One line per step; a step's own output (pip's progress and resolver notes) is shown only when it fails.
step() {
  local name="$1"; shift
  local start=$SECONDS
  if "$@" >"$LOG" 2>&1; then
    echo "setup_env: $name ($((SECONDS - start)) s)"
  else
    echo "setup_env: $name FAILED; its output:" >&2
    tail -n 60 "$LOG" >&2
    exit 1
  fi
}
PIP=("$PY" -m pip install -q --disable-pip-version-check)
have_torch() { "$PY" -c "import torch" 2>/dev/null || "${PIP[@]}" "$TORCH_REQ"; }
# sglang --no-deps beside its short requirement list: pip's resolver then lists sglang's other
# (GPU-only) requirements as missing; that is expected and kept out of the output unless pip fails.
no_torchvision() { "$PY" -m pip uninstall -q -y torchvision 2>/dev/null || true; }
imports() {
  "$PY" -c "import sys; sys.path.insert(0, 'tests/sglang'); import sglang_shims; sglang_shims.install()
import sglang.srt.layers.moe.token_dispatcher, sglang.srt.elastic_ep.elastic_ep, sglang.srt.plugins, eep"
}

[[ -x "$PY" ]] || step "virtual environment $VENV" "$PYTHON" -m venv "$VENV"
# torch first, so nothing below pulls a CUDA build (the CPU wheel lies on local disk).
step "$TORCH_REQ" have_torch
step "$SGLANG_REQ (--no-deps)" "${PIP[@]}" --no-deps "$SGLANG_REQ"
step "sglang's CPU-side requirements (${#DEPS[@]} packages)" "${PIP[@]}" "$TORCH_REQ" "${DEPS[@]}"
step "eep (editable, --no-deps)" "${PIP[@]}" --no-deps -e .
# transformers must see torchvision as absent (its CPU wheel breaks imports here).
step "torchvision absent" no_torchvision
step "sglang modules import on the CPU" imports
echo "$WANT" > "$STAMP"
echo "setup_env: $VENV ready"
