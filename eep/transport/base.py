"""The transport interface: fixed peer receive regions, (epoch, step)-tagged flags, bounded receive.

A transport moves bytes between rank slots following the data plane's plan and makes no
decisions. Every implementation (host shared memory here; CUDA IPC peer memory in ``eep.fused``)
has the same shape:

- allocated once for ``num_ranks`` rank slots and ``num_channels`` channels (the data plane uses
  one channel per (layer, phase)); each (channel, dst, src) pair owns one receive region of
  ``capacity_nbytes`` bytes in the destination's memory and one flag;
- ``send`` writes the payload into the destination's region for this source, *then* sets the flag
  to the tag of ``(epoch, step)`` (``eep.exchange.tags``, the one encoding);
- ``recv`` waits only for the peers it is given (the active ones), polling their flags until each
  equals the expected tag or the bounded wait expires; the peers that missed it are returned (they
  are evidence for the control plane, never waited on again in this step).

A region has exactly one writer (its source rank), and the protocol guarantees a source does not
rewrite a region before the destination has read it: a source only sends the next message on a
channel after it has received the destination's reply for the current one.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import torch

@dataclass
class RecvResult:
    """What ``recv`` returns.

    buffers: peer rank -> ``[capacity_nbytes]`` uint8 view of the region it wrote (valid until that
        peer's next send on this channel); only peers that arrived in time.
    missed: peers that did not arrive before the deadline (or before the abort), ascending.
    is_aborted: the wait stopped early because ``should_abort`` returned True.
    """

    buffers: dict[int, torch.Tensor] = field(default_factory=dict)
    missed: list[int] = field(default_factory=list)
    is_aborted: bool = False

    @property
    def ok(self) -> bool:
        return not self.missed and not self.is_aborted


class Transport(Protocol):
    """Point-to-point byte transport between rank slots (see the module docstring)."""

    rank: int
    num_ranks: int
    num_channels: int
    capacity_nbytes: int

    def send(self, channel: int, dst: int, payload: torch.Tensor, *, epoch: int, step: int) -> None:
        """Copy ``payload`` (any contiguous CPU tensor, at most ``capacity_nbytes``) into ``dst``'s
        region for this rank on ``channel``, then publish the ``(epoch, step)`` flag."""
        ...

    def recv(self, channel: int, peers: Sequence[int], *, epoch: int, step: int, timeout_s: float,
             should_abort: Callable[[], bool] | None = None) -> RecvResult:
        """Wait up to ``timeout_s`` for every rank in ``peers`` to have sent ``(epoch, step)`` on
        ``channel``; never longer, whatever the peers do."""
        ...

    def close(self) -> None:
        ...
