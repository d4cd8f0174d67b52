"""Sizes of one rank's expert stage and the checks every backend applies to its inputs."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class ExpertStageShape:
    """What fixes the buffers of one rank's expert stage.

    The receive layout is ``[slots_per_rank, num_ranks, max_tokens_per_rank, hidden]`` with counts
    ``[slots_per_rank, num_ranks]`` (``eep.reference.dispatch``). ``top_k`` bounds the rows a rank
    can receive: a token reaches a given rank's slot at most once and at most ``top_k`` slots, so
    ``num_ranks * max_tokens_per_rank * min(top_k, slots_per_rank)`` rows (``capacity_rows``) hold
    every received row in compact form.
    """

    slots_per_rank: int
    num_ranks: int
    max_tokens_per_rank: int
    hidden: int
    inter: int
    top_k: int

    def __post_init__(self) -> None:
        for name in ("slots_per_rank", "num_ranks", "max_tokens_per_rank", "hidden", "inter", "top_k"):
            if getattr(self, name) < 1:
                raise ValueError(f"ExpertStageShape.{name}={getattr(self, name)} must be >= 1")

    @property
    def num_groups(self) -> int:
        """(local slot, source rank) blocks of the receive layout."""
        return self.slots_per_rank * self.num_ranks

    @property
    def num_rows(self) -> int:
        """Rows of the receive layout, valid or not."""
        return self.num_groups * self.max_tokens_per_rank

    @property
    def capacity_rows(self) -> int:
        return self.num_ranks * self.max_tokens_per_rank * min(self.top_k, self.slots_per_rank)

    def check(self, x: torch.Tensor, count: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor) -> None:
        """Raise ``ValueError`` naming the tensor that does not fit this shape."""
        s, r, t, h, i = self.slots_per_rank, self.num_ranks, self.max_tokens_per_rank, self.hidden, self.inter
        expected = {"x": (x, (s, r, t, h)), "count": (count, (s, r)), "w13": (w13, (s, 2 * i, h)), "w2": (w2, (s, h, i))}
        for name, (tensor, shape) in expected.items():
            if tuple(tensor.shape) != shape:
                raise ValueError(f"expert stage: {name} has shape {tuple(tensor.shape)}, expected {shape} "
                                 "([slots_per_rank, num_ranks, max_tokens_per_rank, hidden] for x, "
                                 "[slots_per_rank, 2*inter, hidden] for w13, [slots_per_rank, hidden, inter] for w2)")
        for name, tensor in (("w13", w13), ("w2", w2)):
            if tensor.dtype != x.dtype:
                raise ValueError(f"expert stage: {name} has dtype {tensor.dtype}, x has {x.dtype}")
            if tensor.device != x.device:
                raise ValueError(f"expert stage: {name} is on {tensor.device}, x on {x.device}")
        if count.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"expert stage: count has dtype {count.dtype}, expected int32")
