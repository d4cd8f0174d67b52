"""Shared inputs of the repair-by-plan cases (tests/sglang/test_sglang_repair.py and the GPU scenario):
logical experts, SGLang's maps over them with dense rows between the MoE rows, and one rank's
expert weights in SGLang's ``w13``/``w2`` layout."""

import torch
from sglang.srt.eplb.expert_location import ExpertLocationMetadata

from eep.integrations.sglang.placement import sglang_maps_from_placement
from eep.state import ExpertPlacement

NUM_LAYERS, NUM_EXPERTS, NUM_RANKS, SLOTS, HIDDEN, INTER, TOP_K = 2, 12, 4, 4, 64, 32, 3
LAYER_IDS = [1, 3]  # SGLang's layer ids of the MoE layers (0 and 2 are dense)


def logical_weights(seed: int) -> dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    return {layer: (torch.randn(NUM_EXPERTS, INTER, HIDDEN, generator=gen).bfloat16() / HIDDEN ** 0.5,
                    torch.randn(NUM_EXPERTS, INTER, HIDDEN, generator=gen).bfloat16() / HIDDEN ** 0.5,
                    torch.randn(NUM_EXPERTS, HIDDEN, INTER, generator=gen).bfloat16() / INTER ** 0.5)
            for layer in LAYER_IDS}


def metadata_for(placement: ExpertPlacement) -> ExpertLocationMetadata:
    """SGLang's metadata over 4 layers: the MoE rows hold ``placement``, the dense rows a copy of its first row."""
    maps = sglang_maps_from_placement(placement)
    rows = [0, 0, 1, 1]  # row r of the full maps comes from placement layer rows[r]
    p2l, l2p, n = (t[rows].clone() for t in (maps.physical_to_logical_map, maps.logical_to_all_physical_map,
                                            maps.logical_to_all_physical_map_num_valid))
    return ExpertLocationMetadata(physical_to_logical_map=p2l, physical_to_logical_map_cpu=p2l.clone(),
                                  logical_to_all_physical_map=l2p, logical_to_all_physical_map_cpu=l2p.clone(),
                                  logical_to_all_physical_map_num_valid=n, ep_size=NUM_RANKS,
                                  logical_to_rank_dispatch_physical_map=None)


def rank_weights(placement: ExpertPlacement, weights, rank: int) -> dict[int, list[torch.Tensor]]:
    """SGLang's ``routed_experts_weights_of_layer`` of ``rank``: ``[w13 [S, 2I, H], w2 [S, H, I]]`` per layer."""
    out = {}
    for row, layer in enumerate(LAYER_IDS):
        w_gate, w_up, w_down = weights[layer]
        experts = placement.phys_to_logical[row, rank * SLOTS:(rank + 1) * SLOTS]
        out[layer] = [torch.cat([w_gate[experts], w_up[experts]], 1).contiguous(), w_down[experts].contiguous()]
    return out
