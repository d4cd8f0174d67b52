"""Repair by plan under faults, with real processes and real signals (docs/runtime.md "Repair by plan").

- three of four ranks SIGKILLed at once: the survivor cannot cover the experts, so the epoch it is
  left in serves nothing; every request is answered after a rejoin, or refused with an error that
  names the uncovered experts and the missing slots, and ``eep launch``'s exit status says which;
- a second rank SIGKILLed while the survivors' restores of the first repair are still copying
  (restores paced by ``restore_pace_gbps`` so the fault lands inside them): no healthy rank is
  failed for being busy, every answer is right;
- a survivor SIGKILLed during a rejoin: failed in the commit that admits the joiner (planned
  together) or in the next one, every answer right;
- the launcher (coordinator, store and supervisor in one process) SIGKILLed in the middle of a
  repair: the run ends by design, every rank exits within its bound, and a restarted launcher
  serves a new run from scratch;
- ranks that die during start-up are reported at once, with their exit codes and errors;
- re-replication: after a repair the survivors copy extra replicas from each other's slots into
  their spare slots while they serve, then one commit switches the maps, so a second SIGKILL is
  routing-only; a restarted rank fills its slots from the survivors' replicas before it joins.

Every run is bounded (``Launcher.run(timeout_s=...)``); a timeout is a failure, never a hang.
"""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

import eep.cli as eep_cli
from eep.cli import launch
from eep.cli.answers import check_run
from eep.runtime import Fault, Launcher, RuntimeConfig
from eep.runtime.control.rules import RepairRules
from eep.runtime.control.timeline import read_jsonl

RUN_TIMEOUT_S = 60


def _config(**overrides) -> RuntimeConfig:
    base = dict(num_ranks=4, num_requests=240, heartbeat_interval_s=0.05, suspect_misses=10,
                transport_timeout_s=0.5, restart_after_s=None, startup_timeout_s=30)
    base.update(overrides)
    return RuntimeConfig(**base)


def _run(cfg, faults, tmp_path):
    result = Launcher(cfg, run_dir=tmp_path, faults=faults).run(timeout_s=RUN_TIMEOUT_S)
    assert not result.is_timed_out, f"run timed out; timelines in {tmp_path}"
    assert not check_run(cfg, result), check_run(cfg, result)
    assert all(code is not None for code in result.exit_codes.values()), "a rank process outlived the launcher"
    return result


def _commits(result):
    return [d for d in result.decisions if d["kind"] == "commit"]


def _cli(capsys, tmp_path, *args) -> tuple[int, dict]:
    code = eep_cli.main(["launch", "--ranks", "4", "--requests", "200", "--kill", "1@20", "--kill", "2@20", "--kill", "3@20",
                        "--heartbeat-ms", "50", "--suspect-misses", "10", "--transport-timeout-ms", "500",
                        "--run-dir", str(tmp_path), "--timeout", str(RUN_TIMEOUT_S), *args])
    return code, json.loads(capsys.readouterr().out)


def test_three_of_four_lost_without_restarts_refuses_naming_the_uncovered_experts(tmp_path, capsys):
    code, out = _cli(capsys, tmp_path)
    assert out["problems"] == [], out["problems"]  # 0 answers differ, none served from an invalid epoch
    assert code == launch.EXIT_REFUSED
    assert out["answered"] >= 20 and out["answered"] + out["refused"] == 200
    [reason] = out["refusal_reasons"]
    assert "after ranks [1, 2, 3] failed" in reason and "layer 0: experts [" in reason
    assert "8 more expert slots per layer are needed" in reason and "no rank can rejoin" in reason
    # the epoch that lost coverage was committed as one that serves nothing, and nothing was served in it
    events = read_jsonl(tmp_path / "launcher.jsonl")
    lost = next(e for e in events if e.get("event") == "coverage_lost")
    steps = [e for p in tmp_path.glob("rank*.jsonl") for e in read_jsonl(p) if "step" in e and "event" not in e]
    assert not [s for s in steps if s["epoch"] >= lost["epoch"]]


def test_three_of_four_lost_with_restarts_answers_everything_after_the_rejoin(tmp_path, capsys):
    code, out = _cli(capsys, tmp_path, "--restart-after", "0.3")
    assert (code, out["problems"], out["answered"], out["refused"]) == (0, [], 200, 0), out
    events = read_jsonl(tmp_path / "launcher.jsonl")
    lost = next(e for e in events if e.get("event") == "coverage_lost")
    restored = next(e for e in events if e.get("event") == "coverage_restored")
    assert restored["epoch"] > lost["epoch"]
    commit = next(e for e in events if e.get("event") == "commit" and e["epoch"] == restored["epoch"])
    assert commit["reason"] == "join" and commit["plan"]["valid"]
    # the rejoin copied the uncovered experts in (from the tier: no member held them)
    assert commit["plan"]["phases"][-1]["phase"] == "reintegration"


def test_second_rank_killed_while_the_first_repair_is_copying(tmp_path):
    cfg = _config(num_requests=300)
    # one expert takes 0.6 s to copy: every survivor's restores last at least that long
    cfg.restore_pace_gbps = RepairRules(cfg).expert_nbytes / 0.6 / 1e9
    faults = [Fault("kill", 1, at_results=40), Fault("kill", 2, after_s=0.3)]
    result = _run(cfg, faults, tmp_path)
    assert result.num_answered == cfg.num_requests
    # nobody else was failed for being busy copying when the second failure was decided
    assert [d["failed"] for d in _commits(result) if d["failed"]] == [[1], [2]]
    assert _commits(result)[-1]["active"] == [True, False, False, True]
    kill2 = next(e["t"] for e in read_jsonl(tmp_path / "launcher.jsonl")
                 if e.get("event") == "fault" and e["target"] == 2)
    first_repair = next(d["epoch"] for d in _commits(result) if d["failed"] == [1])
    windows = []
    for r in (0, 3):
        commit = next(e for e in read_jsonl(tmp_path / f"rank{r}-0.jsonl")
                      if e.get("event") == "commit" and e["epoch"] == first_repair)
        assert commit["restored"] > 0 and commit["planned_copies"] == commit["restored"]
        end = commit["t"] - commit["switch_s"]
        windows.append((end - commit["restore_s"], end))
    assert any(start < kill2 < end for start, end in windows), (kill2, windows)


def test_survivor_killed_during_a_rejoin(tmp_path):
    cfg = _config(num_requests=500, restart_after_s=0.3, max_restarts=2)
    faults = [Fault("kill", 2, at_results=30), Fault("kill", 0, on_phase="prepare_join")]
    result = _run(cfg, faults, tmp_path)
    assert result.num_answered == cfg.num_requests
    commits = _commits(result)
    summary = [(d["epoch"], d["failed"], sorted(d["joined"])) for d in commits]
    rejoin = next(d for d in commits if "2" in d["joined"] and d["reason"] != "start")
    fail0 = next(d for d in commits if 0 in d["failed"])
    # Rank 0 is killed right after the join's prepare is published. If it had not acked yet, one
    # commit fails it and admits the joiner, planned together; if its ack was already written, the
    # join commits with it as a member and the next commit fails it (its exit is seen then).
    assert fail0["epoch"] >= rejoin["epoch"], summary
    if fail0 is rejoin:
        phases = [p["phase"] for p in rejoin["plan"]["phases"]]
        assert phases[0] == "routing-only" and phases[-1] == "reintegration"
        assert not any(t[4] == 0 for t in rejoin["plan"]["transfers"])  # nothing copies from the dead rank
    assert commits[-1]["active"] == [True] * 4, summary


_DIES_DURING_REPAIR = """
import os, signal, sys
from eep.runtime import Fault, Launcher, RuntimeConfig

class DiesDuringRepair(Launcher):
    def _on_phase(self, name, info):
        super()._on_phase(name, info)
        if name == "prepare_fail":  # survivors are paused, waiting for the commit
            os.kill(os.getpid(), signal.SIGKILL)

if __name__ == "__main__":
    cfg = RuntimeConfig(num_ranks=3, num_requests=10**6, heartbeat_interval_s=0.05, suspect_misses=10,
                        transport_timeout_s=0.5, startup_timeout_s=30)
    DiesDuringRepair(cfg, run_dir=sys.argv[1], faults=[Fault("kill", 1, at_results=30)]).run(timeout_s=60)
"""


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/status") as f:
            state = next(line for line in f if line.startswith("State:"))
        return "Z" not in state.split()[1]
    except (FileNotFoundError, ProcessLookupError):
        return False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_launcher_killed_during_a_repair_ends_the_run_and_a_restart_serves_anew(tmp_path):
    script = tmp_path / "dies.py"
    script.write_text(_DIES_DURING_REPAIR)
    run_dir = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, str(script), str(run_dir)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, env={**os.environ, "PYTHONPATH": os.getcwd()})
    pids = {}
    try:
        assert proc.wait(timeout=90) == -signal.SIGKILL
        died_at = time.monotonic()
        pids = json.loads((run_dir / "pids.json").read_text())["ranks"]
        deadline = died_at + 0.05 + 1.0 + 3.0  # heartbeat + orphan grace (docs/runtime.md) + slack for CI
        while time.monotonic() < deadline and any(_alive(p) for p in pids.values()):
            time.sleep(0.05)
        assert not [p for p in pids.values() if _alive(p)], "ranks outlived the launcher"
    finally:
        if proc.poll() is None:
            proc.kill()
        for pid in pids.values():
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)
    events = read_jsonl(run_dir / "launcher.jsonl")
    assert [e for e in events if e.get("event") == "prepare" and e["failed"] == [1]], "it did not die in a repair"
    assert not [e for e in events if e.get("event") == "commit" and e["failed"]]
    from eep import envs
    assert not os.path.exists(os.path.join(envs.shm_dir(), f"eep-{events[0]['run_id']}.shm"))
    # restarted: a new run (new store, new decision log) serves every request of its own
    cfg = _config(num_ranks=3, num_requests=150)
    result = _run(cfg, [], tmp_path / "again")
    assert result.num_answered == cfg.num_requests


def test_ranks_that_die_during_start_up_are_reported_at_once_with_their_error(tmp_path):
    cfg = _config(num_requests=50, shard_dir=str(tmp_path / "no-such-shards"), startup_timeout_s=300)
    t0 = time.monotonic()
    result = Launcher(cfg, run_dir=tmp_path).run(timeout_s=RUN_TIMEOUT_S)
    took = time.monotonic() - t0
    assert took < 30, f"took {took:.0f} s to report dead ranks (start-up timeout 300 s)"
    assert result.error and "died during start-up" in result.error
    assert "exited with code 4" in result.error and "ManifestError" in result.error and "no-such-shards" in result.error
    assert result.num_answered == 0 and result.num_refused == cfg.num_requests
    # every refusal carries the error (the run's message adds how many were answered)
    assert all(result.error.startswith(reason) and "died during start-up" in reason for reason in result.refused.values())


def test_rereplication_makes_the_second_failure_routing_only(tmp_path):
    """Kill rank 1; the survivors re-replicate from each other's slots into their spare slots while they
    serve, and a commit switches the maps; then kill rank 2: its repair moves no bytes."""
    cfg = _config(num_requests=300, slots_per_rank=12)  # 48 slots: after one failure every expert fits twice
    faults = [Fault("kill", 1, at_results=40), Fault("kill", 2, on_phase="committed_rereplicate")]
    result = _run(cfg, faults, tmp_path)
    assert result.num_answered == cfg.num_requests
    commits = _commits(result)
    assert [(d["reason"], d["failed"]) for d in commits[:4]] == [("start", []), ("exit", [1]), ("rereplicate", []),
                                                                ("exit", [2])], commits
    first, switch, second = commits[1:4]
    assert [p["phase"] for p in first["plan"]["phases"]] == ["routing-only", "orphan-restore"]
    rep = switch["plan"]["transfers"]  # Transfer fields: layer, ckpt layer, expert, tier, src rank, src slot, dst..
    assert rep and all(t[3] == "peer" and t[4] in (0, 2, 3) and t[6] in (0, 2, 3) for t in rep)
    assert [p["phase"] for p in second["plan"]["phases"]] == ["routing-only"] and not second["plan"]["transfers"]
    # the copies were made while serving (from peers' slots), so the switch itself copied nothing
    events = [e for p in tmp_path.glob("rank*.jsonl") for e in read_jsonl(p)]
    copied = [e for e in events if e.get("event") == "rereplicated" and e["epoch"] == first["epoch"]]
    assert sum(e["copies"] for e in copied) == len(rep)
    assert all(set(e["restore_by_tier"]["by_tier"]) == {"peer"} for e in copied)
    at_switch = [e for e in events if e.get("event") == "commit" and e["epoch"] == switch["epoch"]]
    assert at_switch and all(e["restored"] == 0 for e in at_switch)
    served = [e for e in events if "step" in e and "event" not in e and e["epoch"] == first["epoch"]]
    started = min(e["t"] for e in events if e.get("event") == "rereplication_start")
    assert any(s["t"] > started for s in served), "no step was served while the copies ran"


def test_a_restarted_rank_fills_its_slots_from_peers_before_it_joins(tmp_path):
    # without re-replication the maps cannot change between its warm-up and its join: nothing is left to copy
    cfg = _config(num_requests=300, restart_after_s=0.3, max_restarts=1, rereplicate=False)
    result = _run(cfg, [Fault("kill", 1, at_results=40)], tmp_path)
    assert result.num_answered == cfg.num_requests
    join = next(d for d in _commits(result) if d["reason"] == "join")
    planned = [t for t in join["plan"]["transfers"] if t[6] == 1]
    assert planned and all(t[3] == "peer" and t[4] in (0, 2, 3) for t in planned)
    events = read_jsonl(tmp_path / "rank1-1.jsonl")
    request = next(e for e in events if e.get("event") == "join_request")
    # the warm-up ran the rejoin plan of the latest commit: every slot from a survivor's replica
    assert request["restore_by_tier"]["by_tier"].keys() == {"peer"}
    assert request["restore_by_tier"]["by_tier"]["peer"]["experts"] == len(planned)
    commit = next(e for e in events if e.get("event") == "commit" and e["epoch"] == join["epoch"])
    assert commit["restored"] == 0 and commit["planned_copies"] == len(planned)  # nothing left to copy
