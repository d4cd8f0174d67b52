"""``FusedBuffer``: the per-process object of the fused GPU data plane (decode / low-latency mode).

Construct once per rank process; every rank of the instance builds one with the same shape
arguments. It allocates this rank's peer buffer (layout in ``eep/fused/layout.py``), publishes
it through the control store, maps every peer's buffer, and launches the NVRTC kernels on the
caller's torch stream. Calls produce the receive layout of ``eep.exchange.layout`` for one rank:

    recv, handle = buf.dispatch(x, phys)            # x [num_tokens, hidden] bf16, phys [num_tokens, top_k]
    y = experts(recv.x, recv.count)                 # [slots_per_rank, num_ranks, max_tokens, hidden]
    out = buf.combine(y, handle, topk_weights)      # [num_tokens, hidden] bf16

Membership, the peer table, the step sequence numbers and the timeout live in device memory and
are read by the kernels at launch, so a CUDA graph captured around dispatch/combine stays valid
when ``set_membership`` masks a rank or ``add_peer`` maps a rejoined rank's new buffer.

Rules the caller keeps (the same as DeepEP's low-latency buffers):
- all active ranks call dispatch and combine the same number of times, in the same order;
- ``recv`` views the peer buffer: read it before this rank's next ``combine`` returns;
- membership changes happen between steps, with the same mask on every active rank.
"""

from __future__ import annotations

import ctypes
import json
import os
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch

from eep import envs

from eep.fused.layout import (CTRL_COMBINE_OK, CTRL_COMBINE_SEQ, CTRL_DISPATCH_OK, CTRL_DISPATCH_SEQ,
                              CTRL_EPOCH, CTRL_LAST_MISS_SEQ, CTRL_MISS_COUNT, CTRL_NUMEL, CTRL_SUSPECT,
                              CTRL_TIMEOUT_NS, MAX_SIGNAL_BLOCKS, THREADS_PER_BLOCK, BufferLayout, make_params,
                              make_signal_params)
from eep.exchange.layout import DispatchHandle, RankReceive
from eep.exchange.protocol import ExchangeStatus, adopt, connect_each
from eep.exchange.tags import first_tag
from eep.state import Membership

DEFAULT_TIMEOUT_S = 1.0  # EEP_FUSED_TIMEOUT_S overrides it
STORE_PREFIX = "eep/fused"


def store_key(group: str, rank: int) -> str:
    """Store key under which ``rank`` of ``group`` publishes its peer-buffer record."""
    return f"{STORE_PREFIX}/{group}/rank{rank}"


@dataclass
class FusedStatus(ExchangeStatus):
    """``ExchangeStatus`` plus the fused kernels' own counters (reading it synchronises the stream)."""

    dispatch_seq: int = 0
    combine_seq: int = 0
    timeout_s: float = 0.0
    dispatch_ok: list[bool] = field(default_factory=list)   # last dispatch: that source's tokens arrived
    combine_ok: list[bool] = field(default_factory=list)    # last combine: that expert rank's outputs arrived
    last_miss_seq: list[int] = field(default_factory=list)  # step of the latest miss (0 = never)


class FusedBuffer:
    """One rank's peer buffer, peer table and kernels (decode mode, bf16).

    Parameters:
        rank, num_ranks: this rank slot and the fixed number of rank slots.
        slots_per_rank, max_tokens_per_rank, hidden, top_k: shapes (identical on every rank).
        store: a ``torch.distributed.Store`` (``TCPStore``) shared by the ranks.
        connect: ranks whose buffers to map now (default: all others; each is waited for in the
            store). A process that joins a running instance passes the survivors.
        fixed_membership: compile the variant with no membership checks (steady-state baseline).
        timeout_s: bound on every wait for a peer (device parameter, changeable later).
        num_blocks: grid size of the data-moving kernels (default ``EEP_FUSED_BLOCKS`` or the SM count).
        vec_per_lane: 16-byte vectors per lane per copied chunk (default ``EEP_FUSED_VEC_PER_LANE`` or 4).
        decode: ``"push"`` (the default kernels) or ``"pull"`` (experimental, off by default: FP8 quantize
            spread over the grid; combine pulls each source's top-k rows from the expert ranks'
            ``combine_input()`` regions and sums them as it reads; docs/fused.md "Decode: where the time
            goes"). Kernel set v1 only. Every rank of an instance must use the same value.
        kernels: kernel set, ``"v1"`` (the validated kernels) or ``"v2"`` (one launch per direction, FP8
            cast inside the dispatch, rows signalled per sending block, combine reduces as it reads;
            docs/fused.md "Kernel set v2"); default ``EEP_FUSED_KERNELS`` or ``"v1"``. Same receive
            layout and results (bit-identical); every rank of an instance must use the same set.
        membership: the process's ``Membership`` with its device mirror on this buffer's device (default:
            a new one, all active); the kernels read its ``active_device`` at every launch.
        pdl: kernel set v2 launches dispatch and combine with programmatic dependent launch, so each
            one's blocks start while the kernel before it finishes (docs/fused.md "Programmatic
            dependent launch"); default ``EEP_FUSED_PDL`` or off. Ignored by kernel set v1. Settable
            per launch (``buf.pdl``), captured into a CUDA graph like any launch.

    It is the fused decode backend of the exchange seam (``eep.exchange.protocol.DecodeExchange``).
    """

    is_graph_safe = True

    def __init__(self, rank: int, num_ranks: int, *, slots_per_rank: int, max_tokens_per_rank: int, hidden: int,
                 top_k: int, store: Any, group: str = "default", connect: Sequence[int] | None = None,
                 fixed_membership: bool = False, timeout_s: float | None = None,
                 num_blocks: int | None = None, vec_per_lane: int | None = None, use_fp8: bool = False,
                 device: torch.device | int | None = None, decode: str = "push", kernels: str | None = None,
                 membership: Membership | None = None, pdl: bool | None = None) -> None:
        from eep.fused.compile import KernelVariant

        if not 0 <= rank < num_ranks:
            raise ValueError(f"rank={rank} outside [0, num_ranks={num_ranks})")
        layout = BufferLayout(num_ranks, slots_per_rank, max_tokens_per_rank, hidden)
        self.top_k, self.use_fp8, self.decode = top_k, use_fp8, decode
        self.slots_per_rank, self.max_tokens_per_rank, self.hidden = slots_per_rank, max_tokens_per_rank, hidden
        self.kernel_set = kernels or envs.fused_kernels()
        self.pdl = envs.fused_pdl() if pdl is None else bool(pdl)
        variant = KernelVariant(hidden, fixed_membership, vec_per_lane or envs.fused_vec_per_lane(), use_fp8,
                                decode=decode, kernels=self.kernel_set)
        smem = kernel_smem(self.kernel_set, top_k,
                           {"eep_dispatch": layout.dispatch_smem_bytes(),
                            "eep_combine_send": layout.combine_send_smem_bytes()},
                           lambda send_blocks: {"eep2_dispatch": layout.dispatch_v2_smem_bytes(top_k, send_blocks),
                                                "eep2_combine": layout.combine_send_smem_bytes()})
        if decode == "pull":
            smem["eep_combine_stage"] = layout.combine_send_smem_bytes()
        self._open(rank, layout, variant, store=store, group=group, connect=connect, timeout_s=timeout_s,
                   num_blocks=num_blocks, device=device, smem=smem, membership=membership)
        self.vis_count = torch.zeros(slots_per_rank, num_ranks, dtype=torch.int32, device=self.device)
        self.handle_pos = torch.full((max_tokens_per_rank, top_k), -1, dtype=torch.int32, device=self.device)
        if use_fp8 and self.kernel_set == "v1":  # each token is quantized once here, then copied top_k times
            self.stage = torch.empty(max_tokens_per_rank, hidden, dtype=torch.uint8, device=self.device)
            self.stage_scale = torch.empty(max_tokens_per_rank, dtype=torch.float32, device=self.device)
        torch.cuda.synchronize(self.device)

    def _open(self, rank: int, layout: Any, variant: Any, *, store: Any, group: str, connect: Sequence[int] | None,
              timeout_s: float | None, num_blocks: int | None, device: torch.device | int | None,
              smem: dict[str, int] | Any, membership: Membership | None) -> None:
        """What every mode's buffer does once: context, kernels, the VMM peer buffer (``layout.nbytes``,
        zeroed), its fd server, the control block, mask and peer table, the store record, the peers.
        ``smem``: dynamic shared memory per kernel, or a function of the grid size giving it."""
        from eep.fused.compile import LoadedKernels
        from eep.fused.cuda_util import ensure_context
        from eep.fused.peer_memory import VmmAllocation, tensor_at
        from eep.transport.fd_passing import FdServer

        num_ranks = layout.num_ranks
        self.layout = layout
        self.rank, self.num_ranks = rank, num_ranks
        self.store, self.group = store, group
        self.device = torch.device("cuda", torch.cuda.current_device() if device is None else
                                   (device if isinstance(device, int) else device.index))
        torch.cuda.set_device(self.device)
        torch.zeros(1, device=self.device)  # make torch create the primary context first
        ensure_context(self.device.index)
        self.kernels_variant = variant
        self.kernels = LoadedKernels.get(variant, self.device.index)
        # grid of the data-moving kernels; any size is correct (only the last block waits)
        self.num_blocks = (num_blocks or envs.fused_blocks()
                           or torch.cuda.get_device_properties(self.device).multi_processor_count)
        self._set_smem_limits(smem(self.num_blocks) if callable(smem) else smem)

        # this rank's peer buffer: allocated once for all rank slots
        self.alloc = VmmAllocation(layout.nbytes, self.device.index)
        self._buffer = tensor_at(self.alloc.ptr, layout.nbytes, self.device)
        self._buffer.zero_()
        self.server = FdServer(self.alloc.fd, {"rank": rank, "nbytes": self.alloc.nbytes,
                                                "layout": layout.signature(), "pid": os.getpid()})

        # local device state read by every launch
        self.ctrl = torch.zeros(CTRL_NUMEL, dtype=torch.int64, device=self.device)
        if timeout_s is None:
            timeout_s = envs.fused_timeout_s(DEFAULT_TIMEOUT_S)
        self.ctrl[CTRL_TIMEOUT_NS] = int(timeout_s * 1e9)
        self.is_membership_aware = not variant.fixed_membership
        self.membership = membership if membership is not None else Membership(num_ranks, device=self.device)
        if self.membership.active_device.device != self.device or self.membership.num_ranks != num_ranks:
            raise ValueError(f"rank {rank}: {self.membership} mirrors its mask on {self.membership.active_device.device}; "
                             f"the buffer needs {num_ranks} rank slots on {self.device}")
        self.miss_count = self.ctrl[CTRL_MISS_COUNT:CTRL_MISS_COUNT + num_ranks]
        self.suspect = self.ctrl[CTRL_SUSPECT:CTRL_SUSPECT + num_ranks]
        self.ctrl[CTRL_EPOCH] = self.membership.epoch
        self.set_sequence(first_tag(self.membership.epoch), first_tag(self.membership.epoch))
        self.peer_base = torch.zeros(num_ranks, dtype=torch.int64, device=self.device)
        self.peer_base[rank] = self.alloc.ptr
        self._imports: dict[int, Any] = {}
        self.connected: set[int] = {rank}  # peers whose current buffer is mapped (add_peer)

        store.set(store_key(group, rank), json.dumps({
            "address": self.server.public_address, "nbytes": self.alloc.nbytes,
            "layout": layout.signature(), "pid": os.getpid(), "time": time.time()}))
        for peer in (range(num_ranks) if connect is None else connect):
            if peer != rank:
                self.add_peer(peer)
        torch.cuda.synchronize(self.device)

    # ---- views ----------------------------------------------------------------------------

    def recv_views(self) -> RankReceive:
        """This rank's receive layout (views of the peer buffer; see the module docstring)."""
        lay, buf = self.layout, self._buffer
        S, R, M, H = lay.slots_per_rank, lay.num_ranks, lay.max_tokens_per_rank, lay.hidden
        src = buf[lay.off_src_token:lay.off_src_token + lay.num_rows * 4].view(torch.int32).view(S, R, M)
        if self.use_fp8:
            x = buf[lay.off_recv_x:lay.off_recv_x + lay.num_rows * H].view(torch.float8_e4m3fn).view(S, R, M, H)
            scale = buf[lay.off_recv_scale:lay.off_recv_scale + lay.num_rows * 4].view(torch.float32).view(S, R, M)
            return RankReceive(x=x, count=self.vis_count, src_token=src, scale=scale)
        x = buf[lay.off_recv_x:lay.off_recv_x + lay.num_rows * lay.row_nbytes].view(torch.bfloat16).view(S, R, M, H)
        return RankReceive(x=x, count=self.vis_count, src_token=src)

    # ---- data plane -------------------------------------------------------------------------

    def dispatch(self, x: torch.Tensor, phys: torch.Tensor) -> tuple[RankReceive, DispatchHandle]:
        """Send every token copy to the rank hosting its physical slot (one kernel launch; with FP8
        and kernel set v1 two, the first quantizing each token once).

        Parameters:
            x: ``[num_tokens, hidden]`` bf16, contiguous, ``num_tokens <= max_tokens_per_rank``.
            phys: ``[num_tokens, top_k]`` int64 physical slots (``route_to_phys``), NO_EXPERT = -1.
        Returns:
            the receive views (valid until this rank's next combine returns) and the handle.
        """
        num_tokens = self._check_tokens(x, phys)
        if self.kernel_set == "v2":  # one launch, the FP8 cast inside it
            blocks = v2_send_blocks(self.num_blocks)
            self._launch("eep2_dispatch", (self._params(num_tokens, x=x.data_ptr(), phys=phys.data_ptr()),
                                           make_signal_params(self.layout)),
                         self.layout.dispatch_v2_smem_bytes(self.top_k, blocks), grid=blocks)
            return self.recv_views(), DispatchHandle(phys=phys, position=self.handle_pos[:num_tokens])
        stage = dict(stage=self.stage.data_ptr(), stage_scale=self.stage_scale.data_ptr()) if self.use_fp8 else {}
        params = self._params(num_tokens, x=x.data_ptr(), phys=phys.data_ptr(), **stage)
        if self.use_fp8 and num_tokens and self.decode == "pull":  # one block per token row
            self._launch("eep_quantize_rows", params, 0, grid=num_tokens)
        elif self.use_fp8 and num_tokens:
            self._launch("eep_quantize", params, 0, grid=(num_tokens + 15) // 16)
        self._launch("eep_dispatch", params, self.layout.dispatch_smem_bytes())
        return self.recv_views(), DispatchHandle(phys=phys, position=self.handle_pos[:num_tokens])

    def combine(self, y: torch.Tensor, handle: DispatchHandle, topk_weights: torch.Tensor,
                out: torch.Tensor | None = None) -> torch.Tensor:
        """Bring expert outputs home and sum them with the top-k weights (float32 accumulation).

        Parameters:
            y: ``[slots_per_rank, num_ranks, max_tokens_per_rank, hidden]`` bf16 expert outputs in
                the receive layout (rows past each block's count are ignored).
            handle: from this rank's dispatch of the same step.
            topk_weights: ``[num_tokens, top_k]`` float32.
            out: optional ``[num_tokens, hidden]`` bf16 destination.
        Returns:
            ``[num_tokens, hidden]`` bf16; absent contributions (inactive or late ranks) add nothing.
        """
        lay = self.layout
        shape = (lay.slots_per_rank, lay.num_ranks, lay.max_tokens_per_rank, lay.hidden)
        if tuple(y.shape) != shape or y.dtype != torch.bfloat16 or not y.is_contiguous():
            raise ValueError(f"combine: y has shape {tuple(y.shape)} {y.dtype}, expected contiguous bf16 {shape}")
        num_tokens = self._check_tokens(None, handle.phys)
        if tuple(topk_weights.shape) != tuple(handle.phys.shape) or topk_weights.dtype != torch.float32:
            raise ValueError(f"combine: topk_weights has shape {tuple(topk_weights.shape)} {topk_weights.dtype}, "
                             f"expected float32 {tuple(handle.phys.shape)}")
        topk_weights = topk_weights.contiguous()
        if out is None:
            out = torch.empty(num_tokens, lay.hidden, dtype=torch.bfloat16, device=self.device)
        elif tuple(out.shape) != (num_tokens, lay.hidden) or out.dtype != torch.bfloat16 or not out.is_contiguous():
            raise ValueError(f"combine: out has shape {tuple(out.shape)} {out.dtype}, "
                             f"expected contiguous bf16 ({num_tokens}, {lay.hidden})")
        if self.kernel_set == "v2":  # one launch: push to the other ranks, then reduce (own rows read in place)
            send = 0 if self.num_ranks == 1 else v2_send_blocks(self.num_blocks)
            params = self._params(num_tokens, x=y.data_ptr(), phys=handle.phys.data_ptr(),
                                  weights=topk_weights.data_ptr(), out=out.data_ptr())
            self._launch("eep2_combine", (params, make_signal_params(self.layout, num_send_blocks=send)),
                         self.layout.combine_send_smem_bytes(), grid=send + self.num_blocks)
            return out
        reduce = self._params(num_tokens, phys=handle.phys.data_ptr(), weights=topk_weights.data_ptr(),
                              out=out.data_ptr())
        if self.decode == "pull":
            if y.data_ptr() != self.combine_input().data_ptr():  # else the experts wrote in place
                self._launch("eep_combine_stage", self._params(num_tokens, x=y.data_ptr()),
                             self.layout.combine_send_smem_bytes())
            self._launch("eep_combine_ready", self._params(num_tokens), 0, grid=1)
            self._launch("eep_combine_pull", reduce, 0)
            return out
        send = self._params(num_tokens, x=y.data_ptr())
        self._launch("eep_combine_send", send, self.layout.combine_send_smem_bytes())
        self._launch("eep_combine_reduce", reduce, 0)
        return out

    def combine_input(self) -> torch.Tensor:
        """``[slots_per_rank, num_ranks, max_tokens_per_rank, hidden]`` bf16 view of this rank's peer
        buffer where the ``decode="pull"`` combine reads expert outputs from (the comb_x region, which
        the pull path does not otherwise use). Experts that write their outputs here and pass this view
        as ``combine``'s ``y`` save the staging copy; any other ``y`` is copied in (rows below each
        count only). Write it only after this rank's dispatch of the same step returned."""
        lay = self.layout
        region = self._buffer[lay.off_comb_x:lay.off_comb_x + lay.num_rows * lay.row_nbytes]
        return region.view(torch.bfloat16).view(lay.slots_per_rank, lay.num_ranks, lay.max_tokens_per_rank,
                                                lay.hidden)

    # ---- membership -------------------------------------------------------------------------

    @property
    def active_mask(self) -> torch.Tensor:
        """int32 ``[num_ranks]`` on the device: the membership's mirror, the mask every launch reads."""
        return self.membership.active_device

    def set_membership(self, membership: Membership) -> None:
        """Adopt ``membership`` (mask written in place on the current stream), forget earlier
        suspicions, restart both step counters at ``first_tag(epoch)``. Every member calls it with the
        same membership between the same two steps; a process that joins calls it before its first step."""
        adopt(self, membership)
        self.suspect.zero_()
        self.ctrl[CTRL_EPOCH] = self.membership.epoch
        self.set_sequence(first_tag(self.membership.epoch), first_tag(self.membership.epoch))

    def connect(self, ranks: Sequence[int], *, timeout_s: float = 60.0) -> None:
        """Map each peer's current buffer (``add_peer``) within one deadline; raises
        ``eep.errors.PeerUnreachableError`` naming the peers that did not hand theirs over (dead or
        stopped), after mapping the others. Mapping does not activate: ``set_membership`` does."""
        connect_each(self.rank, list(ranks), timeout_s, lambda peer, seconds: self.add_peer(peer, timeout_s=seconds))

    def add_peer(self, rank: int, *, timeout_s: float = 60.0) -> None:
        """Map ``rank``'s current buffer (read from the store) and write it into the peer table.

        For a rejoin this is the whole cost on a survivor: one import, one table write (plus
        ``set_membership``); no reallocation, no collective, no graph recapture.

        Raises ``OSError`` (``TimeoutError``, ``ConnectionError``) naming ``rank`` when the peer did
        not publish its record or hand over its buffer within ``timeout_s`` each (it is dead or
        stopped): the peer's failure, which callers report instead of dying of it. The peer table
        is left as it was.
        """
        import torch.distributed as dist

        from eep.fused.peer_memory import ImportedAllocation
        from eep.transport.fd_passing import fetch_fd

        if rank == self.rank or not 0 <= rank < self.num_ranks:
            raise ValueError(f"add_peer: rank {rank} is this rank or outside [0, {self.num_ranks})")
        self.connected.discard(rank)  # until this incarnation's buffer is mapped
        key = store_key(self.group, rank)
        try:
            self.store.wait([key], _timedelta(timeout_s))
        except dist.DistStoreError as exc:  # a timeout; a lost store (DistNetworkError) is not the peer's doing
            raise TimeoutError(f"add_peer: rank {rank} published no buffer under {key!r} within {timeout_s:.3g} s: "
                               f"{exc}") from exc
        record = json.loads(self.store.get(key))
        if record["layout"] != self.layout.signature():
            raise ValueError(f"add_peer: rank {rank} published layout {record['layout']}, "
                             f"this rank has {self.layout.signature()} (shape arguments differ)")
        try:
            fd, header = fetch_fd(record["address"], timeout_s=timeout_s)
        except OSError as exc:
            raise ConnectionError(f"add_peer: rank {rank} (pid {record.get('pid')}) did not hand over its buffer "
                                  f"within {timeout_s:.3g} s: {exc}") from exc
        imported = ImportedAllocation(fd, int(header["nbytes"]), self.device.index)
        old = self._imports.pop(rank, None)
        self._imports[rank] = imported
        self.peer_base[rank] = imported.ptr
        self.connected.add(rank)
        self.ctrl[CTRL_SUSPECT + rank] = 0
        if old is not None:  # the dead incarnation's mapping: no kernel in flight reads it any more
            torch.cuda.current_stream(self.device).synchronize()
            old.close()

    def set_sequence(self, dispatch_seq: int, combine_seq: int) -> None:
        """Set the step counters (``set_membership`` restarts them at the epoch's first tag)."""
        self.ctrl[CTRL_DISPATCH_SEQ] = int(dispatch_seq)
        self.ctrl[CTRL_COMBINE_SEQ] = int(combine_seq)

    def set_timeout(self, timeout_s: float) -> None:
        """Bound on every wait for a peer, from the next launch on. A ``fill_`` with a Python scalar is
        a kernel argument, not a host-to-device copy, so a CUDA graph can capture it."""
        self.ctrl[CTRL_TIMEOUT_NS:CTRL_TIMEOUT_NS + 1].fill_(int(timeout_s * 1e9))

    def status(self) -> FusedStatus:
        ctrl = self.ctrl.cpu().tolist()
        R = self.num_ranks

        def span(start: int) -> list[int]:
            return ctrl[start:start + R]

        epoch = ctrl[CTRL_EPOCH]
        return FusedStatus(
            epoch=epoch, step=ctrl[CTRL_DISPATCH_SEQ] + ctrl[CTRL_COMBINE_SEQ] - 2 * first_tag(epoch),
            active=[bool(a) for a in self.active_mask.cpu().tolist()],
            suspect=[bool(v) for v in span(CTRL_SUSPECT)], miss_count=span(CTRL_MISS_COUNT),
            dispatch_seq=ctrl[CTRL_DISPATCH_SEQ], combine_seq=ctrl[CTRL_COMBINE_SEQ],
            timeout_s=ctrl[CTRL_TIMEOUT_NS] / 1e9, dispatch_ok=[bool(v) for v in span(CTRL_DISPATCH_OK)],
            combine_ok=[bool(v) for v in span(CTRL_COMBINE_OK)], last_miss_seq=span(CTRL_LAST_MISS_SEQ))

    def close(self) -> None:
        torch.cuda.synchronize(self.device)
        self.server.close()
        for imported in self._imports.values():
            imported.close()
        self._imports.clear()
        self._buffer = None
        self.alloc.close()

    # ---- internals --------------------------------------------------------------------------

    def _check_tokens(self, x: torch.Tensor | None, phys: torch.Tensor) -> int:
        if phys.dim() != 2 or phys.shape[1] != self.top_k or phys.dtype != torch.int64 or not phys.is_contiguous():
            raise ValueError(f"phys has shape {tuple(phys.shape)} {phys.dtype}, expected contiguous int64 "
                             f"[num_tokens, top_k={self.top_k}]")
        num_tokens = phys.shape[0]
        if num_tokens > self.layout.max_tokens_per_rank:
            raise ValueError(f"rank {self.rank} has {num_tokens} tokens, more than max_tokens_per_rank="
                             f"{self.layout.max_tokens_per_rank}")
        if x is not None:
            if (tuple(x.shape) != (num_tokens, self.layout.hidden) or x.dtype != torch.bfloat16
                    or not x.is_contiguous() or x.data_ptr() % 16):
                raise ValueError(f"x has shape {tuple(x.shape)} {x.dtype}, expected contiguous 16-byte aligned "
                                 f"bf16 ({num_tokens}, {self.layout.hidden})")
        return num_tokens

    def _params(self, num_tokens: int, **pointers: int):
        return make_params(self.layout, my_rank=self.rank, top_k=self.top_k, num_tokens=num_tokens,
                           ctrl=self.ctrl.data_ptr(), peer_base=self.peer_base.data_ptr(),
                           active=self.active_mask.data_ptr(), handle_pos=self.handle_pos.data_ptr(),
                           vis_count=self.vis_count.data_ptr(), **pointers)

    def _launch(self, name: str, params, smem_bytes: int, *, grid: int | None = None) -> None:
        from cuda.bindings import driver
        from eep.fused.cuda_util import check

        structs = params if isinstance(params, tuple) else (params,)  # v2 kernels take two
        arg = (ctypes.c_void_p * len(structs))(*[ctypes.addressof(p) for p in structs])
        stream = driver.CUstream(torch.cuda.current_stream(self.device).cuda_stream)
        if grid is None:
            grid = 1 if name == "eep_combine_reduce" and structs[0].num_tokens == 0 else self.num_blocks
        if name in PDL_KERNELS and self.pdl:
            config = pdl_launch_config(grid, THREADS_PER_BLOCK, smem_bytes, stream)
            check(driver.cuLaunchKernelEx(config, self.kernels.functions[name], ctypes.addressof(arg), 0),
                  f"cuLaunchKernelEx({name}, programmatic stream serialization)")
            return
        check(driver.cuLaunchKernel(self.kernels.functions[name], grid, 1, 1, THREADS_PER_BLOCK, 1, 1,
                                    smem_bytes, stream, ctypes.addressof(arg), 0), f"cuLaunchKernel({name})")

    def _set_smem_limits(self, smem: dict[str, int]) -> None:
        from cuda.bindings import driver
        from eep.fused.cuda_util import check

        attr = driver.CUfunction_attribute.CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES
        for name, nbytes in smem.items():
            if nbytes > 48 * 1024:
                if nbytes > 200 * 1024:
                    raise ValueError(f"{name} needs {nbytes} B of shared memory for layout "
                                     f"{self.layout.signature()}; lower max_tokens_per_rank or slots_per_rank")
                check(driver.cuFuncSetAttribute(self.kernels.functions[name], attr, nbytes), "cuFuncSetAttribute")


# The kernels that start with eep2_launch_dependents / eep2_grid_wait (csrc/signals_v2.cuh): only they
# may be launched before the kernel ahead of them in the stream has finished.
PDL_KERNELS = frozenset({"eep2_dispatch", "eep2_combine"})


def pdl_launch_config(grid: int, threads: int, smem_bytes: int, stream: Any) -> Any:
    """``cuLaunchKernelEx`` configuration of a programmatic dependent launch: the kernel may begin
    once every block of the previous kernel in ``stream`` has begun (or called
    ``griddepcontrol.launch_dependents``); it waits for that kernel's completion itself. Under stream
    capture the driver records the dependency as a programmatic graph edge."""
    from cuda.bindings import driver

    attr = driver.CUlaunchAttribute()
    attr.id = driver.CUlaunchAttributeID.CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION
    attr.value.programmaticStreamSerializationAllowed = 1
    config = driver.CUlaunchConfig()
    config.gridDimX, config.gridDimY, config.gridDimZ = grid, 1, 1
    config.blockDimX, config.blockDimY, config.blockDimZ = threads, 1, 1
    config.sharedMemBytes = smem_bytes
    config.hStream = stream
    config.attrs = [attr]
    config.numAttrs = 1
    return config


def v2_send_blocks(num_blocks: int) -> int:
    """Sending blocks of a v2 launch: the grid, capped by the flags each (destination, source) has."""
    return max(1, min(num_blocks, MAX_SIGNAL_BLOCKS))


def kernel_smem(kernel_set: str, top_k: int, v1: dict[str, int],
                v2: Callable[[int], dict[str, int]]) -> dict[str, int] | Callable[[int], dict[str, int]]:
    """Dynamic shared memory per kernel of a buffer: kernel set v1's fixed sizes, or v2's as a function
    of the grid (``v2`` takes the number of sending blocks; ``_open`` resolves it once the grid is known)."""
    if kernel_set != "v2":
        return v1
    check_v2_top_k(top_k)
    return lambda blocks: v2(v2_send_blocks(blocks))


def check_v2_top_k(top_k: int) -> None:
    if not 1 <= top_k <= 32:
        raise ValueError(f"top_k={top_k}: kernel set v2 assigns a token's rows with one lane per choice (1..32)")


def _timedelta(seconds: float):
    import datetime
    return datetime.timedelta(seconds=seconds)
