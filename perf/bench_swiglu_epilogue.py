"""SwiGLU in GEMM1's epilogue vs GEMM1 + a separate SwiGLU kernel (CUTLASS expert stage, one GPU).

For each model shape and batch of ``bench_expert_gemm`` (same routing draw, same shapes), builds the
default ``CutlassExpertStage`` and its ``fused_swiglu=True`` twin (same grouping, same GEMM1 tile,
same GEMM2), checks both against the float32 reference on sampled blocks, and times side by side:

- ``stage`` / ``stage_graph``: the whole stage, eager and replayed from a CUDA graph;
- ``gemm1+swiglu``: unfused GEMM1 then the SwiGLU kernel, vs the fused GEMM1 alone.

    python perf/bench_swiglu_epilogue.py --out /tmp/swiglu.jsonl [--models qwen3-30b-a3b] [--batches decode]
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_expert_gemm import check, graph_ms, random_stage_inputs, shape_arguments, time_ms  # noqa: E402


def parse_gemm1(spec: str):
    """``64x256x64:ping`` -> the SwiGLU GEMM1 config of that tile and schedule (plain form)."""
    from eep.fused.gemm.build import GemmConfig

    tile, _, schedule = spec.partition(":")
    m, n, k = (int(v) for v in tile.split("x"))
    return GemmConfig(m, n, k, schedule or "coop", swiglu=True)


def bench_case(model: str, batch: str, device, gen, *, reps: int, extra_gemm1: tuple = ()) -> list[dict]:
    from eep.fused.gemm.build import DEFAULT_CONFIGS, SWIGLU_CONFIGS
    from eep.fused.gemm.cutlass_stage import CutlassExpertStage

    shape, counts, x, w13, w2 = random_stage_inputs(model, batch, device, gen)
    inter = shape.inter
    rows = int(counts.sum())
    base = {"model": model, "batch": batch, "rows": rows, "rows_per_block": rows / shape.num_groups,
            "gpu": torch.cuda.get_device_name()}
    configs = DEFAULT_CONFIGS + SWIGLU_CONFIGS + tuple(extra_gemm1)
    results = []
    default_swap = None
    for fused, gemm1 in [(False, None), (True, None)] + [(True, g) for g in extra_gemm1]:
        if gemm1 is not None and default_swap:
            continue  # the extra tiles are plain-form GEMM1s: prefill-sized groups only
        stage = CutlassExpertStage(shape, device=device, expected_rows_per_group=rows / shape.num_groups,
                                   configs=configs, fused_swiglu=fused, gemm1=gemm1)
        default_swap = stage.gemm1.swap if default_swap is None else default_swap
        w = stage.prepare_w13(w13)
        stage.out_buffer.fill_(float("nan"))
        err = check(f"fused={fused}", stage(x, counts, w, w2), x, counts, w13, w2, inter, gen)
        impl = f"{'fused' if fused else 'unfused'}{'' if gemm1 is None else '-' + gemm1.name}[{stage.describe()}]"
        ms, spread = time_ms(lambda: stage(x, counts, w, w2), reps=reps)
        results.append({**base, "what": "stage", "impl": impl, "ms": ms, "spread_ms": spread, "rel_err": err})
        ms, spread = graph_ms(lambda: stage(x, counts, w, w2), reps=reps)
        results.append({**base, "what": "stage_graph", "impl": impl, "ms": ms, "spread_ms": spread})
        stage.setup(x, counts, w, w2)
        if stage.grouping == "slot":
            stage.copy_rows(x, to_compact=True)
        gemm1 = (lambda: stage.run_gemm(1)) if fused else (lambda: (stage.run_gemm(1), stage.swiglu()))
        ms, spread = time_ms(gemm1, reps=reps)
        results.append({**base, "what": "gemm1+swiglu", "impl": impl, "ms": ms, "spread_ms": spread})
        del stage, w
        torch.cuda.empty_cache()
    del x
    torch.cuda.empty_cache()
    return results


def main() -> None:
    parser = shape_arguments(__doc__.splitlines()[0], reps=20)
    parser.add_argument("--extra-gemm1", nargs="*", default=[], type=parse_gemm1,
                        help="more SwiGLU GEMM1 tiles to time at prefill, e.g. 64x256x64:ping (must be in the "
                             "library: build DEFAULT_CONFIGS + SWIGLU_CONFIGS + these)")
    args = parser.parse_args()
    device = torch.device("cuda")
    gen = torch.Generator().manual_seed(int(time.time()))
    print(f"GPU {torch.cuda.get_device_name()} torch {torch.__version__}", flush=True)
    for model in args.models:
        for batch in args.batches:
            try:
                results = bench_case(model, batch, device, gen, reps=args.reps, extra_gemm1=tuple(args.extra_gemm1))
            except Exception as exc:  # one shape must not hide the others
                print(f"  {model} {batch} ERROR {exc!r}"[:400], flush=True)
                continue
            unfused = {r["what"]: r["ms"] for r in results if r["impl"].startswith("unfused")}
            for what in ("stage", "stage_graph", "gemm1+swiglu"):  # each fused GEMM1 (default twin first)
                for r in results:
                    if r["what"] == what and r["impl"].startswith("fused"):
                        print(f"  {model} {batch} {what:13s} unfused {unfused[what] * 1e3:8.1f} us  "
                              f"{r['impl'].split('[')[0]} {r['ms'] * 1e3:8.1f} us  "
                              f"speedup {unfused[what] / r['ms']:.2f}x", flush=True)
            for r in results:
                print(f"    {r['what']:13s} {r['impl']:80s} {r['ms'] * 1e3:9.1f} us", flush=True)
            if args.out:
                with args.out.open("a") as f:
                    for r in results:
                        f.write(json.dumps(r) + "\n")


if __name__ == "__main__":
    main()
