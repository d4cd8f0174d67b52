"""Helpers shared by the test modules (kept out of conftest.py, which other test folders shadow)."""

import threading

import torch


def on_every_rank(step, ranks) -> dict:
    """``step(rank)`` on one thread per rank of ``ranks``; returns ``{rank: result}``, raising any
    rank's error (with its rank) once every thread has ended (each joined within 60 s)."""
    results, errors = {}, []

    def one(rank):
        try:
            results[rank] = step(rank)
        except Exception as exc:  # noqa: BLE001 - surfaced below with the rank
            errors.append((rank, exc))

    threads = [threading.Thread(target=one, args=(r,)) for r in ranks]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not errors, errors
    return results


class StubGroup:
    """Stands in for an EP process group where only its rank and size are asked (SGLang's dispatcher)."""

    def __init__(self, rank: int, size: int):
        self._rank, self._size = rank, size

    def rank(self) -> int:
        return self._rank

    def size(self) -> int:
        return self._size


def random_experts(num_experts: int, inter: int, hidden: int, *, generator: torch.Generator,
                   dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fresh random SwiGLU expert weights scaled so activations stay O(1)."""
    w_gate = torch.randn(num_experts, inter, hidden, generator=generator) / hidden ** 0.5
    w_up = torch.randn(num_experts, inter, hidden, generator=generator) / hidden ** 0.5
    w_down = torch.randn(num_experts, hidden, inter, generator=generator) / inter ** 0.5
    return w_gate.to(dtype), w_up.to(dtype), w_down.to(dtype)


def prefill_partials(recv_x: torch.Tensor, recv_idx: torch.Tensor, recv_w: torch.Tensor, rank: int,
                     num_local_experts: int, weights: tuple) -> torch.Tensor:
    """A normal-mode MoE runner's output for packed rows: each row's local experts (SwiGLU of
    ``weights[e]``, ``e = rank * num_local_experts + recv_idx``) weighted by ``recv_w`` and summed in
    k order in float32, as ``eep.reference.prefill.partial_combine`` specifies. Every local expert
    runs on every row (a few large products instead of one per entry, and no host sync: it runs as
    fast on a GPU shared by several rank processes); an entry takes its expert's row."""
    from eep.reference import swiglu

    experts = range(rank * num_local_experts, (rank + 1) * num_local_experts)
    ys = torch.stack([swiglu(recv_x, weights[0][e], weights[1][e], weights[2][e]) for e in experts])
    rows = torch.arange(recv_x.shape[0], device=recv_x.device)
    acc = torch.zeros(recv_x.shape[0], recv_x.shape[1], device=recv_x.device)
    for k in range(recv_idx.shape[1]):
        local = recv_idx[:, k]
        contribution = recv_w[:, k:k + 1].float() * ys[local.clamp(min=0), rows].float()
        acc = acc + torch.where((local >= 0).unsqueeze(1), contribution, 0.0)
    return acc.to(recv_x.dtype)


def run_ranks_one_sigkilled(target, path: str, num_ranks: int, seed: int, dead: int,
                            timeout_s: float = 120.0) -> dict[int, tuple[torch.Tensor, list[int]]]:
    """Start ``target(path, rank, seed, queue, dead, ready)`` in one spawned process per rank; rank
    ``dead`` SIGKILLs itself, the others meet at ``ready`` and put ``(rank, out as numpy, active list)``
    on ``queue``. Returns the survivors' ``{rank: (out, active)}`` once the dead one is seen killed."""
    import multiprocessing as mp
    import signal

    ctx = mp.get_context("spawn")
    queue, ready = ctx.Queue(), ctx.Barrier(num_ranks - 1)
    procs = [ctx.Process(target=target, args=(path, r, seed, queue, dead, ready)) for r in range(num_ranks)]
    for p in procs:
        p.start()
    got = {}
    for _ in range(num_ranks - 1):
        rank, out, active = queue.get(timeout=timeout_s)
        got[rank] = (torch.from_numpy(out), active)
    for p in procs:
        p.join(timeout=30)
    assert procs[dead].exitcode == -signal.SIGKILL
    return got
