"""CPU checks of the opt-in SwiGLU-epilogue GEMM1 (``GemmConfig(swiglu=True)``): the default build is
untouched, the generated sources and cache keys are right, the w13 interleave and the epilogue's
index mapping compute SwiGLU, and (nvcc present) the units compile for sm_90a without spills or C7510."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from eep.fused.gemm import build
from eep.fused.gemm.cutlass_stage import (deinterleave_gate_up, interleave_gate_up, pick_config, swiglu_pair_rows,
                                          swiglu_twin)


def test_swiglu_is_opt_in_and_leaves_the_default_build_alone():
    assert not any(c.swiglu for c in build.DEFAULT_CONFIGS)
    assert build.source_files(build.DEFAULT_CONFIGS) == build.SOURCE_FILES
    for text in build.generated_sources(build.DEFAULT_CONFIGS).values():
        assert "swiglu" not in text and '#include "grouped_gemm.cuh"' in text
    # The default key must not depend on the SwiGLU files: a library built before them stays valid.
    key = build.cache_key(build.DEFAULT_CONFIGS, cutlass="4.2.0", nvcc="x")
    fused = build.DEFAULT_CONFIGS + build.SWIGLU_CONFIGS
    assert build.cache_key(fused, cutlass="4.2.0", nvcc="x") != key
    assert set(build.SWIGLU_SOURCE_FILES) <= set(build.source_files(fused))


def test_swiglu_generated_sources():
    sources = build.generated_sources(build.DEFAULT_CONFIGS + build.SWIGLU_CONFIGS)
    assert len(sources) == len(build.DEFAULT_CONFIGS) + len(build.SWIGLU_CONFIGS)
    assert {c.swap for c in build.SWIGLU_CONFIGS} == {False, True}  # both GEMM1 forms the stage picks
    for config in build.SWIGLU_CONFIGS:
        assert config.swiglu and "swiglu" in config.name
        text = sources[f"{config.name}.cu"]
        assert f"#define EEP_GEMM_NAME {config.name}" in text
        assert '#include "swiglu_gemm.cuh"' in text and "grouped_gemm.cuh" not in text
        assert f"#define EEP_SWAP {int(config.swap)}" in text
        plain = build.GemmConfig(config.tile_m, config.tile_n, config.tile_k, config.schedule, config.swap)
        assert plain.name != config.name and plain != config
    for name in build.SWIGLU_SOURCE_FILES:
        assert (build.CSRC_DIR / name).is_file(), name
    for rows in (1, 16, 32, 64, 4096):  # whatever GEMM1 a fused stage picks by itself is compiled
        twin = swiglu_twin(pick_config(rows))
        assert twin in build.SWIGLU_CONFIGS and twin.swap == pick_config(rows).swap
        assert swiglu_pair_rows(twin) == (8 if twin.swap else 1)
    with pytest.raises(ValueError, match="gate/up pairs"):
        build.GemmConfig(128, 40, 64, "coop", swiglu=True)


@pytest.mark.parametrize("pair_rows", [1, 8])
def test_interleave_gate_up_rows(pair_rows):
    gen = torch.Generator().manual_seed(pair_rows)
    slots, inter, hidden = 3, 48, 16
    w13 = torch.randn(slots, 2 * inter, hidden, generator=gen)
    w13i = interleave_gate_up(w13, pair_rows)
    for j in torch.randint(0, inter, (20,), generator=gen).tolist():
        b, t = divmod(j, pair_rows)
        assert torch.equal(w13i[:, 2 * pair_rows * b + t], w13[:, j])                # gate j
        assert torch.equal(w13i[:, 2 * pair_rows * b + pair_rows + t], w13[:, inter + j])  # up j
    assert torch.equal(deinterleave_gate_up(w13i, pair_rows), w13)
    if pair_rows == 1:  # gate / up halves stay strided views: an in-place repair can write them
        gate = w13i.view(slots, inter, 2, hidden)[:, :, 0]
        gate[1].copy_(torch.ones(inter, hidden))
        assert torch.equal(deinterleave_gate_up(w13i, 1)[1, :inter], torch.ones(inter, hidden))
    with pytest.raises(ValueError, match="pairs of 8"):
        interleave_gate_up(torch.randn(1, 2 * 12, 4), 8)


def _epilogue_emulation(acc: torch.Tensor, swap: bool) -> torch.Tensor:
    """What swiglu_gemm.cuh's epilogue writes, element by element, from the GEMM accumulator ``acc``
    ``[M, N]``: pairs (m, n)/(m, n+1) not swapped, (m, m+8) for m % 16 < 8 swapped, output at
    (m, n/2) or (m/16*8 + m%8, n)."""
    m_total, n_total = acc.shape
    out = torch.full((m_total // 2, n_total) if swap else (m_total, n_total // 2), float("nan"))
    silu = lambda v: v / (1 + torch.exp(-v))  # noqa: E731
    r = lambda v: v.bfloat16().float()  # noqa: E731  (h13's rounding)
    if swap:
        m = torch.arange(m_total)
        gate_rows = m[m % 16 < 8]
        out[(gate_rows // 16) * 8 + gate_rows % 8] = silu(r(acc[gate_rows])) * r(acc[gate_rows + 8])
    else:
        out[:, :] = silu(r(acc[:, 0::2])) * r(acc[:, 1::2])
    return out


@pytest.mark.parametrize("swap", [False, True])
def test_epilogue_index_mapping_computes_swiglu(swap):
    """The interleave + pairing + output index of the epilogue equal silu(x Wg^T) * (x Wu^T)."""
    gen = torch.Generator().manual_seed(7 + swap)
    tokens, inter, hidden = 5, 32, 24
    x = torch.randn(tokens, hidden, generator=gen)
    w13 = torch.randn(1, 2 * inter, hidden, generator=gen)
    config = build.GemmConfig(128, 32, 128, "coop", swap=swap, swiglu=True)
    w13i = interleave_gate_up(w13, swiglu_pair_rows(config))[0]
    acc = w13i @ x.T if swap else x @ w13i.T  # swapped: D^T [2I, tokens]
    got = _epilogue_emulation(acc, swap)
    got = got.T if swap else got
    g, u = (x @ w13[0, :inter].T).bfloat16().float(), (x @ w13[0, inter:].T).bfloat16().float()
    want = g / (1 + torch.exp(-g)) * u
    assert not got.isnan().any()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def _nvcc_or_skip():
    if shutil.which("nvcc") is None:
        pytest.skip("nvcc not on PATH")
    try:
        return build.find_nvcc(), build.cutlass_root()
    except build.GemmBuildError as exc:
        pytest.skip(str(exc))


def test_nvcc_compiles_the_swiglu_plan_patch(tmp_path):
    nvcc, root = _nvcc_or_skip()
    cmd = [nvcc, *build.ARCH_FLAGS, *build.NVCC_FLAGS, *build.include_flags(root),
           "-c", str(build.CSRC_DIR / "swiglu_stage.cu"), "-o", str(tmp_path / "swiglu_stage.o")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_wgmma_accumulator_pairs_gate_and_up_in_one_thread(tmp_path):
    """~30 s: builds tests/swiglu_layout_check.cu (host code over the kernel's own TiledMma types, no GPU)
    and runs it: every (gate, up) pair the epilogue forms is (n, n+1) / (m, m+8) in the GEMM tile, and
    the half-width outputs are each written once."""
    nvcc, root = _nvcc_or_skip()
    source = Path(__file__).resolve().parent / "swiglu_layout_check.cu"
    exe = tmp_path / "swiglu_layout_check"
    cmd = [nvcc, *build.ARCH_FLAGS, "-std=c++17", "-O1", "--expt-relaxed-constexpr", *build.include_flags(root),
           str(source), "-o", str(exe)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = subprocess.run([str(exe)], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-1000:]
    assert run.stdout.count("ok ") == 5, run.stdout


@pytest.mark.slow
def test_nvcc_compiles_a_swiglu_grouped_gemm(tmp_path):
    """About 30-60 s of nvcc: the swapped (decode) SwiGLU GEMM1, no spills, no C7510 serialisation."""
    nvcc, root = _nvcc_or_skip()
    config = next(c for c in build.SWIGLU_CONFIGS if c.swap)
    unit = tmp_path / f"{config.name}.cu"
    unit.write_text(config.source())
    cmd = [nvcc, *build.ARCH_FLAGS, *build.NVCC_FLAGS, *build.include_flags(root), "-Xptxas", "-v",
           "-c", str(unit), "-o", str(tmp_path / "gemm.o")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "C7510" not in proc.stderr and "0 bytes spill stores" in proc.stderr
    if shutil.which("nm"):
        symbols = subprocess.run(["nm", "-C", str(tmp_path / "gemm.o")], capture_output=True, text=True).stdout
        assert "SwigluEpilogueArray" in symbols
