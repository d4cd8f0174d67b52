"""Prefill dispatch/combine benchmark: eep ``PrefillBuffer`` (membership-aware and fixed) vs NCCL
``all_to_all_single`` and ``torch.ops.symm_mem.all_to_all_vdev_2d``, side by side in one run.

    python perf/bench_prefill.py --num-ranks 4 --model deepseek-v3 [--tokens 4096] [--profile DIR] [--out FILE]
        [--combine-variant push,spread,pull,pull-copy]

One process per GPU (subprocesses around a TCPStore hosted here). Every rank routes ``tokens``
tokens top-8 uniformly over all experts (one replica each). Bandwidth is counted as DeepEP's
normal-mode test counts it: bytes of token rows a rank receives — one copy per token and
destination rank, its own included — over the kernel time; the slowest rank's median is reported.
- eep: CUDA graphs of ``iters`` steps (dispatch alone, and dispatch + combine with a static
  partial-row tensor standing in for the experts), elastic and fixed kernels on the same buffer,
  replayed alternately ``rounds`` times; ``--combine-variant`` adds the experimental combine paths
  (docs/fused.md "Prefill combine: where the time goes"), each timed in the same rounds beside the
  default ``push`` (always timed; its keys keep their names, the others get ``_<variant>``):
  ``spread``, ``pull`` (partial rows written in the buffer's ``combine_input()``, no copy) and
  ``pull-copy`` (the same kernels given a separate partial tensor: one local copy more);
- NCCL: ``all_to_all_single`` of exactly those rows (per-destination splits), one direction for
  dispatch and the reverse for combine;
- symm_mem: ``all_to_all_vdev_2d`` (NVSHMEM) of one copy per (token, choice), expert-major output,
  as torch's MoE examples use it; it moves top-k copies, so its GB/s counts the bytes it moved.
  Only with ``--with-symm-mem`` (it initializes NVSHMEM); reported with the error where the op or
  NVSHMEM is missing.
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

    from eep.fused.compile import KernelVariant, LoadedKernels
    from eep.fused.prefill import PrefillBuffer

    rank, R = args.rank, args.num_ranks
    dev, store = rank_setup(args)
    hidden, num_experts = MODELS[args.model]
    S, T, K = num_experts // R, args.tokens, args.top_k
    buf = PrefillBuffer(rank, R, slots_per_rank=S, max_tokens_per_rank=T, hidden=hidden, top_k=K, store=store,
                        group="bench-prefill", timeout_s=5.0, device=rank)
    vpl = buf.kernels_variant.vec_per_lane
    variants = combine_variants(args.combine_variant)
    kernels = {(name, cv): LoadedKernels.get(KernelVariant(hidden, name == "fixed", vpl,
                                                           prefill_combine=cv.replace("-copy", "")), rank)
               for name in ("elastic", "fixed") for cv in variants}
    g = torch.Generator(device=dev).manual_seed(rank + 1)
    x = torch.randn(T, hidden, device=dev, generator=g).to(torch.bfloat16)
    ids = torch.rand(T, num_experts, device=dev, generator=g).topk(K, dim=-1).indices  # expert e on slot e
    phys = ids.contiguous()
    w = torch.softmax(torch.randn(T, K, device=dev, generator=g), -1)
    partial = torch.randn(R, T, hidden, device=dev, generator=g).to(torch.bfloat16)
    buf.combine_input().copy_(partial)  # pull: the expert stage wrote its partial rows in place
    out = torch.empty(T, hidden, dtype=torch.bfloat16, device=dev)

    def capture(mode: str, cv: str):
        buf.combine_variant = cv.replace("-copy", "")
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

    graphs = {}  # (kernels, mode, combine variant); dispatch is the same kernel in every module
    for name in ("elastic", "fixed"):
        for cv in variants:
            buf.kernels = kernels[(name, cv)]
            graphs[(name, "both", cv)] = capture("both", cv)
        buf.kernels = kernels[(name, "push")]
        graphs[(name, "dispatch", "push")] = capture("dispatch", "push")
    buf.kernels, buf.combine_variant = kernels[("elastic", "push")], "push"
    torch.cuda.synchronize()
    recv_rows = int(buf.vis_count.sum())

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

    def time_graph(gr) -> float:
        dist.barrier()
        torch.cuda.synchronize()
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        gr.replay()
        b.record()
        b.synchronize()
        return a.elapsed_time(b) / 1e3 / args.iters

    def time_nccl(reverse: bool) -> float:
        dist.barrier()
        torch.cuda.synchronize()
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        for _ in range(args.iters):
            if reverse:
                dist.all_to_all_single(send, nccl_recv, output_split_sizes=in_splits, input_split_sizes=out_splits)
            else:
                dist.all_to_all_single(nccl_recv, send, output_split_sizes=out_splits, input_split_sizes=in_splits)
        b.record()
        b.synchronize()
        return a.elapsed_time(b) / 1e3 / args.iters

    symm = (symm_mem_baseline(args, dist, torch, dev, x, ids, S, num_experts) if args.with_symm_mem
            else {"error": "not requested (--with-symm-mem)"})
    for gr in graphs.values():
        time_graph(gr)
    time_nccl(False)
    samples: dict[str, list[float]] = {k: [] for k in ("elastic_dispatch", "fixed_dispatch", "nccl_dispatch",
                                                      "nccl_combine")}
    for name in ("elastic", "fixed"):
        for cv in variants:
            samples[f"{name}_both{suffix(cv)}"] = []
    if symm.get("run"):
        samples["symm_mem_dispatch"] = []
    for _ in range(args.rounds):
        for name in ("elastic", "fixed"):
            for cv in variants:
                samples[f"{name}_both{suffix(cv)}"].append(time_graph(graphs[(name, "both", cv)]))
            samples[f"{name}_dispatch"].append(time_graph(graphs[(name, "dispatch", "push")]))
        samples["nccl_dispatch"].append(time_nccl(False))
        samples["nccl_combine"].append(time_nccl(True))
        if symm.get("run"):
            samples["symm_mem_dispatch"].append(symm["run"]())
    if args.profile:  # TensorBoard traces (torch-tb-profiler opens them)
        from torch.profiler import ProfilerActivity, profile, tensorboard_trace_handler
        os.makedirs(args.profile, exist_ok=True)
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA],
                     on_trace_ready=tensorboard_trace_handler(args.profile,
                                                              worker_name=f"prefill-{args.model}-R{R}-rank{rank}")):
            for name in ("elastic", "fixed"):
                for cv in variants:
                    time_graph(graphs[(name, "both", cv)])
            time_nccl(False)
    med = {k: statistics.median(v) for k, v in samples.items()}
    med["recv_bytes"] = recv_rows * hidden * 2
    med["symm_bytes"] = symm.get("bytes", 0)
    gathered = [None] * R
    dist.all_gather_object(gathered, med)
    misses = buf.status().miss_count
    if rank == 0:
        worst = {k: max(m[k] for m in gathered) for k in med}
        s = {k: worst[k] for k in samples}
        for name in ("elastic", "fixed"):
            for cv in variants:
                s[f"{name}_combine{suffix(cv)}"] = s[f"{name}_both{suffix(cv)}"] - s[f"{name}_dispatch"]
        # conservative: the slowest rank's median time over the smallest per-rank byte count
        nbytes = min(m["recv_bytes"] for m in gathered)
        gbps = {k: nbytes / v / 1e9 for k, v in s.items() if ("dispatch" in k or "combine" in k) and "symm" not in k}
        if "symm_mem_dispatch" in s:
            gbps["symm_mem_dispatch"] = min(m["symm_bytes"] for m in gathered) / s["symm_mem_dispatch"] / 1e9
        row = {"model": args.model, "num_ranks": R, "tokens": T, "top_k": K, "hidden": hidden,
               "gpu": torch.cuda.get_device_name(dev), "iters": args.iters, "rounds": args.rounds,
               "seconds": s, "gbps": gbps, "ratio_elastic_over_fixed": s["elastic_both"] / s["fixed_both"],
               "combine_variants": variants,
               "ratio_combine_over_push": {cv: s[f"elastic_combine{suffix(cv)}"] / s["elastic_combine"]
                                           for cv in variants},
               "received_bytes_per_rank": [m["recv_bytes"] for m in gathered],
               "symm_mem": {k: v for k, v in symm.items() if k != "run"}, "misses": misses}
        print("RESULT " + json.dumps(row), flush=True)
        if args.out:
            with open(args.out, "a") as f:
                f.write(json.dumps(row) + "\n")
    dist.barrier()
    buf.close()
    dist.destroy_process_group()


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
    p.add_argument("--combine-variant", default="push",
                   help=f"comma list of prefill combine paths to time beside push: {', '.join(COMBINE_CHOICES)}")
    args = p.parse_args()
    combine_variants(args.combine_variant)  # a bad name fails here, before any process starts
    return run(__file__, args, worker)


if __name__ == "__main__":
    sys.exit(main())
