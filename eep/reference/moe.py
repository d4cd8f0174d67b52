"""The reference EP MoE layer: ``ExpertParallelMoE`` over simulated ranks, the oracle of every EP path.

``ExpertParallelMoE`` computes ``eep.mlp.dense_moe`` by routing through a placement to per-slot
weights on ``num_ranks`` simulated ranks (``eep.repair.ExpertSlots``), dispatching, running the
experts and combining with the readable loops of ``eep.reference.dispatch``; it keeps computing it
after ranks fail and rejoin: only the hosts of the experts move.

It takes block-scaled FP8 experts too (``eep.fp8.Fp8Weight`` stacks, e.g. from
``weights_tools.load_layer_experts``): tokens are then quantised per token and 128 channels as the
FP8 dispatch sends them, and each expert is ``eep.mlp.swiglu_fp8``. Slots hold the FP8 weights with
their scales, and repair moves the two together.
"""

from __future__ import annotations

import torch

from eep.errors import RoutingError
from eep.fp8 import quantize_rows
from eep.reference.dispatch import combine, dispatch, expert_mlp
from eep.reference.fp8 import expert_mlp_fp8
from eep.repair.slots import ExpertSlots
from eep.routing import resolve_routing, route_to_phys


class ExpertParallelMoE(ExpertSlots):
    """One MoE layer spread over ``num_ranks`` simulated EP ranks, with failure and rejoin
    (``ExpertSlots``). Tokens are split evenly over the *active* ranks (a dead rank's requests are
    re-queued on survivors by the serving layer)."""

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
        topk_weights, topk_ids = resolve_routing(hidden, self.num_experts, router_logits, self.top_k,
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
