"""FusedBuffer's choice of kernels for the experimental decode path (``decode="pull"``) and for kernel
set v2 (``kernels="v2"``), on CPU.

The kernels themselves need a GPU (tests/gpu/run_all.sh decode, tests/gpu/run_kernels.sh); this checks
the Python side that decides which kernels a step launches, with what grid, and what ``combine_input()`` views.
"""

import pytest
import torch

from eep.fused.buffer import FusedBuffer
from eep.fused.layout import BufferLayout

R, S, M, H, K = 4, 3, 8, 64, 4


def _buffer(decode: str, use_fp8: bool = False, kernels: str = "v1", num_ranks: int = R) -> tuple[FusedBuffer, list]:
    """A FusedBuffer with CPU tensors in place of device memory and a recording launcher."""
    buf = FusedBuffer.__new__(FusedBuffer)
    buf.layout = BufferLayout(num_ranks, S, M, H)
    buf.rank, buf.num_ranks, buf.top_k, buf.use_fp8, buf.decode = min(1, num_ranks - 1), num_ranks, K, use_fp8, decode
    buf.kernel_set, buf.num_blocks = kernels, 132
    buf.device = torch.device("cpu")
    buf._buffer = torch.randint(0, 255, (buf.layout.nbytes,), dtype=torch.uint8)
    buf.vis_count = torch.zeros(S, num_ranks, dtype=torch.int32)
    buf.handle_pos = torch.full((M, K), -1, dtype=torch.int32)
    if use_fp8:
        buf.stage = torch.empty(M, H, dtype=torch.uint8)
        buf.stage_scale = torch.empty(M, dtype=torch.float32)
    launches = []

    class Params:
        def __init__(self, num_tokens, **ptrs):
            self.num_tokens, self.ptrs = num_tokens, ptrs

    buf._params = lambda num_tokens, **ptrs: Params(num_tokens, **ptrs)
    buf._launch = lambda name, params, smem, *, grid=None: launches.append((name, params, smem, grid))
    return buf, launches


def _inputs(num_tokens: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(num_tokens, H, generator=g).to(torch.bfloat16)
    phys = torch.randint(-1, S * R, (num_tokens, K), generator=g)
    w = torch.rand(num_tokens, K, generator=g)
    return x, phys, w


def test_combine_input_views_the_comb_x_region_as_the_receive_layout():
    buf, _ = _buffer("pull")
    view = buf.combine_input()
    lay = buf.layout
    assert tuple(view.shape) == (S, R, M, H) and view.dtype == torch.bfloat16
    assert view.data_ptr() == buf._buffer.data_ptr() + lay.off_comb_x
    view[S - 1, R - 1, M - 1, H - 1] = 3.0  # the last element is the region's last two bytes
    end = lay.off_comb_x + lay.num_rows * lay.row_nbytes
    assert buf._buffer[end - 2:end].view(torch.bfloat16).item() == 3.0


@pytest.mark.parametrize("in_place", [True, False])
def test_pull_combine_stages_only_a_foreign_y_then_ready_then_pull(in_place):
    buf, launches = _buffer("pull")
    x, phys, w = _inputs(5, seed=7)
    _, handle = buf.dispatch(x, phys)
    assert [name for name, *_ in launches] == ["eep_dispatch"]
    launches.clear()
    y = buf.combine_input() if in_place else torch.randn(S, R, M, H).to(torch.bfloat16)
    out = buf.combine(y, handle, w)
    names = [name for name, *_ in launches]
    assert names == (["eep_combine_ready", "eep_combine_pull"] if in_place else
                     ["eep_combine_stage", "eep_combine_ready", "eep_combine_pull"])
    by_name = {name: (params, smem, grid) for name, params, smem, grid in launches}
    assert by_name["eep_combine_ready"][2] == 1  # one block: the handshake
    pull = by_name["eep_combine_pull"][0]
    assert pull.ptrs["out"] == out.data_ptr() and pull.ptrs["weights"] == w.data_ptr()
    assert pull.ptrs["phys"] == phys.data_ptr() and pull.num_tokens == 5
    if not in_place:
        params, smem, _ = by_name["eep_combine_stage"]
        assert params.ptrs["x"] == y.data_ptr() and smem == buf.layout.combine_send_smem_bytes()


def test_push_combine_is_unchanged_by_the_variant_code():
    buf, launches = _buffer("push")
    x, phys, w = _inputs(3, seed=11)
    _, handle = buf.dispatch(x, phys)
    launches.clear()
    buf.combine(buf.combine_input().clone(), handle, w)
    assert [name for name, *_ in launches] == ["eep_combine_send", "eep_combine_reduce"]


@pytest.mark.parametrize("decode,kernel,grid", [("pull", "eep_quantize_rows", 6), ("push", "eep_quantize", 1)])
def test_fp8_dispatch_quantizes_with_the_variant_kernel(decode, kernel, grid):
    buf, launches = _buffer(decode, use_fp8=True)
    x, phys, _ = _inputs(6, seed=3)
    buf.dispatch(x, phys)
    assert [(name, g) for name, _, _, g in launches] == [(kernel, grid), ("eep_dispatch", None)]


@pytest.mark.parametrize("use_fp8", [False, True])
@pytest.mark.parametrize("num_ranks,send_blocks", [(R, 132), (1, 0)])
def test_v2_is_one_launch_per_direction(use_fp8, num_ranks, send_blocks):
    """Kernel set v2: dispatch is one launch with the FP8 cast inside it (no quantize launch), combine
    one launch whose first blocks push to the other ranks (none with one rank) and the rest reduce,
    reading ``y`` in place; both kernels take the signal offsets as a second parameter."""
    buf, launches = _buffer("push", use_fp8=use_fp8, kernels="v2", num_ranks=num_ranks)
    x, phys, w = _inputs(5, seed=5)
    phys = phys.clamp(max=S * num_ranks - 1)
    _, handle = buf.dispatch(x, phys)
    y = torch.randn(S, num_ranks, M, H).to(torch.bfloat16)
    out = buf.combine(y, handle, w)
    assert [(name, grid) for name, _, _, grid in launches] == [("eep2_dispatch", 132),
                                                               ("eep2_combine", send_blocks + 132)]
    (_, (dparams, dsig), dsmem, _), (_, (cparams, csig), csmem, _) = launches
    assert dparams.ptrs["x"] == x.data_ptr() and dsig.num_send_blocks == 0
    assert dsmem == buf.layout.dispatch_v2_smem_bytes(K, 132)
    assert (dsig.off_dispatch_signal, dsig.off_combine_signal) == (buf.layout.off_dispatch_signal,
                                                                    buf.layout.off_combine_signal)
    assert cparams.ptrs["x"] == y.data_ptr() and cparams.ptrs["out"] == out.data_ptr()
    assert csig.num_send_blocks == send_blocks and csmem == buf.layout.combine_send_smem_bytes()


def test_v2_rejects_what_it_does_not_run_before_touching_cuda():
    with pytest.raises(ValueError, match="kernel set"):
        FusedBuffer(0, 2, slots_per_rank=2, max_tokens_per_rank=4, hidden=64, top_k=2, store=None, decode="pull",
                    kernels="v2")
    with pytest.raises(ValueError, match="kernels"):
        FusedBuffer(0, 2, slots_per_rank=2, max_tokens_per_rank=4, hidden=64, top_k=2, store=None, kernels="v3")
    with pytest.raises(ValueError, match="top_k"):
        FusedBuffer(0, 2, slots_per_rank=2, max_tokens_per_rank=4, hidden=64, top_k=33, store=None, kernels="v2")
