"""One rank process of the fused GPU tests (started by tests/gpu/launch.py, never by torchrun).

Scenarios (``--scenario``):
  diff   differential cases against eep.reference: random and skewed routing, zero-token ranks,
         a masked rank (which then rejoins with aligned sequence numbers), poisoned outputs.
  graph  capture route_to_phys + dispatch + experts + combine once; replay with fresh inputs;
         mask the last rank (its process exits) and replay; a new process takes the last rank's
         slot, survivors add_peer + set_membership and replay the same graph.
  join   the new process of the graph scenario.
  prefill the packed (prefill) mode against eep.reference.prefill: random, skewed, zero-token
         ranks, a masked rank with stale routes into it, unmasked again (timings: perf/bench_prefill.py).
         ``--combine-variant push|spread|pull`` picks the combine kernels; with pull, cases alternate
         between passing a separate partial tensor (copied) and writing into combine_input().
         ``--decode-variant pull`` (diff/graph/join/kill) runs the experimental decode kernels;
         its diff cases alternate between experts writing into combine_input() and a staged y.
         ``--kernels v2`` (every scenario) runs kernel set v2 instead of v1.
  late   (and late_prefill) the last rank starts one step's dispatch later than the deadline (a GPU
         sleep): the others give up on it, drop its tokens and must send back zeros for it, not the
         rows of an earlier step (comb_x is poisoned with NaN first); its combine output then lacks
         exactly their contributions, theirs lack its experts' (a suspect is not waited for at combine);
         every step is bounded; after set_membership (the runtime's "alive" verdict) the next step is whole.
  kill   steps in a loop; the launcher SIGKILLs the last rank; survivors must finish the step
         within the timeout, see it in status(), still access the dead rank's mapped buffer,
         mask it and compute correct results.
Rank r runs on GPU r modulo the visible GPUs, so every scenario also runs (slowly) with several
ranks on one GPU. Each rank writes ``<out>/<scenario>.rank<r>.json`` with ``errors`` (empty when
everything matched).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from eep.fused.buffer import FusedBuffer  # noqa: E402
from eep.state import Membership  # noqa: E402
from fused_cases import (case_phys, compare_prefill_rank, compare_rank, expert_scale, fake_experts,  # noqa: E402
                         make_case, oracle, prefill_fake_experts, prefill_oracle, two_replica_placement)


class Barrier:
    """Host barrier among named participants through the store (no collective library)."""

    def __init__(self, store, prefix: str) -> None:
        self.store, self.prefix, self.n = store, prefix, 0

    def wait(self, count: int, timeout_s: float = 120.0) -> None:
        self.n += 1
        key = f"{self.prefix}/{self.n}"
        self.store.add(key, 1)
        deadline = time.time() + timeout_s
        while self.store.add(key, 0) < count:
            if time.time() > deadline:
                raise TimeoutError(f"barrier {key}: {self.store.add(key, 0)}/{count} arrived")
            time.sleep(0.002)


def poison_outputs(buf: FusedBuffer, x: torch.Tensor) -> torch.Tensor:
    """Fill every output the step must write with garbage; returns the poisoned combine output."""
    recv = buf.recv_views()
    if recv.scale is not None:  # FP8: 0x7f is e4m3fn NaN
        recv.x.view(torch.uint8).fill_(0x7F)
        recv.scale.fill_(float("nan"))
    else:
        recv.x.fill_(float("nan"))
    recv.src_token.fill_(-77)
    recv.count.fill_(-5)
    buf.handle_pos.fill_(-99)
    if getattr(buf, "decode", "push") == "pull":  # what the pull combine reads
        buf.combine_input().fill_(float("nan"))
    out = torch.full((x.shape[0], x.shape[1]), float("nan"), dtype=torch.bfloat16, device=x.device)
    torch.cuda.synchronize()
    return out


def finish_step(buf, x, phys, weights, scale, out):
    """Dispatch, fake experts, combine; returns CPU copies for comparison."""
    recv, handle = buf.dispatch(x, phys)
    xq = recv.dequantized()  # recv.x itself for bf16
    y = fake_experts(xq, scale)
    if getattr(buf, "decode", "push") == "pull":  # alternate: experts write in place / combine stages y
        buf.pull_steps = getattr(buf, "pull_steps", 0) + 1
        if buf.pull_steps % 2:
            y = buf.combine_input().copy_(y)
    if getattr(buf, "kernel_set", "v1") == "v2" and recv.scale is None:
        # alternate: experts write their outputs over their inputs (y aliases the receive buffer, which
        # peers' next dispatch writes into; v2 reads this rank's own rows of y in place)
        buf.alias_steps = getattr(buf, "alias_steps", 0) + 1
        if buf.alias_steps % 2:
            xq = xq.clone()  # what arrived, for the comparison
            y = recv.x.copy_(y)
    buf.combine(y, handle, weights, out=out)
    torch.cuda.synchronize()
    return (xq.cpu(), recv.count.cpu(), recv.src_token.cpu(), handle.position.cpu(), out.cpu())


def make_buffer(args, store, *, connect=None, fixed=False) -> FusedBuffer:
    return FusedBuffer(args.rank, args.num_ranks, slots_per_rank=args.slots, max_tokens_per_rank=args.max_tokens,
                       hidden=args.hidden, top_k=args.top_k, store=store, group=args.group, connect=connect,
                       fixed_membership=fixed, timeout_s=args.timeout_s, device=args.gpu, use_fp8=args.fp8,
                       decode=args.decode_variant, kernels=args.kernels)


def shape_kwargs(args):
    return dict(num_ranks=args.num_ranks, slots_per_rank=args.slots, max_tokens=args.max_tokens,
                hidden=args.hidden, top_k=args.top_k)


def one_case(args, buf, barrier, participants, case_seed, errors, label, **case_kw):
    """Run one differential case on this rank; every participant calls it with the same arguments."""
    placement = two_replica_placement(args.num_ranks, args.slots)
    case = make_case(case_seed, **shape_kwargs(args), **case_kw)
    dev = torch.device("cuda", args.gpu)
    x = case.x[args.rank].to(dev)
    phys = case_phys(case, placement, args.rank, device=dev)
    w = case.weights[args.rank].to(dev)
    scale = expert_scale(args.slots).to(dev)
    out = poison_outputs(buf, x)
    barrier.wait(participants)  # nobody writes into a peer before it finished poisoning
    got = finish_step(buf, x, phys, w, scale, out)
    orc = oracle(case, placement, args.max_tokens, fp8=args.fp8)
    errs = compare_rank(args.rank, orc, *got)
    errors.extend(f"{label}: {e}" for e in errs)
    barrier.wait(participants)  # nobody poisons before every peer finished reading its results
    return not errs


def mask_last_then_unmask(args, store, buf, barrier, run_case, seed, errors, label, **masked_kw) -> None:
    """Mask the last rank for one case (it sits out, the others exclude it everywhere), then take it
    back (every member adopts epoch 2, which restarts everyone's steps at its first tag, as for a
    rejoining rank) and run one more case with everyone.
    ``run_case``: ``one_case`` or ``prefill_case`` (same arguments); ``masked_kw`` goes to the masked case."""
    R, last = args.num_ranks, args.num_ranks - 1
    mask = [True] * R
    mask[last] = False
    if args.rank != last:
        buf.set_membership(Membership(R, active=mask, epoch=1))
        run_case(args, buf, barrier, R - 1, seed + 1, errors, label, active=mask, **masked_kw)
        barrier.wait(R)
    else:
        barrier.n += 2  # skip the two barriers of the masked case
        barrier.wait(R)
    buf.set_membership(Membership(R, epoch=2))
    run_case(args, buf, barrier, R, seed + 2, errors, "after-unmask")


def scenario_diff(args, store, result) -> None:
    errors = result["errors"]
    buf = make_buffer(args, store, fixed=args.fixed)
    barrier = Barrier(store, f"{args.group}/bar")
    R, last = args.num_ranks, args.num_ranks - 1
    seed = args.seed
    cases = [("random", {}), ("skewed", {"routing": "skewed"}), ("zero-tokens", {"zero_ranks": (0, last)}),
             ("random2", {})]
    for label, kw in cases:
        seed += 1
        one_case(args, buf, barrier, R, seed, errors, label, **kw)
    result["cases"] = [c[0] for c in cases]
    if not args.fixed and R > 2:
        mask_last_then_unmask(args, store, buf, barrier, one_case, seed, errors, "masked")
        result["cases"] += ["masked", "after-unmask"]
    st = buf.status()
    result["status"] = st.__dict__
    if any(st.miss_count):
        errors.append(f"rank {args.rank}: deadlines missed in a healthy run: {st.miss_count}")
    buf.close()


def scenario_graph(args, store, result) -> None:
    errors = result["errors"]
    R, last, dev = args.num_ranks, args.num_ranks - 1, torch.device("cuda", args.gpu)
    buf = make_buffer(args, store)
    barrier = Barrier(store, f"{args.group}/gbar")
    g, statics = capture(args, buf)
    replay_and_check(args, store, buf, g, statics, barrier, R, [True] * R, args.seed + 1, errors, "replay-all")
    replay_and_check(args, store, buf, g, statics, barrier, R, [True] * R, args.seed + 2, errors, "replay-all-2")
    mask = [True] * R
    mask[last] = False
    if args.rank == last:
        store.set(f"{args.group}/left", "1")
        result["note"] = "left after two replays (the failure)"
        return  # the process exits: a failed rank
    buf.set_membership(Membership(R, active=mask, epoch=1))
    replay_and_check(args, store, buf, g, statics, barrier, R - 1, mask, args.seed + 3, errors, "replay-masked")
    # the launcher starts a new process for the last rank slot; it publishes its buffer
    store.wait([f"{args.group}/joined"], _td(300))
    t0 = time.perf_counter()
    buf.connect([last], timeout_s=60.0)
    buf.set_membership(Membership(R, epoch=2))
    torch.cuda.synchronize()
    result["rejoin_survivor_s"] = time.perf_counter() - t0
    store.add(f"{args.group}/admitted", 1)
    replay_and_check(args, store, buf, g, statics, barrier, R, [True] * R, args.seed + 4, errors, "replay-rejoined")
    replay_and_check(args, store, buf, g, statics, barrier, R, [True] * R, args.seed + 5, errors, "replay-rejoined-2")
    buf.close()


def scenario_join(args, store, result) -> None:
    errors = result["errors"]
    R = args.num_ranks
    store.wait([f"{args.group}/left"], _td(300))
    buf = make_buffer(args, store, connect=[r for r in range(R) if r != args.rank])
    buf.set_membership(Membership(R, epoch=2))  # the epoch the survivors admit it in: same first tag
    g, statics = capture(args, buf)
    barrier = Barrier(store, f"{args.group}/gbar")
    barrier.n = 3 * 2  # the survivors' barrier count so far: three replays, two barriers each
    store.set(f"{args.group}/joined", "1")
    while store.add(f"{args.group}/admitted", 0) < R - 1:
        time.sleep(0.002)
    replay_and_check(args, store, buf, g, statics, barrier, R, [True] * R, args.seed + 4, errors, "replay-rejoined")
    replay_and_check(args, store, buf, g, statics, barrier, R, [True] * R, args.seed + 5, errors, "replay-rejoined-2")
    buf.close()


def capture(args, buf):
    """One captured step over static inputs; returns the graph and its static tensors."""
    from eep.routing.route import route_to_phys
    dev = torch.device("cuda", args.gpu)
    placement = two_replica_placement(args.num_ranks, args.slots)
    T = args.max_tokens
    statics = {
        "x": torch.randn(T, args.hidden, device=dev).to(torch.bfloat16),
        "ids": torch.zeros(T, args.top_k, dtype=torch.int64, device=dev),
        "w": torch.rand(T, args.top_k, device=dev),
        "l2p": placement.logical_to_phys[0].to(dev),
        "scale": expert_scale(args.slots).to(dev),
        "out": torch.empty(T, args.hidden, dtype=torch.bfloat16, device=dev),
    }
    statics["ids"].copy_(torch.arange(args.top_k).repeat(T, 1))
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        phys = route_to_phys(statics["ids"], statics["l2p"], buf.active_mask, args.slots)
        recv, handle = buf.dispatch(statics["x"], phys)
        y = fake_experts(recv.x, statics["scale"])
        buf.combine(y, handle, statics["w"], out=statics["out"])
        statics["phys"], statics["position"], statics["recv"] = phys, handle.position, recv
    return g, statics


def replay_and_check(args, store, buf, g, statics, barrier, participants, active, seed, errors, label):
    """Fresh inputs into the static tensors (all ranks send max_tokens), poison, replay, compare."""
    placement = two_replica_placement(args.num_ranks, args.slots)
    case = make_case(seed, **shape_kwargs(args), active=active)
    T = args.max_tokens
    # graphs have a static token count: regenerate with exactly max_tokens per rank
    g_ = torch.Generator().manual_seed(seed)
    num_experts = args.num_ranks * args.slots // 2
    for r in range(args.num_ranks):
        case.x[r] = torch.randn(T, args.hidden, generator=g_).to(torch.bfloat16)
        case.topk_ids[r] = torch.rand(T, num_experts, generator=g_).topk(args.top_k, dim=-1).indices
        case.weights[r] = torch.softmax(torch.randn(T, args.top_k, generator=g_), -1)
        case.num_tokens[r] = T
    statics["x"].copy_(case.x[args.rank])
    statics["ids"].copy_(case.topk_ids[args.rank])
    statics["w"].copy_(case.weights[args.rank])
    recv = statics["recv"]
    recv.x.fill_(float("nan"))
    recv.src_token.fill_(-77)
    recv.count.fill_(-5)
    statics["out"].fill_(float("nan"))
    torch.cuda.synchronize()
    barrier.wait(participants)
    g.replay()
    torch.cuda.synchronize()
    got = (recv.x.cpu(), recv.count.cpu(), recv.src_token.cpu(), statics["position"].cpu(), statics["out"].cpu())
    errs = compare_rank(args.rank, oracle(case, placement, T), *got)
    errors.extend(f"{label}: {e}" for e in errs)
    barrier.wait(participants)


def scenario_kill(args, store, result) -> None:
    """Loop steps until the launcher kills the last rank; survivors measure what it cost them."""
    errors = result["errors"]
    R, last, dev = args.num_ranks, args.num_ranks - 1, torch.device("cuda", args.gpu)
    buf = make_buffer(args, store)
    placement = two_replica_placement(R, args.slots)
    scale = expert_scale(args.slots).to(dev)
    barrier = Barrier(store, f"{args.group}/kbar")
    barrier.wait(R)
    # every process runs the same fixed number of steps (lockstep); the launcher kills the last
    # rank once it reports step KILL_AFTER_STEP, so survivors meet the dead peer mid-run
    step_times, detected_at = [], None
    for step in range(args.kill_steps):
        case = make_case(args.seed + step, **shape_kwargs(args))
        x = case.x[args.rank].to(dev)
        phys = case_phys(case, placement, args.rank, device=dev)
        w = case.weights[args.rank].to(dev)
        out = torch.empty(x.shape[0], args.hidden, dtype=torch.bfloat16, device=dev)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        recv, handle = buf.dispatch(x, phys)
        buf.combine(fake_experts(recv.x, scale), handle, w, out=out)
        torch.cuda.synchronize()
        step_times.append(time.perf_counter() - t0)
        if args.rank == last:
            store.set(f"{args.group}/steps", str(step))
        elif detected_at is None and buf.status().miss_count[last]:
            detected_at = step
        time.sleep(0.01)
    if args.rank == last:
        errors.append("the last rank was not killed during the run")
        return
    if detected_at is None:
        errors.append(f"rank {args.rank}: the killed rank was never detected in {args.kill_steps} steps")
        return
    st = buf.status()
    result["status"] = st.__dict__
    result["detected_at"] = detected_at
    result["step_s_before"] = sorted(step_times[:detected_at])[len(step_times[:detected_at]) // 2] if detected_at else None
    result["step_s_detect"] = step_times[detected_at]
    result["step_s_after"] = step_times[detected_at + 1:]
    if step_times[detected_at] > args.timeout_s + 0.25:
        errors.append(f"rank {args.rank}: the step that met the dead peer took {step_times[detected_at]:.3f} s, "
                      f"more than timeout {args.timeout_s} s + 0.25 s")
    slow = [round(t, 3) for t in step_times if t > 0.25]
    result["slow_steps_s"] = slow
    if len(slow) > 2 or max(step_times) > args.timeout_s + 0.25:
        errors.append(f"rank {args.rank}: the dead peer cost more than one timeout: slow steps {slow}")
    if any(st.miss_count[r] for r in range(R) if r != last):
        errors.append(f"rank {args.rank}: a live rank was reported: {st.miss_count}")
    # the dead exporter's memory: survivors can still read and write their mapping of it
    try:
        from eep.fused.peer_memory import tensor_at
        dead = tensor_at(buf._imports[last].ptr, 1 << 20, dev)
        dead.fill_(7)
        result["dead_peer_memory_ok"] = bool(int(dead.sum()) == 7 * (1 << 20))
        torch.cuda.synchronize()
    except Exception as exc:  # record, do not fail: this is a measurement
        result["dead_peer_memory_ok"] = f"error: {exc!r}"
    # survivors agree (host barrier), mask the dead rank and must compute correct results
    survivors = R - 1
    barrier.wait(survivors)
    mask = [True] * R
    mask[last] = False
    buf.set_membership(Membership(R, active=mask, epoch=1))
    for i in range(2):
        one_case(args, buf, barrier, survivors, args.seed + 10**6 + i, errors, f"after-kill-{i}", active=mask)
    result["context_healthy"] = True
    buf.close()


def make_prefill_buffer(args, store, *, fixed=False):
    from eep.fused.prefill import PrefillBuffer
    return PrefillBuffer(args.rank, args.num_ranks, slots_per_rank=args.slots, max_tokens_per_rank=args.max_tokens,
                         hidden=args.hidden, top_k=args.top_k, store=store, group=args.group + "-p",
                         fixed_membership=fixed, timeout_s=args.timeout_s, device=args.gpu,
                         combine_variant=args.combine_variant, kernels=args.kernels)


def prefill_step(buf, x, phys, w, scale, out, *, via_view=False):
    """Dispatch, fake experts per entry, local partial sums, combine (what a prefill step does).
    ``via_view``: the partial sums go straight into the buffer's combine_input() (pull variant)."""
    from eep.reference.prefill import partial_combine
    recv, handle = buf.dispatch(x, phys, w)
    partial = partial_combine(recv, prefill_fake_experts(recv, scale), scale.shape[0]).contiguous()
    if via_view:
        staged = buf.combine_input()
        staged.copy_(partial)
        partial = staged
    buf.combine(partial, handle, out=out)
    return recv, handle


def poison_prefill(buf, num_tokens):
    recv = buf.recv_views()
    recv.x.fill_(float("nan"))
    recv.src_token.fill_(-77)
    recv.local_slot.fill_(-55)
    recv.weight.fill_(float("nan"))
    recv.count.fill_(-5)
    buf.dst_row.fill_(-99)
    if buf.combine_variant == "pull":  # the rows peers pull: NaN wherever a step fails to write them
        buf.combine_input().fill_(float("nan"))
    out = torch.full((num_tokens, buf.layout.hidden), float("nan"), dtype=torch.bfloat16, device=buf.device)
    torch.cuda.synchronize()
    return out


def prefill_case(args, buf, barrier, participants, seed, errors, label, *, stale=False, **case_kw):
    placement = two_replica_placement(args.num_ranks, args.slots)
    case = make_case(seed, **shape_kwargs(args), **case_kw)
    dev = torch.device("cuda", args.gpu)
    routed = case if not stale else make_case(seed, **shape_kwargs(args), **{**case_kw, "active": None})
    x, w = case.x[args.rank].to(dev), case.weights[args.rank].to(dev)
    phys = case_phys(routed, placement, args.rank, device=dev)
    scale = expert_scale(args.slots).to(dev)
    out = poison_prefill(buf, x.shape[0])
    barrier.wait(participants)
    via_view = buf.combine_variant == "pull" and seed % 2 == 1  # both pull entry paths, alternately
    recv, handle = prefill_step(buf, x, phys, w, scale, out, via_view=via_view)
    torch.cuda.synchronize()
    got = (recv.count.cpu(), recv.src_token.cpu(), recv.x.cpu(), recv.local_slot.cpu(), recv.weight.cpu(),
           handle.dst_row.cpu(), out.cpu())
    errs = compare_prefill_rank(args.rank, prefill_oracle(case, placement, args.max_tokens, stale=stale), *got)
    errors.extend(f"{label}: {e}" for e in errs)
    barrier.wait(participants)
    return not errs


def scenario_prefill(args, store, result) -> None:
    errors = result["errors"]
    R, last = args.num_ranks, args.num_ranks - 1
    buf = make_prefill_buffer(args, store, fixed=args.fixed)
    barrier = Barrier(store, f"{args.group}/pbar")
    seed = args.seed
    for label, kw in [("random", {}), ("skewed", {"routing": "skewed"}), ("zero-tokens", {"zero_ranks": (0, last)})]:
        seed += 1
        prefill_case(args, buf, barrier, R, seed, errors, label, **kw)
    if not args.fixed and R > 2:
        mask_last_then_unmask(args, store, buf, barrier, prefill_case, seed, errors, "masked-stale-routes", stale=True)
    st = buf.status()
    result["status"] = st.__dict__
    if any(st.miss_count):
        errors.append(f"rank {args.rank}: deadlines missed in a healthy prefill run: {st.miss_count}")
    buf.close()


def _late_step(args, store, buf, barrier, seed, errors, *, prefill: bool) -> dict:
    """One step in which the last rank's dispatch starts ~1.3 deadlines late (see the module doc)."""
    R, late, dev = args.num_ranks, args.num_ranks - 1, torch.device("cuda", args.gpu)
    placement = two_replica_placement(R, args.slots)
    case = make_case(seed, **shape_kwargs(args))
    x, w = case.x[args.rank].to(dev), case.weights[args.rank].to(dev)
    phys = case_phys(case, placement, args.rank, device=dev)
    scale = expert_scale(args.slots).to(dev)
    out = poison_prefill(buf, x.shape[0]) if prefill else poison_outputs(buf, x)
    buf.combine_input().fill_(float("nan"))  # comb_x: what a dropped source would read if nobody wrote it
    before = buf.status().miss_count
    torch.cuda.synchronize()
    barrier.wait(R)
    if args.rank == late:  # ~2 GHz SM clock: 1.3 deadlines (1.6 at 1.6 GHz), less than the others' two
        torch.cuda._sleep(int(1.3 * args.timeout_s * 2.0e9))
    t0 = time.perf_counter()
    if prefill:
        recv, handle = prefill_step(buf, x, phys, w, scale, out)
    else:
        finish = finish_step(buf, x, phys, w, scale, out)
    torch.cuda.synchronize()
    took = time.perf_counter() - t0
    # The others gave up on the late rank at dispatch, so its tokens lose their contributions; having
    # made it a suspect, they do not wait for it at combine either, so their tokens lose the late
    # rank's experts' contributions (a late peer costs one deadline per step, not two).
    dropped = {r: ([q for q in range(R) if q != late] if r == late else [late]) for r in range(R)}
    if prefill:
        want = prefill_oracle(case, placement, args.max_tokens, dropped_by=dropped).out[args.rank]
        got, count, src_token = out.cpu(), recv.count.cpu(), recv.src_token.cpu()
        dropped_rows = None if args.rank == late else (count[late].item() == 0)
    else:
        want = oracle(case, placement, args.max_tokens, fp8=args.fp8, dropped_by=dropped).out[args.rank]
        got, count, src_token = finish[4], finish[1], finish[2]
        dropped_rows = None if args.rank == late else bool((count[:, late] == 0).all() and (src_token[:, late] == -1).all())
    if not torch.equal(got, want):
        diff = (got.float() - want.float()).abs()
        errors.append(f"late step, rank {args.rank}: combine output differs in {int((diff != 0).sum())} elements "
                      f"(nan {int(diff.isnan().sum())}), max {float(diff.nan_to_num(1e9).max())}")
    after = buf.status().miss_count
    if args.rank != late:
        if dropped_rows is False:
            errors.append(f"late step, rank {args.rank}: the late rank's tokens were not dropped")
        if after[late] <= before[late]:
            errors.append(f"late step, rank {args.rank}: the late rank's miss was not recorded: {before} -> {after}")
    if took > 2 * args.timeout_s + 0.5:
        errors.append(f"late step, rank {args.rank}: took {took:.3f} s, more than two deadlines + 0.5 s")
    barrier.wait(R)
    return {"late_step_s": round(took, 3), "miss_count": after}


def scenario_late(args, store, result, *, prefill: bool = False) -> None:
    errors = result["errors"]
    R = args.num_ranks
    if prefill and args.combine_variant == "pull":
        # prefill pull reads the expert rank's partial rows as its caller left them: not covered here
        errors.append("the late_prefill scenario covers the push and spread combine kernels only")
        return
    buf = make_prefill_buffer(args, store) if prefill else make_buffer(args, store)
    barrier = Barrier(store, f"{args.group}/late")
    run_case = prefill_case if prefill else one_case
    run_case(args, buf, barrier, R, args.seed + 1, errors, "before-late")  # real rows everywhere first
    result.update(_late_step(args, store, buf, barrier, args.seed + 2, errors, prefill=prefill))
    if args.rank != R - 1 and not buf.status().suspect[R - 1]:
        errors.append(f"rank {args.rank}: the late rank is not a suspect after its miss")
    # the runtime's verdict on the evidence: the late rank is alive, keep it (clears the suspicions;
    # until then nobody waits for a suspect, so the next step would drop it again)
    buf.set_membership(Membership(R, epoch=1))
    run_case(args, buf, barrier, R, args.seed + 3, errors, "after-late")
    buf.close()


def _td(seconds):
    import datetime
    return datetime.timedelta(seconds=seconds)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--scenario", required=True)
    p.add_argument("--rank", type=int, required=True)
    p.add_argument("--num-ranks", type=int, required=True)
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--group", default="t")
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--slots", type=int, default=8)
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--top-k", type=int, default=8)
    p.add_argument("--timeout-s", type=float, default=2.0)
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--fixed", action="store_true")
    p.add_argument("--kill-steps", type=int, default=60)
    p.add_argument("--fp8", action="store_true", help="FP8 dispatch (diff scenario)")
    p.add_argument("--decode-variant", default="push", choices=("push", "pull"),
                   help="decode kernels (diff/graph/join/kill scenarios): FusedBuffer(decode=...)")
    from eep.fused.compile import KERNEL_SETS
    p.add_argument("--kernels", default="v1", choices=KERNEL_SETS,
                   help="kernel set of every scenario's buffers: FusedBuffer/PrefillBuffer(kernels=...)")
    from eep.fused.prefill import COMBINE_VARIANTS
    p.add_argument("--combine-variant", default="push", choices=COMBINE_VARIANTS,
                   help="prefill combine kernels (prefill scenario; eep.fused.prefill.COMBINE_VARIANTS)")
    args = p.parse_args()
    # more ranks than GPUs (a one-GPU machine): ranks share GPUs round-robin, one process each. The
    # kernels' peer waits then progress by time-slicing between the processes' contexts: a correctness
    # run only (timings from such a run mean nothing).
    args.gpu = args.rank % torch.cuda.device_count()
    from torch.distributed import TCPStore
    store = TCPStore("127.0.0.1", args.port, is_master=False, timeout=_td(300))
    result = {"rank": args.rank, "scenario": args.scenario, "errors": [], "pid": os.getpid()}
    path = os.path.join(args.out, f"{args.scenario}.{args.group}.rank{args.rank}.json")
    try:
        {"diff": scenario_diff, "graph": scenario_graph, "join": scenario_join, "kill": scenario_kill,
         "prefill": scenario_prefill, "late": scenario_late,
         "late_prefill": lambda a, s, r: scenario_late(a, s, r, prefill=True)}[args.scenario](
            args, store, result)
    except Exception:
        result["errors"].append(f"rank {args.rank} raised:\n{traceback.format_exc()}")
    with open(path, "w") as f:
        json.dump(result, f, indent=1, default=str)
    print(f"[{args.scenario} rank {args.rank}] errors={len(result['errors'])}", flush=True)
    for e in result["errors"]:
        print(f"[{args.scenario} rank {args.rank}] {e}", flush=True)


if __name__ == "__main__":
    main()
