"""The differential-test harness of the fused kernels can fail (checked on CPU with the oracle)."""

import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "gpu"))

from fused_cases import compare_rank, fp8_roundtrip, make_case, oracle, quantize_fp8, two_replica_placement  # noqa: E402

SHAPE = dict(num_ranks=4, slots_per_rank=4, max_tokens=16, hidden=32, top_k=4)


def _results(orc, rank):
    r = orc.recv[rank]
    return [r.x.clone(), r.count.clone(), r.src_token.clone(), orc.handles[rank].position.int(), orc.out[rank].clone()]


def test_oracle_agrees_with_itself_and_masks_the_inactive_rank():
    placement = two_replica_placement(4, 4)
    case = make_case(7, **SHAPE, active=[True, True, False, True], zero_ranks=(1,))
    orc = oracle(case, placement, 16)
    assert orc.recv[2] is None and orc.out[2] is None and orc.out[1].shape == (0, 32)
    assert int(orc.recv[0].count[:, 2].sum()) == 0  # nothing from the inactive rank
    assert compare_rank(0, orc, *_results(orc, 0)) == []


def test_comparison_catches_an_unwritten_row_and_a_wrong_output():
    placement = two_replica_placement(4, 4)
    orc = oracle(make_case(8, **SHAPE, routing="skewed"), placement, 16)
    got = _results(orc, 0)
    local, src = (orc.recv[0].count > 0).nonzero()[0].tolist()
    got[0][local, src, 0] = float("nan")  # a poisoned row the kernel never wrote
    got[4][3, 5] += 1
    errors = compare_rank(0, orc, *got)
    assert any("recv.x" in e for e in errors) and any("combine output" in e for e in errors)


def test_fp8_oracle_quantizes_per_row():
    x = (torch.randn(6, 64) * torch.tensor([1e-3, 1, 10, 100, 1e4, 0]).unsqueeze(1)).to(torch.bfloat16)
    q, scale = quantize_fp8(x)
    assert q.dtype == torch.float8_e4m3fn and scale.shape == (6,) and float(scale[5]) == 1.0
    assert float(q.float().abs().amax(-1)[:5].min()) == 448.0  # each row's max maps to e4m3's max
    back = fp8_roundtrip(x).float()
    rel = ((back - x.float()).abs() / x.float().abs().amax(-1, keepdim=True).clamp(min=1e-30))[:5]
    assert float(rel.max()) < 2 ** -4
    placement = two_replica_placement(4, 4)
    case = make_case(9, **SHAPE)
    plain, quant = oracle(case, placement, 16), oracle(case, placement, 16, fp8=True)
    assert torch.equal(plain.recv[0].count, quant.recv[0].count)
    assert not torch.equal(plain.out[0], quant.out[0])


def test_dropped_source_oracle_removes_exactly_the_dropping_ranks_contributions():
    """The late-source scenario's expectation: rank 3's tokens lose the contributions of ranks 0-2
    (who gave up on it at dispatch) and keep their own rank's; other sources are untouched."""
    from fused_cases import prefill_oracle

    placement = two_replica_placement(4, 4)
    case = make_case(9, **SHAPE)
    full = oracle(case, placement, 16).out
    assert all(torch.equal(a, b) for a, b in zip(oracle(case, placement, 16, dropped_by={}).out, full))
    dropped = oracle(case, placement, 16, dropped_by={3: [0, 1, 2]}).out
    assert all(torch.equal(dropped[r], full[r]) for r in range(3))
    assert not torch.equal(dropped[3], full[3])
    # what remains is exactly the sum over rank 3's own slots: none of its tokens' copies elsewhere
    none = oracle(case, placement, 16, dropped_by={3: [0, 1, 2, 3]}).out[3]
    assert torch.equal(none, torch.zeros_like(none)) and not torch.equal(dropped[3], none)
    pf = prefill_oracle(case, placement, 64).out
    pd = prefill_oracle(case, placement, 64, dropped_by={3: [0, 1, 2]}).out
    assert all(torch.equal(pd[r], pf[r]) for r in range(3)) and not torch.equal(pd[3], pf[3])
