"""``PrefillBuffer``: the fused data plane's prefill ("normal") mode — one copy of a token per
destination rank, packed into per-source regions (``eep/reference/prefill.py`` is the spec and
the oracle; kernels in ``csrc/prefill.cuh``; docs/fused.md "Prefill mode").

    recv, handle = buf.dispatch(x, phys, topk_weights)   # x [T, hidden] bf16, T <= max_tokens_per_rank
    rows, ks, offsets = recv.expert_order(slots_per_rank) # (row, k) entries grouped by local slot
    y = experts(...)                                      # one output row per entry
    partial = eep.reference.prefill.partial_combine(recv, y, slots_per_rank)  # [R, M, hidden] bf16
    out = buf.combine(partial, handle)                    # [T, hidden] bf16

Membership, peer table, sequence numbers and the timeout behave as in ``FusedBuffer`` (same
methods: ``set_membership``, ``connect``, ``status``), with a control block of
its own, so a process can hold a decode and a prefill buffer at once.

Combine paths (``combine_variant``, a compile-time switch: docs/fused.md "Prefill combine: where
the time goes"): ``"push"`` (default, the GPU-validated kernels: send partial rows home, then reduce),
``"spread"`` (the same with the sends fanned out over all peers at once) and ``"pull"`` (each rank
reads its tokens' partial rows from the peers' buffers and reduces them in registers; the partial
rows must then sit in this rank's peer buffer: write them into ``combine_input()`` to skip a copy).
``spread`` and ``pull`` pass the differential GPU scenario (4 ranks sharing one H200). Kernel set v1
only: ``kernels="v2"`` (docs/fused.md "Kernel set v2") has one combine, which pushes partial rows to
the other ranks spread over them and reduces this rank's own in place.
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass
from typing import Any, Sequence

import torch

from eep import envs
from eep.fused.buffer import FusedBuffer, kernel_smem, v2_send_blocks
from eep.fused.layout import PackedRegions, check_ranks_and_hidden, make_signal_params, signal_regions
from eep.exchange.layout import PackedHandle, PackedReceive
from eep.state import Membership


COMBINE_VARIANTS = ("push", "spread", "pull")  # KernelVariant.prefill_combine; "push" is the validated default


@dataclass(frozen=True)
class PrefillLayout(PackedRegions):
    """Offsets (bytes) of each region of a rank's prefill peer buffer; identical on every rank.

        recv_x      [num_ranks(src), max_tokens_per_rank, hidden] bf16
        comb_x      [num_ranks(dst), max_tokens_per_rank, hidden] bf16
        src_token   [num_ranks, max_tokens_per_rank] int32
        local_slot  [num_ranks, max_tokens_per_rank, top_k] int32
        weight      [num_ranks, max_tokens_per_rank, top_k] float32
        raw_count   [num_ranks] int32
        dispatch_flag, combine_flag [num_ranks] uint64
        dispatch_signal, combine_signal [num_ranks, MAX_SIGNAL_BLOCKS] uint64 (kernel set v2)
    """

    num_ranks: int
    max_tokens_per_rank: int
    hidden: int
    top_k: int

    def __post_init__(self) -> None:
        check_ranks_and_hidden(self.num_ranks, self.hidden)
        if self.max_tokens_per_rank < 1 or self.top_k < 1:
            raise ValueError(f"max_tokens_per_rank={self.max_tokens_per_rank} and top_k={self.top_k} must be positive")

    @property
    def num_rows(self) -> int:
        return self.num_ranks * self.max_tokens_per_rank

    def regions(self) -> list[tuple[str, int]]:
        """(name, bytes) of every region, in buffer order."""
        rows, R = self.num_rows, self.num_ranks
        return [("recv_x", rows * self.hidden * 2), ("comb_x", rows * self.hidden * 2), ("src_token", rows * 4),
                ("local_slot", rows * self.top_k * 4), ("weight", rows * self.top_k * 4), ("raw_count", R * 4),
                ("dispatch_flag", R * 8), ("combine_flag", R * 8), *signal_regions(R)]

    def dispatch_smem_bytes(self) -> int:
        """Dynamic shared memory of eep_prefill_dispatch: a bit per (destination, token) and the
        set bits before each word."""
        words = (self.max_tokens_per_rank + 31) // 32
        return 2 * self.num_ranks * words * 4

    def dispatch_v2_smem_bytes(self, slots_per_rank: int, num_blocks: int) -> int:
        """Dynamic shared memory of eep2_prefill_dispatch: per token of a block its ranks (u64), rows and
        slots, and per slot its rank."""
        tokens_per_block = -(-self.max_tokens_per_rank // num_blocks)
        return tokens_per_block * (8 + 4 * self.num_ranks + 4 * self.top_k) + 4 * slots_per_rank * self.num_ranks

    def signature(self) -> str:
        return (f"P.R{self.num_ranks}.M{self.max_tokens_per_rank}.H{self.hidden}.K{self.top_k}.N{self.nbytes}")


class PrefillParams(ctypes.Structure):
    """EepPrefillParams of csrc/prefill.cuh: every field a u64, in the same order."""

    _fields_ = [(name, ctypes.c_uint64) for name in (
        "x", "phys", "weights", "out", "dst_row", "vis_count", "ctrl", "peer_base", "active",
        "num_tokens", "top_k", "slots_per_rank", "num_ranks", "max_tokens", "my_rank",
        "off_recv_x", "off_comb_x", "off_src_token", "off_local_slot", "off_weight", "off_raw_count",
        "off_dispatch_flag", "off_combine_flag")]


def make_prefill_params(layout: PrefillLayout, *, slots_per_rank: int, my_rank: int, num_tokens: int, ctrl: int,
                        peer_base: int, active: int, dst_row: int, vis_count: int, x: int = 0, phys: int = 0,
                        weights: int = 0, out: int = 0) -> PrefillParams:
    return PrefillParams(
        x=x, phys=phys, weights=weights, out=out, dst_row=dst_row, vis_count=vis_count, ctrl=ctrl,
        peer_base=peer_base, active=active, num_tokens=num_tokens, top_k=layout.top_k,
        slots_per_rank=slots_per_rank, num_ranks=layout.num_ranks, max_tokens=layout.max_tokens_per_rank,
        my_rank=my_rank, off_recv_x=layout.off_recv_x, off_comb_x=layout.off_comb_x,
        off_src_token=layout.off_src_token, off_local_slot=layout.off_local_slot, off_weight=layout.off_weight,
        off_raw_count=layout.off_raw_count, off_dispatch_flag=layout.off_dispatch_flag,
        off_combine_flag=layout.off_combine_flag)


class PrefillBuffer(FusedBuffer):
    """One rank's prefill peer buffer and kernels (bf16). Shape arguments as ``FusedBuffer``'s, plus
    ``top_k``; ``max_tokens_per_rank`` bounds the tokens one rank dispatches per step (4096 for the
    issue's prefill shapes: 235 MB per region for deepseek-v3 on 4 ranks). ``combine_variant``: one of
    ``COMBINE_VARIANTS`` (module docstring); every rank of the instance must use the same one."""

    def __init__(self, rank: int, num_ranks: int, *, slots_per_rank: int, max_tokens_per_rank: int, hidden: int,
                 top_k: int, store: Any, group: str = "prefill", connect: Sequence[int] | None = None,
                 fixed_membership: bool = False, timeout_s: float | None = None, num_blocks: int | None = None,
                 vec_per_lane: int | None = None, device: torch.device | int | None = None,
                 combine_variant: str = "push", kernels: str | None = None,
                 membership: Membership | None = None) -> None:
        from eep.fused.compile import KernelVariant

        if not 0 <= rank < num_ranks:
            raise ValueError(f"rank={rank} outside [0, num_ranks={num_ranks})")
        if slots_per_rank < 1:
            raise ValueError(f"slots_per_rank={slots_per_rank} must be positive")
        layout = PrefillLayout(num_ranks, max_tokens_per_rank, hidden, top_k)
        if combine_variant not in COMBINE_VARIANTS:
            raise ValueError(f"combine_variant={combine_variant!r} must be one of {COMBINE_VARIANTS}")
        self.top_k, self.use_fp8, self.slots_per_rank = top_k, False, slots_per_rank
        self.max_tokens_per_rank, self.hidden = max_tokens_per_rank, hidden
        self.combine_variant = combine_variant
        self.kernel_set = kernels or envs.fused_kernels()
        variant = KernelVariant(hidden, fixed_membership, vec_per_lane or envs.fused_vec_per_lane(), False,
                                prefill_combine=combine_variant, kernels=self.kernel_set)
        smem = kernel_smem(self.kernel_set, top_k, {"eep_prefill_dispatch": layout.dispatch_smem_bytes()},
                           lambda send_blocks: {"eep2_prefill_dispatch":
                                                layout.dispatch_v2_smem_bytes(slots_per_rank, send_blocks)})
        self._open(rank, layout, variant, store=store, group=group, connect=connect, timeout_s=timeout_s,
                   num_blocks=num_blocks, device=device, smem=smem, membership=membership)
        self.vis_count = torch.zeros(num_ranks, dtype=torch.int32, device=self.device)
        self.dst_row = torch.full((max_tokens_per_rank, num_ranks), -1, dtype=torch.int32, device=self.device)
        torch.cuda.synchronize(self.device)

    def recv_views(self) -> PackedReceive:
        """This rank's receive layout (views of the peer buffer, valid until its next combine returns)."""
        lay, buf = self.layout, self._buffer
        R, M, H, K = lay.num_ranks, lay.max_tokens_per_rank, lay.hidden, lay.top_k

        def view(off: int, numel: int, dtype: torch.dtype, *shape: int) -> torch.Tensor:
            return buf[off:off + numel * dtype.itemsize].view(dtype).view(*shape)

        return PackedReceive(x=view(lay.off_recv_x, R * M * H, torch.bfloat16, R, M, H), count=self.vis_count,
                             src_token=view(lay.off_src_token, R * M, torch.int32, R, M),
                             local_slot=view(lay.off_local_slot, R * M * K, torch.int32, R, M, K),
                             weight=view(lay.off_weight, R * M * K, torch.float32, R, M, K))

    def combine_input(self) -> torch.Tensor:
        """``[num_ranks(src), max_tokens_per_rank, hidden]`` bf16 view of this rank's ``comb_x``: with
        ``combine_variant="pull"`` the peers read the partial rows from here, so an expert stage that
        writes its partial sums into this view saves ``combine`` a copy. Write it only after this
        step's ``dispatch`` (the peers finished reading the previous step's rows by then). Under
        ``push``/``spread`` the peers write into this region: do not use it there."""
        lay = self.layout
        numel = lay.num_rows * lay.hidden
        return self._buffer[lay.off_comb_x:lay.off_comb_x + numel * 2].view(torch.bfloat16).view(
            lay.num_ranks, lay.max_tokens_per_rank, lay.hidden)

    def dispatch(self, x: torch.Tensor, phys: torch.Tensor, topk_weights: torch.Tensor  # type: ignore[override]
                 ) -> tuple[PackedReceive, PackedHandle]:
        """Send each token once to every active rank hosting one of its choices (one launch).

        Parameters:
            x: ``[num_tokens, hidden]`` bf16, contiguous; phys: ``[num_tokens, top_k]`` int64;
            topk_weights: ``[num_tokens, top_k]`` float32 (they travel with the rows).
        """
        num_tokens = self._check_tokens(x, phys)
        if tuple(topk_weights.shape) != tuple(phys.shape) or topk_weights.dtype != torch.float32:
            raise ValueError(f"dispatch: topk_weights has shape {tuple(topk_weights.shape)} {topk_weights.dtype}, "
                             f"expected float32 {tuple(phys.shape)}")
        params = self._prefill_params(num_tokens, x=x.data_ptr(), phys=phys.data_ptr(),
                                      weights=topk_weights.contiguous().data_ptr())
        if self.kernel_set == "v2":
            blocks = v2_send_blocks(self.num_blocks)
            self._launch("eep2_prefill_dispatch", (params, make_signal_params(self.layout)),
                         self.layout.dispatch_v2_smem_bytes(self.slots_per_rank, blocks), grid=blocks)
        else:
            self._launch("eep_prefill_dispatch", params, self.layout.dispatch_smem_bytes())
        return self.recv_views(), PackedHandle(dst_row=self.dst_row[:num_tokens])

    def combine(self, partial: torch.Tensor, handle: PackedHandle,  # type: ignore[override]
                out: torch.Tensor | None = None) -> torch.Tensor:
        """Bring each received row's partial sum home and add them up per token (ascending rank
        order, float32, rounded once). ``push``/``spread``: two launches (send, reduce); ``pull``: a
        copy into ``combine_input()`` unless ``partial`` is that view, a one-block ready handshake,
        then the pulling reduce.

        Parameters:
            partial: ``[num_ranks, max_tokens_per_rank, hidden]`` bf16, contiguous
                (``eep.reference.prefill.partial_combine`` of this rank's expert outputs), or
                ``combine_input()`` itself (pull, no copy).
            handle: from this rank's dispatch of the same step.
        Returns:
            ``[num_tokens, hidden]`` bf16; absent contributions (inactive or late ranks) add nothing.
        """
        lay = self.layout
        shape = (lay.num_ranks, lay.max_tokens_per_rank, lay.hidden)
        if tuple(partial.shape) != shape or partial.dtype != torch.bfloat16 or not partial.is_contiguous():
            raise ValueError(f"combine: partial has shape {tuple(partial.shape)} {partial.dtype}, "
                             f"expected contiguous bf16 {shape}")
        num_tokens = handle.dst_row.shape[0]
        if out is None:
            out = torch.empty(num_tokens, lay.hidden, dtype=torch.bfloat16, device=self.device)
        elif tuple(out.shape) != (num_tokens, lay.hidden) or out.dtype != torch.bfloat16 or not out.is_contiguous():
            raise ValueError(f"combine: out has shape {tuple(out.shape)} {out.dtype}, "
                             f"expected contiguous bf16 ({num_tokens}, {lay.hidden})")
        vectors = num_tokens * lay.hidden // 8  # one thread per 16-byte vector of the output
        if self.kernel_set == "v2":  # one launch: push to the other ranks, then reduce (own partials in place)
            send = 0 if self.num_ranks == 1 else v2_send_blocks(self.num_blocks)
            params = self._prefill_params(num_tokens, x=partial.data_ptr(), out=out.data_ptr())
            self._launch("eep2_prefill_combine", (params, make_signal_params(self.layout, num_send_blocks=send)), 0,
                         grid=send + self.num_blocks)
            return out
        if self.combine_variant == "pull":
            staged = self.combine_input()
            if partial.data_ptr() != staged.data_ptr():  # the peers can only read peer memory
                staged.copy_(partial)
            params = self._prefill_params(num_tokens, out=out.data_ptr())
            self._launch("eep_prefill_combine_ready", params, 0, grid=1)
            # two blocks per SM fit (launch bounds 512x2): more remote loads in flight
            self._launch("eep_prefill_combine_pull", params, 0,
                         grid=max(1, min(2 * self.num_blocks, (vectors + 511) // 512)))
            return out
        send = "eep_prefill_combine_send_spread" if self.combine_variant == "spread" else "eep_prefill_combine_send"
        self._launch(send, self._prefill_params(num_tokens, x=partial.data_ptr()), 0)
        self._launch("eep_prefill_combine_reduce", self._prefill_params(num_tokens, out=out.data_ptr()), 0,
                     grid=max(1, min(self.num_blocks, (vectors + 511) // 512)))
        return out

    def _prefill_params(self, num_tokens: int, **pointers: int) -> PrefillParams:
        return make_prefill_params(self.layout, slots_per_rank=self.slots_per_rank, my_rank=self.rank,
                                   num_tokens=num_tokens, ctrl=self.ctrl.data_ptr(),
                                   peer_base=self.peer_base.data_ptr(), active=self.active_mask.data_ptr(),
                                   dst_row=self.dst_row.data_ptr(), vis_count=self.vis_count.data_ptr(), **pointers)
