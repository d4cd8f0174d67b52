"""The one host-side packer: token copies grouped by destination, and their combine, as tensor ops.

The fused kernels pack on the device; every other backend (``shm``, ``local``, ``collective``) and the
in-process simulation of ``eep.fused.MoELayer`` pack with these functions, so one layout and one
row order exist besides the kernels': rows of a (slot, source) block in ascending source-token
order, as in ``eep.reference.dispatch``. Shapes are static (nothing waits for the host), so a
captured CUDA graph can hold them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Packed:
    """One source rank's token copies, grouped by destination (decode layout).

    send:      ``[num_ranks(dst), slots_per_rank, max_tokens, hidden]``, zero past each block's count
    count:     ``[num_ranks(dst), slots_per_rank]`` int32
    src_token: ``[num_ranks(dst), slots_per_rank, max_tokens]`` int32 source token of each row, -1 past count
    position:  ``[num_tokens, top_k]`` int64 row of each copy in its block, -1 when not sent
    """

    send: torch.Tensor
    count: torch.Tensor
    src_token: torch.Tensor
    position: torch.Tensor


def pack_by_destination(x: torch.Tensor, phys: torch.Tensor, num_ranks: int, slots_per_rank: int,
                        max_tokens: int) -> Packed:
    """Scatter each (token, k) copy into the block of its physical slot ``phys[token, k]`` (-1: none).

    A token reaches a slot at most once (top-k experts are distinct, a slot holds one expert), so a
    block never holds more than ``max_tokens`` rows when ``num_tokens <= max_tokens``.
    """
    num_tokens, top_k = phys.shape
    num_phys = num_ranks * slots_per_rank
    valid = phys >= 0
    slot = torch.where(valid, phys, num_phys)                                         # spare column
    onehot = torch.zeros(num_tokens, num_phys + 1, dtype=torch.int32, device=x.device)
    onehot.scatter_(1, slot, 1)
    before = onehot.cumsum(0) - onehot                                                # [T, P+1]
    position = torch.where(valid, before.gather(1, slot).long(), -1)
    count = onehot[:, :num_phys].sum(0).to(torch.int32).view(num_ranks, slots_per_rank)
    # copies that are not sent land in one spare row past the end, then are cut off
    row = torch.where(valid & (position < max_tokens), phys * max_tokens + position, num_phys * max_tokens)
    send = torch.zeros(num_phys * max_tokens + 1, x.shape[1], dtype=x.dtype, device=x.device)
    send.index_copy_(0, row.flatten(), x.unsqueeze(1).expand(-1, top_k, -1).reshape(-1, x.shape[1]))
    tokens = torch.arange(num_tokens, dtype=torch.int32, device=x.device).unsqueeze(1).expand(-1, top_k)
    src_token = torch.full((num_phys * max_tokens + 1,), -1, dtype=torch.int32, device=x.device)
    src_token.index_copy_(0, row.flatten(), tokens.reshape(-1))
    return Packed(send=send[:-1].view(num_ranks, slots_per_rank, max_tokens, x.shape[1]), count=count,
                  src_token=src_token[:-1].view(num_ranks, slots_per_rank, max_tokens), position=position)


def gather_combine(home: torch.Tensor, phys: torch.Tensor, position: torch.Tensor,
                   topk_weights: torch.Tensor) -> torch.Tensor:
    """Sum each token's expert outputs with its top-k weights, in k order, float32 (mul then add).

    home: ``[num_ranks(dst), slots_per_rank, max_tokens, hidden]`` the outputs each destination sent
    back for this source's blocks (zeros where a destination did not answer); phys, position: from
    ``pack_by_destination``. Returns ``[num_tokens, hidden]`` float32; copies not sent add nothing.
    """
    _, slots_per_rank, max_tokens, hidden = home.shape
    flat = home.reshape(-1, hidden)
    sent = (phys >= 0) & (position >= 0)
    row = torch.where(sent, phys * max_tokens + position, 0)
    rows = flat[row.flatten()].view(*phys.shape, hidden).float()
    weights = torch.where(sent, topk_weights.float(), 0.0)
    acc = torch.zeros(phys.shape[0], hidden, dtype=torch.float32, device=home.device)
    for k in range(phys.shape[1]):
        # where(), not weights * rows alone: a row that was not sent may read NaN
        acc = acc + torch.where(sent[:, k:k + 1], weights[:, k:k + 1] * rows[:, k], 0.0)
    return acc


def compact_rows(blocks: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
    """The rows below each block's count, block after block: ``[sum(count), ...]`` (syncs on ``count``).

    blocks: ``[num_blocks, max_tokens, ...]``; count: ``[num_blocks]``. The inverse is ``expand_rows``.
    """
    live = torch.arange(blocks.shape[1], device=blocks.device) < count.to(blocks.device).unsqueeze(1)
    return blocks[live]


def expand_rows(rows: torch.Tensor, count: torch.Tensor, max_tokens: int, *, fill: float = 0) -> torch.Tensor:
    """``compact_rows``'s inverse: ``[num_blocks, max_tokens, ...]``, ``fill`` past each count."""
    out = torch.full((count.shape[0], max_tokens, *rows.shape[1:]), fill, dtype=rows.dtype, device=rows.device)
    live = torch.arange(max_tokens, device=rows.device) < count.to(rows.device).unsqueeze(1)
    out[live] = rows
    return out


@dataclass
class PackedTokens:
    """One source rank's tokens for one destination in prefill mode (one copy per destination rank).

    tokens: ``[n]`` int64 ascending; local_slot: ``[n, top_k]`` int32 the k-th choice's slot on the
    destination, -1 elsewhere; weight: ``[n, top_k]`` float32, 0 where local_slot is -1.
    """

    tokens: torch.Tensor
    local_slot: torch.Tensor
    weight: torch.Tensor


def pack_tokens_by_destination(phys: torch.Tensor, topk_weights: torch.Tensor, num_ranks: int,
                               slots_per_rank: int) -> tuple[list[PackedTokens], torch.Tensor]:
    """Prefill packing: per destination rank, the tokens with a choice there (``eep.reference.prefill``).

    Returns the per-destination ``PackedTokens`` and ``dst_row [num_tokens, num_ranks]`` int64, each
    token's row in its region of a destination, -1 where it was not sent (syncs on the host).
    """
    valid = (phys >= 0) & (phys < num_ranks * slots_per_rank)
    dst_of = torch.where(valid, phys // slots_per_rank, -1)
    dst_row = torch.full((phys.shape[0], num_ranks), -1, dtype=torch.long, device=phys.device)
    packed = []
    for dst in range(num_ranks):
        here = dst_of == dst                                                            # [T, K]
        tokens = here.any(-1).nonzero().squeeze(1)
        dst_row[tokens, dst] = torch.arange(tokens.numel(), device=phys.device)
        local_slot = torch.where(here[tokens], phys[tokens] % slots_per_rank, -1).to(torch.int32)
        weight = torch.where(here[tokens], topk_weights[tokens].float(), 0.0)
        packed.append(PackedTokens(tokens=tokens, local_slot=local_slot, weight=weight))
    return packed, dst_row
