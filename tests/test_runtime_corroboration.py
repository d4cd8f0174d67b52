"""Corroborated detection: a rank a peer reported *and* whose heartbeat stopped is dead at once.

The suspicion window here is long (60 x 50 ms = 3 s), so a stalled rank that is declared dead well
inside it can only have been declared dead through corroboration (docs/runtime.md, "corroboration").
The second test drives ``Coordinator._collect_acks`` directly over a real TCPStore: a reported rank that keeps beating
but never acks (alive but slow) gets the whole window, not the short one.
"""

import datetime
import os
import signal
import threading
import time
from pathlib import Path

import torch.distributed as dist

from eep.cli.answers import check_run
from eep.runtime import Fault, Launcher, RuntimeConfig
from eep.runtime.control.auth import Sealer
from eep.runtime.control.coordinator import Coordinator
from eep.runtime.control.keys import Key, store_key
from eep.runtime.control.timeline import Timeline, read_jsonl

RUN_TIMEOUT_S = 40


def _kill_leftovers(launcher: Launcher) -> None:
    # The launcher SIGCONTs and reaps its ranks at shutdown; this only matters if the run itself raised.
    for proc in getattr(launcher, "procs", {}).values():
        if proc is not None and proc.exitcode is None:
            for sig in (signal.SIGCONT, signal.SIGKILL):
                try:
                    os.kill(proc.pid, sig)
                except OSError:
                    pass
            proc.join(timeout=5)


def test_sigstopped_rank_is_dead_by_corroboration_before_the_suspicion_window(tmp_path):
    victim = 2
    cfg = RuntimeConfig(num_ranks=4, num_requests=400, heartbeat_interval_s=0.05, suspect_misses=60,
                        corroborate_misses=3, transport_timeout_s=0.2, restart_after_s=None,
                        startup_timeout_s=30)
    assert cfg.corroboration_window_s < cfg.suspicion_window_s == 3.0
    launcher = Launcher(cfg, run_dir=tmp_path, faults=[Fault("stop", victim, at_results=40)])
    try:
        result = launcher.run(timeout_s=RUN_TIMEOUT_S)
    finally:
        _kill_leftovers(launcher)
    assert not result.is_timed_out, f"run timed out; timelines in {tmp_path}"
    assert not check_run(cfg, result), check_run(cfg, result)
    assert result.num_answered == cfg.num_requests
    assert all(code is not None for code in result.exit_codes.values()), "a rank process outlived the launcher"

    events = read_jsonl(Path(tmp_path) / "launcher.jsonl")
    fault = next(e for e in events if e.get("event") == "fault" and e["action"] == "stop")
    corroborated = [i for i, e in enumerate(events) if e.get("event") == "corroborated" and victim in e["ranks"]]
    assert corroborated, f"no corroborated event for rank {victim}: {[e.get('event') for e in events]}"
    failed = [i for i, e in enumerate(events) if e.get("event") == "commit" and victim in e["failed"]]
    assert failed and failed[0] > corroborated[0], "the commit failing the stopped rank must follow corroboration"
    commit = events[failed[0]]
    # the short path was taken: the long window alone could not have failed it this soon
    took_s = commit["t"] - fault["t"]
    assert took_s < 0.8 * cfg.suspicion_window_s, f"stopped rank failed after {took_s:.2f} s, not corroborated"
    assert any(e.get("event") == "report" and victim in (e.get("missed") or []) for e in events[:failed[0]])
    survivors = [r != victim for r in range(cfg.num_ranks)]
    assert [d for d in result.decisions if d["kind"] == "commit"][-1]["active"] == survivors


def test_reported_rank_that_keeps_beating_gets_the_whole_window(tmp_path):
    cfg = RuntimeConfig(num_ranks=4, heartbeat_interval_s=0.05, suspect_misses=10, corroborate_misses=3)
    store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False,
                          timeout=datetime.timedelta(seconds=10))
    run_id = "corr"
    sealer = Sealer(os.urandom(32), run_id)
    timeline = Timeline(tmp_path / "launcher.jsonl", None, None)
    coord = Coordinator(cfg, store, sealer, run_id, timeline, is_dead=lambda r: False)
    coord.incarnation = {r: 0 for r in range(cfg.num_ranks)}
    slow, epoch = 1, 1
    stop = threading.Event()

    def beat():  # the heartbeat thread of a rank whose main thread is stuck: beats, never acks
        beats = dist.TCPStore("127.0.0.1", store.port, is_master=False, timeout=datetime.timedelta(seconds=10))
        seq = 0
        key = store_key(run_id, Key.HEARTBEAT, slow)
        while not stop.is_set():
            beats.set(key, sealer.seal(key, {"rank": slow, "incarnation": 0, "seq": seq}))
            seq += 1
            time.sleep(cfg.heartbeat_interval_s)

    for r in (0, 2, 3):
        key = store_key(run_id, Key.ACK, epoch, r)
        store.set(key, sealer.seal(key, {"rank": r, "epoch": epoch, "step": 7}))
    thread = threading.Thread(target=beat, daemon=True)
    thread.start()
    try:
        start = time.monotonic()
        acks, missing = coord._collect_acks(epoch, [0, 1, 2, 3], suspects={slow})
        took_s = time.monotonic() - start
    finally:
        stop.set()
        thread.join(timeout=5)
        timeline.close()
    assert acks == {0: 7, 2: 7, 3: 7} and missing == [slow]
    assert took_s >= 0.9 * cfg.suspicion_window_s, f"a beating rank was failed after {took_s:.2f} s"
    assert not [e for e in read_jsonl(tmp_path / "launcher.jsonl") if e.get("event") == "corroborated"]
