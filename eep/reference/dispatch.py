"""Reference dispatch -> expert MLP -> combine for ``num_ranks`` ranks simulated in one process.

This is the oracle and the specification for ``eep.fused``: the fused kernels produce the same
receive layout and the same combined outputs.

Receive layout on each destination rank (the low-latency layout):

    recv.x          [slots_per_rank, num_ranks, max_tokens_per_rank, hidden]
    recv.count      [slots_per_rank, num_ranks]                      int32
    recv.src_token  [slots_per_rank, num_ranks, max_tokens_per_rank] int32, -1 past count

Row ``recv.x[i, s, j]`` is the ``j``-th token that source rank ``s`` sent to local slot ``i``; the
reference orders a (slot, source) block by ascending source token index. A token reaches a given
physical slot at most once (its top-k experts are distinct and a slot holds one expert), so
``max_tokens_per_rank`` rows always suffice.

Per-rank lists hold ``None`` for inactive ranks: they neither send nor receive. A (token, k) whose
physical slot is ``NO_EXPERT`` or lies on an inactive rank contributes nothing to the combine,
which is exactly what a fused kernel does when a peer misses its deadline.
"""

from __future__ import annotations

import torch

from eep.exchange.layout import DispatchHandle, RankReceive
from eep.mlp import swiglu
from eep.state.placement import NO_EXPERT


def dispatch(x_by_rank: list[torch.Tensor | None], phys_by_rank: list[torch.Tensor | None],
             active: list[bool], slots_per_rank: int, max_tokens_per_rank: int
             ) -> tuple[list[RankReceive | None], list[DispatchHandle | None]]:
    """Send every token copy to the rank that hosts its physical slot.

    Parameters:
        x_by_rank: per source rank ``[num_tokens_r, hidden]``.
        phys_by_rank: per source rank ``[num_tokens_r, top_k]`` physical slots (``route_to_phys``).
        active: per rank, whether it takes part.
    """
    num_ranks = len(active)
    hidden, dtype, device = _first_shape(x_by_rank)
    recvs: list[RankReceive | None] = [
        RankReceive(x=torch.zeros(slots_per_rank, num_ranks, max_tokens_per_rank, hidden, dtype=dtype, device=device),
                    count=torch.zeros(slots_per_rank, num_ranks, dtype=torch.int32, device=device),
                    src_token=torch.full((slots_per_rank, num_ranks, max_tokens_per_rank), -1,
                                         dtype=torch.int32, device=device))
        if active[r] else None for r in range(num_ranks)]
    handles: list[DispatchHandle | None] = [None] * num_ranks

    for src in range(num_ranks):
        if not active[src]:
            continue
        x, phys = x_by_rank[src], phys_by_rank[src].long()
        if x.shape[0] > max_tokens_per_rank:
            raise ValueError(f"rank {src} has {x.shape[0]} tokens, more than max_tokens_per_rank={max_tokens_per_rank}")
        position = torch.full_like(phys, -1)
        for token in range(x.shape[0]):  # ascending token order fixes the order inside each block
            for k in range(phys.shape[1]):
                slot = int(phys[token, k])
                if slot == NO_EXPERT:
                    continue
                dst, local = divmod(slot, slots_per_rank)
                recv = recvs[dst]
                if recv is None:  # stale route to a dead rank: its contribution is absent
                    continue
                row = int(recv.count[local, src])
                recv.x[local, src, row] = x[token]
                recv.src_token[local, src, row] = token
                recv.count[local, src] += 1
                position[token, k] = row
        sent = position >= 0
        handles[src] = DispatchHandle(phys=torch.where(sent, phys, NO_EXPERT), position=position)
    return recvs, handles


def expert_mlp(recv: RankReceive, w_gate: torch.Tensor, w_up: torch.Tensor, w_down: torch.Tensor) -> torch.Tensor:
    """SwiGLU ``down(silu(gate(x)) * up(x))`` for every received row of every local slot.

    Parameters:
        w_gate, w_up: ``[slots_per_rank, intermediate, hidden]``; w_down: ``[slots_per_rank, hidden, intermediate]``.
    Returns:
        ``[slots_per_rank, num_ranks, max_tokens_per_rank, hidden]`` in the activation dtype,
        zero past each block's count. Computed in float32, rounded once on output (as it would
        be when the result crosses the wire back to its source).
    """
    out = torch.zeros_like(recv.x)
    for local in range(recv.x.shape[0]):
        for src in range(recv.x.shape[1]):
            n = int(recv.count[local, src])
            if n:
                out[local, src, :n] = swiglu(recv.x[local, src, :n], w_gate[local], w_up[local], w_down[local])
    return out


def combine(y_by_rank: list[torch.Tensor | None], handles: list[DispatchHandle | None],
            topk_weights_by_rank: list[torch.Tensor | None], slots_per_rank: int) -> list[torch.Tensor | None]:
    """Bring expert outputs home and sum them with the top-k weights (float32 accumulation).

    Returns per source rank ``[num_tokens_r, hidden]`` in the activation dtype.
    """
    outs: list[torch.Tensor | None] = [None] * len(handles)
    for src, handle in enumerate(handles):
        if handle is None:
            continue
        num_tokens, top_k = handle.phys.shape
        ref = next(y for y in y_by_rank if y is not None)
        acc = torch.zeros(num_tokens, ref.shape[-1], dtype=torch.float32, device=ref.device)
        weights = topk_weights_by_rank[src].float()
        for token in range(num_tokens):
            for k in range(top_k):
                slot = int(handle.phys[token, k])
                if slot == NO_EXPERT:
                    continue
                dst, local = divmod(slot, slots_per_rank)
                y = y_by_rank[dst]
                if y is None:
                    continue
                acc[token] += weights[token, k] * y[local, src, int(handle.position[token, k])].float()
        outs[src] = acc.to(ref.dtype)
    return outs


def _first_shape(x_by_rank: list[torch.Tensor | None]) -> tuple[int, torch.dtype, torch.device]:
    for x in x_by_rank:
        if x is not None:
            return x.shape[-1], x.dtype, x.device
    raise ValueError("dispatch needs at least one active source rank")
