"""FP8 expert stage on one GPU, beside the bf16 CUTLASS stage and torch._scaled_grouped_mm, in one run.

For each model shape (qwen3-30b-a3b, deepseek-v3) and batch (decode 128 / prefill 4096 tokens per
rank; 4 ranks, top-8, one rank's slots = experts / 4, uniform random routing) it draws fresh random
tokens and weights and times, eager and captured in a CUDA graph (CUDA events, median of --reps):

- ``bf16``: ``CutlassExpertStage`` (default kernels) on bf16 tokens and weights;
- ``fp8``: ``CutlassFp8ExpertStage`` (default kernels) on e4m3 tokens with one scale per token and 128
  channels (the FP8 dispatch's format, read in place) and 128x128 block-scaled e4m3 weights;
- ``fp8 per-row scale``: the same with one scale per token (the decode buffer's format today);
- ``torch fp8 rowwise``: ``torch._scaled_grouped_mm`` with rowwise scales (tokens per row, weights per
  output channel, requantised from the same weights), groups padded to 16 rows, the gather index
  computed once before timing (the most favourable form for it), SwiGLU and the per-row requantisation
  in torch ops; where ``torch._scaled_grouped_mm`` runs.

Every stage is checked first on sampled blocks with poisoned outputs (bf16 against the bf16 oracle,
FP8 against ``eep.reference.fp8``, 1e-2 relative Frobenius); the FP8 oracle's distance from the bf16
oracle on the same dequantised weights is printed as what FP8 activations cost. Ceilings measured in
the same run: device copy GB/s (read + write), dense 8192^3 matmul TFLOP/s in bf16 and in FP8 (rowwise
scales, and 1x128 x 128x128 blockwise where ``torch._scaled_mm`` takes it). TFLOP/s counts the live
rows; weight GB/s is the bytes of the rank's expert weights (+ scales) over the stage time.

    python perf/bench_fp8_experts.py --out /tmp/fp8.jsonl [--models deepseek-v3] [--batches decode]
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_expert_gemm import (ceilings, check, graph_ms, random_stage_inputs, sample_blocks,  # noqa: E402
                               shape_arguments, time_ms, worst_block_error)

from eep.fp8 import BLOCK, FP8_DTYPE, FP8_MAX, Fp8Weight, quantize_rows, quantize_weight  # noqa: E402
from eep.fused.gemm import ExpertStageShape  # noqa: E402
from eep.mlp import swiglu_rounded  # noqa: E402
from eep.reference.fp8 import swiglu_fp8  # noqa: E402


# ---- ceilings ----
def fp8_ceilings(device: torch.device) -> dict:
    """Copy and bf16 matmul ceilings (bench_expert_gemm) plus dense FP8 matmul TFLOP/s, 8192^3."""
    out = ceilings(device)
    n = 8192
    a = torch.randn(n, n, device=device).to(FP8_DTYPE)
    b = torch.randn(n, n, device=device).to(FP8_DTYPE)  # [N, K] row-major: b.t() is the column-major operand
    flops = 2 * n ** 3
    try:
        sa, sb = torch.ones(n, 1, device=device), torch.ones(1, n, device=device)
        ms, _ = time_ms(lambda: torch._scaled_mm(a, b.t(), sa, sb, out_dtype=torch.bfloat16), reps=10)
        out["fp8_rowwise_tflops"] = flops / ms / 1e9
    except Exception as exc:  # noqa: BLE001 - a ceiling torch cannot measure is reported, not fatal
        out["fp8_rowwise_error"] = repr(exc)[:200]
    try:  # 1x128 token scales (outer-dim-major, as cuBLAS wants them) x 128x128 weight scales
        sa = torch.ones(n // BLOCK, n, device=device).t()
        sb = torch.ones(n // BLOCK, n // BLOCK, device=device)
        ms, _ = time_ms(lambda: torch._scaled_mm(a, b.t(), sa, sb, out_dtype=torch.bfloat16), reps=10)
        out["fp8_blockwise_tflops"] = flops / ms / 1e9
    except Exception as exc:  # noqa: BLE001
        out["fp8_blockwise_error"] = repr(exc)[:200]
    return out


# ---- the torch._scaled_grouped_mm baseline ----
class TorchRowwiseFp8Stage:
    """The expert stage through ``torch._scaled_grouped_mm`` with rowwise scales, for timing beside ours.

    Built once per routing: the gather index (slot-major, each slot's rows padded to 16 as the kernel
    wants) and the group offsets are computed here, so a call does gather -> scaled grouped GEMM ->
    SwiGLU -> per-row requantisation -> scaled grouped GEMM -> scatter, with no host sync.
    """

    ALIGN = 16

    def __init__(self, shape: ExpertStageShape, counts: torch.Tensor, w13: Fp8Weight, w2: Fp8Weight):
        s = shape
        self.shape = s
        counts_cpu = counts.cpu().clamp(0, s.max_tokens_per_rank)
        src_rows, dst_rows, offs, total = [], [], [], 0
        for slot in range(s.slots_per_rank):
            for src in range(s.num_ranks):
                n = int(counts_cpu[slot, src])
                base = (slot * s.num_ranks + src) * s.max_tokens_per_rank
                src_rows.append(torch.arange(base, base + n))
                dst_rows.append(torch.arange(total, total + n))
                total += n
            total = -(-total // self.ALIGN) * self.ALIGN  # pad the group: filler rows gather row 0
            offs.append(total)
        device = counts.device
        self.rows = total
        self.gather = torch.zeros(total, dtype=torch.long)
        self.gather[torch.cat(dst_rows)] = torch.cat(src_rows)
        self.scatter_src = torch.cat(dst_rows).to(device)
        self.scatter_dst = torch.cat(src_rows).to(device)
        self.gather = self.gather.to(device)
        self.offs = torch.tensor(offs, dtype=torch.int32, device=device)
        # weights requantised per output channel from the block-scaled ones (what a rowwise kernel takes)
        self.w13, self.w13_scale = _rowwise_weight(w13)
        self.w2, self.w2_scale = _rowwise_weight(w2)
        self.out = torch.zeros(s.slots_per_rank, s.num_ranks, s.max_tokens_per_rank, s.hidden, dtype=torch.bfloat16,
                               device=device)

    def __call__(self, x: torch.Tensor, x_row_scale: torch.Tensor) -> torch.Tensor:
        s = self.shape
        xs = x.view(torch.uint8).reshape(-1, s.hidden)[self.gather].view(FP8_DTYPE)  # [rows, H] e4m3
        sa = x_row_scale.reshape(-1)[self.gather]                                  # [rows]
        h13 = torch._scaled_grouped_mm(xs, self.w13.transpose(1, 2), sa, self.w13_scale, offs=self.offs,
                                       out_dtype=torch.bfloat16)                   # [rows, 2I]
        h = F.silu(h13[:, :s.inter].float()) * h13[:, s.inter:].float()
        amax = h.abs().amax(-1, keepdim=True)
        hs = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))
        hq = (h / hs).to(FP8_DTYPE)
        y = torch._scaled_grouped_mm(hq, self.w2.transpose(1, 2), hs[:, 0], self.w2_scale, offs=self.offs,
                                     out_dtype=torch.bfloat16)                     # [rows, H]
        self.out.view(-1, s.hidden).index_copy_(0, self.scatter_dst, y[self.scatter_src])
        return self.out


def _rowwise_weight(w: Fp8Weight) -> tuple[torch.Tensor, torch.Tensor]:
    """``[G, N, K]`` block-scaled -> e4m3 ``[G, N, K]`` with one float32 scale per output channel ``[G, N]``."""
    parts, scales = [], []
    for g in range(w.weight.shape[0]):
        full = w[g].dequantize()
        amax = full.abs().amax(-1, keepdim=True)
        scale = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))
        parts.append((full / scale).to(FP8_DTYPE).view(torch.uint8))
        scales.append(scale[:, 0])
    return torch.stack(parts).view(FP8_DTYPE), torch.stack(scales)


def quantize_tokens(x: torch.Tensor, block: int = BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """e4m3 tokens in the receive layout with one scale per token and ``block`` channels (1x128: what the
    FP8 dispatch delivers), quantised slot by slot."""
    values = torch.empty(x.shape, dtype=FP8_DTYPE, device=x.device)
    scales = torch.empty(*x.shape[:3], x.shape[3] // block, dtype=torch.float32, device=x.device)
    for slot in range(x.shape[0]):
        values[slot], scales[slot] = quantize_rows(x[slot], block=block)
    return values, scales


def quantize_stack(w: torch.Tensor) -> Fp8Weight:
    """``quantize_weight`` one slot at a time (a whole deepseek-v3 stack at once would need tens of GB)."""
    parts = [quantize_weight(w[i]) for i in range(w.shape[0])]
    return Fp8Weight(torch.stack([p.weight.view(torch.uint8) for p in parts]).view(FP8_DTYPE),
                     torch.stack([p.scale for p in parts]))


# ---- one case ----
def fp8_check(name: str, y: torch.Tensor, values, scales, counts, w13: Fp8Weight, w2: Fp8Weight, inter: int,
              picks: list[tuple[int, int]], *, tol: float = 1e-2) -> float:
    """Worst relative error over sampled blocks against the FP8 oracle; raises on NaN or over ``tol``."""
    blocks = inter // BLOCK

    def reference(slot: int, src: int, n: int) -> torch.Tensor:
        gate = Fp8Weight(w13.weight[slot, :inter], w13.scale[slot, :blocks])
        up = Fp8Weight(w13.weight[slot, inter:], w13.scale[slot, blocks:])
        return swiglu_fp8(values[slot, src, :n], scales[slot, src, :n], gate, up, w2[slot])

    return worst_block_error(name, y, counts, picks, reference, tol=tol)


def sweep_variants(batch: str) -> list:
    """(grouping, kernel) pairs timed beside the default: both groupings with the kernel the
    default would pick for them, and at prefill the 128x128 tile without a cluster and the pingpong
    64x128 tile with and without one."""
    from eep.fused.gemm.build import GemmConfig

    variants = [("block", None), ("slot", None)]
    if batch == "prefill":
        for config in (GemmConfig(128, 128, 128, "coop", fp8=True), GemmConfig(64, 128, 128, "ping", fp8=True),
                       GemmConfig(64, 128, 128, "ping", fp8=True, cluster_n=2)):
            variants += [(g, config) for g in ("block", "slot")]
    return variants


def timed(fn, reps: int) -> dict:
    ms, spread = time_ms(fn, reps=reps)
    out = {"eager_ms": ms, "eager_spread_ms": spread}
    try:
        ms, spread = graph_ms(fn, reps=reps)
        out.update(graph_ms=ms, graph_spread_ms=spread)
    except Exception as exc:  # noqa: BLE001 - a stage that cannot be captured is reported eager-only
        out["graph_error"] = repr(exc)[:200]
    return out


def bench_case(model: str, batch: str, device, gen, *, reps: int) -> list[dict]:
    from eep.fused.gemm.cutlass_fp8_stage import CutlassFp8ExpertStage
    from eep.fused.gemm.cutlass_stage import CutlassExpertStage

    # bf16 tokens and weights: the bf16 stage's inputs and the source of the FP8 ones
    shape, counts, x, w13, w2 = random_stage_inputs(model, batch, device, gen)
    hidden, inter, slots, tokens = shape.hidden, shape.inter, shape.slots_per_rank, shape.max_tokens_per_rank
    rows = int(counts.sum())
    rows_per_block = rows / shape.num_groups
    base = {"model": model, "batch": batch, "tokens_per_rank": tokens, "rows": rows, "rows_per_block": rows_per_block,
            "gpu": torch.cuda.get_device_name()}
    flops = 2 * rows * 3 * hidden * inter
    picks = sample_blocks(counts.cpu(), gen, num=5)
    results = []

    def record(stage: str, t: dict, weight_nbytes: int, **extra) -> None:
        for mode in ("eager", "graph"):
            if f"{mode}_ms" in t:
                ms = t[f"{mode}_ms"]
                results.append({**base, "stage": stage, "mode": mode, "us": ms * 1e3,
                                "spread_us": t[f"{mode}_spread_ms"] * 1e3, "tflops": flops / ms / 1e9,
                                "weight_gbps": weight_nbytes / ms / 1e6, **extra})
        if "graph_error" in t:
            results.append({**base, "stage": stage, "mode": "graph", "error": t["graph_error"]})

    w13_q, w2_q = quantize_stack(w13), quantize_stack(w2)
    for slot in range(slots):  # the bf16 stage runs on the dequantised weights: both compute the same experts
        w13[slot].copy_(w13_q[slot].dequantize())
        w2[slot].copy_(w2_q[slot].dequantize())
    bf16_nbytes = 2 * (w13.numel() + w2.numel())
    fp8_nbytes = w13_q.nbytes + w2_q.nbytes
    try:
        stage = CutlassExpertStage(shape, device=device, expected_rows_per_group=rows_per_block)
        stage.out_buffer.fill_(float("nan"))
        err = check("bf16", stage(x, counts, w13, w2), x, counts, w13, w2, inter, gen)
        record("bf16", timed(lambda: stage(x, counts, w13, w2), reps), bf16_nbytes, impl=stage.describe(),
               rel_err=err)
    except Exception as exc:  # noqa: BLE001 - one failing stage must not hide the others' numbers
        results.append({**base, "stage": "bf16", "error": repr(exc)[:300]})
    stage = None
    torch.cuda.empty_cache()

    # FP8 tokens as the FP8 dispatch sends them (1x128 scales), quantised slot by slot
    values, scales = quantize_tokens(x)
    row_values, row_scale = quantize_tokens(x, block=hidden)
    row_scale = row_scale[..., 0]
    accuracy = []
    for slot, src in picks:  # what FP8 activations cost: FP8 oracle vs bf16 oracle, same dequantised weights
        n = int(counts[slot, src])
        gate, up = (Fp8Weight(w13_q.weight[slot, a:b], w13_q.scale[slot, a // BLOCK:b // BLOCK])
                    for a, b in ((0, inter), (inter, 2 * inter)))
        fp8 = swiglu_fp8(values[slot, src, :n], scales[slot, src, :n], gate, up, w2_q[slot]).double()
        ref = swiglu_rounded(x[slot, src, :n], gate.dequantize(), up.dequantize(), w2_q[slot].dequantize()).double()
        accuracy.append(float((fp8 - ref).norm() / ref.norm()))
    results.append({**base, "stage": "accuracy", "fp8_vs_bf16_oracle": max(accuracy)})
    del x, w13, w2
    torch.cuda.empty_cache()

    for label, vals, scl in (("fp8", values, scales), ("fp8 per-row scale", row_values, row_scale)):
        try:
            stage = CutlassFp8ExpertStage(shape, device=device, expected_rows_per_group=rows_per_block)
            stage.out_buffer.fill_(float("nan"))
            y = stage(vals, scl, counts, w13_q, w2_q)
            err = fp8_check(label, y, vals, scl, counts, w13_q, w2_q, inter, picks)
            if stage.error_flags():
                raise AssertionError(f"{label}: setup raised error flags {stage.error_flags()}")
            record(label, timed(lambda: stage(vals, scl, counts, w13_q, w2_q), reps), fp8_nbytes,
                   impl=stage.describe(), rel_err=err, scales_in_place=stage.scales_in_place)
        except Exception as exc:  # noqa: BLE001
            results.append({**base, "stage": label, "error": repr(exc)[:300]})
        stage = None
        torch.cuda.empty_cache()
    for grouping, config in sweep_variants(batch):  # the other choices the defaults were made from, eager only
        try:
            stage = CutlassFp8ExpertStage(shape, device=device, grouping=grouping, gemm1=config, gemm2=config,
                                          expected_rows_per_group=rows_per_block)
            stage.out_buffer.fill_(float("nan"))
            err = fp8_check("fp8 sweep", stage(values, scales, counts, w13_q, w2_q), values, scales, counts, w13_q,
                            w2_q, inter, picks)
            ms, spread = time_ms(lambda: stage(values, scales, counts, w13_q, w2_q), reps=reps)
            record(f"fp8 sweep {stage.describe()}", {"eager_ms": ms, "eager_spread_ms": spread}, fp8_nbytes,
                   impl=stage.describe(), rel_err=err)
        except Exception as exc:  # noqa: BLE001
            results.append({**base, "stage": f"fp8 sweep {grouping} {config}", "error": repr(exc)[:300]})
        stage = None
        torch.cuda.empty_cache()
    del values, scales

    if hasattr(torch, "_scaled_grouped_mm"):
        try:
            stage = TorchRowwiseFp8Stage(shape, counts, w13_q, w2_q)
            stage.out.fill_(float("nan"))
            y = stage(row_values, row_scale)
            # its weights are quantised a second time (per channel): only loosely the FP8 oracle's experts
            err = fp8_check("torch fp8 rowwise", y, row_values, row_scale, counts, w13_q, w2_q, inter, picks, tol=0.1)
            record("torch fp8 rowwise", timed(lambda: stage(row_values, row_scale), reps), fp8_nbytes,
                   impl=f"torch._scaled_grouped_mm[{stage.rows} rows padded to {stage.ALIGN}]", rel_err=err)
        except Exception as exc:  # noqa: BLE001
            results.append({**base, "stage": "torch fp8 rowwise", "error": repr(exc)[:300]})
        stage = None
    else:
        results.append({**base, "stage": "torch fp8 rowwise", "error": "torch has no _scaled_grouped_mm"})
    del row_values, row_scale, w13_q, w2_q
    torch.cuda.empty_cache()
    return results


def summarise(rows: list[dict], ceil: dict) -> list[str]:
    """One line per (case, mode): each stage's time, TFLOP/s, weight GB/s, and the FP8 speedups."""
    lines = []
    cases = sorted({(r["model"], r["batch"]) for r in rows if "model" in r}, key=lambda c: (c[0], c[1] != "decode"))
    for model, batch in cases:
        case = [r for r in rows if r.get("model") == model and r.get("batch") == batch]
        acc = next((r["fp8_vs_bf16_oracle"] for r in case if r["stage"] == "accuracy"), float("nan"))
        for mode in ("eager", "graph"):
            by = {r["stage"]: r for r in case if r.get("mode") == mode and "us" in r}
            parts = []
            for name in ("bf16", "fp8", "fp8 per-row scale", "torch fp8 rowwise"):
                r = by.get(name)
                if r:
                    parts.append(f"{name} {r['us']:8.1f} us {r['tflops']:6.1f} TFLOP/s {r['weight_gbps']:6.0f} GB/s")
            fp8 = by.get("fp8")
            speed = []
            for other in ("bf16", "torch fp8 rowwise"):
                if fp8 and other in by:
                    speed.append(f"fp8 vs {other} {by[other]['us'] / fp8['us']:.2f}x")
            lines.append(f"{model:14s} {batch:7s} {mode:5s} | " + " | ".join(parts) + " || " + ", ".join(speed)
                         + (f" || fp8-vs-bf16 oracle {acc:.4f}" if mode == "eager" else ""))
        for r in case:
            if r["stage"].startswith("fp8 sweep") and "us" in r:
                lines.append(f"{model:14s} {batch:7s} eager | {r['stage']} {r['us']:8.1f} us {r['tflops']:6.1f} TFLOP/s")
        for r in case:
            if "error" in r:
                lines.append(f"{model:14s} {batch:7s} ERROR {r['stage']} {r.get('mode', '')}: {r['error']}")
    return lines


def main() -> None:
    parser = shape_arguments(__doc__.splitlines()[0], reps=20)
    args = parser.parse_args()
    device = torch.device("cuda")
    gen = torch.Generator().manual_seed(int(time.time()))  # fresh inputs every run
    ceil = fp8_ceilings(device)
    print(f"GPU {torch.cuda.get_device_name()} torch {torch.__version__}  copy {ceil['copy_gbps']:.0f} GB/s  bf16 "
          f"matmul {ceil['mm_tflops']:.0f} TFLOP/s  fp8 rowwise {ceil.get('fp8_rowwise_tflops', float('nan')):.0f}  "
          f"fp8 blockwise {ceil.get('fp8_blockwise_tflops', float('nan')):.0f} TFLOP/s", flush=True)
    for key in ("fp8_rowwise_error", "fp8_blockwise_error"):
        if key in ceil:
            print(f"  ceiling {key}: {ceil[key]}", flush=True)
    rows: list[dict] = [{"what": "ceilings", "gpu": torch.cuda.get_device_name(), **ceil}]
    for model in args.models:
        for batch in args.batches:
            t0 = time.time()
            try:
                res = bench_case(model, batch, device, gen, reps=args.reps)
            except Exception as exc:  # noqa: BLE001 - the other cases still run
                res = [{"model": model, "batch": batch, "stage": "case", "error": repr(exc)[:300]}]
            rows.extend(res)
            for line in summarise(res, ceil):
                print(line, flush=True)
            print(f"  ({time.time() - t0:.0f} s)", flush=True)
            if args.out:
                with args.out.open("a") as f:
                    for r in res:
                        f.write(json.dumps(r) + "\n")
            torch.cuda.empty_cache()
    if args.out:
        with args.out.open("a") as f:
            f.write(json.dumps(rows[0]) + "\n")
    print("SUMMARY", flush=True)
    for line in summarise(rows[1:], ceil):
        print(line, flush=True)
    for r in rows[1:]:
        if "us" in r:
            fp8 = r["stage"].startswith("fp8") or r["stage"].startswith("torch fp8")
            mm = ceil.get("fp8_blockwise_tflops" if r["stage"].startswith("fp8") else "fp8_rowwise_tflops") \
                if fp8 else ceil.get("mm_tflops")
            r["pct_matmul_ceiling"] = 100 * r["tflops"] / mm if mm else None
            r["pct_copy_ceiling"] = 100 * r["weight_gbps"] / ceil["copy_gbps"]
    print("CEILINGS (% of the same run's dense matmul / copy): " + "; ".join(
        f"{r['model']} {r['batch']} {r['stage']} {r['mode']} {r['pct_matmul_ceiling'] or 0:.0f}% / "
        f"{r['pct_copy_ceiling']:.0f}%" for r in rows[1:] if "us" in r), flush=True)


if __name__ == "__main__":
    main()
