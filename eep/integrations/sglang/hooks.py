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
DEFAULT_REPLACED_BACKENDS = "mooncake"


def register_hooks() -> None:
    from sglang.srt.plugins.hook_registry import HookRegistry, HookType

    HookRegistry.register(CREATE_MOE_DISPATCHER, around_create_moe_dispatcher, HookType.AROUND)
    HookRegistry.register(REFRESH_EP_MEMBERS, after_refresh_ep_members, HookType.AFTER)
    HookRegistry.register(BROADCAST_EXPERT_LOCATION, around_broadcast_expert_location, HookType.AROUND)


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
