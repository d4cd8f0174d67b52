"""State: membership, placement, validity and deterministic coverage repair. No device assumptions."""

from eep.state.membership import Membership
from eep.state.placement import NO_EXPERT, ExpertPlacement
from eep.state.repair import CoverageRepair, SlotAssignment, repair_coverage
from eep.state.validity import Clause, Problem, ValidityReport, check_validity

__all__ = ["Clause", "CoverageRepair", "ExpertPlacement", "Membership", "NO_EXPERT", "Problem",
           "SlotAssignment", "ValidityReport", "check_validity", "repair_coverage"]
