"""A rank's slots (``eep.runtime.engines.slots.RankSlots``) under the one repair executor, on CPU.

Peer copies read another process's slots through the fd handshake, as GPUs read each other's VMM
memory: a peer in a real process (SIGKILLed in one test), bit-exact copies, fallback to the tiers
when a peer cannot be a source (dead, another incarnation, copies not final), staging of a slot that
still serves, the background copies of a re-replication (voided: poisoned), and a switch that refuses
maps naming an expert a slot does not hold.
"""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
import torch.distributed as dist

from eep.repair import RepairError, TensorTier, Transfer
from eep.runtime.control.keys import Key, store_key
from eep.runtime.engines.slots import PlanPart, RankSlots
from eep.state import NO_EXPERT, ExpertPlacement

L, S, E, H, I = 2, 3, 6, 16, 8  # layers, slots per rank, experts, hidden, intermediate


def _weights(seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    return {layer: (torch.randn(E, I, H, generator=gen), torch.randn(E, I, H, generator=gen),
                    torch.randn(E, H, I, generator=gen)) for layer in range(L)}


def _slots(rank: int, store, incarnation: int = 0) -> RankSlots:
    return RankSlots(rank=rank, num_ranks=2, num_layers=L, slots_per_rank=S, hidden=H, intermediate=I,
                     dtype=torch.float32, device=torch.device("cpu"), store=store, run_id="t", incarnation=incarnation)


def _placement(rows: list[list[int]]) -> ExpertPlacement:
    """``rows[layer]``: phys_to_logical over both ranks' slots."""
    return ExpertPlacement.from_phys_to_logical(torch.tensor(rows), num_ranks=2, slots_per_rank=S, num_experts=E)


def _host(rank: int, layer: int, slot: int, expert: int) -> Transfer:
    return Transfer(layer, layer, expert, "host", None, None, rank, rank * S + slot, 3 * I * H * 4)


def _peer(layer: int, expert: int, src: int, dst: int) -> Transfer:
    return Transfer(layer, layer, expert, "peer", src // S, src, dst // S, dst, 3 * I * H * 4)


def _expert_of(slots: RankSlots, weights, layer: int, slot: int, expert: int) -> bool:
    w_gate, w_up, w_down = weights[layer]
    return (torch.equal(slots.w13[layer, slot, :I], w_gate[expert]) and torch.equal(slots.w13[layer, slot, I:], w_up[expert])
            and torch.equal(slots.w2[layer, slot], w_down[expert]))


# rank 0 holds experts 0, 1, 2 in every layer; rank 1 holds 3, 4, 5
ROWS = [[0, 1, 2, 3, 4, 5]] * L


def _load_rank0(slots: RankSlots, tier) -> None:
    part = PlanPart(0, _placement(ROWS), [True, True], [_host(0, l, i, i) for l in range(L) for i in range(S)])
    report = slots.execute(part, [tier])
    assert report.num_copied == L * S and set(report.served_by) == {"host"}


def test_peer_copies_are_exact_and_a_peer_that_cannot_serve_falls_back_to_the_tier():
    store = dist.HashStore()
    weights = _weights()
    tier = TensorTier(weights)
    a, b = _slots(0, store), _slots(1, store)
    try:
        _load_rank0(a, tier)
        # rank 1 (not a member yet) copies experts 0 and 2 of layer 1 from rank 0's slots, 1 of layer 0 too
        moves = [_peer(1, 0, 0, 3), _peer(1, 2, 2, 5), _peer(0, 1, 1, 4)]
        target = _placement([[0, 1, 2, NO_EXPERT, 1, NO_EXPERT], [0, 1, 2, 0, NO_EXPERT, 2]])
        part = PlanPart(0, target, [True, False], moves, incarnations={0: 0})
        report = b.execute(part, [tier])
        assert report.served_by == ["peer"] * 3 and not report.fallbacks
        assert _expert_of(b, weights, 1, 0, 0) and _expert_of(b, weights, 1, 2, 2) and _expert_of(b, weights, 0, 1, 1)
        assert b.loaded[1].tolist() == [0, NO_EXPERT, 2] and b.loaded[0].tolist() == [NO_EXPERT, 1, NO_EXPERT]
        assert b.execute(part, [tier]).num_copied == 0  # held: nothing to copy again
        assert [(x["layer"], x["transfers"]) for x in report.batches] == [(1, 2), (0, 1)]

        # the plan's member is another incarnation of rank 0 than the one publishing: the tier serves
        b.loaded.fill_(NO_EXPERT)
        report = b.execute(PlanPart(0, target, [True, False], moves, incarnations={0: 7}), [tier])
        assert report.served_by == ["host"] * 3 and "incarnation 0, the member the plan copies from is incarnation 7" \
            in report.fallbacks[0]
        assert _expert_of(b, weights, 1, 0, 0)
        # a peer whose own copies are not final is no source either
        b.loaded.fill_(NO_EXPERT)
        report = b.execute(PlanPart(0, target, [True, False], moves, incarnations={0: 0}, is_source=lambda r: False),
                           [tier])
        assert report.served_by == ["host"] * 3 and "not a live replica" in report.fallbacks[0]
        # no tier and no peer: nothing is switched, the slots written are poisoned
        b.loaded.fill_(NO_EXPERT)
        with pytest.raises(RepairError, match="no tier could restore layer 1 expert 0"):
            b.execute(PlanPart(0, target, [True, False], moves, incarnations={0: 3}), [])
        assert b.placement is not None and b.loaded[1, 0] == NO_EXPERT and torch.isnan(b.w13[1, 0]).all()
    finally:
        a.close()
        b.close()


def test_fp8_slots_hold_weights_and_scales_and_peers_copy_both():
    """FP8 slots: e4m3 weights and their 128x128 scales in one allocation; a tier restore and a peer copy
    move both bit-exactly, poisoning hits both, and an intermediate size that would make gate and up
    share a scale block is refused."""
    from eep.fp8 import Fp8Weight, quantize_weight
    from eep.repair import expert_weight_nbytes

    hidden, inter = 256, 128  # two hidden blocks, one intermediate block
    gen = torch.Generator().manual_seed(11)
    weights = {layer: tuple(quantize_weight(torch.randn(E, *shape, generator=gen))
                            for shape in ((inter, hidden), (inter, hidden), (hidden, inter))) for layer in range(L)}
    store = dist.HashStore()

    def fp8_slots(rank):
        return RankSlots(rank=rank, num_ranks=2, num_layers=L, slots_per_rank=S, hidden=hidden, intermediate=inter,
                         dtype=torch.float8_e4m3fn, device=torch.device("cpu"), store=store, run_id="t")

    a, b = fp8_slots(0), fp8_slots(1)
    try:
        assert isinstance(a.w13, Fp8Weight) and a.w13.scale.shape == (L, S, 2, 2) and a.w2.scale.shape == (L, S, 2, 1)
        assert a.region.nbytes >= RankSlots.nbytes(L, S, inter, hidden, torch.float8_e4m3fn) \
            == L * S * expert_weight_nbytes(hidden, inter, fp8=True)
        assert torch.isnan(a.w13.scale).all() and torch.isnan(a.w2.weight.float()).all()  # unloaded: poisoned
        nbytes = expert_weight_nbytes(hidden, inter, fp8=True)
        part = PlanPart(0, _placement(ROWS), [True, True],
                        [Transfer(l, l, i, "host", None, None, 0, i, nbytes) for l in range(L) for i in range(S)])
        report = a.execute(part, [TensorTier(weights)])
        assert report.num_copied == L * S and report.by_tier(part.transfers)["host"]["nbytes"] == L * S * nbytes
        moves = [Transfer(1, 1, 2, "peer", 0, 2, 1, 3, nbytes)]  # rank 1's slot 0 copies rank 0's slot 2
        target = _placement([[0, 1, 2, NO_EXPERT, NO_EXPERT, NO_EXPERT], [0, 1, 2, 2, NO_EXPERT, NO_EXPERT]])
        assert b.execute(PlanPart(0, target, [True, False], moves, incarnations={0: 0}), [TensorTier(weights)]
                         ).served_by == ["peer"]
        for slots, slot in ((a, 2), (b, 0)):
            gate, up, down = slots.views(1, slots.rank * S + slot)
            for got, want in zip((gate, up, down), weights[1]):
                assert torch.equal(got.weight.view(torch.uint8), want.weight[2].view(torch.uint8))
                assert torch.equal(got.scale, want.scale[2])
        b.poison(1, S)
        assert torch.isnan(b.w13[1, 0].scale).all() and torch.isnan(b.w2[1, 0].weight.float()).all()
        with pytest.raises(ValueError, match="intermediate % 128 == 0"):
            RankSlots(rank=0, num_ranks=1, num_layers=1, slots_per_rank=1, hidden=128, intermediate=64,
                      dtype=torch.float8_e4m3fn, device=torch.device("cpu"))
    finally:
        a.close()
        b.close()


def test_a_slot_that_serves_is_staged_until_the_switch_and_maps_must_match_the_slots():
    store = dist.HashStore()
    weights = _weights(1)
    tier = TensorTier(weights)
    a = _slots(0, store)
    try:
        _load_rank0(a, tier)  # serving ROWS as a member
        before = a.w13[0, 1].clone()

        class Halfway(TensorTier):  # writes the expert, then fails: the serving slot must not change
            def copy_expert_into(self, layer, expert, *dsts, stream=None):
                super().copy_expert_into(layer, expert, *dsts, stream=stream)
                raise OSError("shard truncated")

        donor = _placement([[0, 4, 2, 3, NO_EXPERT, 5], ROWS[1]])  # slot 1 of layer 0 takes expert 4
        part = PlanPart(1, donor, [True, False], [_host(0, 0, 1, 4)])
        with pytest.raises(RepairError):
            a.execute(part, [Halfway(weights)])
        assert torch.equal(a.w13[0, 1], before) and a.loaded[0, 1] == 1 and a.placement.equal(_placement(ROWS))
        a.execute(part, [tier])
        assert _expert_of(a, weights, 0, 1, 4) and a.placement.equal(donor)
        # maps that name an expert a slot does not hold are refused, and nothing switches
        with pytest.raises(RepairError, match="put expert 5 in layer 1 slot 2, which holds 2"):
            a.execute(PlanPart(2, _placement([donor.phys_to_logical[0].tolist(), [0, 1, 5, 3, 4, 2]]),
                               [True, True], []), [tier])
        assert a.placement.equal(donor)
    finally:
        a.close()


def test_background_copies_land_in_spare_slots_and_a_void_poisons_them():
    store = dist.HashStore()
    weights = _weights(2)
    tier = TensorTier(weights)
    a, b = _slots(0, store), _slots(1, store)
    try:
        _load_rank0(a, tier)
        spare = [[0, 1, 2, NO_EXPERT, NO_EXPERT, NO_EXPERT]] * L
        rows_b = [_host(1, l, 2, 5) for l in range(L)]
        b.execute(PlanPart(0, _placement([[0, 1, 2, NO_EXPERT, NO_EXPERT, 5]] * L), [True, True], rows_b), [tier])
        final = _placement([[0, 1, 2, 0, 1, 5]] * L)
        part = PlanPart(0, final, [True, True], [_peer(l, e, e, 3 + e) for l in range(L) for e in (0, 1)],
                        incarnations={0: 0})
        job = b.copy_in_background(part, [tier])
        steps = 0
        while not job.step():
            steps += 1
        assert steps == L and job.report.served_by == ["peer"] * 4 and len(job.report.batches) == L
        assert all(_expert_of(b, weights, l, i, i) for l in range(L) for i in (0, 1))
        assert b.placement.equal(_placement([[0, 1, 2, NO_EXPERT, NO_EXPERT, 5]] * L))  # nothing switched
        # the switch commit finds every copy held
        assert b.execute(part, [tier]).num_copied == 0 and b.placement.equal(final)
        # maps that leave those slots spare again keep what they hold (nobody wrote them) ...
        b.execute(PlanPart(1, _placement(spare), [True, True], []), [tier])
        assert b.loaded[0].tolist() == [0, 1, 5]
        # ... and a void (a failure came first) poisons what its copies wrote
        again = [_peer(l, 2, 2, 3) for l in range(L)]
        job = b.copy_in_background(PlanPart(1, _placement([[0, 1, 2, 2, NO_EXPERT, NO_EXPERT]] * L), [True, True],
                                            again, incarnations={0: 0}), [tier])
        assert not job.step() and _expert_of(b, weights, 0, 0, 2)
        job.void()
        assert b.loaded[0].tolist() == [NO_EXPERT, 1, 5] and torch.isnan(b.w13[0, 0]).all()
        assert b.loaded[1].tolist() == [0, 1, 5]  # the second batch was never enqueued
    finally:
        a.close()
        b.close()


_EXPORTER = """
import sys, torch, torch.distributed as dist
sys.path.insert(0, sys.argv[2])
from test_rank_slots import _slots, _load_rank0, _weights
from eep.repair import TensorTier
store = dist.TCPStore("127.0.0.1", int(sys.argv[1]), is_master=False)
slots = _slots(0, store, incarnation=int(sys.argv[3]))
_load_rank0(slots, TensorTier(_weights()))
store.set("ready", "1")
import time
time.sleep(600)
"""


def test_a_peer_in_another_process_serves_copies_and_after_its_sigkill_the_tier_does():
    store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
    weights = _weights()
    tier = TensorTier(weights)
    here = os.path.dirname(os.path.abspath(__file__))
    proc = subprocess.Popen([sys.executable, "-c", _EXPORTER, str(store.port), here, "4"],
                            env={**os.environ, "PYTHONPATH": os.path.dirname(here)})
    b = _slots(1, store)
    try:
        deadline = time.monotonic() + 60
        while not store.check(["ready"]):
            assert proc.poll() is None and time.monotonic() < deadline, "the exporting process did not start"
            time.sleep(0.05)
        record = json.loads(store.get(store_key("t", Key.WEIGHTS, 0)))
        assert record["incarnation"] == 4 and record["layout"]["slots"] == S
        target = _placement([[0, 1, 2, 2, NO_EXPERT, NO_EXPERT], [0, 1, 2] + [NO_EXPERT] * S])
        part = PlanPart(0, target, [True, False], [_peer(0, 2, 2, 3)], incarnations={0: 4})
        assert b.execute(part, [tier]).served_by == ["peer"] and _expert_of(b, weights, 0, 0, 2)
        # the exporter dies; a slot of it never mapped before cannot be fetched: the tier serves
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
        fresh = _slots(1, store, incarnation=1)
        try:
            report = fresh.execute(part, [tier])
            assert report.served_by == ["host"] and "did not hand over its slots" in report.fallbacks[0]
            assert _expert_of(fresh, weights, 0, 0, 2)
        finally:
            fresh.close()
    finally:
        if proc.poll() is None:
            proc.kill()
        b.close()
