"""The launcher: hosts the control store, starts and supervises the rank processes, coordinates.

- The ``torch.distributed.TCPStore`` is created here (``is_master=True``), on loopback unless an
  address is given, so the store outlives any rank.
- Ranks are ``multiprocessing`` processes from a *forkserver* that preloads torch and eep once, so
  starting (or restarting) a rank costs milliseconds, not a torch import. Not torchrun: torchrun
  tears every rank down when one dies; here a dead rank is only reported to the coordinator.
- A rank that exits is failed at once (strongest evidence) and, with ``restart_after_s``, started
  again as a new incarnation after that delay; it then rejoins through the normal join protocol.
- Ctrl-C (or ``stop()``): a sealed ``shutdown`` decision, then SIGTERM, then SIGKILL after
  ``shutdown_grace_s``; the shared-memory file is removed. No process outlives ``run()``.
- Faults can be injected for tests and the demo (``Fault``): SIGKILL / SIGSTOP / SIGCONT a rank
  when the answered-request count reaches a value, right after a prepare of a given kind, just
  before a commit of a given kind, or some seconds after the previous fault.
- If every rank process has exited and no restart is scheduled, nothing can ever answer again:
  the run ends at once with ``RunResult.error`` saying so, instead of waiting for its timeout. A
  rank that dies during start-up ends the start at once too, with its exit code and its error.
- An epoch that lost coverage serves nothing (docs/runtime.md "Coverage lost"): its requests are
  held until a rejoin restores coverage; when no rank can rejoin (none restarting, none waiting)
  or ``uncovered_hold_s`` passes, every unanswered request is refused with an error naming the
  uncovered experts and the missing slots. A run that ends early (``RunResult.error``) refuses what
  it did not answer with that error. Every request is answered or refused, none lost silently.
"""

from __future__ import annotations

import datetime
import json
import logging
import multiprocessing as mp
import multiprocessing.connection
import os
import secrets
import signal
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import torch.distributed as dist

from eep import envs
from eep.runtime.control.auth import Sealer
from eep.runtime.config import RuntimeConfig
from eep.runtime.control.coordinator import Coordinator, StartupError
from eep.runtime.control.keys import Key, store_key
from eep.runtime.control.rank import RankSpec, rank_main
from eep.runtime.control.timeline import Timeline
from eep.transport import create_shm_file

log = logging.getLogger("eep.runtime.control.launcher")

_SIGNALS = {"kill": signal.SIGKILL, "stop": signal.SIGSTOP, "cont": signal.SIGCONT, "term": signal.SIGTERM}


@dataclass
class Fault:
    """Send ``action`` (kill / stop / cont / term) to ``rank`` when the trigger fires.

    Exactly one trigger: ``at_results`` (answered requests reach it), ``on_phase``
    (``"prepare_fail"`` / ``"prepare_join"`` / ``"prepare_resync"``: right after such a prepare is
    published, i.e. during repair or rejoin; ``"commit_fail"`` / ``"commit_join"`` /
    ``"commit_resync"``: after every ack, just before the commit is published, so a rank killed
    there is committed as a member, e.g. a joiner the survivors then fail to map; ``"committed_fail"``
    / ``"committed_join"`` / ``"committed_rereplicate"`` / ...: right after such a commit is
    published, e.g. once a re-replication switched the maps), ``after_s``
    (seconds after the previous fault), or ``at_s`` (seconds after the first membership was
    committed, i.e. serving started). A phase-triggered ``kill`` / ``stop`` returns only once the
    rank has exited / stopped, so the protocol goes on with the rank already gone.
    """

    action: str
    rank: int
    at_results: int | None = None
    on_phase: str | None = None
    after_s: float | None = None
    at_s: float | None = None
    fired_at: float | None = field(default=None, compare=False)
    is_skipped: bool = field(default=False, compare=False)  # fired when the rank had already exited

    def __post_init__(self):
        if self.action not in _SIGNALS:
            raise ValueError(f"fault action {self.action!r} is not one of {sorted(_SIGNALS)}")
        if sum(x is not None for x in (self.at_results, self.on_phase, self.after_s, self.at_s)) != 1:
            raise ValueError(f"fault {self}: give exactly one of at_results, on_phase, after_s, at_s")


@dataclass
class RunResult:
    run_dir: Path
    results: dict[int, list[int]]  # request id -> generated tokens
    served_by: dict[int, tuple[int, int, int]]  # request id -> (rank, incarnation, epoch) that answered
    decisions: list[dict]
    num_rejected: int  # control messages the coordinator ignored (malformed / unauthenticated)
    is_timed_out: bool
    is_interrupted: bool
    exit_codes: dict[str, int | None]
    summary: dict
    error: str | None = None  # why the run ended early (a rank died at start-up, every rank exited...)
    refused: dict[int, str] = field(default_factory=dict)  # request id -> why it was not answered
    answered_at: dict[int, float] = field(default_factory=dict)  # request id -> wall time its answer was written

    @property
    def num_answered(self) -> int:
        return len(self.results)

    @property
    def num_refused(self) -> int:
        return len(self.refused)


class Launcher:
    def __init__(self, cfg: RuntimeConfig, *, run_dir: str | Path | None = None, faults: list[Fault] | tuple = (),
                 secret: bytes | None = None, run_id: str | None = None):
        self.cfg = cfg
        self.run_id = run_id or uuid.uuid4().hex[:12]
        self.run_dir = Path(run_dir) if run_dir else Path(tempfile.mkdtemp(prefix=f"eep-run-{self.run_id}-"))
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.secret = secret or envs.secret() or secrets.token_bytes(32)
        self.faults = list(faults)
        self.procs: dict[int, mp.Process | None] = {r: None for r in range(cfg.num_ranks)}
        self.incarnations = {r: -1 for r in range(cfg.num_ranks)}
        self.restart_at: dict[int, float] = {}
        self.num_restarts = {r: 0 for r in range(cfg.num_ranks)}
        self.exit_codes: dict[str, int | None] = {}
        self._handled_exit: set[tuple[int, int]] = set()
        self._last_fault_at: float | None = None
        self._serving_since: float | None = None
        self._stop_requested = False
        self.shm_path = os.path.join(envs.shm_dir(), f"eep-{self.run_id}.shm")

    # ---- public ----
    def stop(self) -> None:
        self._stop_requested = True

    def run(self, *, timeout_s: float | None = None) -> RunResult:
        """Serve ``cfg.num_requests`` requests (or until ``timeout_s`` / Ctrl-C) and return the outcome."""
        cfg = self.cfg
        self.timeline = Timeline(self.run_dir / "launcher.jsonl", None, None)
        self.store = dist.TCPStore(cfg.store_host, cfg.store_port, is_master=True, wait_for_workers=False,
                                   timeout=datetime.timedelta(seconds=30))
        self.sealer = Sealer(self.secret, self.run_id)
        create_shm_file(self.shm_path, cfg.num_ranks, cfg.num_channels, self._capacity_nbytes())
        self.coordinator = Coordinator(cfg, self.store, self.sealer, self.run_id, self.timeline,
                                       is_dead=self._is_dead, on_phase=self._on_phase)
        self.timeline.event("launch", run_id=self.run_id, num_ranks=cfg.num_ranks, pid=os.getpid(),
                            store_port=self.store.port, config=cfg.to_dict())
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        is_timed_out = is_interrupted = False
        error = None
        try:
            for r in range(cfg.num_ranks):
                self._spawn(r)
            self._write_pids()
            try:
                self.coordinator.start(cfg.startup_timeout_s, dead=lambda: [r for r in self.procs if self._is_dead(r)])
            except StartupError as exc:
                error = self._startup_error(exc)
                log.error("run %s: %s", self.run_id, error)
                self.timeline.event("startup_failed", error=error, ranks=exc.ranks)
                self.coordinator.refuse_unanswered(error)
                raise _RunOver from None
            self._serving_since = time.monotonic()
            results_key = store_key(self.run_id, Key.RESULTS_COUNT)
            next_scan = 0.0
            while True:
                sentinels = [p.sentinel for p in self.procs.values() if p is not None and p.exitcode is None]
                mp.connection.wait(sentinels, timeout=0.002)
                self._reap()
                self._restart_due()
                self._fire_due_faults()
                self.coordinator.poll()
                self._end_hold_if_hopeless()
                if self.store.add(results_key, 0) >= cfg.num_requests or self._stop_requested:
                    break
                if time.monotonic() >= next_scan:
                    next_scan = time.monotonic() + 0.05
                    if self.coordinator.advance_answered() >= cfg.num_requests:
                        break
                error = self._no_rank_left()
                if error is not None:
                    log.error("run %s: %s", self.run_id, error)
                    self.timeline.event("no_rank_left", error=error)
                    self.coordinator.refuse_unanswered(error)
                    break
                if deadline is not None and time.monotonic() > deadline:
                    is_timed_out = True
                    log.error("run %s timed out after %.1f s", self.run_id, timeout_s)
                    break
        except _RunOver:
            pass
        except KeyboardInterrupt:
            is_interrupted = True
        finally:
            self._shutdown()
        from eep.runtime.control.metrics import summarize
        results, served_by, refused, answered_at = self._collect_results()
        if error is not None:  # counted from the answers themselves, as RunResult.num_answered is
            error += f"; {len(results)} of {cfg.num_requests} requests answered"
        self.store = self.coordinator.store = None  # closes the store server: the run is over
        summary = summarize(self.run_dir)
        (self.run_dir / "summary.json").write_text(json.dumps(summary, indent=1))
        return RunResult(self.run_dir, results, served_by, self.coordinator.decisions,
                         self.coordinator.sealer.num_rejected, is_timed_out, is_interrupted, dict(self.exit_codes),
                         summary, error, refused, answered_at)

    # ---- processes ----
    def _spawn(self, rank: int) -> None:
        ctx = mp.get_context("forkserver")
        ctx.set_forkserver_preload(["eep.runtime.control.rank"])
        self.incarnations[rank] += 1
        spec = RankSpec(config=self.cfg.to_dict(), rank=rank, incarnation=self.incarnations[rank], run_id=self.run_id,
                        secret_hex=self.secret.hex(), shm_path=self.shm_path, run_dir=str(self.run_dir),
                        store_port=self.store.port)
        proc = ctx.Process(target=rank_main, args=(spec,), name=f"eep-rank{rank}.{spec.incarnation}")
        proc.start()
        self.procs[rank] = proc
        self.timeline.event("spawn", target=rank, incarnation=spec.incarnation, pid=proc.pid)

    def _is_dead(self, rank: int) -> bool:
        proc = self.procs[rank]
        return proc is None or proc.exitcode is not None

    def _reap(self) -> None:
        for rank, proc in self.procs.items():
            if proc is None or proc.exitcode is None or (rank, self.incarnations[rank]) in self._handled_exit:
                continue
            self._handled_exit.add((rank, self.incarnations[rank]))
            self.exit_codes[f"{rank}.{self.incarnations[rank]}"] = proc.exitcode
            self.timeline.event("exit", target=rank, incarnation=self.incarnations[rank], code=proc.exitcode)
            log.warning("rank %d (incarnation %d) exited with code %s", rank, self.incarnations[rank], proc.exitcode)
            self.coordinator.pending_joins.pop(rank, None)
            if self.coordinator.membership is not None and self.coordinator.active[rank]:
                self.coordinator.fail([rank], reason="exit")
            elif self.coordinator.membership is not None and self.coordinator.holds_requests(rank):
                # A fenced rank that dies without rejoining may hold a request it claimed after its
                # failure was committed; a resync re-queues anything owned by a non-member. (Not
                # unconditionally: a SIGKILLed GPU rank is reaped ~1.3 s after the commit that
                # failed it, and a needless resync then paused every survivor again.)
                self.coordinator.propose(failed=set(), joined={}, reason="resync")
            if self.cfg.restart_after_s is not None and self.num_restarts[rank] < self.cfg.max_restarts:
                self.restart_at[rank] = time.monotonic() + self.cfg.restart_after_s

    def _startup_error(self, exc: StartupError) -> str:
        """``exc`` with each dead rank's exit code and the error its process recorded (if any)."""
        if not exc.ranks:
            return str(exc)
        parts = []
        for r in exc.ranks:
            code = self.procs[r].exitcode if self.procs[r] is not None else None
            crash = _crash_of(self.run_dir / f"rank{r}-{self.incarnations[r]}.jsonl")
            parts.append(f"rank {r} exited with code {code}" + (f": {crash}" if crash else " before recording an error"))
        return f"{exc}: " + "; ".join(parts)

    def _end_hold_if_hopeless(self) -> None:
        """Refuse the held requests of an epoch that lost coverage once no rejoin can restore it in time."""
        coordinator = self.coordinator
        if coordinator.held_since is None or coordinator.refusal is not None:
            return
        can_rejoin = bool(self.restart_at or coordinator.pending_joins) or any(
            p is not None and p.exitcode is None and not coordinator.active[r] for r, p in self.procs.items())
        waited = time.monotonic() - coordinator.held_since
        if not can_rejoin:
            why = "no rank can rejoin (none is restarting or waiting to join)"
        elif waited > self.cfg.uncovered_hold_s:
            why = f"no rejoin restored coverage within uncovered_hold_s={self.cfg.uncovered_hold_s:g} s"
        else:
            return
        coordinator.refuse_unanswered(f"{coordinator.hold_reason}; {why}")

    def _no_rank_left(self) -> str | None:
        """Why no request can be answered any more (every rank exited, none will restart), or None."""
        if self.restart_at or not all(self._is_dead(r) for r in self.procs):
            return None
        self._reap()  # every exit recorded, so the restarts it schedules are seen
        if self.restart_at:
            return None
        codes = {f"{r}.{self.incarnations[r]}": p.exitcode for r, p in self.procs.items() if p is not None}
        return (f"every rank process has exited (exit codes {codes}) and none will restart "
                f"(restart_after_s={self.cfg.restart_after_s}, max_restarts={self.cfg.max_restarts})")

    def _restart_due(self) -> None:
        now = time.monotonic()
        for rank, at in list(self.restart_at.items()):
            if now >= at:
                del self.restart_at[rank]
                self.num_restarts[rank] += 1
                self._spawn(rank)
                self._write_pids()

    def _write_pids(self) -> None:
        pids = {r: p.pid for r, p in self.procs.items() if p is not None}
        (self.run_dir / "pids.json").write_text(json.dumps({"launcher": os.getpid(), "ranks": pids}))

    # ---- faults ----
    def _fire_due_faults(self) -> None:
        count = None
        for fault in self.faults:
            if fault.fired_at is not None:
                continue
            if fault.at_results is not None:
                if count is None:
                    count = self.store.add(store_key(self.run_id, Key.RESULTS_COUNT), 0)
                if count >= fault.at_results:
                    self._fire(fault)
            elif fault.after_s is not None and self._last_fault_at is not None:
                if time.monotonic() >= self._last_fault_at + fault.after_s:
                    self._fire(fault)
            elif fault.at_s is not None and self._serving_since is not None:
                if time.monotonic() >= self._serving_since + fault.at_s:
                    self._fire(fault)

    def _on_phase(self, name: str, info: dict) -> None:
        for fault in self.faults:
            if fault.fired_at is None and fault.on_phase == name:
                self._fire(fault)
                self._wait_signal_took_effect(fault)

    def _wait_signal_took_effect(self, fault: Fault, timeout_s: float = 10.0) -> None:
        """Until a killed rank has exited or a stopped one has stopped (every thread), bounded: a
        phase fault means "gone at this point of the protocol", not "gone some time later"."""
        proc = self.procs[fault.rank]
        if proc is None or proc.exitcode is not None:
            return
        if fault.action == "kill":
            proc.join(timeout=timeout_s)
        elif fault.action == "stop":
            deadline = time.monotonic() + timeout_s
            while not _is_stopped(proc.pid) and time.monotonic() < deadline:
                time.sleep(0.001)

    def _fire(self, fault: Fault) -> None:
        fault.fired_at = self._last_fault_at = time.monotonic()
        proc = self.procs[fault.rank]
        if proc is None or proc.exitcode is not None:
            fault.is_skipped = True
            self.timeline.event("fault_skipped", action=fault.action, target=fault.rank)
            return
        os.kill(proc.pid, _SIGNALS[fault.action])
        self.timeline.event("fault", action=fault.action, target=fault.rank, incarnation=self.incarnations[fault.rank])
        log.warning("fault: %s rank %d (pid %d)", fault.action, fault.rank, proc.pid)

    # ---- shutdown ----
    def _shutdown(self) -> None:
        try:
            if hasattr(self, "coordinator"):
                self.coordinator.shutdown()
        except Exception as exc:  # noqa: BLE001 - shutting down regardless
            log.warning("could not publish shutdown: %s", exc)
        live = [p for p in self.procs.values() if p is not None and p.exitcode is None]
        for p in live:
            _signal_quietly(p.pid, signal.SIGCONT)  # a stopped rank must run to see the shutdown
        deadline = time.monotonic() + self.cfg.shutdown_grace_s
        for sig in (None, signal.SIGTERM, signal.SIGKILL):
            if sig is not None:
                for p in live:
                    if p.exitcode is None:
                        _signal_quietly(p.pid, sig)
                deadline = time.monotonic() + 1.0
            while any(p.exitcode is None for p in live) and time.monotonic() < deadline:
                mp.connection.wait([p.sentinel for p in live if p.exitcode is None], timeout=0.05)
            if all(p.exitcode is not None for p in live):
                break
        for rank, p in self.procs.items():
            if p is not None:
                p.join(timeout=1.0)
                self.exit_codes.setdefault(f"{rank}.{self.incarnations[rank]}", p.exitcode)
        try:
            os.unlink(self.shm_path)
        except OSError:
            pass
        self.timeline.event("shutdown")
        self.timeline.close()

    def _collect_results(self) -> tuple[dict, dict, dict, dict]:
        """``(results, served_by, refused, answered_at)`` as ``RunResult`` holds them."""
        results, served_by, refused, answered_at = {}, {}, {}, {}
        num_handed_out = min(self.store.add(store_key(self.run_id, Key.QUEUE_NEXT), 0), self.cfg.num_requests)
        for q in range(num_handed_out):
            key = store_key(self.run_id, Key.RESULT, q)
            if self.store.check([key]):
                value = json.loads(self.store.get(key))
                if "refused" in value:
                    refused[q] = value["refused"]
                    continue
                results[q] = value["tokens"]
                served_by[q] = (value["rank"], value["incarnation"], value["epoch"])
                answered_at[q] = value["t"]
        return results, served_by, refused, answered_at

    def _capacity_nbytes(self) -> int:
        from eep.runtime.engines.base import transport_capacity_nbytes
        return transport_capacity_nbytes(self.cfg)


class _RunOver(Exception):
    """The run cannot go on (its reason is already recorded): leave the serving loop."""


def _crash_of(timeline_path: Path) -> str | None:
    """The error a rank process recorded before it died (its ``crash`` event), if any."""
    from eep.runtime.control.timeline import read_jsonl

    if not timeline_path.exists():
        return None
    crashes = [e for e in read_jsonl(timeline_path) if e.get("event") == "crash"]
    return crashes[-1]["error"] if crashes else None


def _is_stopped(pid: int) -> bool:
    """Whether every thread of ``pid`` is stopped (state T in /proc); False where /proc cannot say."""
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
        states = []
        for tid in tasks:
            with open(f"/proc/{pid}/task/{tid}/stat") as f:
                states.append(f.read().rsplit(")", 1)[1].split()[0])
    except OSError:
        return False
    return bool(states) and all(state in ("T", "t") for state in states)


def _signal_quietly(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except OSError:
        pass
