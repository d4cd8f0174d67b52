"""``eep demo --gpu``: part 2 of the demo on GPUs, the fused data plane and the CUTLASS experts.

The CPU demo's story at a real MoE shape: the bench model (``eep.runtime.model``, qwen3-30b-a3b's
expert shape: hidden 2048, moe intermediate 768, 128 experts, top-8; 2 MoE layers, bf16, one CUDA
graph per decode step) served by ``--ranks`` rank processes through ``GpuEngine``'s ``fused``
engine. Rank ``r`` runs on GPU ``r mod (visible GPUs)``, so four ranks share one GPU on a one-GPU
machine (a kernel waiting for a peer's flag progresses because the driver time-slices the
processes; throughput then means little, recovery does).

Set-up, in this process, before any rank starts: a random bf16 checkpoint in Qwen3-MoE format
(drawn on GPU 0), ``eep-shards prepare`` into per-expert shards, the host tier (a shared-memory
copy every rank maps; skipped when the shared-memory directory is too small), and the CUTLASS
library (built with nvcc unless cached: ``eep build-gemm``). All of it is removed at the end.

The run: the kill comes ``fault_at_s`` into serving, the rank restarts ``--restart-after`` later
and rejoins; the run is stopped ``STOP_AFTER_REJOIN_S`` after the rejoin (requests are endless: a
rate on shared GPUs cannot be known beforehand), and bounded as a whole, so a broken GPU path ends
in a clear failure, never a hang. Answer checks (``check_gpu_run``): no request lost, and one
successor per token over every answer (the bench model has no attention state, so an answer the
failure changed would give its token a second successor); the final membership EP-valid. The
failure benchmark (perf/failure_bench.py) also compares against the oracle.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time

from eep import envs
from eep.cli.answers import check_commits, transitions_of
from eep.cli.demo import DemoSetup
from eep.cli.options import CliError
from eep.runtime.config import RuntimeConfig
from eep.runtime.control.launcher import RunResult
from eep.runtime.model import TinyConfig

MODEL = TinyConfig(hidden=2048, intermediate=768, num_experts=128, top_k=8, num_layers=2, vocab_size=1024)
FAULT_AT_S = 5.0  # seconds of serving before the kill: the pre-fault rate is measured over them
STOP_AFTER_REJOIN_S = 5.0
MAX_RUN_S = 170.0  # start-up + serving; the whole demo stays near 3 minutes
ENDLESS_REQUESTS = 10_000_000


class GpuDemoSetup(DemoSetup):
    """A ``DemoSetup`` that stops the run after the rejoin, checks answers with ``check_gpu_run``,
    owns the shards and host tier it made, and removes them on exit."""

    def __init__(self, cfg: RuntimeConfig, description: str, *, workdir: str, host_tier_path: str | None,
                 fault_at_s: float = FAULT_AT_S, stop_after_rejoin_s: float = STOP_AFTER_REJOIN_S,
                 max_run_s: float = MAX_RUN_S):
        super().__init__(cfg, description, check=lambda result: check_gpu_run(cfg, result), timeout_s=max_run_s,
                         fault_at_s=fault_at_s, stop_after_rejoin_s=stop_after_rejoin_s,
                         answer_label="answers unchanged by the failure (one successor per token over every answer)")
        self.workdir, self.host_tier_path = workdir, host_tier_path

    def __exit__(self, *exc) -> None:
        shutil.rmtree(self.workdir, ignore_errors=True)
        for path in (self.host_tier_path, f"{self.host_tier_path}.lock") if self.host_tier_path else ():
            try:
                os.unlink(path)
            except OSError:
                pass


def gpu_demo_setup(args: argparse.Namespace) -> GpuDemoSetup:
    """Check the machine, build what the ranks need, and return the set-up of part 2 on GPUs."""
    import torch

    gpu = _require_gpu(torch)
    backend = _expert_backend()
    workdir = tempfile.mkdtemp(prefix="eep-gpu-demo-")
    try:
        shard_dir, host_tier_path, tiers = prepare_experts(workdir, MODEL, device="cuda")
    except BaseException:
        shutil.rmtree(workdir, ignore_errors=True)
        raise
    num_gpus = torch.cuda.device_count()
    cfg = demo_config(args.ranks, args.restart_after, shard_dir, engine="fused",
                      engine_options={"tiers": tiers, "expert_backend": backend, "pin_host_tier": False})
    where = f"{num_gpus} x {gpu}" + (f" (ranks share them: rank r on GPU r mod {num_gpus})"
                                     if num_gpus < args.ranks else "")
    stage = "CUTLASS experts" if backend == "cutlass" else f"{backend} experts"
    return GpuDemoSetup(cfg, f"{args.ranks} rank processes on {where}, fused data plane, {stage}",
                        workdir=workdir, host_tier_path=host_tier_path)


def demo_config(num_ranks: int, restart_after_s: float, shard_dir: str, *, model: TinyConfig = MODEL,
                engine: str, engine_options: dict) -> RuntimeConfig:
    # a graph replay cannot be interrupted by a decision: a member may be silent for a whole step with
    # two kernel deadlines (1 s each: ranks time-slicing one GPU are slow) before silence counts as
    # death, so 40 x 50 ms; a SIGKILLed rank is found sooner, by its exit
    return RuntimeConfig(num_ranks=num_ranks, num_requests=ENDLESS_REQUESTS, max_tokens_per_rank=64, model=model,
                         shard_dir=shard_dir, engine=engine, engine_options=engine_options,
                         heartbeat_interval_s=0.05, suspect_misses=40, transport_timeout_s=1.0,
                         restart_after_s=restart_after_s, max_restarts=1, startup_timeout_s=120.0, warmup_steps=1)


def _require_gpu(torch) -> str:
    if not torch.cuda.is_available():
        raise CliError(f"--gpu needs a CUDA GPU; torch {torch.__version__} sees none (torch.cuda.is_available() "
                       "is False)")
    major, minor = torch.cuda.get_device_capability(0)
    name = torch.cuda.get_device_name(0)
    if major < 9:
        raise CliError(f"--gpu needs a Hopper GPU (sm_90) for the fused kernels; GPU 0 is {name} (sm_{major}{minor})")
    try:
        import cuda.bindings  # noqa: F401 - the fused kernels are compiled and launched through it
        import cuda.core  # noqa: F401
    except ImportError as exc:
        raise CliError(f'--gpu needs the CUDA Python packages ({exc}): pip install "eep[cuda,cutlass]"') from None
    return name


def _expert_backend() -> str:
    """``cutlass`` (built or found now, not inside every rank) unless EEP_EXPERT_BACKEND names another."""
    backend = envs.expert_backend()
    if backend not in ("auto", "cutlass"):
        return backend
    from eep.fused.gemm.build import GemmBuildError, build_library, library_path

    try:
        if not library_path().exists():
            print("building the CUTLASS expert-GEMM library with nvcc (once; 'eep build-gemm' does it ahead) ...",
                  flush=True)
        build_library()
    except GemmBuildError as exc:
        raise CliError(f"the CUTLASS expert-GEMM library is not available: {exc}; run 'eep build-gemm' to "
                       "see why, or EEP_EXPERT_BACKEND=grouped_mm to run the demo on torch's grouped GEMM") from None
    return "cutlass"


def prepare_experts(workdir: str, model: TinyConfig, *, device: str) -> tuple[str, str | None, list[str]]:
    """Random checkpoint (drawn on ``device``) -> eep-shards prepare -> host tier; returns (shards,
    host tier file or None, tiers)."""
    import torch

    from weights_tools import HostTier, prepare
    from eep.runtime.model import write_random_checkpoint

    nbytes = model.num_layers * model.num_experts * 3 * model.hidden * model.intermediate * 2
    ckpt, shards = os.path.join(workdir, "ckpt"), os.path.join(workdir, "shards")
    if shutil.disk_usage(workdir).free < 2.2 * nbytes:
        raise CliError(f"{workdir}: {shutil.disk_usage(workdir).free / 1e9:.1f} GB free, the demo's checkpoint and "
                       f"shards need {2.2 * nbytes / 1e9:.1f} GB (set TMPDIR to a larger disk)")
    t = time.perf_counter()
    write_random_checkpoint(ckpt, model, device=device)
    if device == "cuda":
        torch.cuda.empty_cache()  # the ranks need the memory the weights were drawn in
    prepare(ckpt, shards, quiet=True)
    shutil.rmtree(ckpt, ignore_errors=True)
    print(f"experts: a random {nbytes / 1e9:.2f} GB checkpoint (hidden {model.hidden}, moe intermediate "
          f"{model.intermediate}, {model.num_experts} experts x {model.num_layers} layers, bf16) split by eep-shards "
          f"prepare into per-expert shards in {time.perf_counter() - t:.1f} s", flush=True)
    host_dir = envs.host_tier_dir()
    if shutil.disk_usage(host_dir).free < 1.2 * nbytes:
        print(f"host tier: skipped ({host_dir} has {shutil.disk_usage(host_dir).free / 1e9:.1f} GB free); "
              "restores come from a peer's replica or the disk shards", flush=True)
        return shards, None, ["disk"]
    tier = HostTier(shards, pin=False)  # built once; every rank maps the same file
    path = tier.path
    tier.close()
    return shards, path, ["host", "disk"]


def check_gpu_run(cfg: RuntimeConfig, result: RunResult) -> list[str]:
    """Problems with a GPU demo run (module docstring); empty when every check passed."""
    problems = []
    transitions, owners = transitions_of(cfg, result.results)
    split = {a: b for a, b in transitions.items() if len(b) > 1}
    if split:
        token, successors = next(iter(split.items()))
        problems.append(f"{len(split)} tokens' successors differ between answers (answers changed), e.g. token "
                        f"{token} -> {sorted(successors)} in requests {sorted(owners[token])[:6]}")
    requeued = {int(q) for d in result.decisions if d.get("kind") == "commit"
                for ids in d.get("requeue", {}).values() for q in ids}
    answered = set(result.results)
    lost = sorted(requeued - answered)
    if lost:
        problems.append(f"{len(lost)} requests re-queued from the dead rank were never answered, e.g. {lost[:8]}")
    top = max(answered, default=-1)
    unanswered = [q for q in range(top) if q not in answered]
    in_flight = cfg.num_ranks * cfg.token_capacity  # what the ranks may hold when the run is stopped
    if len(unanswered) > in_flight:
        problems.append(f"{len(unanswered)} requests below request {top} were never answered, more than the "
                        f"{in_flight} the ranks can hold in flight, e.g. {unanswered[:8]}")
    return problems + check_commits(cfg, result)

