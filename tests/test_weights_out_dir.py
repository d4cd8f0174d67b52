"""``eep-shards prepare`` writes only into a new or empty directory or a shard set of its own."""

from __future__ import annotations

import os
import shutil
import sys

import pytest

from weights_tools import ShardError, prepare, verify_shards
from weights_tools.cli import main as cli_main

pytest.importorskip("transformers", minversion="5.0")  # the fixtures write real Qwen3-MoE checkpoints
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from test_weights_fixtures import make_model, save  # noqa: E402


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return save(make_model("qwen3_moe", seed=5), str(tmp_path_factory.mktemp("outdir") / "ckpt"))


def test_a_directory_of_the_users_own_is_refused_and_left_alone(ckpt, tmp_path, capsys):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "config.json").write_text('{"mine": true}')
    (out / "notes.txt").write_text("keep me")
    with pytest.raises(ShardError, match=r"not an eep shard set \(it holds config.json, notes.txt\).*--force"):
        prepare(ckpt, str(out), quiet=True)
    assert cli_main(["prepare", ckpt, str(out), "--quiet"]) == 2
    assert "not an eep shard set" in capsys.readouterr().err
    assert (out / "config.json").read_text() == '{"mine": true}' and sorted(os.listdir(out)) == ["config.json", "notes.txt"]


def test_a_lone_config_json_is_not_a_shard_set(ckpt, tmp_path):
    out = tmp_path / "cfg"
    out.mkdir()
    (out / "config.json").write_text("{}")
    with pytest.raises(ShardError, match=r"it holds config.json"):
        prepare(ckpt, str(out), quiet=True)


def test_force_writes_into_it(ckpt, tmp_path):
    out = tmp_path / "forced"
    out.mkdir()
    (out / "notes.txt").write_text("x")
    prepare(ckpt, str(out), quiet=True, force=True)
    assert verify_shards(str(out)) == [] and (out / "notes.txt").exists()


def test_new_empty_rerun_and_interrupted_directories_are_accepted(ckpt, tmp_path):
    out = tmp_path / "shards"
    prepare(ckpt, str(out), quiet=True)  # new
    assert prepare(ckpt, str(out), quiet=True).is_up_to_date  # a shard set of its own
    (tmp_path / "empty").mkdir()
    prepare(ckpt, str(tmp_path / "empty"), quiet=True)
    # an interrupted run: no manifest, a temporary file left behind
    os.unlink(out / "manifest.json")
    shutil.copy(out / "experts" / "expert-00000.safetensors", out / "experts" / "expert-00000.safetensors.tmp-123")
    prepare(ckpt, str(out), quiet=True)
    assert verify_shards(str(out)) == []
    # a stranger inside experts/ is named
    (out / "experts" / "readme.md").write_text("?")
    with pytest.raises(ShardError, match=r"experts/readme.md"):
        prepare(ckpt, str(out), quiet=True)
