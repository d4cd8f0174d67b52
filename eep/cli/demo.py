"""``eep demo``: the in-process reference demo, then the real thing with processes and SIGKILL."""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import tempfile
import threading
import time
from pathlib import Path

from eep.cli.answers import check_faults_fired, check_run
from eep.cli.options import CliError, check_faults, int_at_least, seconds
from eep.runtime.config import RuntimeConfig
from eep.runtime.control.launcher import Fault, Launcher, RunResult

DESCRIPTION = """\
Part 1 (skip with --skip-reference): N simulated EP ranks in one process lose a rank; the
placement is repaired and every output still equals the dense oracle.
Part 2: N real rank processes serve the tiny model (CPU, shared-memory data plane; with --gpu the
fused GPU data plane and CUTLASS experts); one rank is SIGKILLed a third of the way through,
restarted, and rejoins. Prints the decisions, the recovery summary and the validity checks, and
writes timeline.png and summary.json to --out.
"""


def add_parser(commands) -> None:
    p = commands.add_parser("demo", help="watch a rank die and the instance recover",
                            description=DESCRIPTION)
    p.add_argument("--ranks", type=int_at_least(2), default=4, metavar="N", help="EP ranks (simulated in part 1, processes in part 2)")
    p.add_argument("--kill-rank", type=int_at_least(0), default=1, metavar="RANK", help="the rank that fails")
    p.add_argument("--requests", type=int_at_least(3), default=None, metavar="N",
                   help="requests served in part 2 on the CPU, the kill coming after a third are answered "
                        "(default: 1200; with --gpu the kill comes 5 s into serving and the run stops 5 s "
                        "after the rejoin)")
    p.add_argument("--restart-after", type=seconds, default=0.5, metavar="SECONDS",
                   help="restart the killed rank this long after it exits")
    p.add_argument("--out", default="eep-demo-out", metavar="DIR", help="where timeline.png and summary.json go")
    p.add_argument("--keep", action="store_true", help="also keep the per-rank JSONL timelines (in DIR/run)")
    part = p.add_mutually_exclusive_group()
    part.add_argument("--skip-reference", action="store_true", help="skip part 1 (the in-process reference demo)")
    part.add_argument("--reference-only", action="store_true", help="run only part 1")
    p.add_argument("--gpu", action="store_true",
                   help="part 2 on GPUs: fused data plane and CUTLASS experts (ranks share GPUs when "
                        "there are fewer GPUs than ranks); needs eep[cuda,cutlass] and a CUDA GPU")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    if args.kill_rank >= args.ranks:
        raise CliError(f"--kill-rank {args.kill_rank}: there is no rank {args.kill_rank} "
                       f"(ranks are 0..{args.ranks - 1}, --ranks {args.ranks})")
    if args.gpu and args.reference_only:
        raise CliError("--gpu runs part 2 on GPUs; --reference-only skips part 2")
    if args.gpu and args.requests is not None:
        raise CliError("--requests sets the CPU run's length; with --gpu the run stops 5 s after the rejoin")
    logging.basicConfig(level=logging.ERROR, format="%(name)s %(levelname)s %(message)s")
    ok = True
    if not args.skip_reference:
        from eep.cli.simulated_demo import run_demo
        ok = run_demo(num_ranks=args.ranks, failed_rank=args.kill_rank)
        if args.reference_only:
            return 0 if ok else 1
    if args.gpu:
        from eep.cli.gpu_demo import gpu_demo_setup
        setup = gpu_demo_setup(args)
    else:
        num_requests = args.requests or 1200
        # a SIGKILLed rank is found by its exit at once; a 1 s silence window (20 x 50 ms) only keeps a
        # busy machine's scheduling hiccups from being read as deaths
        cfg = RuntimeConfig(num_ranks=args.ranks, num_requests=num_requests, heartbeat_interval_s=0.05,
                            suspect_misses=20, transport_timeout_s=1.0, restart_after_s=args.restart_after)
        setup = DemoSetup(cfg, f"{args.ranks} rank processes on the CPU, shared-memory transport",
                          check=lambda result: check_run(cfg, result), timeout_s=120)
    with setup:
        ok &= run_runtime_demo(setup, kill_rank=args.kill_rank, out_dir=Path(args.out), keep=args.keep)
    return 0 if ok else 1


class DemoSetup:
    """What part 2 runs: the config, a one-line description, the answer check and its label, when
    the fault comes (after a third of the answers, or ``fault_at_s`` into serving), whether the run
    is stopped ``stop_after_rejoin_s`` after the rejoin (endless requests), and a bound on the run.
    A context manager, so a set-up that made files (shards) removes them."""

    def __init__(self, cfg: RuntimeConfig, description: str, *, check, timeout_s: float,
                 fault_at_s: float | None = None, stop_after_rejoin_s: float | None = None,
                 answer_label: str = "answers equal to the single-process reference, token by token"):
        self.cfg, self.description, self.check, self.timeout_s = cfg, description, check, timeout_s
        self.fault_at_s, self.stop_after_rejoin_s, self.answer_label = fault_at_s, stop_after_rejoin_s, answer_label

    def fault(self, rank: int) -> Fault:
        if self.fault_at_s is not None:
            return Fault("kill", rank, at_s=self.fault_at_s)
        return Fault("kill", rank, at_results=max(1, self.cfg.num_requests // 3))

    def __enter__(self) -> "DemoSetup":
        return self

    def __exit__(self, *exc) -> None:
        pass


def run_runtime_demo(setup: DemoSetup, *, kill_rank: int, out_dir: Path, keep: bool) -> bool:
    cfg = setup.cfg
    fault = setup.fault(kill_rank)
    if fault.at_results is not None:
        check_faults([fault], num_ranks=cfg.num_ranks, num_requests=cfg.num_requests)
    out_dir.mkdir(parents=True, exist_ok=True)
    run_dir = out_dir / "run" if keep else Path(tempfile.mkdtemp(prefix="eep-demo-run-"))
    if keep:
        shutil.rmtree(run_dir, ignore_errors=True)  # a previous demo's timelines would be read as this one's
    m = cfg.model
    when = (f"after {fault.at_results} answers" if fault.at_results is not None else f"{fault.at_s:.0f} s into serving")
    requests = (f"requests until {setup.stop_after_rejoin_s:.0f} s after the rejoin" if setup.stop_after_rejoin_s
                else f"{cfg.num_requests} requests")
    print(f"\n=== eep runtime: {setup.description} ===")
    print(f"model: hidden {m.hidden}, {m.num_experts} experts, top-{m.top_k}, {m.num_layers} layers; "
          f"{cfg.slots_per_rank} expert slots per rank ({cfg.num_redundant} redundant replicas per layer); "
          f"{requests}; SIGKILL rank {kill_rank} {when}, restart {cfg.restart_after_s} s after it exits", flush=True)
    t_start = time.monotonic()
    try:
        launcher = Launcher(cfg, run_dir=run_dir, faults=[fault])
        is_over = threading.Event()
        if setup.stop_after_rejoin_s is not None:
            _stop_after_rejoin(launcher, kill_rank, setup.stop_after_rejoin_s, is_over)
        try:
            result = launcher.run(timeout_s=setup.timeout_s)
        finally:
            is_over.set()
        ok = _report(setup, result, fault, out_dir, time.monotonic() - t_start)
    finally:
        if not keep:
            shutil.rmtree(run_dir, ignore_errors=True)
    if keep:
        print(f"per-rank JSONL timelines: {run_dir}")
    return ok


def _stop_after_rejoin(launcher: Launcher, rank: int, seconds: float, is_over: threading.Event) -> None:
    """Stop ``launcher`` ``seconds`` after ``rank`` rejoins (a watcher thread, until ``is_over``; the
    run's own timeout bounds the case where the rank never rejoins)."""
    def watch() -> None:
        while not is_over.wait(0.1):
            coordinator = getattr(launcher, "coordinator", None)  # made when the run starts
            decisions = list(coordinator.decisions) if coordinator is not None else []
            if any(d.get("kind") == "commit" and rank in {int(r) for r in d.get("joined", {})} and d["epoch"] > 0
                   for d in decisions):
                if not is_over.wait(seconds):
                    launcher.stop()
                return

    threading.Thread(target=watch, name="eep-demo-stop", daemon=True).start()


def _report(setup: DemoSetup, result: RunResult, fault: Fault, out_dir: Path, wall_s: float) -> bool:
    cfg = setup.cfg
    print("\ndecisions:")
    for d in result.decisions:
        if d.get("kind") != "commit":
            continue
        print(f"  epoch {d['epoch']}: {d['reason']:<9} active={[r for r, a in enumerate(d['active']) if a]} "
              f"failed={d['failed']} joined={sorted(int(r) for r in d['joined'])} start_step={d['start_step']} "
              f"requeued={sum(len(q) for q in d['requeue'].values())}")
    s = result.summary
    if s.get("num_steps"):
        print(f"\nsummary: {s['num_tokens']} tokens in {s['duration_s']:.2f} s of serving "
              f"({s['mean_tokens_per_s']:.0f} tokens/s, all ranks)")
    for f in s.get("faults", []):
        line = f"  SIGKILL rank {f['rank']} at {f['t_s']:.2f} s: "
        if "detect_and_repair_s" in f:
            line += (f"detected and repaired in {_ms(f['detect_and_repair_s'])}, survivors paused "
                     f"{_ms(f.get('recovery_pause_s'))}; ")
        else:
            line += "no repair was committed; "
        t95 = f.get("time_to_95pct_s")
        line += (f"back to 95% of the pre-fault {f['pre_fault_tokens_per_s']:.0f} tokens/s after {_ms(t95)}"
                 if t95 is not None else "throughput did not reach 95% of the pre-fault rate before the run ended")
        print(line)
    for j in s.get("rejoins", []):
        print(f"  rank {', '.join(map(str, j['ranks']))} rejoined at {j['t_s']:.2f} s: survivors paused "
              f"{_ms(j['reintegration_pause_s'])}")

    problems = [result.error] if result.error else []
    if result.is_timed_out:
        problems.append(f"the run did not finish within {setup.timeout_s:.0f} s (start-up included)")
    elif result.is_interrupted:
        problems.append("interrupted")
    else:
        problems += setup.check(result)
    problems += check_faults_fired([fault], result.num_answered)
    repaired = any("detect_and_repair_s" in f for f in s.get("faults", []))
    rejoined = any(fault.rank in j["ranks"] for j in s.get("rejoins", []))
    if fault.fired_at is not None and not repaired:
        problems.append(f"no repair of rank {fault.rank} was committed before the run ended")
    print("\nvalidity checks:")
    if setup.stop_after_rejoin_s is None:
        print(f"  requests answered: {result.num_answered} of {cfg.num_requests} (each answer written once, "
              "by compare-and-set)")
    else:
        print(f"  requests answered: {result.num_answered}, each once, by compare-and-set (stopped "
              f"{setup.stop_after_rejoin_s:.0f} s after the rejoin; none lost: "
              f"{'NO' if any('never answered' in p for p in problems) else 'yes'})")
    print(f"  {setup.answer_label}: {'NO' if any('differ' in p for p in problems) else 'yes'}")
    print("  final membership EP-valid: "
          f"{'NO' if any('EP INVALID' in p or 'no membership' in p for p in problems) else 'yes'}")
    for p in problems:
        print(f"  PROBLEM: {p}")

    requests = None if setup.stop_after_rejoin_s is not None else cfg.num_requests
    summary = {"description": setup.description, "requests": requests, "answered": result.num_answered,
               "problems": problems, "wall_s": wall_s, "config": cfg.to_dict(), "summary": s}
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=1, default=str))
    _plot(setup, result, fault, out_dir)
    print(f"summary: {out_dir / 'summary.json'}")
    ok = not problems
    if not ok:
        verdict = "FAILED"
    elif rejoined:
        verdict = f"survived SIGKILL of rank {fault.rank}, its restart and rejoin, with every answer unchanged"
    else:
        verdict = (f"survived SIGKILL of rank {fault.rank} with every answer unchanged; the run ended before "
                   "the restarted rank rejoined (more --requests to see the rejoin)")
    print("\nRESULT:", verdict)
    return ok


def _plot(setup: DemoSetup, result: RunResult, fault: Fault, out_dir: Path) -> None:
    from eep.cli.plot import PlotUnavailable, plot_timeline

    png = out_dir / "timeline.png"
    title = (f"eep demo: {setup.description}\nSIGKILL rank {fault.rank}, restarted after "
             f"{setup.cfg.restart_after_s} s")
    try:
        end = (f"{result.num_answered} of {setup.cfg.num_requests} answered" if setup.stop_after_rejoin_s is None
               else f"stopped, {result.num_answered} answered")
        plot = plot_timeline(png, result.run_dir, title=title, end_label=f"end of run ({end})")
    except PlotUnavailable as exc:
        print(f"\ntimeline: not drawn ({exc})")
        return
    except ValueError as exc:
        print(f"\ntimeline: not drawn ({exc})")
        return
    print(f"\ntimeline: {png} ({plot.duration_s:.1f} s of serving, peak {plot.peak_tokens_per_s:.0f} tokens/s; "
          + ", ".join(f"{e.label} at {e.t_s:.2f} s" for e in plot.events) + ")")


def _ms(seconds: float | None) -> str:
    return "n/a" if seconds is None else f"{seconds * 1000:.0f} ms"
