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

``--gemm-sweep`` adds, per model, each GEMM timed alone with every prefill kernel the stage's library
holds (both stages, their default grouping), since GEMM1 (long K) and GEMM2 (K = the expert's
intermediate size) need not prefer the same tile; then the whole call of each stage with the default
kernels and with the fastest kernel of each GEMM, eager and as a CUDA-graph replay, side by side
(the FP8 / bf16 ratio both ways).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_expert_gemm import TOP_K, check, graph_ms, random_stage_inputs, sample_blocks, time_ms  # noqa: E402
from bench_fp8_experts import fp8_check, quantize_stack, quantize_tokens  # noqa: E402
from ep_bench import time_calls  # noqa: E402

from eep.fp8 import BLOCK  # noqa: E402
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


def prefill_case(model: str, device, gen) -> tuple:
    """``random_stage_inputs`` at prefill (the case of ``perf/bench_fp8_experts.py``) plus the
    block-scaled FP8 copies of the weights: ``(shape, counts, rows, x, w13, w2, w13_q, w2_q)``."""
    shape, counts, x, w13, w2 = random_stage_inputs(model, "prefill", device, gen)
    return shape, counts, int(counts.sum()), x, w13, w2, quantize_stack(w13), quantize_stack(w2)


def profile_model(model: str, iters: int, device, gen) -> None:
    from eep.fused.gemm.cutlass_fp8_stage import CutlassFp8ExpertStage
    from eep.fused.gemm.cutlass_stage import CutlassExpertStage

    shape, counts, rows, x, w13, w2, w13_q, w2_q = prefill_case(model, device, gen)
    hidden, inter = shape.hidden, shape.inter
    flops = {"gemm1": 2.0 * rows * hidden * 2 * inter, "gemm2": 2.0 * rows * inter * hidden}
    print(f"=== {model} prefill: {rows} rows, {rows / shape.num_groups:.1f} per (slot, source) block, "
          f"{torch.cuda.get_device_name()}", flush=True)

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

    values, scales = quantize_tokens(x)
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


def prefill_configs(fp8: bool) -> list:
    """The non-swapped (prefill) kernels of a stage's library."""
    from eep.fused.gemm.build import DEFAULT_CONFIGS, FP8_CONFIGS

    return [c for c in (FP8_CONFIGS if fp8 else DEFAULT_CONFIGS) if not c.swap]


def gemm_sweep(model: str, iters: int, reps: int, device, gen) -> None:
    """Each GEMM alone with every prefill kernel (checked first), then the whole call with the default
    kernels beside the fastest per GEMM, for both stages, eager and graph."""
    from eep.fused.gemm.cutlass_fp8_stage import CutlassFp8ExpertStage
    from eep.fused.gemm.cutlass_stage import CutlassExpertStage

    shape, counts, rows, x, w13, w2, w13_q, w2_q = prefill_case(model, device, gen)
    inter = shape.inter
    per_block = rows / shape.num_groups
    flops = {1: 2.0 * rows * shape.hidden * 2 * inter, 2: 2.0 * rows * inter * shape.hidden}
    print(f"=== gemm sweep {model} prefill: {rows} rows, {per_block:.1f} per (slot, source) block, "
          f"{torch.cuda.get_device_name()}", flush=True)
    values, scales = quantize_tokens(x)
    picks = sample_blocks(counts.cpu(), gen, num=4)

    def make(fp8: bool, gemm1=None, gemm2=None):
        cls = CutlassFp8ExpertStage if fp8 else CutlassExpertStage
        stage = cls(shape, device=device, expected_rows_per_group=per_block, gemm1=gemm1, gemm2=gemm2)
        call = (lambda: stage(values, scales, counts, w13_q, w2_q)) if fp8 else (lambda: stage(x, counts, w13, w2))
        stage.out_buffer.fill_(float("nan"))
        if fp8:
            fp8_check(f"fp8 {stage.describe()}", call(), values, scales, counts, w13_q, w2_q, inter, picks)
        else:
            check(f"bf16 {stage.describe()}", call(), x, counts, w13, w2, inter, gen)
        return stage, call

    best = {}
    for fp8 in (False, True):
        label = "fp8" if fp8 else "bf16"
        times = {}
        for config in prefill_configs(fp8):
            stage, call = make(fp8, config, config)
            call()
            for which in (1, 2):
                us = time_calls(torch, lambda: stage.run_gemm(which), iters) * 1e6
                times[(which, config)] = us
                print(f"  {label} grouping {stage.grouping} GEMM{which} {config.name:40s} {us:9.1f} us "
                      f"{flops[which] / us / 1e6:7.1f} TFLOP/s", flush=True)
            del stage, call
            torch.cuda.empty_cache()
        best[fp8] = tuple(min((c for w, c in times if w == which), key=lambda c: times[(which, c)]) for which in (1, 2))
        print(f"  {label} fastest: GEMM1 {best[fp8][0].name}, GEMM2 {best[fp8][1].name}", flush=True)

    whole = {}
    for fp8 in (False, True):
        label = "fp8" if fp8 else "bf16"
        for kind, (g1, g2) in (("default", (None, None)), ("fastest per GEMM", best[fp8])):
            stage, call = make(fp8, g1, g2)
            eager, _ = time_ms(call, reps=reps)
            graph, _ = graph_ms(call, reps=reps)
            whole[(fp8, kind)] = (eager * 1e3, graph * 1e3)
            print(f"  whole call {label:4s} {kind:16s} [{stage.describe()}] eager {eager * 1e3:9.1f} us, graph "
                  f"{graph * 1e3:9.1f} us", flush=True)
            del stage, call
            torch.cuda.empty_cache()
    for kind in ("default", "fastest per GEMM"):
        (be, bg), (fe, fg) = whole[(False, kind)], whole[(True, kind)]
        print(f"  FP8 / bf16, {kind} kernels: eager {be / fe:.3f}x, graph {bg / fg:.3f}x", flush=True)
    (be, bg), (fe, fg) = whole[(False, "default")], whole[(True, "fastest per GEMM")]
    print(f"  FP8 fastest per GEMM / bf16 default: eager {be / fe:.3f}x, graph {bg / fg:.3f}x", flush=True)
    del x, values, scales
    torch.cuda.empty_cache()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="deepseek-v3,qwen3-30b-a3b")
    ap.add_argument("--iters", type=int, default=10, help="launches of each step per timing")
    ap.add_argument("--gemm-sweep", action="store_true", help="also each GEMM alone with every prefill kernel, "
                    "then the whole call with the fastest per GEMM beside the default")
    ap.add_argument("--only-sweep", action="store_true", help="the GEMM sweep without the per-launch profile")
    ap.add_argument("--reps", type=int, default=20, help="timed whole calls in the sweep (median)")
    args = ap.parse_args()
    device = torch.device("cuda", 0)
    torch.cuda.set_device(device)
    gen = torch.Generator().manual_seed(7)
    for model in args.models.split(","):
        if not args.only_sweep:
            profile_model(model, args.iters, device, gen)
        if args.gemm_sweep or args.only_sweep:
            gemm_sweep(model, args.iters, args.reps, device, gen)
    return 0


if __name__ == "__main__":
    sys.exit(main())
