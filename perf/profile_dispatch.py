"""Eager launches of kernel set v2's decode dispatch at one rank, for a profiler (Nsight Compute).

    ncu --clock-control none --cache-control none -k regex:eep2_dispatch --section WarpStateStats \
        python perf/profile_dispatch.py --model deepseek-v3

One process, one GPU, no NCCL: a FusedBuffer per dispatch dtype (bf16, then FP8), each dispatching
``--launches`` times with every copy NO_EXPERT (nothing to move: the launch's fixed cost), then
``--launches`` times with uniform top-8 routes, so the profiler's launches come in four groups in that
order (bf16 empty, bf16 routed, FP8 empty, FP8 routed). Prints each group's wall time per launch
(CUDA events around the group, after one warm-up launch) so the script is useful without a profiler too.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from ep_bench import MODELS, ROOT, time_calls  # noqa: E402

sys.path.insert(0, ROOT)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="deepseek-v3", choices=sorted(MODELS))
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--launches", type=int, default=3)
    ap.add_argument("--port", type=int, default=29561)
    args = ap.parse_args()

    import torch
    from torch.distributed import TCPStore

    from eep.fused.buffer import FusedBuffer
    from eep.routing.route import route_to_phys

    hidden, num_experts = MODELS[args.model]
    T, K, dev = args.tokens, 8, torch.device("cuda", 0)
    torch.cuda.set_device(dev)
    store = TCPStore("127.0.0.1", args.port, 1, True)
    g = torch.Generator(device=dev).manual_seed(1)
    x = torch.randn(T, hidden, device=dev, generator=g).to(torch.bfloat16)
    ids = torch.rand(T, num_experts, device=dev, generator=g).topk(K, dim=-1).indices
    phys = route_to_phys(ids, torch.arange(num_experts, device=dev).view(-1, 1),
                         torch.ones(1, dtype=torch.int32, device=dev), num_experts)
    empty = torch.full_like(phys, -1)
    for fp8 in (False, True):
        buf = FusedBuffer(0, 1, slots_per_rank=num_experts, max_tokens_per_rank=T, hidden=hidden, top_k=K,
                          store=store, group=f"profile-{int(fp8)}", timeout_s=5.0, device=dev, use_fp8=fp8,
                          kernels="v2")
        for name, routes in (("empty", empty), ("routed", phys)):
            buf.dispatch(x, routes)  # warm-up, not timed
            seconds = time_calls(torch, lambda r=routes: buf.dispatch(x, r), args.launches)
            print(f"{args.model} {'fp8' if fp8 else 'bf16'} {name}: {seconds * 1e6:.2f} us per eager launch "
                  f"({args.launches} launches)", flush=True)
        assert not any(buf.status().miss_count), f"a one-rank dispatch missed its own deadline: {buf.status()}"
        buf.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
