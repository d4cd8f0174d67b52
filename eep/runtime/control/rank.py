"""One rank process: load experts, warm up, join, then serve decode steps until told to stop.

Life of a rank (``Phase``):

    WARMUP    copy the experts this slot will hold once it joins (the coordinator's rejoin plan
              from the latest commit: survivors' replicas first, then the tiers; its initial row
              from the fastest tier at the start), map the transport, run the experts on random
              rows in isolation, post an authenticated join request
    JOINING   wait for the commit that names this request's nonce
    RESTORING (inside a commit) run this rank's part of the commit's plan (``engine.execute``)
    AWAITING  copies done and maps switched; wait until every other member is too (each posts
              ``restored/<epoch>/<rank>``), so no step waits on a peer still copying or mapping
    SERVING   one decode step per loop: claim requests, decode, publish finished answers; a
              re-replication in progress copies one layer batch between steps
    HELD      a member of an epoch that is not EP-valid (coverage lost): no step, requests kept,
              until a commit restores coverage (or the coordinator refuses the requests)
    PAUSED    acked a ``prepare``; waits for its ``commit`` (survivors apply it at the same step)
    STALLED   a receive missed a peer, or a commit's new member could not be mapped (dead or
              stopped during the join): evidence reported, no further step until a new decision

Every commit carries its plan (``rules.RepairRules``). A survivor recomputes it from its own maps
and checks it against the commit; a joiner takes it. Either way the rank serves an epoch only after
``eep.check_validity`` passes for it: an epoch that lost coverage is HELD, never served.

A commit that leaves this rank out (it was declared dead while stalled, e.g. SIGSTOPped) fences
it: it drops its requests (the coordinator re-queued them) and goes back to WARMUP to rejoin.

Orphan rule: the heartbeat thread checks every interval that the parent process is unchanged and
the store answers; if not, the rank stops serving and exits, and a watchdog ``os._exit``s it
``orphan_grace_s`` later if the main loop is stuck. So a rank outlives its launcher by at most
``heartbeat_interval_s + orphan_grace_s``.
"""

from __future__ import annotations

import datetime
import enum
import json
import logging
import os
import secrets
import signal
import threading
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist

from eep.repair import PEER, ExecutionReport, RepairError
from eep.runtime.control.auth import Sealer
from eep.runtime.config import RuntimeConfig
from eep.runtime.engines.base import StepAborted, make_engine
from eep.runtime.engines.slots import PlanPart, restore_stats
from eep.runtime.control.keys import Key, store_key
from eep.runtime.model import make_request
from eep.runtime.control.rules import CommitPlan, RepairRules
from eep.runtime.control.timeline import Timeline
from eep.state import NO_EXPERT, ExpertPlacement, Membership, check_validity

log = logging.getLogger("eep.runtime.control.rank")

EXIT_ORPHANED = 3
EXIT_CRASHED = 4


class Phase(enum.Enum):
    WARMUP = "warmup"
    JOINING = "joining"
    RESTORING = "restoring"
    AWAITING = "awaiting"
    SERVING = "serving"
    HELD = "held"
    PAUSED = "paused"
    STALLED = "stalled"


@dataclass
class Request:
    request_id: int
    last_token: int
    num_new_tokens: int
    tokens: list[int] = field(default_factory=list)


@dataclass
class RankSpec:
    """What the launcher hands one rank process (picklable)."""

    config: dict
    rank: int
    incarnation: int
    run_id: str
    secret_hex: str
    shm_path: str
    run_dir: str
    store_port: int


def rank_main(spec: RankSpec) -> None:
    """Process entry point (the launcher's ``multiprocessing`` target)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole group: the launcher decides
    torch.set_num_threads(1)  # several ranks share few cores
    from eep import envs
    logging.basicConfig(level=envs.log_level(), format=f"[rank {spec.rank}.{spec.incarnation}] %(levelname)s %(message)s")
    worker = None
    try:
        worker = RankWorker(spec)
        signal.signal(signal.SIGTERM, lambda *_: worker.request_stop("SIGTERM"))
        code = worker.run()
    except BaseException as exc:  # noqa: BLE001 - recorded for the launcher, which reports it at once
        _record_crash(spec, worker, exc)
        code = EXIT_CRASHED
    os._exit(code)  # skip interpreter teardown: nothing left to flush, and it is slow with torch


def _record_crash(spec: RankSpec, worker: "RankWorker | None", exc: BaseException) -> None:
    """Log ``exc`` and write it as a ``crash`` event where the launcher looks for it."""
    error = f"{type(exc).__name__}: {exc}"
    where = traceback.extract_tb(exc.__traceback__)[-1] if exc.__traceback__ else None
    if where is not None:
        error += f" (at {os.path.basename(where.filename)}:{where.lineno} in {where.name})"
    log.error("rank %d crashed: %s\n%s", spec.rank, error, "".join(traceback.format_exception(exc)))
    try:
        timeline = worker.timeline if worker is not None else \
            Timeline(Path(spec.run_dir) / f"rank{spec.rank}-{spec.incarnation}.jsonl", spec.rank, spec.incarnation)
        timeline.event("crash", error=error)
        timeline.close()
    except OSError:
        pass


class RankWorker:
    def __init__(self, spec: RankSpec):
        self.spec = spec
        self.cfg = RuntimeConfig.from_dict(spec.config)
        self.rank, self.incarnation, self.run_id = spec.rank, spec.incarnation, spec.run_id
        self.sealer = Sealer(bytes.fromhex(spec.secret_hex), spec.run_id)
        self.parent_pid = os.getppid()
        self.timeline = Timeline(Path(spec.run_dir) / f"rank{self.rank}-{self.incarnation}.jsonl",
                                 self.rank, self.incarnation)
        self.phase = Phase.WARMUP
        self.epoch = -1
        self.step = 0
        self.seen_decisions = 0
        self.membership: Membership | None = None
        self.placement: ExpertPlacement | None = None
        self.batch: list[Request] = []
        self.pending: list[int] = []  # re-queued request ids handed to this rank, served first
        self.is_queue_exhausted = False
        self.nonce = ""
        self.stop_reason: str | None = None
        self.is_orphaned = False
        self._last_bad: dict[str, bytes] = {}
        self._stalled_since = 0.0
        self._stalled_on: list[int] = []  # the peers the last report named (repeated with it)
        self._paused_since = 0.0
        self._awaiting: list[int] = []  # members whose copies for this epoch are not done yet
        self._awaiting_since = 0.0
        # the plan of the last prepare, computed while the coordinator collects the other acks:
        # ((epoch, new active mask, re-replication), plan), used at the commit if the commit matches the prepare
        self._planned: tuple[tuple, CommitPlan] | None = None
        self._incarnations: dict[int, int] = {}  # each member's incarnation, from the last commit
        # (epoch the warm-up copies were planned from, {(layer, slot): peer source slot}) of a joining rank
        self._preloaded: tuple[int, dict] = (-1, {})
        self._background = None  # (epoch, BackgroundCopies, predicted s) of a re-replication in progress
        self._peeked: dict[int, dict] = {}  # decisions read ahead by _has_new_decision, by log index

    # ---- lifecycle ----
    def request_stop(self, reason: str) -> None:
        if self.stop_reason is None:
            self.stop_reason = reason

    def run(self) -> int:
        cfg = self.cfg
        self.store = self._connect()
        self.timeline.event("engine_init_begin", engine=cfg.engine)
        # the data plane (docs/runtime.md "Engines"): shm on CPU, the fused GPU buffer on GPUs
        self.engine = make_engine(cfg, self.rank, shm_path=self.spec.shm_path, store=self.store,
                                  run_id=self.run_id, incarnation=self.incarnation)
        self.timeline.event("engine_ready", engine=cfg.engine, phases=getattr(self.engine, "init_phases", None))
        self.rules = RepairRules(cfg)
        threading.Thread(target=self._heartbeat_loop, name="eep-heartbeat", daemon=True).start()
        self.timeline.event("start", pid=os.getpid())
        try:
            self._warmup_and_request_join()
            while self.stop_reason is None:
                for body in self._poll_decisions():
                    self._handle(body)
                if self.stop_reason is not None:
                    break
                if self.phase is Phase.SERVING:
                    if self._background is not None:
                        self._advance_background()
                    self._serve_step()
                elif self.phase is Phase.AWAITING:
                    self._await_restores()
                else:
                    if self.phase is Phase.STALLED and time.monotonic() - self._stalled_since > 2 * cfg.transport_timeout_s:
                        self._stalled_since = time.monotonic()  # the report may have been lost: repeat it
                        self._report(self._stalled_on)
                    time.sleep(0.0005)
        except (dist.DistStoreError, dist.DistNetworkError, ConnectionError) as exc:
            if not self.is_orphaned:
                log.error("rank %d: control store failed: %s", self.rank, exc)
            self.request_stop(f"store error: {exc}")
            self.is_orphaned = True
        self.timeline.event("exit", reason=self.stop_reason)
        self.timeline.close()
        self.engine.close()
        if self.is_orphaned:
            _unlink_quietly(self.spec.shm_path)  # the launcher is gone and cannot clean up
            return EXIT_ORPHANED
        return 0

    def _connect(self) -> dist.TCPStore:
        return dist.TCPStore(self.cfg.store_host, self.spec.store_port, is_master=False,
                             timeout=datetime.timedelta(seconds=10))

    # ---- joining ----
    def _warmup_and_request_join(self) -> None:
        self.phase = Phase.WARMUP
        t0 = time.time()
        latest = self._latest_commit()
        base = None if latest is None else (int(latest["epoch"]), ExpertPlacement.from_dict(latest["placement"]),
                                            list(latest["active"]))
        plan = self.rules.preload(base, self.rank)
        # the copies run under the maps they are planned from (a start: the membership it will join)
        active = base[2] if base is not None and not base[2][self.rank] else [True] * self.cfg.num_ranks
        part = PlanPart(plan.epoch, plan.placement, active, plan.transfers_to(self.rank),
                        incarnations=_incarnations(latest),
                        is_source=_remembered(lambda r: self.store.check([store_key(self.run_id, Key.RESTORED,
                                                                                    plan.epoch, r)])))
        report = self._execute(part)
        # slots copied from a peer are trusted until a commit rewrites their source slot (_on_foreign_commit)
        self._preloaded = (plan.epoch, {(t.layer, t.dst_slot): t.source_slot for t, by in
                                        zip(part.transfers, report.served_by) if by == PEER})
        t_loaded = time.time()
        self.engine.warmup()
        self.nonce = secrets.token_hex(8)
        index = self.store.add(store_key(self.run_id, Key.JOIN, "count"), 1)
        key = store_key(self.run_id, Key.JOIN, index)
        self.store.set(key, self.sealer.seal(key, {"rank": self.rank, "incarnation": self.incarnation,
                                                   "nonce": self.nonce}))
        self.phase = Phase.JOINING
        self.timeline.event("join_request", nonce=self.nonce, loaded=report.num_copied, warmup_s=time.time() - t0,
                            load_s=t_loaded - t0, predicted_load_s=plan.predicted_s_for(self.rank),
                            planned_from=plan.epoch, restore_by_tier=restore_stats(report, part.transfers))

    def _execute(self, part: PlanPart) -> ExecutionReport:
        """This rank's part of a plan, through the engine's one executor (copies, wait, switch)."""
        t0 = time.perf_counter()
        report = self.engine.execute(part)
        if self.cfg.restore_pace_gbps and report.num_copied:  # tests: as long as copies at that rate would take
            pace_s = report.num_copied * self.rules.expert_nbytes / (self.cfg.restore_pace_gbps * 1e9)
            time.sleep(max(0.0, pace_s - (time.perf_counter() - t0)))
        return report

    def _latest_commit(self) -> dict | None:
        """The newest authenticated commit in the decision log, if any."""
        latest, index = None, 1
        while (body := self._read_decision(index)) is not None:
            if body.get("kind") == "commit":
                latest = body
            index += 1
        return latest

    def _on_foreign_commit(self, body: dict) -> None:
        """A commit that does not admit this joining rank: a slot it copied from a peer is no longer
        trusted if this commit rewrites the source slot (the copy may have read it half-written)."""
        base, sources = self._preloaded
        if int(body["epoch"]) <= base or not sources:
            return
        written = {(int(t[0]), int(t[7])) for t in body["plan"]["transfers"]}  # Transfer fields: layer, .., dst_slot
        for (layer, dst), src in sources.items():
            if (layer, src) in written:
                self.engine.slots.mark(layer, dst, NO_EXPERT)

    # ---- decisions ----
    def _poll_decisions(self) -> list[dict]:
        out = []
        while True:
            index = self.seen_decisions + 1
            body = self._peeked.pop(index, None) or self._read_decision(index)
            if body is None:
                return out
            self.seen_decisions += 1
            out.append(body)

    def _read_decision(self, index: int) -> dict | None:
        key = store_key(self.run_id, Key.DECISION, index)
        if not self.store.check([key]):
            return None
        raw = self.store.get(key)
        if self._last_bad.get(key) == raw:
            return None  # already rejected and logged; the coordinator will overwrite it
        body = self.sealer.open(key, raw)
        if body is None:
            self._last_bad[key] = raw
            self.timeline.event("rejected_message", key=key)
        return body

    def _has_new_decision(self) -> bool:
        """Whether a decision that stops steps (prepare, commit, shutdown) waits in the log: a step
        blocked on a peer gives up for it. A re-replication does not stop steps (it is read between them)."""
        index = self.seen_decisions + 1
        while True:
            body = self._peeked.get(index) or self._read_decision(index)
            if body is None:
                return False
            self._peeked[index] = body
            if body.get("kind") != "rereplicate":
                return True
            index += 1

    def _handle(self, body: dict) -> None:
        try:
            kind = body["kind"]
            if kind == "shutdown":
                self.request_stop("shutdown")
            elif kind == "prepare":
                self._on_prepare(int(body["epoch"]), list(body["active"]), str(body.get("reason", "")))
            elif kind == "commit":
                self._on_commit(body)
            elif kind == "rereplicate":
                self._on_rereplicate(body)
        except (KeyError, TypeError, ValueError) as exc:
            log.error("rank %d: ignored a malformed decision %s: %s", self.rank, body, exc)

    def _on_prepare(self, epoch: int, active: list[bool], reason: str) -> None:
        if self.phase in (Phase.SERVING, Phase.HELD, Phase.AWAITING, Phase.PAUSED, Phase.STALLED) and epoch > self.epoch:
            if reason != "rereplicate":
                self._void_background(epoch)
            key = store_key(self.run_id, Key.ACK, epoch, self.rank)
            self.store.set(key, self.sealer.seal(key, {"rank": self.rank, "incarnation": self.incarnation,
                                                       "epoch": epoch, "step": self.step}))
            if self.phase is not Phase.PAUSED:
                self._paused_since = time.time()
            self.phase = Phase.PAUSED
            # acked: plan the commit now, while the coordinator waits for the other members' acks
            old = self.membership.active_cpu.tolist()
            if active[self.rank]:
                failed = [r for r, (a, b) in enumerate(zip(old, active)) if a and not b]
                joined = [r for r, (a, b) in enumerate(zip(old, active)) if b and not a]
                self._planned = ((epoch, tuple(active), reason == "rereplicate"),
                                 self.rules.plan_commit(self.placement, old, failed, joined, epoch,
                                                        rereplicate=reason == "rereplicate"))

    def _on_commit(self, body: dict) -> None:
        epoch = int(body["epoch"])
        joined = body["joined"]
        if self.phase in (Phase.JOINING, Phase.WARMUP):
            if joined.get(str(self.rank)) == self.nonce:
                self._adopt(body, is_joiner=True)
            else:
                self._on_foreign_commit(body)
            return
        if epoch <= self.epoch:
            return
        if body["active"][self.rank]:
            self._adopt(body, is_joiner=False)
        else:
            self._fence(epoch)

    def _adopt(self, body: dict, *, is_joiner: bool) -> None:
        t0 = time.time()
        was = self.phase
        epoch = int(body["epoch"])
        active = list(body["active"])
        plan = CommitPlan.from_wire(epoch, ExpertPlacement.from_dict(body["placement"]), body["plan"])
        expected = self._expected_plan(body, is_joiner)
        if expected is not None and not expected.agrees_for(self.rank, plan):
            log.error("rank %d: epoch %d's plan differs from the coordinator's; using the published one",
                      self.rank, epoch)
            self.timeline.event("plan_mismatch", epoch=epoch)
        membership = Membership(self.cfg.num_ranks, active=active, epoch=epoch)
        # the rank's own check: no step of an epoch whose maps are not EP-valid, whatever the commit says
        validity = check_validity(membership, plan.placement)
        t_restore = time.time()
        self.phase = Phase.RESTORING
        self._incarnations = _incarnations(body)
        copying = {t.dst_rank for t in plan.transfers}
        part = PlanPart(epoch, plan.placement, active, plan.transfers_to(self.rank), incarnations=self._incarnations,
                        is_source=_remembered(lambda r: r not in copying or self._wait_restored(epoch, r)))
        report = self._execute(part)
        self._background = None  # a re-replication this commit switched to, or one a prepare voided
        t_switch = time.time()
        unmapped: list[int] = []
        try:
            self.engine.on_commit(active=active, joined=[int(r) for r in body["joined"]], epoch=epoch,
                                  start_step=int(body["start_step"]), is_joiner=is_joiner)
        except StepAborted as exc:  # a member's buffer could not be mapped: its failure, not this rank's
            unmapped = list(exc.missed)
        t_done = time.time()
        self.membership = membership
        self.placement = plan.placement
        self.epoch = epoch
        self.step = int(body["start_step"])
        self.pending.extend(int(q) for q in body["requeue"].get(str(self.rank), []))
        # every member posts when its copies and switch are done; none steps before all have (AWAITING)
        key = store_key(self.run_id, Key.RESTORED, epoch, self.rank)
        self.store.set(key, self.sealer.seal(key, {"rank": self.rank, "epoch": epoch, "restored": report.num_copied}))
        others = [r for r, a in enumerate(active) if a and r != self.rank]
        if not validity.ok:
            self.phase = Phase.HELD
        elif others:
            self.phase, self._awaiting, self._awaiting_since = Phase.AWAITING, others, time.monotonic()
        else:
            self.phase = Phase.SERVING
        self.timeline.event("commit", epoch=epoch, reason=body["reason"], start_step=self.step,
                            restored=report.num_copied, requeued=len(body["requeue"].get(str(self.rank), [])),
                            was=was.value, paused_s=(t0 - self._paused_since) if was is Phase.PAUSED else None,
                            valid=validity.ok,
                            plan_s=t_restore - t0, restore_s=t_switch - t_restore, switch_s=t_done - t_switch,
                            predicted_restore_s=plan.predicted_s_for(self.rank),
                            planned_copies=len(part.transfers), phases=plan.phases,
                            restore_by_tier=restore_stats(report, part.transfers) if part.transfers else None)
        if not validity.ok:
            log.error("rank %d: epoch %d is not EP-valid (%s); holding its requests", self.rank, epoch,
                      validity.summary(limit=3).replace("\n", ";"))
        if unmapped:
            # Never serve with a member unmapped (a kernel would write through a missing peer
            # mapping): stall and report it as a deadline miss is reported; the coordinator's resync
            # fails it if it is dead or stopped, or maps it again (next commit) if it answers.
            self._stall(unmapped, where="connect")
            log.warning("rank %d: epoch %d: could not map ranks %s; reported them, not serving", self.rank,
                        epoch, unmapped)

    def _expected_plan(self, body: dict, is_joiner: bool) -> CommitPlan | None:
        """The plan this rank computes for the commit itself, or None where it must take the commit's.

        Survivors recompute from their own maps. A joiner has no history, except when every member
        is new (the start, or a restart after every member died): the rule is then the initial
        placement repaired for the absent ranks, which it recomputes as well."""
        epoch, active = int(body["epoch"]), list(body["active"])
        if not is_joiner:
            rereplicate = body["reason"] == "rereplicate"
            planned, self._planned = self._planned, None
            if planned is not None and planned[0] == (epoch, tuple(active), rereplicate):
                return planned[1]  # computed at the prepare: the same inputs
            return self.rules.plan_commit(self.placement, self.membership.active_cpu.tolist(), body["failed"],
                                          [int(r) for r in body["joined"]], epoch, rereplicate=rereplicate)
        if all(str(r) in body["joined"] for r, a in enumerate(active) if a):
            return self.rules.plan_start(active, epoch)
        return None

    def _wait_restored(self, epoch: int, rank: int) -> bool:
        """Whether ``rank`` posted ``restored`` for ``epoch`` (its slots are final) within
        ``restore_timeout_s``; gives up at once when a new decision arrives (e.g. its failure)."""
        key = store_key(self.run_id, Key.RESTORED, epoch, rank)
        deadline = time.monotonic() + self.cfg.restore_timeout_s
        while not self.store.check([key]):
            if time.monotonic() > deadline or self._has_new_decision():
                return False
            time.sleep(0.0005)
        return True

    # ---- re-replication (after a repair, while serving) ----
    def _on_rereplicate(self, body: dict) -> None:
        """Start copying this rank's share of a re-replication in the background (``SERVING`` goes on);
        the copies land in spare slots no route reads, and a later commit switches the maps."""
        epoch = int(body["epoch"])
        if epoch != self.epoch or self.phase not in (Phase.SERVING, Phase.AWAITING):
            return  # planned from maps this rank no longer serves: a newer decision voids it
        plan = CommitPlan.from_wire(epoch, ExpertPlacement.from_dict(body["placement"]), body["plan"])
        active = self.membership.active_cpu.tolist()
        if not self.rules.rereplication(self.placement, active, epoch).agrees_for(self.rank, plan):
            log.error("rank %d: the re-replication of epoch %d differs from this rank's; using the published one",
                      self.rank, epoch)
            self.timeline.event("plan_mismatch", epoch=epoch, kind="rereplicate")
        mine = plan.transfers_to(self.rank)
        if not mine:
            return
        # every member posted ``restored`` for this epoch before this rank served it: sources are final
        part = PlanPart(epoch, plan.placement, active, mine, incarnations=self._incarnations)
        self._background = (epoch, self.engine.copy_in_background(part), plan.predicted_s_for(self.rank))
        self.timeline.event("rereplication_start", epoch=epoch, copies=len(mine))

    def _advance_background(self) -> None:
        """One batch of the background copies per serving loop; post ``rereplicated`` once all are done."""
        epoch, job, predicted_s = self._background
        if job.is_done:
            return
        key = store_key(self.run_id, Key.REREPLICATED, epoch, self.rank)
        try:
            done = job.step()
        except RepairError as exc:  # no source could serve a copy: give the re-replication up
            job.void()
            self._background = None
            self.store.set(key, self.sealer.seal(key, {"rank": self.rank, "epoch": epoch, "ok": False,
                                                       "error": str(exc)}))
            self.timeline.event("rereplication_failed", epoch=epoch, error=str(exc))
            return
        if done:
            report = job.report
            self.store.set(key, self.sealer.seal(key, {"rank": self.rank, "epoch": epoch, "ok": True,
                                                       "copied": report.num_copied}))
            self.timeline.event("rereplicated", epoch=epoch, copies=report.num_copied, observed_s=report.total_s,
                                predicted_s=predicted_s, restore_by_tier=restore_stats(report, job.transfers))

    def _void_background(self, epoch: int) -> None:
        """A prepare other than the re-replication's own: copies not switched to are dropped (their
        slots poisoned); the coordinator re-plans from the maps it commits."""
        if self._background is not None:
            self._background[1].void()
            self.timeline.event("rereplication_voided", epoch=self._background[0], by_prepare=epoch)
            self._background = None

    def _await_restores(self) -> None:
        """AWAITING: serve once every other member posted ``restored`` for this epoch (its copies and
        switch are done), so no first step waits on a peer still copying or mapping."""
        keys = {r: store_key(self.run_id, Key.RESTORED, self.epoch, r) for r in self._awaiting}
        self._awaiting = [r for r in self._awaiting if not self.store.check([keys[r]])]
        if not self._awaiting:
            self.phase = Phase.SERVING
            return
        if time.monotonic() - self._awaiting_since > self.cfg.restore_timeout_s:
            # as long as a peer's heartbeat shows it copying, the coordinator waits for it; past this
            # bound report it like a peer that missed a deadline
            self._stall(list(self._awaiting), where="restore")
            return
        time.sleep(0.0005)

    def _fence(self, epoch: int) -> None:
        dropped = [r.request_id for r in self.batch] + self.pending
        self.batch, self.pending = [], []
        self.timeline.event("fenced", epoch=epoch, old_epoch=self.epoch, dropped=dropped)
        log.warning("rank %d: fenced out at epoch %d (was %d); rejoining", self.rank, epoch, self.epoch)
        self.epoch = epoch
        self._warmup_and_request_join()

    def _stall(self, missed: list[int], *, where: str) -> None:
        """Stop serving and report ``missed`` (peers that missed a deadline or could not be mapped)."""
        self.phase, self._stalled_since, self._stalled_on = Phase.STALLED, time.monotonic(), list(missed)
        self._report(missed)
        self.timeline.event("stalled", step=self.step, epoch=self.epoch, missed=missed, where=where)

    def _report(self, missed: list[int]) -> None:
        index = self.store.add(store_key(self.run_id, Key.REPORT, "count"), 1)
        key = store_key(self.run_id, Key.REPORT, index)
        self.store.set(key, self.sealer.seal(key, {"rank": self.rank, "incarnation": self.incarnation,
                                                   "epoch": self.epoch, "step": self.step, "missed": missed}))

    # ---- serving ----
    def _serve_step(self) -> None:
        self._fill_batch()
        tokens = torch.tensor([r.last_token for r in self.batch], dtype=torch.int64)
        try:
            next_tokens = self.engine.decode(tokens, active=self.membership.active_cpu.tolist(),
                                             placement=self.placement, epoch=self.epoch, step=self.step,
                                             timeout_s=self.cfg.transport_timeout_s,
                                             should_abort=self._has_new_decision)
        except StepAborted as exc:
            if not exc.is_aborted:
                self._stall(exc.missed, where=f"layer {exc.layer} {exc.phase}")
            return
        finished = []
        for req, token in zip(self.batch, next_tokens):
            req.tokens.append(token)
            req.last_token = token
            if len(req.tokens) >= req.num_new_tokens:
                finished.append(req)
        if finished:
            self._publish(finished)
        self.batch = [r for r in self.batch if r not in finished]
        self.timeline.step(self.step, self.epoch, len(next_tokens))
        self.step += 1
        if self.cfg.step_delay_s:
            time.sleep(self.cfg.step_delay_s)

    def _fill_batch(self) -> None:
        limit = self.cfg.batch_limit(self.membership.active_cpu.tolist())
        while len(self.batch) < limit:
            if self.pending:
                request_id = self.pending.pop(0)
            elif not self.is_queue_exhausted:
                request_id = self._claim()
                if request_id is None:
                    continue
            else:
                return
            prompt, num_new = make_request(self.cfg.model, request_id, max_new_tokens=self.cfg.max_new_tokens)
            self.batch.append(Request(request_id, prompt, num_new))

    def _claim(self) -> int | None:
        request_id = self.store.add(store_key(self.run_id, Key.QUEUE_NEXT), 1) - 1
        if request_id >= self.cfg.num_requests:
            self.is_queue_exhausted = True
            return None
        me = f"{self.rank}:{self.incarnation}:{self.epoch}"
        owner = self.store.compare_set(store_key(self.run_id, Key.OWNER, request_id), "", me)
        return request_id if owner.decode() == me else None  # the coordinator took it back first

    def _publish(self, finished: list[Request]) -> None:
        """Write the answers of ``finished`` requests this incarnation still owns, once each.

        A fenced rank (e.g. SIGSTOPped past its failure) may finish a request the coordinator has
        since handed to another member: the owner key then names that member, and this answer is not
        written. (Answers are write-once: if both finish, the first write wins; both computed the same
        tokens under an epoch they were valid members of.) One round trip reads every owner key."""
        owners = self.store.multi_get([store_key(self.run_id, Key.OWNER, r.request_id) for r in finished])
        accepted = 0
        for req, owner in zip(finished, owners):
            owner = owner.decode().split(":")
            if owner[:2] != [str(self.rank), str(self.incarnation)]:
                self.timeline.event("stale_answer_dropped", request=req.request_id, owner=":".join(owner))
                continue
            value = json.dumps({"tokens": req.tokens, "rank": self.rank, "incarnation": self.incarnation,
                                "epoch": self.epoch, "t": time.time()})
            got = self.store.compare_set(store_key(self.run_id, Key.RESULT, req.request_id), "", value)
            if got.decode() == value:
                accepted += 1
            else:
                self.timeline.event("duplicate_suppressed", request=req.request_id)
        if accepted:
            self.store.add(store_key(self.run_id, Key.RESULTS_COUNT), accepted)

    # ---- heartbeat and orphan watch (own thread, own store connection) ----
    def _heartbeat_loop(self) -> None:
        key = store_key(self.run_id, Key.HEARTBEAT, self.rank)
        failures, seq = 0, 0
        store = None
        while True:
            try:
                store = store or self._connect()
                store.set(key, self.sealer.seal(key, {"rank": self.rank, "incarnation": self.incarnation, "seq": seq,
                                                      "step": self.step, "epoch": self.epoch,
                                                      "phase": self.phase.value}))
                failures = 0
            except Exception:  # noqa: BLE001 - any store failure counts as a missed beat
                failures += 1
            seq += 1
            if os.getppid() != self.parent_pid or failures >= 2:
                self.is_orphaned = True
                self.request_stop("launcher gone")
                time.sleep(self.cfg.orphan_grace_s)
                _unlink_quietly(self.spec.shm_path)
                os._exit(EXIT_ORPHANED)  # the main loop did not finish in time
            if self.stop_reason is not None:
                return
            time.sleep(self.cfg.heartbeat_interval_s)


def _remembered(is_source):
    """``is_source`` asked once per rank (a plan names the same peer for many slots)."""
    known: dict[int, bool] = {}

    def check(rank: int) -> bool:
        if rank not in known:
            known[rank] = is_source(rank)
        return known[rank]
    return check


def _incarnations(commit: dict | None) -> dict[int, int]:
    """``{rank: incarnation}`` of a commit's members (the peers a copy may read from)."""
    return {int(r): int(i) for r, i in ((commit or {}).get("incarnations") or {}).items()}


def _unlink_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass
