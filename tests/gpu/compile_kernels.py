"""NVRTC-compile (into the cubin cache) every fused-kernel variant that tests/gpu/run_kernels.sh uses:
both kernel sets, hidden 2048 and 7168, aware and fixed, bf16 and FP8, and v1's prefill combine
experiments. Runs without a GPU (NVRTC alone), so the cache can be built on any machine for the GPU's
arch and reused there when the NVRTC version matches (it is part of every cache key).

    python tests/gpu/compile_kernels.py [--arch sm_90a] [--cache-dir DIR] [--jobs 8]
"""

from __future__ import annotations

import argparse
import os
import sys
from concurrent.futures import ProcessPoolExecutor

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))


def variants():
    from eep.fused.compile import KERNEL_SETS, KernelVariant

    out = [KernelVariant(h, fixed, use_fp8=fp8, kernels=k) for k in KERNEL_SETS for h in (2048, 7168)
           for fixed in (False, True) for fp8 in (False, True)]
    out += [KernelVariant(h, fixed, prefill_combine=c) for h in (2048, 7168) for fixed in (False, True)
            for c in ("spread", "pull")]
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", default="sm_90a", help="target (the GPU's: eep.fused.compile.device_arch)")
    p.add_argument("--cache-dir", default=None, help="cubin cache (default EEP_FUSED_CACHE_DIR or ~/.cache/eep/fused)")
    p.add_argument("--jobs", type=int, default=8)
    args = p.parse_args()
    if args.cache_dir:
        os.environ["EEP_FUSED_CACHE_DIR"] = args.cache_dir
    from eep.fused.compile import cached_cubin

    todo = variants()
    with ProcessPoolExecutor(args.jobs) as pool:
        cubins = list(pool.map(cached_cubin, todo, [args.arch] * len(todo)))
    print(f"compiled {len(cubins)} variants for {args.arch} ({sum(len(c) for c in cubins) // 1024} KiB of cubins)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
