"""Readable pure-PyTorch EP: the oracle every other path is differential-tested against."""

from eep.mlp import dense_moe, swiglu, swiglu_rounded
from eep.reference.dispatch import DispatchHandle, RankReceive, combine, dispatch, expert_mlp
from eep.reference.moe import ExpertParallelMoE

__all__ = ["DispatchHandle", "ExpertParallelMoE", "RankReceive", "combine", "dense_moe", "dispatch",
           "expert_mlp", "swiglu", "swiglu_rounded"]
