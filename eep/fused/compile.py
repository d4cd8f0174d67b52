"""Compile the fused kernels with NVRTC, cached on disk, and load them into the current context.

Lookup order: in-process dict, then ``<cache_dir>/<name>.<key>.cubin``, then NVRTC. The key is
a sha256 of every kernel source file, the compile options, the target arch and the NVRTC
version, so editing a ``.cuh`` file, a define or the compiler never reuses a stale cubin. Cache
files are written to a temporary file in the same directory and ``os.replace``d, so concurrent
rank processes compiling the same kernel never read a half-written file.

cuda-python is imported lazily: importing this module needs no CUDA package.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

from eep import envs
from eep.errors import EEPError

CSRC_DIR = Path(__file__).with_name("csrc")
KERNEL_FILES = ("common.cuh", "dispatch.cuh", "combine.cuh", "prefill.cuh",
                "signals_v2.cuh", "dispatch_v2.cuh", "combine_v2.cuh", "prefill_v2.cuh")
KERNEL_NAMES = ("eep_quantize", "eep_dispatch", "eep_combine_send", "eep_combine_reduce",
                "eep_prefill_dispatch", "eep_prefill_combine_send", "eep_prefill_combine_reduce")
# Kernel sets, both in every build (KernelVariant.kernels): "v1" is the validated default; "v2" moves
# the same bytes with less fixed cost per step (docs/fused.md "Kernel set v2"). Each set is its own
# NVRTC program: the files it includes and the kernels its module holds.
KERNEL_SETS = ("v1", "v2")
SET_HEADERS = {"v1": ("dispatch.cuh", "combine.cuh", "prefill.cuh"),
               "v2": ("dispatch_v2.cuh", "combine_v2.cuh", "prefill_v2.cuh")}
V2_KERNEL_NAMES = ("eep2_dispatch", "eep2_combine", "eep2_prefill_dispatch", "eep2_prefill_combine")
# Experimental prefill combine paths, compiled only into the variant that selects them
# (KernelVariant.prefill_combine; docs/fused.md "Prefill combine: where the time goes").
PREFILL_COMBINE_KERNELS = {"push": (), "spread": ("eep_prefill_combine_send_spread",),
                           "pull": ("eep_prefill_combine_ready", "eep_prefill_combine_pull")}
PREFILL_COMBINE_DEFINE = {"push": 0, "spread": 1, "pull": 2}
# Experimental decode path (KernelVariant.decode; docs/fused.md "Decode: where the time goes"):
# "pull" adds a grid-wide FP8 quantize and a pull combine (stage, ready flag, pull-and-reduce).
DECODE_KERNELS = {"push": (), "pull": ("eep_quantize_rows", "eep_combine_stage", "eep_combine_ready",
                                       "eep_combine_pull")}
DEFAULT_ARCH = "sm_90a"


class KernelCompileError(EEPError):
    """NVRTC rejected a kernel source; the message carries the compiler log."""


@dataclass(frozen=True)
class KernelVariant:
    """Everything that selects one compiled module (the template arguments of the kernels)."""

    hidden: int
    fixed_membership: bool = False
    vec_per_lane: int = 4  # 16-byte vectors each lane keeps in flight per copied chunk
    use_fp8: bool = False  # dispatch sends e4m3 rows + a float32 scale per token row
    prefill_combine: str = "push"  # "push" (validated default), "spread" or "pull": extra kernels
    decode: str = "push"  # "push" (validated default) or "pull": extra decode kernels (DECODE_KERNELS)
    kernels: str = "v1"  # kernel set (KERNEL_SETS): "v1" validated default, "v2" one launch per direction

    def __post_init__(self) -> None:
        if self.hidden <= 0 or self.hidden % 8:
            raise ValueError(f"hidden={self.hidden}: the fused kernels move 16-byte vectors of bf16, "
                             "so hidden must be a positive multiple of 8")
        if self.use_fp8 and self.hidden % 16:
            raise ValueError(f"hidden={self.hidden}: FP8 dispatch moves 16 e4m3 per vector, so hidden must be "
                             "a multiple of 16")
        if self.vec_per_lane not in (1, 2, 4, 8, 16):
            raise ValueError(f"vec_per_lane={self.vec_per_lane} must be one of 1, 2, 4, 8, 16")
        if self.prefill_combine not in PREFILL_COMBINE_KERNELS:
            raise ValueError(f"prefill_combine={self.prefill_combine!r} must be one of "
                             f"{sorted(PREFILL_COMBINE_KERNELS)}")
        if self.decode not in DECODE_KERNELS:
            raise ValueError(f"decode={self.decode!r} must be one of {sorted(DECODE_KERNELS)}")
        if self.kernels not in KERNEL_SETS:
            raise ValueError(f"kernels={self.kernels!r} must be one of {KERNEL_SETS}")
        if self.kernels != "v1" and (self.prefill_combine != "push" or self.decode != "push"):
            raise ValueError(f"prefill_combine={self.prefill_combine!r} / decode={self.decode!r} are experiments on "
                             f"kernel set v1; kernel set {self.kernels!r} has its own combine")

    def defines(self) -> list[str]:
        defines = [f"-DEEP_HIDDEN={self.hidden}", f"-DEEP_FIXED_MEMBERSHIP={int(self.fixed_membership)}",
                   f"-DEEP_VEC_PER_LANE_CHUNK={self.vec_per_lane}", f"-DEEP_USE_FP8={int(self.use_fp8)}"]
        if self.prefill_combine != "push":  # the default's options (and so its cubin) stay as they were
            defines.append(f"-DEEP_PREFILL_COMBINE={PREFILL_COMBINE_DEFINE[self.prefill_combine]}")
        if self.decode != "push":  # likewise: the default cubin is untouched
            defines.append("-DEEP_DECODE_PULL=1")
        if self.kernels != "v1":  # and v1's options stay as they were
            defines.append(f"-DEEP_KERNEL_SET={KERNEL_SETS.index(self.kernels) + 1}")
        return defines

    def kernel_names(self) -> tuple[str, ...]:
        """Every kernel this variant's module holds."""
        if self.kernels == "v2":
            return V2_KERNEL_NAMES
        return KERNEL_NAMES + PREFILL_COMBINE_KERNELS[self.prefill_combine] + DECODE_KERNELS[self.decode]

    @property
    def name(self) -> str:
        combine = "" if self.prefill_combine == "push" else f"_{self.prefill_combine}"
        combine += "" if self.decode == "push" else f"_decode-{self.decode}"
        combine += "" if self.kernels == "v1" else f"_kernels-{self.kernels}"
        return (f"eep_fused_h{self.hidden}_v{self.vec_per_lane}_{'fp8' if self.use_fp8 else 'bf16'}_"
                f"{'fixed' if self.fixed_membership else 'elastic'}{combine}")


def cache_dir() -> Path:
    """``EEP_FUSED_CACHE_DIR`` or ``~/.cache/eep/fused``."""
    return Path(envs.fused_cache_dir())


def kernel_sources() -> dict[str, bytes]:
    """File name -> contents of every kernel source file."""
    return {name: (CSRC_DIR / name).read_bytes() for name in KERNEL_FILES}


def main_source(variant: KernelVariant) -> bytes:
    """The NVRTC program's own text: the headers of the variant's kernel set."""
    return b"".join(b'#include "%s"\n' % name.encode() for name in SET_HEADERS[variant.kernels])


def compile_options(variant: KernelVariant, arch: str) -> list[str]:
    return [f"--gpu-architecture={arch}", "-std=c++17", "-lineinfo", "--device-as-default-execution-space",
            *variant.defines()]


def cache_key(variant: KernelVariant, arch: str, *, nvrtc_version: tuple[int, int]) -> str:
    """sha256 over sources, options, arch and compiler version (hex, 32 chars)."""
    h = hashlib.sha256()
    for name, text in sorted(kernel_sources().items()):
        h.update(name.encode() + b"\0" + text + b"\0")
    h.update("\0".join(compile_options(variant, arch)).encode())
    h.update(f"\0{arch}\0nvrtc{nvrtc_version[0]}.{nvrtc_version[1]}".encode())
    return h.hexdigest()[:32]


def nvrtc_version() -> tuple[int, int]:
    from cuda.bindings import nvrtc
    err, major, minor = nvrtc.nvrtcVersion()
    _check_nvrtc(err, "nvrtcVersion")
    return int(major), int(minor)


def compile_cubin(variant: KernelVariant, arch: str = DEFAULT_ARCH) -> bytes:
    """Compile all fused kernels of ``variant`` to a cubin for ``arch`` (no cache)."""
    from cuda.bindings import nvrtc

    sources = kernel_sources()
    main = main_source(variant)
    headers = [sources[name] for name in KERNEL_FILES]
    names = [name.encode() for name in KERNEL_FILES]
    err, prog = nvrtc.nvrtcCreateProgram(main, f"{variant.name}.cu".encode(), len(headers), headers, names)
    _check_nvrtc(err, "nvrtcCreateProgram")
    try:
        options = [o.encode() for o in compile_options(variant, arch)]
        (err,) = nvrtc.nvrtcCompileProgram(prog, len(options), options)
        if err != nvrtc.nvrtcResult.NVRTC_SUCCESS:
            raise KernelCompileError(f"NVRTC failed on {variant.name} for {arch} "
                                     f"(sources in {CSRC_DIR}):\n{_program_log(prog)}")
        err, size = nvrtc.nvrtcGetCUBINSize(prog)
        _check_nvrtc(err, "nvrtcGetCUBINSize")
        cubin = b" " * size
        (err,) = nvrtc.nvrtcGetCUBIN(prog, cubin)
        _check_nvrtc(err, "nvrtcGetCUBIN")
        return cubin
    finally:
        nvrtc.nvrtcDestroyProgram(prog)


def cached_cubin(variant: KernelVariant, arch: str = DEFAULT_ARCH, *, directory: Path | None = None) -> bytes:
    """The cubin from the on-disk cache, compiling and storing it (atomically) on a miss."""
    directory = directory or cache_dir()
    path = directory / f"{variant.name}.{arch}.{cache_key(variant, arch, nvrtc_version=nvrtc_version())}.cubin"
    if path.exists():
        return path.read_bytes()
    cubin = compile_cubin(variant, arch)
    write_atomic(path, cubin)
    return cubin


def write_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that readers see either nothing or the whole file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def device_arch(device_ordinal: int) -> str:
    """``sm_90a`` on Hopper (the arch-specific target), else ``sm_<major><minor>``."""
    from cuda.bindings import driver
    from eep.fused.cuda_util import check

    check(driver.cuInit(0), "cuInit")
    dev = check(driver.cuDeviceGet(device_ordinal), "cuDeviceGet")
    attr = driver.CUdevice_attribute
    major = check(driver.cuDeviceGetAttribute(attr.CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR, dev), "cuDeviceGetAttribute")
    minor = check(driver.cuDeviceGetAttribute(attr.CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR, dev), "cuDeviceGetAttribute")
    return f"sm_{major}{minor}a" if (major, minor) == (9, 0) else f"sm_{major}{minor}"


class LoadedKernels:
    """The fused kernels of one variant, loaded as a module in the current CUDA context."""

    _modules: dict[tuple[KernelVariant, str, int], "LoadedKernels"] = {}

    def __init__(self, cubin: bytes, names: tuple[str, ...] = KERNEL_NAMES) -> None:
        from cuda.bindings import driver
        from eep.fused.cuda_util import check

        self.module = check(driver.cuModuleLoadData(cubin), "cuModuleLoadData")
        self.functions = {name: check(driver.cuModuleGetFunction(self.module, name.encode()), "cuModuleGetFunction")
                          for name in names}

    @classmethod
    def get(cls, variant: KernelVariant, device_ordinal: int) -> "LoadedKernels":
        arch = device_arch(device_ordinal)
        key = (variant, arch, device_ordinal)
        if key not in cls._modules:
            cls._modules[key] = cls(cached_cubin(variant, arch), variant.kernel_names())
        return cls._modules[key]


def _program_log(prog) -> str:
    from cuda.bindings import nvrtc
    err, size = nvrtc.nvrtcGetProgramLogSize(prog)
    if err != nvrtc.nvrtcResult.NVRTC_SUCCESS or size <= 1:
        return "(no log)"
    log = b" " * size
    nvrtc.nvrtcGetProgramLog(prog, log)
    return log.decode(errors="replace").rstrip("\0")


def _check_nvrtc(err, what: str) -> None:
    from cuda.bindings import nvrtc
    if err != nvrtc.nvrtcResult.NVRTC_SUCCESS:
        raise KernelCompileError(f"{what} failed: {nvrtc.nvrtcGetErrorString(err)[1].decode()}")
