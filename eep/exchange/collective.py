"""The collective baseline of the exchange seam: ``torch.distributed.all_to_all_single`` with splits.

What a serving stack without an elastic data plane runs: each rank sends exactly its live rows (the
counts go first, then the rows with per-rank split sizes), over NCCL on GPUs or gloo on CPU. It is
the baseline the fused kernels are measured against, and it cannot serve a partial membership: a
collective with a dead peer times out and the communicator is lost (DESIGN.md), so
``set_membership`` refuses any mask but all-active. Not graph safe: the split sizes are host values.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from eep.exchange.layout import DispatchHandle, RankReceive
from eep.exchange.packing import compact_rows, expand_rows, gather_combine, pack_by_destination
from eep.exchange.protocol import ExchangeStatus, adopt
from eep.state import Membership


class CollectiveExchange:
    """``DecodeExchange`` over a process group of all ``num_ranks`` ranks (fixed membership).

    Parameters:
        rank, num_ranks: this rank and the group size.
        slots_per_rank, max_tokens_per_rank, hidden: the receive layout.
        store: the control store the process group rendezvouses through (``group`` prefixes its keys).
        backend: ``"nccl"`` (CUDA tensors) or ``"gloo"`` (CPU tensors).
    """

    is_membership_aware = False
    is_graph_safe = False
    use_fp8 = False  # rows travel in the activations' dtype

    def __init__(self, rank: int, num_ranks: int, *, slots_per_rank: int, max_tokens_per_rank: int, hidden: int,
                 store: Any, group: str, backend: str = "nccl", device: torch.device | str = "cpu",
                 membership: Membership | None = None):
        import torch.distributed as dist

        self.dist = dist
        self.rank, self.num_ranks = rank, num_ranks
        self.slots_per_rank, self.max_tokens_per_rank, self.hidden = slots_per_rank, max_tokens_per_rank, hidden
        self.device = torch.device(device)
        extra = {"device_id": self.device} if backend == "nccl" else {}
        dist.init_process_group(backend, store=dist.PrefixStore(f"{group}/{backend}", store), rank=rank,
                                world_size=num_ranks, **extra)
        self.membership = membership if membership is not None else Membership(num_ranks, device=self.device)
        self.connected = set(range(num_ranks))  # the process group holds every rank from the start
        probe = torch.ones(num_ranks, dtype=torch.int32, device=self.device)
        dist.all_to_all_single(torch.empty_like(probe), probe)  # every rank creates its communicator now
        self.miss_count = torch.zeros(num_ranks, dtype=torch.int64, device=self.device)
        self.suspect = torch.zeros(num_ranks, dtype=torch.int64, device=self.device)
        self.steps = 0

    def _all_to_all(self, rows: torch.Tensor, send_rows: list[int], recv_rows: list[int]) -> torch.Tensor:
        out = torch.empty(sum(recv_rows), *rows.shape[1:], dtype=rows.dtype, device=rows.device)
        self.dist.all_to_all_single(out, rows.contiguous(), output_split_sizes=recv_rows, input_split_sizes=send_rows)
        self.steps += 1
        return out

    def dispatch(self, x: torch.Tensor, phys: torch.Tensor) -> tuple[RankReceive, DispatchHandle]:
        S, M, H, R = self.slots_per_rank, self.max_tokens_per_rank, self.hidden, self.num_ranks
        packed = pack_by_destination(x, phys, R, S, M)
        recv_count = torch.empty_like(packed.count)                                     # [R(src), S]
        self.dist.all_to_all_single(recv_count, packed.count)
        self._sent_count, self._recv_count = packed.count, recv_count                   # per (rank, slot)
        send_rows, recv_rows = packed.count.sum(1).tolist(), recv_count.sum(1).tolist()
        flat_count = packed.count.reshape(-1)
        rows = compact_rows(packed.send.reshape(R * S, M, H), flat_count)
        tokens = compact_rows(packed.src_token.reshape(R * S, M), flat_count)
        got_rows = self._all_to_all(rows, send_rows, recv_rows)
        got_tokens = self._all_to_all(tokens, send_rows, recv_rows)
        recv_flat = recv_count.reshape(-1)
        recv = RankReceive(x=expand_rows(got_rows, recv_flat, M).view(R, S, M, H).transpose(0, 1),
                           count=recv_count.transpose(0, 1),
                           src_token=expand_rows(got_tokens, recv_flat, M, fill=-1).view(R, S, M).transpose(0, 1))
        return recv, DispatchHandle(phys=phys, position=packed.position)

    def combine(self, y: torch.Tensor, handle: DispatchHandle, topk_weights: torch.Tensor,
                out: torch.Tensor | None = None) -> torch.Tensor:
        S, M, H, R = self.slots_per_rank, self.max_tokens_per_rank, self.hidden, self.num_ranks
        back = y.transpose(0, 1).reshape(R * S, M, H)                                   # per (source, slot)
        rows = compact_rows(back, self._recv_count.reshape(-1))
        got = self._all_to_all(rows, self._recv_count.sum(1).tolist(), self._sent_count.sum(1).tolist())
        home = expand_rows(got, self._sent_count.reshape(-1), M).view(R, S, M, H)
        combined = gather_combine(home, handle.phys, handle.position, topk_weights).to(y.dtype)
        if out is None:
            return combined
        return out.copy_(combined)

    def connect(self, ranks: Sequence[int], *, timeout_s: float) -> None:
        """Every rank joined the process group at construction; a restarted rank cannot rejoin it."""

    def set_membership(self, membership: Membership) -> None:
        if not bool(membership.active_cpu.all()):
            raise RuntimeError(f"rank {self.rank}: the collective baseline has fixed membership; epoch "
                               f"{membership.epoch} masks ranks {[r for r in range(self.num_ranks) if not membership.is_active(r)]}")
        adopt(self, membership)

    def set_timeout(self, timeout_s: float) -> None:
        pass  # a collective has no per-peer deadline: that is the point of the baseline

    def status(self) -> ExchangeStatus:
        return ExchangeStatus(epoch=self.membership.epoch, step=self.steps, active=[True] * self.num_ranks,
                              suspect=[False] * self.num_ranks, miss_count=[0] * self.num_ranks)

    def close(self) -> None:
        self.dist.destroy_process_group()
