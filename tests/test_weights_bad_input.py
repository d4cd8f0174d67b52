"""weights_tools on bad input: every failure is a ShardError naming the file and tensor, and restore falls back."""

from __future__ import annotations

import json
import logging
import os
import pathlib
import shutil
import struct
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from weights_tools import (CheckpointError, CorruptShardError, DiskTier, ExpertStore, ExpertUnavailableError,
                           HostTier, HostTierError, ManifestError, MissingShardError, ShardError, prepare,
                           verify_shards)
from weights_tools.cli import main as cli_main
from weights_tools.safetensors_io import TensorToWrite, write_safetensors

# transformers >= 5 keeps experts fused in memory (gate_up_proj); the fixtures read them that way.
pytest.importorskip("transformers", minversion="5.0")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # the shared fixtures module beside this file
from test_weights_fixtures import NUM_EXPERTS, make_model, model_expert, save  # noqa: E402

EXPERT3 = "experts/expert-00003.safetensors"


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """(model, checkpoint dir, pristine shard dir) of a tiny Qwen3-MoE."""
    root = tmp_path_factory.mktemp("bad")
    model = make_model("qwen3_moe", seed=11)
    ckpt = save(model, str(root / "ckpt"))
    shards = str(root / "shards")
    prepare(ckpt, shards, quiet=True)
    return model, ckpt, shards


@pytest.fixture
def shards(source, tmp_path):
    """A private copy of the shard set that a test may damage."""
    dst = str(tmp_path / "shards")
    shutil.copytree(source[2], dst)
    return dst


@pytest.fixture
def ckpt(source, tmp_path):
    dst = str(tmp_path / "ckpt")
    shutil.copytree(source[1], dst)
    return dst


def _flip_byte(path: str, offset_from_end: int = 10) -> None:
    with open(path, "r+b") as f:
        f.seek(-offset_from_end, os.SEEK_END)
        b = f.read(1)
        f.seek(-offset_from_end, os.SEEK_END)
        f.write(bytes([b[0] ^ 0x40]))


def _edit_manifest(shards: str, edit) -> None:
    path = os.path.join(shards, "manifest.json")
    doc = json.load(open(path))
    edit(doc)
    json.dump(doc, open(path, "w"))


def _read(shards: str, layer: int = 1, expert: int = 3):
    return DiskTier(shards).copy_expert_into(layer, expert, torch.empty(32, 64), torch.empty(32, 64),
                                             torch.empty(64, 32))


# ---- disk tier and verify ----
def test_missing_shard(shards):
    os.unlink(os.path.join(shards, EXPERT3))
    with pytest.raises(MissingShardError, match="expert-00003.safetensors.*missing"):
        _read(shards)
    [problem] = verify_shards(shards)
    assert EXPERT3 in problem.message and "missing" in problem.message


def test_truncated_file(shards):
    path = os.path.join(shards, EXPERT3)
    os.truncate(path, os.path.getsize(path) - 100)
    with pytest.raises(CorruptShardError, match="expert-00003"):
        _read(shards)
    assert any("truncated" in p.message and p.path.endswith(EXPERT3) for p in verify_shards(shards))


def test_corrupted_header(shards):
    path = os.path.join(shards, EXPERT3)
    with open(path, "r+b") as f:
        f.seek(8)
        f.write(b"{not json")
    with pytest.raises(CorruptShardError, match="expert-00003"):
        _read(shards)
    assert any("corrupted safetensors header" in p.message for p in verify_shards(shards))


def test_absurd_header_length(shards):
    path = os.path.join(shards, EXPERT3)
    with open(path, "r+b") as f:
        f.write(struct.pack("<Q", 1 << 40))
    with pytest.raises(CorruptShardError):
        _read(shards)
    assert verify_shards(shards)[0].path.endswith(EXPERT3)


def test_flipped_byte_fails_sha256(shards, source):
    _flip_byte(os.path.join(shards, EXPERT3))  # inside the last tensor: layers.1.w_down
    dst = [torch.full((32, 64), 7.0), torch.full((32, 64), 7.0), torch.full((64, 32), 7.0)]
    with pytest.raises(CorruptShardError, match=r"expert-00003.*'layers\.1\.w_down'.*checksum") as info:
        DiskTier(shards).copy_expert_into(1, 3, *dst)
    assert info.value.tensor == "layers.1.w_down" and info.value.path.endswith(EXPERT3)
    # A GPU-like (non-contiguous) destination goes through a staging tensor: same check, same error.
    strided = torch.empty(64, 32).t()
    with pytest.raises(CorruptShardError, match="checksum"):
        DiskTier(shards).copy_expert_into(1, 3, dst[0], dst[1], strided)
    _read(shards, layer=0)  # layer 0 of the same file is intact and still served
    # Repairing the file (as a re-run of prepare does, with os.replace) heals the same DiskTier.
    tier = DiskTier(shards)
    with pytest.raises(CorruptShardError):
        tier.copy_expert_into(1, 3, *dst)
    fixed = os.path.join(shards, EXPERT3 + ".fixed")
    shutil.copy(os.path.join(source[2], EXPERT3), fixed)
    os.replace(fixed, os.path.join(shards, EXPERT3))
    tier.copy_expert_into(1, 3, *dst)
    assert verify_shards(shards) == []
    _flip_byte(os.path.join(shards, EXPERT3))
    assert [p.tensor for p in verify_shards(shards)] == ["layers.1.w_down"]
    assert verify_shards(shards, check_sha256=False) == []


def test_shape_and_dtype_differing_from_manifest(shards, source):
    # Rewrite expert 3 with one tensor cast to float16 and one transposed: header valid, content wrong.
    path = os.path.join(shards, EXPERT3)
    tensors = load_file(path)
    tensors["layers.0.w_up"] = tensors["layers.0.w_up"].half()
    tensors["layers.1.w_gate"] = tensors["layers.1.w_gate"].t().contiguous()
    save_file(tensors, path)
    _edit_manifest(shards, lambda d: d["files"].update({EXPERT3: os.path.getsize(path)}))
    with pytest.raises(CorruptShardError, match=r"'layers\.0\.w_up' is \[32, 64\] F16 in the file but \[32, 64\] F32"):
        _read(shards, layer=0)
    with pytest.raises(CorruptShardError, match=r"'layers\.1\.w_gate' is \[64, 32\] F32"):
        _read(shards, layer=1)
    assert sorted(p.tensor for p in verify_shards(shards)) == ["layers.0.w_up", "layers.1.w_gate"]


def _swap_sizes(doc):
    arch = doc["architecture"]
    arch["hidden_size"], arch["moe_intermediate_size"] = arch["moe_intermediate_size"], arch["hidden_size"]


@pytest.mark.parametrize("edit, field", [
    (_swap_sizes, "hidden_size.*moe_intermediate_size.*swapped"),
    (lambda d: d["architecture"].update(dtype="BF16"), "architecture.dtype='BF16'.*F32"),
    (lambda d: d["architecture"].update(num_experts=NUM_EXPERTS - 1), "architecture.num_experts"),
    (lambda d: d["architecture"].update(moe_layers=[0]), "architecture.moe_layers"),
    (lambda d: d["tensors"][0].update(nbytes=d["tensors"][0]["nbytes"] + 4), "says nbytes="),
])
def test_manifest_fields_are_checked_against_the_tensors(shards, edit, field):
    """An edited architecture section must not read the right bytes into the wrong shape or dtype."""
    from weights_tools import load_layer_experts
    _edit_manifest(shards, edit)
    with pytest.raises(ManifestError, match=field):
        load_layer_experts(shards, 1)
    with pytest.raises(ManifestError, match=field):
        ExpertStore(shards)
    [problem] = verify_shards(shards)
    assert "manifest.json" in problem.message
    assert cli_main(["verify", shards]) == 1


def test_manifest_entry_edited_with_the_architecture_is_caught_by_the_headers(shards):
    """Sizes swapped consistently in the architecture and every entry: the file headers disagree."""
    def edit(doc):
        _swap_sizes(doc)
        for t in doc["tensors"]:
            if t["role"] is not None:
                t["shape"] = t["shape"][::-1]
    _edit_manifest(shards, edit)
    from weights_tools import load_layer_experts
    with pytest.raises(ShardError, match=r"'layers\.1\.w_gate' is \[32, 64\] F32 in the file but \[64, 32\]"):
        load_layer_experts(shards, 1)
    assert len(verify_shards(shards)) == 3 * 2 * NUM_EXPERTS


@pytest.mark.parametrize("bad_path", ["../escape.safetensors", "/etc/passwd", "experts/../../x.safetensors"])
def test_manifest_path_outside_out_dir(shards, bad_path):
    def edit(doc):
        doc["tensors"][0]["file"] = bad_path
        doc["files"][bad_path] = 1
    _edit_manifest(shards, edit)
    with pytest.raises(ManifestError, match="outside the shard directory"):
        ExpertStore(shards)
    [problem] = verify_shards(shards)
    assert "outside" in problem.message
    assert cli_main(["verify", shards]) == 1


def test_manifest_symlink_leading_outside(shards, tmp_path):
    outside = tmp_path / "elsewhere.safetensors"
    shutil.copy(os.path.join(shards, EXPERT3), outside)
    os.unlink(os.path.join(shards, EXPERT3))
    os.symlink(outside, os.path.join(shards, EXPERT3))
    with pytest.raises(ManifestError, match="resolves outside"):
        DiskTier(shards)


def test_manifest_missing_or_malformed(shards):
    path = pathlib.Path(shards, "manifest.json")
    text = path.read_text()
    path.write_text(text[: len(text) // 2])
    with pytest.raises(ManifestError, match="not valid JSON"):
        ExpertStore(shards)
    path.write_text(json.dumps({"format": "eep-expert-shards", "format_version": 99}))
    with pytest.raises(ManifestError, match="format_version 99"):
        ExpertStore(shards)
    path.unlink()
    with pytest.raises(ManifestError, match="missing"):
        ExpertStore(shards)
    assert cli_main(["verify", shards]) == 1


def test_verify_lists_every_problem_and_exits_nonzero(shards, capsys):
    os.unlink(os.path.join(shards, "experts/expert-00001.safetensors"))
    _flip_byte(os.path.join(shards, EXPERT3))
    os.truncate(os.path.join(shards, "experts/expert-00005.safetensors"), 50)
    _flip_byte(os.path.join(shards, "non_expert.safetensors"), offset_from_end=4)
    problems = verify_shards(shards)
    assert len(problems) == 4
    assert cli_main(["verify", shards]) == 1
    out = capsys.readouterr().out
    for name in ("expert-00001", "expert-00003", "expert-00005", "non_expert"):
        assert name in out
    assert out.count("PROBLEM") == 4


# ---- source checkpoints ----
def test_non_moe_checkpoint(tmp_path):
    ckpt = save(make_model("llama"), str(tmp_path / "llama"))
    with pytest.raises(CheckpointError, match="not a Mixture-of-Experts checkpoint"):
        prepare(ckpt, str(tmp_path / "out"), quiet=True)
    assert not os.path.exists(tmp_path / "out")
    assert cli_main(["prepare", ckpt, str(tmp_path / "out"), "--quiet"]) == 2


def test_config_disagrees_with_weights(ckpt, tmp_path):
    cfg_path = os.path.join(ckpt, "config.json")
    cfg = json.load(open(cfg_path))
    json.dump({**cfg, "num_local_experts": NUM_EXPERTS + 2}, open(cfg_path, "w"))
    with pytest.raises(CheckpointError, match=f"config says {NUM_EXPERTS + 2} experts.*has {NUM_EXPERTS}"):
        prepare(ckpt, str(tmp_path / "out"), quiet=True)
    json.dump({**cfg, "moe_intermediate_size": 16}, open(cfg_path, "w"))
    with pytest.raises(CheckpointError, match=r"model.safetensors: tensor 'model\.layers\.0\.mlp\.experts\.0\..*shape"):
        prepare(ckpt, str(tmp_path / "out"), quiet=True)
    json.dump({**cfg, "num_hidden_layers": 1}, open(cfg_path, "w"))
    with pytest.raises(CheckpointError, match="num_hidden_layers=1.*layer 1"):
        prepare(ckpt, str(tmp_path / "out"), quiet=True)


def test_expert_missing_from_weights(ckpt, tmp_path):
    path = os.path.join(ckpt, "model.safetensors")
    tensors = load_file(path)
    del tensors["model.layers.1.mlp.experts.5.up_proj.weight"]
    save_file(tensors, path)
    with pytest.raises(CheckpointError, match="layer 1 expert 5 has no up projection"):
        prepare(ckpt, str(tmp_path / "out"), quiet=True)


def test_unknown_expert_tensors_are_refused(ckpt, tmp_path):
    path = os.path.join(ckpt, "model.safetensors")
    tensors = load_file(path)
    tensors["model.layers.0.mlp.experts.0.gate_proj.bias"] = torch.ones(4)
    save_file(tensors, path)
    with pytest.raises(CheckpointError, match="unsupported expert tensors.*gate_proj.bias") as info:
        prepare(ckpt, str(tmp_path / "out"), quiet=True)
    assert info.value.tensor == "model.layers.0.mlp.experts.0.gate_proj.bias"


def test_pickle_checkpoint_is_never_loaded(tmp_path):
    ckpt = tmp_path / "bin"
    ckpt.mkdir()
    (ckpt / "config.json").write_text(json.dumps({"model_type": "mixtral", "num_local_experts": 2}))
    (ckpt / "pytorch_model.bin").write_bytes(b"\x80\x04 definitely not to be unpickled")
    with pytest.raises(CheckpointError, match="unpickling"):
        prepare(str(ckpt), str(tmp_path / "out"), quiet=True)


def test_sharded_checkpoint_with_missing_or_escaping_shard(tmp_path):
    ckpt = save(make_model("mixtral"), str(tmp_path / "ckpt"), max_shard_size="40KB")
    index_path = os.path.join(ckpt, "model.safetensors.index.json")
    index = json.load(open(index_path))
    victim = sorted(set(index["weight_map"].values()))[1]
    os.rename(os.path.join(ckpt, victim), os.path.join(ckpt, victim + ".gone"))
    with pytest.raises(CheckpointError, match=f"{victim}: shard listed in model.safetensors.index.json is missing"):
        prepare(ckpt, str(tmp_path / "out"), quiet=True)
    os.rename(os.path.join(ckpt, victim + ".gone"), os.path.join(ckpt, victim))
    key = next(iter(index["weight_map"]))
    index["weight_map"][key] = "../outside.safetensors"
    json.dump(index, open(index_path, "w"))
    with pytest.raises(CheckpointError, match="outside the checkpoint directory"):
        prepare(ckpt, str(tmp_path / "out"), quiet=True)


def test_truncated_source_checkpoint(ckpt, tmp_path):
    path = os.path.join(ckpt, "model.safetensors")
    os.truncate(path, os.path.getsize(path) - 8)
    with pytest.raises(CheckpointError, match="model.safetensors.*truncated"):
        prepare(ckpt, str(tmp_path / "out"), quiet=True)


def test_failed_write_leaves_no_temporary_file(tmp_path):
    def boom():
        raise OSError("disk full")
    target = str(tmp_path / "x.safetensors")
    with pytest.raises(OSError, match="disk full"):
        write_safetensors(target, [TensorToWrite("a", "F32", (2,), lambda: b"\0" * 8), TensorToWrite("b", "F32", (2,), boom)])
    assert os.listdir(tmp_path) == []


# ---- tiered restore ----
def _dst():
    return [torch.empty(32, 64), torch.empty(32, 64), torch.empty(64, 32)]


def _assert_is_expert(dst, model, layer, expert):
    for d, w in zip(dst, model_expert(model, layer, expert)):
        assert torch.equal(d, w)


def test_corrupt_disk_with_host_present_host_serves(shards, source, tmp_path, caplog):
    model = source[0]
    host = HostTier(shards, path=str(tmp_path / "host.safetensors"))  # built while the disk is good
    _flip_byte(os.path.join(shards, EXPERT3))
    store = ExpertStore(shards, tiers=[host, DiskTier(shards)])
    dst = _dst()
    assert store.load_expert_into(1, 3, *dst).tier == "host"
    _assert_is_expert(dst, model, 1, 3)
    # The other order: the disk is tried first, fails its checksum, is reported, and the host serves.
    store = ExpertStore(shards, tiers=[DiskTier(shards), host])
    with caplog.at_level(logging.WARNING, logger="weights_tools"):
        record = store.load_expert_into(1, 3, *dst)
    assert record.tier == "host"
    failed = [r for r in store.records if not r.is_ok]
    assert [(r.tier, r.layer, r.expert) for r in failed] == [("disk", 1, 3)]
    assert "expert-00003" in failed[0].error and "checksum" in failed[0].error
    assert "disk tier failed" in caplog.text
    _assert_is_expert(dst, model, 1, 3)
    host.close()


def test_host_missing_expert_disk_serves(shards, source, tmp_path):
    host = HostTier(shards, path=str(tmp_path / "host.safetensors"), experts=[(0, 0)])
    store = ExpertStore(shards, tiers=[host, "disk"])
    dst = _dst()
    assert store.load_expert_into(0, 0, *dst).tier == "host"
    assert store.load_expert_into(1, 6, *dst).tier == "disk"
    _assert_is_expert(dst, source[0], 1, 6)
    assert all(r.is_ok for r in store.records)  # "not held" is not a failure
    host.close()


def test_host_corrupt_disk_serves(shards, source, tmp_path):
    path = str(tmp_path / "host.safetensors")
    HostTier(shards, path=path).close()
    _flip_byte(path, offset_from_end=3)  # last tensor of the host file
    host = HostTier(shards, path=path, create=False, verify=True)
    store = ExpertStore(shards, tiers=[host, "disk"])
    last = host.manifest.expert_pairs()[-1]
    dst = _dst()
    record = store.load_expert_into(*last, *dst)
    assert record.tier == "disk"
    assert store.records[0].tier == "host" and "checksum" in store.records[0].error
    _assert_is_expert(dst, source[0], *last)
    host.close()


def test_host_tier_truncated_under_a_reader_is_reported_not_a_crash(shards, tmp_path):
    path = str(tmp_path / "host.safetensors")
    host = HostTier(shards, path=path)
    os.truncate(path, 4096)
    store = ExpertStore(shards, tiers=[host, "disk"])
    assert store.load_expert_into(1, 7, *_dst()).tier == "disk"
    assert "changed size" in store.records[0].error
    host.close()


def test_stale_host_tier_is_refused_or_rebuilt(shards, source, tmp_path):
    path = str(tmp_path / "host.safetensors")
    HostTier(shards, path=path).close()
    # Another shard set (other weights) -> another manifest digest: the old host copy is stale.
    other = str(tmp_path / "other")
    prepare(save(make_model("qwen3_moe", seed=99), str(tmp_path / "ckpt2")), other, quiet=True)
    with pytest.raises(HostTierError, match="stale"):
        HostTier(other, path=path, create=False)
    rebuilt = HostTier(other, path=path)
    dst = _dst()
    rebuilt.copy_expert_into(1, 2, *dst)
    assert torch.equal(dst[0], ExpertStore(other).load_expert(1, 2)[0])
    rebuilt.close()
    with pytest.raises(HostTierError, match="missing"):
        HostTier(shards, path=str(tmp_path / "nothing-here"), create=False)


def test_every_tier_failing_raises_with_each_reason(shards, tmp_path):
    path = str(tmp_path / "host.safetensors")
    HostTier(shards, path=path).close()
    _flip_byte(path, offset_from_end=3)
    host = HostTier(shards, path=path, create=False, verify=True)
    last = host.manifest.expert_pairs()[-1]
    _flip_byte(os.path.join(shards, f"experts/expert-{last[1]:05d}.safetensors"))
    store = ExpertStore(shards, tiers=[host, "disk"])
    with pytest.raises(ExpertUnavailableError, match="host: .*checksum.*; disk: .*checksum") as info:
        store.load_expert_into(*last, *_dst())
    assert [t for t, _ in info.value.failures] == ["host", "disk"]
    assert isinstance(info.value, ShardError)
    host.close()


def test_caller_errors_are_not_tier_failures(shards):
    store = ExpertStore(shards)
    with pytest.raises(ValueError, match="no layer 7 expert 0.*MoE layers are \\[0, 1\\]"):
        store.load_expert(7, 0)
    with pytest.raises(ValueError, match="w_down_dst is \\[32, 64\\]"):
        store.load_expert_into(0, 0, torch.empty(32, 64), torch.empty(32, 64), torch.empty(32, 64))
    with pytest.raises(ValueError, match="w_gate_dst .*torch.float16"):
        store.load_expert_into(0, 0, torch.empty(32, 64, dtype=torch.float16), torch.empty(32, 64),
                               torch.empty(64, 32))
    assert store.records == []


def test_package_never_unpickles():
    root = pathlib.Path(__file__).resolve().parent.parent / "weights_tools"
    for path in root.glob("*.py"):
        text = path.read_text()
        for banned in ("torch.load(", "import pickle", "pickle.load", "weights_only"):
            assert banned not in text, f"{path.name} uses {banned}"


def _warnings(caplog, what: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and what in r.getMessage()]


def test_host_tier_in_a_disk_file_stays_pageable_with_one_warning(shards, source, tmp_path, caplog):
    from weights_tools.tiers import _MEMORY_FILESYSTEMS, _filesystem_type

    if _filesystem_type(str(tmp_path)) in _MEMORY_FILESYSTEMS:
        pytest.skip("the temporary directory is in memory here: no disk file to try")
    with caplog.at_level(logging.WARNING, logger="weights_tools"):
        host = HostTier(shards, path=str(tmp_path / "host.safetensors"), pin=True)  # asked to pin: cannot be
        dst = _dst()
        for expert in range(3):
            assert host.copy_expert_into(1, expert, *dst) > 0
            _assert_is_expert(dst, source[0], 1, expert)
    assert not host.is_pinned and "disk filesystem" in host.pin_refusal
    warned = _warnings(caplog, "stays pageable")
    assert len(warned) == 1 and str(tmp_path / "host.safetensors") in warned[0] and "disk filesystem" in warned[0]
    host.close()


@pytest.mark.skipif(torch.cuda.is_available(), reason="with a GPU the registration is tried for real")
def test_host_tier_asked_to_pin_without_cuda_stays_pageable_with_one_warning(shards, source, caplog):
    shm = "/dev/shm"
    if not os.path.isdir(shm):
        pytest.skip("no /dev/shm")
    path = os.path.join(shm, f"eep-test-pin-{os.getpid()}.safetensors")
    try:
        with caplog.at_level(logging.WARNING, logger="weights_tools"):
            host = HostTier(shards, path=path, pin=True)  # in memory: the registration itself is attempted
            dst = _dst()
            host.copy_expert_into(0, 5, *dst)
            host.copy_expert_into(0, 6, *dst)
        _assert_is_expert(dst, source[0], 0, 6)
        assert not host.is_pinned and "CUDA is not usable" in host.pin_refusal
        assert len(_warnings(caplog, "stays pageable")) == 1
        host.close()
    finally:
        for leftover in (path, path + ".lock"):
            if os.path.exists(leftover):
                os.unlink(leftover)
