"""The fused kernels compile through NVRTC for sm_90a on a CPU-only machine, and the cache is sound."""

import os
import threading

import pytest

from eep.fused import compile as fc

nvrtc = pytest.importorskip("cuda.bindings.nvrtc", reason="cuda-bindings (the `cuda` extra) is not installed")


def _nvrtc_loads() -> bool:
    try:
        fc.nvrtc_version()
        return True
    except Exception:
        return False


pytestmark = pytest.mark.skipif(not _nvrtc_loads(), reason="the NVRTC library (nvidia-cuda-nvrtc wheel) is absent")


@pytest.mark.parametrize("hidden", [2048, 7168, 64])
@pytest.mark.parametrize("fixed", [False, True])
@pytest.mark.parametrize("fp8", [False, True])
def test_every_kernel_compiles_for_sm90a(hidden, fixed, fp8):
    cubin = fc.compile_cubin(fc.KernelVariant(hidden, fixed, use_fp8=fp8), "sm_90a")
    assert cubin[:4] == b"\x7fELF"  # a cubin is an ELF image
    for name in fc.KERNEL_NAMES:
        assert name.encode() in cubin, f"{name} missing from the cubin"


def test_fixed_variant_drops_the_mask_reads():
    elastic = fc.compile_cubin(fc.KernelVariant(2048, False))
    fixed = fc.compile_cubin(fc.KernelVariant(2048, True))
    assert elastic != fixed


def test_bad_source_reports_the_nvrtc_log(monkeypatch, tmp_path):
    (tmp_path / "common.cuh").write_text("#pragma once\nthis is not c++;\n")
    for name in fc.KERNEL_FILES[1:]:
        (tmp_path / name).write_text('#include "common.cuh"\n')
    monkeypatch.setattr(fc, "CSRC_DIR", tmp_path)
    with pytest.raises(fc.KernelCompileError, match="common.cuh"):
        fc.compile_cubin(fc.KernelVariant(2048))


def test_cache_key_covers_options_arch_and_sources(monkeypatch, tmp_path):
    version = fc.nvrtc_version()
    base = fc.cache_key(fc.KernelVariant(2048), "sm_90a", nvrtc_version=version)
    assert base == fc.cache_key(fc.KernelVariant(2048), "sm_90a", nvrtc_version=version)
    others = {fc.cache_key(fc.KernelVariant(2048, True), "sm_90a", nvrtc_version=version),
              fc.cache_key(fc.KernelVariant(4096), "sm_90a", nvrtc_version=version),
              fc.cache_key(fc.KernelVariant(2048), "sm_100", nvrtc_version=version),
              fc.cache_key(fc.KernelVariant(2048), "sm_90a", nvrtc_version=(version[0], version[1] + 1))}
    assert base not in others and len(others) == 4
    for name in fc.KERNEL_FILES:
        (tmp_path / name).write_bytes((fc.CSRC_DIR / name).read_bytes())
    monkeypatch.setattr(fc, "CSRC_DIR", tmp_path)
    assert fc.cache_key(fc.KernelVariant(2048), "sm_90a", nvrtc_version=version) == base
    (tmp_path / "combine.cuh").write_bytes((tmp_path / "combine.cuh").read_bytes() + b"\n// edit\n")
    assert fc.cache_key(fc.KernelVariant(2048), "sm_90a", nvrtc_version=version) != base


def test_disk_cache_hit_skips_nvrtc(monkeypatch, tmp_path):
    variant = fc.KernelVariant(1024)
    first = fc.cached_cubin(variant, directory=tmp_path)
    files = list(tmp_path.iterdir())
    assert len(files) == 1 and files[0].suffix == ".cubin" and not list(tmp_path.glob("*.tmp"))
    monkeypatch.setattr(fc, "compile_cubin", lambda *a, **k: pytest.fail("compiled again despite a cache hit"))
    assert fc.cached_cubin(variant, directory=tmp_path) == first


def test_concurrent_writers_leave_one_whole_file(tmp_path):
    path = tmp_path / "k.cubin"
    payloads = [bytes([i]) * 200_000 for i in range(8)]
    threads = [threading.Thread(target=fc.write_atomic, args=(path, p)) for p in payloads]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert path.read_bytes() in payloads
    assert os.listdir(tmp_path) == ["k.cubin"]


@pytest.mark.parametrize("hidden", [0, 12, -8])
def test_variant_rejects_hidden_not_multiple_of_8(hidden):
    with pytest.raises(ValueError, match="hidden"):
        fc.KernelVariant(hidden)


def test_fp8_variant_needs_hidden_multiple_of_16():
    with pytest.raises(ValueError, match="multiple of 16"):
        fc.KernelVariant(24, use_fp8=True)
    with pytest.raises(ValueError, match="vec_per_lane"):
        fc.KernelVariant(64, vec_per_lane=3)
