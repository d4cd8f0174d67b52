"""Prefill buffer layout and kernel parameters (no GPU): regions, shared memory, the CUDA struct."""

import ctypes
from pathlib import Path

import pytest

from eep.fused import prefill as fp


@pytest.mark.parametrize("shape", [(4, 4096, 7168, 8), (2, 128, 2048, 8), (64, 33, 8, 1)])
def test_regions_are_aligned_disjoint_and_ordered(shape):
    lay = fp.PrefillLayout(*shape)
    R, M, H, K = shape
    regions = [(lay.off_recv_x, R * M * H * 2), (lay.off_comb_x, R * M * H * 2), (lay.off_src_token, R * M * 4),
               (lay.off_local_slot, R * M * K * 4), (lay.off_weight, R * M * K * 4), (lay.off_raw_count, R * 4),
               (lay.off_dispatch_flag, R * 8), (lay.off_combine_flag, R * 8),
               (lay.off_dispatch_signal, R * 256 * 8), (lay.off_combine_signal, R * 256 * 8)]
    end = 0
    for off, size in regions:
        assert off % 256 == 0 and off >= end
        end = off + size
    assert lay.nbytes >= end and lay.nbytes % 256 == 0


def test_deepseek_prefill_fits_and_needs_opt_in_shared_memory():
    lay = fp.PrefillLayout(4, 4096, 7168, 8)
    assert lay.off_comb_x == 4 * 4096 * 7168 * 2  # 235 MB of rows per region, not 15 GB
    assert lay.dispatch_smem_bytes() == 2 * 4 * 128 * 4
    assert fp.PrefillLayout(64, 4096, 7168, 8).dispatch_smem_bytes() == 64 * 1024  # over 48 KB: attribute set
    # kernel set v2: 32 tokens per block (ranks u64, a row per rank, a slot per choice) + a rank per slot
    assert lay.dispatch_v2_smem_bytes(64, 128) == 32 * (8 + 4 * 4 + 4 * 8) + 4 * 256


def test_signature_distinguishes_shapes_and_modes():
    a = fp.PrefillLayout(4, 4096, 7168, 8)
    assert a.signature() != fp.PrefillLayout(4, 4096, 7168, 6).signature()
    assert a.signature().startswith("P.")  # never equal to a decode BufferLayout signature


@pytest.mark.parametrize("args", [(0, 4, 8, 8), (65, 4, 8, 8), (4, 0, 8, 8), (4, 4, 12, 8), (4, 4, 8, 0)])
def test_rejects_bad_shapes(args):
    with pytest.raises(ValueError):
        fp.PrefillLayout(*args)


def test_params_struct_matches_the_cuda_struct():
    text = (Path(fp.__file__).parent / "csrc" / "common.cuh").read_text()  # shared by both kernel sets
    start = text.index("struct EepPrefillParams {")
    body = text[start:text.index("};", start)]
    names = []
    for line in body.splitlines()[1:]:
        decl = line.split("//")[0].strip().rstrip(";")
        if decl.startswith("u64 "):
            names += [n.strip() for n in decl[4:].split(",")]
    assert names == [f[0] for f in fp.PrefillParams._fields_]
    assert ctypes.sizeof(fp.PrefillParams) == 8 * len(names)


def test_make_params_fills_layout_offsets():
    lay = fp.PrefillLayout(4, 256, 2048, 8)
    p = fp.make_prefill_params(lay, slots_per_rank=48, my_rank=3, num_tokens=100, ctrl=1, peer_base=2, active=3,
                               dst_row=4, vis_count=5, x=6)
    assert (p.num_ranks, p.max_tokens, p.top_k, p.slots_per_rank, p.my_rank, p.num_tokens) == (4, 256, 8, 48, 3, 100)
    assert (p.off_local_slot, p.off_weight, p.off_combine_flag) == (lay.off_local_slot, lay.off_weight,
                                                                    lay.off_combine_flag)
    assert (p.x, p.phys, p.dst_row, p.vis_count) == (6, 0, 4, 5)
