"""``RuntimeConfig``: every knob of one elastic run, shared by the launcher and its ranks."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from eep import envs
from eep.state.placement import default_num_redundant, default_slots_per_rank
from eep.runtime.model import TinyConfig


@dataclass
class RuntimeConfig:
    num_ranks: int = 4
    # None: chosen from num_ranks and the model (eep.state.placement.default_slots_per_rank and
    # default_num_redundant); at 4 ranks and 16 experts, 8 slots per rank = 16 primaries + 8
    # redundant replicas + 8 spare slots, and any two ranks may die together
    slots_per_rank: int | None = None
    num_redundant: int | None = None
    max_tokens_per_rank: int = 8  # decode batch per rank (one token per request per step)
    # batch per rank while a rank slot is inactive: survivors absorb the missing rank's share
    # (engines size their buffers for it and capture a graph for it); None: max_tokens_per_rank
    degraded_tokens_per_rank: int | None = None
    num_requests: int = 400
    max_new_tokens: int = 12
    model: TinyConfig = field(default_factory=TinyConfig)
    shard_dir: str | None = None  # restore experts from eep-shards output instead of the generated copy
    # data plane (eep/runtime/engines/base.py): "shm" (CPU), "fused" / "fused_fixed" (GPU, eep/runtime/engines/gpu.py)
    engine: str = "shm"
    engine_options: dict = field(default_factory=dict)  # engine-specific knobs (GpuEngine documents its own)

    heartbeat_interval_s: float = field(default_factory=lambda: envs.heartbeat_interval_ms() / 1000)
    suspect_misses: int = field(default_factory=envs.suspect_misses)  # K consecutive misses => dead
    # a rank a peer reported (transport timeout) that also misses this many beats and does not ack
    # the resync is dead without waiting out the whole suspicion window (docs/runtime.md)
    corroborate_misses: int = field(default_factory=envs.corroborate_misses)
    transport_timeout_s: float = field(default_factory=lambda: envs.transport_timeout_ms() / 1000)
    restart_after_s: float | None = None  # restart a dead rank after this long (None: never)
    max_restarts: int = 3  # per rank slot
    orphan_grace_s: float = 1.0  # a rank whose launcher died exits within heartbeat + this
    startup_timeout_s: float = 60.0
    shutdown_grace_s: float = 3.0
    warmup_steps: int = 3
    step_delay_s: float = 0.0  # artificial per-step work (demo pacing); 0 in tests

    # repair (docs/runtime.md "Repair by plan"): the link model every process plans with (keys of
    # eep.repair.Bandwidth; None: its defaults), never measured per process, so plans agree
    bandwidth: dict | None = None
    # an epoch that lost coverage serves nothing: its requests wait this long for a rejoin that
    # restores coverage, then are refused naming the uncovered experts (at once if no rank can rejoin)
    uncovered_hold_s: float = 10.0
    # after a repair, fill the members' spare slots with extra replicas copied from live peers while
    # serving, then switch the maps in one short commit, so the next failure is routing-only where
    # slots allow (docs/runtime.md "Re-replication")
    rereplicate: bool = True
    # a member still copying its slots for an epoch may take this long before its peers report it
    # (its heartbeat keeps it alive meanwhile; a dead or stopped one is caught by the usual evidence)
    restore_timeout_s: float = 60.0
    # tests only: pace each rank's restores to this many GB/s, so a fault can land while they run
    restore_pace_gbps: float | None = None

    store_host: str = field(default_factory=envs.store_host)
    store_port: int = field(default_factory=envs.store_port)

    def __post_init__(self):
        if self.slots_per_rank is None:
            self.slots_per_rank = default_slots_per_rank(self.model.num_experts, self.num_ranks)
        if self.num_redundant is None:
            self.num_redundant = default_num_redundant(self.model.num_experts, self.num_ranks, self.slots_per_rank)

    @property
    def suspicion_window_s(self) -> float:
        """How long a rank may stay silent before it is declared dead."""
        return self.heartbeat_interval_s * self.suspect_misses

    @property
    def token_capacity(self) -> int:
        """The most tokens one rank may hold in a step (what data-plane buffers are sized for)."""
        return max(self.max_tokens_per_rank, self.degraded_tokens_per_rank or 0)

    def batch_limit(self, active: list[bool]) -> int:
        """Tokens a rank takes per step under membership ``active``."""
        return self.max_tokens_per_rank if all(active) else self.token_capacity

    @property
    def corroboration_window_s(self) -> float:
        """How long a rank that a peer reported may stay silent, unacknowledged, before it is dead."""
        return self.heartbeat_interval_s * max(1, min(self.corroborate_misses, self.suspect_misses))

    @property
    def peer_connect_timeout_s(self) -> float:
        """Bound on mapping new members' buffers at a commit (fd handshake with each peer).

        A live peer answers in well under a millisecond (a local socket); only a dead or stopped one
        uses the bound. Half the suspicion window: a rank blocked here cannot ack a prepare, and a
        member that does not ack within the window is declared dead. At most the transport timeout:
        a peer that cannot hand over its buffer in a step's deadline would miss the step too.
        """
        return min(self.transport_timeout_s, self.suspicion_window_s / 2)

    @property
    def num_channels(self) -> int:
        """Channels of the shared-memory transport file: one (dispatch, combine) pair serves every layer
        (eep/exchange/shm.py says why)."""
        return 2

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "RuntimeConfig":
        data = dict(data)
        data["model"] = TinyConfig(**data["model"])
        return cls(**data)

