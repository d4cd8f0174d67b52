"""SGLang expert-location maps <-> ExpertPlacement, in-place writes, and SGLang's stale-graph issue."""

import pytest
import torch

from sglang_case import HAS_SGLANG, SKIP_REASON

if not HAS_SGLANG:
    pytest.skip(SKIP_REASON, allow_module_level=True)

from sglang.srt.eplb import expert_location
from sglang.srt.eplb.expert_location import ExpertLocationMetadata, _compute_logical_to_all_physical_map

from eep.errors import PlacementError
from eep.integrations.sglang import hooks
from eep.integrations.sglang.placement import (METADATA_TENSOR_FIELDS, adopt_metadata_, placement_from_sglang,
                                               sglang_maps_from_placement, write_placement_)
from eep.state import ExpertPlacement

NUM_LAYERS, NUM_EXPERTS, NUM_RANKS, SLOTS = 3, 10, 4, 4  # 16 physical experts: 6 redundant replicas


def _placement(seed: int) -> ExpertPlacement:
    load = torch.rand(NUM_LAYERS, NUM_EXPERTS, generator=torch.Generator().manual_seed(seed)) * 100
    return ExpertPlacement.build(NUM_LAYERS, NUM_EXPERTS, NUM_RANKS, SLOTS, load)


def _metadata(placement: ExpertPlacement, *, with_dispatch_map: bool = False) -> ExpertLocationMetadata:
    """SGLang's real metadata class holding ``placement`` (its ``_init_raw`` needs a published server config)."""
    maps = sglang_maps_from_placement(placement)
    return ExpertLocationMetadata(
        physical_to_logical_map=maps.physical_to_logical_map.clone(),
        physical_to_logical_map_cpu=maps.physical_to_logical_map.clone(),
        logical_to_all_physical_map=maps.logical_to_all_physical_map.clone(),
        logical_to_all_physical_map_cpu=maps.logical_to_all_physical_map.clone(),
        logical_to_all_physical_map_num_valid=maps.logical_to_all_physical_map_num_valid.clone(),
        ep_size=NUM_RANKS,
        logical_to_rank_dispatch_physical_map=(torch.zeros(NUM_LAYERS, NUM_EXPERTS, dtype=torch.int64)
                                               if with_dispatch_map else None))


def _pointers(metadata) -> dict:
    return {name: getattr(metadata, name).data_ptr() for name in METADATA_TENSOR_FIELDS
            if getattr(metadata, name) is not None}


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_converter_both_ways_agrees_with_sglangs_own_map_builder(seed):
    placement = _placement(seed)
    maps = sglang_maps_from_placement(placement)
    ours = maps.logical_to_all_physical_map
    theirs = _compute_logical_to_all_physical_map(maps.physical_to_logical_map, NUM_EXPERTS, NUM_RANKS, None)
    assert torch.equal(ours[..., :theirs.shape[-1]], theirs) and bool((ours[..., theirs.shape[-1]:] == -1).all())
    assert ours.shape[-1] == NUM_RANKS * SLOTS  # SGLang pads to num_physical_experts
    assert torch.equal(maps.logical_to_all_physical_map_num_valid, (theirs != -1).sum(-1))
    back = placement_from_sglang(_metadata(placement))
    assert back.equal(placement) and torch.equal(back.logical_to_phys, placement.logical_to_phys)


def test_rank_collapsed_maps_are_accepted_and_keep_the_local_replica():
    placement = _placement(3)
    rank = 1
    maps = sglang_maps_from_placement(placement, moe_ep_rank=rank)
    l2p, counts = maps.logical_to_all_physical_map, maps.logical_to_all_physical_map_num_valid
    for layer in range(NUM_LAYERS):
        for expert in range(NUM_EXPERTS):
            replicas = placement.replicas(layer, expert)
            local = [p for p in replicas if p // SLOTS == rank]
            assert l2p[layer, expert, :int(counts[layer, expert])].tolist() == (local or replicas)
    metadata = _metadata(placement)
    metadata.logical_to_all_physical_map, metadata.logical_to_all_physical_map_num_valid = l2p, counts
    assert placement_from_sglang(metadata).equal(placement)


def test_inconsistent_sglang_maps_name_the_layer_and_expert():
    metadata = _metadata(_placement(4))
    wrong = metadata.physical_to_logical_map[1, 0].item()
    metadata.logical_to_all_physical_map[1, (wrong + 1) % NUM_EXPERTS, 0] = 0
    with pytest.raises(PlacementError, match=r"\[1, \d+, 0\] = 0 is not a physical expert holding"):
        placement_from_sglang(metadata)
    twice = _metadata(_placement(4))
    twice.physical_to_logical_map[0, 1] = twice.physical_to_logical_map[0, 0]
    with pytest.raises(PlacementError, match="rank 0 holds expert"):
        placement_from_sglang(twice)
    empty = ExpertPlacement.build(1, 6, 2, 4, num_redundant=0)
    with pytest.raises(PlacementError, match="empty slot"):
        sglang_maps_from_placement(empty)


def test_write_placement_writes_into_the_existing_tensors():
    old, new = _placement(5), _placement(6)
    assert not old.equal(new)
    metadata = _metadata(old, with_dispatch_map=True)
    before = _pointers(metadata)
    write_placement_(metadata, new, moe_ep_rank=2)
    assert _pointers(metadata) == before
    assert placement_from_sglang(metadata).equal(new)
    dispatch = metadata.logical_to_rank_dispatch_physical_map
    assert bool((new.phys_to_logical.gather(1, dispatch) == torch.arange(NUM_EXPERTS)).all())  # a replica of each
    local = [(l, e) for l in range(NUM_LAYERS) for e in range(NUM_EXPERTS)
             if any(p // SLOTS == 2 for p in new.replicas(l, e))]
    assert all(int(dispatch[l, e]) // SLOTS == 2 for l, e in local)  # the local replica when there is one
    with pytest.raises(PlacementError, match="pass moe_ep_rank"):
        write_placement_(metadata, old)
    assert placement_from_sglang(metadata).equal(new)  # a refused write changed nothing


@pytest.fixture
def sglang_recovery_broadcast(monkeypatch):
    """SGLang's real ``broadcast_global_expert_location_metadata`` on one process: the broadcast
    delivers the healthy rank's map into the tensor (what a receiving rank sees) and
    ``init_by_mapping`` (which needs a published model config) rebuilds through SGLang's dataclass."""
    healthy = _placement(8)
    monkeypatch.setattr(torch.distributed, "broadcast",
                        lambda tensor, src, group=None: tensor.copy_(healthy.phys_to_logical))
    monkeypatch.setattr(ExpertLocationMetadata, "init_by_mapping", staticmethod(
        lambda model_config, p2l, moe_ep_rank=None: _metadata(ExpertPlacement.from_phys_to_logical(
            p2l, num_ranks=NUM_RANKS, slots_per_rank=SLOTS, num_experts=NUM_EXPERTS))))
    stale = _placement(7)
    captured = _metadata(stale)
    expert_location.set_global_expert_location_metadata(captured, allow_overwrite=True)
    yield captured, stale, healthy
    expert_location.set_global_expert_location_metadata(None, allow_overwrite=True)


def test_sglang_recovery_broadcast_replaces_the_object_so_captured_graphs_read_stale_maps(sglang_recovery_broadcast):
    captured, stale, healthy = sglang_recovery_broadcast
    stale_l2p = captured.logical_to_all_physical_map.clone()
    expert_location.broadcast_global_expert_location_metadata(model_config=None, moe_ep_rank=0, src_rank=0)
    current = expert_location.get_global_expert_location_metadata()
    assert current is not captured  # SGLang swapped the object ...
    assert current.logical_to_all_physical_map.data_ptr() != captured.logical_to_all_physical_map.data_ptr()
    assert torch.equal(captured.logical_to_all_physical_map, stale_l2p)  # ... a captured graph reads this
    assert not torch.equal(stale_l2p, current.logical_to_all_physical_map)


def test_eep_hook_keeps_the_captured_tensors_and_writes_the_new_maps_into_them(sglang_recovery_broadcast):
    captured, stale, healthy = sglang_recovery_broadcast
    before = _pointers(captured)
    result = hooks.around_broadcast_expert_location(expert_location.broadcast_global_expert_location_metadata,
                                                    model_config=None, moe_ep_rank=0, src_rank=0)
    assert result is captured and expert_location.get_global_expert_location_metadata() is captured
    assert _pointers(captured) == before
    assert placement_from_sglang(captured).equal(healthy)
    assert torch.equal(captured.physical_to_logical_map_cpu, healthy.phys_to_logical)


def test_adopt_refuses_a_different_size_and_writes_nothing():
    small = _metadata(_placement(9))
    other = ExpertPlacement.build(NUM_LAYERS, NUM_EXPERTS, NUM_RANKS, SLOTS + 1)
    before = small.physical_to_logical_map.clone()
    bigger = _metadata(_placement(9))
    bigger.physical_to_logical_map = sglang_maps_from_placement(other).physical_to_logical_map
    with pytest.raises(PlacementError, match="cannot write it in place"):
        adopt_metadata_(small, bigger)
    assert torch.equal(small.physical_to_logical_map, before)
