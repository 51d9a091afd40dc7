"""A helper process that scans part of a large artifact while the caller scans the rest.

The gate's pattern matching is CPU-bound Python around RE2 calls, so threads cannot
share it (the GIL); a second process can. For an artifact of at least ``SPLIT_MIN``
bytes the gate hands the whole artifact to this helper; the caller then validates chunks
of windows from the start forward while the helper validates chunks from the end
backward, until they meet, and the caller merges the helper's validated matches with its
own. The helper computes exactly what the caller would have computed for its chunks (the
same rules: it builds the same bank and proves it with the bank's digest), so the
findings are the same with or without it; only the elapsed time differs.

Meeting in the middle keeps both processes busy to the end whatever their speeds (a
helper that just started is slower: its RE2 automata are still being built). Each side
publishes how far it has got in a small shared memory page, and reads the other's
progress there before each chunk. Those reads are hints only: the helper's answer on the
socket says exactly which windows it covered (from ``front`` to the end), the caller
keeps its own chunks below that point, and scans itself any gap a stale read left. So a
chunk is at worst scanned twice, never missed.

Never a weaker scan: whenever the helper cannot answer (not started yet, still compiling,
busy with another thread's artifact, dead, slow, or answering nonsense) the caller scans
that part itself. A helper that failed once is not used again in this process.

The helper is started with ``subprocess`` (fork+exec of the interpreter: the caller may
run threads, so it is never forked as is), once per process, on the first large artifact;
it exits when the caller's end of its socket closes. ``KAVACH_SCAN_HELPER=0`` disables it.

Protocol: a ``socketpair``, frames of an 8-byte length and a JSON array.
``["prepare", names]`` is answered with ``["ready", names, digest]``;
``["scan", names, size]`` with ``["found", front, [[rule index, start, end, confidence],
...]]``: the matches owned by the windows from ``front`` to the end. The artifact itself
does not go through the socket (its buffer would make each megabyte several round trips):
the caller writes it at the start of a shared memory file (``memfd``, passed at start)
and the helper reads ``size`` bytes of it. A second, one-page shared file holds the two
progress marks (in windows): the caller's claim (every window below it is the caller's)
and the helper's front.
"""

from __future__ import annotations

import atexit
import json
import logging
import mmap
import os
import select
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

from kavach.scanning.engine import WINDOW, PatternBank

log = logging.getLogger(__name__)

# Below this size splitting does not pay for the copy to the helper and its reply.
SPLIT_MIN = 256 * 1024
# Windows per chunk (64 KiB): each side checks the other's progress once per chunk, so
# this is also about how long the caller may wait for the helper's last chunk (~1 ms).
CHUNK = 16
# How long the caller waits for the helper's answer beyond twice the time it took for its
# own part, before it scans the rest itself (and stops using the helper).
_GRACE_S = 2.0
# The progress page: the caller's claim at offset 0, the helper's front at offset 64
# (another cache line: each side writes only its own).
_MARK = struct.Struct("=Q")
_CLAIM_AT, _FRONT_AT, _PAGE = 0, 64, 4096
# Shared memory kept between artifacts; more is given back after the artifact that needed it.
_SHARED_KEEP = 8 << 20
_HEADER = struct.Struct("!Q")
# Answers are lists of matches, never near this; a larger frame is a broken helper.
_MAX_FRAME = 1 << 28
# How long a message that has started to arrive may take to arrive whole.
_READ_S = 5.0

Validated = list[tuple[int, int, int, float]]
BankFor = Callable[[tuple[str, ...]], PatternBank]


class HelperError(Exception):
    """The helper broke the protocol or went away."""


def _send(sock: socket.socket, payload: bytes) -> None:
    # MSG_NOSIGNAL: a helper that died is an EPIPE error here, never a SIGPIPE that would
    # kill a caller which restored SIGPIPE's default action.
    sock.sendall(_HEADER.pack(len(payload)) + payload, socket.MSG_NOSIGNAL)


def _recv_exact(sock: socket.socket, size: int) -> bytes:
    buffer = bytearray(size)
    view = memoryview(buffer)
    got = 0
    while got < size:
        n = sock.recv_into(view[got:], size - got)
        if n == 0:
            raise HelperError("connection closed")
        got += n
    return bytes(buffer)


def _recv(sock: socket.socket) -> bytes:
    (size,) = _HEADER.unpack(_recv_exact(sock, _HEADER.size))
    if size > _MAX_FRAME:
        raise HelperError(f"frame of {size} bytes")
    return _recv_exact(sock, size)


def _post(sock: socket.socket, *message: Any) -> None:
    _send(sock, json.dumps(message, separators=(",", ":")).encode())


def _message(sock: socket.socket) -> list[Any]:
    try:
        message = json.loads(_recv(sock))
    except ValueError as exc:
        raise HelperError(f"unreadable message: {exc}") from None
    if not isinstance(message, list) or not message:
        raise HelperError("malformed message")
    return message


class ScanHelper:
    """The caller's side: one helper process, used by one thread at a time."""

    def __init__(self, bank_for: BankFor) -> None:
        self._bank_for = bank_for
        self._lock = threading.Lock()
        self._proc: subprocess.Popen[bytes] | None = None
        self._sock: socket.socket | None = None
        self._shared: mmap.mmap | None = None
        self._memfd = -1
        self._progress: mmap.mmap | None = None
        self._progress_fd = -1
        self._ready: set[tuple[str, ...]] = set()
        self._preparing: tuple[str, ...] | None = None
        self._broken = os.environ.get("KAVACH_SCAN_HELPER", "1") == "0"
        self._pid = os.getpid()
        # Artifacts scanned with the helper's part merged in.
        self.splits = 0
        self._exit_hook = False

    def scan(
        self, bank: PatternBank, names: tuple[str, ...], data: bytes, meanwhile: Callable[[], None] | None = None
    ) -> Validated:
        """The validated matches of ``bank`` in all of ``data``, with the helper's help when it can.

        ``meanwhile`` is other work of the caller's on this artifact, run while the helper
        matches (it then takes a larger part); it is run in any case, exactly once.
        """
        n = len(data)
        if n < SPLIT_MIN or self._broken or not self._lock.acquire(blocking=False):
            return _alone(bank, data, meanwhile)
        try:
            if self._pid != os.getpid():
                self._forget()  # a fork of the process that started the helper: start our own
            return self._split(bank, names, data, meanwhile)
        finally:
            self._lock.release()

    def ready(self, names: tuple[str, ...]) -> bool:
        """Whether the helper has built the bank of the scanners ``names`` (it is then used)."""
        return not self._broken and names in self._ready

    @property
    def pid(self) -> int | None:
        """The helper process's pid, while it runs."""
        return self._proc.pid if self._proc is not None else None

    @property
    def disabled(self) -> bool:
        """True when the helper is off (``KAVACH_SCAN_HELPER=0``) or failed once."""
        return self._broken

    def close(self) -> None:
        """Stop the helper (it exits when its socket closes)."""
        with self._lock:
            self._stop()

    # -- internals (called with the lock held) ---------------------------------------------

    def _split(
        self, bank: PatternBank, names: tuple[str, ...], data: bytes, meanwhile: Callable[[], None] | None
    ) -> Validated:
        n = len(data)
        if not self._usable(names):
            return _alone(bank, data, meanwhile)
        windows = -(-n // WINDOW)
        assert self._sock is not None and self._progress is not None
        try:
            # Both marks are set before the helper hears of this artifact: it writes its
            # front only while scanning, so nothing of the previous artifact is left.
            _MARK.pack_into(self._progress, _CLAIM_AT, 0)
            _MARK.pack_into(self._progress, _FRONT_AT, windows)
            self._put(data)
            _post(self._sock, "scan", names, n)
        except OSError as exc:
            self._fail(f"send: {exc}")
            return _alone(bank, data, meanwhile)
        started = time.monotonic()
        try:
            if meanwhile is not None:
                meanwhile()
            mine, claim = self._forward(bank, data, windows)
        except BaseException:
            # The helper's answer to this artifact would be read as the next one's: stop
            # it (it is started again on a later artifact), then let the error through.
            self._stop()
            raise
        own_s = time.monotonic() - started
        answer = self._collect(_GRACE_S + 2 * own_s, bank, n, windows)
        self._trim()
        if answer is None:
            return _joined(mine, claim) + bank.validated(data, claim * WINDOW, n)
        front, theirs = answer
        out = _joined(mine, front)
        if front > claim:  # a gap between the two parts (a stale read of the front): ours
            out += bank.validated(data, claim * WINDOW, front * WINDOW)
        if front < windows:
            self.splits += 1
        return out + theirs

    def _forward(self, bank: PatternBank, data: bytes, windows: int) -> tuple[list[tuple[int, Validated]], int]:
        """The caller's part: chunks from the start until the helper's front; returns the
        chunks (first window, matches) and the claim reached (every window below it)."""
        assert self._progress is not None
        progress = self._progress
        n = len(data)
        mine: list[tuple[int, Validated]] = []
        claim = 0
        while claim < windows and claim < _MARK.unpack_from(progress, _FRONT_AT)[0]:
            end = min(claim + CHUNK, windows)
            # Claimed before it is scanned, so that the helper does not start on it too.
            _MARK.pack_into(progress, _CLAIM_AT, end)
            mine.append((claim, bank.validated(data, claim * WINDOW, min(end * WINDOW, n))))
            claim = end
        # Whatever the helper is doing, it stops after its current chunk.
        _MARK.pack_into(progress, _CLAIM_AT, windows)
        return mine, claim

    def _usable(self, names: tuple[str, ...]) -> bool:
        """True once the helper has built ``names``' bank; starts it (or the build) otherwise."""
        if names in self._ready:
            return True
        try:
            if self._proc is None:
                self._start()
            if self._preparing is None:
                # Built in the background: until the helper says it is ready, the caller
                # scans alone (it never waits for the helper to start).
                assert self._sock is not None
                _post(self._sock, "prepare", names)
                self._preparing = names
                return False
            return self._poll_ready() and names in self._ready
        except (OSError, HelperError) as exc:
            self._fail(str(exc))
            return False

    def _poll_ready(self) -> bool:
        assert self._sock is not None and self._preparing is not None
        readable, _, _ = select.select([self._sock], [], [], 0)
        if not readable:
            return False
        self._sock.settimeout(_READ_S)  # (a helper that stalls mid-message: TimeoutError)
        message = _message(self._sock)
        if message[0] != "ready" or len(message) != 3 or tuple(message[1]) != self._preparing:
            raise HelperError(f"expected ready, got {message[0]!r}")
        if message[2] != self._bank_for(self._preparing).digest():
            raise HelperError("the helper built different rules (another version of kavach on its path?)")
        self._ready.add(self._preparing)
        self._preparing = None
        return True

    def _collect(self, timeout: float, bank: PatternBank, size: int, windows: int) -> tuple[int, Validated] | None:
        """The helper's front and its matches, or None (then it is not used again)."""
        assert self._sock is not None
        try:
            readable, _, _ = select.select([self._sock], [], [], timeout)
            if not readable:
                raise HelperError(f"no answer within {timeout:.1f}s")
            self._sock.settimeout(_READ_S)
            message = _message(self._sock)
            if message[0] != "found" or len(message) != 3 or not isinstance(message[2], list):
                raise HelperError(f"expected found, got {message[0]!r}")
            front = message[1]
            if not isinstance(front, int) or not 0 <= front <= windows or (front % CHUNK and front != windows):
                raise HelperError(f"front {front!r} is not a chunk boundary of {windows} windows")
            return front, _checked(message[2], len(bank.rules), size)
        except (OSError, HelperError) as exc:
            self._fail(str(exc))
            return None

    def _put(self, data: bytes) -> None:
        """Put ``data`` at the start of the shared memory file (grown as needed)."""
        if self._shared is None or len(self._shared) < len(data):
            if self._shared is not None:
                self._shared.close()
            size = max(len(data), 4 << 20)
            os.ftruncate(self._memfd, size)
            self._shared = mmap.mmap(self._memfd, size)
        self._shared[: len(data)] = data

    def _trim(self) -> None:
        """Give back the shared memory an unusually large artifact needed (the helper has read it)."""
        if self._shared is not None and len(self._shared) > _SHARED_KEEP:
            self._shared.close()
            self._shared = None
            try:
                os.ftruncate(self._memfd, 0)
            except OSError as exc:
                self._fail(f"shrink the shared memory: {exc}")

    def _start(self) -> None:
        if not sys.executable:
            # An embedded interpreter with no executable to start: scan in this process.
            raise HelperError("no Python executable to start it with (sys.executable is empty)")
        self._memfd = os.memfd_create("kavach-scan", os.MFD_CLOEXEC)
        self._progress_fd = os.memfd_create("kavach-scan-progress", os.MFD_CLOEXEC)
        # A fixed size, never truncated: the helper's mapping of it stays valid.
        os.ftruncate(self._progress_fd, _PAGE)
        self._progress = mmap.mmap(self._progress_fd, _PAGE)
        parent, child = socket.socketpair()
        try:
            # Isolated mode (-I), then exactly the caller's import path (made absolute):
            # never the working directory or PYTHONPATH, so a module planted in the
            # directory the caller runs in cannot shadow one the helper imports.
            path = os.pathsep.join(os.path.abspath(p) for p in sys.path)
            starter = (
                "import sys; sys.path[:] = sys.argv[1].split(sys.argv[2]);"
                " from kavach.scanning.helper import main;"
                f" main({child.fileno()}, {self._memfd}, {self._progress_fd})"
            )
            self._proc = subprocess.Popen(
                [sys.executable, "-I", "-c", starter, path, os.pathsep],
                stdin=subprocess.DEVNULL,
                # (A helper that fails says so through the protocol: nothing of it on the
                # caller's terminal.)
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                pass_fds=(child.fileno(), self._memfd, self._progress_fd),
            )
        finally:
            child.close()
        self._sock = parent
        if not self._exit_hook:
            # Stop it at interpreter exit rather than leave it to notice the closed socket.
            atexit.register(self.close)
            self._exit_hook = True

    def _forget(self) -> None:
        """Drop (without stopping) a helper that belongs to the process this one forked from."""
        if self._sock is not None:
            os.close(self._sock.detach())
        self._proc, self._sock = None, None
        self._close_shared()
        self._ready.clear()
        self._preparing = None
        self._pid = os.getpid()

    def _fail(self, why: str) -> None:
        log.warning("scan helper disabled (the gate scans in this process): %s", why)
        self._broken = True
        self._stop()

    def _stop(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        if self._proc is not None:
            self._proc.kill()
            self._proc.wait()
            self._proc = None
        self._close_shared()
        self._ready.clear()
        self._preparing = None

    def _close_shared(self) -> None:
        """Unmap and close both shared memory files (the artifact's and the progress page)."""
        for mapping in (self._shared, self._progress):
            if mapping is not None:
                mapping.close()
        for fd in (self._memfd, self._progress_fd):
            if fd >= 0:
                os.close(fd)
        self._shared, self._progress, self._memfd, self._progress_fd = None, None, -1, -1


def _alone(bank: PatternBank, data: bytes, meanwhile: Callable[[], None] | None) -> Validated:
    if meanwhile is not None:
        meanwhile()
    return bank.validated(data, 0, len(data))


def _joined(chunks: list[tuple[int, Validated]], below: int) -> Validated:
    """The matches of the chunks that start below window ``below``, in order."""
    out: Validated = []
    for first, found in chunks:
        if first < below:
            out += found
    return out


def _checked(found: list[Any], rules: int, size: int) -> Validated:
    """``found`` as (index, start, end, confidence) tuples, if every item is well formed."""
    out: Validated = []
    for item in found:
        if (
            not isinstance(item, list)
            or len(item) != 4
            or not isinstance(item[0], int)
            or not 0 <= item[0] < rules
            or not isinstance(item[1], int)
            or not isinstance(item[2], int)
            or not 0 <= item[1] < item[2] <= size
            or not isinstance(item[3], (int, float))
        ):
            raise HelperError(f"malformed match {item!r}")
        out.append((item[0], item[1], item[2], item[3]))
    return out


def _read_shared(memfd: int, size: int) -> bytes | None:
    """The first ``size`` bytes of the shared file (pread returns at most ~2 GiB per call)."""
    parts: list[bytes] = []
    got = 0
    while got < size:
        part = os.pread(memfd, size - got, got)
        if not part:
            return None
        parts.append(part)
        got += len(part)
    return parts[0] if len(parts) == 1 else b"".join(parts)


def _backward(bank: PatternBank, data: bytes, progress: mmap.mmap) -> tuple[int, Validated]:
    """The helper's part: chunks from the end backward until the caller's claim; returns
    the front reached and the matches of the windows from it to the end, in order."""
    n = len(data)
    front = -(-n // WINDOW)
    chunks: list[Validated] = []
    while front > 0:
        first = (front - 1) // CHUNK * CHUNK  # chunk boundaries are the caller's too
        if first < _MARK.unpack_from(progress, _CLAIM_AT)[0]:
            break
        chunks.append(bank.validated(data, first * WINDOW, min(front * WINDOW, n)))
        front = first
        _MARK.pack_into(progress, _FRONT_AT, front)
    out: Validated = []
    for found in reversed(chunks):
        out += found
    return front, out


def main(fd: int, memfd: int, progress_fd: int) -> None:
    """The helper's loop: build banks on request and scan the artifacts it is sent."""
    from kavach.scanning.gate import bank_named

    sock = socket.socket(fileno=fd)
    progress = mmap.mmap(progress_fd, _PAGE)
    while True:
        try:
            message = _message(sock)
        except (HelperError, OSError):
            return  # the caller is gone (or broke the protocol): nothing to do but exit
        if message[0] == "prepare":
            names = tuple(message[1])
            _post(sock, "ready", names, bank_named(names).digest())
        elif message[0] == "scan":
            names, size = tuple(message[1]), int(message[2])
            data = _read_shared(memfd, size)
            if data is None:
                return  # the caller's file is shorter than it says: a broken caller
            front, found = _backward(bank_named(names), data, progress)
            _post(sock, "found", front, found)
        else:
            return


__all__ = ["CHUNK", "SPLIT_MIN", "HelperError", "ScanHelper", "main"]
