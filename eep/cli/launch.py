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
import sys

from eep import envs
from eep.cli.answers import check_run, refusal_summary
from eep.runtime.config import RuntimeConfig
from eep.runtime.control.launcher import Fault, Launcher


def _fault(spec: str, action: str) -> Fault:
    try:
        rank, at = spec.split("@")
        return Fault(action, int(rank), at_results=int(at))
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"--{action} {spec!r}: expected RANK@ANSWERS, e.g. 1@100") from exc


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="eep launch", description=__doc__)
    parser.add_argument("--ranks", type=int, default=4)
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--restart-after", type=float, default=None, metavar="SECONDS",
                        help="restart a dead rank after this long; it then rejoins")
    parser.add_argument("--heartbeat-ms", type=int, default=envs.heartbeat_interval_ms())
    parser.add_argument("--suspect-misses", type=int, default=envs.suspect_misses())
    parser.add_argument("--transport-timeout-ms", type=int, default=envs.transport_timeout_ms())
    parser.add_argument("--store-host", default=envs.store_host(), help="listen address (default loopback)")
    parser.add_argument("--run-dir", default=None)
    parser.add_argument("--timeout", type=float, default=None, metavar="SECONDS")
    parser.add_argument("--kill", action="append", default=[], metavar="RANK@ANSWERS",
                        help="SIGKILL RANK once ANSWERS requests are answered (repeatable)")
    parser.add_argument("--stop", action="append", default=[], metavar="RANK@ANSWERS", help="SIGSTOP instead")
    parser.add_argument("--cont-after", type=float, default=None, metavar="SECONDS",
                        help="SIGCONT the last stopped rank this long after its SIGSTOP")
    args = parser.parse_args(argv)
    logging.basicConfig(level=envs.log_level(), format="%(name)s %(levelname)s %(message)s")
    cfg = RuntimeConfig(num_ranks=args.ranks, num_requests=args.requests, restart_after_s=args.restart_after,
                        heartbeat_interval_s=args.heartbeat_ms / 1000, suspect_misses=args.suspect_misses,
                        transport_timeout_s=args.transport_timeout_ms / 1000, store_host=args.store_host)
    faults = [_fault(s, "kill") for s in args.kill] + [_fault(s, "stop") for s in args.stop]
    if args.cont_after is not None and args.stop:
        faults.append(Fault("cont", faults[-1].rank, after_s=args.cont_after))
    result = Launcher(cfg, run_dir=args.run_dir, faults=faults).run(timeout_s=args.timeout)
    if result.is_interrupted or result.is_timed_out:  # a partial run: nothing to check against
        problems = ["interrupted" if result.is_interrupted else "timed out"]
    else:
        problems = check_run(cfg, result)
    if result.error is not None:
        problems.insert(0, result.error)
    refused = refusal_summary(result)
    json.dump({"run_dir": str(result.run_dir), "answered": result.num_answered, "refused": refused["refused"],
               "refusal_reasons": refused["reasons"], "problems": problems,
               "rejected_messages": result.num_rejected, "summary": result.summary}, sys.stdout, indent=1)
    print()
    if problems:
        return 1
    return EXIT_REFUSED if refused["refused"] else 0


EXIT_REFUSED = 3  # no problem, but requests were refused: the run could not serve them


if __name__ == "__main__":
    raise SystemExit(main())
