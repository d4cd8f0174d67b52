"""Runtime: the control plane (``eep.runtime.control``) and the engines (``eep.runtime.engines``).

``Launcher`` hosts the TCPStore, starts and supervises rank processes and runs the ``Coordinator``,
the single decider of membership epochs; each rank process (``eep.runtime.control.rank``) serves
decode steps through its engine. See docs/runtime.md.
"""

from eep.runtime.config import RuntimeConfig
from eep.runtime.control.keys import Key, store_key
from eep.runtime.control.launcher import Fault, Launcher, RunResult
from eep.runtime.model import TinyConfig, TinyWeights, generate_weights, reference_generate

__all__ = ["Fault", "Key", "Launcher", "RunResult", "RuntimeConfig", "TinyConfig", "TinyWeights",
           "generate_weights", "reference_generate", "store_key"]
