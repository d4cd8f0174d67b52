"""Every ``EEP_*`` environment variable eep reads, in one place.

Each is read by a function (not at import time), so a test or a launcher can set the variable
before the value is needed. Defaults are the production values; tests pass shorter timeouts
explicitly through ``eep.runtime.RuntimeConfig`` rather than through the environment.

| variable | default | meaning |
| --- | --- | --- |
| ``EEP_SECRET`` | (random per launch) | HMAC key for membership decisions, join requests, heartbeats |
| ``EEP_STORE_HOST`` | ``127.0.0.1`` | address the launcher's TCPStore listens on (loopback unless given) |
| ``EEP_STORE_PORT`` | ``0`` | its port (0: pick a free one) |
| ``EEP_HEARTBEAT_INTERVAL_MS`` | ``100`` | rank heartbeat period |
| ``EEP_SUSPECT_MISSES`` | ``5`` | consecutive missed heartbeats before a rank is declared dead |
| ``EEP_CORROBORATE_MISSES`` | ``3`` | missed heartbeats that, with a peer's transport-timeout report and no resync ack, make a rank dead |
| ``EEP_TRANSPORT_TIMEOUT_MS`` | ``1000`` | bounded wait of a receive for one active peer |
| ``EEP_SHM_DIR`` | ``/dev/shm`` | where the shared-memory transport file lives |
| ``EEP_LOG_LEVEL`` | ``WARNING`` | logging level of the runtime loggers |
| ``EEP_CHECK_DEVICE_INPUT`` | ``0`` | ``1``: check device tensors of routing input for NaN/inf on the host too (one sync per call; ``eep.routing.finite``) |
| ``EEP_GEMM_CACHE_DIR`` | ``~/.cache/eep/gemm`` | where the nvcc-built CUTLASS expert-GEMM library is cached |
| ``EEP_CUTLASS_DIR`` | (the ``nvidia-cutlass`` wheel's copy) | CUTLASS tree holding ``include/`` and ``tools/util/include`` |
| ``EEP_EXPERT_BACKEND`` | ``auto`` | expert stage of ``eep.fused``: ``cutlass``, ``grouped_mm``, ``loop`` or ``auto`` |
| ``EEP_FUSED_TIMEOUT_S`` | ``1.0`` | bound on every wait of the fused kernels (a device value) |
| ``EEP_FUSED_BLOCKS`` | ``0`` (one per SM) | grid size of the fused dispatch/combine kernels |
| ``EEP_FUSED_VEC_PER_LANE`` | ``4`` | 16-byte vectors each lane copies per chunk |
| ``EEP_FUSED_KERNELS`` | ``v1`` | kernel set of the fused buffers built without an explicit ``kernels=``: ``v1`` or ``v2`` |
| ``EEP_FUSED_PDL`` | ``0`` | ``1``: kernel set v2 launches its decode kernels with programmatic dependent launch (``FusedBuffer(pdl=...)``) |
| ``EEP_FUSED_CACHE_DIR`` | ``~/.cache/eep/fused`` | NVRTC cubin cache of the fused kernels |
| ``EEP_HOST_TIER_DIR`` | ``/dev/shm`` | where weights_tools' shared host tier file lives |
| ``EEP_SGLANG_SHM_PATH`` | (agreed through SGLang's store) | transport file of the SGLang plugin (CPU) |
| ``EEP_SGLANG_REPLACE`` | ``mooncake`` | SGLang a2a backends the plugin replaces (comma-separated) |
| ``EEP_SGLANG_CONNECT_TIMEOUT_S`` | ``300`` | the SGLang plugin's bound on mapping the peers' buffers when it builds its own |
| ``EEP_SGLANG_REPAIR`` | ``plan`` | how the SGLang plugin repairs a rank fault: ``plan`` (eep's plan) or ``sglang`` (SGLang's own rebalance) |
| ``EEP_SGLANG_SHARD_DIR`` | (none) | weights_tools shard directory: the SGLang plugin's host and disk tiers for orphan restores |
| ``EEP_SGLANG_VOTE_TIMEOUT_S`` | ``60`` | the SGLang plugin's bound on the survivors' vote before a repair switches the maps |
"""

from __future__ import annotations

import os


def _parsed(name: str, default, parse, what: str):
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        return parse(raw)
    except ValueError as exc:
        raise ValueError(f"environment variable {name}={raw!r} is not {what}") from exc


def _int(name: str, default: int) -> int:
    return _parsed(name, default, int, "an integer")


def _float(name: str, default: float) -> float:
    return _parsed(name, default, float, "a number")


def secret() -> bytes | None:
    """``EEP_SECRET`` as bytes, or None when unset (the launcher then generates one)."""
    raw = os.environ.get("EEP_SECRET")
    return raw.encode() if raw else None


def store_host() -> str:
    return os.environ.get("EEP_STORE_HOST") or "127.0.0.1"


def store_port() -> int:
    return _int("EEP_STORE_PORT", 0)


def heartbeat_interval_ms() -> int:
    return _int("EEP_HEARTBEAT_INTERVAL_MS", 100)


def suspect_misses() -> int:
    return _int("EEP_SUSPECT_MISSES", 5)


def corroborate_misses() -> int:
    return _int("EEP_CORROBORATE_MISSES", 3)


def transport_timeout_ms() -> int:
    return _int("EEP_TRANSPORT_TIMEOUT_MS", 1000)


def shm_dir() -> str:
    return os.environ.get("EEP_SHM_DIR") or ("/dev/shm" if os.path.isdir("/dev/shm") else "/tmp")


def log_level() -> str:
    return os.environ.get("EEP_LOG_LEVEL") or "WARNING"


def check_device_input() -> bool:
    return os.environ.get("EEP_CHECK_DEVICE_INPUT", "0") not in ("", "0")


def gemm_cache_dir() -> str:
    return os.environ.get("EEP_GEMM_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "eep", "gemm")


def cutlass_dir() -> str | None:
    return os.environ.get("EEP_CUTLASS_DIR") or None


def expert_backend() -> str:
    return os.environ.get("EEP_EXPERT_BACKEND") or "auto"


def fused_timeout_s(default: float) -> float:
    return _float("EEP_FUSED_TIMEOUT_S", default)


def fused_blocks() -> int:
    return _int("EEP_FUSED_BLOCKS", 0)


def fused_vec_per_lane() -> int:
    return _int("EEP_FUSED_VEC_PER_LANE", 4)


def fused_kernels() -> str:
    return os.environ.get("EEP_FUSED_KERNELS") or "v1"


def fused_pdl() -> bool:
    return _int("EEP_FUSED_PDL", 0) != 0


def fused_cache_dir() -> str:
    return os.environ.get("EEP_FUSED_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "eep", "fused")


def host_tier_dir() -> str:
    return os.environ.get("EEP_HOST_TIER_DIR") or ("/dev/shm" if os.path.isdir("/dev/shm") else "/tmp")


# The SGLang plugin's variables by name: its messages and tests name them too.
SGLANG_SHM_PATH = "EEP_SGLANG_SHM_PATH"
SGLANG_REPLACE = "EEP_SGLANG_REPLACE"
SGLANG_CONNECT_TIMEOUT_S = "EEP_SGLANG_CONNECT_TIMEOUT_S"
SGLANG_REPAIR = "EEP_SGLANG_REPAIR"
SGLANG_SHARD_DIR = "EEP_SGLANG_SHARD_DIR"
SGLANG_VOTE_TIMEOUT_S = "EEP_SGLANG_VOTE_TIMEOUT_S"


def sglang_shm_path() -> str | None:
    return os.environ.get(SGLANG_SHM_PATH) or None


def sglang_replace(default: str) -> str:
    return os.environ.get(SGLANG_REPLACE, default)


def sglang_connect_timeout_s() -> float:
    """Ranks reach their first MoE layer (where the plugin builds its buffers) minutes apart when
    their weights load at different speeds, hence the long default."""
    return _float(SGLANG_CONNECT_TIMEOUT_S, 300.0)


def sglang_repair() -> str:
    value = os.environ.get(SGLANG_REPAIR) or "plan"
    if value not in ("plan", "sglang"):
        raise ValueError(f"environment variable {SGLANG_REPAIR}={value!r} is not 'plan' or 'sglang'")
    return value


def sglang_shard_dir() -> str | None:
    return os.environ.get(SGLANG_SHARD_DIR) or None


def sglang_vote_timeout_s() -> float:
    return _float(SGLANG_VOTE_TIMEOUT_S, 60.0)
