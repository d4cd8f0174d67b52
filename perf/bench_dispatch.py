"""Decode dispatch/combine microbenchmark: eep's fused kernel sets side by side (membership-aware and
fixed), each with its fixed cost and an A/A repeat, against NCCL.

    python perf/bench_dispatch.py --num-ranks 1 --model deepseek-v3 [--fp8] [--kernels v1,v2,v2-pdl] [--out DIR]

Starts one process per GPU (subprocesses; a TCPStore hosted here); ``--num-ranks 1`` is one process on
one GPU (every copy is a local one: what the kernels cost besides NVLink). Every rank sends ``tokens``
tokens with top-8 routing, uniform over all experts, one replica each. Each kernel set (``--kernels``,
``FusedBuffer(kernels=...)``; ``v2-pdl``: v2 launched with ``pdl=True``) gets its own buffer; for each set, CUDA graphs of ``iters`` steps are
captured for:
- ``aware``: the membership-aware kernels (the default build), dispatch + combine (``both``) and
  dispatch alone; ``aware_both_again`` replays the same graph a second time in the same round (A/A,
  same graph); ``aware_both_recaptured`` is a second capture of the same step (A/A across graphs:
  two captures of one step differ by more than two replays of one graph, and aware/fixed compares two
  captures, so this is the noise floor of that ratio);
- ``fixed``: the fixed-membership kernels (every mask read compiled out) on the same buffer, also
  captured twice; "both aware" and "both fixed" are the mean of their two captures' medians;
- ``aware2``: the aware cubin loaded a second time as its own module (the same code at other
  addresses), captured once: aware2/aware ("A/A new module") is the noise floor of aware/fixed, which
  compares two modules;
- ``empty``: the aware kernels with every copy NO_EXPERT: no row moves, so this is each direction's
  fixed cost (launches, routing-table pass, flags, counts).
combine = both - dispatch. Combine takes bf16 expert outputs: ``recv.x`` itself for bf16 dispatch, a
separate random bf16 tensor for FP8 dispatch (recv.x is e4m3 there). All graphs of all sets are
replayed in turn in each of ``rounds`` rounds; times are CUDA events around the second of two
back-to-back replays (``ep_bench.time_replay``: steady state), divided by ``iters``; the median over
rounds of the slowest rank is reported. NCCL: ``all_to_all_single`` of every
top-k copy (``[tokens * top_k, hidden]`` bf16, equal splits), one direction. With ``--with-symm-mem``
also ``torch.ops.symm_mem.all_to_all_vdev_2d`` of the same rows (NVSHMEM), one direction.
``--decode-variant pull`` adds v1's experimental pull path (``FusedBuffer(decode="pull")``) as the set
``v1-pull`` (``aware_both``: experts' outputs already in ``combine_input()``; ``copy_both``: combine
first stages ``recv.x``). ``--sweep`` adds v1 with other grid sizes and 8 vectors per lane.
Output: one table (every set, every row) and one JSON file per run in ``--out``.
"""

from __future__ import annotations

import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from ep_bench import (MODELS, ROOT, ep_arguments, kernel_sets, print_table, rank_setup, run,  # noqa: E402
                      set_options, time_calls, time_replay, working_sets, write_result)

sys.path.insert(0, ROOT)


def worker(args) -> None:
    import torch
    import torch.distributed as dist

    from eep.fused.buffer import FusedBuffer
    from eep.fused.compile import KernelVariant, LoadedKernels, cached_cubin, device_arch
    from eep.routing.route import route_to_phys

    rank, R = args.rank, args.num_ranks
    dev, store = rank_setup(args)
    hidden, num_experts = MODELS[args.model]
    S, T, K = num_experts // R, args.tokens, args.top_k
    M = max(T, args.max_tokens or T)  # receive capacity per (slot, source); > T spreads rows out
    sets = kernel_sets(args.kernels, launch_variants=True)

    def make(group: str, **kw) -> FusedBuffer:
        return FusedBuffer(rank, R, slots_per_rank=S, max_tokens_per_rank=M, hidden=hidden, top_k=K, store=store,
                           group=group, timeout_s=5.0, device=rank, use_fp8=args.fp8, **kw)

    # one buffer per kernel set; the fixed-membership kernels run on the same memory as the aware ones
    bufs = {k: make(f"bench-{k}", **set_options(k)) for k in sets}
    kernels = {}
    for k in sets:
        kernels[(k, "aware")] = bufs[k].kernels
        kernels[(k, "fixed")] = LoadedKernels.get(KernelVariant(hidden, True, bufs[k].kernels_variant.vec_per_lane,
                                                                use_fp8=args.fp8, kernels=bufs[k].kernel_set),
                                                  rank)
        # the aware cubin loaded a second time, as its own module (its code at other addresses): aware
        # over aware2 is the noise floor of aware/fixed, which compares two modules
        variant = bufs[k].kernels_variant
        kernels[(k, "aware2")] = LoadedKernels(cached_cubin(variant, device_arch(rank)), variant.kernel_names())
    pull = args.decode_variant != "push"
    if pull:  # v1's experimental pull path: its own allocation (its combine reads peers' combine_input)
        bufs["v1-pull"] = make("bench-v1-pull", decode=args.decode_variant, kernels="v1")
        kernels[("v1-pull", "aware")] = bufs["v1-pull"].kernels
    g = torch.Generator(device=dev).manual_seed(rank + 1)
    x = torch.randn(T, hidden, device=dev, generator=g).to(torch.bfloat16)
    ids = torch.rand(T, num_experts, device=dev, generator=g).topk(K, dim=-1).indices
    w = torch.softmax(torch.randn(T, K, device=dev, generator=g), -1)
    l2p = torch.arange(num_experts, device=dev).view(-1, 1)
    phys = route_to_phys(ids, l2p, torch.ones(R, dtype=torch.int32, device=dev), S)
    phys_empty = torch.full_like(phys, -1)  # every copy NO_EXPERT: what a step costs moving no rows
    # combine takes bf16 expert outputs; with FP8 dispatch recv.x is e4m3, so combine a bf16 stand-in
    y_fp8_case = torch.randn(S, R, M, hidden, device=dev).to(torch.bfloat16) if args.fp8 else None
    out = torch.empty(T, hidden, dtype=torch.bfloat16, device=dev)

    def step(buf, *, combine: bool, empty: bool = False, in_place: bool = False) -> None:
        recv, handle = buf.dispatch(x, phys_empty if empty else phys)
        if combine:  # in_place: the experts wrote their outputs into combine_input() (v1 pull)
            y = buf.combine_input() if in_place else (recv.x if y_fp8_case is None else y_fp8_case)
            buf.combine(y, handle, w, out=out)

    def capture(buf, kern, mode: str, **kw):
        buf.kernels = kern
        dist.barrier()
        step(buf, combine=mode == "both", **kw)  # warm-up, all ranks
        torch.cuda.synchronize()
        gr = torch.cuda.CUDAGraph()
        with torch.cuda.graph(gr):
            for _ in range(args.iters):
                step(buf, combine=mode == "both", **kw)
        return gr

    def warm(k: str) -> None:
        bufs[k].kernels = kernels[(k, "aware")]
        step(bufs[k], combine=True)

    sets, broken = working_sets(torch, dist, sets, bufs, warm)
    if broken and rank == 0:
        print(f"NOT TIMED: kernel set(s) {broken} missed a deadline or failed in an eager step", flush=True)
    if not sets:
        raise RuntimeError(f"every kernel set missed a deadline in an eager step: {broken}")
    graphs = {}  # key "<set>.<membership>_<mode>" -> graph
    for k in sets:
        for mode in ("both", "dispatch"):
            graphs[f"{k}.aware_{mode}"] = capture(bufs[k], kernels[(k, "aware")], mode)
            graphs[f"{k}.fixed_{mode}"] = capture(bufs[k], kernels[(k, "fixed")], mode)
            graphs[f"{k}.empty_{mode}"] = capture(bufs[k], kernels[(k, "aware")], mode, empty=True)
        for m in ("aware", "fixed"):
            graphs[f"{k}.{m}_both_recaptured"] = capture(bufs[k], kernels[(k, m)], "both")
        graphs[f"{k}.aware2_both"] = capture(bufs[k], kernels[(k, "aware2")], "both")
        bufs[k].kernels = kernels[(k, "aware")]
    if pull:
        pb = bufs["v1-pull"]
        graphs["v1-pull.aware_both"] = capture(pb, pb.kernels, "both", in_place=True)
        graphs["v1-pull.aware_dispatch"] = capture(pb, pb.kernels, "dispatch")
        graphs["v1-pull.copy_both"] = capture(pb, pb.kernels, "both")
    if args.sweep:  # launch shape of v1's aware kernels: vectors per lane x grid size
        sm = bufs[sets[0]].num_blocks
        extra = make("bench-v8", vec_per_lane=8, **set_options(sets[0]))
        bufs["v8"] = extra
        for vec, buf in ((4, bufs[sets[0]]), (8, extra)):
            for blocks in (sm // 2, sm, 2 * sm):
                if (vec, blocks) != (4, sm):
                    buf.num_blocks = blocks
                    graphs[f"sweep.v{vec}_b{blocks}"] = capture(buf, buf.kernels, "both")
            buf.num_blocks = sm
    send = torch.randn(T * K, hidden, device=dev).to(torch.bfloat16)
    recv_buf = torch.empty_like(send)

    def time_nccl() -> float:
        return time_calls(torch, lambda: dist.all_to_all_single(recv_buf, send), args.iters, dist)

    symm = {"error": "not requested (--with-symm-mem)"}
    if args.with_symm_mem:  # one copy per (token, choice), expert-major: the same rows as the top-k dispatch
        from bench_prefill import symm_mem_baseline
        symm = symm_mem_baseline(args, dist, torch, dev, x, ids, S, num_experts)
    for gr in graphs.values():  # warm
        time_replay(torch, dist, gr, args.iters)
    time_nccl()
    samples: dict[str, list[float]] = {}

    def sample(key: str, seconds: float) -> None:
        samples.setdefault(key, []).append(seconds * 1e6)  # us per step

    for _ in range(args.rounds):
        for k in sets:  # the same order every round; the A/A repeat as far from its first timing as fixed is
            for key in ("aware_both", "aware_dispatch", "fixed_both", "fixed_dispatch", "aware_both_again",
                        "aware_both_recaptured", "fixed_both_recaptured", "aware2_both", "empty_both",
                        "empty_dispatch"):
                sample(f"{k}.{key}", time_replay(torch, dist, graphs[f"{k}.{key.replace('_again', '')}"], args.iters))
        for key, gr in graphs.items():
            if key.startswith(("v1-pull.", "sweep.")):
                sample(key, time_replay(torch, dist, gr, args.iters))
        sample("nccl_a2a", time_nccl())
        if symm.get("run"):
            sample("symm_mem_a2a", symm["run"]())
    if args.profile:
        from torch.profiler import ProfilerActivity, profile, tensorboard_trace_handler
        os.makedirs(args.profile, exist_ok=True)
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA],
                     on_trace_ready=tensorboard_trace_handler(args.profile, worker_name=f"{args.model}-R{R}-rank{rank}")):
            for k in sets:
                time_replay(torch, dist, graphs[f"{k}.aware_both"], args.iters)
            time_nccl()
    med = {key: statistics.median(v) for key, v in samples.items()}
    gathered = [None] * R
    dist.all_gather_object(gathered, med)  # the slowest rank decides a step: max over ranks of each median
    misses = {k: buf.status().miss_count for k, buf in bufs.items() if k != "v8"}
    if rank == 0:
        dtype = "fp8-e4m3+per-token-scale" if args.fp8 else "bf16"
        gpu = torch.cuda.get_device_name(dev)
        us, ratios, rows = summarize(gathered, sets)
        row = {"model": args.model, "num_ranks": R, "tokens": T, "max_tokens_per_rank": M, "top_k": K,
               "hidden": hidden, "dispatch_dtype": dtype, "gpu": gpu, "iters": args.iters, "rounds": args.rounds,
               "kernel_sets": sets, "not_timed_missed_deadlines": broken, "us": us, "ratios": ratios,
               "per_rank_aware_both": {k: [m[f"{k}.aware_both"] for m in gathered] for k in sets},
               "misses": misses, "symm_mem": {k: v for k, v in symm.items() if k != "run"}}
        print_table(f"{args.model}, {dtype} dispatch, {R} rank(s), {T} tokens/rank, top-{K}, {gpu}, grid "
                    f"{bufs[sets[0]].num_blocks} blocks: us per step (CUDA-graph replay of {args.iters} steps, the "
                    f"second of two back to back, median of {args.rounds} rounds, slowest rank); "
                    f"NCCL all_to_all_single one way {us['baseline']['nccl_a2a']} us", TABLE_HEADER, rows)
        for name, r in ratios.items():
            print(f"{name}: " + ", ".join(f"{m} {v}" for m, v in r.items()), flush=True)
        write_result(args.out, f"dispatch-{args.model}-{'fp8' if args.fp8 else 'bf16'}-R{R}-T{T}", row)
    dist.barrier()
    for buf in bufs.values():
        buf.close()
    dist.destroy_process_group()


TABLE_HEADER = ["kernels", "both aware", "both fixed", "aware/fixed", "A/A", "A/A new graph", "A/A new module",
                "dispatch", "combine", "empty both", "empty dispatch", "dispatch fixed"]


def summarize(gathered: list[dict[str, float]], sets: list[str]) -> tuple[dict, dict, list[list]]:
    """Per-rank medians (us, keyed ``<set>.<name>``, plus baselines) -> the slowest rank's times by set
    with combine = both - dispatch and the ratios, the ratios of each set over the first, and the
    table rows (every set; v1-pull and sweep rows when timed)."""
    worst = {key: max(m[key] for m in gathered) for key in gathered[0]}
    us: dict[str, dict[str, float]] = {}
    for key, value in worst.items():
        group, _, name = key.rpartition(".")
        us.setdefault(group or "baseline", {})[name] = round(value, 3)
    for k in sets:
        t = us[k]
        t["aa"] = round(t["aware_both_again"] / t["aware_both"], 4)
        t["aa_recaptured"] = round(t["aware_both_recaptured"] / t["aware_both"], 4)
        t["aa_module"] = round(t["aware2_both"] / t["aware_both"], 4)
        for m in ("aware", "fixed"):  # the mean of the two captures
            t[f"{m}_both_first_capture"] = t[f"{m}_both"]
            t[f"{m}_both"] = round((t[f"{m}_both"] + t[f"{m}_both_recaptured"]) / 2, 3)
        for m in ("aware", "fixed", "empty"):
            t[f"{m}_combine"] = round(t[f"{m}_both"] - t[f"{m}_dispatch"], 3)
        t["aware_over_fixed"] = round(t["aware_both"] / t["fixed_both"], 4)
    ratios = {f"{k}_over_{sets[0]}": {m: round(us[k][m] / us[sets[0]][m], 4)
                                      for m in ("aware_both", "aware_dispatch", "aware_combine", "empty_both")}
              for k in sets[1:]}
    rows = [[k, us[k]["aware_both"], us[k]["fixed_both"], us[k]["aware_over_fixed"], us[k]["aa"],
             us[k]["aa_recaptured"], us[k]["aa_module"], us[k]["aware_dispatch"], us[k]["aware_combine"], us[k]["empty_both"], us[k]["empty_dispatch"],
             us[k]["fixed_dispatch"]] for k in sets]
    if "v1-pull" in us:
        t = us["v1-pull"]
        t["aware_combine"] = round(t["aware_both"] - t["aware_dispatch"], 3)
        t["copy_combine"] = round(t["copy_both"] - t["aware_dispatch"], 3)
        rows.append(["v1-pull (in place / staged)", f"{t['aware_both']} / {t['copy_both']}", "", "", "", "", "",
                     t["aware_dispatch"], f"{t['aware_combine']} / {t['copy_combine']}", "", "", ""])
    for key, value in sorted(us.get("sweep", {}).items()):
        rows.append([f"{sets[0]} {key}", value] + [""] * (len(TABLE_HEADER) - 2))
    return us, ratios, rows


def main() -> int:
    p = ep_arguments(__doc__, tokens=128, iters=50, rounds=7)
    p.add_argument("--max-tokens", type=int, default=None, help="receive capacity per rank (default: --tokens)")
    p.add_argument("--fp8", action="store_true", help="FP8 dispatch (per-token scales); combine stays bf16")
    p.add_argument("--kernels", default="v1,v2", help="kernel sets to time side by side (default: v1,v2; v2-pdl: v2 with PDL)")
    p.add_argument("--sweep", action="store_true", help="also time other grid sizes and vectors per lane (first set)")
    p.add_argument("--decode-variant", default="push", choices=("push", "pull"),
                   help="also time v1's experimental decode path (FusedBuffer(decode=...)) in the same rounds")
    args = p.parse_args()
    kernel_sets(args.kernels, launch_variants=True)  # a bad name fails here, before any process starts
    return run(__file__, args, worker)


if __name__ == "__main__":
    sys.exit(main())
