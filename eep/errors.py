"""Exceptions raised by eep. Every message names its culprit (rank, layer, expert, tensor, file)."""


class EEPError(Exception):
    """Base class for every error eep raises on purpose."""


class MembershipError(EEPError, ValueError):
    """A membership transition that is not allowed (failing a dead rank, joining an active one...)."""


class PlacementError(EEPError, ValueError):
    """A placement that is malformed, or that cannot be built or repaired with the slots available."""


class InsufficientSlotsError(PlacementError):
    """Coverage repair ran out of slots: more orphaned experts than spare plus donor slots."""

    def __init__(self, layer: int, orphans: list[int], num_missing: int, num_available: int):
        self.layer = layer
        self.orphans = orphans
        self.num_missing = num_missing
        self.num_available = num_available
        super().__init__(
            f"not enough slots to repair layer {layer}: {len(orphans)} logical experts lost every "
            f"replica ({_short_list(orphans)}), only {num_available} spare or donor slots remain on "
            f"surviving ranks; {num_missing} more slots are needed"
        )


class CoverageLostError(InsufficientSlotsError):
    """A membership change left experts with no replica on a live rank and too few slots to restore them
    (every layer at once). Whoever raises it must not serve: an answer would skip those experts.

    ``uncovered`` is ``{layer: [expert, ...]}``; ``num_missing_slots`` the slots per layer that are missing
    (the most any layer lacks); ``slots_per_rank`` what one rank brings back."""

    def __init__(self, uncovered: dict[int, list[int]], num_missing_slots: int, slots_per_rank: int):
        self.uncovered = {int(layer): list(experts) for layer, experts in sorted(uncovered.items())}
        self.num_missing_slots = int(num_missing_slots)
        self.slots_per_rank = int(slots_per_rank)
        first = next(iter(self.uncovered)) if self.uncovered else -1
        self.layer, self.orphans = first, self.uncovered.get(first, [])
        self.num_missing, self.num_available = self.num_missing_slots, 0
        layers = [f"layer {layer}: {_short_list(experts)}" for layer, experts in self.uncovered.items()]
        shown = "; ".join(layers[:6]) + (f"; ... {len(layers) - 6} more layers" if len(layers) > 6 else "")
        PlacementError.__init__(self, f"coverage lost: {shown} have no replica on a live rank; "
                                      f"{self.num_missing_slots} more expert slots per layer are needed "
                                      f"(a rank has {self.slots_per_rank})")


class RoutingError(EEPError, ValueError):
    """Bad routing input: out-of-range expert ids, wrong shapes or dtypes."""


class PeerUnreachableError(EEPError, ConnectionError):
    """Peers whose buffers could not be mapped in time (dead or stopped): their failure, not the caller's.

    ``ranks`` lists them; the others were connected. Callers report them as evidence, as they report
    a missed deadline."""

    def __init__(self, ranks: list[int], detail: str = ""):
        self.ranks = sorted(ranks)
        super().__init__(f"ranks {self.ranks} could not be connected" + (f": {detail}" if detail else ""))


def _short_list(items: list[int], limit: int = 8) -> str:
    shown = ", ".join(str(i) for i in items[:limit])
    return f"experts [{shown}{', ...' if len(items) > limit else ''}]"
