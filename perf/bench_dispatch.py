"""Decode dispatch/combine microbenchmark: eep fused (membership-aware and fixed) vs NCCL.

    python perf/bench_dispatch.py --num-ranks 4 --model deepseek-v3 [--profile DIR] [--out FILE]

Starts one process per GPU (subprocesses; a TCPStore hosted here). Every rank sends
``tokens`` tokens with top-8 routing, uniform over all experts, one replica each. Timed with CUDA
events around CUDA-graph replays of ``iters`` steps; membership-aware and fixed graphs are
replayed alternately ``rounds`` times and the medians compared, so the ratio is measured side by
side. NCCL baseline: ``all_to_all_single`` of every top-k copy (``[tokens * top_k, hidden]`` bf16,
equal splits), one direction, as DeepEP's and the issue's NCCL numbers count it. With
``--with-symm-mem`` also ``torch.ops.symm_mem.all_to_all_vdev_2d`` of the same top-k rows
(``perf/bench_prefill.symm_mem_baseline``; NVSHMEM), one direction.

``--decode-variant pull`` also builds a second buffer with the experimental decode kernels
(``FusedBuffer(decode="pull")``, docs/fused.md "Decode: where the time goes") and times, in the
same rounds as the default kernels: ``pull_both`` (experts' outputs already in ``combine_input()``,
the intended use), ``pull_copy_both`` (``y`` = ``recv.x``, so combine first stages the rows) and
``pull_dispatch`` (with ``--fp8``: the grid-wide quantize).
Always also timed: ``empty_*``, the default kernels with every copy NO_EXPERT (no rows move), i.e.
each direction's fixed cost (launch, layout, fences, flag round trip, count publication).
"""

from __future__ import annotations

import json
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from ep_bench import MODELS, ROOT, ep_arguments, rank_setup, run  # noqa: E402

sys.path.insert(0, ROOT)


def worker(args) -> None:
    import torch
    import torch.distributed as dist

    from eep.fused.buffer import FusedBuffer
    from eep.fused.compile import KernelVariant, LoadedKernels
    from eep.routing.route import route_to_phys

    rank, R = args.rank, args.num_ranks
    dev, store = rank_setup(args)
    hidden, num_experts = MODELS[args.model]
    S, T, K = num_experts // R, args.tokens, args.top_k
    M = max(T, args.max_tokens or T)  # receive capacity per (slot, source); > T spreads rows out
    # one buffer for both variants: the fixed-membership kernels are launched on the same memory,
    # so the ratio compares kernels alone (not two allocations)
    elastic = FusedBuffer(rank, R, slots_per_rank=S, max_tokens_per_rank=M, hidden=hidden, top_k=K, store=store,
                          group="bench", timeout_s=5.0, device=rank, use_fp8=args.fp8)
    bufs = {"elastic": elastic, "fixed": elastic}
    kernels = {"elastic": elastic.kernels,
               "fixed": LoadedKernels.get(KernelVariant(hidden, True, elastic.kernels_variant.vec_per_lane,
                                                        use_fp8=args.fp8), rank)}
    g = torch.Generator(device=dev).manual_seed(rank + 1)
    x = torch.randn(T, hidden, device=dev, generator=g).to(torch.bfloat16)
    ids = torch.rand(T, num_experts, device=dev, generator=g).topk(K, dim=-1).indices
    w = torch.softmax(torch.randn(T, K, device=dev, generator=g), -1)
    l2p = torch.arange(num_experts, device=dev).view(-1, 1)
    phys = route_to_phys(ids, l2p, torch.ones(R, dtype=torch.int32, device=dev), S)
    variant = args.decode_variant
    if variant != "push":  # its own allocation (its combine reads peers' combine_input regions)
        bufs[variant] = FusedBuffer(rank, R, slots_per_rank=S, max_tokens_per_rank=M, hidden=hidden, top_k=K,
                                    store=store, group=f"bench-{variant}", timeout_s=5.0, device=rank,
                                    use_fp8=args.fp8, decode=variant)
        bufs[f"{variant}-copy"] = bufs[variant]
        kernels[variant] = kernels[f"{variant}-copy"] = bufs[variant].kernels
    outs = {n: torch.empty(T, hidden, dtype=torch.bfloat16, device=dev) for n in bufs}

    # combine takes bf16 expert outputs; with FP8 dispatch recv.x is e4m3, so combine a bf16 stand-in
    y_fp8_case = torch.randn(S, R, M, hidden, device=dev).to(torch.bfloat16) if args.fp8 else None

    phys_empty = torch.full_like(phys, -1)  # every copy NO_EXPERT: what a step costs moving no rows

    def step(buf, out, *, with_combine=True, in_place=False, empty=False):
        recv, handle = buf.dispatch(x, phys_empty if empty else phys)
        if with_combine:  # in_place: the experts wrote their outputs into combine_input() (pull variant)
            y = buf.combine_input() if in_place else (recv.x if y_fp8_case is None else y_fp8_case)
            buf.combine(y, handle, w, out=out)

    graphs = {}
    torch.cuda.synchronize()

    def capture(buf, out, mode, in_place=False, empty=False):
        dist.barrier()
        step(buf, out, with_combine=(mode == "both"), in_place=in_place, empty=empty)  # warm-up, all ranks
        torch.cuda.synchronize()
        gr = torch.cuda.CUDAGraph()
        with torch.cuda.graph(gr):
            for _ in range(args.iters):
                step(buf, out, with_combine=(mode == "both"), in_place=in_place, empty=empty)
        return gr

    for name, buf in bufs.items():
        buf.kernels = kernels[name]
        for mode in (("both",) if name.endswith("-copy") else ("both", "dispatch")):
            in_place = name == variant and variant != "push"
            graphs[(name, mode)] = capture(buf, outs[name], mode, in_place)
    elastic.kernels = kernels["elastic"]
    # the fixed cost of each kernel (launch, layout, fences, flag round trip, tails): no rows move
    for mode in ("both", "dispatch"):
        graphs[("elastic-empty", mode)] = capture(elastic, outs["elastic"], mode, empty=True)
    # launch-shape sweep of the membership-aware kernels (vectors per lane x grid size)
    sweep = {}
    if args.sweep:
        sm = bufs["elastic"].num_blocks
        extra = FusedBuffer(rank, R, slots_per_rank=S, max_tokens_per_rank=M, hidden=hidden, top_k=K, store=store,
                            group="bench-v8", timeout_s=5.0, device=rank, vec_per_lane=8, use_fp8=args.fp8)
        bufs["v8"] = extra
        for vec, buf in ((4, bufs["elastic"]), (8, extra)):
            for blocks in (sm // 2, sm, 2 * sm):
                if (vec, blocks) == (4, sm):
                    continue
                buf.num_blocks = blocks
                sweep[f"sweep_v{vec}_b{blocks}"] = capture(buf, outs["elastic"], "both")
            buf.num_blocks = sm
    send = torch.randn(T * K, hidden, device=dev).to(torch.bfloat16)
    recv_buf = torch.empty_like(send)

    def time_graph(gr) -> float:
        dist.barrier()
        torch.cuda.synchronize()
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        gr.replay()
        b.record()
        b.synchronize()
        return a.elapsed_time(b) * 1e3 / args.iters  # us per step

    def time_nccl() -> float:
        dist.barrier()
        torch.cuda.synchronize()
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        for _ in range(args.iters):
            dist.all_to_all_single(recv_buf, send)
        b.record()
        b.synchronize()
        return a.elapsed_time(b) * 1e3 / args.iters

    for gr in graphs.values():  # warm
        time_graph(gr)
    time_nccl()
    symm = {"error": "not requested (--with-symm-mem)"}
    if args.with_symm_mem:  # one copy per (token, choice), expert-major: the same rows as the top-k dispatch
        from bench_prefill import symm_mem_baseline
        symm = symm_mem_baseline(args, dist, torch, dev, x, ids, S, num_experts)
    samples = {k: [] for k in ("elastic_both", "fixed_both", "elastic_both_again", "elastic_dispatch",
                               "fixed_dispatch", "nccl_a2a", *sweep, *(["symm_mem_a2a"] if symm.get("run") else []))}
    for _ in range(args.rounds):
        for name in ("elastic", "fixed"):
            samples[f"{name}_both"].append(time_graph(graphs[(name, "both")]))
            samples[f"{name}_dispatch"].append(time_graph(graphs[(name, "dispatch")]))
        samples["elastic_both_again"].append(time_graph(graphs[("elastic", "both")]))  # A/A: the noise
        for mode in ("both", "dispatch"):
            samples.setdefault(f"empty_{mode}", []).append(time_graph(graphs[("elastic-empty", mode)]))
        samples["nccl_a2a"].append(time_nccl())
        if symm.get("run"):
            samples["symm_mem_a2a"].append(symm["run"]() * 1e6)  # seconds -> us per step
        for key, gr in sweep.items():
            samples[key].append(time_graph(gr))
        if variant != "push":  # the experimental decode kernels, in the same round
            for name, mode in ((variant, "both"), (variant, "dispatch"), (f"{variant}-copy", "both")):
                samples.setdefault(f"{name.replace('-', '_')}_{mode}", []).append(time_graph(graphs[(name, mode)]))
    if args.profile:
        from torch.profiler import ProfilerActivity, profile, tensorboard_trace_handler
        os.makedirs(args.profile, exist_ok=True)
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA],
                     on_trace_ready=tensorboard_trace_handler(args.profile, worker_name=f"{args.model}-R{R}-rank{rank}")):
            for name in ("elastic", "fixed", *([variant] if variant != "push" else [])):
                time_graph(graphs[(name, "both")])
            time_nccl()
    med = {k: statistics.median(v) for k, v in samples.items()}
    # the slowest rank decides a step: report the max over ranks of each median
    gathered = [None] * R
    dist.all_gather_object(gathered, med)
    status = bufs["elastic"].status()
    variant_misses = bufs[variant].status().miss_count if variant != "push" else None
    if rank == 0:
        worst = {k: max(m[k] for m in gathered) for k in med}
        worst["elastic_combine"] = worst["elastic_both"] - worst["elastic_dispatch"]
        worst["fixed_combine"] = worst["fixed_both"] - worst["fixed_dispatch"]
        worst["empty_combine"] = worst["empty_both"] - worst["empty_dispatch"]
        worst["ratio_elastic_over_fixed"] = worst["elastic_both"] / worst["fixed_both"]
        worst["ratio_elastic_again_over_elastic"] = worst["elastic_both_again"] / worst["elastic_both"]
        if variant != "push":
            worst[f"{variant}_combine"] = worst[f"{variant}_both"] - worst[f"{variant}_dispatch"]
            worst[f"{variant}_copy_combine"] = worst[f"{variant}_copy_both"] - worst[f"{variant}_dispatch"]
            worst[f"ratio_{variant}_over_elastic"] = worst[f"{variant}_both"] / worst["elastic_both"]
        row = {"model": args.model, "num_ranks": R, "tokens": T, "max_tokens_per_rank": M, "top_k": K, "hidden": hidden,
               "dispatch_dtype": "fp8-e4m3+per-token-scale" if args.fp8 else "bf16",
               "gpu": torch.cuda.get_device_name(dev), "iters": args.iters, "rounds": args.rounds,
               "decode_variant": variant,
               "us": worst, "per_rank_elastic_both": [m["elastic_both"] for m in gathered],
               "misses": status.miss_count, "misses_variant": variant_misses,
               "symm_mem": {k: v for k, v in symm.items() if k != "run"}}
        print("RESULT " + json.dumps(row), flush=True)
        if args.out:
            with open(args.out, "a") as f:
                f.write(json.dumps(row) + "\n")
    dist.barrier()
    for buf in {id(b): b for b in bufs.values()}.values():
        buf.close()
    dist.destroy_process_group()


def main() -> int:
    p = ep_arguments(__doc__, tokens=128, iters=50, rounds=7)
    p.add_argument("--max-tokens", type=int, default=None, help="receive capacity per rank (default: --tokens)")
    p.add_argument("--fp8", action="store_true", help="FP8 dispatch (per-token scales); combine stays bf16")
    p.add_argument("--sweep", action="store_true", help="also time other grid sizes and vectors per lane")
    p.add_argument("--decode-variant", default="push", choices=("push", "pull"),
                   help="also time this experimental decode path (FusedBuffer(decode=...)) beside the default")
    return run(__file__, p.parse_args(), worker)


if __name__ == "__main__":
    sys.exit(main())
