"""weights_tools: per-expert safetensors shards from Hugging Face MoE checkpoints, and tiered restore.

Offline: ``eep-shards prepare CHECKPOINT_DIR OUT_DIR`` (``prepare``), ``verify``, ``inspect``.
Runtime: ``ExpertStore(shard_dir, tiers=[HostTier(...), DiskTier(...)])`` restores one logical
expert into given tensors from the fastest tier holding a good copy; ``load_layer_experts``
gives one layer's stacked weights for ``eep.reference.ExpertParallelMoE``. Block-scaled FP8 experts
travel as ``eep.fp8.Fp8Weight`` (e4m3 weights with their 128x128 scales) through all of it.
Importing this package never imports a CUDA package.
"""

from weights_tools.checkpoint import CheckpointLayout, inspect_checkpoint
from weights_tools.errors import (CheckpointError, CorruptShardError, ExpertUnavailableError, HostTierError,
                                  ManifestError, MissingShardError, ShardError)
from weights_tools.manifest import Manifest, TensorEntry
from weights_tools.prepare import PrepareResult, prepare
from weights_tools.store import ExpertStore, RestoreRecord, load_layer_experts
from weights_tools.tiers import DiskTier, HostTier
from weights_tools.verify import ShardProblem, verify_shards

__all__ = ["CheckpointError", "CheckpointLayout", "CorruptShardError", "DiskTier", "ExpertStore",
           "ExpertUnavailableError", "HostTier", "HostTierError", "Manifest", "ManifestError", "MissingShardError",
           "PrepareResult", "RestoreRecord", "ShardError", "ShardProblem", "TensorEntry",
           "inspect_checkpoint", "load_layer_experts", "prepare", "verify_shards"]
