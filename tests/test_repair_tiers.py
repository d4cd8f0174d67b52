"""Repair of a layer built from real shards, restoring orphans through weights_tools' host and disk tiers."""

import json
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from test_weights_fixtures import HIDDEN, TOP_K, make_model, moe_layers, save  # noqa: E402

from eep.reference import ExpertParallelMoE  # noqa: E402
from eep.repair import RepairError  # noqa: E402
from weights_tools import DiskTier, HostTier, Manifest, load_layer_experts  # noqa: E402
from weights_tools import prepare as prepare_shards  # noqa: E402


@pytest.fixture(scope="module")
def qwen3(tmp_path_factory):
    root = tmp_path_factory.mktemp("qwen3")
    model = make_model("qwen3_moe", seed=5)
    ckpt = save(model, str(root / "ckpt"))
    shards = str(root / "shards")
    prepare_shards(ckpt, shards, quiet=True)
    return model, shards


def _corrupt_expert_shard(shards: str, layer: int, expert: int) -> None:
    """Flip one byte inside this layer's gate tensor of the expert's shard (a sha256 mismatch)."""
    entry = Manifest.load(shards).expert_entries(layer, expert)[0]
    path = os.path.join(shards, entry.file)
    data = bytearray(open(path, "rb").read())
    header_len = int.from_bytes(data[:8], "little")
    begin, end = json.loads(data[8:8 + header_len])[entry.key]["data_offsets"]
    data[8 + header_len + (begin + end) // 2] ^= 0xFF
    open(path, "wb").write(bytes(data))


def _layer(w, layer, tiers):
    # 8 experts on 4 ranks x 3 slots, no redundancy: a dead rank orphans its experts
    return ExpertParallelMoE(*w, num_ranks=4, slots_per_rank=3, top_k=TOP_K, num_redundant=0, tiers=tiers,
                             layer_id=layer)


def test_orphans_restore_from_disk_and_host_and_a_corrupt_shard_applies_nothing(qwen3, tmp_path):
    model, shards = qwen3
    layer = moe_layers(model)[0]
    block = model.model.layers[layer].mlp
    x = torch.randn(1, 20, HIDDEN, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = block(x)[0]
    logits = x[0] @ block.gate.weight.t()
    w = load_layer_experts(shards, layer)  # the serving copy, loaded while the shards are intact

    moe = _layer(w, layer, [DiskTier(shards)])
    orphans = moe.placement.experts_on_rank(0, 1)
    plan = moe.fail(1)
    assert {t.logical_expert_id for t in plan.restores} == set(orphans)
    assert set(moe.last_report.served_by) == {"disk"}
    torch.testing.assert_close(moe(x[0], logits), want, rtol=1e-5, atol=1e-5)

    # A corrupt shard, but a host copy holds that expert: the host (faster) serves it, the rest from disk.
    victim = orphans[0]
    host = HostTier(shards, path=str(tmp_path / "host.safetensors"), experts=[(layer, victim)])  # built while intact
    _corrupt_expert_shard(shards, layer, victim)
    moe = _layer(w, layer, [DiskTier(shards), host])
    plan = moe.fail(1)
    by_expert = {t.logical_expert_id: s for t, s in zip(plan.restores, moe.last_report.served_by)}
    assert by_expert[victim] == "host" and all(by_expert[e] == "disk" for e in orphans if e != victim)
    torch.testing.assert_close(moe(x[0], logits), want, rtol=1e-5, atol=1e-5)

    # Corrupt shard and no host copy: a clear error, and the layer is exactly as before.
    moe = _layer(w, layer, [DiskTier(shards)])
    before = (moe.placement.clone(), moe.membership.epoch)
    with pytest.raises(RepairError, match=f"layer {layer} expert {victim}"):
        moe.fail(1)
    assert moe.placement.equal(before[0]) and moe.membership.epoch == before[1]
    torch.testing.assert_close(moe(x[0], logits), want, rtol=1e-5, atol=1e-5)
    host.unlink()
