"""GPU tests of the fused data plane (on a machine with GPUs; skipped without them).

Each test starts one process per rank through tests/gpu/launch.py (never torchrun) and fails
with the ranks' own error messages. tests/gpu/run_all.sh runs the same scenarios plus the
benchmarks in one script.
"""

import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "gpu"))

pytestmark = [pytest.mark.gpu, pytest.mark.slow]


def _need(num_gpus: int) -> None:
    if not torch.cuda.is_available() or torch.cuda.device_count() < num_gpus:
        pytest.skip(f"needs {num_gpus} GPUs")


def _run(scenario, num_ranks, tmp_path, *extra):
    from launch import run_scenario
    _need(num_ranks)
    results = run_scenario(scenario, num_ranks, str(tmp_path), extra=list(extra))
    errors = [e for r in results for e in r["errors"]]
    assert not errors, "\n".join(errors[:10])
    return results


@pytest.mark.parametrize("num_ranks", [2, 4])
def test_differential_against_reference(num_ranks, tmp_path):
    _run("diff", num_ranks, tmp_path, "--hidden", "2048", "--slots", "8", "--max-tokens", "128")


def test_differential_fixed_membership_variant(tmp_path):
    _run("diff", 4, tmp_path, "--hidden", "2048", "--slots", "8", "--max-tokens", "128", "--fixed")


def test_differential_deepseek_hidden(tmp_path):
    _run("diff", 4, tmp_path, "--hidden", "7168", "--slots", "4", "--max-tokens", "64")


@pytest.mark.parametrize("num_ranks", [2, 4])
def test_differential_fp8_dispatch(num_ranks, tmp_path):
    # experts = ranks * slots / 2 (tests/gpu/fused_cases.py) must reach top-8: 2 ranks need 8 slots
    slots = str(16 // num_ranks)
    _run("diff", num_ranks, tmp_path, "--hidden", "7168", "--slots", slots, "--max-tokens", "64", "--fp8")


def test_graph_replay_across_mask_and_rejoin(tmp_path):
    _run("graph", 4, tmp_path, "--hidden", "2048", "--slots", "8", "--max-tokens", "64")


def test_sigkilled_peer_costs_at_most_the_timeout(tmp_path):
    results = _run("kill", 4, tmp_path, "--hidden", "2048", "--slots", "8", "--max-tokens", "64", "--timeout-s", "0.5")
    for r in results:
        assert r["status"]["miss_count"][3] >= 1


@pytest.mark.parametrize("extra", [("--hidden", "2048", "--slots", "8", "--max-tokens", "128"),
                                   ("--hidden", "7168", "--slots", "4", "--max-tokens", "64", "--fp8")])
def test_differential_decode_pull_variant(extra, tmp_path):
    """The experimental decode kernels (FusedBuffer(decode="pull")) against the same reference."""
    _run("diff", 4, tmp_path, *extra, "--decode-variant", "pull")


@pytest.mark.parametrize("scenario,max_tokens", [("late", "64"), ("late_prefill", "256")])
def test_a_late_source_gets_zeros_not_stale_rows(scenario, max_tokens, tmp_path):
    _run(scenario, 4, tmp_path, "--hidden", "2048", "--slots", "8", "--max-tokens", max_tokens, "--timeout-s", "0.5")


@pytest.mark.parametrize("extra", [("--hidden", "2048", "--slots", "8", "--max-tokens", "128"),
                                   ("--hidden", "7168", "--slots", "4", "--max-tokens", "64", "--fp8")])
def test_differential_kernel_set_v2(extra, tmp_path):
    """Kernel set v2 (FusedBuffer(kernels="v2")) against the same reference, masked rank included."""
    _run("diff", 4, tmp_path, *extra, "--kernels", "v2")


@pytest.mark.parametrize("scenario,extra", [("prefill", ("--max-tokens", "256")), ("graph", ("--max-tokens", "64")),
                                            ("late", ("--max-tokens", "64", "--timeout-s", "0.5")),
                                            ("late_prefill", ("--max-tokens", "256", "--timeout-s", "0.5"))])
def test_kernel_set_v2_scenarios(scenario, extra, tmp_path):
    _run(scenario, 4, tmp_path, "--hidden", "2048", "--slots", "8", *extra, "--kernels", "v2")
