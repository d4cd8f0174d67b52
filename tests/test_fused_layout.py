"""Byte layout of the fused peer buffer and the kernel parameter struct (no GPU needed)."""

import ctypes

import pytest

from eep.fused import layout as fl


@pytest.mark.parametrize("shape", [(4, 64, 128, 7168), (2, 64, 128, 2048), (3, 5, 7, 24), (1, 1, 1, 8)])
def test_regions_are_aligned_disjoint_and_ordered(shape):
    lay = fl.BufferLayout(*shape)
    R, S, M, H = shape
    regions = [(lay.off_recv_x, S * R * M * H * 2), (lay.off_comb_x, R * S * M * H * 2),
               (lay.off_src_token, S * R * M * 4), (lay.off_recv_scale, S * R * M * 4), (lay.off_raw_count, S * R * 4),
               (lay.off_dispatch_flag, R * 8), (lay.off_combine_flag, R * 8),
               (lay.off_dispatch_signal, R * fl.MAX_SIGNAL_BLOCKS * 8), (lay.off_combine_signal, R * fl.MAX_SIGNAL_BLOCKS * 8)]
    end = 0
    for off, size in regions:
        assert off % fl.ALIGN == 0 and off >= end
        end = off + size
    assert lay.nbytes >= end and lay.nbytes % fl.ALIGN == 0


def test_shared_memory_sizes():
    lay = fl.BufferLayout(4, 64, 128, 7168)
    assert lay.dispatch_smem_bytes() == 64 * 4 * 4 * 4  # one bit per (slot, token)
    assert lay.combine_send_smem_bytes() == (2 * 256 + 1) * 4


def test_signature_distinguishes_shapes():
    sigs = {fl.BufferLayout(4, 8, 128, 2048).signature(), fl.BufferLayout(4, 8, 64, 2048).signature(),
            fl.BufferLayout(2, 8, 128, 2048).signature(), fl.BufferLayout(4, 8, 128, 4096).signature()}
    assert len(sigs) == 4


@pytest.mark.parametrize("args", [(0, 1, 1, 8), (65, 1, 1, 8), (2, 0, 1, 8), (2, 1, 0, 8), (2, 1, 1, 12)])
def test_rejects_bad_shapes(args):
    with pytest.raises(ValueError):
        fl.BufferLayout(*args)


def cuda_struct_fields(header: str, struct: str) -> list[str]:
    """Field names of an all-u64 struct in a csrc header, in order."""
    text = open(fl.__file__.rsplit("/", 1)[0] + "/csrc/" + header).read()
    start = text.index(f"struct {struct} {{")
    names = []
    for line in text[start:text.index("};", start)].splitlines()[1:]:
        decl = line.split("//")[0].strip().rstrip(";")
        if decl.startswith("u64 "):
            names += [n.strip() for n in decl[4:].split(",")]
    return names


@pytest.mark.parametrize("header,struct,mirror", [("common.cuh", "EepParams", fl.KernelParams),
                                                  ("signals_v2.cuh", "EepSignals", fl.SignalParams)])
def test_params_struct_matches_the_cuda_struct(header, struct, mirror):
    # every field u64, same names in the same order
    names = cuda_struct_fields(header, struct)
    assert names == [f[0] for f in mirror._fields_]
    assert ctypes.sizeof(mirror) == 8 * len(names)


def test_signal_limit_and_smem_of_the_v2_dispatch():
    text = open(fl.__file__.rsplit("/", 1)[0] + "/csrc/signals_v2.cuh").read()
    assert f"#define EEP_MAX_SIGNAL_BLOCKS {fl.MAX_SIGNAL_BLOCKS}" in text
    lay = fl.BufferLayout(4, 64, 128, 7168)
    # slot ranks + rows taken [256 each], totals of 2 slots, 1 token x (8 choices (rank, row) + sent) per block
    assert lay.dispatch_v2_smem_bytes(8, 132) == 4 * (2 * 256 + 2 + 1 * (2 * 8 + 1))
    p = fl.make_signal_params(lay, num_send_blocks=7)
    assert (p.off_dispatch_signal, p.off_combine_signal, p.num_send_blocks) == (lay.off_dispatch_signal,
                                                                                 lay.off_combine_signal, 7)


def test_ctrl_indices_match_the_cuda_struct():
    text = open(fl.__file__.rsplit("/", 1)[0] + "/csrc/common.cuh").read()
    assert f"#define EEP_MAX_RANKS {fl.MAX_RANKS}" in text
    body = text[text.index("struct EepCtrl {"):text.index("};", text.index("struct EepCtrl {"))]
    fields = [line.split("//")[0].strip().rstrip(";") for line in body.splitlines()[1:]]
    fields = [f for f in fields if f]
    offset, seen = 0, {}
    for f in fields:
        name = f.split()[1]
        n = 1
        if "[" in name:
            name, count = name.rstrip("]").split("[")
            n = fl.MAX_RANKS if count == "EEP_MAX_RANKS" else int(count)
        seen[name] = offset
        offset += n
    assert seen == {"dispatch_seq": fl.CTRL_DISPATCH_SEQ, "combine_seq": fl.CTRL_COMBINE_SEQ,
                    "timeout_ns": fl.CTRL_TIMEOUT_NS, "epoch": fl.CTRL_EPOCH,
                    "dispatch_arrived": fl.CTRL_DISPATCH_ARRIVED, "combine_arrived": fl.CTRL_COMBINE_ARRIVED,
                    "combine_ready_seq": fl.CTRL_COMBINE_READY_SEQ, "combine_dropped": fl.CTRL_COMBINE_DROPPED,
                    "dispatch_ok": fl.CTRL_DISPATCH_OK, "combine_ok": fl.CTRL_COMBINE_OK,
                    "suspect": fl.CTRL_SUSPECT, "miss_count": fl.CTRL_MISS_COUNT,
                    "last_miss_seq": fl.CTRL_LAST_MISS_SEQ}
    assert offset == fl.CTRL_NUMEL


def test_make_params_fills_layout_offsets():
    lay = fl.BufferLayout(4, 8, 64, 2048)
    p = fl.make_params(lay, my_rank=2, top_k=8, num_tokens=17, ctrl=1, peer_base=2, active=3, handle_pos=4,
                       vis_count=5, x=6)
    assert (p.my_rank, p.top_k, p.num_tokens, p.num_ranks, p.slots_per_rank, p.max_tokens) == (2, 8, 17, 4, 8, 64)
    assert (p.off_comb_x, p.off_combine_flag, p.x, p.phys) == (lay.off_comb_x, lay.off_combine_flag, 6, 0)
