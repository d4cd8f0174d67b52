"""weights_tools on real (tiny) transformers checkpoints: layouts, bit-exact round trip, MoE-block parity."""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from eep.reference import ExpertParallelMoE
from eep.repair import ExpertSource
from weights_tools import (DiskTier, ExpertStore, HostTier, Manifest, inspect_checkpoint, load_layer_experts,
                           prepare, verify_shards)
from weights_tools.cli import main as cli_main

# transformers >= 5 keeps experts fused in memory (gate_up_proj); the fixtures read them that way.
pytest.importorskip("transformers", minversion="5.0")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # the shared fixtures module beside this file
from test_weights_fixtures import (HIDDEN, INTER, NUM_EXPERTS, TOP_K, make_model, model_expert,  # noqa: E402
                                   moe_layers, routed_tokens, save)

# variant -> (architecture, how the checkpoint is written, expected layout)
VARIANTS = {
    "mixtral-sharded": ("mixtral", "sharded", "per_expert"),
    "qwen3_moe": ("qwen3_moe", "default", "per_expert"),
    "qwen3_moe-bf16": ("qwen3_moe", "bf16", "per_expert"),
    "qwen3_moe-fused": ("qwen3_moe", "fused", "fused_gate_up"),
    "qwen3_moe-fused-transposed": ("qwen3_moe", "fused_transposed", "fused_gate_up_transposed"),
    "qwen3_moe-stacked": ("qwen3_moe", "stacked", "stacked"),
    "qwen2_moe": ("qwen2_moe", "default", "per_expert"),
    "deepseek_v3": ("deepseek_v3", "default", "per_expert"),
}


def _rewrite_stacked(ckpt: str, *, transpose: bool, split: bool) -> None:
    """Turn a fused ``save_original_format=False`` file into the transposed or split-stacked layout."""
    path = os.path.join(ckpt, "model.safetensors")
    tensors = load_file(path)
    for key in [k for k in tensors if k.endswith("experts.gate_up_proj")]:
        gate_up = tensors.pop(key)  # [E, 2I, H]
        down_key = key.replace("gate_up_proj", "down_proj")
        if split:
            gate, up = gate_up.chunk(2, dim=1)
            tensors[key.replace("gate_up_proj", "gate_proj")] = gate.contiguous()
            tensors[key.replace("gate_up_proj", "up_proj")] = up.contiguous()
        elif transpose:  # Llama-4 style x @ W: [E, H, 2I] and [E, I, H]
            tensors[key] = gate_up.transpose(1, 2).contiguous()
            tensors[down_key] = tensors[down_key].transpose(1, 2).contiguous()
        else:
            tensors[key] = gate_up
    save_file(tensors, path, metadata={"format": "pt"})


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """{variant: (model, checkpoint dir, shard dir)}, each prepared once per session."""
    root = tmp_path_factory.mktemp("weights")
    models = {arch: make_model(arch, seed=i) for i, arch in enumerate(sorted({a for a, _, _ in VARIANTS.values()}))}
    out = {}
    for variant, (arch, how, _) in VARIANTS.items():
        model = models[arch]
        ckpt = str(root / f"ckpt-{variant}")
        if how == "sharded":
            save(model, ckpt, max_shard_size="40KB")
        elif how == "bf16":
            model = make_model(arch, seed=7).to(torch.bfloat16)
            save(model, ckpt)
        elif how in ("fused", "fused_transposed", "stacked"):
            save(model, ckpt, save_original_format=False)
            _rewrite_stacked(ckpt, transpose=how == "fused_transposed", split=how == "stacked")
        else:
            save(model, ckpt)
        shards = str(root / f"shards-{variant}")
        prepare(ckpt, shards, quiet=True)
        out[variant] = (model, ckpt, shards)
    return out


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_layout_detected_and_verified(built, variant):
    model, ckpt, shards = built[variant]
    manifest = Manifest.load(shards)
    assert manifest.architecture["layout"] == VARIANTS[variant][2]
    assert manifest.moe_layers == moe_layers(model)
    assert (manifest.num_experts, manifest.hidden_size, manifest.intermediate_size) == (NUM_EXPERTS, HIDDEN, INTER)
    assert verify_shards(shards) == []
    if variant == "mixtral-sharded":
        assert len(inspect_checkpoint(ckpt).source_files) > 2  # really a multi-file checkpoint
    assert len(os.listdir(os.path.join(shards, "experts"))) == NUM_EXPERTS


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_experts_equal_model_parameters_bit_for_bit(built, variant):
    model, _, shards = built[variant]
    store = ExpertStore(shards)
    for layer in moe_layers(model):
        stacked = load_layer_experts(shards, layer)
        for expert in range(NUM_EXPERTS):
            want = model_expert(model, layer, expert)
            got = store.load_expert(layer, expert)
            for name, w, g, s in zip(("gate", "up", "down"), want, got, stacked):
                assert g.dtype == w.dtype and torch.equal(g, w), f"{variant} layer {layer} expert {expert} {name}"
                assert torch.equal(s[expert], w)
    assert all(r.tier == "disk" and r.is_ok for r in store.records)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_non_expert_tensors_are_copied_exactly(built, variant):
    _, ckpt, shards = built[variant]
    layout = inspect_checkpoint(ckpt)
    non_expert = load_file(os.path.join(shards, "non_expert.safetensors"))
    assert sorted(non_expert) == sorted(e.key for _, e in layout.non_expert)
    assert not any(".experts." in k for k in non_expert)
    for name, entry in layout.non_expert:
        with safe_open(os.path.join(ckpt, name), "pt") as f:
            assert torch.equal(f.get_tensor(entry.key), non_expert[entry.key]), entry.key


def _router_weight(shards: str, layer: int) -> torch.Tensor:
    key = Manifest.load(shards).architecture["router_keys"][str(layer)]
    with safe_open(os.path.join(shards, "non_expert.safetensors"), "pt") as f:
        return f.get_tensor(key)


@pytest.mark.parametrize("variant", ["mixtral-sharded", "qwen3_moe", "qwen3_moe-fused-transposed"])
def test_softmax_moe_block_agrees_with_expert_parallel_moe(built, variant):
    """The model's own sparse MoE block vs eep's EP layer built from the shards (and after a failure)."""
    model, _, shards = built[variant]
    renormalize = Manifest.load(shards).architecture["norm_topk_prob"]
    assert renormalize is True
    gen = torch.Generator().manual_seed(3)
    for layer in moe_layers(model):
        block = model.model.layers[layer].mlp
        x = torch.randn(1, 24, HIDDEN, generator=gen)
        with torch.no_grad():
            want = block(x)[0]
        ep = ExpertParallelMoE(*load_layer_experts(shards, layer), num_ranks=4, slots_per_rank=3, top_k=TOP_K,
                               renormalize=renormalize)
        logits = x[0] @ _router_weight(shards, layer).t()
        torch.testing.assert_close(ep(x[0], logits), want, rtol=1e-5, atol=1e-5)
        ep.fail(2)
        torch.testing.assert_close(ep(x[0], logits), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("variant", ["qwen2_moe", "deepseek_v3"])
def test_routed_experts_agree_given_the_models_own_routing(built, variant):
    """Qwen2-MoE adds a gated shared expert and DeepSeek-V3 routes by sigmoid groups: feed eep their top-k."""
    model, _, shards = built[variant]
    gen = torch.Generator().manual_seed(4)
    for layer, block, x, topk_weights, topk_ids in routed_tokens(model, 20, gen):
        with torch.no_grad():
            want = block.experts(x, topk_ids, topk_weights)
        ep = ExpertParallelMoE(*load_layer_experts(shards, layer), num_ranks=2, slots_per_rank=5, top_k=TOP_K)
        got = ep(x, topk_ids=topk_ids, topk_weights=topk_weights.float())
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    if variant == "deepseek_v3":
        non_expert = load_file(os.path.join(shards, "non_expert.safetensors"))
        assert "model.layers.0.mlp.gate_proj.weight" in non_expert  # first dense layer stays non-expert
        assert "model.layers.1.mlp.shared_experts.gate_proj.weight" in non_expert
        assert "model.layers.1.mlp.gate.e_score_correction_bias" in non_expert


def test_prepare_is_idempotent_and_deterministic(built, tmp_path):
    _, ckpt, _ = built["qwen3_moe"]
    out = str(tmp_path / "shards")
    first = prepare(ckpt, out, quiet=True)
    assert not first.is_up_to_date
    stamps = {n: os.stat(os.path.join(out, "experts", n)).st_mtime_ns for n in os.listdir(os.path.join(out, "experts"))}
    manifest_bytes = open(os.path.join(out, "manifest.json"), "rb").read()
    again = prepare(ckpt, out, quiet=True)
    assert again.is_up_to_date and again.nbytes_written == 0
    assert stamps == {n: os.stat(os.path.join(out, "experts", n)).st_mtime_ns for n in stamps}
    forced = prepare(ckpt, out, quiet=True, force=True)
    assert not forced.is_up_to_date
    assert open(os.path.join(out, "manifest.json"), "rb").read() == manifest_bytes
    assert not [n for root, _, names in os.walk(out) for n in names if ".tmp-" in n]
    # A damaged output is noticed by the size check and rewritten on the next run.
    with open(os.path.join(out, "experts", "expert-00001.safetensors"), "r+b") as f:
        f.truncate(100)
    assert not prepare(ckpt, out, quiet=True).is_up_to_date
    assert verify_shards(out) == []


def test_prepare_removes_experts_of_a_previous_checkpoint(built, tmp_path):
    out = str(tmp_path / "shards")
    prepare(built["qwen3_moe"][1], out, quiet=True)
    stale = os.path.join(out, "experts", f"expert-{NUM_EXPERTS + 3:05d}.safetensors")
    open(stale, "wb").write(b"old")
    prepare(built["mixtral-sharded"][1], out, quiet=True)
    assert not os.path.exists(stale)
    assert Manifest.load(out).architecture["model_type"] == "mixtral"


def test_cli_prepare_verify_inspect(built, tmp_path, capsys):
    _, ckpt, _ = built["deepseek_v3"]
    out = str(tmp_path / "cli")
    assert cli_main(["prepare", ckpt, out, "--quiet"]) == 0
    captured = capsys.readouterr()
    assert captured.err == "" and "8 experts x 2 MoE layers" in captured.out
    assert cli_main(["prepare", ckpt, out, "--force"]) == 0
    assert "100.0%" in capsys.readouterr().err  # progress bar on stderr
    assert cli_main(["verify", out]) == 0
    assert "OK" in capsys.readouterr().out
    assert cli_main(["inspect", out]) == 0
    text = capsys.readouterr().out
    assert "deepseek_v3" in text and "MoE layers   2: [1, 2]" in text
    assert cli_main(["inspect", out, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["architecture"]["num_experts"] == NUM_EXPERTS


def test_console_script_entry_point(built, tmp_path):
    _, _, shards = built["qwen3_moe"]
    res = subprocess.run([sys.executable, "-m", "weights_tools.cli", "verify", shards], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr


def test_tiers_follow_the_protocol(built, tmp_path):
    _, _, shards = built["qwen3_moe"]
    host = HostTier(shards, path=str(tmp_path / "host.safetensors"))
    assert isinstance(host, ExpertSource) and isinstance(DiskTier(shards), ExpertSource)
    assert host.name == "host" and DiskTier(shards).name == "disk"
    assert host.has_expert(1, 3) and not host.has_expert(5, 0)
    store = ExpertStore(shards, tiers=[host, "disk"])
    dst = [torch.randn(s) for s in store.expert_shapes()]
    record = store.load_expert_into(1, 3, *dst)
    assert (record.tier, record.layer, record.expert, record.is_ok) == ("host", 1, 3, True)
    assert record.nbytes == 3 * INTER * HIDDEN * 4 and record.seconds >= 0
    for d, w in zip(dst, model_expert(built["qwen3_moe"][0], 1, 3)):
        assert torch.equal(d, w)
    host.close()


def test_host_tier_is_shared_across_processes(built, tmp_path):
    """A second process attaches to the same shared-memory file (create=False) and reads identical bytes."""
    _, _, shards = built["mixtral-sharded"]
    host = HostTier(shards, experts=[(0, 1), (1, 6)])  # default location: /dev/shm (RAM-backed)
    try:
        assert host.path.startswith(("/dev/shm", "/tmp")) and os.path.exists(host.path)
        code = (f"import torch, hashlib; from weights_tools import HostTier; "
                f"h = HostTier({shards!r}, create=False); "
                f"print(h.path, h.has_expert(0, 1), h.has_expert(0, 2), "
                f"hashlib.sha256(torch.cat([v.flatten() for v in h.expert_views(1, 6)]).numpy().tobytes()).hexdigest())")
        res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                             cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        path, has_1, has_2, digest = res.stdout.split()
        import hashlib
        mine = hashlib.sha256(torch.cat([v.flatten() for v in host.expert_views(1, 6)]).numpy().tobytes()).hexdigest()
        assert (path, has_1, has_2, digest) == (host.path, "True", "False", mine)
        # A later rank asking for more experts extends the node's copy instead of dropping the others.
        bigger = HostTier(shards, experts=[(0, 2)])
        assert bigger.has_expert(0, 1) and bigger.has_expert(0, 2) and bigger.has_expert(1, 6)
        bigger.close()
    finally:
        host.close()
        host.unlink()
    assert not os.path.exists(host.path)


@pytest.mark.gpu
def test_pinned_host_tier_copies_to_gpu_on_a_stream(built, tmp_path):
    model, _, shards = built["qwen3_moe"]
    # The host tier lives in tmpfs in production (/dev/shm): pages of a file on some disk filesystems
    # cannot be page-locked (cudaHostRegister returned 1 for /tmp on an H200 machine; the tier then
    # falls back to pageable copies, which this test is not about).
    shm = "/dev/shm" if os.access("/dev/shm", os.W_OK) else str(tmp_path)
    host = HostTier(shards, path=os.path.join(shm, f"eep-test-host-{os.getpid()}.safetensors"))
    try:
        assert host.is_pinned
        store = ExpertStore(shards, tiers=[host, "disk"])
        stream = torch.cuda.Stream()
        dst = [torch.empty(s, device="cuda") for s in store.expert_shapes()]
        record = store.load_expert_into(1, 2, *dst, stream=stream)
        stream.synchronize()
        assert record.tier == "host"
        for d, w in zip(dst, model_expert(model, 1, 2)):
            assert torch.equal(d.cpu(), w)
    finally:
        host.close()
        host.unlink()


def test_crash_mid_prepare_leaves_no_manifest_and_no_temp_files(built, tmp_path, monkeypatch):
    prep = importlib.import_module("weights_tools.prepare")  # the package attribute `prepare` is the function

    _, ckpt, _ = built["qwen2_moe"]
    out = str(tmp_path / "shards")
    prepare(built["qwen3_moe"][1], out, quiet=True)  # an older, complete set of another checkpoint
    calls = {"n": 0}
    real_read = prep._SourceReader.read

    def failing_read(self, src):
        calls["n"] += 1
        if calls["n"] == 20:
            raise OSError("simulated I/O error")
        return real_read(self, src)

    monkeypatch.setattr(prep._SourceReader, "read", failing_read)
    with pytest.raises(OSError, match="simulated"):
        prepare(ckpt, out, quiet=True, num_workers=1)
    assert not os.path.exists(os.path.join(out, "manifest.json"))
    assert not [n for _, _, names in os.walk(out) for n in names if ".tmp-" in n]
    assert [p.message for p in verify_shards(out)][0].endswith("(run `eep-shards prepare` first)")
    monkeypatch.setattr(prep._SourceReader, "read", real_read)
    assert not prepare(ckpt, out, quiet=True).is_up_to_date
    assert verify_shards(out) == [] and Manifest.load(out).architecture["model_type"] == "qwen2_moe"
