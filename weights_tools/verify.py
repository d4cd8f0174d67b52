"""``verify``: check a shard directory against its manifest and list *every* problem found."""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass

from weights_tools.errors import ShardError
from weights_tools.manifest import Manifest, check_inside
from weights_tools.safetensors_io import pread_exact, read_header


@dataclass(frozen=True)
class ShardProblem:
    """One thing wrong with a shard set; ``tensor`` is ``None`` for file-level problems."""

    path: str
    tensor: str | None
    message: str

    def __str__(self) -> str:
        return self.message


def verify_shards(shard_dir: str, *, check_sha256: bool = True) -> list[ShardProblem]:
    """Every problem with ``shard_dir``: manifest, missing/extra files and tensors, headers, sizes, checksums.

    An empty list means the shard set is exactly what the manifest describes.
    """
    try:
        manifest = Manifest.load(shard_dir)
    except ShardError as exc:
        return [ShardProblem(exc.path or shard_dir, exc.tensor, str(exc))]
    problems: list[ShardProblem] = []
    by_file: dict[str, list] = {}
    for t in manifest.tensors:
        by_file.setdefault(t.file, []).append(t)
    for rel, size in manifest.files.items():
        path = check_inside(shard_dir, rel)
        if not os.path.isfile(path):
            problems.append(ShardProblem(path, None, f"{path}: file is missing"))
            continue
        if rel not in by_file:  # config.json and the like: size only
            if os.path.getsize(path) != size:
                problems.append(ShardProblem(path, None, f"{path}: {os.path.getsize(path)} bytes, manifest says {size}"))
            continue
        try:
            header, _ = read_header(path)
        except ShardError as exc:
            problems.append(ShardProblem(path, None, str(exc)))
            continue
        if os.path.getsize(path) != size:
            problems.append(ShardProblem(path, None, f"{path}: {os.path.getsize(path)} bytes, manifest says {size}"))
        listed = {t.key for t in by_file[rel]}
        for key in sorted(set(header) - listed):
            problems.append(ShardProblem(path, key, f"{path}: tensor {key!r} is not in the manifest"))
        fd = os.open(path, os.O_RDONLY)
        try:
            for t in by_file[rel]:
                h = header.get(t.key)
                if h is None:
                    problems.append(ShardProblem(path, t.key, f"{path}: tensor {t.key!r} is missing from the file"))
                    continue
                if h.shape != t.shape or h.dtype != t.dtype or h.nbytes != t.nbytes:
                    problems.append(ShardProblem(path, t.key, f"{path}: tensor {t.key!r} is {list(h.shape)} {h.dtype} "
                                                 f"in the file, {list(t.shape)} {t.dtype} in the manifest"))
                    continue
                if check_sha256:
                    digest = hashlib.sha256(pread_exact(fd, h.nbytes, h.begin, path, t.key)).hexdigest()
                    if digest != t.sha256:
                        problems.append(ShardProblem(path, t.key, f"{path}: tensor {t.key!r} fails its checksum "
                                                     f"(sha256 {digest[:16]}..., manifest {t.sha256[:16]}...)"))
        finally:
            os.close(fd)
    return problems
