"""The process-wide ``eep.Buffer`` behind the SGLang dispatcher (one per process, like Mooncake EP's).

Backends (the seam): ``make_buffer`` picks one by the device of SGLang's ``active_ranks``.

- CPU: ``eep.Buffer`` over ``eep.transport.SharedMemoryTransport``. The transport file is agreed
  without a collective, so a rank that rejoins later finds the same file: ``EEP_SGLANG_SHM_PATH``
  when set, else rank 0 creates ``<EEP_SHM_DIR>/eep-sglang-<pid>-<ns>.shm`` and publishes its path
  under ``STORE_KEY_SHM_PATH`` in SGLang's global TCPStore; the others (and a rejoining rank) read it.
- CUDA: not wired yet; ``make_buffer`` says so rather than running the host transport on device
  tensors. ``eep.Buffer(rank, num_ranks, fused=FusedBuffer(...))`` is the face to build here
  (``FusedBuffer`` wants ``slots_per_rank=num_local_experts``, ``max_tokens_per_rank=M``, ``top_k``
  and a ``store``: SGLang's global TCPStore); it needs a GPU run with SGLang installed, which has
  not been done.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Any

import torch

from eep import envs
from eep.integrations.buffer import Buffer
from eep.transport.shm import SharedMemoryTransport, create_shm_file

STORE_KEY_SHM_PATH = "eep/sglang/shm_path"
SHM_PATH_ENV = "EEP_SGLANG_SHM_PATH"


@dataclass
class BufferSpec:
    """What sizes the buffer: the dispatcher's constructor arguments plus SGLang's mask length."""

    num_ranks: int
    hidden_size: int
    num_max_dispatch_tokens_per_rank: int
    num_experts: int
    use_fp8: bool
    top_k: int = 8  # sizes the prefill (normal-mode) messages


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


def make_buffer(group: Any, spec: BufferSpec, active_ranks: torch.Tensor) -> Buffer:
    """A new ``eep.Buffer`` for this process's rank in ``group`` (see the module docstring)."""
    if active_ranks.device.type != "cpu":
        # The seam for the GPU backend: the fused buffer exposes the same dispatch/combine face.
        raise NotImplementedError(
            f"eep's SGLang plugin runs on the CPU shared-memory transport only for now; active_ranks is on "
            f"{active_ranks.device}. eep.Buffer(fused=FusedBuffer(...)) plugs in here "
            f"(eep/integrations/sglang/ep_buffer.py, make_buffer); see docs/integrations.md")
    rank = group.rank()
    # bf16 decode rows too: a quantisation config can turn the dispatcher's FP8 off after construction
    capacity = max(*(Buffer.get_ep_buffer_size_hint(spec.num_max_dispatch_tokens_per_rank, spec.hidden_size,
                                                    spec.num_ranks, spec.num_experts, use_fp8=fp8)
                     for fp8 in (spec.use_fp8, False)),
                   Buffer.get_prefill_buffer_size_hint(spec.num_max_dispatch_tokens_per_rank, spec.hidden_size,
                                                       spec.top_k))
    path = _agree_shm_path(rank, spec.num_ranks, capacity)
    return Buffer(rank, spec.num_ranks, transport=SharedMemoryTransport(path, rank))


def _agree_shm_path(rank: int, num_ranks: int, capacity_nbytes: int, *, wait_s: float = 120.0) -> str:
    path = envs.sglang_shm_path()
    if path:
        if rank == 0 and not os.path.exists(path):
            create_shm_file(path, num_ranks, 4, capacity_nbytes)
        deadline = time.monotonic() + wait_s
        while not os.path.exists(path):  # rank 0 creates it; bounded, never a hang
            if time.monotonic() > deadline:
                raise TimeoutError(f"{SHM_PATH_ENV}={path} did not appear within {wait_s} s (rank 0 creates it)")
            time.sleep(0.01)
        return path
    from sglang.srt.distributed.utils import get_global_tcp_store

    store = get_global_tcp_store()
    if store is None:
        raise RuntimeError(f"eep's SGLang plugin needs SGLang's global TCPStore or {SHM_PATH_ENV} to agree on the "
                           f"shared-memory transport file")
    if rank == 0 and not store.check([STORE_KEY_SHM_PATH]):
        path = os.path.join(envs.shm_dir(), f"eep-sglang-{os.getpid()}-{time.time_ns()}.shm")
        create_shm_file(path, num_ranks, 4, capacity_nbytes)
        store.set(STORE_KEY_SHM_PATH, path)
    return store.get(STORE_KEY_SHM_PATH).decode()  # waits (store timeout) until rank 0 has published it
