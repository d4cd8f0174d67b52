"""The packed (prefill) reference against the low-latency reference and the dense oracle."""

import pytest
import torch

from eep_test_utils import random_experts
from eep import ExpertPlacement, route_to_phys, select_experts
from eep.reference import combine, dense_moe, dispatch, expert_mlp
from eep.reference.prefill import (combine_packed, dispatch_packed, expert_mlp_packed, partial_combine,
                                   received_bytes)


def _setup(seed, num_ranks=4, slots=5, num_experts=12, top_k=4, hidden=16, inter=8, tokens=(9, 0, 13, 6),
           active=None, stale=False, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    placement = ExpertPlacement.build(1, num_experts, num_ranks, slots, num_redundant=num_ranks * slots - num_experts)
    w_gate, w_up, w_down = random_experts(num_experts, inter, hidden, generator=gen, dtype=dtype)
    active = active or [True] * num_ranks
    mask = torch.ones(num_ranks) if stale else torch.tensor([float(a) for a in active])
    xs, phys, weights, logits = [], [], [], []
    offset = 0
    for r, n in enumerate(tokens):
        x = torch.randn(n, hidden, generator=gen).to(dtype)
        lg = torch.randn(n, num_experts, generator=gen)
        w, ids = select_experts(lg, top_k)
        xs.append(x if active[r] else None)
        phys.append(route_to_phys(ids, placement.logical_to_phys[0], mask, slots, token_offset=offset)
                    if active[r] else None)
        weights.append(w if active[r] else None)
        logits.append(lg)
        offset += n
    # slot weights per rank: what each rank's slots hold
    per_rank = []
    for r in range(num_ranks):
        ids = placement.phys_to_logical[0, r * slots:(r + 1) * slots].clamp(min=0)
        per_rank.append((w_gate[ids], w_up[ids], w_down[ids]))
    return placement, xs, phys, weights, logits, per_rank, (w_gate, w_up, w_down), active


M = 16  # max_tokens_per_rank


def _run_packed(xs, phys, weights, active, slots, per_rank):
    recvs, handles = dispatch_packed(xs, phys, weights, active, slots, M)
    partials = [None if recv is None else partial_combine(recv, expert_mlp_packed(recv, *per_rank[r]), slots)
                for r, recv in enumerate(recvs)]
    return recvs, handles, combine_packed(partials, handles)


@pytest.mark.parametrize("seed", range(4))
def test_packed_equals_dense_oracle(seed):
    placement, xs, phys, weights, logits, per_rank, experts, active = _setup(seed)
    _, _, outs = _run_packed(xs, phys, weights, active, 5, per_rank)
    x_all = torch.cat([x for x in xs if x is not None])
    want = dense_moe(x_all, *experts, router_logits=torch.cat(logits), top_k=4)
    torch.testing.assert_close(torch.cat([o for o in outs if o is not None]), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("stale", [False, True])
def test_packed_equals_low_latency_reference_with_a_masked_rank(stale):
    """Rank 1 inactive; with stale tables some choices still aim at it and must contribute nothing."""
    slots = 5
    placement, xs, phys, weights, _, per_rank, _, active = _setup(7, active=[True, False, True, True], stale=stale)
    if stale:
        assert any(int(s) // slots == 1 for p in phys if p is not None for s in p.flatten())
    _, _, outs = _run_packed(xs, phys, weights, active, slots, per_rank)
    recvs, handles = dispatch(xs, phys, active, slots, max_tokens_per_rank=16)
    ys = [None if r is None else expert_mlp(r, *per_rank[i]) for i, r in enumerate(recvs)]
    want = combine(ys, handles, weights, slots)
    for got, ref in zip(outs, want):
        assert (got is None) == (ref is None)
        if got is not None:
            torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


def test_layout_one_copy_per_destination_in_source_regions():
    slots = 5
    placement, xs, phys, weights, _, _, _, active = _setup(3, active=[True, True, False, True], stale=True)
    recvs, handles = dispatch_packed(xs, phys, weights, active, slots, M)
    assert recvs[2] is None and handles[2] is None
    for dst, recv in enumerate(recvs):
        if recv is None:
            continue
        assert int(recv.count[2]) == 0  # the inactive source sent nothing
        for src in range(4):
            n = int(recv.count[src])
            tokens = recv.src_token[src, :n].tolist()
            assert tokens == sorted(set(tokens))  # ascending, one row per token
            assert (recv.src_token[src, n:] == -1).all() and (recv.local_slot[src, n:] == -1).all()
            for row, token in enumerate(tokens):
                assert torch.equal(recv.x[src, row], xs[src][token])
                assert int(handles[src].dst_row[token, dst]) == row
                here = recv.local_slot[src, row] >= 0
                assert here.any()  # sent only where at least one choice lives
                for k in range(phys[src].shape[1]):
                    slot = int(phys[src][token, k])
                    on_dst = slot >= 0 and slot // slots == dst
                    assert bool(here[k]) == on_dst
                    if on_dst:
                        assert int(recv.local_slot[src, row, k]) == slot % slots
                        assert float(recv.weight[src, row, k]) == float(weights[src][token, k])
                    else:
                        assert float(recv.weight[src, row, k]) == 0.0
    for src, handle in enumerate(handles):  # every token that has a live choice on dst was sent there
        if handle is None:
            continue
        for token in range(phys[src].shape[0]):
            for dst in range(4):
                live = any(int(s) >= 0 and int(s) // slots == dst for s in phys[src][token]) and active[dst]
                assert (int(handle.dst_row[token, dst]) >= 0) == live
    # a token with several choices on one rank crossed the wire once for them
    assert sum(int(((r.local_slot >= 0).sum(-1) > 1).sum()) for r in recvs if r is not None) > 0
    assert received_bytes(recvs)[0] == recvs[0].num_recv * 16 * 4


def test_expert_order_groups_entries_by_slot():
    placement, xs, phys, weights, _, _, _, active = _setup(5)
    recv = dispatch_packed(xs, phys, weights, active, 5, M)[0][2]
    rows, ks, offsets = recv.expert_order(5)
    flat = recv.local_slot.reshape(-1, recv.local_slot.shape[-1])
    assert int(offsets[-1]) == int((flat >= 0).sum()) == rows.shape[0]
    for slot in range(5):
        lo, hi = int(offsets[slot]), int(offsets[slot + 1])
        assert (flat[rows[lo:hi], ks[lo:hi]] == slot).all()
        assert rows[lo:hi].tolist() == sorted(rows[lo:hi].tolist())


def test_bf16_within_bf16_tolerance():
    placement, xs, phys, weights, logits, per_rank, experts, active = _setup(11, dtype=torch.bfloat16)
    _, _, outs = _run_packed(xs, phys, weights, active, 5, per_rank)
    want = dense_moe(torch.cat([x for x in xs if x is not None]).float(), *(w.float() for w in experts),
                     router_logits=torch.cat(logits), top_k=4)
    torch.testing.assert_close(torch.cat([o for o in outs if o is not None]).float(), want, rtol=2e-2, atol=2e-2)


def test_bad_input_names_the_rank():
    placement, xs, phys, weights, _, _, _, active = _setup(2)
    with pytest.raises(ValueError, match="rank 2 has 13 tokens, more than max_tokens_per_rank=12"):
        dispatch_packed(xs, phys, weights, active, 5, 12)
    bad = list(weights)
    bad[0] = bad[0][:, :2]
    with pytest.raises(ValueError, match="rank 0: x"):
        dispatch_packed(xs, phys, bad, active, 5, M)
