"""``EepDispatcher``: SGLang's MoE token dispatcher backed by ``eep.Buffer``.

A drop-in for SGLang's ``MooncakeEPDispatcher``: the same constructor arguments (what
``MaybeTboDeepEPDispatcher`` passes), the same split methods and stage machine that SGLang's models
drive (``dispatch_a`` -> ``dispatch_b`` -> ``combine_a`` -> ``combine_b``, with two-batch overlap
running other work between the halves), and SGLang's own ``DeepEPLLDispatchOutput`` so its
low-latency MoE runners consume the result unchanged (normal mode, below, returns SGLang's
``DeepEPNormalDispatchOutput``):

    hidden_states        [num_local_experts, num_ranks * M, hidden]   float8_e4m3fn (use_fp8) or bf16
    hidden_states_scale  [num_local_experts, num_ranks * M, hidden // 128] float32, or None
    masked_m             [num_local_experts] int32, rows received per local expert
    expected_m           int, SGLang's expected rows per expert (the same formula as Mooncake's)
    topk_ids/topk_weights the caller's [num_tokens, top_k], passed back for the combine

Normal (prefill) mode — ``--deepep-mode normal``, or ``auto`` on a batch with extends, as SGLang's
``DeepEPDispatcher`` resolves it — goes through ``eep.Buffer.prefill_dispatch``/``prefill_combine``:
one copy of a token per destination rank; ``hidden_states [num_recv, hidden]`` bf16, ``topk_ids``
local expert ids (-1 elsewhere), ``topk_weights``, ``num_recv_tokens_per_expert``; the combine input
is the runner's per-row weighted sum, added per token across ranks.

``topk_ids`` arrive as *physical* expert ids: SGLang's top-k already mapped logical ids through its
expert-location maps, so this adapter sends each copy to ``rank = id // num_local_experts`` and never
routes again.

Membership: the mask passed to every dispatch/combine is SGLang's own
``ElasticEPStateManager.instance().active_ranks`` tensor (elastic EP on), so a peer that misses the
deadline is cleared *in that tensor* — the evidence SGLang's ``maybe_recover_ep_ranks`` reads.
Without elastic EP a private all-ones mask is kept (one tensor, reused, so evidence is not lost).

Non-finite router output (NaN/inf ``topk_weights``, from NaN router logits): refused before anything
is sent. Host tensors are checked at once (``RoutingError`` naming the token rows). On the GPU each
dispatch records non-finite rows in a device-side flag (``eep.routing.NonFiniteRows``: a few tensor
ops, captured with the step's graph, no wait for the device) and the host raises the same error
at the next eager ``dispatch_a``, naming the count and the first row (docs/integrations.md).

The process-wide buffer (``ep_buffer``) adopts that tensor as its membership's device mirror: the
fused GPU kernels read SGLang's mask at every launch, and a membership change is written into it in
place, so a CUDA graph captured around ``dispatch_a`` .. ``combine_b`` needs no recapture.
"""

from __future__ import annotations

import enum
from typing import Any

import torch
from sglang.srt.elastic_ep.elastic_ep import ElasticEPStateManager
from sglang.srt.eplb.expert_distribution import get_global_expert_distribution_recorder
from sglang.srt.layers.moe.token_dispatcher.base import BaseDispatcher, CombineInput, DispatchOutput
from sglang.srt.layers.dp_attention import get_is_extend_in_batch
from sglang.srt.layers.moe.token_dispatcher.deepep import DeepEPLLDispatchOutput, DeepEPNormalDispatchOutput
from sglang.srt.layers.moe.topk import TopKOutput
from sglang.srt.layers.moe.utils import DeepEPMode
from sglang.srt.utils import get_int_env_var

from eep.integrations.buffer import Buffer
from eep.integrations.sglang.ep_buffer import BufferSpec, EepEPBuffer
from eep.routing import NonFiniteRows, check_finite_rows

# SGLang's Mooncake knob, honoured so eep is a drop-in (same default, same variable).
NUM_MAX_DISPATCH_TOKENS_ENV = "SGLANG_MOONCAKE_EP_NUM_MAX_DISPATCH_TOKENS_PER_RANK"
DEFAULT_TIMEOUT_US = 10_000_000  # as Mooncake EP: 10 s, after the first (warm-up/capture) step


class Stage(enum.Enum):
    """Where a dispatcher is in its step; each split method moves it one edge forward."""

    INITIAL = "initial"
    AFTER_DISPATCH_A = "after_dispatch_a"
    AFTER_DISPATCH_B = "after_dispatch_b"
    AFTER_COMBINE_A = "after_combine_a"


class EepDispatcher(BaseDispatcher):
    """SGLang dispatcher over ``eep.Buffer`` (low-latency layout; see the module docstring).

    Parameters (first ten: as SGLang's ``MooncakeEPDispatcher``):
        group: the EP process group (its ``rank()`` is this process's rank slot).
        num_experts: physical experts (logical + redundant); ``num_local_experts`` of them per rank.
        deepep_mode: ``LOW_LATENCY``, ``NORMAL`` (prefill layout) or ``AUTO`` (normal on batches
            with extends, low-latency otherwise, as SGLang resolves it). Either way a rank's batch
            must fit ``num_max_dispatch_tokens_per_rank``.
        return_recv_hook: send in ``*_a``, receive in ``*_b`` (what SGLang passes: True).
    Keyword-only, eep's own:
        buffer: an ``eep.Buffer`` to use instead of the process-wide one (tests, custom launchers).
        use_fp8: FP8 dispatch with 128-wide scales (Mooncake always dispatches FP8); a quant
            config of ``{"dispatcher_output_dtype": "bf16"}`` (what SGLang sets for DeepEP) turns it off.
        timeout_us / warmup_timeout_us: deadline of each wait after / during the first step
            (-1: Mooncake's "no deadline" for warm-up and capture, bounded by the buffer's max wait).
        num_max_dispatch_tokens_per_rank: default from SGLang's Mooncake variable, else 128.
    """

    def __init__(self, group: Any, router_topk: int, permute_fusion: bool = False, num_experts: int = None,
                 num_local_experts: int = None, hidden_size: int = None, params_dtype: torch.dtype = None,
                 deepep_mode: DeepEPMode = DeepEPMode.AUTO, async_finish: bool = False,
                 return_recv_hook: bool = False, *, buffer: Buffer | None = None, use_fp8: bool = True,
                 timeout_us: int = DEFAULT_TIMEOUT_US, warmup_timeout_us: int = -1,
                 num_max_dispatch_tokens_per_rank: int | None = None):
        super().__init__()
        if num_experts is None or num_local_experts is None or hidden_size is None:
            raise ValueError(f"EepDispatcher needs num_experts, num_local_experts and hidden_size, got "
                             f"{num_experts}, {num_local_experts}, {hidden_size}")
        self.group = group
        self.router_topk = router_topk
        self.permute_fusion = permute_fusion
        self.num_experts = num_experts
        self.num_local_experts = num_local_experts
        self.hidden_size = hidden_size
        self.params_dtype = params_dtype
        self.deepep_mode = deepep_mode
        self.async_finish = async_finish
        self.return_recv_hook = return_recv_hook
        self.use_fp8 = use_fp8
        self.timeout_us = timeout_us
        self.warmup_timeout_us = warmup_timeout_us
        self.num_max_dispatch_tokens_per_rank = (
            num_max_dispatch_tokens_per_rank if num_max_dispatch_tokens_per_rank is not None
            else get_int_env_var(NUM_MAX_DISPATCH_TOKENS_ENV, 128))
        self._buffer = buffer
        self._own_active_ranks: torch.Tensor | None = None
        self._is_first_step = True
        self._handle = None
        self._stage = Stage.INITIAL
        self._dispatch_state: tuple | None = None
        self._combine_state: tuple | None = None
        self._normal = False  # the mode the running step resolved to
        self._nonfinite: NonFiniteRows | None = None  # device-side record of NaN/inf topk_weights rows

    # ---- SGLang's dispatcher interface ----
    def dispatch(self, hidden_states: torch.Tensor, topk_output: TopKOutput) -> DispatchOutput:
        self.dispatch_a(hidden_states, topk_output)
        return self.dispatch_b()

    def dispatch_a(self, hidden_states: torch.Tensor, topk_output: TopKOutput) -> None:
        """Send: ``hidden_states [num_tokens, hidden]``, ``topk_output.topk_ids [num_tokens, top_k]`` physical."""
        self._expect(Stage.INITIAL, "dispatch_a")
        topk_ids = topk_output.topk_ids.to(torch.int64)
        topk_weights = topk_output.topk_weights
        self._check_finite(topk_weights)
        active_ranks = self.active_ranks(hidden_states.device)
        if active_ranks.numel() * self.num_local_experts != self.num_experts:
            # e.g. --max-ep-size > --ep-size: SGLang's mask has reserved slots its expert layout lacks
            raise ValueError(f"SGLang's active_ranks has {active_ranks.numel()} rank slots x "
                             f"{self.num_local_experts} local experts != num_experts={self.num_experts}")
        buffer = self.get_buffer()
        mode = self.deepep_mode  # AUTO resolves per batch, as SGLang's DeepEPDispatcher does
        self._normal = (mode.resolve(get_is_extend_in_batch()) if mode == DeepEPMode.AUTO else mode) == DeepEPMode.NORMAL
        if self._normal:
            if hidden_states.shape[0] > self.num_max_dispatch_tokens_per_rank:
                raise ValueError(f"normal-mode dispatch of {hidden_states.shape[0]} tokens: more than "
                                 f"num_max_dispatch_tokens_per_rank={self.num_max_dispatch_tokens_per_rank} "
                                 f"(the buffer's capacity per rank; raise {NUM_MAX_DISPATCH_TOKENS_ENV})")
            self._dispatch_state = buffer.prefill_dispatch(hidden_states, topk_ids, topk_weights, active_ranks,
                                                           self.num_experts, self._current_timeout_us())
            self._stage = Stage.AFTER_DISPATCH_A
            return
        expected_m = (hidden_states.shape[0] * buffer.num_ranks * topk_ids.shape[1] + self.num_experts) \
            // self.num_experts  # Mooncake's estimate, kept so SGLang's grouped GEMM sizes the same
        recv_x, masked_m, self._handle, event, hook = buffer.dispatch(
            hidden_states, topk_ids, active_ranks, self.num_max_dispatch_tokens_per_rank, self.num_experts,
            self._current_timeout_us(), use_fp8=self._dispatch_fp8(), async_finish=not self.return_recv_hook,
            return_recv_hook=self.return_recv_hook)
        self._dispatch_state = (recv_x, topk_ids, topk_weights, masked_m, expected_m, event, hook)
        self._stage = Stage.AFTER_DISPATCH_A

    def dispatch_b(self) -> DeepEPLLDispatchOutput:
        """Receive; returns SGLang's ``DeepEPLLDispatchOutput`` (shapes in the module docstring)."""
        self._expect(Stage.AFTER_DISPATCH_A, "dispatch_b")
        if self._normal:
            recv_x, recv_ids, recv_weights, per_expert, self._handle, _ = self._dispatch_state
            self._dispatch_state, self._stage = None, Stage.AFTER_DISPATCH_B
            get_global_expert_distribution_recorder().on_deepep_dispatch_normal(
                per_expert, num_tokens_per_rank=None, num_tokens_per_rdma_rank=None, num_tokens_per_expert=None)
            return DeepEPNormalDispatchOutput(recv_x, None, recv_ids, recv_weights, per_expert)
        recv_x, topk_ids, topk_weights, masked_m, expected_m, event, hook = self._dispatch_state
        _finish(event, hook, self.return_recv_hook)
        self._dispatch_state, self._stage = None, Stage.AFTER_DISPATCH_B
        get_global_expert_distribution_recorder().on_deepep_dispatch_low_latency(masked_m)
        hidden_states, scales = recv_x if isinstance(recv_x, tuple) else (recv_x, None)
        return DeepEPLLDispatchOutput(hidden_states, scales, topk_ids, topk_weights, masked_m, expected_m)

    def combine(self, combine_input: CombineInput) -> torch.Tensor:
        self.combine_a(combine_input)
        return self.combine_b()

    def combine_a(self, combine_input: CombineInput) -> None:
        """Send expert outputs back: ``combine_input`` is SGLang's ``DeepEPLLCombineInput``
        ``(hidden_states [num_local_experts, num_ranks * M, hidden], topk_ids, topk_weights)``."""
        hidden_states, topk_ids, topk_weights = combine_input
        self._expect(Stage.AFTER_DISPATCH_B, "combine_a")
        if self._normal:  # DeepEPNormalCombineInput: the runner's per-row weighted sums
            combined, event = self.get_buffer().prefill_combine(hidden_states, self._handle, self.active_ranks(),
                                                                 self._current_timeout_us())
            self._is_first_step, self._handle = False, None
            self._combine_state = (combined, event, lambda: None)
            self._stage = Stage.AFTER_COMBINE_A
            return
        combined, event, hook = self.get_buffer().combine(
            hidden_states, topk_ids, topk_weights, self.active_ranks(), self._current_timeout_us(), self._handle,
            async_finish=not self.return_recv_hook, return_recv_hook=self.return_recv_hook)
        self._is_first_step = False
        self._handle = None
        self._combine_state = (combined, event, hook)
        self._stage = Stage.AFTER_COMBINE_A

    def combine_b(self) -> torch.Tensor:
        """Receive and sum; returns ``[num_tokens, hidden]``."""
        self._expect(Stage.AFTER_COMBINE_A, "combine_b")
        combined, event, hook = self._combine_state
        if not self._normal:
            _finish(event, hook, self.return_recv_hook)
        self._combine_state, self._stage = None, Stage.INITIAL
        return combined

    # ---- membership ----
    def active_ranks(self, device: torch.device | None = None) -> torch.Tensor:
        """SGLang's ``active_ranks`` (int32 ``[num_ranks]``) itself, never a copy: evidence lands there.

        Without elastic EP: a private all-ones mask, made once on ``device`` (the activations'; default
        the current CUDA device when there is one) and reused, so evidence is not lost."""
        state = ElasticEPStateManager.instance()
        if state is not None and state.active_ranks is not None:
            return state.active_ranks
        if self._own_active_ranks is None:
            if device is None:
                device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else "cpu"
            self._own_active_ranks = torch.ones(self.group.size(), dtype=torch.int32, device=device)
        return self._own_active_ranks

    def get_buffer(self) -> Buffer:
        """The process-wide ``eep.Buffer`` (``ep_buffer.make_buffer``), made at the first call: the first
        dispatch, or earlier where a process must publish its buffers first (a rejoining rank, before
        SGLang's member refresh lets the survivors map them), once SGLang's quant method has set the
        dispatcher's quant config (it decides FP8 or bf16 rows, which every rank must agree on)."""
        if self._buffer is not None:
            return self._buffer
        active_ranks = self.active_ranks()
        spec = BufferSpec(num_ranks=active_ranks.numel(), hidden_size=self.hidden_size,
                          num_max_dispatch_tokens_per_rank=self.num_max_dispatch_tokens_per_rank,
                          num_experts=self.num_experts, use_fp8=self._dispatch_fp8(), top_k=self.router_topk,
                          low_latency=self.deepep_mode.enable_low_latency(), normal=self.deepep_mode.enable_normal(),
                          dtype=self.params_dtype or torch.bfloat16)
        return EepEPBuffer.get_ep_buffer(self.group, spec, active_ranks)

    # ---- internals ----
    def _check_finite(self, topk_weights: torch.Tensor) -> None:
        """NaN/inf rows of ``topk_weights``: at once on the host, through a device flag on the GPU."""
        if topk_weights.device.type == "cpu":
            check_finite_rows(topk_weights, "topk_weights")
            return
        if self._nonfinite is None:
            self._nonfinite = NonFiniteRows(topk_weights.device)
        if not torch.cuda.is_current_stream_capturing():
            self._nonfinite.raise_if_seen("topk_weights")  # what earlier steps (and graph replays) recorded
        self._nonfinite.record(topk_weights)

    def _dispatch_fp8(self) -> bool:
        # SGLang's quant method asks DeepEP-style dispatchers for bf16 when its experts take bf16 input.
        return self.use_fp8 and self.quant_config.get("dispatcher_output_dtype") != "bf16"

    def _current_timeout_us(self) -> int:
        return self.warmup_timeout_us if self._is_first_step else self.timeout_us

    def _expect(self, expected: Stage, method: str) -> None:
        # The stage moves on only when a call succeeds, so a refused call can be retried.
        if self._stage != expected:
            raise RuntimeError(f"EepDispatcher.{method} called in stage {self._stage.name}, expected "
                               f"{expected.name}: SGLang drives dispatch_a, dispatch_b, combine_a, combine_b in order")


def _finish(event, hook, return_recv_hook: bool) -> None:
    """Second half of a split call: run the receive hook, or wait for the send's event."""
    if return_recv_hook:
        hook()
    else:
        event.current_stream_wait()
