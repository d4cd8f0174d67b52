"""A compact summary of failure benchmark runs side by side (tests/gpu/run_repair.sh prints it last).

    python perf/repair_summary.py OUT_DIR NAME [NAME ...]

Reads ``OUT_DIR/NAME/results.json`` (``perf/failure_bench.py --out OUT_DIR/NAME``) for each run and
prints, per run: requests lost, refused and changed; the recovery, re-replication switch and
reintegration pauses; predicted vs observed seconds of each repair phase; live replicas per expert
(min/mean/max, single-replica experts) before the fault, after repair, after re-replication and
after the rejoin. With a ``disk-tier`` and a ``shm-tier`` run it adds how much slower the
host tier on local disk made the orphan restores, the recovery pause and the joiner's start-up.
Writes ``OUT_DIR/repair_summary.json``; exits 1, with a ``FAIL`` line per reason, when a run is
missing or failed, or lost, refused or changed answers, or its answers went unchecked, or the oracle
disagreed with a token it decides.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

PHASES = ("routing-only", "orphan-restore", "re-replication", "reintegration")
POINTS = (("before_fault", "before"), ("after_repair", "repair"), ("after_rereplication", "re-repl."),
          ("after_rejoin", "rejoin"))


def run_summary(results: dict) -> dict:
    """What one run's ``results.json`` says about its repair."""
    f = results.get("failure") or {}
    phases: dict[str, dict] = {}
    for commit in f.get("phases") or []:
        for p in commit["phases"]:
            mine = phases.setdefault(p["phase"], {"predicted_s": 0.0, "observed_s": 0.0, "copies": 0})
            mine["predicted_s"] += p["predicted_s"]
            mine["observed_s"] += p["observed_s"] or 0.0
            mine["copies"] += p["transfers"]
    joiner = next((b for b in f.get("breakdown") or [] if b.get("joiner_startup_s") is not None), {})
    return {"error": f.get("error") or (results.get("errors") or {}).get("failure"),
            "lost": f.get("requests_lost"), "refused": f.get("requests_refused"), "changed": f.get("mismatched"),
            "oracle_disagreements": f.get("oracle_disagreements"), "oracle_decided": f.get("oracle_decided"),
            "experts": (results.get("config") or {}).get("experts"), "recovery_pause_s": f.get("recovery_pause_s"),
            "rereplication_pause_s": f.get("rereplication_pause_s"),
            "reintegration_pause_s": f.get("reintegration_pause_s"), "time_to_95pct_s": f.get("time_to_95pct_s"),
            "joiner_startup_s": joiner.get("joiner_startup_s"), "phases": phases, "replicas": f.get("replicas") or {}}


def _ms(seconds: float | None) -> str:
    return "n/a" if seconds is None else f"{seconds * 1e3:.1f} ms"


def _ratio(a: float | None, b: float | None) -> str:
    return "n/a" if not a or not b else f"{a / b:.2f}x"


def summary_lines(runs: dict[str, dict]) -> list[str]:
    lines = []
    for name, r in runs.items():
        if r is None:
            lines.append(f"{name}: no results")
            continue
        experts = f" [{r['experts']} experts]" if r.get("experts") else ""
        lines.append(f"{name}{experts}: lost {r['lost']}, refused {r['refused']}, changed {r['changed']} (oracle "
                     f"disagreements {r['oracle_disagreements']} of {r.get('oracle_decided')} decided tokens); "
                     f"pauses: recovery {_ms(r['recovery_pause_s'])}, "
                     f"re-replication switch {_ms(r['rereplication_pause_s'])}, reintegration "
                     f"{_ms(r['reintegration_pause_s'])}; back to 95% {_ms(r['time_to_95pct_s'])}"
                     + (f"; ERROR {r['error'][:200]}" if r["error"] else ""))
        lines.append("  predicted -> observed: " + "; ".join(
            f"{k} {_ms(p['predicted_s'])} -> {_ms(p['observed_s'])} ({p['copies']} copies)"
            for k in PHASES if (p := r["phases"].get(k))))
        lines.append("  replicas min/mean/max (single): " + "; ".join(
            f"{label} {c['min']}/{c['mean']:.2f}/{c['max']} ({c['single']})"
            for key, label in POINTS if (c := r["replicas"].get(key))))
    disk, shm = runs.get("disk-tier"), runs.get("shm-tier")
    if disk and shm:
        restore = [(r["phases"].get("orphan-restore") or {}).get("observed_s") for r in (disk, shm)]
        lines.append(f"host tier on local disk vs /dev/shm: orphan restores {_ratio(*restore)}, recovery pause "
                     f"{_ratio(disk['recovery_pause_s'], shm['recovery_pause_s'])}, joiner start-up "
                     f"{_ratio(disk['joiner_startup_s'], shm['joiner_startup_s'])}")
    return lines


def problems(r: dict | None) -> list[str]:
    """Why a run does not pass (empty when it does): every count must be a measured 0."""
    if r is None:
        return ["no results"]
    out = [f"error: {r['error'][:300]}"] if r["error"] else []
    for key, what in (("lost", "requests lost"), ("refused", "requests refused"), ("changed", "answers changed"),
                      ("oracle_disagreements", "oracle disagreements")):
        if r.get(key) is None:
            out.append(f"{what}: not measured")
        elif r[key] != 0:
            out.append(f"{what}: {r[key]}")
    return out


def is_ok(r: dict | None) -> bool:
    return not problems(r)


def main(argv: list[str]) -> int:
    out = Path(argv[0])
    runs = {}
    for name in argv[1:]:
        path = out / name / "results.json"
        runs[name] = run_summary(json.loads(path.read_text())) if path.exists() else None
    (out / "repair_summary.json").write_text(json.dumps(runs, indent=1))
    print("=== repair summary")
    print("\n".join(summary_lines(runs)), flush=True)
    failed = {name: problems(r) for name, r in runs.items() if problems(r)}
    for name, why in failed.items():
        print(f"FAIL {name}: " + "; ".join(why), file=sys.stderr, flush=True)
    return 1 if failed or not runs else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
