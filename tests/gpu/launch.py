"""Launcher for the fused GPU tests: hosts the TCPStore, starts one process per rank (plain
subprocesses, not torchrun, which would kill every rank when one dies), can SIGKILL one, and
collects each rank's JSON result.

    python tests/gpu/launch.py --scenario diff --num-ranks 4 --out /tmp/eep-gpu
"""

from __future__ import annotations

import argparse
import datetime
import glob
import json
import os
import signal
import socket
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
WORKER = os.path.join(ROOT, "tests", "gpu", "fused_worker.py")
KILL_AFTER_STEP = 15


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_rank_script(script: str, argv: list[str], num_ranks: int, *, timeout_s: float = 500.0) -> int:
    """Host a TCPStore and start ``script argv --rank r --port P`` once per rank (a benchmark's own
    workers); returns the worst exit code, killing stragglers after ``timeout_s``."""
    from torch.distributed import TCPStore

    port = free_port()
    store = TCPStore("127.0.0.1", port, is_master=True, wait_for_workers=False,  # noqa: F841 (kept alive)
                     timeout=datetime.timedelta(seconds=300))
    env = dict(os.environ, NCCL_NVLS_ENABLE="0", TORCH_SYMM_MEM_DISABLE_MULTICAST="1", NVSHMEM_DISABLE_NVLS="1",
               PYTHONUNBUFFERED="1")
    procs = [subprocess.Popen([sys.executable, script, *argv, "--rank", str(r), "--port", str(port)], env=env)
             for r in range(num_ranks)]
    deadline = time.time() + timeout_s
    while any(pr.poll() is None for pr in procs) and time.time() < deadline:
        time.sleep(0.05)
    for pr in procs:
        if pr.poll() is None:
            pr.kill()
    return max(pr.wait() for pr in procs)


def run_scenario(scenario: str, num_ranks: int, out: str, *, extra: list[str] = (), group: str | None = None,
                 timeout_s: float = 400.0) -> list[dict]:
    """Run one scenario; returns the per-process result dicts (``errors`` empty when all passed)."""
    from torch.distributed import TCPStore

    os.makedirs(out, exist_ok=True)
    group = group or f"{scenario}-{num_ranks}-{os.getpid()}-{int(time.time() * 1000) % 100000}"
    port = free_port()
    store = TCPStore("127.0.0.1", port, is_master=True, wait_for_workers=False,
                     timeout=datetime.timedelta(seconds=timeout_s))
    env = dict(os.environ, PYTHONUNBUFFERED="1", NCCL_NVLS_ENABLE="0", TORCH_SYMM_MEM_DISABLE_MULTICAST="1",
               NVSHMEM_DISABLE_NVLS="1", PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))

    def start(rank: int, role: str) -> subprocess.Popen:
        cmd = [sys.executable, WORKER, "--scenario", role, "--rank", str(rank), "--num-ranks", str(num_ranks),
               "--port", str(port), "--out", out, "--group", group, *extra]
        return subprocess.Popen(cmd, env=env)

    procs = {f"rank{r}": start(r, scenario) for r in range(num_ranks)}
    if scenario == "graph":
        procs["join"] = start(num_ranks - 1, "join")
    killed = None
    deadline = time.time() + timeout_s
    while any(p.poll() is None for p in procs.values()):
        if time.time() > deadline:
            for p in procs.values():
                if p.poll() is None:
                    p.kill()
            raise TimeoutError(f"scenario {scenario} on {num_ranks} ranks did not finish in {timeout_s} s")
        if scenario == "kill" and killed is None and store.check([f"{group}/steps"]):
            if int(store.get(f"{group}/steps")) >= KILL_AFTER_STEP:
                victim = procs[f"rank{num_ranks - 1}"]
                os.kill(victim.pid, signal.SIGKILL)
                killed = time.time()
        time.sleep(0.005)
    results = []
    for path in sorted(glob.glob(os.path.join(out, f"*.{group}.rank*.json"))):
        with open(path) as f:
            results.append(json.load(f))
    expected = num_ranks - (1 if scenario == "kill" else 0) + (1 if scenario == "graph" else 0)
    if len(results) != expected:
        codes = {name: p.returncode for name, p in procs.items()}
        results.append({"errors": [f"{len(results)} result files, expected {expected}; exit codes {codes}"]})
    return results


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--scenario", required=True)
    p.add_argument("--num-ranks", type=int, default=4)
    p.add_argument("--out", default="/tmp/eep-gpu")
    args, extra = p.parse_known_args()
    results = run_scenario(args.scenario, args.num_ranks, args.out, extra=extra)
    errors = [e for r in results for e in r["errors"]]
    summary = [{k: v for k, v in r.items() if k in ("rank", "rejoin_survivor_s", "step_s_detect", "step_s_before",
                                                   "dead_peer_memory_ok", "slow_steps_s", "detected_at")}
               for r in results]
    print(f"SCENARIO {args.scenario} ranks={args.num_ranks} {' '.join(extra)}: "
          f"{'PASS' if not errors else 'FAIL'} ({len(errors)} errors) {json.dumps(summary)}", flush=True)
    for e in errors[:20]:
        print("  " + e[:2000], flush=True)
    return 0 if not errors else 1


if __name__ == "__main__":
    sys.exit(main())
