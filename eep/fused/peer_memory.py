"""Peer memory: VMM allocations exported as POSIX file descriptors, passed over Unix sockets.

Why not ``cudaIpcGetMemHandle`` or torch symmetric memory: a process that joins later must be
able to map the survivors' buffers, and they its buffer, with no collective among the group.
A VMM allocation (``cuMemCreate``) exported as a file descriptor can be handed to any process
at any time: each rank runs a tiny server thread on an abstract Unix socket that sends the
descriptor (``socket.send_fds``) to whoever connects, and publishes the socket's address in
the control store. A survivor that imported a buffer keeps the mapping after its exporter dies
(measured on 4xH100: reads and writes still work, the context stays healthy).

The fd passing (``eep.transport.fd_passing``: ``FdServer``, ``fetch_fd``) is plain Python, shared
with the host shared-memory exchange's handshake, and tested on CPU.
"""

from __future__ import annotations

import os

import torch

from eep.fused.cuda_util import check


def _granularity(device_ordinal: int) -> int:
    from cuda.bindings import driver
    prop = _alloc_prop(device_ordinal)
    return int(check(driver.cuMemGetAllocationGranularity(
        prop, driver.CUmemAllocationGranularity_flags.CU_MEM_ALLOC_GRANULARITY_RECOMMENDED),
        "cuMemGetAllocationGranularity"))


def _alloc_prop(device_ordinal: int):
    from cuda.bindings import driver
    prop = driver.CUmemAllocationProp()
    prop.type = driver.CUmemAllocationType.CU_MEM_ALLOCATION_TYPE_PINNED
    prop.location.type = driver.CUmemLocationType.CU_MEM_LOCATION_TYPE_DEVICE
    prop.location.id = device_ordinal
    prop.requestedHandleTypes = driver.CUmemAllocationHandleType.CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR
    return prop


def _map(handle, nbytes: int, device_ordinal: int) -> int:
    """Reserve a VA range, map ``handle`` into it and grant this device read/write access."""
    from cuda.bindings import driver
    ptr = check(driver.cuMemAddressReserve(nbytes, 0, 0, 0), "cuMemAddressReserve")
    check(driver.cuMemMap(ptr, nbytes, 0, handle, 0), "cuMemMap")
    access = driver.CUmemAccessDesc()
    access.location.type = driver.CUmemLocationType.CU_MEM_LOCATION_TYPE_DEVICE
    access.location.id = device_ordinal
    access.flags = driver.CUmemAccess_flags.CU_MEM_ACCESS_FLAGS_PROT_READWRITE
    check(driver.cuMemSetAccess(ptr, nbytes, [access], 1), "cuMemSetAccess")
    return int(ptr)


def _unmap(ptr: int, nbytes: int) -> None:
    from cuda.bindings import driver
    check(driver.cuMemUnmap(ptr, nbytes), "cuMemUnmap")
    check(driver.cuMemAddressFree(ptr, nbytes), "cuMemAddressFree")


class VmmAllocation:
    """A device allocation of this process, mapped locally and exportable as a POSIX fd."""

    def __init__(self, nbytes: int, device_ordinal: int) -> None:
        from cuda.bindings import driver
        gran = _granularity(device_ordinal)
        self.nbytes = (nbytes + gran - 1) // gran * gran
        self.device_ordinal = device_ordinal
        self.handle = check(driver.cuMemCreate(self.nbytes, _alloc_prop(device_ordinal), 0), "cuMemCreate")
        self.ptr = _map(self.handle, self.nbytes, device_ordinal)
        self.fd = int(check(driver.cuMemExportToShareableHandle(
            self.handle, driver.CUmemAllocationHandleType.CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR, 0),
            "cuMemExportToShareableHandle"))

    def close(self) -> None:
        from cuda.bindings import driver
        if self.ptr:
            _unmap(self.ptr, self.nbytes)
            check(driver.cuMemRelease(self.handle), "cuMemRelease")
            os.close(self.fd)
            self.ptr = 0


class ImportedAllocation:
    """A peer's allocation mapped into this process from its exported fd (closed after import)."""

    def __init__(self, fd: int, nbytes: int, device_ordinal: int) -> None:
        from cuda.bindings import driver
        try:
            self.handle = check(driver.cuMemImportFromShareableHandle(
                fd, driver.CUmemAllocationHandleType.CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR),
                "cuMemImportFromShareableHandle")
        finally:
            os.close(fd)
        self.nbytes = nbytes
        self.ptr = _map(self.handle, nbytes, device_ordinal)

    def close(self) -> None:
        from cuda.bindings import driver
        if self.ptr:
            _unmap(self.ptr, self.nbytes)
            check(driver.cuMemRelease(self.handle), "cuMemRelease")
            self.ptr = 0


class _CudaArray:
    """Minimal ``__cuda_array_interface__`` so torch can view VMM memory without a copy."""

    def __init__(self, ptr: int, nbytes: int) -> None:
        self.__cuda_array_interface__ = {"shape": (nbytes,), "typestr": "|u1", "data": (ptr, False),
                                         "version": 3, "strides": None, "stream": None}


def tensor_at(ptr: int, nbytes: int, device: torch.device) -> torch.Tensor:
    """A uint8 tensor of ``nbytes`` at device address ``ptr`` (VMM memory torch did not allocate), on
    ``device``: the device whose context mapped it, which for a peer's allocation is not the device
    that holds its pages. Why not ``torch.as_tensor`` of a ``__cuda_array_interface__`` alone: torch
    asks the driver which device holds the pointer and, when that is another GPU, copies the whole
    allocation to ``device`` (a snapshot, not a view). The storage is made for ``device`` as torch's
    own CUDA-graph trees make theirs (it owns nothing); the interface path stays as the fallback."""
    construct = getattr(torch._C, "_construct_storage_from_data_pointer", None)
    if construct is None:
        return torch.as_tensor(_CudaArray(ptr, nbytes), device=device)
    storage = construct(int(ptr), torch.device(device), int(nbytes))
    return torch.empty(0, dtype=torch.uint8, device=device).set_(storage, 0, (nbytes,), (1,))


class DeviceRegion:
    """Device memory that other processes can map: a ``VmmAllocation`` of this process viewed as one
    uint8 tensor (``exported``), or a peer's mapped from the fd its ``FdServer`` handed over
    (``imported``). The host counterpart is ``eep.transport.shared_region.HostRegion``; a peer's
    imported region stays readable after the peer died (measured on 4xH100), which nothing relies on."""

    def __init__(self, allocation, device: torch.device) -> None:
        self._allocation = allocation
        self.nbytes = allocation.nbytes
        self.tensor = tensor_at(allocation.ptr, allocation.nbytes, device)

    @classmethod
    def exported(cls, nbytes: int, device: torch.device) -> "DeviceRegion":
        _primary_context(device)
        return cls(VmmAllocation(nbytes, device.index), device)

    @classmethod
    def imported(cls, fd: int, nbytes: int, device: torch.device) -> "DeviceRegion":
        _primary_context(device)
        return cls(ImportedAllocation(fd, nbytes, device.index), device)

    @property
    def fd(self) -> int:
        return self._allocation.fd

    def close(self) -> None:
        """Unmap (the caller made sure no copy in flight still reads or writes it)."""
        self.tensor = None
        self._allocation.close()


def _primary_context(device: torch.device) -> None:
    """torch's primary context of ``device``, current on this thread for the driver calls (as the
    fused buffer makes it before its own VMM allocation)."""
    from eep.fused.cuda_util import ensure_context

    torch.zeros(1, device=device)  # torch creates the primary context first
    ensure_context(device.index)
