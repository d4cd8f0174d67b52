"""The elastic runtime with real processes and real signals.

Each test runs a launcher in this process over 4 rank processes (forkserver children) with short
timeouts (heartbeat 50 ms, 5-10 misses), injects faults, and checks that every request is answered
exactly once with the tokens of the single-process reference. Every run is bounded by
``Launcher.run(timeout_s=...)``; a timeout is a failure, never a hang.
"""

import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from eep.cli.answers import check_run
from eep.runtime import Fault, Launcher, RuntimeConfig
from eep.runtime.control.keys import Key, store_key
from eep.runtime.control.timeline import read_jsonl

RUN_TIMEOUT_S = 40


def _config(**overrides) -> RuntimeConfig:
    # 10 x 50 ms suspicion window: kills are seen by process exit; the wider window keeps a loaded
    # CI machine from adding false-positive decisions that the assertions would have to allow for.
    base = dict(num_ranks=4, num_requests=240, heartbeat_interval_s=0.05, suspect_misses=10,
                transport_timeout_s=0.5, restart_after_s=0.3, startup_timeout_s=30)
    base.update(overrides)
    return RuntimeConfig(**base)


def _run(cfg, faults, tmp_path, **kwargs):
    launcher = Launcher(cfg, run_dir=tmp_path, faults=faults, **kwargs)
    result = launcher.run(timeout_s=RUN_TIMEOUT_S)
    assert not result.is_timed_out, f"run timed out; timelines in {tmp_path}"
    problems = check_run(cfg, result)
    assert not problems, problems
    assert result.num_answered == cfg.num_requests
    assert all(code is not None for code in result.exit_codes.values()), "a rank process outlived the launcher"
    return result


def _commits(result, reason=None):
    return [d for d in result.decisions if d["kind"] == "commit" and (reason is None or d["reason"] == reason)]


def test_sigkill_at_random_step_then_restart_and_rejoin(tmp_path):
    cfg = _config(num_requests=400)
    at = random.Random().randint(10, cfg.num_requests // 4)  # leaves work for the restarted rank
    victim = random.Random().randrange(cfg.num_ranks)
    result = _run(cfg, [Fault("kill", victim, at_results=at)], tmp_path)
    fails = [d for d in _commits(result) if victim in d["failed"]]
    joins = [d for d in _commits(result) if str(victim) in d["joined"] and d["reason"] != "start"]
    assert fails and joins and joins[-1]["epoch"] > fails[0]["epoch"], result.decisions
    assert _commits(result)[-1]["active"] == [True] * cfg.num_ranks
    served_after = {inc for (rank, inc, _) in result.served_by.values() if rank == victim}
    assert 1 in served_after, "the restarted incarnation never served"
    fault = result.summary["faults"][0]
    assert fault["recovery_pause_s"] is not None and fault["recovery_pause_s"] < 2.0


def test_sigkill_during_repair(tmp_path):
    cfg = _config(restart_after_s=None)
    faults = [Fault("kill", 1, at_results=40), Fault("kill", 3, on_phase="prepare_fail")]
    result = _run(cfg, faults, tmp_path)
    last = _commits(result)[-1]
    assert last["active"] == [True, False, True, False], result.decisions


def test_two_ranks_die_together(tmp_path):
    cfg = _config(restart_after_s=None)
    result = _run(cfg, [Fault("kill", 0, at_results=50), Fault("kill", 2, at_results=50)], tmp_path)
    assert _commits(result)[-1]["active"] == [False, True, False, True]
    assert sum(len(q) for d in _commits(result) for q in d["requeue"].values()) > 0


def test_sigkill_during_rejoin(tmp_path):
    cfg = _config(max_restarts=3, num_requests=500)  # enough work left for the third incarnation to join
    # rank 2 dies, restarts, and is killed again while its join is being prepared; it comes back again.
    faults = [Fault("kill", 2, at_results=30), Fault("kill", 2, on_phase="prepare_join")]
    result = _run(cfg, faults, tmp_path)
    assert _commits(result)[-1]["active"] == [True] * cfg.num_ranks, result.decisions
    assert "2.2" in result.exit_codes  # third incarnation ran


@pytest.mark.parametrize("evidence", ["heartbeat", "transport"])
def test_sigstop_past_timeout_is_fenced_then_rejoins(tmp_path, evidence):
    if evidence == "heartbeat":  # heartbeats go silent first: 5 x 50 ms window < 0.5 s transport timeout
        cfg = _config(restart_after_s=None, num_requests=600, suspect_misses=5)
        stop_s = 0.6
    else:  # survivors' receives time out first (0.2 s) and report; the resync prepare finds it silent
        cfg = _config(restart_after_s=None, num_requests=600, suspect_misses=12, transport_timeout_s=0.2)
        stop_s = 1.2
    faults = [Fault("stop", 2, at_results=40), Fault("cont", 2, after_s=stop_s)]
    result = _run(cfg, faults, tmp_path)
    commits = _commits(result)
    if evidence == "transport":
        assert any(d["reason"] in ("resync", "fail") and 2 in d["failed"] for d in commits), result.decisions
        assert any(e.get("event") == "report" for e in read_jsonl(Path(tmp_path) / "launcher.jsonl"))
    failed_at = next(d["epoch"] for d in commits if 2 in d["failed"])
    rejoined = [d for d in commits if "2" in d["joined"] and d["epoch"] > failed_at]
    assert rejoined, result.decisions
    events = read_jsonl(Path(tmp_path) / "rank2-0.jsonl")
    fenced = [e for e in events if e.get("event") == "fenced"]
    assert fenced and fenced[0]["epoch"] >= failed_at
    # no step of the stalled incarnation completed under an epoch it was not a member of
    member_epochs = {d["epoch"] for d in commits if d["active"][2]}
    assert all(e["epoch"] in member_epochs for e in events if "step" in e and "event" not in e)
    # its late writes: no answer of it landed between the commit that fenced it and the one that
    # took it back (what it finished after waking was re-queued elsewhere, and is dropped)
    launcher_events = read_jsonl(Path(tmp_path) / "launcher.jsonl")
    fenced_at = next(e["t"] for e in launcher_events if e.get("event") == "commit" and e["epoch"] == failed_at)
    back_at = next(e["t"] for e in launcher_events if e.get("event") == "commit" and e["epoch"] == rejoined[0]["epoch"])
    late = [q for q, (rank, inc, _) in result.served_by.items()
            if (rank, inc) == (2, 0) and fenced_at < result.answered_at[q] < back_at]
    assert not late, f"answers of the fenced rank landed after its fence: {late}"


def test_forged_and_malformed_messages_are_ignored(tmp_path):
    # a long suspicion window: a heartbeat delayed by a loaded machine must not add a decision here
    cfg = _config(restart_after_s=None, num_requests=200, suspect_misses=40)
    launcher = Launcher(cfg, run_dir=tmp_path)
    stop = threading.Event()

    def inject():
        import datetime
        import torch.distributed as dist
        from eep.runtime.control.auth import Sealer
        while not stop.is_set() and not (hasattr(launcher, "coordinator") and launcher.coordinator.num_decisions):
            time.sleep(0.01)
        if stop.is_set():
            return
        store = dist.TCPStore(cfg.store_host, launcher.store.port, is_master=False,
                              timeout=datetime.timedelta(seconds=5))
        run = launcher.run_id
        forger = Sealer(b"not the secret", run)
        nxt = launcher.coordinator.num_decisions + 1
        key = store_key(run, Key.DECISION, nxt)  # a forged "rank 1 is dead" decision where ranks look next
        store.set(key, forger.seal(key, {"kind": "commit", "epoch": 99, "active": [True, False, True, True],
                                         "failed": [1], "joined": {}, "start_step": 0, "placement": {},
                                         "requeue": {}, "reason": "fail"}))
        store.set(store_key(run, Key.DECISION, nxt + 1), b"\x00garbage{")
        for i, raw in enumerate([b"not json", forger.seal("x", {"rank": 1, "nonce": "n", "incarnation": 0})]):
            n = store.add(store_key(run, Key.JOIN, "count"), 1)
            store.set(store_key(run, Key.JOIN, n), raw)
        n = store.add(store_key(run, Key.REPORT, "count"), 1)
        key = store_key(run, Key.REPORT, n)
        store.set(key, forger.seal(key, {"rank": 0, "epoch": 0, "missed": [3]}))
        for _ in range(10):  # forged heartbeats cannot keep a rank alive nor kill it
            key = store_key(run, Key.HEARTBEAT, 3)
            store.set(key, forger.seal(key, {"rank": 3, "incarnation": 0, "seq": -5}))
            time.sleep(0.02)

    thread = threading.Thread(target=inject, daemon=True)
    thread.start()
    try:
        result = launcher.run(timeout_s=RUN_TIMEOUT_S)
    finally:
        stop.set()
        thread.join(timeout=5)
    assert not result.is_timed_out
    assert not check_run(cfg, result)
    assert [d["reason"] for d in _commits(result)] == ["start"], result.decisions  # nothing forged applied
    assert result.num_rejected >= 3  # join x2, report (+ heartbeats) rejected by the coordinator
    rank_rejections = [e for p in Path(tmp_path).glob("rank*.jsonl") for e in read_jsonl(p)
                       if e.get("event") == "rejected_message"]
    assert rank_rejections, "ranks never saw (and rejected) the forged decision"


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/status") as f:
            state = next(line for line in f if line.startswith("State:"))
        return "Z" not in state.split()[1]  # a zombie has exited
    except (FileNotFoundError, ProcessLookupError):
        return False


def _launch_cli(run_dir, **popen_kwargs) -> subprocess.Popen:
    """``eep launch`` of 3 ranks with an endless request stream, as a user would start it."""
    cmd = [sys.executable, "-m", "eep.cli", "launch", "--ranks", "3", "--requests", "100000000",
           "--heartbeat-ms", "50", "--run-dir", str(run_dir), "--timeout", "60"]
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, **popen_kwargs)


def _kill_leftovers(proc: subprocess.Popen, pids: dict | None) -> None:
    """Whatever a failed test left running: the launcher and its rank processes."""
    if proc.poll() is None:
        proc.kill()
    for pid in (pids or {}).values():
        if _alive(pid):
            os.kill(pid, signal.SIGKILL)


def _wait_until_serving(run_dir, timeout_s: float = 30.0) -> dict:
    """The rank pids once rank 0 has logged a step (bounded wait)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        log = run_dir / "rank0-0.jsonl"
        if log.exists() and any('"step"' in line for line in open(log)):
            return json.loads((run_dir / "pids.json").read_text())["ranks"]
        time.sleep(0.1)
    raise AssertionError("the run never started serving")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_ranks_exit_when_the_launcher_dies(tmp_path):
    run_dir = tmp_path / "run"
    proc = _launch_cli(run_dir)
    pids = None
    try:
        pids = _wait_until_serving(run_dir)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
        bound_s = 0.05 + 1.0  # heartbeat interval + orphan grace (docs/runtime.md)
        deadline = time.monotonic() + bound_s + 3.0  # slack for a loaded CI machine
        while time.monotonic() < deadline and any(_alive(p) for p in pids.values()):
            time.sleep(0.05)
        alive = [p for p in pids.values() if _alive(p)]
        assert not alive, f"rank processes {alive} outlived their launcher"
    finally:
        _kill_leftovers(proc, pids)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_ctrl_c_shuts_everything_down(tmp_path):
    run_dir = tmp_path / "run"
    proc = _launch_cli(run_dir, start_new_session=True)
    pids = None
    try:
        pids = _wait_until_serving(run_dir)
        run_id = json.loads(open(run_dir / "launcher.jsonl").readline())["run_id"]
        os.killpg(proc.pid, signal.SIGINT)  # what a terminal's Ctrl-C does: the whole process group
        assert proc.wait(timeout=15) == 1  # interrupted, not a clean finish
        assert not [p for p in pids.values() if _alive(p)]
        from eep import envs
        assert not os.path.exists(os.path.join(envs.shm_dir(), f"eep-{run_id}.shm"))
        assert any(e.get("event") == "shutdown" for e in read_jsonl(run_dir / "launcher.jsonl"))
    finally:
        _kill_leftovers(proc, pids)
