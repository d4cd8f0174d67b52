"""The bandwidth model the repair planner predicts with.

Link kinds, each a rate in GB/s (1e9 bytes per second):

- ``peer_gbps``  one GPU's peer-copy link (NVLink), in or out: a surviving replica -> a slot;
- ``h2d_gbps``   one GPU's host-to-device link (PCIe): a pinned host copy -> a slot;
- ``disk_gbps``  a node's disk, shared by every rank of the node: a safetensors shard -> host;
- ``nic_gbps``   one GPU's network port (one NIC per GPU, as on H100 nodes), in or out: a peer
                 copy between ranks on different nodes. Used only when ``ranks_per_node`` is set
                 (0 means every rank is on one node).

What moves is one expert's weights: ``expert_weight_nbytes(hidden, inter, fp8=...)`` counts them as a
tier stores them, block-scaled FP8 included (e4m3 weights plus their float32 128x128 block scales,
about half the bf16 bytes), so predicted pauses follow the checkpoint's format.

``Bandwidth.measure()`` times each link once at start-up on the machine it runs on (CPU
stand-ins where there is no GPU: a memcpy for both copy links). The defaults are the rates
measured on a 4 x H100 NVLink machine (DESIGN.md: one peer copy 384 GB/s, pinned host->device
52 GB/s) and a conservative 2 GB/s NVMe read. The model travels with every plan, so predicted
and observed pauses can be compared.
"""

from __future__ import annotations

import os
import tempfile
import time
from dataclasses import asdict, dataclass

import torch

from eep.fp8 import block_scale_shape

GB = 1e9


def expert_weight_nbytes(hidden: int, inter: int, *, fp8: bool = False, dtype_bytes: int = 2) -> int:
    """Bytes of one SwiGLU expert (``w_gate``, ``w_up`` ``[inter, hidden]``, ``w_down [hidden, inter]``):
    ``dtype_bytes`` per weight, or with ``fp8`` one byte per weight plus a float32 scale per 128x128 block."""
    if not fp8:
        return 3 * hidden * inter * dtype_bytes
    gate_scales = block_scale_shape(inter, hidden)
    down_scales = block_scale_shape(hidden, inter)
    return 3 * hidden * inter + 4 * (2 * gate_scales[0] * gate_scales[1] + down_scales[0] * down_scales[1])


@dataclass(frozen=True)
class Bandwidth:
    peer_gbps: float = 384.0
    h2d_gbps: float = 52.0
    disk_gbps: float = 2.0
    source: str = "default"  # "default", "config" or "measured on <device>"
    # True for the CPU stand-in: simulated ranks share one memory system, so their copies queue
    # on one link instead of running on a link per rank.
    is_shared_host: bool = False
    ranks_per_node: int = 0
    nic_gbps: float = 50.0  # 400 Gb/s InfiniBand per GPU

    def node_of(self, rank: int) -> int:
        return rank // self.ranks_per_node if self.ranks_per_node else 0

    def __post_init__(self):
        for name in ("peer_gbps", "h2d_gbps", "disk_gbps", "nic_gbps"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and value > 0):
                raise ValueError(f"Bandwidth.{name} must be a positive number of GB/s, got {value!r}")

    @classmethod
    def from_config(cls, config: dict) -> "Bandwidth":
        unknown = set(config) - {"peer_gbps", "h2d_gbps", "disk_gbps", "source", "is_shared_host",
                                 "ranks_per_node", "nic_gbps"}
        if unknown:
            raise ValueError(f"unknown bandwidth keys {sorted(unknown)}")
        return cls(**{"source": "config", **config})

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def measure(cls, *, nbytes: int = 64 << 20, device: torch.device | str | None = None,
                disk_dir: str | None = None) -> "Bandwidth":
        """Time each link once (a few hundred milliseconds); CPU stand-ins without a GPU."""
        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        device = torch.device(device)
        disk = _disk_read_gbps(nbytes, disk_dir)
        if device.type == "cuda":
            host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
            dev = torch.empty(nbytes, dtype=torch.uint8, device=device)
            h2d = _copy_gbps(dev, host, sync=torch.cuda.synchronize)
            if torch.cuda.device_count() > 1:
                other = torch.device("cuda", (device.index or 0) + 1 if (device.index or 0) + 1 <
                                     torch.cuda.device_count() else 0)
                peer = _copy_gbps(torch.empty(nbytes, dtype=torch.uint8, device=other), dev,
                                  sync=torch.cuda.synchronize)
            else:
                peer = _copy_gbps(torch.empty_like(dev), dev, sync=torch.cuda.synchronize)
            where = torch.cuda.get_device_name(device)
        else:
            src = torch.randint(0, 255, (nbytes,), dtype=torch.uint8)
            peer = h2d = _copy_gbps(torch.empty_like(src), src, sync=lambda: None)
            where = "cpu (memcpy stand-in for peer and host-to-device)"
        return cls(peer_gbps=peer, h2d_gbps=h2d, disk_gbps=disk, source=f"measured on {where}",
                   is_shared_host=device.type != "cuda")


def _copy_gbps(dst: torch.Tensor, src: torch.Tensor, *, sync, repeats: int = 3) -> float:
    dst.copy_(src)  # warm-up: page faults, lazy allocations
    sync()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        dst.copy_(src)
        sync()
        best = min(best, time.perf_counter() - start)
    return src.numel() * src.element_size() / best / GB


def _disk_read_gbps(nbytes: int, disk_dir: str | None) -> float:
    data = os.urandom(min(nbytes, 16 << 20)) * max(1, nbytes // (16 << 20))
    fd, path = tempfile.mkstemp(prefix="eep-bw-", dir=disk_dir)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        # Ask the kernel to forget the pages so we time the disk, not the page cache (best effort).
        with open(path, "rb") as f:
            if hasattr(os, "posix_fadvise"):
                os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
            start = time.perf_counter()
            while f.read(8 << 20):
                pass
            elapsed = time.perf_counter() - start
        return len(data) / max(elapsed, 1e-9) / GB
    finally:
        os.unlink(path)
