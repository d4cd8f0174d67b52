"""Host shared-memory transport: round trips, bounded waits, epoch fencing, real processes."""

import os
import subprocess
import sys
import threading
import time

import pytest
import torch

from eep.transport import SharedMemoryTransport, create_shm_file, make_tag, split_tag


@pytest.fixture
def shm_path(tmp_path):
    path = str(tmp_path / "t.shm")
    create_shm_file(path, num_ranks=3, num_channels=2, capacity_nbytes=1024)
    return path


def test_tag_round_trip_and_never_zero():
    assert make_tag(0, 0) != 0  # a zeroed flag must never look like epoch 0, step 0
    for epoch, step in [(0, 0), (3, 17), (1000, 2 ** 39)]:
        assert split_tag(make_tag(epoch, step)) == (epoch, step)
    with pytest.raises(ValueError):
        make_tag(0, -1)


def test_send_recv_between_ranks(shm_path):
    gen = torch.Generator().manual_seed(0)
    ts = [SharedMemoryTransport(shm_path, r) for r in range(3)]
    payloads = {src: torch.randn(64, generator=gen) for src in range(3)}
    for src in range(3):
        ts[src].send(1, 2, payloads[src], epoch=4, step=9)
    got = ts[2].recv(1, [0, 1, 2], epoch=4, step=9, timeout_s=1.0)
    assert got.ok and sorted(got.buffers) == [0, 1, 2]
    for src in range(3):
        assert torch.equal(got.buffers[src][:256].view(torch.float32), payloads[src])
    # channel 0 saw nothing: a bounded wait reports every peer as missed
    got = ts[2].recv(0, [0, 1], epoch=4, step=9, timeout_s=0.05)
    assert got.missed == [0, 1] and not got.is_aborted


def test_missing_peer_costs_at_most_the_timeout(shm_path):
    a, b = SharedMemoryTransport(shm_path, 0), SharedMemoryTransport(shm_path, 1)
    b.send(0, 0, torch.ones(4), epoch=1, step=1)
    start = time.monotonic()
    got = a.recv(0, [1, 2], epoch=1, step=1, timeout_s=0.2)
    elapsed = time.monotonic() - start
    assert got.missed == [2] and 1 in got.buffers
    assert 0.2 <= elapsed < 0.5


def test_stale_epoch_is_never_accepted(shm_path):
    a, b = SharedMemoryTransport(shm_path, 0), SharedMemoryTransport(shm_path, 1)
    b.send(0, 0, torch.ones(4), epoch=1, step=5)  # a fenced writer from an older epoch
    got = a.recv(0, [1], epoch=2, step=5, timeout_s=0.05)
    assert got.missed == [1]


def test_abort_stops_the_wait_early(shm_path):
    a = SharedMemoryTransport(shm_path, 0)
    start = time.monotonic()
    got = a.recv(0, [1], epoch=0, step=0, timeout_s=5.0, should_abort=lambda: time.monotonic() - start > 0.05)
    assert got.is_aborted and got.missed == [1] and time.monotonic() - start < 1.0


def test_wait_sees_a_late_sender(shm_path):
    a, b = SharedMemoryTransport(shm_path, 0), SharedMemoryTransport(shm_path, 1)
    payload = torch.randn(32, generator=torch.Generator().manual_seed(1))
    timer = threading.Timer(0.05, lambda: b.send(1, 0, payload, epoch=0, step=3))
    timer.start()
    got = a.recv(1, [1], epoch=0, step=3, timeout_s=2.0)
    timer.join()
    assert got.ok and torch.equal(got.buffers[1][:128].view(torch.float32), payload)


def test_oversized_payload_and_bad_file_are_named(shm_path, tmp_path):
    a = SharedMemoryTransport(shm_path, 0)
    with pytest.raises(ValueError, match="rank 0.*channel 1 to rank 2.*capacity 1024"):
        a.send(1, 2, torch.zeros(300), epoch=0, step=0)
    with pytest.raises(ValueError, match="out of range"):
        SharedMemoryTransport(shm_path, 3)
    bad = tmp_path / "bad.shm"
    bad.write_bytes(os.urandom(4096))
    with pytest.raises(ValueError, match="not an eep shared-memory transport"):
        SharedMemoryTransport(str(bad), 0)


def test_another_process_writes_into_our_region(shm_path):
    code = ("import sys, torch; from eep.transport import SharedMemoryTransport as T; "
            "t = T(sys.argv[1], 1); t.send(0, 0, torch.arange(16, dtype=torch.float32) + 0.5, epoch=7, step=2)")
    subprocess.run([sys.executable, "-c", code, shm_path], check=True, timeout=60)
    got = SharedMemoryTransport(shm_path, 0).recv(0, [1], epoch=7, step=2, timeout_s=1.0)
    assert got.ok and torch.equal(got.buffers[1][:64].view(torch.float32), torch.arange(16.0) + 0.5)
