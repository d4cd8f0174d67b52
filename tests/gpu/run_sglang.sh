#!/usr/bin/env bash
# SGLang's dispatcher classes over eep's fused GPU backends on one GPU (tests/gpu/sglang_gpu.py): four
# rank processes sharing GPU 0, bf16 then FP8 low-latency dispatch, normal mode, a CUDA graph through a
# SIGKILL and a rejoin; then eep.Buffer's face over the fused buffer (tests/gpu/buffer_face.py).
# SGLang is installed from the wheels in .whl when it is not importable (tests/gpu/sglang_wheels.py).
# Logs under --out (default /tmp/eep-gpu-out).
#   bash tests/gpu/run_all.sh sglang [--out DIR]       (the same as bash tests/gpu/run_sglang.sh [--out DIR])
set -u
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 EEP_FUSED_CACHE_DIR=/tmp/eep-cache CUDA_VISIBLE_DEVICES=0
source tests/gpu/out_option.sh /tmp/eep-gpu-out "$@"; set -- ${ARGS[@]+"${ARGS[@]}"}
LOG=$OUT_DIR/log.txt
PY=python3
START=$(date +%s); BUDGET=${EEP_GPU_BUDGET_S:-270}
source tests/gpu/steps.sh
nvidia-smi -L | tee -a "$LOG"
$PY -c "import torch, transformers, triton; print('torch', torch.__version__, 'transformers', transformers.__version__,
'triton', triton.__version__)" 2>&1 | tee -a "$LOG"
S=tests/gpu/sglang_gpu.py
# the first step also installs SGLang and compiles the kernels; --timeout-s bounds its rank processes
step sglang-bf16 180 $PY $S --out $OUT_DIR/sglang --timeout-s 120
step sglang-fp8 130 $PY $S --out $OUT_DIR/sglang --fp8 --timeout-s 110
step face4 70 $PY tests/gpu/buffer_face.py --num-ranks 4 --out $OUT_DIR/face
echo "=== SUMMARY"
grep -E "^(=== .* rc=|SCENARIO|RESULT|installed|compiled|torch )" "$LOG"
