"""Host memory that other processes can map: an anonymous memory file (``memfd``) handed over by fd.

A rank keeps its expert slots in one ``HostRegion`` and serves the region's fd through an
``eep.transport.fd_passing.FdServer``; a peer that fetches the fd maps the same pages, so it can
copy a replica out of the rank's slots with no help from the rank. It is the CPU counterpart of
``eep.fused.peer_memory.DeviceRegion`` (VMM memory exported as an fd), so CI copies experts between
real processes the way GPUs copy them between peers. Nothing is left behind when every process that
maps it has exited (no file in ``/dev/shm``); an imported region stays readable after its exporter
died, which nothing relies on.
"""

from __future__ import annotations

import mmap
import os

import torch


class HostRegion:
    """``nbytes`` of shared host memory viewed as one uint8 tensor (``tensor``)."""

    def __init__(self, fd: int, nbytes: int, *, owns_fd: bool) -> None:
        self.nbytes = nbytes
        self._fd = fd if owns_fd else -1
        self._map = mmap.mmap(fd, nbytes, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        self.tensor = torch.frombuffer(self._map, dtype=torch.uint8)

    @classmethod
    def exported(cls, nbytes: int, *, name: str = "eep-slots") -> "HostRegion":
        """A new zero-filled region of this process (its fd is served to peers)."""
        fd = os.memfd_create(name, os.MFD_CLOEXEC)
        try:
            os.ftruncate(fd, nbytes)
            return cls(fd, nbytes, owns_fd=True)
        except BaseException:
            os.close(fd)
            raise

    @classmethod
    def imported(cls, fd: int, nbytes: int) -> "HostRegion":
        """A peer's region from the fd it handed over (closed here once mapped)."""
        try:
            size = os.fstat(fd).st_size
            if size < nbytes:
                raise ValueError(f"the shared region handed over has {size} bytes, its header says {nbytes}")
            return cls(fd, nbytes, owns_fd=False)
        finally:
            os.close(fd)

    @property
    def fd(self) -> int:
        return self._fd

    def close(self) -> None:
        self.tensor = None
        try:
            self._map.close()
        except BufferError:  # a view is still alive somewhere: the mapping goes with the process
            pass
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
