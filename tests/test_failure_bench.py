"""The failure benchmark's CPU-testable parts: engine seam, GPU engine on one CPU rank, metrics, script.

GPU paths (the fused buffer, the NCCL collective, CUDA graphs) are not exercised here: docs/failure_bench.md.
"""

import json
import os
import sys

import pytest
import torch

from eep.runtime import RuntimeConfig, TinyConfig
from eep.runtime.engines.base import ENGINES, make_engine
from eep.runtime.engines.shm import ShmEngine
from eep.runtime.control.metrics import summarize
from eep.runtime.engines.gpu import GpuEngine
from eep.runtime.engines.slots import PlanPart
from eep.runtime.model import bench_weights
from eep.runtime.control.rules import RepairRules
from eep.state import ExpertPlacement, Membership

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "perf"))
import bench_metrics  # noqa: E402
import failure_bench  # noqa: E402
from failure_oracle import reference_next_tokens  # noqa: E402

pytest.importorskip("safetensors")


def _remove_host_tier(path):
    for leftover in (path, path + ".lock"):  # /dev/shm outlives the test
        if os.path.exists(leftover):
            os.unlink(leftover)


# ---- the GPU engine on one CPU rank -----------------------------------------------------------

@pytest.fixture(scope="module")
def small_shards(tmp_path_factory):
    from weights_tools import prepare
    root = tmp_path_factory.mktemp("fb")
    model = TinyConfig(hidden=64, intermediate=32, num_experts=8, top_k=2, num_layers=2, vocab_size=64, seed=3)
    failure_bench.write_random_checkpoint(str(root / "ckpt"), model, seed=4)
    prepare(str(root / "ckpt"), str(root / "shards"), quiet=True)
    yield model, str(root / "shards")
    from weights_tools.manifest import Manifest
    from weights_tools.tiers import host_tier_path
    path = host_tier_path(Manifest.load(str(root / "shards")))
    for leftover in (path, path + ".lock"):
        if os.path.exists(leftover):
            os.unlink(leftover)


def test_gpu_engine_local_matches_the_cpu_oracle(small_shards):
    model, shard_dir = small_shards
    cfg = RuntimeConfig(num_ranks=1, slots_per_rank=model.num_experts, num_redundant=0, max_tokens_per_rank=16,
                        model=model, shard_dir=shard_dir, engine="local",
                        engine_options={"device": "cpu", "attn_width": 24, "expert_backend": "loop",
                                        "tiers": ["disk"]})
    engine = make_engine(cfg, 0, shm_path="", store=None, run_id="t", incarnation=0)
    assert isinstance(engine, GpuEngine)
    plan = RepairRules(cfg).preload(None, 0)  # the start: the initial row from the fastest tier
    placement = plan.placement
    part = PlanPart(plan.epoch, placement, [True], plan.transfers_to(0))
    report = engine.execute(part)
    assert report.num_copied == model.num_layers * model.num_experts
    assert report.by_tier(part.transfers)["disk"]["experts"] == model.num_layers * model.num_experts
    assert [b["transfers"] for b in report.batches] == [model.num_experts] * model.num_layers  # one batch per layer
    assert engine.execute(part).num_copied == 0  # every slot holds its expert already
    engine.warmup()
    engine.on_commit(active=[True], joined=[0], epoch=0, start_step=0, is_joiner=True)
    tokens = torch.randperm(model.vocab_size, generator=torch.Generator().manual_seed(9))[:13]
    got = engine.decode(tokens, active=[True], placement=placement, epoch=0, step=0, timeout_s=1.0)
    from weights_tools import ExpertStore
    store = ExpertStore(shard_dir)
    want, margin, gap = reference_next_tokens(model, bench_weights(model),
                                              lambda layer, e: store.load_expert(store.moe_layers[layer], e),
                                              tokens.tolist())
    store.close()
    engine.close()
    assert len(got) == 13
    # the oracle rounds where the engine does: only a token decided by accumulation order may differ
    wrong = [(g, w, m, r) for g, w, m, r in zip(got, want, margin, gap) if g != w]
    assert all(m < 1e-3 or r < 1e-3 for _, _, m, r in wrong), wrong
    assert len(wrong) <= 1


@pytest.fixture(scope="module")
def fp8_shards(tmp_path_factory):
    from weights_tools import prepare
    root = tmp_path_factory.mktemp("fb-fp8")
    model = TinyConfig(hidden=256, intermediate=128, num_experts=8, top_k=2, num_layers=2, vocab_size=64, seed=3)
    failure_bench.write_random_checkpoint(str(root / "ckpt"), model, seed=4, fp8=True)
    prepare(str(root / "ckpt"), str(root / "shards"), quiet=True)
    yield model, str(root / "shards")
    from weights_tools.manifest import Manifest
    from weights_tools.tiers import host_tier_path
    _remove_host_tier(host_tier_path(Manifest.load(str(root / "shards"))))


def test_gpu_engine_serves_fp8_experts_as_the_fp8_oracle_answers(fp8_shards):
    """FP8 shards: the slots hold e4m3 weights and their block scales bit for bit as the shards do, a
    restore is planned and counted in FP8 bytes, and the tokens are the FP8 reference's."""
    from eep.fp8 import Fp8Weight
    from eep.repair import expert_weight_nbytes
    from eep.runtime.engines.gpu import fp8_scale_block
    from weights_tools import ExpertStore

    model, shard_dir = fp8_shards
    cfg = RuntimeConfig(num_ranks=1, slots_per_rank=model.num_experts, num_redundant=0, max_tokens_per_rank=16,
                        model=model, shard_dir=shard_dir, engine="local",
                        engine_options={"device": "cpu", "expert_backend": "loop", "tiers": ["disk"]})
    nbytes = expert_weight_nbytes(model.hidden, model.intermediate, fp8=True)
    assert RepairRules(cfg).expert_nbytes == nbytes < expert_weight_nbytes(model.hidden, model.intermediate) // 1.9
    engine = make_engine(cfg, 0, shm_path="", store=None, run_id="t", incarnation=0)
    store = ExpertStore(shard_dir)
    try:
        assert engine.is_fp8 and isinstance(engine.slots.w13, Fp8Weight)
        plan = RepairRules(cfg).preload(None, 0)
        part = PlanPart(plan.epoch, plan.placement, [True], plan.transfers_to(0))
        report = engine.execute(part)
        assert report.by_tier(part.transfers)["disk"]["nbytes"] == model.num_layers * model.num_experts * nbytes
        phys = int(plan.placement.logical_to_phys[1, 5, 0])
        for got, want in zip(engine.slots.views(1, phys), store.load_expert(store.moe_layers[1], 5)):
            assert torch.equal(got.weight.view(torch.uint8), want.weight.view(torch.uint8))
            assert torch.equal(got.scale, want.scale)
        engine.warmup()
        engine.on_commit(active=[True], joined=[0], epoch=0, start_step=0, is_joiner=True)
        tokens = torch.randperm(model.vocab_size, generator=torch.Generator().manual_seed(9))[:13]
        got = engine.decode(tokens, active=[True], placement=plan.placement, epoch=0, step=0, timeout_s=1.0)
        block = fp8_scale_block("local", model.hidden)
        want, margin, gap = reference_next_tokens(model, bench_weights(model),
                                                  lambda layer, e: store.load_expert(store.moe_layers[layer], e),
                                                  tokens.tolist(), fp8_scale_block=block)
        assert block == 128 and fp8_scale_block("fused", model.hidden) == model.hidden  # the fused buffer: per row
        # the torch FP8 stage computes the reference's arithmetic: only float32 order differs
        wrong = [(g, w, m, r) for g, w, m, r in zip(got, want, margin, gap) if g != w]
        assert all(m < 1e-3 or r < 1e-3 for _, _, m, r in wrong) and len(wrong) <= 1, wrong
        # a poisoned slot (weights and scales NaN) that a route reads is refused loudly at the next layer's router
        from eep.errors import RoutingError
        engine.slots.poison(0, int(plan.placement.logical_to_phys[0, 0, 0]))
        with pytest.raises(RoutingError, match="NaN"):
            engine.decode(torch.arange(model.vocab_size)[:16], active=[True], placement=plan.placement, epoch=0,
                          step=1, timeout_s=1.0)
    finally:
        store.close()
        engine.close()


def test_shm_engine_refuses_fp8_shards_and_the_fp8_dry_run_picks_gpu_engine(fp8_shards):
    model, shard_dir = fp8_shards
    from eep.runtime.model import generate_weights
    with pytest.raises(ValueError, match="block-scaled FP8 experts; the shm engine serves float32"):
        generate_weights(model, shard_dir=shard_dir)
    args = failure_bench.parse_args(["--dry-run", "--fp8"])
    assert args.engines == ["cpu_elastic"] and args.failure_engine == "cpu_elastic"
    assert (failure_bench.model_config(args).hidden, failure_bench.model_config(args).intermediate) == (128, 128)
    for bad in (["--dry-run", "--fp8", "--engines", "shm"], ["--dry-run", "--fp8", "--failure-engine", "shm"]):
        with pytest.raises(SystemExit):
            failure_bench.parse_args(bad)
    with pytest.raises(ValueError, match="multiples of 128"):
        failure_bench.write_random_checkpoint("/nonexistent", TinyConfig(), fp8=True)


def test_gpu_engine_refuses_a_partial_membership_without_awareness(small_shards):
    model, shard_dir = small_shards
    cfg = RuntimeConfig(num_ranks=1, slots_per_rank=model.num_experts, num_redundant=0, max_tokens_per_rank=4,
                        model=model, shard_dir=shard_dir, engine="local",
                        engine_options={"device": "cpu", "expert_backend": "loop", "tiers": ["disk"],
                                        "max_replicas": 1})
    engine = make_engine(cfg, 0, shm_path="", store=None, run_id="t", incarnation=0)
    wide = ExpertPlacement.build(model.num_layers, model.num_experts, 2, model.num_experts, num_redundant=4)
    with pytest.raises(RuntimeError, match="max_replicas=1"):
        engine._write_table(wide)
    with pytest.raises(ValueError, match="capacity of 4 per step"):
        engine.decode(torch.arange(5), active=[True], placement=wide, epoch=0, step=0, timeout_s=1.0)
    engine.close()


def test_make_engine_names_an_unknown_engine():
    assert "shm" in ENGINES
    with pytest.raises(ValueError, match="'warp'"):
        make_engine(RuntimeConfig(engine="warp"), 0, shm_path="", store=None, run_id="t", incarnation=0)
    assert ShmEngine  # the CPU engine is the default
    assert RuntimeConfig.from_dict(RuntimeConfig(engine="fused", engine_options={"a": 1}).to_dict()).engine_options == {"a": 1}


# ---- metrics ----------------------------------------------------------------------------------

def _write(path, records):
    with open(path, "w") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")


def test_steady_state_and_breakdown_from_synthetic_timelines(tmp_path):
    t0 = 1000.0
    launcher = [{"t": t0, "rank": None, "incarnation": None, "event": "launch"},
                {"t": t0 + 0.5, "rank": None, "incarnation": None, "event": "commit", "epoch": 0, "reason": "start",
                 "failed": [], "joined": [0, 1]},
                {"t": t0 + 2.0, "rank": None, "incarnation": None, "event": "fault", "action": "kill", "target": 1},
                {"t": t0 + 2.01, "rank": None, "incarnation": None, "event": "exit", "target": 1},
                {"t": t0 + 2.02, "rank": None, "incarnation": None, "event": "prepare", "epoch": 1},
                {"t": t0 + 2.05, "rank": None, "incarnation": None, "event": "commit", "epoch": 1, "reason": "exit",
                 "failed": [1], "joined": []}]
    _write(tmp_path / "launcher.jsonl", launcher)
    rank0 = [{"t": t0 + 0.5 + 0.1 * i, "rank": 0, "incarnation": 0, "step": i, "epoch": 0, "tokens": 4}
             for i in range(15)]  # last at t0 + 1.9
    rank0.append({"t": t0 + 2.06, "rank": 0, "incarnation": 0, "event": "commit", "epoch": 1, "was": "paused",
                  "plan_s": 0.001, "restore_s": 0.02, "switch_s": 0.002,
                  "restore_by_tier": {"by_tier": {"host": {"experts": 3, "nbytes": 300, "seconds": 0.02}}}})
    rank0 += [{"t": t0 + 2.2 + 0.1 * i, "rank": 0, "incarnation": 0, "step": 15 + i, "epoch": 1, "tokens": 4}
              for i in range(5)]
    _write(tmp_path / "rank0-0.jsonl", rank0)
    steady = bench_metrics.steady_state(tmp_path, skip_s=0.0)
    assert steady["step_p50_ms"] == pytest.approx(100.0)
    assert steady["step_p99_ms"] == pytest.approx(100.0)  # the epoch change gap is not a step
    assert steady["tokens"] == 80
    [b] = bench_metrics.pause_breakdown(tmp_path)
    assert b["kind"] == "repair" and b["failed"] == [1]
    assert b["detection_s"] == pytest.approx(0.01)
    assert b["agreement_s"] == pytest.approx(0.03)
    assert b["repair_transfers_s"] == pytest.approx(0.02)
    assert b["table_switch_s"] == pytest.approx(0.003)
    assert b["warmup_s"] == pytest.approx(0.14)
    assert b["survivor_pause_s"] == pytest.approx(0.3)
    assert b["repair_by_tier"]["host"]["experts"] == 3
    up = bench_metrics.startup(tmp_path, t0 - 1.0)
    assert up["first_token_s"] == pytest.approx(1.5)
    assert bench_metrics.percentile([3.0, 1.0, 2.0], 50) == 2.0
    assert bench_metrics.percentile([], 50) is None


def _steady_ranks(t_from: float, t_to: float, ranks: list[int], tokens: int, epoch: int, step_s: float = 0.025):
    out = []
    for r in ranks:
        t, i = t_from, 0
        while t < t_to:
            out.append({"t": t, "rank": r, "incarnation": 0, "step": i, "epoch": epoch, "tokens": tokens})
            t, i = t + step_s, i + 1
    return out


@pytest.mark.parametrize("survivor_tokens,recovers_before_rejoin", [(128, False), (144, False), (160, True)])
def test_time_to_95pct_uses_the_pre_fault_mean_and_a_one_second_window(tmp_path, survivor_tokens,
                                                                       recovers_before_rejoin):
    """4 ranks x 128 tokens per 25 ms step, rank 1 killed at 6 s, back at 15 s; the 3 survivors then run
    ``survivor_tokens`` each. A dip just before the fault (one rank idle for 0.4 s) puts the 2 s pre-fault
    mean at 95% of full speed: 3 x 160 tokens (99% of that mean) count as recovered, 3 x 144 (88%) do not
    (a 0.5 s baseline would have put the bar at 76% of full speed, and let 144 pass)."""
    t0 = 1000.0
    launcher = [{"t": t0, "event": "launch"},
                {"t": t0 + 6.0, "event": "fault", "action": "kill", "target": 1},
                {"t": t0 + 6.3, "event": "commit", "epoch": 1, "reason": "exit", "failed": [1], "joined": []},
                {"t": t0 + 15.0, "event": "commit", "epoch": 2, "reason": "join", "failed": [], "joined": [1]}]
    steps = _steady_ranks(t0, t0 + 5.6, [0, 1, 2, 3], 128, 0) + _steady_ranks(t0 + 5.6, t0 + 6.0, [0, 2, 3], 128, 0)
    steps += _steady_ranks(t0 + 6.4, t0 + 15.0, [0, 2, 3], survivor_tokens, 1)
    steps += _steady_ranks(t0 + 15.1, t0 + 20.0, [0, 1, 2, 3], 128, 2)
    _write(tmp_path / "launcher.jsonl", launcher)
    for r in range(4):
        _write(tmp_path / f"rank{r}-0.jsonl", [s for s in steps if s["rank"] == r])
    [fault] = summarize(tmp_path)["faults"]
    full = 4 * 128 / 0.025
    assert fault["pre_fault_tokens_per_s"] == pytest.approx(full * (1 - 0.25 * 0.4 / 2.0), rel=0.02)
    assert fault["degraded_fraction"] == pytest.approx(3 * survivor_tokens / (4 * 128) / (1 - 0.05), rel=0.03)
    if recovers_before_rejoin:
        assert 1.0 <= fault["time_to_95pct_s"] <= 1.6  # repair at +0.3 s, steps from +0.4 s, a 1 s window
    else:
        assert fault["time_to_95pct_s"] >= 9.0  # only once all four ranks serve again


# ---- the script -------------------------------------------------------------------------------

def test_arguments_are_checked_and_defaulted():
    args = failure_bench.parse_args(["--gpus", "4"])
    assert args.layers == 48 and args.max_tokens == 128 and args.engines == list(failure_bench.GPU_ENGINES)
    assert failure_bench.parse_args(["--dry-run"]).engines == ["shm"]
    for bad in (["--gpus", "1"], ["--kill-rank", "4"], ["--dry-run", "--engines", "fused"], ["--engines", "shm"]):
        with pytest.raises(SystemExit):
            failure_bench.parse_args(bad)


def test_pin_policy_spares_a_restarted_rank_the_registration():
    from eep.runtime.engines.gpu import host_tier_pin

    assert [host_tier_pin("first_start", inc) for inc in (0, 1, 5)] == [None, False, False]
    assert [host_tier_pin(p, 3) for p in (None, True, False)] == [None, True, False]
    with pytest.raises(ValueError, match="pin_host_tier='sometimes'"):
        host_tier_pin("sometimes", 0)
    args = failure_bench.parse_args(["--dry-run", "--pin", "first-start"])
    opts = failure_bench.runtime_config(args, "fused", "/nonexistent", num_requests=1).engine_options
    assert opts["pin_host_tier"] == "first_start"
    with pytest.raises(SystemExit):
        failure_bench.parse_args(["--pin", "sometimes"])


@pytest.mark.parametrize("num_ranks", [2, 4, 8])
def test_redundancy_leaves_room_for_any_single_failure(num_ranks):
    from eep.state import repair_coverage
    slots, red = failure_bench.redundancy(128, num_ranks)
    placement = ExpertPlacement.build(2, 128, num_ranks, slots, num_redundant=red)
    for dead in range(num_ranks):
        after = Membership(num_ranks, active=[r != dead for r in range(num_ranks)], epoch=1)
        repair_coverage(placement, after)  # raises when the survivors cannot hold every expert


def test_dry_run_end_to_end(tmp_path):
    results = failure_bench.main(["--dry-run", "--gpus", "4", "--out", str(tmp_path)])
    f = results["failure"]
    assert f["requests_lost"] == 0 and f["mismatched"] == 0, f
    assert not f["timed_out"]
    assert f["recovery_pause_s"] is not None and f["recovery_pause_s"] > 0
    assert f["reintegration_pause_s"] is not None
    kinds = [b["kind"] for b in f["breakdown"]]
    assert kinds == ["repair", "rejoin"], kinds
    assert f["breakdown"][0]["detection_s"] >= 0
    assert f["predicted"]["repair_experts"] > 0
    assert results["steady"]["shm"]["tokens_per_s"] > 0
    assert results["restart"]["returncode"] == 0 and results["restart"]["first_token_s"] > 0
    for name in ("results.json", "summary.txt", "timeline.png"):
        assert (tmp_path / name).stat().st_size > 0
    assert (tmp_path / "timeline.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_fp8_dry_run_survives_a_sigkill_with_the_fp8_oracles_answers(tmp_path):
    """--fp8 end to end on CPU: FP8 shards and host tier, GpuEngine's CPU path (FP8 slots, FP8 shm
    dispatch, the torch FP8 stage), a SIGKILL, repair, re-replication and rejoin from peers' FP8 slots:
    0 lost, 0 refused, 0 changed, and the FP8 oracle agrees on every token it decides."""
    from eep.repair import expert_weight_nbytes
    import repair_summary

    results = failure_bench.main(["--dry-run", "--fp8", "--gpus", "3", "--extra-slots", "2", "--fault-at-s", "1.0",
                                  "--after-fault-s", "2.5", "--no-aa", "--skip", "restart", "--out", str(tmp_path)])
    assert results["config"]["experts"] == "fp8" and not results.get("errors"), results.get("errors")
    f = results["failure"]
    assert f["engine"] == "cpu_elastic" and not f["timed_out"], f
    assert f["requests_lost"] == 0 and f["requests_refused"] == 0 and f["mismatched"] == 0, f
    assert f["oracle_experts"] == "fp8" and f["oracle_decided"] > 0 and f["oracle_disagreements"] == 0, f
    assert f["golden_tokens"] > 0 and f["answers_checked"]
    model = results["config"]["model"]
    restored = f["breakdown"][0]["repair_by_tier"]["host"]
    assert restored["nbytes"] == restored["experts"] * expert_weight_nbytes(model["hidden"], model["intermediate"],
                                                                            fp8=True)
    phases = {p["phase"] for c in f["phases"] for p in c["phases"]}
    assert {"orphan-restore", "re-replication", "reintegration"} <= phases, f["phases"]
    assert repair_summary.main([str(tmp_path.parent), tmp_path.name]) == 0


def test_repair_summary_fails_loudly(tmp_path, capsys):
    import repair_summary

    good = {"config": {"experts": "fp8"}, "failure": {"requests_lost": 0, "requests_refused": 0, "mismatched": 0,
                                                      "oracle_disagreements": 0, "oracle_decided": 9}}
    for name, failure in (("good", {}), ("refused", {"requests_refused": 3}), ("oracle", {"oracle_disagreements": 1}),
                          ("unchecked", {"mismatched": None})):
        (tmp_path / name).mkdir()
        (tmp_path / name / "results.json").write_text(json.dumps({**good, "failure": {**good["failure"], **failure}}))
    assert repair_summary.main([str(tmp_path), "good"]) == 0
    assert "good [fp8 experts]: lost 0, refused 0" in capsys.readouterr().out
    for name, why in (("refused", "requests refused: 3"), ("oracle", "oracle disagreements: 1"),
                      ("unchecked", "answers changed: not measured"), ("missing", "no results")):
        assert repair_summary.main([str(tmp_path), "good", name]) == 1
        assert f"FAIL {name}: {why}" in capsys.readouterr().err


def test_gpu_engine_serves_through_the_launcher_over_gloo(tmp_path):
    """GpuEngine in real rank processes (the NCCL engine's code over gloo): answers equal the CPU oracle."""
    args = failure_bench.parse_args(["--dry-run", "--gpus", "2", "--engines", "gloo", "--out", str(tmp_path)])
    shards = failure_bench.prepare_shards(args, tmp_path / "work")
    try:
        cfg = failure_bench.runtime_config(args, "gloo", shards["shard_dir"], num_requests=24)
        from eep.runtime import Launcher
        result = Launcher(cfg, run_dir=tmp_path / "run").run(timeout_s=90)
        assert not result.is_timed_out and result.num_answered == 24
        got = failure_bench.check_answers(args, cfg, result)
        assert got["mismatched"] == 0 and got["inconsistent_tokens"] == 0, got
        # two layers: the oracle decides (almost) every sampled token, and every decided one must agree
        assert got["oracle_decided"] >= got["oracle_sampled"] - 1 > 0, got
        assert got["oracle_disagreements"] == 0, got
        # the exact checks can fail: a golden run that answered one token differently, and a run
        # whose answers give one token two successors
        golden, owners = failure_bench.transitions_of(cfg, result.results)
        token = max(golden, key=lambda a: len(owners[a]))
        golden[token] = {(next(iter(golden[token])) + 1) % cfg.model.vocab_size}
        off = failure_bench.check_answers(args, cfg, result, golden)
        assert off["golden_mismatched_tokens"] == 1 and off["mismatched"] == len(owners[token]), off
        q = next(iter(owners[token]))
        result.results[q] = [(t + 1) % cfg.model.vocab_size for t in result.results[q]]
        bent = failure_bench.check_answers(args, cfg, result)
        assert bent["inconsistent_tokens"] > 0 and bent["mismatched"] > 0, bent
        steady = bench_metrics.steady_state(result.run_dir, skip_s=0.0)
        assert steady["num_steps"] > 0 and steady["step_p50_ms"] > 0
    finally:
        _remove_host_tier(shards["host_tier_path"])


def test_exit_code_and_fault_trigger_validation():
    from eep.runtime import Fault
    assert failure_bench.exit_code({"steady": {}}) == 0
    assert failure_bench.exit_code({"errors": {"steady-nccl": "x"}}) == 2
    assert failure_bench.exit_code({"errors": {"failure": "x", "steady-nccl": "x"}}) == 1
    assert Fault("kill", 1, at_s=2.0).at_s == 2.0
    with pytest.raises(ValueError, match="exactly one"):
        Fault("kill", 1, at_s=2.0, at_results=3)


def test_gpu_engine_through_a_sigkill_and_rejoin_on_the_shm_transport(tmp_path):
    """GpuEngine's failure path on CPU (membership-aware shm exchange): repair, re-replication from peers'
    slots, rejoin filled from peers, 0 lost, 0 wrong; predicted vs observed per phase and replica counts."""
    args = failure_bench.parse_args(["--dry-run", "--gpus", "3", "--failure-engine", "cpu_elastic", "--extra-slots", "2",
                                     "--fault-at-s", "1.0", "--after-fault-s", "2.5", "--out", str(tmp_path)])
    shards = failure_bench.prepare_shards(args, tmp_path / "work")
    try:
        entry, run_dir, cfg = failure_bench.run_failure(args, shards["shard_dir"], tmp_path, 5000.0)
    finally:
        _remove_host_tier(shards["host_tier_path"])
    assert cfg.engine == "cpu_elastic"
    assert not entry["timed_out"], entry
    assert entry["requests_lost"] == 0 and entry["mismatched"] == 0, entry
    assert entry["oracle_decided"] > 0 and entry["oracle_disagreements"] == 0, entry  # decisive at 2 layers
    kinds = [b["kind"] for b in entry["breakdown"]]
    assert kinds[0] == "repair" and "rejoin" in kinds, entry["breakdown"]
    repair = entry["breakdown"][0]
    assert repair["repair_by_tier"], repair  # survivors restored orphans through weights_tools tiers
    assert entry["recovery_pause_s"] is not None and entry["reintegration_pause_s"] is not None
    phases = {p["phase"]: p for c in entry["phases"] for p in c["phases"]}
    assert set(phases) == {"routing-only", "orphan-restore", "re-replication", "reintegration"}, entry["phases"]
    for p in phases.values():
        assert p["predicted_s"] >= 0 and p["observed_s"] is not None and p["observed_s"] >= 0, p
    assert set(phases["orphan-restore"]["by_tier"]) == {"host"}
    assert set(phases["re-replication"]["by_tier"]) == {"peer"} and phases["re-replication"]["left_at_commit"] == 0
    assert set(phases["reintegration"]["by_tier"]) == {"peer"}  # the joiner copied survivors' replicas
    r = entry["replicas"]
    assert list(r) == ["before_fault", "after_repair", "after_rereplication", "after_rejoin"], r
    assert r["after_rereplication"]["single"] < r["after_repair"]["single"] and r["after_repair"]["uncovered"] == 0
    assert entry["rereplication_pause_s"] is not None
    text = failure_bench.summary_text({"device": "cpu", "args": vars(args), "failure": entry,
                                       "config": {"num_ranks": 3, "model": {}, "slots_per_rank": 0, "num_redundant": 0}})
    assert "re-replication" in text and "after re-replication" in text and "predicted -> observed" in text
    # the GPU script's closing summary (tests/gpu/run_repair.sh) reads the same entry
    import repair_summary
    run = repair_summary.run_summary({"failure": entry})
    assert repair_summary.is_ok(run) and run["phases"]["re-replication"]["copies"] > 0
    lines = repair_summary.summary_lines({"disk-tier": run, "shm-tier": run})
    assert lines[-1].startswith("host tier on local disk vs /dev/shm: orphan restores 1.00x"), lines
    assert not repair_summary.is_ok({**run, "changed": 1})
    assert not repair_summary.is_ok({**run, "refused": 2}) and not repair_summary.is_ok({**run, "oracle_disagreements": 1})


def test_survivors_absorb_the_missing_ranks_batch_then_give_it_back(tmp_path):
    """degraded_tokens_per_rank: while a rank is out, survivors take more tokens per step (the
    engine's second batch size), then drain back to max_tokens_per_rank after the rejoin."""
    from eep.runtime import RuntimeConfig
    from eep.runtime.control.metrics import load_run

    cfg = RuntimeConfig(num_ranks=3, max_tokens_per_rank=8, degraded_tokens_per_rank=12)
    assert cfg.token_capacity == 12 and cfg.batch_limit([True] * 3) == 8 and cfg.batch_limit([True, False, True]) == 12
    assert RuntimeConfig(max_tokens_per_rank=8, degraded_tokens_per_rank=4).token_capacity == 8
    args = failure_bench.parse_args(["--dry-run", "--gpus", "3", "--failure-engine", "cpu_elastic",
                                     "--degraded-tokens", "-1", "--fault-at-s", "1.0", "--after-fault-s", "2.5",
                                     "--out", str(tmp_path)])
    assert args.degraded_tokens == 16  # ceil(8 * 3 / 2) = 12, rounded up to 16
    shards = failure_bench.prepare_shards(args, tmp_path / "work")
    try:
        entry, run_dir, cfg = failure_bench.run_failure(args, shards["shard_dir"], tmp_path, 5000.0)
    finally:
        _remove_host_tier(shards["host_tier_path"])
    assert not entry["timed_out"] and entry["requests_lost"] == 0 and entry["mismatched"] == 0, entry
    assert entry["oracle_disagreements"] == 0, entry
    launcher, ranks = load_run(run_dir)
    commits = [e for e in launcher if e.get("event") == "commit" and e.get("reason") != "start"]
    degraded_epoch = next(e["epoch"] for e in commits if e.get("failed"))
    rejoin_epoch = next(e["epoch"] for e in commits if e.get("joined"))
    steps = [r for r in ranks if "step" in r and "event" not in r]
    during = [s["tokens"] for s in steps if degraded_epoch <= s["epoch"] < rejoin_epoch]
    assert max(during) > args.max_tokens, f"survivors never took more than {args.max_tokens} tokens: {max(during)}"
    assert max(s["tokens"] for s in steps) <= args.degraded_tokens
    assert all(s["tokens"] <= args.max_tokens for s in steps if s["epoch"] < degraded_epoch)


def test_variants_are_validated_and_override_only_their_knobs():
    args = failure_bench.parse_args(["--gpus", "4", "--expert-backend", "cutlass", "--degraded-tokens", "224",
                                     "--variants", "absorb,grouped_mm,no-absorb"])
    assert args.variants == ["absorb", "grouped_mm", "no-absorb"] and args.degraded_tokens == 224
    absorb = failure_bench.variant_args(args, "absorb")
    assert (absorb.degraded_tokens, absorb.expert_backend) == (176, "cutlass")  # ceil(128 * 4 / 3) = 171 -> 176
    old = failure_bench.variant_args(args, "grouped_mm")
    assert (old.degraded_tokens, old.expert_backend) == (0, "grouped_mm")
    assert failure_bench.VARIANTS["no-absorb"][1] == ("steady",)  # no failure run of its own
    assert (args.degraded_tokens, args.expert_backend) == (224, "cutlass")  # the base run's arguments are untouched
    with pytest.raises(SystemExit):
        failure_bench.parse_args(["--variants", "warp-speed"])
