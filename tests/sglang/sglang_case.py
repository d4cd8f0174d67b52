"""Shared inputs and the reference for the SGLang group (imported by tests and worker processes).

Every import of SGLang goes through here, after the CPU shims, so a ``forkserver`` that preloads this
module pays SGLang's import once for all worker processes.
"""

from __future__ import annotations

import importlib.util

import torch

SKIP_REASON = ("sglang is not installed in this environment: the SGLang group runs in its own venv "
               "(make test-sglang; set-up: tests/sglang/setup_env.sh)")


def _has_sglang() -> bool:
    # A namespace-package hit is this very test folder (tests/ is on sys.path), not SGLang.
    spec = importlib.util.find_spec("sglang")
    return spec is not None and spec.origin not in (None, "namespace")


HAS_SGLANG = _has_sglang()

if HAS_SGLANG:
    import cpu_shims

    cpu_shims.install()
    from sglang.srt.elastic_ep.elastic_ep import ElasticEPStateManager  # noqa: F401
    from sglang.srt.layers.moe.token_dispatcher import DeepEPLLCombineInput  # noqa: F401
    from sglang.srt.layers.moe.topk import StandardTopKOutput  # noqa: F401

    import eep.integrations.sglang.dispatcher  # noqa: F401

from eep.fp8 import dequantize_rows
from eep.reference import combine as ref_combine
from eep.reference import dispatch as ref_dispatch
from eep.reference import swiglu

NUM_RANKS, LOCAL, HIDDEN, TOP_K, M, INTER = 4, 3, 128, 4, 8, 16
NUM_EXPERTS = NUM_RANKS * LOCAL  # physical experts: SGLang has already mapped logical ids to these
TOKENS_PER_RANK = (5, 0, 8, 3)  # a rank with no tokens, a full one


def make_inputs(seed: int) -> tuple[list, list, list, tuple]:
    """Per rank ``x [n, HIDDEN]`` bf16, physical ``topk_ids [n, TOP_K]``, ``topk_weights``; expert weights."""
    gen = torch.Generator().manual_seed(seed)
    xs, ids, ws = [], [], []
    for n in TOKENS_PER_RANK:
        xs.append(torch.randn(n, HIDDEN, generator=gen).to(torch.bfloat16))
        ids.append(torch.rand(n, NUM_EXPERTS, generator=gen).argsort(-1)[:, :TOP_K])
        ws.append(torch.rand(n, TOP_K, generator=gen))
    w_gate = torch.randn(NUM_EXPERTS, INTER, HIDDEN, generator=gen) / HIDDEN ** 0.5
    w_up = torch.randn(NUM_EXPERTS, INTER, HIDDEN, generator=gen) / HIDDEN ** 0.5
    w_down = torch.randn(NUM_EXPERTS, HIDDEN, INTER, generator=gen) / INTER ** 0.5
    return xs, ids, ws, (w_gate.bfloat16(), w_up.bfloat16(), w_down.bfloat16())


def expert_outputs(hidden_states: torch.Tensor, scales: torch.Tensor | None, rank: int, weights) -> torch.Tensor:
    """What SGLang's low-latency MoE runner would return: ``[LOCAL, NUM_RANKS * M, HIDDEN]`` bf16."""
    x = dequantize_rows(hidden_states, scales).bfloat16() if scales is not None else hidden_states
    y = torch.zeros(x.shape, dtype=torch.bfloat16)
    for i in range(LOCAL):
        e = rank * LOCAL + i
        y[i] = swiglu(x[i], weights[0][e], weights[1][e], weights[2][e])
    return y


def run_step(dispatcher, x, topk_ids, topk_weights, rank: int, weights) -> tuple:
    """One MoE step the way SGLang's models drive it: dispatch_a/b, experts, combine_a/b."""
    dispatcher.dispatch_a(hidden_states=x, topk_output=StandardTopKOutput(topk_weights, topk_ids, None))
    out = dispatcher.dispatch_b()
    y = expert_outputs(out.hidden_states, out.hidden_states_scale, rank, weights)
    dispatcher.combine_a(DeepEPLLCombineInput(y, out.topk_ids, out.topk_weights))
    return out, dispatcher.combine_b()


def reference_outputs(xs, ids, ws, weights, active: list[bool]) -> list:
    """eep.reference's combined output per rank (None for inactive ranks)."""
    recvs, handles = ref_dispatch([x if a else None for x, a in zip(xs, active)],
                                  [i if a else None for i, a in zip(ids, active)], active, LOCAL, M)
    ys = [None if r is None else
          torch.stack([torch.stack([swiglu(r.x[i, s], weights[0][rk * LOCAL + i], weights[1][rk * LOCAL + i],
                                           weights[2][rk * LOCAL + i]) for s in range(NUM_RANKS)])
                       for i in range(LOCAL)])
          for rk, r in enumerate(recvs)]
    return ref_combine(ys, handles, [w if a else None for w, a in zip(ws, active)], LOCAL)


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    if ref.numel() == 0:
        return 0.0
    return float((out.float() - ref.float()).norm() / ref.float().norm().clamp(min=1e-6))


class StubGroup:
    """Stands in for the EP process group: the dispatcher only asks its rank and size."""

    def __init__(self, rank: int, size: int):
        self._rank, self._size = rank, size

    def rank(self) -> int:
        return self._rank

    def size(self) -> int:
        return self._size


def make_dispatcher(rank: int, buffer, *, use_fp8: bool, timeout_us: int = 5_000_000, return_recv_hook: bool = True):
    from eep.integrations.sglang.dispatcher import EepDispatcher
    from sglang.srt.layers.moe.utils import DeepEPMode

    return EepDispatcher(StubGroup(rank, NUM_RANKS), TOP_K, permute_fusion=True, num_experts=NUM_EXPERTS,
                         num_local_experts=LOCAL, hidden_size=HIDDEN, params_dtype=torch.bfloat16,
                         deepep_mode=DeepEPMode.LOW_LATENCY, async_finish=True, return_recv_hook=return_recv_hook,
                         buffer=buffer, use_fp8=use_fp8, timeout_us=timeout_us, warmup_timeout_us=timeout_us,
                         num_max_dispatch_tokens_per_rank=M)


def rank_worker(path: str, rank: int, seeds: list[int], dead_rank: int, queue, barrier, use_fp8: bool) -> None:
    """One SGLang EP rank in its own process, with SGLang's real ElasticEPStateManager."""
    import os
    import signal

    if rank == dead_rank:
        os.kill(os.getpid(), signal.SIGKILL)  # dies before sending anything
    torch.set_num_threads(1)
    from eep.integrations.buffer import Buffer
    from eep.transport.shm import SharedMemoryTransport

    state = ElasticEPStateManager._build_state(ep_size=NUM_RANKS, device=torch.device("cpu"))
    state.effective_ep_size = state.original_ep_size = NUM_RANKS
    ElasticEPStateManager._instance = state
    mask, mask_ptr = state.active_ranks, state.active_ranks.data_ptr()
    dispatcher = make_dispatcher(rank, Buffer(rank, NUM_RANKS, transport=SharedMemoryTransport(path, rank)),
                                 use_fp8=use_fp8)
    barrier.wait(timeout=120)  # survivors start together: the deadline then measures the step, not start-up
    outputs = []
    for seed in seeds:
        xs, ids, ws, weights = make_inputs(seed)
        _, combined = run_step(dispatcher, xs[rank], ids[rank], ws[rank], rank, weights)
        outputs.append(combined.float().numpy())
    same = ElasticEPStateManager.instance().active_ranks is mask and mask.data_ptr() == mask_ptr
    queue.put((rank, outputs, mask.tolist(), same, dispatcher.active_ranks() is mask))
