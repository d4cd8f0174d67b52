"""CPU checks of the fused expert stage: the grouped_mm pipeline and MoELayer against the reference,
and the CUTLASS build inputs (headers, generated sources, cache key; nvcc when present)."""

import shutil
import subprocess

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from eep_test_utils import random_experts
from eep.fused.gemm import ExpertStageShape, TorchExpertStage, grouped_mm_loop, make_expert_stage
from eep.fused.moe_layer import MoELayer
from eep.reference import ExpertParallelMoE, dense_moe
from eep.exchange.layout import RankReceive
from eep.reference.dispatch import expert_mlp


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def _random_receive(shape: ExpertStageShape, gen: torch.Generator, dtype: torch.dtype, *, counts: torch.Tensor | None = None):
    s, r, t, h = shape.slots_per_rank, shape.num_ranks, shape.max_tokens_per_rank, shape.hidden
    if counts is None:
        counts = torch.randint(0, t + 1, (s, r), generator=gen, dtype=torch.int32)
    x = torch.randn(s, r, t, h, generator=gen).to(dtype)
    x[torch.arange(t) >= counts.unsqueeze(-1)] = 0  # the receive layout is zero past counts (reference dispatch)
    w_gate, w_up, w_down = random_experts(s, shape.inter, h, generator=gen, dtype=dtype)
    return x, counts, w_gate, w_up, w_down


def _valid(shape: ExpertStageShape, counts: torch.Tensor) -> torch.Tensor:
    return torch.arange(shape.max_tokens_per_rank) < counts.unsqueeze(-1)  # [S, R, T]


@pytest.mark.parametrize("backend", ["loop", "grouped_mm", "grouped_mm_exact_rows"])
@pytest.mark.parametrize("case", ["random", "empty_experts", "one_hot_expert", "at_capacity"])
def test_stage_matches_reference_expert_mlp(backend, case):
    shape = ExpertStageShape(slots_per_rank=5, num_ranks=3, max_tokens_per_rank=12, hidden=64, inter=32, top_k=4)
    gen = torch.Generator().manual_seed(hash((backend, case)) % 2**31)
    s, r, t = shape.slots_per_rank, shape.num_ranks, shape.max_tokens_per_rank
    counts = {"random": None,
              "empty_experts": torch.tensor([[0, 0, 0], [3, 0, 7], [0, 0, 0], [1, 12, 0], [0, 0, 0]], dtype=torch.int32),
              "one_hot_expert": torch.tensor([[0, 0, 0], [0, 0, 0], [12, 12, 12], [0, 0, 0], [1, 0, 0]], dtype=torch.int32),
              # top_k=4 full slots of every source: exactly capacity_rows, the most dispatch can send
              "at_capacity": torch.tensor([[t] * r] * 4 + [[0] * r], dtype=torch.int32)}[case]
    if case == "random":
        counts = torch.randint(0, t // 2 + 1, (s, r), generator=gen, dtype=torch.int32)
    x, counts, w_gate, w_up, w_down = _random_receive(shape, gen, torch.bfloat16, counts=counts)
    if backend == "grouped_mm_exact_rows":
        stage = TorchExpertStage(shape, device="cpu", exact_rows=True)
    else:
        stage = make_expert_stage(shape, device="cpu", backend=backend)
    stage._out.fill_(float("nan"))  # poisoned: every valid row must be written
    w13 = torch.cat([w_gate, w_up], dim=1)
    y = stage(x, counts, w13, w_down)
    ref = expert_mlp(RankReceive(x, counts, torch.zeros(0)), w_gate, w_up, w_down)
    valid = _valid(shape, counts)
    if valid.any():
        assert not y[valid].isnan().any()
        assert _rel_err(y[valid], ref[valid]) < 1e-2  # bf16 operands
    assert y[~valid].isnan().all(), "rows past the counts must be left alone"


@settings(max_examples=15, deadline=None)
@given(num_groups=st.integers(1, 6), k=st.sampled_from([8, 16]), n=st.sampled_from([8, 24]),
       seed=st.integers(0, 2**31 - 1))
def test_grouped_mm_loop_matches_torch_grouped_mm(num_groups, k, n, seed):
    gen = torch.Generator().manual_seed(seed)
    sizes = torch.randint(0, 9, (num_groups,), generator=gen)
    offs = sizes.cumsum(0).to(torch.int32)
    rows = int(offs[-1]) + 3  # spare rows past the last group, as the stage's capacity leaves them
    a = torch.randn(rows, k, generator=gen).bfloat16()
    b = torch.randn(num_groups, n, k, generator=gen).bfloat16().transpose(1, 2)
    live = int(offs[-1])
    got = grouped_mm_loop(a, b, offs)[:live]
    if live and hasattr(torch, "_grouped_mm"):
        assert _rel_err(got, torch._grouped_mm(a, b, offs=offs)[:live]) < 1e-2


def test_stage_rejects_wrong_shapes_and_clamps_bad_counts():
    shape = ExpertStageShape(slots_per_rank=2, num_ranks=2, max_tokens_per_rank=4, hidden=16, inter=8, top_k=2)
    gen = torch.Generator().manual_seed(3)
    x, counts, w_gate, w_up, w_down = _random_receive(shape, gen, torch.bfloat16)
    stage = TorchExpertStage(shape, device="cpu")
    with pytest.raises(ValueError, match="w13 has shape"):
        stage(x, counts, w_gate, w_down)
    with pytest.raises(ValueError, match="x has shape"):
        stage(x[:1], counts, torch.cat([w_gate, w_up], 1), w_down)
    # a peer's count over max_tokens_per_rank is clamped, never read past the block
    bad = torch.tensor([[99, 1], [-5, 4]], dtype=torch.int32)
    y = stage(x, bad, torch.cat([w_gate, w_up], 1), w_down)
    assert not y[0, 0].isnan().any()


@pytest.mark.parametrize("backend, dtype, tol", [("loop", torch.float32, 1e-5), ("grouped_mm", torch.bfloat16, 2e-2)])
def test_moe_layer_matches_reference_through_fail_and_join(backend, dtype, tol):
    gen = torch.Generator().manual_seed(5)
    w = random_experts(16, 32, 64, generator=gen, dtype=dtype)
    x = torch.randn(40, 64, generator=gen).to(dtype)
    logits = torch.randn(40, 16, generator=gen)
    kwargs = dict(num_ranks=4, slots_per_rank=8, top_k=4)
    fused = MoELayer(*w, backend=backend, **kwargs)
    ref = ExpertParallelMoE(*w, **kwargs)
    oracle = dense_moe(x, *w, router_logits=logits, top_k=4)
    assert _rel_err(fused(x, logits), ref(x, logits)) < tol
    assert _rel_err(fused(x, logits), oracle) < tol
    w13_before = fused.slot_w13.data_ptr()
    for step in (lambda m: m.fail(1), lambda m: m.fail([3]), lambda m: m.join(1), lambda m: m.join(3)):
        step(fused)
        step(ref)
        assert fused.slot_w13.data_ptr() == w13_before  # repair wrote the per-slot weights in place
        assert torch.equal(fused.placement.phys_to_logical, ref.placement.phys_to_logical)
        assert _rel_err(fused(x, logits), oracle) < tol


def test_moe_layer_repair_writes_through_the_fused_weight():
    gen = torch.Generator().manual_seed(6)
    w = random_experts(8, 16, 32, generator=gen)
    layer = MoELayer(*w, num_ranks=4, slots_per_rank=3, top_k=2, backend="loop")
    layer.fail(0)
    inter = 16
    for phys, expert in enumerate(layer.placement.phys_to_logical[0].tolist()):
        if expert >= 0 and phys // 3 != 0:
            assert torch.equal(layer.slot_w13[phys, :inter], w[0][expert])
            assert torch.equal(layer.slot_w13[phys, inter:], w[1][expert])
    assert layer.slot_w13[0:3].isnan().all(), "a dead rank's slots are poisoned"


def test_cutlass_defaults_follow_the_measurements():
    from eep.fused.gemm.cutlass_stage import pick_config, pick_grouping
    assert pick_grouping(4) == pick_grouping(128) == "slot" and pick_grouping(256) == "block"
    assert pick_config(16).swap and pick_config(32).swap
    assert not pick_config(512).swap and pick_config(512).tile_n == 256
    with pytest.raises(ValueError, match="unknown expert backend|is not one of"):
        make_expert_stage(ExpertStageShape(1, 1, 1, 8, 8, 1), device="cpu", backend="cublas")


# ---- CUTLASS build inputs (no GPU) ----
def test_cutlass_sources_and_cache_key():
    build = pytest.importorskip("eep.fused.gemm.build")
    configs = build.DEFAULT_CONFIGS
    sources = build.generated_sources(configs)
    assert len(sources) == len(configs)
    for config in configs:
        text = sources[f"{config.name}.cu"]
        assert f"#define EEP_GEMM_NAME {config.name}" in text and '#include "grouped_gemm.cuh"' in text
    for name in build.SOURCE_FILES:
        assert (build.CSRC_DIR / name).is_file(), name
    key = build.cache_key(configs, cutlass="4.2.0", nvcc="x")
    assert key != build.cache_key(configs[:1], cutlass="4.2.0", nvcc="x")
    assert key != build.cache_key(configs, cutlass="4.2.1", nvcc="x")
    with pytest.raises(ValueError, match="cooperative"):
        build.GemmConfig(64, 128, 64, "coop")


def _cutlass_root_or_skip():
    from eep.fused.gemm.build import GemmBuildError, cutlass_root
    try:
        return cutlass_root()
    except GemmBuildError as exc:
        pytest.skip(str(exc))


def test_cutlass_headers_found():
    from eep.fused.gemm.build import cutlass_version
    root = _cutlass_root_or_skip()
    assert (root / "include" / "cute" / "tensor.hpp").is_file()
    assert cutlass_version(root).startswith(("3.", "4."))


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not on PATH")
def test_nvcc_compiles_the_stage_kernels(tmp_path):
    from eep.fused.gemm import build
    root = _cutlass_root_or_skip()
    cmd = [build.find_nvcc(), *build.ARCH_FLAGS, *build.NVCC_FLAGS, *build.include_flags(root),
           "-c", str(build.CSRC_DIR / "stage.cu"), "-o", str(tmp_path / "stage.o")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not on PATH")
def test_nvcc_compiles_one_cutlass_grouped_gemm(tmp_path):
    """About a minute of nvcc: one CUTLASS SM90 ptr-array grouped GEMM for sm_90a, no C7510 serialisation."""
    from eep.fused.gemm import build
    root = _cutlass_root_or_skip()
    config = next(c for c in build.DEFAULT_CONFIGS if c.swap)
    unit = tmp_path / f"{config.name}.cu"
    unit.write_text(config.source())
    cmd = [build.find_nvcc(), *build.ARCH_FLAGS, *build.NVCC_FLAGS, *build.include_flags(root), "-Xptxas", "-v",
           "-c", str(unit), "-o", str(tmp_path / "gemm.o")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "C7510" not in proc.stderr and "spill stores" in proc.stderr
