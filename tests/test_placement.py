import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from eep import NO_EXPERT, ExpertPlacement, PlacementError


def _assert_well_formed(p: ExpertPlacement) -> None:
    s = p.slots_per_rank
    for layer in range(p.num_layers):
        row = p.phys_to_logical[layer].tolist()
        for e in range(p.num_experts):
            slots = [i for i, x in enumerate(row) if x == e]
            assert p.replicas(layer, e) == slots
            assert int(p.replica_count[layer, e]) == len(slots)
            assert len({i // s for i in slots}) == len(slots), "two replicas of one expert on one rank"
            assert (p.logical_to_phys[layer, e, len(slots):] == NO_EXPERT).all()


@settings(max_examples=60, deadline=None)
@given(num_layers=st.integers(1, 3), num_ranks=st.integers(1, 8), slots_per_rank=st.integers(1, 6),
       extra=st.integers(0, 8), seed=st.integers(0, 2**31 - 1), use_load=st.booleans())
def test_build_covers_every_expert_once_per_rank(num_layers, num_ranks, slots_per_rank, extra, seed, use_load):
    num_phys = num_ranks * slots_per_rank
    num_experts = max(1, num_phys - extra)
    gen = torch.Generator().manual_seed(seed)
    load = torch.rand(num_layers, num_experts, generator=gen) * 100 if use_load else None
    p = ExpertPlacement.build(num_layers, num_experts, num_ranks, slots_per_rank, load)
    _assert_well_formed(p)
    assert (p.replica_count >= 1).all()
    # every spare slot is used unless an expert already has a replica on every rank
    filled = int((p.phys_to_logical != NO_EXPERT).sum(1).min())
    assert filled == min(num_phys, num_experts * num_ranks)


def test_heaviest_experts_get_the_redundant_replicas():
    load = torch.tensor([1.0, 50.0, 2.0, 30.0, 3.0, 4.0, 5.0, 6.0])
    p = ExpertPlacement.build(1, 8, 4, 3, load)  # 12 slots: 4 redundant
    counts = p.replica_count[0].tolist()
    # greedy on load per replica: 50 -> e1, 30 -> e3, 25 -> e1, 16.7 -> e1 (then 15 for e3 vs 12.5 for e1)
    assert counts[1] == 4 and counts[3] == 2
    assert sum(counts) == 12
    ranks_load = [sum(load[e] / counts[e] for e in p.experts_on_rank(0, r)) for r in range(4)]
    assert max(ranks_load) - min(ranks_load) < 20  # balanced, not all hot replicas on one rank


def test_num_redundant_leaves_spare_slots():
    p = ExpertPlacement.build(2, 16, 4, 6, num_redundant=4)
    assert ((p.phys_to_logical == NO_EXPERT).sum(1) == 4).all()
    with pytest.raises(PlacementError, match="num_redundant"):
        ExpertPlacement.build(1, 16, 4, 6, num_redundant=9)


def test_json_round_trip_and_in_place_copy(tmp_path):
    p = ExpertPlacement.build(3, 12, 4, 4, torch.arange(12.0))
    path = tmp_path / "placement.json"
    p.save(path)
    q = ExpertPlacement.load(path)
    assert q.equal(p) and torch.equal(q.logical_to_phys, p.logical_to_phys)
    other = ExpertPlacement.build(3, 12, 4, 4)
    ptrs = [t.data_ptr() for t in (p.phys_to_logical, p.logical_to_phys, p.replica_count)]
    p.copy_(other)
    assert p.equal(other)
    assert ptrs == [t.data_ptr() for t in (p.phys_to_logical, p.logical_to_phys, p.replica_count)]


@pytest.mark.parametrize("mutate, message", [
    (lambda d: d["phys_to_logical"][0].__setitem__(0, 99), "phys_to_logical\\[0, 0\\] = 99"),
    (lambda d: d["phys_to_logical"][0].__setitem__(1, d["phys_to_logical"][0][0]), "rank 0 holds expert"),
    (lambda d: d.__setitem__("num_ranks", 3), "shape"),
    (lambda d: d.__setitem__("format", "other/9"), "format"),
    (lambda d: d.pop("slots_per_rank"), "malformed"),
])
def test_bad_placements_name_the_culprit(mutate, message, tmp_path):
    d = ExpertPlacement.build(1, 8, 2, 4).to_dict()
    mutate(d)
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(d))
    with pytest.raises(PlacementError, match=message):
        ExpertPlacement.load(path)


def test_build_rejects_too_few_slots_and_bad_load():
    with pytest.raises(PlacementError, match="do not fit"):
        ExpertPlacement.build(1, 17, 4, 4)
    with pytest.raises(PlacementError, match="load has shape"):
        ExpertPlacement.build(1, 8, 4, 2, torch.ones(7))
    with pytest.raises(PlacementError, match="non-negative"):
        ExpertPlacement.build(1, 8, 4, 2, -torch.ones(8))


def test_copy_rejects_other_sizes_without_writing():
    p = ExpertPlacement.build(1, 8, 4, 2)
    before = p.phys_to_logical.clone()
    with pytest.raises(PlacementError, match="different size"):
        p.copy_(ExpertPlacement.build(1, 8, 4, 3))
    assert torch.equal(p.phys_to_logical, before)
