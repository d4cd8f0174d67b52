"""The CPU engine: the tiny float32 model over the host shared-memory exchange (``eep.exchange.shm``).

Per MoE layer of a decode step (``eep.runtime.model.decode_step`` supplies everything else):

    phys = route_to_phys(topk_ids, placement.logical_to_phys[layer], membership mask)
    recv, handle = exchange.dispatch(x, phys)                # the seam: rows cross ranks
    y = stage(recv.x, recv.count, w13[layer], w2[layer])      # this rank's experts (eep.fused.gemm, on CPU)
    out = exchange.combine(y, handle, topk_weights)           # rows come home, float32 sums

It computes what ``eep.mlp.dense_moe`` computes, so the runtime's answers equal the oracle's
(``eep.cli.answers``). A step in which a peer missed a deadline, or a new decision interrupted a
wait, raises ``StepAborted`` and is discarded (tokens are only appended when a whole step completes).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from eep.exchange.shm import ShmExchange, StepInterrupted
from eep.fused.gemm import ExpertStageShape, make_expert_stage
from eep.routing import route_to_phys
from eep.runtime.config import RuntimeConfig
from eep.repair import ExecutionReport
from eep.runtime.engines.base import StepAborted
from eep.runtime.engines.slots import BackgroundCopies, PlanPart, RankSlots
from eep.runtime.model import decode_step, generate_weights, rank_tiers
from eep.state import ExpertPlacement, Membership


class ShmEngine:
    """The engine seam (``eep.runtime.engines.base.Engine``) of the CPU data plane. Its slots live in
    an anonymous shared memory file that peers map to copy replicas out of (``RankSlots``)."""

    def __init__(self, cfg: RuntimeConfig, rank: int, *, shm_path: str, store: Any = None, run_id: str = "",
                 incarnation: int = 0):
        from eep.transport import SharedMemoryTransport

        c = cfg.model
        S, M, L = cfg.slots_per_rank, cfg.token_capacity, c.num_layers
        self.cfg, self.rank, self.S, self.M = cfg, rank, S, M
        self.transport = SharedMemoryTransport(shm_path, rank)
        self.membership = Membership(cfg.num_ranks)
        self.exchange = ShmExchange(self.transport, slots_per_rank=S, max_tokens_per_rank=M, hidden=c.hidden,
                                    dtype=torch.float32, membership=self.membership,
                                    timeout_s=cfg.transport_timeout_s)
        self.weights = generate_weights(c, shard_dir=cfg.shard_dir)
        self.tiers = rank_tiers(self.weights, cfg.shard_dir)
        self.slots = RankSlots(rank=rank, num_ranks=cfg.num_ranks, num_layers=L, slots_per_rank=S, hidden=c.hidden,
                               intermediate=c.intermediate, dtype=torch.float32, device=torch.device("cpu"),
                               store=store, run_id=run_id, incarnation=incarnation,
                               connect_timeout_s=cfg.peer_connect_timeout_s)
        self.stage = make_expert_stage(ExpertStageShape(S, cfg.num_ranks, M, c.hidden, c.intermediate, c.top_k),
                                       device="cpu", dtype=torch.float32, backend="loop")

    # ---- slots ----
    def execute(self, part: PlanPart) -> ExecutionReport:
        return self.slots.execute(part, self.tiers)

    def copy_in_background(self, part: PlanPart) -> BackgroundCopies:
        return self.slots.copy_in_background(part, self.tiers)

    def warmup(self) -> None:
        """Run every loaded expert on random rows, alone: no exchange, no peer sees it. Each (slot,
        source) block holds what a full batch delivers on average, so the rows fit the stage's capacity."""
        gen = torch.Generator().manual_seed(self.rank)
        c, R = self.cfg.model, self.cfg.num_ranks
        x = torch.randn(self.S, R, self.M, c.hidden, generator=gen)
        per_block = max(1, self.M * min(c.top_k, self.S) // self.S)
        for _ in range(self.cfg.warmup_steps):
            for layer in range(c.num_layers):
                count = torch.where(self.slots.loaded[layer] >= 0, per_block, 0).to(torch.int32)  # empty slots stay idle
                count = count.unsqueeze(1).expand(-1, R).contiguous()
                y = self.stage(x, count, self.slots.w13[layer], self.slots.w2[layer])
                live = torch.arange(self.M) < count.unsqueeze(-1)
                if not bool(torch.isfinite(y[live]).all()):
                    raise RuntimeError(f"rank {self.rank}: warm-up of layer {layer} gave non-finite outputs")

    # ---- membership ----
    def on_commit(self, *, active: list[bool], joined: list[int], epoch: int, start_step: int,
                  is_joiner: bool) -> None:
        """Adopt the committed membership: every member restarts its steps at the epoch's first tag."""
        self.exchange.set_membership(Membership(self.cfg.num_ranks, active=active, epoch=epoch))

    # ---- the step ----
    def decode(self, tokens: torch.Tensor, *, active: list[bool], placement: ExpertPlacement, epoch: int, step: int,
               timeout_s: float, should_abort: Callable[[], bool] | None = None) -> list[int]:
        self.exchange.set_timeout(timeout_s)
        self.exchange.should_abort = should_abort
        misses = self.exchange.miss_count.clone()

        def moe(layer: int, x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor) -> torch.Tensor:
            phys = route_to_phys(topk_ids, placement.logical_to_phys[layer], self.membership.active_device, self.S,
                                 token_offset=self.rank * self.M)
            try:
                recv, handle = self.exchange.dispatch(x, phys)
                y = self.stage(recv.x, recv.count, self.slots.w13[layer], self.slots.w2[layer])
                out = self.exchange.combine(y, handle, topk_weights)
            except StepInterrupted as exc:
                raise StepAborted(layer, exc.phase, exc.pending, is_aborted=True) from exc
            missed = (self.exchange.miss_count > misses).nonzero().flatten().tolist()
            if missed:
                raise StepAborted(layer, "step", missed, is_aborted=False)
            return out

        return decode_step(self.weights, tokens, moe).tolist()

    def close(self) -> None:
        self.exchange.close()
        self.transport.close()
        self.slots.close()
        for tier in self.tiers:
            close = getattr(tier, "close", None)
            if close is not None:
                close()
