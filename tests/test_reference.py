import itertools

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from eep_test_utils import random_experts
from eep import ExpertPlacement, InsufficientSlotsError, MembershipError, RoutingError, route_to_phys
from eep.reference import ExpertParallelMoE, dense_moe, dispatch


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


@settings(max_examples=25, deadline=None)
@given(num_ranks=st.integers(1, 6), slots_extra=st.integers(0, 3), num_experts=st.integers(2, 12),
       top_k=st.integers(1, 4), num_tokens=st.integers(1, 40), seed=st.integers(0, 2**31 - 1),
       renormalize=st.booleans(), data=st.data())
def test_matches_dense_oracle_with_random_failures(num_ranks, slots_extra, num_experts, top_k, num_tokens, seed,
                                                     renormalize, data):
    top_k = min(top_k, num_experts)
    slots = -(-num_experts // num_ranks) + slots_extra
    gen = torch.Generator().manual_seed(seed)
    w = random_experts(num_experts, 8, 16, generator=gen)
    moe = ExpertParallelMoE(*w, num_ranks=num_ranks, slots_per_rank=slots, top_k=top_k, renormalize=renormalize)
    x, logits = torch.randn(num_tokens, 16, generator=gen), torch.randn(num_tokens, num_experts, generator=gen)
    oracle = dense_moe(x, *w, router_logits=logits, top_k=top_k, renormalize=renormalize)
    assert _rel_err(moe(x, logits), oracle) < 1e-5
    for rank in data.draw(st.permutations(range(num_ranks)))[:num_ranks - 1]:
        try:
            moe.fail(rank)
        except InsufficientSlotsError:
            break
        assert moe.validity().ok
        assert _rel_err(moe(x, logits), oracle) < 1e-5


@pytest.mark.parametrize("num_ranks, slots, num_experts", [(4, 6, 16), (4, 8, 16), (8, 4, 16), (8, 3, 16)])
def test_every_single_and_double_failure_then_rejoin(num_ranks, slots, num_experts):
    gen = torch.Generator().manual_seed(num_ranks * 10 + slots)
    w = random_experts(num_experts, 16, 32, generator=gen)
    x, logits = torch.randn(48, 32, generator=gen), torch.randn(48, num_experts, generator=gen)
    oracle = dense_moe(x, *w, router_logits=logits, top_k=4)
    for failed in itertools.chain(itertools.combinations(range(num_ranks), 1),
                                  itertools.combinations(range(num_ranks), 2)):
        moe = ExpertParallelMoE(*w, num_ranks=num_ranks, slots_per_rank=slots, top_k=4)
        if (num_ranks - len(failed)) * slots < num_experts:
            with pytest.raises(InsufficientSlotsError):
                moe.fail(list(failed))
            continue
        moe.fail(list(failed))
        assert moe.validity().ok, failed
        assert _rel_err(moe(x, logits), oracle) < 1e-5, failed
        for rank in failed:
            moe.join(rank)
        assert moe.validity().ok and moe.membership.num_active == num_ranks
        assert _rel_err(moe(x, logits), oracle) < 1e-5, failed


def test_precomputed_topk_from_an_outside_router():
    gen = torch.Generator().manual_seed(7)
    w = random_experts(16, 8, 16, generator=gen)
    x = torch.randn(20, 16, generator=gen)
    # a DeepSeek-V3-like router: sigmoid scores, top-k, weights not summing to one
    scores = torch.randn(20, 16, generator=gen).sigmoid()
    topk_weights, topk_ids = scores.topk(4, dim=-1)
    moe = ExpertParallelMoE(*w, num_ranks=4, slots_per_rank=6, top_k=4)
    oracle = dense_moe(x, *w, topk_ids=topk_ids, topk_weights=topk_weights)
    assert _rel_err(moe(x, topk_ids=topk_ids, topk_weights=topk_weights), oracle) < 1e-5
    moe.fail(0)
    assert _rel_err(moe(x, topk_ids=topk_ids, topk_weights=topk_weights), oracle) < 1e-5


def test_bf16_matches_within_bf16_tolerance():
    gen = torch.Generator().manual_seed(8)
    w = random_experts(16, 32, 64, generator=gen, dtype=torch.bfloat16)
    x = torch.randn(32, 64, generator=gen).bfloat16()
    logits = torch.randn(32, 16, generator=gen)
    moe = ExpertParallelMoE(*w, num_ranks=4, slots_per_rank=6, top_k=4)
    moe.fail(2)
    out = moe(x, logits)
    w64 = [t.double() for t in w]
    oracle64 = dense_moe(x.double(), *w64, router_logits=logits, top_k=4)
    assert out.dtype == torch.bfloat16 and 1e-4 < _rel_err(out, oracle64) < 1e-2


def test_dead_rank_weights_are_poisoned_and_never_read():
    gen = torch.Generator().manual_seed(9)
    w = random_experts(8, 8, 16, generator=gen)
    moe = ExpertParallelMoE(*w, num_ranks=4, slots_per_rank=3, top_k=2)
    moe.fail(1)
    assert torch.isnan(moe.slot_w_gate[3:6]).all()
    out = moe(torch.randn(30, 16, generator=gen), torch.randn(30, 8, generator=gen))
    assert torch.isfinite(out).all()


def test_dispatch_layout_holds_every_live_copy_exactly_once():
    gen = torch.Generator().manual_seed(10)
    num_ranks, slots, hidden, top_k = 4, 3, 8, 3
    p = ExpertPlacement.build(1, 10, num_ranks, slots)
    active = [True, False, True, True]
    stale_mask = torch.ones(num_ranks)  # tables not yet repaired: some copies still aim at dead rank 1
    xs = [torch.randn(n, hidden, generator=gen) if a else None for n, a in zip([5, 0, 0, 7], active)]
    phys = [None if x is None else route_to_phys(
        torch.rand(x.shape[0], 10, generator=gen).argsort(-1)[:, :top_k],
        p.logical_to_phys[0], stale_mask, slots) for x in xs]
    recvs, handles = dispatch(xs, phys, active, slots, max_tokens_per_rank=8)
    assert recvs[1] is None and handles[1] is None
    for src, (x, ph) in enumerate(zip(xs, phys)):
        if x is None:
            continue
        for t in range(x.shape[0]):
            for k in range(top_k):
                slot = int(ph[t, k])
                dst, local = divmod(slot, slots)
                if slot < 0 or not active[dst]:
                    assert int(handles[src].phys[t, k]) == -1
                    continue
                row = int(handles[src].position[t, k])
                assert torch.equal(recvs[dst].x[local, src, row], x[t])
                assert int(recvs[dst].src_token[local, src, row]) == t
    assert any(int(s) // slots == 1 for ph in phys if ph is not None for s in ph.flatten())
    total = sum(int(r.count.sum()) for r in recvs if r is not None)
    assert total == sum(int((h.phys >= 0).sum()) for h in handles if h is not None)


@pytest.mark.parametrize("call, error, message", [
    (lambda m, x, l: m(x[:, :8], l), RoutingError, "hidden has shape"),
    (lambda m, x, l: m(x.double(), l), RoutingError, "dtype"),
    (lambda m, x, l: m(x, l[:, :4]), RoutingError, "router_logits has shape"),
    (lambda m, x, l: m(x, topk_ids=torch.full((x.shape[0], 2), 9), topk_weights=torch.ones(x.shape[0], 2)),
     RoutingError, "expert id 9"),
    (lambda m, x, l: m(x, l, topk_ids=torch.zeros(x.shape[0], 2, dtype=torch.long)), RoutingError, "not both"),
    (lambda m, x, l: m(x), RoutingError, "pass router_logits"),
    (lambda m, x, l: m.fail([0, 1, 2, 3]), MembershipError, "no active rank"),
    (lambda m, x, l: m.fail(9), MembershipError, "out of range"),
    (lambda m, x, l: m.join(2), MembershipError, "already active"),
    (lambda m, x, l: m.fail([0, 1]), InsufficientSlotsError, "more slots are needed"),
])
def test_bad_input_is_rejected_and_changes_nothing(call, error, message):
    gen = torch.Generator().manual_seed(11)
    w = random_experts(8, 8, 16, generator=gen)
    moe = ExpertParallelMoE(*w, num_ranks=4, slots_per_rank=3, top_k=2)
    x, logits = torch.randn(12, 16, generator=gen), torch.randn(12, 8, generator=gen)
    before = (moe(x, logits), moe.membership.epoch, moe.placement.clone(), moe.slot_w_gate.clone())
    with pytest.raises(error, match=message):
        call(moe, x, logits)
    assert moe.membership.epoch == before[1] and moe.placement.equal(before[2])
    assert torch.equal(moe.slot_w_gate.nan_to_num(), before[3].nan_to_num())
    assert torch.equal(moe(x, logits), before[0])


def test_constructor_rejects_mismatched_weights():
    gen = torch.Generator().manual_seed(12)
    g, u, d = random_experts(8, 8, 16, generator=gen)
    with pytest.raises(ValueError, match="w_up has shape"):
        ExpertParallelMoE(g, u[:, :4], d, num_ranks=2, slots_per_rank=4, top_k=2)
    with pytest.raises(ValueError, match="w_down has dtype"):
        ExpertParallelMoE(g, u, d.double(), num_ranks=2, slots_per_rank=4, top_k=2)
    with pytest.raises(ValueError, match="does not match"):
        ExpertParallelMoE(g, u, d, num_ranks=2, slots_per_rank=4, top_k=2,
                          placement=ExpertPlacement.build(1, 8, 4, 2))
