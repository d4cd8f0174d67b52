"""Numbers of the failure benchmark (perf/failure_bench.py), read back from a run's JSONL timelines.

- ``steady_state``: tokens/s over all ranks and per-step latency p50/p99 (gaps between a rank's
  consecutive completed steps in one epoch), after a warm-up ``skip_s``;
- ``pause_breakdown``: for every repair and rejoin commit, where the pause went:
  detection (fault -> launcher saw the exit), agreement (prepare -> commit), repair transfers
  (survivors restoring slots, bytes and seconds by tier), table switch (placement check + engine
  membership switch), warm-up (adopted -> first step completed), and the survivors' pause;
- ``startup``: a (re)started instance from its launch to its first completed step (the full
  restart baseline), split into process start, engine init (weights), warm-up/capture, agreement;
- ``repair_phases``: every planned phase of every commit (routing-only, orphan-restore,
  re-replication, reintegration), the planner's predicted seconds beside the observed ones;
- ``replica_points`` / ``replica_counts``: live replicas per expert (min / mean / max, experts
  with a single replica, experts with none) before a fault, after its repair, after re-replication
  and after the rejoin.

Timeline records are described in ``eep/runtime/control/timeline.py``; rank ``commit`` events carry
``plan_s``, ``restore_s``, ``switch_s`` and ``restore_by_tier`` (see ``eep/runtime/control/rank.py``).
The timeline picture (throughput with every event named) is ``eep.cli.plot.plot_timeline``.
"""

from __future__ import annotations

from pathlib import Path

import torch

from eep.runtime.control.metrics import load_run
from eep.state import NO_EXPERT, ExpertPlacement


def _steps(ranks: list[dict]) -> list[dict]:
    return [r for r in ranks if "step" in r and "event" not in r]


def percentile(values: list[float], q: float) -> float | None:
    """Nearest-rank percentile (``q`` in [0, 100]) of ``values``; None when empty."""
    if not values:
        return None
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, int(round(q / 100 * len(ordered) + 0.5)) - 1))
    return ordered[index]


def steady_state(run_dir: str | Path, *, skip_s: float = 1.0) -> dict:
    """Throughput and step latency of a fault-free run, ignoring the first ``skip_s`` of serving."""
    _, ranks = load_run(run_dir)
    steps = _steps(ranks)
    if not steps:
        return {"num_steps": 0}
    t_start = min(s["t"] for s in steps) + skip_s
    kept = [s for s in steps if s["t"] >= t_start]
    if len(kept) < 2:
        return {"num_steps": len(kept)}
    gaps: list[float] = []
    by_rank: dict[tuple, list[dict]] = {}
    for s in kept:
        by_rank.setdefault((s["rank"], s["incarnation"]), []).append(s)
    for mine in by_rank.values():
        mine.sort(key=lambda s: s["t"])
        gaps += [b["t"] - a["t"] for a, b in zip(mine, mine[1:]) if a["epoch"] == b["epoch"]]
    t0, t1 = min(s["t"] for s in kept), max(s["t"] for s in kept)
    tokens = sum(s["tokens"] for s in kept)
    return {"num_steps": len(kept), "duration_s": t1 - t0, "tokens": tokens,
            "tokens_per_s": tokens / max(t1 - t0, 1e-9),
            "step_p50_ms": _ms(percentile(gaps, 50)), "step_p99_ms": _ms(percentile(gaps, 99)),
            "step_mean_ms": _ms(sum(gaps) / len(gaps)) if gaps else None}


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else seconds * 1e3


def _merge_tiers(stats: list[dict | None]) -> dict:
    out: dict = {}
    for s in stats:
        for tier, v in ((s or {}).get("by_tier") or {}).items():
            acc = out.setdefault(tier, {"experts": 0, "nbytes": 0, "seconds": 0.0})
            for k in acc:
                acc[k] += v.get(k, 0)
    return out


def pause_breakdown(run_dir: str | Path) -> list[dict]:
    """One entry per non-start commit (``kind`` ``"repair"`` or ``"rejoin"``); times in seconds."""
    launcher, ranks = load_run(run_dir)
    steps = _steps(ranks)
    events = [r for r in ranks if "event" in r]
    out = []
    for commit in (e for e in launcher if e.get("event") == "commit" and e.get("reason") != "start"):
        epoch = commit["epoch"]
        kind = {"join": "rejoin", "rereplicate": "rereplication"}.get(commit.get("reason"), "repair")
        prepare = next((e for e in reversed(launcher) if e.get("event") == "prepare" and e["epoch"] == epoch
                        and e["t"] <= commit["t"]), None)
        adopted = [e for e in events if e["event"] == "commit" and e.get("epoch") == epoch
                   and e.get("was") != "joining" and e.get("was") != "warmup"]
        entry: dict = {"kind": kind, "epoch": epoch, "failed": commit.get("failed", []),
                       "joined": commit.get("joined", []),
                       "agreement_s": None if prepare is None else commit["t"] - prepare["t"]}
        if kind == "repair" and commit.get("failed"):
            target = commit["failed"][0]
            fault = next((e for e in reversed(launcher) if e.get("event") == "fault" and e.get("target") == target
                          and e["t"] <= commit["t"]), None)
            # detection: the first evidence the coordinator acted on (a peer's report, corroborated
            # by silence; the process exit; or heartbeat silence), whichever came first
            evidence = [e["t"] for e in launcher if fault is not None and fault["t"] <= e["t"] <= commit["t"] and (
                (e.get("event") == "exit" and e.get("target") == target)
                or (e.get("event") == "corroborated" and target in e.get("ranks", []))
                or (e.get("event") == "prepare" and e.get("reason") == "heartbeat" and target in e.get("failed", [])))]
            reports = [e["t"] for e in launcher if e.get("event") == "report" and fault is not None
                       and fault["t"] <= e["t"] <= commit["t"]]
            if fault is not None:
                entry["fault_t"] = fault["t"]
                entry["detection_s"] = min(evidence) - fault["t"] if evidence else None
                entry["first_report_s"] = min(reports) - fault["t"] if reports else None
                entry["fault_to_commit_s"] = commit["t"] - fault["t"]
        if kind == "rejoin":
            joiner = commit["joined"][0] if commit.get("joined") else None
            spawn = next((e for e in reversed(launcher) if e.get("event") == "spawn" and e.get("target") == joiner
                          and e["t"] <= commit["t"]), None)
            request = next((e for e in reversed(events) if e["event"] == "join_request" and e["rank"] == joiner
                            and e["t"] <= commit["t"]), None)
            if spawn is not None and request is not None:
                entry["joiner_startup_s"] = request["t"] - spawn["t"]
                entry["joiner_load_s"] = request.get("load_s")
                entry["joiner_warmup_s"] = request.get("warmup_s")
                ready = next((e for e in reversed(events) if e["event"] == "engine_ready" and e["rank"] == joiner
                              and spawn["t"] <= e["t"] <= request["t"]), None)
                if ready is not None:
                    entry["joiner_engine_init_s"] = ready["t"] - spawn["t"]
                    entry["joiner_engine_phases"] = ready.get("phases")
        entry["repair_transfers_s"] = max((e.get("restore_s") or 0.0 for e in adopted), default=None)
        entry["repair_by_tier"] = _merge_tiers([e.get("restore_by_tier") for e in adopted])
        entry["table_switch_s"] = max(((e.get("plan_s") or 0.0) + (e.get("switch_s") or 0.0) for e in adopted),
                                      default=None)
        warm, pauses = [], []
        for e in adopted:
            who = (e["rank"], e["incarnation"])
            mine = [s for s in steps if (s["rank"], s["incarnation"]) == who]
            after = [s["t"] for s in mine if s["epoch"] >= epoch]
            before = [s["t"] for s in mine if s["epoch"] < epoch]
            if after:
                warm.append(min(after) - e["t"])
            if after and before:
                pauses.append(min(after) - max(before))
        entry["warmup_s"] = max(warm, default=None)
        entry["survivor_pause_s"] = max(pauses, default=None)
        out.append(entry)
    return out


def startup(run_dir: str | Path, t_launch: float) -> dict:
    """A whole instance from ``t_launch`` (wall time the processes were started) to its first token."""
    launcher, ranks = load_run(run_dir)
    steps = _steps(ranks)
    events = [r for r in ranks if "event" in r]

    def latest(name: str) -> float | None:
        ts = [e["t"] for e in events if e["event"] == name]
        return max(ts) if ts else None

    start_commit = next((e["t"] for e in launcher if e.get("event") == "commit" and e.get("reason") == "start"), None)
    launch = next((e["t"] for e in launcher if e.get("event") == "launch"), None)
    first = min((s["t"] for s in steps), default=None)
    marks = {"launcher_up": launch, "ranks_started": latest("start"), "engines_ready": latest("engine_ready"),
             "join_requested": latest("join_request"), "committed": start_commit, "first_token": first}
    out: dict = {f"{k}_s": (None if v is None else v - t_launch) for k, v in marks.items()}
    names = list(marks)
    for a, b in zip(names, names[1:]):
        if marks[a] is not None and marks[b] is not None:
            out[f"{a}->{b}_s"] = marks[b] - marks[a]
    return out



def repair_phases(decisions: list[dict], run_dir: str | Path) -> list[dict]:
    """Each non-start commit's planned phases, predicted and observed (seconds).

    Observed, per phase: ``routing-only`` the slowest member's table switch (plan check + engine
    switch); ``orphan-restore`` the slowest member's copies until its maps switched (``restore_s``)
    and their copy time alone (``copy_s``, the copy stream's time on a GPU); ``re-replication`` the
    slowest member's background copies (from the decision to its last copy done, while serving);
    ``reintegration`` the joiner's copies before it asked to join plus those left at the commit.
    Phases predict with the run's ``Bandwidth`` (peer links for peer copies)."""
    _, ranks = load_run(run_dir)
    events = [r for r in ranks if "event" in r]
    commits = [d for d in decisions if d.get("kind") == "commit"]
    out = []
    for previous, commit in zip(commits, commits[1:]):
        epoch = commit["epoch"]
        adopted = [e for e in events if e["event"] == "commit" and e.get("epoch") == epoch]
        survivors = [e for e in adopted if e.get("was") not in ("joining", "warmup")]
        phases = []
        for p in commit["plan"]["phases"]:
            entry = {"phase": p["phase"], "predicted_s": p["predicted_s"], "transfers": p["transfers"],
                     "nbytes": p["nbytes"], "observed_s": None}
            if p["phase"] == "routing-only":
                entry["observed_s"] = max(((e.get("plan_s") or 0.0) + (e.get("switch_s") or 0.0) for e in survivors),
                                          default=None)
            elif p["phase"] == "orphan-restore":
                copying = [e for e in survivors if e.get("restored")]
                entry["observed_s"] = max((e["restore_s"] for e in copying), default=None)
                entry["copy_s"] = max((_batch_seconds(e) for e in copying), default=None)
                entry["by_tier"] = _merge_tiers([e.get("restore_by_tier") for e in copying])
            elif p["phase"] == "re-replication":
                copied = [e for e in events if e["event"] == "rereplicated" and e.get("epoch") == previous["epoch"]]
                entry["observed_s"] = max((e["observed_s"] for e in copied), default=None)
                entry["copy_s"] = max((_batch_seconds(e) for e in copied), default=None)
                entry["by_tier"] = _merge_tiers([e.get("restore_by_tier") for e in copied])
                entry["left_at_commit"] = sum(e.get("restored") or 0 for e in adopted)
            elif p["phase"] == "reintegration":
                joiners = {int(r) for r in commit.get("joined", {})}
                before, at_commit, stats = [], [], []
                for r in joiners:
                    mine = [e for e in adopted if e["rank"] == r]
                    request = next((e for e in reversed(events) if e["event"] == "join_request" and e["rank"] == r
                                    and (not mine or e["incarnation"] == mine[0]["incarnation"])), None)
                    if request is not None:
                        before.append((request.get("restore_by_tier") or {}).get("seconds") or 0.0)
                        stats.append(request.get("restore_by_tier"))
                    at_commit += [e.get("restore_s") or 0.0 for e in mine]
                    stats += [e.get("restore_by_tier") for e in mine]
                entry["before_join_s"] = max(before, default=None)
                entry["at_commit_s"] = max(at_commit, default=None)
                entry["observed_s"] = (entry["before_join_s"] or 0.0) + (entry["at_commit_s"] or 0.0)
                entry["by_tier"] = _merge_tiers(stats)
            phases.append(entry)
        out.append({"epoch": epoch, "reason": commit["reason"], "failed": commit.get("failed", []),
                    "joined": sorted(int(r) for r in commit.get("joined", {})), "phases": phases})
    return out


def _batch_seconds(event: dict) -> float:
    return sum(b["seconds"] for b in ((event.get("restore_by_tier") or {}).get("batches") or []))


def replica_counts(commit: dict) -> dict:
    """Live replicas per (layer, expert) under one commit's maps (slots of active ranks)."""
    placement = ExpertPlacement.from_dict(commit["placement"])
    active = torch.tensor(commit["active"], dtype=torch.bool).repeat_interleave(placement.slots_per_rank)
    p2l = placement.phys_to_logical
    key = torch.where((p2l != NO_EXPERT) & active, p2l, placement.num_experts)
    counts = torch.zeros(placement.num_layers, placement.num_experts + 1, dtype=torch.int64).scatter_add_(
        1, key, torch.ones_like(key))[:, :placement.num_experts]
    return {"epoch": commit["epoch"], "min": int(counts.min()), "mean": round(float(counts.float().mean()), 3),
            "max": int(counts.max()), "single": int((counts == 1).sum()), "uncovered": int((counts == 0).sum()),
            "experts": counts.numel()}


def replica_points(decisions: list[dict], rank: int) -> dict:
    """``replica_counts`` before ``rank``'s failure, after its repair, after the re-replication that
    followed (before the rejoin) and after its rejoin; a point that did not happen is absent."""
    commits = [d for d in decisions if d.get("kind") == "commit"]
    fail = next((i for i, d in enumerate(commits) if rank in d.get("failed", [])), None)
    if fail is None:
        return {}
    out = {"before_fault": replica_counts(commits[fail - 1]) if fail else None,
           "after_repair": replica_counts(commits[fail])}
    rejoin = next((i for i, d in enumerate(commits) if i > fail and str(rank) in d.get("joined", {})), None)
    rerep = next((i for i, d in enumerate(commits) if i > fail and d.get("reason") == "rereplicate"
                  and (rejoin is None or i < rejoin)), None)
    if rerep is not None:
        out["after_rereplication"] = replica_counts(commits[rerep])
    if rejoin is not None:
        out["after_rejoin"] = replica_counts(commits[rejoin])
    return {k: v for k, v in out.items() if v is not None}
