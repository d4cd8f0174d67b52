"""Host shared-memory transport: one file in ``/dev/shm`` mapped by every rank process.

Layout of the file (allocated once by the launcher for all rank slots; a rejoining rank maps the
same file and finds its regions where it left them):

    header  int64 [8]                                       magic, version, num_ranks, num_channels,
                                                            capacity_nbytes, 0, 0, 0
    flags   int64 [num_channels, num_ranks(dst), num_ranks(src)]   tag of the last completed send
    data    uint8 [num_channels, num_ranks(dst), num_ranks(src), capacity_nbytes]

Memory ordering: a send copies the payload, then stores the flag with one aligned 8-byte store; a
receive loads the flag, then the data. On x86-64 (TSO) stores become visible in program order and
loads are not reordered with older loads, so a reader that sees the new tag sees the payload; the
two stores are separate calls into torch, so the compiler cannot reorder them either. On a weakly
ordered CPU (ARM) a release/acquire fence would be needed around the flag; eep's CPU transport
targets x86 CI and the GPU path has its own transport.

Stale data is never mistaken for new: the flag carries the epoch, and every membership change
bumps it, so a region written by a fenced (stalled, then resumed) process under an old epoch never
matches what a survivor waits for.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence

import torch

from eep.exchange.tags import make_tag
from eep.transport.base import RecvResult

MAGIC = 0x6565705F73686D31  # "eep_shm1"
VERSION = 1
HEADER_NBYTES = 64
ALIGN = 64


def shm_nbytes(num_ranks: int, num_channels: int, capacity_nbytes: int) -> int:
    """Total file size for the given dimensions."""
    flags = num_channels * num_ranks * num_ranks * 8
    return HEADER_NBYTES + _align(flags) + num_channels * num_ranks * num_ranks * capacity_nbytes


def create_shm_file(path: str, num_ranks: int, num_channels: int, capacity_nbytes: int) -> None:
    """Create (or recreate) the transport file, zero-filled, with its header. Launcher-side."""
    if capacity_nbytes % 8:
        raise ValueError(f"capacity_nbytes={capacity_nbytes} must be a multiple of 8")
    nbytes = shm_nbytes(num_ranks, num_channels, capacity_nbytes)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "wb") as f:
        f.truncate(nbytes)
    header = torch.from_file(tmp, shared=True, size=HEADER_NBYTES // 8, dtype=torch.int64)
    header.copy_(torch.tensor([MAGIC, VERSION, num_ranks, num_channels, capacity_nbytes, 0, 0, 0]))
    del header
    os.replace(tmp, path)  # readers never see a file without its header


class SharedMemoryTransport:
    """The ``Transport`` over a shared file (see the module docstring).

    Parameters:
        path: the file made by ``create_shm_file``.
        rank: this process's rank slot.
        poll_interval_s: sleep between flag polls; waits are cheap sleeps, not spins, so more ranks
            than cores still make progress.
        abort_check_interval_s: how often a wait calls ``should_abort`` (a store round trip).
    """

    def __init__(self, path: str, rank: int, *, poll_interval_s: float = 50e-6,
                 abort_check_interval_s: float = 0.002):
        self.path = path
        header = torch.from_file(path, shared=True, size=HEADER_NBYTES // 8, dtype=torch.int64).tolist()
        magic, version, num_ranks, num_channels, capacity = header[:5]
        if magic != MAGIC or version != VERSION:
            raise ValueError(f"{path} is not an eep shared-memory transport file (magic {magic:#x}, version {version})")
        if not 0 <= rank < num_ranks:
            raise ValueError(f"rank {rank} is out of range for {path}, made for {num_ranks} rank slots")
        self.rank, self.num_ranks, self.num_channels, self.capacity_nbytes = rank, num_ranks, num_channels, capacity
        nbytes = shm_nbytes(num_ranks, num_channels, capacity)
        if os.path.getsize(path) != nbytes:
            raise ValueError(f"{path} has {os.path.getsize(path)} bytes, its header says {nbytes}")
        self._buf = torch.from_file(path, shared=True, size=nbytes, dtype=torch.uint8)
        flags_nbytes = num_channels * num_ranks * num_ranks * 8
        self._flags = self._buf[HEADER_NBYTES:HEADER_NBYTES + flags_nbytes].view(torch.int64).view(
            num_channels, num_ranks, num_ranks)
        data_off = HEADER_NBYTES + _align(flags_nbytes)
        self._data = self._buf[data_off:].view(num_channels, num_ranks, num_ranks, capacity)
        self.poll_interval_s = poll_interval_s
        self.abort_check_interval_s = abort_check_interval_s

    def send(self, channel: int, dst: int, payload: torch.Tensor, *, epoch: int, step: int) -> None:
        raw = payload.contiguous().view(-1).view(torch.uint8)
        if raw.numel() > self.capacity_nbytes:
            raise ValueError(f"rank {self.rank}: payload of {raw.numel()} bytes on channel {channel} to rank {dst} "
                             f"exceeds the region capacity {self.capacity_nbytes}")
        self._data[channel, dst, self.rank, :raw.numel()].copy_(raw)
        self._flags[channel, dst, self.rank] = make_tag(epoch, step)  # after the data: see module doc

    def recv(self, channel: int, peers: Sequence[int], *, epoch: int, step: int, timeout_s: float,
             should_abort: Callable[[], bool] | None = None) -> RecvResult:
        tag = make_tag(epoch, step)
        pending = sorted(set(int(p) for p in peers))
        result = RecvResult()
        flags = self._flags[channel, self.rank]
        start = time.monotonic()
        deadline = start + timeout_s
        next_abort_check = start + self.abort_check_interval_s
        while True:
            values = flags.tolist()
            still = []
            for peer in pending:
                if values[peer] == tag:
                    result.buffers[peer] = self._data[channel, self.rank, peer]
                else:
                    still.append(peer)
            pending = still
            if not pending:
                return result
            now = time.monotonic()
            if now >= deadline:
                result.missed = pending
                return result
            if should_abort is not None and now >= next_abort_check:
                next_abort_check = now + self.abort_check_interval_s
                if should_abort():
                    result.missed, result.is_aborted = pending, True
                    return result
            time.sleep(self.poll_interval_s)

    def close(self) -> None:
        self._flags = self._data = self._buf = None  # the mapping goes with the last reference


def _align(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN
