"""The in-process backend of the exchange seam: one rank, no peers (``num_ranks == 1``).

The receive layout is the send layout: what a single-rank deployment and the CPU tests of an engine's
model and slot tables run. Graph safe: it never waits for the host.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from eep.exchange.layout import DispatchHandle, RankReceive
from eep.exchange.packing import gather_combine, pack_by_destination
from eep.exchange.protocol import ExchangeStatus, adopt
from eep.state import Membership


class LocalExchange:
    """``DecodeExchange`` for one rank: dispatch and combine are local tensor ops."""

    is_membership_aware = True
    is_graph_safe = True
    use_fp8 = False  # rows travel in the activations' dtype
    rank, num_ranks = 0, 1
    connected = frozenset({0})

    def __init__(self, *, slots_per_rank: int, max_tokens_per_rank: int, hidden: int,
                 membership: Membership | None = None, device: torch.device | str = "cpu"):
        self.slots_per_rank, self.max_tokens_per_rank, self.hidden = slots_per_rank, max_tokens_per_rank, hidden
        self.membership = membership if membership is not None else Membership(1, device=device)
        self.miss_count = torch.zeros(1, dtype=torch.int64, device=device)
        self.suspect = torch.zeros(1, dtype=torch.int64, device=device)

    def dispatch(self, x: torch.Tensor, phys: torch.Tensor) -> tuple[RankReceive, DispatchHandle]:
        packed = pack_by_destination(x, phys, 1, self.slots_per_rank, self.max_tokens_per_rank)
        recv = RankReceive(x=packed.send.transpose(0, 1), count=packed.count.transpose(0, 1),
                           src_token=packed.src_token.transpose(0, 1))
        return recv, DispatchHandle(phys=phys, position=packed.position)

    def combine(self, y: torch.Tensor, handle: DispatchHandle, topk_weights: torch.Tensor,
                out: torch.Tensor | None = None) -> torch.Tensor:
        combined = gather_combine(y.transpose(0, 1), handle.phys, handle.position, topk_weights).to(y.dtype)
        if out is None:
            return combined
        return out.copy_(combined)

    def connect(self, ranks: Sequence[int], *, timeout_s: float) -> None:
        if any(r != 0 for r in ranks):
            raise ValueError(f"LocalExchange has one rank; cannot connect {list(ranks)}")

    def set_membership(self, membership: Membership) -> None:
        adopt(self, membership)

    def set_timeout(self, timeout_s: float) -> None:
        pass

    def status(self) -> ExchangeStatus:
        return ExchangeStatus(epoch=self.membership.epoch, step=0, active=[True], suspect=[False], miss_count=[0])

    def close(self) -> None:
        pass
