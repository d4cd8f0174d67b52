"""The few pieces of the safetensors format that weights_tools handles itself.

A safetensors file is ``u64 little-endian header_len | JSON header | data``; the header maps each
key to ``{"dtype", "shape", "data_offsets": [begin, end]}`` relative to the data start. We parse
headers ourselves (no mmap, clear errors naming the file) and write files as a stream, tensor by
tensor, hashing as we go, so ``prepare`` never holds more than one tensor and never hashes twice.
Restore reads tensor bytes with ``pread`` straight into the destination tensor (see docs/weights.md
for why not through ``safe_open``'s mmap).
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import torch

from weights_tools.errors import CorruptShardError, MissingShardError

# safetensors dtype names <-> torch dtypes (only the ones checkpoints use).
DTYPE_TO_TORCH: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}
for _name, _attr in (("F8_E4M3", "float8_e4m3fn"), ("F8_E5M2", "float8_e5m2")):
    if hasattr(torch, _attr):
        DTYPE_TO_TORCH[_name] = getattr(torch, _attr)
TORCH_TO_DTYPE: dict[torch.dtype, str] = {v: k for k, v in DTYPE_TO_TORCH.items()}
DTYPE_SIZE: dict[str, int] = {k: torch.empty((), dtype=v).element_size() for k, v in DTYPE_TO_TORCH.items()}

MAX_HEADER_BYTES = 100 << 20  # the limit safetensors itself enforces
COPY_CHUNK_BYTES = 16 << 20


@dataclass(frozen=True)
class HeaderEntry:
    """One tensor as a safetensors header describes it; ``begin``/``end`` are absolute file offsets."""

    key: str
    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin


def read_header(path: str) -> tuple[dict[str, HeaderEntry], dict[str, str]]:
    """Parse and validate a safetensors header without mapping the file.

    Returns ``(entries by key, __metadata__)``. Raises ``MissingShardError`` if the file is absent,
    ``CorruptShardError`` if the header is malformed or the file is shorter or longer than it says.
    """
    try:
        with open(path, "rb") as f:
            file_size = os.fstat(f.fileno()).st_size
            head = f.read(8)
            if len(head) < 8:
                raise CorruptShardError(f"{path}: file is {file_size} bytes, too short for a safetensors header",
                                        path=path)
            (header_len,) = struct.unpack("<Q", head)
            if header_len > MAX_HEADER_BYTES or 8 + header_len > file_size:
                raise CorruptShardError(f"{path}: header length {header_len} does not fit a {file_size}-byte file "
                                        "(truncated or not safetensors)", path=path)
            raw = f.read(header_len)
    except FileNotFoundError:
        raise MissingShardError(f"{path}: file is missing", path=path) from None
    try:
        header = json.loads(raw)
        if not isinstance(header, dict):
            raise ValueError("header is not a JSON object")
    except (UnicodeDecodeError, ValueError) as exc:
        raise CorruptShardError(f"{path}: corrupted safetensors header ({exc})", path=path) from None
    metadata = header.pop("__metadata__", None) or {}
    data_start = 8 + header_len
    entries: dict[str, HeaderEntry] = {}
    for key, info in header.items():
        try:
            dtype, shape, (begin, end) = info["dtype"], tuple(int(d) for d in info["shape"]), info["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise CorruptShardError(f"{path}: corrupted header entry for tensor {key!r}: {info!r}",
                                    path=path, tensor=key) from None
        if dtype not in DTYPE_SIZE:
            raise CorruptShardError(f"{path}: tensor {key!r} has unknown dtype {dtype!r}", path=path, tensor=key)
        numel = 1
        for d in shape:
            numel *= d
        if not (isinstance(begin, int) and isinstance(end, int)) or end - begin != numel * DTYPE_SIZE[dtype] \
                or begin < 0:
            raise CorruptShardError(f"{path}: tensor {key!r} has data_offsets {[begin, end]} that do not match "
                                    f"shape {list(shape)} {dtype}", path=path, tensor=key)
        entries[key] = HeaderEntry(key, dtype, shape, data_start + begin, data_start + end)
    cursor = data_start  # tensors must tile the data block: no overlaps, no holes
    for e in sorted(entries.values(), key=lambda e: (e.begin, e.end)):
        if e.begin != cursor and e.nbytes:
            raise CorruptShardError(f"{path}: tensor {e.key!r} starts at byte {e.begin - data_start} of the data "
                                    f"block, expected {cursor - data_start} (overlap or hole)", path=path, tensor=e.key)
        cursor = max(cursor, e.end)
    data_end = cursor
    if data_end != file_size:
        what = "truncated" if data_end > file_size else "has trailing bytes"
        raise CorruptShardError(f"{path}: file {what}: header describes {data_end} bytes, file has {file_size}",
                                path=path)
    return entries, {str(k): str(v) for k, v in metadata.items()}


@dataclass(frozen=True)
class TensorToWrite:
    """A tensor to stream into a file: ``read()`` returns its bytes (C order) when it is its turn."""

    key: str
    dtype: str
    shape: tuple[int, ...]
    read: Callable[[], memoryview | bytes]

    @property
    def nbytes(self) -> int:
        numel = 1
        for d in self.shape:
            numel *= d
        return numel * DTYPE_SIZE[self.dtype]


def write_safetensors(path: str, tensors: Iterable[TensorToWrite], *, metadata: dict[str, str] | None = None,
                      on_tensor: Callable[[TensorToWrite, str], None] | None = None, readers: int = 1) -> int:
    """Stream tensors into a safetensors file atomically (temp name, then ``os.replace``).

    ``on_tensor(tensor, sha256_hex)`` is called after each tensor is written (the hash is only
    computed for it). Returns the file size. The tensors are written in the order given; the caller
    sorts them if it wants alignment. ``readers > 1`` runs that many ``read()`` calls ahead on
    threads (a verified read hashes at ~1.5 GB/s per core, so one thread made a 38 GB host tier take
    93 s); memory held is at most ``2 * readers`` tensors.
    """
    tensors = list(tensors)
    header: dict[str, object] = {}
    if metadata:
        header["__metadata__"] = dict(metadata)
    offset = 0
    for t in tensors:
        header[t.key] = {"dtype": t.dtype, "shape": list(t.shape), "data_offsets": [offset, offset + t.nbytes]}
        offset += t.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # data starts 8-byte aligned, as safetensors writes it
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            f.write(struct.pack("<Q", len(raw)))
            f.write(raw)
            for t, data in _read_ahead(tensors, readers):
                if len(data) != t.nbytes:
                    raise CorruptShardError(f"{path}: tensor {t.key!r} produced {len(data)} bytes, expected "
                                            f"{t.nbytes}", path=path, tensor=t.key)
                f.write(data)
                if on_tensor is not None:
                    on_tensor(t, hashlib.sha256(data).hexdigest())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return 8 + len(raw) + offset


def _read_ahead(tensors: list[TensorToWrite], readers: int):
    """``(tensor, tensor.read())`` in order; with ``readers > 1`` the reads run ahead on threads."""
    if readers <= 1:
        for t in tensors:
            yield t, t.read()
        return
    from collections import deque
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(readers, thread_name_prefix="eep-read") as pool:
        pending: deque = deque()
        it = iter(tensors)
        try:
            for t in it:
                pending.append((t, pool.submit(t.read)))
                if len(pending) >= 2 * readers:
                    head, fut = pending.popleft()
                    yield head, fut.result()
            while pending:
                head, fut = pending.popleft()
                yield head, fut.result()
        finally:
            for _, fut in pending:
                fut.cancel()


def tensor_bytes(t: torch.Tensor) -> memoryview:
    """The raw bytes of a tensor in C order, without a copy when it is already contiguous on the CPU."""
    t = t.detach().cpu().contiguous()
    return memoryview(t.reshape(-1).view(torch.uint8).numpy()).cast("B")


def sha256_tensor(t: torch.Tensor) -> str:
    return hashlib.sha256(tensor_bytes(t)).hexdigest()


def pread_into(fd: int, views: memoryview | Sequence[memoryview], offset: int, path: str,
               key: str | None = None) -> None:
    """Fill ``views`` (writable byte buffers, back to back in the file) from ``fd`` at ``offset``.

    One ``preadv`` for all of them in the common case; a short read means the file was truncated.
    """
    pending = [views] if isinstance(views, memoryview) else [v for v in views if len(v)]
    total = sum(len(v) for v in pending)
    got = 0
    while pending:
        n = os.preadv(fd, pending, offset + got)
        if n == 0:
            raise CorruptShardError(f"{path}: truncated while reading tensor {key!r} ({got} of {total} bytes)",
                                    path=path, tensor=key)
        got += n
        while pending and n >= len(pending[0]):
            n -= len(pending[0])
            pending.pop(0)
        if pending and n:
            pending[0] = pending[0][n:]


def pread_exact(fd: int, nbytes: int, offset: int, path: str, key: str | None = None) -> bytes:
    """Read exactly ``nbytes`` at ``offset``; a short read means the file was truncated."""
    parts, got = [], 0
    while got < nbytes:
        chunk = os.pread(fd, min(nbytes - got, 1 << 30), offset + got)
        if not chunk:
            raise CorruptShardError(f"{path}: truncated while reading tensor {key!r} ({got} of {nbytes} bytes)",
                                    path=path, tensor=key)
        parts.append(chunk)
        got += len(chunk)
    return parts[0] if len(parts) == 1 else b"".join(parts)
