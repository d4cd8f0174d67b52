import pytest
import torch

from eep import Membership, MembershipError


def test_transitions_bump_epoch_and_keep_device_storage():
    m = Membership(4)
    ptr = m.active_device.data_ptr()
    assert m.epoch == 0 and m.active_ranks() == [0, 1, 2, 3]
    assert m.fail([2]) == 1
    assert m.fail(0) == 2
    assert m.active_ranks() == [1, 3] and not m.is_active(2)
    assert m.join(2) == 3
    assert m.active_ranks() == [1, 2, 3]
    assert m.active_device.tolist() == [0, 1, 1, 1]
    assert int(m.epoch_device) == 3
    assert m.active_device.data_ptr() == ptr  # written in place: CUDA graphs keep reading it
    assert m.active_device.dtype == torch.int32


@pytest.mark.parametrize("bad_call, message", [
    (lambda m: m.fail(1), "already failed"),
    (lambda m: m.fail([0, 2, 3]), "no active rank"),
    (lambda m: m.fail([4]), "out of range"),
    (lambda m: m.fail([-1]), "out of range"),
    (lambda m: m.fail([0, 0]), "duplicate"),
    (lambda m: m.fail([]), "at least one"),
    (lambda m: m.join(0), "already active"),
    (lambda m: m.join(7), "out of range"),
])
def test_rejected_transitions_name_the_rank_and_change_nothing(bad_call, message):
    m = Membership(4)
    m.fail(1)
    before = (m.epoch, m.active_cpu.clone(), m.active_device.clone())
    with pytest.raises(MembershipError, match=message):
        bad_call(m)
    assert m.epoch == before[0]
    assert torch.equal(m.active_cpu, before[1]) and torch.equal(m.active_device, before[2])


def test_after_failure_is_pure_and_round_trips():
    m = Membership(8)
    nxt = m.after_failure([3, 5])
    assert m.epoch == 0 and m.num_active == 8
    assert nxt.epoch == 1 and nxt.active_ranks() == [0, 1, 2, 4, 6, 7]
    again = Membership.from_dict(nxt.to_dict())
    assert again.epoch == 1 and torch.equal(again.active_cpu, nxt.active_cpu)
    m.copy_from(nxt)
    assert m.epoch == 1 and m.active_device.tolist() == [1, 1, 1, 0, 1, 0, 1, 1]


def test_constructor_rejects_bad_sizes():
    with pytest.raises(MembershipError):
        Membership(0)
    with pytest.raises(MembershipError):
        Membership(3, active=[True, False])
    with pytest.raises(MembershipError):
        Membership(2, active=[False, False])
