"""The kernels and copies of one decode MoE step, as ``torch.profiler`` sees them: what the hot path is.

One rank on one GPU: ``route_to_phys -> FusedBuffer.dispatch -> expert stage -> FusedBuffer.combine``
at a model shape, eager, after two warm-up steps; the profiled steps' CUDA kernels and memory
copies are counted by name and written as JSON. Comparing two trees' outputs (run the script with
``PYTHONPATH`` at each) shows whether a change added or removed work on the hot path.

    python perf/profile_decode_step.py --model qwen3-30b-a3b --out /tmp/profile-new.json
"""

from __future__ import annotations

import argparse
import collections
import datetime
import json
import os
import sys


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=["qwen3-30b-a3b", "deepseek-v3"], default="qwen3-30b-a3b")
    p.add_argument("--tokens", type=int, default=128, help="decode tokens on the rank (default: %(default)s)")
    p.add_argument("--steps", type=int, default=3, help="profiled steps (default: %(default)s)")
    p.add_argument("--expert-backend", default="grouped_mm",
                   help="expert stage, as EEP_EXPERT_BACKEND (default: %(default)s: nothing to build)")
    p.add_argument("--out", default="/tmp/eep-profile.json", help="JSON output (default: %(default)s)")
    args = p.parse_args(argv)

    import torch
    from torch.distributed import TCPStore
    from torch.profiler import ProfilerActivity, profile

    import eep
    from eep.fused.buffer import FusedBuffer
    from eep.fused.gemm import ExpertStageShape, make_expert_stage
    from eep.routing import route_to_phys

    hidden, inter, num_experts, top_k = {"qwen3-30b-a3b": (2048, 768, 128, 8),
                                         "deepseek-v3": (7168, 2048, 256, 8)}[args.model]
    T, S = args.tokens, num_experts
    dev = torch.device("cuda", 0)
    torch.cuda.set_device(dev)
    store = TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False, timeout=datetime.timedelta(seconds=30))
    buf = FusedBuffer(0, 1, slots_per_rank=S, max_tokens_per_rank=T, hidden=hidden, top_k=top_k, store=store,
                      group="profile", timeout_s=5.0, device=0)
    stage = make_expert_stage(ExpertStageShape(S, 1, T, hidden, inter, top_k), device=dev,
                              backend=args.expert_backend, expected_rows_per_group=T * top_k / S)
    g = torch.Generator(device=dev).manual_seed(0)
    x = torch.randn(T, hidden, device=dev, generator=g).to(torch.bfloat16)
    ids = torch.rand(T, num_experts, device=dev, generator=g).topk(top_k, -1).indices
    w = torch.softmax(torch.randn(T, top_k, device=dev, generator=g), -1)
    l2p = torch.full((num_experts, 1), -1, dtype=torch.int64, device=dev)
    l2p[:, 0] = torch.arange(num_experts, device=dev)
    w13 = (torch.randn(S, 2 * inter, hidden, device=dev, generator=g) / hidden ** 0.5).to(torch.bfloat16)
    w2 = (torch.randn(S, hidden, inter, device=dev, generator=g) / inter ** 0.5).to(torch.bfloat16)

    def step():
        phys = route_to_phys(ids, l2p, buf.active_mask, S)
        recv, handle = buf.dispatch(x, phys)
        y = stage(recv.x, recv.count, w13, w2)
        return buf.combine(y, handle, w)

    for _ in range(2):
        step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(args.steps):
            step()
        torch.cuda.synchronize()
    kernels: collections.Counter = collections.Counter()
    copies: collections.Counter = collections.Counter()
    for ev in prof.events():
        if ev.device_type != torch.autograd.DeviceType.CUDA:
            continue
        name = ev.name
        (copies if name.startswith(("Memcpy", "Memset")) else kernels)[name] += 1
    per_step = {"kernels": {k: v / args.steps for k, v in sorted(kernels.items())},
                "copies": {k: v / args.steps for k, v in sorted(copies.items())}}
    result = {"tree": os.path.dirname(os.path.dirname(os.path.abspath(eep.__file__))), "model": args.model,
              "tokens": T, "gpu": torch.cuda.get_device_name(dev), "torch": torch.__version__,
              "kernels_per_step": sum(per_step["kernels"].values()), "copies_per_step": sum(per_step["copies"].values()),
              **per_step}
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    print(json.dumps({k: result[k] for k in ("tree", "kernels_per_step", "copies_per_step")}))
    for name, n in per_step["kernels"].items():
        print(f"  {n:5.1f}  {name[:110]}")
    for name, n in per_step["copies"].items():
        print(f"  {n:5.1f}  {name[:110]}")
    buf.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
