"""The runtime's vectorised data plane against the reference oracle (single process)."""

import pytest
import torch

from eep import ExpertPlacement, Membership, repair_coverage, route_to_phys, select_experts
from eep.reference import combine, dense_moe, dispatch, expert_mlp
from eep.runtime.engines.shm import combine_replies, expert_compute, pack_dispatch
from eep.runtime.model import (TinyConfig, decode_step, dense_moe_fn, generate_weights, next_token_table,
                               reference_generate)


@pytest.mark.parametrize("seed, dead", [(1, []), (2, [1]), (3, [0, 2])])
def test_pack_and_combine_match_reference_layout(seed, dead):
    gen = torch.Generator().manual_seed(seed)
    num_ranks, spr, num_experts, top_k, hidden, inter, max_tokens = 4, 8, 16, 4, 64, 32, 8
    w_gate = torch.randn(num_experts, inter, hidden, generator=gen) / hidden ** 0.5
    w_up = torch.randn(num_experts, inter, hidden, generator=gen) / hidden ** 0.5
    w_down = torch.randn(num_experts, hidden, inter, generator=gen) / inter ** 0.5
    placement = ExpertPlacement.build(1, num_experts, num_ranks, spr, num_redundant=8)
    membership = Membership(num_ranks)
    if dead:
        membership.fail(dead)
        placement = repair_coverage(placement, membership).placement
    active = membership.active_cpu.tolist()
    slot_w = [torch.stack([w[e] if e >= 0 else torch.full_like(w[0], float("nan"))
                           for e in placement.phys_to_logical[0].tolist()]) for w in (w_gate, w_up, w_down)]

    xs, phys, ids, wts = [None] * num_ranks, [None] * num_ranks, [None] * num_ranks, [None] * num_ranks
    for r in membership.active_ranks():
        n = int(torch.randint(1, max_tokens + 1, (1,), generator=gen))
        xs[r] = torch.randn(n, hidden, generator=gen)
        wts[r], ids[r] = select_experts(torch.randn(n, num_experts, generator=gen), top_k)
        phys[r] = route_to_phys(ids[r], placement.logical_to_phys[0], membership.active_cpu, spr,
                                token_offset=r * max_tokens)
    recvs, handles = dispatch(xs, phys, active, spr, max_tokens)

    sent = {r: pack_dispatch(xs[r], phys[r], active, spr, max_tokens) for r in membership.active_ranks()}
    for src, (blocks, plan) in sent.items():
        assert torch.equal(plan.phys, handles[src].phys) and torch.equal(plan.position, handles[src].position)
        for dst, block in blocks.items():
            assert torch.equal(block.count, recvs[dst].count[:, src])
            assert torch.equal(block.src_token, recvs[dst].src_token[:, src])
            assert torch.equal(block.x, recvs[dst].x[:, src])

    ys = [None if recv is None else expert_mlp(recv, *(w[r * spr:(r + 1) * spr] for w in slot_w))
          for r, recv in enumerate(recvs)]
    ref_out = combine(ys, handles, wts, spr)
    replies = {dst: expert_compute({src: sent[src][0][dst] for src in sent}, *(w[dst * spr:(dst + 1) * spr]
                                                                           for w in slot_w))
               for dst in membership.active_ranks()}
    for src in sent:
        home = {dst: replies[dst][src] for dst in replies}
        out = combine_replies(home, sent[src][1], ids[src], wts[src], spr)
        torch.testing.assert_close(out, ref_out[src], rtol=1e-6, atol=1e-6)
        dense = dense_moe(xs[src], w_gate, w_up, w_down, topk_ids=ids[src], topk_weights=wts[src])
        torch.testing.assert_close(out, dense, rtol=1e-6, atol=1e-6)


def test_tiny_model_oracle_is_consistent():
    weights = generate_weights(TinyConfig(seed=3))
    table = next_token_table(weights)
    tokens = torch.randint(weights.config.vocab_size, (16,), generator=torch.Generator().manual_seed(0))
    assert decode_step(weights, tokens, dense_moe_fn(weights)).tolist() == [table[t] for t in tokens.tolist()]
    out = reference_generate(weights, 5, 6, table=table)
    assert out[0] == table[5] and out[1] == table[out[0]] and len(out) == 6
