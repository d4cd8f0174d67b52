"""CPU checks of the FP8 expert stage: the torch FP8 stage and MoELayer's FP8 path against the FP8
reference, and the CUTLASS FP8 build inputs (generated sources, cache key, nvcc when present)."""

from __future__ import annotations

import shutil
import subprocess

import pytest
import torch

from eep.fp8 import FP8_DTYPE, Fp8Weight, quantize_rows, quantize_weight
from eep.fused.gemm import ExpertStageShape, TorchFp8ExpertStage, make_expert_stage
from eep.fused.moe_layer import MoELayer
from eep.reference import dense_moe
from eep.reference.dispatch import RankReceive
from eep.reference.fp8 import expert_mlp_fp8

SHAPE = ExpertStageShape(slots_per_rank=4, num_ranks=3, max_tokens_per_rank=10, hidden=256, inter=128, top_k=3)


def _fp8_inputs(shape: ExpertStageShape, counts: torch.Tensor, gen: torch.Generator, *, per_row: bool):
    s, r, t, h, i = shape.slots_per_rank, shape.num_ranks, shape.max_tokens_per_rank, shape.hidden, shape.inter
    x = torch.randn(s, r, t, h, generator=gen)
    values, scales = quantize_rows(x, block=h if per_row else 128)
    if per_row:
        scales = scales[..., 0]
    w13 = quantize_weight(torch.randn(s, 2 * i, h, generator=gen) / h ** 0.5)
    w2 = quantize_weight(torch.randn(s, h, i, generator=gen) / i ** 0.5)
    return values, scales, counts.to(torch.int32), w13, w2


def _halves(w13: Fp8Weight, inter: int) -> tuple[Fp8Weight, Fp8Weight]:
    blocks = inter // 128
    return Fp8Weight(w13.weight[:, :inter], w13.scale[:, :blocks]), Fp8Weight(w13.weight[:, inter:], w13.scale[:, blocks:])


@pytest.mark.parametrize("per_row", [False, True], ids=["scales-1x128", "scale-per-row"])
@pytest.mark.parametrize("case", ["random", "empty_experts", "one_hot_expert", "at_capacity"])
def test_torch_fp8_stage_matches_the_fp8_reference(case, per_row):
    gen = torch.Generator().manual_seed(hash((case, per_row)) % 2**31)
    s, r, t = SHAPE.slots_per_rank, SHAPE.num_ranks, SHAPE.max_tokens_per_rank
    counts = {"random": torch.randint(0, t + 1, (s, r), generator=gen),
              "empty_experts": torch.tensor([[0, 0, 0], [3, 0, 7], [0, 0, 0], [1, 10, 0]]),
              "one_hot_expert": torch.tensor([[0, 0, 0], [10, 10, 10], [0, 0, 0], [1, 0, 0]]),
              "at_capacity": torch.full((s, r), t)}[case]
    x, x_scale, counts, w13, w2 = _fp8_inputs(SHAPE, counts, gen, per_row=per_row)
    stage = make_expert_stage(SHAPE, device="cpu", dtype=FP8_DTYPE)
    assert isinstance(stage, TorchFp8ExpertStage)
    y = stage(x, x_scale, counts, w13, w2)
    ref = expert_mlp_fp8(RankReceive(x, counts, None), x_scale, *_halves(w13, SHAPE.inter), w2)
    assert y.dtype == torch.bfloat16
    valid = torch.arange(t) < counts.unsqueeze(-1)
    assert not y[~valid].any()
    if valid.any():
        err = float((y[valid].double() - ref[valid].double()).norm() / ref[valid].double().norm())
        assert err < 1e-2, err


@pytest.mark.parametrize("backend", ["loop", "auto"])
def test_moe_layer_fp8_matches_dense_fp8_through_fail_and_join(backend):
    gen = torch.Generator().manual_seed(7)
    experts, hidden, inter = 12, 256, 128
    w = [quantize_weight(torch.randn(experts, o, i, generator=gen) / i ** 0.5)
         for o, i in ((inter, hidden), (inter, hidden), (hidden, inter))]
    layer = MoELayer(*w, num_ranks=4, slots_per_rank=8, top_k=3, backend=backend, num_redundant=4)
    assert isinstance(layer.slot_w13, Fp8Weight) and layer.slot_w13.weight.shape[1] == 2 * inter
    x = torch.randn(40, hidden, generator=gen).bfloat16()
    logits = torch.randn(40, experts, generator=gen)
    want = dense_moe(x, *w, router_logits=logits, top_k=3)
    errs = []
    for step in (None, lambda m: m.fail(1), lambda m: m.fail(3), lambda m: m.join(1)):
        if step is not None:
            step(layer)
        y = layer(x, logits)
        assert y.dtype == torch.bfloat16
        errs.append(float((y.double() - want.double()).norm() / want.double().norm()))
    assert max(errs) < 1e-2, errs
    # the repair wrote FP8 weights and their scales through the w13 views
    for phys, expert in enumerate(layer.placement.phys_to_logical[0].tolist()):
        if expert >= 0 and layer.membership.is_active(phys // layer.slots_per_rank):
            assert torch.equal(layer.slot_w13.scale[phys, :1], w[0].scale[expert])
            assert torch.equal(layer.slot_w13.weight[phys, inter:].view(torch.uint8), w[1].weight[expert].view(torch.uint8))
    with pytest.raises(ValueError, match="intermediate size % 128"):
        small = [quantize_weight(torch.randn(4, o, i, generator=gen)) for o, i in ((64, 128), (64, 128), (128, 64))]
        MoELayer(*small, num_ranks=2, slots_per_rank=2, top_k=1)


# ---- CUTLASS FP8 build inputs (no GPU) ----
def test_fp8_configs_and_sources():
    build = pytest.importorskip("eep.fused.gemm.build")
    from eep.fused.gemm.cutlass_fp8_stage import pick_fp8_config
    sources = build.generated_sources(build.FP8_CONFIGS)
    for config in build.FP8_CONFIGS:
        assert config.fp8 and config.tile_k == 128 and config.name.startswith("eep_gemm_fp8_")
        assert '#include "fp8_gemm.cuh"' in sources[f"{config.name}.cu"]
    for name in build.FP8_SOURCE_FILES:
        assert (build.CSRC_DIR / name).is_file(), name
    assert "fp8_stage.cu" in build.source_files(build.FP8_CONFIGS)
    assert "stage.cu" not in build.source_files(build.FP8_CONFIGS)
    assert "fp8_stage.cu" not in build.source_files(build.DEFAULT_CONFIGS)
    key = build.cache_key(build.FP8_CONFIGS, cutlass="4.2.0", nvcc="x")
    assert key != build.cache_key(build.DEFAULT_CONFIGS, cutlass="4.2.0", nvcc="x")
    with pytest.raises(ValueError, match="tile_k 128"):
        build.GemmConfig(128, 128, 64, "coop", fp8=True)
    assert pick_fp8_config(16).swap and pick_fp8_config(16).tile_n == 32
    assert pick_fp8_config(48).swap and pick_fp8_config(48).tile_n == 64
    assert not pick_fp8_config(512).swap
    for rows in (16, 48, 512):
        assert pick_fp8_config(rows) in build.FP8_CONFIGS


def _nvcc(tmp_path, unit, *extra):
    from eep.fused.gemm import build
    from eep.fused.gemm.build import GemmBuildError, cutlass_root
    try:
        root = cutlass_root()
    except GemmBuildError as exc:
        pytest.skip(str(exc))
    cmd = [build.find_nvcc(), *build.ARCH_FLAGS, *build.NVCC_FLAGS, *build.include_flags(root), *extra,
           "-c", str(unit), "-o", str(tmp_path / "unit.o")]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600)


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not on PATH")
def test_nvcc_compiles_the_fp8_stage_kernels(tmp_path):
    from eep.fused.gemm import build
    proc = _nvcc(tmp_path, build.CSRC_DIR / "fp8_stage.cu", "-Xptxas", "-v")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "fp8_swiglu_quant_kernel" in proc.stderr and " 0 bytes spill stores" in proc.stderr


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not on PATH")
def test_nvcc_compiles_one_blockwise_fp8_grouped_gemm(tmp_path):
    """About a minute and a half of nvcc: the decode FP8 GEMM (tokens on N, 1x128 token scales against
    128x128 weight scales), no spills and no C7510 wgmma serialisation."""
    from eep.fused.gemm import build
    config = next(c for c in build.FP8_CONFIGS if c.swap)
    unit = tmp_path / f"{config.name}.cu"
    unit.write_text(config.source())
    proc = _nvcc(tmp_path, unit, "-Xptxas", "-v")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "C7510" not in proc.stderr and "spill stores" in proc.stderr
    assert all(" 0 bytes spill stores" in line for line in proc.stderr.splitlines() if "spill stores" in line)
