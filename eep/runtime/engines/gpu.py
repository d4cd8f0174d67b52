"""GPU data plane of a rank: the bench decode model in bf16, one CUDA graph per decode step.

``GpuEngine`` implements the engine seam of ``eep/runtime/engines/base.py`` (``RuntimeConfig.engine``
``"fused"``, ``"fused_fixed"`` or ``"nccl"``). The model is the runtime's tiny decode model
(``eep/runtime/model.py``: a Markov chain over tokens, so a re-queued request re-runs from its
prompt) at a real MoE shape, plus a fixed-cost stand-in for attention:

    h = embed[token]                                          # [tokens, hidden] float32
    for layer:
        x = bf16(rms_norm(h))
        topk_weights, topk_ids = select_experts(x @ router[layer].T, top_k)
        phys = route_to_phys(topk_ids, l2p[layer], active_mask, slots_per_rank)
        moe = combine(experts(dispatch(x, phys)), topk_weights)          # crosses ranks
        attn = (x @ attn_in[layer]) @ attn_out[layer]        # stand-in: fixed FLOPs, weight 0
        h = h + moe + 0 * attn
    next = argmax(rms_norm(h) @ lm_head.T)

The attention stand-in costs what the projections of one decode attention layer cost
(``attn_width`` = 9216 for qwen3-30b-a3b: q 4096 + k 512 + v 512 + o 4096 columns of hidden 2048)
and is added with weight 0, so tokens are the MoE model's alone and the CPU oracle can skip it.
Non-expert weights come from a seed (``bench_weights``); expert weights from ``eep-shards
prepare`` output through weights_tools' ``ExpertStore`` (host tier, then disk), into per-slot
device tensors ``w13 [layers, slots, 2*inter, hidden]`` and ``w2 [layers, slots, hidden, inter]``.

Exchanges (how the tokens cross ranks, chosen by the engine name):
- ``FusedExchange``: ``eep.fused.buffer.FusedBuffer`` (membership-aware, or ``fixed_membership``);
- ``NcclExchange``: padded ``all_to_all_single`` of the receive layout (fixed membership only);
- ``ShmExchange``: the shared-memory transport on CPU, membership-aware (CPU tests of the failure path);
- ``LocalExchange``: one rank, no communication (the CPU test of the model and slot tables).

Everything is captured once into a CUDA graph of ``max_tokens_per_rank`` tokens (smaller batches
are padded), and, with ``degraded_tokens_per_rank``, a second graph of that many tokens for steps
where survivors absorb a missing rank's share; a membership change rewrites ``active_mask`` /
``l2p`` / sequence numbers in place, so no graph is ever recaptured. Status of the fused kernels (deadline misses) is copied out with
the next tokens in one device-to-host copy per step.

STATUS: run on 4xH100 in the failure benchmark (perf/RESULTS.md), with the ``torch._grouped_mm``
and the CUTLASS expert stages, and with the degraded-batch graph (survivors absorbing the batch).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from eep.routing import route_to_phys, select_experts
from eep.runtime.config import RuntimeConfig
from eep.runtime.engines.base import StepAborted
from eep.runtime.model import bench_weights, rms_norm
from eep.state import NO_EXPERT, ExpertPlacement

# ---- exchanges --------------------------------------------------------------------------------

def pack_receive_layout(x: torch.Tensor, phys: torch.Tensor, num_ranks: int, slots_per_rank: int,
                        max_tokens: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Scatter token copies into per-destination blocks, static shapes (graph capturable).

    x ``[tokens, hidden]``, phys ``[tokens, top_k]`` -> send ``[num_ranks(dst), slots, max_tokens, hidden]``,
    count ``[num_ranks(dst), slots]`` int32, position ``[tokens, top_k]`` int64 (-1 = not sent). Rows of
    a block are in ascending source-token order, as in ``eep.reference.dispatch``.
    """
    num_tokens, top_k = phys.shape
    num_phys = num_ranks * slots_per_rank
    valid = phys >= 0
    onehot = torch.zeros(num_tokens, num_phys + 1, dtype=torch.int32, device=x.device)
    onehot.scatter_(1, torch.where(valid, phys, num_phys), 1)  # a token reaches a slot at most once
    before = onehot.cumsum(0) - onehot                                                  # [T, P+1]
    position = torch.where(valid, before.gather(1, torch.where(valid, phys, num_phys)).long(), -1)
    count = onehot[:, :num_phys].sum(0).to(torch.int32).view(num_ranks, slots_per_rank)
    send = torch.zeros(num_phys * max_tokens + 1, x.shape[1], dtype=x.dtype, device=x.device)
    row = torch.where(valid & (position < max_tokens), phys * max_tokens + position, num_phys * max_tokens)
    send.index_copy_(0, row.flatten(), x.unsqueeze(1).expand(-1, top_k, -1).reshape(-1, x.shape[1]))
    send = send[:-1].view(num_ranks, slots_per_rank, max_tokens, x.shape[1])
    return send, count, position


def gather_combine(home: torch.Tensor, phys: torch.Tensor, position: torch.Tensor, topk_weights: torch.Tensor,
                   slots_per_rank: int) -> torch.Tensor:
    """home ``[num_ranks(dst), slots, max_tokens, hidden]`` expert outputs -> ``[tokens, hidden]`` float32,
    summing the top-k in k order (absent copies add nothing)."""
    num_ranks, s, m, hidden = home.shape
    flat = home.reshape(-1, hidden)
    ok = (phys >= 0) & (position >= 0)
    row = torch.where(ok, phys * m + position, 0)
    rows = flat[row.flatten()].view(*phys.shape, hidden).float()
    w = torch.where(ok, topk_weights, 0.0)
    acc = torch.zeros(phys.shape[0], hidden, dtype=torch.float32, device=home.device)
    for k in range(phys.shape[1]):
        acc = acc + w[:, k:k + 1] * rows[:, k]
    return acc


_MIN_PEER_S = 0.05  # each peer's share of a connect deadline never drops below this (a live one needs < 1 ms)


def _connect_each(rank: int, peers: list[int], timeout_s: float, connect_one: Callable[[int, float], None]) -> None:
    """Call ``connect_one(peer, seconds)`` for every peer within one deadline of ``timeout_s``.

    A peer whose handshake fails (``OSError``: no server, refused, reset, timed out) is that peer's
    failure, not this rank's: it is logged, the other peers are still connected, and
    ``StepAborted(phase="connect", missed=[...])`` names the failed ones at the end, so the rank
    reports them exactly as it reports a transport deadline miss (docs/runtime.md, "Peer loss at a
    commit"). Each peer gets what is left of the deadline but at least ``_MIN_PEER_S``, so one
    stopped peer cannot make a live one look dead.
    """
    import logging

    deadline = time.monotonic() + timeout_s
    failed = []
    for r in peers:
        if r == rank:
            continue
        try:
            connect_one(r, max(deadline - time.monotonic(), _MIN_PEER_S))
        except OSError as exc:
            logging.getLogger("eep.runtime.engines.gpu").warning(
                "rank %d: could not map the buffer of rank %d: %s", rank, r, exc)
            failed.append(r)
    if failed:
        raise StepAborted(-1, "connect", failed, is_aborted=False)


def _check_mapped(rank: int, active: list[bool], mapped: set[int], epoch: int) -> None:
    unmapped = [r for r, a in enumerate(active) if a and r != rank and r not in mapped]
    if unmapped:  # a step would write through a missing (or a dead incarnation's) peer mapping
        raise RuntimeError(f"rank {rank}: epoch {epoch} has members {unmapped} whose buffers are not mapped; "
                           "connect them first")


class LocalExchange:
    """One rank, no communication (``num_ranks == 1``): the receive layout is the send layout."""

    is_membership_aware = True

    def __init__(self, num_ranks: int, slots_per_rank: int, max_tokens: int, hidden: int, device: torch.device):
        if num_ranks != 1:
            raise ValueError(f"LocalExchange serves one rank, not num_ranks={num_ranks}")
        self.s, self.m = slots_per_rank, max_tokens
        self.active_mask = torch.ones(1, dtype=torch.int32, device=device)
        self.miss_count = torch.zeros(1, dtype=torch.int64, device=device)

    def dispatch(self, x, phys):
        send, count, position = pack_receive_layout(x, phys, 1, self.s, self.m)
        return send.transpose(0, 1).contiguous(), count.transpose(0, 1).contiguous(), (phys, position)

    def combine(self, y, handle, topk_weights):
        phys, position = handle
        return gather_combine(y.transpose(0, 1), phys, position, topk_weights, self.s)

    def connect(self, peers: list[int]) -> None:
        pass

    def switch(self, active: list[bool], epoch: int) -> None:
        pass

    def close(self) -> None:
        pass


class ShmExchange:
    """Membership-aware exchange over the runtime's shared-memory transport, bf16 payloads, with the
    fused buffer's miss semantics (a peer that misses a deadline is counted, contributes nothing and
    is not waited for again until the next ``switch``). Engine ``"cpu_elastic"``: how the CPU tests
    drive ``GpuEngine`` through a SIGKILL, a repair and a rejoin without a GPU.

    Two channels (dispatch 0, combine 1) serve every layer: a source rewrites a region only after
    the combine of the previous layer, which needs the reader's reply, so no region is overwritten
    before it was read. Tags are ``(epoch, seq)``; every member resets ``seq`` at ``switch``.
    """

    is_membership_aware = True

    def __init__(self, rank: int, num_ranks: int, slots_per_rank: int, max_tokens: int, hidden: int, shm_path: str,
                 timeout_s: float):
        from eep.transport import SharedMemoryTransport

        import os

        from eep.fused.peer_memory import FdServer

        self.rank, self.num_ranks, self.s, self.m, self.h = rank, num_ranks, slots_per_rank, max_tokens, hidden
        self.transport = SharedMemoryTransport(shm_path, rank)
        self.timeout_s = timeout_s
        self.active_mask = torch.ones(num_ranks, dtype=torch.int32)
        self.miss_count = torch.zeros(num_ranks, dtype=torch.int64)
        self.active, self.suspect, self.epoch, self.seq = [True] * num_ranks, set(), 0, 0
        # ``connect``'s handshake, the fused buffer's on CPU: every rank serves its descriptor of the
        # transport file on an abstract socket named after the file (device, inode) and the rank, and
        # a member maps a new peer by fetching it; a dead or stopped peer fails it as on the GPU.
        self._file_fd = os.open(shm_path, os.O_RDONLY)
        st = os.fstat(self._file_fd)
        self._file_id = (st.st_dev, st.st_ino)
        self.server = FdServer(self._file_fd, {"rank": rank, "pid": os.getpid()}, name=self._server_name(rank))
        self.mapped: set[int] = set()

    def _server_name(self, rank: int) -> str:
        return f"shm-{self._file_id[0]:x}-{self._file_id[1]:x}-r{rank}"

    @staticmethod
    def capacity_nbytes(slots_per_rank: int, max_tokens: int, hidden: int) -> int:
        return (slots_per_rank * 4 + slots_per_rank * max_tokens * hidden * 2 + 63) // 64 * 64

    def _exchange(self, channel: int, payloads: dict[int, torch.Tensor]) -> dict[int, torch.Tensor]:
        self.seq += 1
        peers = [r for r in range(self.num_ranks) if self.active[r] and r not in self.suspect]
        for d in peers:
            self.transport.send(channel, d, payloads[d], epoch=self.epoch, step=self.seq)
        got = self.transport.recv(channel, peers, epoch=self.epoch, step=self.seq, timeout_s=self.timeout_s)
        for r in got.missed:
            self.miss_count[r] += 1
            self.suspect.add(r)
        return {src: region.clone() for src, region in got.buffers.items()}

    def dispatch(self, x, phys):
        S, M, H, R = self.s, self.m, self.h, self.num_ranks
        send, count, position = pack_receive_layout(x, phys, R, S, M)
        payloads = {d: torch.cat([count[d].view(torch.uint8), send[d].reshape(-1).view(torch.uint8)])
                    for d in range(R)}
        got = self._exchange(0, payloads)
        recv_x = torch.zeros(S, R, M, H, dtype=x.dtype)
        recv_count = torch.zeros(S, R, dtype=torch.int32)
        for src, region in got.items():
            recv_count[:, src] = region[:S * 4].view(torch.int32)
            recv_x[:, src] = region[S * 4:S * 4 + S * M * H * 2].view(torch.bfloat16).view(S, M, H)
        return recv_x, recv_count, (phys, position)

    def combine(self, y, handle, topk_weights):
        phys, position = handle
        S, M, H, R = self.s, self.m, self.h, self.num_ranks
        y = y.to(torch.bfloat16)
        got = self._exchange(1, {src: y[:, src].contiguous() for src in range(R)})
        home = torch.zeros(R, S, M, H, dtype=torch.bfloat16)
        for d, region in got.items():
            home[d] = region[:S * M * H * 2].view(torch.bfloat16).view(S, M, H)
        return gather_combine(home, phys, position, topk_weights, S)

    def connect(self, peers: list[int], *, timeout_s: float | None = None) -> None:
        """Handshake with each peer process (its descriptor of the transport file, checked to be
        this file); raises ``StepAborted(phase="connect")`` naming the peers that did not answer
        within ``timeout_s`` (default: the transport timeout)."""
        import os

        from eep.fused.peer_memory import fetch_fd

        def one(r: int, seconds: float) -> None:
            self.mapped.discard(r)  # until this incarnation answers
            fd, header = fetch_fd("@eep-fused-" + self._server_name(r), timeout_s=seconds)
            try:
                st = os.fstat(fd)
            finally:
                os.close(fd)
            if (st.st_dev, st.st_ino) != self._file_id or header.get("rank") != r:
                raise RuntimeError(f"rank {self.rank}: the server of rank {r} handed over another file "
                                   f"(header {header})")
            self.mapped.add(r)

        _connect_each(self.rank, peers, self.timeout_s if timeout_s is None else timeout_s, one)

    def switch(self, active: list[bool], epoch: int) -> None:
        _check_mapped(self.rank, active, self.mapped, epoch)
        self.active, self.epoch, self.seq = list(active), epoch, 0
        self.suspect.clear()
        self.active_mask.copy_(torch.tensor([int(a) for a in active], dtype=torch.int32))

    def close(self) -> None:
        import os

        self.server.close()
        os.close(self._file_fd)
        self.transport.close()


class FusedExchange:
    """The fused GPU buffer (UNTESTED on GPU in this configuration; see the module docstring)."""

    def __init__(self, rank: int, num_ranks: int, slots_per_rank: int, max_tokens: int, hidden: int, top_k: int,
                 store: Any, group: str, fixed_membership: bool, timeout_s: float, device: torch.device):
        from eep.fused.buffer import FusedBuffer
        from eep.fused.layout import CTRL_MISS_COUNT

        self.rank, self.num_ranks = rank, num_ranks
        self.is_membership_aware = not fixed_membership
        self.buf = FusedBuffer(rank, num_ranks, slots_per_rank=slots_per_rank, max_tokens_per_rank=max_tokens,
                               hidden=hidden, top_k=top_k, store=store, group=group, connect=[],
                               fixed_membership=fixed_membership, timeout_s=timeout_s, device=device)
        self.active_mask = self.buf.active_mask
        self.miss_count = self.buf.ctrl[CTRL_MISS_COUNT:CTRL_MISS_COUNT + num_ranks]
        self.mapped: set[int] = set()

    def dispatch(self, x, phys):
        recv, handle = self.buf.dispatch(x, phys)
        return recv.x, recv.count, handle

    def combine(self, y, handle, topk_weights):
        return self.buf.combine(y, handle, topk_weights).float()

    def connect(self, peers: list[int], *, timeout_s: float = 60.0) -> None:
        """Map these peers' (current) buffers: at the start commit all, at a join the joiners.

        A peer that cannot be mapped within ``timeout_s`` (its fd server gone: SIGKILLed; or not
        answering: stopped) is left unmapped and named by ``StepAborted(phase="connect")``; the
        others are mapped. ``switch`` refuses a membership with an unmapped member."""
        def one(r: int, seconds: float) -> None:
            self.mapped.discard(r)  # an earlier incarnation's mapping is not this member's buffer
            self.buf.add_peer(r, timeout_s=seconds)
            self.mapped.add(r)

        _connect_each(self.rank, peers, timeout_s, one)

    def switch(self, active: list[bool], epoch: int) -> None:
        _check_mapped(self.rank, active, self.mapped, epoch)
        self.buf.set_membership(active, epoch=epoch)
        # Every member restarts its step counters at the same value: flags of earlier epochs never match.
        base = (epoch + 1) << 32
        self.buf.set_sequence(base, base)

    def close(self) -> None:
        self.buf.close()


class NcclExchange:
    """Padded ``all_to_all_single`` over NCCL (fixed membership; UNTESTED on GPU). With
    ``backend="gloo"`` the same code runs on CPU (engine ``"gloo"``: how the tests drive ``GpuEngine``
    through the launcher with several rank processes)."""

    is_membership_aware = False

    def __init__(self, rank: int, num_ranks: int, slots_per_rank: int, max_tokens: int, hidden: int, store: Any,
                 group: str, device: torch.device, backend: str = "nccl"):
        import torch.distributed as dist

        self.dist = dist
        self.rank, self.num_ranks, self.s, self.m = rank, num_ranks, slots_per_rank, max_tokens
        extra = {"device_id": device} if backend == "nccl" else {}
        dist.init_process_group(backend, store=dist.PrefixStore(f"{group}/{backend}", store), rank=rank,
                                world_size=num_ranks, **extra)
        self.active_mask = torch.ones(num_ranks, dtype=torch.int32, device=device)
        self.miss_count = torch.zeros(num_ranks, dtype=torch.int64, device=device)
        self.recv = torch.empty(num_ranks, slots_per_rank, max_tokens, hidden, dtype=torch.bfloat16, device=device)
        self.recv_count = torch.empty(num_ranks, slots_per_rank, dtype=torch.int32, device=device)
        self.home = torch.empty_like(self.recv)

    def dispatch(self, x, phys):
        send, count, position = pack_receive_layout(x, phys, self.num_ranks, self.s, self.m)
        self.dist.all_to_all_single(self.recv_count, count)
        self.dist.all_to_all_single(self.recv, send)
        return self.recv.transpose(0, 1).contiguous(), self.recv_count.transpose(0, 1).contiguous(), (phys, position)

    def combine(self, y, handle, topk_weights):
        phys, position = handle
        self.dist.all_to_all_single(self.home, y.transpose(0, 1).contiguous())
        return gather_combine(self.home, phys, position, topk_weights, self.s)

    def connect(self, peers: list[int]) -> None:
        pass

    def prime(self) -> None:
        """One eager collective before capture (every rank warms up at the same time at start)."""
        probe = torch.ones(self.num_ranks, dtype=torch.int32, device=self.recv.device)
        self.dist.all_to_all_single(torch.empty_like(probe), probe)
        if probe.is_cuda:
            torch.cuda.synchronize(self.recv.device)

    def switch(self, active: list[bool], epoch: int) -> None:
        if not all(active):
            raise RuntimeError(f"rank {self.rank}: the NCCL engine has fixed membership; epoch {epoch} masks "
                               f"ranks {[r for r, a in enumerate(active) if not a]}")

    def close(self) -> None:
        self.dist.destroy_process_group()


# ---- the engine -------------------------------------------------------------------------------

class GpuEngine:
    """The engine seam over a GPU exchange (docstring of the module; options in ``cfg.engine_options``):

    attn_width (int, default 0): columns of the attention stand-in; expert_backend (default "auto");
    tiers (default ["host", "disk"]); pin_host_tier (None: weights_tools decides, i.e. pin on CUDA at
    construction; False: map without pinning; "first_start": pin in a rank's first incarnation only — a
    restarted rank's start-up is on the path back to full throughput, and registering the whole
    mapping is most of it, while it loads only its own slots' share, pageable);
    max_replicas (default 8): width of the device replica table; device ("cuda" or "cpu"; default cuda);
    use_graph (default True on CUDA).
    """

    def __init__(self, cfg: RuntimeConfig, rank: int, *, store: Any, run_id: str, incarnation: int,
                 engine: str = "fused", shm_path: str | None = None):
        # seconds per start-up phase: a restarted rank's start-up is most of the time back to 95%
        self.init_phases: dict[str, float] = {}
        mark = _PhaseClock(self.init_phases)
        from weights_tools import ExpertStore
        from eep.fused.gemm import ExpertStageShape, make_expert_stage

        mark("imports")
        opts = dict(cfg.engine_options)
        self.cfg, self.rank, self.engine_name = cfg, rank, engine
        self.control_store, self.run_id = store, run_id
        c = cfg.model
        want_device = opts.get("device", "cuda")
        if want_device == "cuda":
            torch.cuda.set_device(rank % torch.cuda.device_count())
            self.device = torch.device("cuda", torch.cuda.current_device())
        else:
            self.device = torch.device(want_device)
        if self.device.type == "cuda":
            torch.empty(1, device=self.device)  # the CUDA context, on its own clock
        mark("device")
        self.use_graph = bool(opts.get("use_graph", self.device.type == "cuda"))
        # M: the receive capacity per source, the largest batch any step can have; a graph is
        # captured per batch size (full membership, and degraded when survivors absorb more)
        S, M, L = cfg.slots_per_rank, cfg.token_capacity, c.num_layers
        self.S, self.M, self.L = S, M, L
        self.sizes = sorted({cfg.max_tokens_per_rank, M})
        if cfg.shard_dir is None:
            raise ValueError("GpuEngine needs RuntimeConfig.shard_dir (experts come from eep-shards output)")
        tiers = expert_tiers(cfg.shard_dir, opts.get("tiers", ["host", "disk"]),
                             host_tier_pin(opts.get("pin_host_tier"), incarnation))
        self.store = ExpertStore(cfg.shard_dir, tiers=tiers)
        mark("expert_store")  # host tier attach (and pinning, on CUDA)
        self.moe_layers = self.store.moe_layers
        if (len(self.moe_layers), self.store.num_experts) != (L, c.num_experts):
            raise ValueError(f"shards in {cfg.shard_dir} hold {len(self.moe_layers)} MoE layers x "
                             f"{self.store.num_experts} experts; the config needs {L} x {c.num_experts}")
        w = bench_weights(c)
        dt, dev = torch.bfloat16, self.device
        self.embed = w.embed.to(dev)
        self.router = w.router.to(dev)  # float32: routing decided as in the oracle, not on bf16 logits
        self.lm_head = w.lm_head.to(dev)
        width = int(opts.get("attn_width", 0))
        self.attn = None
        if width:  # drawn on the device: 2 x 48 x 2048 x 9216 values would take seconds on a CPU
            gen = torch.Generator(device=dev).manual_seed(rank + 1)
            self.attn = ((torch.randn(L, c.hidden, width, generator=gen, device=dev) / c.hidden ** 0.5).to(dt),
                         (torch.randn(L, width, c.hidden, generator=gen, device=dev) / width ** 0.5).to(dt))
        # per-slot weights; NaN poisons any output that reads a slot never loaded
        self.w13 = torch.full((L, S, 2 * c.intermediate, c.hidden), float("nan"), dtype=dt, device=dev)
        self.w2 = torch.full((L, S, c.hidden, c.intermediate), float("nan"), dtype=dt, device=dev)
        self.loaded = torch.full((L, S), NO_EXPERT, dtype=torch.int64)
        self.max_replicas = int(opts.get("max_replicas", 8))
        self.l2p = torch.full((L, c.num_experts, self.max_replicas), NO_EXPERT, dtype=torch.int64, device=dev)
        mark("weights_alloc")
        # One stage, sized for the capacity, serves every graph: what a rank receives depends on its
        # peers' batches, not its own (a rank replaying the small graph can receive from survivors
        # still draining large batches), so a per-graph stage sized by its own batch would overflow.
        # Kernels are picked for the full-membership batch, the common case: a (slot, source) block
        # then holds about max_tokens * top_k / (ranks * slots) rows (5 at the qwen3 bench shape).
        rows_per_block = cfg.max_tokens_per_rank * c.top_k / (cfg.num_ranks * S)
        self.stage = make_expert_stage(ExpertStageShape(S, cfg.num_ranks, M, c.hidden, c.intermediate, c.top_k),
                                       device=dev, backend=opts.get("expert_backend"),
                                       expected_rows_per_group=rows_per_block)
        mark("expert_stage")
        group = f"{run_id}/fused"
        if engine in ("fused", "fused_fixed"):
            self.exchange = FusedExchange(rank, cfg.num_ranks, S, M, c.hidden, c.top_k, store, group,
                                          engine == "fused_fixed", cfg.transport_timeout_s, dev)
        elif engine in ("nccl", "gloo"):
            self.exchange = NcclExchange(rank, cfg.num_ranks, S, M, c.hidden, store, group, dev, backend=engine)
        elif engine == "cpu_elastic":
            self.exchange = ShmExchange(rank, cfg.num_ranks, S, M, c.hidden, shm_path, cfg.transport_timeout_s)
        elif engine == "local":
            self.exchange = LocalExchange(cfg.num_ranks, S, M, c.hidden, dev)
        else:
            raise ValueError(f"GpuEngine: unknown engine {engine!r}")
        mark("exchange")
        self.tokens = {n: torch.zeros(n, dtype=torch.int64, device=dev) for n in self.sizes}  # static inputs
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.outs: dict[int, torch.Tensor] = {}
        self.last_misses = [0] * cfg.num_ranks
        self.restore_stats: dict = {}

    # ---- slots ----
    def load_missing(self, placement: ExpertPlacement) -> int:
        """Restore every slot whose expert differs from ``placement``'s; records bytes/seconds by tier."""
        s, inter = self.S, self.cfg.model.intermediate
        want = placement.phys_to_logical[:, self.rank * s:(self.rank + 1) * s]
        missing = [(layer, i, int(want[layer, i])) for layer, i in (want != self.loaded).nonzero().tolist()
                   if int(want[layer, i]) != NO_EXPERT]
        stats: dict = {}
        t0 = time.perf_counter()
        for layer, i, expert in missing:
            rec = self.store.load_expert_into(self.moe_layers[layer], expert, self.w13[layer, i, :inter],
                                              self.w13[layer, i, inter:], self.w2[layer, i])
            tier = stats.setdefault(rec.tier, {"experts": 0, "nbytes": 0, "seconds": 0.0})
            tier["experts"] += 1
            tier["nbytes"] += rec.nbytes
            tier["seconds"] += rec.seconds
            self.loaded[layer, i] = expert
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.restore_stats = {"by_tier": stats, "seconds": time.perf_counter() - t0, "experts": len(missing)}
        self._write_table(placement)
        return len(missing)

    def _write_table(self, placement: ExpertPlacement) -> None:
        table = placement.logical_to_phys
        if table.shape[2] > self.max_replicas:
            raise RuntimeError(f"rank {self.rank}: placement has {table.shape[2]} replicas per expert, more than "
                               f"engine_options max_replicas={self.max_replicas} (the captured table width)")
        padded = torch.full_like(self.l2p, NO_EXPERT, device="cpu")
        padded[:, :, :table.shape[2]] = table
        self.l2p.copy_(padded)  # in place: a captured graph reads the new table at its next replay

    # ---- the step ----
    def _forward(self, tokens: torch.Tensor) -> torch.Tensor:
        c = self.cfg.model
        h = self.embed[tokens]
        for layer in range(self.L):
            x = rms_norm(h).to(torch.bfloat16)
            topk_weights, topk_ids = select_experts(x.float() @ self.router[layer].T, c.top_k)
            phys = route_to_phys(topk_ids, self.l2p[layer], self.exchange.active_mask, self.S,
                                 token_offset=self.rank * self.M)
            recv_x, recv_count, handle = self.exchange.dispatch(x, phys)
            y = self.stage(recv_x, recv_count, self.w13[layer], self.w2[layer])
            h = h + self.exchange.combine(y, handle, topk_weights)
            if self.attn is not None:
                h = h + 0.0 * ((x @ self.attn[0][layer]) @ self.attn[1][layer]).float()
        next_tokens = (rms_norm(h) @ self.lm_head.T).argmax(-1)
        return torch.cat([next_tokens, self.exchange.miss_count.to(torch.int64)])  # one copy out per step

    def warmup(self) -> None:
        """Expert stage and dense parts on random rows, alone; then capture the step graph (no peer
        is touched: capture records the exchange kernels without running them)."""
        c, dev = self.cfg.model, self.device
        gen = torch.Generator(device=dev).manual_seed(self.rank)
        shape = (self.S, self.cfg.num_ranks, self.M, c.hidden)
        # drawn once, on the device: 48 slots x 4 ranks x 128 rows x 2048 drawn per layer on the CPU
        # took 18 s of a 48-layer rank's start-up (and of a joiner's time back to service)
        x = torch.randn(shape, generator=gen, device=dev).to(torch.bfloat16)
        # a realistic fill: each source sends max_tokens * top_k rows, spread over the slots
        per_block = max(1, self.M * min(c.top_k, self.S) // self.S)
        count = torch.full((self.S, self.cfg.num_ranks), per_block, dtype=torch.int32, device=dev)
        row = torch.arange(self.M, device=dev)
        for layer in range(self.L):
            count_l = torch.where((self.loaded[layer] >= 0).to(dev).unsqueeze(1), count, 0).to(torch.int32)
            y = self.stage(x, count_l, self.w13[layer], self.w2[layer])
            if not bool(torch.isfinite(y[row < count_l.unsqueeze(-1)]).all()):
                raise RuntimeError(f"rank {self.rank}: warm-up of layer {layer} gave non-finite outputs")
        if hasattr(self.exchange, "prime"):
            self.exchange.prime()
        if self.use_graph and not self.graphs:
            side = torch.cuda.Stream(dev)
            side.wait_stream(torch.cuda.current_stream(dev))
            for n in self.sizes:
                with torch.cuda.stream(side):  # lazy library state (cuBLAS) is created outside the capture
                    self._dense_warmup(self.tokens[n])
                self.graphs[n] = torch.cuda.CUDAGraph()
                with torch.cuda.graph(self.graphs[n], stream=side):
                    self.outs[n] = self._forward(self.tokens[n])
            torch.cuda.current_stream(dev).wait_stream(side)
            torch.cuda.synchronize(dev)

    def _dense_warmup(self, tokens: torch.Tensor) -> None:
        """Every op of the step except the exchange, eagerly (no peer is touched)."""
        c = self.cfg.model
        h = self.embed[tokens]
        x = rms_norm(h).to(torch.bfloat16)
        for layer in range(min(self.L, 2)):
            topk_weights, topk_ids = select_experts(x.float() @ self.router[layer].T, c.top_k)
            phys = route_to_phys(topk_ids, self.l2p[layer], self.exchange.active_mask, self.S,
                                 token_offset=self.rank * self.M)
            pack_receive_layout(x, phys, self.cfg.num_ranks, self.S, self.M)
            if self.attn is not None:
                h = h + 0.0 * ((x @ self.attn[0][layer]) @ self.attn[1][layer]).float()
        (rms_norm(h) @ self.lm_head.T).argmax(-1)
        torch.cat([topk_ids[:, 0], self.exchange.miss_count.to(torch.int64)])

    def on_commit(self, *, active: list[bool], joined: list[int], epoch: int, start_step: int,
                  is_joiner: bool) -> None:
        if not self.exchange.is_membership_aware and not all(active):
            raise RuntimeError(f"rank {self.rank}: engine {self.engine_name} cannot serve a partial membership")
        if hasattr(self.exchange, "mapped"):  # exchanges that map peers: the fused buffer, shm's handshake
            peers = [r for r, a in enumerate(active) if a and r != self.rank]
            fresh = [r for r in peers if is_joiner or r in joined or r not in self.exchange.mapped]
            # raises StepAborted(phase="connect") naming peers that could not be mapped (rank.py reports them)
            self.exchange.connect(fresh, timeout_s=self.cfg.peer_connect_timeout_s)
        self.exchange.switch(active, epoch)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.last_misses = self.exchange.miss_count.tolist()
        self._epoch_barrier(active, epoch, 0.8 * self.cfg.suspicion_window_s)

    def _epoch_barrier(self, active: list[bool], epoch: int, timeout_s: float) -> None:
        """Wait until every member has switched to ``epoch``.

        Survivors restore different numbers of orphans; without this, the first to finish would
        wait in its first replay for the slowest past the kernels' deadline (0.25 s) and report a
        healthy peer. A member that dies here is left to the deadline and the coordinator. The wait
        stays under the suspicion window: a rank blocked here cannot ack a new prepare.
        """
        if self.control_store is None or sum(active) < 2:
            return
        import datetime

        prefix = f"eep/bench/{self.run_id}/epoch{epoch}/ready"
        self.control_store.set(f"{prefix}{self.rank}", "1")
        keys = [f"{prefix}{r}" for r, a in enumerate(active) if a and r != self.rank]
        try:
            self.control_store.wait(keys, datetime.timedelta(seconds=timeout_s))
        except Exception:  # noqa: BLE001 - a dead member: its absence is the deadline's business
            pass

    def decode(self, tokens: torch.Tensor, *, active: list[bool], placement: ExpertPlacement, epoch: int, step: int,
               timeout_s: float, should_abort: Callable[[], bool] | None = None) -> list[int]:
        n = tokens.shape[0]
        if n > self.M:
            raise ValueError(f"rank {self.rank}: {n} tokens > the engine's capacity of {self.M} per step")
        size = next(k for k in self.sizes if k >= n)  # the smallest captured batch that holds them
        padded = torch.zeros(size, dtype=torch.int64)
        padded[:n] = tokens
        self.tokens[size].copy_(padded)  # the graph's static input (fixed token count)
        if size in self.graphs:
            self.graphs[size].replay()
            out = self.outs[size].cpu()
        else:
            out = self._forward(self.tokens[size]).cpu()
        misses = out[size:].tolist()
        missed = [r for r, (a, b) in enumerate(zip(misses, self.last_misses)) if a > b and active[r]]
        self.last_misses = misses
        if missed:
            raise StepAborted(-1, "step", missed, is_aborted=bool(should_abort and should_abort()))
        return out[:n].tolist()

    def close(self) -> None:
        self.exchange.close()
        self.store.close()


class _PhaseClock:
    """``mark(name)`` records the seconds since the previous mark under ``name``."""

    def __init__(self, phases: dict[str, float]):
        self.phases, self.t = phases, time.perf_counter()

    def __call__(self, name: str) -> None:
        now = time.perf_counter()
        self.phases[name] = now - self.t
        self.t = now


def host_tier_pin(policy: bool | str | None, incarnation: int) -> bool | None:
    """HostTier's ``pin`` for a rank process from the engine's ``pin_host_tier`` option."""
    if policy == "first_start":
        return None if incarnation == 0 else False
    if policy not in (None, True, False):
        raise ValueError(f"pin_host_tier={policy!r}: expected None, True, False or 'first_start'")
    return policy


def expert_tiers(shard_dir: str, names: list[str], pin: bool | None) -> list:
    """weights_tools tiers by name; the host tier pinned or not as asked (pinning a 58 GB mapping
    costs start-up time in every rank process, and buys asynchronous, faster restores)."""
    from weights_tools import DiskTier, HostTier

    return [HostTier(shard_dir, pin=pin) if n == "host" else DiskTier(shard_dir) if n == "disk" else n for n in names]
