"""``manifest.json``: what ``prepare`` wrote, and the single source of truth for restore and verify.

Layout of OUT_DIR::

    manifest.json                     this file (written last, atomically)
    config.json                       copy of the source checkpoint's config
    non_expert.safetensors            every tensor that is not a routed expert (original keys)
    experts/expert-00007.safetensors  logical expert 7 of every MoE layer:
                                      ``layers.{layer}.w_gate [I, H]``, ``.w_up [I, H]``, ``.w_down [H, I]``,
                                      with block-scaled FP8 experts each followed by its float32
                                      scales ``layers.{layer}.w_gate_scale_inv [ceil(I/128), ceil(H/128)]`` ...

Every path in the manifest is relative to OUT_DIR and must stay inside it (checked on load), so a
hostile manifest cannot make a restore read ``/etc/shadow`` or ``../other-model``. The manifest's
own fields are checked against each other on load: every expert tensor's shape and dtype must be
what ``architecture`` (sizes, dtype, quantisation) says, and the tensors must be exactly
``moe_layers x num_experts x (gate, up, down)``; readers then check every tensor entry against its
file's header. So an edited size or dtype is refused naming the field, never read into a tensor of
the wrong shape or rounded to the wrong dtype.

``format_version`` is 1 for unquantised experts and 2 for block-scaled FP8 ones (a reader that
predates scale tensors refuses those rather than mistaking scales for weights); both are read.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass, field
from typing import Any

from eep.fp8 import block_scale_shape
from weights_tools.errors import ManifestError
from weights_tools.safetensors_io import DTYPE_SIZE

FORMAT_NAME = "eep-expert-shards"
FORMAT_VERSION = 1  # unquantised experts
FORMAT_VERSION_FP8 = 2  # block-scaled FP8 experts: scale tensors beside the weights
MANIFEST_NAME = "manifest.json"
NON_EXPERT_FILE = "non_expert.safetensors"
ROLES = ("gate", "up", "down")
ROLE_KEYS = {"gate": "w_gate", "up": "w_up", "down": "w_down"}
WEIGHT, SCALE = "weight", "scale"  # TensorEntry.part
# architecture.quantization of block-scaled FP8 experts (what eep.fp8 describes)
FP8_QUANTIZATION = {"method": "fp8", "fmt": "e4m3", "weight_block_size": [128, 128], "scale_dtype": "F32",
                    "activation_scheme": "dynamic"}


def expert_file(expert: int) -> str:
    return f"experts/expert-{expert:05d}.safetensors"


def expert_key(layer: int, role: str, part: str = WEIGHT) -> str:
    return f"layers.{layer}.{ROLE_KEYS[role]}" + ("_scale_inv" if part == SCALE else "")


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
    part: str = WEIGHT  # "scale": the float32 block scales of the FP8 weight of the same role


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
    _scales: dict[tuple[int, int], tuple[TensorEntry, TensorEntry, TensorEntry]] = field(
        default_factory=dict, repr=False, compare=False)

    def __post_init__(self) -> None:
        by_role: dict[tuple[int, int, str], dict[str, TensorEntry]] = {}
        for t in self.tensors:
            if t.expert is not None:
                part = by_role.setdefault((t.layer, t.expert, t.part), {})
                if t.role in part:
                    raise ManifestError(f"manifest lists {t.part} {t.role!r} of layer {t.layer} expert {t.expert} "
                                        f"twice ({part[t.role].key!r}, {t.key!r})", tensor=t.key)
                part[t.role] = t
        for (layer, expert, part), roles in by_role.items():
            missing = [r for r in ROLES if r not in roles]
            if missing:
                raise ManifestError(f"manifest lists layer {layer} expert {expert} without {part} role(s) {missing}")
            (self._scales if part == SCALE else self._experts)[(layer, expert)] = \
                (roles["gate"], roles["up"], roles["down"])
        if self.quantization is not None and set(self._scales) != set(self._experts):
            pair = sorted(set(self._experts) ^ set(self._scales))[0]
            raise ManifestError(f"manifest of FP8 experts lists layer {pair[0]} expert {pair[1]} without its block "
                                "scales (or scales without weights)")
        if self.quantization is None and self._scales:
            raise ManifestError("manifest lists block scales but architecture.quantization is null")

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

    @property
    def quantization(self) -> dict[str, Any] | None:
        """``FP8_QUANTIZATION`` for block-scaled FP8 experts, ``None`` for unquantised ones."""
        return self.architecture.get("quantization")

    @property
    def is_fp8(self) -> bool:
        return self.quantization is not None

    def expert_entries(self, layer: int, expert: int) -> tuple[TensorEntry, TensorEntry, TensorEntry]:
        """``(gate, up, down)`` entries of one logical expert; ``ValueError`` names the valid ranges."""
        try:
            return self._experts[(layer, expert)]
        except KeyError:
            raise ValueError(f"no layer {layer} expert {expert} in this shard set: MoE layers are "
                             f"{self.moe_layers}, experts 0..{self.num_experts - 1}") from None

    def scale_entries(self, layer: int, expert: int) -> tuple[TensorEntry, TensorEntry, TensorEntry] | None:
        """``(gate, up, down)`` block-scale entries of one FP8 expert; ``None`` for unquantised experts."""
        self.expert_entries(layer, expert)
        return self._scales.get((layer, expert))

    def expert_tensor_entries(self, layer: int, expert: int) -> list[TensorEntry]:
        """Every tensor of one expert in file order: gate, up, down, each followed by its scales (FP8)."""
        weights = self.expert_entries(layer, expert)
        scales = self._scales.get((layer, expert))
        if scales is None:
            return list(weights)
        return [t for pair in zip(weights, scales) for t in pair]

    def expert_pairs(self) -> list[tuple[int, int]]:
        """Every ``(layer, expert)`` the shard set holds, sorted."""
        return sorted(self._experts)

    def expert_nbytes(self, layer: int, expert: int) -> int:
        """Bytes of one expert: its weights, plus their block scales for FP8 (what a restore moves)."""
        return sum(t.nbytes for t in self.expert_tensor_entries(layer, expert))

    # ---- (de)serialisation ----
    def to_json(self) -> str:
        version = FORMAT_VERSION_FP8 if self.quantization is not None else FORMAT_VERSION
        doc = {"format": self.format, "format_version": version, "source": self.source,
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
        if doc.get("format_version") not in (FORMAT_VERSION, FORMAT_VERSION_FP8):
            raise ManifestError(f"{path}: format_version {doc.get('format_version')!r}, this tool reads "
                                f"{FORMAT_VERSION} and {FORMAT_VERSION_FP8}", path=path)
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
        quantized = arch.get("quantization") is not None
        if quantized != (doc["format_version"] == FORMAT_VERSION_FP8):
            raise ManifestError(f"{path}: format_version {doc['format_version']} does not match "
                                f"architecture.quantization={arch.get('quantization')!r}", path=path)
        try:
            manifest = cls(source=doc["source"], architecture=arch, tensors=tensors, files=files,
                           format_version=doc["format_version"], digest=hashlib.sha256(raw).hexdigest())
        except ManifestError as exc:
            raise ManifestError(f"{path}: {exc}", path=path, tensor=exc.tensor) from None
        _check_fields(manifest, path)
        return manifest


def _check_fields(m: Manifest, path: str) -> None:
    """The manifest's fields against each other: ``architecture`` (sizes, dtype, quantisation, layers,
    expert count) against every tensor entry, and each entry's nbytes against its shape and dtype.
    A mismatch raises ``ManifestError`` naming the field; the entries are checked against the files'
    headers by every reader (``verify``, the tiers)."""
    arch = m.architecture
    for t in m.tensors:
        if t.dtype not in DTYPE_SIZE:
            raise ManifestError(f"{path}: tensor {t.key!r} has unknown dtype {t.dtype!r}", path=path, tensor=t.key)
        numel = 1
        for d in t.shape:
            numel *= d
        if t.nbytes != numel * DTYPE_SIZE[t.dtype]:
            raise ManifestError(f"{path}: tensor {t.key!r} says nbytes={t.nbytes}, but {list(t.shape)} {t.dtype} is "
                                f"{numel * DTYPE_SIZE[t.dtype]} bytes", path=path, tensor=t.key)
    try:
        hidden, inter, dtype = m.hidden_size, m.intermediate_size, str(arch["dtype"])
        layers, num_experts = [int(layer) for layer in m.moe_layers], m.num_experts
    except (TypeError, ValueError) as exc:
        raise ManifestError(f"{path}: malformed architecture section ({exc})", path=path) from None
    want_weight = {"gate": (inter, hidden), "up": (inter, hidden), "down": (hidden, inter)}
    quant = m.quantization
    if quant is not None and quant != FP8_QUANTIZATION:
        raise ManifestError(f"{path}: architecture.quantization={quant!r} is not the block-scaled FP8 this tool "
                            f"writes ({FP8_QUANTIZATION})", path=path)
    for (layer, expert), entries in m._experts.items():
        for t in entries:
            shape = want_weight[t.role]
            if t.shape != shape:
                swapped = t.shape == shape[::-1]
                raise ManifestError(f"{path}: architecture.hidden_size={hidden} and moe_intermediate_size={inter} "
                                    f"make {t.key!r} {list(shape)}, but its entry is {list(t.shape)}"
                                    + (" (hidden_size and moe_intermediate_size swapped?)" if swapped else ""),
                                    path=path, tensor=t.key)
            if t.dtype != dtype:
                raise ManifestError(f"{path}: architecture.dtype={dtype!r}, but expert tensor {t.key!r} is {t.dtype}",
                                    path=path, tensor=t.key)
        for t in m._scales.get((layer, expert), ()):
            shape = block_scale_shape(*want_weight[t.role])
            if t.shape != shape or t.dtype != quant["scale_dtype"]:
                raise ManifestError(f"{path}: architecture.quantization ({quant['weight_block_size']} blocks, "
                                    f"{quant['scale_dtype']} scales) makes {t.key!r} {list(shape)} "
                                    f"{quant['scale_dtype']}, but its entry is {list(t.shape)} {t.dtype}",
                                    path=path, tensor=t.key)
    if quant is not None and dtype != "F8_E4M3":
        raise ManifestError(f"{path}: architecture.dtype={dtype!r}, but architecture.quantization is FP8 e4m3",
                            path=path)
    pairs = set(m._experts)
    want_pairs = {(layer, expert) for layer in layers for expert in range(num_experts)}
    if pairs != want_pairs:
        extra, missing = sorted(pairs - want_pairs), sorted(want_pairs - pairs)
        field_name = "num_experts" if {e for _, e in pairs} != set(range(num_experts)) else "moe_layers"
        raise ManifestError(f"{path}: architecture.{field_name} does not match the expert tensors: moe_layers="
                            f"{layers}, num_experts={num_experts}, but the entries hold (layer, expert) "
                            f"{extra[:4] or missing[:4]} {'beyond' if extra else 'missing from'} them", path=path)


def _entry(t: dict[str, Any]) -> TensorEntry:
    role = t.get("role")
    if role is not None and role not in ROLES:
        raise ValueError(f"tensor {t.get('key')!r} has role {role!r}, expected one of {ROLES}")
    part = t.get("part", WEIGHT)
    if part not in (WEIGHT, SCALE):
        raise ValueError(f"tensor {t.get('key')!r} has part {part!r}, expected {WEIGHT!r} or {SCALE!r}")
    return TensorEntry(file=str(t["file"]), key=str(t["key"]),
                       layer=None if t.get("layer") is None else int(t["layer"]),
                       expert=None if t.get("expert") is None else int(t["expert"]),
                       role=role, shape=tuple(int(d) for d in t["shape"]), dtype=str(t["dtype"]),
                       nbytes=int(t["nbytes"]), sha256=str(t["sha256"]), source_key=t.get("source_key"), part=part)


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
