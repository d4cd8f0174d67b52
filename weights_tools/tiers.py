"""Restore tiers: places an expert's weights can be copied from, behind one small protocol.

``DiskTier`` and ``HostTier`` implement ``eep.repair.ExpertSource``, the one protocol the planner,
the executors, ``ExpertStore`` and the runtime use::

    name: str                                   # "host", "disk"
    has_expert(layer, expert) -> bool           # cheap, no I/O beyond metadata
    copy_expert_into(layer, expert, w_gate_dst [I, H], w_up_dst [I, H], w_down_dst [H, I],
                     *, stream=None) -> int     # bytes copied; raises ShardError if the copy is bad

For block-scaled FP8 shard sets each destination is an ``eep.fp8.Fp8Weight`` (FP8 weight plus its
float32 block scales): a tier copies the weights and their scales together, and the bytes it
returns count both.

A tier must never report success for a bad copy: it either copies all of an expert's tensors and returns,
or raises a ``ShardError`` naming the file/tensor at fault. After a raise the destinations'
contents are unspecified (the disk tier reads straight into them); the caller tries the next
tier, which overwrites them, or gives up. When ``stream`` is given and the
destinations are on a GPU, copies are enqueued on that stream and may still be in flight on return.

* ``DiskTier`` reads the per-expert safetensors shards lazily (header parsed once per file, tensor
  bytes ``pread`` into the destination), checks shape and dtype against the manifest and the
  sha256 of every tensor.
* ``HostTier`` is one flat file in shared memory (``/dev/shm`` by default), itself in safetensors
  format, mapped by every process of the node (``torch.from_file(shared=True)``) and page-locked
  with ``cudaHostRegister`` when CUDA is present, so host->GPU copies are async DMA. A mapping that
  cannot be page-locked (a file on a disk filesystem rather than in memory, no usable CUDA, or a
  ``cudaHostRegister`` that fails, e.g. for its size) stays pageable: copies from it are synchronous,
  staged by the driver, and the tier says why in one warning; it never fails a restore.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import fcntl
import hashlib
import logging
import os
import threading
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor

import torch

from eep import envs
from eep.fp8 import ExpertWeight, Fp8Weight, weight_nbytes
from eep.repair.tiers import ExpertSource
from weights_tools.errors import CorruptShardError, HostTierError, MissingShardError, ShardError
from weights_tools.manifest import ROLES, SCALE, Manifest, TensorEntry, check_inside
from weights_tools.safetensors_io import (DTYPE_SIZE, DTYPE_TO_TORCH, HeaderEntry, TensorToWrite, pread_into,
                                          read_header, tensor_bytes, write_safetensors)

log = logging.getLogger("weights_tools")

HOST_TIER_FORMAT = "eep-host-tier"
DEFAULT_HOST_DIR_ENV = "EEP_HOST_TIER_DIR"


_HASH_CHUNK_NBYTES = 4 << 20  # small enough to overlap reads and hashing, large enough to amortise calls


def destination_tensors(manifest: Manifest, layer: int, expert: int, dsts: Sequence[ExpertWeight]
                        ) -> list[torch.Tensor]:
    """The destinations of one expert as plain tensors in ``expert_tensor_entries`` order (an
    ``Fp8Weight`` gives its weight, then its scale). ``ValueError`` when their kind does not match
    the shard set (plain tensors for FP8 experts or the reverse): a caller bug, no tier at fault."""
    fp8 = manifest.is_fp8
    out: list[torch.Tensor] = []
    for role, dst in zip(ROLES, dsts):
        if isinstance(dst, Fp8Weight) != fp8:
            want = "an Fp8Weight (FP8 weight + block scales)" if fp8 else "a plain tensor"
            raise ValueError(f"the {role} destination of layer {layer} expert {expert} is "
                             f"{type(dst).__name__}; this shard set's experts need {want}")
        out.extend((dst.weight, dst.scale) if fp8 else (dst,))
    return out


def _copy(dst: ExpertWeight, src: ExpertWeight, stream: torch.cuda.Stream | None, *, is_pinned: bool) -> None:
    """``dst.copy_(src)``, on ``stream`` and asynchronous when the source is page-locked."""
    if isinstance(dst, Fp8Weight):  # weights and scales travel together
        _copy(dst.weight, src.weight, stream, is_pinned=is_pinned)
        _copy(dst.scale, src.scale, stream, is_pinned=is_pinned)
        return
    if stream is not None and dst.is_cuda:
        with torch.cuda.stream(stream):
            dst.copy_(src, non_blocking=is_pinned)
    else:
        dst.copy_(src)


# ---- disk ----
class DiskTier:
    """The per-expert shards on disk; every tensor is checked against the manifest as it is read.

    Each file's safetensors header is parsed and validated once (size, offsets tiling the data,
    shape/dtype per tensor against the manifest); tensor bytes are then ``pread`` straight into a
    contiguous CPU destination (one copy) and hashed there. ``verify=False`` skips the sha256 (the
    header and shape/dtype checks stay): for benchmarks, or right after ``eep-shards verify``.
    """

    name = "disk"

    def __init__(self, shard_dir: str, *, manifest: Manifest | None = None, verify: bool = True):
        self.shard_dir = shard_dir
        self.manifest = manifest or Manifest.load(shard_dir)
        self.verify = verify
        self._open_files: dict[str, tuple[str, int, dict[str, HeaderEntry]]] = {}
        self._lock = threading.Lock()
        self._pool: ThreadPoolExecutor | None = None

    def has_expert(self, layer: int, expert: int) -> bool:
        try:
            entries = self.manifest.expert_entries(layer, expert)
        except ValueError:
            return False
        return all(os.path.exists(os.path.join(self.shard_dir, e.file)) for e in entries)

    def copy_expert_into(self, layer: int, expert: int, w_gate_dst: ExpertWeight, w_up_dst: ExpertWeight,
                         w_down_dst: ExpertWeight, *, stream: torch.cuda.Stream | None = None) -> int:
        entries = self.manifest.expert_tensor_entries(layer, expert)
        dsts = destination_tensors(self.manifest, layer, expert, (w_gate_dst, w_up_dst, w_down_dst))
        direct = [d.device.type == "cpu" and d.is_contiguous() and d.dtype == DTYPE_TO_TORCH[e.dtype]
                  for e, d in zip(entries, dsts)]
        if all(direct):
            views = [tensor_bytes(d) for d in dsts]  # zero-copy: the destinations' own memory
        else:  # a GPU or strided destination: stage through CPU tensors
            staging = [torch.empty(e.shape, dtype=DTYPE_TO_TORCH[e.dtype]) for e in entries]
            views = [tensor_bytes(t) for t in staging]
        self._read_checked(entries, views)
        if not all(direct):
            for dst, src in zip(dsts, staging):
                _copy(dst, src, stream, is_pinned=False)
        return sum(e.nbytes for e in entries)

    def read_tensor(self, entry: TensorEntry) -> torch.Tensor:
        """One tensor of the shard set as a fresh CPU tensor, checked against its manifest entry."""
        out = torch.empty(entry.shape, dtype=DTYPE_TO_TORCH[entry.dtype])
        self._read_checked([entry], [tensor_bytes(out)])
        return out

    def _read_checked(self, entries: Sequence[TensorEntry], views: Sequence[memoryview]) -> None:
        """Fill ``views`` with the entries' bytes, checking header, shape, dtype and (if ``verify``) sha256.

        Tensors adjacent in one file (an expert's gate, up, down are) are read with a single
        ``preadv``: fewer syscalls for small experts.
        """
        try:
            self._read_checked_once(entries, views)
        except ShardError:
            # Forget the files involved: a re-prepared (os.replace'd) file is picked up on the next try.
            with self._lock:
                for entry in entries:
                    opened = self._open_files.pop(entry.file, None)
                    if opened is not None:
                        os.close(opened[1])
            raise

    def _read_checked_once(self, entries: Sequence[TensorEntry], views: Sequence[memoryview]) -> None:
        located = []
        for entry in entries:
            path, fd, header = self._open(entry)
            h = header.get(entry.key)
            if h is None:
                raise MissingShardError(f"{path}: tensor {entry.key!r} is missing from the file",
                                        path=path, tensor=entry.key)
            if h.shape != entry.shape or h.dtype != entry.dtype:
                raise CorruptShardError(f"{path}: tensor {entry.key!r} is {list(h.shape)} {h.dtype} in the file but "
                                        f"{list(entry.shape)} {entry.dtype} in the manifest",
                                        path=path, tensor=entry.key)
            located.append((path, fd, h))
        if not self.verify:
            i = 0
            while i < len(located):
                path, fd, h = located[i]
                j = i + 1
                while j < len(located) and located[j][1] == fd and located[j][2].begin == located[j - 1][2].end:
                    j += 1
                pread_into(fd, views[i:j], h.begin, path, entries[i].key)
                i = j
            return
        # Read and hash at once: one worker thread hashes chunk k while this thread reads chunk k+1
        # (both release the GIL), so a verified restore costs about max(read, hash), not their sum.
        hashers = [hashlib.sha256() for _ in entries]
        pending = []
        for (path, fd, h), view, entry, hasher in zip(located, views, entries, hashers):
            for start in range(0, len(view), _HASH_CHUNK_NBYTES):
                chunk = view[start:start + _HASH_CHUNK_NBYTES]
                pread_into(fd, chunk, h.begin + start, path, entry.key)
                pending.append(self._hash_pool().submit(hasher.update, chunk))
        for future in pending:
            future.result()
        for entry, hasher, (path, _, _) in zip(entries, hashers, located):
            digest = hasher.hexdigest()
            if digest != entry.sha256:
                raise CorruptShardError(f"{path}: tensor {entry.key!r} fails its checksum (sha256 "
                                        f"{digest[:16]}..., manifest {entry.sha256[:16]}...)",
                                        path=path, tensor=entry.key)

    def _hash_pool(self) -> ThreadPoolExecutor:
        # One worker: updates of one hasher must run in submission order.
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="eep-sha256")
        return self._pool

    def _open(self, entry: TensorEntry) -> tuple[str, int, dict[str, HeaderEntry]]:
        """``(path, fd, header)`` of the entry's file, opened and validated on first use."""
        with self._lock:
            opened = self._open_files.get(entry.file)
            if opened is None:
                path = check_inside(self.shard_dir, entry.file)  # again at open time: symlinks may have moved
                try:
                    header, _ = read_header(path)  # MissingShardError / CorruptShardError name the file
                except ShardError as exc:
                    exc.tensor = exc.tensor or entry.key
                    raise
                opened = self._open_files[entry.file] = (path, os.open(path, os.O_RDONLY), header)
            return opened

    def close(self) -> None:
        with self._lock:
            for _, fd, _ in self._open_files.values():
                os.close(fd)
            self._open_files.clear()
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass


# ---- host ----
def default_host_dir() -> str:
    """Where host tiers live: ``$EEP_HOST_TIER_DIR``, else ``/dev/shm`` (RAM-backed, shared by the node)."""
    return envs.host_tier_dir()


def host_tier_path(manifest: Manifest, host_dir: str | None = None) -> str:
    """The node-wide file name of the host tier of one shard set (keyed by the manifest's digest)."""
    return os.path.join(host_dir or default_host_dir(), f"eep-host-{manifest.digest[:24]}.safetensors")


class HostTier:
    """A host-memory copy of (some of) the experts, shared by every process of a node.

    The first process to construct it for a shard set builds the file (from a verified
    ``DiskTier``, under an ``flock`` so concurrent ranks build it once, published with
    ``os.replace``); the others map the finished file. ``experts`` restricts it to some
    ``(layer, expert)`` pairs (default: all). ``create=False`` only attaches and raises
    ``HostTierError`` when there is nothing valid to attach to.

    Checks on attach: format, the manifest digest (a tier built from other shards is stale), file
    size and every entry's shape/dtype. ``verify=True`` also hashes each expert before copying it,
    which costs ~memcpy/5 on a CPU; off by default, since the file was built from verified shards.
    Call ``unlink()`` once the node is done with it (files in /dev/shm outlive processes).
    """

    name = "host"

    def __init__(self, shard_dir: str, *, path: str | None = None, experts: Iterable[tuple[int, int]] | None = None,
                 create: bool = True, verify: bool = False, pin: bool | None = None,
                 manifest: Manifest | None = None):
        self.shard_dir = shard_dir
        self.manifest = manifest or Manifest.load(shard_dir)
        self.path = path or host_tier_path(self.manifest)
        self.verify = verify
        self.is_pinned = False
        self.pin_refusal: str | None = None  # why the mapping is not page-locked, when pinning was asked
        self._buffer: torch.Tensor | None = None
        self._fd = -1
        wanted = None if experts is None else sorted({(int(l), int(e)) for l, e in experts})
        if create:
            self._build_once(wanted)
        self._attach()
        if pin if pin is not None else torch.cuda.is_available():
            self._pin()

    # ---- protocol ----
    def has_expert(self, layer: int, expert: int) -> bool:
        return (layer, expert) in self._index

    def copy_expert_into(self, layer: int, expert: int, w_gate_dst: ExpertWeight, w_up_dst: ExpertWeight,
                         w_down_dst: ExpertWeight, *, stream: torch.cuda.Stream | None = None) -> int:
        dsts = (w_gate_dst, w_up_dst, w_down_dst)
        destination_tensors(self.manifest, layer, expert, dsts)  # ValueError for the wrong kind
        views = self.expert_views(layer, expert)
        for dst, src in zip(dsts, views):
            _copy(dst, src, stream, is_pinned=self.is_pinned)
        return sum(weight_nbytes(v) for v in views)

    # ---- access ----
    def expert_views(self, layer: int, expert: int) -> tuple[ExpertWeight, ExpertWeight, ExpertWeight]:
        """Zero-copy ``(w_gate [I, H], w_up [I, H], w_down [H, I])`` views into the shared mapping
        (``Fp8Weight`` views of weights and scales for FP8 experts)."""
        if (layer, expert) not in self._index:
            raise HostTierError(f"{self.path}: host tier does not hold layer {layer} expert {expert}",
                                path=self.path, tensor=f"layers.{layer}.experts.{expert}")
        if os.fstat(self._fd).st_size != self._size:  # truncated under us: touching the mapping would SIGBUS
            raise HostTierError(f"{self.path}: host tier file changed size ({os.fstat(self._fd).st_size} bytes, "
                                f"mapped {self._size})", path=self.path)
        views = []
        for entry, (begin, end, dtype, shape) in zip(self.manifest.expert_tensor_entries(layer, expert),
                                                      self._index[(layer, expert)]):
            view = self._buffer[begin:end].view(dtype).view(shape)
            if self.verify and hashlib.sha256(tensor_bytes(view)).hexdigest() != entry.sha256:
                raise HostTierError(f"{self.path}: tensor {entry.key!r} of layer {layer} expert {expert} fails its "
                                    "checksum in the host tier", path=self.path, tensor=entry.key)
            views.append(view)
        if self.manifest.is_fp8:  # [w, s, w, s, w, s] -> three units
            return tuple(Fp8Weight(views[i], views[i + 1]) for i in range(0, 6, 2))  # type: ignore[return-value]
        return tuple(views)  # type: ignore[return-value]

    @property
    def nbytes(self) -> int:
        return self._size

    def unlink(self) -> None:
        """Remove the shared file (mappings stay valid until closed)."""
        for p in (self.path, self.path + ".lock"):
            try:
                os.unlink(p)
            except FileNotFoundError:
                pass

    def close(self) -> None:
        if self.is_pinned and self._buffer is not None:
            torch.cuda.cudart().cudaHostUnregister(self._buffer.data_ptr())
            self.is_pinned = False
        self._buffer = None
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass

    # ---- build / attach ----
    def _build_once(self, wanted: list[tuple[int, int]] | None) -> None:
        os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
        with open(self.path + ".lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # concurrent ranks of a node: one builds, the rest wait and attach
            try:
                held = self._read_valid_header() or set()
            except HostTierError as exc:  # stale or damaged: rebuild it
                log.warning("rebuilding host tier: %s", exc)
                held = set()
            want = set(self.manifest.expert_pairs() if wanted is None else wanted)
            if want <= held:
                return
            pairs = sorted(want | held)  # keep what other ranks of the node asked for
            disk = DiskTier(self.shard_dir, manifest=self.manifest)
            tensors = []
            for layer, expert in pairs:
                for entry in self.manifest.expert_tensor_entries(layer, expert):
                    tensors.append(TensorToWrite(_host_key(layer, expert, entry), entry.dtype, entry.shape,
                                                 _reader(disk, entry)))
            # Widest dtype first: FP8 weights of odd byte sizes never misalign the float32 scales'
            # views into the mapping (the sort is stable, so the rest keeps expert order).
            tensors.sort(key=lambda t: -DTYPE_SIZE[t.dtype])
            write_safetensors(self.path, tensors, metadata={"format": HOST_TIER_FORMAT,
                                                            "manifest_sha256": self.manifest.digest},
                              readers=min(8, os.cpu_count() or 1))

    def _read_valid_header(self) -> set[tuple[int, int]] | None:
        if not os.path.exists(self.path):
            return None
        return set(self._parse_header()[0])

    def _parse_header(self) -> tuple[dict[tuple[int, int], list], int]:
        try:
            entries, metadata = read_header(self.path)
        except MissingShardError:
            raise HostTierError(f"{self.path}: host tier file is missing", path=self.path) from None
        except CorruptShardError as exc:
            raise HostTierError(f"host tier {exc}", path=self.path) from None
        if metadata.get("format") != HOST_TIER_FORMAT or metadata.get("manifest_sha256") != self.manifest.digest:
            raise HostTierError(f"{self.path}: host tier is stale: built for manifest "
                                f"{metadata.get('manifest_sha256', '?')[:16]}..., shards are "
                                f"{self.manifest.digest[:16]}...", path=self.path)
        index: dict[tuple[int, int], list] = {}
        for key, e in entries.items():
            try:
                _, layer, _, expert, name = key.split(".")
                layer, expert = int(layer), int(expert)
                listed = self.manifest.expert_tensor_entries(layer, expert)
                slot = [_host_key(layer, expert, t) for t in listed].index(key)
            except ValueError:
                raise HostTierError(f"{self.path}: unexpected tensor {key!r} in host tier", path=self.path,
                                    tensor=key) from None
            entry = listed[slot]
            if e.shape != entry.shape or e.dtype != entry.dtype:
                raise HostTierError(f"{self.path}: tensor {key!r} is {list(e.shape)} {e.dtype} in the host tier, "
                                    f"{list(entry.shape)} {entry.dtype} in the manifest", path=self.path, tensor=key)
            if e.begin % DTYPE_SIZE[e.dtype]:
                raise HostTierError(f"{self.path}: tensor {key!r} starts at byte {e.begin}, not aligned for "
                                    f"{e.dtype}", path=self.path, tensor=key)
            index.setdefault((layer, expert), [None] * len(listed))[slot] = \
                (e.begin, e.end, DTYPE_TO_TORCH[e.dtype], e.shape)
        for (layer, expert), parts in index.items():
            if any(p is None for p in parts):
                raise HostTierError(f"{self.path}: layer {layer} expert {expert} is incomplete in the host tier",
                                    path=self.path, tensor=f"layers.{layer}.experts.{expert}")
        size = max((e.end for e in entries.values()), default=0)
        return index, size

    def _attach(self) -> None:
        self._index, self._size = self._parse_header()
        self._fd = os.open(self.path, os.O_RDONLY)
        if os.fstat(self._fd).st_size != self._size:
            raise HostTierError(f"{self.path}: host tier file is {os.fstat(self._fd).st_size} bytes, header says "
                                f"{self._size}", path=self.path)
        # MAP_SHARED mapping of the whole file: every process of the node shares the same pages.
        self._buffer = torch.from_file(self.path, shared=True, size=self._size, dtype=torch.uint8)

    def _pin(self) -> None:
        """Page-lock the mapping so GPU copies from it are async DMA; if it cannot be, it stays
        pageable (copies synchronous) and one warning names the reason. Never raises."""
        reason = _unpinnable_reason(self.path)
        if reason is None:
            try:
                cudart = torch.cuda.cudart()
            except (AssertionError, RuntimeError, AttributeError) as exc:  # no usable CUDA in this process
                reason = f"CUDA is not usable here ({exc})"
            else:
                code = int(cudart.cudaHostRegister(self._buffer.data_ptr(), self._size, 0))
                if code == 0:
                    self.is_pinned = True
                    return
                _consume_cuda_error()
                reason = (f"cudaHostRegister of {self._size / 1e9:.1f} GB failed with CUDA error {code} "
                          f"({_cuda_error_name(cudart, code)})")
        log.warning("host tier %s stays pageable: %s; copies from it to a GPU are synchronous", self.path, reason)
        self.pin_refusal = reason


# filesystems whose files live in memory: a MAP_SHARED mapping of such a file can be page-locked
_MEMORY_FILESYSTEMS = {0x01021994: "tmpfs", 0x858458F6: "ramfs", 0x958458F6: "hugetlbfs"}


def _filesystem_type(path: str) -> int | None:
    """``statfs(path).f_type`` (Linux), or None where it cannot be read."""
    libc_name = ctypes.util.find_library("c")
    if libc_name is None:
        return None
    libc = ctypes.CDLL(libc_name, use_errno=True)
    buf = (ctypes.c_long * 32)()  # struct statfs begins with f_type; 256 bytes hold the whole struct
    if libc.statfs(os.fsencode(path), buf) != 0:
        return None
    return buf[0] & 0xFFFFFFFF


def _unpinnable_reason(path: str) -> str | None:
    """Why a mapping of ``path`` cannot be page-locked, known before trying, or None.

    ``cudaHostRegister`` of a MAP_SHARED mapping of a file on a disk filesystem fails (measured on
    an H200 host, ext4), and a failed registration used to leave its error behind for the next CUDA
    call of the process to report."""
    fs = _filesystem_type(path)
    if fs is None or fs in _MEMORY_FILESYSTEMS:
        return None
    return (f"it is a file on a disk filesystem (statfs type {fs:#x}), not in memory (tmpfs such as /dev/shm; "
            f"set {DEFAULT_HOST_DIR_ENV} to a tmpfs directory with room for it)")


def _consume_cuda_error() -> None:
    """Clear the error a failed CUDA runtime call left as the process's last error.

    Torch checks the last error after each kernel launch, so an unconsumed one surfaces at an
    unrelated operation (a failed host registration once crashed a rank at ``embed.to(device)``
    with "invalid argument"). A throwaway launch reads and clears it."""
    for _ in range(2):
        try:
            torch.ones(1, device="cuda").add_(1)
            return
        except RuntimeError:
            continue


def _cuda_error_name(cudart, code: int) -> str:
    try:
        return str(cudart.cudaGetErrorString(code))
    except (AttributeError, RuntimeError, TypeError):
        return "unknown"


def _host_key(layer: int, expert: int, entry: TensorEntry) -> str:
    """Name of an expert tensor in the host tier file: ``layers.{l}.experts.{e}.{role}[_scale]``."""
    return f"layers.{layer}.experts.{expert}.{entry.role}" + ("_scale" if entry.part == SCALE else "")


def _reader(disk: DiskTier, entry: TensorEntry):
    return lambda: tensor_bytes(disk.read_tensor(entry))


def tier_from_name(name: str, shard_dir: str, manifest: Manifest) -> ExpertSource:
    """``"host"`` or ``"disk"`` -> a tier with default settings (what ``ExpertStore(tiers=[...])`` accepts)."""
    if name == "disk":
        return DiskTier(shard_dir, manifest=manifest)
    if name == "host":
        return HostTier(shard_dir, manifest=manifest)
    raise ValueError(f"unknown tier {name!r}: expected 'host' or 'disk' or an eep.repair.ExpertSource")


__all__ = ["DiskTier", "HostTier", "default_host_dir", "host_tier_path", "tier_from_name"]
