"""Build the CUTLASS expert-GEMM library with nvcc, cached on disk by a hash of everything that goes in.

The kernel source lives in real files (``eep/fused/csrc/gemm/*.cuh``, ``stage.cu``, ``fp8_stage.cu``);
what is generated is one short translation unit per ``GemmConfig`` that sets the template arguments
and includes ``grouped_gemm.cuh`` (bf16), ``swiglu_gemm.cuh`` or ``fp8_gemm.cuh`` (block-scaled FP8).
A library holds the fixed units its configs need: ``stage.cu`` for bf16 GEMMs, ``swiglu_stage.cu``
beside SwiGLU-epilogue GEMMs, ``fp8_stage.cu`` for FP8 ones (``FP8_CONFIGS``, its own library). The units compile in parallel (CUTLASS templates take about a minute
each) and link into one shared library that exports plain C functions, loaded through ``ctypes``.

Cache: ``<EEP_GEMM_CACHE_DIR>/libeep_gemm.<key>.so``; the key is a sha256 over the kernel files,
the generated sources, the CUTLASS version, the nvcc version and the flags. The library is
written to a temporary file and ``os.replace``d, so rank processes building at once never load a
half-written file. Lookup order: in-process dict, file on disk, nvcc.

Needs no GPU: nvcc builds ``sm_90a`` on any machine, which is how CI checks the build inputs.
"""

from __future__ import annotations

import ctypes
import hashlib
import importlib.util
import os
import shutil
import subprocess
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from eep import envs
from eep.errors import EEPError

CSRC_DIR = Path(__file__).resolve().parent.parent / "csrc" / "gemm"
HEADER_FILES = ("expert_gemm.cuh", "grouped_gemm_base.cuh", "grouped_gemm.cuh")
SOURCE_FILES = (*HEADER_FILES, "stage.cu")
# Opt-in SwiGLU-epilogue GEMM1 (GemmConfig.swiglu): hashed and compiled only into libraries that hold
# such a config, so the default library's cache key and objects stay what they were.
SWIGLU_HEADER_FILES = ("swiglu_gemm.cuh",)
SWIGLU_SOURCE_FILES = (*SWIGLU_HEADER_FILES, "swiglu_stage.cu")
# The FP8 expert stage (CutlassFp8ExpertStage): block-scaled FP8 GEMMs and their setup/requantise kernels.
FP8_HEADER_FILES = ("fp8_gemm.cuh",)
FP8_SOURCE_FILES = (*FP8_HEADER_FILES, "fp8_stage.cu")
ARCH_FLAGS = ("-gencode=arch=compute_90a,code=sm_90a",)  # wgmma/setmaxnreg need the "a" target
NVCC_FLAGS = ("-std=c++17", "-O3", "-DNDEBUG", "--expt-relaxed-constexpr", "-Xcompiler", "-fPIC", "-lineinfo")


class GemmBuildError(EEPError):
    """nvcc, the CUTLASS headers or the built library are missing or failed; the message says which."""


@dataclass(frozen=True)
class GemmConfig:
    """One compiled grouped-GEMM kernel: the template arguments of ``GroupedGemm``.

    swap: compute ``D^T = W @ X^T`` (weight rows on the M tile, tokens on the N tile), for blocks
    of a few tokens. schedule: ``"coop"`` (two consumer warpgroups split an M=128 tile) or
    ``"ping"`` (each consumer warpgroup owns a tile; the other's epilogue overlaps its math).
    swiglu: GEMM1 with ``silu(gate) * up`` in its epilogue (``swiglu_gemm.cuh``), writing h at half
    the accumulator width; it expects w13 interleaved (``cutlass_stage.interleave_gate_up``).
    fp8: e4m3 operands with 128-wide block scales applied in the mainloop (``fp8_gemm.cuh``), bf16 out;
    tile_k must be 128 (one scale block per K tile).
    """

    tile_m: int
    tile_n: int
    tile_k: int
    schedule: str = "coop"
    swap: bool = False
    cluster_m: int = 1
    cluster_n: int = 1
    swiglu: bool = False
    fp8: bool = False

    def __post_init__(self) -> None:
        if self.schedule not in ("coop", "ping"):
            raise ValueError(f"GemmConfig.schedule={self.schedule!r}, expected 'coop' or 'ping'")
        if self.schedule == "coop" and self.tile_m % 128:
            raise ValueError(f"cooperative tiles need tile_m a multiple of 128, got {self.tile_m}")
        if self.fp8 and (self.tile_k != 128 or self.swiglu):
            raise ValueError(f"FP8 block-scaled tiles need tile_k 128 (one scale block per K tile) and no swiglu "
                             f"epilogue, got {self.tile_m}x{self.tile_n}x{self.tile_k} swiglu={self.swiglu}")
        if self.swiglu and (self.tile_m % 16 or self.tile_n % 16):
            raise ValueError(f"swiglu tiles must hold whole gate/up pairs (multiples of 16), got "
                             f"{self.tile_m}x{self.tile_n}")

    @property
    def name(self) -> str:
        swap = "swap_" if self.swap else ""
        swiglu = "swiglu_" if self.swiglu else ""
        fp8 = "fp8_" if self.fp8 else ""
        return (f"eep_gemm_{fp8}{swiglu}{swap}{self.schedule}_{self.tile_m}x{self.tile_n}x{self.tile_k}"
                f"_c{self.cluster_m}x{self.cluster_n}")

    @property
    def header(self) -> str:
        return "fp8_gemm.cuh" if self.fp8 else "swiglu_gemm.cuh" if self.swiglu else "grouped_gemm.cuh"

    def source(self) -> str:
        """The generated translation unit."""
        return "\n".join([
            f"// generated by eep.fused.gemm.build for {self.name}",
            f"#define EEP_GEMM_NAME {self.name}",
            f"#define EEP_TILE_M {self.tile_m}", f"#define EEP_TILE_N {self.tile_n}", f"#define EEP_TILE_K {self.tile_k}",
            f"#define EEP_CLUSTER_M {self.cluster_m}", f"#define EEP_CLUSTER_N {self.cluster_n}",
            f"#define EEP_SCHEDULE {0 if self.schedule == 'coop' else 1}",
            f"#define EEP_SWAP {1 if self.swap else 0}",
            f'#include "{self.header}"', ""])


# Kept small: every config costs one to two minutes of nvcc. Chosen per problem in cutlass_stage.pick_config.
# Also measured and dropped (perf/RESULTS.md): pingpong 64x32x128 swap (no better than the cooperative
# swap tile) and 128x256x64 with a 2x1 cluster (TMA multicast of weights: 2-30% slower here).
DEFAULT_CONFIGS = (
    GemmConfig(128, 256, 64, "coop"),               # prefill: the default tile
    GemmConfig(128, 32, 128, "coop", swap=True),    # decode: <=32 tokens per group on the N tile
    GemmConfig(128, 128, 64, "coop"),               # kept for the sweep: 128x256 beat it everywhere so far
)
# GEMM1 with SwiGLU in the epilogue, for CutlassExpertStage(fused_swiglu=True) only: the two default
# GEMM1 tiles. Not in DEFAULT_CONFIGS, so the default library is unchanged.
SWIGLU_CONFIGS = (
    GemmConfig(128, 256, 64, "coop", swiglu=True),
    GemmConfig(128, 32, 128, "coop", swap=True, swiglu=True),
)


# The FP8 stage's kernels (CutlassFp8ExpertStage; cutlass_fp8_stage.pick_fp8_config chooses among them).
# 128x128 (not 128x256): the blockwise mainloop keeps a second fp32 accumulator for the promotion
# every 128 K, and a 128x256 cooperative tile would not fit it in registers.
FP8_CONFIGS = (
    GemmConfig(128, 128, 128, "coop", fp8=True),             # for the sweep: the prefill tile without a cluster
    GemmConfig(128, 32, 128, "coop", swap=True, fp8=True),   # decode: <=32 tokens per group on the N tile
    GemmConfig(128, 64, 128, "coop", swap=True, fp8=True),   # decode groups of 33-64 tokens
    GemmConfig(64, 128, 128, "ping", fp8=True),              # prefill alternative, for the sweep
    # prefill: a 1x2 cluster, two N tiles of one group sharing each token tile by TMA multicast (a
    # token tile is otherwise read once per N tile of its group: 32 times at deepseek-v3's GEMM1)
    GemmConfig(128, 128, 128, "coop", fp8=True, cluster_n=2),
    GemmConfig(64, 128, 128, "ping", fp8=True, cluster_n=2),  # for the sweep
)
# Also measured at prefill and dropped (perf/RESULTS.md "FP8 expert stage"): 128x128x128 with a 2x1
# and with a 2x2 cluster (weight tiles multicast to two M tiles as well): 10-11% slower than 1x2 at
# deepseek-v3, slower at qwen3-30b-a3b.


def has_swiglu(configs: tuple[GemmConfig, ...]) -> bool:
    return any(c.swiglu for c in configs)


def has_fp8(configs: tuple[GemmConfig, ...]) -> bool:
    return any(c.fp8 for c in configs)


def source_files(configs: tuple[GemmConfig, ...]) -> tuple[str, ...]:
    """The fixed kernel files a library of ``configs`` is built from (those its units include and run)."""
    files = SOURCE_FILES if not all(c.fp8 for c in configs) else HEADER_FILES
    if has_swiglu(configs):
        files = (*files, *SWIGLU_SOURCE_FILES)
    if has_fp8(configs):
        files = (*files, *FP8_SOURCE_FILES)
    return files


def cutlass_root() -> Path:
    """Directory holding CUTLASS's ``include/`` and ``tools/util/include``: ``EEP_CUTLASS_DIR``, else the
    copy the ``nvidia-cutlass`` wheel ships inside ``cutlass_library/source`` (found without importing it)."""
    env = envs.cutlass_dir()
    if env:
        root = Path(env)
    else:
        spec = importlib.util.find_spec("cutlass_library")
        if spec is None or not spec.submodule_search_locations:
            raise GemmBuildError("CUTLASS headers not found: install nvidia-cutlass>=4.2 (pip install 'eep[cutlass]') "
                                 "or set EEP_CUTLASS_DIR to a CUTLASS checkout")
        root = Path(list(spec.submodule_search_locations)[0]) / "source"
    header = root / "include" / "cutlass" / "gemm" / "kernel" / "gemm_universal.hpp"
    if not header.is_file():
        raise GemmBuildError(f"CUTLASS headers not found under {root} (no {header.relative_to(root)})")
    return root


def cutlass_version(root: Path) -> str:
    text = (root / "include" / "cutlass" / "version.h").read_text()
    parts = [line.split()[-1] for line in text.splitlines()
             if line.startswith(("#define CUTLASS_MAJOR", "#define CUTLASS_MINOR", "#define CUTLASS_PATCH"))]
    return ".".join(parts)


def include_flags(root: Path) -> list[str]:
    return [f"-I{CSRC_DIR}", f"-I{root / 'include'}", f"-I{root / 'tools' / 'util' / 'include'}"]


def find_nvcc() -> str:
    nvcc = os.environ.get("CUDACXX") or shutil.which("nvcc")
    for candidate in (nvcc, "/usr/local/cuda/bin/nvcc"):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    raise GemmBuildError("nvcc not found: put the CUDA toolkit's bin/ on PATH or set CUDACXX")


def nvcc_version(nvcc: str) -> str:
    out = subprocess.run([nvcc, "--version"], capture_output=True, text=True, check=True).stdout
    return out.strip().splitlines()[-1]


def generated_sources(configs: tuple[GemmConfig, ...] = DEFAULT_CONFIGS) -> dict[str, str]:
    """File name -> text of every translation unit (the fixed ``stage.cu`` plus one per config)."""
    names = [c.name for c in configs]
    if len(set(names)) != len(names):
        raise ValueError(f"duplicate GemmConfig in {names}")
    return {f"{c.name}.cu": c.source() for c in configs}


def cache_key(configs: tuple[GemmConfig, ...], *, cutlass: str, nvcc: str) -> str:
    h = hashlib.sha256()
    for name in source_files(configs):
        h.update(name.encode() + b"\0" + (CSRC_DIR / name).read_bytes() + b"\0")
    for name, text in sorted(generated_sources(configs).items()):
        h.update(name.encode() + b"\0" + text.encode() + b"\0")
    h.update("\0".join((*ARCH_FLAGS, *NVCC_FLAGS, f"cutlass {cutlass}", nvcc)).encode())
    return h.hexdigest()[:24]


def library_path(configs: tuple[GemmConfig, ...] = DEFAULT_CONFIGS, *, directory: Path | None = None) -> Path:
    root = cutlass_root()
    key = cache_key(configs, cutlass=cutlass_version(root), nvcc=nvcc_version(find_nvcc()))
    return (directory or Path(envs.gemm_cache_dir())) / f"libeep_gemm.{key}.so"


def build_library(configs: tuple[GemmConfig, ...] = DEFAULT_CONFIGS, *, directory: Path | None = None,
                  jobs: int | None = None) -> Path:
    """Path of the built library, compiling (all units in parallel) and caching it on a miss."""
    path = library_path(configs, directory=directory)
    if path.exists():
        return path
    root, nvcc = cutlass_root(), find_nvcc()
    versions = (f"cutlass {cutlass_version(root)}", nvcc_version(nvcc))
    objects_dir = path.parent / "objects"  # per-unit cache: editing stage.cu does not recompile CUTLASS units
    objects_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="eep_gemm_") as tmp:
        units = [CSRC_DIR / name for name in source_files(configs) if name.endswith(".cu")]
        swiglu_units = {"swiglu_stage.cu", *(f"{c.name}.cu" for c in configs if c.swiglu)}
        fp8_units = {"fp8_stage.cu", *(f"{c.name}.cu" for c in configs if c.fp8)}
        for name, text in generated_sources(configs).items():
            (Path(tmp) / name).write_text(text)
            units.append(Path(tmp) / name)
        base = [nvcc, *ARCH_FLAGS, *NVCC_FLAGS, *include_flags(root)]

        def compile_unit(unit: Path) -> Path:
            h = hashlib.sha256(unit.read_bytes() + "\0".join((*base[1:], *versions)).encode())
            # A unit's own text is hashed above, then the headers it may include.
            headers = HEADER_FILES + (SWIGLU_HEADER_FILES if unit.name in swiglu_units else ()) \
                + (FP8_HEADER_FILES if unit.name in fp8_units else ())
            for name in headers:
                h.update((CSRC_DIR / name).read_bytes())
            obj = objects_dir / f"{unit.stem}.{h.hexdigest()[:16]}.o"
            if obj.exists():
                return obj
            staged = Path(tmp) / (unit.stem + ".o")
            proc = subprocess.run([*base, "-c", str(unit), "-o", str(staged)], capture_output=True, text=True)
            if proc.returncode != 0:
                raise GemmBuildError(f"nvcc failed on {unit.name} (sources in {CSRC_DIR}):\n{proc.stderr[-4000:]}")
            _replace_atomic(staged, obj)
            return obj

        with ThreadPoolExecutor(max_workers=jobs or min(len(units), os.cpu_count() or 1)) as pool:
            objects = list(pool.map(compile_unit, units))
        tmp_lib = Path(tmp) / "lib.so"
        proc = subprocess.run([nvcc, *ARCH_FLAGS, "-shared", "-cudart", "static", *map(str, objects),
                               "-o", str(tmp_lib)], capture_output=True, text=True)
        if proc.returncode != 0:
            raise GemmBuildError(f"nvcc link of {path.name} failed:\n{proc.stderr[-4000:]}")
        _replace_atomic(tmp_lib, path)
    return path


def _replace_atomic(src: Path, dst: Path) -> None:
    """Copy ``src`` next to ``dst`` and rename it into place: readers see nothing or the whole file."""
    fd, staged = tempfile.mkstemp(prefix=dst.name + ".", suffix=".tmp", dir=dst.parent)
    os.close(fd)
    try:
        shutil.copyfile(src, staged)
        os.chmod(staged, 0o644)  # mkstemp makes 0600; other users of a shared cache must read it
        os.replace(staged, dst)
    except BaseException:
        if os.path.exists(staged):
            os.unlink(staged)
        raise


_LOADED: dict[tuple[GemmConfig, ...], ctypes.CDLL] = {}


def load_library(configs: tuple[GemmConfig, ...] = DEFAULT_CONFIGS) -> ctypes.CDLL:
    """The built library, loaded once per process (building it first if needed)."""
    if configs not in _LOADED:
        _LOADED[configs] = ctypes.CDLL(str(build_library(configs)))
    return _LOADED[configs]
