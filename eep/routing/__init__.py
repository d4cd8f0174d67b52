"""Routing: router logits -> logical top-k -> physical slots on active ranks."""

from eep.routing.finite import NonFiniteRows, check_finite_rows
from eep.routing.route import check_topk, route_to_phys
from eep.routing.topk import resolve_routing, select_experts

__all__ = ["NonFiniteRows", "check_finite_rows", "check_topk", "resolve_routing", "route_to_phys", "select_experts"]
