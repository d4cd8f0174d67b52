"""eep.Buffer (the DeepEP/Mooncake face) over the fused GPU buffer, against eep.reference.

    python tests/gpu/buffer_face.py --num-ranks 4 --out /tmp/eep-face     # launcher: one process per GPU

Each rank checks, in order:
  1. eager dispatch/combine, all ranks active: receive rows and counts equal the reference exactly,
     and the combine (fed the reference's expert outputs) equals the reference combine exactly;
  2. FP8 is not covered here (tests/gpu/fused_cases.py covers the kernel);
  3. CUDA graph: capture dispatch -> experts -> combine once, replay with all ranks, then the last
     rank leaves and the survivors replay the *same graph* after writing active_ranks in place;
  4. SIGKILL: the last rank of a second group dies before a step; survivors' dispatch clears
     active_ranks[dead] in place within the timeout, and the next step is correct.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import signal
import socket
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)

LOCAL, HIDDEN, M, TOP_K = 4, 2048, 64, 8


def _inputs(num_ranks: int, seed: int):
    import torch
    gen = torch.Generator().manual_seed(seed)
    num_experts = LOCAL * num_ranks
    xs, ids, ws = [], [], []
    for rank in range(num_ranks):
        n = M - 7 * rank  # different token counts per rank
        xs.append(torch.randn(n, HIDDEN, generator=gen).bfloat16())
        ids.append(torch.rand(n, num_experts, generator=gen).argsort(-1)[:, :TOP_K])
        ws.append(torch.rand(n, TOP_K, generator=gen))
    w = [(torch.randn(num_experts, *shape, generator=gen) / 40).bfloat16()
         for shape in ((256, HIDDEN), (256, HIDDEN), (HIDDEN, 256))]
    return xs, ids, ws, w


def _reference(xs, ids, ws, w, active):
    from eep.reference import combine, dispatch, expert_mlp
    num_ranks = len(xs)
    recvs, handles = dispatch([x if a else None for x, a in zip(xs, active)],
                              [i if a else None for i, a in zip(ids, active)], active, LOCAL, M)
    ys = [None if r is None else expert_mlp(r, *(t[k * LOCAL:(k + 1) * LOCAL] for t in w))
          for k, r in enumerate(recvs)]
    outs = combine(ys, handles, [x if a else None for x, a in zip(ws, active)], LOCAL)
    return recvs, ys, outs


def _barrier(store, name: str, count: int, timeout_s: float = 120.0) -> None:
    store.add(name, 1)
    deadline = time.time() + timeout_s
    while int(store.add(name, 0)) < count:
        if time.time() > deadline:
            raise TimeoutError(f"barrier {name}: {store.add(name, 0)} of {count}")
        time.sleep(0.002)


def worker(args) -> None:
    import torch
    from torch.distributed import TCPStore

    from eep.fused.buffer import FusedBuffer
    from eep.integrations.buffer import Buffer
    from eep.reference import swiglu

    torch.cuda.set_device(args.rank % torch.cuda.device_count())  # ranks share GPUs on a smaller machine
    torch.backends.cuda.matmul.allow_tf32 = False
    store = TCPStore("127.0.0.1", args.port, is_master=False, timeout=datetime.timedelta(seconds=120))
    R, rank = args.num_ranks, args.rank
    result = {"rank": rank, "errors": [], "checks": []}

    def check(label, ok, detail=""):
        result["checks"].append(label)
        if not ok:
            result["errors"].append(f"{label}: {detail}")

    def make(group):
        fused = FusedBuffer(rank, R, slots_per_rank=LOCAL, max_tokens_per_rank=M, hidden=HIDDEN, top_k=TOP_K,
                            store=store, group=group, timeout_s=0.5)
        return Buffer(rank, R, fused=fused)

    xs, ids, ws, w = _inputs(R, seed=11)
    x, idx, wt = xs[rank].cuda(), ids[rank].cuda(), ws[rank].cuda()
    num_experts = LOCAL * R

    # 1. eager, all active (after a warm-up step with timeout_us=-1, Mooncake's warm-up convention:
    #    the first launch compiles and loads the kernels, which can take longer than a step's deadline)
    buf = make(f"face-{args.tag}")
    _barrier(store, "warm-up", R)
    active = torch.ones(R, dtype=torch.int32, device="cuda")
    _, _, h0, _, _ = buf.dispatch(x, idx, active, M, num_experts, -1, use_fp8=False)
    buf.combine(torch.zeros(LOCAL, R * M, HIDDEN, dtype=torch.bfloat16, device="cuda"), idx, wt, active, -1, h0)
    torch.cuda.synchronize()
    check("warm-up active", active.tolist() == [1] * R, str(active.tolist()))
    _barrier(store, "eager", R)
    recvs, ys, outs = _reference(xs, ids, ws, w, [True] * R)
    recv_x, recv_count, handle, _, hook = buf.dispatch(x, idx, active, M, num_experts, 500_000, use_fp8=False)
    hook()
    torch.cuda.synchronize()
    ref = recvs[rank]
    check("eager counts", torch.equal(recv_count.cpu(), ref.count.sum(1)), f"{recv_count.cpu()} vs {ref.count.sum(1)}")
    got = recv_x.view(LOCAL, R, M, HIDDEN).cpu()
    rows_ok = all(torch.equal(got[i, s, :int(ref.count[i, s])], ref.x[i, s, :int(ref.count[i, s])])
                  for i in range(LOCAL) for s in range(R))
    check("eager rows", rows_ok)
    y = ys[rank].cuda().view(LOCAL, R * M, HIDDEN)
    out, _, hook = buf.combine(y, idx, wt, active, 500_000, handle)
    hook()
    torch.cuda.synchronize()
    check("eager combine exact", torch.equal(out.cpu(), outs[rank]),
          f"max diff {(out.cpu().float() - outs[rank].float()).abs().max():.3e}")
    check("eager active", active.tolist() == [1] * R, str(active.tolist()))

    # 3. CUDA graph: capture once, replay all-active, then without the last rank
    wg = [t[rank * LOCAL:(rank + 1) * LOCAL].cuda() for t in w]

    def step():
        rx, _, h, _, _ = buf.dispatch(x, idx, active, M, num_experts, 500_000, use_fp8=False)
        rx4 = rx.view(LOCAL, R * M, HIDDEN)
        yy = torch.stack([swiglu(rx4[i], wg[0][i], wg[1][i], wg[2][i]) for i in range(LOCAL)])
        o, _, _ = buf.combine(yy, idx, wt, active, 500_000, h)
        return o

    for _ in range(2):  # warm-up (all ranks step together)
        _barrier(store, f"warm{_}", R)
        step()
        torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream), torch.cuda.graph(graph, stream=stream):
        static_out = step()
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    _barrier(store, "replay-all", R)
    graph.replay()
    torch.cuda.synchronize()
    rel = lambda a, b: float((a.float() - b.float()).norm() / b.float().norm().clamp(min=1e-9))  # noqa: E731
    check("graph all active", rel(static_out.cpu(), outs[rank]) < 1e-2, f"rel {rel(static_out.cpu(), outs[rank]):.2e}")
    _barrier(store, "replay-all-done", R)
    if rank == R - 1:
        result["left"] = True
    else:
        active[R - 1] = 0  # in place: the graph reads this tensor at every replay
        _, _, outs_masked = _reference(xs, ids, ws, w, [r != R - 1 for r in range(R)])
        _barrier(store, "replay-masked", R - 1)
        graph.replay()
        torch.cuda.synchronize()
        check("graph after mask, no recapture", rel(static_out.cpu(), outs_masked[rank]) < 1e-2,
              f"rel {rel(static_out.cpu(), outs_masked[rank]):.2e}")
        check("graph mask kept", active.tolist() == [1] * (R - 1) + [0], str(active.tolist()))

    # 4. SIGKILL on a fresh group: the last rank dies before the step
    buf = make(f"face-kill-{args.tag}")
    _barrier(store, "kill-ready", R)
    if rank == R - 1:
        os.kill(os.getpid(), signal.SIGKILL)
    active = torch.ones(R, dtype=torch.int32, device="cuda")
    start = time.time()
    rx, _, h, _, _ = buf.dispatch(x, idx, active, M, num_experts, 500_000, use_fp8=False)
    torch.cuda.synchronize()
    elapsed = time.time() - start
    result["kill_dispatch_s"] = elapsed
    check("kill evidence in place", int(active[R - 1]) == 0, str(active.tolist()))
    check("kill bounded", elapsed < 3.0, f"{elapsed:.2f} s")
    result["active_after_kill"] = active.tolist()
    _barrier(store, "kill-decided", R - 1)
    active.copy_(torch.tensor([1] * (R - 1) + [0]))  # the control plane's decision, same on every survivor
    rx4 = rx.view(LOCAL, R * M, HIDDEN)
    yy = torch.stack([swiglu(rx4[i], wg[0][i], wg[1][i], wg[2][i]) for i in range(LOCAL)])
    buf.combine(yy, idx, wt, active, 500_000, h)
    torch.cuda.synchronize()
    _barrier(store, "kill-next", R - 1)
    _, _, outs_masked = _reference(xs, ids, ws, w, [r != R - 1 for r in range(R)])
    rx, _, h, _, _ = buf.dispatch(x, idx, active, M, num_experts, 500_000, use_fp8=False)
    rx4 = rx.view(LOCAL, R * M, HIDDEN)
    yy = torch.stack([swiglu(rx4[i], wg[0][i], wg[1][i], wg[2][i]) for i in range(LOCAL)])
    out, _, _ = buf.combine(yy, idx, wt, active, 500_000, h)
    torch.cuda.synchronize()
    check("step after kill", rel(out.cpu(), outs_masked[rank]) < 1e-2, f"rel {rel(out.cpu(), outs_masked[rank]):.2e}")
    with open(os.path.join(args.out, f"rank{rank}.json"), "w") as f:
        json.dump(result, f)
    os._exit(0)  # skip teardown of the dead peer's mapping


def launch(args) -> int:
    from torch.distributed import TCPStore
    os.makedirs(args.out, exist_ok=True)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    store = TCPStore("127.0.0.1", port, is_master=True, wait_for_workers=False,  # noqa: F841 (kept alive)
                     timeout=datetime.timedelta(seconds=300))
    env = dict(os.environ, PYTHONUNBUFFERED="1", NCCL_NVLS_ENABLE="0", TORCH_SYMM_MEM_DISABLE_MULTICAST="1",
               NVSHMEM_DISABLE_NVLS="1", PYTHONPATH=ROOT)
    procs = [subprocess.Popen([sys.executable, __file__, "--rank", str(r), "--num-ranks", str(args.num_ranks),
                               "--port", str(port), "--out", args.out, "--tag", str(os.getpid())], env=env)
             for r in range(args.num_ranks)]
    deadline = time.time() + 300
    while any(p.poll() is None for p in procs) and time.time() < deadline:
        time.sleep(0.2)
    for p in procs:
        if p.poll() is None:
            p.kill()
    errors, checks = [], 0
    for r in range(args.num_ranks - 1):  # the last rank leaves / is killed on purpose
        path = os.path.join(args.out, f"rank{r}.json")
        if not os.path.exists(path):
            errors.append(f"rank {r}: no result")
            continue
        res = json.load(open(path))
        checks += len(res["checks"])
        errors += [f"rank {r}: {e}" for e in res["errors"]]
        print(f"rank {r}: kill dispatch {res.get('kill_dispatch_s', -1):.3f} s, "
              f"active after {res.get('active_after_kill')}")
    print(f"RESULT buffer_face: {checks} checks, {len(errors)} errors")
    for e in errors:
        print("  " + e)
    return 1 if errors else 0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--num-ranks", type=int, default=4)
    ap.add_argument("--rank", type=int)
    ap.add_argument("--port", type=int)
    ap.add_argument("--out", default="/tmp/eep-face")
    ap.add_argument("--tag", default="0")
    args = ap.parse_args()
    if args.rank is None:
        sys.exit(launch(args))
    worker(args)


if __name__ == "__main__":
    main()
