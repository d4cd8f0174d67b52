"""Robustness of the elastic runtime when peers vanish at awkward moments (docs/runtime.md,
"Peer loss at a commit" and "Joins after every member died").

1. A joiner killed (or stopped) just before the commit that admits it reaches the survivors: the
   survivors cannot map its buffer. That is the joiner's failure: they stall, report it, and serve
   again once the coordinator commits without it; none exits. Driven through ``GpuEngine`` on CPU
   (engine ``cpu_elastic``), whose exchange connects a peer through the same fd-server handshake as
   the fused GPU buffer (``eep.exchange.shm.ShmExchange.connect``; tests/test_exchange.py checks the
   handshake's bound), in real rank processes; the fault fires on the
   coordinator's ``commit_join`` phase (after every ack, before the commit is published) and the
   launcher returns only once the rank is gone, so the race is deterministic.
2. Every member died; restarted ranks join one at a time and the first ones alone cannot cover the
   experts: their joins wait and are committed together with later joiners (a real Coordinator on a
   real TCPStore; and end to end through the launcher).
3. Every rank process exited and none will restart: the run ends at once with an error.
"""

import dataclasses
import datetime
import os
import secrets
import sys
import time
from pathlib import Path

import pytest
import torch.distributed as dist

from eep.cli.answers import check_run
from eep.runtime import Fault, Launcher, RuntimeConfig
from eep.runtime.control.auth import Sealer
from eep.runtime.control.coordinator import Coordinator
from eep.runtime.control.keys import Key, store_key
from eep.runtime.control.timeline import Timeline, read_jsonl

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "perf"))
import failure_bench  # noqa: E402

pytest.importorskip("safetensors")

RUN_TIMEOUT_S = 60


# ---- a joiner lost while the survivors map it (real processes, GpuEngine on CPU) ----------------

@pytest.fixture(scope="module")
def elastic(tmp_path_factory):
    args = failure_bench.parse_args(["--dry-run", "--gpus", "3", "--failure-engine", "cpu_elastic",
                                     "--out", str(tmp_path_factory.mktemp("out"))])
    shards = failure_bench.prepare_shards(args, tmp_path_factory.mktemp("peer-loss"))
    yield args, shards["shard_dir"]
    for leftover in (shards["host_tier_path"], shards["host_tier_path"] + ".lock"):
        if os.path.exists(leftover):
            os.unlink(leftover)


def _elastic_run(args, shard_dir, tmp_path, faults, *, num_requests):
    cfg = failure_bench.runtime_config(args, "cpu_elastic", shard_dir, num_requests=num_requests,
                                       restart_after_s=0.3)
    cfg = dataclasses.replace(cfg, max_restarts=2)
    assert cfg.peer_connect_timeout_s < cfg.suspicion_window_s
    launcher = Launcher(cfg, run_dir=tmp_path, faults=faults)
    result = launcher.run(timeout_s=RUN_TIMEOUT_S)
    assert not result.is_timed_out and result.error is None, f"run failed ({result.error}); timelines in {tmp_path}"
    assert result.num_answered == cfg.num_requests, "requests were lost"
    got = failure_bench.check_answers(args, cfg, result)
    assert got["inconsistent_tokens"] == 0 and got["oracle_disagreements"] == 0, got
    return cfg, result


def _survivor_checks(tmp_path, result, victim=1):
    """The commit that admitted ``victim`` (which it never saw through) stalled every survivor on
    ``connect``; none served a step in that epoch, none exited; a later commit failed the victim."""
    commits = [d for d in result.decisions if d["kind"] == "commit"]
    joins = [d for d in commits if str(victim) in d["joined"] and d["reason"] == "join"]
    assert joins, result.decisions
    join_epoch = joins[0]["epoch"]
    for r in (0, 2):
        assert result.exit_codes[f"{r}.0"] == 0, f"survivor {r} exited: {result.exit_codes}"
        events = read_jsonl(Path(tmp_path) / f"rank{r}-0.jsonl")
        stalls = [e for e in events if e.get("event") == "stalled" and e.get("where") == "connect"]
        assert stalls and stalls[0]["epoch"] == join_epoch and stalls[0]["missed"] == [victim], stalls
        assert not [e for e in events if "step" in e and "event" not in e and e["epoch"] == join_epoch], \
            f"survivor {r} served a step while rank {victim}'s buffer was unmapped"
    failed = [d for d in commits if victim in d["failed"] and d["epoch"] > join_epoch]
    assert failed, result.decisions
    return join_epoch, failed[0]


def test_joiner_killed_before_its_commit_reaches_the_survivors(elastic, tmp_path):
    args, shard_dir = elastic
    # rank 1 dies, restarts, and is killed again just before the commit of its join is published
    faults = [Fault("kill", 1, at_results=20), Fault("kill", 1, on_phase="commit_join")]
    cfg, result = _elastic_run(args, shard_dir, tmp_path, faults, num_requests=900)
    _survivor_checks(tmp_path, result)
    assert result.exit_codes["1.1"] not in (None, 0)  # the killed joiner
    assert [d for d in result.decisions if d["kind"] == "commit"][-1]["active"][0::2] == [True, True]


def test_joiner_stopped_before_its_commit_is_failed_on_the_survivors_reports(elastic, tmp_path):
    args, shard_dir = elastic
    # stopped, not dead, until the launcher's shutdown continues it: no process exit tells the
    # launcher; only the survivors' reports (and the resync it then does not ack) do
    faults = [Fault("kill", 1, at_results=20), Fault("stop", 1, on_phase="commit_join")]
    cfg, result = _elastic_run(args, shard_dir, tmp_path, faults, num_requests=900)
    join_epoch, failed = _survivor_checks(tmp_path, result)
    assert failed["reason"] == "fail", failed  # decided on the reports and the missing ack, not on an exit
    events = read_jsonl(Path(tmp_path) / "launcher.jsonl")
    assert not [e for e in events if e.get("event") == "exit" and e["target"] == 1 and e["incarnation"] == 1]
    commit_join = next(e for e in events if e.get("event") == "commit" and e["epoch"] == join_epoch)
    commit_fail = next(e for e in events if e.get("event") == "commit" and e["epoch"] == failed["epoch"])
    reports = [e for e in events if e.get("event") == "report" and 1 in (e.get("missed") or [])
               and commit_join["t"] <= e["t"] <= commit_fail["t"]]
    assert reports, "no survivor reported the unmapped joiner"
    # the handshake wait is bounded: the survivors reported well inside the suspicion window
    assert reports[0]["t"] - commit_join["t"] < cfg.suspicion_window_s, (reports[0], commit_join)


# ---- joins after every member died -------------------------------------------------------------

class _FakeRanks:
    """Join requests and deaths of rank processes, as the coordinator sees them in the store."""

    def __init__(self, store, sealer, run_id):
        self.store, self.sealer, self.run_id = store, sealer, run_id
        self.dead: set[int] = set()
        self.incarnation: dict[int, int] = {}

    def join(self, rank: int) -> str:
        self.dead.discard(rank)
        self.incarnation[rank] = self.incarnation.get(rank, -1) + 1
        nonce = secrets.token_hex(8)
        index = self.store.add(store_key(self.run_id, Key.JOIN, "count"), 1)
        key = store_key(self.run_id, Key.JOIN, index)
        self.store.set(key, self.sealer.seal(key, {"rank": rank, "incarnation": self.incarnation[rank],
                                                   "nonce": nonce}))
        return nonce


def test_joins_wait_until_enough_ranks_cover_the_experts(tmp_path):
    # 6 slots per rank, 16 experts: two ranks (12 slots) cannot hold every expert, three can
    cfg = RuntimeConfig(num_ranks=4, slots_per_rank=6, num_redundant=4, num_requests=30,
                        heartbeat_interval_s=0.05, suspect_misses=4)
    store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False,
                          timeout=datetime.timedelta(seconds=10))
    run_id = "wipe"
    sealer = Sealer(os.urandom(32), run_id)
    timeline = Timeline(tmp_path / "launcher.jsonl", None, None)
    ranks = _FakeRanks(store, sealer, run_id)
    coord = Coordinator(cfg, store, sealer, run_id, timeline, is_dead=lambda r: r in ranks.dead)
    proposals = []
    propose = coord.propose
    coord.propose = lambda **kw: (kw["reason"] == "join" and proposals.append(sorted(kw["joined"]))) or propose(**kw)
    try:
        for r in range(4):
            ranks.join(r)
        coord.start(5.0)
        # 12 requests handed out: 0-4 answered, 5-11 owned by ranks that are about to die
        store.add(store_key(run_id, Key.QUEUE_NEXT), 12)
        for q in range(12):
            store.set(store_key(run_id, Key.OWNER, q), f"{q % 4}:0:0")
        for q in range(5):
            store.set(store_key(run_id, Key.RESULT, q), "[1]")
        ranks.dead = {0, 1, 2, 3}
        coord.fail([0, 1, 2, 3], reason="exit")
        assert coord.membership is None

        def poll(times=20):
            for _ in range(times):
                coord.poll()

        nonce = {1: ranks.join(1)}
        poll()
        assert proposals == [[1]] and coord.membership is None and set(coord.pending_joins) == {1}
        nonce[3] = ranks.join(3)
        poll()
        assert proposals == [[1], [1, 3]], "the held join was not proposed again with the new joiner"
        assert coord.membership is None and set(coord.pending_joins) == {1, 3}
        ranks.dead.add(3)  # a waiting joiner dies: dropped, and {1} alone is not proposed again
        poll()
        assert set(coord.pending_joins) == {1} and len(proposals) == 2
        nonce[3] = ranks.join(3)  # its next incarnation: the same slots, still not enough
        poll()
        assert len(proposals) == 2 and set(coord.pending_joins) == {1, 3}
        nonce[0] = ranks.join(0)
        poll()
        assert proposals[-1] == [0, 1, 3] and coord.pending_joins == {}
        commit = coord.decisions[-1]
        assert commit["reason"] == "join" and commit["active"] == [True, True, False, True]
        assert commit["joined"] == {str(r): nonce[r] for r in (0, 1, 3)}
        requeued = sorted(q for qs in commit["requeue"].values() for q in qs)
        assert requeued == list(range(5, 12)), "unanswered requests of the dead ranks were not all re-queued"
        ranks.join(2)  # the last one joins a serving membership, as usual (its members ack)
        for r in (0, 1, 3):
            key = store_key(run_id, Key.ACK, coord.epoch + 1, r)
            store.set(key, sealer.seal(key, {"rank": r, "epoch": coord.epoch + 1, "step": 9}))
        poll()
        assert coord.decisions[-1]["joined"].keys() == {"2"} and coord.active == [True] * 4
        dropped = [e for e in read_jsonl(tmp_path / "launcher.jsonl") if e.get("event") == "join_dropped"]
        assert [e["rank"] for e in dropped] == [3]
    finally:
        timeline.close()


class _StaggeredRestarts(Launcher):
    """Restarts rank ``r`` ``r * stagger_s`` later than the others, so joins arrive one at a time."""

    stagger_s = 0.6

    def _reap(self):
        before = set(self.restart_at)
        super()._reap()
        for r in set(self.restart_at) - before:
            self.restart_at[r] += r * self.stagger_s


def test_every_rank_killed_then_restarted_one_at_a_time_comes_back(tmp_path):
    # shm engine, 8 slots per rank, 16 experts: one restarted rank alone cannot serve, two can
    cfg = RuntimeConfig(num_ranks=4, num_requests=300, heartbeat_interval_s=0.05, suspect_misses=10,
                        transport_timeout_s=0.5, restart_after_s=0.3, startup_timeout_s=30)
    faults = [Fault("kill", r, at_results=40) for r in range(4)]
    result = _StaggeredRestarts(cfg, run_dir=tmp_path, faults=faults).run(timeout_s=RUN_TIMEOUT_S)
    assert not result.is_timed_out and result.error is None, f"timelines in {tmp_path}"
    assert not check_run(cfg, result), check_run(cfg, result)
    assert result.num_answered == cfg.num_requests
    events = read_jsonl(Path(tmp_path) / "launcher.jsonl")
    alone = [e for e in events if e.get("event") == "unrepairable" and len(e.get("joined") or []) == 1]
    assert alone, "the first restarted rank was never proposed alone (the test did not stagger the joins)"
    first = alone[0]["joined"][0]
    back = next(d for d in result.decisions if d["kind"] == "commit" and d["epoch"] >= alone[0]["epoch"]
                and d["reason"] == "join")
    assert str(first) in back["joined"] and len(back["joined"]) >= 2, back
    assert sum(len(q) for q in back["requeue"].values()) > 0  # the dead ranks' requests, dealt to the new ones


# ---- nothing left to run -----------------------------------------------------------------------

def test_run_ends_at_once_when_every_rank_exited_and_none_will_restart(tmp_path):
    cfg = RuntimeConfig(num_ranks=4, num_requests=400, heartbeat_interval_s=0.05, suspect_misses=10,
                        transport_timeout_s=0.5, restart_after_s=None, startup_timeout_s=30)
    faults = [Fault("kill", r, at_results=30) for r in range(4)]
    t0 = time.monotonic()
    result = Launcher(cfg, run_dir=tmp_path, faults=faults).run(timeout_s=RUN_TIMEOUT_S)
    took = time.monotonic() - t0
    assert not result.is_timed_out
    assert result.error and "every rank process has exited" in result.error and "none will restart" in result.error
    assert took < 15, f"the run took {took:.1f} s to notice that no rank was left"
    assert 30 <= result.num_answered < cfg.num_requests
    assert any(e.get("event") == "no_rank_left" for e in read_jsonl(Path(tmp_path) / "launcher.jsonl"))
