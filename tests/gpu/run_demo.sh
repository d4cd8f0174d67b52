#!/usr/bin/env bash
# `eep demo --gpu` on a GPU machine, plus the GPU check of the device-side NaN flag, in one go.
#   bash tests/gpu/run_demo.sh [NUM_RANKS=4] [--out DIR]      (default DIR /tmp/eep-gpu-demo)
# Writes DIR/demo.log (the demo's output), DIR/demo/{timeline.png,summary.json,run/} and
# DIR/pytest.log. With fewer GPUs than ranks the rank processes share them (rank r on GPU r mod G).
# The CUTLASS expert-GEMM library is built with nvcc on first use; a prebuilt one (`eep build-gemm
# --cache-dir build/gemm-cache`, which needs no GPU) is used from build/gemm-cache, with the CUTLASS
# headers from build/cutlass when the nvidia-cutlass package is not installed.
set -u
source tests/gpu/out_option.sh /tmp/eep-gpu-demo "$@"; set -- ${ARGS[@]+"${ARGS[@]}"}
RANKS=${1:-4}
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 EEP_FUSED_CACHE_DIR=${EEP_FUSED_CACHE_DIR:-/tmp/eep-cache}
[ -d build/cutlass ] && export EEP_CUTLASS_DIR=$PWD/build/cutlass
[ -d build/gemm-cache ] && export EEP_GEMM_CACHE_DIR=$PWD/build/gemm-cache
PY=python3
{ nvidia-smi -L; $PY -c "import torch; print('torch', torch.__version__, 'GPUs', torch.cuda.device_count())"; } \
  2>&1 | tee "$OUT_DIR/machine.txt"
$PY -c "import matplotlib" 2>/dev/null \
  || echo "matplotlib is not installed: the demo prints its summary and keeps the timelines in $OUT_DIR/demo/run" \
          "(plot them later: python -m eep.cli.plot $OUT_DIR/demo/run)" | tee -a "$OUT_DIR/machine.txt"

# 1. the device-side record of NaN/inf rows inside a captured CUDA graph (a few seconds)
if $PY -c "import pytest" 2>/dev/null; then
  timeout -k 5 120 $PY -m pytest -q -rfs -m gpu tests/test_routing_nonfinite.py -p no:cacheprovider \
    > "$OUT_DIR/pytest.log" 2>&1
  echo "=== pytest (device NaN flag) rc=$?"; tail -3 "$OUT_DIR/pytest.log"
fi

# 2. the demo: about 3 minutes (set-up ~30 s, start-up, 5 s of serving, SIGKILL, restart, rejoin,
#    5 s more); the demo bounds its own run (170 s), the timeout here bounds everything else
start=$(date +%s)
timeout -k 10 300 $PY -m eep.cli demo --gpu --skip-reference --ranks "$RANKS" --out "$OUT_DIR/demo" --keep \
  > "$OUT_DIR/demo.log" 2>&1
rc=$?
echo "=== demo rc=$rc ($(( $(date +%s) - start )) s)"
tail -25 "$OUT_DIR/demo.log"
exit $rc
