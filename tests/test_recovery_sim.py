"""The recovery simulator drives the real planner; at small sizes it runs in CI."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "perf"))
import recovery_sim  # noqa: E402
from recovery_sim import SimConfig, simulate  # noqa: E402


def test_simulation_is_deterministic_and_splits_the_pause_into_phases():
    config = SimConfig(shape="qwen3-30b-a3b", ep=16, failed="1", redundancy=0.5)
    a, b = simulate(config), simulate(config)
    assert a == b and a["feasible"]
    assert a["recovery_pause_s"] == pytest.approx(sum(a["phases"].values()))
    assert a["phases"]["detection_s"] == config.detection_s
    assert a["restore_bytes_by_tier"] == {"host": a["experts_lost_all_replicas"] * 3 * 2048 * 768 * 2}


def test_disk_only_restores_are_slower_than_host():
    host = simulate(SimConfig(shape="qwen3-30b-a3b", ep=16, failed="2", redundancy=0.5))
    disk = simulate(SimConfig(shape="qwen3-30b-a3b", ep=16, failed="2", redundancy=0.5, use_host_tier=False))
    assert set(disk["restore_bytes_by_tier"]) == {"disk"}
    assert disk["phases"]["transfers_s"] > host["phases"]["transfers_s"]


def test_node_aware_packing_survives_a_node_loss_with_fewer_orphans():
    aware = simulate(SimConfig(shape="tiny", ep=16, failed="node", redundancy=1.0, gpus_per_node=4))
    naive = simulate(SimConfig(shape="tiny", ep=16, failed="node", redundancy=1.0, gpus_per_node=4,
                               node_aware=False))
    assert aware["feasible"] and naive["feasible"]
    assert aware["experts_lost_all_replicas"] < naive["experts_lost_all_replicas"]


def test_too_few_slots_is_reported_not_raised():
    row = simulate(SimConfig(shape="qwen3-30b-a3b", ep=8, failed="2", redundancy=0.125))
    assert not row["feasible"] and "more slots are needed" in row["reason"]


def test_small_sweep_and_table():
    rows = recovery_sim.sweep(shapes=("tiny",), eps=(8, 16), failures=("1", "2", "node"), redundancies=(0.5,),
                              gpus_per_node=4)
    assert rows and all("config" in r for r in rows)
    table = recovery_sim.format_table(rows)
    assert table.count("\n") == len(rows) + 1


def test_calibration_rows_put_the_benchmark_next_to_the_simulator():
    """The recorded 4xH100 failure benchmark, simulated with its own shape, EP, slots and detection."""
    import json
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "perf" / "failure_bench_4xH100" / "results-run2.json"
    predicted, observed = recovery_sim.calibration_rows(json.loads(path.read_text()))
    assert predicted["config"]["ep"] == 4 and predicted["slots_per_rank"] == 48
    assert predicted["phases"]["detection_s"] == observed["phases"]["detection_s"] > 0
    assert 0 < predicted["phases"]["transfers_s"] < observed["phases"]["transfers_s"]
    assert observed["experts_lost_all_replicas_per_layer"] == 24
    table = recovery_sim.format_table([predicted, observed])
    assert table.count("\n") == 3 and "observed" in table


def test_fp8_option_moves_weights_and_their_block_scales():
    """Block-scaled FP8 experts: one byte per weight plus a float32 scale per 128x128 block."""
    from eep.repair import expert_weight_nbytes

    hidden, inter = 2048, 768
    fp8 = expert_weight_nbytes(hidden, inter, fp8=True)
    assert fp8 == 3 * hidden * inter + 4 * 3 * (768 // 128) * (2048 // 128)
    assert expert_weight_nbytes(hidden, inter) == 3 * hidden * inter * 2
    assert expert_weight_nbytes(100, 130, fp8=True) == 3 * 100 * 130 + 4 * 3 * 2 * 1  # partial blocks count
    base = SimConfig(shape="qwen3-30b-a3b", ep=16, failed="2", redundancy=0.5)
    bf16, as_fp8 = simulate(base), simulate(SimConfig(**{**base.__dict__, "dtype": "fp8"}))
    experts = bf16["experts_lost_all_replicas"]
    assert as_fp8["experts_lost_all_replicas"] == experts
    assert as_fp8["restore_bytes_by_tier"] == {"host": experts * fp8}
    assert as_fp8["phases"]["transfers_s"] < bf16["phases"]["transfers_s"]
    native = simulate(SimConfig(shape="deepseek-v3", ep=32, failed="1", redundancy=0.5))
    per_expert = expert_weight_nbytes(7168, 2048, fp8=True)
    assert sum(native["restore_bytes_by_tier"].values()) == native["experts_lost_all_replicas"] * per_expert
    with pytest.raises(ValueError, match="SimConfig.dtype"):
        simulate(SimConfig(dtype="int4"))
