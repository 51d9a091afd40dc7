"""The exec server's warm-up, run in this process (no sandbox): what it does and never does."""

from __future__ import annotations

import _thread
import os
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from kavach.backends.process import execd


def children() -> set[int]:
    """Every child process of this process (any thread's), zombies included."""
    found: set[int] = set()
    for task in os.listdir("/proc/self/task"):
        with open(f"/proc/self/task/{task}/children", encoding="ascii") as handle:
            found.update(int(pid) for pid in handle.read().split())
    return found


@pytest.fixture
def server(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[execd.ExecServer, list[int]]]:
    """A server on a socketpair whose scope layer records the thread it ran in."""
    monkeypatch.chdir(tmp_path)  # warm() changes the cwd to the workdir; restored after
    stack = _thread.stack_size()
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    null_fd = os.open("/dev/null", os.O_RDONLY | os.O_CLOEXEC)
    layer_threads: list[int] = []
    workdir = tmp_path / "work"
    workdir.mkdir()
    srv = execd.ExecServer(ours, null_fd, lambda: layer_threads.append(threading.get_ident()), str(workdir))
    try:
        yield srv, layer_threads
    finally:
        _thread.stack_size(stack)
        for fd in (null_fd, srv.wake_r, srv.wake_w):
            os.close(fd)
        srv.poller.close()
        ours.close()
        theirs.close()


def test_warm_up_runs_the_spawn_path_and_starts_nothing(
    server: tuple[execd.ExecServer, list[int]], tmp_path: Path
) -> None:
    srv, layer_threads = server
    before = children()
    srv.warm()
    # The whole path a command takes ran: its own Landlock layer, in a thread of its own
    # (never the server's thread), and the chdir to where commands start.
    assert len(layer_threads) == 1
    assert layer_threads[0] != threading.get_ident()
    assert os.getcwd() == str(tmp_path / "work")
    # But nothing started, nothing is left to reap, and no report was queued for the caller.
    assert children() == before
    assert srv.running == {}
    assert not srv.outbox


def test_a_warm_up_that_started_a_command_kills_it_and_fails(
    server: tuple[execd.ExecServer, list[int]], monkeypatch: pytest.MonkeyPatch
) -> None:
    srv, _layer_threads = server
    # A target that does run (what /dev/null can never be): the server must not go on.
    monkeypatch.setattr(execd, "_WARM_TARGET", "/bin/cat")
    before = children()
    with pytest.raises(RuntimeError, match="warm-up started /bin/cat"):
        srv.warm()
    assert children() == before  # killed and reaped
