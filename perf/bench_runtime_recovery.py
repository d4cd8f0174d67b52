"""Recovery of the CPU runtime with real processes: SIGKILL one of 4 ranks, restart, rejoin.

Runs ``--trials`` launches side by side and prints the medians of: detection + repair commit after
the SIGKILL, recovery pause on survivors, reintegration pause, time back to 95% of pre-fault
throughput, and for comparison the cold start of the whole instance (launch -> first served step),
which is what a full restart would cost at least. Not a unit test: run it by hand.

    .venv/bin/python perf/bench_runtime_recovery.py --trials 5
"""

from __future__ import annotations

import argparse
import statistics

from eep.cli.answers import check_run
from eep.runtime import Fault, Launcher, RuntimeConfig
from eep.runtime.control.metrics import load_run


def one_trial(num_requests: int) -> dict:
    cfg = RuntimeConfig(num_requests=num_requests, heartbeat_interval_s=0.05, suspect_misses=5,
                        transport_timeout_s=1.0, restart_after_s=0.5)
    result = Launcher(cfg, faults=[Fault("kill", 1, at_results=num_requests // 3)]).run(timeout_s=120)
    assert not check_run(cfg, result), "a trial produced wrong or missing answers"
    launcher, ranks = load_run(result.run_dir)
    t_launch = next(e["t"] for e in launcher if e.get("event") == "launch")
    first_step = min(r["t"] for r in ranks if "step" in r and "event" not in r)
    fault = result.summary["faults"][0]
    rejoin = result.summary["rejoins"][0] if result.summary["rejoins"] else {}
    return {"cold_start_s": first_step - t_launch, "detect_and_repair_s": fault.get("detect_and_repair_s"),
            "recovery_pause_s": fault.get("recovery_pause_s"), "time_to_95pct_s": fault.get("time_to_95pct_s"),
            "reintegration_pause_s": rejoin.get("reintegration_pause_s"),
            "tokens_per_s": result.summary["mean_tokens_per_s"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--trials", type=int, default=5)
    parser.add_argument("--requests", type=int, default=1200)
    args = parser.parse_args()
    trials = [one_trial(args.requests) for _ in range(args.trials)]
    print(f"{args.trials} trials, medians:")
    for key in trials[0]:
        values = [t[key] for t in trials if t[key] is not None]
        print(f"  {key:<22} {statistics.median(values):8.3f}   (min {min(values):.3f}, max {max(values):.3f})")
    pause = statistics.median(t["recovery_pause_s"] for t in trials)
    cold = statistics.median(t["cold_start_s"] for t in trials[1:] or trials)  # trial 0 pays the forkserver import
    print(f"  recovery pause / cold start of the instance: {pause / cold:.3f}")


if __name__ == "__main__":
    main()
