"""GPU data plane of a rank: the bench decode model (bf16 or block-scaled FP8 experts), one CUDA graph per step.

``GpuEngine`` implements the engine seam of ``eep/runtime/engines/base.py`` (``RuntimeConfig.engine``
``"fused"``, ``"fused_fixed"`` or ``"nccl"``). The model is the runtime's tiny decode model
(``eep/runtime/model.py``: a Markov chain over tokens, so a re-queued request re-runs from its
prompt) at a real MoE shape, plus a fixed-cost stand-in for attention:

    h = embed[token]                                          # [tokens, hidden] float32
    for layer:
        x = bf16(rms_norm(h))
        topk_weights, topk_ids = select_experts(x @ router[layer].T, top_k)
        phys = route_to_phys(topk_ids, l2p[layer], active_mask, slots_per_rank)
        moe = combine(experts(dispatch(x, phys)), topk_weights)          # crosses ranks
        attn = (x @ attn_in[layer]) @ attn_out[layer]        # stand-in: fixed FLOPs, weight 0
        h = h + moe + 0 * attn
    next = argmax(rms_norm(h) @ lm_head.T)

The attention stand-in costs what the projections of one decode attention layer cost
(``attn_width`` = 9216 for qwen3-30b-a3b: q 4096 + k 512 + v 512 + o 4096 columns of hidden 2048)
and is added with weight 0, so tokens are the MoE model's alone and the CPU oracle can skip it.
Non-expert weights come from a seed (``bench_weights``); expert weights from ``eep-shards
prepare`` output (weights_tools' host tier, then disk) or from a peer's replica, as the plan says,
into per-slot device tensors ``w13 [layers, slots, 2*inter, hidden]`` and ``w2 [layers, slots,
hidden, inter]`` in one VMM allocation that peers map (``RankSlots``, eep/runtime/engines/slots.py);
the copies run on the slots' copy stream, off the compute stream.

FP8 experts: when the shards hold block-scaled FP8 experts (their manifest says so) the slots hold
e4m3 weights with their float32 128x128 scales (``eep.fp8.Fp8Weight``; a restore, a peer copy and a
poisoning move both), tokens are dispatched as e4m3 with float32 scales, and the FP8 expert stage
(``CutlassFp8ExpertStage`` with ``expert_backend`` cutlass or auto on Hopper, else the torch FP8 stage)
reads the receive layout and its scales as they arrive, with no dequantise pass, and answers bf16 for
the combine. The fused buffer's kernels quantise a row with one scale; the shm exchange sends one per
128 channels (DeepEP's format); behind an exchange that moves bf16 rows (local, NCCL, gloo) the
received rows are quantised per 128 channels before the stage, the same values the sender would have
made (``fp8_scale_block`` names the format per exchange, for the oracle). Repair and restore plans
count FP8 bytes (``eep.runtime.control.rules.runtime_expert_nbytes``).

The tokens cross ranks through the exchange seam (``make_exchange`` below, by engine name): the
fused GPU buffer (membership-aware or the fixed-membership baseline), the collective baseline
(NCCL, or gloo on CPU), the host shared-memory exchange (``cpu_elastic``: the CPU tests of the failure
path) or one rank alone (``local``). The engine never asks which one it holds.

With a graph-safe exchange everything is captured once into a CUDA graph of ``max_tokens_per_rank``
tokens (smaller batches are padded), and, with ``degraded_tokens_per_rank``, a second graph of that
many tokens for steps where survivors absorb a missing rank's share; a membership change rewrites
the membership mirror, ``l2p`` and the step counters in place, so no graph is ever recaptured. The
exchange's miss counters are copied out with the next tokens in one device-to-host copy per step.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch

from eep.errors import PeerUnreachableError
from eep.fp8 import BLOCK as FP8_BLOCK
from eep.fp8 import FP8_DTYPE, quantize_rows
from eep.routing import route_to_phys, select_experts
from eep.runtime.config import RuntimeConfig
from eep.repair import ExecutionReport
from eep.runtime.engines.base import StepAborted
from eep.runtime.engines.slots import BackgroundCopies, PlanPart, RankSlots
from eep.runtime.model import ModelLayerTier, bench_weights, rms_norm
from eep.state import NO_EXPERT, ExpertPlacement, Membership

# ---- the engine -------------------------------------------------------------------------------

class GpuEngine:
    """The engine seam over a GPU exchange (docstring of the module; options in ``cfg.engine_options``):

    attn_width (int, default 0): columns of the attention stand-in; expert_backend (default "auto");
    tiers (default ["host", "disk"]); pin_host_tier (None: weights_tools decides, i.e. pin on CUDA at
    construction; False: map without pinning; "first_start": pin in a rank's first incarnation only — a
    restarted rank's start-up is on the path back to full throughput, and registering the whole
    mapping is most of it, while it loads only its own slots' share, pageable);
    max_replicas (default 8): width of the device replica table; device ("cuda" or "cpu"; default cuda);
    use_graph (default True on CUDA).
    """

    def __init__(self, cfg: RuntimeConfig, rank: int, *, store: Any, run_id: str, incarnation: int,
                 engine: str = "fused", shm_path: str | None = None):
        # seconds per start-up phase: a restarted rank's start-up is most of the time back to 95%
        self.init_phases: dict[str, float] = {}
        mark = _PhaseClock(self.init_phases)
        from weights_tools import ExpertStore
        from eep.fused.gemm import ExpertStageShape, make_expert_stage
        from eep.fused.moe_layer import RankExperts

        mark("imports")
        opts = dict(cfg.engine_options)
        self.cfg, self.rank, self.engine_name = cfg, rank, engine
        self.control_store, self.run_id = store, run_id
        c = cfg.model
        want_device = opts.get("device", "cuda")
        if want_device == "cuda":
            torch.cuda.set_device(rank % torch.cuda.device_count())
            self.device = torch.device("cuda", torch.cuda.current_device())
        else:
            self.device = torch.device(want_device)
        if self.device.type == "cuda":
            torch.empty(1, device=self.device)  # the CUDA context, on its own clock
        mark("device")
        self.use_graph = bool(opts.get("use_graph", self.device.type == "cuda"))
        # M: the receive capacity per source, the largest batch any step can have; a graph is
        # captured per batch size (full membership, and degraded when survivors absorb more)
        S, M, L = cfg.slots_per_rank, cfg.token_capacity, c.num_layers
        self.S, self.M, self.L = S, M, L
        self.sizes = sorted({cfg.max_tokens_per_rank, M})
        if cfg.shard_dir is None:
            raise ValueError("GpuEngine needs RuntimeConfig.shard_dir (experts come from eep-shards output)")
        tiers = expert_tiers(cfg.shard_dir, opts.get("tiers", ["host", "disk"]),
                             host_tier_pin(opts.get("pin_host_tier"), incarnation))
        self.store = ExpertStore(cfg.shard_dir, tiers=tiers)
        mark("expert_store")  # host tier attach (and pinning, on CUDA)
        self.moe_layers = self.store.moe_layers
        self.tiers = [ModelLayerTier(t, self.moe_layers) for t in self.store.tiers]
        if (len(self.moe_layers), self.store.num_experts) != (L, c.num_experts):
            raise ValueError(f"shards in {cfg.shard_dir} hold {len(self.moe_layers)} MoE layers x "
                             f"{self.store.num_experts} experts; the config needs {L} x {c.num_experts}")
        self.is_fp8 = self.store.is_fp8
        self.scale_block = fp8_scale_block(engine, c.hidden)
        w = bench_weights(c)
        dt, dev = torch.bfloat16, self.device
        self.embed = w.embed.to(dev)
        self.router = w.router.to(dev)  # float32: routing decided as in the oracle, not on bf16 logits
        self.lm_head = w.lm_head.to(dev)
        width = int(opts.get("attn_width", 0))
        self.attn = None
        if width:  # drawn on the device: 2 x 48 x 2048 x 9216 values would take seconds on a CPU
            gen = torch.Generator(device=dev).manual_seed(rank + 1)
            self.attn = ((torch.randn(L, c.hidden, width, generator=gen, device=dev) / c.hidden ** 0.5).to(dt),
                         (torch.randn(L, width, c.hidden, generator=gen, device=dev) / width ** 0.5).to(dt))
        self.max_replicas = int(opts.get("max_replicas", 8))
        self.l2p = torch.full((L, c.num_experts, self.max_replicas), NO_EXPERT, dtype=torch.int64, device=dev)
        # per-slot weights in one allocation peers can map (VMM on a GPU); NaN until loaded
        self.slots = RankSlots(rank=rank, num_ranks=cfg.num_ranks, num_layers=L, slots_per_rank=S, hidden=c.hidden,
                               intermediate=c.intermediate, dtype=FP8_DTYPE if self.is_fp8 else dt, device=dev,
                               store=store, run_id=run_id,
                               incarnation=incarnation, on_switch=self._write_table,
                               connect_timeout_s=cfg.peer_connect_timeout_s)
        mark("weights_alloc")
        # One stage, sized for the capacity, serves every graph: what a rank receives depends on its
        # peers' batches, not its own (a rank replaying the small graph can receive from survivors
        # still draining large batches), so a per-graph stage sized by its own batch would overflow.
        # Kernels are picked for the full-membership batch, the common case: a (slot, source) block
        # then holds about max_tokens * top_k / (ranks * slots) rows (5 at the qwen3 bench shape).
        rows_per_block = cfg.max_tokens_per_rank * c.top_k / (cfg.num_ranks * S)
        self.stage = make_expert_stage(ExpertStageShape(S, cfg.num_ranks, M, c.hidden, c.intermediate, c.top_k),
                                       device=dev, dtype=FP8_DTYPE if self.is_fp8 else dt,
                                       backend=opts.get("expert_backend"), expected_rows_per_group=rows_per_block)
        # per layer: the stage over that layer's slot views (RankExperts takes the FP8 dispatch's scales)
        self.experts = [RankExperts(self.stage, self.slots.w13[layer], self.slots.w2[layer]) for layer in range(L)]
        mark("expert_stage")
        self.membership = Membership(cfg.num_ranks, device=dev)  # the one every exchange call and kernel reads
        self.exchange = make_exchange(engine, cfg, rank, store=store, group=f"{run_id}/fused", device=dev,
                                      membership=self.membership, shm_path=shm_path, use_fp8=self.is_fp8)
        self.use_graph = (self.use_graph and self.exchange.is_graph_safe
                          and getattr(self.stage, "is_graph_safe", True))
        mark("exchange")
        self.tokens = {n: torch.zeros(n, dtype=torch.int64, device=dev) for n in self.sizes}  # static inputs
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.outs: dict[int, torch.Tensor] = {}
        self.last_misses = [0] * cfg.num_ranks

    # ---- slots ----
    def execute(self, part: PlanPart) -> ExecutionReport:
        """This rank's part of a plan: copies on the slots' copy stream (peer replicas device to device,
        host tier asynchronously when pinned), one event per layer batch, the switch once the last is done."""
        return self.slots.execute(part, self.tiers)

    def copy_in_background(self, part: PlanPart) -> BackgroundCopies:
        return self.slots.copy_in_background(part, self.tiers)

    def _write_table(self, placement: ExpertPlacement) -> None:
        table = placement.logical_to_phys
        if table.shape[2] > self.max_replicas:
            raise RuntimeError(f"rank {self.rank}: placement has {table.shape[2]} replicas per expert, more than "
                               f"engine_options max_replicas={self.max_replicas} (the captured table width)")
        padded = torch.full_like(self.l2p, NO_EXPERT, device="cpu")
        padded[:, :, :table.shape[2]] = table
        self.l2p.copy_(padded)  # in place: a captured graph reads the new table at its next replay

    # ---- the step ----
    def _forward(self, tokens: torch.Tensor) -> torch.Tensor:
        c = self.cfg.model
        h = self.embed[tokens]
        for layer in range(self.L):
            x = rms_norm(h).to(torch.bfloat16)
            topk_weights, topk_ids = select_experts(x.float() @ self.router[layer].T, c.top_k)
            phys = route_to_phys(topk_ids, self.l2p[layer], self.membership.active_device, self.S,
                                 token_offset=self.rank * self.M)
            recv, handle = self.exchange.dispatch(x, phys)
            y = self.experts[layer](recv.x, recv.count, recv.scale)
            h = h + self.exchange.combine(y, handle, topk_weights).float()
            if self.attn is not None:
                h = h + 0.0 * ((x @ self.attn[0][layer]) @ self.attn[1][layer]).float()
        next_tokens = (rms_norm(h) @ self.lm_head.T).argmax(-1)
        return torch.cat([next_tokens, self.exchange.miss_count.to(torch.int64)])  # one copy out per step

    def warmup(self) -> None:
        """Expert stage and dense parts on random rows, alone; then capture the step graph (no peer
        is touched: capture records the exchange kernels without running them)."""
        c, dev = self.cfg.model, self.device
        gen = torch.Generator(device=dev).manual_seed(self.rank)
        shape = (self.S, self.cfg.num_ranks, self.M, c.hidden)
        # drawn once, on the device: 48 slots x 4 ranks x 128 rows x 2048 drawn per layer on the CPU
        # took 18 s of a 48-layer rank's start-up (and of a joiner's time back to service)
        x = torch.randn(shape, generator=gen, device=dev).to(torch.bfloat16)
        scale = None
        if self.is_fp8:  # the rows as this engine's dispatch delivers them: e4m3 with its scale format
            x, scale = quantize_rows(x, block=self.scale_block)
            scale = scale.squeeze(-1) if self.scale_block == c.hidden else scale
        # a realistic fill: each source sends max_tokens * top_k rows, spread over the slots
        per_block = max(1, self.M * min(c.top_k, self.S) // self.S)
        count = torch.full((self.S, self.cfg.num_ranks), per_block, dtype=torch.int32, device=dev)
        row = torch.arange(self.M, device=dev)
        for layer in range(self.L):
            count_l = torch.where((self.slots.loaded[layer] >= 0).to(dev).unsqueeze(1), count, 0).to(torch.int32)
            y = self.experts[layer](x, count_l, scale)
            if not bool(torch.isfinite(y[row < count_l.unsqueeze(-1)]).all()):
                raise RuntimeError(f"rank {self.rank}: warm-up of layer {layer} gave non-finite outputs")
        if self.use_graph and not self.graphs:
            side = torch.cuda.Stream(dev)
            side.wait_stream(torch.cuda.current_stream(dev))
            for n in self.sizes:
                with torch.cuda.stream(side):  # lazy library state (cuBLAS) is created outside the capture
                    self._dense_warmup(self.tokens[n])
                self.graphs[n] = torch.cuda.CUDAGraph()
                with torch.cuda.graph(self.graphs[n], stream=side):
                    self.outs[n] = self._forward(self.tokens[n])
            torch.cuda.current_stream(dev).wait_stream(side)
            torch.cuda.synchronize(dev)

    def _dense_warmup(self, tokens: torch.Tensor) -> None:
        """Every op of the step except the exchange, eagerly (no peer is touched)."""
        c = self.cfg.model
        h = self.embed[tokens]
        x = rms_norm(h).to(torch.bfloat16)
        for layer in range(min(self.L, 2)):
            topk_weights, topk_ids = select_experts(x.float() @ self.router[layer].T, c.top_k)
            route_to_phys(topk_ids, self.l2p[layer], self.membership.active_device, self.S,
                          token_offset=self.rank * self.M)
            if self.attn is not None:
                h = h + 0.0 * ((x @ self.attn[0][layer]) @ self.attn[1][layer]).float()
        (rms_norm(h) @ self.lm_head.T).argmax(-1)
        torch.cat([topk_ids[:, 0], self.exchange.miss_count.to(torch.int64)])

    def on_commit(self, *, active: list[bool], joined: list[int], epoch: int, start_step: int,
                  is_joiner: bool) -> None:
        if not self.exchange.is_membership_aware and not all(active):
            raise RuntimeError(f"rank {self.rank}: engine {self.engine_name} cannot serve a partial membership")
        peers = [r for r, a in enumerate(active) if a and r != self.rank]
        # a joiner maps everyone; survivors map the joiners' new incarnations and anyone not mapped yet
        fresh = [r for r in peers if is_joiner or r in joined or r not in self.exchange.connected]
        try:
            self.exchange.connect(fresh, timeout_s=self.cfg.peer_connect_timeout_s)
        except PeerUnreachableError as exc:  # their failure, not this rank's: rank.py reports them
            raise StepAborted(-1, "connect", exc.ranks, is_aborted=False) from exc
        self.exchange.set_membership(Membership(self.cfg.num_ranks, active=active, epoch=epoch))
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.last_misses = self.exchange.miss_count.tolist()

    def decode(self, tokens: torch.Tensor, *, active: list[bool], placement: ExpertPlacement, epoch: int, step: int,
               timeout_s: float, should_abort: Callable[[], bool] | None = None) -> list[int]:
        n = tokens.shape[0]
        if n > self.M:
            raise ValueError(f"rank {self.rank}: {n} tokens > the engine's capacity of {self.M} per step")
        size = next(k for k in self.sizes if k >= n)  # the smallest captured batch that holds them
        padded = torch.zeros(size, dtype=torch.int64)
        padded[:n] = tokens
        self.tokens[size].copy_(padded)  # the graph's static input (fixed token count)
        if size in self.graphs:
            self.graphs[size].replay()
            out = self.outs[size].cpu()
        else:
            out = self._forward(self.tokens[size]).cpu()
        misses = out[size:].tolist()
        missed = [r for r, (a, b) in enumerate(zip(misses, self.last_misses)) if a > b and active[r]]
        self.last_misses = misses
        if missed:
            raise StepAborted(-1, "step", missed, is_aborted=bool(should_abort and should_abort()))
        return out[:n].tolist()

    def close(self) -> None:
        self.exchange.close()
        self.slots.close()
        self.store.close()


class _PhaseClock:
    """``mark(name)`` records the seconds since the previous mark under ``name``."""

    def __init__(self, phases: dict[str, float]):
        self.phases, self.t = phases, time.perf_counter()

    def __call__(self, name: str) -> None:
        now = time.perf_counter()
        self.phases[name] = now - self.t
        self.t = now


def host_tier_pin(policy: bool | str | None, incarnation: int) -> bool | None:
    """HostTier's ``pin`` for a rank process from the engine's ``pin_host_tier`` option."""
    if policy == "first_start":
        return None if incarnation == 0 else False
    if policy not in (None, True, False):
        raise ValueError(f"pin_host_tier={policy!r}: expected None, True, False or 'first_start'")
    return policy


def expert_tiers(shard_dir: str, names: list[str], pin: bool | None) -> list:
    """weights_tools tiers by name; the host tier pinned or not as asked (pinning a 58 GB mapping
    costs start-up time in every rank process, and buys asynchronous, faster restores)."""
    from weights_tools import DiskTier, HostTier

    return [HostTier(shard_dir, pin=pin) if n == "host" else DiskTier(shard_dir) if n == "disk" else n for n in names]


def fp8_scale_block(engine: str, hidden: int) -> int:
    """Channels per activation scale of the FP8 dispatch behind ``engine``: the fused GPU buffer's
    kernels quantise a whole row with one scale (``hidden``); the shm exchange sends one scale per
    128 channels, and so does the engine itself behind exchanges that move bf16 rows (``RankExperts``)."""
    return hidden if engine in ("fused", "fused_fixed") else FP8_BLOCK


def make_exchange(engine: str, cfg: RuntimeConfig, rank: int, *, store: Any, group: str, device: torch.device,
                  membership: Membership, shm_path: str | None, use_fp8: bool = False):
    """The ``DecodeExchange`` an engine name stands for (``eep.exchange.protocol``), built on ``membership``.

    fused / fused_fixed: the fused GPU buffer (membership-aware, or the fixed-membership baseline);
    nccl / gloo: the collective baseline; cpu_elastic: the host shared-memory exchange (bf16, CPU);
    local: one rank, no peers. Peers are connected later, at the first commit (``on_commit``).
    ``use_fp8``: rows travel as e4m3 with their scales where the exchange can send them (fused,
    cpu_elastic; ``fp8_scale_block`` says in which format); the others move bf16 rows.
    """
    c, S, M = cfg.model, cfg.slots_per_rank, cfg.token_capacity
    if engine in ("fused", "fused_fixed"):
        from eep.fused.buffer import FusedBuffer
        return FusedBuffer(rank, cfg.num_ranks, slots_per_rank=S, max_tokens_per_rank=M, hidden=c.hidden,
                           top_k=c.top_k, store=store, group=group, connect=[],
                           fixed_membership=engine == "fused_fixed", timeout_s=cfg.transport_timeout_s,
                           device=device, membership=membership, use_fp8=use_fp8)
    if engine in ("nccl", "gloo"):
        from eep.exchange.collective import CollectiveExchange
        return CollectiveExchange(rank, cfg.num_ranks, slots_per_rank=S, max_tokens_per_rank=M, hidden=c.hidden,
                                  store=store, group=group, backend=engine, device=device, membership=membership)
    if engine == "cpu_elastic":
        from eep.exchange.shm import ShmExchange
        from eep.transport import SharedMemoryTransport
        return ShmExchange(SharedMemoryTransport(shm_path, rank), slots_per_rank=S, max_tokens_per_rank=M,
                           hidden=c.hidden, dtype=torch.bfloat16, use_fp8=use_fp8, membership=membership,
                           timeout_s=cfg.transport_timeout_s)
    if engine == "local":
        from eep.exchange.local import LocalExchange
        return LocalExchange(slots_per_rank=S, max_tokens_per_rank=M, hidden=c.hidden, membership=membership,
                             device=device)
    raise ValueError(f"GpuEngine: unknown engine {engine!r}")
