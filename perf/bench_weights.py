"""Benchmark weights_tools against the plain operations that bound it (ratios, measured side by side).

    prepare            vs  shutil.copyfile of the same checkpoint files (read + write the same bytes)
    disk-tier restore  vs  a raw sequential read of the same expert files into a preallocated buffer
    host-tier restore  vs  memcpy (torch copy_) of the same number of bytes, one expert at a time

Targets: prepare <= 1.5x copy time; disk restore >= 70% of raw read rate; host restore
>= 50% of memcpy rate. Warm page cache unless --cold (posix_fadvise DONTNEED before each read run).

    .venv/bin/python perf/bench_weights.py [--hidden 1024 --inter 256 --experts 32 --layers 4] [--repeats 5]

``--gpu`` adds host tier -> GPU: what a restarted rank pays to fill its slots (attach + cudaHostRegister
of the whole mapping + pinned copies, vs attach + pageable copies of the same experts).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shutil
import sys
import tempfile
import time

import torch
from safetensors.torch import save_file

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from weights_tools import DiskTier, ExpertStore, HostTier, prepare  # noqa: E402


def write_checkpoint(root: str, hidden: int, inter: int, num_experts: int, num_layers: int,
                     dtype: torch.dtype) -> int:
    """A Qwen3-MoE-shaped checkpoint, one file per layer (as the Hub shards big models); returns bytes."""
    os.makedirs(root, exist_ok=True)
    gen = torch.Generator().manual_seed(0)
    weight_map, total = {}, 0
    for layer in range(num_layers):
        name = f"model-{layer + 1:05d}-of-{num_layers:05d}.safetensors"
        tensors = {f"model.layers.{layer}.mlp.gate.weight": torch.randn(num_experts, hidden, generator=gen).to(dtype),
                   f"model.layers.{layer}.self_attn.o_proj.weight": torch.randn(hidden, hidden, generator=gen).to(dtype)}
        for e in range(num_experts):
            pre = f"model.layers.{layer}.mlp.experts.{e}."
            tensors[pre + "gate_proj.weight"] = torch.randn(inter, hidden, generator=gen).to(dtype)
            tensors[pre + "up_proj.weight"] = torch.randn(inter, hidden, generator=gen).to(dtype)
            tensors[pre + "down_proj.weight"] = torch.randn(hidden, inter, generator=gen).to(dtype)
        save_file(tensors, os.path.join(root, name))
        weight_map.update({k: name for k in tensors})
        total += os.path.getsize(os.path.join(root, name))
    json.dump({"weight_map": weight_map}, open(os.path.join(root, "model.safetensors.index.json"), "w"))
    json.dump({"model_type": "qwen3_moe", "architectures": ["Qwen3MoeForCausalLM"], "hidden_size": hidden,
               "moe_intermediate_size": inter, "num_experts": num_experts, "num_experts_per_tok": 4,
               "num_hidden_layers": num_layers, "norm_topk_prob": True}, open(os.path.join(root, "config.json"), "w"))
    return total


def timed(fns: dict, repeats: int, before=None) -> dict:
    """Best (minimum) wall seconds of each function over ``repeats`` runs, interleaved (a, b, a, b, ...):
    on a shared machine the minimum is the least-disturbed run, and interleaving exposes the candidate
    and its baseline to the same background load."""
    times: dict = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            if before is not None:
                before()
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: min(ts) for name, ts in times.items()}


def drop_cache(paths: list[str]) -> None:
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        os.close(fd)


def host_to_gpu(shards: str, host_path: str, pairs: list, one: int, fraction: float, repeats: int) -> dict:
    """What a restarted rank pays to fill its slots from the host tier: attach + cudaHostRegister of the
    whole mapping, then asynchronous copies of its share of the experts — against attaching without
    pinning and copying the same experts from pageable memory. Same file, same process, interleaved."""
    device = torch.device("cuda")
    share = pairs[::max(1, round(1 / fraction))] if fraction < 1 else pairs
    nbytes = one * len(share)
    shapes = ExpertStore(shards).expert_shapes()
    dst = [[torch.empty(s, dtype=torch.bfloat16, device=device) for s in shapes] for _ in range(len(share))]
    stream = torch.cuda.Stream()
    attach, load = {}, {}

    def run(pin: bool) -> None:
        start = time.perf_counter()
        tier = HostTier(shards, path=host_path, pin=pin)
        attached = time.perf_counter()
        if pin and not tier.is_pinned:
            raise RuntimeError(f"cudaHostRegister failed for {host_path}: the pinned case cannot be timed")
        for (layer, expert), d in zip(share, dst):
            tier.copy_expert_into(layer, expert, *d, stream=stream)
        stream.synchronize()
        done = time.perf_counter()
        attach.setdefault(pin, []).append(attached - start)
        load.setdefault(pin, []).append(done - attached)
        tier.close()

    run(False)  # warm: pages faulted in, CUDA context made
    for _ in range(max(2, repeats)):
        run(True)
        run(False)
    a_pin, a_pg = min(attach[True]), min(attach[False])
    l_pin, l_pg = min(load[True]), min(load[False])
    tier_bytes = os.path.getsize(host_path)
    print(f"host tier -> {torch.cuda.get_device_name()}: tier {tier_bytes / 1e9:.2f} GB, load {len(share)} experts "
          f"({nbytes / 1e9:.2f} GB): pinned attach {a_pin:.3f} s ({tier_bytes / a_pin / 1e9:.1f} GB/s registered) + "
          f"load {l_pin:.3f} s ({nbytes / l_pin / 1e9:.1f} GB/s) = {a_pin + l_pin:.3f} s; pageable attach "
          f"{a_pg:.3f} s + load {l_pg:.3f} s ({nbytes / l_pg / 1e9:.1f} GB/s) = {a_pg + l_pg:.3f} s: "
          f"pageable/pinned {(a_pg + l_pg) / (a_pin + l_pin):.2f}x the time", flush=True)
    return {"gpu_pin_register_gbps": tier_bytes / a_pin / 1e9, "gpu_pinned_load_gbps": nbytes / l_pin / 1e9,
            "gpu_pageable_load_gbps": nbytes / l_pg / 1e9,
            "gpu_restart_fill_pageable_over_pinned": (a_pg + l_pg) / (a_pin + l_pin)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--inter", type=int, default=256)
    ap.add_argument("--experts", type=int, default=32)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--cold", action="store_true", help="evict the files from the page cache before read runs")
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--gpu", action="store_true", help="also time host tier -> GPU: pinning vs pageable loads")
    ap.add_argument("--gpu-load-fraction", type=float, default=0.375,
                    help="share of the experts a restarted rank loads (48 slots of 128 experts: 0.375); "
                         "every round(1/F)-th (layer, expert) is loaded, so 0.375 loads every 3rd")
    args = ap.parse_args()

    work = args.workdir or tempfile.mkdtemp(prefix="eep-bench-weights-")
    ckpt, out, copy_dir = (os.path.join(work, d) for d in ("ckpt", "shards", "copy"))
    nbytes_src = write_checkpoint(ckpt, args.hidden, args.inter, args.experts, args.layers, torch.bfloat16)
    src_files = sorted(os.path.join(ckpt, n) for n in os.listdir(ckpt))
    print(f"checkpoint: {nbytes_src / 1e6:.0f} MB, hidden {args.hidden}, inter {args.inter}, "
          f"{args.experts} experts x {args.layers} layers, bf16; {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} CPUs, torch {torch.__version__}", flush=True)
    results = {}

    # ---- prepare vs copy ----
    def copy_all():
        os.makedirs(copy_dir, exist_ok=True)
        for p in src_files:
            shutil.copyfile(p, os.path.join(copy_dir, os.path.basename(p)))

    def run_prepare():
        prepare(ckpt, out, quiet=True, force=True)

    def clean():
        shutil.rmtree(copy_dir, ignore_errors=True)
        shutil.rmtree(out, ignore_errors=True)
        if args.cold:
            drop_cache(src_files)

    hash_buf = bytearray(max(os.path.getsize(p) for p in src_files))

    def sha256_only():  # the floor: prepare must hash every byte once
        for p in src_files:
            with open(p, "rb", buffering=0) as f:
                n = f.readinto(hash_buf)
            hashlib.sha256(memoryview(hash_buf)[:n]).hexdigest()

    t = timed({"copy": copy_all, "prepare": run_prepare, "sha256": sha256_only}, args.repeats, before=clean)
    t_copy, t_prep = t["copy"], t["prepare"]
    results["prepare_over_copy"] = t_prep / t_copy
    results["sha256_only_over_copy"] = t["sha256"] / t_copy
    print(f"prepare {t_prep:.3f} s vs copy {t_copy:.3f} s: {t_prep / t_copy:.2f}x the copy time (target <= 1.5x); "
          f"read + sha256 alone {t['sha256']:.3f} s = {t['sha256'] / t_copy:.2f}x")
    prepare(ckpt, out, quiet=True)

    # ---- disk-tier restore vs raw sequential read ----
    store = ExpertStore(out)
    m = store.manifest
    expert_files = sorted({os.path.join(out, t.file) for t in m.tensors if t.expert is not None})
    nbytes_experts = sum(os.path.getsize(p) for p in expert_files)
    shapes = store.expert_shapes()
    dsts = [[torch.empty(s, dtype=store.dtype) for s in shapes] for _ in range(len(m.moe_layers))]
    raw_buf = bytearray(max(os.path.getsize(p) for p in expert_files))

    def raw_read():
        for p in expert_files:
            with open(p, "rb", buffering=0) as f:
                f.readinto(raw_buf)

    def restore(verify: bool):
        def run():
            tier = DiskTier(out, manifest=m, verify=verify)  # fresh handles: nothing cached between runs
            for expert in range(m.num_experts):
                for i, layer in enumerate(m.moe_layers):
                    tier.copy_expert_into(layer, expert, *dsts[i])
        return run

    before = (lambda: drop_cache(expert_files)) if args.cold else None
    raw_read()  # warm
    t = timed({"raw": raw_read, "sha": restore(True), "nosha": restore(False)}, args.repeats, before)
    t_raw = t["raw"]
    for verify, name in ((True, "sha"), (False, "nosha")):
        key = f"disk_restore_rate_vs_read{'' if verify else '_nosha'}"
        results[key] = t_raw / t[name]
        print(f"disk restore (sha256 {'on' if verify else 'off'}) {nbytes_experts / t[name] / 1e9:.2f} GB/s vs raw "
              f"read {nbytes_experts / t_raw / 1e9:.2f} GB/s: {t_raw / t[name]:.0%} (target >= 70%)")

    # ---- host-tier restore vs memcpy ----
    host = HostTier(out, path=os.path.join(work, "host.safetensors"), pin=False)
    pairs = m.expert_pairs()
    one = m.expert_nbytes(*pairs[0])
    # The baseline copies the same bytes from the same kind of place: distinct expert-sized slices of
    # a buffer as large as the host tier, so neither side is served from the CPU cache.
    src_big = torch.empty(one * len(pairs), dtype=torch.uint8).random_(0, 255)
    dst_flat = torch.empty(one, dtype=torch.uint8)
    dst = [torch.empty(s, dtype=store.dtype) for s in shapes]
    host_store = ExpertStore(out, tiers=[host])

    def memcpy():
        for i in range(len(pairs)):
            dst_flat.copy_(src_big[i * one:(i + 1) * one])

    def host_restore():
        for layer, expert in pairs:
            host.copy_expert_into(layer, expert, *dst)

    def host_store_restore():
        for layer, expert in pairs:
            host_store.load_expert_into(layer, expert, *dst)

    memcpy(), host_restore()  # warm: fault the pages in once
    t = timed({"memcpy": memcpy, "host": host_restore, "store": host_store_restore}, args.repeats)
    t_mem, t_host, t_store = t["memcpy"], t["host"], t["store"]
    results["host_restore_rate_vs_memcpy"] = t_mem / t_host
    results["host_store_rate_vs_memcpy"] = t_mem / t_store
    total = one * len(pairs)
    print(f"host restore {total / t_host / 1e9:.2f} GB/s (through ExpertStore {total / t_store / 1e9:.2f} GB/s) vs "
          f"memcpy {total / t_mem / 1e9:.2f} GB/s, {one / 1e6:.2f} MB per expert: {t_mem / t_host:.0%} "
          f"({t_mem / t_store:.0%} through the store) (target >= 50%)")
    if args.gpu:
        results.update(host_to_gpu(out, host.path, pairs, one, args.gpu_load_fraction, args.repeats))
    host.close()
    host.unlink()
    print(json.dumps({k: round(v, 3) for k, v in results.items()}))
    if not args.workdir:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
