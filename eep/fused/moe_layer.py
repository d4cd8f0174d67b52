"""``MoELayer``: the EP MoE layer with the fused expert stage, for ranks simulated in one process.

Same constructor, ``forward``, ``fail`` and ``join`` as ``eep.reference.ExpertParallelMoE`` (both
subclass ``eep.repair.ExpertSlots``: placement, repair planning and the repair executor are shared),
with three changes:

- expert weights live on ``device`` per physical slot as ``slot_w13 [num_phys_slots, 2*inter, hidden]``
  (gate rows, then up rows) and ``slot_w_down [num_phys_slots, hidden, inter]``; ``slot_w_gate`` and
  ``slot_w_up`` are views into ``slot_w13``, so the repair executor, which copies into
  ``slot_w_gate[phys]`` / ``slot_w_up[phys]``, writes the fused weight in place;
- dispatch and combine are the exchange seam's packer (``eep.exchange.packing``) over the same receive
  layout and row order as the reference (ascending source token inside each (slot, source) block);
- each rank's expert compute is an expert stage from ``eep.fused.gemm`` (CUTLASS grouped GEMM or
  ``torch._grouped_mm``).

With block-scaled FP8 experts (``eep.fp8.Fp8Weight`` weights) the slots hold e4m3 weights with their
scales (``slot_w13`` an ``Fp8Weight`` whose gate/up halves are again views), tokens are quantised per
token and 128 channels before dispatch (the FP8 dispatch), and the expert stage is an FP8 one
(``CutlassFp8ExpertStage`` on Hopper), returning bf16 for the combine.

Across processes the same stage sits between ``eep.fused.buffer.FusedBuffer.dispatch`` and
``combine`` (``RankExperts``); this class keeps every rank in one process so that differential tests
and single-GPU benchmarks exercise the expert stage, routing and repair together.
"""

from __future__ import annotations

import torch

from eep.errors import RoutingError
from eep.exchange.packing import gather_combine, pack_by_destination
from eep.fp8 import FP8_DTYPE, Fp8Weight, quantize_rows
from eep.fused.gemm import ExpertStageShape, make_expert_stage
from eep.repair.slots import ExpertSlots
from eep.routing import resolve_routing, route_to_phys


class RankExperts:
    """One rank's experts: ``experts(recv_x, recv_count) -> y``, all in the receive layout.

    w13, w2: this rank's slices ``[slots_per_rank, 2*inter, hidden]`` / ``[slots_per_rank, hidden, inter]``
    of the per-slot weights (views: a repair writing a slot in place is seen at the next call). With
    ``Fp8Weight`` slices (FP8 experts, an FP8 stage) the call also takes the FP8 dispatch's scales:
    ``experts(recv.x, recv.count, recv.scale)``; rows that arrive as bf16 (``recv.scale`` None: an
    exchange that does not send FP8) are quantised here per token and 128 channels, the values an
    FP8 dispatch would have delivered.
    """

    def __init__(self, stage, w13: torch.Tensor, w2: torch.Tensor):
        self.stage, self.w13, self.w2 = stage, w13, w2

    def __call__(self, recv_x: torch.Tensor, recv_count: torch.Tensor, recv_scale: torch.Tensor | None = None
                 ) -> torch.Tensor:
        if isinstance(self.w13, Fp8Weight):  # FP8 dispatch: its scales go with the rows
            if recv_scale is None:
                recv_x, recv_scale = quantize_rows(recv_x)
            return self.stage(recv_x, recv_scale, recv_count, self.w13, self.w2)
        return self.stage(recv_x, recv_count, self.w13, self.w2)


class MoELayer(ExpertSlots):
    """EP MoE layer (see the module docstring); extra keyword arguments:

    device: where weights and activations live (default: ``w_gate``'s device).
    backend: expert stage, as ``eep.fused.gemm.make_expert_stage`` (None: ``EEP_EXPERT_BACKEND``).
    """

    def __init__(self, w_gate: torch.Tensor, w_up: torch.Tensor, w_down: torch.Tensor, num_ranks: int,
                 slots_per_rank: int, top_k: int, renormalize: bool = True, *, device: torch.device | str | None = None,
                 backend: str | None = None, **kwargs):
        super().__init__(w_gate, w_up, w_down, num_ranks, slots_per_rank, top_k, renormalize, **kwargs)
        self.device = torch.device(device) if device is not None else w_gate.device
        self.backend = backend
        inter = self.slot_w_gate.shape[1]
        self.inter_size = inter
        if self.is_fp8:  # w13's block scales are gate's then up's: their blocks must not straddle the two
            if inter % 128:
                raise ValueError(f"FP8 experts need moe intermediate size % 128 == 0, got {inter}")
            gate, up, blocks = self.slot_w_gate, self.slot_w_up, inter // 128
            self.slot_w13 = Fp8Weight(torch.cat([gate.weight, up.weight], dim=1).to(self.device),
                                      torch.cat([gate.scale, up.scale], dim=1).to(self.device))
            self.slot_w_gate = Fp8Weight(self.slot_w13.weight[:, :inter], self.slot_w13.scale[:, :blocks])
            self.slot_w_up = Fp8Weight(self.slot_w13.weight[:, inter:], self.slot_w13.scale[:, blocks:])
        else:
            self.slot_w13 = torch.cat([self.slot_w_gate, self.slot_w_up], dim=1).to(self.device)
            self.slot_w_gate = self.slot_w13[:, :inter]
            self.slot_w_up = self.slot_w13[:, inter:]
        self.slot_w_down = self.slot_w_down.to(self.device).contiguous()
        self._stages: dict[int, object] = {}  # max_tokens_per_rank -> expert stage (shared by the simulated ranks)
        # Device mirrors of the routing tables, rewritten in place by fail/join so that a captured
        # forward reads the new tables (a new shape, i.e. more replicas per expert, needs a recapture).
        self.logical_to_phys_dev = self.placement.logical_to_phys[0].to(self.device).clone()
        self.active_dev = self.membership.active_cpu.to(self.device).clone()

    def _refresh_tables(self) -> None:
        table = self.placement.logical_to_phys[0]
        if table.shape == self.logical_to_phys_dev.shape:
            self.logical_to_phys_dev.copy_(table)
        else:
            self.logical_to_phys_dev = table.to(self.device).clone()
        self.active_dev.copy_(self.membership.active_cpu)

    def fail(self, ranks, *, rereplicate: bool = False):
        plan = super().fail(ranks, rereplicate=rereplicate)
        self._refresh_tables()
        return plan

    def join(self, rank: int, *, load: torch.Tensor | None = None):
        plan = super().join(rank, load=load)
        self._refresh_tables()
        return plan

    def _stage(self, max_tokens: int, expected_rows: float):
        if max_tokens not in self._stages:
            shape = ExpertStageShape(self.slots_per_rank, self.num_ranks, max_tokens, self.hidden_size,
                                     self.inter_size, self.top_k)
            dtype = FP8_DTYPE if self.is_fp8 else self.slot_w13.dtype
            self._stages[max_tokens] = make_expert_stage(shape, device=self.device, dtype=dtype,
                                                         backend=self.backend, expected_rows_per_group=expected_rows)
        return self._stages[max_tokens]

    # ---- forward ----
    def forward(self, hidden: torch.Tensor, router_logits: torch.Tensor | None = None, *,
                topk_ids: torch.Tensor | None = None, topk_weights: torch.Tensor | None = None) -> torch.Tensor:
        """``hidden [num_tokens, hidden]`` -> ``[num_tokens, hidden]``, routed over the active ranks.

        With ``router_logits`` (or already-validated top-k) on ``device`` and a fixed membership, the
        forward never waits for the host, so it can be captured in a CUDA graph.
        """
        if hidden.dim() != 2 or hidden.shape[1] != self.hidden_size:
            raise RoutingError(f"hidden has shape {tuple(hidden.shape)}, expected [num_tokens, {self.hidden_size}]")
        if hidden.dtype != (torch.bfloat16 if self.is_fp8 else self.slot_w13.dtype):
            raise RoutingError(f"hidden has dtype {hidden.dtype}; the experts take "
                               f"{'bf16 (FP8 experts)' if self.is_fp8 else self.slot_w13.dtype}")
        hidden = hidden.to(self.device)
        if router_logits is not None:
            router_logits = router_logits.to(self.device)
        topk_weights, topk_ids = resolve_routing(hidden, self.num_experts, router_logits, self.top_k,
                                                  self.renormalize,
                                                  None if topk_ids is None else topk_ids.to(self.device),
                                                  None if topk_weights is None else topk_weights.to(self.device))
        active_ranks = self.membership.active_ranks()
        chunks = torch.arange(hidden.shape[0]).tensor_split(len(active_ranks))
        max_tokens = self.max_tokens_per_rank or max(1, max(len(c) for c in chunks))
        s, num_ranks = self.slots_per_rank, self.num_ranks
        logical_to_phys, active = self.logical_to_phys_dev, self.active_dev

        # every active source rank packs its tokens by destination (the exchange seam's one packer);
        # each destination's receive layout is the sources' blocks side by side
        if self.is_fp8:  # FP8 dispatch: each token quantised once; its scales travel the same route
            values, scales = quantize_rows(hidden)
            wire = values.view(torch.uint8)
            recv_scale = torch.zeros(num_ranks, s, num_ranks, max_tokens, scales.shape[1], device=self.device)
        else:
            wire = hidden
        recv_x = torch.zeros(num_ranks, s, num_ranks, max_tokens, self.hidden_size, dtype=wire.dtype,
                             device=self.device)
        recv_count = torch.zeros(num_ranks, s, num_ranks, dtype=torch.int32, device=self.device)
        sources = []
        for rank, tokens in zip(active_ranks, chunks):
            if len(tokens) > max_tokens:
                raise RoutingError(f"rank {rank} has {len(tokens)} tokens, more than max_tokens_per_rank={max_tokens}")
            if len(tokens) == 0:
                continue
            sl = slice(int(tokens[0]), int(tokens[0]) + len(tokens))
            phys = route_to_phys(topk_ids[sl], logical_to_phys, active, s, token_offset=sl.start)
            packed = pack_by_destination(wire[sl], phys, num_ranks, s, max_tokens)
            recv_x[:, :, rank] = packed.send
            recv_count[:, :, rank] = packed.count
            if self.is_fp8:
                recv_scale[:, :, rank] = pack_by_destination(scales[sl], phys, num_ranks, s, max_tokens).send
            sources.append((rank, sl, phys, packed.position))
        expected_rows = hidden.shape[0] * self.top_k / max(1, self.num_experts * len(active_ranks))
        stage = self._stage(max_tokens, expected_rows)
        if self.is_fp8:
            recv_x = recv_x.view(FP8_DTYPE)
        ys = torch.zeros(recv_x.shape, dtype=torch.bfloat16 if self.is_fp8 else recv_x.dtype, device=self.device)
        for rank in active_ranks:
            experts = RankExperts(stage, self.slot_w13[rank * s:(rank + 1) * s],
                                  self.slot_w_down[rank * s:(rank + 1) * s])
            ys[rank] = experts(recv_x[rank], recv_count[rank], recv_scale[rank] if self.is_fp8 else None)
        out = torch.zeros(hidden.shape[0], self.hidden_size, dtype=torch.float32, device=self.device)
        for rank, sl, phys, position in sources:
            out[sl] = gather_combine(ys[:, :, rank], phys, position, topk_weights[sl])
        return out.to(hidden.dtype)

    __call__ = forward
