"""Transport: moves bytes between rank slots following the data plane's plan; makes no decisions."""

from eep.exchange.tags import make_tag, split_tag
from eep.transport.base import RecvResult, Transport
from eep.transport.shm import SharedMemoryTransport, create_shm_file, shm_nbytes

__all__ = ["RecvResult", "SharedMemoryTransport", "Transport", "create_shm_file", "make_tag", "shm_nbytes",
           "split_tag"]
