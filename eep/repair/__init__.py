"""Repair and reintegration: plans that make the instance valid again, fastest copy first."""

from eep.repair.bandwidth import Bandwidth, expert_weight_nbytes
from eep.repair.plan import (ExecutionReport, RepairError, RepairExecutor, RepairPlan, Rereplication, StepKind,
                             Transfer, plan_repair, plan_rereplication, run_transfers)
from eep.repair.reintegration import ReintegrationPlan, plan_reintegration
from eep.repair.slots import ExpertSlots, SlotExecutor, SlotStore
from eep.repair.tiers import DISK, HOST, PEER, ExpertSource, TensorTier, tier_order

__all__ = ["Bandwidth", "DISK", "ExecutionReport", "ExpertSlots", "ExpertSource", "HOST", "PEER",
           "ReintegrationPlan", "RepairError", "RepairExecutor", "RepairPlan", "Rereplication", "SlotExecutor",
           "SlotStore", "StepKind", "TensorTier", "Transfer", "expert_weight_nbytes", "plan_reintegration",
           "plan_repair", "plan_rereplication", "run_transfers", "tier_order"]
