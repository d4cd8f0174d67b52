"""eep.Buffer (the DeepEP/Mooncake face) over the shared-memory transport, against the reference."""

import os
import signal
import threading

import pytest
import torch

from eep_test_utils import random_experts, run_ranks_one_sigkilled
from eep.fp8 import dequantize_rows
from eep.integrations.buffer import Buffer
from eep.reference import combine as ref_combine
from eep.reference import dispatch as ref_dispatch
from eep.reference import swiglu
from eep.transport.shm import SharedMemoryTransport, create_shm_file

NUM_RANKS, LOCAL, HIDDEN, TOP_K, M = 4, 3, 128, 4, 8
NUM_EXPERTS = NUM_RANKS * LOCAL


def _inputs(seed: int, dtype=torch.bfloat16):
    gen = torch.Generator().manual_seed(seed)
    xs, ids, ws = [], [], []
    for rank in range(NUM_RANKS):
        n = [5, 0, 8, 3][rank]  # a rank with no tokens, a full one
        xs.append(torch.randn(n, HIDDEN, generator=gen).to(dtype))
        ids.append(torch.rand(n, NUM_EXPERTS, generator=gen).argsort(-1)[:, :TOP_K])
        ws.append(torch.rand(n, TOP_K, generator=gen))
    if ids[0].numel():
        ids[0][0, 0] = -1  # "no expert" entries are skipped
    weights = random_experts(NUM_EXPERTS, 16, HIDDEN, generator=gen, dtype=dtype)
    return xs, ids, ws, weights


def _expert_outputs(recv_x: torch.Tensor, rank: int, weights) -> torch.Tensor:
    y = torch.zeros_like(recv_x)
    for i in range(LOCAL):
        e = rank * LOCAL + i
        y[i] = swiglu(recv_x[i], weights[0][e], weights[1][e], weights[2][e])
    return y


def _run_rank(path, rank, x, ids, w, weights, active, results, *, use_fp8=False, hook=False):
    buf = Buffer(rank, NUM_RANKS, transport=SharedMemoryTransport(path, rank))
    recv, count, handle, _, recv_hook = buf.dispatch(x, ids, active, M, NUM_EXPERTS, timeout_us=2_000_000,
                                                     use_fp8=use_fp8, return_recv_hook=hook)
    recv_hook()
    if use_fp8:
        values, scales = recv
        recv = dequantize_rows(values, scales).to(x.dtype)
    y = _expert_outputs(recv, rank, weights)
    out, _, combine_hook = buf.combine(y, ids, w, active, 2_000_000, handle, return_recv_hook=hook)
    combine_hook()
    results[rank] = (recv.clone(), count.clone(), out.clone(), active.clone())


def _reference(xs, ids, ws, weights, active):
    phys = [torch.where(i >= 0, i, -1) for i in ids]
    recvs, handles = ref_dispatch([x if a else None for x, a in zip(xs, active)],
                                  [p if a else None for p, a in zip(phys, active)], active, LOCAL, M)
    ys = [None if r is None else
          torch.stack([torch.stack([swiglu(r.x[i, s], weights[0][rk * LOCAL + i], weights[1][rk * LOCAL + i],
                                           weights[2][rk * LOCAL + i]) for s in range(NUM_RANKS)])
                       for i in range(LOCAL)])
          for rk, r in enumerate(recvs)]
    outs = ref_combine(ys, handles, [w if a else None for w, a in zip(ws, active)], LOCAL)
    return recvs, outs


@pytest.mark.parametrize("use_fp8, hook", [(False, False), (False, True), (True, False)])
def test_four_ranks_match_the_reference(tmp_path, use_fp8, hook):
    path = str(tmp_path / "ep.shm")
    create_shm_file(path, NUM_RANKS, 4, Buffer.get_ep_buffer_size_hint(M, HIDDEN, NUM_RANKS, NUM_EXPERTS, use_fp8=use_fp8))
    xs, ids, ws, weights = _inputs(1 + use_fp8 + 2 * hook)
    results = {}
    threads = [threading.Thread(target=_run_rank, args=(path, r, xs[r], ids[r], ws[r], weights,
                                                         torch.ones(NUM_RANKS, dtype=torch.int32), results),
                                kwargs={"use_fp8": use_fp8, "hook": hook}) for r in range(NUM_RANKS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert len(results) == NUM_RANKS
    recvs, outs = _reference(xs, ids, ws, weights, [True] * NUM_RANKS)
    for rank in range(NUM_RANKS):
        recv, count, out, active = results[rank]
        ref = recvs[rank]
        assert torch.equal(count, ref.count.sum(1))
        flat = ref.x.view(LOCAL, NUM_RANKS * M, HIDDEN)
        if use_fp8:
            torch.testing.assert_close(recv.float(), flat.float(), rtol=0.07, atol=0.02)
        else:
            assert torch.equal(recv, flat)
        if use_fp8:  # e4m3 keeps 3 mantissa bits: compare by relative norm, as METHOD.md does
            if outs[rank].numel():
                assert float((out.float() - outs[rank].float()).norm() / outs[rank].float().norm()) < 0.06
        else:
            torch.testing.assert_close(out.float(), outs[rank].float(), rtol=1e-2, atol=1e-2)
        assert active.tolist() == [1] * NUM_RANKS


def _process_rank(path, rank, seed, queue, dead_rank, ready):
    if rank == dead_rank:
        os.kill(os.getpid(), signal.SIGKILL)  # dies before sending anything
    xs, ids, ws, weights = _inputs(seed)
    ready.wait(timeout=120)  # survivors start the step together: only the dead rank may miss the deadline
    results = {}
    active = torch.ones(NUM_RANKS, dtype=torch.int32)
    _run_rank(path, rank, xs[rank], ids[rank], ws[rank], weights, active, results)
    recv, count, out, active = results[rank]
    queue.put((rank, out.float().numpy(), active.tolist()))  # plain data: torch would share an fd


def test_sigkilled_rank_is_cleared_in_place_and_survivors_match_the_reference(tmp_path):
    path = str(tmp_path / "ep.shm")
    create_shm_file(path, NUM_RANKS, 4, Buffer.get_ep_buffer_size_hint(M, HIDDEN, NUM_RANKS, NUM_EXPERTS))
    dead = 2
    got = run_ranks_one_sigkilled(_process_rank, path, NUM_RANKS, 7, dead)
    xs, ids, ws, weights = _inputs(7)
    survivors = [r != dead for r in range(NUM_RANKS)]
    _, outs = _reference(xs, ids, ws, weights, survivors)
    for rank, (out, active) in got.items():
        assert active == [int(a) for a in survivors]  # evidence written into the caller's tensor
        torch.testing.assert_close(out.float(), outs[rank].float(), rtol=1e-2, atol=1e-2)


def test_bad_input_names_the_problem(tmp_path):
    path = str(tmp_path / "ep.shm")
    create_shm_file(path, NUM_RANKS, 4, 4096)
    buf = Buffer(0, NUM_RANKS, transport=SharedMemoryTransport(path, 0))
    active = torch.ones(NUM_RANKS, dtype=torch.int32)
    x = torch.randn(4, HIDDEN)
    with pytest.raises(ValueError, match="more than num_max_dispatch_tokens_per_rank"):
        buf.dispatch(x, torch.zeros(4, 2, dtype=torch.long), active, 2, NUM_EXPERTS, 1000)
    with pytest.raises(ValueError, match="outside"):
        buf.dispatch(x, torch.full((4, 2), NUM_EXPERTS), active, M, NUM_EXPERTS, 1000)
    with pytest.raises(ValueError, match="hidden % 128"):
        buf.dispatch(torch.randn(4, 64), torch.zeros(4, 2, dtype=torch.long), active, M, NUM_EXPERTS, 1000)
    with pytest.raises(ValueError, match="transport is for rank 0"):
        Buffer(1, NUM_RANKS, transport=SharedMemoryTransport(path, 0))
