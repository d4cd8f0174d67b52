"""The process-wide ``eep.Buffer`` behind the SGLang dispatcher (one per process, like Mooncake EP's).

``make_buffer`` builds the exchange backends for this process's rank of SGLang's EP group, on the
device of SGLang's ``active_ranks``, for the modes the dispatcher's ``deepep_mode`` needs
(``low_latency``: decode; ``normal``: prefill; ``auto``: both):

- CUDA: the fused GPU backends, ``eep.fused.FusedBuffer`` (low-latency) and ``PrefillBuffer``
  (normal mode), sized from the dispatcher (``num_local_experts`` slots per rank,
  ``num_max_dispatch_tokens_per_rank`` rows, ``hidden``, the router's ``top_k``, FP8 or bf16 rows).
  Each publishes its peer buffer under ``eep/fused/sglang-<mode><tag>/rank<r>`` in SGLang's global
  TCPStore and maps the peers that SGLang's mask shows active (a rejoining process, whose mask holds
  only itself, maps the others in the member-refresh hook).
- CPU: the host shared-memory backends (``eep.exchange.shm``) over one transport file, agreed
  without a collective so that a rank that rejoins later finds the same file: ``EEP_SGLANG_SHM_PATH``
  when set, else rank 0 creates ``<EEP_SHM_DIR>/eep-sglang-<pid>-<ns>.shm`` and publishes its path
  under ``eep/sglang<tag>/shm_path`` in SGLang's global TCPStore; the others (and a rejoiner) read it.

Either way both backends share one ``eep.Membership`` whose device mirror *is* SGLang's
``active_ranks`` tensor: the kernels (or the host waits) read SGLang's mask at every call, a peer
that misses a deadline is cleared in it, and ``Buffer.update_ep_member`` (SGLang's member-refresh
hook) writes a new membership into it in place, so a CUDA graph captured around the dispatcher
keeps working through a failure and a rejoin without recapture. ``<tag>`` tells apart EP groups
that share SGLang's store (pipeline stages): empty for the group holding global rank 0, else
``-g<first global rank>``.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Any

import torch

from eep import envs
from eep.integrations.buffer import DECODE_CHANNELS, PREFILL_CHANNELS, Buffer
from eep.state import Membership
from eep.transport.shm import SharedMemoryTransport, create_shm_file


@dataclass
class BufferSpec:
    """What sizes the buffer: the dispatcher's constructor arguments plus SGLang's mask length.

    ``low_latency`` / ``normal``: which backends to build (the dispatcher's ``deepep_mode``);
    ``dtype``: the activations' dtype (the fused backends move bf16 rows only).
    """

    num_ranks: int
    hidden_size: int
    num_max_dispatch_tokens_per_rank: int
    num_experts: int
    use_fp8: bool
    top_k: int = 8  # sizes the prefill (normal-mode) messages
    low_latency: bool = True
    normal: bool = True
    dtype: torch.dtype = torch.bfloat16

    @property
    def num_local_experts(self) -> int:
        return self.num_experts // self.num_ranks


class EepEPBuffer:
    """Facade over the process-wide buffer (class state: SGLang runs one model per process)."""

    _buffer: Buffer | None = None
    _group: Any = None

    @classmethod
    def get_ep_buffer(cls, group: Any, spec: BufferSpec, active_ranks: torch.Tensor) -> Buffer:
        if cls._buffer is None:
            cls._buffer, cls._group = make_buffer(group, spec, active_ranks), group
        if cls._buffer.num_ranks != spec.num_ranks:
            raise ValueError(f"the process-wide eep.Buffer has {cls._buffer.num_ranks} rank slots, SGLang's "
                             f"active_ranks has {spec.num_ranks}")
        return cls._buffer

    @classmethod
    def get_existing_buffer(cls) -> Buffer | None:
        """The buffer if one was made (the member-refresh hook needs it, never creates it)."""
        return cls._buffer

    @classmethod
    def get_group(cls) -> Any:
        return cls._group

    @classmethod
    def set_buffer(cls, buffer: Buffer | None, group: Any = None) -> None:
        """Install a buffer made elsewhere (tests, a launcher that owns the transport)."""
        cls._buffer, cls._group = buffer, group


def make_buffer(group: Any, spec: BufferSpec, active_ranks: torch.Tensor, *, store: Any = None) -> Buffer:
    """A new ``eep.Buffer`` for this process's rank in ``group`` (see the module docstring).

    ``active_ranks``: SGLang's int32 mask ``[num_ranks]``, adopted as the membership's device mirror.
    ``store``: the rendezvous store (default: SGLang's global TCPStore).
    """
    if spec.num_experts % spec.num_ranks:
        raise ValueError(f"num_experts={spec.num_experts} is not a multiple of the {spec.num_ranks} rank slots of "
                         "SGLang's active_ranks")
    if not (spec.low_latency or spec.normal):
        raise ValueError("BufferSpec asks for neither the low-latency nor the normal-mode backend")
    rank = group.rank()
    membership = Membership(spec.num_ranks, active_device=active_ranks)
    if active_ranks.is_cuda:
        decode, prefill = _fused_backends(rank, spec, membership, store if store is not None else _sglang_store(),
                                          _group_tag(group))
    else:
        decode, prefill = _shm_backends(rank, spec, membership, store, _group_tag(group))
    return Buffer(rank, spec.num_ranks, decode=decode, prefill=prefill, membership=membership)


def _fused_backends(rank: int, spec: BufferSpec, membership: Membership, store: Any, tag: str) -> tuple:
    from eep.fused.buffer import FusedBuffer
    from eep.fused.prefill import PrefillBuffer

    if spec.dtype != torch.bfloat16:
        raise ValueError(f"eep's fused GPU backend moves bf16 activations; SGLang's dispatcher has {spec.dtype}")
    shape = dict(slots_per_rank=spec.num_local_experts, max_tokens_per_rank=spec.num_max_dispatch_tokens_per_rank,
                 hidden=spec.hidden_size, top_k=spec.top_k, store=store, connect=[],
                 device=membership.active_device.device, membership=membership)
    decode = (FusedBuffer(rank, spec.num_ranks, group=f"sglang-decode{tag}", use_fp8=spec.use_fp8, **shape)
              if spec.low_latency else None)
    prefill = PrefillBuffer(rank, spec.num_ranks, group=f"sglang-prefill{tag}", **shape) if spec.normal else None
    # every rank publishes in its constructor before it waits for the others, so this cannot deadlock
    peers = [r for r in membership.active_ranks() if r != rank]
    for exchange in (decode, prefill):
        if exchange is not None:
            exchange.connect(peers, timeout_s=envs.sglang_connect_timeout_s())
    return decode, prefill


def _shm_backends(rank: int, spec: BufferSpec, membership: Membership, store: Any, tag: str) -> tuple:
    from eep.exchange.shm import ShmExchange, ShmPrefillExchange

    M, H, local, nbytes = (spec.num_max_dispatch_tokens_per_rank, spec.hidden_size, spec.num_local_experts,
                           spec.dtype.itemsize)
    capacity = max(Buffer.get_ep_buffer_size_hint(M, H, spec.num_ranks, spec.num_experts, use_fp8=spec.use_fp8,
                                                  elem_nbytes=nbytes),
                   Buffer.get_prefill_buffer_size_hint(M, H, spec.top_k, elem_nbytes=nbytes))
    transport = SharedMemoryTransport(_agree_shm_path(rank, spec.num_ranks, capacity, store, tag), rank)
    decode = (ShmExchange(transport, slots_per_rank=local, max_tokens_per_rank=M, hidden=H, dtype=spec.dtype,
                          use_fp8=spec.use_fp8, membership=membership, channels=DECODE_CHANNELS)
              if spec.low_latency else None)
    prefill = (ShmPrefillExchange(transport, slots_per_rank=local, max_tokens_per_rank=M, hidden=H, top_k=spec.top_k,
                                  dtype=spec.dtype, membership=membership, channels=PREFILL_CHANNELS)
               if spec.normal else None)
    return decode, prefill


def _sglang_store() -> Any:
    from sglang.srt.distributed.utils import get_global_tcp_store

    store = get_global_tcp_store()
    if store is None:
        raise RuntimeError(f"eep's SGLang plugin rendezvouses its buffers through SGLang's global TCPStore, which is "
                           f"not set (SGLang sets it in init_distributed_environment with a tcp:// init method); on "
                           f"the CPU, {envs.SGLANG_SHM_PATH} can name the transport file instead")
    return store


def _group_tag(group: Any) -> str:
    """``""`` for the EP group holding global rank 0 (and for groups that are not torch process
    groups), else ``-g<its first global rank>``: store keys of EP groups sharing SGLang's store differ."""
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized() and isinstance(group, dist.ProcessGroup)):
        return ""
    first = min(dist.get_process_group_ranks(group))
    return "" if first == 0 else f"-g{first}"


def _agree_shm_path(rank: int, num_ranks: int, capacity_nbytes: int, store: Any, tag: str, *,
                    wait_s: float = 120.0) -> str:
    path = envs.sglang_shm_path()
    if path:
        if rank == 0 and not os.path.exists(path):
            create_shm_file(path, num_ranks, 4, capacity_nbytes)
        deadline = time.monotonic() + wait_s
        while not os.path.exists(path):  # rank 0 creates it; bounded, never a hang
            if time.monotonic() > deadline:
                raise TimeoutError(f"{envs.SGLANG_SHM_PATH}={path} did not appear within {wait_s} s "
                                   "(rank 0 creates it)")
            time.sleep(0.01)
        return path
    store = store if store is not None else _sglang_store()
    key = f"eep/sglang{tag}/shm_path"
    if rank == 0 and not store.check([key]):
        path = os.path.join(envs.shm_dir(), f"eep-sglang-{os.getpid()}-{time.time_ns()}.shm")
        create_shm_file(path, num_ranks, 4, capacity_nbytes)
        store.set(key, path)
    return store.get(key).decode()  # waits (store timeout) until rank 0 has published it
