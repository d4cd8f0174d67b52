"""Reference packed ("normal" / prefill) dispatch -> experts -> combine, ``num_ranks`` ranks in one process.

The specification for the fused prefill kernels (docs/fused.md "Prefill mode"). The
low-latency layout of ``eep.reference.dispatch`` reserves ``max_tokens_per_rank`` rows for every
(local slot, source) pair: at 4096 tokens and 64 slots that is 64x the rows a rank can receive per
source. Prefill instead sends **one copy of a token to each destination rank** that hosts at least
one of its selected slots. Each source owns a fixed region of ``max_tokens_per_rank`` rows in every
destination, filled from the front without gaps, so no rank ever needs another source's counts to
know where to write (no offset negotiation: a late or dead source cannot shift anyone's rows):

Receive layout on each destination rank (``PackedReceive``):

    x            [num_ranks(src), max_tokens_per_rank, hidden]  rows of a source in ascending token order
    count        [num_ranks]                          int32 rows each source sent here
    src_token    [num_ranks, max_tokens_per_rank]     int32, -1 past count
    local_slot   [num_ranks, max_tokens_per_rank, top_k] int32 the k-th choice's local slot here, -1
                                                      where it lives elsewhere (and past count)
    weight       [num_ranks, max_tokens_per_rank, top_k] float32 its top-k weight, 0 where local_slot is -1

The expert stage reads (source, row, k) entries grouped by local slot (``expert_order``), the order
a grouped GEMM consumes. Combine is two-level, as on the wire: each destination sums a row's
entries in k order in float32 and sends one bf16 row back (``partial_combine``); the source sums
the partials of the destinations it used in ascending rank order in float32 and rounds once.
Membership: an inactive rank neither sends nor receives, and a choice whose slot lies on an
inactive rank (or is ``NO_EXPERT``) contributes nothing — the contract of the low-latency mode.
"""

from __future__ import annotations

import torch

from eep.exchange.layout import PackedHandle, PackedReceive
from eep.mlp import swiglu
from eep.reference.dispatch import _first_shape
from eep.state.placement import NO_EXPERT


def dispatch_packed(x_by_rank: list[torch.Tensor | None], phys_by_rank: list[torch.Tensor | None],
                    weights_by_rank: list[torch.Tensor | None], active: list[bool], slots_per_rank: int,
                    max_tokens_per_rank: int) -> tuple[list[PackedReceive | None], list[PackedHandle | None]]:
    """Send each token once to every active rank hosting one of its selected physical slots.

    Parameters:
        x_by_rank: per source rank ``[num_tokens_r, hidden]``, ``num_tokens_r <= max_tokens_per_rank``.
        phys_by_rank: per source rank ``[num_tokens_r, top_k]`` physical slots (``route_to_phys``).
        weights_by_rank: per source rank ``[num_tokens_r, top_k]`` top-k weights.
    """
    num_ranks = len(active)
    hidden, dtype, device = _first_shape(x_by_rank)
    top_k = next(p.shape[1] for p in phys_by_rank if p is not None)
    M = max_tokens_per_rank
    recvs: list[PackedReceive | None] = [
        PackedReceive(x=torch.zeros(num_ranks, M, hidden, dtype=dtype, device=device),
                      count=torch.zeros(num_ranks, dtype=torch.int32, device=device),
                      src_token=torch.full((num_ranks, M), -1, dtype=torch.int32, device=device),
                      local_slot=torch.full((num_ranks, M, top_k), -1, dtype=torch.int32, device=device),
                      weight=torch.zeros(num_ranks, M, top_k, dtype=torch.float32, device=device))
        if active[r] else None for r in range(num_ranks)]
    handles: list[PackedHandle | None] = [None] * num_ranks
    for src in range(num_ranks):
        if not active[src]:
            continue
        x, phys, weights = x_by_rank[src], phys_by_rank[src].long(), weights_by_rank[src].float()
        if phys.shape != weights.shape or phys.shape[0] != x.shape[0] or phys.shape[1] != top_k:
            raise ValueError(f"rank {src}: x {tuple(x.shape)}, phys {tuple(phys.shape)} and "
                             f"weights {tuple(weights.shape)} disagree")
        if x.shape[0] > M:
            raise ValueError(f"rank {src} has {x.shape[0]} tokens, more than max_tokens_per_rank={M}")
        dst_row = torch.full((x.shape[0], num_ranks), -1, dtype=torch.long, device=device)
        for token in range(x.shape[0]):  # ascending token order fixes the row order in each region
            for k in range(top_k):
                slot = int(phys[token, k])
                if slot == NO_EXPERT or not 0 <= slot < num_ranks * slots_per_rank:
                    continue
                dst, local = divmod(slot, slots_per_rank)
                recv = recvs[dst]
                if recv is None:  # stale route to a dead rank: its contribution is absent
                    continue
                if dst_row[token, dst] < 0:  # the token's first choice on dst: one row for all of them
                    row = int(recv.count[src])
                    recv.x[src, row] = x[token]
                    recv.src_token[src, row] = token
                    recv.count[src] += 1
                    dst_row[token, dst] = row
                row = int(dst_row[token, dst])
                recv.local_slot[src, row, k] = local
                recv.weight[src, row, k] = weights[token, k]
        handles[src] = PackedHandle(dst_row=dst_row)
    return recvs, handles


def expert_mlp_packed(recv: PackedReceive, w_gate: torch.Tensor, w_up: torch.Tensor, w_down: torch.Tensor
                      ) -> torch.Tensor:
    """SwiGLU per (row, k) entry in ``expert_order``: ``[num_entries, hidden]``, activation dtype.

    Weights per local slot as in ``eep.reference.expert_mlp``.
    """
    slots_per_rank = w_gate.shape[0]
    entry_row, _, slot_offset = recv.expert_order(slots_per_rank)
    rows = recv.x.reshape(-1, recv.x.shape[-1])
    out = torch.zeros(entry_row.shape[0], rows.shape[1], dtype=rows.dtype, device=rows.device)
    for slot in range(slots_per_rank):
        lo, hi = int(slot_offset[slot]), int(slot_offset[slot + 1])
        if hi > lo:
            out[lo:hi] = swiglu(rows[entry_row[lo:hi]], w_gate[slot], w_up[slot], w_down[slot])
    return out


def partial_combine(recv: PackedReceive, y_entries: torch.Tensor, slots_per_rank: int) -> torch.Tensor:
    """One row per received token: its entries here summed in k order (float32, mul then add),
    rounded to the activation dtype — what a destination sends back. ``[num_ranks, max_tokens, hidden]``,
    zero past each source's count."""
    entry_row, entry_k, _ = recv.expert_order(slots_per_rank)
    num_rows, top_k = recv.local_slot.shape[0] * recv.local_slot.shape[1], recv.local_slot.shape[2]
    entry_of = torch.full((num_rows, top_k), -1, dtype=torch.long, device=recv.x.device)
    entry_of[entry_row, entry_k] = torch.arange(entry_row.shape[0], device=recv.x.device)
    weight = recv.weight.reshape(num_rows, top_k)
    acc = torch.zeros(num_rows, recv.x.shape[-1], dtype=torch.float32, device=recv.x.device)
    for k in range(top_k):
        here = entry_of[:, k] >= 0
        acc[here] = acc[here] + weight[here, k:k + 1] * y_entries[entry_of[here, k]].float()
    return acc.to(recv.x.dtype).reshape(recv.x.shape)


def combine_packed(partials_by_rank: list[torch.Tensor | None], handles: list[PackedHandle | None]
                   ) -> list[torch.Tensor | None]:
    """Sum, per source token, the partial rows of the destinations it was sent to (ascending rank
    order, float32), rounded once. ``partials_by_rank[dst]`` is ``partial_combine`` of rank ``dst``.
    Returns per source rank ``[num_tokens_r, hidden]``."""
    ref = next(p for p in partials_by_rank if p is not None)
    outs: list[torch.Tensor | None] = [None] * len(handles)
    for src, handle in enumerate(handles):
        if handle is None:
            continue
        acc = torch.zeros(handle.dst_row.shape[0], ref.shape[-1], dtype=torch.float32, device=ref.device)
        for dst in range(handle.dst_row.shape[1]):
            partial = partials_by_rank[dst]
            if partial is None:
                continue
            sent = handle.dst_row[:, dst] >= 0
            if bool(sent.any()):
                acc[sent] = acc[sent] + partial[src, handle.dst_row[sent, dst]].float()
        outs[src] = acc.to(ref.dtype)
    return outs


def received_bytes(recvs: list[PackedReceive | None]) -> list[int]:
    """Bytes of token rows each rank received (one copy per token and destination rank, its own
    included): how DeepEP's normal-mode test counts dispatch bandwidth."""
    return [0 if r is None else r.num_recv * r.x.shape[-1] * r.x.element_size() for r in recvs]
