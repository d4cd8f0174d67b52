"""GpuEngine with block-scaled FP8 experts on one GPU, one rank (run by tests/gpu/run_fp8_engine.sh).

A random FP8 checkpoint at the qwen3-30b-a3b expert shape (hidden 2048, inter 768; 32 experts, top-8,
2 layers) goes through ``eep-shards prepare`` into a one-rank GpuEngine (local exchange, CUTLASS FP8
stage, CUDA graph). Every check prints ``CHECK <name> ok|FAIL``; a ``SUMMARY`` line ends the run and
the exit code is the number of failures.

- restore: the slots hold the shards' e4m3 weights and float32 scales bit for bit, and the restore
  moved and counted FP8 bytes (weights + scales);
- stage: the engine's FP8 stage on its own slots against ``eep.reference.fp8.expert_mlp_fp8`` (fresh
  random rows, empty and hot slots, 1x128 and per-row scales, the output poisoned beforehand), within
  1e-2 relative (Frobenius);
- decode: the captured step's tokens equal the eager step's, and the FP8 oracle's on every token it
  decides (perf/failure_oracle.py, the tolerances of perf/failure_bench.py);
- repair in place: a slot poisoned and restored from the host tier while the graph stays captured
  gives the same tokens again, with no recapture.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "perf"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from eep.exchange.layout import RankReceive  # noqa: E402
from eep.fp8 import Fp8Weight, quantize_rows  # noqa: E402
from eep.reference.fp8 import expert_mlp_fp8  # noqa: E402
from eep.repair import expert_weight_nbytes  # noqa: E402
from eep.runtime import RuntimeConfig, TinyConfig  # noqa: E402
from eep.runtime.control.rules import RepairRules  # noqa: E402
from eep.runtime.engines.base import make_engine  # noqa: E402
from eep.runtime.engines.gpu import fp8_scale_block  # noqa: E402
from eep.runtime.engines.slots import PlanPart  # noqa: E402
from eep.runtime.model import bench_weights, write_random_checkpoint  # noqa: E402
from eep.state import NO_EXPERT  # noqa: E402
from failure_bench import FP8_MARGIN_TOL, FP8_ROUTER_GAP_TOL  # noqa: E402
from failure_oracle import reference_next_tokens  # noqa: E402
from gemm_check import GEN, rel_err, report, run_checks  # noqa: E402

MODEL = TinyConfig(hidden=2048, intermediate=768, num_experts=32, top_k=8, num_layers=2, vocab_size=512, seed=1)
# --device cpu: the same checks on the CPU path (torch FP8 stage, no graph) at a small shape, so the
# script itself is exercised without a GPU
CPU_MODEL = TinyConfig(hidden=256, intermediate=128, num_experts=8, top_k=2, num_layers=2, vocab_size=64, seed=1)
DEV = torch.device("cuda")
TOL = 1e-2  # the FP8 stage's bound against the FP8 reference (about 5e-3 measured at this shape)


class Setup:
    def __init__(self, workdir: str):
        from weights_tools import ExpertStore, prepare

        t = time.perf_counter()
        write_random_checkpoint(f"{workdir}/ckpt", MODEL, device=DEV.type, fp8=True)
        prepare(f"{workdir}/ckpt", f"{workdir}/shards", quiet=True, force=True)
        self.shard_dir = f"{workdir}/shards"
        self.cfg = RuntimeConfig(num_ranks=1, slots_per_rank=MODEL.num_experts, num_redundant=0,
                                 max_tokens_per_rank=64, model=MODEL, shard_dir=self.shard_dir, engine="local",
                                 engine_options={"expert_backend": "cutlass" if DEV.type == "cuda" else "loop",
                                                 "device": DEV.type, "tiers": ["host", "disk"]})
        self.store = ExpertStore(self.shard_dir)
        self.engine = make_engine(self.cfg, 0, shm_path="", store=None, run_id="fp8-engine", incarnation=0)
        plan = RepairRules(self.cfg).preload(None, 0)
        self.placement = plan.placement
        self.part = PlanPart(plan.epoch, plan.placement, [True], plan.transfers_to(0))
        self.report = self.engine.execute(self.part)
        self.engine.warmup()
        self.engine.on_commit(active=[True], joined=[0], epoch=0, start_step=0, is_joiner=True)
        print(f"set-up {time.perf_counter() - t:.1f} s (checkpoint, prepare, engine, restore, warm-up, capture)",
              flush=True)

    def decode(self, tokens: list[int], step: int) -> list[int]:
        return self.engine.decode(torch.tensor(tokens), active=[True], placement=self.placement, epoch=0, step=step,
                                  timeout_s=5.0)

    def close(self) -> None:
        self.engine.close()
        self.store.close()


def check_restore(s: Setup) -> None:
    def run() -> str:
        e = s.engine
        assert e.is_fp8 and isinstance(e.slots.w13, Fp8Weight), "the slots are not FP8"
        if DEV.type == "cuda":
            assert type(e.stage).__name__ == "CutlassFp8ExpertStage", type(e.stage).__name__
            assert e.graphs, "no CUDA graph was captured"
        nbytes = expert_weight_nbytes(MODEL.hidden, MODEL.intermediate, fp8=True)
        moved = sum(v["nbytes"] for v in s.report.by_tier(s.part.transfers).values())
        assert moved == MODEL.num_layers * MODEL.num_experts * nbytes, (moved, nbytes)
        for layer, expert in ((0, 0), (1, MODEL.num_experts - 1), (1, MODEL.num_experts // 4)):
            phys = int(s.placement.logical_to_phys[layer, expert, 0])
            for got, want in zip(e.slots.views(layer, phys), s.store.load_expert(s.store.moe_layers[layer], expert)):
                assert torch.equal(got.weight.view(torch.uint8).cpu(), want.weight.view(torch.uint8)), (layer, expert)
                assert torch.equal(got.scale.cpu(), want.scale), (layer, expert)
        return f"{moved / 1e6:.1f} MB restored ({nbytes} bytes per expert: e4m3 + block scales), slots bit-exact"
    report("FP8 restore into the engine's slots", run)


def check_stage(s: Setup) -> None:
    e, c = s.engine, MODEL
    S, M, K = e.S, e.M, c.top_k
    # counts a real step can produce: M tokens, each choosing K distinct slots (the stage holds
    # M * min(K, S) rows; counts drawn per slot independently overflow it and the stage, by design,
    # flags the step instead of computing it). Slot 0 empty, slot 1 hot (every token, at capacity),
    # slot 2 a single row; a slot that holds no expert gets no row (the engine never routes to it).
    score = torch.rand(M, S, generator=GEN)
    score[:, 0] = -1.0
    score[:, 1] = 2.0
    score[:, 2] = -1.0
    score[0, 2] = 3.0
    score[:, torch.tensor([e.slots.holds(1, phys) == NO_EXPERT for phys in range(S)])] = -2.0
    chosen = score.topk(K, dim=1)
    chosen = chosen.indices[chosen.values > -1.0]  # a token picks fewer than K when too few slots are open
    counts = torch.bincount(chosen, minlength=S).view(S, 1)
    assert int(counts[0]) == 0 and int(counts[1]) == M and int(counts[2]) == 1, counts.view(-1).tolist()
    for per_row in (False, True):
        def run(per_row=per_row) -> str:
            x = torch.randn(S, 1, M, c.hidden, generator=GEN) * torch.rand(S, 1, M, 1, generator=GEN) * 4
            values, scales = quantize_rows(x.bfloat16(), block=c.hidden if per_row else 128)
            scales = scales[..., 0] if per_row else scales
            values, scales, count = values.to(DEV), scales.to(DEV), counts.to(torch.int32).to(DEV)
            if hasattr(e.stage, "out_buffer"):
                e.stage.out_buffer.fill_(float("nan"))  # rows it must write are poisoned first
            y = e.experts[1](values, count, scales).clone()
            if hasattr(e.stage, "error_flags"):
                assert e.stage.error_flags() == 0, f"the stage flagged the step: error word {e.stage.error_flags()}"
            gate, up, down = zip(*(e.slots.views(1, phys) for phys in range(S)))
            stack = [Fp8Weight(torch.stack([w.weight for w in ws]), torch.stack([w.scale for w in ws]))
                     for ws in (gate, up, down)]
            recv = RankReceive(x=values, count=count, src_token=torch.zeros(S, 1, M, dtype=torch.int32, device=DEV))
            want = expert_mlp_fp8(recv, scales, *stack)
            live = torch.arange(M, device=DEV) < count.unsqueeze(-1)
            assert torch.isfinite(y[live]).all(), "rows within the counts left unwritten or non-finite"
            err = rel_err(y[live].float(), want[live].float())
            assert err < TOL, err
            return f"rel_err {err:.2e} vs the FP8 reference ({int(count.sum())} rows, {S} slots)"
        report(f"FP8 stage on the engine's slots ({'per-row' if per_row else '1x128'} token scales)", run)


def check_decode(s: Setup) -> list[int]:
    tokens = torch.randperm(MODEL.vocab_size, generator=GEN)[:s.engine.M].tolist()
    out: list[int] = []

    def run() -> str:
        got = s.decode(tokens, 0)
        eager = s.engine._forward(s.engine.tokens[len(tokens)]).cpu()[:len(tokens)].tolist()
        assert got == eager, "graph replay and eager step differ"
        want, margin, gap = reference_next_tokens(MODEL, bench_weights(MODEL),
                                                  lambda layer, x: s.store.load_expert(s.store.moe_layers[layer], x),
                                                  tokens, combine_dtype=torch.float32, device=DEV,
                                                  fp8_scale_block=fp8_scale_block("local", MODEL.hidden))
        decided = [i for i, (m, g) in enumerate(zip(margin, gap)) if m >= FP8_MARGIN_TOL and g >= FP8_ROUTER_GAP_TOL]
        wrong = [i for i in decided if got[i] != want[i]]
        undecided_differ = sum(got[i] != want[i] for i in range(len(tokens)) if i not in decided)
        assert decided and not wrong, (len(decided), wrong)
        out.extend(got)
        return (f"{len(decided)} of {len(tokens)} tokens decided, all agree with the FP8 oracle "
                f"({undecided_differ} undecided ones differ); graph == eager")
    report("FP8 decode step (graph) vs the FP8 oracle", run)
    out.insert(0, tokens)  # type: ignore[arg-type]
    return out


def check_repair_in_place(s: Setup, decoded: list) -> None:
    def run() -> str:
        tokens, before = decoded[0], decoded[1:]
        assert before, "the decode check did not run"
        graphs = dict(s.engine.graphs)
        for layer, expert in ((0, 3), (1, MODEL.num_experts // 2 + 1)):
            phys = int(s.placement.logical_to_phys[layer, expert, 0])
            s.engine.slots.poison(layer, phys)
        report_ = s.engine.execute(s.part)  # only the two poisoned slots are copied again (host tier)
        assert report_.num_copied == 2 and set(report_.served_by) - {"held"} == {"host"}, report_.served_by
        after = s.decode(tokens, 1)
        assert after == before and s.engine.graphs == graphs, "tokens changed or the graph was recaptured"
        return "2 slots poisoned and restored under the captured graph: same tokens, no recapture"
    report("FP8 slots restored in place under the captured graph", run)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--workdir", default=None, help="checkpoint and shards (default: a temp dir, removed)")
    ap.add_argument("--device", default="cuda", choices=("cuda", "cpu"),
                    help="cpu: the same checks on the CPU path at a small shape (exercises this script)")
    args = ap.parse_args()
    global MODEL, DEV
    if args.device == "cpu":
        MODEL, DEV = CPU_MODEL, torch.device("cpu")
    workdir = args.workdir or tempfile.mkdtemp(prefix="eep-fp8-engine-")
    os.makedirs(workdir, exist_ok=True)
    setup: list[Setup] = []
    decoded: list = []

    def build() -> None:
        report("FP8 engine set-up", lambda: setup.append(Setup(workdir)))

    def checks() -> None:
        if not setup:
            return
        s = setup[0]
        check_restore(s)
        check_stage(s)
        decoded.extend(check_decode(s))
        check_repair_in_place(s, decoded)
        s.close()

    try:
        return run_checks([build, checks])
    finally:
        if setup:  # the host tier file lives outside the workdir (EEP_HOST_TIER_DIR or /dev/shm)
            from weights_tools.manifest import Manifest
            from weights_tools.tiers import host_tier_path
            path = host_tier_path(Manifest.load(setup[0].shard_dir))
            for leftover in (path, path + ".lock"):
                if os.path.exists(leftover):
                    os.unlink(leftover)
        if not args.workdir:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
