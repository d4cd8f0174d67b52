"""GPU differential checks of the expert stage (run by tests/gpu/run_gemm.sh on a GPU machine).

Each check prints ``CHECK <name> ok|FAIL <detail>``; the exit code is the number of failures.
Reference: ``eep.reference`` in float32 on upcast inputs; bf16 tolerance 1e-2 (METHOD.md).
"""

from __future__ import annotations

import sys
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from eep.fused.gemm import ExpertStageShape, TorchExpertStage  # noqa: E402
from eep.fused.gemm.build import DEFAULT_CONFIGS, SWIGLU_CONFIGS, GemmConfig  # noqa: E402
from eep.fused.gemm.cutlass_stage import (ERROR_COUNT_OVER_CAPACITY, ERROR_ROWS_OVER_CAPACITY,  # noqa: E402
                                          CutlassExpertStage, pick_config)
from eep.exchange.layout import RankReceive  # noqa: E402
from eep.reference.dispatch import expert_mlp  # noqa: E402

DEV = torch.device("cuda")
GEN = torch.Generator().manual_seed(int(time.time()))
FAILURES: list[str] = []


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))


def report(name: str, fn) -> None:
    try:
        detail = fn()
        print(f"CHECK {name} ok {detail or ''}", flush=True)
    except Exception:
        FAILURES.append(name)
        print(f"CHECK {name} FAIL\n{traceback.format_exc()}", flush=True)


def make_inputs(shape: ExpertStageShape, counts: torch.Tensor):
    s, r, t, h, i = shape.slots_per_rank, shape.num_ranks, shape.max_tokens_per_rank, shape.hidden, shape.inter
    x = torch.randn(s, r, t, h, generator=GEN).bfloat16()
    w13 = (torch.randn(s, 2 * i, h, generator=GEN) / h ** 0.5).bfloat16()
    w2 = (torch.randn(s, h, i, generator=GEN) / i ** 0.5).bfloat16()
    return x.to(DEV), counts.to(torch.int32).to(DEV), w13.to(DEV), w2.to(DEV)


def compare(y: torch.Tensor, x, counts, w13, w2, inter: int) -> float:
    """Valid rows against the reference (float32 on upcast inputs); NaN anywhere valid fails."""
    ref = expert_mlp(RankReceive(x.float(), counts, None), w13[:, :inter].float(), w13[:, inter:].float(), w2.float())
    valid = torch.arange(x.shape[2], device=DEV) < counts.unsqueeze(-1)
    got = y[valid]
    if got.isnan().any():
        raise AssertionError(f"{int(got.isnan().any(-1).sum())} valid rows unwritten (NaN) or NaN")
    err = rel_err(got, ref[valid])
    if not err < 1e-2:
        raise AssertionError(f"relative error {err:.3e} > 1e-2")
    return err


SMALL = ExpertStageShape(slots_per_rank=6, num_ranks=4, max_tokens_per_rank=96, hidden=512, inter=256, top_k=4)


def count_cases(shape: ExpertStageShape) -> dict[str, torch.Tensor]:
    s, r, t = shape.slots_per_rank, shape.num_ranks, shape.max_tokens_per_rank
    empty = torch.randint(1, t // 3, (s, r), generator=GEN)
    empty[0] = 0
    empty[3, 1:] = 0
    hot = torch.zeros(s, r, dtype=torch.long)
    hot[2] = t
    hot[5, 0] = 1
    at_cap = torch.zeros(s, r, dtype=torch.long)
    at_cap[:shape.top_k] = t
    return {"random": torch.randint(0, t // 2, (s, r), generator=GEN), "empty_experts": empty,
            "one_hot_expert": hot, "at_capacity": at_cap, "decode_like": torch.randint(0, 9, (s, r), generator=GEN)}


def check_configs() -> None:
    for grouping, config in [(g, c) for g in ("block", "slot") for c in DEFAULT_CONFIGS]:
        for case, counts in count_cases(SMALL).items():
            def run(config=config, counts=counts, grouping=grouping):
                stage = CutlassExpertStage(SMALL, device=DEV, gemm1=config, gemm2=config, grouping=grouping)
                x, c, w13, w2 = make_inputs(SMALL, counts)
                stage.out_buffer.fill_(float("nan"))  # poisoned
                y = stage(x, c, w13, w2)
                torch.cuda.synchronize()
                assert stage.error_flags() == 0, stage.error_flags()
                assert stage.total_rows() == int(c.sum()), (stage.total_rows(), int(c.sum()))
                return f"rel_err {compare(y, x, c, w13, w2, SMALL.inter):.2e}"
            report(f"cutlass {grouping} {config.name} {case}", run)


def check_torch_stage() -> None:
    for case, counts in count_cases(SMALL).items():
        def run(counts=counts):
            stage = TorchExpertStage(SMALL, device=DEV)
            x, c, w13, w2 = make_inputs(SMALL, counts)
            stage._out.fill_(float("nan"))
            return f"rel_err {compare(stage(x, c, w13, w2), x, c, w13, w2, SMALL.inter):.2e}"
        report(f"torch_grouped_mm {case}", run)


def check_bad_counts() -> None:
    for grouping in ("block", "slot"):
        report(f"cutlass {grouping} bad counts flagged, no fault", lambda g=grouping: _bad_counts(g))


def _bad_counts(grouping: str) -> None:
    if True:
        stage = CutlassExpertStage(SMALL, device=DEV, grouping=grouping)
        counts = torch.zeros(SMALL.slots_per_rank, SMALL.num_ranks, dtype=torch.long)
        counts[0, 0], counts[1, 1] = 10_000, -3
        x, c, w13, w2 = make_inputs(SMALL, counts)
        stage(x, c, w13, w2)
        torch.cuda.synchronize()
        assert stage.error_flags() & ERROR_COUNT_OVER_CAPACITY
        over = torch.full((SMALL.slots_per_rank, SMALL.num_ranks), SMALL.max_tokens_per_rank, dtype=torch.long)
        x, c, w13, w2 = make_inputs(SMALL, over)
        stage(x, c, w13, w2)
        torch.cuda.synchronize()
        assert stage.error_flags() & ERROR_ROWS_OVER_CAPACITY
        assert stage.total_rows() <= SMALL.capacity_rows


def check_graph() -> None:
    for grouping in ("block", "slot"):
        report(f"cutlass {grouping} CUDA graph replay with new counts and weights", lambda g=grouping: _graph(g))


def _graph(grouping: str) -> str:
    if True:
        stage = CutlassExpertStage(SMALL, device=DEV, gemm1=pick_config(16), gemm2=pick_config(512),
                                   grouping=grouping)
        x, c, w13, w2 = make_inputs(SMALL, count_cases(SMALL)["random"])
        stage(x, c, w13, w2)  # warm up outside the capture (library load, attributes)
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            stage(x, c, w13, w2)
        err = _replay_with_new_inputs(graph, stage, x, c, w2, w13.copy_, ("decode_like", "empty_experts", "random"))
        return f"replays rel_err {err:.2e}"


def _replay_with_new_inputs(graph, stage, x, c, w2, write_w13, cases) -> float:
    """Replay a captured stage after writing fresh tokens, counts and weights into its inputs in place
    (weights as a repair writes a slot: ``write_w13(w13)``); the largest relative error over ``cases``."""
    errs = []
    for case in cases:
        x2, c2, w13b, w2b = make_inputs(SMALL, count_cases(SMALL)[case])
        x.copy_(x2)
        c.copy_(c2)
        write_w13(w13b)
        w2.copy_(w2b)
        stage.out_buffer.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        errs.append(compare(stage.out_buffer, x, c, w13b, w2, SMALL.inter))
    return max(errs)


def check_moe_layer() -> None:
    from eep.fused.moe_layer import MoELayer
    from eep.reference import dense_moe

    def run():
        e, i, h = 16, 64, 256
        w = [(torch.randn(e, i, h, generator=GEN) / h ** 0.5).bfloat16(), (torch.randn(e, i, h, generator=GEN) / h ** 0.5).bfloat16(),
             (torch.randn(e, h, i, generator=GEN) / i ** 0.5).bfloat16()]
        x = torch.randn(96, h, generator=GEN).bfloat16()
        logits = torch.randn(96, e, generator=GEN)
        layer = MoELayer(*w, num_ranks=4, slots_per_rank=8, top_k=4, device=DEV, backend="cutlass")
        oracle = dense_moe(x.float(), *(t.float() for t in w), router_logits=logits, top_k=4)
        errs = [rel_err(layer(x, logits).cpu(), oracle)]
        for step in (lambda m: m.fail(1), lambda m: m.fail(2), lambda m: m.join(1), lambda m: m.join(2)):
            step(layer)
            errs.append(rel_err(layer(x, logits).cpu(), oracle))
        assert max(errs) < 1e-2, errs
        return f"rel_err {max(errs):.2e} over fail 1, fail 2, join 1, join 2"
    report("MoELayer(cutlass) vs dense_moe through fail/join", run)


def moe_layer_graph_errors(w, oracle, *, num_tokens: int = 96) -> list[float]:
    """``MoELayer(cutlass)`` over the experts ``w`` captured once in a CUDA graph and replayed with fresh
    inputs, after ``fail(1)`` and after ``join(1)`` (membership and repair write tables and slot weights
    in place: no recapture); each replay's error against ``oracle(x, logits)`` computed on the CPU."""
    from eep.fused.moe_layer import MoELayer

    e, h = w[0].shape[0], w[0].shape[2]
    layer = MoELayer(*w, num_ranks=4, slots_per_rank=8, top_k=4, device=DEV, backend="cutlass")
    x = torch.randn(num_tokens, h, generator=GEN).bfloat16().to(DEV)
    logits = torch.randn(num_tokens, e, generator=GEN).to(DEV)
    layer(x, logits)  # warm-up: stage, library, workspaces
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = layer(x, logits)
    errs = []
    for step in (None, lambda m: m.fail(1), lambda m: m.join(1)):
        if step is not None:
            step(layer)
        x.copy_(torch.randn(num_tokens, h, generator=GEN).bfloat16())
        logits.copy_(torch.randn(num_tokens, e, generator=GEN))
        graph.replay()
        torch.cuda.synchronize()
        errs.append(rel_err(out.cpu(), oracle(x.cpu(), logits.cpu())))
    return errs


def check_moe_layer_graph() -> None:
    from eep.reference import dense_moe

    def run():
        e, i, h = 16, 64, 256
        w = [(torch.randn(e, i, h, generator=GEN) / h ** 0.5).bfloat16(), (torch.randn(e, i, h, generator=GEN) / h ** 0.5).bfloat16(),
             (torch.randn(e, h, i, generator=GEN) / i ** 0.5).bfloat16()]
        errs = moe_layer_graph_errors(w, lambda x, logits: dense_moe(x.float(), *(t.float() for t in w),
                                                                     router_logits=logits, top_k=4))
        assert max(errs) < 1e-2, errs
        return f"replays rel_err {max(errs):.2e} (fresh inputs; after fail(1); after join(1)), no recapture"
    report("MoELayer(cutlass) captured once, replayed through fail/join", run)


def check_qwen3_block() -> None:
    def run():
        from transformers import Qwen3MoeConfig
        from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock

        from eep.fused.moe_layer import MoELayer
        h, i, e, k = 2048, 768, 128, 8  # qwen3-30b-a3b layer shape
        config = Qwen3MoeConfig(hidden_size=h, moe_intermediate_size=i, num_experts=e, num_experts_per_tok=k,
                                norm_topk_prob=True, hidden_act="silu")
        block = Qwen3MoeSparseMoeBlock(config).to(DEV, torch.bfloat16)
        with torch.no_grad():
            block.experts.gate_up_proj.copy_(torch.randn(e, 2 * i, h, generator=GEN) / h ** 0.5)
            block.experts.down_proj.copy_(torch.randn(e, h, i, generator=GEN) / i ** 0.5)
            block.gate.weight.copy_(torch.randn(e, h, generator=GEN) / h ** 0.5)
        x = torch.randn(1, 256, h, generator=GEN).bfloat16().to(DEV)
        with torch.no_grad():
            want = block(x)[0]
            logits = torch.nn.functional.linear(x[0], block.gate.weight)
        gate_up = block.experts.gate_up_proj.detach()
        layer = MoELayer(gate_up[:, :i].cpu(), gate_up[:, i:].cpu(), block.experts.down_proj.detach().cpu(),
                         num_ranks=4, slots_per_rank=44, top_k=k, device=DEV, backend=None)  # auto: CUTLASS on H100
        errs = [rel_err(layer(x[0], logits.float()), want)]
        layer.fail(3)
        errs.append(rel_err(layer(x[0], logits.float()), want))
        assert max(errs) < 2e-2, errs
        picked = type(next(iter(layer._stages.values()))).__name__
        assert picked == "CutlassExpertStage", picked
        return f"rel_err {errs[0]:.2e}, after fail(3) {errs[1]:.2e} ({picked})"
    report("transformers Qwen3-MoE block (qwen3-30b-a3b shape) vs MoELayer(auto backend)", run)


# ---- SwiGLU fused into GEMM1's epilogue (CutlassExpertStage(fused_swiglu=True), opt-in) ----
# A second shape whose 2*inter (400) is not a multiple of the 256-wide N tile nor of 32, and whose
# hidden is not a multiple of 256: partial tiles on every side of GEMM1's output.
ODD = ExpertStageShape(slots_per_rank=6, num_ranks=3, max_tokens_per_rank=40, hidden=384, inter=200, top_k=2)


def _plain(config: GemmConfig) -> GemmConfig:
    return GemmConfig(config.tile_m, config.tile_n, config.tile_k, config.schedule, config.swap,
                      config.cluster_m, config.cluster_n)


def _fused_vs_unfused(shape: ExpertStageShape, fused_cfg: GemmConfig, grouping: str, counts: torch.Tensor) -> str:
    """Fused stage (interleaved w13, h and out poisoned) against the reference, and its h against the
    unfused stage's h (same GEMM1 tile, same rounding points: expected equal up to accumulation order)."""
    gemm2 = pick_config(4 if fused_cfg.swap else 512)
    configs = DEFAULT_CONFIGS + SWIGLU_CONFIGS
    fused = CutlassExpertStage(shape, device=DEV, gemm1=fused_cfg, gemm2=gemm2, grouping=grouping,
                               configs=configs, fused_swiglu=True)
    plain = CutlassExpertStage(shape, device=DEV, gemm1=_plain(fused_cfg), gemm2=gemm2, grouping=grouping,
                               configs=configs)
    x, c, w13, w2 = make_inputs(shape, counts)
    w13i = fused.prepare_w13(w13)
    assert not torch.equal(w13i, w13) or shape.inter == 1
    fused.out_buffer.fill_(float("nan"))
    fused.h.fill_(float("nan"))
    y = fused(x, c, w13i, w2)
    torch.cuda.synchronize()
    assert fused.error_flags() == 0, fused.error_flags()
    rows = fused.total_rows()
    assert rows == int(c.sum()), (rows, int(c.sum()))
    err = compare(y, x, c, w13, w2, shape.inter)
    y_plain = plain(x, c, w13, w2).clone()
    torch.cuda.synchronize()
    h_fused, h_plain = fused.h[:rows], plain.h[:rows]
    assert not h_fused.isnan().any(), f"{int(h_fused.isnan().any(-1).sum())} of {rows} h rows unwritten"
    mismatched = int((h_fused != h_plain).sum())
    h_err = rel_err(h_fused, h_plain) if rows else 0.0
    assert h_err < 1e-2, f"h differs from the unfused path: rel_err {h_err:.3e}"
    if rows:  # rows past the live ones stay poisoned: the epilogue wrote nothing out of bounds of h
        assert fused.h[rows:].isnan().all(), "fused GEMM1 wrote h rows past the live rows"
    valid = torch.arange(shape.max_tokens_per_rank, device=DEV) < c.unsqueeze(-1)
    y_err = rel_err(y[valid], y_plain[valid]) if rows else 0.0
    return f"rel_err {err:.2e}, h vs unfused {h_err:.1e} ({mismatched} of {h_fused.numel()} differ), y vs unfused {y_err:.1e}"


def check_swiglu_fused() -> None:
    for shape_name, shape in (("small", SMALL), ("odd", ODD)):
        for grouping, config in [(g, c) for g in ("block", "slot") for c in SWIGLU_CONFIGS]:
            for case, counts in count_cases(shape).items():
                report(f"swiglu {shape_name} {grouping} {config.name} {case}",
                       lambda s=shape, c=config, g=grouping, k=counts: _fused_vs_unfused(s, c, g, k))
    report("swiglu stage picks a swiglu GEMM1 and rejects a mismatched one", _swiglu_options)
    for grouping in ("block", "slot"):
        report(f"swiglu {grouping} CUDA graph replay with new counts and weights", lambda g=grouping: _swiglu_graph(g))


def _swiglu_options() -> str:
    for rows, swap in ((4, True), (512, False)):
        stage = CutlassExpertStage(SMALL, device=DEV, expected_rows_per_group=rows, grouping="block", fused_swiglu=True)
        assert stage.gemm1.swiglu and stage.gemm1.swap == swap and not stage.gemm2.swiglu, stage.describe()
        assert stage.pair_rows == (8 if swap else 1)
    for bad in (dict(gemm1=DEFAULT_CONFIGS[0], fused_swiglu=True), dict(gemm1=SWIGLU_CONFIGS[0])):
        try:
            CutlassExpertStage(SMALL, device=DEV, configs=DEFAULT_CONFIGS + SWIGLU_CONFIGS, **bad)
        except ValueError:
            continue
        raise AssertionError(f"accepted {bad}")
    return "ok"


def _swiglu_graph(grouping: str) -> str:
    stage = CutlassExpertStage(SMALL, device=DEV, expected_rows_per_group=16, grouping=grouping, fused_swiglu=True)
    x, c, w13, w2 = make_inputs(SMALL, count_cases(SMALL)["random"])
    w13i = stage.prepare_w13(w13)
    stage(x, c, w13i, w2)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        stage(x, c, w13i, w2)
    # a repair writes the interleaved rows in place
    err = _replay_with_new_inputs(graph, stage, x, c, w2, lambda w13b: w13i.copy_(stage.prepare_w13(w13b)),
                                  ("decode_like", "empty_experts", "random", "one_hot_expert"))
    return f"replays rel_err {err:.2e} ({stage.describe()})"


def run_checks(checks) -> int:
    """Run the check groups in order; print the GPU first and a SUMMARY line last; the failure count."""
    t0 = time.time()
    where = torch.cuda.get_device_name() if torch.cuda.is_available() else "none (CPU)"
    print(f"GPU {where} torch {torch.__version__}", flush=True)
    for check in checks:
        check()
    print(f"SUMMARY {len(FAILURES)} failed: {FAILURES} ({time.time() - t0:.0f} s)", flush=True)
    return len(FAILURES)


def main() -> int:
    if "--swiglu" in sys.argv[1:]:  # only the fused-SwiGLU checks (run_gemm.sh swiglu): a separate library
        return run_checks([check_swiglu_fused])
    return run_checks([check_configs, check_torch_stage, check_bad_counts, check_graph, check_moe_layer,
                       check_moe_layer_graph, check_qwen3_block])


if __name__ == "__main__":
    sys.exit(main())
