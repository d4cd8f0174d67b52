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

Backends: a ``Transport`` (``eep.transport.SharedMemoryTransport`` on the CPU: the same calls run
in CI across real processes), or on the GPU the fused buffer (``eep.fused.buffer.FusedBuffer``,
``Buffer(rank, num_ranks, fused=...)``). The GPU path does only device work per call (the mask
copied in, the evidence copied out, the layout viewed), so it can be captured in a CUDA graph;
there a send and its wait are one kernel, so ``return_recv_hook`` returns a no-op hook. The fused
FP8 format has one scale per row; the face repeats it per 128 channels to keep Mooncake's shape.

Each dispatch/combine pair is one step, tagged ``(epoch, step)`` on the wire; ``update_ep_member``
starts a new epoch (step 0) on every member, which is how a rejoining rank and the survivors agree
on the next tag without a collective.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from eep.errors import RoutingError
from eep.routing import check_finite_rows
from eep.transport.base import Transport

DISPATCH_CHANNEL, COMBINE_CHANNEL = 0, 1
FP8_BLOCK = 128
FP8_MAX = 448.0  # largest finite float8_e4m3fn


class EventOverlap:
    """DeepEP's event wrapper; on the CPU there is nothing to wait for."""

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
    """What combine needs from dispatch (opaque to callers, like DeepEP's handle tuple).

    sent: per destination rank, per local expert, the ``(token, k)`` pairs sent, in wire order.
    recv_count: ``[num_local_experts, num_ranks]`` rows received from each source.
    """

    num_max_dispatch_tokens_per_rank: int
    hidden: int
    num_experts: int
    epoch: int
    step: int
    sent: dict[int, list[list[tuple[int, int]]]] = field(default_factory=dict)
    recv_count: torch.Tensor | None = None


@dataclass
class PrefillHandle:
    """What ``prefill_combine`` needs from ``prefill_dispatch`` (opaque to callers).

    sent: per destination rank, the tokens sent there (ascending); received: rows per source rank.
    """

    epoch: int
    step: int
    hidden: int
    num_tokens: int
    sent: dict[int, torch.Tensor] = field(default_factory=dict)
    received: dict[int, int] = field(default_factory=dict)
    fused: tuple | None = None


class Buffer:
    """One rank's end of the low-latency dispatch/combine (see the module docstring)."""

    def __init__(self, rank: int, num_ranks: int, *, transport: Transport | None = None, fused=None,
                 prefill=None, epoch: int = 0, max_wait_s: float = 300.0):
        if (transport is None) == (fused is None and prefill is None):
            raise ValueError("eep.Buffer needs exactly one backend: transport= (CPU) or fused= / prefill= (GPU)")
        self.prefill = prefill  # eep.fused.prefill.PrefillBuffer: the GPU backend of prefill_dispatch/combine
        if prefill is not None and (prefill.rank, prefill.num_ranks) != (rank, num_ranks):
            raise ValueError(f"prefill buffer is for rank {prefill.rank} of {prefill.num_ranks}, "
                             f"not rank {rank} of {num_ranks}")
        self.rank = rank
        self.num_ranks = num_ranks
        self.epoch = epoch
        self.step = 0
        self.max_wait_s = max_wait_s
        self.missed_peers: list[tuple[int, int, int]] = []  # (epoch, step, rank): evidence for the runtime
        self.fused = fused
        self.transport = transport
        if transport is None:
            if fused is None:
                return
            if (fused.rank, fused.num_ranks) != (rank, num_ranks):
                raise ValueError(f"fused buffer is for rank {fused.rank} of {fused.num_ranks}, "
                                 f"not rank {rank} of {num_ranks}")
            return
        if transport.rank != rank or transport.num_ranks != num_ranks:
            raise ValueError(f"transport is for rank {transport.rank} of {transport.num_ranks}, "
                             f"not rank {rank} of {num_ranks}")
        if transport.num_channels < 2:
            raise ValueError("eep.Buffer needs a transport with 2 channels (dispatch, combine)")

    # ---- sizing ----
    @staticmethod
    def get_ep_buffer_size_hint(num_max_dispatch_tokens_per_rank: int, hidden: int, num_ranks: int,
                                num_experts: int, *, use_fp8: bool = False, elem_nbytes: int = 2) -> int:
        """Bytes one (source, destination) region needs: the largest message either direction."""
        local = num_experts // num_ranks
        rows = local * num_max_dispatch_tokens_per_rank
        data = rows * hidden * (1 if use_fp8 else elem_nbytes) + (rows * (hidden // FP8_BLOCK) * 4 if use_fp8 else 0)
        dispatch = 4 * local + 4 * rows + data
        combine = rows * hidden * max(elem_nbytes, 4)
        return -(-max(dispatch, combine) // 8) * 8

    # ---- membership ----
    def update_ep_member(self, *, epoch: int | None = None, joined: list[int] = ()) -> None:
        """A membership change (a rank rejoined): every member moves to ``epoch`` at step 0.

        On the GPU, ``joined`` ranks' new buffers are mapped into the peer table (one table write
        each) and earlier suspicions are forgotten; the caller then marks them in ``active_ranks``.
        """
        self.epoch = self.epoch + 1 if epoch is None else int(epoch)
        self.step = 0
        if self.fused is not None:
            for rank in joined:
                self.fused.add_peer(rank)
            self.fused.set_membership(self.fused.active_mask.cpu() | _one_hot(joined, self.num_ranks), epoch=self.epoch)

    # ---- dispatch ----
    def dispatch(self, x: torch.Tensor, topk_idx: torch.Tensor, active_ranks: torch.Tensor,
                 num_max_dispatch_tokens_per_rank: int, num_experts: int, timeout_us: int,
                 use_fp8: bool = True, async_finish: bool = False, return_recv_hook: bool = False):
        """Send each token to the ranks hosting its experts; receive this rank's share.

        Returns ``(recv_x, recv_count, handle, event, hook)`` with ``recv_x`` either
        ``[num_local_experts, num_ranks * M, hidden]`` in ``x.dtype`` or, with ``use_fp8``,
        ``(x_fp8, scales)``; ``recv_count`` int32 ``[num_local_experts]``.
        """
        check_finite_rows(x, "dispatch x")  # NaN/inf rows named here (host tensors; eep.routing.finite)
        m = num_max_dispatch_tokens_per_rank
        local = self._check_dispatch(x, topk_idx, active_ranks, m, num_experts, use_fp8)
        if self.fused is not None:
            return self._fused_dispatch(x, topk_idx, active_ranks, m, num_experts, timeout_us, use_fp8, local)
        hidden = x.shape[1]
        handle = EPHandle(m, hidden, num_experts, self.epoch, self.step)
        peers = self._active(active_ranks)

        # Send: one message per active destination, experts in order, tokens ascending.
        pairs_by_dst: dict[int, list[list[tuple[int, int]]]] = {d: [[] for _ in range(local)] for d in peers}
        for token, k in zip(*(topk_idx >= 0).nonzero(as_tuple=True)):
            expert = int(topk_idx[token, k])
            dst = expert // local
            if dst in pairs_by_dst:
                pairs_by_dst[dst][expert % local].append((int(token), int(k)))
        values, scales = _quantize_fp8(x) if use_fp8 else (x, None)
        for dst, per_expert in pairs_by_dst.items():
            self.transport.send(DISPATCH_CHANNEL, dst, _pack_dispatch(per_expert, values, scales),
                                epoch=self.epoch, step=self.step)
        handle.sent = pairs_by_dst

        recv_x = torch.zeros(local, self.num_ranks * m, hidden, dtype=values.dtype)
        recv_scales = torch.zeros(local, self.num_ranks * m, hidden // FP8_BLOCK) if use_fp8 else None
        recv_count = torch.zeros(local, dtype=torch.int32)
        handle.recv_count = torch.zeros(local, self.num_ranks, dtype=torch.int32)

        def receive() -> None:
            result = self._recv(DISPATCH_CHANNEL, peers, active_ranks, timeout_us)
            for src, raw in result.items():
                counts, src_rows, data, data_scales = _unpack_dispatch(raw, local, hidden, values.dtype, use_fp8)
                offset = 0
                for i in range(local):
                    n = int(counts[i])
                    recv_x[i, src * m:src * m + n] = data[offset:offset + n]
                    if use_fp8:
                        recv_scales[i, src * m:src * m + n] = data_scales[offset:offset + n]
                    handle.recv_count[i, src] = n
                    offset += n
            recv_count.copy_(handle.recv_count.sum(1))

        hook = receive if return_recv_hook else (lambda: None)
        if not return_recv_hook:
            receive()
        out_x = (recv_x, recv_scales) if use_fp8 else recv_x
        return out_x, recv_count, handle, EventOverlap(), hook

    # ---- combine ----
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
        if self.fused is not None:
            return self._fused_combine(x, topk_weights, active_ranks, timeout_us, handle, out)
        if tuple(x.shape) != (local, self.num_ranks * m, handle.hidden):
            raise RoutingError(f"combine x has shape {tuple(x.shape)}, expected "
                               f"{(local, self.num_ranks * m, handle.hidden)} (the dispatch receive layout)")
        if tuple(topk_weights.shape) != tuple(topk_idx.shape):
            raise RoutingError(f"topk_weights has shape {tuple(topk_weights.shape)}, topk_idx {tuple(topk_idx.shape)}")
        if (handle.epoch, handle.step) != (self.epoch, self.step):
            raise RoutingError(f"handle is from epoch {handle.epoch} step {handle.step}, the buffer is at "
                               f"epoch {self.epoch} step {self.step}: combine each dispatch once, in order")
        peers = self._active(active_ranks)
        for src in peers:
            rows = [x[i, src * m:src * m + int(handle.recv_count[i, src])] for i in range(local)]
            payload = torch.cat(rows) if rows else x.new_zeros(0, handle.hidden)
            self.transport.send(COMBINE_CHANNEL, src, payload, epoch=self.epoch, step=self.step)

        combined = out if out is not None else torch.empty(topk_idx.shape[0], handle.hidden, dtype=x.dtype)
        weights = topk_weights.float()

        def receive() -> None:
            result = self._recv(COMBINE_CHANNEL, [p for p in peers if p in handle.sent], active_ranks, timeout_us)
            acc = torch.zeros(topk_idx.shape[0], handle.hidden, dtype=torch.float32)
            for dst, raw in result.items():
                pairs = [pair for per_expert in handle.sent[dst] for pair in per_expert]
                if not pairs:
                    continue
                rows = raw[:len(pairs) * handle.hidden * x.element_size()].view(x.dtype).view(len(pairs), handle.hidden)
                tokens = torch.tensor([t for t, _ in pairs])
                ks = torch.tensor([k for _, k in pairs])
                acc.index_add_(0, tokens, weights[tokens, ks].unsqueeze(1) * rows.float())
            combined.copy_(acc)
            self.step += 1

        hook = receive if return_recv_hook else (lambda: None)
        if not return_recv_hook:
            receive()
        return combined, EventOverlap(), hook

    # ---- prefill (DeepEP's "normal" mode): one copy of a token per destination rank ----
    @staticmethod
    def get_prefill_buffer_size_hint(num_max_tokens_per_rank: int, hidden: int, top_k: int, *,
                                     elem_nbytes: int = 2) -> int:
        """Bytes one (source, destination) region needs for ``prefill_dispatch``/``prefill_combine``."""
        rows = num_max_tokens_per_rank
        dispatch = 8 + rows * (4 + 8 * top_k) + rows * hidden * elem_nbytes
        return -(-max(dispatch, rows * hidden * elem_nbytes) // 8) * 8

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
        if self.prefill is not None:
            return self._fused_prefill_dispatch(x, topk_idx, topk_weights, active_ranks, local, timeout_us)
        peers = self._active(active_ranks)
        top_k = topk_idx.shape[1]
        dst_of = torch.where(topk_idx >= 0, topk_idx // local, -1)
        handle = PrefillHandle(self.epoch, self.step, x.shape[1], x.shape[0])
        for dst in peers:
            here = dst_of == dst
            tokens = here.any(-1).nonzero().squeeze(1)  # ascending
            idx = torch.where(here[tokens], topk_idx[tokens] % local, -1).to(torch.int32)
            w = torch.where(here[tokens], topk_weights[tokens].float(), 0.0)
            payload = torch.cat([torch.tensor([tokens.numel(), top_k], dtype=torch.int32).view(torch.uint8),
                                 tokens.to(torch.int32).view(torch.uint8), idx.contiguous().view(-1).view(torch.uint8),
                                 w.contiguous().view(-1).view(torch.uint8),
                                 x[tokens].contiguous().view(-1).view(torch.uint8)])
            self.transport.send(DISPATCH_CHANNEL, dst, payload, epoch=self.epoch, step=self.step)
            handle.sent[dst] = tokens
        rows, idxs, ws = [], [], []
        for src, raw in sorted(self._recv(DISPATCH_CHANNEL, peers, active_ranks, timeout_us).items()):
            n, k = (int(v) for v in raw[:8].view(torch.int32))
            off = 8 + 4 * n
            idxs.append(raw[off:off + 4 * n * k].view(torch.int32).view(n, k).long())
            off += 4 * n * k
            ws.append(raw[off:off + 4 * n * k].view(torch.float32).view(n, k).clone())
            off += 4 * n * k
            rows.append(raw[off:off + n * x.shape[1] * x.element_size()].view(x.dtype).view(n, x.shape[1]).clone())
            handle.received[src] = n
        recv_x = torch.cat(rows) if rows else x.new_zeros(0, x.shape[1])
        recv_idx = torch.cat(idxs) if idxs else torch.zeros(0, top_k, dtype=torch.int64)
        recv_w = torch.cat(ws) if ws else torch.zeros(0, top_k)
        per_expert = [int((recv_idx == i).sum()) for i in range(local)]
        return recv_x, recv_idx, recv_w, per_expert, handle, EventOverlap()

    def prefill_combine(self, x: torch.Tensor, handle: "PrefillHandle", active_ranks: torch.Tensor,
                        timeout_us: int, out: torch.Tensor | None = None):
        """Send each received row's partial sum home and add them per token.

        ``x [num_recv, hidden]``: for every row of ``prefill_dispatch``, the caller's sum of its local
        experts' outputs weighted by ``recv_topk_weights`` (float32 in k order, then the activation
        dtype, as ``eep.reference.prefill.partial_combine``). Returns ``(combined [num_tokens, hidden],
        event)``: partials summed in ascending rank order in float32, rounded once; ranks that missed
        the deadline add nothing (and are cleared in ``active_ranks``).
        """
        if (handle.epoch, handle.step) != (self.epoch, self.step):
            raise RoutingError(f"handle is from epoch {handle.epoch} step {handle.step}, the buffer is at "
                               f"epoch {self.epoch} step {self.step}: combine each dispatch once, in order")
        if self.prefill is not None:
            return self._fused_prefill_combine(x, handle, active_ranks, timeout_us, out)
        expected = sum(handle.received.values())
        if tuple(x.shape) != (expected, handle.hidden):
            raise RoutingError(f"prefill_combine x has shape {tuple(x.shape)}, expected ({expected}, {handle.hidden}): "
                               "one partial row per row prefill_dispatch returned")
        peers = self._active(active_ranks)
        start = 0
        for src, n in sorted(handle.received.items()):
            if src in peers:
                self.transport.send(COMBINE_CHANNEL, src, x[start:start + n].contiguous().view(-1).view(torch.uint8),
                                    epoch=self.epoch, step=self.step)
            start += n
        acc = torch.zeros(handle.num_tokens, handle.hidden, dtype=torch.float32)
        result = self._recv(COMBINE_CHANNEL, [p for p in peers if p in handle.sent], active_ranks, timeout_us)
        for dst, raw in sorted(result.items()):
            tokens = handle.sent[dst]
            rows = raw[:tokens.numel() * handle.hidden * x.element_size()].view(x.dtype).view(-1, handle.hidden)
            acc[tokens] = acc[tokens] + rows.float()
        combined = acc.to(x.dtype)
        if out is not None:
            out.copy_(combined)
            combined = out
        self.step += 1
        return combined, EventOverlap()

    def _fused_prefill_dispatch(self, x, topk_idx, topk_weights, active_ranks, local, timeout_us):
        pb = self.prefill
        if (local, x.shape[1]) != (pb.slots_per_rank, pb.layout.hidden):
            raise RoutingError(f"the prefill buffer was built for (local experts, hidden) = "
                               f"{(pb.slots_per_rank, pb.layout.hidden)}; got {(local, x.shape[1])}")
        self._set_deadline(timeout_us, pb)
        pb.active_mask.copy_(active_ranks)
        recv, fused_handle = pb.dispatch(x.contiguous(), topk_idx.to(torch.int64).contiguous(),
                                         topk_weights.float().contiguous())
        self._write_evidence(active_ranks, pb)
        M, K = pb.layout.max_tokens_per_rank, pb.layout.top_k
        counts = recv.count.tolist()  # the packed view needs the counts on the host, as DeepEP's does
        index = torch.cat([torch.arange(n, device=x.device) + s * M for s, n in enumerate(counts)])
        recv_x = recv.x.reshape(-1, x.shape[1])[index]
        recv_idx = recv.local_slot.reshape(-1, K)[index].long()
        recv_w = recv.weight.reshape(-1, K)[index]
        recv_w = torch.where(recv_idx >= 0, recv_w, 0.0)
        handle = PrefillHandle(self.epoch, self.step, x.shape[1], x.shape[0])
        handle.received = {s: n for s, n in enumerate(counts) if n}
        handle.fused = (fused_handle, index)
        per_expert = torch.bincount(recv_idx[recv_idx >= 0], minlength=local).tolist()
        return recv_x, recv_idx, recv_w, per_expert, handle, EventOverlap()

    def _fused_prefill_combine(self, x, handle, active_ranks, timeout_us, out):
        pb = self.prefill
        fused_handle, index = handle.fused
        lay = pb.layout
        partial = torch.zeros(lay.num_ranks * lay.max_tokens_per_rank, lay.hidden, dtype=torch.bfloat16,
                              device=x.device)
        partial[index] = x.to(torch.bfloat16)
        self._set_deadline(timeout_us, pb)
        pb.active_mask.copy_(active_ranks)
        combined = pb.combine(partial.view(lay.num_ranks, lay.max_tokens_per_rank, lay.hidden), fused_handle, out=out)
        self._write_evidence(active_ranks, pb)
        self.step += 1
        return combined, EventOverlap()

    def _check_prefill(self, x, topk_idx, topk_weights, active_ranks, num_experts) -> int:
        if x.dim() != 2:
            raise RoutingError(f"x has shape {tuple(x.shape)}, expected [num_tokens, hidden]")
        if topk_idx.dim() != 2 or topk_idx.shape[0] != x.shape[0]:
            raise RoutingError(f"topk_idx has shape {tuple(topk_idx.shape)}, expected [{x.shape[0]}, top_k]")
        if tuple(topk_weights.shape) != tuple(topk_idx.shape):
            raise RoutingError(f"topk_weights has shape {tuple(topk_weights.shape)}, topk_idx {tuple(topk_idx.shape)}")
        if num_experts % self.num_ranks:
            raise RoutingError(f"num_experts={num_experts} is not a multiple of num_ranks={self.num_ranks}")
        if topk_idx.numel() and (int(topk_idx.max()) >= num_experts or int(topk_idx.min()) < -1):
            raise RoutingError(f"topk_idx holds ids outside [-1, {num_experts}): "
                               f"{int(topk_idx.min())}..{int(topk_idx.max())}")
        if tuple(active_ranks.shape) != (self.num_ranks,):
            raise RoutingError(f"active_ranks has shape {tuple(active_ranks.shape)}, expected [{self.num_ranks}]")
        return num_experts // self.num_ranks

    # ---- the GPU backend: device work only, so a CUDA graph can hold it ----
    def _fused_dispatch(self, x, topk_idx, active_ranks, m, num_experts, timeout_us, use_fp8, local):
        fused = self.fused
        lay = fused.layout
        built = (lay.max_tokens_per_rank, lay.slots_per_rank, lay.hidden, fused.use_fp8)
        if (m, local, x.shape[1], use_fp8) != built:
            raise RoutingError(f"the fused buffer was built for (max_tokens, local experts, hidden, fp8) = {built}; "
                               f"got {(m, local, x.shape[1], use_fp8)}")
        self._set_deadline(timeout_us)
        fused.active_mask.copy_(active_ranks)
        recv, fused_handle = fused.dispatch(x.contiguous(), topk_idx.to(torch.int64).contiguous())
        self._write_evidence(active_ranks)
        handle = EPHandle(m, x.shape[1], num_experts, self.epoch, self.step)
        handle.recv_count = recv.count  # [local, num_ranks] on the device
        handle.sent = {"fused": fused_handle}
        flat = recv.x.view(local, self.num_ranks * m, x.shape[1])
        recv_count = recv.count.sum(1, dtype=torch.int32)
        if use_fp8:
            blocks = x.shape[1] // FP8_BLOCK
            scales = recv.scale.reshape(local, self.num_ranks * m, 1).expand(-1, -1, blocks).contiguous()
            flat = (flat, scales)
        return flat, recv_count, handle, EventOverlap(), (lambda: None)

    def _fused_combine(self, x, topk_weights, active_ranks, timeout_us, handle, out):
        fused = self.fused
        m, hidden = handle.num_max_dispatch_tokens_per_rank, handle.hidden
        y = x.view(fused.layout.slots_per_rank, self.num_ranks, m, hidden).contiguous()
        self._set_deadline(timeout_us)
        fused.active_mask.copy_(active_ranks)
        combined = fused.combine(y, handle.sent["fused"], topk_weights.float().contiguous(), out=out)
        self._write_evidence(active_ranks)
        self.step += 1
        return combined, EventOverlap(), (lambda: None)

    def _set_deadline(self, timeout_us: int, buf=None) -> None:
        from eep.fused.layout import CTRL_TIMEOUT_NS
        timeout_s = self.max_wait_s if timeout_us < 0 else min(timeout_us / 1e6, self.max_wait_s)
        # fill_ with a Python scalar is a kernel argument, not a host-to-device copy: capturable
        (buf or self.fused).ctrl[CTRL_TIMEOUT_NS:CTRL_TIMEOUT_NS + 1].fill_(int(timeout_s * 1e9))

    def _write_evidence(self, active_ranks: torch.Tensor, buf=None) -> None:
        from eep.fused.layout import CTRL_SUSPECT
        suspect = (buf or self.fused).ctrl[CTRL_SUSPECT:CTRL_SUSPECT + self.num_ranks]
        active_ranks.mul_((suspect == 0).to(active_ranks.dtype))  # in place, on the device

    # ---- internals ----
    def _active(self, active_ranks: torch.Tensor) -> list[int]:
        return [r for r, a in enumerate(active_ranks.tolist()) if a]

    def _recv(self, channel: int, peers: list[int], active_ranks: torch.Tensor, timeout_us: int) -> dict:
        timeout_s = self.max_wait_s if timeout_us < 0 else min(timeout_us / 1e6, self.max_wait_s)
        result = self.transport.recv(channel, peers, epoch=self.epoch, step=self.step, timeout_s=timeout_s)
        for rank in result.missed:
            active_ranks[rank] = 0  # in place: the caller's tensor (e.g. SGLang's) carries the evidence
            self.missed_peers.append((self.epoch, self.step, rank))
        return result.buffers

    def _check_dispatch(self, x, topk_idx, active_ranks, m, num_experts, use_fp8) -> int:
        if x.dim() != 2:
            raise RoutingError(f"x has shape {tuple(x.shape)}, expected [num_tokens, hidden]")
        if x.shape[0] > m:
            raise RoutingError(f"rank {self.rank} dispatches {x.shape[0]} tokens, more than "
                               f"num_max_dispatch_tokens_per_rank={m}")
        if topk_idx.dim() != 2 or topk_idx.shape[0] != x.shape[0]:
            raise RoutingError(f"topk_idx has shape {tuple(topk_idx.shape)}, expected [{x.shape[0]}, top_k]")
        if num_experts % self.num_ranks:
            raise RoutingError(f"num_experts={num_experts} is not a multiple of num_ranks={self.num_ranks}")
        # Value checks synchronise with the device: skipped while a CUDA graph is being captured.
        capturing = x.is_cuda and torch.cuda.is_current_stream_capturing()
        if topk_idx.numel() and not capturing and (int(topk_idx.max()) >= num_experts or int(topk_idx.min()) < -1):
            raise RoutingError(f"topk_idx holds ids outside [-1, {num_experts}): "
                               f"{int(topk_idx.min())}..{int(topk_idx.max())}")
        if tuple(active_ranks.shape) != (self.num_ranks,):
            raise RoutingError(f"active_ranks has shape {tuple(active_ranks.shape)}, expected [{self.num_ranks}]")
        if use_fp8 and x.shape[1] % FP8_BLOCK:
            raise RoutingError(f"FP8 dispatch needs hidden % {FP8_BLOCK} == 0, got hidden={x.shape[1]}")
        return num_experts // self.num_ranks


def _one_hot(ranks, num_ranks: int) -> torch.Tensor:
    mask = torch.zeros(num_ranks, dtype=torch.int32)
    mask[list(ranks)] = 1
    return mask


def _quantize_fp8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token, per-128-channel e4m3 quantisation: ``x ~= values * scales``."""
    blocks = x.float().view(x.shape[0], x.shape[1] // FP8_BLOCK, FP8_BLOCK)
    scales = (blocks.abs().amax(-1) / FP8_MAX).clamp(min=1e-12)
    values = (blocks / scales.unsqueeze(-1)).to(torch.float8_e4m3fn).view(x.shape[0], x.shape[1])
    return values, scales


def dequantize_fp8(values: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """Inverse of the FP8 dispatch format: ``[..., hidden]`` float32."""
    shape = values.shape
    blocks = values.float().view(*shape[:-1], shape[-1] // FP8_BLOCK, FP8_BLOCK) * scales.unsqueeze(-1)
    return blocks.view(shape)


def _pack_dispatch(per_expert: list[list[tuple[int, int]]], values: torch.Tensor,
                   scales: torch.Tensor | None) -> torch.Tensor:
    """Wire format: counts int32 [local] | src token int32 [rows] | data [rows, hidden] | scales f32."""
    tokens = [t for pairs in per_expert for t, _ in pairs]
    counts = torch.tensor([len(p) for p in per_expert], dtype=torch.int32)
    index = torch.tensor(tokens, dtype=torch.int64)
    parts = [counts.view(torch.uint8), index.to(torch.int32).view(torch.uint8),
             values[index].contiguous().view(-1).view(torch.uint8)]
    if scales is not None:
        parts.append(scales[index].contiguous().view(-1).view(torch.uint8))
    return torch.cat(parts)


def _unpack_dispatch(raw: torch.Tensor, local: int, hidden: int, dtype: torch.dtype, use_fp8: bool):
    counts = raw[:4 * local].view(torch.int32).clone()
    rows = int(counts.sum())
    offset = 4 * local
    src_rows = raw[offset:offset + 4 * rows].view(torch.int32)
    offset += 4 * rows
    elem = torch.empty(0, dtype=dtype).element_size()
    data = raw[offset:offset + rows * hidden * elem].view(dtype).view(rows, hidden)
    offset += rows * hidden * elem
    data_scales = None
    if use_fp8:
        nblocks = hidden // FP8_BLOCK
        data_scales = raw[offset:offset + rows * nblocks * 4].view(torch.float32).view(rows, nblocks)
    return counts, src_rows, data, data_scales
