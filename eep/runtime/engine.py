"""The data-plane seam of a rank: what ``RankWorker`` asks of the engine that runs decode steps.

The control plane (launcher, coordinator, decisions, requests, fencing) is the same for every
engine; only the data plane differs. ``RuntimeConfig.engine`` picks one:

- ``"shm"`` (``ShmEngine``): the CPU data plane over the shared-memory transport (docs/runtime.md);
- ``"fused"`` / ``"fused_fixed"`` / ``"nccl"`` (``eep.runtime.gpu_dataplane.GpuEngine``): the
  bench model in bf16 with CUDA-graph decode steps over the fused GPU buffer (membership-aware or
  the fixed-membership baseline) or NCCL all-to-all; ``"gloo"`` (the NCCL engine's code over gloo
  on CPU), ``"cpu_elastic"`` (the same engine over the shared-memory transport, membership-aware)
  and ``"local"`` (one rank, no communication) exist for CPU tests. Imported lazily: this module imports no CUDA package.

An engine is created once per rank process and keeps its expert slots across epochs:

    engine.load_missing(placement) -> int      # restore slots the placement wants (returns count)
    engine.warmup()                             # run local experts alone, before joining
    engine.on_commit(active=, joined=, epoch=, start_step=, is_joiner=)   # membership switch
    engine.decode(tokens, active=, placement=, epoch=, step=, timeout_s=, should_abort=) -> list[int]
    engine.close()

``decode`` raises ``StepAborted`` when a peer missed a deadline or a new decision interrupted it;
the step is then discarded (tokens are only appended when a whole step completes).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, Protocol

import torch

from eep.runtime.config import RuntimeConfig
from eep.runtime.dataplane import Block, RankMoE, expert_compute
from eep.runtime.model import decode_step, expert_source, generate_weights
from eep.state import ExpertPlacement

ENGINES = ("shm", "fused", "fused_fixed", "nccl", "gloo", "cpu_elastic", "local")


class Engine(Protocol):
    def load_missing(self, placement: ExpertPlacement) -> int: ...

    def warmup(self) -> None: ...

    def on_commit(self, *, active: list[bool], joined: list[int], epoch: int, start_step: int,
                  is_joiner: bool) -> None: ...

    def decode(self, tokens: torch.Tensor, *, active: list[bool], placement: ExpertPlacement, epoch: int, step: int,
               timeout_s: float, should_abort: Callable[[], bool] | None = None) -> list[int]: ...

    def close(self) -> None: ...


def make_engine(cfg: RuntimeConfig, rank: int, *, shm_path: str, store: Any, run_id: str,
                incarnation: int) -> Engine:
    """The engine ``cfg.engine`` names, for ``rank`` (errors name the unknown engine)."""
    if cfg.engine == "shm":
        return ShmEngine(cfg, rank, shm_path=shm_path)
    if cfg.engine in ENGINES:
        from eep.runtime.gpu_dataplane import GpuEngine  # lazily: its exchanges import CUDA packages
        return GpuEngine(cfg, rank, store=store, run_id=run_id, incarnation=incarnation, engine=cfg.engine,
                         shm_path=shm_path)
    raise ValueError(f"RuntimeConfig.engine={cfg.engine!r} is not one of {ENGINES}")


def transport_capacity_nbytes(cfg: RuntimeConfig) -> int:
    """Bytes of one region of the launcher's shared-memory file for ``cfg.engine``."""
    if cfg.engine == "shm":
        from eep.runtime.dataplane import BlockCodec
        codec = BlockCodec(cfg.slots_per_rank, cfg.token_capacity, cfg.model.hidden)
        return (max(codec.block_nbytes, codec.reply_nbytes) + 63) // 64 * 64
    if cfg.engine == "cpu_elastic":
        from eep.runtime.gpu_dataplane import ShmExchange
        return ShmExchange.capacity_nbytes(cfg.slots_per_rank, cfg.token_capacity, cfg.model.hidden)
    return 64  # GPU engines move data through their own buffers; the file only keeps the layout


class ShmEngine:
    """The CPU data plane: float32 tiny model, ``RankMoE`` over the shared-memory transport."""

    def __init__(self, cfg: RuntimeConfig, rank: int, *, shm_path: str):
        from eep.transport import SharedMemoryTransport

        self.cfg, self.rank = cfg, rank
        self.transport = SharedMemoryTransport(shm_path, rank)
        self.weights = generate_weights(cfg.model, shard_dir=cfg.shard_dir)
        self.source = expert_source(self.weights, cfg.shard_dir)
        self.moe = RankMoE(rank, cfg.num_ranks, cfg.model.num_layers, cfg.slots_per_rank, cfg.token_capacity,
                           cfg.model.hidden, cfg.model.intermediate, self.transport)
        self.restore_stats: dict = {}

    def load_missing(self, placement: ExpertPlacement) -> int:
        missing = self.moe.missing_slots(placement)
        t0 = time.perf_counter()
        for layer, local, expert in missing:
            self.moe.load_slot(layer, local, expert, self.source.load(layer, expert))
        tier = "shards" if self.cfg.shard_dir else "host"  # weights_tools tiers, or the generated host copy
        nbytes = len(missing) * 3 * self.cfg.model.hidden * self.cfg.model.intermediate * 4
        seconds = time.perf_counter() - t0
        self.restore_stats = {"by_tier": {tier: {"experts": len(missing), "nbytes": nbytes, "seconds": seconds}},
                              "seconds": seconds, "experts": len(missing)}
        return len(missing)

    def warmup(self) -> None:
        """Run every local expert on random rows, alone: no transport, no peer sees it."""
        gen = torch.Generator().manual_seed(self.rank)
        s, t, h = self.cfg.slots_per_rank, self.cfg.token_capacity, self.cfg.model.hidden
        for _ in range(self.cfg.warmup_steps):
            for layer in range(self.cfg.model.num_layers):
                count = torch.where(self.moe.loaded[layer] >= 0, t, 0).to(torch.int32)  # empty slots stay idle
                block = Block(count=count, src_token=torch.zeros(s, t, dtype=torch.int32),
                              x=torch.randn(s, t, h, generator=gen))
                y = expert_compute({self.rank: block}, self.moe.w_gate[layer], self.moe.w_up[layer],
                                   self.moe.w_down[layer])[self.rank]
                if not bool(torch.isfinite(y).all()):
                    raise RuntimeError(f"rank {self.rank}: warm-up of layer {layer} gave non-finite outputs")

    def on_commit(self, *, active: list[bool], joined: list[int], epoch: int, start_step: int,
                  is_joiner: bool) -> None:
        """Nothing to switch: the shm transport reads membership per call and tags carry the epoch."""

    def decode(self, tokens: torch.Tensor, *, active: list[bool], placement: ExpertPlacement, epoch: int, step: int,
               timeout_s: float, should_abort: Callable[[], bool] | None = None) -> list[int]:
        def moe(layer, x, topk_weights, topk_ids):
            return self.moe.forward_layer(layer, x, topk_weights, topk_ids, active=active, placement=placement,
                                          epoch=epoch, step=step, timeout_s=timeout_s, should_abort=should_abort)
        return decode_step(self.weights, tokens, moe).tolist()

    def close(self) -> None:
        self.transport.close()
