"""HMAC sealing of control messages and the store key helper."""

import json

import pytest

from eep.runtime.control.auth import Sealer
from eep.runtime.control.keys import Key, store_key


def test_seal_open_round_trip_and_rejections():
    sealer = Sealer(b"k" * 32, "run1")
    key = store_key("run1", Key.DECISION, 3)
    body = {"kind": "commit", "epoch": 2, "active": [True, False]}
    raw = sealer.seal(key, body)
    assert sealer.open(key, raw) == body
    assert sealer.open(store_key("run1", Key.DECISION, 7), raw) is None  # replayed under another key
    tampered = json.loads(raw)
    tampered["body"]["active"] = [True, True]
    assert sealer.open(key, json.dumps(tampered)) is None
    assert Sealer(b"x" * 32, "run1").open(key, raw) is None  # wrong secret
    assert Sealer(b"k" * 32, "run2").open(key, raw) is None  # another run
    for junk in (b"", b"\xff\xfe", b"[]", b'{"body": 1, "mac": "00"}', b'{"body": {}}'):
        assert sealer.open(key, junk) is None
    assert sealer.num_rejected == 7  # the two foreign sealers count their own


def test_store_key_layout():
    assert store_key("r", Key.ACK, 4, 2) == "eep/r/ack/4/2"
    assert store_key("r", Key.RESULTS_COUNT) == "eep/r/results/count"
    with pytest.raises(TypeError):
        store_key("r", "decision", 1)
    with pytest.raises(ValueError):
        Sealer(b"", "r")
