"""Where the FP8 and bf16 expert stages spend their time at prefill: every kernel of one call, on one GPU.

    python perf/profile_fp8_stage.py [--models deepseek-v3,qwen3-30b-a3b] [--iters 10]

For each model, the prefill case of ``perf/bench_fp8_experts.py`` (4096 tokens per rank, 4 ranks,
top-8, uniform routing, one rank's slots): the bf16 CUTLASS stage and the FP8 CUTLASS stage (default
kernels and grouping) are called once, then each launch of a call (setup, gathers and copies, GEMM1,
SwiGLU, GEMM2) is timed on its own, ``--iters`` launches back to back between CUDA events, and printed
with its share of the call and, for the GEMMs, TFLOP/s; the whole call is timed beside them. A third
row set, ``fp8 dense``, runs the FP8 stage on one group holding all of those rows (one expert, one source): the same GEMM FLOPs with no grouping, which separates what the block-scaled
kernel itself reaches from what small groups cost. Each stage is checked once against its oracle on
sampled blocks before it is profiled.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_expert_gemm import BATCHES, MODELS, NUM_RANKS, TOP_K, check, random_counts, sample_blocks  # noqa: E402
from bench_fp8_experts import fp8_check, quantize_stack  # noqa: E402
from ep_bench import time_calls  # noqa: E402

from eep.fp8 import BLOCK, FP8_DTYPE, quantize_rows  # noqa: E402
from eep.fused.gemm import ExpertStageShape  # noqa: E402


def step_times(steps: list[tuple[str, object]], iters: int) -> dict[str, float]:
    """µs per launch of each step of a stage, each looped ``iters`` times on its own (CUDA events
    around the loop, after one call of every step): a step reads what the step before it wrote in
    the call that primed them, so looping one alone recomputes the same thing."""
    for _, fn in steps:
        fn()
    return {name: time_calls(torch, fn, iters) * 1e6 for name, fn in steps}


def report(label: str, times: dict[str, float], flops: dict[str, float], whole_us: float) -> None:
    """Each step's µs, share of the sum and (GEMMs) TFLOP/s; the whole call timed as one beside it."""
    total = sum(times.values())
    print(f"{label}: steps sum to {total:.1f} us; the whole call {whole_us:.1f} us", flush=True)
    for name, us in times.items():
        rate = f"  {flops[name] / us / 1e6:7.1f} TFLOP/s" if name in flops else ""
        print(f"  {name:13s} {us:9.1f} us {100 * us / total:5.1f}%{rate}", flush=True)


def stage_steps(stage, x: torch.Tensor, fp8: bool) -> list[tuple[str, object]]:
    """The launches of one call of ``stage`` after its setup, in order, as (name, callable)."""
    steps = []
    if fp8:
        steps.append(("gather", stage.gather))
    elif stage.grouping == "slot":
        steps.append(("copy in", lambda: stage.copy_rows(x, to_compact=True)))
    steps.append(("gemm1", lambda: stage.run_gemm(1)))
    if fp8:
        steps.append(("swiglu+quant", stage.swiglu_quant))
    elif not stage.fused_swiglu:
        steps.append(("swiglu", stage.swiglu))
    steps.append(("gemm2", lambda: stage.run_gemm(2)))
    if stage.grouping == "slot":
        steps.append(("scatter", stage.scatter) if fp8 else
                     ("copy out", lambda: stage.copy_rows(stage.out_buffer, to_compact=False)))
    return steps


def profile_model(model: str, iters: int, device, gen) -> None:
    from eep.fused.gemm.cutlass_fp8_stage import CutlassFp8ExpertStage
    from eep.fused.gemm.cutlass_stage import CutlassExpertStage

    hidden, inter, num_experts = MODELS[model]
    tokens = BATCHES["prefill"]
    slots = num_experts // NUM_RANKS
    shape = ExpertStageShape(slots, NUM_RANKS, tokens, hidden, inter, TOP_K)
    counts = random_counts(num_experts, slots, tokens, gen, device)
    rows = int(counts.sum())
    flops = {"gemm1": 2.0 * rows * hidden * 2 * inter, "gemm2": 2.0 * rows * inter * hidden}
    print(f"=== {model} prefill: {rows} rows, {rows / shape.num_groups:.1f} per (slot, source) block, "
          f"{torch.cuda.get_device_name()}", flush=True)
    x = torch.randn(slots, NUM_RANKS, tokens, hidden, dtype=torch.bfloat16, device=device)
    w13 = (torch.randn(slots, 2 * inter, hidden, device=device) / hidden ** 0.5).bfloat16()
    w2 = (torch.randn(slots, hidden, inter, device=device) / inter ** 0.5).bfloat16()
    w13_q, w2_q = quantize_stack(w13), quantize_stack(w2)

    def run(label: str, stage, call, setup, x_in, fp8: bool) -> None:
        steps = [("setup", setup)] + stage_steps(stage, x_in, fp8)
        times = step_times(steps, iters)  # primes the steps with one call of each, in order
        whole = time_calls(torch, call, iters) * 1e6
        if fp8:
            assert stage.error_flags() == 0, f"{label}: stage error flags {stage.error_flags()}"
        report(f"{label} [{stage.describe()}]", times, flops, whole)

    stage = CutlassExpertStage(shape, device=device, expected_rows_per_group=rows / shape.num_groups)
    stage.out_buffer.fill_(float("nan"))
    check("bf16", stage(x, counts, w13, w2), x, counts, w13, w2, inter, gen)
    run("bf16", stage, lambda: stage(x, counts, w13, w2), lambda: stage.setup(x, counts, w13, w2), x, False)
    del stage, w13, w2
    torch.cuda.empty_cache()

    values = torch.empty(x.shape, dtype=FP8_DTYPE, device=device)
    scales = torch.empty(*x.shape[:3], hidden // BLOCK, dtype=torch.float32, device=device)
    for slot in range(slots):
        values[slot], scales[slot] = quantize_rows(x[slot])
    del x
    torch.cuda.empty_cache()
    stage = CutlassFp8ExpertStage(shape, device=device, expected_rows_per_group=rows / shape.num_groups)
    stage.out_buffer.fill_(float("nan"))
    fp8_check("fp8", stage(values, scales, counts, w13_q, w2_q), values, scales, counts, w13_q, w2_q, inter,
              sample_blocks(counts.cpu(), gen, num=4))
    run("fp8", stage, lambda: stage(values, scales, counts, w13_q, w2_q),
        lambda: stage.setup(values, scales, counts, w13_q, w2_q), values, True)
    del stage
    torch.cuda.empty_cache()

    # the same rows as one group: slot 0's weights, the case's first rows as one source's block
    dense = ExpertStageShape(1, 1, rows, hidden, inter, TOP_K)
    d_values = values.view(-1, hidden)[:rows].view(1, 1, rows, hidden)
    d_scales = scales.view(-1, hidden // BLOCK)[:rows].view(1, 1, rows, hidden // BLOCK)
    d_counts = torch.full((1, 1), rows, dtype=torch.int32, device=device)
    d_w13, d_w2 = w13_q[0:1], w2_q[0:1]
    stage = CutlassFp8ExpertStage(dense, device=device, expected_rows_per_group=float(rows), grouping="block")
    stage.out_buffer.fill_(float("nan"))
    fp8_check("fp8 dense", stage(d_values, d_scales, d_counts, d_w13, d_w2), d_values, d_scales, d_counts, d_w13,
              d_w2, inter, [(0, 0)])
    run(f"fp8 dense, one group of {rows} rows", stage, lambda: stage(d_values, d_scales, d_counts, d_w13, d_w2),
        lambda: stage.setup(d_values, d_scales, d_counts, d_w13, d_w2), d_values, True)
    del stage, values, scales
    torch.cuda.empty_cache()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="deepseek-v3,qwen3-30b-a3b")
    ap.add_argument("--iters", type=int, default=10, help="launches of each step per timing")
    args = ap.parse_args()
    device = torch.device("cuda", 0)
    torch.cuda.set_device(device)
    gen = torch.Generator().manual_seed(7)
    for model in args.models.split(","):
        profile_model(model, args.iters, device, gen)
    return 0


if __name__ == "__main__":
    sys.exit(main())
