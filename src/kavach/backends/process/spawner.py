"""The spawner: the one single-threaded process that forks every sandbox.

Why a separate process started with ``subprocess`` (posix_spawn) rather than a fork of
the caller: the caller is a Python process that may run threads (asyncio executors,
the pool's refill, the user's own), and ``fork()`` of a multi-threaded process copies
locks held by other threads. The spawner runs no threads, imports only the small modules
the sandbox side needs (then freezes them out of the garbage collector, so forked inits
share those pages), and does nothing but fork: it never sees a sandbox's plan or secrets,
which the caller sends straight to the forked child over that sandbox's own socket.

Protocol on the spawner socket (SOCK_SEQPACKET): the caller sends
``{"op": "fork", "flags": CLONE_NEW..., "tag": T}`` with one fd (the sandbox's end of its
control socket); the spawner answers ``{"op": "forked", "pid": N, "tag": T}`` or
``{"op": "error", ..., "tag": T}`` (the tag lets several requests be in flight).
The spawner is a child subreaper with SIGCHLD ignored, so
every sandbox process that ends up parented to it is reaped by the kernel.
"""

from __future__ import annotations

import gc
import os
import signal
import socket
import sys

from kavach.backends.process import _libc, protocol
from kavach.backends.process.init import child_entry, forbid_file_imports, preload, reopen_std_fds

# The spawner is started as ``kavach-spawner -I -S -c STARTER`` (argv[0] replaced, the
# interpreter is sys.executable) and reads this from
# its stdin, followed by three lines: the source directory, its socket's fd and the caller's
# import path (isolated mode ignores PYTHONPATH). Passing it on stdin keeps the command line,
# which every sandbox can read as /proc/1/cmdline, free of host paths. It registers the
# kavach packages without running their __init__ modules (which import the whole library).
STARTER = "import sys; exec(sys.stdin.readline())"
BOOTSTRAP = (
    "import sys, types; root = sys.stdin.readline().strip(); fd = int(sys.stdin.readline());"
    " sys.path[:0] = [p for p in sys.stdin.readline().strip().split(':') if p];"
    " sys.stdin.close();"
    " [sys.modules.__setitem__(n, types.ModuleType(n)) for n in"
    " ('kavach', 'kavach.backends', 'kavach.backends.process')];"
    " [setattr(sys.modules[n], '__path__', [root + '/' + n.replace('.', '/')]) for n in"
    " ('kavach', 'kavach.backends', 'kavach.backends.process')];"
    " from kavach.backends.process.spawner import main; main(fd)\n"
)


_ALLOWED_FLAGS = (
    _libc.CLONE_NEWUSER
    | _libc.CLONE_NEWNS
    | _libc.CLONE_NEWPID
    | _libc.CLONE_NEWNET
    | _libc.CLONE_NEWIPC
    | _libc.CLONE_NEWUTS
)


def main(sock_fd: int) -> None:
    """Serve fork requests until the caller closes the socket."""
    # fd 0 was the bootstrap pipe (closed by now): keep 0-2 on /dev/null, or a received fd
    # could take number 0 and be clobbered when a sandbox process reopens its stdio.
    reopen_std_fds()
    sock = socket.socket(fileno=sock_fd)
    sock.setblocking(True)
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _libc.prctl(_libc.PR_SET_CHILD_SUBREAPER, 1, "make the spawner a child subreaper")
    _libc.set_process_name(b"kavach-spawner")
    preload()
    # Everything a sandbox process runs is loaded now: drop file imports here, once, so
    # that every init and exec server starts without them (doing it in each fork costs
    # pages copied in each; they still call forbid_file_imports, which is then a no-op).
    forbid_file_imports()
    gc.collect()
    gc.freeze()
    while True:
        try:
            message, fds = protocol.recv(sock)
        except InterruptedError:
            continue
        if message is None:
            return
        tag = message.get("tag")
        if message.get("op") != "fork" or len(fds) != 1 or not isinstance(message.get("flags"), int):
            for fd in fds:
                os.close(fd)
            protocol.send(sock, {"op": "error", "step": "fork request", "errno": 22, "tag": tag})
            continue
        flags = message["flags"] & _ALLOWED_FLAGS
        try:
            # One clone(2) creates the process directly in its new namespaces (it is PID 1
            # of its pid namespace at once); without namespaces it is a plain fork.
            pid = _libc.clone_process(flags, "clone the sandbox process") if flags else os.fork()
        except OSError as exc:
            os.close(fds[0])
            protocol.send(
                sock, {"op": "error", "step": "clone the sandbox process", "errno": exc.errno or 0, "tag": tag}
            )
            continue
        if pid == 0:
            sock.close()
            child_entry(fds[0])
        os.close(fds[0])
        protocol.send(sock, {"op": "forked", "pid": pid, "tag": tag})


if __name__ == "__main__":
    main(int(sys.argv[1]))
