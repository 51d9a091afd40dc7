"""Output capture shared by every backend: keep the first ``cap`` bytes, mark truncation.

One implementation so that caps and truncation flags behave the same on every backend.
"""

from __future__ import annotations

import signal


class CappedBuffer:
    """Accumulates bytes up to ``cap``; the rest is counted and dropped."""

    __slots__ = ("_chunks", "_size", "cap", "dropped")

    def __init__(self, cap: int) -> None:
        if cap < 0:
            raise ValueError("cap must be >= 0")
        self.cap = cap
        self._chunks: list[bytes] = []
        self._size = 0
        self.dropped = 0

    def feed(self, data: bytes) -> bytes:
        """Add ``data``; return the part that was kept (empty once the cap is reached)."""
        room = self.cap - self._size
        kept = data[:room] if room > 0 else b""
        if kept:
            self._chunks.append(kept)
            self._size += len(kept)
        self.dropped += len(data) - len(kept)
        return kept

    @property
    def truncated(self) -> bool:
        """True if anything was dropped."""
        return self.dropped > 0

    def getvalue(self) -> bytes:
        """Everything kept so far."""
        if len(self._chunks) > 1:
            self._chunks = [b"".join(self._chunks)]
        return self._chunks[0] if self._chunks else b""

    def __len__(self) -> int:
        return self._size


def exit_reason(code: int, timed_out: bool, oom_killed: bool) -> str | None:
    """``RawResult.reason`` for an abnormal end, worded the same on every backend.

    ``code`` is the 128+N form for a command killed by signal N; ``oom_killed`` says the
    sandbox's memory limit killed it (only meaningful with SIGKILL).
    """
    if timed_out:
        return "wall-clock timeout"
    if code == 128 + signal.SIGKILL and oom_killed:
        return "memory limit"
    if code == 128 + signal.SIGXCPU:
        return "cpu time limit"
    if code == 128 + signal.SIGXFSZ:
        return "file size limit"
    return None


__all__ = ["CappedBuffer", "exit_reason"]
