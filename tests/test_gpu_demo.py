"""``eep demo --gpu``'s machinery on the CPU: GpuEngine's code (engine ``cpu_elastic``, the expert
loop) behind the same set-up — shards prepared from a random checkpoint, a kill at a time into
serving, a restart, the run stopped after the rejoin, answers checked with ``check_gpu_run`` — and
the one-line error when there is no GPU."""

from __future__ import annotations

import json
import os

import pytest
import torch

from eep.cli.demo import run_runtime_demo
from eep.cli.gpu_demo import GpuDemoSetup, check_gpu_run, demo_config, prepare_experts
from eep.runtime.model import TinyConfig


@pytest.mark.slow
def test_gpu_demo_story_on_cpu_ranks(tmp_path, capsys):
    model = TinyConfig(num_layers=2)  # hidden 64, 16 experts, top-4
    workdir = tmp_path / "work"
    workdir.mkdir()
    shards, host_tier, tiers = prepare_experts(str(workdir), model, device="cpu")
    cfg = demo_config(2, 0.2, shards, model=model, engine="cpu_elastic",
                      engine_options={"device": "cpu", "expert_backend": "loop", "tiers": tiers, "pin_host_tier": False})
    setup = GpuDemoSetup(cfg, "2 rank processes on the CPU (GpuEngine code)", workdir=str(workdir),
                         host_tier_path=host_tier, fault_at_s=2.0, stop_after_rejoin_s=1.5, max_run_s=120)
    with setup:
        ok = run_runtime_demo(setup, kill_rank=1, out_dir=tmp_path / "out", keep=False)
    text = capsys.readouterr().out
    assert ok, text
    assert "none lost: yes" in text and "answers unchanged by the failure" in text
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["problems"] == [] and summary["answered"] > 0 and summary["requests"] is None
    assert summary["summary"]["rejoins"] and summary["summary"]["faults"][0]["epoch"] == 1
    assert not workdir.exists(), "the set-up's shards were left behind"
    if host_tier:
        assert not os.path.exists(host_tier)


def test_check_gpu_run_finds_a_changed_answer_and_a_lost_request():
    from types import SimpleNamespace

    from eep.runtime.config import RuntimeConfig
    from eep.runtime.model import make_request
    from eep.state import ExpertPlacement

    cfg = RuntimeConfig(num_ranks=2, max_tokens_per_rank=2)
    placement = ExpertPlacement.build(cfg.model.num_layers, cfg.model.num_experts, 2, cfg.slots_per_rank)
    commit = {"kind": "commit", "epoch": 1, "active": [True, True], "placement": placement.to_dict(),
              "requeue": {"1": [3]}}
    first = {q: make_request(cfg.model, q, max_new_tokens=cfg.max_new_tokens)[0] for q in range(40)}
    # every request answers "its prompt + 1": consistent
    results = {q: [(first[q] + 1) % cfg.model.vocab_size] for q in range(40)}
    def run_of(answers):
        return SimpleNamespace(results=answers, decisions=[commit], served_by={q: (0, 0, 1) for q in answers})

    assert check_gpu_run(cfg, run_of(results)) == []
    # one answer changed: its prompt token now has two successors
    q = next(q for q in range(40) if sum(first[p] == first[q] for p in range(40)) > 1)
    changed = {**results, q: [(first[q] + 2) % cfg.model.vocab_size]}
    assert any("differ" in p for p in check_gpu_run(cfg, run_of(changed)))
    # the re-queued request 3 never answered
    lost = {k: v for k, v in results.items() if k != 3}
    assert any("re-queued" in p for p in check_gpu_run(cfg, run_of(lost)))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without a GPU")
def test_gpu_demo_without_a_gpu_is_one_line(capsys):
    from eep.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["demo", "--gpu", "--skip-reference"])
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2 and len(err) == 1 and err[0].startswith("eep: error: --gpu needs a CUDA GPU")
