"""The receive layouts: what a rank holds after a dispatch, and what combine needs back.

Every exchange backend (``eep.exchange`` and ``eep.fused``) and the reference (``eep.reference``)
speak these types, so neither imports the other.

Decode (low-latency) mode — a ``max_tokens_per_rank``-row block per (local slot, source rank):

    RankReceive.x          [slots_per_rank, num_ranks, max_tokens_per_rank, hidden]
    RankReceive.count      [slots_per_rank, num_ranks]                      int32
    RankReceive.src_token  [slots_per_rank, num_ranks, max_tokens_per_rank] int32, -1 past count
    RankReceive.scale      [slots_per_rank, num_ranks, max_tokens_per_rank(, hidden // 128)] float32, FP8 only

Row ``x[i, s, j]`` is the ``j``-th token that source rank ``s`` sent to local slot ``i``, in ascending
source-token order. A token reaches a physical slot at most once (its top-k experts are distinct and
a slot holds one expert), so ``max_tokens_per_rank`` rows always suffice.

Prefill ("normal") mode — one copy of a token per destination rank, packed per source:

    PackedReceive.x            [num_ranks(src), max_tokens_per_rank, hidden]  ascending source token
    PackedReceive.count        [num_ranks]                              int32 rows each source sent
    PackedReceive.src_token    [num_ranks, max_tokens_per_rank]         int32, -1 past count
    PackedReceive.local_slot   [num_ranks, max_tokens_per_rank, top_k]  int32 the k-th choice's local
                                                                        slot here, -1 elsewhere
    PackedReceive.weight       [num_ranks, max_tokens_per_rank, top_k]  float32, 0 where local_slot is -1
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from eep.fp8 import dequantize_rows


@dataclass
class RankReceive:
    """What one destination rank holds after a decode dispatch (shapes in the module docstring).

    With FP8 dispatch ``x`` is float8_e4m3fn and ``scale`` holds one float32 per 128 channels of a
    row (``eep.fp8``), or one per row; otherwise ``scale`` is None.
    """

    x: torch.Tensor
    count: torch.Tensor
    src_token: torch.Tensor
    scale: torch.Tensor | None = None

    def dequantized(self) -> torch.Tensor:
        """``x`` as bf16 (a new tensor for FP8, ``x`` itself otherwise)."""
        if self.scale is None:
            return self.x
        return dequantize_rows(self.x, self.scale).to(torch.bfloat16)


@dataclass
class DispatchHandle:
    """What a source rank needs to combine: where each of its (token, k) copies went.

    phys:     ``[num_tokens, top_k]`` int64 physical slot (as routed; NO_EXPERT = -1 when none).
    position: ``[num_tokens, top_k]`` row inside the destination's (slot, source) block; -1 when the
              copy was not sent (no expert, or its host is not a member): a copy was sent exactly
              where ``position >= 0``.
    """

    phys: torch.Tensor
    position: torch.Tensor


@dataclass
class PackedReceive:
    """What one destination rank holds after a prefill dispatch (shapes in the module docstring)."""

    x: torch.Tensor
    count: torch.Tensor
    src_token: torch.Tensor
    local_slot: torch.Tensor
    weight: torch.Tensor

    @property
    def num_recv(self) -> int:
        """Token rows received (one per source token that has a choice here)."""
        return int(self.count.sum())

    def expert_order(self, slots_per_rank: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(row, k) entries grouped by local slot; inside a slot by source, then row.

        Returns ``(entry_row [E] int64, entry_k [E] int64, slot_offset [slots_per_rank + 1] int64)``,
        ``entry_row`` indexing the flattened ``[num_ranks * max_tokens_per_rank]`` rows; the entries
        of slot ``i`` are ``slot_offset[i]:slot_offset[i+1]``.
        """
        flat = self.local_slot.reshape(-1, self.local_slot.shape[-1])
        rows, ks, offsets = [], [], [0]
        for slot in range(slots_per_rank):
            hit = (flat == slot).nonzero()  # row-major: ascending flat row, then k
            rows.append(hit[:, 0])
            ks.append(hit[:, 1])
            offsets.append(offsets[-1] + hit.shape[0])
        return (torch.cat(rows).long(), torch.cat(ks).long(),
                torch.tensor(offsets, dtype=torch.long, device=self.x.device))


@dataclass
class PackedHandle:
    """What a source rank needs to combine: ``dst_row[token, dst]`` is the token's row in this
    source's region of rank ``dst``'s receive buffer, -1 when it was not sent there."""

    dst_row: torch.Tensor
