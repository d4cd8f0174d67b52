"""``eep.Buffer``: the DeepEP / Mooncake-EP low-latency face over eep's transports.

Anyone who has called ``deep_ep.Buffer.low_latency_dispatch`` or Mooncake EP's
``Buffer.dispatch(x, topk_idx, active_ranks, ...)`` can call this the same way:

- ``topk_idx`` holds *physical* expert ids (``num_experts`` = ranks x local experts; expert ``e``
  lives on rank ``e // num_local_experts``), ``-1`` for "no expert";
- the receive layout is ``[num_local_experts, num_ranks * num_max_dispatch_tokens_per_rank,
  hidden]``: source rank ``s``'s tokens for local expert ``i`` occupy rows
  ``s*M .. s*M + count[i, s]`` in ascending source-token order (eep's reference layout
  ``[slots, ranks, M, hidden]`` viewed flat), with ``recv_count [num_local_experts]`` totals;
- ``active_ranks`` (int32 ``[num_ranks]``, 1 = active) is read to decide whom to wait for, and
  a rank that misses ``timeout_us`` is cleared in place (``active_ranks[r] = 0``): evidence for
  the control plane, never a hang. ``timeout_us=-1`` means "no kernel deadline" (warm-up and
  capture, as in Mooncake EP); eep still bounds it by ``max_wait_s`` (default 300 s) because no
  eep path may wait forever on a peer — a deliberate deviation, documented;
- FP8 dispatch (``use_fp8=True``) sends e4m3 values with one float32 scale per 128 channels per
  token and returns ``(x_fp8, scales [num_local_experts, num_ranks * M, hidden // 128])``;
- ``return_recv_hook=True`` sends only and returns a hook that receives (the tensors returned are
  filled when it runs); ``async_finish`` returns an ``EventOverlap`` (a no-op on the CPU).

The face is a thin adapter over the exchange seam (``eep.exchange.protocol``): it holds one
``DecodeExchange`` and one ``PrefillExchange`` and never asks which backend they are. Give them as
``decode=`` / ``prefill=`` (on the GPU: ``eep.fused.FusedBuffer`` / ``PrefillBuffer``; ``fused=`` is
``decode=``), or give ``transport=`` (an ``eep.transport.SharedMemoryTransport`` with 4 channels) and
the face builds the host shared-memory backends (``eep.exchange.shm``) from the first call's shapes.
Per call it does only what the seam cannot: the mask in (``active_ranks`` is written into the
exchange's membership mirror unless it is that tensor), the evidence out (suspects cleared in
``active_ranks``), and the views Mooncake's shapes need — device work only on the GPU, so a CUDA
graph can capture it. A send and its wait are one call of the seam, so ``return_recv_hook`` returns a
hook with nothing left to do. FP8 scales come per 128 channels (a backend with one scale per row
has it repeated to keep Mooncake's shape).

Each dispatch/combine pair is one step tagged ``(epoch, step)`` by the backend; ``update_ep_member``
moves every member to a new epoch (step 0), which is how a rejoining rank and the survivors agree on
the next tag without a collective.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from eep.errors import RoutingError
from eep.fp8 import BLOCK as FP8_BLOCK
from eep.exchange.layout import DispatchHandle, PackedHandle
from eep.exchange.protocol import DecodeExchange, PrefillExchange
from eep.state import Membership
from eep.routing import check_finite_rows
from eep.transport.base import Transport

DECODE_CHANNELS, PREFILL_CHANNELS = (0, 1), (2, 3)


class EventOverlap:
    """DeepEP's event wrapper; the seam's calls return when their work is enqueued (GPU) or done (CPU)."""

    def __init__(self, event=None, extra_tensors: tuple | None = None):
        self.event = event
        self.extra_tensors = extra_tensors

    def current_stream_wait(self) -> None:
        if self.event is not None:
            self.event.wait()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.current_stream_wait()


@dataclass
class EPHandle:
    """What ``combine`` needs from ``dispatch`` (opaque to callers, like DeepEP's handle tuple)."""

    num_max_dispatch_tokens_per_rank: int
    hidden: int
    num_experts: int
    inner: DispatchHandle


@dataclass
class PrefillHandle:
    """What ``prefill_combine`` needs from ``prefill_dispatch`` (opaque to callers)."""

    num_tokens: int
    hidden: int
    index: torch.Tensor  # [num_recv] row of each returned row in the packed receive layout
    inner: PackedHandle


class Buffer:
    """One rank's end of dispatch/combine over the exchange seam (see the module docstring).

    Parameters:
        rank, num_ranks: this rank slot and the number of rank slots.
        decode / fused: the ``DecodeExchange`` (``fused`` is the same argument under its GPU name).
        prefill: the ``PrefillExchange``.
        transport: instead of exchanges, a 4-channel host transport (decode on channels 0-1, prefill on 2-3).
        membership: the process's ``Membership`` for backends the face builds (default: the given
            exchanges', else a new one).
        max_wait_s: bound on every wait, also for ``timeout_us=-1`` ("no deadline" in Mooncake EP):
            no eep path waits forever on a peer.
    """

    def __init__(self, rank: int, num_ranks: int, *, decode: DecodeExchange | None = None, fused=None,
                 prefill: PrefillExchange | None = None, transport: Transport | None = None,
                 membership: Membership | None = None, max_wait_s: float = 300.0):
        decode = decode if decode is not None else fused
        if (transport is None) == (decode is None and prefill is None):
            raise ValueError("eep.Buffer needs exactly one backend: exchanges (decode= / fused= / prefill=) or a transport=")
        for name, ex in (("decode", decode), ("prefill", prefill), ("transport", transport)):
            if ex is not None and (ex.rank, ex.num_ranks) != (rank, num_ranks):
                raise ValueError(f"{name} is for rank {ex.rank} of {ex.num_ranks}, "
                                 f"not rank {rank} of {num_ranks}")
        self.rank, self.num_ranks = rank, num_ranks
        self.decode, self.prefill, self.transport = decode, prefill, transport
        given = decode if decode is not None else prefill
        self.membership = membership or (given.membership if given is not None else Membership(num_ranks))
        self.max_wait_s = max_wait_s
        self.missed_peers: list[tuple[int, int]] = []  # (epoch, rank): evidence the face saw, for the runtime

    # ---- sizing ----
    @staticmethod
    def get_ep_buffer_size_hint(num_max_dispatch_tokens_per_rank: int, hidden: int, num_ranks: int,
                                num_experts: int, *, use_fp8: bool = False, elem_nbytes: int = 2) -> int:
        """Bytes one region of the host transport needs for decode messages."""
        from eep.exchange.shm import ShmExchange
        return ShmExchange.capacity_nbytes(num_experts // num_ranks, num_max_dispatch_tokens_per_rank, hidden,
                                           elem_nbytes=elem_nbytes, use_fp8=use_fp8)

    @staticmethod
    def get_prefill_buffer_size_hint(num_max_tokens_per_rank: int, hidden: int, top_k: int, *,
                                     elem_nbytes: int = 2) -> int:
        """Bytes one region of the host transport needs for ``prefill_dispatch``/``prefill_combine``."""
        from eep.exchange.shm import ShmPrefillExchange
        return ShmPrefillExchange.capacity_nbytes(num_max_tokens_per_rank, hidden, top_k, elem_nbytes=elem_nbytes)

    # ---- membership ----
    @property
    def epoch(self) -> int:
        return self.membership.epoch

    @property
    def step(self) -> int:
        """Messages exchanged in this epoch by the decode backend (0 before the first dispatch)."""
        return 0 if self.decode is None else self.decode.status().step

    def update_ep_member(self, *, epoch: int | None = None, joined: list[int] = ()) -> None:
        """A membership change (ranks rejoined): every member moves to ``epoch`` at step 0.

        ``joined`` ranks are connected first (on the GPU: their new buffers mapped into the peer
        table, one table write each), then every backend adopts the mask it waits by (the current
        one, evidence included) plus ``joined``, and forgets earlier suspicions.
        """
        new_epoch = self.membership.epoch + 1 if epoch is None else int(epoch)
        mask = self.membership.active_device.cpu().bool()
        mask[list(joined)] = True
        new = Membership(self.num_ranks, active=mask.tolist(), epoch=new_epoch)
        for exchange in self._exchanges():
            if joined:
                exchange.connect([r for r in joined if r != self.rank], timeout_s=self.max_wait_s)
            exchange.set_membership(new)
        if not self._exchanges():
            self.membership.copy_from(new)

    # ---- decode ----
    def dispatch(self, x: torch.Tensor, topk_idx: torch.Tensor, active_ranks: torch.Tensor,
                 num_max_dispatch_tokens_per_rank: int, num_experts: int, timeout_us: int,
                 use_fp8: bool = True, async_finish: bool = False, return_recv_hook: bool = False):
        """Send each token to the ranks hosting its experts; receive this rank's share.

        Returns ``(recv_x, recv_count, handle, event, hook)`` with ``recv_x`` either
        ``[num_local_experts, num_ranks * M, hidden]`` in ``x.dtype`` or, with ``use_fp8``,
        ``(x_fp8, scales [num_local_experts, num_ranks * M, hidden // 128])``; ``recv_count`` int32
        ``[num_local_experts]``.
        """
        check_finite_rows(x, "dispatch x")  # NaN/inf rows named here (host tensors; eep.routing.finite)
        m = num_max_dispatch_tokens_per_rank
        local = self._check_dispatch(x, topk_idx, active_ranks, m, num_experts, use_fp8)
        exchange = self._decode_exchange(m, local, x.shape[1], x.dtype, use_fp8)
        self._mask_in(exchange, active_ranks, timeout_us)
        recv, inner = exchange.dispatch(x.contiguous(), topk_idx.to(torch.int64).contiguous())
        self._evidence_out(exchange, active_ranks)
        rows = self.num_ranks * m
        flat = recv.x.reshape(local, rows, x.shape[1])
        if use_fp8:
            blocks = x.shape[1] // FP8_BLOCK
            scale = recv.scale.reshape(local, rows, -1)
            flat = (flat, scale.expand(-1, -1, blocks).contiguous() if scale.shape[-1] == 1 else scale)
        recv_count = recv.count.sum(1, dtype=torch.int32)
        handle = EPHandle(m, x.shape[1], num_experts, inner)
        return flat, recv_count, handle, EventOverlap(), _done

    def combine(self, x: torch.Tensor, topk_idx: torch.Tensor, topk_weights: torch.Tensor,
                active_ranks: torch.Tensor, timeout_us: int, handle: EPHandle, zero_copy: bool = False,
                async_finish: bool = False, return_recv_hook: bool = False, out: torch.Tensor | None = None):
        """Return expert outputs to their sources and sum them with ``topk_weights``.

        ``x`` is ``[num_local_experts, num_ranks * M, hidden]`` in the receive layout. Returns
        ``(combined_x [num_tokens, hidden], event, hook)``; contributions of ranks that missed the
        deadline are absent (and cleared in ``active_ranks``).
        """
        check_finite_rows(topk_weights, "topk_weights")  # NaN/inf rows named here (eep.routing.finite)
        m, local = handle.num_max_dispatch_tokens_per_rank, handle.num_experts // self.num_ranks
        if tuple(x.shape) != (local, self.num_ranks * m, handle.hidden):
            raise RoutingError(f"combine x has shape {tuple(x.shape)}, expected "
                               f"{(local, self.num_ranks * m, handle.hidden)} (the dispatch receive layout)")
        if tuple(topk_weights.shape) != tuple(topk_idx.shape):
            raise RoutingError(f"topk_weights has shape {tuple(topk_weights.shape)}, topk_idx {tuple(topk_idx.shape)}")
        exchange = self.decode
        self._mask_in(exchange, active_ranks, timeout_us)
        y = x.reshape(local, self.num_ranks, m, handle.hidden).contiguous()
        combined = exchange.combine(y, handle.inner, topk_weights.float().contiguous(), out=out)
        self._evidence_out(exchange, active_ranks)
        return combined, EventOverlap(), _done

    # ---- prefill (DeepEP's "normal" mode): one copy of a token per destination rank ----
    def prefill_dispatch(self, x: torch.Tensor, topk_idx: torch.Tensor, topk_weights: torch.Tensor,
                         active_ranks: torch.Tensor, num_experts: int, timeout_us: int):
        """Send each token once to every rank hosting one of its experts (``eep.reference.prefill``).

        ``topk_idx`` holds physical expert ids (expert ``e`` on rank ``e // num_local_experts``), -1
        for none. Returns ``(recv_x, recv_topk_idx, recv_topk_weights, num_recv_tokens_per_expert,
        handle, event)`` as DeepEP's normal-mode dispatch does: ``recv_x [num_recv, hidden]`` grouped
        by source rank, then source token; ``recv_topk_idx [num_recv, top_k]`` int64 local expert
        ids, -1 where the choice lives on another rank; ``recv_topk_weights`` float32 (0 there);
        ``num_recv_tokens_per_expert`` a list of entries per local expert. A rank that misses the
        deadline is cleared in ``active_ranks`` and sends nothing.
        """
        check_finite_rows(topk_weights, "topk_weights")  # NaN/inf rows named here (eep.routing.finite)
        check_finite_rows(x, "prefill_dispatch x")
        local = self._check_prefill(x, topk_idx, topk_weights, active_ranks, num_experts)
        exchange = self._prefill_exchange(local, x, topk_idx.shape[1])
        self._mask_in(exchange, active_ranks, timeout_us)
        recv, inner = exchange.dispatch(x.contiguous(), topk_idx.to(torch.int64).contiguous(),
                                        topk_weights.float().contiguous())
        self._evidence_out(exchange, active_ranks)
        R, M, K = recv.local_slot.shape
        counts = recv.count.tolist()  # the packed view needs the counts on the host, as DeepEP's does
        index = torch.cat([torch.arange(n, device=x.device) + s * M for s, n in enumerate(counts)])
        recv_x = recv.x.reshape(R * M, -1)[index]
        recv_idx = recv.local_slot.reshape(R * M, K)[index].long()
        recv_w = torch.where(recv_idx >= 0, recv.weight.reshape(R * M, K)[index], 0.0)
        per_expert = torch.bincount(recv_idx[recv_idx >= 0], minlength=local).tolist()
        handle = PrefillHandle(x.shape[0], x.shape[1], index, inner)
        return recv_x, recv_idx, recv_w, per_expert, handle, EventOverlap()

    def prefill_combine(self, x: torch.Tensor, handle: PrefillHandle, active_ranks: torch.Tensor,
                        timeout_us: int, out: torch.Tensor | None = None):
        """Send each received row's partial sum home and add them per token.

        ``x [num_recv, hidden]``: for every row of ``prefill_dispatch``, the caller's sum of its local
        experts' outputs weighted by ``recv_topk_weights`` (float32 in k order, then the activation
        dtype, as ``eep.reference.prefill.partial_combine``). Returns ``(combined [num_tokens, hidden],
        event)``: partials summed in ascending rank order in float32, rounded once; ranks that missed
        the deadline add nothing (and are cleared in ``active_ranks``).
        """
        if tuple(x.shape) != (handle.index.numel(), handle.hidden):
            raise RoutingError(f"prefill_combine x has shape {tuple(x.shape)}, expected "
                               f"({handle.index.numel()}, {handle.hidden}): one partial row per row prefill_dispatch returned")
        exchange = self.prefill
        R, M = self.num_ranks, exchange.max_tokens_per_rank
        partial = torch.zeros(R * M, handle.hidden, dtype=x.dtype, device=x.device)
        partial[handle.index] = x
        self._mask_in(exchange, active_ranks, timeout_us)
        combined = exchange.combine(partial.view(R, M, handle.hidden), handle.inner, out=out)
        self._evidence_out(exchange, active_ranks)
        return combined, EventOverlap()

    # ---- the backends ----
    def _exchanges(self) -> list:
        return [e for e in (self.decode, self.prefill) if e is not None]

    def _decode_exchange(self, m: int, local: int, hidden: int, dtype: torch.dtype, use_fp8: bool) -> DecodeExchange:
        if self.decode is None:
            if self.transport is None:
                raise RoutingError("this eep.Buffer has no decode backend (it was built with prefill= only)")
            from eep.exchange.shm import ShmExchange
            self.decode = ShmExchange(self.transport, slots_per_rank=local, max_tokens_per_rank=m, hidden=hidden,
                                      dtype=dtype, use_fp8=use_fp8, membership=self.membership,
                                      channels=DECODE_CHANNELS)
        ex = self.decode
        built = (ex.max_tokens_per_rank, ex.slots_per_rank, ex.hidden, ex.use_fp8)
        if (m, local, hidden, use_fp8) != built:
            raise RoutingError(f"the decode backend was built for (max_tokens, local experts, hidden, fp8) = {built}; "
                               f"got {(m, local, hidden, use_fp8)}")
        return ex

    def _prefill_exchange(self, local: int, x: torch.Tensor, top_k: int) -> PrefillExchange:
        if self.prefill is None:
            if self.transport is None:
                raise RoutingError("this eep.Buffer has no prefill backend (build it with prefill= or transport=)")
            from eep.exchange.shm import ShmPrefillExchange
            per_row = 4 + 8 * top_k + x.shape[1] * x.element_size()
            self.prefill = ShmPrefillExchange(self.transport, slots_per_rank=local,
                                              max_tokens_per_rank=(self.transport.capacity_nbytes - 8) // per_row,
                                              hidden=x.shape[1], top_k=top_k, dtype=x.dtype,
                                              membership=self.membership, channels=PREFILL_CHANNELS)
        ex = self.prefill
        if (local, x.shape[1]) != (ex.slots_per_rank, ex.hidden) or x.shape[0] > ex.max_tokens_per_rank:
            raise RoutingError(f"the prefill backend was built for (local experts, hidden) = "
                               f"{(ex.slots_per_rank, ex.hidden)} and at most {ex.max_tokens_per_rank} tokens; "
                               f"got {(local, x.shape[1])} and {x.shape[0]} tokens")
        return ex

    def _mask_in(self, exchange, active_ranks: torch.Tensor, timeout_us: int) -> None:
        timeout_s = self.max_wait_s if timeout_us < 0 else min(timeout_us / 1e6, self.max_wait_s)
        exchange.set_timeout(timeout_s)
        mirror = exchange.membership.active_device
        if active_ranks.data_ptr() != mirror.data_ptr():  # the caller's mask is the one to wait by
            mirror.copy_(active_ranks)

    def _evidence_out(self, exchange, active_ranks: torch.Tensor) -> None:
        """Clear suspects in the caller's mask, in place (on the device for a GPU backend)."""
        if active_ranks.is_cuda:
            active_ranks.mul_((exchange.suspect == 0).to(active_ranks.dtype))
            return
        for rank in exchange.suspect.nonzero().flatten().tolist():
            if active_ranks[rank]:
                active_ranks[rank] = 0
                self.missed_peers.append((exchange.membership.epoch, rank))

    # ---- argument checks ----
    def _check_prefill(self, x, topk_idx, topk_weights, active_ranks, num_experts) -> int:
        if x.dim() != 2:
            raise RoutingError(f"x has shape {tuple(x.shape)}, expected [num_tokens, hidden]")
        if topk_idx.dim() != 2 or topk_idx.shape[0] != x.shape[0]:
            raise RoutingError(f"topk_idx has shape {tuple(topk_idx.shape)}, expected [{x.shape[0]}, top_k]")
        if tuple(topk_weights.shape) != tuple(topk_idx.shape):
            raise RoutingError(f"topk_weights has shape {tuple(topk_weights.shape)}, topk_idx {tuple(topk_idx.shape)}")
        return self._check_common(x, topk_idx, active_ranks, num_experts)

    def _check_dispatch(self, x, topk_idx, active_ranks, m, num_experts, use_fp8) -> int:
        if x.dim() != 2:
            raise RoutingError(f"x has shape {tuple(x.shape)}, expected [num_tokens, hidden]")
        if x.shape[0] > m:
            raise RoutingError(f"rank {self.rank} dispatches {x.shape[0]} tokens, more than "
                               f"num_max_dispatch_tokens_per_rank={m}")
        if topk_idx.dim() != 2 or topk_idx.shape[0] != x.shape[0]:
            raise RoutingError(f"topk_idx has shape {tuple(topk_idx.shape)}, expected [{x.shape[0]}, top_k]")
        if use_fp8 and x.shape[1] % FP8_BLOCK:
            raise RoutingError(f"FP8 dispatch needs hidden % {FP8_BLOCK} == 0, got hidden={x.shape[1]}")
        return self._check_common(x, topk_idx, active_ranks, num_experts)

    def _check_common(self, x, topk_idx, active_ranks, num_experts) -> int:
        if num_experts % self.num_ranks:
            raise RoutingError(f"num_experts={num_experts} is not a multiple of num_ranks={self.num_ranks}")
        # Value checks synchronise with the device: skipped while a CUDA graph is being captured.
        capturing = x.is_cuda and torch.cuda.is_current_stream_capturing()
        if topk_idx.numel() and not capturing and (int(topk_idx.max()) >= num_experts or int(topk_idx.min()) < -1):
            raise RoutingError(f"topk_idx holds ids outside [-1, {num_experts}): "
                               f"{int(topk_idx.min())}..{int(topk_idx.max())}")
        if tuple(active_ranks.shape) != (self.num_ranks,):
            raise RoutingError(f"active_ranks has shape {tuple(active_ranks.shape)}, expected [{self.num_ranks}]")
        return num_experts // self.num_ranks


def _done() -> None:
    """The receive hook: the seam's call already received (see the module docstring)."""
