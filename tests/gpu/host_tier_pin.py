"""On a GPU: a host tier that cannot be page-locked stays pageable, warns once, and breaks nothing.

    python tests/gpu/host_tier_pin.py [--out DIR] [--disk-dir DIR]

1. A host tier in a file on a disk filesystem, asked to pin: it is not registered (one warning
   naming the reason), GPU copies from it equal the disk tier's bytes, and CUDA work afterwards runs.
2. What a failed ``cudaHostRegister`` leaves behind: registering a disk-file mapping directly fails,
   the next kernel launch reports the stale error (what crashed ranks at ``embed.to(device)``), and
   after ``weights_tools.tiers._consume_cuda_error`` the process's CUDA calls work again.
3. A host tier in /dev/shm asked to pin is page-locked, and copies from it on a stream are right.
Writes ``host_tier_pin.json`` under ``--out``; exits non-zero on any failed check.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT), str(ROOT / "perf")]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", default="/tmp/eep-gpu-out")
    ap.add_argument("--disk-dir", default="/tmp", help="a directory on a disk filesystem (not tmpfs)")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    logging.basicConfig(level=logging.WARNING, format="%(name)s %(levelname)s %(message)s")
    assert torch.cuda.is_available(), "needs a GPU"
    import failure_bench
    from weights_tools import DiskTier, HostTier
    from weights_tools.tiers import _consume_cuda_error, _filesystem_type, _MEMORY_FILESYSTEMS

    work = Path(tempfile.mkdtemp(prefix="eep-pin-", dir=args.disk_dir))
    report: dict = {"disk_dir": str(work), "disk_fs": hex(_filesystem_type(str(work)) or 0)}
    checks: list[tuple[str, bool]] = []
    try:
        fb_args = failure_bench.parse_args(["--dry-run", "--out", str(out / "pin-shards")])
        shard_dir = str(work / "shards")
        failure_bench.write_random_checkpoint(str(work / "ckpt"), failure_bench.model_config(fb_args))
        from weights_tools import prepare
        prepare(str(work / "ckpt"), shard_dir, quiet=True, force=True)
        disk = DiskTier(shard_dir)
        layer, expert = disk.manifest.moe_layers[-1], 3
        want = [t.cuda() for t in _expert(disk, layer, expert)]

        # 1. a tier in a disk file
        warnings = _CountWarnings()
        logging.getLogger("weights_tools").addHandler(warnings)
        t = time.perf_counter()
        host = HostTier(shard_dir, path=str(work / "host.safetensors"), pin=True)
        report["disk_tier_attach_s"] = time.perf_counter() - t
        report["disk_tier_pin_refusal"] = host.pin_refusal
        got = [torch.empty_like(w) for w in want]
        stream = torch.cuda.Stream()
        for _ in range(3):
            host.copy_expert_into(layer, expert, *got, stream=stream)
        torch.cuda.synchronize()
        embed = torch.randn(1024, 2048).to("cuda")  # where a stale error used to surface
        checks += [("disk tier not pinned", not host.is_pinned),
                   ("one warning naming the reason", warnings.count == 1 and "disk filesystem" in warnings.last),
                   ("copies from the pageable tier are exact", all(torch.equal(a, b) for a, b in zip(got, want))),
                   ("CUDA work after it runs", bool(torch.isfinite(embed @ embed.T).all()))]

        # 2. a failed registration and the error it leaves
        if _filesystem_type(host.path) not in _MEMORY_FILESYSTEMS:
            code = int(torch.cuda.cudart().cudaHostRegister(host._buffer.data_ptr(), host.nbytes, 0))
            report["direct_register_code"] = code
            if code != 0:
                try:
                    torch.ones(4, device="cuda").add_(1)
                    report["stale_error_surfaced"] = False
                except RuntimeError as exc:
                    report["stale_error_surfaced"] = str(exc).splitlines()[0]
                torch.cuda.cudart().cudaHostRegister(host._buffer.data_ptr(), host.nbytes, 0)  # fails again
                _consume_cuda_error()
                ok = bool((torch.ones(4, device="cuda") + 1).eq(2).all())
                checks.append(("after consuming the error CUDA calls work", ok))
            else:
                torch.cuda.cudart().cudaHostUnregister(host._buffer.data_ptr())
                report["note"] = "this driver registered a disk-file mapping: the pre-check is conservative here"
        host.close()

        # 3. a tier in /dev/shm is pinned
        shm = Path("/dev/shm")
        if shm.is_dir() and shutil.disk_usage(shm).free > 64 << 20:
            path = shm / f"eep-pin-check-{os.getpid()}.safetensors"
            try:
                pinned = HostTier(shard_dir, path=str(path), pin=True)
                got = [torch.empty_like(w) for w in want]
                pinned.copy_expert_into(layer, expert, *got, stream=stream)
                torch.cuda.synchronize()
                checks += [("/dev/shm tier pinned", pinned.is_pinned),
                           ("copies from the pinned tier are exact", all(torch.equal(a, b) for a, b in zip(got, want)))]
                pinned.close()
            finally:
                for p in (path, Path(str(path) + ".lock")):
                    p.unlink(missing_ok=True)
        else:
            report["shm"] = "too small or absent: pinned case skipped"
    finally:
        shutil.rmtree(work, ignore_errors=True)
    report["checks"] = {name: ok for name, ok in checks}
    (out / "host_tier_pin.json").write_text(json.dumps(report, indent=1))
    print(json.dumps(report, indent=1))
    return 0 if all(ok for _, ok in checks) else 1


def _expert(disk, layer: int, expert: int) -> list[torch.Tensor]:
    from weights_tools import ExpertStore

    return list(ExpertStore(disk.shard_dir, tiers=[disk]).load_expert(layer, expert))


class _CountWarnings(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.count, self.last = 0, ""

    def emit(self, record: logging.LogRecord) -> None:
        if "stays pageable" in record.getMessage():
            self.count += 1
            self.last = record.getMessage()


if __name__ == "__main__":
    raise SystemExit(main())
