"""``prepare``: split a Hugging Face MoE checkpoint into one safetensors file per logical expert.

Each output tensor is read once from the source (a plain ``pread`` of its byte range whenever the
canonical tensor is contiguous there, which is every layout but the transposed ones), hashed once
and written once. Files are streamed to a temporary name and renamed, never half-written under a
final name; the old manifest is removed first and the new one written last, so after a crash
every reader refuses the directory until a re-run completes. Re-running with an unchanged source
is a no-op.
"""

from __future__ import annotations

import os
import re
import shutil
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TextIO

from safetensors import safe_open

from weights_tools.checkpoint import CheckpointLayout, ExpertSource, inspect_checkpoint
from weights_tools.errors import CheckpointError, ShardError
from weights_tools.manifest import (MANIFEST_NAME, NON_EXPERT_FILE, ROLES, SCALE, Manifest, TensorEntry,
                                    expert_file, expert_key)
from weights_tools.safetensors_io import DTYPE_SIZE, TensorToWrite, pread_into, tensor_bytes, write_safetensors

_EXPERT_FILE_RE = re.compile(r"^expert-\d{5}\.safetensors(\.tmp-\d+)?$")


@dataclass
class PrepareResult:
    out_dir: str
    manifest: Manifest
    is_up_to_date: bool  # True when nothing had to be written
    nbytes_written: int
    seconds: float


class Progress:
    """A plain-text progress line on stderr (bytes and tensors), redrawn at most 5 times a second."""

    def __init__(self, total_bytes: int, total_tensors: int, *, quiet: bool = False, stream: TextIO | None = None,
                 label: str = "prepare"):
        self.total_bytes, self.total_tensors = total_bytes, total_tensors
        self.done_bytes = self.done_tensors = 0
        self.quiet, self.stream, self.label = quiet, stream or sys.stderr, label
        self._start = self._last = time.perf_counter()
        self._lock = threading.Lock()

    def update(self, nbytes: int) -> None:
        with self._lock:
            self.done_bytes += nbytes
            self.done_tensors += 1
            now = time.perf_counter()
            if not self.quiet and (now - self._last > 0.2 or self.done_tensors == self.total_tensors):
                self._last = now
                self._draw(now)

    def close(self) -> None:
        if not self.quiet:
            if self.done_tensors != self.total_tensors or self.total_tensors == 0:
                self._draw(time.perf_counter())
            self.stream.write("\n")
            self.stream.flush()

    def _draw(self, now: float) -> None:
        frac = self.done_bytes / self.total_bytes if self.total_bytes else 1.0
        bar = "#" * int(frac * 30)
        rate = self.done_bytes / max(now - self._start, 1e-9) / 1e6
        self.stream.write(f"\r{self.label} [{bar:<30}] {frac * 100:5.1f}%  {self.done_tensors}/{self.total_tensors} "
                          f"tensors  {self.done_bytes / 1e6:,.1f}/{self.total_bytes / 1e6:,.1f} MB  {rate:,.0f} MB/s")
        self.stream.flush()


def prepare(checkpoint_dir: str, out_dir: str, *, quiet: bool = False, force: bool = False,
            num_workers: int | None = None, progress_stream: TextIO | None = None) -> PrepareResult:
    """Write per-expert shards, ``non_expert.safetensors``, ``config.json`` and ``manifest.json`` to ``out_dir``.

    Raises ``CheckpointError`` for a checkpoint that cannot be converted, and ``ShardError`` for a
    non-empty ``out_dir`` that is not a shard set unless ``force`` (nothing is written then).
    """
    start = time.perf_counter()
    if os.path.realpath(checkpoint_dir) == os.path.realpath(out_dir):
        raise CheckpointError(f"{out_dir}: OUT_DIR must differ from CHECKPOINT_DIR", path=out_dir)
    if not force:
        _check_out_dir(out_dir)
    layout = inspect_checkpoint(checkpoint_dir)
    if not force:
        current = _up_to_date(out_dir, layout)
        if current is not None:
            return PrepareResult(out_dir, current, True, 0, time.perf_counter() - start)

    os.makedirs(os.path.join(out_dir, "experts"), exist_ok=True)
    # No manifest while files are being replaced: a crash mid-way leaves a set that every reader
    # refuses ("manifest is missing") rather than an old manifest describing new files.
    if os.path.exists(os.path.join(out_dir, MANIFEST_NAME)):
        os.unlink(os.path.join(out_dir, MANIFEST_NAME))
    jobs = [(expert_file(e), _expert_tensors(layout, e)) for e in range(layout.num_experts)]
    jobs.append((NON_EXPERT_FILE, _non_expert_tensors(layout)))
    progress = Progress(sum(t.nbytes for _, ts in jobs for t, _ in ts), sum(len(ts) for _, ts in jobs),
                        quiet=quiet, stream=progress_stream)
    reader = _SourceReader(checkpoint_dir)
    try:
        def run(job: tuple[str, list[tuple[TensorToWrite, dict]]]) -> tuple[str, int, list[TensorEntry]]:
            rel, tensors = job
            entries: list[TensorEntry] = []
            info = {t.key: meta for t, meta in tensors}

            def done(t: TensorToWrite, digest: str) -> None:
                entries.append(TensorEntry(file=rel, key=t.key, shape=t.shape, dtype=t.dtype, nbytes=t.nbytes,
                                           sha256=digest, **info[t.key]))
                progress.update(t.nbytes)

            size = write_safetensors(os.path.join(out_dir, rel), [_bind(t, reader) for t, _ in tensors],
                                     metadata={"format": "eep-expert-shard"}, on_tensor=done)
            return rel, size, entries

        workers = num_workers or min(4, os.cpu_count() or 1)
        with ThreadPoolExecutor(max_workers=workers) as pool:
            results = list(pool.map(run, jobs))  # map keeps job order: the manifest is deterministic
    finally:
        reader.close()
        progress.close()

    _atomic_copy(os.path.join(checkpoint_dir, "config.json"), os.path.join(out_dir, "config.json"))
    files = {rel: size for rel, size, _ in results}
    files["config.json"] = os.path.getsize(os.path.join(out_dir, "config.json"))
    manifest = Manifest(
        source={"path": os.path.abspath(checkpoint_dir), "config_sha256": layout.config_sha256,
                "fingerprint": layout.fingerprint, "files": layout.source_files},
        architecture=layout.architecture(), tensors=[e for _, _, entries in results for e in entries], files=files)
    _atomic_write(os.path.join(out_dir, MANIFEST_NAME), manifest.to_json())
    _remove_stale(out_dir, set(files))
    return PrepareResult(out_dir, Manifest.load(out_dir), False, sum(files.values()), time.perf_counter() - start)


def _expert_tensors(layout: CheckpointLayout, expert: int) -> list[tuple[TensorToWrite, dict]]:
    """One expert's tensors in file order: each weight, followed by its block scales for FP8 experts
    (adjacent, so a restore reads an expert's weights and scales with one ``preadv``)."""
    out = []
    for layer in layout.moe_layers:
        for role in ROLES:
            src = layout.experts[(layer, expert, role)]
            out.append((TensorToWrite(expert_key(layer, role), src.dtype, src.shape, src),  # type: ignore[arg-type]
                        {"layer": layer, "expert": expert, "role": role, "source_key": src.key}))
            scale = layout.scales.get((layer, expert, role))
            if scale is not None:
                out.append((TensorToWrite(expert_key(layer, role, SCALE), scale.dtype, scale.shape, scale),  # type: ignore[arg-type]
                            {"layer": layer, "expert": expert, "role": role, "source_key": scale.key, "part": SCALE}))
    return out


def _non_expert_tensors(layout: CheckpointLayout) -> list[tuple[TensorToWrite, dict]]:
    # Widest dtypes first keeps every tensor naturally aligned inside the data block.
    ordered = sorted(layout.non_expert, key=lambda fe: (-DTYPE_SIZE[fe[1].dtype], fe[1].key))
    return [(TensorToWrite(e.key, e.dtype, e.shape, (name, e)),  # type: ignore[arg-type]
             {"layer": None, "expert": None, "role": None, "source_key": e.key}) for name, e in ordered]


def _bind(t: TensorToWrite, reader: _SourceReader) -> TensorToWrite:
    """Replace the placeholder in ``t.read`` (a source descriptor) by a function that reads it."""
    src = t.read
    return TensorToWrite(t.key, t.dtype, t.shape, lambda: reader.read(src))


class _SourceReader:
    """Reads source byte ranges; keeps one fd (and, for transposed layouts, one ``safe_open``) per file."""

    def __init__(self, checkpoint_dir: str):
        self.checkpoint_dir = checkpoint_dir
        self._fds: dict[str, int] = {}
        self._handles: dict[str, object] = {}
        self._lock = threading.Lock()
        self._local = threading.local()

    def read(self, src: ExpertSource | tuple) -> memoryview | bytes:
        """The bytes of one output tensor, valid until this thread's next ``read``."""
        if isinstance(src, tuple):  # a non-expert tensor: (file, header entry)
            name, entry = src
            return self._pread(name, entry.nbytes, entry.begin, entry.key)
        if not src.transpose:
            return self._pread(src.file, src.nbytes, src.begin, src.key)
        with self._lock:
            handle = self._handles.get(src.file)
            if handle is None:
                handle = self._handles[src.file] = safe_open(self._path(src.file), framework="pt")
        block = handle.get_slice(src.key)[src.index]  # [H, 2I], [H, I] (gate/up) or [I, H] (down)
        if src.half is not None:
            rows = src.shape[0]
            block = block[:, src.half * rows:(src.half + 1) * rows]
        return tensor_bytes(block.t())

    def _pread(self, name: str, nbytes: int, offset: int, key: str) -> memoryview:
        # One reusable buffer per worker thread: a fresh allocation per tensor costs a page fault per 4 KiB.
        buf = getattr(self._local, "buf", None)
        if buf is None or len(buf) < nbytes:
            buf = self._local.buf = bytearray(max(nbytes, 1 << 20))
        view = memoryview(buf)[:nbytes]
        pread_into(self._fd(name), view, offset, self._path(name), key)
        return view

    def _path(self, name: str) -> str:
        return os.path.join(self.checkpoint_dir, name)

    def _fd(self, name: str) -> int:
        with self._lock:
            if name not in self._fds:
                self._fds[name] = os.open(self._path(name), os.O_RDONLY)
            return self._fds[name]

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()
        self._handles.clear()


_TMP_RE = re.compile(r"\.tmp-\d+$")


def _check_out_dir(out_dir: str) -> None:
    """Refuse a non-empty OUT_DIR that is not a shard set (what prepare writes, maybe half-written
    by an interrupted run), naming what is there: prepare would overwrite a ``config.json`` or a
    ``manifest.json`` of the user's own."""
    if not os.path.isdir(out_dir):
        return
    names = sorted(os.listdir(out_dir))
    ours = {MANIFEST_NAME, "config.json", NON_EXPERT_FILE, "experts"}
    foreign = [n for n in names if n not in ours and not _TMP_RE.search(n)]
    experts_dir = os.path.join(out_dir, "experts")
    if os.path.isdir(experts_dir):
        foreign += [f"experts/{n}" for n in sorted(os.listdir(experts_dir)) if not _EXPERT_FILE_RE.match(n)]
    elif os.path.exists(experts_dir):
        foreign.append("experts (not a directory)")
    is_shard_set = MANIFEST_NAME in names or os.path.isdir(experts_dir)
    if names and (foreign or not is_shard_set):
        named = foreign if is_shard_set else names + [n for n in foreign if n not in names]
        shown = ", ".join(named[:6]) + (", ..." if len(named) > 6 else "")
        raise ShardError(f"{out_dir}: OUT_DIR is not empty and is not an eep shard set (it holds {shown}); "
                         f"prepare would overwrite files there: choose a new or empty directory, or pass "
                         f"--force to write into it anyway", path=out_dir)


def _up_to_date(out_dir: str, layout: CheckpointLayout) -> Manifest | None:
    try:
        manifest = Manifest.load(out_dir)
    except ShardError:
        return None
    if manifest.source.get("fingerprint") != layout.fingerprint:
        return None
    for rel, size in manifest.files.items():
        path = os.path.join(out_dir, rel)
        if not os.path.isfile(path) or os.path.getsize(path) != size:
            return None
    return manifest


def _atomic_write(path: str, text: str) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def _atomic_copy(src: str, dst: str) -> None:
    tmp = f"{dst}.tmp-{os.getpid()}"
    shutil.copyfile(src, tmp)
    os.replace(tmp, dst)


def _remove_stale(out_dir: str, keep: set[str]) -> None:
    """Delete expert files a previous run wrote for experts this checkpoint does not have."""
    experts_dir = os.path.join(out_dir, "experts")
    for name in os.listdir(experts_dir):
        if _EXPERT_FILE_RE.match(name) and f"experts/{name}" not in keep:
            os.unlink(os.path.join(experts_dir, name))
