"""The EP benchmarks' summaries (perf/bench_dispatch.py, perf/bench_prefill.py) on synthetic per-rank
medians, no GPU: the slowest rank is reported, combine = both - dispatch, ratios and A/A are formed from
the same rows, and every kernel set gets a table row."""

import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "perf"))
import bench_dispatch  # noqa: E402
import bench_prefill  # noqa: E402
import ep_bench  # noqa: E402


def _decode_rank(scale: float) -> dict[str, float]:
    med = {"nccl_a2a": 60.0 * scale}
    for k, base in (("v1", 50.0), ("v2", 20.0)):
        med.update({f"{k}.aware_both": base * scale, f"{k}.aware_both_again": base * scale * 1.01,
                    f"{k}.aware_both_recaptured": base * scale * 1.03,
                    f"{k}.fixed_both_recaptured": base * scale * 1.03 / 1.02,
                    f"{k}.aware2_both": base * scale * 1.015,
                    f"{k}.aware_dispatch": base * scale / 2, f"{k}.fixed_both": base * scale / 1.02,
                    f"{k}.fixed_dispatch": base * scale / 2, f"{k}.empty_both": base * scale / 3,
                    f"{k}.empty_dispatch": base * scale / 6})
    return med


def test_dispatch_summary_reports_the_slowest_rank_and_every_set():
    us, ratios, rows = bench_dispatch.summarize([_decode_rank(1.0), _decode_rank(1.1)], ["v1", "v2"])
    # "both" is the mean of the two captures' medians: (55 + 56.65) / 2 at the slowest rank
    assert us["v1"]["aware_both"] == pytest.approx(55.825, abs=1e-3)
    assert us["v1"]["aware_both_first_capture"] == pytest.approx(55.0) and us["baseline"]["nccl_a2a"] == pytest.approx(66.0)
    assert us["v2"]["aware_combine"] == pytest.approx(22.33 - 11.0, abs=1e-3)
    assert us["v2"]["aware_over_fixed"] == pytest.approx(1.02, abs=1e-4)
    assert us["v2"]["aa"] == pytest.approx(1.01) and us["v2"]["aa_recaptured"] == pytest.approx(1.03)
    assert us["v2"]["aa_module"] == pytest.approx(1.015)
    assert ratios["v2_over_v1"]["aware_both"] == pytest.approx(0.4, abs=1e-4)
    assert [r[0] for r in rows] == ["v1", "v2"] and all(len(r) == len(bench_dispatch.TABLE_HEADER) for r in rows)


def test_prefill_summary_counts_gbps_over_the_fewest_received_bytes():
    def rank(scale, nbytes):
        med = {"recv_bytes": nbytes, "symm_bytes": 0, "nccl_dispatch": 40e-6, "nccl_combine": 40e-6, "copy": 30e-6}
        for k in ("v1", "v2"):
            med.update({f"{k}.aware_both": 100e-6 * scale, f"{k}.aware_both_again": 100e-6 * scale,
                        f"{k}.aware_dispatch": 50e-6 * scale, f"{k}.fixed_both": 100e-6 * scale,
                        f"{k}.fixed_dispatch": 50e-6 * scale})
        med.update({"v1.aware_both_spread": 90e-6 * scale, "v1.fixed_both_spread": 90e-6 * scale})
        return med

    paths = {"v1": ["push", "spread"], "v2": ["push"]}
    us, gbps, rows, nbytes = bench_prefill.summarize([rank(1.0, 60e6), rank(1.2, 58e6)], ["v1", "v2"], paths)
    assert nbytes == 58e6 and us["v1"]["aware_combine_spread"] == pytest.approx(48.0)  # 108 - 60
    assert gbps["v2"]["aware_dispatch"] == pytest.approx(round(58e6 / 60e-6 / 1e9, 1))
    assert gbps["baseline"]["copy"] == pytest.approx(round(58e6 / 30e-6 / 1e9, 1))
    assert [r[0] for r in rows] == ["v1 push", "v1 spread", "v2 push", "NCCL all_to_all_single",
                                    "device copy, same bytes"]


def test_kernel_sets_option():
    assert ep_bench.kernel_sets("v1,v2,v1") == ["v1", "v2"]
    with pytest.raises(ValueError, match="kernels"):
        ep_bench.kernel_sets("v1,v9")
    with pytest.raises(ValueError, match="kernels"):  # a launch variant only where the bench times it
        ep_bench.kernel_sets("v1,v2-pdl")
    assert ep_bench.kernel_sets("v2,v2-pdl", launch_variants=True) == ["v2", "v2-pdl"]
    assert ep_bench.set_options("v2-pdl") == {"kernels": "v2", "pdl": True}
    assert ep_bench.set_options("v2") == {"kernels": "v2", "pdl": False}
