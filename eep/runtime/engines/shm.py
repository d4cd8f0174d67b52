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

import time
from collections.abc import Callable

import torch

from eep.exchange.shm import ShmExchange, StepInterrupted
from eep.fused.gemm import ExpertStageShape, make_expert_stage
from eep.routing import route_to_phys
from eep.runtime.config import RuntimeConfig
from eep.runtime.engines.base import StepAborted, missing_slots
from eep.runtime.model import decode_step, expert_source, generate_weights
from eep.state import NO_EXPERT, ExpertPlacement, Membership


class ShmEngine:
    """The engine seam (``eep.runtime.engines.base.Engine``) of the CPU data plane."""

    def __init__(self, cfg: RuntimeConfig, rank: int, *, shm_path: str):
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
        self.source = expert_source(self.weights, cfg.shard_dir)
        nan = float("nan")  # an unloaded slot poisons any output that reads it
        self.w13 = torch.full((L, S, 2 * c.intermediate, c.hidden), nan)
        self.w2 = torch.full((L, S, c.hidden, c.intermediate), nan)
        self.loaded = torch.full((L, S), NO_EXPERT, dtype=torch.int64)
        self.stage = make_expert_stage(ExpertStageShape(S, cfg.num_ranks, M, c.hidden, c.intermediate, c.top_k),
                                       device="cpu", dtype=torch.float32, backend="loop")
        self.restore_stats: dict = {}

    # ---- slots ----
    def load_missing(self, placement: ExpertPlacement) -> int:
        inter = self.cfg.model.intermediate
        missing = missing_slots(placement, self.rank, self.loaded)
        t0 = time.perf_counter()
        for layer, i, expert in missing:
            w_gate, w_up, w_down = self.source.load(layer, expert)
            self.w13[layer, i, :inter].copy_(w_gate)
            self.w13[layer, i, inter:].copy_(w_up)
            self.w2[layer, i].copy_(w_down)
            self.loaded[layer, i] = expert
        tier = "shards" if self.cfg.shard_dir else "host"  # weights_tools tiers, or the generated host copy
        nbytes = len(missing) * 3 * self.cfg.model.hidden * inter * 4
        seconds = time.perf_counter() - t0
        self.restore_stats = {"by_tier": {tier: {"experts": len(missing), "nbytes": nbytes, "seconds": seconds}},
                              "seconds": seconds, "experts": len(missing)}
        return len(missing)

    def warmup(self) -> None:
        """Run every loaded expert on random rows, alone: no exchange, no peer sees it. Each (slot,
        source) block holds what a full batch delivers on average, so the rows fit the stage's capacity."""
        gen = torch.Generator().manual_seed(self.rank)
        c, R = self.cfg.model, self.cfg.num_ranks
        x = torch.randn(self.S, R, self.M, c.hidden, generator=gen)
        per_block = max(1, self.M * min(c.top_k, self.S) // self.S)
        for _ in range(self.cfg.warmup_steps):
            for layer in range(c.num_layers):
                count = torch.where(self.loaded[layer] >= 0, per_block, 0).to(torch.int32)  # empty slots stay idle
                count = count.unsqueeze(1).expand(-1, R).contiguous()
                y = self.stage(x, count, self.w13[layer], self.w2[layer])
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
                y = self.stage(recv.x, recv.count, self.w13[layer], self.w2[layer])
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
