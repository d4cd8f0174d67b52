"""The FP8 format (eep.fp8) and the FP8 reference experts (eep.reference.fp8), on CPU."""

from __future__ import annotations

import pytest
import torch

from eep.fp8 import FP8_DTYPE, Fp8Weight, dequantize_rows, dequantize_weight, quantize_rows, quantize_weight
from eep.reference import ExpertParallelMoE, dense_moe
from eep.exchange.layout import RankReceive
from eep.mlp import swiglu_rounded
from eep.reference.fp8 import expert_mlp_fp8, swiglu_fp8
from eep.repair import TensorTier


def _u8(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.uint8)


def test_quantize_rows_is_the_dispatch_kernels_arithmetic():
    """scale = amax / 448 (1 for an all-zero block), value = x / scale rounded to nearest even and
    saturated, per 128 channels of a row; the last block may be partial."""
    x = torch.randn(6, 300, generator=torch.Generator().manual_seed(0)) * 10
    x[1] = 0
    x[2, 128:256] = 0
    x[3, 5] = 1e4  # one large value sets its block's scale
    values, scales = quantize_rows(x)
    assert values.dtype == FP8_DTYPE and values.shape == x.shape and scales.shape == (6, 3)
    for row in range(6):
        for b in range(3):
            block = x[row, b * 128:(b + 1) * 128]
            amax = float(block.abs().max())
            want = torch.tensor(amax / 448.0 if amax > 0 else 1.0, dtype=torch.float32)
            assert scales[row, b] == want
            assert torch.equal(_u8(values[row, b * 128:(b + 1) * 128]), _u8((block / want).to(FP8_DTYPE)))
    assert float(values.float().abs().max()) <= 448.0
    per_row_values, per_row_scale = quantize_rows(x, block=300)  # one scale per row: the decode buffer's format
    assert per_row_scale.shape == (6, 1)
    torch.testing.assert_close(dequantize_rows(per_row_values, per_row_scale[:, 0]), x, rtol=0.07, atol=1e-3 * 1e4)
    assert ((dequantize_rows(values, scales) - x).norm() / x.norm()) < 0.05


def test_weight_blocks_dequantise_exactly():
    w = torch.randn(2, 300, 200, generator=torch.Generator().manual_seed(1))
    w[0, :128, :128] = 0  # an all-zero block keeps scale 1
    q = quantize_weight(w)
    assert q.weight.dtype == FP8_DTYPE and q.scale.shape == (2, 3, 2) and q.scale[0, 0, 0] == 1
    deq = q.dequantize()
    for e, r, c in [(0, 0, 0), (1, 2, 1), (1, 0, 1)]:  # the partial blocks at the edges too
        rows, cols = slice(r * 128, (r + 1) * 128), slice(c * 128, (c + 1) * 128)
        assert torch.equal(deq[e, rows, cols], q.weight[e, rows, cols].float() * q.scale[e, r, c])
    with pytest.raises(ValueError, match="do not tile"):
        dequantize_weight(q.weight, q.scale[:, :2])
    assert q[1].shape == (300, 200) and q.nbytes == 2 * 300 * 200 + 2 * 6 * 4


def test_swiglu_fp8_equals_block_scaled_products():
    """The oracle's dequantise-then-matmul is the blockwise-scaled FP8 GEMM written another way: sum over
    128-wide K blocks of (x_q . w_q) * scale_x * scale_w."""
    gen = torch.Generator().manual_seed(2)
    hidden, inter, n = 384, 256, 5
    w_gate, w_up, w_down = (quantize_weight(torch.randn(o, i, generator=gen) / i ** 0.5)
                            for o, i in ((inter, hidden), (inter, hidden), (hidden, inter)))
    values, scales = quantize_rows(torch.randn(n, hidden, generator=gen))

    def block_gemm(xq, xs, w: Fp8Weight) -> torch.Tensor:
        out = torch.zeros(xq.shape[0], w.shape[0], dtype=torch.float64)
        for kb in range(xs.shape[1]):
            k = slice(kb * 128, (kb + 1) * 128)
            part = xq[:, k].double() @ w.weight[:, k].double().T  # [n, out]
            out += part * xs[:, kb:kb + 1].double() * w.scale[:, kb].double().repeat_interleave(128)[:w.shape[0]]
        return out

    gate = block_gemm(values, scales, w_gate).to(torch.bfloat16)
    up = block_gemm(values, scales, w_up).to(torch.bfloat16)
    h = torch.nn.functional.silu(gate.float()) * up.float()
    hq, hs = quantize_rows(h)
    want = block_gemm(hq, hs, w_down)
    got = swiglu_fp8(values, scales, w_gate, w_up, w_down)
    assert got.dtype == torch.bfloat16
    assert float((got.double() - want).norm() / want.norm()) < 5e-3  # bf16 output rounding and fp32 order
    # a per-row scale gives the same answer as the same scale repeated per block
    row_values, row_scale = quantize_rows(torch.randn(n, hidden, generator=gen), block=hidden)
    assert torch.equal(swiglu_fp8(row_values, row_scale[:, 0], w_gate, w_up, w_down),
                       swiglu_fp8(row_values, row_scale.expand(n, 3), w_gate, w_up, w_down))


def test_fp8_reference_differs_from_bf16_by_what_fp8_activations_cost():
    """Same (dequantised) weights; only the activations' FP8 quantisation (x and the SwiGLU output)
    separates the two oracles: 4.4% relative Frobenius at Gaussian inputs (docs/expert_gemm.md)."""
    gen = torch.Generator().manual_seed(3)
    hidden, inter = 1024, 512
    w = [quantize_weight(torch.randn(o, i, generator=gen) / i ** 0.5)
         for o, i in ((inter, hidden), (inter, hidden), (hidden, inter))]
    x = torch.randn(64, hidden, generator=gen).bfloat16()
    fp8 = swiglu_fp8(*quantize_rows(x), *w).double()
    bf16 = swiglu_rounded(x, *(v.dequantize() for v in w)).double()
    assert 0.03 < float((fp8 - bf16).norm() / bf16.norm()) < 0.06


def test_expert_mlp_fp8_fills_valid_rows_only():
    gen = torch.Generator().manual_seed(4)
    slots, ranks, tokens, hidden, inter = 3, 2, 4, 256, 128
    w = [quantize_weight(torch.randn(slots, o, i, generator=gen) / i ** 0.5)
         for o, i in ((inter, hidden), (inter, hidden), (hidden, inter))]
    values, scales = quantize_rows(torch.randn(slots, ranks, tokens, hidden, generator=gen))
    count = torch.tensor([[4, 0], [1, 2], [0, 0]], dtype=torch.int32)
    out = expert_mlp_fp8(RankReceive(values, count, None), scales, *w)
    assert out.dtype == torch.bfloat16
    for s in range(slots):
        for r in range(ranks):
            n = int(count[s, r])
            assert not out[s, r, n:].any()
            if n:
                assert torch.equal(out[s, r, :n], swiglu_fp8(values[s, r, :n], scales[s, r, :n], *(x[s] for x in w)))


def test_fp8_ep_layer_repairs_weights_with_their_scales():
    """Failures (orphans restored from a tensor tier, re-replication from peer slots) and a rejoin:
    the FP8 EP layer answers exactly the dense FP8 oracle throughout; slots hold FP8 + scales."""
    gen = torch.Generator().manual_seed(5)
    experts, hidden, inter = 12, 256, 128
    w = [quantize_weight(torch.randn(experts, o, i, generator=gen) / i ** 0.5)
         for o, i in ((inter, hidden), (inter, hidden), (hidden, inter))]
    ep = ExpertParallelMoE(*w, num_ranks=4, slots_per_rank=8, top_k=3, num_redundant=4)
    assert isinstance(ep.slot_w_gate, Fp8Weight) and ep.slot_w_gate.weight.dtype == FP8_DTYPE
    assert isinstance(ep.tiers[0], TensorTier)
    assert ep.tiers[0].expert_nbytes(0, 0) == 3 * hidden * inter + 3 * 2 * 4
    x = torch.randn(30, hidden, generator=gen).bfloat16()
    logits = torch.randn(30, experts, generator=gen)
    want = dense_moe(x, *w, router_logits=logits, top_k=3)
    assert want.dtype == torch.bfloat16 and torch.equal(ep(x, logits), want)
    plan = ep.fail([1, 2], rereplicate=True)
    assert plan.restores and all(t.nbytes == 3 * hidden * inter + 24 for t in plan.restores)
    assert torch.isnan(ep.slot_w_gate.scale[8:24]).all(), "the dead ranks' slots are poisoned"
    assert torch.equal(ep(x, logits), want)
    ep.join(1)
    assert torch.equal(ep(x, logits), want)
    with pytest.raises(ValueError, match="all be tensors or all be Fp8Weight"):
        ExpertParallelMoE(w[0], w[1], w[2].dequantize(), num_ranks=2, slots_per_rank=6, top_k=2)
