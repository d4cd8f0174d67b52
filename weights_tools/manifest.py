"""``manifest.json``: what ``prepare`` wrote, and the single source of truth for restore and verify.

Layout of OUT_DIR::

    manifest.json                     this file (written last, atomically)
    config.json                       copy of the source checkpoint's config
    non_expert.safetensors            every tensor that is not a routed expert (original keys)
    experts/expert-00007.safetensors  logical expert 7 of every MoE layer:
                                      ``layers.{layer}.w_gate [I, H]``, ``.w_up [I, H]``, ``.w_down [H, I]``

Every path in the manifest is relative to OUT_DIR and must stay inside it (checked on load), so a
hostile manifest cannot make a restore read ``/etc/shadow`` or ``../other-model``.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass, field
from typing import Any

from weights_tools.errors import ManifestError

FORMAT_NAME = "eep-expert-shards"
FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
NON_EXPERT_FILE = "non_expert.safetensors"
ROLES = ("gate", "up", "down")
ROLE_KEYS = {"gate": "w_gate", "up": "w_up", "down": "w_down"}


def expert_file(expert: int) -> str:
    return f"experts/expert-{expert:05d}.safetensors"


def expert_key(layer: int, role: str) -> str:
    return f"layers.{layer}.{ROLE_KEYS[role]}"


@dataclass(frozen=True)
class TensorEntry:
    """One tensor of OUT_DIR. ``layer``/``expert``/``role`` are ``None`` for non-expert tensors."""

    file: str
    key: str
    layer: int | None
    expert: int | None
    role: str | None
    shape: tuple[int, ...]
    dtype: str
    nbytes: int
    sha256: str
    source_key: str | None = None


@dataclass
class Manifest:
    """The parsed manifest; ``architecture`` holds hidden/intermediate sizes, expert count, MoE layers."""

    source: dict[str, Any]
    architecture: dict[str, Any]
    tensors: list[TensorEntry]
    files: dict[str, int]  # relative path -> size in bytes
    format: str = FORMAT_NAME
    format_version: int = FORMAT_VERSION
    digest: str = ""  # sha256 of manifest.json as read; identifies this shard set (host tier key)
    _experts: dict[tuple[int, int], tuple[TensorEntry, TensorEntry, TensorEntry]] = field(
        default_factory=dict, repr=False, compare=False)

    def __post_init__(self) -> None:
        by_role: dict[tuple[int, int], dict[str, TensorEntry]] = {}
        for t in self.tensors:
            if t.expert is not None:
                by_role.setdefault((t.layer, t.expert), {})[t.role] = t
        for (layer, expert), roles in by_role.items():
            missing = [r for r in ROLES if r not in roles]
            if missing:
                raise ManifestError(f"manifest lists layer {layer} expert {expert} without role(s) {missing}")
            self._experts[(layer, expert)] = (roles["gate"], roles["up"], roles["down"])

    # ---- derived sizes ----
    @property
    def moe_layers(self) -> list[int]:
        return list(self.architecture["moe_layers"])

    @property
    def num_experts(self) -> int:
        return int(self.architecture["num_experts"])

    @property
    def hidden_size(self) -> int:
        return int(self.architecture["hidden_size"])

    @property
    def intermediate_size(self) -> int:
        return int(self.architecture["moe_intermediate_size"])

    def expert_entries(self, layer: int, expert: int) -> tuple[TensorEntry, TensorEntry, TensorEntry]:
        """``(gate, up, down)`` entries of one logical expert; ``ValueError`` names the valid ranges."""
        try:
            return self._experts[(layer, expert)]
        except KeyError:
            raise ValueError(f"no layer {layer} expert {expert} in this shard set: MoE layers are "
                             f"{self.moe_layers}, experts 0..{self.num_experts - 1}") from None

    def expert_pairs(self) -> list[tuple[int, int]]:
        """Every ``(layer, expert)`` the shard set holds, sorted."""
        return sorted(self._experts)

    def expert_nbytes(self, layer: int, expert: int) -> int:
        return sum(t.nbytes for t in self.expert_entries(layer, expert))

    # ---- (de)serialisation ----
    def to_json(self) -> str:
        doc = {"format": self.format, "format_version": self.format_version, "source": self.source,
               "architecture": self.architecture, "files": self.files,
               "tensors": [{k: (list(v) if k == "shape" else v) for k, v in asdict(t).items()} for t in self.tensors]}
        return json.dumps(doc, indent=1, sort_keys=False) + "\n"

    @classmethod
    def load(cls, shard_dir: str) -> Manifest:
        """Read and validate ``shard_dir/manifest.json`` (schema, version, every path inside shard_dir)."""
        path = os.path.join(shard_dir, MANIFEST_NAME)
        try:
            with open(path, "rb") as f:
                raw = f.read()
        except FileNotFoundError:
            raise ManifestError(f"{path}: manifest is missing (run `eep-shards prepare` first)", path=path) from None
        try:
            doc = json.loads(raw)
        except (UnicodeDecodeError, ValueError) as exc:
            raise ManifestError(f"{path}: manifest is not valid JSON ({exc})", path=path) from None
        if not isinstance(doc, dict) or doc.get("format") != FORMAT_NAME:
            raise ManifestError(f"{path}: not an {FORMAT_NAME} manifest", path=path)
        if doc.get("format_version") != FORMAT_VERSION:
            raise ManifestError(f"{path}: format_version {doc.get('format_version')!r}, this tool reads "
                                f"{FORMAT_VERSION}", path=path)
        try:
            files = {str(k): int(v) for k, v in doc["files"].items()}
            tensors = [_entry(t) for t in doc["tensors"]]
            arch = doc["architecture"]
            for name in ("moe_layers", "num_experts", "hidden_size", "moe_intermediate_size", "dtype"):
                arch[name]  # noqa: B018 - presence check
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise ManifestError(f"{path}: malformed manifest ({type(exc).__name__}: {exc})", path=path) from None
        for rel in files:
            check_inside(shard_dir, rel, manifest_path=path)
        for t in tensors:  # every tensor's file is one of the checked files
            if t.file not in files:
                raise ManifestError(f"{path}: tensor {t.key!r} names file {t.file!r} that the files list lacks",
                                    path=path, tensor=t.key)
        return cls(source=doc["source"], architecture=arch, tensors=tensors, files=files,
                   digest=hashlib.sha256(raw).hexdigest())


def _entry(t: dict[str, Any]) -> TensorEntry:
    role = t.get("role")
    if role is not None and role not in ROLES:
        raise ValueError(f"tensor {t.get('key')!r} has role {role!r}, expected one of {ROLES}")
    return TensorEntry(file=str(t["file"]), key=str(t["key"]),
                       layer=None if t.get("layer") is None else int(t["layer"]),
                       expert=None if t.get("expert") is None else int(t["expert"]),
                       role=role, shape=tuple(int(d) for d in t["shape"]), dtype=str(t["dtype"]),
                       nbytes=int(t["nbytes"]), sha256=str(t["sha256"]), source_key=t.get("source_key"))


def check_inside(root: str, rel: str, *, manifest_path: str | None = None) -> str:
    """Resolve ``rel`` under ``root``; ``ManifestError`` if it is absolute, climbs out, or a symlink leads out."""
    where = manifest_path or root
    if not rel or os.path.isabs(rel) or "\\" in rel or ".." in rel.split("/") or "\x00" in rel:
        raise ManifestError(f"{where}: path {rel!r} points outside the shard directory", path=where)
    full = os.path.join(root, rel)
    real_root = os.path.realpath(root)
    if os.path.commonpath([real_root, os.path.realpath(full)]) != real_root:
        raise ManifestError(f"{where}: path {rel!r} resolves outside the shard directory "
                            f"({os.path.realpath(full)})", path=where)
    return full
