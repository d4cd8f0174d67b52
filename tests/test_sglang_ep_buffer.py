"""The SGLang plugin's backends (``eep/integrations/sglang/ep_buffer.py``) without SGLang: what
``make_buffer`` builds from a dispatcher's spec, on one membership whose mirror is the caller's mask.

The CPU path runs for real (shared-memory exchanges agreed through a TCPStore); the GPU path's
arguments are checked with stand-ins for the fused buffers, which need a GPU (tests/gpu/sglang_gpu.py
runs them for real, with SGLang)."""

import datetime
import socket

import pytest
import torch

from eep_test_utils import StubGroup as Group, on_every_rank
from eep.integrations.sglang import ep_buffer
from eep.integrations.sglang.ep_buffer import BufferSpec, make_buffer
from eep.state import Membership

SPEC = BufferSpec(num_ranks=4, hidden_size=256, num_max_dispatch_tokens_per_rank=16, num_experts=12, use_fp8=True,
                  top_k=4)


def _store(port: int, is_master: bool):
    from torch.distributed import TCPStore

    return TCPStore("127.0.0.1", port, is_master=is_master, wait_for_workers=False,
                    timeout=datetime.timedelta(seconds=30))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_cpu_backends_share_one_file_and_one_membership_mirroring_the_callers_mask(tmp_path, monkeypatch):
    monkeypatch.setenv("EEP_SHM_DIR", str(tmp_path))
    port = _free_port()
    master = _store(port, True)  # noqa: F841 (kept alive)
    spec = BufferSpec(**{**SPEC.__dict__, "num_ranks": 2, "num_experts": 6})
    masks = [torch.ones(2, dtype=torch.int32) for _ in range(2)]
    buffers = on_every_rank(lambda r: make_buffer(Group(r, 2), spec, masks[r], store=_store(port, False)), range(2))
    try:
        paths = {b.decode.transport.path for b in buffers.values()} | {b.prefill.transport.path for b in buffers.values()}
        assert len(paths) == 1 and str(tmp_path) in paths.pop()
        for r, b in buffers.items():
            assert b.membership.active_device is masks[r]  # the caller's tensor is the mirror, not a copy
            assert b.decode.membership is b.membership and b.prefill.membership is b.membership
            assert (b.decode.slots_per_rank, b.decode.max_tokens_per_rank, b.decode.hidden, b.decode.use_fp8) == \
                (3, 16, 256, True)
            assert (b.prefill.max_tokens_per_rank, b.prefill.top_k) == (16, 4)
        # a rank the caller's mask lost comes back: mapped again (a handshake), the mask written in place
        masks[0][1] = 0
        buffers[0].update_ep_member(joined=[1])
        assert masks[0].tolist() == [1, 1] and buffers[0].epoch == 1
    finally:
        for b in buffers.values():
            b.decode.close()
            b.prefill.close()


class _FakeFused:
    """Records what ``make_buffer`` hands the fused buffers (they need a GPU)."""

    def __init__(self, rank, num_ranks, **kwargs):
        self.rank, self.num_ranks, self.kwargs = rank, num_ranks, kwargs
        self.membership, self.connected = kwargs["membership"], None

    def connect(self, ranks, *, timeout_s):
        self.connected = list(ranks)


def test_gpu_backends_get_the_dispatchers_shapes_sglangs_mask_and_connect_its_active_peers(monkeypatch):
    import eep.fused.buffer
    import eep.fused.prefill

    monkeypatch.setattr(eep.fused.buffer, "FusedBuffer", _FakeFused)
    monkeypatch.setattr(eep.fused.prefill, "PrefillBuffer", _FakeFused)
    mask = torch.tensor([1, 0, 1, 1], dtype=torch.int32)  # SGLang's mask with rank 1 out
    membership = Membership(4, active_device=mask)
    decode, prefill = ep_buffer._fused_backends(2, SPEC, membership, "store", "")
    shape = dict(slots_per_rank=3, max_tokens_per_rank=16, hidden=256, top_k=4, store="store", connect=[],
                 device=mask.device, membership=membership)
    assert decode.kwargs == {**shape, "group": "sglang-decode", "use_fp8": True}
    assert prefill.kwargs == {**shape, "group": "sglang-prefill"}
    assert decode.connected == prefill.connected == [0, 3]
    assert membership.active_device is mask and membership.active_ranks() == [0, 2, 3]
    decode, prefill = ep_buffer._fused_backends(2, BufferSpec(**{**SPEC.__dict__, "normal": False}), membership,
                                                "store", "-g8")
    assert prefill is None and decode.kwargs["group"] == "sglang-decode-g8"
    with pytest.raises(ValueError, match="bf16 activations.*torch.float16"):
        ep_buffer._fused_backends(2, BufferSpec(**{**SPEC.__dict__, "dtype": torch.float16}), membership, "s", "")


def test_spec_errors_name_the_culprit():
    with pytest.raises(ValueError, match="num_experts=10 is not a multiple of the 4 rank slots"):
        make_buffer(Group(0, 4), BufferSpec(**{**SPEC.__dict__, "num_experts": 10}), torch.ones(4, dtype=torch.int32))
    with pytest.raises(ValueError, match="neither the low-latency nor the normal-mode"):
        make_buffer(Group(0, 4), BufferSpec(**{**SPEC.__dict__, "low_latency": False, "normal": False}),
                    torch.ones(4, dtype=torch.int32))
