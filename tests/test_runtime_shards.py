"""The runtime serving experts restored from ``eep-shards prepare`` output (host tier, then disk)."""

import os

import pytest
import torch

from eep.cli.answers import check_run
from eep.runtime import Fault, Launcher, RuntimeConfig, TinyConfig
from eep.runtime.model import generate_weights, rank_tiers

pytest.importorskip("transformers")
from test_weights_fixtures import make_model, model_expert, save  # noqa: E402
from weights_tools import prepare  # noqa: E402
from weights_tools.manifest import Manifest  # noqa: E402
from weights_tools.tiers import host_tier_path  # noqa: E402


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpt")
    model = make_model("mixtral", seed=5)
    prepare(save(model, str(root / "hf")), str(root / "shards"), quiet=True)
    shard_dir = str(root / "shards")
    yield model, shard_dir
    path = host_tier_path(Manifest.load(shard_dir))
    for leftover in (path, path + ".lock"):  # the host tier lives in /dev/shm and outlives processes
        try:
            os.unlink(leftover)
        except OSError:
            pass


def test_rank_tiers_read_the_checkpoint_experts_in_model_layer_numbering(shards):
    model, shard_dir = shards
    config = TinyConfig(num_experts=8, top_k=2)
    weights = generate_weights(config, shard_dir=shard_dir)
    tiers = rank_tiers(weights, shard_dir)
    assert [t.name for t in tiers] == ["host", "disk"]
    for tier in tiers:
        for layer, expert in [(0, 3), (1, 7)]:
            got = [torch.full_like(w[layer, expert], float("nan")) for w in (weights.w_gate, weights.w_up,
                                                                               weights.w_down)]
            assert tier.has_expert(layer, expert)
            tier.copy_expert_into(layer, expert, *got)  # float32 destinations of bf16 shards
            for g, want, from_weights in zip(got, model_expert(model, layer, expert),
                                             (weights.w_gate, weights.w_up, weights.w_down)):
                torch.testing.assert_close(g, want.float(), rtol=0, atol=0)
                torch.testing.assert_close(from_weights[layer, expert], want.float(), rtol=0, atol=0)
        assert not tier.has_expert(config.num_layers, 0)
        tier.close()
    with pytest.raises(ValueError, match="model config needs"):
        generate_weights(TinyConfig(num_experts=16), shard_dir=shard_dir)


def test_runtime_serves_shard_experts_through_a_sigkill(shards, tmp_path):
    _, shard_dir = shards
    cfg = RuntimeConfig(num_ranks=3, slots_per_rank=5, num_redundant=4, model=TinyConfig(num_experts=8, top_k=2),
                        shard_dir=shard_dir, num_requests=150, heartbeat_interval_s=0.05, suspect_misses=5,
                        transport_timeout_s=0.5, restart_after_s=0.2)
    result = Launcher(cfg, run_dir=tmp_path, faults=[Fault("kill", 1, at_results=30)]).run(timeout_s=40)
    assert not result.is_timed_out
    assert not check_run(cfg, result)
    assert any(1 in d["failed"] for d in result.decisions if d["kind"] == "commit")
