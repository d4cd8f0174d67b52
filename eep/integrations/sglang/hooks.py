"""The hooks eep's plugin installs in SGLang (through ``HookRegistry``; SGLang applies them).

1. AROUND ``create_moe_dispatcher``: when SGLang's all-to-all backend is one eep replaces
   (``EEP_SGLANG_REPLACE``, default ``mooncake``), build an ``EepDispatcher`` with the arguments
   SGLang would pass to ``MooncakeEPDispatcher``; otherwise call SGLang's own factory.
2. AFTER ``elastic_ep._refresh_ep_members``: SGLang calls it after a rank rejoins (survivors in
   ``try_recover_ranks``, the rejoiner in ``join_process_groups``); eep's buffer moves every member
   to one agreed new epoch (``update_ep_member``), so stale messages from before never match.
3. AROUND ``broadcast_global_expert_location_metadata``: SGLang's recovery broadcast builds a new
   ``ExpertLocationMetadata`` and swaps the global; decode CUDA graphs captured before keep reading
   the old map tensors. The hook writes the new maps into the old object's tensors and keeps the
   old object global (see docs/integrations.md, "Stale graphs after recovery").
4. AROUND ``elastic_ep.maybe_rebalance_after_rank_fault``: when SGLang's elastic state marks a rank
   down, repair by eep's plan (``eep.integrations.sglang.repair``) instead of SGLang's rebalance:
   routing-only drops, orphan restores from the configured tiers into SGLang's own weight tensors,
   the maps written in place. Coverage lost raises ``CoverageLostError`` (never served); a model
   eep's plan cannot move (``UnsupportedLayoutError``), or a plan that failed everywhere, falls back
   to SGLang's rebalance with one warning saying why. ``EEP_SGLANG_REPAIR=sglang`` keeps SGLang's.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from eep import envs

logger = logging.getLogger(__name__)

CREATE_MOE_DISPATCHER = "sglang.srt.layers.moe.fused_moe_triton.layer.create_moe_dispatcher"
REFRESH_EP_MEMBERS = "sglang.srt.elastic_ep.elastic_ep._refresh_ep_members"
BROADCAST_EXPERT_LOCATION = "sglang.srt.eplb.expert_location.broadcast_global_expert_location_metadata"
REBALANCE_AFTER_RANK_FAULT = "sglang.srt.elastic_ep.elastic_ep.maybe_rebalance_after_rank_fault"
DEFAULT_REPLACED_BACKENDS = "mooncake"


def register_hooks() -> None:
    from sglang.srt.plugins.hook_registry import HookRegistry, HookType

    HookRegistry.register(CREATE_MOE_DISPATCHER, around_create_moe_dispatcher, HookType.AROUND)
    HookRegistry.register(REFRESH_EP_MEMBERS, after_refresh_ep_members, HookType.AFTER)
    HookRegistry.register(BROADCAST_EXPERT_LOCATION, around_broadcast_expert_location, HookType.AROUND)
    HookRegistry.register(REBALANCE_AFTER_RANK_FAULT, around_rebalance_after_rank_fault, HookType.AROUND)


def replaced_backends() -> set[str]:
    """SGLang ``--moe-a2a-backend`` values whose dispatcher eep replaces (``EEP_SGLANG_REPLACE``)."""
    raw = envs.sglang_replace(DEFAULT_REPLACED_BACKENDS)
    return {name.strip() for name in raw.split(",") if name.strip()}


# ---- 1. the dispatcher ----
def around_create_moe_dispatcher(original, *args, **kwargs):
    from sglang.srt.layers.moe import utils as moe_utils
    from sglang.srt.layers.moe.fused_moe_triton import layer as moe_layer

    backend = moe_utils.get_moe_a2a_backend()
    if backend.value not in replaced_backends():
        return original(*args, **kwargs)
    if moe_utils.is_tbo_enabled():
        # Two inner dispatchers would interleave steps on the one process-wide buffer.
        raise NotImplementedError("eep's SGLang dispatcher does not support two-batch overlap yet: "
                                  "drop --enable-two-batch-overlap, or set EEP_SGLANG_REPLACE= (empty) to keep SGLang's dispatcher")
    config = kwargs["moe_runner_config"] if "moe_runner_config" in kwargs else args[0]
    from eep.integrations.sglang.dispatcher import EepDispatcher

    return EepDispatcher(group=moe_layer._get_deepep_comm_group(backend), router_topk=config.top_k,
                         permute_fusion=True, num_experts=config.num_experts,
                         num_local_experts=config.num_local_experts, hidden_size=config.hidden_size,
                         params_dtype=config.params_dtype, deepep_mode=moe_utils.get_deepep_mode(),
                         async_finish=True, return_recv_hook=True)


# ---- 2. rejoin ----
def after_refresh_ep_members(result, *args, **kwargs) -> None:
    from eep.integrations.sglang.ep_buffer import EepEPBuffer

    buffer = EepEPBuffer.get_existing_buffer()
    if buffer is None:
        return None
    buffer.update_ep_member(epoch=agree_on_next_epoch(buffer.epoch, EepEPBuffer.get_group()),
                            joined=joined_ranks(buffer.rank))
    return None


def joined_ranks(rank: int) -> list[int]:
    """Ranks this process must (re)map: those SGLang's mask still shows inactive at the refresh.

    SGLang refreshes members before it resets the mask (``maybe_recover_ep_ranks`` resets after its
    broadcast), so on a survivor these are the recovered ranks; on a rejoiner, whose mask holds only
    itself, every other rank. Both backends map a peer's new incarnation (the GPU: its peer buffers,
    read from SGLang's store; the CPU: a handshake over the transport file), so the joined rank must
    have built its buffers (``EepDispatcher.get_buffer``) before the refresh.
    """
    from sglang.srt.elastic_ep.elastic_ep import ElasticEPStateManager

    state = ElasticEPStateManager.instance()
    if state is None or state.active_ranks is None:
        return []
    size = state.effective_ep_size or state.active_ranks.numel()
    return [r for r, a in enumerate(state.active_ranks.tolist()[:size]) if not a and r != rank]


def agree_on_next_epoch(local_epoch: int, group: Any) -> int:
    """``max`` of every member's epoch, plus one: a fresh rejoiner (epoch 0) and survivors agree.

    SGLang calls the member refresh on every member at the same point of its recovery (after the
    process groups are repaired), so one all-reduce there is matched. Without a process group
    (single process, tests) the epoch just advances.
    """
    dist = torch.distributed
    if group is None or not dist.is_available() or not dist.is_initialized():
        return local_epoch + 1
    device = "cuda" if "nccl" in str(dist.get_backend(group)) else "cpu"
    epoch = torch.tensor([local_epoch], dtype=torch.int64, device=device)
    dist.all_reduce(epoch, op=dist.ReduceOp.MAX, group=group)
    return int(epoch.item()) + 1


# ---- 3. expert-location maps written in place ----
def around_broadcast_expert_location(original, *args, **kwargs):
    from sglang.srt.eplb import expert_location

    from eep.errors import PlacementError
    from eep.integrations.sglang.placement import adopt_metadata_

    old = expert_location.get_global_expert_location_metadata()
    new = original(*args, **kwargs)
    if old is None or new is None or new is old:
        return new
    try:
        adopt_metadata_(old, new)
    except PlacementError as exc:
        # A different size (EP scale-up): the storage cannot be kept; SGLang recaptures graphs there.
        logger.info("eep: expert-location maps changed size, keeping SGLang's new object (%s)", exc)
        return new
    expert_location.set_global_expert_location_metadata(old, allow_overwrite=True)
    return old


# ---- 4. a rank fault repaired by eep's plan ----
def around_rebalance_after_rank_fault(original, *args, **kwargs):
    from sglang.srt.elastic_ep.elastic_ep import ElasticEPStateManager
    from sglang.srt.eplb import expert_location

    from eep.errors import CoverageLostError, PlacementError
    from eep.integrations.sglang.repair import RepairError, StoreVote, process_repair

    state = ElasticEPStateManager.instance()
    if state is None or state.is_active_equal_last() or envs.sglang_repair() != "plan":
        return original(*args, **kwargs)
    eplb_manager = kwargs["eplb_manager"] if "eplb_manager" in kwargs else args[0]
    metadata = expert_location.get_global_expert_location_metadata()
    try:
        if metadata is None:
            raise RepairError("SGLang has no expert-location metadata")
        size = int(metadata.ep_size)
        before = [bool(a) for a in state.last_active_ranks.tolist()[:size]]
        after = [bool(a) for a in state.active_ranks.tolist()[:size]]
        if any(a and not b for a, b in zip(after, before)):
            raise RepairError(f"ranks {[r for r in range(size) if after[r] and not before[r]]} came back in the same "
                              f"change (SGLang's recovery path takes rejoins)")
        rank = _moe_ep_rank()
        vote = _store_vote(rank, StoreVote)
        repair = process_repair(rank, size, eplb_manager._get_model(), vote)
        result = repair.on_failure(metadata, before, after)
    except CoverageLostError as exc:
        # Never serve from these maps: the forward that saw the fault is discarded and every later one
        # raises here too (the mask still differs from the snapshot) until a rejoin restores coverage.
        logger.error("eep: %s; refusing to serve", exc)
        raise
    except (RepairError, PlacementError, AttributeError) as exc:
        logger.warning("eep: cannot repair by eep's plan (%s); falling back to SGLang's rebalance", exc)
        return original(*args, **kwargs)
    state.snapshot_active_to_last()
    state.sync_active_to_cpu()
    logger.info(result.log_line())
    return True


def _moe_ep_rank() -> int:
    """This process's EP rank: the eep buffer's, else the global rank (SGLang's elastic EP: pp=1)."""
    from eep.integrations.sglang.ep_buffer import EepEPBuffer
    from eep.repair import RepairError

    buffer = EepEPBuffer.get_existing_buffer()
    if buffer is not None:
        return buffer.rank
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank()
    raise RepairError("cannot tell this process's EP rank (no eep buffer, no process group)")


def _store_vote(rank: int, vote_cls):
    """The ranks' vote through SGLang's global TCPStore; None where there is none (one process)."""
    from sglang.srt.distributed.utils import get_global_tcp_store

    store = get_global_tcp_store()
    return None if store is None else vote_cls(store, rank, timeout_s=envs.sglang_vote_timeout_s())
