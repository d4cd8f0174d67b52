"""The experimental prefill combine paths without a GPU: the pull data flow against the reference,
the variant switch and the benchmark's flag (the kernels' compilation: tests/test_fused_compile.py)."""

import os
import sys

import pytest
import torch

from eep import ExpertPlacement, route_to_phys, select_experts
from eep.fused import compile as fc
from eep.fused.prefill import COMBINE_VARIANTS, PrefillBuffer
from eep.reference.prefill import combine_packed, dispatch_packed, partial_combine

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "perf"))
import bench_prefill  # noqa: E402


def pull_model(comb_x_by_rank, dst_row, me, use):
    """What eep_prefill_combine_pull computes on source ``me``: for each token, the rows
    ``comb_x_by_rank[d][me, dst_row[t, d]]`` of the ranks ``d`` it may read (``use``: active and
    ready), in ascending d, float32 adds of bf16 rows, rounded once; loops as the kernel runs them."""
    T, R = dst_row.shape
    M = comb_x_by_rank[me].shape[1]
    out = torch.empty(T, comb_x_by_rank[me].shape[2], dtype=torch.bfloat16)
    for t in range(T):
        acc = torch.zeros(out.shape[1], dtype=torch.float32)
        for d in range(R):
            row = int(dst_row[t, d])
            if use[d] and 0 <= row < M:
                acc = acc + comb_x_by_rank[d][me, row].float()
        out[t] = acc.to(torch.bfloat16)
    return out


@pytest.mark.parametrize("seed", range(3))
def test_pull_reads_each_destinations_own_partial_layout(seed):
    """The caller's partial ([src, row] on the destination) is exactly what the sources pull: with a
    masked rank (seed 1, stale routes into it) or a late one (seed 2: dispatched, its ready flag
    missed) whose buffer is NaN, the pulled sums equal combine_packed with that rank's partials absent."""
    gen = torch.Generator().manual_seed(seed)
    R, slots, E, K, H, M = 4, 3, 10, 3, 24, 12
    active = [True, True, seed != 1, True]  # seed 1: rank 2 is out
    placement = ExpertPlacement.build(1, E, R, slots, num_redundant=R * slots - E)
    xs, phys, ws = [], [], []
    for r in range(R):
        n = [7, 0, 12, 5][r]
        _, ids = select_experts(torch.randn(n, E, generator=gen), K)
        xs.append(torch.randn(n, H, generator=gen).to(torch.bfloat16) if active[r] else None)
        phys.append(route_to_phys(ids, placement.logical_to_phys[0], torch.ones(R), slots) if active[r] else None)
        ws.append(torch.rand(n, K, generator=gen) if active[r] else None)
    recvs, handles = dispatch_packed(xs, phys, ws, active, slots, M)
    partials = []
    for r, recv in enumerate(recvs):  # fake experts: each entry's output is a random row
        if recv is None:
            partials.append(None)
            continue
        entries = int((recv.local_slot >= 0).sum())
        partials.append(partial_combine(recv, torch.randn(entries, H, generator=gen).to(torch.bfloat16), slots))
    use = [a and not (seed == 2 and r == 3) for r, a in enumerate(active)]
    partials = [p if use[r] else None for r, p in enumerate(partials)]
    want = combine_packed(partials, handles)
    comb_x = [p if p is not None else torch.full((R, M, H), float("nan"), dtype=torch.bfloat16) for p in partials]
    for me in range(R):
        if handles[me] is None:
            continue
        got = pull_model(comb_x, handles[me].dst_row, me, use)
        assert torch.equal(got, want[me]), f"rank {me}: pulled sums differ from combine_packed"


def test_buffer_and_compiler_agree_on_the_variants():
    assert set(COMBINE_VARIANTS) == set(fc.PREFILL_COMBINE_KERNELS) == set(fc.PREFILL_COMBINE_DEFINE)
    assert COMBINE_VARIANTS[0] == "push" and fc.PREFILL_COMBINE_DEFINE["push"] == 0


def test_buffer_rejects_an_unknown_variant_before_touching_a_gpu():
    with pytest.raises(ValueError, match="combine_variant"):
        PrefillBuffer(0, 2, slots_per_rank=4, max_tokens_per_rank=8, hidden=64, top_k=2, store=None,
                      combine_variant="scatter")


def test_bench_flag_keeps_push_first_and_rejects_typos():
    assert bench_prefill.combine_variants("pull,spread,pull") == ["push", "pull", "spread"]
    assert bench_prefill.combine_variants("push") == ["push"]
    assert [bench_prefill.suffix(c) for c in bench_prefill.COMBINE_CHOICES] == ["", "_spread", "_pull", "_pull_copy"]
    assert {c.replace("-copy", "") for c in bench_prefill.COMBINE_CHOICES} == set(COMBINE_VARIANTS)
    with pytest.raises(ValueError, match="pul"):
        bench_prefill.combine_variants("push,pul")
