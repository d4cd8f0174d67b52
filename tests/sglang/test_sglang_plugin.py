"""The plugin through SGLang's own loader: entry point, allow-list, HookRegistry, and the hooks."""

import pytest
import torch

from sglang_case import HAS_SGLANG, HIDDEN, SKIP_REASON, StubGroup

if not HAS_SGLANG:
    pytest.skip(SKIP_REASON, allow_module_level=True)

import sglang.srt.plugins as sglang_plugins
from sglang.srt.elastic_ep import elastic_ep
from sglang.srt.eplb import expert_location
from sglang.srt.layers.moe.fused_moe_triton import layer as moe_layer
from sglang.srt.layers.moe.moe_runner import MoeRunnerConfig
from sglang.srt.layers.moe.utils import DeepEPMode, MoeA2ABackend
from sglang.srt.plugins import hook_registry
from sglang.srt.plugins.hook_registry import HookRegistry
from sglang.srt.runtime_context import get_flags

from eep import envs
from eep.integrations.buffer import Buffer
from eep.integrations.sglang import hooks
from eep.integrations.sglang.dispatcher import EepDispatcher
from eep.integrations.sglang.ep_buffer import EepEPBuffer
from eep.transport.shm import SharedMemoryTransport, create_shm_file

TARGETS = {hooks.CREATE_MOE_DISPATCHER: (moe_layer, "create_moe_dispatcher"),
           hooks.REFRESH_EP_MEMBERS: (elastic_ep, "_refresh_ep_members"),
           hooks.BROADCAST_EXPERT_LOCATION: (expert_location, "broadcast_global_expert_location_metadata"),
           hooks.REBALANCE_AFTER_RANK_FAULT: (elastic_ep, "maybe_rebalance_after_rank_fault")}


@pytest.fixture
def plugin_loaded(monkeypatch):
    """Run SGLang's real ``load_plugins`` with ``SGLANG_PLUGINS=eep``; undo every patch afterwards."""
    originals = {target: getattr(module, name) for target, (module, name) in TARGETS.items()}
    monkeypatch.setenv("SGLANG_PLUGINS", "eep")
    monkeypatch.setattr(sglang_plugins, "_plugins_loaded", False)
    HookRegistry.reset()
    flags = get_flags().moe
    saved_flags = (flags.a2a_backend, flags.deepep_mode, flags.tbo_enabled)
    sglang_plugins.load_plugins()
    yield
    for target, (module, name) in TARGETS.items():
        wrapped = getattr(module, name)
        setattr(module, name, originals[target])
        hook_registry._propagate_patch(wrapped, originals[target], module)
    HookRegistry.reset()
    flags.a2a_backend, flags.deepep_mode, flags.tbo_enabled = saved_flags
    EepEPBuffer.set_buffer(None)


def _config() -> MoeRunnerConfig:
    return MoeRunnerConfig(num_experts=8, num_local_experts=2, hidden_size=HIDDEN, top_k=2,
                           params_dtype=torch.bfloat16)


def _use_backend(monkeypatch, backend: MoeA2ABackend) -> None:
    flags = get_flags().moe
    flags.a2a_backend, flags.deepep_mode, flags.tbo_enabled = backend, DeepEPMode.LOW_LATENCY, False
    monkeypatch.setattr(moe_layer, "_get_deepep_comm_group", lambda backend: StubGroup(0, 4))


def test_entry_point_hooks_create_moe_dispatcher_to_return_the_eep_dispatcher(plugin_loaded, monkeypatch):
    for target in TARGETS:
        assert target in HookRegistry._patched, f"SGLang did not apply eep's hook on {target}"
    _use_backend(monkeypatch, MoeA2ABackend.MOONCAKE)
    dispatcher = moe_layer.create_moe_dispatcher(_config(), None)
    assert type(dispatcher) is EepDispatcher
    assert (dispatcher.num_experts, dispatcher.num_local_experts, dispatcher.hidden_size) == (8, 2, HIDDEN)
    assert dispatcher.router_topk == 2 and dispatcher.return_recv_hook and dispatcher.deepep_mode.is_low_latency()


def test_two_batch_overlap_is_refused_by_name(plugin_loaded, monkeypatch):
    _use_backend(monkeypatch, MoeA2ABackend.MOONCAKE)
    get_flags().moe.tbo_enabled = True
    with pytest.raises(NotImplementedError, match="two-batch overlap"):
        moe_layer.create_moe_dispatcher(_config(), quant_method=None)


def test_other_backends_and_an_empty_replace_list_keep_sglang_dispatchers(plugin_loaded, monkeypatch):
    _use_backend(monkeypatch, MoeA2ABackend.NONE)
    monkeypatch.setattr(moe_layer, "StandardDispatcher", lambda config: "standard")  # needs a published config
    assert moe_layer.create_moe_dispatcher(_config(), None) == "standard"
    monkeypatch.setenv(envs.SGLANG_REPLACE, "")
    _use_backend(monkeypatch, MoeA2ABackend.MOONCAKE)
    captured = {}
    monkeypatch.setattr(moe_layer, "MaybeTboDeepEPDispatcher", lambda **kw: captured.update(kw) or "sglang's")
    assert moe_layer.create_moe_dispatcher(_config(), None) == "sglang's"


def test_eep_dispatcher_binds_exactly_what_sglang_passes_its_mooncake_dispatcher(monkeypatch):
    """Run SGLang's real factory with the Mooncake backend; whatever it hands MooncakeEPDispatcher
    (through MaybeTboDeepEPDispatcher, which keeps ``runner_backend``) must bind to EepDispatcher."""
    import inspect

    _use_backend(monkeypatch, MoeA2ABackend.MOONCAKE)
    captured = {}
    monkeypatch.setattr(moe_layer, "MaybeTboDeepEPDispatcher", lambda **kw: captured.update(kw))
    moe_layer.create_moe_dispatcher(_config(), None)
    captured.pop("runner_backend")
    inspect.signature(EepDispatcher).bind(**captured)
    EepDispatcher(**captured)  # and constructs (the buffer is made lazily, at the first dispatch)


def test_member_refresh_hook_moves_the_buffer_to_a_new_epoch(plugin_loaded, tmp_path):
    path = str(tmp_path / "ep.shm")
    create_shm_file(path, 1, 4, 4096)
    buffer = Buffer(0, 1, transport=SharedMemoryTransport(path, 0))
    x, ids, active = torch.randn(1, 8).bfloat16(), torch.tensor([[0]]), torch.ones(1, dtype=torch.int32)
    _, _, handle, _, _ = buffer.dispatch(x, ids, active, 2, 2, 1_000_000, use_fp8=False)
    buffer.combine(torch.zeros(2, 2, 8, dtype=torch.bfloat16), ids, torch.ones(1, 1), active, 1_000_000, handle)
    assert (buffer.epoch, buffer.step) == (0, 2)  # one message each way in this epoch
    EepEPBuffer.set_buffer(buffer)
    elastic_ep._refresh_ep_members()  # what try_recover_ranks / join_process_groups call after a rejoin
    assert (buffer.epoch, buffer.step) == (1, 0)
    elastic_ep.join_scale_process_group.__globals__["_refresh_ep_members"]()  # the module's own binding
    assert buffer.epoch == 2


def test_member_refresh_names_the_ranks_sglang_is_recovering(plugin_loaded, tmp_path, monkeypatch):
    from sglang.srt.elastic_ep.elastic_ep import ElasticEPStateManager

    path = str(tmp_path / "ep.shm")
    create_shm_file(path, 4, 4, 4096)
    buffer = Buffer(1, 4, transport=SharedMemoryTransport(path, 1))
    EepEPBuffer.set_buffer(buffer)
    calls = []
    monkeypatch.setattr(buffer, "update_ep_member", lambda **kw: calls.append(kw))
    state = ElasticEPStateManager._build_state(ep_size=4, device=torch.device("cpu"))
    state.effective_ep_size = 4
    state.active_ranks[2] = 0  # a survivor's view: rank 2 died and is being recovered
    monkeypatch.setattr(ElasticEPStateManager, "_instance", state)
    elastic_ep._refresh_ep_members()
    assert calls == [{"epoch": 1, "joined": [2]}]
    state.active_ranks.zero_()
    state.active_ranks[1] = 1  # a rejoiner's view (SGLang's _init_joiner_state): only itself
    elastic_ep._refresh_ep_members()
    assert calls[-1]["joined"] == [0, 2, 3]


@pytest.mark.slow
def test_gpu_scenario_over_the_shared_memory_backend(tmp_path):
    """tests/gpu/sglang_gpu.py with --device cpu: the plugin builds its buffers through SGLang's store on
    SGLang's mask, four rank processes match eep.reference, a SIGKILL is cleared in SGLang's
    active_ranks, a new process rejoins through SGLang's member refresh (one epoch, the rank mapped)."""
    import os
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    proc = subprocess.run([sys.executable, os.path.join(root, "tests", "gpu", "sglang_gpu.py"), "--device", "cpu",
                           "--hidden", "256", "--out", str(tmp_path), "--timeout-s", "200"],
                          capture_output=True, text=True, timeout=260, env={**os.environ, "EEP_SHM_DIR": str(tmp_path)})
    summary = [line for line in proc.stdout.splitlines() if line.startswith("SCENARIO")]
    assert proc.returncode == 0 and summary and "PASS" in summary[0], proc.stdout[-6000:] + proc.stderr[-3000:]
