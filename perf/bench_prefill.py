"""Prefill dispatch/combine benchmark: eep ``PrefillBuffer`` kernel sets (membership-aware and fixed,
v1's combine variants) vs NCCL ``all_to_all_single`` of the same bytes and a device copy of them, side
by side in one run.

    python perf/bench_prefill.py --num-ranks 1 --model deepseek-v3 [--tokens 4096] [--kernels v1,v2]
        [--combine-variant spread,pull,pull-copy] [--with-symm-mem] [--profile DIR] [--out DIR]

One process per GPU (subprocesses around a TCPStore hosted here). Every rank routes ``tokens`` tokens
top-8 uniformly over all experts (one replica each). Bandwidth is counted as DeepEP's normal-mode test
counts it: bytes of token rows a rank receives — one copy per token and destination rank, its own
included — over the kernel time; the slowest rank's median over ``rounds`` is reported.
- eep: one ``PrefillBuffer`` per kernel set (``--kernels``); CUDA graphs of ``iters`` steps of dispatch
  alone and of dispatch + combine (a static partial-row tensor standing in for the experts), with the
  aware and the fixed-membership kernels on the same buffer, all replayed in turn in each round (each
  timing the second of two back-to-back replays, ``ep_bench.time_replay``); combine = both - dispatch; ``aware_both_again`` is the A/A repeat (noise floor). Kernel set v1 also
  times ``--combine-variant`` (its experimental combine paths, docs/fused.md "Prefill combine: where
  the time goes") beside its default ``push``: ``spread``, ``pull`` (partial rows written in the
  buffer's ``combine_input()``, no copy) and ``pull-copy`` (the same kernels given a separate partial
  tensor: one local copy more);
- NCCL: ``all_to_all_single`` of exactly those rows (per-destination splits), one direction for
  dispatch and the reverse for combine (one rank: NCCL's local copy);
- copy: ``Tensor.copy_`` of the same number of received bytes within one GPU (a ceiling for the local
  part of any kernel; with one rank the whole of it);
- symm_mem: ``all_to_all_vdev_2d`` (NVSHMEM) of one copy per (token, choice), expert-major output,
  as torch's MoE examples use it; it moves top-k copies, so its GB/s counts the bytes it moved.
  Only with ``--with-symm-mem`` (it initializes NVSHMEM); reported with the error where the op or
  NVSHMEM is missing.
Output: one table (every set and variant) and one JSON file per run in ``--out``.
"""

from __future__ import annotations

import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from ep_bench import (MODELS, ROOT, ep_arguments, kernel_sets, print_table, rank_setup, run,  # noqa: E402
                      time_calls, time_replay, working_sets, write_result)

sys.path.insert(0, ROOT)


def worker(args) -> None:
    import torch
    import torch.distributed as dist

    from eep.fused.compile import KernelVariant, LoadedKernels
    from eep.fused.prefill import PrefillBuffer

    rank, R = args.rank, args.num_ranks
    dev, store = rank_setup(args)
    hidden, num_experts = MODELS[args.model]
    S, T, K = num_experts // R, args.tokens, args.top_k
    sets = kernel_sets(args.kernels)
    bufs = {k: PrefillBuffer(rank, R, slots_per_rank=S, max_tokens_per_rank=T, hidden=hidden, top_k=K, store=store,
                             group=f"bench-prefill-{k}", timeout_s=5.0, device=rank, kernels=k) for k in sets}
    # (set, combine path) -> the combine paths timed; v1 adds its experiments, v2 has one
    paths = {k: (combine_variants(args.combine_variant) if k == "v1" else ["push"]) for k in sets}
    kernels = {(k, m, cv): LoadedKernels.get(KernelVariant(hidden, m == "fixed", bufs[k].kernels_variant.vec_per_lane,
                                                           prefill_combine=cv.replace("-copy", ""), kernels=k), rank)
               for k in sets for m in ("aware", "fixed") for cv in paths[k]}
    g = torch.Generator(device=dev).manual_seed(rank + 1)
    x = torch.randn(T, hidden, device=dev, generator=g).to(torch.bfloat16)
    ids = torch.rand(T, num_experts, device=dev, generator=g).topk(K, dim=-1).indices  # expert e on slot e
    phys = ids.contiguous()
    w = torch.softmax(torch.randn(T, K, device=dev, generator=g), -1)
    partial = torch.randn(R, T, hidden, device=dev, generator=g).to(torch.bfloat16)
    if "v1" in sets:
        bufs["v1"].combine_input().copy_(partial)  # pull: the expert stage wrote its partial rows in place
    out = torch.empty(T, hidden, dtype=torch.bfloat16, device=dev)

    def capture(k: str, m: str, mode: str, cv: str):
        buf = bufs[k]
        buf.kernels, buf.combine_variant = kernels[(k, m, cv)], cv.replace("-copy", "")
        part = buf.combine_input() if cv == "pull" else partial
        dist.barrier()
        recv, handle = buf.dispatch(x, phys, w)  # warm-up step on every rank
        if mode == "both":
            buf.combine(part, handle, out=out)
        torch.cuda.synchronize()
        gr = torch.cuda.CUDAGraph()
        with torch.cuda.graph(gr):
            for _ in range(args.iters):
                recv, handle = buf.dispatch(x, phys, w)
                if mode == "both":
                    buf.combine(part, handle, out=out)
        return gr

    def warm(k: str) -> None:
        recv, handle = bufs[k].dispatch(x, phys, w)
        bufs[k].combine(partial, handle, out=out)

    sets, broken = working_sets(torch, dist, sets, bufs, warm)
    if broken and rank == 0:
        print(f"NOT TIMED: kernel set(s) {broken} missed a deadline in an eager step", flush=True)
    if not sets:
        raise RuntimeError(f"every kernel set missed a deadline in an eager step: {broken}")
    graphs = {}  # "<set>.<membership>_<mode><suffix>" -> graph
    for k in sets:
        for m in ("aware", "fixed"):
            for cv in paths[k]:
                graphs[f"{k}.{m}_both{suffix(cv)}"] = capture(k, m, "both", cv)
            graphs[f"{k}.{m}_dispatch"] = capture(k, m, "dispatch", "push")
        bufs[k].kernels, bufs[k].combine_variant = kernels[(k, "aware", "push")], "push"
    torch.cuda.synchronize()
    recv_rows = int(bufs[sets[0]].vis_count.sum())

    # NCCL: the same rows, per-destination splits (a token goes once to each rank it has a choice on)
    dst = ids // S
    hits = torch.zeros(T, R, dtype=torch.bool, device=dev)
    hits.scatter_(1, dst, True)
    order = [hits[:, d].nonzero().squeeze(1) for d in range(R)]
    send = torch.cat([x[o] for o in order])
    in_splits = [int(o.numel()) for o in order]
    counts = torch.tensor(in_splits, device=dev)
    got = torch.empty_like(counts)
    dist.all_to_all_single(got, counts)
    out_splits = got.tolist()
    nccl_recv = torch.empty(sum(out_splits), hidden, dtype=torch.bfloat16, device=dev)
    copy_src = torch.randn(recv_rows, hidden, device=dev).to(torch.bfloat16)
    copy_dst = torch.empty_like(copy_src)

    def time_loop(body) -> float:
        return time_calls(torch, body, args.iters, dist)

    def nccl(reverse: bool):
        if reverse:
            return lambda: dist.all_to_all_single(send, nccl_recv, output_split_sizes=in_splits,
                                                  input_split_sizes=out_splits)
        return lambda: dist.all_to_all_single(nccl_recv, send, output_split_sizes=out_splits,
                                              input_split_sizes=in_splits)

    symm = (symm_mem_baseline(args, dist, torch, dev, x, ids, S, num_experts) if args.with_symm_mem
            else {"error": "not requested (--with-symm-mem)"})
    for gr in graphs.values():
        time_replay(torch, dist, gr, args.iters)
    time_loop(nccl(False))
    time_loop(lambda: copy_dst.copy_(copy_src))
    samples: dict[str, list[float]] = {}
    for _ in range(args.rounds):
        for k in sets:
            for key in [f"{m}_both{suffix(cv)}" for m in ("aware", "fixed") for cv in paths[k]] + \
                       ["aware_dispatch", "fixed_dispatch", "aware_both_again"]:
                gr = graphs[f"{k}.{key.replace('_again', '')}"]
                samples.setdefault(f"{k}.{key}", []).append(time_replay(torch, dist, gr, args.iters))
        samples.setdefault("nccl_dispatch", []).append(time_loop(nccl(False)))
        samples.setdefault("nccl_combine", []).append(time_loop(nccl(True)))
        samples.setdefault("copy", []).append(time_loop(lambda: copy_dst.copy_(copy_src)))
        if symm.get("run"):
            samples.setdefault("symm_mem_dispatch", []).append(symm["run"]())
    if args.profile:  # TensorBoard traces (torch-tb-profiler opens them)
        from torch.profiler import ProfilerActivity, profile, tensorboard_trace_handler
        os.makedirs(args.profile, exist_ok=True)
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA],
                     on_trace_ready=tensorboard_trace_handler(args.profile,
                                                              worker_name=f"prefill-{args.model}-R{R}-rank{rank}")):
            for k in sets:
                time_replay(torch, dist, graphs[f"{k}.aware_both"], args.iters)
            time_loop(nccl(False))
    med = {key: statistics.median(v) for key, v in samples.items()}
    med["recv_bytes"] = recv_rows * hidden * 2
    med["symm_bytes"] = symm.get("bytes", 0)
    gathered = [None] * R
    dist.all_gather_object(gathered, med)
    misses = {k: buf.status().miss_count for k, buf in bufs.items()}
    if rank == 0:
        gpu = torch.cuda.get_device_name(dev)
        us, gbps, rows, nbytes = summarize(gathered, sets, paths)
        row = {"model": args.model, "num_ranks": R, "tokens": T, "top_k": K, "hidden": hidden, "gpu": gpu,
               "iters": args.iters, "rounds": args.rounds, "kernel_sets": sets, "not_timed_missed_deadlines": broken,
               "combine_paths": paths, "us": us,
               "gbps": gbps, "received_bytes_per_rank": [m["recv_bytes"] for m in gathered],
               "symm_mem": {k: v for k, v in symm.items() if k != "run"}, "misses": misses}
        print_table(f"prefill {args.model}, {R} rank(s), {T} tokens/rank, top-{K}, {nbytes / 1e6:.1f} MB received "
                    f"per rank, {gpu}, grid {bufs[sets[0]].num_blocks} blocks: us (GB/s) per step (CUDA-graph replay of "
                    f"{args.iters} steps, the second of two back to back, median of {args.rounds} rounds, slowest rank)",
                    TABLE_HEADER, rows)
        write_result(args.out, f"prefill-{args.model}-R{R}-T{T}", row)
    dist.barrier()
    for buf in bufs.values():
        buf.close()
    dist.destroy_process_group()


TABLE_HEADER = ["kernels, combine", "dispatch aware", "combine aware", "dispatch fixed", "combine fixed",
                "aware/fixed (both)", "A/A"]


def summarize(gathered: list[dict[str, float]], sets: list[str], paths: dict[str, list[str]]
              ) -> tuple[dict, dict, list[list], int]:
    """Per-rank medians (seconds, keyed ``<set>.<name>``, baselines, ``recv_bytes``) -> the slowest rank's
    us by set with combine = both - dispatch and the ratios, GB/s over the fewest received bytes, the
    table rows (every set and combine path, then NCCL and the copy), and those bytes."""
    nbytes = min(m["recv_bytes"] for m in gathered)  # conservative: slowest time over fewest bytes
    us: dict[str, dict[str, float]] = {}
    for key in gathered[0]:
        if key in ("recv_bytes", "symm_bytes"):
            continue
        group, _, name = key.rpartition(".")
        us.setdefault(group or "baseline", {})[name] = round(max(m[key] for m in gathered) * 1e6, 2)

    def rate(t_us: float) -> float:
        return round(nbytes / (t_us * 1e-6) / 1e9, 1)

    gbps: dict[str, dict[str, float]] = {}
    rows = []
    for k in sets:
        t = us[k]
        for m in ("aware", "fixed"):
            for cv in paths[k]:
                t[f"{m}_combine{suffix(cv)}"] = round(t[f"{m}_both{suffix(cv)}"] - t[f"{m}_dispatch"], 2)
        t["aware_over_fixed"] = round(t["aware_both"] / t["fixed_both"], 4)
        t["aa"] = round(t["aware_both_again"] / t["aware_both"], 4)
        gbps[k] = {name: rate(v) for name, v in t.items() if name.endswith("_dispatch") or "_combine" in name}
        for cv in paths[k]:
            sx = suffix(cv)
            rows.append([f"{k} {cv}", f"{t['aware_dispatch']} ({gbps[k]['aware_dispatch']})",
                         f"{t['aware_combine' + sx]} ({gbps[k]['aware_combine' + sx]})",
                         f"{t['fixed_dispatch']} ({gbps[k]['fixed_dispatch']})",
                         f"{t['fixed_combine' + sx]} ({gbps[k]['fixed_combine' + sx]})",
                         round(t["aware_both" + sx] / t["fixed_both" + sx], 4), t["aa"] if cv == "push" else ""])
    base = us["baseline"]
    gbps["baseline"] = {name: rate(base[name]) for name in ("nccl_dispatch", "nccl_combine", "copy")}
    if "symm_mem_dispatch" in base:
        gbps["baseline"]["symm_mem_dispatch"] = round(min(m["symm_bytes"] for m in gathered)
                                                      / (base["symm_mem_dispatch"] * 1e-6) / 1e9, 1)
    rows.append(["NCCL all_to_all_single", f"{base['nccl_dispatch']} ({gbps['baseline']['nccl_dispatch']})",
                 f"{base['nccl_combine']} ({gbps['baseline']['nccl_combine']})", "", "", "", ""])
    rows.append(["device copy, same bytes", f"{base['copy']} ({gbps['baseline']['copy']})", "", "", "", "", ""])
    return us, gbps, rows, nbytes


COMBINE_CHOICES = ("push", "spread", "pull", "pull-copy")


def combine_variants(arg: str) -> list[str]:
    """``--combine-variant`` as a list, ``push`` (the baseline) first and always present."""
    names = [n.strip() for n in arg.split(",") if n.strip()]
    bad = [n for n in names if n not in COMBINE_CHOICES]
    if bad:
        raise ValueError(f"--combine-variant {arg!r}: unknown {bad}; choose from {COMBINE_CHOICES}")
    return ["push"] + [n for n in dict.fromkeys(names) if n != "push"]


def suffix(cv: str) -> str:
    """Result-key suffix of a combine variant (none for the default, so old keys keep their names)."""
    return "" if cv == "push" else "_" + cv.replace("-", "_")


def symm_mem_baseline(args, dist, torch, dev, x, ids, S, num_experts) -> dict:
    """``all_to_all_vdev_2d`` of one row per (token, choice), sorted by (destination rank, local
    expert); returns ``{"run": timer, "bytes": rows received x row bytes}`` or ``{"error": ...}``."""
    try:
        import torch.distributed._symmetric_memory as symm_mem

        if hasattr(symm_mem, "set_backend"):
            symm_mem.set_backend("NVSHMEM")
        group_name = dist.group.WORLD.group_name
        if hasattr(symm_mem, "enable_symm_mem_for_group"):
            symm_mem.enable_symm_mem_for_group(group_name)
        T, K = ids.shape
        hidden = x.shape[1]
        flat = ids.flatten()  # expert e lives on rank e // S as local expert e % S: rank-major = expert order
        order = flat.argsort(stable=True)
        rows = x[order // K]
        splits = torch.bincount(flat, minlength=num_experts).to(torch.int64)
        max_rows = T * K * 2  # any rank may receive more than it sends under random routing
        inp = symm_mem.empty(max_rows, hidden, dtype=torch.bfloat16, device=dev)
        inp[:rows.shape[0]].copy_(rows)
        in_splits = symm_mem.empty(num_experts, dtype=torch.int64, device=dev)
        in_splits.copy_(splits)
        out = symm_mem.empty(max_rows, hidden, dtype=torch.bfloat16, device=dev)
        out_so = symm_mem.empty((2, num_experts), dtype=torch.int64, device=dev)
        for t in (inp, in_splits, out, out_so):
            if hasattr(symm_mem, "rendezvous"):
                symm_mem.rendezvous(t, group_name)
        torch.cuda.synchronize(dev)
        dist.barrier()
        torch.ops.symm_mem.all_to_all_vdev_2d(inp, out, in_splits, out_so, group_name)
        torch.cuda.synchronize(dev)
        received = int(out_so[0].sum())

        def run() -> float:
            dist.barrier()
            torch.cuda.synchronize(dev)
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            for _ in range(args.iters):
                torch.ops.symm_mem.all_to_all_vdev_2d(inp, out, in_splits, out_so, group_name)
            b.record()
            b.synchronize()
            return a.elapsed_time(b) / 1e3 / args.iters

        return {"run": run, "bytes": received * hidden * 2, "rows_received": received}
    except Exception as exc:  # noqa: BLE001 - a missing baseline is reported, not fatal
        return {"error": f"{type(exc).__name__}: {exc}"[:500]}


def main() -> int:
    p = ep_arguments(__doc__, tokens=4096, iters=10, rounds=5)
    p.add_argument("--kernels", default="v1,v2", help="kernel sets to time side by side (default: v1,v2)")
    p.add_argument("--combine-variant", default="push",
                   help=f"comma list of v1 prefill combine paths to time beside push: {', '.join(COMBINE_CHOICES)}")
    args = p.parse_args()
    combine_variants(args.combine_variant)  # a bad name fails here, before any process starts
    kernel_sets(args.kernels)
    return run(__file__, args, worker)


if __name__ == "__main__":
    sys.exit(main())
