"""``eep demo``: the in-process reference demo, then the real thing with processes and SIGKILL.

Part 1 (skip with ``--skip-reference``) is ``eep.demo``: 4 simulated ranks in one process.
Part 2 starts 4 rank processes under the launcher, serves the tiny model, SIGKILLs one rank a
third of the way through, restarts it, lets it rejoin, then prints the recovery summary and the
validity checks and writes a PNG timeline.
"""

from __future__ import annotations

import argparse
import logging
import tempfile
from pathlib import Path

from eep.cli.answers import check_run
from eep.runtime.config import RuntimeConfig
from eep.runtime.control.launcher import Fault, Launcher
from eep.runtime.control.metrics import load_run, throughput_series
from eep.cli.plot import plot_timeline


def run_runtime_demo(*, num_ranks: int = 4, kill_rank: int = 1, num_requests: int = 1200,
                     restart_after_s: float = 0.5, out_dir: str | None = None) -> bool:
    cfg = RuntimeConfig(num_ranks=num_ranks, num_requests=num_requests, heartbeat_interval_s=0.05, suspect_misses=5,
                        transport_timeout_s=1.0, restart_after_s=restart_after_s)
    out = Path(out_dir) if out_dir else Path(tempfile.mkdtemp(prefix="eep-demo-"))
    print(f"\n=== eep runtime: {num_ranks} rank processes, shared-memory transport, TCPStore control plane ===")
    print(f"tiny model (hidden {cfg.model.hidden}, {cfg.model.num_experts} experts, top-{cfg.model.top_k}, "
          f"{cfg.model.num_layers} layers), {num_requests} requests; SIGKILL rank {kill_rank} after "
          f"{num_requests // 3} answers, restart after {restart_after_s} s")
    result = Launcher(cfg, run_dir=out, faults=[Fault("kill", kill_rank, at_results=num_requests // 3)]).run(timeout_s=90)

    print("\ndecisions:")
    for d in result.decisions:
        print(f"  epoch {d['epoch']}: {d['reason']:<9} active={[r for r, a in enumerate(d['active']) if a]} "
              f"failed={d['failed']} joined={sorted(int(r) for r in d['joined'])} start_step={d['start_step']} "
              f"requeued={sum(len(q) for q in d['requeue'].values())}")
    s = result.summary
    print(f"\nsummary: {s['num_tokens']} tokens in {s['duration_s']:.2f} s ({s['mean_tokens_per_s']:.0f} tokens/s)")
    for f in s["faults"]:
        print(f"  fault ({f['action']} rank {f['rank']}) at {f['t_s']:.2f} s: detected+repaired in "
              f"{_ms(f.get('detect_and_repair_s'))}, recovery pause {_ms(f.get('recovery_pause_s'))}, "
              f"back to 95% of pre-fault throughput ({f['pre_fault_tokens_per_s']:.0f} tokens/s) in "
              f"{_ms(f.get('time_to_95pct_s'))}")
    for j in s["rejoins"]:
        print(f"  rank(s) {j['ranks']} rejoined at {j['t_s']:.2f} s: reintegration pause {_ms(j['reintegration_pause_s'])}")

    problems = check_run(cfg, result)
    print("\nvalidity checks:")
    print(f"  answered: {result.num_answered}/{num_requests} (each written once by compare-and-set)")
    print(f"  outputs equal to the single-process reference, token by token: "
          f"{'yes' if not any('differ' in p for p in problems) else 'NO'}")
    print(f"  final membership EP-valid: {'yes' if not any('EP INVALID' in p or 'no membership' in p for p in problems) else 'NO'}")
    for p in problems:
        print(f"  PROBLEM: {p}")

    png = out / "timeline.png"
    launcher, ranks = load_run(out)
    steps = [r for r in ranks if "step" in r and "event" not in r]
    t0 = min(r["t"] for r in steps)
    t1 = max(r["t"] for r in steps)
    series = throughput_series(steps, t0, t1, 0.1)
    markers = [(e["t"] - t0, "fault") for e in launcher if e.get("event") == "fault"]
    markers += [(e["t"] - t0, "rejoin" if e["reason"] == "join" else "repair") for e in launcher
                if e.get("event") == "commit" and e["reason"] != "start"]
    t_max, y_max = plot_timeline(png, series, markers)
    print(f"\ntimeline: {png} (x: 0..{t_max:.1f} s, y: 0..{y_max:.0f} tokens/s; "
          "red = SIGKILL, orange = repair committed, green = rejoin)")
    print(f"per-rank JSONL timelines and summary.json in {out}")
    ok = not problems and not result.is_timed_out
    print("\nRESULT:", "survived SIGKILL, restart and rejoin with outputs unchanged" if ok else "FAILED")
    return ok


def _ms(seconds: float | None) -> str:
    return "n/a" if seconds is None else f"{seconds * 1000:.0f} ms"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="eep demo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--skip-reference", action="store_true", help="skip part 1 (in-process reference demo)")
    parser.add_argument("--reference-only", action="store_true", help="run only part 1")
    parser.add_argument("--ranks", type=int, default=4)
    parser.add_argument("--kill-rank", type=int, default=1)
    parser.add_argument("--requests", type=int, default=1200)
    parser.add_argument("--restart-after", type=float, default=0.5)
    parser.add_argument("--out", default=None, help="directory for timelines and the PNG (default: a temp dir)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.ERROR, format="%(name)s %(levelname)s %(message)s")
    ok = True
    if not args.skip_reference:
        from eep.cli.simulated_demo import run_demo
        ok = run_demo(failed_rank=args.kill_rank)
        if args.reference_only:
            return 0 if ok else 1
    ok &= run_runtime_demo(num_ranks=args.ranks, kill_rank=args.kill_rank, num_requests=args.requests,
                           restart_after_s=args.restart_after, out_dir=args.out)
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
