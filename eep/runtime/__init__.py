"""Runtime: the control plane and the CPU data plane with real processes (DESIGN.md layers 4 and 6).

``Launcher`` hosts the TCPStore, starts and supervises rank processes and runs the
``Coordinator``, the single decider of membership epochs; each rank (``eep.runtime.rank``) serves
decode steps over the shared-memory transport. See docs/runtime.md.
"""

from eep.runtime.checks import check_run
from eep.runtime.config import RuntimeConfig
from eep.runtime.keys import Key, store_key
from eep.runtime.launcher import Fault, Launcher, RunResult
from eep.runtime.model import TinyConfig, TinyWeights, generate_weights, reference_generate

__all__ = ["Fault", "Key", "Launcher", "RunResult", "RuntimeConfig", "TinyConfig", "TinyWeights", "check_run",
           "generate_weights", "reference_generate", "store_key"]
