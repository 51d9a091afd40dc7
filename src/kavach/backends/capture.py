"""Output capture shared by every backend: keep the first ``cap`` bytes, mark truncation.

One implementation so that caps and truncation flags behave the same on every backend.
"""

from __future__ import annotations


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


__all__ = ["CappedBuffer"]
