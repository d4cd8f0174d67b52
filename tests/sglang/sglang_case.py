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
    import sglang_shims

    sglang_shims.install()
    from sglang.srt.elastic_ep.elastic_ep import ElasticEPStateManager  # noqa: F401
    from sglang.srt.layers.moe.token_dispatcher import DeepEPLLCombineInput  # noqa: F401
    from sglang.srt.layers.moe.topk import StandardTopKOutput  # noqa: F401

    import eep.integrations.sglang.dispatcher  # noqa: F401

from eep.fp8 import dequantize_rows
from eep_test_utils import StubGroup  # noqa: F401 (the tests take it from here)
from eep.reference import combine as ref_combine
from eep.reference import dispatch as ref_dispatch
from eep.reference import swiglu

NUM_RANKS, LOCAL, HIDDEN, TOP_K, M, INTER = 4, 3, 128, 4, 8, 16
NUM_EXPERTS = NUM_RANKS * LOCAL  # physical experts: SGLang has already mapped logical ids to these
TOKENS_PER_RANK = (5, 0, 8, 3)  # a rank with no tokens, a full one


def make_inputs(seed: int, *, tokens=TOKENS_PER_RANK, hidden: int = HIDDEN, local: int = LOCAL, top_k: int = TOP_K,
                inter: int = INTER) -> tuple[list, list, list, tuple]:
    """Per rank ``x [n, hidden]`` bf16 (``n = tokens[rank]``), physical ``topk_ids [n, top_k]`` (distinct
    experts), ``topk_weights``; expert weights ``[num_experts, ...]`` bf16, all fresh from ``seed``."""
    gen = torch.Generator().manual_seed(seed)
    num_experts = len(tokens) * local
    xs, ids, ws = [], [], []
    for n in tokens:
        xs.append(torch.randn(n, hidden, generator=gen).to(torch.bfloat16))
        ids.append(torch.rand(n, num_experts, generator=gen).argsort(-1)[:, :top_k])
        ws.append(torch.rand(n, top_k, generator=gen))
    w_gate = torch.randn(num_experts, inter, hidden, generator=gen) / hidden ** 0.5
    w_up = torch.randn(num_experts, inter, hidden, generator=gen) / hidden ** 0.5
    w_down = torch.randn(num_experts, hidden, inter, generator=gen) / inter ** 0.5
    return xs, ids, ws, (w_gate.bfloat16(), w_up.bfloat16(), w_down.bfloat16())


def expert_outputs(hidden_states: torch.Tensor, scales: torch.Tensor | None, rank: int, weights) -> torch.Tensor:
    """What SGLang's low-latency MoE runner would return: ``[local, num_ranks * M, hidden]`` bf16, on the
    inputs' device (no host sync: a CUDA graph can capture it)."""
    x = dequantize_rows(hidden_states, scales).bfloat16() if scales is not None else hidden_states
    y = torch.zeros(x.shape, dtype=torch.bfloat16, device=x.device)
    local = x.shape[0]
    for i in range(local):
        e = rank * local + i
        y[i] = swiglu(x[i], weights[0][e], weights[1][e], weights[2][e])
    return y


def run_step(dispatcher, x, topk_ids, topk_weights, rank: int, weights) -> tuple:
    """One MoE step the way SGLang's models drive it: dispatch_a/b, experts, combine_a/b."""
    dispatcher.dispatch_a(hidden_states=x, topk_output=StandardTopKOutput(topk_weights, topk_ids, None))
    out = dispatcher.dispatch_b()
    y = expert_outputs(out.hidden_states, out.hidden_states_scale, rank, weights)
    dispatcher.combine_a(DeepEPLLCombineInput(y, out.topk_ids, out.topk_weights))
    return out, dispatcher.combine_b()


def run_normal_step(dispatcher, x, topk_ids, topk_weights, rank: int, weights) -> tuple:
    """One normal-mode (prefill) step: SGLang's ``DeepEPNormalDispatchOutput`` in, the runner's
    per-row weighted sums (``prefill_partials``) out as ``DeepEPNormalCombineInput``."""
    from sglang.srt.layers.moe.token_dispatcher.deepep import DeepEPNormalCombineInput

    from eep_test_utils import prefill_partials

    dispatcher.dispatch_a(hidden_states=x, topk_output=StandardTopKOutput(topk_weights, topk_ids, None))
    out = dispatcher.dispatch_b()
    local = dispatcher.num_local_experts
    partial = prefill_partials(out.hidden_states, out.topk_ids, out.topk_weights, rank, local, weights)
    dispatcher.combine_a(DeepEPNormalCombineInput(partial, out.topk_ids, out.topk_weights))
    return out, dispatcher.combine_b()


def reference_outputs(xs, ids, ws, weights, active: list[bool], *, m: int = M) -> list:
    """eep.reference's combined output per rank (None for inactive ranks); ``m`` rows per (slot, source)."""
    num_ranks = len(active)
    local = weights[0].shape[0] // num_ranks
    recvs, handles = ref_dispatch([x if a else None for x, a in zip(xs, active)],
                                  [i if a else None for i, a in zip(ids, active)], active, local, m)
    ys = [None if r is None else
          torch.stack([torch.stack([swiglu(r.x[i, s], weights[0][rk * local + i], weights[1][rk * local + i],
                                           weights[2][rk * local + i]) for s in range(num_ranks)])
                       for i in range(local)])
          for rk, r in enumerate(recvs)]
    return ref_combine(ys, handles, [w if a else None for w, a in zip(ws, active)], local)


def tokens_for(ids: torch.Tensor, expert: int) -> torch.Tensor:
    """The source tokens that chose physical ``expert``, ascending (the order rows arrive in)."""
    return (ids == expert).any(1).nonzero().flatten()


def ll_output_errors(out, combined, rank: int, xs, ids, ws, weights, active: list[bool], *, use_fp8: bool,
                     m: int = M, tol: float | None = None) -> list[str]:
    """What must hold of one rank's low-latency step (SGLang's ``DeepEPLLDispatchOutput`` and the
    combined output) against the inputs of every rank; an empty list when all of it does.

    Rows: every active source's tokens for each local expert, in token order, exactly (bf16) or
    within FP8's rounding; rows of inactive sources are not looked at (their counts must be 0).
    ``tol``: relative error of the combined output against ``reference_outputs`` over ``active``."""
    from sglang.srt.layers.moe.token_dispatcher import DeepEPLLDispatchOutput, DispatchOutputChecker

    errors = []
    num_ranks, hidden = len(active), xs[rank].shape[1]
    local = weights[0].shape[0] // num_ranks
    num_experts, top_k = local * num_ranks, ids[rank].shape[1]
    if type(out) is not DeepEPLLDispatchOutput or not DispatchOutputChecker.format_is_deepep_ll(out):
        return [f"rank {rank}: dispatch_b returned {type(out).__name__}, not SGLang's DeepEPLLDispatchOutput"]
    x, scale = out.hidden_states, out.hidden_states_scale
    want_dtype = torch.float8_e4m3fn if use_fp8 else torch.bfloat16
    if tuple(x.shape) != (local, num_ranks * m, hidden) or x.dtype != want_dtype:
        errors.append(f"rank {rank}: hidden_states {tuple(x.shape)} {x.dtype}, expected "
                      f"{(local, num_ranks * m, hidden)} {want_dtype}")
        return errors
    if use_fp8 != (scale is not None) or (use_fp8 and (tuple(scale.shape) != (local, num_ranks * m, hidden // 128)
                                                       or scale.dtype != torch.float32)):
        errors.append(f"rank {rank}: hidden_states_scale is {None if scale is None else (tuple(scale.shape), scale.dtype)}")
        return errors
    counts = torch.stack([torch.bincount(i.flatten(), minlength=num_experts) if a else torch.zeros(num_experts,
                                                                                                   dtype=torch.int64)
                          for i, a in zip(ids, active)])
    mine = counts[:, rank * local:(rank + 1) * local]
    masked_m = out.masked_m.cpu()
    if masked_m.dtype != torch.int32 or masked_m.tolist() != mine.sum(0).tolist():
        errors.append(f"rank {rank}: masked_m {masked_m.tolist()} {masked_m.dtype}, expected {mine.sum(0).tolist()}")
    if out.expected_m != (xs[rank].shape[0] * num_ranks * top_k + num_experts) // num_experts:
        errors.append(f"rank {rank}: expected_m {out.expected_m} is not Mooncake's estimate")
    if not (torch.equal(out.topk_ids.cpu(), ids[rank]) and torch.equal(out.topk_weights.cpu(), ws[rank])):
        errors.append(f"rank {rank}: topk_ids / topk_weights are not the caller's")
    x, scale = x.cpu(), None if scale is None else scale.cpu()
    for i in range(local):
        for src in (s for s in range(num_ranks) if active[s]):
            tokens = tokens_for(ids[src], rank * local + i)
            rows = slice(src * m, src * m + len(tokens))
            want = xs[src][tokens]
            if use_fp8:
                got = dequantize_rows(x[i, rows], scale[i, rows])
                bad = relative_error(got, want) > 0.05
            else:
                got = x[i, rows]
                bad = not torch.equal(got, want)
            if bad:
                errors.append(f"rank {rank}: rows of local expert {i} from rank {src} differ from its tokens "
                              f"{tokens.tolist()[:8]}...")
    combined = combined.cpu()
    if tuple(combined.shape) != (xs[rank].shape[0], hidden) or combined.dtype != torch.bfloat16:
        errors.append(f"rank {rank}: combined {tuple(combined.shape)} {combined.dtype}")
    else:
        err = relative_error(combined, reference_outputs(xs, ids, ws, weights, active, m=m)[rank])
        if not err < (tol if tol is not None else 0.06 if use_fp8 else 0.01):
            errors.append(f"rank {rank}: combined output is {err:.3g} (relative) from eep.reference's")
    return errors


def normal_output_errors(out, combined, rank: int, xs, ids, ws, weights, active: list[bool], *,
                         tol: float = 0.01, refs: list | None = None) -> list[str]:
    """What must hold of one rank's normal-mode step (SGLang's ``DeepEPNormalDispatchOutput``): one row
    per (active source, token) with an expert here, grouped by source then token, exactly; local
    expert ids (-1 elsewhere) and their weights (0 elsewhere); per-expert counts; the combined output."""
    from sglang.srt.layers.moe.token_dispatcher.deepep import DeepEPNormalDispatchOutput

    num_ranks = len(active)
    local = weights[0].shape[0] // num_ranks
    if type(out) is not DeepEPNormalDispatchOutput or not out.format.is_deepep_normal():
        return [f"rank {rank}: dispatch_b returned {type(out).__name__}, not SGLang's DeepEPNormalDispatchOutput"]
    errors = []
    here = [((i // local) == rank).any(-1).nonzero().flatten() if a else torch.zeros(0, dtype=torch.int64)
            for i, a in zip(ids, active)]
    want_x = torch.cat([xs[s][t] for s, t in enumerate(here)])
    want_ids = torch.cat([torch.where(ids[s][t] // local == rank, ids[s][t] % local, -1) for s, t in enumerate(here)])
    want_w = torch.cat([torch.where(ids[s][t] // local == rank, ws[s][t], 0.0) for s, t in enumerate(here)])
    if out.hidden_states_scale is not None or not torch.equal(out.hidden_states.cpu(), want_x):
        errors.append(f"rank {rank}: normal-mode rows {tuple(out.hidden_states.shape)} are not the tokens with an "
                      f"expert here ({tuple(want_x.shape)}), grouped by source then token")
    if not torch.equal(out.topk_ids.cpu(), want_ids) or not torch.equal(out.topk_weights.cpu().float(), want_w):
        errors.append(f"rank {rank}: normal-mode topk_ids / topk_weights are not the local choices")
    counts = [int((want_ids == i).sum()) for i in range(local)]
    if list(out.num_recv_tokens_per_expert) != counts:
        errors.append(f"rank {rank}: num_recv_tokens_per_expert {out.num_recv_tokens_per_expert}, expected {counts}")
    refs = refs if refs is not None else reference_outputs(xs, ids, ws, weights, active,
                                                         m=max(1, *(len(x) for x in xs)))
    err = relative_error(combined.cpu(), refs[rank])
    if not err < tol:
        errors.append(f"rank {rank}: normal-mode combined output is {err:.3g} (relative) from eep.reference's")
    return errors


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    if ref.numel() == 0:
        return 0.0
    return float((out.float() - ref.float()).norm() / ref.float().norm().clamp(min=1e-6))


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
