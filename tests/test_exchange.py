"""The exchange seam's host backends against the reference: packing, shared memory, one rank, gloo.

The fused backends are differential-tested on the GPU (tests/gpu); these run in CI. Each backend's
receive layout must equal ``eep.reference.dispatch``'s and its combine the reference combine's, with
a rank masked out; a peer that never answers must cost one deadline and be named, never hang.
"""

import datetime
import os
import secrets
import socket
import time

import pytest
import torch

from eep_test_utils import on_every_rank
from eep import ExpertPlacement, route_to_phys
from eep.errors import PeerUnreachableError
from eep.fp8 import dequantize_rows, quantize_rows
from eep.exchange.local import LocalExchange
from eep.exchange.packing import gather_combine, pack_by_destination
from eep.exchange.protocol import DecodeExchange, PrefillExchange
from eep.exchange.shm import ShmExchange, ShmPrefillExchange
from eep.reference import combine as ref_combine
from eep.reference import dispatch as ref_dispatch
from eep.reference.prefill import combine_packed, dispatch_packed
from eep.state import Membership
from eep.transport.shm import SharedMemoryTransport, create_shm_file

R, S, M, H, K, E = 4, 3, 6, 128, 3, 9


def _inputs(seed: int, active: list[bool], dtype=torch.bfloat16):
    """Per-rank tokens routed over a placement with redundancy, uneven counts, one empty rank."""
    gen = torch.Generator().manual_seed(seed)
    placement = ExpertPlacement.build(1, E, R, S, num_redundant=3)
    mask = torch.tensor(active)
    xs, physs, ws = [], [], []
    for r in range(R):
        n = [M, 0, M - 1, 2][r]
        ids = torch.rand(n, E, generator=gen).topk(K, -1).indices
        xs.append(torch.randn(n, H, generator=gen).to(dtype))
        physs.append(route_to_phys(ids, placement.logical_to_phys[0], mask, S, token_offset=r * M))
        ws.append(torch.rand(n, K, generator=gen))
    return xs, physs, ws


def _expert(y_in: torch.Tensor, rank: int) -> torch.Tensor:
    """A stand-in expert stage: a different affine map per (rank, slot), exact in any dtype."""
    scale = torch.arange(1, S + 1, dtype=torch.float32).view(S, 1, 1, 1) + rank
    return (y_in.float() * scale + 0.5).to(y_in.dtype)


# ---- packing -----------------------------------------------------------------------------------

@pytest.mark.parametrize("seed", [0, 1])
def test_pack_by_destination_matches_the_reference_dispatch(seed):
    active = [True, False, True, True] if seed else [True] * R
    xs, physs, ws = _inputs(seed, active, torch.float32)
    recvs, handles = ref_dispatch([x if a else None for x, a in zip(xs, active)],
                                  [p if a else None for p, a in zip(physs, active)], active, S, M)
    for src in (r for r in range(R) if active[r]):
        packed = pack_by_destination(xs[src], physs[src], R, S, M)
        assert torch.equal(packed.position, handles[src].position.long())
        for dst in (r for r in range(R) if active[r]):
            assert torch.equal(packed.count[dst], recvs[dst].count[:, src])
            assert torch.equal(packed.src_token[dst], recvs[dst].src_token[:, src])
            assert torch.equal(packed.send[dst], recvs[dst].x[:, src])
        home = packed.send * 2.0 + 1.0
        home[:, :, -1] = float("nan")  # rows past every count: poison, never read
        home = torch.where(torch.arange(M).view(1, 1, M, 1) < packed.count.unsqueeze(-1).unsqueeze(-1), home,
                           float("nan"))
        got = gather_combine(home, physs[src], packed.position, ws[src])
        want = torch.zeros_like(xs[src])
        for k in range(K):
            sent = (physs[src][:, k] >= 0).unsqueeze(1)
            want += torch.where(sent, ws[src][:, k:k + 1] * (xs[src] * 2.0 + 1.0), 0.0)
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


# ---- one rank ------------------------------------------------------------------------------------

def test_local_exchange_is_the_reference_for_one_rank():
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(5, H, generator=gen)
    phys = torch.rand(5, S, generator=gen).topk(2, -1).indices
    ex = LocalExchange(slots_per_rank=S, max_tokens_per_rank=M, hidden=H)
    assert isinstance(ex, DecodeExchange)
    recv, handle = ex.dispatch(x, phys)
    [want], [want_handle] = ref_dispatch([x], [phys], [True], S, M)
    assert torch.equal(recv.x, want.x) and torch.equal(recv.count, want.count)
    assert torch.equal(recv.src_token, want.src_token)
    w = torch.rand(5, 2, generator=gen)
    y = _expert(recv.x, 0)
    torch.testing.assert_close(ex.combine(y, handle, w), ref_combine([y], [want_handle], [w], S)[0])


# ---- shared memory, ranks as threads over one file ----------------------------------------------

def _shm(tmp_path, capacity: int) -> str:
    path = str(tmp_path / f"ex-{secrets.token_hex(4)}.shm")
    create_shm_file(path, R, 4, capacity)
    return path


def _run(target, active):
    return on_every_rank(target, [r for r in range(R) if active[r]])


@pytest.mark.parametrize("dtype, use_fp8, dead", [(torch.bfloat16, False, None), (torch.float32, False, 1),
                                                  (torch.bfloat16, True, 2)])
def test_shm_exchange_matches_the_reference(tmp_path, dtype, use_fp8, dead):
    active = [r != dead for r in range(R)]
    xs, physs, ws = _inputs(7, active, dtype)
    path = _shm(tmp_path, ShmExchange.capacity_nbytes(S, M, H, elem_nbytes=dtype.itemsize, use_fp8=use_fp8))
    membership = Membership(R, active=active, epoch=3)

    def rank_main(rank):
        ex = ShmExchange(SharedMemoryTransport(path, rank), slots_per_rank=S, max_tokens_per_rank=M, hidden=H,
                         dtype=dtype, use_fp8=use_fp8, timeout_s=10.0)
        assert isinstance(ex, DecodeExchange)
        ex.set_membership(membership)
        try:
            recv, handle = ex.dispatch(xs[rank], physs[rank])
            x_in = recv.dequantized().to(dtype) if use_fp8 else recv.x
            y = _expert(x_in, rank)
            out = ex.combine(y, handle, ws[rank])
            return recv, x_in, y, out, ex.status()
        finally:
            ex.close()

    got = _run(rank_main, active)
    sent_x = [quantize_rows(x) for x in xs] if use_fp8 else None
    wire = [dequantize_rows(*q).to(dtype) for q in sent_x] if use_fp8 else xs
    recvs, handles = ref_dispatch([x if a else None for x, a in zip(wire, active)],
                                  [p if a else None for p, a in zip(physs, active)], active, S, M)
    ys = [None if recvs[r] is None else got[r][2] for r in range(R)]
    outs = ref_combine(ys, handles, [w if a else None for w, a in zip(ws, active)], S)
    for r in (r for r in range(R) if active[r]):
        recv, x_in, _, out, status = got[r]
        assert torch.equal(recv.count, recvs[r].count) and torch.equal(recv.src_token, recvs[r].src_token)
        assert torch.equal(x_in, recvs[r].x)
        torch.testing.assert_close(out, outs[r])
        assert status.epoch == 3 and status.step == 2 and not any(status.suspect)


def test_shm_exchange_names_a_silent_peer_after_one_deadline(tmp_path):
    xs, physs, ws = _inputs(1, [True] * R, torch.float32)
    path = _shm(tmp_path, ShmExchange.capacity_nbytes(S, M, H, elem_nbytes=4))
    silent = 3

    def rank_main(rank):
        ex = ShmExchange(SharedMemoryTransport(path, rank), slots_per_rank=S, max_tokens_per_rank=M, hidden=H,
                         dtype=torch.float32, timeout_s=0.3)
        try:
            t0 = time.monotonic()
            recv, handle = ex.dispatch(xs[rank], physs[rank])
            out = ex.combine(_expert(recv.x, rank), handle, ws[rank])
            return time.monotonic() - t0, recv, out, ex.status()
        finally:
            ex.close()

    got = _run(rank_main, [r != silent for r in range(R)])  # rank 3's process never calls
    for r, (took, recv, out, status) in got.items():
        assert status.suspect == [False, False, False, True] and status.miss_count == [0, 0, 0, 1]
        assert 0.25 < took < 2.0, f"rank {r} waited {took:.2f} s for a silent peer (deadline 0.3 s)"
        assert int(recv.count[:, silent].sum()) == 0  # nothing from it, and not waited for at combine
        assert torch.isfinite(out).all()


def test_shm_prefill_exchange_matches_the_reference(tmp_path):
    active = [True, True, False, True]
    xs, physs, ws = _inputs(11, active)
    path = _shm(tmp_path, ShmPrefillExchange.capacity_nbytes(M, H, K))
    membership = Membership(R, active=active, epoch=1)

    def rank_main(rank):
        ex = ShmPrefillExchange(SharedMemoryTransport(path, rank), slots_per_rank=S, max_tokens_per_rank=M,
                                hidden=H, top_k=K, timeout_s=10.0)
        assert isinstance(ex, PrefillExchange)
        ex.set_membership(membership)
        try:
            recv, handle = ex.dispatch(xs[rank], physs[rank], ws[rank])
            partial = (recv.x.float() * (rank + 2)).to(recv.x.dtype)  # any per-row function
            return recv, partial, ex.combine(partial, handle)
        finally:
            ex.close()

    got = _run(rank_main, active)
    recvs, handles = dispatch_packed([x if a else None for x, a in zip(xs, active)],
                                     [p if a else None for p, a in zip(physs, active)],
                                     [w if a else None for w, a in zip(ws, active)], active, S, M)
    outs = combine_packed([got[r][1] if active[r] else None for r in range(R)], handles)
    for r in (r for r in range(R) if active[r]):
        recv, _, out = got[r]
        for name in ("x", "count", "src_token", "local_slot", "weight"):
            assert torch.equal(getattr(recv, name), getattr(recvs[r], name)), name
        assert torch.equal(out, outs[r])


def test_shm_connect_names_dead_and_stopped_peers_within_its_bound(tmp_path):
    path = _shm(tmp_path, ShmExchange.capacity_nbytes(S, M, H))
    make = lambda r: ShmExchange(SharedMemoryTransport(path, r), slots_per_rank=S, max_tokens_per_rank=M,  # noqa: E731
                                 hidden=H, timeout_s=5.0)
    ex = [make(r) for r in range(3)]
    ex[2].close()  # rank 2: dead (its socket is gone)
    # rank 3: alive but stopped: its socket accepts connections nobody answers
    stopped = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stopped.bind("\0eep-fused-" + ex[0]._server_name(3))
    stopped.listen(4)
    try:
        t0 = time.monotonic()
        with pytest.raises(PeerUnreachableError) as info:
            ex[0].connect([1, 2, 3], timeout_s=0.3)
        took = time.monotonic() - t0
        assert info.value.ranks == [2, 3] and ex[0].connected == {0, 1}
        assert 0.25 < took < 1.0, f"connect waited {took:.2f} s on a stopped peer, bound 0.3 s"
        with pytest.raises(PeerUnreachableError, match=r"\[2\].*not mapped"):
            ex[0].set_membership(Membership(R, active=[True, True, True, False], epoch=1))
        ex[0].set_membership(Membership(R, active=[True, True, False, False], epoch=1))  # without them: fine
        ex[2] = make(2)  # a new incarnation of rank 2 answers
        ex[0].connect([2], timeout_s=0.3)
        assert ex[0].connected == {0, 1, 2}
        with pytest.raises(ValueError, match="rank 0 is not a member"):
            ex[0].set_membership(Membership(R, active=[False, True, True, False], epoch=2))
    finally:
        stopped.close()
        for e in ex:
            e.close()
        os.unlink(path)


# ---- the collective baseline over gloo, real processes ------------------------------------------

def _collective_rank(rank: int, port: int, seed: int, queue) -> None:
    import torch.distributed as dist

    from eep.exchange.collective import CollectiveExchange

    store = dist.TCPStore("127.0.0.1", port, is_master=False, timeout=datetime.timedelta(seconds=60))
    xs, physs, ws = _inputs(seed, [True] * R, torch.float32)
    ex = CollectiveExchange(rank, R, slots_per_rank=S, max_tokens_per_rank=M, hidden=H, store=store, group="t",
                            backend="gloo")
    recv, handle = ex.dispatch(xs[rank], physs[rank])
    y = _expert(recv.x, rank)
    out = ex.combine(y, handle, ws[rank])
    queue.put((rank, recv.x.numpy(), recv.count.numpy(), recv.src_token.numpy(), y.numpy(), out.numpy()))
    ex.close()


def test_collective_exchange_over_gloo_matches_the_reference():
    import multiprocessing as mp

    import torch.distributed as dist

    server = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False,
                           timeout=datetime.timedelta(seconds=60))
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_collective_rank, args=(r, server.port, 5, queue)) for r in range(R)]
    for p in procs:
        p.start()
    got = {}
    for _ in range(R):
        rank, *arrays = queue.get(timeout=120)
        got[rank] = [torch.from_numpy(a) for a in arrays]
    for p in procs:
        p.join(timeout=30)
    xs, physs, ws = _inputs(5, [True] * R, torch.float32)
    recvs, handles = ref_dispatch(xs, physs, [True] * R, S, M)
    outs = ref_combine([got[r][3] for r in range(R)], handles, ws, S)
    for r in range(R):
        x, count, src_token, _, out = got[r]
        assert torch.equal(x, recvs[r].x) and torch.equal(count, recvs[r].count)
        assert torch.equal(src_token, recvs[r].src_token)
        torch.testing.assert_close(out, outs[r])
