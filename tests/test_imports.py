"""`import eep` must stay light: no CUDA package of ours, no serving stack, no runtime."""

import subprocess
import sys

HEAVY = ("cuda.core", "eep.fused.buffer", "eep.fused.compile", "eep.fused.peer_memory", "sglang",
         "eep.integrations.sglang", "eep.runtime", "transformers")


def test_import_eep_loads_no_gpu_or_serving_module():
    code = ("import sys, eep, eep.fused; "
            f"print([m for m in sys.modules if m.startswith({HEAVY!r})])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120)
    assert out.stdout.strip() == "[]", out.stdout
