"""Every TCPStore key the runtime uses comes from ``store_key``; the layout is listed here.

    eep/<run>/decision/<i>          coordinator -> ranks, i = 1, 2, ... (append-only log, sealed)
    eep/<run>/ack/<epoch>/<rank>    rank -> coordinator: paused at a step boundary (sealed)
    eep/<run>/restored/<epoch>/<rank>  rank -> members: its copies and switch for that epoch are done (sealed)
    eep/<run>/rereplicated/<epoch>/<rank>  rank -> coordinator: its re-replication copies are done (sealed)
    eep/<run>/weights/<rank>        the rank's slot memory: fd server address, layout, incarnation
    eep/<run>/hb/<rank>             rank heartbeat (sealed)
    eep/<run>/join/count, join/<i>  join requests, append-only (sealed)
    eep/<run>/report/count, report/<i>   transport-timeout evidence, append-only (sealed)
    eep/<run>/queue/next            next request id to hand out (store.add)
    eep/<run>/owner/<request>       "rank:incarnation:epoch" of the rank serving it (compare_set)
    eep/<run>/result/<request>      the answer, written once (compare_set from "")
    eep/<run>/results/count         number of accepted answers
"""

from __future__ import annotations

import enum


class Key(enum.Enum):
    DECISION = "decision"
    ACK = "ack"
    RESTORED = "restored"
    REREPLICATED = "rereplicated"
    WEIGHTS = "weights"
    HEARTBEAT = "hb"
    JOIN = "join"
    REPORT = "report"
    QUEUE_NEXT = "queue/next"
    OWNER = "owner"
    RESULT = "result"
    RESULTS_COUNT = "results/count"


def store_key(run_id: str, key: Key, *parts: int | str) -> str:
    """The store key of ``key`` (plus index parts) for run ``run_id``; the only place keys are built."""
    if not isinstance(key, Key):
        raise TypeError(f"store_key needs a Key, got {key!r}")
    return "/".join(["eep", run_id, key.value, *(str(p) for p in parts)])
