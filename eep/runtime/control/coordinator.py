"""The coordinator: the one place that decides membership epochs. It lives in the launcher.

Evidence it acts on:
  - a rank process exited (the launcher saw it): dead at once;
  - a rank's heartbeat did not change for ``suspect_misses`` consecutive intervals (the suspicion
    window): dead. A single late heartbeat never kills a rank; only K in a row do;
  - a rank reported a transport timeout: the coordinator does not trust one rank's view of another,
    it issues a *resync* (same membership, new epoch). The resync's prepare must be acknowledged by
    every member within the suspicion window; a member that is really stalled does not ack and is
    then declared dead. A slow-but-alive one acks and costs one pause, not a death. A reported
    member whose heartbeat has also stopped for ``corroborate_misses`` intervals is dead without
    waiting out the window: two independent signals agree (a SIGKILLed rank with a large pinned
    mapping can take over a second to be reaped, so its exit is often the last evidence to arrive).

A decision is two messages in the append-only decision log:
  1. ``prepare(epoch, active)``: every continuing member stops at its next step boundary (or
     aborts the step it is blocked in) and acks with the step it would run next;
  2. ``commit(epoch, active, failed, joined, start_step, placement, requeue)``: after all acks,
     ``start_step = max(acked steps)``; every member applies the new maps and resumes at exactly
     that step under the new epoch. Joining ranks (named with their join nonce) start there too.
A member that dies between 1 and 2 is added to ``failed`` and the decision re-proposed.

Every commit carries its plan (``rules.RepairRules``: ``eep.plan_repair`` for failures,
``eep.plan_reintegration`` for joins): the new maps, every copy that makes them true with its
source and predicted seconds, and whether the epoch is EP-valid. A failure the survivors' slots
cannot cover is still committed (the dead ranks must be fenced and their requests re-queued), as an
epoch that serves nothing: its requests are *held* until a rejoin restores coverage, and refused
(``refuse_unanswered``, each request's answer replaced by an error naming the uncovered experts and
the missing slots) when ``uncovered_hold_s`` passes first or no rank can rejoin. No answer ever
comes from an invalid epoch: ranks check ``eep.check_validity`` themselves before they serve.

After a repair the coordinator publishes a re-replication (``_rereplicate``): members copy extra
replicas into their spare slots from live peers while they serve, then a normal prepare/commit
switches the maps; a failure or join voids it first, and it is planned again from the new maps.

A member still copying its slots for the last commit (heartbeat phase ``restoring`` / ``awaiting``)
cannot ack a new prepare until its copies are done; while its heartbeat keeps changing it is given
up to ``restore_timeout_s`` instead of the suspicion window, so a second failure during a repair
does not also fail the healthy ranks that are repairing.

Requests are re-queued at commit time: any unanswered request whose owner is not a continuing
member (or that was taken but never marked owned) is handed round-robin to continuing members.

Joins wait until they can be committed: after every member died, the first restarted ranks may
hold too few slots to cover every expert (``InsufficientSlotsError``). Their joins then stay
pending and are proposed again, together, when a rank slot that was not in the uncoverable set asks
to join (never on every poll: a set of rank slots that cannot cover the experts, or any subset of
it, is not proposed again until a commit changes the membership). A pending joiner that dies is
dropped from the waiting set.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable

from eep.errors import InsufficientSlotsError
from eep.runtime.control.auth import Sealer
from eep.runtime.config import RuntimeConfig
from eep.runtime.control.keys import Key, store_key
from eep.runtime.control.rules import CommitPlan, RepairRules
from eep.runtime.control.timeline import Timeline
from eep.state import ExpertPlacement, Membership

log = logging.getLogger("eep.runtime.control.coordinator")


class Coordinator:
    def __init__(self, cfg: RuntimeConfig, store, sealer: Sealer, run_id: str, timeline: Timeline, *,
                 is_dead: Callable[[int], bool], on_phase: Callable[[str, dict], None] = lambda name, info: None):
        self.cfg, self.store, self.sealer, self.run_id, self.timeline = cfg, store, sealer, run_id, timeline
        self.is_dead, self.on_phase = is_dead, on_phase
        self.rules = RepairRules(cfg)
        self.placement: ExpertPlacement = self.rules.initial.clone()
        self.membership: Membership | None = None
        self.epoch = -1
        self.num_decisions = 0
        self.incarnation: dict[int, int] = {}
        self.pending_joins: dict[int, dict] = {}  # rank -> join body, not yet committed
        # rank slots that, with no member left, could not cover every expert (nor can any subset)
        self.uncoverable: frozenset[int] = frozenset()
        self.used_nonces: set[str] = set()
        self.joins_seen = 0
        self.reports_seen = 0
        self.heartbeat_seen: dict[int, tuple[int, float]] = {}  # rank -> (seq, monotonic time it changed)
        self.heartbeat_phase: dict[int, str] = {}  # rank -> phase its last heartbeat named
        # coverage lost: since when (monotonic) the committed epoch serves nothing, and why
        self.held_since: float | None = None
        self.hold_reason: str | None = None
        self.lost_ranks: set[int] = set()  # failed while coverage was lost
        self.refusal: str | None = None  # set once the unanswered requests were refused
        self.answered_below = 0  # every request id below this has an answer
        self.decisions: list[dict] = []
        self.committed_epoch = -1
        # re-replication (after a repair, while serving): due until a commit switches to it; the
        # published one waits for its destinations' ``rereplicated`` posts, and any commit voids it
        self.rereplication_due = False
        self.rereplication: dict | None = None  # {"epoch", "waiting": set of ranks, "plan": CommitPlan}
        self._last_bad: dict[str, bytes] = {}
        self._next_heartbeat_check = 0.0

    @property
    def active(self) -> list[bool]:
        return self.membership.active_cpu.tolist() if self.membership is not None else [False] * self.cfg.num_ranks

    # ---- start ----
    def start(self, timeout_s: float, *, dead: Callable[[], list[int]] = lambda: []) -> None:
        """Wait for every rank's first join request, then commit epoch 0 with all of them.

        Raises ``StartupError`` at once when a rank process died first (``dead()`` names them; the
        launcher adds their exit codes and errors), or after ``timeout_s`` naming the silent ones."""
        deadline = time.monotonic() + timeout_s
        while len(self.pending_joins) < self.cfg.num_ranks:
            died = dead()
            if died:
                raise StartupError(died, f"ranks {died} died during start-up")
            if time.monotonic() > deadline:
                missing = sorted(set(range(self.cfg.num_ranks)) - set(self.pending_joins))
                raise StartupError([], f"ranks {missing} did not ask to join within {timeout_s:.0f} s")
            self._read_joins()
            time.sleep(0.002)
        joined = dict(self.pending_joins)
        self.pending_joins.clear()
        self.epoch = 0
        self.membership = Membership(self.cfg.num_ranks, epoch=0)
        self._commit(0, self.rules.plan_start([True] * self.cfg.num_ranks, 0), failed=[], joined=joined,
                     start_step=0, requeue={}, reason="start")

    # ---- steady state ----
    def poll(self) -> None:
        """Read joins, reports and heartbeats; decide if any calls for it."""
        self._read_joins()
        self._propose_joins()
        suspects = self._read_reports()
        now = time.monotonic()
        silent = []
        if now >= self._next_heartbeat_check:  # throttled: each check is a store round trip per rank
            self._next_heartbeat_check = now + self.cfg.heartbeat_interval_s / 2
            silent = self._silent_ranks()
        if silent:
            self.propose(failed=set(silent), joined={}, reason="heartbeat")
        elif suspects:
            self.propose(failed=set(), joined={}, reason="resync", suspects=set(suspects))
        else:
            self._rereplicate()

    def _propose_joins(self) -> None:
        """Propose the waiting joiners, unless they are known not to cover the experts by themselves.

        A joiner stays in ``pending_joins`` until a commit names it or it dies: joins that could not
        be committed (no member left, too few slots) are proposed again with later joiners."""
        for r in [r for r in self.pending_joins if self.is_dead(r)]:
            del self.pending_joins[r]
            self.timeline.event("join_dropped", rank=r, reason="died while waiting")
        waiting = dict(self.pending_joins)
        if not waiting or (self.membership is None and set(waiting) <= self.uncoverable):
            return  # nothing new: the same ranks (or fewer) could not cover the experts last time
        if self.propose(failed=set(), joined=waiting, reason="join"):
            for r, body in waiting.items():  # committed, or died during the proposal
                if self.pending_joins.get(r) is body:
                    del self.pending_joins[r]

    def _rereplicate(self) -> None:
        """Publish the re-replication of the maps in force, or switch to it once its copies are done.

        After a repair commit the members' spare slots take extra replicas of the experts the failure
        left short (``RepairRules.rereplication``), so the next failure is routing-only where slots
        allow. The ``rereplicate`` decision has no prepare: members copy while they serve and post
        ``rereplicated/<epoch>/<rank>``; once every destination did, a normal prepare/commit switches
        the maps (its copies are already held). A failure or join first voids it; it is then planned
        again from the maps that commit leaves."""
        if not self.cfg.rereplicate or self.membership is None or self.held_since is not None:
            return
        if self.rereplication is None:
            if not self.rereplication_due:
                return
            plan = self.rules.rereplication(self.placement, self.active, self.committed_epoch)
            if not plan.transfers:
                self.rereplication_due = False
                return
            self.rereplication = {"epoch": self.committed_epoch, "plan": plan, "since": time.monotonic(),
                                  "waiting": {t.dst_rank for t in plan.transfers}}
            self._publish({"kind": "rereplicate", "epoch": self.committed_epoch,
                           "placement": plan.placement.to_dict(), "plan": plan.to_wire()})
            self.timeline.event("rereplicate", epoch=self.committed_epoch, plan=plan.timeline())
            return
        pending = self.rereplication
        now = time.monotonic()
        if now < pending.get("next_check", 0.0):
            return  # throttled: each check is a store round trip per destination
        pending["next_check"] = now + self.cfg.heartbeat_interval_s / 10
        if now - pending["since"] > self.cfg.restore_timeout_s:
            log.warning("epoch %d: ranks %s did not finish re-replicating within %.0f s; given up",
                        pending["epoch"], sorted(pending["waiting"]), self.cfg.restore_timeout_s)
            self.timeline.event("rereplication_failed", epoch=pending["epoch"], ranks=sorted(pending["waiting"]),
                                error="timeout")
            self.rereplication, self.rereplication_due = None, False
            return
        for r in sorted(pending["waiting"]):
            key = store_key(self.run_id, Key.REREPLICATED, pending["epoch"], r)
            if not self.store.check([key]):
                continue
            body = self._open(key)
            if body is None or body.get("rank") != r or body.get("epoch") != pending["epoch"]:
                continue
            if not body.get("ok"):
                log.warning("epoch %d: rank %d could not re-replicate (%s); re-replication given up",
                            pending["epoch"], r, body.get("error"))
                self.timeline.event("rereplication_failed", epoch=pending["epoch"], rank=r, error=body.get("error"))
                self.rereplication, self.rereplication_due = None, False
                return
            pending["waiting"].discard(r)
        if not pending["waiting"]:
            self.propose(failed=set(), joined={}, reason="rereplicate")

    def fail(self, ranks: list[int], reason: str) -> None:
        ranks = [r for r in ranks if self.active[r]]
        if ranks:
            self.propose(failed=set(ranks), joined={}, reason=reason)

    def shutdown(self) -> None:
        self._publish({"kind": "shutdown"})

    # ---- deciding ----
    def propose(self, *, failed: set[int], joined: dict[int, dict], reason: str,
                suspects: set[int] | None = None) -> bool:
        """Prepare, collect acks, commit. Returns False when the decision cannot be made.

        ``suspects``: ranks a peer reported; each one that also stays silent for the corroboration
        window without acking is dead (two independent signals agree), instead of after the whole
        suspicion window."""
        while True:
            old_active = self.active
            continuing = [r for r in range(self.cfg.num_ranks) if old_active[r] and r not in failed]
            joined = {r: b for r, b in joined.items() if not self.is_dead(r)}
            if reason == "join" and not joined:
                reason = "resync"  # the joiner died during its join: the epoch still moves on
            if not continuing and not joined:
                log.error("epoch %d: no rank would remain active (failed %s); waiting for joins", self.epoch, sorted(failed))
                self._drop_members(failed)
                return False
            epoch = self.epoch + 1
            new_active = [r in continuing or r in joined for r in range(self.cfg.num_ranks)]
            t_plan = time.perf_counter()
            try:
                # every member new: the initial placement repaired for the absent ranks
                plan = self.rules.plan_commit(self.placement, old_active, failed, joined, epoch,
                                              rereplicate=reason == "rereplicate") if continuing \
                    else self.rules.plan_start(new_active, epoch)
            except InsufficientSlotsError as exc:  # only joiners: they wait for more joiners (``_propose_joins``)
                self.uncoverable = frozenset(joined)
                log.warning("epoch %d: joiners %s alone cannot cover every expert (%s); waiting for more",
                            epoch, sorted(joined), exc)
                self.timeline.event("unrepairable", epoch=epoch, failed=sorted(failed), joined=sorted(joined),
                                    error=str(exc))
                self._drop_members(failed)
                return False
            plan_s = time.perf_counter() - t_plan
            self.epoch = epoch  # consumed even if re-proposed: epochs only grow
            self._publish({"kind": "prepare", "epoch": epoch, "active": new_active, "reason": reason})
            self.timeline.event("prepare", epoch=epoch, reason=reason, failed=sorted(failed), joined=sorted(joined))
            self.on_phase(f"prepare_{'fail' if failed else reason}", {"epoch": epoch, "failed": sorted(failed),
                                                                       "joined": sorted(joined)})
            acks, missing = self._collect_acks(epoch, continuing, suspects or set())
            if missing:
                log.warning("epoch %d: ranks %s did not acknowledge; declaring them dead", epoch, missing)
                failed |= set(missing)
                reason = "fail" if reason != "heartbeat" else reason
                continue
            if any(self.is_dead(r) for r in joined):
                continue  # a joiner died during its join: propose again without it
            start_step = max(acks.values(), default=0)
            requeue = self._requeue(set(continuing), new_active, epoch, joined)
            # a fault hook (launcher ``Fault(on_phase="commit_...")``): a rank killed here is committed
            # as a member, as when it dies between the last check above and the commit reaching ranks
            self.on_phase(f"commit_{'fail' if failed else reason}", {"epoch": epoch, "failed": sorted(failed),
                                                                     "joined": sorted(joined)})
            self.membership = Membership(self.cfg.num_ranks, active=new_active, epoch=epoch)
            self._commit(epoch, plan, failed=sorted(failed), joined=joined, start_step=start_step, requeue=requeue,
                         reason=reason, plan_s=plan_s)
            self.heartbeat_seen = {r: v for r, v in self.heartbeat_seen.items() if new_active[r]}
            self.on_phase(f"committed_{'fail' if failed else reason}", {"epoch": epoch, "failed": sorted(failed),
                                                                        "joined": sorted(joined)})
            return True

    def _drop_members(self, failed: set[int]) -> None:
        if self.membership is not None:
            mask = [a and r not in failed for r, a in enumerate(self.active)]
            # No member left: nothing serves until a rank joins (then ``RepairRules.plan_start`` starts afresh).
            self.membership = Membership(self.cfg.num_ranks, active=mask, epoch=self.epoch) if any(mask) else None

    def _collect_acks(self, epoch: int, expected: list[int], suspects: set[int]) -> tuple[dict[int, int], list[int]]:
        start = time.monotonic()
        deadline = start + self.cfg.suspicion_window_s
        acks: dict[int, int] = {}
        next_beat_check = 0.0
        busy: list[int] = []  # waiting members still copying their slots, heartbeat alive
        while True:
            for r in expected:
                if r in acks:
                    continue
                key = store_key(self.run_id, Key.ACK, epoch, r)
                if self.store.check([key]):
                    body = self._open(key)
                    if body is not None and body.get("rank") == r and body.get("epoch") == epoch:
                        acks[r] = int(body["step"])
            waiting = [r for r in expected if r not in acks]
            dead = [r for r in waiting if self.is_dead(r)]
            now = time.monotonic()
            if not dead and now >= next_beat_check and suspects.intersection(waiting):
                next_beat_check = now + self.cfg.heartbeat_interval_s / 2
                dead = [r for r in waiting if r in suspects
                        and now - self._observe_heartbeat(r, now) > self.cfg.corroboration_window_s]
                if dead:
                    self.timeline.event("corroborated", epoch=epoch, ranks=dead)
            if dead:
                return acks, dead  # fail them now; the others are re-asked in the next proposal
            if not waiting:
                return acks, waiting
            if now > deadline:
                # members still restoring for the last commit ack once their copies are done; they get
                # restore_timeout_s as long as their heartbeats keep changing
                busy = [r for r in waiting if now - self._observe_heartbeat(r, now) <= self.cfg.suspicion_window_s
                        and self.heartbeat_phase.get(r) in ("restoring", "awaiting")
                        and now - start < self.cfg.restore_timeout_s]
                if len(busy) < len(waiting):
                    return acks, [r for r in waiting if r not in busy]
                deadline = now + self.cfg.heartbeat_interval_s
            time.sleep(0.0005)

    def _commit(self, epoch: int, plan: CommitPlan, *, failed: list[int], joined: dict[int, dict], start_step: int,
                requeue: dict[int, list[int]], reason: str, plan_s: float = 0.0) -> None:
        self.uncoverable = frozenset()  # the membership changed: any set of joiners may be tried again
        self.placement = plan.placement
        self.committed_epoch = epoch
        self.rereplication = None  # its copies, if any, were voided at the prepare (or are switched to now)
        if reason == "rereplicate":
            self.rereplication_due = False
        elif failed:
            self.rereplication_due = True
        for r, body in joined.items():
            self.incarnation[r] = int(body["incarnation"])
            self.heartbeat_seen[r] = (-1, time.monotonic())
        body = {"kind": "commit", "epoch": epoch, "active": self.active, "failed": failed,
                "joined": {str(r): b["nonce"] for r, b in joined.items()}, "start_step": start_step,
                "placement": self.placement.to_dict(), "plan": plan.to_wire(),
                "requeue": {str(r): q for r, q in requeue.items()}, "reason": reason,
                "incarnations": {str(r): self.incarnation.get(r, 0) for r, a in enumerate(self.active) if a}}
        self._publish(body)
        self.decisions.append(body)
        self.timeline.event("commit", epoch=epoch, reason=reason, failed=failed, joined=sorted(joined),
                            start_step=start_step, num_requeued=sum(len(q) for q in requeue.values()),
                            plan_s=plan_s, plan=plan.timeline())
        self._track_coverage(epoch, plan, failed)

    def _track_coverage(self, epoch: int, plan: CommitPlan, failed: list[int]) -> None:
        """Start or end a hold: an epoch that lost coverage serves nothing until one restores it."""
        if plan.is_valid:
            if self.held_since is not None:
                log.warning("epoch %d: coverage restored; the held requests are served", epoch)
                self.timeline.event("coverage_restored", epoch=epoch, held_s=time.monotonic() - self.held_since)
            self.held_since, self.hold_reason, self.lost_ranks = None, None, set()
            return
        if self.held_since is None:
            self.held_since = time.monotonic()
        self.lost_ranks |= set(failed)
        self.hold_reason = (f"epoch {epoch} cannot serve: after ranks {sorted(self.lost_ranks)} failed, "
                            f"{plan.describe_uncovered()}")
        log.error("%s; requests are held until a rejoin restores coverage (at most %.1f s)", self.hold_reason,
                  self.cfg.uncovered_hold_s)
        self.timeline.event("coverage_lost", epoch=epoch, uncovered={str(k): v for k, v in plan.uncovered.items()},
                            missing_slots=plan.num_missing_slots, failed=sorted(self.lost_ranks))

    def refuse_unanswered(self, why: str) -> int:
        """Answer every request that has no answer yet with an error saying ``why``; returns how many.

        Requests not handed out yet are taken first (so no rank claims one afterwards); each
        refusal is written once with the same compare-and-set as an answer, so a request is
        either answered or refused, never both."""
        num = self.cfg.num_requests
        self.store.add(store_key(self.run_id, Key.QUEUE_NEXT), num)  # every id handed out: nothing left to claim
        value = json.dumps({"refused": why})
        refused = 0
        for q in range(self.advance_answered(), num):
            got = self.store.compare_set(store_key(self.run_id, Key.RESULT, q), "", value)
            refused += got.decode() == value
        self.refusal = why
        log.error("refused %d unanswered requests: %s", refused, why)
        self.timeline.event("refused", num=refused, reason=why)
        return refused

    def _publish(self, body: dict) -> None:
        self.num_decisions += 1
        key = store_key(self.run_id, Key.DECISION, self.num_decisions)
        self.store.set(key, self.sealer.seal(key, body))

    # ---- requests ----
    def _requeue(self, continuing: set[int], new_active: list[bool], epoch: int,
                 joined: dict[int, dict]) -> dict[int, list[int]]:
        """Unanswered requests whose owner is not a continuing member, dealt to the new members.

        The owner key names the incarnation that will serve it (a joiner's is in its join request):
        a rank publishes an answer only while the owner key names it."""
        orphans = []
        for q in self._unanswered():
            owner_key = store_key(self.run_id, Key.OWNER, q)
            mine = f"coordinator:{epoch}"
            owner = self.store.compare_set(owner_key, "", mine).decode()  # takes it if never owned
            if owner == mine or int(owner.split(":")[0]) not in continuing:
                orphans.append(q)
        targets = sorted(continuing) or [r for r, a in enumerate(new_active) if a]
        requeue: dict[int, list[int]] = {}
        for i, q in enumerate(orphans):
            r = targets[i % len(targets)]
            requeue.setdefault(r, []).append(q)
            inc = int(joined[r]["incarnation"]) if r in joined else self.incarnation.get(r, 0)
            self.store.set(store_key(self.run_id, Key.OWNER, q), f"{r}:{inc}:{epoch}")
        return requeue

    def holds_requests(self, rank: int) -> bool:
        """Whether ``rank`` owns an unanswered request. Checked when a non-member dies: the commit
        that failed it re-queued all it held then, but a fenced rank can claim one afterwards."""
        for q in self._unanswered():
            owner_key = store_key(self.run_id, Key.OWNER, q)
            if self.store.check([owner_key]) and self.store.get(owner_key).decode().split(":")[0] == str(rank):
                return True
        return False

    def _unanswered(self):
        """Ids of the requests handed out so far that have no answer yet (ascending)."""
        num_handed_out = min(self.store.add(store_key(self.run_id, Key.QUEUE_NEXT), 0), self.cfg.num_requests)
        self.advance_answered(num_handed_out)
        for q in range(self.answered_below, num_handed_out):
            if not self.store.check([store_key(self.run_id, Key.RESULT, q)]):
                yield q

    def advance_answered(self, limit: int | None = None) -> int:
        """Move ``answered_below`` past answered requests; returns it. ``results/count`` alone cannot
        say "all answered": a rank killed between writing an answer and counting it leaves it short."""
        limit = self.cfg.num_requests if limit is None else limit
        while self.answered_below < limit and \
                self.store.check([store_key(self.run_id, Key.RESULT, self.answered_below)]):
            self.answered_below += 1
        return self.answered_below

    # ---- evidence ----
    def _read_joins(self) -> None:
        count = self.store.add(store_key(self.run_id, Key.JOIN, "count"), 0)
        while self.joins_seen < count:
            key = store_key(self.run_id, Key.JOIN, self.joins_seen + 1)
            if not self.store.check([key]):
                return  # allocated, not yet written: read it next time
            self.joins_seen += 1
            body = self._open(key)
            if body is None:
                continue
            try:
                rank, nonce, inc = int(body["rank"]), str(body["nonce"]), int(body["incarnation"])
            except (KeyError, TypeError, ValueError):
                log.warning("ignored a malformed join request at %s", key)
                continue
            if not 0 <= rank < self.cfg.num_ranks or nonce in self.used_nonces:
                log.warning("ignored join request at %s: rank %s / nonce %s invalid or replayed", key, rank, nonce)
                continue
            if self.membership is not None and self.active[rank]:
                log.warning("ignored join request from rank %d: it is an active member of epoch %d", rank, self.epoch)
                continue
            self.used_nonces.add(nonce)
            self.pending_joins[rank] = {"rank": rank, "nonce": nonce, "incarnation": inc}
            self.timeline.event("join_request", rank=rank, incarnation=inc)

    def _read_reports(self) -> list[int]:
        count = self.store.add(store_key(self.run_id, Key.REPORT, "count"), 0)
        suspects = []
        while self.reports_seen < count:
            key = store_key(self.run_id, Key.REPORT, self.reports_seen + 1)
            if not self.store.check([key]):
                break
            self.reports_seen += 1
            body = self._open(key)
            if body is None:
                continue
            try:
                rank, epoch = int(body["rank"]), int(body["epoch"])
            except (KeyError, TypeError, ValueError):
                continue
            if epoch == self.epoch and 0 <= rank < self.cfg.num_ranks and self.active[rank]:
                suspects.extend(int(r) for r in body.get("missed", []))
                suspects.append(rank)
                self.timeline.event("report", rank=rank, epoch=epoch, missed=body.get("missed"))
        return suspects

    def _silent_ranks(self) -> list[int]:
        now = time.monotonic()
        return [r for r in range(self.cfg.num_ranks)
                if self.active[r] and now - self._observe_heartbeat(r, now) > self.cfg.suspicion_window_s]

    def _observe_heartbeat(self, rank: int, now: float) -> float:
        """Read ``rank``'s heartbeat; returns when it was last seen to change (monotonic)."""
        key = store_key(self.run_id, Key.HEARTBEAT, rank)
        seq, since = self.heartbeat_seen.get(rank, (-1, now))
        if self.store.check([key]):
            body = self._open(key)
            if body is not None and body.get("rank") == rank and body.get("incarnation") == self.incarnation.get(rank) \
                    and body.get("seq") != seq:
                seq, since = body.get("seq"), now
                self.heartbeat_phase[rank] = str(body.get("phase"))
        self.heartbeat_seen[rank] = (seq, since)
        return since

    def _open(self, key: str) -> dict | None:
        raw = self.store.get(key)
        if self._last_bad.get(key) == raw:
            return None
        body = self.sealer.open(key, raw)
        if body is None:
            self._last_bad[key] = raw
            self.timeline.event("rejected_message", key=key)
        return body


class StartupError(RuntimeError):
    """Ranks died (``ranks``) or stayed silent before the first epoch could be committed."""

    def __init__(self, ranks: list[int], message: str):
        self.ranks = ranks
        super().__init__(message)
