"""Messages between the caller, the spawner and a sandbox's init.

Every channel is a ``SOCK_SEQPACKET`` unix socket: message boundaries are kept, so one
``sendmsg`` is one JSON object plus, optionally, file descriptors passed with SCM_RIGHTS.
Standard library only (loaded by the spawner and by init).
"""

from __future__ import annotations

import array
import json
import os
import socket
from typing import Any

MAX_MESSAGE = 256 * 1024
MAX_FDS = 64
_FD_SIZE = array.array("i").itemsize


class ProtocolError(OSError):
    """A peer sent something malformed or closed the channel."""


# One encoder, made at import (in the spawner, so every sandbox process shares it): json.dumps
# with separators builds a new JSONEncoder per call, which in a fresh fork costs ~40 kB of
# copied pages the first time (idle memory per sandbox).
_encode = json.JSONEncoder(separators=(",", ":")).encode


def encode(message: dict[str, Any]) -> bytes:
    """One message as sent on the wire (compact JSON)."""
    return _encode(message).encode()


def send(sock: socket.socket, message: dict[str, Any], fds: list[int] | tuple[int, ...] = ()) -> None:
    """Send one message (and ``fds``, which stay open on our side)."""
    data = encode(message)
    if len(data) > MAX_MESSAGE:
        raise ProtocolError(f"message too large ({len(data)} bytes)")
    if fds:
        ancillary = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())]
        sock.sendmsg([data], ancillary)
    else:
        sock.sendmsg([data])


def decode(data: bytes, ancdata: list[tuple[int, int, bytes]]) -> tuple[dict[str, Any] | None, list[int]]:
    """Turn one received datagram into (message, fds); (None, []) means the peer closed."""
    fds: list[int] = []
    for level, kind, payload in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            usable = len(payload) - len(payload) % _FD_SIZE
            fds.extend(array.array("i", payload[:usable]))
    if not data:
        for fd in fds:
            os.close(fd)
        return None, []
    try:
        message = json.loads(data)
    except ValueError as exc:
        for fd in fds:
            os.close(fd)
        raise ProtocolError(f"malformed message: {exc}") from None
    if not isinstance(message, dict):
        for fd in fds:
            os.close(fd)
        raise ProtocolError("malformed message: not an object")
    return message, fds


def recv(sock: socket.socket, flags: int = 0) -> tuple[dict[str, Any] | None, list[int]]:
    """Receive one message; blocking or not, as the socket is set (or ``MSG_DONTWAIT``)."""
    data, ancdata, _flags, _addr = sock.recvmsg(MAX_MESSAGE, socket.CMSG_SPACE(MAX_FDS * _FD_SIZE), flags)
    return decode(data, ancdata)


__all__ = ["MAX_MESSAGE", "ProtocolError", "decode", "encode", "recv", "send"]
