"""Summary of a run from its JSONL timelines.

- throughput: tokens completed per second, all ranks together, in ``bin_s`` bins;
- recovery pause (per fault): on each survivor, the wall time from its last step completed under
  the old epoch to its first step completed under the repaired epoch; the max over survivors;
- reintegration pause (per rejoin): the same around the commit that takes the rank back;
- time to 95%: from the fault until the throughput over a trailing ``window_s`` (1 s) first reaches
  95% of its mean over the ``baseline_s`` (2 s) before the fault. Both windows span tens of steps on
  every rank: a 0.5 s pre-fault window once read 4% low by chance on 4xH100, which let a run whose
  survivors held 91% of the 3 s mean count as recovered;
- degraded fraction: the survivors' throughput from ``window_s`` after the repair until the failed
  rank is back, over the same pre-fault mean;
- coverage: each time an epoch lost coverage (it serves nothing): when, the uncovered experts'
  count, and how it ended (restored by a rejoin after ``held_s``, or requests refused);
- repair plans: each commit's phases with their predicted seconds, beside the observed copy time
  of the slowest member (``restore_s`` in the ranks' commit events).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from eep.runtime.control.timeline import read_jsonl


def load_run(run_dir: str | Path) -> tuple[list[dict], list[dict]]:
    run_dir = Path(run_dir)
    launcher = read_jsonl(run_dir / "launcher.jsonl") if (run_dir / "launcher.jsonl").exists() else []
    ranks = []
    for path in sorted(run_dir.glob("rank*.jsonl")):
        ranks.extend(read_jsonl(path))
    return launcher, ranks


def throughput_series(steps: list[dict], t0: float, t1: float, bin_s: float) -> list[tuple[float, float]]:
    """``[(bin start - t0, tokens per second)]`` over ``[t0, t1]``.

    The last bin is as long as what is left of the run, and its rate is over that length: a full
    bin's width would read the run's end as a drop in throughput. A remainder under half a bin is
    folded into the bin before it.
    """
    span = max(t1 - t0, 0.0)
    num_bins = max(1, int(span / bin_s))
    if span - num_bins * bin_s >= bin_s / 2:
        num_bins += 1
    edges = [i * bin_s for i in range(num_bins)] + [max(span, 1e-9)]
    tokens = [0] * num_bins
    for s in steps:
        i = min(num_bins - 1, int((s["t"] - t0) / bin_s))
        if 0 <= s["t"] - t0 <= span:
            tokens[i] += s["tokens"]
    return [(edges[i], n / (edges[i + 1] - edges[i])) for i, n in enumerate(tokens)]


@dataclass(frozen=True)
class RunEvent:
    """One moment of a run worth marking on its timeline; ``t_s`` counts from the first step."""

    t_s: float
    kind: str  # a key of EVENT_KINDS
    label: str  # what a reader sees next to the marker, e.g. "SIGKILL rank 1"


EVENT_KINDS = {  # kind -> legend text
    "fault": "fault injected (SIGKILL / SIGSTOP)",
    "detected": "failure detected (first evidence acted on)",
    "repair": "repair committed (new epoch, survivors serve)",
    "rereplicated": "re-replication switched in (replicas copied from peers)",
    "restart": "rank process restarted",
    "rejoin": "restarted rank rejoined",
}


def run_events(launcher: list[dict], t0: float) -> list[RunEvent]:
    """The launcher timeline's faults, detections, repairs, restarts and rejoins, in time order.

    Detection of a fault is the first evidence the coordinator acted on after it: the process exit,
    a peer's report corroborated by silence, or a prepare that fails the rank on missed heartbeats.
    """
    out: list[RunEvent] = []
    faults = [e for e in launcher if e.get("event") == "fault"]
    signal_names = {"kill": "SIGKILL", "stop": "SIGSTOP", "cont": "SIGCONT", "term": "SIGTERM"}
    for fault in faults:
        rank = fault["target"]
        out.append(RunEvent(fault["t"] - t0, "fault", f"{signal_names.get(fault['action'], fault['action'])} rank {rank}"))
        if fault["action"] not in ("kill", "stop", "term"):
            continue
        evidence = [(e["t"], why) for e in launcher if e["t"] >= fault["t"] for why in [_evidence_of(e, rank)] if why]
        if evidence:
            t, why = min(evidence)
            out.append(RunEvent(t - t0, "detected", f"rank {rank} detected ({why})"))
    for e in launcher:
        if e.get("event") == "commit" and e.get("reason") != "start":
            if e.get("failed"):
                out.append(RunEvent(e["t"] - t0, "repair", f"repair committed (epoch {e['epoch']})"))
            elif e.get("reason") == "rereplicate":
                copies = (e.get("plan") or {}).get("num_transfers")
                out.append(RunEvent(e["t"] - t0, "rereplicated", f"{copies} replicas added (epoch {e['epoch']})"))
            if e.get("joined"):
                ranks = ", ".join(str(r) for r in e["joined"])
                out.append(RunEvent(e["t"] - t0, "rejoin", f"rank {ranks} rejoined (epoch {e['epoch']})"))
        elif e.get("event") == "spawn" and e.get("incarnation", 0) > 0:
            out.append(RunEvent(e["t"] - t0, "restart", f"rank {e['target']} restarted"))
    return sorted(out, key=lambda ev: ev.t_s)


def _evidence_of(record: dict, rank: int) -> str | None:
    event = record.get("event")
    if event == "exit" and record.get("target") == rank:
        return "process exit"
    if event == "corroborated" and rank in record.get("ranks", []):
        return "peer report + silence"
    if event == "prepare" and record.get("reason") == "heartbeat" and rank in record.get("failed", []):
        return "heartbeats missed"
    return None


def _pause(steps: list[dict], survivors: set[tuple[int, int]], epoch: int) -> float | None:
    """Max over survivors of (first step at epoch >= ``epoch``) - (last step before it)."""
    pauses = []
    for who in survivors:
        mine = [s for s in steps if (s["rank"], s["incarnation"]) == who]
        before = [s["t"] for s in mine if s["epoch"] < epoch]
        after = [s["t"] for s in mine if s["epoch"] >= epoch]
        if before and after:
            pauses.append(min(after) - max(before))
    return max(pauses) if pauses else None


def summarize(run_dir: str | Path, *, bin_s: float = 0.05, window_s: float = 1.0, baseline_s: float = 2.0) -> dict:
    launcher, ranks = load_run(run_dir)
    steps = [r for r in ranks if "step" in r and "event" not in r]
    if not steps:
        return {"num_steps": 0}
    t0 = min(s["t"] for s in steps)
    t1 = max(s["t"] for s in steps)
    commits = [e for e in launcher if e.get("event") == "commit"]
    faults = [e for e in launcher if e.get("event") == "fault" and e["action"] in ("kill", "stop")]
    summary: dict = {"num_steps": len(steps), "num_tokens": sum(s["tokens"] for s in steps), "duration_s": t1 - t0,
                     "mean_tokens_per_s": sum(s["tokens"] for s in steps) / max(t1 - t0, 1e-9),
                     "faults": [], "rejoins": []}

    def survivors_of(epoch: int) -> set[tuple[int, int]]:
        return {(s["rank"], s["incarnation"]) for s in steps if s["epoch"] == epoch}

    def rate(a: float, b: float) -> float:
        return sum(s["tokens"] for s in steps if a <= s["t"] < b) / max(b - a, 1e-9)

    for fault in faults:
        tf = fault["t"]
        repair = next((c for c in commits if c["t"] >= tf and fault["target"] in c.get("failed", [])), None)
        entry = {"t_s": tf - t0, "action": fault["action"], "rank": fault["target"]}
        if repair is not None:
            entry["detect_and_repair_s"] = repair["t"] - tf
            entry["epoch"] = repair["epoch"]
            entry["recovery_pause_s"] = _pause(steps, survivors_of(repair["epoch"]), repair["epoch"])
        before = rate(max(t0, tf - baseline_s), tf)
        entry["pre_fault_tokens_per_s"] = before
        t = tf
        entry["time_to_95pct_s"] = None
        while t <= t1:
            if before > 0 and rate(t - window_s, t) >= 0.95 * before and t - window_s >= tf:
                entry["time_to_95pct_s"] = t - tf
                break
            t += bin_s
        # the survivors' own level, between the repair and the rank's return (what absorbing buys)
        rejoin = next((c for c in commits if repair is not None and c["t"] > repair["t"]
                       and fault["target"] in (c.get("joined") or [])), None)
        if repair is not None and rejoin is not None and rejoin["t"] - repair["t"] > 2 * window_s and before > 0:
            entry["degraded_fraction"] = rate(repair["t"] + window_s, rejoin["t"]) / before
        summary["faults"].append(entry)
    for c in commits:
        if c.get("reason") == "join" or (c.get("joined") and c.get("reason") != "start"):
            survivors = {w for w in survivors_of(c["epoch"]) if w[0] not in c["joined"]}
            summary["rejoins"].append({"t_s": c["t"] - t0, "ranks": c["joined"], "epoch": c["epoch"],
                                       "reintegration_pause_s": _pause(steps, survivors, c["epoch"])})
    summary["coverage"] = _coverage(launcher, t0)
    summary["plans"] = _plans(commits, ranks)
    return summary


def _coverage(launcher: list[dict], t0: float) -> list[dict]:
    out = []
    for e in launcher:
        if e.get("event") == "coverage_lost" and (not out or out[-1].get("end") is not None):
            out.append({"t_s": e["t"] - t0, "epoch": e["epoch"], "missing_slots": e["missing_slots"],
                        "uncovered_experts": sum(len(v) for v in e["uncovered"].values()), "end": None})
        elif e.get("event") in ("coverage_restored", "refused") and out and out[-1]["end"] is None:
            out[-1]["end"] = "restored" if e["event"] == "coverage_restored" else f"refused {e['num']} requests"
            out[-1]["held_s"] = e["t"] - t0 - out[-1]["t_s"]
    return out


def _plans(commits: list[dict], ranks: list[dict]) -> list[dict]:
    """Per commit with copies: predicted seconds per phase and the slowest member's observed copy time."""
    observed: dict[int, float] = {}
    for e in ranks:
        if e.get("event") == "commit" and e.get("restored"):
            observed[e["epoch"]] = max(observed.get(e["epoch"], 0.0), e["restore_s"])
    return [{"epoch": c["epoch"], "reason": c["reason"],
             "predicted_s": {p["phase"]: p["predicted_s"] for p in c["plan"]["phases"]},
             "observed_restore_s": observed.get(c["epoch"])}
            for c in commits if c.get("plan", {}).get("num_transfers")]
