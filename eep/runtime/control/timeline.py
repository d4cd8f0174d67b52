"""Per-process JSONL timelines: one record per completed step, plus named events.

Step record: ``{"t": wall_s, "rank", "incarnation", "step", "epoch", "tokens", "phase"}``.
Event record: ``{"t", "rank", "incarnation", "event": name, ...details}``. The launcher writes
``launcher.jsonl`` with ``"rank": null``. ``eep.runtime.control.metrics`` reads them back.
"""

from __future__ import annotations

import json
import time
from pathlib import Path


class Timeline:
    def __init__(self, path: str | Path, rank: int | None, incarnation: int | None, *, flush_interval_s: float = 0.1):
        self.path = Path(path)
        self._file = open(self.path, "a", buffering=1 << 16)
        self.rank, self.incarnation = rank, incarnation
        self._flush_interval_s = flush_interval_s
        self._next_flush = time.monotonic() + flush_interval_s

    def step(self, step: int, epoch: int, tokens: int, phase: str = "serving") -> None:
        self._write({"step": step, "epoch": epoch, "tokens": tokens, "phase": phase})

    def event(self, name: str, **details) -> None:
        self._write({"event": name, **details})
        self.flush()  # events are rare and matter most when the process is about to die

    def _write(self, record: dict) -> None:
        record = {"t": time.time(), "rank": self.rank, "incarnation": self.incarnation, **record}
        self._file.write(json.dumps(record, separators=(",", ":")) + "\n")
        if time.monotonic() >= self._next_flush:
            self.flush()

    def flush(self) -> None:
        self._file.flush()
        self._next_flush = time.monotonic() + self._flush_interval_s

    def close(self) -> None:
        if not self._file.closed:
            self._file.close()


def read_jsonl(path: str | Path) -> list[dict]:
    """Records of one timeline; a torn last line (a SIGKILLed writer) is skipped."""
    out = []
    with open(path) as f:
        for line in f:
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return out
