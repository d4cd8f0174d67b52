"""NaN / inf router input is refused with a RoutingError naming the token rows, before anything
is computed or sent, on every path that takes routing input (eep.routing.finite)."""

import pytest
import torch

from eep import RoutingError
from eep.integrations.buffer import Buffer
from eep.mlp import dense_moe
from eep.reference import ExpertParallelMoE
from eep.routing import NonFiniteRows, check_finite_rows, select_experts
from eep.transport.shm import SharedMemoryTransport, create_shm_file

E, I, H, K = 8, 16, 32, 2


def _layer(seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    w = (torch.randn(E, I, H, generator=gen) / H ** 0.5, torch.randn(E, I, H, generator=gen) / H ** 0.5,
         torch.randn(E, H, I, generator=gen) / I ** 0.5)
    return w, torch.randn(12, H, generator=gen), torch.randn(12, E, generator=gen)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_select_experts_names_the_rows(bad):
    _, _, logits = _layer()
    logits[3, 1] = bad
    logits[7, 0] = bad
    with pytest.raises(RoutingError, match=r"router_logits holds NaN or inf in 2 token row\(s\): \[3, 7\]"):
        select_experts(logits, K)


def test_dense_moe_refuses_nan_logits_and_nan_weights():
    w, x, logits = _layer(1)
    bad = logits.clone()
    bad[5] = float("nan")
    with pytest.raises(RoutingError, match=r"\[5\]"):
        dense_moe(x, *w, router_logits=bad, top_k=K)
    weights, ids = select_experts(logits, K)
    weights[9, 0] = float("nan")
    with pytest.raises(RoutingError, match=r"topk_weights holds NaN or inf in 1 token row\(s\): \[9\]"):
        dense_moe(x, *w, topk_ids=ids, topk_weights=weights)


def test_reference_refuses_nan_logits_and_serves_the_next_call_unchanged():
    w, x, logits = _layer(2)
    moe = ExpertParallelMoE(*w, num_ranks=4, slots_per_rank=4, top_k=K, num_redundant=4)
    expected = moe(x, logits)
    bad = logits.clone()
    bad[0, 0] = float("inf")
    with pytest.raises(RoutingError, match=r"token row\(s\): \[0\]"):
        moe(x, bad)
    torch.testing.assert_close(moe(x, logits), expected, rtol=0, atol=0)  # nothing was left half done
    assert torch.isfinite(expected).all()


def test_buffer_refuses_nan_rows_before_sending(tmp_path):
    path = str(tmp_path / "ep.shm")
    num_ranks, local = 2, 2
    create_shm_file(path, num_ranks, 2, 1 << 16)
    buf = Buffer(0, num_ranks, transport=SharedMemoryTransport(path, 0))
    active = torch.ones(num_ranks, dtype=torch.int32)
    x = torch.randn(4, 128)
    ids = torch.tensor([[0, 1], [1, 2], [2, 3], [3, 0]])
    x_bad = x.clone()
    x_bad[2, 5] = float("nan")
    with pytest.raises(RoutingError, match=r"dispatch x holds NaN or inf in 1 token row\(s\): \[2\]"):
        buf.dispatch(x_bad, ids, active, 4, num_ranks * local, 1000, use_fp8=False)
    w = torch.rand(4, 2)
    w[1, 1] = float("inf")
    with pytest.raises(RoutingError, match=r"topk_weights holds NaN or inf in 1 token row\(s\): \[1\]"):
        buf.prefill_dispatch(x, ids, w, active, num_ranks * local, 1000)
    with pytest.raises(RoutingError, match=r"\[1\]"):
        buf.combine(torch.zeros(local, num_ranks * 4, 128), ids, w, active, 1000, handle=None)
    assert buf.step == 0 and active.tolist() == [1, 1]  # nothing sent, no step taken, no evidence written


def test_device_flag_counts_rows_and_names_the_first_then_clears():
    flag = NonFiniteRows("cpu")
    flag.raise_if_seen("topk_weights")  # nothing recorded: no error
    good = torch.rand(6, K)
    flag.record(good)
    flag.record(torch.rand(0, K))  # a rank with no tokens this step
    flag.raise_if_seen("topk_weights")
    bad = good.clone()
    bad[4, 0] = float("nan")
    bad[5, 1] = float("inf")
    flag.record(good)
    flag.record(bad)
    flag.record(bad)  # a later step's rows add up; the first row seen is kept
    with pytest.raises(RoutingError, match=r"4 token row\(s\) since the last check, the first in row 4"):
        flag.raise_if_seen("topk_weights")
    flag.raise_if_seen("topk_weights")  # cleared: raised once


def test_check_finite_rows_lists_at_most_eight_rows_and_skips_integer_tensors():
    t = torch.rand(20, 4)
    t[::2, 1] = float("nan")
    with pytest.raises(RoutingError, match=r"10 token row\(s\): \[0, 2, 4, 6, 8, 10, 12, 14, \.\.\.\]"):
        check_finite_rows(t, "router_logits")
    check_finite_rows(torch.arange(6).view(3, 2), "topk_ids")  # integer tensors cannot hold NaN


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_device_flag_records_inside_a_cuda_graph_without_waiting(monkeypatch):
    monkeypatch.delenv("EEP_CHECK_DEVICE_INPUT", raising=False)
    dev = torch.device("cuda")
    weights = torch.rand(64, 8, device=dev)
    flag = NonFiniteRows(dev)
    check_finite_rows(weights, "topk_weights")  # a device tensor: not read back by default
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        flag.record(weights)  # warm-up outside the capture
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    flag.raise_if_seen("topk_weights")
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        flag.record(weights)
    weights[10, 3] = float("nan")
    weights[40, 0] = float("inf")
    graph.replay()
    graph.replay()
    torch.cuda.synchronize()
    with pytest.raises(RoutingError, match=r"4 token row\(s\) since the last check, the first in row 10"):
        flag.raise_if_seen("topk_weights")
    bad = weights.clone()
    check_finite_rows(bad, "router_logits")  # still not read back
    monkeypatch.setenv("EEP_CHECK_DEVICE_INPUT", "1")
    with pytest.raises(RoutingError, match=r"\[10, 40\]"):
        check_finite_rows(bad, "router_logits")
