"""``eep launch``: start an elastic run of N rank processes under one launcher.

Exit status: 0 every request answered, each equal to the reference; 3 some requests refused with
an error (an epoch lost coverage and no rejoin restored it: the error names the uncovered experts
and the missing slots), every answer given equal to the reference; 1 anything else (an answer
differs, a request lost, an epoch served while not EP-valid, a timeout, an interrupt).
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
import tempfile

from eep import envs
from eep.cli.answers import check_faults_fired, check_run, refusal_summary
from eep.cli.options import (CliError, check_faults, fault_spec, int_at_least, positive_seconds, seconds)
from eep.runtime.config import RuntimeConfig
from eep.runtime.control.launcher import Fault, Launcher

DESCRIPTION = """\
Start N rank processes of the tiny MoE decode model on this machine (shared-memory data plane,
TCPStore control plane), serve --requests requests, optionally inject faults, and print a JSON
report: requests answered, problems (answers that differ from the single-process reference,
requests lost, an epoch served while not EP-valid, faults that never fired), requests refused with
the reason, and the recovery summary. Exit 0 when every request was answered correctly, 3 when some
were refused (an epoch lost coverage that no rejoin restored) and every answer given is correct,
1 for any problem, 2 for bad arguments.

example: eep launch --ranks 4 --requests 2000 --kill 1@500 --restart-after 0.5
"""


def add_parser(commands) -> None:
    p = commands.add_parser("launch", help="run N rank processes, inject faults, check answers",
                            description=DESCRIPTION)
    p.add_argument("--ranks", type=int_at_least(2), default=4, metavar="N", help="rank processes (EP ranks)")
    p.add_argument("--requests", type=int_at_least(1), default=1000, metavar="N", help="requests to serve; the run ends when all are answered")
    p.add_argument("--restart-after", type=seconds, default=None, metavar="SECONDS",
                   help="restart a dead rank this long after it exits; it then rejoins (default: never)")
    p.add_argument("--kill", type=fault_spec("kill"), action="append", default=[], metavar="RANK@ANSWERS",
                   help="SIGKILL RANK once ANSWERS requests are answered (repeatable)")
    p.add_argument("--stop", type=fault_spec("stop"), action="append", default=[], metavar="RANK@ANSWERS",
                   help="SIGSTOP RANK once ANSWERS requests are answered (repeatable)")
    p.add_argument("--cont-after", type=seconds, default=None, metavar="SECONDS",
                   help="SIGCONT the last stopped rank this long after its SIGSTOP")
    p.add_argument("--heartbeat-ms", type=int_at_least(1), default=envs.heartbeat_interval_ms(), metavar="MS",
                   help="rank heartbeat period (EEP_HEARTBEAT_INTERVAL_MS)")
    p.add_argument("--suspect-misses", type=int_at_least(1), default=envs.suspect_misses(), metavar="K",
                   help="missed heartbeats before a silent rank is declared dead (EEP_SUSPECT_MISSES)")
    p.add_argument("--transport-timeout-ms", type=int_at_least(1), default=envs.transport_timeout_ms(), metavar="MS",
                   help="bound on each wait for a peer's data (EEP_TRANSPORT_TIMEOUT_MS)")
    p.add_argument("--store-host", default=envs.store_host(), metavar="ADDR", help="address the control store listens on")
    p.add_argument("--timeout", type=positive_seconds, default=None, metavar="SECONDS",
                   help="stop the run after this long (default: no limit)")
    p.add_argument("--run-dir", default=None, metavar="DIR",
                   help="write the per-rank JSONL timelines and summary.json here, and keep them "
                        "(default: a temporary directory, removed at the end unless --keep)")
    p.add_argument("--keep", action="store_true", help="keep the temporary run directory")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    faults: list[Fault] = args.kill + args.stop
    check_faults(faults, num_ranks=args.ranks, num_requests=args.requests)
    if args.cont_after is not None:
        if not args.stop:
            raise CliError("--cont-after needs a --stop to continue")
        faults.append(Fault("cont", args.stop[-1].rank, after_s=args.cont_after))
    logging.basicConfig(level=envs.log_level(), format="%(name)s %(levelname)s %(message)s")
    cfg = RuntimeConfig(num_ranks=args.ranks, num_requests=args.requests, restart_after_s=args.restart_after,
                        heartbeat_interval_s=args.heartbeat_ms / 1000, suspect_misses=args.suspect_misses,
                        transport_timeout_s=args.transport_timeout_ms / 1000, store_host=args.store_host)
    is_kept = args.run_dir is not None or args.keep
    run_dir = args.run_dir or tempfile.mkdtemp(prefix="eep-run-")
    try:
        result = Launcher(cfg, run_dir=run_dir, faults=faults).run(timeout_s=args.timeout)
        if result.is_interrupted or result.is_timed_out:  # a partial run: nothing to check against
            problems = ["interrupted" if result.is_interrupted else f"timed out after {args.timeout} s"]
        else:
            problems = check_run(cfg, result)
        problems += check_faults_fired(faults, result.num_answered)
        if result.error is not None:
            problems.insert(0, result.error)
        refused = refusal_summary(result)
        report = {"run_dir": run_dir if is_kept else None, "requests": cfg.num_requests,
                  "answered": result.num_answered, "refused": refused["refused"],
                  "refusal_reasons": refused["reasons"], "problems": problems,
                  "faults": [{"action": f.action, "rank": f.rank, "at_answers": f.at_results,
                              "fired": f.fired_at is not None} for f in faults],
                  "rejected_messages": result.num_rejected, "summary": result.summary}
    finally:
        if not is_kept:
            shutil.rmtree(run_dir, ignore_errors=True)
    json.dump(report, sys.stdout, indent=1)
    print()
    if problems:
        return 1
    return EXIT_REFUSED if refused["refused"] else 0


EXIT_REFUSED = 3  # no problem, but requests were refused: the run could not serve them
