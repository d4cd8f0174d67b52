"""The host shared-memory backend of the exchange seam: decode and prefill over ``SharedMemoryTransport``.

How CI runs the whole elastic protocol with real processes and real SIGKILLs on CPU: the runtime's
CPU engines, ``eep.Buffer`` on the CPU and the SGLang plugin's CPU path all exchange through it.

One wire format per mode; each message goes to one destination, in that destination's region for
this source (``eep.transport``), tagged ``(epoch, step)``:

    decode dispatch   count int32 [slots_per_rank] | src_token int32 [n] | rows [n, hidden] (x.dtype,
                      or e4m3 with FP8) | scales float32 [n, hidden // 128] (FP8 only)
    decode combine    rows [n, hidden], the expert outputs of the n rows received, in the same order
    prefill dispatch  n, top_k int32 | src_token int32 [n] | local_slot int32 [n, top_k] |
                      weight float32 [n, top_k] | rows [n, hidden]
    prefill combine   rows [n, hidden], each received row's partial sum

where the ``n`` rows of a decode message are its blocks' live rows, slot after slot (``packing``).
Every member sends one message to every member, itself included (an empty one when it has nothing
for it), so each receive waits for a fixed set of peers and a missing one is detected, never waited
on past the timeout. A destination's region is rewritten only after its reader answered (a source
sends the next dispatch only after the combine of this step, which needs every reader's reply), so
two channels serve every layer.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence

import torch

from eep.fp8 import BLOCK as FP8_BLOCK
from eep.fp8 import quantize_rows
from eep.exchange.layout import DispatchHandle, PackedHandle, PackedReceive, RankReceive
from eep.exchange.packing import (compact_rows, expand_rows, gather_combine, pack_by_destination,
                                  pack_tokens_by_destination)
from eep.exchange.protocol import ExchangeStatus, adopt, connect_each
from eep.state import Membership
from eep.transport.fd_passing import ADDRESS_PREFIX, FdServer, fetch_fd
from eep.transport.shm import SharedMemoryTransport


class StepInterrupted(Exception):
    """A wait stopped early because ``should_abort()`` said so (a new membership decision arrived);
    the peers still pending are not suspected. The caller discards the step."""

    def __init__(self, phase: str, pending: list[int]):
        self.phase, self.pending = phase, pending
        super().__init__(f"{phase} interrupted while waiting for ranks {pending}")


class _ShmBase:
    """Membership, evidence and the bounded exchange of one message per member (both modes)."""

    is_membership_aware = True
    is_graph_safe = False  # waits poll host memory

    def __init__(self, transport: SharedMemoryTransport, *, membership: Membership | None, timeout_s: float,
                 channels: tuple[int, int], should_abort: Callable[[], bool] | None):
        if max(channels) >= transport.num_channels:
            raise ValueError(f"channels {channels} need a transport file with more than {max(channels)} channels, "
                             f"{transport.path} has {transport.num_channels}")
        self.transport = transport
        self.rank, self.num_ranks = transport.rank, transport.num_ranks
        self.membership = membership if membership is not None else Membership(self.num_ranks)
        self.timeout_s = timeout_s
        self.channels = channels
        self.should_abort = should_abort
        self.miss_count = torch.zeros(self.num_ranks, dtype=torch.int64)
        self.suspect = torch.zeros(self.num_ranks, dtype=torch.int64)
        self.epoch, self.step = self.membership.epoch, 0
        # Every process maps the same file, so the ranks that map it at the start need no handshake;
        # a rank's later incarnation is connected through one (``connect``), as a GPU peer buffer is.
        self.connected: set[int] = set(range(self.num_ranks))
        self._file_fd = os.open(transport.path, os.O_RDONLY)
        st = os.fstat(self._file_fd)
        self._file_id = (st.st_dev, st.st_ino)
        self.server = FdServer(self._file_fd, {"rank": self.rank, "pid": os.getpid()},
                               name=self._server_name(self.rank))

    def _server_name(self, rank: int) -> str:
        return f"shm-{self._file_id[0]:x}-{self._file_id[1]:x}-r{rank}-c{self.channels[0]}"

    # ---- membership verbs ----
    def connect(self, ranks: Sequence[int], *, timeout_s: float) -> None:
        """Handshake with each peer process: it hands over its descriptor of the transport file,
        checked to be this file. A dead peer's socket refuses at once; a stopped one does not answer
        within the deadline: ``PeerUnreachableError`` names both, the others are connected."""
        def one(peer: int, seconds: float) -> None:
            self.connected.discard(peer)  # until this incarnation answers
            fd, header = fetch_fd("@" + ADDRESS_PREFIX[1:] + self._server_name(peer), timeout_s=seconds)
            try:
                st = os.fstat(fd)
            finally:
                os.close(fd)
            if (st.st_dev, st.st_ino) != self._file_id or header.get("rank") != peer:
                raise ConnectionError(f"rank {self.rank}: the server of rank {peer} handed over another file "
                                      f"(header {header})")
            self.connected.add(peer)

        connect_each(self.rank, list(ranks), timeout_s, one)

    def set_membership(self, membership: Membership) -> None:
        adopt(self, membership)
        self.epoch, self.step = self.membership.epoch, 0
        self.suspect.zero_()

    def set_timeout(self, timeout_s: float) -> None:
        self.timeout_s = timeout_s

    def status(self) -> ExchangeStatus:
        return ExchangeStatus(epoch=self.epoch, step=self.step, active=self.membership.active_device.bool().tolist(),
                              suspect=self.suspect.bool().tolist(), miss_count=self.miss_count.tolist())

    def close(self) -> None:
        """Stop serving the handshake (the transport belongs to whoever made it)."""
        self.server.close()
        os.close(self._file_fd)

    # ---- one round: a message to every member, a message from every member ----
    def _members(self) -> list[int]:
        mask = self.membership.active_device.tolist()
        return [r for r in range(self.num_ranks) if mask[r] and not self.suspect[r]]

    def _round(self, channel: int, payloads: dict[int, torch.Tensor], phase: str) -> dict[int, torch.Tensor]:
        peers = self._members()
        for dst in peers:
            self.transport.send(channel, dst, payloads[dst], epoch=self.epoch, step=self.step)
        got = self.transport.recv(channel, peers, epoch=self.epoch, step=self.step, timeout_s=self.timeout_s,
                                  should_abort=self.should_abort)
        self.step += 1
        if got.is_aborted:
            raise StepInterrupted(phase, got.missed)
        for peer in got.missed:  # evidence; not waited for again until the next set_membership
            self.miss_count[peer] += 1
            self.suspect[peer] = 1
        return got.buffers


class ShmExchange(_ShmBase):
    """Decode mode over shared memory (``DecodeExchange``).

    Parameters:
        transport: this rank's ``SharedMemoryTransport`` (its file is shared by every rank).
        slots_per_rank, max_tokens_per_rank, hidden: the receive layout (identical on every rank).
        dtype: the activations' dtype (what ``dispatch`` takes and ``combine`` returns).
        use_fp8: send e4m3 rows with per-128-channel scales (``eep.fp8``).
        membership: the process's ``Membership`` (default: a new one, all active).
        timeout_s: bound on every wait for one peer. channels: (dispatch, combine) transport channels.
        should_abort: polled while waiting; True interrupts the wait (``StepInterrupted``).
    """

    def __init__(self, transport: SharedMemoryTransport, *, slots_per_rank: int, max_tokens_per_rank: int,
                 hidden: int, dtype: torch.dtype = torch.bfloat16, use_fp8: bool = False,
                 membership: Membership | None = None, timeout_s: float = 1.0, channels: tuple[int, int] = (0, 1),
                 should_abort: Callable[[], bool] | None = None):
        super().__init__(transport, membership=membership, timeout_s=timeout_s, channels=channels,
                         should_abort=should_abort)
        self.slots_per_rank, self.max_tokens_per_rank, self.hidden = slots_per_rank, max_tokens_per_rank, hidden
        self.dtype, self.use_fp8 = dtype, use_fp8
        need = self.capacity_nbytes(slots_per_rank, max_tokens_per_rank, hidden, elem_nbytes=dtype.itemsize,
                                    use_fp8=use_fp8)
        if transport.capacity_nbytes < need:
            raise ValueError(f"{transport.path}: regions of {transport.capacity_nbytes} bytes, decode messages of "
                             f"{slots_per_rank} slots x {max_tokens_per_rank} rows x hidden {hidden} need {need}")

    @staticmethod
    def capacity_nbytes(slots_per_rank: int, max_tokens_per_rank: int, hidden: int, *, elem_nbytes: int = 2,
                        use_fp8: bool = False) -> int:
        """Bytes one transport region needs: the larger of a dispatch and a combine message."""
        rows = slots_per_rank * max_tokens_per_rank
        row_nbytes = hidden + hidden // FP8_BLOCK * 4 if use_fp8 else hidden * elem_nbytes
        dispatch = 4 * slots_per_rank + 4 * rows + rows * row_nbytes
        return -(-max(dispatch, rows * hidden * elem_nbytes) // 64) * 64

    def dispatch(self, x: torch.Tensor, phys: torch.Tensor) -> tuple[RankReceive, DispatchHandle]:
        S, M, H, R = self.slots_per_rank, self.max_tokens_per_rank, self.hidden, self.num_ranks
        if x.dim() != 2 or x.shape[1] != H or x.shape[0] > M or phys.shape[0] != x.shape[0] or x.dtype != self.dtype:
            raise ValueError(f"rank {self.rank}: x {tuple(x.shape)} {x.dtype} / phys {tuple(phys.shape)} do not fit "
                             f"[<= {M} tokens, hidden {H}] {self.dtype}")
        packed = pack_by_destination(x, phys.long(), R, S, M)
        values, scales = quantize_rows(packed.send) if self.use_fp8 else (packed.send, None)
        payloads = {}
        for dst in range(R):
            parts = [packed.count[dst], compact_rows(packed.src_token[dst], packed.count[dst]),
                     compact_rows(values[dst], packed.count[dst])]
            if scales is not None:
                parts.append(compact_rows(scales[dst], packed.count[dst]))
            payloads[dst] = torch.cat([p.contiguous().view(-1).view(torch.uint8) for p in parts])
        got = self._round(self.channels[0], payloads, "dispatch")

        wire = values.dtype
        recv = RankReceive(x=torch.zeros(S, R, M, H, dtype=wire), count=torch.zeros(S, R, dtype=torch.int32),
                           src_token=torch.full((S, R, M), -1, dtype=torch.int32),
                           scale=torch.zeros(S, R, M, H // FP8_BLOCK) if self.use_fp8 else None)
        for src, region in got.items():
            count = region[:4 * S].view(torch.int32).clone()
            n = int(count.sum())
            off = 4 * S
            recv.src_token[:, src] = expand_rows(region[off:off + 4 * n].view(torch.int32), count, M, fill=-1)
            off += 4 * n
            row_nbytes = H * wire.itemsize
            recv.x[:, src] = expand_rows(region[off:off + n * row_nbytes].view(wire).view(n, H), count, M)
            off += n * row_nbytes
            if self.use_fp8:
                blocks = H // FP8_BLOCK
                recv.scale[:, src] = expand_rows(region[off:off + 4 * n * blocks].view(torch.float32).view(n, blocks),
                                                 count, M)
            recv.count[:, src] = count
        # what this step's combine sends back (rows per (slot, source)) and expects (rows per (dst, slot))
        self._recv_count, self._sent_count = recv.count.clone(), packed.count.clone()
        return recv, DispatchHandle(phys=phys, position=packed.position)

    def combine(self, y: torch.Tensor, handle: DispatchHandle, topk_weights: torch.Tensor,
                out: torch.Tensor | None = None) -> torch.Tensor:
        """``y [slots_per_rank, num_ranks, max_tokens_per_rank, hidden]``: this rank's expert outputs
        in the receive layout of the same step (its counts are the dispatch's). Returns
        ``[num_tokens, hidden]`` in ``y``'s dtype: float32 sums rounded once."""
        S, M, H, R = self.slots_per_rank, self.max_tokens_per_rank, self.hidden, self.num_ranks
        payloads = {src: compact_rows(y[:, src], self._recv_count[:, src]).contiguous().view(-1).view(torch.uint8)
                    for src in range(R)}
        got = self._round(self.channels[1], payloads, "combine")
        home = torch.zeros(R, S, M, H, dtype=y.dtype)
        sent_count = self._sent_count
        for dst, region in got.items():
            n = int(sent_count[dst].sum())
            home[dst] = expand_rows(region[:n * H * y.dtype.itemsize].view(y.dtype).view(n, H), sent_count[dst], M)
        combined = gather_combine(home, handle.phys.long(), handle.position, topk_weights).to(y.dtype)
        if out is None:
            return combined
        out.copy_(combined)
        return out


class ShmPrefillExchange(_ShmBase):
    """Prefill mode over shared memory (``PrefillExchange``); parameters as ``ShmExchange``'s plus ``top_k``
    (default channels 2 and 3, so a process can hold a decode and a prefill exchange on one file)."""

    def __init__(self, transport: SharedMemoryTransport, *, slots_per_rank: int, max_tokens_per_rank: int,
                 hidden: int, top_k: int, dtype: torch.dtype = torch.bfloat16, membership: Membership | None = None,
                 timeout_s: float = 1.0, channels: tuple[int, int] = (2, 3),
                 should_abort: Callable[[], bool] | None = None):
        super().__init__(transport, membership=membership, timeout_s=timeout_s, channels=channels,
                         should_abort=should_abort)
        self.slots_per_rank, self.max_tokens_per_rank, self.hidden, self.top_k = (slots_per_rank, max_tokens_per_rank,
                                                                                  hidden, top_k)
        self.dtype = dtype
        need = self.capacity_nbytes(max_tokens_per_rank, hidden, top_k, elem_nbytes=dtype.itemsize)
        if transport.capacity_nbytes < need:
            raise ValueError(f"{transport.path}: regions of {transport.capacity_nbytes} bytes, prefill messages of "
                             f"{max_tokens_per_rank} rows x hidden {hidden} need {need}")

    @staticmethod
    def capacity_nbytes(max_tokens_per_rank: int, hidden: int, top_k: int, *, elem_nbytes: int = 2) -> int:
        rows = max_tokens_per_rank
        dispatch = 8 + rows * (4 + 8 * top_k) + rows * hidden * elem_nbytes
        return -(-max(dispatch, rows * hidden * elem_nbytes) // 64) * 64

    def dispatch(self, x: torch.Tensor, phys: torch.Tensor,
                 topk_weights: torch.Tensor) -> tuple[PackedReceive, PackedHandle]:
        S, M, H, R, K = self.slots_per_rank, self.max_tokens_per_rank, self.hidden, self.num_ranks, self.top_k
        if x.dim() != 2 or x.shape[1] != H or x.shape[0] > M or tuple(phys.shape) != (x.shape[0], K) \
                or x.dtype != self.dtype:
            raise ValueError(f"rank {self.rank}: x {tuple(x.shape)} {x.dtype} / phys {tuple(phys.shape)} do not fit "
                             f"[<= {M} tokens, hidden {H}, top_k {K}] {self.dtype}")
        per_dst, dst_row = pack_tokens_by_destination(phys.long(), topk_weights, R, S)
        payloads = {}
        for dst, p in enumerate(per_dst):
            head = torch.tensor([p.tokens.numel(), K], dtype=torch.int32)
            parts = [head, p.tokens.to(torch.int32), p.local_slot, p.weight, x[p.tokens]]
            payloads[dst] = torch.cat([t.contiguous().view(-1).view(torch.uint8) for t in parts])
        got = self._round(self.channels[0], payloads, "dispatch")

        recv = PackedReceive(x=torch.zeros(R, M, H, dtype=x.dtype), count=torch.zeros(R, dtype=torch.int32),
                             src_token=torch.full((R, M), -1, dtype=torch.int32),
                             local_slot=torch.full((R, M, K), -1, dtype=torch.int32),
                             weight=torch.zeros(R, M, K, dtype=torch.float32))
        for src, region in got.items():
            n, k = (int(v) for v in region[:8].view(torch.int32))
            off = 8
            recv.src_token[src, :n] = region[off:off + 4 * n].view(torch.int32)
            off += 4 * n
            recv.local_slot[src, :n] = region[off:off + 4 * n * k].view(torch.int32).view(n, k)
            off += 4 * n * k
            recv.weight[src, :n] = region[off:off + 4 * n * k].view(torch.float32).view(n, k)
            off += 4 * n * k
            recv.x[src, :n] = region[off:off + n * H * x.element_size()].view(x.dtype).view(n, H)
            recv.count[src] = n
        self._recv_count = recv.count.clone()
        return recv, PackedHandle(dst_row=dst_row)

    def combine(self, partial: torch.Tensor, handle: PackedHandle, out: torch.Tensor | None = None) -> torch.Tensor:
        R, H = self.num_ranks, self.hidden
        payloads = {src: partial[src, :int(self._recv_count[src])].contiguous().view(-1).view(torch.uint8)
                    for src in range(R)}
        got = self._round(self.channels[1], payloads, "combine")
        acc = torch.zeros(handle.dst_row.shape[0], H, dtype=torch.float32)
        for dst in sorted(got):  # ascending rank order, float32, rounded once
            sent = handle.dst_row[:, dst] >= 0
            n = int(sent.sum())
            rows = got[dst][:n * H * partial.element_size()].view(partial.dtype).view(n, H)
            acc[sent] += rows[handle.dst_row[sent, dst]].float()
        combined = acc.to(partial.dtype)
        if out is None:
            return combined
        out.copy_(combined)
        return out
