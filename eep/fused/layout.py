"""Byte layout of one rank's peer buffer, the device control block and the kernel parameters.

Every rank allocates one buffer of the same layout, once, for all ``num_ranks`` rank slots:

    recv_x         [slots_per_rank, num_ranks, max_tokens_per_rank, hidden] bf16  dispatch lands here
                   (FP8 dispatch: e4m3 rows of hidden bytes in the first half of the region)
    comb_x         [num_ranks, slots_per_rank, max_tokens_per_rank, hidden] bf16  combine lands here
    src_token      [slots_per_rank, num_ranks, max_tokens_per_rank]        int32
    recv_scale     [slots_per_rank, num_ranks, max_tokens_per_rank]        float32 (FP8 dispatch only)
    raw_count      [slots_per_rank, num_ranks]                             int32  written by senders
    dispatch_flag  [num_ranks] uint64, entry s = last dispatch step source s finished writing here
    combine_flag   [num_ranks] uint64, entry d = last combine step expert rank d finished writing here
    dispatch_signal, combine_signal  [num_ranks, MAX_SIGNAL_BLOCKS] uint64, kernel set v2: one flag
                   per (source, sending block), csrc/signals_v2.cuh (v1 never touches them)

Peers write into it through NVLink; the owner reads it locally. Regions start on 256-byte
boundaries. This module is pure Python (no CUDA import); it mirrors csrc/common.cuh.
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass

MAX_RANKS = 64  # EEP_MAX_RANKS in csrc/common.cuh
MAX_SIGNAL_BLOCKS = 256  # EEP_MAX_SIGNAL_BLOCKS in csrc/signals_v2.cuh: most sending blocks of a v2 launch
ALIGN = 256
THREADS_PER_BLOCK = 512  # __launch_bounds__ of every kernel

# EepCtrl (csrc/common.cuh): an int64 tensor of CTRL_NUMEL entries.
CTRL_DISPATCH_SEQ, CTRL_COMBINE_SEQ, CTRL_TIMEOUT_NS, CTRL_EPOCH = 0, 1, 2, 3
CTRL_DISPATCH_ARRIVED, CTRL_COMBINE_ARRIVED = 4, 5
CTRL_COMBINE_READY_SEQ, CTRL_COMBINE_DROPPED = 6, 7  # kernel set v2's combine verdict
CTRL_HEADER = 8
CTRL_DISPATCH_OK = CTRL_HEADER
CTRL_COMBINE_OK = CTRL_DISPATCH_OK + MAX_RANKS
CTRL_SUSPECT = CTRL_COMBINE_OK + MAX_RANKS
CTRL_MISS_COUNT = CTRL_SUSPECT + MAX_RANKS
CTRL_LAST_MISS_SEQ = CTRL_MISS_COUNT + MAX_RANKS
CTRL_NUMEL = CTRL_LAST_MISS_SEQ + MAX_RANKS


def _align(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


def packed_offsets(regions: list[tuple[str, int]]) -> tuple[dict[str, int], int]:
    """Regions laid out one after another, each starting on an ALIGN boundary: their byte offsets by
    name, and the total size (aligned)."""
    offsets, end = {}, 0
    for name, nbytes in regions:
        offsets[name] = _align(end)
        end = offsets[name] + nbytes
    return offsets, _align(end)


class PackedRegions:
    """Base of a buffer layout: ``regions()`` lists (name, bytes) in buffer order, laid out by
    ``packed_offsets``; ``off_<name>`` is that region's byte offset and ``nbytes`` the whole buffer."""

    def regions(self) -> list[tuple[str, int]]:
        raise NotImplementedError

    def _packed(self) -> tuple[dict[str, int], int]:
        # computed once per (frozen) layout, since every launch reads the offsets
        cached = self.__dict__.get("_packed_cache")
        if cached is None:
            cached = self.__dict__["_packed_cache"] = packed_offsets(self.regions())
        return cached

    def __getattr__(self, attr: str) -> int:  # only for names not found the normal way
        if attr.startswith("off_"):
            offsets = self._packed()[0]
            if attr[4:] in offsets:
                return offsets[attr[4:]]
        raise AttributeError(f"{type(self).__name__} has no attribute {attr!r}")

    @property
    def nbytes(self) -> int:
        return self._packed()[1]


def check_ranks_and_hidden(num_ranks: int, hidden: int) -> None:
    """What every buffer layout asks of its shape: rank slots the kernels support, 16-byte rows."""
    if not 1 <= num_ranks <= MAX_RANKS:
        raise ValueError(f"num_ranks={num_ranks}: the fused kernels support 1..{MAX_RANKS} ranks")
    if hidden <= 0 or hidden % 8:
        raise ValueError(f"hidden={hidden} must be a positive multiple of 8 (16-byte vectors)")


@dataclass(frozen=True)
class BufferLayout(PackedRegions):
    """Offsets (bytes) of each region in a rank's peer buffer; identical on every rank."""

    num_ranks: int
    slots_per_rank: int
    max_tokens_per_rank: int
    hidden: int
    elem_bytes: int = 2  # bf16

    def __post_init__(self) -> None:
        check_ranks_and_hidden(self.num_ranks, self.hidden)
        if self.slots_per_rank < 1 or self.max_tokens_per_rank < 1:
            raise ValueError(f"slots_per_rank={self.slots_per_rank} and max_tokens_per_rank="
                             f"{self.max_tokens_per_rank} must both be positive")

    @property
    def num_rows(self) -> int:
        """Rows of one token-row region: slots_per_rank * num_ranks * max_tokens_per_rank."""
        return self.slots_per_rank * self.num_ranks * self.max_tokens_per_rank

    @property
    def row_nbytes(self) -> int:
        return self.hidden * self.elem_bytes

    def regions(self) -> list[tuple[str, int]]:
        """(name, bytes) of every region, in buffer order."""
        rows, pairs = self.num_rows, self.slots_per_rank * self.num_ranks
        return [("recv_x", rows * self.row_nbytes), ("comb_x", rows * self.row_nbytes), ("src_token", rows * 4),
                ("recv_scale", rows * 4), ("raw_count", pairs * 4), ("dispatch_flag", self.num_ranks * 8),
                ("combine_flag", self.num_ranks * 8), *signal_regions(self.num_ranks)]

    def dispatch_smem_bytes(self) -> int:
        """Dynamic shared memory of eep_dispatch: one bit per (slot, token)."""
        words = (self.max_tokens_per_rank + 31) // 32
        return self.slots_per_rank * self.num_ranks * words * 4

    def dispatch_v2_smem_bytes(self, top_k: int, num_blocks: int) -> int:
        """Dynamic shared memory of eep2_dispatch with ``num_blocks`` blocks: per slot its rank and the
        rows taken so far, the totals of a block's slots, its tokens' destinations and rows (and
        whether each token goes anywhere)."""
        slots = self.slots_per_rank * self.num_ranks
        tokens_per_block = -(-self.max_tokens_per_rank // num_blocks)
        return 4 * (2 * slots + -(-slots // num_blocks) + tokens_per_block * (2 * top_k + 1))

    def combine_send_smem_bytes(self) -> int:
        """Dynamic shared memory of eep_combine_send: rows and starts of every (slot, source) block."""
        pairs = self.slots_per_rank * self.num_ranks
        return (2 * pairs + 1) * 4

    def signature(self) -> str:
        """A string every rank must agree on before mapping each other's buffers."""
        return (f"R{self.num_ranks}.S{self.slots_per_rank}.M{self.max_tokens_per_rank}."
                f"H{self.hidden}.E{self.elem_bytes}.N{self.nbytes}")


def signal_regions(num_ranks: int) -> list[tuple[str, int]]:
    """The two flag arrays of kernel set v2, at the end of every buffer (v1's offsets stay as they were)."""
    return [("dispatch_signal", num_ranks * MAX_SIGNAL_BLOCKS * 8), ("combine_signal", num_ranks * MAX_SIGNAL_BLOCKS * 8)]


class SignalParams(ctypes.Structure):
    """EepSignals of csrc/signals_v2.cuh: the second parameter of every v2 kernel."""

    _fields_ = [(name, ctypes.c_uint64) for name in ("off_dispatch_signal", "off_combine_signal", "num_send_blocks")]


def make_signal_params(layout: PackedRegions, *, num_send_blocks: int = 0) -> SignalParams:
    return SignalParams(off_dispatch_signal=layout.off_dispatch_signal, off_combine_signal=layout.off_combine_signal,
                        num_send_blocks=num_send_blocks)


class KernelParams(ctypes.Structure):
    """EepParams of csrc/common.cuh: every field a u64, in the same order."""

    _fields_ = [(name, ctypes.c_uint64) for name in (
        "x", "phys", "weights", "out", "handle_pos", "vis_count", "ctrl", "peer_base", "active",
        "num_tokens", "top_k", "slots_per_rank", "num_ranks", "max_tokens", "my_rank",
        "off_recv_x", "off_src_token", "off_raw_count", "off_dispatch_flag", "off_comb_x", "off_combine_flag",
        "stage", "stage_scale", "off_recv_scale")]


def make_params(layout: BufferLayout, *, my_rank: int, top_k: int, num_tokens: int, ctrl: int, peer_base: int,
                active: int, handle_pos: int, vis_count: int, x: int = 0, phys: int = 0, weights: int = 0,
                out: int = 0, stage: int = 0, stage_scale: int = 0) -> KernelParams:
    """Fill the parameter struct; every pointer is a device address in this process."""
    return KernelParams(
        x=x, phys=phys, weights=weights, out=out, handle_pos=handle_pos, vis_count=vis_count, ctrl=ctrl,
        peer_base=peer_base, active=active, num_tokens=num_tokens, top_k=top_k,
        slots_per_rank=layout.slots_per_rank, num_ranks=layout.num_ranks,
        max_tokens=layout.max_tokens_per_rank, my_rank=my_rank,
        off_recv_x=layout.off_recv_x, off_src_token=layout.off_src_token, off_raw_count=layout.off_raw_count,
        off_dispatch_flag=layout.off_dispatch_flag, off_comb_x=layout.off_comb_x,
        off_combine_flag=layout.off_combine_flag, stage=stage, stage_scale=stage_scale,
        off_recv_scale=layout.off_recv_scale)
