"""EepDispatcher against SGLang's real dispatcher classes, over the shared-memory transport."""

import inspect
import multiprocessing as mp
import signal

import pytest
import torch

from sglang_case import HAS_SGLANG, SKIP_REASON

if not HAS_SGLANG:
    pytest.skip(SKIP_REASON, allow_module_level=True)

from sglang_case import (HIDDEN, LOCAL, M, NUM_EXPERTS, NUM_RANKS, TOP_K, make_dispatcher, make_inputs,
                         ll_output_errors, normal_output_errors, rank_worker, reference_outputs, relative_error,
                         run_normal_step, run_step)
from sglang.srt.elastic_ep.elastic_ep import ElasticEPStateManager
from sglang.srt.layers.moe.token_dispatcher import (BaseDispatcher, CombineInput, CombineInputChecker,
                                                    DeepEPLLCombineInput, DispatchOutput, MooncakeEPDispatcher)

from eep.integrations.buffer import Buffer
from eep.integrations.sglang.dispatcher import EepDispatcher
from eep_test_utils import on_every_rank
from eep.transport.shm import SharedMemoryTransport, create_shm_file


@pytest.fixture(autouse=True)
def no_elastic_state():
    saved = ElasticEPStateManager._instance
    ElasticEPStateManager._instance = None
    yield
    ElasticEPStateManager._instance = saved


def _shm(tmp_path, use_fp8=True) -> str:
    """A transport file for decode messages; sized for bf16 rows too, since a quantisation config
    can turn the dispatcher's FP8 off after construction (as SGLang's w4afp8 does)."""
    path = str(tmp_path / "ep.shm")
    create_shm_file(path, NUM_RANKS, 4, max(Buffer.get_ep_buffer_size_hint(M, HIDDEN, NUM_RANKS, NUM_EXPERTS,
                                                                           use_fp8=fp8) for fp8 in (use_fp8, False)))
    return path


def _on_every_rank(step):
    return on_every_rank(step, range(NUM_RANKS))


def _run_threads(path, seed, use_fp8, return_recv_hook=True, quant_config=None):
    xs, ids, ws, weights = make_inputs(seed)

    def step(rank):
        d = make_dispatcher(rank, Buffer(rank, NUM_RANKS, transport=SharedMemoryTransport(path, rank)),
                            use_fp8=use_fp8, return_recv_hook=return_recv_hook)
        if quant_config is not None:
            d.set_quant_config(quant_config)  # as SGLang's quant methods do after weight loading
        return run_step(d, xs[rank], ids[rank], ws[rank], rank, weights) + (d,)

    return (xs, ids, ws, weights), _on_every_rank(step)


def test_is_a_concrete_base_dispatcher_accepting_what_sglang_passes_mooncake():
    assert issubclass(EepDispatcher, BaseDispatcher) and not inspect.isabstract(EepDispatcher)
    ours = inspect.signature(EepDispatcher.__init__).parameters
    theirs = inspect.signature(MooncakeEPDispatcher.__init__).parameters
    for name, param in theirs.items():  # drift in SGLang's Mooncake constructor fails here
        assert name in ours, f"MooncakeEPDispatcher takes {name!r}, EepDispatcher does not"
        assert ours[name].kind == param.kind, name
        assert ours[name].default == param.default, (name, ours[name].default, param.default)
    extra = [p for n, p in ours.items() if n not in theirs]
    assert all(p.kind is inspect.Parameter.KEYWORD_ONLY and p.default is not inspect.Parameter.empty for p in extra)
    for method in ("dispatch", "dispatch_a", "dispatch_b", "combine", "combine_a", "combine_b"):
        assert list(inspect.signature(getattr(EepDispatcher, method)).parameters) == \
            list(inspect.signature(getattr(MooncakeEPDispatcher, method)).parameters), method


@pytest.mark.parametrize("use_fp8, return_recv_hook, quant_config", [
    (True, True, None), (False, False, None), (True, True, {"dispatcher_output_dtype": "bf16"})])
def test_four_ranks_match_the_reference_and_outputs_are_sglang_deepep_ll(tmp_path, use_fp8, return_recv_hook,
                                                                         quant_config):
    (xs, ids, ws, weights), results = _run_threads(_shm(tmp_path, use_fp8), 11 + use_fp8, use_fp8, return_recv_hook,
                                                   quant_config)
    use_fp8 = use_fp8 and quant_config is None
    for rank in range(NUM_RANKS):
        out, combined, dispatcher = results[rank]
        assert isinstance(out, DispatchOutput) and out.format.is_deepep_ll()
        assert not ll_output_errors(out, combined, rank, xs, ids, ws, weights, [True] * NUM_RANKS, use_fp8=use_fp8)
        assert dispatcher.active_ranks().tolist() == [1] * NUM_RANKS
    combine_input = DeepEPLLCombineInput(results[0][0].hidden_states, ids[0], ws[0])
    assert isinstance(combine_input, CombineInput) and CombineInputChecker.format_is_deepep_ll(combine_input)


def test_topk_ids_are_physical_and_never_routed_again(tmp_path, monkeypatch):
    import eep.routing

    def forbidden(*args, **kwargs):
        raise AssertionError("the SGLang adapter must not route: SGLang already chose physical experts")

    monkeypatch.setattr(eep.routing, "route_to_phys", forbidden)
    monkeypatch.setattr(eep.routing, "select_experts", forbidden)
    (xs, ids, ws, weights), results = _run_threads(_shm(tmp_path, False), 5, False)
    for rank in range(NUM_RANKS):  # rows arrive at the physical expert SGLang named, nowhere else
        out, combined, _ = results[rank]
        assert not ll_output_errors(out, combined, rank, xs, ids, ws, weights, [True] * NUM_RANKS, use_fp8=False)


def test_stage_machine_names_the_misuse(tmp_path):
    d = make_dispatcher(0, Buffer(0, NUM_RANKS, transport=SharedMemoryTransport(_shm(tmp_path), 0)), use_fp8=True)
    with pytest.raises(RuntimeError, match="dispatch_b called in stage INITIAL"):
        d.dispatch_b()
    with pytest.raises(RuntimeError, match="combine_a called in stage INITIAL"):
        d.combine_a(DeepEPLLCombineInput(torch.zeros(1), torch.zeros(1), torch.zeros(1)))


def test_a_mask_longer_than_the_expert_layout_is_refused(tmp_path):
    """--max-ep-size > --ep-size: SGLang's active_ranks has reserved slots; never guess the layout."""
    d = make_dispatcher(0, Buffer(0, NUM_RANKS, transport=SharedMemoryTransport(_shm(tmp_path), 0)), use_fp8=True)
    d.num_local_experts = LOCAL + 1
    xs, ids, ws, weights = make_inputs(3)
    with pytest.raises(ValueError, match="4 rank slots"):
        run_step(d, xs[0], ids[0], ws[0], 0, weights)


def test_nan_router_output_is_refused_before_anything_is_sent(tmp_path):
    from eep.errors import RoutingError

    d = make_dispatcher(0, Buffer(0, NUM_RANKS, transport=SharedMemoryTransport(_shm(tmp_path), 0)), use_fp8=True)
    xs, ids, ws, weights = make_inputs(5)
    ws[0][2, 1] = float("nan")
    with pytest.raises(RoutingError, match=r"topk_weights holds NaN or inf in 1 token row\(s\): \[2\]"):
        run_step(d, xs[0], ids[0], ws[0], 0, weights)
    assert d._stage.name == "INITIAL"  # the stage did not move: a retry with good input is allowed


@pytest.mark.slow
def test_sigkilled_rank_clears_sglang_active_ranks_in_place_and_survivors_match_the_reference(tmp_path):
    path = _shm(tmp_path)
    # forkserver: SGLang is imported once (preload), each rank forks from that clean process
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(["sglang_case"])
    queue, dead, seeds = ctx.Queue(), 2, [21, 22]
    barrier = ctx.Barrier(NUM_RANKS - 1)
    procs = [ctx.Process(target=rank_worker, args=(path, r, seeds, dead, queue, barrier, True))
             for r in range(NUM_RANKS)]
    for p in procs:
        p.start()
    got = {}
    for _ in range(NUM_RANKS - 1):
        rank, outputs, mask, same_tensor, passed_sglangs = queue.get(timeout=120)
        got[rank] = (outputs, mask, same_tensor, passed_sglangs)
    for p in procs:
        p.join(timeout=30)
    assert procs[dead].exitcode == -signal.SIGKILL
    survivors = [r != dead for r in range(NUM_RANKS)]
    for seed_index, seed in enumerate(seeds):
        xs, ids, ws, weights = make_inputs(seed)
        refs = reference_outputs(xs, ids, ws, weights, survivors)
        for rank, (outputs, mask, same_tensor, passed_sglangs) in got.items():
            combined = torch.from_numpy(outputs[seed_index])
            assert relative_error(combined, refs[rank]) < 0.06, (seed, rank)
    for rank, (_, mask, same_tensor, passed_sglangs) in got.items():
        assert mask == [int(a) for a in survivors], rank  # evidence in SGLang's own tensor
        assert same_tensor and passed_sglangs, rank  # written in place, never replaced


@pytest.mark.parametrize("mode", ["normal", "auto-extend"])
def test_normal_mode_returns_sglang_deepep_normal_and_matches_the_reference(tmp_path, mode):
    from sglang.srt.layers.dp_attention import set_is_extend_in_batch
    from sglang.srt.layers.moe.utils import DeepEPMode

    path = str(tmp_path / "ep.shm")
    create_shm_file(path, NUM_RANKS, 4, max(Buffer.get_ep_buffer_size_hint(M, HIDDEN, NUM_RANKS, NUM_EXPERTS),
                                            Buffer.get_prefill_buffer_size_hint(M, HIDDEN, TOP_K)))
    xs, ids, ws, weights = make_inputs(21)

    def step(rank):
        d = make_dispatcher(rank, Buffer(rank, NUM_RANKS, transport=SharedMemoryTransport(path, rank)), use_fp8=False)
        d.deepep_mode = DeepEPMode.NORMAL if mode == "normal" else DeepEPMode.AUTO
        set_is_extend_in_batch(mode == "auto-extend")  # per thread, as SGLang's forward thread sets it
        return run_normal_step(d, xs[rank], ids[rank], ws[rank], rank, weights)

    results = _on_every_rank(step)
    refs = reference_outputs(xs, ids, ws, weights, [True] * NUM_RANKS)
    for rank in range(NUM_RANKS):
        out, combined = results[rank]
        assert not normal_output_errors(out, combined, rank, xs, ids, ws, weights, [True] * NUM_RANKS, refs=refs)
