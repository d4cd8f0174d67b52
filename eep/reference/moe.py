"""The reference MoE layers: a dense single-device oracle and an EP layer over simulated ranks.

``dense_moe`` is what Mixtral / Qwen3-MoE compute (softmax -> top-k -> optional renormalisation,
SwiGLU experts). ``ExpertParallelMoE`` computes the same function by routing through a placement
to per-slot weights on ``num_ranks`` simulated ranks, and keeps computing it after ranks fail
and rejoin: only the hosts of the experts move.

Both take block-scaled FP8 experts too (``eep.fp8.Fp8Weight`` stacks, e.g. from
``weights_tools.load_layer_experts``): tokens are then quantised per token and 128 channels as the
FP8 dispatch sends them, and each expert is ``eep.reference.fp8.swiglu_fp8``. Slots hold the FP8
weights with their scales, and repair moves the two together.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from eep.errors import RoutingError
from eep.fp8 import ExpertWeight, Fp8Weight, quantize_rows, weight_nbytes
from eep.reference.dispatch import combine, dispatch, expert_mlp, swiglu
from eep.reference.executor import ReferenceExecutor
from eep.reference.fp8 import expert_mlp_fp8, swiglu_fp8
from eep.repair import (Bandwidth, ExecutionReport, ExpertSource, ReintegrationPlan, RepairPlan, TensorTier,
                        plan_reintegration, plan_repair)
from eep.routing import check_topk, route_to_phys, select_experts
from eep.state import NO_EXPERT, ExpertPlacement, Membership, ValidityReport, check_validity


def dense_moe(hidden: torch.Tensor, w_gate: ExpertWeight, w_up: ExpertWeight, w_down: ExpertWeight, *,
              router_logits: torch.Tensor | None = None, top_k: int | None = None, renormalize: bool = True,
              topk_ids: torch.Tensor | None = None, topk_weights: torch.Tensor | None = None) -> torch.Tensor:
    """Single-device MoE over all experts: the oracle every EP path must match.

    Parameters:
        hidden: ``[num_tokens, hidden]``; w_gate, w_up: ``[num_experts, intermediate, hidden]``;
        w_down: ``[num_experts, hidden, intermediate]`` (tensors, or ``Fp8Weight`` stacks: FP8 experts,
        tokens quantised per 1x128 block first). Either ``router_logits`` ``[num_tokens,
        num_experts]`` with ``top_k``, or precomputed ``topk_ids``/``topk_weights`` ``[num_tokens, top_k]``.
    """
    topk_weights, topk_ids = _resolve_routing(hidden, w_gate.shape[0], router_logits, top_k, renormalize,
                                              topk_ids, topk_weights)
    is_fp8 = isinstance(w_gate, Fp8Weight)
    if is_fp8:
        values, scales = quantize_rows(hidden)
    acc = torch.zeros(hidden.shape[0], hidden.shape[1], dtype=torch.float32, device=hidden.device)
    for expert in topk_ids.unique().tolist():
        token, k = (topk_ids == expert).nonzero(as_tuple=True)
        if is_fp8:
            y = swiglu_fp8(values[token], scales[token], w_gate[expert], w_up[expert], w_down[expert])
        else:
            y = swiglu(hidden[token], w_gate[expert], w_up[expert], w_down[expert])
        acc.index_add_(0, token, topk_weights[token, k].float().unsqueeze(1) * y.float())
    if is_fp8:  # FP8 experts answer in bf16, and their sum crosses the wire back in bf16
        acc = acc.to(torch.bfloat16)
    return acc.to(hidden.dtype)


class ExpertParallelMoE:
    """One MoE layer spread over ``num_ranks`` simulated EP ranks, with failure and rejoin.

    Weights are held per physical slot (``slot_w_gate[phys_slot]`` ...), as a real rank holds
    them. A failed rank's slots are poisoned with NaN, so any path that still read them would
    show in the output. Tokens are split evenly over the *active* ranks (a dead rank's requests
    are re-queued on survivors by the serving layer).

    Coverage repair on ``fail`` follows ``eep.plan_repair``: experts that keep a live replica
    are re-routed (no copy); an expert that lost every replica is restored into a spare or donor
    slot from the fastest of ``tiers`` that holds it (default: a host tier over the weights this
    object was built from; pass ``weights_tools`` Host/Disk tiers for the real thing, with
    ``layer_id`` naming this layer in them). A corrupt tier falls back to the next one; if none
    can serve, nothing changes. ``join`` follows ``eep.plan_reintegration``.
    """

    def __init__(self, w_gate: torch.Tensor, w_up: torch.Tensor, w_down: torch.Tensor, num_ranks: int,
                 slots_per_rank: int, top_k: int, renormalize: bool = True, *,
                 placement: ExpertPlacement | None = None, load: torch.Tensor | None = None,
                 num_redundant: int | None = None, max_tokens_per_rank: int | None = None,
                 tiers: list[ExpertSource] | None = None, layer_id: int = 0, bandwidth: Bandwidth | None = None):
        _check_weights(w_gate, w_up, w_down)
        num_experts = w_gate.shape[0]
        if not 1 <= top_k <= num_experts:
            raise ValueError(f"top_k={top_k} must be in [1, num_experts={num_experts}]")
        self.num_experts = num_experts
        self.hidden_size = w_gate.shape[2]
        self.top_k = top_k
        self.renormalize = renormalize
        self.max_tokens_per_rank = max_tokens_per_rank
        self.membership = Membership(num_ranks)
        if placement is None:
            placement = ExpertPlacement.build(1, num_experts, num_ranks, slots_per_rank, load,
                                              num_redundant=num_redundant)
        elif (placement.num_layers, placement.num_experts, placement.num_ranks, placement.slots_per_rank) != \
                (1, num_experts, num_ranks, slots_per_rank):
            raise ValueError(f"{placement} does not match 1 layer, {num_experts} experts, {num_ranks} ranks x "
                             f"{slots_per_rank} slots")
        self.placement = placement.clone()
        self.layer_id = layer_id
        self.tiers = list(tiers) if tiers is not None else [TensorTier({layer_id: (w_gate, w_up, w_down)})]
        self.bandwidth = bandwidth
        self.last_report: ExecutionReport | None = None
        num_phys = num_ranks * slots_per_rank
        self.is_fp8 = isinstance(w_gate, Fp8Weight)
        self.slot_w_gate, self.slot_w_up, self.slot_w_down = (_poisoned_slots(w, num_phys)
                                                              for w in (w_gate, w_up, w_down))
        for phys, expert in enumerate(self.placement.phys_to_logical[0].tolist()):
            if expert != NO_EXPERT:
                self.slot_w_gate[phys].copy_(w_gate[expert])
                self.slot_w_up[phys].copy_(w_up[expert])
                self.slot_w_down[phys].copy_(w_down[expert])

    @property
    def num_ranks(self) -> int:
        return self.membership.num_ranks

    @property
    def slots_per_rank(self) -> int:
        return self.placement.slots_per_rank

    # ---- forward ----
    def forward(self, hidden: torch.Tensor, router_logits: torch.Tensor | None = None, *,
                topk_ids: torch.Tensor | None = None, topk_weights: torch.Tensor | None = None) -> torch.Tensor:
        """``hidden [num_tokens, hidden]`` -> ``[num_tokens, hidden]``, routed over the active ranks."""
        if hidden.dim() != 2 or hidden.shape[1] != self.hidden_size:
            raise RoutingError(f"hidden has shape {tuple(hidden.shape)}, expected [num_tokens, {self.hidden_size}]")
        if self.is_fp8 and hidden.dtype not in (torch.bfloat16, torch.float32):
            raise RoutingError(f"hidden has dtype {hidden.dtype}; FP8 experts take bf16 or float32 tokens")
        if not self.is_fp8 and hidden.dtype != self.slot_w_gate.dtype:
            raise RoutingError(f"hidden has dtype {hidden.dtype}, the expert weights {self.slot_w_gate.dtype}")
        topk_weights, topk_ids = _resolve_routing(hidden, self.num_experts, router_logits, self.top_k,
                                                  self.renormalize, topk_ids, topk_weights)
        active = self.membership.active_cpu.tolist()
        active_ranks = self.membership.active_ranks()
        chunks = torch.arange(hidden.shape[0]).tensor_split(len(active_ranks))
        max_tokens = self.max_tokens_per_rank or max(1, max(len(c) for c in chunks))

        x_by_rank, phys_by_rank, w_by_rank = [None] * self.num_ranks, [None] * self.num_ranks, [None] * self.num_ranks
        for rank, tokens in zip(active_ranks, chunks):
            offset = int(tokens[0]) if len(tokens) else 0
            x_by_rank[rank] = hidden[tokens]
            w_by_rank[rank] = topk_weights[tokens]
            phys_by_rank[rank] = route_to_phys(topk_ids[tokens], self.placement.logical_to_phys[0],
                                               self.membership.active_cpu, self.slots_per_rank, token_offset=offset)
        s = self.slots_per_rank
        if self.is_fp8:  # FP8 dispatch: each source quantises its tokens once, values and scales travel
            quantized = [None if x is None else quantize_rows(x) for x in x_by_rank]
            recvs, handles = dispatch([q and q[0] for q in quantized], phys_by_rank, active, s, max_tokens)
            recv_scales, _ = dispatch([q and q[1] for q in quantized], phys_by_rank, active, s, max_tokens)
            ys = [None if recv is None else
                  expert_mlp_fp8(recv, recv_scale.x, self.slot_w_gate[r * s:(r + 1) * s],
                                 self.slot_w_up[r * s:(r + 1) * s], self.slot_w_down[r * s:(r + 1) * s])
                  for r, (recv, recv_scale) in enumerate(zip(recvs, recv_scales))]
        else:
            recvs, handles = dispatch(x_by_rank, phys_by_rank, active, s, max_tokens)
            ys = [None if recv is None else
                  expert_mlp(recv, self.slot_w_gate[r * s:(r + 1) * s], self.slot_w_up[r * s:(r + 1) * s],
                             self.slot_w_down[r * s:(r + 1) * s])
                  for r, recv in enumerate(recvs)]
        outs = combine(ys, handles, w_by_rank, s)
        return torch.cat([outs[r] for r in active_ranks], dim=0).to(hidden.dtype)

    __call__ = forward

    # ---- membership transitions ----
    def fail(self, ranks: int | Iterable[int], *, rereplicate: bool = False) -> RepairPlan:
        """Ranks die: drop their slots, restore orphans from the tiers. All-or-nothing.

        ``rereplicate=True`` also runs the background phase (spare slots take extra replicas);
        by default spare slots stay free for the next failure's orphans.
        """
        after = self.membership.after_failure(ranks)  # validates; raises before any change
        plan = plan_repair(self.placement, self.membership, after, self.tiers, self.bandwidth,
                           layer_ids=[self.layer_id], rereplicate=rereplicate, expert_nbytes=self._expert_nbytes)
        self.last_report = plan.execute(ReferenceExecutor(self, after, self.tiers))
        if rereplicate:
            plan.execute_rereplication(ReferenceExecutor(self, after, self.tiers))
        return plan

    def join(self, rank: int, *, load: torch.Tensor | None = None) -> ReintegrationPlan:
        """A repaired ``rank`` comes back; survivors keep their slots and only serve as copy sources."""
        after = self.membership.after_join(rank)
        plan = plan_reintegration(self.placement, self.membership, rank, load, tiers=self.tiers,
                                  bandwidth=self.bandwidth, layer_ids=[self.layer_id],
                                  expert_nbytes=self._expert_nbytes)
        self.last_report = plan.execute(ReferenceExecutor(self, after, self.tiers))
        return plan

    def validity(self) -> ValidityReport:
        return check_validity(self.membership, self.placement)

    # ---- weights ----
    @property
    def _expert_nbytes(self) -> int:
        """Bytes one expert's restore moves: weights, plus their block scales for FP8 experts."""
        return sum(weight_nbytes(w[0]) for w in (self.slot_w_gate, self.slot_w_up, self.slot_w_down))

    def poison_slots(self, phys_slots: Iterable[int]) -> None:
        """Fill slots with NaN: what a dead rank held must never be read again."""
        for phys in phys_slots:
            for w in (self.slot_w_gate, self.slot_w_up, self.slot_w_down):
                w[phys].fill_(float("nan"))


def _poisoned_slots(w: ExpertWeight, num_phys: int) -> ExpertWeight:
    """NaN-filled per-slot storage shaped like one expert of the stack ``w`` (an ``Fp8Weight`` stack
    gets FP8 weights and float32 scales, both NaN)."""
    if isinstance(w, Fp8Weight):
        return Fp8Weight(torch.full((num_phys, *w.weight.shape[1:]), float("nan"), dtype=w.weight.dtype),
                         torch.full((num_phys, *w.scale.shape[1:]), float("nan"), dtype=torch.float32))
    return torch.full((num_phys, *w.shape[1:]), float("nan"), dtype=w.dtype)


def _check_weights(w_gate: ExpertWeight, w_up: ExpertWeight, w_down: ExpertWeight) -> None:
    kinds = {isinstance(w, Fp8Weight) for w in (w_gate, w_up, w_down)}
    if len(kinds) != 1:
        raise ValueError("w_gate, w_up and w_down must all be tensors or all be Fp8Weight (FP8 with block scales)")
    if kinds.pop():
        for name, w in (("w_gate", w_gate), ("w_up", w_up), ("w_down", w_down)):
            if w.weight.dtype != torch.float8_e4m3fn or w.scale.dtype != torch.float32:
                raise ValueError(f"{name} is {w.weight.dtype} with {w.scale.dtype} scales, expected "
                                 "float8_e4m3fn with float32 scales")
        w_gate, w_up, w_down = w_gate.weight, w_up.weight, w_down.weight
    if w_gate.dim() != 3:
        raise ValueError(f"w_gate has shape {tuple(w_gate.shape)}, expected [num_experts, intermediate, hidden]")
    num_experts, inter, hidden = w_gate.shape
    if tuple(w_up.shape) != (num_experts, inter, hidden):
        raise ValueError(f"w_up has shape {tuple(w_up.shape)}, expected {(num_experts, inter, hidden)} like w_gate")
    if tuple(w_down.shape) != (num_experts, hidden, inter):
        raise ValueError(f"w_down has shape {tuple(w_down.shape)}, expected {(num_experts, hidden, inter)}")
    for name, w in (("w_gate", w_gate), ("w_up", w_up), ("w_down", w_down)):
        if not w.is_floating_point():
            raise ValueError(f"{name} has dtype {w.dtype}, expected a floating type")
        if w.dtype != w_gate.dtype:
            raise ValueError(f"{name} has dtype {w.dtype} but w_gate has {w_gate.dtype}")


def _resolve_routing(hidden: torch.Tensor, num_experts: int, router_logits: torch.Tensor | None, top_k: int | None,
                     renormalize: bool, topk_ids: torch.Tensor | None, topk_weights: torch.Tensor | None
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    if router_logits is not None:
        if topk_ids is not None or topk_weights is not None:
            raise RoutingError("pass either router_logits or topk_ids/topk_weights, not both")
        if tuple(router_logits.shape) != (hidden.shape[0], num_experts):
            raise RoutingError(f"router_logits has shape {tuple(router_logits.shape)}, "
                               f"expected [{hidden.shape[0]}, {num_experts}]")
        if top_k is None:
            raise RoutingError("router_logits needs top_k")
        return select_experts(router_logits, top_k, renormalize=renormalize)
    if topk_ids is None or topk_weights is None:
        raise RoutingError("pass router_logits, or both topk_ids and topk_weights")
    check_topk(topk_ids, num_experts, hidden.shape[0], topk_weights=topk_weights)
    return topk_weights, topk_ids.long()
