"""HMAC-SHA256 sealing of control messages.

Every control message in the store (membership decision, join request, ack, heartbeat, evidence
report) is ``{"body": {...}, "mac": hex}`` where ``mac = HMAC(secret, run_id | store key | body)``.
Binding the store key into the MAC means a valid message copied to another key (a replay of
decision 3 as decision 7) fails verification; epochs and join nonces stop replays in place.
Anything that fails to parse or verify is ignored and logged, never applied.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging

log = logging.getLogger("eep.runtime.control.auth")


class Sealer:
    """Seals and opens messages with one shared secret."""

    def __init__(self, secret: bytes, run_id: str):
        if not secret:
            raise ValueError("an empty secret cannot authenticate anything")
        self._secret = secret
        self.run_id = run_id
        self.num_rejected = 0

    def _mac(self, key: str, body_json: str) -> str:
        msg = f"{self.run_id}|{key}|{body_json}".encode()
        return hmac.new(self._secret, msg, hashlib.sha256).hexdigest()

    def seal(self, key: str, body: dict) -> str:
        body_json = json.dumps(body, sort_keys=True, separators=(",", ":"))
        return json.dumps({"body": body, "mac": self._mac(key, body_json)}, separators=(",", ":"))

    def open(self, key: str, raw: bytes | str) -> dict | None:
        """The body if ``raw`` is a well-formed message sealed for ``key``; else None (logged)."""
        try:
            msg = json.loads(raw)
            body, mac = msg["body"], msg["mac"]
            if not isinstance(body, dict) or not isinstance(mac, str):
                raise ValueError("body must be an object and mac a string")
            body_json = json.dumps(body, sort_keys=True, separators=(",", ":"))
        except (ValueError, KeyError, TypeError) as exc:
            self._reject(key, f"malformed ({exc})")
            return None
        if not hmac.compare_digest(mac, self._mac(key, body_json)):
            self._reject(key, "bad MAC (unauthenticated)")
            return None
        return body

    def _reject(self, key: str, why: str) -> None:
        self.num_rejected += 1
        log.warning("ignored message at store key %s: %s", key, why)
