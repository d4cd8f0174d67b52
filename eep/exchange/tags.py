"""The one tag encoding: ``(epoch, step)`` as one int64 that every flag of every backend carries.

A send at ``(epoch, step)`` publishes ``make_tag(epoch, step)``; a receiver waits for exactly that
value. Every membership change bumps the epoch and restarts steps at 0 on every member, so a flag
written under an earlier epoch (a fenced, stalled process; a dead incarnation) never matches what
a survivor waits for, and a rejoining rank agrees with the survivors on the next tag without a
collective. The fused kernels count steps on the device from ``first_tag(epoch)``.
"""

from __future__ import annotations

EPOCH_SHIFT = 40  # a tag is ((epoch + 1) << 40) | step: 2^40 steps, 2^23 - 1 epochs


def make_tag(epoch: int, step: int) -> int:
    """The flag value a send at ``(epoch, step)`` publishes; one int64, written with one store.

    The epoch is offset by one so that no tag is 0: a freshly zeroed flag never looks like a
    completed send of epoch 0, step 0.
    """
    if not 0 <= step < (1 << EPOCH_SHIFT) or not 0 <= epoch < (1 << (63 - EPOCH_SHIFT)) - 1:
        raise ValueError(f"(epoch={epoch}, step={step}) does not fit a transport tag")
    return ((epoch + 1) << EPOCH_SHIFT) | step


def split_tag(tag: int) -> tuple[int, int]:
    """``(epoch, step)`` of a tag; epoch -1 for a flag never written."""
    return (tag >> EPOCH_SHIFT) - 1, tag & ((1 << EPOCH_SHIFT) - 1)


def first_tag(epoch: int) -> int:
    """The tag of step 0 of ``epoch``: where every member's step counters restart at a membership change."""
    return make_tag(epoch, 0)
