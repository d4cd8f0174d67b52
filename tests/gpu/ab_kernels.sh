#!/usr/bin/env bash
# Two versions of one fused-kernel source, timed on the same GPU in the same call: A, B, A, B, each
# round running kernel set v2's decode step at one rank (perf/bench_dispatch.py --num-ranks 1
# --kernels v2) for deepseek-v3 bf16, deepseek-v3 FP8 and qwen3-30b-a3b bf16, one table row per
# (version, round, case). Runs on separate calls land on separate cards whose steps differ by up to
# ~0.5 us, more than most kernel changes move them: an A/B on one card is what tells a change apart.
# The file in the tree is restored at the end.
#   bash tests/gpu/ab_kernels.sh --file eep/fused/csrc/dispatch_v2.cuh --a OLD.cuh --b NEW.cuh [--out DIR]
set -u
OUT_DIR=/tmp/eep-ab-out
FILE=""; A=""; B=""
while [ $# -gt 0 ]; do
  case "$1" in
    --file) FILE=$2; shift 2 ;;
    --a) A=$2; shift 2 ;;
    --b) B=$2; shift 2 ;;
    --out) OUT_DIR=$2; shift 2 ;;
    *) echo "ab_kernels.sh: unknown option $1 (use --file F --a A --b B [--out DIR])"; exit 2 ;;
  esac
done
for f in "$FILE" "$A" "$B"; do
  [ -f "$f" ] || { echo "ab_kernels.sh: no such file: '$f' (--file, --a and --b are required)"; exit 2; }
done
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 EEP_FUSED_CACHE_DIR=${EEP_FUSED_CACHE_DIR:-$PWD/build/fused-cache}
PY=${PYTHON:-python3}
mkdir -p "$OUT_DIR"
ORIGINAL=$(mktemp)
cp "$FILE" "$ORIGINAL"
trap 'cp "$ORIGINAL" "$FILE"; rm -f "$ORIGINAL"' EXIT
nvidia-smi -L 2>&1
HEADER=$($PY - <<'EOF'
import sys; sys.path.insert(0, "perf")
from bench_dispatch import TABLE_HEADER
print("| version | case | " + " | ".join(TABLE_HEADER[1:]) + " |")
EOF
)
echo "$HEADER" | tee "$OUT_DIR/ab_table.md"
for round in 1 2; do
  for version in a b; do
    if [ $version = a ]; then cp "$A" "$FILE"; else cp "$B" "$FILE"; fi
    for case in "deepseek-v3" "deepseek-v3 --fp8" "qwen3-30b-a3b"; do
      run_log="$OUT_DIR/run_${version}${round}_${case// /}.txt"
      timeout 90 $PY perf/bench_dispatch.py --num-ranks 1 --kernels v2 --model $case > "$run_log" 2>&1
      row=$(grep -E '^\| v2 ' "$run_log" | sed -E 's/^\| v2 //')
      [ -n "$row" ] || row="| FAILED (see $run_log) |"
      echo "| $version (round $round) | $case $row" | tee -a "$OUT_DIR/ab_table.md"
    done
  done
done
