"""SGLang's own dispatcher classes over eep's fused GPU backends: four rank processes, a SIGKILL, a rejoin.

    python tests/gpu/sglang_gpu.py [--out DIR] [--fp8] [--wheels DIR] [--device cuda|cpu] [--hidden N]

The launcher (no ``--rank``) installs SGLang from a folder of wheels when it is not importable
(``--wheels``, default ``.whl``: the sglang 0.5.23 wheel and the pure-Python requirements its
dispatcher modules import, into ``--site``), compiles the fused kernels once, hosts the TCPStore that
every rank process installs as SGLang's global store, and starts one process per rank (all on GPU 0
when there is one GPU: the kernels' waits progress by time-slicing, so this checks correctness, not
speed). Each rank process builds SGLang's ``ElasticEPStateManager`` state (``active_ranks`` on the
device), registers eep's member-refresh hook with SGLang's ``HookRegistry``, and drives an ``EepDispatcher``
(``deepep_mode`` auto, SGLang's Mooncake arguments) through ``dispatch_a`` .. ``combine_b`` with
SGLang's ``StandardTopKOutput``, ``DeepEPLL*`` and ``DeepEPNormal*`` types. The dispatcher's first
call builds the process-wide ``eep.Buffer`` through the plugin's ``make_buffer``: ``FusedBuffer``
and ``PrefillBuffer`` on one ``Membership`` whose device mirror is SGLang's ``active_ranks``.

  1. four ranks: low-latency and normal-mode steps, fresh random inputs every step (one rank with no
     tokens), the receive views poisoned before each; every output checked against ``eep.reference``
     (``sglang_case.ll_output_errors`` / ``normal_output_errors``: rows exact in bf16); then a CUDA
     graph captured around dispatch_a .. combine_b and the expert stage, replayed with fresh inputs
     copied into its static tensors and its outputs poisoned.
  2. the launcher SIGKILLs rank 3 between steps. The survivors replay the same graph: the kernels
     give up on rank 3 within the deadline, eep clears ``active_ranks[3]`` in SGLang's tensor (same
     storage), outputs equal the reference over the survivors; then a normal-mode step and a replay.
     Then SGLang's ``maybe_rebalance_after_rank_fault`` (eep's hook) repairs by eep's plan: each
     survivor holds MoE expert weights in SGLang's ``w13``/``w2`` layout on its device (2 MoE layers,
     12 logical experts in 16 slots) and SGLang's global expert-location maps; the hook plans,
     restores orphans from a host tier into those tensors on a copy stream, the survivors vote
     through SGLang's store, and the maps are written in place. Checked: the maps equal the plan's,
     list no slot of rank 3, keep their storage; every slot of this rank holds, byte for byte, the
     expert its maps name; predicted and observed seconds per phase are in the rank's result.
  3. a new process takes rank 3's slot with SGLang's joiner mask (only itself active), builds its
     buffers (published in the store); survivors and joiner run SGLang's ``_refresh_ep_members``
     (eep's hook: one agreed epoch, the rank mapped, ``active_ranks`` written in place); survivors
     replay the same graph (never recaptured), the joiner steps eagerly; outputs equal the reference
     over all four ranks.

``--device cpu`` runs the same steps over the plugin's host shared-memory backend (no graph: the
"replays" run the same captured-step body eagerly), for checking the scenario without a GPU.
Each process writes ``<out>/sglang-<tag>.<role><rank>.json``; the launcher prints one
``SCENARIO`` line and exits non-zero on any error.
"""

from __future__ import annotations

import argparse
import datetime
import glob
import importlib.util
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
import traceback

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PATHS = [ROOT, os.path.join(ROOT, "tests"), os.path.join(ROOT, "tests", "sglang"), os.path.join(ROOT, "tests", "gpu")]
sys.path[:0] = PATHS

R, LOCAL, TOP_K, M, INTER = 4, 4, 8, 64, 128
VICTIM = R - 1
GRAPH_TOKENS = 48  # tokens per rank in the captured step (static shapes)


def _td(seconds: float) -> datetime.timedelta:
    return datetime.timedelta(seconds=seconds)


# ---------------------------------------------------------------------------------------------
# launcher
# ---------------------------------------------------------------------------------------------

def sglang_importable() -> bool:
    spec = importlib.util.find_spec("sglang")
    return spec is not None and spec.origin not in (None, "namespace")


def ensure_sglang(wheels: str, site: str) -> str | None:
    """Install SGLang (``--no-deps``) and the wheels beside it into ``site`` unless it is importable;
    returns the folder to put on ``PYTHONPATH`` (None when SGLang was there already)."""
    if sglang_importable():
        return None
    files = sorted(glob.glob(os.path.join(wheels, "*.whl")))
    if not any(os.path.basename(f).startswith("sglang-") for f in files):
        raise SystemExit(f"sglang is not importable and {wheels!r} holds no sglang wheel "
                         "(tests/gpu/sglang_wheels.py makes that folder)")
    stamp, wanted = os.path.join(site, ".installed-wheels.json"), [[os.path.basename(f), os.path.getsize(f)]
                                                                    for f in files]
    if os.path.exists(stamp) and json.load(open(stamp)) == wanted:  # a run before this one installed them
        return site
    shutil.rmtree(site, ignore_errors=True)
    t0 = time.time()
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--target", site, *files],
                   check=True)
    with open(stamp, "w") as f:
        json.dump(wanted, f)
    print(f"installed {len(files)} wheels into {site} in {time.time() - t0:.1f} s", flush=True)
    return site


def compile_kernels(hidden: int) -> None:
    """The variants the plugin's buffers load (bf16 and FP8 rows), compiled once here rather than by
    four processes at once."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    from eep import envs
    from eep.fused.compile import KernelVariant, cached_cubin, device_arch

    arch, t0 = device_arch(0), time.time()
    common = dict(vec_per_lane=envs.fused_vec_per_lane(), kernels=envs.fused_kernels())
    variants = [KernelVariant(hidden, use_fp8=fp8, **common) for fp8 in (False, True)]
    with ProcessPoolExecutor(len(variants), mp_context=multiprocessing.get_context("spawn")) as pool:  # CUDA is up here
        list(pool.map(cached_cubin, variants, [arch] * len(variants)))
    print(f"compiled {len(variants)} kernel variants for {arch} in {time.time() - t0:.1f} s", flush=True)


def run_launcher(args) -> int:
    from torch.distributed import TCPStore

    from launch import free_port

    os.makedirs(args.out, exist_ok=True)
    site = ensure_sglang(args.wheels, args.site)
    if args.device == "cuda":
        compile_kernels(args.hidden)
    tag = f"{'fp8' if args.fp8 else 'bf16'}-{os.getpid()}"
    port = free_port()
    store = TCPStore("127.0.0.1", port, is_master=True, wait_for_workers=False, timeout=_td(args.timeout_s))
    env = dict(os.environ, PYTHONUNBUFFERED="1", NCCL_NVLS_ENABLE="0", TORCH_SYMM_MEM_DISABLE_MULTICAST="1",
               NVSHMEM_DISABLE_NVLS="1",
               PYTHONPATH=os.pathsep.join(([site] if site else []) + PATHS + [os.environ.get("PYTHONPATH", "")]))

    def start(role: str, rank: int) -> subprocess.Popen:
        return subprocess.Popen([sys.executable, __file__, "--role", role, "--rank", str(rank), "--port", str(port),
                                 "--tag", tag, *args.forward], env=env)

    t0 = time.time()
    procs = {f"rank{r}": start("rank", r) for r in range(R)}
    killed_at = None
    deadline = t0 + args.timeout_s
    while any(p.poll() is None for p in procs.values()) and time.time() < deadline:
        if killed_at is None and store.check([f"{tag}/victim-ready"]):
            victim = procs[f"rank{VICTIM}"]
            os.kill(victim.pid, signal.SIGKILL)
            victim.wait()
            killed_at = time.time()
            store.set(f"{tag}/killed", "1")
            procs["join"] = start("join", VICTIM)
            print(f"SIGKILLed rank {VICTIM} (pid {victim.pid}) at {killed_at - t0:.1f} s; started its new process",
                  flush=True)
        time.sleep(0.01)
    for p in procs.values():
        if p.poll() is None:
            p.kill()
    results = []
    for path in sorted(glob.glob(os.path.join(args.out, f"sglang-{tag}.*.json"))):
        with open(path) as f:
            results.append(json.load(f))
    errors = [e for r in results for e in r["errors"]]
    roles = sorted(f"{r['role']}{r['rank']}" for r in results)
    want = sorted([f"rank{r}" for r in range(R)] + [f"join{VICTIM}"])
    if roles != want:
        codes = {name: p.returncode for name, p in procs.items()}
        errors.append(f"results from {roles}, expected {want}; exit codes {codes}"
                      + ("" if killed_at else f"; rank {VICTIM} never got ready to be killed"))
    summary = {f"{r['role']}{r['rank']}": {"checks": len(r["checks"]), "errors": len(r["errors"]),
                                           **{k: r[k] for k in ("kill_step_s", "rejoin_s", "epoch", "repair_by_plan_s") if k in r}}
               for r in results}
    with open(os.path.join(args.out, f"sglang-{tag}.summary.json"), "w") as f:
        json.dump({"errors": errors, "results": summary, "wall_s": time.time() - t0}, f, indent=1)
    print(f"SCENARIO sglang-gpu device={args.device} {'fp8' if args.fp8 else 'bf16'} hidden={args.hidden}: "
          f"{'PASS' if not errors else 'FAIL'} ({len(errors)} errors, {time.time() - t0:.0f} s) {json.dumps(summary)}",
          flush=True)
    for e in errors[:30]:
        print("  " + e[:3000], flush=True)
    return 0 if not errors else 1


# ---------------------------------------------------------------------------------------------
# rank processes
# ---------------------------------------------------------------------------------------------

class Rank:
    """One SGLang EP rank: SGLang's state and an EepDispatcher, the step helpers and their checks."""

    def __init__(self, args):
        import torch
        from torch.distributed import TCPStore

        self.args, self.rank, self.role = args, args.rank, args.role
        self.result = {"rank": self.rank, "role": self.role, "errors": [], "checks": [], "pid": os.getpid()}
        if args.device == "cuda":
            self.device = torch.device("cuda", self.rank % torch.cuda.device_count())
            torch.cuda.set_device(self.device)
            torch.backends.cuda.matmul.allow_tf32 = False
        else:
            self.device = torch.device("cpu")
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // (R + 1)))  # five processes share the cores
        import sglang_case  # installs the stand-ins SGLang's imports need here (sglang_shims), then imports SGLang
        from sglang.srt.distributed.utils import set_global_tcp_store
        from sglang.srt.elastic_ep.elastic_ep import ElasticEPStateManager
        from sglang.srt.layers.moe.utils import DeepEPMode
        from sglang.srt.plugins.hook_registry import HookRegistry, HookType

        from eep.integrations.sglang import hooks
        from eep.integrations.sglang.dispatcher import EepDispatcher
        from fused_worker import Barrier

        self.case, self.torch, self.Barrier, self.manager = sglang_case, torch, Barrier, ElasticEPStateManager
        self.store = TCPStore("127.0.0.1", args.port, is_master=False, timeout=_td(args.timeout_s))
        set_global_tcp_store(self.store)
        # The plugin's member-refresh hook, as its register() installs it; its dispatcher-factory hook
        # targets SGLang's fused-MoE layer module, which needs SGLang's CUDA kernels to import.
        HookRegistry.register(hooks.REFRESH_EP_MEMBERS, hooks.after_refresh_ep_members, HookType.AFTER)
        HookRegistry.register(hooks.REBALANCE_AFTER_RANK_FAULT, hooks.around_rebalance_after_rank_fault,
                              HookType.AROUND)
        HookRegistry.apply_hooks()
        state = ElasticEPStateManager._build_state(ep_size=R, device=self.device)
        state.effective_ep_size = state.original_ep_size = R
        if self.role == "join":  # SGLang's _init_joiner_state: only this rank is active
            state.active_ranks.zero_()
            state.active_ranks[self.rank] = 1
        ElasticEPStateManager._instance = state
        self.state, self.mask_ptr = state, state.active_ranks.data_ptr()
        self.dispatcher = EepDispatcher(
            sglang_case.StubGroup(self.rank, R), TOP_K, permute_fusion=True, num_experts=R * LOCAL,
            num_local_experts=LOCAL, hidden_size=args.hidden, params_dtype=torch.bfloat16,
            deepep_mode=DeepEPMode.AUTO, async_finish=True, return_recv_hook=True, use_fp8=args.fp8,
            timeout_us=int(args.step_timeout_s * 1e6), num_max_dispatch_tokens_per_rank=M)
        self.last_recv = None  # the receive view of the last low-latency step, poisoned before the next

    # ---- bookkeeping ----
    def check(self, label: str, errors: list[str]) -> bool:
        self.result["checks"].append(label)
        self.result["errors"] += [f"{self.role}{self.rank} {label}: {e}" for e in errors]
        return not errors

    def sync(self) -> None:
        if self.device.type == "cuda":
            self.torch.cuda.synchronize(self.device)

    def inputs(self, seed: int, tokens: list[int] | None = None):
        if tokens is None:  # a full rank, an empty one, two in between; which is which changes per seed
            tokens = [M, 0, 37, 50]
            tokens = tokens[seed % R:] + tokens[:seed % R]
        return self.case.make_inputs(seed, tokens=tokens, hidden=self.args.hidden, local=LOCAL, top_k=TOP_K,
                                     inter=INTER)

    def mask_errors(self, want: list[int]) -> list[str]:
        mask = self.state.active_ranks
        errors = [] if mask.tolist() == want else [f"SGLang's active_ranks is {mask.tolist()}, expected {want}"]
        same = (self.manager.instance() is self.state and mask.data_ptr() == self.mask_ptr
                and self.dispatcher.get_buffer().membership.active_device is mask)
        return errors + ([] if same else ["SGLang's active_ranks is no longer the tensor eep's membership mirrors"])

    def poison_last_recv(self) -> None:
        if self.last_recv is not None:  # a view of the receive buffer: a row the next step misses reads garbage
            fill(self.last_recv)
        self.sync()

    # ---- eager steps (every participant calls them with the same seed) ----
    def ll_step(self, barrier, participants: int, seed: int, active: list[bool], label: str,
                tokens: list[int] | None = None) -> None:
        from sglang.srt.layers.dp_attention import set_is_extend_in_batch

        xs, ids, ws, weights = self.inputs(seed, tokens)
        weights_dev = tuple(w.to(self.device) for w in weights)
        set_is_extend_in_batch(False)
        self.poison_last_recv()
        barrier.wait(participants)
        out, combined = self.case.run_step(self.dispatcher, xs[self.rank].to(self.device),
                                           ids[self.rank].to(self.device), ws[self.rank].to(self.device),
                                           self.rank, weights_dev)
        self.sync()
        self.last_recv = out.hidden_states
        self.check(label, self.case.ll_output_errors(out, combined, self.rank, xs, ids, ws, weights, active,
                                                     use_fp8=self.args.fp8, m=M))
        barrier.wait(participants)  # nobody poisons its receive view before every peer has read

    def normal_step(self, barrier, participants: int, seed: int, active: list[bool], label: str) -> None:
        from sglang.srt.layers.dp_attention import set_is_extend_in_batch

        xs, ids, ws, weights = self.inputs(seed)
        weights_dev = tuple(w.to(self.device) for w in weights)
        set_is_extend_in_batch(True)  # a batch with extends: auto mode resolves to normal, as in SGLang
        barrier.wait(participants)
        out, combined = self.case.run_normal_step(self.dispatcher, xs[self.rank].to(self.device),
                                                  ids[self.rank].to(self.device), ws[self.rank].to(self.device),
                                                  self.rank, weights_dev)
        self.sync()
        set_is_extend_in_batch(False)
        self.check(label, self.case.normal_output_errors(out, combined, self.rank, xs, ids, ws, weights, active))
        barrier.wait(participants)


class CapturedStep:
    """A low-latency step (dispatch_a .. combine_b and the expert stage) over static tensors: captured
    once in a CUDA graph and replayed; on the CPU the same body runs eagerly each time."""

    def __init__(self, rank: Rank):
        torch = rank.torch
        self.rank, self.torch = rank, torch
        dev, H, E = rank.device, rank.args.hidden, R * LOCAL
        self.x = torch.zeros(GRAPH_TOKENS, H, dtype=torch.bfloat16, device=dev)
        self.ids = torch.zeros(GRAPH_TOKENS, TOP_K, dtype=torch.int64, device=dev)
        self.ws = torch.zeros(GRAPH_TOKENS, TOP_K, dtype=torch.float32, device=dev)
        self.weights = (torch.zeros(E, INTER, H, dtype=torch.bfloat16, device=dev),
                        torch.zeros(E, INTER, H, dtype=torch.bfloat16, device=dev),
                        torch.zeros(E, H, INTER, dtype=torch.bfloat16, device=dev))
        self.graph, self.out, self.combined, self.captures = None, None, None, 0

    def body(self):
        return self.rank.case.run_step(self.rank.dispatcher, self.x, self.ids, self.ws, self.rank.rank, self.weights)

    def load(self, seed: int) -> tuple:
        xs, ids, ws, weights = self.rank.inputs(seed, [GRAPH_TOKENS] * R)
        me = self.rank.rank
        self.x.copy_(xs[me])
        self.ids.copy_(ids[me])
        self.ws.copy_(ws[me])
        for static, w in zip(self.weights, weights):
            static.copy_(w)
        return xs, ids, ws, weights

    def capture(self) -> None:
        """Capture after eager steps of the same shapes (the dispatcher's warm-up step is behind it)."""
        torch = self.torch
        if self.rank.device.type != "cuda":
            return
        side = torch.cuda.Stream(self.rank.device)
        side.wait_stream(torch.cuda.current_stream(self.rank.device))
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.stream(side), torch.cuda.graph(self.graph, stream=side):
            self.out, self.combined = self.body()
        torch.cuda.current_stream(self.rank.device).wait_stream(side)
        self.rank.sync()
        self.captures += 1

    def run(self, barrier, participants: int, seed: int, active: list[bool], label: str) -> float:
        """Fresh inputs into the static tensors, outputs poisoned, one replay, checked; returns its seconds."""
        rank = self.rank
        xs, ids, ws, weights = self.load(seed)
        if self.graph is not None:
            for t in (self.out.hidden_states, self.out.hidden_states_scale, self.out.masked_m, self.combined):
                if t is not None:
                    fill(t)
        else:
            rank.poison_last_recv()
        rank.sync()
        barrier.wait(participants)
        t0 = time.perf_counter()
        if self.graph is not None:
            self.graph.replay()
        else:
            self.out, self.combined = self.body()
            rank.last_recv = self.out.hidden_states
        rank.sync()
        seconds = time.perf_counter() - t0
        rank.check(label, rank.case.ll_output_errors(self.out, self.combined, rank.rank, xs, ids, ws, weights, active,
                                                     use_fp8=rank.args.fp8, m=M))
        barrier.wait(participants)
        return seconds


def fill(t) -> None:
    """Poison: NaN for floating tensors (0x7f, e4m3's NaN, for FP8), -5 for counts."""
    import torch

    if t.dtype == torch.float8_e4m3fn:
        t.view(torch.uint8).fill_(0x7F)
    elif t.is_floating_point():
        t.fill_(float("nan"))
    else:
        t.fill_(-5)


def run_member(rank: Rank) -> None:
    """Ranks 0..3 of the first incarnation: steps with four, then (survivors) the kill and the rejoin."""
    from sglang.srt.elastic_ep import elastic_ep

    args, tag, everyone = rank.args, rank.args.tag, [True] * R
    four = rank.Barrier(rank.store, f"{tag}/four")
    seed = 1000
    rank.ll_step(four, R, seed, everyone, "warm-up step (first dispatch builds the buffers)")
    rank.check("buffers built on SGLang's mask", rank.mask_errors([1] * R))
    for i in range(2):
        rank.ll_step(four, R, seed + 1 + i, everyone, f"low-latency step {i}")
        rank.normal_step(four, R, seed + 3 + i, everyone, f"normal-mode step {i}")
    graph = CapturedStep(rank)
    rank.ll_step(four, R, seed + 5, everyone, "eager step of the captured shapes", tokens=[GRAPH_TOKENS] * R)
    graph.capture()
    for i in range(2):
        graph.run(four, R, seed + 6 + i, everyone, f"graph replay {i}, four ranks")
    if rank.rank == VICTIM:
        write_result(rank)
        rank.store.set(f"{tag}/victim-ready", "1")
        time.sleep(args.timeout_s)  # the launcher SIGKILLs this process here
        raise RuntimeError("rank 3 was not killed")

    # ---- survivors ----
    rank.store.wait([f"{tag}/killed"], _td(60))
    survivors = [r != VICTIM for r in range(R)]
    three = rank.Barrier(rank.store, f"{tag}/three")
    seconds = graph.run(three, R - 1, seed + 10, survivors, "graph replay meeting the dead rank")
    rank.result["kill_step_s"] = round(seconds, 3)
    if seconds > args.step_timeout_s + 3.0:
        rank.check("the step meeting the dead rank is bounded", [f"took {seconds:.2f} s, deadline {args.step_timeout_s} s"])
    rank.check("SGLang's active_ranks cleared by eep's evidence, in place", rank.mask_errors([1] * (R - 1) + [0]))
    rank.normal_step(three, R - 1, seed + 11, survivors, "normal-mode step, survivors")
    graph.run(three, R - 1, seed + 12, survivors, "graph replay, survivors")
    rank.ll_step(three, R - 1, seed + 13, survivors, "low-latency step, survivors")
    repair_by_plan(rank, seed=7)

    # ---- rejoin ----
    rank.store.wait([f"{tag}/joiner-built"], _td(args.timeout_s))
    t0 = time.perf_counter()
    elastic_ep._refresh_ep_members()  # SGLang's member refresh; eep's hook maps rank 3 and moves the epoch
    rank.sync()
    rank.result["rejoin_s"] = round(time.perf_counter() - t0, 3)
    after_rejoin(rank, graph, seed)


def repair_by_plan(rank: Rank, seed: int) -> None:
    """A survivor: SGLang's rank-fault rebalance, taken over by eep's hook (module docstring, step 2)."""
    from types import SimpleNamespace

    import repair_case as rc
    from sglang.srt.elastic_ep import elastic_ep
    from sglang.srt.eplb import expert_location

    from eep import Membership, plan_repair
    from eep.integrations.sglang import repair
    from eep.integrations.sglang.placement import placement_from_sglang
    from eep.repair import TensorTier
    from eep.state import ExpertPlacement

    torch = rank.torch
    load = torch.rand(rc.NUM_LAYERS, rc.NUM_EXPERTS, generator=torch.Generator().manual_seed(seed)) * 100
    placement = ExpertPlacement.build(rc.NUM_LAYERS, rc.NUM_EXPERTS, R, rc.SLOTS, load)
    weights = rc.logical_weights(seed)
    metadata = rc.metadata_for(placement)
    experts = {layer: [w.to(rank.device) for w in ws] for layer, ws in rc.rank_weights(placement, weights,
                                                                                       rank.rank).items()}
    expert_location.set_global_expert_location_metadata(metadata, allow_overwrite=True)
    repair.configure(tiers=[TensorTier(weights)])
    survivors = [r != VICTIM for r in range(R)]
    plan_placement = plan_repair(placement, Membership(R), Membership(R, active=survivors, epoch=1),
                                 [TensorTier(weights)], expert_nbytes=1, layer_ids=rc.LAYER_IDS,
                                 rereplicate=False).placement
    ptrs = [metadata.physical_to_logical_map.data_ptr(), metadata.logical_to_all_physical_map.data_ptr()]
    manager = SimpleNamespace(_get_model=lambda: SimpleNamespace(routed_experts_weights_of_layer=experts),
                              rebalance=lambda: iter(()))  # SGLang's rebalance: must not be what runs
    records = []
    handler = _ListHandler(records)
    logging.getLogger("eep.integrations.sglang.hooks").addHandler(handler)
    logging.getLogger("eep.integrations.sglang.hooks").setLevel(logging.INFO)
    t0 = time.perf_counter()
    try:
        ran = elastic_ep.maybe_rebalance_after_rank_fault(eplb_manager=manager)
    finally:
        logging.getLogger("eep.integrations.sglang.hooks").removeHandler(handler)
    rank.sync()
    rank.result["repair_by_plan_s"] = round(time.perf_counter() - t0, 4)
    rank.result["repair_by_plan"] = records
    errors = [] if ran is True and rank.state.is_active_equal_last() else [f"the hook returned {ran}"]
    errors += [r for r in records if "falling back" in r or "refusing" in r]
    if not any("repair by plan" in r for r in records):
        errors.append(f"no repair-by-plan log line: {records}")
    if [metadata.physical_to_logical_map.data_ptr(), metadata.logical_to_all_physical_map.data_ptr()] != ptrs:
        errors.append("the maps' storage changed")
    now = placement_from_sglang(metadata, active=survivors, layers=rc.LAYER_IDS)
    if not now.equal(plan_placement):
        errors.append("the maps are not the plan's")
    if bool(((metadata.logical_to_all_physical_map[rc.LAYER_IDS] // rc.SLOTS) == VICTIM).any()):
        errors.append(f"the maps still list a slot of rank {VICTIM}")
    S = rc.SLOTS
    for row, layer in enumerate(rc.LAYER_IDS):
        w13, w2 = (w.cpu() for w in experts[layer])
        for i, e in enumerate(now.phys_to_logical[row, rank.rank * S:(rank.rank + 1) * S].tolist()):
            want = weights[layer]
            if not (torch.equal(w13[i, :rc.INTER], want[0][e]) and torch.equal(w13[i, rc.INTER:], want[1][e])
                    and torch.equal(w2[i], want[2][e])):
                errors.append(f"layer {layer} slot {i} does not hold expert {e}, which the maps name")
    rank.check("repair by eep's plan through SGLang's rank-fault hook (maps in place, slots restored, vote)", errors)
    repair.configure()


class _ListHandler(logging.Handler):
    def __init__(self, records: list):
        super().__init__(logging.INFO)
        self.records = records

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record.getMessage())


def run_joiner(rank: Rank) -> None:
    """The new process in rank 3's slot: builds its buffers, is admitted, steps with the survivors."""
    from sglang.srt.elastic_ep import elastic_ep

    tag = rank.args.tag
    buffer = rank.dispatcher.get_buffer()  # published in the store before anyone maps it
    warm_expert_stage(rank)
    rank.check("joiner's buffers built on SGLang's joiner mask", rank.mask_errors([0] * (R - 1) + [1]))
    rank.store.set(f"{tag}/joiner-built", "1")
    t0 = time.perf_counter()
    elastic_ep._refresh_ep_members()
    rank.sync()
    rank.result["rejoin_s"] = round(time.perf_counter() - t0, 3)
    rank.result["epoch"] = buffer.epoch
    after_rejoin(rank, None, 1000)


def warm_expert_stage(rank: Rank) -> None:
    """The expert stage once, locally (library handles, first-call costs), so this process's first step
    with the survivors is as quick as theirs: they wait for it no longer than the step deadline."""
    torch = rank.torch
    x = torch.zeros(LOCAL, R * M, rank.args.hidden, dtype=torch.bfloat16, device=rank.device)
    weights = tuple(w.to(rank.device) for w in rank.inputs(0)[3])
    rank.case.expert_outputs(x, None, rank.rank, weights)
    rank.sync()


def after_rejoin(rank: Rank, graph: CapturedStep | None, seed: int) -> None:
    everyone = [True] * R
    rank.result["epoch"] = rank.dispatcher.get_buffer().epoch
    rank.check("one agreed epoch", [] if rank.result["epoch"] == 1 else [f"epoch {rank.result['epoch']}, expected 1"])
    rank.check("SGLang's active_ranks written in place by the member refresh", rank.mask_errors([1] * R))
    four = rank.Barrier(rank.store, f"{rank.args.tag}/rejoined")
    for i in range(2):
        label = f"after the rejoin, step {i}"
        if graph is not None:
            graph.run(four, R, seed + 20 + i, everyone, label + " (graph captured before the kill)")
        else:
            rank.ll_step(four, R, seed + 20 + i, everyone, label + " (eager)", tokens=[GRAPH_TOKENS] * R)
    rank.normal_step(four, R, seed + 22, everyone, "normal-mode step after the rejoin")
    if graph is not None:
        rank.result["captures"] = graph.captures
        rank.check("no recapture", [] if graph.captures <= 1 else [f"{graph.captures} captures"])
    write_result(rank)


def write_result(rank: Rank) -> None:
    path = os.path.join(rank.args.out, f"sglang-{rank.args.tag}.{rank.role}{rank.rank}.json")
    with open(path + ".tmp", "w") as f:
        json.dump(rank.result, f, indent=1, default=str)
    os.replace(path + ".tmp", path)
    print(f"[sglang {rank.role}{rank.rank}] {len(rank.result['checks'])} checks, "
          f"{len(rank.result['errors'])} errors", flush=True)
    for e in rank.result["errors"]:
        print(f"[sglang {rank.role}{rank.rank}] {e[:2000]}", flush=True)


def rank_main(args) -> None:
    rank = None
    try:
        rank = Rank(args)
        (run_joiner if args.role == "join" else run_member)(rank)
    except Exception:
        if rank is None:
            rank = argparse.Namespace(args=args, rank=args.rank, role=args.role,
                                      result={"rank": args.rank, "role": args.role, "errors": [], "checks": []})
        rank.result["errors"].append(f"{args.role}{args.rank} raised:\n{traceback.format_exc()}")
        write_result(rank)
    sys.stdout.flush()
    os._exit(1 if rank.result["errors"] else 0)  # skips the teardown of a dead peer's mapping


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="/tmp/eep-sglang-gpu")
    p.add_argument("--fp8", action="store_true", help="FP8 low-latency dispatch (Mooncake's default), else bf16")
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--step-timeout-s", type=float, default=2.0, help="the dispatcher's deadline per wait")
    p.add_argument("--timeout-s", type=float, default=210.0, help="bound on the whole scenario")
    p.add_argument("--wheels", default=os.path.join(ROOT, ".whl"), help="folder of wheels to install SGLang from")
    p.add_argument("--site", default="/tmp/sgl", help="where those wheels are installed")
    p.add_argument("--role", choices=("rank", "join"), help=argparse.SUPPRESS)
    p.add_argument("--rank", type=int, help=argparse.SUPPRESS)
    p.add_argument("--port", type=int, help=argparse.SUPPRESS)
    p.add_argument("--tag", help=argparse.SUPPRESS)
    args = p.parse_args()
    args.forward = ["--out", args.out, "--device", args.device, "--hidden", str(args.hidden),
                    "--step-timeout-s", str(args.step_timeout_s), "--timeout-s", str(args.timeout_s)] + \
        (["--fp8"] if args.fp8 else [])
    if args.rank is None:
        return run_launcher(args)
    rank_main(args)
    return 1


if __name__ == "__main__":
    sys.exit(main())
