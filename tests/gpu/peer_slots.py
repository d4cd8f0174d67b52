"""On a GPU: a rank's slots (``RankSlots``) in VMM memory, copied device to device by another process.

    python tests/gpu/peer_slots.py [--out DIR] [--device cpu]   (cpu: the same checks on shared host memory)

A child process (the exporter, rank 0) allocates its slots in one VMM allocation, fills them from a
host tier and publishes them (``weights/0``); this process (rank 1) then:
1. copies replicas out of the exporter's slots (a plan part with peer transfers) on its copy
   stream: bit-exact, served by "peer", one CUDA event pair per layer batch;
2. copies them again in the background (re-replication) while the compute stream runs matmuls:
   bit-exact, nothing switched until the plan's commit, which finds every copy held;
3. times a larger peer copy batch (qwen3-30b-a3b expert size) on the copy stream and reports GB/s
   beside the planner's peer bandwidth;
4. SIGKILLs the exporter: a fresh rank that never mapped it falls back to the host tier.
Writes ``peer_slots.json`` under ``--out``; exits non-zero on any failed check.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from eep.repair import Bandwidth, TensorTier, Transfer  # noqa: E402
from eep.runtime.engines.slots import PlanPart, RankSlots  # noqa: E402
from eep.state import NO_EXPERT, ExpertPlacement  # noqa: E402

L = 2


def shape(big: bool) -> tuple[int, int, int]:
    """(slots per rank = experts, hidden, intermediate): small for the exactness checks, qwen3's for timing."""
    return (16, 2048, 768) if big else (8, 256, 128)


def weights(experts: int, hidden: int, inter: int, seed: int = 0) -> dict:
    gen = torch.Generator().manual_seed(seed)
    return {layer: tuple((torch.randn(experts, *s, generator=gen) / 8).to(torch.bfloat16)
                         for s in ((inter, hidden), (inter, hidden), (hidden, inter))) for layer in range(L)}


DEVICE = torch.device("cuda", 0)


def make_slots(rank: int, store, big: bool, incarnation: int = 0) -> RankSlots:
    S, H, I = shape(big)
    return RankSlots(rank=rank, num_ranks=2, num_layers=L, slots_per_rank=S, hidden=H, intermediate=I,
                     dtype=torch.bfloat16, device=DEVICE, store=store, run_id="gpu", incarnation=incarnation)


def placement(rows: list[list[int]], S: int) -> ExpertPlacement:
    return ExpertPlacement.from_phys_to_logical(torch.tensor(rows), num_ranks=2, slots_per_rank=S, num_experts=S)


def nbytes(big: bool) -> int:
    _, H, I = shape(big)
    return 3 * H * I * 2


def exporter(port: int, big: bool) -> None:
    """Rank 0: slots filled from a host tier (expert i in slot i), published, then wait to be killed."""
    store = dist.TCPStore("127.0.0.1", port, is_master=False)
    S, H, I = shape(big)
    slots = make_slots(0, store, big)
    rows = [list(range(S)) + [NO_EXPERT] * S] * L
    transfers = [Transfer(layer, layer, i, "host", None, None, 0, i, nbytes(big)) for layer in range(L)
                 for i in range(S)]
    report = slots.execute(PlanPart(0, placement(rows, S), [True, True], transfers), [TensorTier(weights(S, H, I))])
    assert report.num_copied == len(transfers)
    store.set(f"ready-{int(big)}", "1")
    time.sleep(600)


def check(out: dict, name: str, ok: bool, detail: str = "") -> None:
    out["checks"][name] = {"ok": bool(ok), "detail": detail}
    print(f"{'ok  ' if ok else 'FAIL'} {name} {detail}", flush=True)


def holds(slots: RankSlots, w: dict, layer: int, slot: int, expert: int) -> bool:
    I = slots.inter
    return (torch.equal(slots.w13[layer, slot, :I].cpu(), w[layer][0][expert])
            and torch.equal(slots.w13[layer, slot, I:].cpu(), w[layer][1][expert])
            and torch.equal(slots.w2[layer, slot].cpu(), w[layer][2][expert]))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="/tmp/eep-gpu-out")
    ap.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    ap.add_argument("--exporter", default=None, help=argparse.SUPPRESS)  # internal: "PORT BIG"
    args = ap.parse_args()
    global DEVICE
    DEVICE = torch.device("cuda", 0) if args.device == "cuda" else torch.device("cpu")
    if args.exporter:
        port, big = args.exporter.split()
        exporter(int(port), big == "1")
        return 0
    out: dict = {"device": torch.cuda.get_device_name(0) if DEVICE.type == "cuda" else "cpu", "checks": {}}
    store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
    children = []
    try:
        for big in (False, True):
            children.append(subprocess.Popen([sys.executable, __file__, "--exporter", f"{store.port} {int(big)}",
                                              "--device", args.device], env={**os.environ, "PYTHONPATH": str(ROOT)}))
            deadline = time.monotonic() + 120
            while not store.check([f"ready-{int(big)}"]):
                if children[-1].poll() is not None or time.monotonic() > deadline:
                    raise SystemExit(f"the exporter (big={big}) did not start (exit {children[-1].poll()})")
                time.sleep(0.05)
            if not big:
                small(store, out)
            else:
                timing(store, out)
            # the exporter dies; a rank that never mapped it falls back to the tier
            os.kill(children[-1].pid, signal.SIGKILL)
            children[-1].wait(timeout=60)
            if not big:
                S, H, I = shape(False)
                fresh = make_slots(1, store, False, incarnation=1)
                part = PlanPart(0, placement([[0] + [NO_EXPERT] * (S - 1) + [3] + [NO_EXPERT] * (S - 1)] * L, S),
                                [True, False], [Transfer(layer, layer, 3, "peer", 0, 3, 1, S, nbytes(False))
                                                for layer in range(L)], incarnations={0: 0})
                report = fresh.execute(part, [TensorTier(weights(S, H, I))])
                check(out, "dead exporter: the tier serves", report.served_by == ["host"] * L
                      and holds(fresh, weights(S, H, I), 0, 0, 3), f"{report.served_by} {report.fallbacks[:1]}")
                fresh.close()
    finally:
        for child in children:
            if child.poll() is None:
                child.kill()
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "peer_slots.json").write_text(json.dumps(out, indent=1))
    return 0 if all(c["ok"] for c in out["checks"].values()) else 1


def small(store, out: dict) -> None:
    S, H, I = shape(False)
    w = weights(S, H, I)
    tier = TensorTier(w)
    mine = make_slots(1, store, False)
    try:
        # 1. peer copies into this (joining) rank's slots, on its copy stream
        moves = [Transfer(layer, layer, e, "peer", 0, e, 1, S + e, nbytes(False)) for layer in range(L) for e in (1, 2)]
        rows = [list(range(S)) + [NO_EXPERT, 1, 2] + [NO_EXPERT] * (S - 3)] * L
        part = PlanPart(0, placement(rows, S), [True, False], moves, incarnations={0: 0})
        report = mine.execute(part, [tier])
        exact = all(holds(mine, w, layer, e, e) for layer in range(L) for e in (1, 2))
        check(out, "peer copies are exact", report.served_by == ["peer"] * len(moves) and exact,
              f"served {report.served_by}, batches {report.batches}")
        check(out, "one event pair per layer batch", [b["transfers"] for b in report.batches] == [2] * L
              and all(b["seconds"] > 0 for b in report.batches), str(report.batches))
        # 2. the same copies in the background while the compute stream works, into other spare slots
        bg = [Transfer(layer, layer, e, "peer", 0, e, 1, S + e, nbytes(False)) for layer in range(L) for e in (0, 3)]
        rows_bg = [list(range(S)) + [0, 1, 2, 3] + [NO_EXPERT] * (S - 4)] * L
        target = PlanPart(0, placement(rows_bg, S), [True, True], bg, incarnations={0: 0})
        a = torch.randn(2048 if DEVICE.type == "cuda" else 64, 2048 if DEVICE.type == "cuda" else 64, device=DEVICE,
                        dtype=torch.bfloat16)
        job = mine.copy_in_background(target, [tier])
        steps = 0
        while not job.step():
            a = (a @ a).clamp_(-1, 1)  # compute-stream work the copies overlap
            steps += 1
            if steps > 10000:
                break
        if DEVICE.type == "cuda":
            torch.cuda.synchronize()
        exact = all(holds(mine, w, layer, e, e) for layer in range(L) for e in (0, 3))
        check(out, "background copies are exact", job.is_done and exact and set(job.report.served_by) == {"peer"},
              f"{steps} polls, {job.report.total_s * 1e3:.2f} ms")
        check(out, "the switch finds them held", mine.execute(target, [tier]).num_copied == 0
              and mine.placement.equal(target.placement))
    finally:
        mine.close()


def timing(store, out: dict) -> None:
    S, H, I = shape(True)
    mine = make_slots(1, store, True)
    try:
        moves = [Transfer(layer, layer, e, "peer", 0, e, 1, S + e, nbytes(True)) for layer in range(L)
                 for e in range(S)]
        rows = [list(range(S)) * 2] * L
        report = mine.execute(PlanPart(0, placement(rows, S), [True, False], moves, incarnations={0: 0}), [])
        seconds = sum(b["seconds"] for b in report.batches)
        gbps = len(moves) * nbytes(True) / seconds / 1e9
        out["peer_copy"] = {"experts": len(moves), "nbytes": len(moves) * nbytes(True), "copy_stream_s": seconds,
                            "wall_s": report.total_s, "gbps": gbps, "planner_peer_gbps": Bandwidth().peer_gbps}
        check(out, "peer copy batch timed", report.served_by == ["peer"] * len(moves) and gbps > 0,
              f"{len(moves)} experts of {nbytes(True) / 1e6:.1f} MB: {gbps:.0f} GB/s on the copy stream "
              f"(planner's peer link {Bandwidth().peer_gbps:.0f} GB/s), wall {report.total_s * 1e3:.1f} ms")
    finally:
        mine.close()


if __name__ == "__main__":
    sys.exit(main())
