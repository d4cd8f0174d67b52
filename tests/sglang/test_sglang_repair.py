"""Repair by eep's plan inside SGLang: SGLang's real expert-location maps, its real logical -> physical
dispatch, its real elastic state and plugin loader; the expert weights in SGLang's ``w13``/``w2`` layout.

Four EP ranks are simulated in one process (each its own maps and weight tensors); a dead rank's
tensors are poisoned with NaN, so any token still routed to it shows in the output.
"""

import pytest
import torch

from sglang_case import HAS_SGLANG, SKIP_REASON

if not HAS_SGLANG:
    pytest.skip(SKIP_REASON, allow_module_level=True)

from sglang.srt.eplb.expert_location import ExpertLocationMetadata
from sglang.srt.eplb.expert_location_dispatch import ExpertLocationDispatchInfo, topk_ids_logical_to_physical

from eep.errors import CoverageLostError
from eep.integrations.sglang.placement import placement_from_sglang
from eep.integrations.sglang.repair import PlanRepair, UnsupportedLayoutError
from eep.reference import dense_moe, swiglu
from eep.repair import TensorTier
from eep.state import ExpertPlacement
from repair_case import (HIDDEN, INTER, LAYER_IDS, NUM_EXPERTS, NUM_LAYERS, NUM_RANKS, SLOTS, TOP_K, logical_weights,
                         metadata_for, rank_weights)
from test_sglang_plugin import plugin_loaded  # noqa: F401 (a fixture: SGLang's real plugin loader)

class Instance:
    """Four SGLang ranks: maps, weights and a ``PlanRepair`` each, restoring from one host tier."""

    def __init__(self, seed: int, *, tiers=None, peers_in_process: bool = True):
        load = torch.rand(NUM_LAYERS, NUM_EXPERTS, generator=torch.Generator().manual_seed(seed)) * 100
        self.placement = ExpertPlacement.build(NUM_LAYERS, NUM_EXPERTS, NUM_RANKS, SLOTS, load)
        self.weights = logical_weights(seed)
        self.tiers = [TensorTier(self.weights)] if tiers is None else tiers
        self.metadata = [metadata_for(self.placement) for _ in range(NUM_RANKS)]
        self.experts = [rank_weights(self.placement, self.weights, r) for r in range(NUM_RANKS)]
        self.peers_in_process = peers_in_process
        self.peers: dict[int, PlanRepair] = {}
        self.repairs = [self.new_repair(r) for r in range(NUM_RANKS)]
        self.active = [True] * NUM_RANKS

    def new_repair(self, rank: int) -> PlanRepair:
        repair = PlanRepair(rank, NUM_RANKS, self.experts[rank], tiers=self.tiers,
                            peers=self.peers if self.peers_in_process else {})
        self.peers[rank] = repair
        return repair

    def kill(self, ranks: list[int]) -> None:
        for r in ranks:
            for w in (w for ws in self.experts[r].values() for w in ws):
                w.fill_(float("nan"))  # what the dead process held can never be read again
            self.active[r] = False

    def outputs(self, seed: int) -> tuple[list, list, list]:
        """Per live rank and MoE layer: SGLang's routing over each rank's maps and slots; the same sum
        over the logical experts' weights; ``eep.reference.dense_moe``."""
        gen = torch.Generator().manual_seed(seed)
        got, want, dense = [], [], []
        for src in (r for r in range(NUM_RANKS) if self.active[r]):
            x = torch.randn(5, HIDDEN, generator=gen).bfloat16()
            ids = torch.rand(5, NUM_EXPERTS, generator=gen).argsort(-1)[:, :TOP_K]
            w = torch.rand(5, TOP_K, generator=gen)
            for row, layer in enumerate(LAYER_IDS):
                meta = self.metadata[src]
                info = ExpertLocationDispatchInfo(
                    ep_dispatch_algorithm="dynamic", partial_logical_to_rank_dispatch_physical_map=None,
                    partial_logical_to_all_physical_map=meta.logical_to_all_physical_map[layer],
                    partial_logical_to_all_physical_map_num_valid=meta.logical_to_all_physical_map_num_valid[layer],
                    num_physical_experts=NUM_RANKS * SLOTS)
                phys = topk_ids_logical_to_physical(ids, info)
                y, ref = torch.zeros(5, HIDDEN), torch.zeros(5, HIDDEN)
                for t in range(5):
                    for k in range(TOP_K):
                        rank, i = divmod(int(phys[t, k]), SLOTS)
                        w13, w2 = self.experts[rank][layer]
                        y[t] += w[t, k] * swiglu(x[t:t + 1], w13[i, :INTER], w13[i, INTER:], w2[i])[0].float()
                        e = int(ids[t, k])
                        ref[t] += w[t, k] * swiglu(x[t:t + 1], *(m[e] for m in self.weights[layer]))[0].float()
                got.append(y)
                want.append(ref)
                dense.append(dense_moe(x, *self.weights[layer], topk_ids=ids, topk_weights=w))
        return got, want, dense


def assert_outputs_match(instance: Instance, seed: int) -> None:
    got, want, dense = instance.outputs(seed)
    for g, r, d in zip(got, want, dense):
        assert torch.isfinite(g).all(), "a token was routed to a dead rank's slot"
        assert torch.equal(g, r), f"{(g - r).abs().max()}"
        assert float((g - d.float()).norm() / d.float().norm()) < 1e-2  # bf16 rounding of the oracle's output


def pointers(metadata) -> list[int]:
    return [getattr(metadata, f).data_ptr() for f in ("physical_to_logical_map", "logical_to_all_physical_map",
                                                      "logical_to_all_physical_map_num_valid")]


def fail(instance: Instance, dead: list[int]) -> dict:
    before = list(instance.active)
    instance.kill(dead)
    return {r: instance.repairs[r].on_failure(instance.metadata[r], before, instance.active)
            for r in range(NUM_RANKS) if instance.active[r]}


def test_failed_rank_is_repaired_by_plan_and_outputs_equal_the_reference():
    instance = Instance(seed=3)
    assert_outputs_match(instance, seed=10)
    ptrs = [pointers(m) for m in instance.metadata]
    results = fail(instance, [1])
    restored = {r: res.phases[-1] for r, res in results.items() if res.phases[-1]["phase"] == "orphan-restore"}
    assert sum(p["experts_by_tier"].get("host", 0) for p in restored.values()) >= 1, "no orphan came from the host tier"
    for r, res in results.items():
        assert pointers(instance.metadata[r]) == ptrs[r]  # written in place: captured graphs read the new maps
        assert res.phases[0]["phase"] == "routing-only" and res.phases[0]["dropped_slots"] == NUM_LAYERS * SLOTS
        l2p = instance.metadata[r].logical_to_all_physical_map[LAYER_IDS]
        assert not bool(((l2p // SLOTS) == 1).any()), f"rank {r}'s maps still list the dead rank's slots"
        assert placement_from_sglang(instance.metadata[r], active=instance.active,
                                     layers=LAYER_IDS).equal(results[0].placement)
        for p in res.phases[1:]:
            if p["experts"]:
                assert p["predicted_s"] > 0 and p["observed_s"] > 0 and p["plan_predicted_s"] >= p["predicted_s"]
        assert "predicted" in res.log_line() or not res.transfers
    assert any("observed" in res.log_line() for res in results.values())
    assert_outputs_match(instance, seed=11)


@pytest.mark.parametrize("peers_in_process", [True, False], ids=["peers-in-process", "peers-elsewhere"])
def test_rejoin_by_plan_puts_the_rank_back(peers_in_process):
    instance = Instance(seed=4, peers_in_process=peers_in_process)
    fail(instance, [2])
    after_failure = list(instance.active)
    # a new process: SGLang hands it the survivors' maps; its weights hold nothing yet
    instance.metadata[2] = metadata_for(placement_from_sglang(instance.metadata[0], layers=LAYER_IDS))
    instance.repairs[2] = instance.new_repair(2)
    results = {r: instance.repairs[r].on_rejoin(instance.metadata[r], after_failure, [2]) for r in range(NUM_RANKS)}
    instance.active = [True] * NUM_RANKS
    joiner = results[2].phases[-1]
    assert joiner["phase"] == "reintegration" and joiner["experts"] == NUM_LAYERS * SLOTS
    source = "peer" if peers_in_process else "host"
    assert joiner["experts_by_tier"] == {source: NUM_LAYERS * SLOTS}
    assert bool(results[2].fallbacks) == (not peers_in_process)  # a peer in another process: the host tier
    for r in range(NUM_RANKS):
        assert results[r].placement.equal(results[2].placement)
        l2p = instance.metadata[r].logical_to_all_physical_map[LAYER_IDS]
        assert bool(((l2p // SLOTS) == 2).any()), f"rank {r}'s maps do not route to the rejoined rank"
    assert_outputs_match(instance, seed=12)


def test_coverage_lost_names_the_experts_and_writes_nothing():
    instance = Instance(seed=5)
    before = [m.physical_to_logical_map.clone() for m in instance.metadata]
    weights_before = instance.experts[0][LAYER_IDS[0]][0].clone()
    with pytest.raises(CoverageLostError) as info:
        fail(instance, [1, 2, 3])
    err = info.value
    assert set(err.uncovered) <= set(LAYER_IDS) and err.uncovered and err.num_missing_slots > 0
    survivors = {int(e) for e in instance.placement.phys_to_logical[0, :SLOTS].tolist()}
    first = LAYER_IDS.index(err.layer)
    lost = sorted(set(range(NUM_EXPERTS)) - {int(e) for e in instance.placement.phys_to_logical[first, :SLOTS]})
    assert len(lost) >= len(err.uncovered[err.layer]) and set(err.uncovered[err.layer]) <= set(lost)
    assert f"layer {err.layer}: experts" in str(err) and "more expert slots per layer are needed" in str(err)
    assert survivors  # rank 0 kept its experts
    assert torch.equal(instance.metadata[0].physical_to_logical_map, before[0])
    assert torch.equal(instance.experts[0][LAYER_IDS[0]][0], weights_before)


def test_a_quantised_layout_is_refused_before_anything_moves():
    instance = Instance(seed=6)
    fp8 = {layer: [w.to(torch.float8_e4m3fn) for w in ws] + [torch.ones(SLOTS, 1)]
           for layer, ws in instance.experts[0].items()}
    with pytest.raises(UnsupportedLayoutError, match="3 routed expert tensors"):
        PlanRepair(0, NUM_RANKS, fp8).on_failure(instance.metadata[0], [True] * 4, [True, False, True, True])
    fp8 = {layer: [w.to(torch.float8_e4m3fn) for w in ws] for layer, ws in instance.experts[0].items()}
    with pytest.raises(UnsupportedLayoutError, match="float8_e4m3fn"):
        PlanRepair(0, NUM_RANKS, fp8).on_failure(instance.metadata[0], [True] * 4, [True, False, True, True])


def test_a_tier_that_cannot_serve_leaves_every_slot_and_map_as_it_was():
    instance = Instance(seed=3, tiers=[])
    before = [m.logical_to_all_physical_map.clone() for m in instance.metadata]
    with pytest.raises(Exception, match="no tier holds it"):
        fail(instance, [1])
    for r in (0, 2, 3):
        assert torch.equal(instance.metadata[r].logical_to_all_physical_map, before[r])


# ---- through SGLang's plugin loader: the rank-fault hook ----

class EplbManagerStandIn:
    """What SGLang's ``maybe_rebalance_after_rank_fault`` and eep's hook use of an ``EPLBManager`` (a real
    one needs a published server config): the model getter, and ``rebalance`` (SGLang's own repair)."""

    def __init__(self, model):
        self._get_model = lambda: model
        self.rebalanced = 0

    def rebalance(self):
        self.rebalanced += 1
        yield


@pytest.fixture
def sglang_rank(plugin_loaded, tmp_path, monkeypatch):
    """This process as rank 2 of 4: an eep buffer, SGLang's elastic state and global maps, the host tier."""
    from types import SimpleNamespace

    from sglang.srt.elastic_ep.elastic_ep import ElasticEPStateManager
    from sglang.srt.eplb import expert_location

    from eep.integrations.buffer import Buffer
    from eep.integrations.sglang import repair
    from eep.integrations.sglang.ep_buffer import EepEPBuffer
    from eep.transport.shm import SharedMemoryTransport, create_shm_file

    path = str(tmp_path / "ep.shm")
    create_shm_file(path, NUM_RANKS, 4, 4096)
    EepEPBuffer.set_buffer(Buffer(2, NUM_RANKS, transport=SharedMemoryTransport(path, 2)))
    state = ElasticEPStateManager._build_state(ep_size=NUM_RANKS, device=torch.device("cpu"))
    state.effective_ep_size = NUM_RANKS
    monkeypatch.setattr(ElasticEPStateManager, "_instance", state)
    instance = Instance(seed=3)
    expert_location.set_global_expert_location_metadata(instance.metadata[2], allow_overwrite=True)
    repair.configure(tiers=instance.tiers)
    model = SimpleNamespace(routed_experts_weights_of_layer=instance.experts[2])
    yield instance, state, EplbManagerStandIn(model)
    repair.configure()
    expert_location.set_global_expert_location_metadata(None, allow_overwrite=True)


def test_hook_repairs_this_rank_by_plan_when_sglang_marks_a_rank_down(sglang_rank, caplog):
    from sglang.srt.elastic_ep import elastic_ep

    instance, state, manager = sglang_rank
    ptrs = pointers(instance.metadata[2])
    state.active_ranks[1] = 0  # what the dispatcher writes when rank 1 misses its deadline
    with caplog.at_level("INFO", logger="eep.integrations.sglang.hooks"):
        assert elastic_ep.maybe_rebalance_after_rank_fault(eplb_manager=manager) is True
    assert manager.rebalanced == 0 and state.is_active_equal_last()
    assert pointers(instance.metadata[2]) == ptrs
    line = next(r.getMessage() for r in caplog.records if "repair by plan" in r.getMessage())
    assert "ranks [1] down, rank 2" in line and "orphan-restore: 2 experts (2 from host)" in line
    assert "predicted" in line and "observed" in line
    l2p = instance.metadata[2].logical_to_all_physical_map[LAYER_IDS]
    assert not bool(((l2p // SLOTS) == 1).any())
    restored = placement_from_sglang(instance.metadata[2], active=[True, False, True, True], layers=LAYER_IDS)
    for row, layer in enumerate(LAYER_IDS):  # this rank's slots hold what the new maps say, byte for byte
        w13, w2 = instance.experts[2][layer]
        for i, e in enumerate(restored.phys_to_logical[row, 2 * SLOTS:3 * SLOTS].tolist()):
            assert torch.equal(w2[i], instance.weights[layer][2][e])
            assert torch.equal(w13[i, :INTER], instance.weights[layer][0][e])
    assert elastic_ep.maybe_rebalance_after_rank_fault(eplb_manager=manager) is False  # nothing new


def test_hook_falls_back_to_sglangs_rebalance_with_one_warning(sglang_rank, caplog):
    from types import SimpleNamespace

    from sglang.srt.elastic_ep import elastic_ep

    instance, state, manager = sglang_rank
    fp8 = {layer: [w.to(torch.float8_e4m3fn) for w in ws] for layer, ws in instance.experts[2].items()}
    manager._get_model = lambda: SimpleNamespace(routed_experts_weights_of_layer=fp8)
    before = instance.metadata[2].logical_to_all_physical_map.clone()
    state.active_ranks[1] = 0
    with caplog.at_level("WARNING", logger="eep.integrations.sglang.hooks"):
        assert elastic_ep.maybe_rebalance_after_rank_fault(eplb_manager=manager) is True
    assert manager.rebalanced == 1
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING" and r.name.startswith("eep")]
    assert len(warnings) == 1 and "float8_e4m3fn" in warnings[0] and "SGLang's rebalance" in warnings[0]
    assert torch.equal(instance.metadata[2].logical_to_all_physical_map, before)  # eep wrote nothing


def test_hook_refuses_to_serve_when_coverage_is_lost(sglang_rank):
    from sglang.srt.elastic_ep import elastic_ep

    instance, state, manager = sglang_rank
    before = instance.metadata[2].logical_to_all_physical_map.clone()
    state.active_ranks[0] = state.active_ranks[1] = state.active_ranks[3] = 0
    for _ in range(2):  # every forward pass after the fault is refused, not only the first
        with pytest.raises(CoverageLostError, match=r"coverage lost: layer \d: experts \["):
            elastic_ep.maybe_rebalance_after_rank_fault(eplb_manager=manager)
    assert manager.rebalanced == 0 and not state.is_active_equal_last()
    assert torch.equal(instance.metadata[2].logical_to_all_physical_map, before)


# ---- the vote of ranks in other processes (threads here, each with its own client of a real TCPStore) ----

class CorruptTier(TensorTier):
    """A host tier whose bytes fail their check on read (a corrupt shard)."""

    def copy_expert_into(self, layer, expert, *dsts, stream=None):
        raise OSError(f"layer {layer} expert {expert}: checksum mismatch")


def voted_failure(instance: Instance, dead: list[int], *, silent: int | None = None, timeout_s: float = 20.0) -> dict:
    """Each survivor repairs in its own thread and votes through the store; ``silent`` never shows up."""
    import threading
    from datetime import timedelta

    from torch.distributed import TCPStore

    from eep.integrations.sglang.repair import StoreVote

    master = TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False, timeout=timedelta(seconds=30))
    before = list(instance.active)
    instance.kill(dead)
    outcome = {}

    def run(rank: int) -> None:
        client = TCPStore("127.0.0.1", master.port, is_master=False, timeout=timedelta(seconds=30))
        instance.repairs[rank].vote = StoreVote(client, rank, timeout_s=timeout_s)
        try:
            outcome[rank] = instance.repairs[rank].on_failure(instance.metadata[rank], before, instance.active)
        except Exception as exc:  # noqa: BLE001 (the outcome is what the test looks at)
            outcome[rank] = exc

    threads = [threading.Thread(target=run, args=(r,)) for r in range(NUM_RANKS) if instance.active[r] and r != silent]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not any(t.is_alive() for t in threads), "a rank waited past the vote's deadline"
    return outcome


def test_ranks_vote_and_switch_together():
    instance = Instance(seed=3)
    outcome = voted_failure(instance, [1])
    assert all(not isinstance(v, Exception) for v in outcome.values()), outcome
    assert_outputs_match(instance, seed=13)


def test_one_rank_that_cannot_stage_aborts_the_repair_everywhere():
    instance = Instance(seed=3)
    before = [m.logical_to_all_physical_map.clone() for m in instance.metadata]
    instance.repairs[3].tiers = [CorruptTier(instance.weights)]
    outcome = voted_failure(instance, [1])
    assert "checksum mismatch" in str(outcome[3])
    for r in (0, 2):
        assert "ranks [3] could not stage their part of the plan" in str(outcome[r]), outcome[r]
    for r in (0, 2, 3):
        assert torch.equal(instance.metadata[r].logical_to_all_physical_map, before[r]), f"rank {r} switched"


def test_a_silent_rank_ends_the_vote_at_its_deadline():
    import time

    instance = Instance(seed=3)
    start = time.monotonic()
    outcome = voted_failure(instance, [1], silent=3, timeout_s=1.0)
    assert time.monotonic() - start < 30
    for r in (0, 2):
        assert "ranks [3] did not vote within 1 s" in str(outcome[r]), outcome[r]
