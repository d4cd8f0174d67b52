import pytest
import torch

from eep import NO_EXPERT, ExpertPlacement, Membership, RoutingError, repair_coverage, route_to_phys
from eep.routing import check_topk, select_experts


def _random_topk(num_tokens, num_experts, top_k, gen):
    return torch.stack([torch.randperm(num_experts, generator=gen)[:top_k] for _ in range(num_tokens)])


def test_routes_only_to_active_replicas_of_the_right_expert():
    gen = torch.Generator().manual_seed(1)
    p = ExpertPlacement.build(1, 16, 4, 6)
    m = Membership(4)
    m.fail(2)
    ids = _random_topk(200, 16, 4, gen)
    phys = route_to_phys(ids, p.logical_to_phys[0], m.active_device, p.slots_per_rank)
    assert phys.shape == ids.shape and phys.dtype == torch.int64
    lost = [e for e in range(16) if all(x // 6 == 2 for x in p.replicas(0, e))]
    for (t, k), slot in zip(torch.cartesian_prod(torch.arange(200), torch.arange(4)).tolist(), phys.flatten().tolist()):
        e = int(ids[t, k])
        if e in lost:
            assert slot == NO_EXPERT
        else:
            assert slot // 6 != 2 and int(p.phys_to_logical[0, slot]) == e


def test_replica_choice_is_deterministic_and_spreads_a_hot_expert():
    p = ExpertPlacement.build(1, 8, 4, 4, torch.tensor([100.0, 1, 1, 1, 1, 1, 1, 1]))
    assert int(p.replica_count[0, 0]) == 4
    ids = torch.zeros(400, 1, dtype=torch.int64)
    phys = route_to_phys(ids, p.logical_to_phys[0], torch.ones(4), 4)
    assert torch.equal(phys, route_to_phys(ids, p.logical_to_phys[0], torch.ones(4), 4))
    counts = torch.bincount(phys[:, 0] // 4, minlength=4)
    assert counts.tolist() == [100, 100, 100, 100]
    # a rank's slice routes as the same tokens would in one batch
    tail = route_to_phys(ids[150:], p.logical_to_phys[0], torch.ones(4), 4, token_offset=150)
    assert torch.equal(tail, phys[150:])


def test_membership_change_is_an_in_place_table_write():
    p = ExpertPlacement.build(1, 8, 4, 3)
    m = Membership(4)
    table, mask = p.logical_to_phys[0], m.active_device
    ids = _random_topk(64, 8, 2, torch.Generator().manual_seed(3))
    before = route_to_phys(ids, table, mask, 3)
    new = Membership(4)
    new.fail(1)
    p.copy_(repair_coverage(p, new).placement)
    m.copy_from(new)
    after = route_to_phys(ids, table, mask, 3)  # same tensor objects, new contents
    assert not (after // 3 == 1).any() and (before // 3 == 1).any()


def test_select_experts_matches_softmax_topk_renormalise():
    logits = torch.randn(10, 8, generator=torch.Generator().manual_seed(0))
    w, ids = select_experts(logits, 3)
    probs = logits.softmax(-1)
    assert torch.allclose(w.sum(-1), torch.ones(10))
    assert torch.allclose(w, probs.gather(1, ids) / probs.gather(1, ids).sum(-1, keepdim=True))
    w2, _ = select_experts(logits, 3, renormalize=False)
    assert torch.allclose(w2, probs.gather(1, ids))


@pytest.mark.parametrize("ids, message", [
    (torch.tensor([[0, 8]]), "expert id 8 \\(token 0\\)"),
    (torch.tensor([[1, 2], [-1, 3]]), "expert id -1 \\(token 1\\)"),
    (torch.tensor([[1, 1]]), "same expert twice"),
    (torch.tensor([1, 2]), "shape"),
    (torch.tensor([[1.0, 2.0]]), "dtype"),
])
def test_check_topk_names_the_bad_token(ids, message):
    with pytest.raises(RoutingError, match=message):
        check_topk(ids, 8, ids.shape[0])
