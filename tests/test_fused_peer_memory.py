"""File-descriptor passing of the fused peer memory (plain Unix sockets: no GPU needed)."""

import os
import subprocess
import sys
import tempfile

import pytest

from eep.fused.buffer import store_key
from eep.transport.fd_passing import FdServer, fetch_fd


def test_fd_reaches_another_process_and_reads_the_same_file():
    payload = os.urandom(4096)
    with tempfile.TemporaryFile() as f:
        f.write(payload)
        f.flush()
        server = FdServer(f.fileno(), {"rank": 3, "nbytes": len(payload)})
        try:
            code = (
                "import os, sys\n"
                "from eep.transport.fd_passing import fetch_fd\n"
                f"fd, header = fetch_fd({server.public_address!r})\n"
                "data = os.pread(fd, header['nbytes'], 0)\n"
                "sys.stdout.write(data.hex() + ' ' + str(header['rank']))\n")
            out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                                 cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
            assert out.returncode == 0, out.stderr
            data_hex, rank = out.stdout.split()
            assert bytes.fromhex(data_hex) == payload and rank == "3"
        finally:
            server.close()


def test_server_serves_many_requesters_even_after_one_hangs_up():
    r, w = os.pipe()
    server = FdServer(w, {"rank": 0, "nbytes": 1})
    try:
        import socket
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:  # connect and leave at once
            s.connect("\0" + server.public_address[1:])
        for _ in range(3):
            fd, header = fetch_fd(server.public_address)
            os.write(fd, b"x")
            os.close(fd)
            assert os.read(r, 1) == b"x" and header["rank"] == 0
    finally:
        server.close()
        os.close(r)
        os.close(w)


def test_fetch_from_a_dead_server_names_the_address():
    r, w = os.pipe()
    server = FdServer(w, {"rank": 1})
    address = server.public_address
    server.close()
    os.close(r)
    os.close(w)
    with pytest.raises(ConnectionError, match="eep-fused"):
        fetch_fd(address, timeout_s=2)


def test_store_keys_are_per_group_and_rank():
    assert store_key("g", 1) != store_key("g", 2) != store_key("h", 1)
    assert store_key("g", 1).startswith("eep/fused/")


def test_status_and_fp8_receive_helpers_need_no_gpu():
    import torch

    from eep.exchange.layout import RankReceive
    from eep.fused.buffer import FusedStatus

    st = FusedStatus(epoch=1, step=2, dispatch_seq=5, combine_seq=5, timeout_s=0.5, active=[True] * 3,
                     dispatch_ok=[True, True, False], combine_ok=[True] * 3, suspect=[False, False, True],
                     miss_count=[0, 0, 2], last_miss_seq=[0, 0, 5])
    assert st.missed_ranks == [2]
    x = torch.randn(2, 3, 4, 16)
    scale = torch.rand(2, 3, 4) + 0.5
    q = (x / scale.unsqueeze(-1)).to(torch.float8_e4m3fn)
    recv = RankReceive(x=q, count=torch.zeros(2, 3, dtype=torch.int32), src_token=torch.zeros(2, 3, 4), scale=scale)
    deq = recv.dequantized()
    assert deq.dtype == torch.bfloat16
    assert torch.equal(deq, (q.float() * scale.unsqueeze(-1)).to(torch.bfloat16))
    plain = RankReceive(x=x.bfloat16(), count=recv.count, src_token=recv.src_token)
    assert plain.dequantized() is plain.x
