"""Block-scaled FP8 experts end to end on CPU: a tiny DeepSeek-V3 checkpoint written from a real
``transformers`` model (quantised 128x128 by the test) through prepare, verify, load, the reference
EP layer with a failure and a rejoin, and every way such a checkpoint can be wrong."""

from __future__ import annotations

import json
import os
import shutil
import sys

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from eep.fp8 import Fp8Weight
from eep.reference import ExpertParallelMoE, dense_moe
from weights_tools import (CheckpointError, CorruptShardError, DiskTier, ExpertStore, HostTier, Manifest,
                           inspect_checkpoint, load_layer_experts, prepare, verify_shards)
from weights_tools.cli import main as cli_main
from weights_tools.manifest import FP8_QUANTIZATION, FORMAT_VERSION_FP8
from weights_tools.safetensors_io import read_header

pytest.importorskip("transformers", minversion="5.0")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from test_weights_fixtures import (FP8_LAYOUTS, NUM_EXPERTS, TOP_K, make_model,  # noqa: E402
                                   routed_tokens, save_fp8)

# hidden 320 = 2.5 blocks of 128: every weight has a partial block on its hidden side
HIDDEN, INTER = 320, 128
LAYOUT_NAME = {"hub": "per_expert", "transformers": "per_expert", "transformers_fused": "fused_gate_up"}


@pytest.fixture(scope="module")
def model():
    return make_model("deepseek_v3", seed=5, hidden=HIDDEN, inter=INTER)


@pytest.fixture(scope="module")
def built(model, tmp_path_factory):
    """layout -> (checkpoint dir, shard dir)."""
    root = tmp_path_factory.mktemp("fp8")
    out = {}
    for layout in FP8_LAYOUTS:
        ckpt = save_fp8(model, str(root / f"ckpt-{layout}"), layout)
        shards = str(root / f"shards-{layout}")
        prepare(ckpt, shards, quiet=True)
        out[layout] = (ckpt, shards)
    return out


def _source_fp8(ckpt: str, layer: int, expert: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``[(weight, scale)]`` for gate, up, down of one expert, read from the checkpoint with safetensors."""
    tensors = {}
    with safe_open(os.path.join(ckpt, "model.safetensors"), "pt") as f:
        for key in f.keys():
            tensors[key] = f.get_tensor(key)
    prefix = f"model.layers.{layer}.mlp.experts."
    if prefix + "gate_up_proj" in tensors:  # fused [E, 2I, H] with its [E, 2I/128, H/128] scales
        gu, gu_s = tensors[prefix + "gate_up_proj"][expert], tensors[prefix + "gate_up_proj_scale_inv"][expert]
        half = gu_s.shape[0] // 2
        return [(gu[:INTER], gu_s[:half]), (gu[INTER:], gu_s[half:]),
                (tensors[prefix + "down_proj"][expert], tensors[prefix + "down_proj_scale_inv"][expert])]
    out = []
    for i, proj in enumerate(("gate_proj", "up_proj", "down_proj")):
        weight = tensors[f"{prefix}{expert}.{proj}.weight"]
        scale = tensors.get(f"{prefix}{expert}.{proj}.weight_scale_inv")
        if scale is None:  # transformers' default save: per-expert weights, stacked scales
            stacked = tensors[prefix + ("gate_up_proj" if i < 2 else "down_proj") + "_scale_inv"][expert]
            half = stacked.shape[0] // 2
            scale = stacked if i == 2 else (stacked[:half] if i == 0 else stacked[half:])
        out.append((weight, scale))
    return out


def _bytes(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.uint8)


@pytest.mark.parametrize("layout", FP8_LAYOUTS)
def test_fp8_checkpoint_prepare_verify_load(built, layout):
    ckpt, shards = built[layout]
    manifest = Manifest.load(shards)
    assert manifest.architecture["layout"] == LAYOUT_NAME[layout]
    assert manifest.quantization == FP8_QUANTIZATION and manifest.architecture["dtype"] == "F8_E4M3"
    assert json.load(open(os.path.join(shards, "manifest.json")))["format_version"] == FORMAT_VERSION_FP8
    assert verify_shards(shards) == []
    one = manifest.expert_nbytes(1, 0)
    assert one == 3 * HIDDEN * INTER + 3 * 3 * 4  # FP8 weights + three [1, 3] / [3, 1] float32 scale grids
    from transformers.integrations.finegrained_fp8 import _dequantize_fp8_weight
    for layer in (1, 2):
        stacks = load_layer_experts(shards, layer)
        floats = load_layer_experts(shards, layer, dequantize=True)
        for expert in range(NUM_EXPERTS):
            for w, f, (src_w, src_s) in zip(stacks, floats, _source_fp8(ckpt, layer, expert)):
                assert isinstance(w, Fp8Weight) and w.weight.dtype == torch.float8_e4m3fn
                assert torch.equal(_bytes(w.weight[expert]), _bytes(src_w)), "FP8 weights bit for bit"
                assert torch.equal(w.scale[expert], src_s), "block scales bit for bit"
                # transformers' own block dequantisation is the independent oracle of weight * scale
                want = _dequantize_fp8_weight(src_w.clone(), src_s, [128, 128], torch.float32)
                assert f.dtype == torch.float32 and torch.equal(f[expert], want)


def test_non_expert_fp8_tensors_and_scales_are_copied(built):
    ckpt, shards = built["transformers"]  # transformers made every linear FP8, shared experts included
    non_expert = load_file(os.path.join(shards, "non_expert.safetensors"))
    source = load_file(os.path.join(ckpt, "model.safetensors"))
    key = "model.layers.1.mlp.shared_experts.gate_proj.weight"
    assert non_expert[key].dtype == torch.float8_e4m3fn
    assert torch.equal(_bytes(non_expert[key]), _bytes(source[key]))
    assert torch.equal(non_expert[key + "_scale_inv"], source[key + "_scale_inv"])


def test_fp8_reference_through_failure_and_rejoin(model, built, tmp_path):
    """The FP8 EP layer built from the shards, restoring from the shard tiers: equal to the dense FP8
    oracle before a failure, after it (orphans restored with their scales) and after the rejoin; and
    within FP8 activation quantisation of the model's own experts run on the dequantised weights."""
    _, shards = built["hub"]
    manifest = Manifest.load(shards)
    gen = torch.Generator().manual_seed(6)
    for layer, block, x, topk_weights, topk_ids in routed_tokens(model, 24, gen):
        weights = load_layer_experts(shards, layer)
        want = dense_moe(x, *weights, topk_ids=topk_ids, topk_weights=topk_weights.float())
        host = HostTier(shards, path=str(tmp_path / f"host-{layer}.safetensors"), experts=[(layer, 0), (layer, 1)])
        ep = ExpertParallelMoE(*weights, num_ranks=4, slots_per_rank=3, top_k=TOP_K, layer_id=layer,
                               tiers=[host, DiskTier(shards)], num_redundant=0)
        route = dict(topk_ids=topk_ids, topk_weights=topk_weights.float())
        assert torch.equal(ep(x, **route), want)
        plan = ep.fail(1)
        assert plan.restores, "rank 1's experts had no other replica: they come from the tiers"
        for t in plan.restores:
            assert t.nbytes == manifest.expert_nbytes(layer, t.logical_expert_id)
        assert set(ep.last_report.served_by) <= {"host", "disk"}
        assert ep.validity()
        assert torch.equal(ep(x, **route), want)
        ep.join(1)
        assert torch.equal(ep(x, **route), want)
        host.unlink()

        # the model's routed experts on the dequantised weights: what FP8 activations cost
        with torch.no_grad():
            dequantised = [w.dequantize() for w in weights]
            experts = block.experts
            experts.gate_up_proj.copy_(torch.cat(dequantised[:2], dim=1))
            experts.down_proj.copy_(dequantised[2])
            exact = experts(x, topk_ids, topk_weights)
        err = float((want.double() - exact.double()).norm() / exact.double().norm())
        assert 1e-3 < err < 5e-2, f"FP8 activations moved the output by {err:.3e}"


def test_fp8_tiers_move_weights_and_scales_together(built, tmp_path):
    _, shards = built["transformers_fused"]
    store = ExpertStore(shards, tiers=[HostTier(shards, path=str(tmp_path / "host.safetensors")), "disk"])
    assert store.is_fp8 and store.dtype == torch.float8_e4m3fn
    got = store.load_expert(2, 5)
    record = store.records[-1]
    assert record.tier == "host" and record.nbytes == store.manifest.expert_nbytes(2, 5)
    ref = load_layer_experts(shards, 2)
    for w, r in zip(got, ref):
        assert torch.equal(_bytes(w.weight), _bytes(r.weight[5])) and torch.equal(w.scale, r.scale[5])
    with pytest.raises(ValueError, match="need an Fp8Weight"):
        store.load_expert_into(2, 5, torch.empty(INTER, HIDDEN), torch.empty(INTER, HIDDEN), torch.empty(HIDDEN, INTER))
    bad_scale = Fp8Weight(got[0].weight.clone(), torch.empty(2, 3))
    with pytest.raises(ValueError, match=r"w_gate_dst.scale is \[2, 3\]"):
        store.load_expert_into(2, 5, bad_scale, got[1], got[2])
    store.close()
    store.tiers[0].unlink()


def test_corrupt_scale_fails_its_checksum_and_the_next_tier_serves(built, tmp_path):
    _, source = built["hub"]
    shards = str(tmp_path / "shards")
    shutil.copytree(source, shards)
    host = HostTier(shards, path=str(tmp_path / "host.safetensors"))  # built from the good shards
    path = os.path.join(shards, "experts/expert-00004.safetensors")
    entry = read_header(path)[0]["layers.2.w_down_scale_inv"]
    with open(path, "r+b") as f:  # double the second scale in place: same header, only the checksum can tell
        f.seek(entry.begin + 4)
        value = torch.frombuffer(bytearray(f.read(4)), dtype=torch.float32) * 2
        f.seek(entry.begin + 4)
        f.write(value.numpy().tobytes())
    assert [p.tensor for p in verify_shards(shards)] == ["layers.2.w_down_scale_inv"]
    assert cli_main(["verify", shards]) == 1
    with pytest.raises(CorruptShardError, match="w_down_scale_inv.*checksum"):
        DiskTier(shards).copy_expert_into(2, 4, *ExpertStore(shards).empty_expert())
    store = ExpertStore(shards, tiers=[DiskTier(shards), host])
    got = store.load_expert(2, 4)
    assert [r.tier for r in store.records] == ["disk", "host"] and not store.records[0].is_ok
    pristine = load_file(os.path.join(source, "experts/expert-00004.safetensors"))["layers.2.w_down_scale_inv"]
    assert torch.equal(got[2].scale, pristine)
    host.unlink()


def test_inspect_reports_the_quantisation(built, capsys):
    _, shards = built["hub"]
    assert cli_main(["inspect", shards]) == 0
    out = capsys.readouterr().out
    assert "fp8 e4m3, 128x128 block scales (F32), dynamic activations" in out
    assert "gate_scale" in out and "dtype F8_E4M3" in out
    assert cli_main(["inspect", shards, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["architecture"]["quantization"] == FP8_QUANTIZATION


# ---- checkpoints that must be refused, naming the tensor and the setting ----
@pytest.fixture
def hub_ckpt(built, tmp_path):
    dst = str(tmp_path / "ckpt")
    shutil.copytree(built["hub"][0], dst)
    return dst


def _edit(ckpt: str, *, tensors=None, config=None) -> None:
    if tensors is not None:
        path = os.path.join(ckpt, "model.safetensors")
        loaded = load_file(path)
        tensors(loaded)
        save_file(loaded, path)
    if config is not None:
        path = os.path.join(ckpt, "config.json")
        doc = json.load(open(path))
        config(doc)
        json.dump(doc, open(path, "w"))


GATE = "model.layers.1.mlp.experts.3.gate_proj.weight"


@pytest.mark.parametrize("case, match, tensor", [
    ("scale_shape", r"block scale '.*experts\.3\.gate_proj\.weight_scale_inv' has shape \[2, 3\].*expects \[1, 3\]",
     GATE + "_scale_inv"),
    ("scale_missing", r"FP8 expert tensor '.*experts\.3\.gate_proj\.weight' has no block scale", GATE),
    ("scale_dtype", r"block scale .* is BF16, expected F32", GATE + "_scale_inv"),
    ("method", r"quant_method='fbgemm_fp8' is not supported \(expert tensor 'model\.layers\.1\.mlp\.experts", None),
    ("block_size", r"weight_block_size=\[64, 64\] is not supported", None),
    ("fmt", r"quantization_config\.fmt='e5m2' is not supported", None),
    ("scale_fmt", r"quantization_config\.scale_fmt='ue8m0' is not supported", None),
    ("no_config", r"is F8_E4M3 but config.json has no quantization_config", None),
    ("activation_scales", r"unsupported expert tensors .*input_scale", GATE[:-len("weight")] + "input_scale"),
])
def test_bad_fp8_checkpoints_are_refused(hub_ckpt, tmp_path, case, match, tensor):
    if case == "scale_shape":
        _edit(hub_ckpt, tensors=lambda t: t.update({GATE + "_scale_inv": torch.ones(2, 3)}))
    elif case == "scale_missing":
        _edit(hub_ckpt, tensors=lambda t: t.pop(GATE + "_scale_inv"))
    elif case == "scale_dtype":
        _edit(hub_ckpt, tensors=lambda t: t.update({GATE + "_scale_inv": t[GATE + "_scale_inv"].bfloat16()}))
    elif case == "method":
        _edit(hub_ckpt, config=lambda c: c["quantization_config"].update(quant_method="fbgemm_fp8"))
    elif case == "block_size":
        _edit(hub_ckpt, config=lambda c: c["quantization_config"].update(weight_block_size=[64, 64]))
    elif case == "fmt":
        _edit(hub_ckpt, config=lambda c: c["quantization_config"].update(fmt="e5m2"))
    elif case == "scale_fmt":
        _edit(hub_ckpt, config=lambda c: c["quantization_config"].update(scale_fmt="ue8m0"))
    elif case == "no_config":
        _edit(hub_ckpt, config=lambda c: c.pop("quantization_config"))
    elif case == "activation_scales":
        _edit(hub_ckpt, tensors=lambda t: t.update({tensor: torch.ones(1)}))
    with pytest.raises(CheckpointError, match=match) as info:
        prepare(hub_ckpt, str(tmp_path / "out"), quiet=True)
    assert info.value.tensor is not None and (tensor is None or info.value.tensor == tensor)
    assert not os.path.exists(tmp_path / "out" / "manifest.json")


def test_scales_beside_unquantised_experts_are_refused(tmp_path):
    ckpt = str(tmp_path / "ckpt")
    model = make_model("deepseek_v3", seed=2, hidden=HIDDEN, inter=INTER)
    model.save_pretrained(ckpt)
    _edit(ckpt, tensors=lambda t: t.update({GATE + "_scale_inv": torch.ones(1, 3)}))
    with pytest.raises(CheckpointError, match="is a block scale, but the routed experts are F32") as info:
        inspect_checkpoint(ckpt)
    assert info.value.tensor == GATE + "_scale_inv"


def test_fused_fp8_gate_up_sharing_scale_blocks_is_refused(tmp_path):
    """transformers' fused layout with an intermediate size off the 128 grid: one scale block spans the
    end of the gate rows and the start of the up rows, so no per-projection scale exists."""
    model = make_model("deepseek_v3", seed=3, hidden=256, inter=192)
    ckpt = save_fp8(model, str(tmp_path / "ckpt"), "transformers_fused")
    with pytest.raises(CheckpointError, match="gate_up_proj_scale_inv.*share scale blocks") as info:
        inspect_checkpoint(ckpt)
    assert info.value.tensor.endswith("experts.gate_up_proj_scale_inv")


def test_fp8_manifest_fields_are_checked(built, tmp_path):
    _, source = built["hub"]
    shards = str(tmp_path / "shards")
    shutil.copytree(source, shards)
    path = os.path.join(shards, "manifest.json")
    pristine = open(path).read()
    for edit, match in [
        (lambda d: d["architecture"].update(dtype="BF16"), "architecture.dtype='BF16'"),
        (lambda d: d["architecture"]["quantization"].update(weight_block_size=[64, 64]), "architecture.quantization"),
        (lambda d: d["architecture"].update(quantization=None), "format_version 2 does not match"),
        (lambda d: d.update(tensors=[t for t in d["tensors"] if t["key"] != "layers.1.w_up_scale_inv"]),
         "without its block scales|without scale role"),
    ]:
        doc = json.loads(pristine)
        edit(doc)
        open(path, "w").write(json.dumps(doc))
        with pytest.raises(Exception, match=match):
            Manifest.load(shards)
        assert verify_shards(shards) and cli_main(["verify", shards]) == 1
