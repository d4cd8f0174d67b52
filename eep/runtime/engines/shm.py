"""The CPU data plane of one rank: dispatch -> expert MLP -> combine over a ``Transport``.

It computes exactly what ``eep.reference.dispatch`` / ``expert_mlp`` / ``combine`` compute, with
the same receive layout, but for one rank in its own process and vectorised:

    block sent from source s to destination d (one transport region, channel 2*layer):
        count     int32   [slots_per_rank]                       tokens per local slot of d
        src_token int32   [slots_per_rank, max_tokens_per_rank]  source token index, -1 past count
        x         float32 [slots_per_rank, max_tokens_per_rank, hidden]
    reply from d to s (channel 2*layer + 1):
        y         float32 [slots_per_rank, max_tokens_per_rank, hidden]  expert outputs, same rows

Rows of a (slot, source) block are in ascending source-token order, as in the reference. Every
active rank sends a block to every active rank (possibly empty), so each receive waits for the
same fixed set of peers and a missing one is detected, never waited on past the timeout.

The combine sums each token's top-k expert outputs in ascending logical-expert order with float32
accumulation, which is the order ``dense_moe`` adds them in, so the two agree bit for bit when the
expert rows do.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from eep.mlp import swiglu
from eep.exchange.layout import DispatchHandle
from eep.routing import route_to_phys
from eep.runtime.config import RuntimeConfig
from eep.runtime.engines.base import StepAborted
from eep.runtime.model import decode_step, expert_source, generate_weights
from eep.state import NO_EXPERT, ExpertPlacement
from eep.transport import Transport


@dataclass
class Block:
    """One (source -> destination) dispatch block; shapes in the module docstring."""

    count: torch.Tensor
    src_token: torch.Tensor
    x: torch.Tensor


class BlockCodec:
    """Byte layout of blocks and replies inside a transport region."""

    def __init__(self, slots_per_rank: int, max_tokens_per_rank: int, hidden: int):
        self.slots_per_rank, self.max_tokens, self.hidden = slots_per_rank, max_tokens_per_rank, hidden
        self.num_ints = slots_per_rank * (1 + max_tokens_per_rank)
        self.num_floats = slots_per_rank * max_tokens_per_rank * hidden

    @property
    def block_nbytes(self) -> int:
        return 4 * (self.num_ints + self.num_floats)

    @property
    def reply_nbytes(self) -> int:
        return 4 * self.num_floats

    def encode_block(self, block: Block) -> torch.Tensor:
        ints = torch.cat([block.count.reshape(-1), block.src_token.reshape(-1)]).to(torch.int32)
        return torch.cat([ints.view(torch.uint8), block.x.reshape(-1).to(torch.float32).view(torch.uint8)])

    def decode_block(self, region: torch.Tensor) -> Block:
        s, t, h = self.slots_per_rank, self.max_tokens, self.hidden
        ints = region[:4 * self.num_ints].view(torch.int32)
        x = region[4 * self.num_ints:self.block_nbytes].view(torch.float32).view(s, t, h)
        return Block(count=ints[:s].clone(), src_token=ints[s:].view(s, t).clone(), x=x.clone())

    def decode_reply(self, region: torch.Tensor) -> torch.Tensor:
        return region[:self.reply_nbytes].view(torch.float32).view(self.slots_per_rank, self.max_tokens,
                                                                   self.hidden).clone()


def pack_dispatch(x: torch.Tensor, phys: torch.Tensor, active: list[bool], slots_per_rank: int,
                  max_tokens_per_rank: int) -> tuple[dict[int, Block], DispatchHandle]:
    """Blocks this source sends to every active rank, and its plan for the combine.

    Parameters:
        x: ``[num_tokens, hidden]``; phys: ``[num_tokens, top_k]`` from ``route_to_phys``.
        active: per rank slot.
    """
    num_tokens, top_k = phys.shape
    if num_tokens > max_tokens_per_rank:
        raise ValueError(f"{num_tokens} tokens exceed max_tokens_per_rank={max_tokens_per_rank}")
    hidden = x.shape[1]
    num_ranks = len(active)
    flat = phys.reshape(-1).long()  # row-major: ascending token, which fixes the order in each block
    active_t = torch.tensor(active, dtype=torch.bool)
    dst = torch.where(flat >= 0, flat // slots_per_rank, 0)
    valid = (flat >= 0) & active_t[dst]
    onehot = F.one_hot(torch.where(valid, flat, 0), num_ranks * slots_per_rank) * valid.unsqueeze(1)
    position = torch.where(valid, (onehot.cumsum(0) * onehot).sum(1) - 1, -1)
    token = torch.arange(num_tokens).repeat_interleave(top_k)
    local = flat % slots_per_rank

    blocks = {}
    for d in range(num_ranks):
        if not active[d]:
            continue
        sel = valid & (dst == d)
        block = Block(count=torch.zeros(slots_per_rank, dtype=torch.int32),
                      src_token=torch.full((slots_per_rank, max_tokens_per_rank), -1, dtype=torch.int32),
                      x=torch.zeros(slots_per_rank, max_tokens_per_rank, hidden, dtype=x.dtype))
        if bool(sel.any()):
            loc, pos, tok = local[sel], position[sel], token[sel]
            block.count += torch.bincount(loc, minlength=slots_per_rank).to(torch.int32)
            block.src_token[loc, pos] = tok.to(torch.int32)
            block.x[loc, pos] = x[tok]
        blocks[d] = block
    plan = DispatchHandle(phys=torch.where(valid, flat, NO_EXPERT).view(num_tokens, top_k),
                        position=position.view(num_tokens, top_k))
    return blocks, plan


def expert_compute(blocks: dict[int, Block], w_gate: torch.Tensor, w_up: torch.Tensor,
                   w_down: torch.Tensor) -> dict[int, torch.Tensor]:
    """SwiGLU of every received row: per source ``[slots_per_rank, max_tokens, hidden]`` replies.

    Parameters:
        w_gate, w_up: ``[slots_per_rank, intermediate, hidden]``; w_down ``[slots_per_rank, hidden,
        intermediate]`` of this rank's slots. Rows of all sources for one slot run as one batch.
    """
    sources = sorted(blocks)
    replies = {s: torch.zeros_like(blocks[s].x) for s in sources}
    for local in range(w_gate.shape[0]):
        counts = [int(blocks[s].count[local]) for s in sources]
        if not sum(counts):
            continue
        rows = torch.cat([blocks[s].x[local, :n] for s, n in zip(sources, counts)])
        y = swiglu(rows, w_gate[local], w_up[local], w_down[local])
        for s, part in zip(sources, y.split(counts)):
            replies[s][local, :part.shape[0]] = part
    return replies


def combine_replies(replies: dict[int, torch.Tensor], plan: DispatchHandle, topk_ids: torch.Tensor,
                    topk_weights: torch.Tensor, slots_per_rank: int) -> torch.Tensor:
    """Sum each token's expert outputs with its top-k weights: ``[num_tokens, hidden]`` float32."""
    num_tokens, top_k = plan.phys.shape
    hidden = next(iter(replies.values())).shape[-1] if replies else 0
    gathered = torch.zeros(num_tokens, top_k, hidden, dtype=torch.float32)
    for d, y in replies.items():
        sel = (plan.phys >= 0) & (plan.phys // slots_per_rank == d)
        if bool(sel.any()):
            gathered[sel] = y[plan.phys[sel] % slots_per_rank, plan.position[sel]].float()
    weights = torch.where(plan.phys >= 0, topk_weights.float(), 0.0)
    order = topk_ids.argsort(-1)  # ascending logical expert: the order dense_moe accumulates in
    gathered = gathered.gather(1, order.unsqueeze(-1).expand(-1, -1, hidden))
    weights = weights.gather(1, order)
    acc = torch.zeros(num_tokens, hidden, dtype=torch.float32)
    for k in range(top_k):
        acc += weights[:, k:k + 1] * gathered[:, k]
    return acc


class RankMoE:
    """This rank's MoE layers: its expert slots and the exchange with its peers.

    Slot weights ``w_gate [num_layers, slots_per_rank, intermediate, hidden]`` (likewise w_up,
    w_down) hold the experts ``placement.phys_to_logical`` names for this rank's slots.
    """

    def __init__(self, rank: int, num_ranks: int, num_layers: int, slots_per_rank: int, max_tokens_per_rank: int,
                 hidden: int, intermediate: int, transport: Transport | None):
        self.rank, self.num_ranks, self.slots_per_rank = rank, num_ranks, slots_per_rank
        self.max_tokens = max_tokens_per_rank
        self.codec = BlockCodec(slots_per_rank, max_tokens_per_rank, hidden)
        self.transport = transport
        nan = float("nan")  # an unloaded slot poisons any output that reads it
        self.w_gate = torch.full((num_layers, slots_per_rank, intermediate, hidden), nan)
        self.w_up = torch.full_like(self.w_gate, nan)
        self.w_down = torch.full((num_layers, slots_per_rank, hidden, intermediate), nan)
        self.loaded = torch.full((num_layers, slots_per_rank), NO_EXPERT, dtype=torch.int64)

    def load_slot(self, layer: int, local_slot: int, logical_expert_id: int,
                  weights: tuple[torch.Tensor, torch.Tensor, torch.Tensor]) -> None:
        self.w_gate[layer, local_slot].copy_(weights[0])
        self.w_up[layer, local_slot].copy_(weights[1])
        self.w_down[layer, local_slot].copy_(weights[2])
        self.loaded[layer, local_slot] = logical_expert_id

    def missing_slots(self, placement: ExpertPlacement) -> list[tuple[int, int, int]]:
        """``(layer, local_slot, logical_expert_id)`` whose weights differ from the placement's."""
        s = self.slots_per_rank
        want = placement.phys_to_logical[:, self.rank * s:(self.rank + 1) * s]
        return [(layer, i, int(want[layer, i])) for layer, i in (want != self.loaded).nonzero().tolist()
                if int(want[layer, i]) != NO_EXPERT]

    def forward_layer(self, layer: int, x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor, *,
                      active: list[bool], placement: ExpertPlacement, epoch: int, step: int, timeout_s: float,
                      should_abort: Callable[[], bool] | None = None) -> torch.Tensor:
        """One MoE layer over the transport: ``x [num_tokens, hidden]`` -> ``[num_tokens, hidden]``.

        Raises ``StepAborted`` when a peer misses a deadline or a new decision interrupts the wait.
        """
        s = self.slots_per_rank
        active_mask = torch.tensor(active, dtype=torch.bool)
        phys = route_to_phys(topk_ids, placement.logical_to_phys[layer], active_mask, s,
                             token_offset=self.rank * self.max_tokens)
        blocks, plan = pack_dispatch(x, phys, active, s, self.max_tokens)
        peers = [r for r in range(self.num_ranks) if active[r]]
        for d in peers:
            self.transport.send(2 * layer, d, self.codec.encode_block(blocks[d]), epoch=epoch, step=step)
        got = self.transport.recv(2 * layer, peers, epoch=epoch, step=step, timeout_s=timeout_s,
                                  should_abort=should_abort)
        if not got.ok:
            raise StepAborted(layer, "dispatch", got.missed, is_aborted=got.is_aborted)
        received = {src: self.codec.decode_block(region) for src, region in got.buffers.items()}
        replies = expert_compute(received, self.w_gate[layer], self.w_up[layer], self.w_down[layer])
        for src in peers:
            self.transport.send(2 * layer + 1, src, replies[src], epoch=epoch, step=step)
        got = self.transport.recv(2 * layer + 1, peers, epoch=epoch, step=step, timeout_s=timeout_s,
                                  should_abort=should_abort)
        if not got.ok:
            raise StepAborted(layer, "combine", got.missed, is_aborted=got.is_aborted)
        replies_home = {d: self.codec.decode_reply(region) for d, region in got.buffers.items()}
        return combine_replies(replies_home, plan, topk_ids, topk_weights, s).to(x.dtype)


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
