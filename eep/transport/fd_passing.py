"""File descriptors handed between processes over abstract Unix sockets: the peer handshake.

Each rank serves one descriptor (its VMM peer buffer on the GPU; the shared transport file on the
CPU) to whoever connects; a peer that fetches it proves the exporter is alive and is the
incarnation it expects, with no collective. The socket lives in the abstract namespace: nothing
to clean up, and it vanishes with the process, so a SIGKILLed rank's address refuses at once.
"""

from __future__ import annotations

import json
import os
import secrets
import socket
import struct
import threading
from typing import Any

ADDRESS_PREFIX = "\0eep-fused-"


class FdServer:
    """Serve one file descriptor (plus a JSON header) to every process that connects.

    The socket lives in the abstract namespace (no file to clean up; it vanishes with the
    process), so a SIGKILLed rank leaves nothing behind. Only processes of the same user are
    served (checked with SO_PEERCRED); others are hung up on.
    """

    def __init__(self, fd: int, header: dict[str, Any], *, name: str | None = None) -> None:
        self.fd = fd
        self.header = json.dumps(header).encode()
        self.address = ADDRESS_PREFIX + (name or f"{os.getpid()}-{secrets.token_hex(8)}")
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
    """Connect to an ``FdServer`` of this user and receive its descriptor (a new fd owned by the caller)."""
    address = "\0" + public_address[1:] if public_address.startswith("@") else public_address
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout_s)
        try:
            sock.connect(address)
        except OSError as exc:
            raise ConnectionError(f"no fd server at {public_address!r} (is the exporting rank alive?): {exc}") from exc
        if not _same_user(sock):  # memory is taken only from processes of this user, as it is only given to them
            raise ConnectionError(f"the fd server at {public_address!r} runs as another user")
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
