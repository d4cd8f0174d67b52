"""Expert stage on one GPU: torch._grouped_mm pipeline vs the CUTLASS grouped-GEMM stage.

For each model shape and batch (decode 128 / prefill 4096 tokens per rank, 4 ranks, top-8, one
rank's slots = num_experts / 4) it draws a random routing, builds the receive layout, checks both
stages against a float32 reference on sampled blocks, then times with CUDA events (warm-up,
median of repeats):

- ``stage``: whole expert stage, receive layout in -> receive layout out;
- ``gemm1``: the first grouped GEMM alone (torch: ``_grouped_mm`` on already-compacted rows;
  CUTLASS: GEMM1 over the receive layout), for the raw-kernel comparison;
- every compiled CUTLASS config for each GEMM, so the default choice can be checked.

Also measures the card's two ceilings (device copy GB/s, 8192^3 bf16 matmul TFLOP/s) in the same
run. Prints a table; ``--out`` appends JSON lines.

    python perf/bench_expert_gemm.py --out /tmp/gemm.jsonl [--models qwen3-30b-a3b] [--batches decode]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from eep.fused.gemm import ExpertStageShape, TorchExpertStage  # noqa: E402
from eep.fused.gemm.torch_stage import grouped_mm  # noqa: E402

MODELS = {"qwen3-30b-a3b": (2048, 768, 128), "deepseek-v3": (7168, 2048, 256)}  # hidden, inter, experts
BATCHES = {"decode": 128, "prefill": 4096}
NUM_RANKS, TOP_K = 4, 8


def time_ms(fn, *, warmup: int = 5, reps: int = 30) -> tuple[float, float]:
    """Median and spread (max-min of the middle half) of ``reps`` event-timed calls, in ms."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    times.sort()
    mid = times[len(times) // 4: len(times) - len(times) // 4]
    return statistics.median(times), mid[-1] - mid[0]


def graph_ms(fn, *, reps: int) -> tuple[float, float]:
    """``time_ms`` of a CUDA-graph replay of ``fn`` (launch gaps and host overhead out)."""
    fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return time_ms(graph.replay, reps=reps)


def ceilings(device: torch.device) -> dict:
    a = torch.empty(2 * 1024 ** 3, dtype=torch.uint8, device=device)
    b = torch.empty_like(a)
    copy_ms, _ = time_ms(lambda: b.copy_(a), reps=10)
    del a, b
    m = torch.randn(8192, 8192, dtype=torch.bfloat16, device=device)
    n = torch.randn(8192, 8192, dtype=torch.bfloat16, device=device)
    mm_ms, _ = time_ms(lambda: m @ n, reps=10)
    return {"copy_gbps": 2 * 2 * 1024 ** 3 / copy_ms / 1e6, "mm_tflops": 2 * 8192 ** 3 / mm_ms / 1e9}


def random_counts(num_experts: int, slots: int, tokens: int, gen: torch.Generator, device) -> torch.Tensor:
    """``[slots, NUM_RANKS]`` rows each source rank sends to rank 0's slots under uniform top-8 routing."""
    counts = torch.zeros(slots, NUM_RANKS, dtype=torch.int32)
    for src in range(NUM_RANKS):
        ids = torch.rand(tokens, num_experts, generator=gen).topk(TOP_K, dim=1).indices.flatten()
        counts[:, src] = torch.bincount(ids, minlength=num_experts)[:slots].to(torch.int32)
    return counts.to(device)


def reference_block(x_block: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, inter: int) -> torch.Tensor:
    h = x_block.float() @ w13.float().T
    return (torch.nn.functional.silu(h[:, :inter]) * h[:, inter:]) @ w2.float().T


def sample_blocks(counts: torch.Tensor, gen: torch.Generator, num: int = 6) -> list[tuple[int, int]]:
    """``num`` random non-empty (slot, source) blocks and the hottest one."""
    nonzero = (counts > 0).nonzero().tolist()
    picks = [tuple(nonzero[i]) for i in torch.randperm(len(nonzero), generator=gen)[:num].tolist()]
    return picks + [divmod(int(counts.flatten().argmax()), counts.shape[1])]


def worst_block_error(name: str, y: torch.Tensor, counts, picks, reference, *, tol: float = 1e-2) -> float:
    """Worst relative error of the sampled blocks of ``y`` against ``reference(slot, src, n)``;
    raises on NaN in a block (an unwritten row of a poisoned output) or an error over ``tol``."""
    worst = 0.0
    for slot, src in picks:
        n = int(counts[slot, src])
        got = y[slot, src, :n].double()
        if got.isnan().any():
            raise AssertionError(f"{name}: NaN in block (slot {slot}, source {src})")
        ref = reference(slot, src, n).double()
        worst = max(worst, float((got - ref).norm() / ref.norm()))
    if worst > tol:
        raise AssertionError(f"{name}: relative error {worst:.2e} over the tolerance {tol}")
    return worst


def check(name: str, y: torch.Tensor, x, counts, w13, w2, inter: int, gen: torch.Generator) -> float:
    """Worst relative error over sampled non-empty blocks (and the hottest one) against the bf16
    reference; raises on NaN or over 1e-2."""
    return worst_block_error(name, y, counts, sample_blocks(counts, gen),
                             lambda slot, src, n: reference_block(x[slot, src, :n], w13[slot], w2[slot], inter))


def random_stage_inputs(model: str, batch: str, device, gen):
    """One rank's expert stage at a model shape and batch, with fresh random routing, tokens and weights:
    ``(shape, counts, x, w13, w2)`` in the receive layout (``ExpertStageShape``)."""
    hidden, inter, num_experts = MODELS[model]
    tokens = BATCHES[batch]
    slots = num_experts // NUM_RANKS
    shape = ExpertStageShape(slots, NUM_RANKS, tokens, hidden, inter, TOP_K)
    counts = random_counts(num_experts, slots, tokens, gen, device)
    x = torch.randn(slots, NUM_RANKS, tokens, hidden, dtype=torch.bfloat16, device=device)
    w13 = (torch.randn(slots, 2 * inter, hidden, device=device) / hidden ** 0.5).bfloat16()
    w2 = (torch.randn(slots, hidden, inter, device=device) / inter ** 0.5).bfloat16()
    return shape, counts, x, w13, w2


def bench_case(model: str, batch: str, device, gen, *, reps: int, configs: list,
               fused_swiglu: bool = False) -> list[dict]:
    from eep.fused.gemm.build import DEFAULT_CONFIGS, SWIGLU_CONFIGS
    from eep.fused.gemm.cutlass_stage import CutlassExpertStage

    shape, counts, x, w13, w2 = random_stage_inputs(model, batch, device, gen)
    hidden, inter, tokens = shape.hidden, shape.inter, shape.max_tokens_per_rank
    rows = int(counts.sum())
    rows_per_group = rows / shape.num_groups
    flops = 2 * rows * (2 * inter * hidden + hidden * inter)
    weight_bytes = 2 * (w13.numel() + w2.numel())
    act_bytes = 2 * rows * hidden * 2  # read x rows, write out rows
    base = {"model": model, "batch": batch, "tokens_per_rank": tokens, "rows": rows,
            "rows_per_expert": rows / shape.slots_per_rank, "rows_per_block": rows_per_group, "gpu": torch.cuda.get_device_name()}
    results = []

    for exact in (False, True):
        torch_stage = TorchExpertStage(shape, device=device, exact_rows=exact)
        torch_stage._out.fill_(float("nan"))
        err = check("torch", torch_stage(x, counts, w13, w2), x, counts, w13, w2, inter, gen)
        ms, spread = time_ms(lambda: torch_stage(x, counts, w13, w2), reps=reps)
        impl = "torch_grouped_mm[exact rows, 1 sync]" if exact else "torch_grouped_mm[static, graphable]"
        results.append({**base, "what": "stage", "impl": impl, "ms": ms, "spread_ms": spread, "rel_err": err})
        if not exact:
            try:
                ms, spread = graph_ms(lambda: torch_stage(x, counts, w13, w2), reps=reps)
                results.append({**base, "what": "stage_graph", "impl": impl, "ms": ms, "spread_ms": spread})
            except Exception as exc:
                results.append({**base, "what": "error", "impl": f"graph {impl}", "error": repr(exc)[:300]})

    # torch raw GEMM1 on compact rows (what the pipeline's first grouped_mm sees)
    offs = counts.sum(1).cumsum(0).to(torch.int32)
    xs = torch.randn(shape.capacity_rows, hidden, dtype=torch.bfloat16, device=device)
    ms1, sp1 = time_ms(lambda: grouped_mm(xs, w13.transpose(1, 2), offs), reps=reps)
    results.append({**base, "what": "gemm1", "impl": "torch_grouped_mm", "ms": ms1, "spread_ms": sp1})
    ms2, sp2 = time_ms(lambda: grouped_mm(xs[:, :inter].contiguous(), w2.transpose(1, 2), offs), reps=reps)
    results.append({**base, "what": "gemm2", "impl": "torch_grouped_mm", "ms": ms2, "spread_ms": sp2})
    torch_stage = None
    del xs  # the prefill receive layouts are large (deepseek-v3: 15 GB each)
    torch.cuda.empty_cache()

    for grouping in (None, "block", "slot"):  # None: the default choice (pick_grouping / pick_config)
        default = CutlassExpertStage(shape, device=device, expected_rows_per_group=rows_per_group, grouping=grouping)
        default.out_buffer.fill_(float("nan"))  # poisoned: check() sees NaN in any block left unwritten
        err = check("cutlass", default(x, counts, w13, w2), x, counts, w13, w2, inter, gen)
        if default.error_flags():
            raise AssertionError(f"cutlass setup raised error flags {default.error_flags()}")
        ms, spread = time_ms(lambda: default(x, counts, w13, w2), reps=reps)
        label = "cutlass-default" if grouping is None else "cutlass"
        results.append({**base, "what": "stage", "impl": f"{label}[{default.describe()}]",
                        "ms": ms, "spread_ms": spread, "rel_err": err})
        if grouping is None:
            ms, spread = graph_ms(lambda: default(x, counts, w13, w2), reps=reps)
            results.append({**base, "what": "stage_graph", "impl": f"{label}[{default.describe()}]", "ms": ms,
                            "spread_ms": spread})
        default = None
        torch.cuda.empty_cache()
    if fused_swiglu:  # the default choice with SwiGLU in GEMM1's epilogue (opt-in), same inputs
        fused = CutlassExpertStage(shape, device=device, expected_rows_per_group=rows_per_group,
                                   configs=DEFAULT_CONFIGS + SWIGLU_CONFIGS, fused_swiglu=True)
        w13i = fused.prepare_w13(w13)
        fused.out_buffer.fill_(float("nan"))
        err = check("cutlass fused swiglu", fused(x, counts, w13i, w2), x, counts, w13, w2, inter, gen)
        impl = f"cutlass-fused-swiglu[{fused.describe()}]"
        ms, spread = time_ms(lambda: fused(x, counts, w13i, w2), reps=reps)
        results.append({**base, "what": "stage", "impl": impl, "ms": ms, "spread_ms": spread, "rel_err": err})
        ms, spread = graph_ms(lambda: fused(x, counts, w13i, w2), reps=reps)
        results.append({**base, "what": "stage_graph", "impl": impl, "ms": ms, "spread_ms": spread})
        fused = w13i = None
        torch.cuda.empty_cache()
    for grouping, config in [(g, c) for g in ("block", "slot") for c in DEFAULT_CONFIGS
                             if c.name in configs or not configs]:
        try:
            stage = CutlassExpertStage(shape, device=device, gemm1=config, gemm2=config, grouping=grouping)
            stage.setup(x, counts, w13, w2)
            if grouping == "slot":
                ms_c, _ = time_ms(lambda: stage.copy_rows(x, to_compact=True), reps=reps)
                results.append({**base, "what": "gather", "impl": "cutlass", "ms": ms_c, "spread_ms": 0.0})
            for which in (1, 2):
                ms_g, sp_g = time_ms(lambda: stage.run_gemm(which), reps=reps)
                results.append({**base, "what": f"gemm{which}", "impl": f"cutlass[{grouping}:{config.name}]",
                                "ms": ms_g, "spread_ms": sp_g})
            ms_sw, _ = time_ms(stage.swiglu, reps=reps)
            results.append({**base, "what": "swiglu", "impl": "cutlass", "ms": ms_sw, "spread_ms": 0.0})
            y = stage(x, counts, w13, w2)
            check(f"cutlass {grouping} {config.name}", y, x, counts, w13, w2, inter, gen)
        except Exception as exc:  # one bad config must not hide the others' numbers
            results.append({**base, "what": "error", "impl": f"cutlass[{config.name}]", "error": repr(exc)[:300]})
        stage = y = None
        torch.cuda.empty_cache()
    for r in results:
        if "ms" in r and r["what"] in ("stage", "stage_graph"):
            r["tflops"] = flops / r["ms"] / 1e9
            r["gbps"] = (weight_bytes + act_bytes) / r["ms"] / 1e6
    del x
    torch.cuda.empty_cache()
    return results


def shape_arguments(description: str, *, reps: int) -> argparse.ArgumentParser:
    """The options every expert-stage benchmark takes: model shapes, batches, repetitions, JSONL out."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--models", nargs="*", default=list(MODELS))
    parser.add_argument("--batches", nargs="*", default=list(BATCHES))
    parser.add_argument("--reps", type=int, default=reps)
    parser.add_argument("--out", type=Path)
    return parser


def main() -> None:
    parser = shape_arguments(__doc__.splitlines()[0], reps=30)
    parser.add_argument("--configs", nargs="*", default=[], help="CUTLASS config names to sweep (default: all)")
    parser.add_argument("--fused-swiglu", action="store_true",
                        help="also time the stage with SwiGLU in GEMM1's epilogue (builds DEFAULT + SWIGLU configs)")
    args = parser.parse_args()
    device = torch.device("cuda")
    gen = torch.Generator().manual_seed(int(time.time()))  # fresh inputs every run
    ceil = ceilings(device)
    print(f"GPU {torch.cuda.get_device_name()}  copy {ceil['copy_gbps']:.0f} GB/s  matmul {ceil['mm_tflops']:.0f} TFLOP/s",
          flush=True)
    rows = [{"what": "ceilings", "gpu": torch.cuda.get_device_name(), **ceil}]
    for model in args.models:
        for batch in args.batches:
            t0 = time.time()
            res = bench_case(model, batch, device, gen, reps=args.reps, configs=args.configs,
                             fused_swiglu=args.fused_swiglu)
            rows.extend(res)
            for r in res:
                extra = f" {r.get('tflops', 0):6.1f} TFLOP/s {r.get('gbps', 0):6.0f} GB/s" if "tflops" in r else ""
                if "ms" in r:
                    print(f"{model:14s} {batch:7s} {r['what']:11s} {r['impl']:58s} {r['ms'] * 1e3:9.1f} us "
                          f"(±{r['spread_ms'] * 1e3:.1f}){extra}", flush=True)
                else:
                    print(f"{model:14s} {batch:7s} ERROR {r['impl']} {r['error']}", flush=True)
            print(f"  ({time.time() - t0:.0f} s, rows/block {res[0]['rows_per_block']:.1f})", flush=True)
            if args.out:
                with args.out.open("a") as f:
                    for r in res:
                        f.write(json.dumps(r) + "\n")
    if args.out:
        with args.out.open("a") as f:
            f.write(json.dumps(rows[0]) + "\n")


if __name__ == "__main__":
    main()
