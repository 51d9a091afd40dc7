"""Init answers for every exec a dead exec server left unreported, exactly once.

Run in this process (no sandbox): an ``Init`` on a socketpair, the dead server's state as
init holds it, and real processes for the commands (reaped, or still running).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
from collections.abc import Iterator

import pytest

from kavach.backends.process import protocol
from kavach.backends.process.init import Init, ServerChild


@pytest.fixture
def init() -> Iterator[tuple[Init, socket.socket]]:
    """An Init whose control socket's other end is returned (non-blocking) for reading."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    theirs.setblocking(False)
    box = Init(ours, {"namespaces": True})
    try:
        yield box, theirs
    finally:
        box.selector.close()
        for fd in (box.wake_r, box.wake_w, box.null_fd):
            os.close(fd)
        ours.close()
        theirs.close()


def reaped_pid() -> int:
    """The pid of a process that ran and was reaped (no longer anyone's child)."""
    proc = subprocess.Popen(["/bin/true"])
    proc.wait()
    return proc.pid


def reports(theirs: socket.socket) -> list[dict[str, object]]:
    """Every message init has sent so far."""
    found = []
    while True:
        try:
            message, _fds = protocol.recv(theirs)
        except BlockingIOError:
            return found
        assert message is not None
        found.append(message)


def records(entries: list[dict[str, object]]) -> int:
    """A dead server's record pipe holding ``entries`` (read end; the writer is closed)."""
    read_end, write_end = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
    os.write(write_end, b"".join(json.dumps(entry).encode() + b"\n" for entry in entries))
    os.close(write_end)
    return read_end


def test_an_exec_the_dead_server_reaped_but_never_reported_is_answered(init: tuple[Init, socket.socket]) -> None:
    # The server started exec 7, reaped its command, and was killed before its exit report
    # went out: init cannot reap that command, so it must answer the caller itself.
    box, theirs = init
    server = ServerChild(reaped_pid(), None, -1)  # type: ignore[arg-type]
    server.started = {7: reaped_pid()}
    box.dead[server.pid] = server
    box._lost(7, server.pid)
    assert reports(theirs) == [{"op": "exit", "id": 7, "signal": 9, "code": 137}]


def test_an_adopted_command_still_running_is_reported_when_it_ends_not_before(
    init: tuple[Init, socket.socket],
) -> None:
    box, theirs = init
    command = subprocess.Popen(["/bin/sleep", "30"])
    try:
        server = ServerChild(reaped_pid(), None, -1)  # type: ignore[arg-type]
        server.started = {7: command.pid}
        box.dead[server.pid] = server
        box.children[command.pid] = (7, -1)  # adopted when the server's death was processed
        box._lost(7, server.pid)
        assert reports(theirs) == []
    finally:
        command.kill()
        command.wait()


def test_a_lost_exec_whose_orphan_was_already_reaped_gets_its_real_exit_once(
    init: tuple[Init, socket.socket],
) -> None:
    # The caller saw the server's socket close (and sent "lost") before init reaped the
    # server; the command, orphaned, was reaped first with exit status 3.
    box, theirs = init
    command = reaped_pid()
    server = ServerChild(reaped_pid(), None, records([{"start": 7, "pid": command, "ended": []}]))  # type: ignore[arg-type]
    server.lost = {7}
    box.server = server
    box.unclaimed[command] = 3 << 8
    box._server_ended(server, 9)
    assert reports(theirs) == [{"op": "exit", "id": 7, "code": 3}]
