"""The exchange protocol: what every backend that moves token rows between ranks offers.

One protocol, one module per backend (docs/design.md "Exchange seam"):

| backend | module | where |
| --- | --- | --- |
| host shared memory | ``eep.exchange.shm`` (``ShmExchange``, ``ShmPrefillExchange``) | CPU, across processes |
| one rank in-process | ``eep.exchange.local`` (``LocalExchange``) | any device, no peers |
| NCCL / gloo baseline | ``eep.exchange.collective`` (``CollectiveExchange``) | all-to-all with splits, fixed membership |
| fused decode | ``eep.fused.buffer`` (``FusedBuffer``) | CUDA kernels over VMM peer memory |
| fused prefill | ``eep.fused.prefill`` (``PrefillBuffer``) | CUDA kernels over VMM peer memory |

Every backend holds the process's one ``eep.Membership`` (``membership``): it waits only for the
members its mask names (a kernel reads ``membership.active_device`` at every launch) and never longer
than its timeout per peer; a peer that misses a deadline becomes a *suspect* — counted in
``miss_count``, flagged in ``suspect``, contributing nothing and not waited for again — until the
next ``set_membership``. ``set_membership`` is the only way the epoch changes, and it restarts every
member's step counter at ``first_tag(epoch)`` (the sequence realignment, done here once for every
backend), so a rank that rejoins agrees with the survivors on the next tag without a collective.

Membership verbs follow NIXL EP's buffer (``connect_ranks`` / ``disconnect_ranks``): ``connect``
maps peers (all at the start, a rejoined rank's new incarnation later) without activating them;
``set_membership`` activates and deactivates. Connecting a peer never needs the others' help, which
is what lets a multi-node backend (docs/multinode.md) fit behind the same protocol.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch

from eep.errors import PeerUnreachableError
from eep.exchange.layout import DispatchHandle, PackedHandle, PackedReceive, RankReceive
from eep.state import Membership

_log = logging.getLogger("eep.exchange")


@dataclass
class ExchangeStatus:
    """A host snapshot of a backend's evidence (reading a device backend's synchronises its stream).

    epoch: the epoch of the last ``set_membership``; step: calls completed in it (dispatch and
    combine count one each); active: the mask the backend waits by; suspect: missed a deadline since
    the last ``set_membership`` (not waited for); miss_count: deadlines missed, ever, per rank.
    """

    epoch: int
    step: int
    active: list[bool]
    suspect: list[bool]
    miss_count: list[int]

    @property
    def missed_ranks(self) -> list[int]:
        return [r for r, n in enumerate(self.miss_count) if n]


@runtime_checkable
class Exchange(Protocol):
    """The membership verbs every backend has (see the module docstring).

    ``miss_count`` (int64 ``[num_ranks]``) and ``suspect`` (``[num_ranks]``, non-zero = suspect) are
    tensors on the backend's device, updated by every call without a host round trip, so a captured
    CUDA graph can copy the evidence out with its outputs.
    """

    rank: int
    num_ranks: int
    membership: Membership
    connected: set[int]         # ranks whose current incarnation is mapped (this rank included)
    miss_count: torch.Tensor
    suspect: torch.Tensor
    is_membership_aware: bool   # False: a fixed-membership baseline that cannot serve a partial mask
    is_graph_safe: bool         # True: dispatch/combine never wait for the host (CUDA-graph capturable)

    def connect(self, ranks: Sequence[int], *, timeout_s: float) -> None:
        """Map these peers' current incarnations (a handshake each, within one deadline of
        ``timeout_s``); raises ``PeerUnreachableError`` naming those that did not answer, after
        connecting the others."""
        ...

    def set_membership(self, membership: Membership) -> None:
        """Adopt ``membership``'s epoch and mask (device mirror written in place), forget suspicions,
        restart steps at ``first_tag(epoch)``. Every member calls it between the same two steps."""
        ...

    def set_timeout(self, timeout_s: float) -> None:
        """Bound on every wait for one peer from the next call on (graph-capturable on a device backend)."""
        ...

    def status(self) -> ExchangeStatus:
        ...

    def close(self) -> None:
        ...


@runtime_checkable
class DecodeExchange(Exchange, Protocol):
    """Low-latency mode: a top-k copy of a token per selected slot, in per-(slot, source) blocks.

    Its receive layout's shape: ``slots_per_rank``, ``max_tokens_per_rank`` (rows per (slot, source)
    block, and the most tokens one rank dispatches), ``hidden``; ``use_fp8``: rows travel as e4m3."""

    slots_per_rank: int
    max_tokens_per_rank: int
    hidden: int
    use_fp8: bool

    def dispatch(self, x: torch.Tensor, phys: torch.Tensor) -> tuple[RankReceive, DispatchHandle]:
        """Send every (token, k) copy to the rank hosting physical slot ``phys[token, k]``.

        x: ``[num_tokens, hidden]``; phys: ``[num_tokens, top_k]`` int64 (``route_to_phys``), -1 = none.
        Returns this rank's receive layout (valid until its next combine returns) and the handle."""
        ...

    def combine(self, y: torch.Tensor, handle: DispatchHandle, topk_weights: torch.Tensor,
                out: torch.Tensor | None = None) -> torch.Tensor:
        """Send expert outputs ``y`` (receive layout) home and sum each token's copies with
        ``topk_weights`` in float32 (k order), rounded once to ``y``'s dtype; absent contributions
        (non-members, suspects) add nothing. Returns ``[num_tokens, hidden]``."""
        ...


@runtime_checkable
class PrefillExchange(Exchange, Protocol):
    """Prefill ("normal") mode: one copy of a token per destination rank, packed per source
    (``max_tokens_per_rank`` rows per source region, ``slots_per_rank`` local slots, ``hidden``)."""

    slots_per_rank: int
    max_tokens_per_rank: int
    hidden: int

    def dispatch(self, x: torch.Tensor, phys: torch.Tensor,
                 topk_weights: torch.Tensor) -> tuple[PackedReceive, PackedHandle]:
        ...

    def combine(self, partial: torch.Tensor, handle: PackedHandle, out: torch.Tensor | None = None) -> torch.Tensor:
        """``partial [num_ranks, max_tokens_per_rank, hidden]``: each received row's local experts
        summed with its weights; returns ``[num_tokens, hidden]``, partials added in rank order."""
        ...


MIN_PEER_CONNECT_S = 0.05  # each peer's share of a connect deadline never drops below this (a live one needs < 1 ms)


def connect_each(rank: int, peers: Sequence[int], timeout_s: float, connect_one: Callable[[int, float], None]) -> None:
    """Call ``connect_one(peer, seconds)`` for every peer within one deadline of ``timeout_s``.

    A peer whose handshake fails (``OSError``: no server, refused, reset, timed out) is that peer's
    failure, not this rank's: it is logged, the other peers are still connected, and
    ``PeerUnreachableError`` names the failed ones at the end. Each peer gets what is left of the
    deadline but at least ``MIN_PEER_CONNECT_S``, so one stopped peer cannot make a live one look dead.
    """
    deadline = time.monotonic() + timeout_s
    failed, reasons = [], []
    for peer in peers:
        if peer == rank:
            continue
        try:
            connect_one(peer, max(deadline - time.monotonic(), MIN_PEER_CONNECT_S))
        except OSError as exc:
            _log.warning("rank %d: could not connect rank %d: %s", rank, peer, exc)
            failed.append(peer)
            reasons.append(f"rank {peer}: {exc}")
    if failed:
        raise PeerUnreachableError(failed, "; ".join(reasons))


def check_membership(exchange: Exchange, membership: Membership) -> None:
    """What every ``set_membership`` checks first: same rank slots, and this rank is a member."""
    if membership.num_ranks != exchange.num_ranks:
        raise ValueError(f"set_membership: {membership} has {membership.num_ranks} rank slots, the exchange "
                         f"{exchange.num_ranks}")
    if not membership.is_active(exchange.rank):
        raise ValueError(f"set_membership: rank {exchange.rank} is not a member of {membership}; "
                         "stop calling dispatch instead")


def adopt(exchange: Exchange, membership: Membership) -> None:
    """Write ``membership`` into the exchange's own (the process's one) ``Membership``, in place.

    Refuses a membership with a member that is not connected: a step would write through a missing
    (or a dead incarnation's) peer mapping."""
    check_membership(exchange, membership)
    unmapped = [r for r in membership.active_ranks() if r not in exchange.connected]
    if unmapped:
        raise PeerUnreachableError(unmapped, f"rank {exchange.rank}: epoch {membership.epoch} has members whose "
                                             "buffers are not mapped; connect them first")
    if membership is not exchange.membership:
        exchange.membership.copy_from(membership)
