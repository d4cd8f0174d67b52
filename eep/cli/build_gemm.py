"""``eep build-gemm``: build (or find) the CUTLASS expert-GEMM library ahead of its first use."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from eep import envs
from eep.cli.options import int_at_least

DESCRIPTION = """\
The fused data plane's expert stage on Hopper GPUs runs CUTLASS grouped GEMMs from a small shared
library that eep compiles with nvcc (sm_90a) the first time it is needed, and caches by a hash of
its sources, the CUTLASS and nvcc versions and the flags. The build takes minutes, so build it
once before serving; it needs nvcc and the CUTLASS headers (pip install "eep[cutlass]"), not a GPU.
Copy the cache directory to machines with the same nvcc and CUTLASS versions, or point
EEP_GEMM_CACHE_DIR at a shared one.
"""


def add_parser(commands) -> None:
    p = commands.add_parser("build-gemm", help="build the CUTLASS expert-GEMM library now",
                            description=DESCRIPTION)
    p.add_argument("--cache-dir", default=envs.gemm_cache_dir(), metavar="DIR",
                   help="where the library is cached (EEP_GEMM_CACHE_DIR)")
    p.add_argument("--jobs", type=int_at_least(1), default=None, metavar="N",
                   help="nvcc processes at once (default: one per CPU, at most one per unit)")
    p.add_argument("--with-swiglu", action="store_true",
                   help="also build the opt-in SwiGLU-epilogue kernels (a second library)")
    p.add_argument("--with-fp8", action="store_true",
                   help="also build the block-scaled FP8 kernels of the FP8 expert stage (a second library)")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from eep.fused.gemm.build import (DEFAULT_CONFIGS, FP8_CONFIGS, SWIGLU_CONFIGS, GemmBuildError, build_library,
                                      library_path)

    sets = [("default", DEFAULT_CONFIGS)]
    if args.with_swiglu:
        sets.append(("with SwiGLU epilogue", DEFAULT_CONFIGS + SWIGLU_CONFIGS))
    if args.with_fp8:
        sets.append(("block-scaled FP8", FP8_CONFIGS))
    directory = Path(args.cache_dir)
    for name, configs in sets:
        try:
            path = library_path(configs, directory=directory)
            if path.exists():
                print(f"CUTLASS expert-GEMM library ({name}): {path} (already built)")
                continue
            print(f"building the CUTLASS expert-GEMM library ({name}, {len(configs)} kernels) with nvcc "
                  "for sm_90a; this takes minutes ...", flush=True)
            start = time.perf_counter()
            path = build_library(configs, directory=directory, jobs=args.jobs)
        except GemmBuildError as exc:
            print(f"eep: error: {exc}", file=sys.stderr)
            return 1
        print(f"CUTLASS expert-GEMM library ({name}): {path} (built in {time.perf_counter() - start:.0f} s)")
    if directory != Path(envs.gemm_cache_dir()):
        print(f"use it with EEP_GEMM_CACHE_DIR={directory}")
    return 0
