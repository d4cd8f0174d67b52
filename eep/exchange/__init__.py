"""The exchange seam: how token rows cross ranks, below the reference, the fused backends and the runtime.

``layout`` holds the receive-layout types every backend and the reference speak; ``tags`` the one
``(epoch, step)`` encoding every flag carries. docs/design.md "Exchange seam".
"""

from eep.exchange.layout import DispatchHandle, PackedHandle, PackedReceive, RankReceive
from eep.exchange.tags import first_tag, make_tag, split_tag

__all__ = ["DispatchHandle", "PackedHandle", "PackedReceive", "RankReceive", "first_tag", "make_tag", "split_tag"]
