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
