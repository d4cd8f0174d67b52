"""The fused kernels compile through NVRTC for sm_90a on a CPU-only machine, and the cache is sound."""

import os
import re
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


@pytest.mark.parametrize("kernels", fc.KERNEL_SETS)
@pytest.mark.parametrize("hidden", [2048, 7168, 64])
@pytest.mark.parametrize("fixed", [False, True])
@pytest.mark.parametrize("fp8", [False, True])
def test_every_kernel_compiles_for_sm90a(hidden, fixed, fp8, kernels):
    variant = fc.KernelVariant(hidden, fixed, use_fp8=fp8, kernels=kernels)
    cubin = fc.compile_cubin(variant, "sm_90a")
    assert cubin[:4] == b"\x7fELF"  # a cubin is an ELF image
    for name in variant.kernel_names():
        assert name.encode() + b"\0" in cubin, f"{name} missing from the cubin"
    others = {n for k in fc.KERNEL_SETS if k != kernels for n in fc.KernelVariant(64, kernels=k).kernel_names()}
    assert not any(n.encode() + b"\0" in cubin for n in others), "a module holds the other kernel set"


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


# ---- experimental prefill combine paths (KernelVariant.prefill_combine) ---------------------------

@pytest.mark.parametrize("hidden", [2048, 7168])
@pytest.mark.parametrize("fixed", [False, True])
@pytest.mark.parametrize("combine", ["spread", "pull"])
def test_prefill_combine_variants_compile_with_their_kernels(hidden, fixed, combine):
    variant = fc.KernelVariant(hidden, fixed, prefill_combine=combine)
    cubin = fc.compile_cubin(variant, "sm_90a")
    assert cubin[:4] == b"\x7fELF"
    names = variant.kernel_names()
    assert names[:len(fc.KERNEL_NAMES)] == fc.KERNEL_NAMES and len(names) > len(fc.KERNEL_NAMES)
    for name in names:
        assert name.encode() + b"\0" in cubin, f"{name} missing from the {variant.name} cubin"
    others = {n for c, ns in fc.PREFILL_COMBINE_KERNELS.items() if c != combine for n in ns}
    assert not any(n.encode() + b"\0" in cubin for n in others)


def test_default_variant_compiles_no_experimental_kernel_and_keeps_its_options():
    variant = fc.KernelVariant(2048)
    assert variant.prefill_combine == "push" and variant.kernel_names() == fc.KERNEL_NAMES
    assert not any("PREFILL_COMBINE" in d for d in variant.defines())
    assert variant.name == "eep_fused_h2048_v4_bf16_elastic"
    assert fc.KernelVariant(2048, prefill_combine="pull").name == "eep_fused_h2048_v4_bf16_elastic_pull"
    cubin = fc.compile_cubin(variant)
    for name in fc.PREFILL_COMBINE_KERNELS["spread"] + fc.PREFILL_COMBINE_KERNELS["pull"]:
        assert name.encode() + b"\0" not in cubin


@pytest.mark.parametrize("hidden", [2048, 7168])
def test_default_cubin_is_unchanged_by_the_experimental_section(monkeypatch, tmp_path, hidden):
    """The GPU-validated kernels stay byte-identical: the default module compiled with and without
    the experimental section of prefill.cuh is the same cubin."""
    with_section = fc.compile_cubin(fc.KernelVariant(hidden))
    for name in fc.KERNEL_FILES:
        (tmp_path / name).write_bytes((fc.CSRC_DIR / name).read_bytes())
    text = (tmp_path / "prefill.cuh").read_text()
    (tmp_path / "prefill.cuh").write_text(text[:text.index("// ---- experimental combine paths")])
    monkeypatch.setattr(fc, "CSRC_DIR", tmp_path)
    assert fc.compile_cubin(fc.KernelVariant(hidden)) == with_section


def _ptxas_report(variant) -> str:
    """NVRTC's log of compiling ``variant`` for sm_90a with ``ptxas -v``: per-kernel spills and registers."""
    from cuda.bindings import nvrtc as nv

    sources = fc.kernel_sources()
    err, prog = nv.nvrtcCreateProgram(fc.main_source(variant), b"check.cu", len(sources), [sources[n] for n in fc.KERNEL_FILES],
                                      [n.encode() for n in fc.KERNEL_FILES])
    try:
        options = [o.encode() for o in fc.compile_options(variant, "sm_90a")] + [b"--ptxas-options=-v"]
        (err,) = nv.nvrtcCompileProgram(prog, len(options), options)
        assert err == nv.nvrtcResult.NVRTC_SUCCESS
        return fc._program_log(prog)
    finally:
        nv.nvrtcDestroyProgram(prog)


def _assert_no_spills(log: str, kernels, max_registers: int) -> None:
    """Every kernel of the ptxas report ``log`` spills nothing and uses at most ``max_registers``."""
    for kernel in kernels:
        block = log[log.index(f"Function properties for {kernel}"):].splitlines()
        assert "0 bytes spill stores, 0 bytes spill loads" in block[1], f"{kernel}: {block[1]}"
        regs = int(block[2].split("Used ")[1].split(" registers")[0])
        assert regs <= max_registers, f"{kernel}: {block[2]}"


def test_pull_and_spread_kernels_do_not_spill():
    """ptxas report: the new kernels keep everything in registers (a spill would put local-memory
    traffic into the loop the combine's bandwidth rests on); pull fits two 512-thread blocks per SM."""
    for combine, kernels in (("pull", ("eep_prefill_combine_pull", "eep_prefill_combine_ready")),
                             ("spread", ("eep_prefill_combine_send_spread",))):
        log = _ptxas_report(fc.KernelVariant(7168, prefill_combine=combine))
        for kernel in kernels:
            _assert_no_spills(log, [kernel], 64 if kernel == "eep_prefill_combine_pull" else 128)


def test_variant_rejects_an_unknown_prefill_combine():
    with pytest.raises(ValueError, match="prefill_combine"):
        fc.KernelVariant(2048, prefill_combine="scatter")


# ---- experimental decode path (KernelVariant.decode = "pull") --------------------------------------

@pytest.mark.parametrize("hidden", [2048, 7168])
@pytest.mark.parametrize("fixed,fp8", [(False, False), (True, True)])
def test_decode_pull_variant_compiles_with_its_kernels(hidden, fixed, fp8):
    variant = fc.KernelVariant(hidden, fixed, use_fp8=fp8, decode="pull")
    cubin = fc.compile_cubin(variant, "sm_90a")
    assert cubin[:4] == b"\x7fELF"
    assert variant.kernel_names()[-len(fc.DECODE_KERNELS["pull"]):] == fc.DECODE_KERNELS["pull"]
    for name in variant.kernel_names():
        assert name.encode() + b"\0" in cubin, f"{name} missing from the {variant.name} cubin"


def test_default_variant_has_no_decode_pull_kernel_define_or_name():
    variant = fc.KernelVariant(7168)
    assert variant.decode == "push" and not any("DECODE" in d for d in variant.defines())
    assert variant.name == "eep_fused_h7168_v4_bf16_elastic"
    assert fc.KernelVariant(7168, decode="pull").name == "eep_fused_h7168_v4_bf16_elastic_decode-pull"
    cubin = fc.compile_cubin(variant)
    for name in fc.DECODE_KERNELS["pull"]:
        assert name.encode() + b"\0" not in cubin
    with pytest.raises(ValueError, match="decode"):
        fc.KernelVariant(2048, decode="pul")


@pytest.mark.parametrize("fp8", [False, True])
def test_default_cubin_is_unchanged_by_the_decode_pull_sections(monkeypatch, tmp_path, fp8):
    """The GPU-validated decode kernels stay byte-identical: the default module compiled with and
    without the experimental sections of dispatch.cuh and combine.cuh is the same cubin."""
    with_sections = fc.compile_cubin(fc.KernelVariant(7168, use_fp8=fp8))
    marker = "// ---- experimental decode path"
    for name in fc.KERNEL_FILES:
        text = (fc.CSRC_DIR / name).read_text()
        if name in ("dispatch.cuh", "combine.cuh"):
            assert marker in text, f"{name} lost its experimental section marker"
            text = text[:text.index(marker)]
        (tmp_path / name).write_text(text)
    monkeypatch.setattr(fc, "CSRC_DIR", tmp_path)
    assert fc.compile_cubin(fc.KernelVariant(7168, use_fp8=fp8)) == with_sections


def test_decode_pull_kernels_do_not_spill():
    """ptxas report: the pull combine keeps its eight in-flight 16-byte loads in registers and still
    fits one 512-thread block per SM (<= 128 registers), as the default kernels do."""
    _assert_no_spills(_ptxas_report(fc.KernelVariant(7168, use_fp8=True, decode="pull")), fc.DECODE_KERNELS["pull"], 128)


def test_fused_buffer_rejects_an_unknown_decode_path_before_touching_cuda():
    from eep.fused.buffer import FusedBuffer

    with pytest.raises(ValueError, match="decode"):
        FusedBuffer(0, 2, slots_per_rank=2, max_tokens_per_rank=4, hidden=64, top_k=2, store=None, decode="scatter")


# ---- kernel set v2 (KernelVariant.kernels = "v2"; docs/fused.md "Kernel set v2") ------------------

def test_v2_variant_names_options_and_limits():
    v1, v2 = fc.KernelVariant(7168), fc.KernelVariant(7168, kernels="v2")
    assert v1.kernels == "v1" and v1.name == "eep_fused_h7168_v4_bf16_elastic"  # the validated default, as before
    assert not any("KERNEL_SET" in d for d in v1.defines())
    assert v2.name == "eep_fused_h7168_v4_bf16_elastic_kernels-v2" and "-DEEP_KERNEL_SET=2" in v2.defines()
    assert v2.kernel_names() == fc.V2_KERNEL_NAMES and fc.main_source(v2) != fc.main_source(v1)
    version = fc.nvrtc_version()
    assert fc.cache_key(v1, "sm_90a", nvrtc_version=version) != fc.cache_key(v2, "sm_90a", nvrtc_version=version)
    with pytest.raises(ValueError, match="kernels"):
        fc.KernelVariant(2048, kernels="v3")
    for experiment in (dict(decode="pull"), dict(prefill_combine="spread")):
        with pytest.raises(ValueError, match="kernel set"):
            fc.KernelVariant(2048, kernels="v2", **experiment)


def test_v1_cubin_is_unchanged_by_the_v2_sources(monkeypatch, tmp_path):
    """The v2 files are not part of the v1 program: emptying them leaves the v1 cubin byte-identical."""
    before = fc.compile_cubin(fc.KernelVariant(7168, use_fp8=True))
    for name in fc.KERNEL_FILES:
        text = (fc.CSRC_DIR / name).read_text()
        (tmp_path / name).write_text("#pragma once\n" if name.endswith("_v2.cuh") else text)
    monkeypatch.setattr(fc, "CSRC_DIR", tmp_path)
    assert fc.compile_cubin(fc.KernelVariant(7168, use_fp8=True)) == before


@pytest.mark.parametrize("hidden,fp8", [(7168, False), (7168, True), (2048, False)])
def test_v2_kernels_do_not_spill(hidden, fp8):
    """ptxas report: every v2 kernel keeps its rows in flight in registers (no local-memory traffic in
    the loops the step time rests on) and fits a 512-thread block (<= 128 registers)."""
    _assert_no_spills(_ptxas_report(fc.KernelVariant(hidden, use_fp8=fp8, kernels="v2")), fc.V2_KERNEL_NAMES, 128)


def _ptx(variant, arch: str = "compute_90a") -> str:
    """NVRTC's PTX of ``variant``."""
    from cuda.bindings import nvrtc as nv

    sources = fc.kernel_sources()
    err, prog = nv.nvrtcCreateProgram(fc.main_source(variant), b"check.cu", len(sources), [sources[n] for n in fc.KERNEL_FILES],
                                      [n.encode() for n in fc.KERNEL_FILES])
    try:
        options = [o.encode() for o in fc.compile_options(variant, arch)]
        (err,) = nv.nvrtcCompileProgram(prog, len(options), options)
        assert err == nv.nvrtcResult.NVRTC_SUCCESS, fc._program_log(prog)
        err, size = nv.nvrtcGetPTXSize(prog)
        text = b" " * size
        (err,) = nv.nvrtcGetPTX(prog, text)
        return text.decode()
    finally:
        nv.nvrtcDestroyProgram(prog)


# a PTX instruction that may touch global memory: any load, store or atomic not on parameter, shared
# or local space (generic addresses included)
_GLOBAL_ACCESS = re.compile(r"^\s*(?:@!?%p\d+\s+)?(?:ld|ldu|st|atom|red|cp\.async)\.(?!param|shared|local)[\w.]*", re.M)


@pytest.mark.parametrize("fixed,fp8", [(False, False), (False, True), (True, False)])
def test_v2_pdl_kernels_wait_for_the_previous_kernel_before_touching_memory(fixed, fp8):
    """A kernel FusedBuffer(pdl=True) launches early (buffer.PDL_KERNELS) may start while the kernel
    before it still writes: each has exactly one griddepcontrol.wait, ahead of its first instruction
    that can touch global memory, and lets its own dependents launch (griddepcontrol.launch_dependents)."""
    from eep.fused.buffer import PDL_KERNELS

    ptx = _ptx(fc.KernelVariant(7168, fixed, use_fp8=fp8, kernels="v2"))
    entries = {m.group(1): m.start() for m in re.finditer(r"\.entry (\w+)\(", ptx)}
    assert PDL_KERNELS <= set(entries) and PDL_KERNELS <= set(fc.V2_KERNEL_NAMES)
    bounds = sorted(entries.values()) + [len(ptx)]
    for name in PDL_KERNELS:
        start = entries[name]
        body = ptx[start:bounds[bounds.index(start) + 1]]
        assert body.count("griddepcontrol.wait;") == 1 and body.count("griddepcontrol.launch_dependents;") == 1, name
        first = _GLOBAL_ACCESS.search(body)
        assert first is not None and body.index("griddepcontrol.wait;") < first.start(), (name, first and first.group(0))


def test_prefill_buffer_rejects_a_v1_experiment_with_v2_before_touching_cuda():
    from eep.fused.prefill import PrefillBuffer

    with pytest.raises(ValueError, match="kernel set"):
        PrefillBuffer(0, 2, slots_per_rank=2, max_tokens_per_rank=4, hidden=64, top_k=2, store=None,
                      combine_variant="pull", kernels="v2")
