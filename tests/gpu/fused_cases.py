"""Inputs and oracle results for the fused differential tests (pure torch; runs on CPU too).

Every rank process builds the same ``Case`` from the same seed, runs its own part on the GPU
and compares with ``eep.reference`` run on the CPU for all ranks.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from eep.exchange.layout import DispatchHandle, RankReceive
from eep.fp8 import dequantize_rows, quantize_rows
from eep.reference.dispatch import combine as ref_combine
from eep.reference.dispatch import dispatch as ref_dispatch
from eep.routing.route import route_to_phys
from eep.state.placement import ExpertPlacement


def two_replica_placement(num_ranks: int, slots_per_rank: int) -> ExpertPlacement:
    """``num_phys_slots / 2`` experts, expert e on slots e and e + num_experts (different ranks)."""
    num_slots = num_ranks * slots_per_rank
    num_experts = num_slots // 2
    p2l = (torch.arange(num_slots) % num_experts).unsqueeze(0)
    return ExpertPlacement.from_phys_to_logical(p2l, num_ranks=num_ranks, slots_per_rank=slots_per_rank,
                                                num_experts=num_experts)


def expert_scale(slots_per_rank: int) -> torch.Tensor:
    """Per local slot power-of-two factor: the test 'expert' is exact in bf16."""
    return torch.tensor([2.0 ** -(i % 4) for i in range(slots_per_rank)], dtype=torch.float32)


def fake_experts(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``[S, R, M, H]`` -> same shape, slot i scaled by ``scale[i]`` (exact, bf16 out)."""
    return (x.float() * scale.to(x.device).view(-1, 1, 1, 1)).to(x.dtype)


def quantize_fp8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row e4m3 quantization as the decode buffer's FP8 dispatch does it (``eep.fp8``'s format with
    one block per row): ``[n, hidden]`` -> (e4m3, ``[n]`` scale)."""
    values, scales = quantize_rows(x, block=x.shape[-1])
    return values, scales[..., 0]


def fp8_roundtrip(x: torch.Tensor) -> torch.Tensor:
    """What an FP8 dispatch delivers of ``x``, dequantized to bf16."""
    return dequantize_rows(*quantize_fp8(x)).to(torch.bfloat16)


@dataclass
class Case:
    num_tokens: list[int]
    x: list[torch.Tensor]          # per rank [T_r, H] bf16
    topk_ids: list[torch.Tensor]   # per rank [T_r, K] int64
    weights: list[torch.Tensor]    # per rank [T_r, K] float32
    active: list[bool]


def make_case(seed: int, *, num_ranks: int, slots_per_rank: int, max_tokens: int, hidden: int, top_k: int,
              routing: str = "random", zero_ranks: tuple[int, ...] = (), active: list[bool] | None = None) -> Case:
    """Fresh random tokens and routing for every rank.

    routing: ``random`` (distinct uniform experts) or ``skewed`` (expert 0 in every token's top-k).
    zero_ranks: ranks that send no tokens this step.
    """
    g = torch.Generator().manual_seed(seed)
    num_experts = num_ranks * slots_per_rank // 2
    if num_experts < top_k:
        raise ValueError(f"{num_experts} experts < top_k={top_k}")
    xs, ids, ws, counts = [], [], [], []
    for rank in range(num_ranks):
        t = 0 if rank in zero_ranks else int(torch.randint(max_tokens // 2, max_tokens + 1, (1,), generator=g))
        counts.append(t)
        xs.append(torch.randn(t, hidden, generator=g).to(torch.bfloat16))
        scores = torch.rand(t, num_experts, generator=g)
        if routing == "skewed":
            scores[:, 0] = 2.0
        ids.append(scores.topk(top_k, dim=-1).indices.to(torch.int64))
        ws.append(torch.softmax(torch.randn(t, top_k, generator=g), dim=-1))
    return Case(counts, xs, ids, ws, list(active) if active is not None else [True] * num_ranks)


def case_phys(case: Case, placement: ExpertPlacement, rank: int, *, device: str | torch.device = "cpu") -> torch.Tensor:
    """``route_to_phys`` of one rank's tokens under the case's membership."""
    mask = torch.tensor(case.active, dtype=torch.int32, device=device)
    l2p = placement.logical_to_phys[0].to(device)
    return route_to_phys(case.topk_ids[rank].to(device), l2p, mask, placement.slots_per_rank)


@dataclass
class Oracle:
    recv: list[RankReceive | None]
    handles: list[DispatchHandle | None]
    out: list[torch.Tensor | None]


def oracle(case: Case, placement: ExpertPlacement, max_tokens: int, *, fp8: bool = False,
           dropped_by: dict[int, list[int]] | None = None) -> Oracle:
    """The reference dispatch -> fake experts -> combine for every rank (CPU); with ``fp8`` the
    tokens arrive as their FP8 round trip, as the FP8 dispatch delivers them. ``dropped_by``: expert
    ranks that gave up on sources at dispatch — rank d in ``dropped_by[s]`` contributes nothing to
    source s's tokens (the fused kernels' "missed peer": its rows are absent from ``out``)."""
    S = placement.slots_per_rank
    phys = [case_phys(case, placement, r) if case.active[r] else None for r in range(len(case.active))]
    xs = [(fp8_roundtrip(x) if fp8 else x) if a else None for x, a in zip(case.x, case.active)]
    recv, handles = ref_dispatch(xs, phys, case.active, S, max_tokens)
    scale = expert_scale(S)
    ys = [fake_experts(r.x, scale) if r is not None else None for r in recv]
    for src, dsts in (dropped_by or {}).items():
        for d in dsts:
            ys[d][:, src] = 0
    out = ref_combine(ys, handles, [w if a else None for w, a in zip(case.weights, case.active)], S)
    return Oracle(recv, handles, out)


def compare_rank(rank: int, orc: Oracle, recv_x: torch.Tensor, count: torch.Tensor, src_token: torch.Tensor,
                 position: torch.Tensor, out: torch.Tensor) -> list[str]:
    """Differences between one rank's fused results (CPU copies) and the oracle; [] when equal."""
    errors = []
    want = orc.recv[rank]
    if not torch.equal(count, want.count):
        bad = (count != want.count).nonzero()[:4].tolist()
        errors.append(f"rank {rank}: count differs at [slot, src] {bad}: got "
                      f"{[int(count[i, j]) for i, j in bad]} want {[int(want.count[i, j]) for i, j in bad]}")
        return errors
    if not torch.equal(src_token, want.src_token):
        bad = (src_token != want.src_token).nonzero()[:4].tolist()
        errors.append(f"rank {rank}: src_token differs at {bad}")
    valid = torch.arange(want.x.shape[2]).view(1, 1, -1) < want.count.unsqueeze(-1)  # [S, R, M]
    if not torch.equal(recv_x[valid], want.x[valid]):
        diff = (recv_x[valid].float() - want.x[valid].float()).abs()
        errors.append(f"rank {rank}: recv.x differs in {int((diff != 0).sum())} elements (nan: "
                      f"{int(diff.isnan().sum())}), max {float(diff.nan_to_num(1e9).max())}")
    handle = orc.handles[rank]
    if not torch.equal(position.long(), handle.position):
        errors.append(f"rank {rank}: handle position differs at {(position.long() != handle.position).nonzero()[:4].tolist()}")
    if not torch.equal(out, orc.out[rank]):
        diff = (out.float() - orc.out[rank].float()).abs()
        errors.append(f"rank {rank}: combine output differs in {int((diff != 0).sum())} elements (nan: "
                      f"{int(diff.isnan().sum())}), max {float(diff.nan_to_num(1e9).max())}")
    return errors


# ---- prefill (packed) mode -----------------------------------------------------------------

@dataclass
class PrefillOracle:
    recv: list  # PackedReceive | None per rank
    handles: list  # PackedHandle | None per rank
    partial: list  # [R, M, H] bf16 | None per rank
    out: list  # [T_r, H] bf16 | None per rank


def prefill_fake_experts(recv, scale: torch.Tensor) -> torch.Tensor:
    """One output row per (row, k) entry in ``expert_order``: the row scaled by its slot's factor
    (exact in bf16), so GPU and CPU produce the same bits."""
    S = scale.shape[0]
    entry_row, _, offsets = recv.expert_order(S)
    rows = recv.x.reshape(-1, recv.x.shape[-1])
    slot_of = torch.repeat_interleave(torch.arange(S, device=entry_row.device), (offsets[1:] - offsets[:-1]))
    return (rows[entry_row].float() * scale.to(rows.device)[slot_of].unsqueeze(-1)).to(rows.dtype)


def prefill_oracle(case: Case, placement: ExpertPlacement, max_tokens: int, *, stale: bool = False,
                   dropped_by: dict[int, list[int]] | None = None) -> PrefillOracle:
    """``eep.reference.prefill`` for every rank (CPU). ``stale``: routes computed as if every rank
    were active (tables not yet repaired), while ``case.active`` decides who takes part.
    ``dropped_by``: as for ``oracle`` — rank d in ``dropped_by[s]`` gave up on source s at dispatch,
    so its partial rows for s are zero."""
    from eep.reference.prefill import combine_packed, dispatch_packed, partial_combine

    S, R = placement.slots_per_rank, len(case.active)
    routed = Case(case.num_tokens, case.x, case.topk_ids, case.weights, [True] * R) if stale else case
    phys = [case_phys(routed, placement, r) if case.active[r] else None for r in range(R)]
    xs = [x if a else None for x, a in zip(case.x, case.active)]
    ws = [w if a else None for w, a in zip(case.weights, case.active)]
    recv, handles = dispatch_packed(xs, phys, ws, case.active, S, max_tokens)
    scale = expert_scale(S)
    partial = [None if r is None else partial_combine(r, prefill_fake_experts(r, scale), S) for r in recv]
    for src, dsts in (dropped_by or {}).items():
        for d in dsts:
            partial[d][src] = 0
    return PrefillOracle(recv, handles, partial, combine_packed(partial, handles))


def compare_prefill_rank(rank: int, orc: PrefillOracle, count: torch.Tensor, src_token: torch.Tensor,
                         x: torch.Tensor, local_slot: torch.Tensor, weight: torch.Tensor, dst_row: torch.Tensor,
                         out: torch.Tensor) -> list[str]:
    """Differences between one rank's fused prefill results (CPU copies) and the oracle."""
    want, errors = orc.recv[rank], []
    if not torch.equal(count, want.count):
        return [f"rank {rank}: prefill count got {count.tolist()} want {want.count.tolist()}"]
    valid = torch.arange(want.x.shape[1]).view(1, -1) < want.count.view(-1, 1)  # [R, M]
    if not torch.equal(src_token[valid], want.src_token[valid]):
        errors.append(f"rank {rank}: prefill src_token differs in {int((src_token[valid] != want.src_token[valid]).sum())} rows")
    if not torch.equal(local_slot[valid], want.local_slot[valid]):
        errors.append(f"rank {rank}: prefill local_slot differs in {int((local_slot[valid] != want.local_slot[valid]).any(-1).sum())} rows")
    here = want.local_slot >= 0
    if not torch.equal(weight[here], want.weight[here]):
        errors.append(f"rank {rank}: prefill weight differs in {int((weight[here] != want.weight[here]).sum())} entries")
    if not torch.equal(x[valid], want.x[valid]):
        diff = (x[valid].float() - want.x[valid].float()).abs()
        errors.append(f"rank {rank}: prefill recv.x differs in {int((diff != 0).sum())} elements "
                      f"(nan {int(diff.isnan().sum())})")
    if not torch.equal(dst_row.long(), orc.handles[rank].dst_row):
        errors.append(f"rank {rank}: prefill dst_row differs at {(dst_row.long() != orc.handles[rank].dst_row).nonzero()[:4].tolist()}")
    if not torch.equal(out, orc.out[rank]):
        diff = (out.float() - orc.out[rank].float()).abs()
        errors.append(f"rank {rank}: prefill combine output differs in {int((diff != 0).sum())} elements "
                      f"(nan {int(diff.isnan().sum())}), max {float(diff.nan_to_num(1e9).max())}")
    return errors
