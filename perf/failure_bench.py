"""The failure benchmark: steady state, SIGKILL recovery, reintegration, full restart.

One invocation runs everything on one machine and writes ``results.json``, ``timeline.png`` (the
failure run's throughput) and ``summary.txt`` to ``--out`` (default ``perf/failure_bench_out``).
Design, what each number means and what has been run: docs/failure_bench.md.

    # 4 GPUs (< 10 min; perf/run_failure_bench_gpu.sh adds a smoke run and picks the layer count):
    python perf/failure_bench.py --gpus 4 --out /tmp/eep-failure-bench
    # CPU end to end at the tiny shape (shm engine, ~20 s); GpuEngine's code on CPU exchanges:
    .venv/bin/python perf/failure_bench.py --dry-run --out /tmp/fb
    .venv/bin/python perf/failure_bench.py --dry-run --engines shm,gloo,cpu_elastic --failure-engine cpu_elastic
    # block-scaled FP8 experts (shards, host tier, slots, dispatch, expert stage, oracle; dry run on
    # GpuEngine's CPU path, hidden and intermediate 128):
    .venv/bin/python perf/failure_bench.py --dry-run --fp8 --out /tmp/fb-fp8

Runs, in order, each through the runtime's launcher/coordinator (eep/runtime):
  1. shards: random bf16 (``--fp8``: blockwise-quantised FP8) qwen3-30b-a3b-shaped checkpoint ->
     ``eep-shards prepare`` -> host tier;
  2. steady state per engine (fused, fused_fixed, nccl; dry-run: shm): tokens/s, step p50/p99;
  3. failure: SIGKILL one rank at ``--fault-at-s``; restarted after ``--restart-after-s``; pauses,
     time to 95%, requests lost, a sample of answers against the CPU oracle, pause breakdown,
     predicted (planner) vs observed repair and reintegration;
  4. full restart: a fresh process tree (own Python, torch import, CUDA init) loads from the
     disk shards, warms up (captures graphs) and decodes; time from launch to first token.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from eep.cli.answers import transitions_of  # noqa: E402
from eep.runtime import Fault, Launcher, RuntimeConfig, TinyConfig  # noqa: E402
from eep.runtime.model import write_random_checkpoint  # noqa: E402
import bench_metrics  # noqa: E402

GPU_ENGINES = ("fused", "fused_fixed", "nccl")
# --pin -> GpuEngine's pin_host_tier option
PIN_POLICIES = {"always": None, "first-start": "first_start", "never": False}
# --dry-run: the CPU engine; GpuEngine's code on CPU over gloo (fixed) or the shm transport (elastic)
CPU_ENGINES = ("shm", "gloo", "cpu_elastic")


# ---- configuration --------------------------------------------------------------------------

def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gpus", type=int, default=4, help="rank processes, one GPU each (2, 4 or 8)")
    ap.add_argument("--out", default="perf/failure_bench_out", help="results.json, summary.txt, timeline.png, logs")
    ap.add_argument("--dry-run", action="store_true", help="CPU: tiny shape, shm engine, short runs")
    ap.add_argument("--workdir", default=None,
                    help="checkpoint and shards, on local disk, never under --out (default: a fresh temp dir, removed)")
    ap.add_argument("--layers", type=int, default=None, help="MoE layers (48; dry-run 2)")
    ap.add_argument("--max-tokens", type=int, default=None, help="decode tokens per rank per step (128; dry-run 8)")
    ap.add_argument("--max-new-tokens", type=int, default=None, help="longest request (64; dry-run 12)")
    ap.add_argument("--engines", default=None, help=f"steady-state engines, comma separated ({','.join(GPU_ENGINES)})")
    ap.add_argument("--steady-s", type=float, default=None, help="measured seconds per steady-state run (8; dry 2)")
    ap.add_argument("--fault-at-s", type=float, default=None, help="SIGKILL this long after serving starts (6; dry 1.5)")
    ap.add_argument("--after-fault-s", type=float, default=None, help="serving after the fault (20; dry 3)")
    ap.add_argument("--restart-after-s", type=float, default=None, help="launcher restart delay (2; dry 0.3)")
    ap.add_argument("--kill-rank", type=int, default=1)
    ap.add_argument("--extra-slots", type=int, default=0,
                    help="empty expert slots per rank beyond the redundancy layout's (0): room that re-replication "
                         "fills from peers after a repair, so a next failure is routing-only where slots allow")
    ap.add_argument("--failure-engine", default=None, help="engine of the failure run (fused; dry-run shm or "
                    "cpu_elastic)")
    ap.add_argument("--fused-timeout-s", type=float, default=0.25, help="transport deadline of the GPU buffer")
    ap.add_argument("--attn-width", type=int, default=None, help="attention stand-in columns (9216; dry 0 = off)")
    ap.add_argument("--expert-backend", default="grouped_mm",
                    help="expert stage: grouped_mm (torch._grouped_mm), cutlass, loop or auto (EEP_EXPERT_BACKEND)")
    ap.add_argument("--fp8", action="store_true",
                    help="block-scaled FP8 experts (e4m3, 128x128 scales): checkpoint, shards, host tier, slots, "
                         "FP8 dispatch and expert stage, FP8 oracle; the dry run serves them on GpuEngine's CPU "
                         "path (cpu_elastic, gloo) at hidden and intermediate 128")
    ap.add_argument("--pin", default="always", choices=PIN_POLICIES,
                    help="cudaHostRegister of the host-tier mapping: always, first-start (not in a restarted "
                         "rank, whose start-up is on the path back to 95%%), never")
    ap.add_argument("--degraded-tokens", type=int, default=0,
                    help="tokens per rank while a rank is missing (survivors absorb its share through a "
                         "second captured graph); 0 = off, -1 = the missing rank's share: "
                         "max_tokens * N / (N - 1), rounded up to a multiple of 8")
    ap.add_argument("--variants", default="",
                    help="extra runs after the base ones, each with its own fault-free steady run (and a failure "
                         f"run where the variant has one), comma separated from {','.join(VARIANTS)}")
    ap.add_argument("--check-sample", type=int, default=None, help="most-used tokens checked on the oracle (16)")
    ap.add_argument("--no-aa", dest="aa", action="store_false",
                    help="skip the second steady run of the membership-aware engine (the A/A noise floor)")
    ap.add_argument("--skip", default="", help="comma separated runs to skip: steady,failure,restart")
    ap.add_argument("--budget-s", type=float, default=560.0, help="stop starting runs after this (whole script)")
    ap.add_argument("--restart-child", default=None, help=argparse.SUPPRESS)  # internal: the full-restart tree
    args = ap.parse_args(argv)
    if args.gpus < 2:
        ap.error(f"--gpus {args.gpus}: need at least 2 rank processes (a failure leaves survivors)")
    if not 0 <= args.kill_rank < args.gpus:
        ap.error(f"--kill-rank {args.kill_rank} is outside [0, {args.gpus})")
    d = args.dry_run
    # the shm engine serves float32 experts: an FP8 dry run is GpuEngine's CPU path
    cpu_engine = "cpu_elastic" if args.fp8 else "shm"
    defaults = dict(layers=2 if d else 48, max_tokens=8 if d else 128, max_new_tokens=12 if d else 64,
                    engines=cpu_engine if d else ",".join(GPU_ENGINES), steady_s=2.0 if d else 6.0,
                    fault_at_s=1.5 if d else 6.0, after_fault_s=3.0 if d else 20.0,
                    restart_after_s=0.3 if d else 2.0, attn_width=0 if d else 4096 + 512 + 512 + 4096,
                    check_sample=16)
    for k, v in defaults.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    resolve_degraded(args)
    args.variants = [v for v in args.variants.split(",") if v]
    bad = [v for v in args.variants if v not in VARIANTS]
    if bad:
        ap.error(f"--variants {bad}: known variants are {sorted(VARIANTS)}")
    args.engines = [e for e in args.engines.split(",") if e]
    bad = [e for e in args.engines if e not in (CPU_ENGINES if d else GPU_ENGINES)]
    if bad:
        ap.error(f"--engines {bad}: not available {'in --dry-run' if d else 'on GPUs'}")
    args.skip = {s for s in args.skip.split(",") if s}
    if args.fp8 and "shm" in args.engines:
        ap.error("--fp8: the shm engine serves float32 experts; use --engines cpu_elastic or gloo")
    if args.failure_engine is None:
        args.failure_engine = cpu_engine if d else "fused"
    if args.fp8 and args.failure_engine == "shm":
        ap.error("--fp8: the shm engine serves float32 experts; use --failure-engine cpu_elastic")
    if args.failure_engine not in (("shm", "cpu_elastic") if d else ("fused",)):
        ap.error(f"--failure-engine {args.failure_engine}: not membership-aware or not available here")
    return args


# Variants (--variants): argument overrides and the runs they get. Each is measured against its own
# fault-free steady run (the golden answers); the others' runs are in the same call, on the same cards.
VARIANTS: dict[str, tuple[dict, tuple[str, ...]]] = {
    # survivors take the missing rank's share through a second captured graph
    "absorb": ({"degraded_tokens": -1}, ("steady", "failure")),
    # steady state at the full-membership capacity only: what sizing buffers for a degraded batch costs
    "no-absorb": ({"degraded_tokens": 0}, ("steady",)),
    # the torch._grouped_mm expert stage at full-membership capacity: the first GPU runs' configuration
    "grouped_mm": ({"expert_backend": "grouped_mm", "degraded_tokens": 0}, ("steady",)),
}


def resolve_degraded(args) -> None:
    """--degraded-tokens -1: the missing rank's share, ceil(max_tokens * N / (N - 1)), up to a multiple of 8."""
    if args.degraded_tokens < 0:
        share = (args.max_tokens * args.gpus + args.gpus - 2) // (args.gpus - 1)
        args.degraded_tokens = (share + 7) // 8 * 8


def variant_args(args, name: str):
    import copy

    vargs = copy.copy(args)
    for key, value in VARIANTS[name][0].items():
        setattr(vargs, key, value)
    resolve_degraded(vargs)
    return vargs


def model_config(args) -> TinyConfig:
    if args.dry_run and args.fp8:  # FP8 slots keep gate and up scale blocks apart: sizes multiples of 128
        return TinyConfig(hidden=128, intermediate=128, num_layers=args.layers)
    if args.dry_run:
        return TinyConfig(num_layers=args.layers)  # hidden 64, inter 32, 16 experts, top-4, vocab 128
    return TinyConfig(hidden=2048, intermediate=768, num_experts=128, top_k=8, num_layers=args.layers,
                      vocab_size=1024)


def redundancy(num_experts: int, num_ranks: int) -> tuple[int, int]:
    """``(slots_per_rank, num_redundant)``: enough slots that any single failure is repaired in place.

    Survivors must hold every expert: ``slots_per_rank >= ceil(E / (N-1))``. Of the slots beyond one
    replica per expert, one rank's worth (``ceil(E/N)``) stays empty as landing room for orphans and
    the rest hold redundant replicas (32 for 128 experts on 4 ranks: a quarter of a failed rank's
    experts then already live elsewhere and need no restore, and hot experts get a second copy).
    """
    slots = math.ceil(num_experts / (num_ranks - 1))
    if num_experts >= 64:
        slots = math.ceil(slots / 8) * 8
    num_redundant = max(0, num_ranks * slots - num_experts - math.ceil(num_experts / num_ranks))
    return slots, num_redundant


def runtime_config(args, engine: str, shard_dir: str, *, num_requests: int, restart_after_s: float | None = None,
                   tiers: list[str] | None = None) -> RuntimeConfig:
    model = model_config(args)
    slots, num_redundant = redundancy(model.num_experts, args.gpus)
    slots += args.extra_slots
    opts = {}
    if engine != "shm":
        opts = {"attn_width": args.attn_width, "tiers": tiers or ["host", "disk"],
                "expert_backend": args.expert_backend, "pin_host_tier": PIN_POLICIES[args.pin]}
    if engine in ("gloo", "cpu_elastic"):  # GpuEngine on CPU (tests)
        opts.update(device="cpu", expert_backend="loop")
    return RuntimeConfig(num_ranks=args.gpus, slots_per_rank=slots, num_redundant=num_redundant,
                         max_tokens_per_rank=args.max_tokens, num_requests=num_requests,
                         degraded_tokens_per_rank=args.degraded_tokens or None,
                         max_new_tokens=args.max_new_tokens, model=model, shard_dir=shard_dir, engine=engine,
                         # a graph replay cannot be interrupted by a decision, so a member must be allowed a
                         # whole step with two kernel deadlines before a late ack counts as death (1 s);
                         # a dead rank is found sooner, by corroboration (docs/runtime.md)
                         engine_options=opts, heartbeat_interval_s=0.05, suspect_misses=5 if engine == "shm" else 20,
                         transport_timeout_s=args.fused_timeout_s if engine != "shm" else 0.5,
                         restart_after_s=restart_after_s, max_restarts=1,
                         startup_timeout_s=60.0 if args.dry_run else 300.0, warmup_steps=1)


# ---- shards ---------------------------------------------------------------------------------

def preflight(model: TinyConfig, workdir: Path, *, fp8: bool = False) -> int:
    """Refuse early (naming the directory) when the checkpoint, shards or host tier cannot fit."""
    from eep import envs
    from eep.repair import expert_weight_nbytes

    need = model.num_layers * model.num_experts * expert_weight_nbytes(model.hidden, model.intermediate, fp8=fp8)
    workdir.mkdir(parents=True, exist_ok=True)
    for path, factor, what in ((str(workdir), 2.1, "checkpoint + shards"), (envs.host_tier_dir(), 1.05, "host tier")):
        free = shutil.disk_usage(path).free
        if free < factor * need:
            raise SystemExit(f"{path}: {free / 1e9:.1f} GB free, the {what} need {factor * need / 1e9:.1f} GB "
                             f"(set --workdir / EEP_HOST_TIER_DIR elsewhere, or lower --layers)")
    return need


def prepare_shards(args, workdir: Path) -> dict:
    """Checkpoint -> shards -> host tier; returns the timings and paths."""
    from weights_tools import HostTier, prepare

    model = model_config(args)
    ckpt, shards = workdir / "ckpt", workdir / "shards"
    out: dict = {"shard_dir": str(shards)}
    t = time.perf_counter()
    device = "cuda" if (not args.dry_run and torch.cuda.is_available()) else "cpu"
    out["checkpoint_bytes"] = write_random_checkpoint(str(ckpt), model, device=device, fp8=args.fp8)
    if device == "cuda":
        torch.cuda.empty_cache()  # the ranks need the memory this process drew the weights in
    out["write_checkpoint_s"] = time.perf_counter() - t
    t = time.perf_counter()
    prepare(str(ckpt), str(shards), quiet=True, force=True)
    out["prepare_s"] = time.perf_counter() - t
    shutil.rmtree(ckpt, ignore_errors=True)  # the shards hold every byte the runs need
    t = time.perf_counter()
    tier = HostTier(str(shards), pin=False)  # built once for the node; every rank maps the same file
    out["host_tier_fill_s"] = time.perf_counter() - t
    out["host_tier_path"] = tier.path
    tier.close()
    return out


def drop_page_cache(shard_dir: str) -> None:
    """Evict the shard files from the page cache (advisory, no root needed) before a cold load."""
    for root, _, files in os.walk(shard_dir):
        for name in files:
            fd = os.open(os.path.join(root, name), os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


# ---- runs -----------------------------------------------------------------------------------

def _stop_after_serving(launcher: Launcher, seconds: float) -> threading.Thread:
    """Stop ``launcher`` ``seconds`` after its first membership commit (start-up excluded)."""
    def watch():
        while launcher._serving_since is None and not launcher._stop_requested:
            time.sleep(0.05)
        time.sleep(seconds)
        launcher.stop()
    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    return thread


def fresh_dir(path: Path) -> Path:
    """Timelines append: a run directory left by an earlier invocation would merge into this one."""
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)
    return path


def run_steady(args, engine: str, shard_dir: str, out: Path, *, label: str | None = None) -> dict:
    cfg = runtime_config(args, engine, shard_dir, num_requests=10 ** 9)
    launcher = Launcher(cfg, run_dir=fresh_dir(out / f"steady-{label or engine}"))
    _stop_after_serving(launcher, args.steady_s + 1.0)
    t = time.perf_counter()
    result = launcher.run(timeout_s=args.steady_s + (120 if args.dry_run else 400))
    stats = bench_metrics.steady_state(result.run_dir, skip_s=1.0)
    stats.update(engine=engine, wall_s=time.perf_counter() - t, timed_out=result.is_timed_out,
                 exit_codes=result.exit_codes, startup=_startup(result.run_dir))
    transitions, _ = transitions_of(cfg, result.results)
    stats["inconsistent_tokens"] = sum(len(b) > 1 for b in transitions.values())
    GOLDEN[engine] = transitions
    return stats


def _startup(run_dir: Path) -> dict | None:
    """Launch to first token of a run (where its start-up went: bench_metrics.startup)."""
    launcher, _ = bench_metrics.load_run(run_dir)
    t0 = next((e["t"] for e in launcher if e.get("event") == "launch"), None)
    return None if t0 is None else bench_metrics.startup(run_dir, t0)


GOLDEN: dict[str, dict[int, set[int]]] = {}  # engine -> token successors of its fault-free steady run


def run_failure(args, shard_dir: str, out: Path, tokens_per_s: float | None,
                golden: dict[int, set[int]] | None = None,
                on_measured: Callable[[dict], None] | None = None) -> tuple[dict, Path, RuntimeConfig]:
    """The failure run; ``on_measured(entry)`` gets the timings before the answers are checked (the
    check takes tens of seconds: a run cut short there still keeps the pauses)."""
    engine = args.failure_engine
    mean_new = (max(1, args.max_new_tokens // 3) + args.max_new_tokens) / 2
    span = args.fault_at_s + args.after_fault_s
    # enough requests that the run ends on its own about ``span`` after serving starts
    num_requests = int(max(50, (tokens_per_s or 200.0) * span / mean_new))
    cfg = runtime_config(args, engine, shard_dir, num_requests=num_requests, restart_after_s=args.restart_after_s)
    faults = [Fault("kill", args.kill_rank, at_s=args.fault_at_s)]
    launcher = Launcher(cfg, run_dir=fresh_dir(out / "failure"), faults=faults)
    t = time.perf_counter()
    result = launcher.run(timeout_s=3 * span + (60 if args.dry_run else 300))
    s = result.summary
    entry: dict = {"engine": engine, "num_requests": num_requests, "wall_s": time.perf_counter() - t,
                   "timed_out": result.is_timed_out, "error": result.error, "answered": result.num_answered,
                   "requests_lost": num_requests - result.num_answered - result.num_refused,
                   "requests_refused": result.num_refused, "summary": s,
                   "breakdown": bench_metrics.pause_breakdown(result.run_dir)}
    fault = (s.get("faults") or [{}])[0]
    entry["recovery_pause_s"] = fault.get("recovery_pause_s")
    entry["time_to_95pct_s"] = fault.get("time_to_95pct_s")
    entry["reintegration_pause_s"] = (s.get("rejoins") or [{}])[0].get("reintegration_pause_s")
    entry.update(repair_report(result, args.kill_rank))
    entry.update(control_log(result.run_dir))
    entry["answers_checked"] = False
    if on_measured is not None:
        on_measured(entry)
    t_check = time.perf_counter()
    print(f"failure run over in {entry['wall_s']:.1f} s; checking {result.num_answered} answers", file=sys.stderr,
          flush=True)
    entry.update(check_answers(args, cfg, result, golden))
    entry["answers_checked"], entry["check_s"] = True, time.perf_counter() - t_check
    print(f"answers checked in {entry['check_s']:.1f} s (oracle {entry.get('oracle_s') or 0:.1f} s)", file=sys.stderr,
          flush=True)
    entry["predicted"] = predict(cfg, result, args.kill_rank)
    return entry, result.run_dir, cfg


def repair_report(result, rank: int) -> dict:
    """Predicted vs observed per repair phase of every commit, the pause of the re-replication's
    switch, and live replicas per expert before the fault, after repair, after re-replication and
    after the rejoin (``bench_metrics.repair_phases`` / ``replica_points``)."""
    pauses = [b.get("survivor_pause_s") for b in bench_metrics.pause_breakdown(result.run_dir)
              if b["kind"] == "rereplication"]
    return {"phases": bench_metrics.repair_phases(result.decisions, result.run_dir),
            "replicas": bench_metrics.replica_points(result.decisions, rank),
            "rereplication_pause_s": max((p for p in pauses if p is not None), default=None)}


def control_log(run_dir: Path) -> dict:
    """What the coordinator and the ranks did around the fault (seconds after it): the decisions,
    and every step a rank abandoned on a transport deadline (where, and which peers it missed)."""
    launcher, ranks = bench_metrics.load_run(run_dir)
    t0 = next((e["t"] for e in launcher if e.get("event") == "fault"), None)
    if t0 is None:
        return {}
    kinds = ("fault", "report", "prepare", "corroborated", "commit", "exit", "spawn", "join_request")
    keep = ("rank", "target", "epoch", "reason", "failed", "joined", "missed", "ranks", "code", "incarnation")
    decisions = [{"t": round(e["t"] - t0, 4), "event": e["event"], **{k: e[k] for k in keep if e.get(k) is not None}}
                 for e in launcher if e.get("event") in kinds and e["t"] >= t0]
    stalls = [{"t": round(e["t"] - t0, 4), "rank": e.get("rank"), "epoch": e.get("epoch"), "step": e.get("step"),
               "where": e.get("where"), "missed": e.get("missed")} for e in ranks if e.get("event") == "stalled"]
    return {"control_log": decisions, "stalls": stalls}


# A sampled token counts against the oracle only where rounding cannot decide it: the oracle run
# with three float32 accumulation orders (split_k 1, 2, 4) gives one answer, and its smallest router
# top-k gap and final logit margin are above these (router logits have std 2, final logits std 4).
# Why three orders: a random 48-layer model is chaotic, a 1e-6 difference can grow into a router
# flip, and the engine's GEMM order is just one more valid order (perf/RESULTS.md, "Failure benchmark").
ORACLE_SPLITS = (1, 2, 4)
ROUTER_GAP_TOL = 2e-3
MARGIN_TOL = 1e-2
# FP8 experts: the oracle is the FP8 reference (one order), with wider room. The CUTLASS FP8 stage is
# about 5e-3 relative (Frobenius) from the FP8 reference and held to 1e-2: its GEMMs sum 128-wide
# blocks in another order and round gate/up to bf16 from there, which moves a few requantisation
# decisions (one e4m3 step for that element), so an expert's output differs by far more than float32
# order moves a bf16 one. Measured on the CPU at this benchmark's shape (2 layers, 32 tokens): random
# noise of 1e-2 relative on every expert output of the oracle moved the smallest router top-k gap by
# up to 1.2e-2 and the final logit margin by up to 0.17, and changed no token. 3e-2 and 0.35 leave a
# factor of two over that at the stage's bound (four at its measured error). The CPU engine's torch
# FP8 stage computes the reference's arithmetic itself and agrees to float32 order.
FP8_ROUTER_GAP_TOL = 3e-2
FP8_MARGIN_TOL = 0.35


def check_answers(args, cfg: RuntimeConfig, result, golden: dict[int, set[int]] | None = None) -> dict:
    """Wrong answers (docs/failure_bench.md "Wrong answers"). ``mismatched`` counts the requests
    through a token that fails either exact check:
    - consistency: a token with two successors in this run means some answer went wrong;
    - fault-free golden: every token this run shares with the fault-free steady run of the same
      engine must have the same successor (exact: the engine is deterministic per token).
    Besides, the oracle (eep.reference arithmetic, rounded as the engine rounds, three float32
    accumulation orders) on the most-used tokens: ``oracle_disagreements`` among the tokens it
    decides. That comparison is decisive at shallow depth only: a random 48-layer model is chaotic,
    and the oracle's own answer changed with its accumulation order for 6 of 16 tokens on 4xH100."""
    if cfg.engine == "shm":
        from eep.cli.answers import check_run
        problems = check_run(cfg, result)
        wrong = [p for p in problems if "differ" in p]
        mismatched = 0 if not wrong else int(wrong[0].split()[0])
        # every answer is compared with the oracle: its disagreements are the changed answers
        return {"mismatched": mismatched, "oracle_disagreements": mismatched, "check": "every answer, token by token",
                "problems": problems}
    from weights_tools import ExpertStore
    from eep.runtime.engines.gpu import expert_tiers, fp8_scale_block
    from eep.runtime.model import bench_weights
    from failure_oracle import reference_next_tokens

    transitions, owners = transitions_of(cfg, result.results)
    if not transitions:
        return {"mismatched": None, "check": "no answers"}
    inconsistent = [a for a, b in transitions.items() if len(b) > 1]
    shared = [a for a in transitions if golden and a in golden]
    off_golden = [a for a in shared if transitions[a] != golden[a]]
    sample = sorted(transitions, key=lambda a: -len(owners[a]))[:args.check_sample]
    # unpinned: registering the 58 GB mapping took 11.6 s of a rank's start-up on 4xH100, and the
    # oracle's few hundred expert reads gain nothing from it
    store = ExpertStore(cfg.shard_dir, tiers=expert_tiers(cfg.shard_dir, ["host", "disk"], False))
    layers = store.moe_layers
    fp8 = store.is_fp8
    t = time.perf_counter()
    device = "cuda:0" if torch.cuda.is_available() else "cpu"  # the runs are over: the GPU is free
    combine_dtype = torch.bfloat16 if cfg.engine in ("fused", "fused_fixed") else torch.float32
    weights = bench_weights(cfg.model)
    block = fp8_scale_block(cfg.engine, cfg.model.hidden) if fp8 else None
    runs = [reference_next_tokens(cfg.model, weights, lambda layer, e: store.load_expert(layers[layer], e), sample,
                                  combine_dtype=combine_dtype, device=device, split_k=k, fp8_scale_block=block)
            for k in ((1,) if fp8 else ORACLE_SPLITS)]
    oracle_s = time.perf_counter() - t
    store.close()
    ref, margin, gap = runs[0]
    margin_tol, gap_tol = (FP8_MARGIN_TOL, FP8_ROUTER_GAP_TOL) if fp8 else (MARGIN_TOL, ROUTER_GAP_TOL)
    stable = [len({run[0][i] for run in runs}) == 1 for i in range(len(sample))]
    decided = [a for a, m, g, ok in zip(sample, margin, gap, stable) if ok and m >= margin_tol and g >= gap_tol]
    by_token = dict(zip(sample, ref))
    off_oracle = [a for a in decided if transitions[a] != {by_token[a]}]
    bad = set(inconsistent) | set(off_golden)
    mismatched = set().union(*[owners[a] for a in bad]) if bad else set()
    covered = set().union(*[owners[a] for a in shared]) if shared else set()
    return {"mismatched": len(mismatched),
            "check": f"{len(result.results)} answers: one successor per token, {len(shared)} tokens vs the "
                     f"fault-free run ({len(covered)} requests); oracle: {len(decided) - len(off_oracle)} of "
                     f"{len(decided)} decided tokens agree ({len(sample)} sampled)",
            "checked_requests": len(covered), "inconsistent_tokens": len(inconsistent),
            "oracle_disagreements": len(off_oracle),
            "golden_tokens": len(shared), "golden_mismatched_tokens": len(off_golden),
            "oracle_decided": len(decided), "oracle_sampled": len(sample), "oracle_s": oracle_s,
            "oracle_device": device, "oracle_experts": "fp8" if fp8 else "bf16",
            "oracle_tolerance": {"router_gap": gap_tol, "margin": margin_tol},
            "oracle": [{"token": a, "engine": sorted(transitions[a]), "reference": by_token[a], "margin": m,
                        "router_gap": g, "by_split_k": [run[0][i] for run in runs], "decided": a in decided}
                       for i, (a, m, g) in enumerate(zip(sample, margin, gap))]}


def predict(cfg: RuntimeConfig, result, rank: int) -> dict:
    """The planner's predictions for this failure and rejoin, as the run's commits carried them
    (every commit holds the plan the coordinator made and the ranks checked: eep/runtime/control/rules.py)."""
    from eep.runtime.control.rules import ORPHAN_RESTORE, REINTEGRATION, RepairRules, runtime_bandwidth

    commits = [d for d in result.decisions if d["kind"] == "commit"]
    out: dict = {"bandwidth": runtime_bandwidth(cfg).to_dict()}
    fail = next((d for d in commits if rank in d["failed"]), None)
    if fail is not None:
        phase = next((p for p in fail["plan"]["phases"] if p["phase"] == ORPHAN_RESTORE), None)
        by_tier: dict[str, int] = {}
        for t in fail["plan"]["transfers"]:  # fields of eep.repair.Transfer, in order
            by_tier[t[3]] = by_tier.get(t[3], 0) + t[8]
        out.update(repair_pause_s=phase["predicted_s"] if phase else 0.0, repair_nbytes_by_tier=by_tier,
                   repair_experts=len(fail["plan"]["transfers"]), repair_valid=fail["plan"]["valid"])
    join = next((d for d in commits if str(rank) in d["joined"] and d["reason"] != "start"), None)
    if join is not None:
        phase = next(p for p in join["plan"]["phases"] if p["phase"] == REINTEGRATION)
        mine = [t for t in join["plan"]["transfers"] if t[6] == rank]
        # the rejoiner loads its planned row from the host tier before it asks to join
        out.update(reintegration_s=phase["predicted_s"], reintegration_transfers=phase["transfers"],
                   joiner_load_s=len(mine) * RepairRules(cfg).expert_nbytes / (runtime_bandwidth(cfg).h2d_gbps * 1e9))
    return out


def run_restart(args, shard_dir: str, out: Path) -> dict:
    """Kill-all-and-start-again: a fresh process tree loads from the (page-cache-cold) disk shards."""
    run_dir = fresh_dir(out / "restart")
    drop_page_cache(shard_dir)
    cmd = [sys.executable, os.path.abspath(__file__), "--restart-child", str(run_dir), "--gpus", str(args.gpus),
           "--layers", str(args.layers), "--max-tokens", str(args.max_tokens), "--attn-width", str(args.attn_width),
           "--expert-backend", args.expert_backend, "--fused-timeout-s", str(args.fused_timeout_s),
           "--pin", args.pin, *(["--fp8"] if args.fp8 else []),
           "--workdir", str(Path(shard_dir).parent), "--out", str(out)] + (["--dry-run"] if args.dry_run else [])
    t_launch = time.time()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120 if args.dry_run else 400)
    entry = {"returncode": proc.returncode, "tiers": ["disk"], **bench_metrics.startup(run_dir, t_launch)}
    if proc.returncode:
        entry["stderr_tail"] = proc.stderr[-2000:]
    return entry


def restart_child(args) -> None:
    """The full-restart instance: serve until the first tokens, then stop."""
    shard_dir = str(Path(args.workdir) / "shards")
    # what a fixed-membership stack restarts (FP8 dry run: GpuEngine's CPU path, gloo)
    engine = ("gloo" if args.fp8 else "shm") if args.dry_run else "fused_fixed"
    cfg = runtime_config(args, engine, shard_dir, num_requests=10 ** 9, tiers=["disk"])
    launcher = Launcher(cfg, run_dir=args.restart_child)
    _stop_after_serving(launcher, 0.5)
    launcher.run(timeout_s=100 if args.dry_run else 380)


# ---- report ---------------------------------------------------------------------------------

def _fmt(v, unit="s", scale=1.0) -> str:
    if v is None:
        return "n/a"
    if unit == "s" and abs(v) < 10:
        return f"{v * 1e3:.1f} ms"
    return f"{v * scale:.3f} {unit}"


def _pct(v) -> str:
    return "n/a" if v is None else f"{v * 100:.1f}%"


def _first_fault(failure: dict) -> dict:
    return ((failure.get("summary") or {}).get("faults") or [{}])[0]


def summary_text(results: dict) -> str:
    lines = [f"failure bench: {results['device']}, {results['config']['num_ranks']} ranks, "
             f"model {results['config']['model']}, {results['config'].get('experts', 'bf16')} experts, "
             f"slots/rank {results['config']['slots_per_rank']}, "
             f"redundant {results['config']['num_redundant']}"]
    sh = results.get("shards") or {}
    if sh:
        lines.append(f"shards: checkpoint {sh.get('checkpoint_bytes', 0) / 1e9:.2f} GB written in "
                     f"{_fmt(sh.get('write_checkpoint_s'))}, prepare {_fmt(sh.get('prepare_s'))}, "
                     f"host tier {_fmt(sh.get('host_tier_fill_s'))}")
    steady = results.get("steady", {})
    for engine, s in steady.items():
        up = (s.get("startup") or {}).get("first_token_s")
        lines.append(f"steady {engine:12s}: {s.get('tokens_per_s', 0):10.0f} tokens/s, step p50 "
                     f"{_fmt(s.get('step_p50_ms'), 'ms')}, p99 {_fmt(s.get('step_p99_ms'), 'ms')}, "
                     f"start-up {_fmt(up)}, tokens with 2 successors {s.get('inconsistent_tokens')}")
    again = results.get("steady_again") or {}
    for engine, s in again.items():
        first = steady.get(engine, {}).get("tokens_per_s")
        if first and s.get("tokens_per_s"):
            lines.append(f"steady {engine:12s} again (A/A): {s['tokens_per_s']:10.0f} tokens/s, "
                         f"{(s['tokens_per_s'] / first - 1) * 100:+.2f}% against the first run (the noise floor)")
    if "fused" in steady and "fused_fixed" in steady and steady["fused_fixed"].get("tokens_per_s"):
        cost = 1 - steady["fused"]["tokens_per_s"] / steady["fused_fixed"]["tokens_per_s"]
        aa = again.get("fused", {}).get("tokens_per_s")
        floor = f", A/A {abs(aa / steady['fused']['tokens_per_s'] - 1) * 100:.2f}%" if aa else ", no A/A run"
        lines.append(f"steady-state cost of membership awareness: {cost * 100:.2f}%{floor} (target <= 1%; "
                     f"a cost inside the A/A spread is not resolved by this run)")
    f = results.get("failure")
    if f:
        lines.append(f"failure ({f['engine']}, degraded tokens {results['args'].get('degraded_tokens')}): recovery "
                     f"pause {_fmt(f.get('recovery_pause_s'))}, reintegration pause "
                     f"{_fmt(f.get('reintegration_pause_s'))}, back to 95% in {_fmt(f.get('time_to_95pct_s'))}, "
                     f"survivors at {_pct(_first_fault(f).get('degraded_fraction'))} of pre-fault, "
                     f"lost {f.get('requests_lost')}, mismatched {f.get('mismatched')} ({f.get('check')})")
        for b in f.get("breakdown", []):
            lines.append(f"  {b['kind']} epoch {b['epoch']}: detection {_fmt(b.get('detection_s'))}, agreement "
                         f"{_fmt(b.get('agreement_s'))}, transfers {_fmt(b.get('repair_transfers_s'))} "
                         f"{json.dumps(b.get('repair_by_tier'))}, table switch {_fmt(b.get('table_switch_s'))}, "
                         f"warm-up {_fmt(b.get('warmup_s'))}, survivor pause {_fmt(b.get('survivor_pause_s'))}")
        for b in f.get("breakdown", []):
            if b.get("joiner_startup_s") is not None:
                phases = b.get("joiner_engine_phases") or {}
                lines.append(f"  joiner: start-up {_fmt(b['joiner_startup_s'])} = engine init "
                             f"{_fmt(b.get('joiner_engine_init_s'))} (" + ", ".join(f"{k} {_fmt(v)}" for k, v in
                                                                             phases.items()) +
                             f") + row load {_fmt(b.get('joiner_load_s'))} + warm-up/capture rest")
        for st in f.get("stalls", [])[:8]:
            lines.append(f"  stalled: rank {st['rank']} epoch {st['epoch']} step {st['step']} at {st['where']} "
                         f"missed {st['missed']} (+{st['t']:.3f} s)")
        lines.append("  control: " + "; ".join(
            f"+{e['t']:.3f} {e['event']}" + "".join(f" {k}={e[k]}" for k in ("epoch", "reason", "rank", "target",
                                                                              "failed", "joined", "ranks") if k in e)
            for e in f.get("control_log", [])[:24]))
        p = f.get("predicted", {})
        lines.append(f"  planner: repair {_fmt(p.get('repair_pause_s'))} predicted ({p.get('repair_experts')} experts),"
                     f" reintegration {_fmt(p.get('reintegration_s'))} predicted")
        lines += phase_lines(f)
        lines += replica_lines(f.get("replicas") or {})
    for name, v in (results.get("variants") or {}).items():
        st, fv = v.get("steady", {}), v.get("failure", {})
        line = (f"variant {name} {json.dumps(v.get('overrides'))} ({v.get('expert_backend')}, degraded tokens "
                f"{v.get('degraded_tokens')}): steady {st.get('tokens_per_s', 0):.0f} tokens/s, p50 "
                f"{_fmt(st.get('step_p50_ms'), 'ms')}")
        if fv:
            line += (f"; recovery pause {_fmt(fv.get('recovery_pause_s'))}, reintegration "
                     f"{_fmt(fv.get('reintegration_pause_s'))}, back to 95% in {_fmt(fv.get('time_to_95pct_s'))}, "
                     f"survivors at {_pct(_first_fault(fv).get('degraded_fraction'))} of pre-fault, lost "
                     f"{fv.get('requests_lost')}, mismatched {fv.get('mismatched')}")
        lines.append(line)
        for b in fv.get("breakdown", []):
            if b.get("joiner_startup_s") is not None:
                lines.append(f"  joiner start-up {_fmt(b['joiner_startup_s'])} (engine init "
                             f"{_fmt(b.get('joiner_engine_init_s'))}: {json.dumps(b.get('joiner_engine_phases'))})")
    r = results.get("restart")
    if r:
        lines.append(f"full restart: first token {_fmt(r.get('first_token_s'))} after launch "
                     f"(engines ready {_fmt(r.get('engines_ready_s'))}, committed {_fmt(r.get('committed_s'))})")
        if f and f.get("time_to_95pct_s") and r.get("first_token_s"):
            lines.append(f"ratio time-to-95% / full restart: {f['time_to_95pct_s'] / r['first_token_s']:.3f} "
                         "(target <= 0.1)")
    return "\n".join(lines)


def phase_lines(failure: dict) -> list[str]:
    """One line per commit: each planned phase, predicted -> observed, with its copies by source."""
    lines = []
    for c in failure.get("phases") or []:
        parts = []
        for p in c["phases"]:
            text = f"{p['phase']} {_fmt(p['predicted_s'])} -> {_fmt(p['observed_s'])}"
            tiers = ", ".join(f"{v['experts']} {k}" for k, v in (p.get("by_tier") or {}).items())
            if p["transfers"]:
                text += f" ({p['transfers']} copies{': ' + tiers if tiers else ''})"
            if p["phase"] == "reintegration":
                text += f" [{_fmt(p.get('before_join_s'))} before the join, {_fmt(p.get('at_commit_s'))} at it]"
            if p["phase"] == "re-replication":
                text += f" [while serving; {p.get('left_at_commit')} left for the switch]"
            parts.append(text)
        who = f" failed {c['failed']}" if c["failed"] else f" joined {c['joined']}" if c["joined"] else ""
        lines.append(f"  epoch {c['epoch']} {c['reason']}{who}: predicted -> observed: " + "; ".join(parts))
    if failure.get("rereplication_pause_s") is not None:
        lines.append(f"  re-replication switch pause {_fmt(failure['rereplication_pause_s'])}")
    return lines


REPLICA_POINTS = (("before_fault", "before the fault"), ("after_repair", "after repair"),
                  ("after_rereplication", "after re-replication"), ("after_rejoin", "after the rejoin"))


def replica_lines(replicas: dict) -> list[str]:
    """Live replicas per expert (min/mean/max, single-replica and uncovered experts) at each point."""
    parts = [f"{label} {r['min']}/{r['mean']:.2f}/{r['max']} ({r['single']} single, {r['uncovered']} none)"
             for key, label in REPLICA_POINTS if (r := replicas.get(key))]
    return ["  replicas per expert (min/mean/max of " + str(next(iter(replicas.values()))["experts"]) +
            " layer-experts): " + "; ".join(parts)] if parts else []


def plot_failure_timeline(results: dict, run_dir: Path, path: Path) -> None:
    """The failure run's throughput with the SIGKILL, detection, repair, restart and rejoin named."""
    from eep.cli.plot import PlotUnavailable, plot_timeline

    f, cfg = results["failure"], results["config"]
    degraded = results["args"].get("degraded_tokens")
    title = (f"failure benchmark: {results['device']}, {cfg['num_ranks']} ranks, {f['engine']} engine, "
             f"{cfg['model']['num_experts']} experts x {cfg['model']['num_layers']} layers"
             + (f", survivors absorb up to {degraded} tokens" if degraded else ""))
    try:
        plot_timeline(path, run_dir, title=title,
                      end_label=f"end of run ({f['answered']} of {f['num_requests']} answered)")
    except (PlotUnavailable, ValueError) as exc:
        print(f"no timeline plot: {exc}", file=sys.stderr)


def device_name(args) -> str:
    if args.dry_run or not torch.cuda.is_available():
        return f"CPU ({os.cpu_count()} cores), dry run"
    return f"{torch.cuda.device_count()} x {torch.cuda.get_device_name(0)}"


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.restart_child:
        restart_child(args)
        return {}
    t_start = time.perf_counter()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    # shards are ~58 GB: never under --out (which comes back from the device), removed unless given
    workdir = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="eep-failure-bench-"))
    model = model_config(args)
    slots, red = redundancy(model.num_experts, args.gpus)
    slots += args.extra_slots
    results: dict = {"device": device_name(args), "args": {k: (sorted(v) if isinstance(v, set) else v)
                                                          for k, v in vars(args).items()},
                     "config": {"num_ranks": args.gpus, "model": model.__dict__, "slots_per_rank": slots,
                                "num_redundant": red, "max_tokens_per_rank": args.max_tokens,
                                "attn_width": args.attn_width, "experts": "fp8" if args.fp8 else "bf16"}}

    def save() -> None:
        (out / "results.json").write_text(json.dumps(results, indent=1, default=str))

    def over_budget(name: str) -> bool:
        if time.perf_counter() - t_start > args.budget_s:
            results.setdefault("skipped_over_budget", []).append(name)
            return True
        return False

    preflight(model, workdir, fp8=args.fp8)
    results["shards"] = prepare_shards(args, workdir)
    shard_dir = results["shards"]["shard_dir"]
    save()
    def guarded(name: str, fn):
        """One run's failure is recorded and the next run still happens (one invocation, many runs)."""
        try:
            return fn()
        except Exception as exc:  # noqa: BLE001
            import traceback
            results.setdefault("errors", {})[name] = traceback.format_exc()
            print(f"run {name} failed: {exc!r}", file=sys.stderr, flush=True)
            return None

    results["steady"] = {}

    def steady(engines: list[str]) -> None:
        for engine in engines if "steady" not in args.skip else []:
            if not over_budget(f"steady-{engine}"):
                got = guarded(f"steady-{engine}", lambda: run_steady(args, engine, shard_dir, out))
                if got is not None:
                    results["steady"][engine] = got
                save()

    # order by importance, so a tight budget drops the least important run (the NCCL baseline) first
    first = [e for e in args.engines if e in ("fused", "fused_fixed", "shm", args.failure_engine)]
    steady(first)
    # the same engine again, after the others: the end-to-end A/A that every steady comparison needs
    aware = next((e for e in first if e != "fused_fixed"), None)
    if args.aa and aware and aware in results["steady"] and not over_budget(f"steady-{aware}-again"):
        got = guarded(f"steady-{aware}-again",
                      lambda: run_steady(args, aware, shard_dir, out, label=f"{aware}-again"))
        if got is not None:
            results.setdefault("steady_again", {})[aware] = got
        save()
    if args.expert_backend == "cutlass" and f"steady-{args.failure_engine}" in results.get("errors", {}):
        # one invocation, one try: the rest of it still measures the runs on the stage known to work
        print("the CUTLASS expert stage failed in the engine: every run falls back to grouped_mm", file=sys.stderr)
        failed = {k: results["errors"].pop(k) for k in [f"steady-{e}" for e in first] if k in results["errors"]}
        results["backend_fallback"] = {"from": "cutlass", "to": "grouped_mm", "errors": failed}
        args.expert_backend = "grouped_mm"
        steady(first)
    if "failure" not in args.skip and not over_budget("failure"):
        tps = (results["steady"].get(args.failure_engine) or {}).get("tokens_per_s")
        def measured(entry: dict) -> None:
            results["failure"] = entry
            save()

        got = guarded("failure", lambda: run_failure(args, shard_dir, out, tps, GOLDEN.get(args.failure_engine),
                                                     measured))
        if got is not None:
            results["failure"], run_dir, _ = got
            save()
            plot_failure_timeline(results, run_dir, out / "timeline.png")
    # the restart is the ratio's denominator: before the variants, which only add comparisons
    if "restart" not in args.skip and not over_budget("restart"):
        got = guarded("restart", lambda: run_restart(args, shard_dir, out))
        if got is not None:
            results["restart"] = got
    for name in args.variants:
        if over_budget(f"variant-{name}"):
            continue

        def run_variant(name=name) -> dict:
            overrides, runs = VARIANTS[name]
            vargs, vout = variant_args(args, name), out / f"variant-{name}"
            vout.mkdir(parents=True, exist_ok=True)
            st = run_steady(vargs, vargs.failure_engine, shard_dir, vout)
            got = {"overrides": overrides, "degraded_tokens": vargs.degraded_tokens,
                   "expert_backend": vargs.expert_backend, "steady": st}
            if "failure" in runs:
                def measured(entry: dict) -> None:
                    results.setdefault("variants", {})[name] = {**got, "failure": entry}
                    save()

                got["failure"], _, _ = run_failure(vargs, shard_dir, vout, st.get("tokens_per_s"),
                                                   GOLDEN.get(vargs.failure_engine), measured)
            return got

        got = guarded(f"variant-{name}", run_variant)
        if got is not None:
            results.setdefault("variants", {})[name] = got
            save()
    steady([e for e in args.engines if e not in first])
    results["total_s"] = time.perf_counter() - t_start
    save()
    text = summary_text(results)
    for name in results.get("errors", {}):
        text += f"\nRUN FAILED: {name} (traceback in results.json)"
    (out / "summary.txt").write_text(text + "\n")
    print(text, flush=True)
    if not args.workdir:
        shutil.rmtree(workdir, ignore_errors=True)
    host_tier = results["shards"].get("host_tier_path")
    for leftover in (host_tier, f"{host_tier}.lock") if host_tier else ():
        try:
            os.unlink(leftover)  # /dev/shm outlives the run
        except OSError:
            pass
    return results


def exit_code(results: dict) -> int:
    """1: the eep path itself failed (fused steady state or the failure run); 2: another run failed; 0: all ran."""
    errors = results.get("errors", {})
    if any(name in errors for name in ("failure", "steady-fused", "steady-shm", "steady-cpu_elastic")):
        return 1
    return 2 if errors else 0


if __name__ == "__main__":
    sys.exit(exit_code(main()))
