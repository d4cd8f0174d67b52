"""What the EP communication benchmarks (bench_dispatch.py, bench_prefill.py) share: the model
shapes, the common command line, one rank process's set-up (its GPU, the control store, an NCCL
group for the baselines) and the launch (this script once per rank, never torchrun)."""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

MODELS = {"deepseek-v3": (7168, 256), "qwen3-30b-a3b": (2048, 128), "tiny": (64, 16)}  # hidden, experts


def ep_arguments(description: str, *, tokens: int, iters: int, rounds: int) -> argparse.ArgumentParser:
    """The options both benchmarks take; each adds its own."""
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--num-ranks", type=int, default=4)
    p.add_argument("--model", choices=sorted(MODELS), default="deepseek-v3")
    p.add_argument("--tokens", type=int, default=tokens)
    p.add_argument("--top-k", type=int, default=8)
    p.add_argument("--iters", type=int, default=iters)
    p.add_argument("--rounds", type=int, default=rounds)
    p.add_argument("--with-symm-mem", action="store_true",
                   help="also time torch.ops.symm_mem.all_to_all_vdev_2d (initializes NVSHMEM)")
    p.add_argument("--profile", default=None, help="directory for torch.profiler (TensorBoard) traces")
    p.add_argument("--out", default=None, metavar="DIR",
                   help="directory for one JSON file per run (the table is printed either way)")
    p.add_argument("--rank", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--port", type=int, default=None, help=argparse.SUPPRESS)
    return p


def rank_setup(args):
    """Bind this rank's GPU, connect to the launcher's store, join the NCCL group; ``(device, store)``."""
    import torch
    import torch.distributed as dist

    torch.cuda.set_device(args.rank)
    dev = torch.device("cuda", args.rank)
    store = dist.TCPStore("127.0.0.1", args.port, is_master=False, timeout=datetime.timedelta(seconds=300))
    dist.init_process_group("nccl", store=store, rank=args.rank, world_size=args.num_ranks, device_id=dev)
    return dev, store


def run(script: str, args: argparse.Namespace, worker) -> int:
    """In a rank process (``--rank`` given) run ``worker(args)``; otherwise start one process per rank."""
    if args.rank is not None:
        worker(args)
        return 0
    sys.path.insert(0, os.path.join(ROOT, "tests", "gpu"))
    from launch import run_rank_script
    return run_rank_script(script, sys.argv[1:], args.num_ranks)


# Timed sets that are a kernel set launched differently: name -> FusedBuffer options.
LAUNCH_VARIANTS = {"v2-pdl": {"kernels": "v2", "pdl": True}}


def kernel_sets(arg: str, *, launch_variants: bool = False) -> list[str]:
    """``--kernels v1,v2`` as a list (each a ``KernelVariant.kernels`` value, or with
    ``launch_variants`` a name of ``LAUNCH_VARIANTS``), in the given order."""
    from eep.fused.compile import KERNEL_SETS

    allowed = tuple(KERNEL_SETS) + (tuple(LAUNCH_VARIANTS) if launch_variants else ())
    names = list(dict.fromkeys(n.strip() for n in arg.split(",") if n.strip()))
    bad = [n for n in names if n not in allowed]
    if bad or not names:
        raise ValueError(f"--kernels {arg!r}: choose from {allowed}")
    return names


def set_options(name: str) -> dict:
    """``FusedBuffer`` options of a timed set: ``kernels=name``, or a launch variant's options (PDL off
    unless the variant turns it on, whatever ``EEP_FUSED_PDL`` says)."""
    return dict(LAUNCH_VARIANTS.get(name, {"kernels": name, "pdl": False}))


def working_sets(torch, dist, sets: list[str], bufs: dict, warm_step) -> tuple[list[str], list[str]]:
    """Run one eager step of each kernel set (``warm_step(set)``) on every rank; a set in which any rank
    missed a deadline is left out (its timed graphs would wait out the timeout at every step) and
    returned second, so the other sets are still timed and the run says what was not. A set whose
    step raises on a rank (e.g. a launch attribute the driver refuses) is left out the same way."""
    ok, broken = [], []
    for k in sets:
        dist.barrier()
        try:
            warm_step(k)
            torch.cuda.synchronize()
            failed = any(bufs[k].status().miss_count)
        except Exception as e:  # noqa: BLE001 - reported, and the other sets still timed
            print(f"rank {dist.get_rank()}: kernel set {k} failed its eager step: {e!r}", flush=True)
            failed = True
        missed = [None] * dist.get_world_size()
        dist.all_gather_object(missed, failed)
        (broken if any(missed) else ok).append(k)
    return ok, broken


def time_calls(torch, body, iters: int, dist=None) -> float:
    """Seconds per call of ``body`` over ``iters`` calls back to back (CUDA events around the loop),
    every rank starting together when ``dist`` is given."""
    if dist is not None:
        dist.barrier()
    torch.cuda.synchronize()
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    a.record()
    for _ in range(iters):
        body()
    b.record()
    b.synchronize()
    return a.elapsed_time(b) / 1e3 / iters


def time_replay(torch, dist, graph, iters: int) -> float:
    """Seconds per step of ``graph`` (``iters`` steps) in steady state, every rank starting together:
    the graph is replayed twice back to back and CUDA events time the second replay. Its host launch
    is queued while the first one runs, and the first step after another graph (caches, TLB) falls in
    the first replay: a back-to-back serving loop pays neither, and timing them made whichever graph
    came first in a round look slower (an A/A ratio below 1)."""
    dist.barrier()
    torch.cuda.synchronize()
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    graph.replay()
    a.record()
    graph.replay()
    b.record()
    b.synchronize()
    return a.elapsed_time(b) / 1e3 / iters


def print_table(title: str, header: list[str], rows: list[list]) -> None:
    """A markdown table on stdout (what RESULTS.md quotes)."""
    print(f"\n{title}\n| " + " | ".join(header) + " |\n|" + " --- |" * len(header), flush=True)
    for row in rows:
        print("| " + " | ".join(str(c) for c in row) + " |", flush=True)


def write_result(out_dir: str | None, name: str, row: dict) -> None:
    """Print the run's JSON and, with ``--out DIR``, write it to ``DIR/<name>.json``."""
    print("RESULT " + json.dumps(row), flush=True)
    if out_dir:
        os.makedirs(out_dir, exist_ok=True)
        with open(os.path.join(out_dir, f"{name}.json"), "w") as f:
            json.dump(row, f, indent=1)
