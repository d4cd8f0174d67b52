"""eep.Buffer prefill_dispatch / prefill_combine (DeepEP's normal mode) over the shared-memory
transport, against eep.reference.prefill; a SIGKILLed peer is cleared in place."""

import os
import signal
import threading

import pytest
import torch

from eep_test_utils import prefill_partials, random_experts, run_ranks_one_sigkilled
from eep.errors import RoutingError
from eep.integrations.buffer import Buffer
from eep.reference.prefill import combine_packed, dispatch_packed
from eep.transport.shm import SharedMemoryTransport, create_shm_file

NUM_RANKS, LOCAL, HIDDEN, TOP_K, M = 4, 3, 64, 4, 12
NUM_EXPERTS = NUM_RANKS * LOCAL


def _inputs(seed: int):
    gen = torch.Generator().manual_seed(seed)
    xs, ids, ws = [], [], []
    for rank in range(NUM_RANKS):
        n = [7, 0, 12, 4][rank]  # a rank with no tokens, a full one
        xs.append(torch.randn(n, HIDDEN, generator=gen).to(torch.bfloat16))
        ids.append(torch.rand(n, NUM_EXPERTS, generator=gen).argsort(-1)[:, :TOP_K])
        ws.append(torch.softmax(torch.randn(n, TOP_K, generator=gen), -1))
    if ids[0].numel():
        ids[0][0, 1] = -1  # "no expert" entries are skipped
    return xs, ids, ws, random_experts(NUM_EXPERTS, 16, HIDDEN, generator=gen, dtype=torch.bfloat16)


def _partials(recv_x, recv_idx, recv_w, rank, weights):
    return prefill_partials(recv_x, recv_idx, recv_w, rank, LOCAL, weights)


def _run_rank(path, rank, x, ids, w, weights, active, results):
    buf = Buffer(rank, NUM_RANKS, transport=SharedMemoryTransport(path, rank))
    recv_x, recv_idx, recv_w, per_expert, handle, _ = buf.prefill_dispatch(x, ids, w, active, NUM_EXPERTS, 2_000_000)
    out, _ = buf.prefill_combine(_partials(recv_x, recv_idx, recv_w, rank, weights), handle, active, 2_000_000)
    results[rank] = (recv_x, recv_idx, recv_w, per_expert, out, active.clone())


def _reference(xs, ids, ws, weights, active):
    recvs, handles = dispatch_packed([x if a else None for x, a in zip(xs, active)],
                                     [i if a else None for i, a in zip(ids, active)],
                                     [w if a else None for w, a in zip(ws, active)], active, LOCAL, M)
    partials = []
    for rank, recv in enumerate(recvs):
        if recv is None:
            partials.append(None)
            continue
        valid = torch.arange(M).view(1, -1) < recv.count.view(-1, 1)
        rows = _partials(recv.x[valid], recv.local_slot[valid].long(), recv.weight[valid], rank, weights)
        partial = torch.zeros_like(recv.x)
        partial[valid] = rows
        partials.append(partial)
    return recvs, combine_packed(partials, handles)


def test_four_ranks_match_the_packed_reference(tmp_path):
    path = str(tmp_path / "ep.shm")
    create_shm_file(path, NUM_RANKS, 4, Buffer.get_prefill_buffer_size_hint(M, HIDDEN, TOP_K))
    xs, ids, ws, weights = _inputs(3)
    results = {}
    threads = [threading.Thread(target=_run_rank, args=(path, r, xs[r], ids[r], ws[r], weights,
                                                         torch.ones(NUM_RANKS, dtype=torch.int32), results))
               for r in range(NUM_RANKS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert len(results) == NUM_RANKS
    recvs, outs = _reference(xs, ids, ws, weights, [True] * NUM_RANKS)
    for rank in range(NUM_RANKS):
        recv_x, recv_idx, recv_w, per_expert, out, active = results[rank]
        ref = recvs[rank]
        valid = torch.arange(M).view(1, -1) < ref.count.view(-1, 1)  # packed = regions without gaps
        assert torch.equal(recv_x, ref.x[valid])
        assert torch.equal(recv_idx, ref.local_slot[valid].long())
        assert torch.equal(recv_w, ref.weight[valid])
        assert per_expert == [int((ref.local_slot[valid] == i).sum()) for i in range(LOCAL)]
        assert torch.equal(out, outs[rank])  # same partials, same summation order: bit-exact
        assert active.tolist() == [1] * NUM_RANKS
    assert sum(r[0].shape[0] for r in results.values()) > 0


def _process_rank(path, rank, seed, queue, dead_rank, ready):
    if rank == dead_rank:
        os.kill(os.getpid(), signal.SIGKILL)  # dies before sending anything
    xs, ids, ws, weights = _inputs(seed)
    ready.wait(timeout=120)
    results = {}
    active = torch.ones(NUM_RANKS, dtype=torch.int32)
    _run_rank(path, rank, xs[rank], ids[rank], ws[rank], weights, active, results)
    out, active = results[rank][4], results[rank][5]
    queue.put((rank, out.float().numpy(), active.tolist()))


def test_sigkilled_rank_is_cleared_in_place_and_survivors_match_the_reference(tmp_path):
    path = str(tmp_path / "ep.shm")
    create_shm_file(path, NUM_RANKS, 4, Buffer.get_prefill_buffer_size_hint(M, HIDDEN, TOP_K))
    dead = 2
    got = run_ranks_one_sigkilled(_process_rank, path, NUM_RANKS, 5, dead)
    xs, ids, ws, weights = _inputs(5)
    survivors = [r != dead for r in range(NUM_RANKS)]
    _, outs = _reference(xs, ids, ws, weights, survivors)
    for rank, (out, active) in got.items():
        assert active == [int(a) for a in survivors]  # evidence written into the caller's tensor
        assert torch.equal(out, outs[rank].float())  # the dead rank's experts contribute nothing


def test_bad_input_names_the_problem(tmp_path):
    path = str(tmp_path / "ep.shm")
    create_shm_file(path, 2, 4, Buffer.get_prefill_buffer_size_hint(4, 8, 2))
    buf = Buffer(0, 2, transport=SharedMemoryTransport(path, 0))
    x, ids, w, active = torch.randn(3, 8), torch.zeros(3, 2, dtype=torch.long), torch.ones(3, 2), torch.ones(2)
    with pytest.raises(RoutingError, match="topk_weights has shape"):
        buf.prefill_dispatch(x, ids, w[:, :1], active, 4, 1000)
    with pytest.raises(RoutingError, match=r"ids outside \[-1, 4\)"):
        buf.prefill_dispatch(x, ids + 7, w, active, 4, 1000)
    with pytest.raises(RoutingError, match="not a multiple of num_ranks"):
        buf.prefill_dispatch(x, ids, w, active, 3, 1000)
    with pytest.raises(ValueError, match="exactly one backend"):
        Buffer(0, 2)
