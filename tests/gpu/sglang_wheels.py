"""Make the folder of wheels tests/gpu/sglang_gpu.py installs SGLang from on a machine without network.

    python3 tests/gpu/sglang_wheels.py [--dest .whl] [--python-version 3.12]

Downloads (pip, binary wheels for CPython ``--python-version`` on manylinux x86_64) the sglang 0.5.23
wheel and the requirements its dispatcher, elastic-EP, EPLB and plugin modules import that a CUDA
PyTorch image without SGLang lacks (``REQUIREMENTS``: found by importing that chain with everything
else absent); the heavy requirements (sgl_kernel, flashinfer, ...) stay out, as in the CPU test venv
(tests/sglang/setup_env.sh), and ``tests/sglang/sglang_shims.py`` stands in for the imports that need
them. Then rewrites every wheel with LZMA compression (the same files, byte for byte, so the wheel's
RECORD still holds; pip reads LZMA members), which brings the folder from 47 to 40 MB.
"""

from __future__ import annotations

import argparse
import copy
import glob
import os
import subprocess
import sys
import zipfile

SGLANG = "sglang==0.5.23"
# pinned to the versions the CPU test venv runs SGLang with
REQUIREMENTS = ("orjson==3.13.0", "pybase64==1.5.1", "starlette==1.10.0", "msgspec==0.23.0", "pydantic==2.14.4",
                "pydantic-core==2.50.5", "typing-inspection==0.4.5", "annotated-types==0.8.0",
                "typing-extensions==4.16.0",  # pydantic needs a newer one than a CUDA image may have
                "pyzmq==27.3.0", "ipython==9.18.1", "traitlets==5.16.1", "dill==0.4.1", "apache-tvm-ffi==0.1.11",
                "compressed-tensors==0.18.0", "loguru==0.7.3", "gguf==0.19.0")
PLATFORMS = ("manylinux_2_34_x86_64", "manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64")


def download(dest: str, python_version: str) -> None:
    platforms = [arg for p in PLATFORMS for arg in ("--platform", p)]
    subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
                    "--python-version", python_version, "--implementation", "cp", *platforms, "-d", dest,
                    SGLANG, *REQUIREMENTS], check=True)


def recompress(path: str) -> tuple[int, int]:
    """Rewrite ``path`` with LZMA members; raises if any member's bytes change. Returns (before, after) bytes."""
    before, tmp = os.path.getsize(path), path + ".lzma"
    with zipfile.ZipFile(path) as src, zipfile.ZipFile(tmp, "w", zipfile.ZIP_LZMA) as dst:
        for info in src.infolist():
            dst.writestr(copy.copy(info), src.read(info), compress_type=zipfile.ZIP_LZMA)
    with zipfile.ZipFile(path) as src, zipfile.ZipFile(tmp) as new:
        if [(i.filename, i.CRC) for i in src.infolist()] != [(i.filename, i.CRC) for i in new.infolist()] \
                or new.testzip() is not None:
            raise RuntimeError(f"{path}: the recompressed wheel differs from the original")
    os.replace(tmp, path)
    return before, os.path.getsize(path)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dest", default=".whl")
    p.add_argument("--python-version", default="3.12")
    args = p.parse_args()
    os.makedirs(args.dest, exist_ok=True)
    download(args.dest, args.python_version)
    total = [0, 0]
    for path in sorted(glob.glob(os.path.join(args.dest, "*.whl"))):
        with zipfile.ZipFile(path) as z:
            if all(i.compress_type == zipfile.ZIP_LZMA for i in z.infolist()):
                size = os.path.getsize(path)
                total[0], total[1] = total[0] + size, total[1] + size
                continue
        before, after = recompress(path)
        total[0], total[1] = total[0] + before, total[1] + after
        print(f"{os.path.basename(path)}: {before / 1e6:.2f} -> {after / 1e6:.2f} MB", flush=True)
    print(f"{args.dest}: {total[1] / 1e6:.1f} MB ({total[0] / 1e6:.1f} MB as downloaded)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
