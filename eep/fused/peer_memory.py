"""Peer memory: VMM allocations exported as POSIX file descriptors, passed over Unix sockets.

Why not ``cudaIpcGetMemHandle`` or torch symmetric memory: a process that joins later must be
able to map the survivors' buffers, and they its buffer, with no collective among the group.
A VMM allocation (``cuMemCreate``) exported as a file descriptor can be handed to any process
at any time: each rank runs a tiny server thread on an abstract Unix socket that sends the
descriptor (``socket.send_fds``) to whoever connects, and publishes the socket's address in
the control store. A survivor that imported a buffer keeps the mapping after its exporter dies
(measured on 4xH100: reads and writes still work, the context stays healthy).

The fd-passing part (``FdServer``, ``fetch_fd``) is plain Python and is tested on CPU.
"""

from __future__ import annotations

import json
import os
import secrets
import socket
import struct
import threading
from typing import Any

from eep.fused.cuda_util import check


class FdServer:
    """Serve one file descriptor (plus a JSON header) to every process that connects.

    The socket lives in the abstract namespace (no file to clean up; it vanishes with the
    process), so a SIGKILLed rank leaves nothing behind. Only processes of the same user are
    served (checked with SO_PEERCRED); others are hung up on.
    """

    def __init__(self, fd: int, header: dict[str, Any], *, name: str | None = None) -> None:
        self.fd = fd
        self.header = json.dumps(header).encode()
        self.address = "\0eep-fused-" + (name or f"{os.getpid()}-{secrets.token_hex(8)}")
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._sock.bind(self.address)
        self._sock.listen(64)
        self._closed = False
        self._thread = threading.Thread(target=self._serve, name="eep-fd-server", daemon=True)
        self._thread.start()

    @property
    def public_address(self) -> str:
        """The address as it goes into the store (the leading NUL spelled as '@')."""
        return "@" + self.address[1:]

    def _serve(self) -> None:
        while not self._closed:
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return
            with conn:
                if not _same_user(conn):
                    continue  # device memory is handed only to processes of this user
                try:
                    socket.send_fds(conn, [len(self.header).to_bytes(4, "little") + self.header], [self.fd])
                except OSError:
                    pass  # the requester went away; serve the next one

    def close(self) -> None:
        self._closed = True
        try:
            self._sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._sock.close()


def _same_user(conn: socket.socket) -> bool:
    """Whether the connecting process runs as this process's user (SO_PEERCRED)."""
    try:
        creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    except OSError:
        return False
    _, uid, _ = struct.unpack("3i", creds)
    return uid == os.getuid()


def fetch_fd(public_address: str, *, timeout_s: float = 10.0) -> tuple[int, dict[str, Any]]:
    """Connect to an ``FdServer`` and receive its descriptor (a new fd owned by the caller)."""
    address = "\0" + public_address[1:] if public_address.startswith("@") else public_address
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout_s)
        try:
            sock.connect(address)
        except OSError as exc:
            raise ConnectionError(f"no fd server at {public_address!r} (is the exporting rank alive?): {exc}") from exc
        msg, fds, _, _ = socket.recv_fds(sock, 1 << 16, 1)
        if not fds:
            raise ConnectionError(f"fd server at {public_address!r} sent no descriptor")
        size = int.from_bytes(msg[:4], "little")
        while len(msg) < 4 + size:
            more = sock.recv(4 + size - len(msg))
            if not more:
                break
            msg += more
        return fds[0], json.loads(msg[4:4 + size])


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
