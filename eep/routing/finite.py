"""Non-finite routing input (NaN / inf router logits, top-k weights, hidden rows), named by token row.

A NaN router logit makes every output of its token NaN, and a NaN weight poisons the combine. eep
refuses such input with a ``RoutingError`` that names the token rows, where it can afford to look:

- **Host tensors** are always checked (``check_finite_rows``): a pass over data already in memory.
- **Device tensors** are not checked on the host by default: a check reads the result back, which
  waits for the device on every call and cannot run inside CUDA-graph capture. Setting
  ``EEP_CHECK_DEVICE_INPUT=1`` checks them too, outside capture (debugging; one sync per call).
- **Serving paths on the device** that keep state between steps record non-finite rows in a
  device-side flag instead (``NonFiniteRows``): a few tensor ops per step, graph-capturable, whose
  count and first row the host reads without waiting (a pinned mirror) and turns into the same
  ``RoutingError`` at its next call — the SGLang dispatcher does this.
"""

from __future__ import annotations

import torch

from eep import envs
from eep.errors import RoutingError


def check_finite_rows(tensor: torch.Tensor, name: str) -> None:
    """Raise ``RoutingError`` naming the rows (dim 0) of ``tensor`` that hold NaN or inf.

    Host tensors always; device tensors only with ``EEP_CHECK_DEVICE_INPUT=1`` and never during
    graph capture (see the module docstring).
    """
    if not tensor.is_floating_point() or tensor.numel() == 0:
        return
    if tensor.device.type != "cpu":
        if not envs.check_device_input() or (tensor.is_cuda and torch.cuda.is_current_stream_capturing()):
            return
    bad = ~torch.isfinite(tensor.reshape(tensor.shape[0], -1)).all(dim=1)
    if bool(bad.any()):
        raise RoutingError(_message(name, bad.nonzero().squeeze(1).tolist(), tensor))


def _message(name: str, rows: list[int], tensor: torch.Tensor | None = None, *, limit: int = 8) -> str:
    shown = ", ".join(str(r) for r in rows[:limit]) + (", ..." if len(rows) > limit else "")
    text = f"{name} holds NaN or inf in {len(rows)} token row(s): [{shown}]"
    if tensor is not None and tensor.shape[0]:
        values = tensor[rows[0]].reshape(-1)[:6].tolist()
        text += f"; row {rows[0]} starts {[round(v, 4) for v in values]}"
    return text + " (bad router input: the tokens' outputs would be NaN)"


class NonFiniteRows:
    """A device-side record of non-finite rows, for serving paths that must not wait for the device.

    ``record(tensor)`` adds the number of non-finite rows and keeps the first one seen, with tensor
    ops only (capturable in a CUDA graph), then copies both to a pinned host mirror without waiting.
    ``raise_if_seen(name)`` reads the mirror (no wait: it holds what the last completed copy wrote)
    and raises ``RoutingError`` once for what it shows, then clears the record.
    On the CPU the same calls work, with the mirror written at once.
    """

    def __init__(self, device: torch.device | str):
        self.device = torch.device(device)
        # [rows seen non-finite since the last raise, first such row (or -1)]
        self.state = torch.tensor([0, -1], dtype=torch.int64, device=self.device)
        self.host = torch.tensor([0, -1], dtype=torch.int64,
                                 pin_memory=self.device.type == "cuda")

    def record(self, tensor: torch.Tensor) -> None:
        if tensor.numel() == 0:  # a rank with no tokens this step: nothing to record (a fixed shape)
            return
        bad = ~torch.isfinite(tensor.reshape(tensor.shape[0], -1)).all(dim=1)
        rows = torch.arange(tensor.shape[0], device=tensor.device)
        count = bad.sum()
        first = torch.where(bad, rows, tensor.shape[0]).min() if tensor.shape[0] else rows.new_tensor(0)
        is_first = (self.state[1] < 0) & (count > 0)
        self.state[1] = torch.where(is_first, first, self.state[1])
        self.state[0] += count
        self.host.copy_(self.state, non_blocking=self.device.type == "cuda")

    def raise_if_seen(self, name: str) -> None:
        count, first = self.host.tolist()
        if count > 0:
            self.state.copy_(torch.tensor([0, -1], dtype=torch.int64))
            self.host.copy_(torch.tensor([0, -1], dtype=torch.int64))
            raise RoutingError(f"{name} held NaN or inf in {count} token row(s) since the last check, "
                               f"the first in row {first} of its step (bad router input: those tokens' "
                               f"outputs are NaN)")
