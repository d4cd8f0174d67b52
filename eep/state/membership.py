"""Membership: which rank slots are active, and the epoch that versions that set.

A *rank slot* is one EP position ``0..num_ranks-1``, fixed for the life of the instance. Ranks
are never renumbered: a dead rank leaves a hole in the mask, and a repaired process takes the
same slot back. Every transition bumps ``epoch`` so that messages and kernel launches can be
fenced against stale views.

Two copies of the mask exist:

- ``active_cpu``    bool  ``[num_ranks]``  the host's truth, read by planners and checks;
- ``active_device`` int32 ``[num_ranks]``  the mirror kernels read at every launch. It is
  allocated once and written in place, never reallocated, so a CUDA graph captured against it
  sees each new membership without recapture. ``epoch_device`` (int64 ``[1]``) likewise.

One ``Membership`` per process is the source every exchange backend and kernel reads (docs/design.md
"Exchange seam"). A serving stack that already owns a device mask (SGLang's ``active_ranks``) passes
it as ``active_device``: it becomes the mirror, so the stack's tensor and eep's are one tensor.
The data plane may clear entries of the mirror as evidence (a peer that missed a deadline, Mooncake
EP's convention); the host mask changes only through the transitions.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from eep.errors import MembershipError


class Membership:
    """Fixed-capacity rank slots with an epoch-versioned active mask."""

    def __init__(self, num_ranks: int, *, device: torch.device | str = "cpu",
                 active: Iterable[bool] | None = None, epoch: int = 0, active_device: torch.Tensor | None = None):
        if not isinstance(num_ranks, int) or num_ranks < 1:
            raise MembershipError(f"num_ranks must be a positive int, got {num_ranks!r}")
        if active is None and active_device is not None:
            active = active_device.tolist()  # adopt the caller's mask as it stands
        mask = [True] * num_ranks if active is None else [bool(a) for a in active]
        if len(mask) != num_ranks:
            raise MembershipError(f"active mask has {len(mask)} entries, expected num_ranks={num_ranks}")
        if not any(mask):
            raise MembershipError("a membership needs at least one active rank")
        self.num_ranks = num_ranks
        self.epoch = int(epoch)
        self.active_cpu = torch.tensor(mask, dtype=torch.bool)
        if active_device is None:
            self.active_device = torch.tensor(mask, dtype=torch.int32, device=device)
        else:
            if tuple(active_device.shape) != (num_ranks,) or active_device.dtype != torch.int32:
                raise MembershipError(f"active_device has shape {tuple(active_device.shape)} {active_device.dtype}, "
                                      f"expected int32 [{num_ranks}]")
            self.active_device = active_device
            self.active_device.copy_(self.active_cpu.to(torch.int32))
        self.epoch_device = torch.tensor([self.epoch], dtype=torch.int64, device=self.active_device.device)

    # ---- queries ----
    @property
    def active(self) -> torch.Tensor:
        """Host bool mask ``[num_ranks]`` (a view: do not write it, use the transitions)."""
        return self.active_cpu

    def is_active(self, rank: int) -> bool:
        self._check_rank(rank)
        return bool(self.active_cpu[rank])

    def active_ranks(self) -> list[int]:
        return [r for r in range(self.num_ranks) if bool(self.active_cpu[r])]

    @property
    def num_active(self) -> int:
        return int(self.active_cpu.sum())

    # ---- transitions (validate everything first, then mutate: a rejected call changes nothing) ----
    def fail(self, ranks: int | Iterable[int]) -> int:
        """Mark ``ranks`` dead; returns the new epoch."""
        ranks = self._validated_failures(ranks)
        for r in ranks:
            self.active_cpu[r] = False
        return self._bump()

    def join(self, rank: int) -> int:
        """Mark a previously failed ``rank`` active again; returns the new epoch."""
        self.check_join(rank)
        self.active_cpu[rank] = True
        return self._bump()

    def check_join(self, rank: int) -> None:
        """Raise ``MembershipError`` unless ``join(rank)`` would be accepted."""
        self._check_rank(rank)
        if bool(self.active_cpu[rank]):
            raise MembershipError(f"rank {rank} is already active (epoch {self.epoch}); cannot join it")

    def after_failure(self, ranks: int | Iterable[int]) -> "Membership":
        """The membership that ``fail(ranks)`` would produce, as a new object (self is unchanged)."""
        ranks = self._validated_failures(ranks)
        mask = self.active_cpu.clone()
        mask[ranks] = False
        return Membership(self.num_ranks, active=mask.tolist(), epoch=self.epoch + 1)

    def after_join(self, rank: int) -> "Membership":
        """The membership that ``join(rank)`` would produce, as a new object (self is unchanged)."""
        self.check_join(rank)
        mask = self.active_cpu.clone()
        mask[rank] = True
        return Membership(self.num_ranks, active=mask.tolist(), epoch=self.epoch + 1)

    def copy_from(self, other: "Membership") -> None:
        """Adopt another membership's mask and epoch, writing the device mirrors in place."""
        if other.num_ranks != self.num_ranks:
            raise MembershipError(f"cannot adopt a membership of {other.num_ranks} ranks into one of {self.num_ranks}")
        self.active_cpu.copy_(other.active_cpu)
        self.epoch = other.epoch
        self._sync_device()

    # ---- serialisation ----
    def to_dict(self) -> dict:
        return {"num_ranks": self.num_ranks, "epoch": self.epoch, "active": self.active_cpu.tolist()}

    @classmethod
    def from_dict(cls, data: dict, *, device: torch.device | str = "cpu") -> "Membership":
        return cls(int(data["num_ranks"]), device=device, active=data["active"], epoch=int(data["epoch"]))

    def __repr__(self) -> str:
        dead = [r for r in range(self.num_ranks) if not bool(self.active_cpu[r])]
        return f"Membership(num_ranks={self.num_ranks}, epoch={self.epoch}, dead={dead})"

    # ---- internals ----
    def _check_rank(self, rank: int) -> None:
        if not isinstance(rank, int) or isinstance(rank, bool) or not 0 <= rank < self.num_ranks:
            raise MembershipError(f"rank {rank!r} is out of range for {self.num_ranks} rank slots")

    def _validated_failures(self, ranks: int | Iterable[int]) -> list[int]:
        ranks = [ranks] if isinstance(ranks, int) else [int(r) for r in ranks]
        if not ranks:
            raise MembershipError("fail() needs at least one rank")
        if len(set(ranks)) != len(ranks):
            raise MembershipError(f"fail() got duplicate ranks {ranks}")
        for r in ranks:
            self._check_rank(r)
            if not bool(self.active_cpu[r]):
                raise MembershipError(f"rank {r} has already failed (epoch {self.epoch})")
        if len(ranks) >= self.num_active:
            raise MembershipError(
                f"failing ranks {sorted(ranks)} would leave no active rank (active: {self.active_ranks()})")
        return sorted(ranks)

    def _bump(self) -> int:
        self.epoch += 1
        self._sync_device()
        return self.epoch

    def _sync_device(self) -> None:
        # copy_ rather than assignment: captured graphs hold these exact storages.
        self.active_device.copy_(self.active_cpu.to(torch.int32))
        self.epoch_device.fill_(self.epoch)
