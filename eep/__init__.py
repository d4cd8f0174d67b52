"""eep: elastic expert parallelism for MoE serving.

Membership is explicit, mutable runtime state: when an EP rank dies the instance shrinks around
it, restores lost experts from the fastest copy, and later takes the repaired rank back.

Importing eep never imports a CUDA package; ``eep.fused`` loads cuda-python lazily.
"""

from eep.errors import (CoverageLostError, EEPError, InsufficientSlotsError, MembershipError, PlacementError,
                        RoutingError)
from eep.integrations.buffer import Buffer
from eep.repair import (Bandwidth, RepairError, RepairPlan, ReintegrationPlan, StepKind, Transfer,
                        plan_reintegration, plan_repair)
from eep.routing import route_to_phys, select_experts
from eep.state import (NO_EXPERT, Clause, CoverageRepair, ExpertPlacement, Membership, Problem,
                       SlotAssignment, ValidityReport, check_validity, repair_coverage)

__version__ = "0.1.0"

__all__ = ["Buffer", "Bandwidth", "RepairError", "RepairPlan", "ReintegrationPlan", "StepKind", "Transfer",
           "plan_reintegration", "plan_repair", "Clause", "CoverageLostError", "CoverageRepair", "EEPError", "ExpertPlacement", "InsufficientSlotsError", "Membership",
           "MembershipError", "NO_EXPERT", "PlacementError", "Problem", "RoutingError", "SlotAssignment",
           "ValidityReport", "check_validity", "repair_coverage", "route_to_phys", "select_experts"]
