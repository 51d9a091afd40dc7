"""The caller's side of the engine: the spawner connection and the per-sandbox channels.

The spawner is started lazily, once per caller process, with ``subprocess`` (posix_spawn,
safe from a multi-threaded caller). A fork request is sent at once (under a lock) and its
reply awaited without blocking the event loop (the clone takes 1.5-2.5 ms here), so the
caller prepares the cgroup meanwhile; everything that waits on a sandbox (its setup, its
commands) is asynchronous on the sandbox's own control socket.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno as errno_names
import os
import socket
import subprocess
import sys
import threading
import weakref
from collections import deque
from pathlib import Path
from typing import Any

from kavach.backends.process import protocol
from kavach.errors import SandboxCreateError

_SRC_DIR = str(Path(__file__).resolve().parents[3])


def _import_path() -> str:
    """The caller's import path (directories only), so the spawner finds the same packages."""
    return ":".join(p for p in sys.path if p and ":" not in p and os.path.isdir(p))


class Spawner:
    """The connection to this process's spawner (restarted if it died or after a fork)."""

    _lock = threading.Lock()
    _instance: Spawner | None = None

    def __init__(self) -> None:
        parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        from kavach.backends.process.spawner import BOOTSTRAP, STARTER

        try:
            self.process = subprocess.Popen(
                # argv[0] is a plain name: every sandbox can read it as /proc/1/cmdline,
                # and the interpreter's path would name a host directory. The bootstrap
                # brings the caller's import path, so nothing depends on argv[0].
                # -S: no site module. With argv[0] not the interpreter's path, Python does
                # not find a virtualenv's pyvenv.cfg, so site would add the *base*
                # installation's site-packages and run its .pth files: other code, more
                # modules in the spawner, and so more pages copied in every sandbox fork.
                ["kavach-spawner", "-I", "-S", "-c", STARTER],
                executable=sys.executable,
                pass_fds=(child.fileno(),),
                stdin=subprocess.PIPE,
                stdout=subprocess.DEVNULL,
                stderr=None if os.environ.get("KAVACH_DEBUG_SPAWNER") else subprocess.DEVNULL,
                env={},  # nothing of the caller's environment reaches the spawner or its forks
                close_fds=True,
            )
            assert self.process.stdin is not None
            self.process.stdin.write(f"{BOOTSTRAP}{_SRC_DIR}\n{child.fileno()}\n{_import_path()}\n".encode())
            self.process.stdin.close()
        finally:
            child.close()
        self.sock = parent
        self.owner_pid = os.getpid()
        self._next_tag = 0
        # tag -> (loop, future) of a fork request whose reply has not come yet
        self._pending: dict[int, tuple[asyncio.AbstractEventLoop, asyncio.Future[dict[str, Any] | None]]] = {}
        self._readers: weakref.WeakSet[asyncio.AbstractEventLoop] = weakref.WeakSet()
        self._exited = False

    @classmethod
    def get(cls) -> Spawner:
        """The live spawner of this process, started on first use."""
        with cls._lock:
            current = cls._instance
            if (
                current is None
                or current.owner_pid != os.getpid()
                or current.process.poll() is not None
                or current.exited()
            ):
                cls._instance = current = Spawner()
            return current

    def request_fork(self, sandbox_end: socket.socket, flags: int) -> asyncio.Future[dict[str, Any] | None]:
        """Ask for a sandbox process (in new namespaces ``flags``) that owns ``sandbox_end``.

        The request is sent now (``sandbox_end`` may be closed as soon as this returns); the
        future resolves to the spawner's reply, or None if the spawner exited, without
        blocking the event loop. Pass the reply to :func:`forked_pid`. A reply nobody awaits
        any more (the caller gave up) is dropped; the process it names exits when the other
        end of ``sandbox_end`` closes.
        """
        loop = asyncio.get_running_loop()
        future: asyncio.Future[dict[str, Any] | None] = loop.create_future()
        with self._lock:
            if loop not in self._readers:
                loop.add_reader(self.sock.fileno(), self._collect)
                self._readers.add(loop)
            tag = self._next_tag
            self._next_tag += 1
            self._pending[tag] = (loop, future)
            try:
                protocol.send(self.sock, {"op": "fork", "flags": flags, "tag": tag}, [sandbox_end.fileno()])
            except OSError as exc:
                del self._pending[tag]
                raise SandboxCreateError(f"spawner: {exc}") from None
        return future

    def _collect(self) -> None:
        """Read every reply that arrived and hand each to its waiter (on the waiter's loop)."""
        with self._lock:
            while not self._exited:
                try:
                    message, fds = protocol.recv(self.sock, socket.MSG_DONTWAIT)
                except BlockingIOError:
                    return
                except (OSError, protocol.ProtocolError):
                    message, fds = None, []
                for fd in fds:
                    os.close(fd)
                if message is None:
                    self._exited = True
                    for loop, future in self._pending.values():
                        if not loop.is_closed():
                            loop.call_soon_threadsafe(_resolve, future, None)
                    self._pending.clear()
                    for loop in list(self._readers):
                        if not loop.is_closed():
                            loop.call_soon_threadsafe(loop.remove_reader, self.sock.fileno())
                    return
                waiter = self._pending.pop(message.get("tag", -1), None)
                if waiter is not None and not waiter[0].is_closed():
                    # The waiter's loop may be another thread's: resolve it there.
                    waiter[0].call_soon_threadsafe(_resolve, waiter[1], message)

    def exited(self) -> bool:
        """True once the spawner closed its socket."""
        return self._exited

    @property
    def pid(self) -> int:
        """The spawner's pid."""
        return self.process.pid


def _resolve(future: asyncio.Future[dict[str, Any] | None], message: dict[str, Any] | None) -> None:
    if not future.done():
        future.set_result(message)


def forked_pid(message: dict[str, Any] | None) -> int:
    """The host pid from a fork reply; raises :class:`SpawnError` with the kernel's errno."""
    if message is None:
        raise SandboxCreateError("spawner exited")
    if message.get("op") != "forked":
        raise SpawnError(str(message.get("step")), int(message.get("errno", 0)))
    return int(message["pid"])


class SpawnError(SandboxCreateError):
    """The spawner could not create a sandbox process; ``errno`` says why."""

    def __init__(self, step: str, err: int) -> None:
        self.step = step
        self.errno = err
        super().__init__(f"{step}: {errno_names.errorcode.get(err, str(err))} ({os.strerror(err)})")


class ChannelClosed(ConnectionError):
    """The sandbox's init closed its control socket (it exited)."""


class Channel:
    """An asyncio view of one sandbox's control socket, routing messages by exec id."""

    def __init__(self, sock: socket.socket) -> None:
        sock.setblocking(False)
        self.sock = sock
        self.closed = False
        self._control: deque[tuple[dict[str, Any], list[int]]] = deque()
        self._by_id: dict[int, deque[dict[str, Any]]] = {}
        self._waiters: list[asyncio.Future[None]] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        # The sandbox's exec server (pid, socket): commands go straight to it (see execd).
        self._server: tuple[int, socket.socket] | None = None
        # "killall" requests sent; an offer that init made before carrying out the last one
        # (its "gen" is lower) names a server that killall kills: it is dropped.
        self._kills_sent = 0
        # Sockets of exec servers, read until they close (a server replaced after a
        # killall still reports what it started before it died): fd -> (socket, pid).
        self._links: dict[int, tuple[socket.socket, int]] = {}
        # Execs sent to a server whose exit has not come yet: exec id -> server pid. If
        # that server's socket closes first, init is asked about them ("lost").
        self._sent: dict[int, int] = {}
        # Execs in progress: reports about any other exec (a second report of an exit
        # already consumed, in a race) are dropped.
        self._active: set[int] = set()

    def _ensure_reader(self) -> None:
        loop = asyncio.get_running_loop()
        if self._loop is loop or self.closed:
            return
        if self._loop is not None and not self._loop.is_closed():
            self._loop.remove_reader(self.sock.fileno())
            for fd in self._links:
                self._loop.remove_reader(fd)
        self._loop = loop
        loop.add_reader(self.sock.fileno(), self._on_readable)
        for fd, (link, _pid) in self._links.items():
            loop.add_reader(fd, self._on_link_readable, link)

    def _on_readable(self) -> None:
        while not self.closed:
            try:
                message, fds = protocol.recv(self.sock)
            except BlockingIOError:
                break
            except (OSError, protocol.ProtocolError):
                message, fds = None, []
            if message is None:
                self._mark_closed()
                break
            if "id" in message:
                self._route(message)
                for fd in fds:
                    os.close(fd)
            elif message.get("op") == "server" and len(fds) == 1:
                if int(message.get("gen", 0)) < self._kills_sent:
                    os.close(fds[0])  # killed (or about to be) by a killall sent since
                else:
                    self._set_server(int(message["pid"]), socket.socket(fileno=fds[0]))
            else:
                self._control.append((message, fds))
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)

    def _route(self, message: dict[str, Any]) -> None:
        exec_id = int(message["id"])
        if message.get("op") == "exit":
            self._sent.pop(exec_id, None)
        if exec_id in self._active:
            self._by_id.setdefault(exec_id, deque()).append(message)

    def begin(self, exec_id: int) -> None:
        """Exec ``exec_id`` is about to be sent: keep the reports about it."""
        self._active.add(exec_id)

    def _watch(self, link: socket.socket, pid: int) -> None:
        """Read an exec server's reports (until it closes)."""
        link.setblocking(False)
        self._links[link.fileno()] = (link, pid)
        if self._loop is not None and not self._loop.is_closed() and not self.closed:
            self._loop.add_reader(link.fileno(), self._on_link_readable, link)

    def _on_link_readable(self, link: socket.socket) -> None:
        while True:
            try:
                message, fds = protocol.recv(link)
            except BlockingIOError:
                break
            except (OSError, protocol.ProtocolError):
                message, fds = None, []
            for fd in fds:
                os.close(fd)
            if message is None:
                self._unwatch(link)
                break
            if "id" in message:
                self._route(message)
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)

    def _unwatch(self, link: socket.socket) -> None:
        fd = link.fileno()
        if fd < 0:
            return
        if self._loop is not None and not self._loop.is_closed():
            self._loop.remove_reader(fd)
        _link, pid = self._links.pop(fd, (link, 0))
        if self._server is not None and self._server[1] is link:
            self._server = None
        link.close()
        # The server is gone: what it did not report, init knows (it adopts the server's
        # commands and reports their exits; an exec that never started, it reports lost).
        for exec_id in [i for i, server in self._sent.items() if server == pid]:
            del self._sent[exec_id]
            if exec_id in self._active and not self.closed:
                with contextlib.suppress(ChannelClosed):
                    self.send({"op": "lost", "id": exec_id, "server": pid})

    def finish(self, exec_id: int) -> None:
        """Exec ``exec_id`` is over: drop what is left about it (a second exit report)."""
        self._active.discard(exec_id)
        self._by_id.pop(exec_id, None)
        self._sent.pop(exec_id, None)

    def _set_server(self, pid: int, sock: socket.socket) -> None:
        # A previous server stays watched until it closes: it may still report exits.
        self._server = (pid, sock)
        self._watch(sock, pid)

    def send_killall(self, signum: int, ack: bool) -> None:
        """Ask init to signal every process but itself; the exec server goes with them.

        From now on no command is handed to that server (it would be reported as killed
        although it never ran); it is still read until it closes, for what it started.
        """
        self._kills_sent += 1
        self._server = None
        self.send({"op": "killall", "sig": signum, "ack": ack})

    def server(self) -> tuple[int, socket.socket] | None:
        """The exec server (pid, socket) at hand; None when there is none."""
        if not self.closed:
            self._on_readable()  # pick up an offer even if no reader ran since it arrived
        return self._server

    def sent_to_server(self, exec_id: int, pid: int) -> None:
        """Exec ``exec_id`` was sent to server ``pid`` (if it dies first, init is asked)."""
        self._sent[exec_id] = pid

    def drop_server(self, sock: socket.socket) -> None:
        """The server refused a command (it died): stop using it; it is read until it closes."""
        if self._server is not None and self._server[1] is sock:
            self._server = None

    def _mark_closed(self) -> None:
        self.closed = True
        if self._loop is not None and not self._loop.is_closed():
            self._loop.remove_reader(self.sock.fileno())

    async def _wait(self) -> None:
        self._ensure_reader()
        waiter = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            await waiter
        finally:
            if waiter in self._waiters:
                self._waiters.remove(waiter)

    async def control(self) -> tuple[dict[str, Any], list[int]]:
        """The next message that is not about one exec (setup, kill acknowledgements)."""
        while not self._control:
            if self.closed:
                raise ChannelClosed("sandbox init closed its control socket")
            await self._wait()
        return self._control.popleft()

    async def for_exec(self, exec_id: int) -> dict[str, Any]:
        """The next message about exec ``exec_id``."""
        while not self._by_id.get(exec_id):
            if self.closed:
                raise ChannelClosed("sandbox init closed its control socket")
            await self._wait()
        queue = self._by_id[exec_id]
        message = queue.popleft()
        if not queue:
            del self._by_id[exec_id]
        return message

    def send(self, message: dict[str, Any], fds: list[int] | tuple[int, ...] = ()) -> None:
        """Send one message; the socket buffer absorbs it (init reads continuously)."""
        if self.closed:
            raise ChannelClosed("sandbox init closed its control socket")
        try:
            protocol.send(self.sock, message, fds)
        except protocol.ProtocolError:
            raise  # a message we refused to send (too large); the channel is fine
        except BlockingIOError:
            # The buffer is full only if init stopped reading; it is then wedged or frozen.
            raise ChannelClosed("sandbox init is not reading its control socket") from None
        except OSError as exc:
            self._mark_closed()
            raise ChannelClosed(f"sandbox control socket: {exc}") from None

    def close(self) -> None:
        """Close our end; init sees EOF, kills everything and exits."""
        if self._loop is not None and not self._loop.is_closed() and not self.closed:
            self._loop.remove_reader(self.sock.fileno())
        self.closed = True
        while self._control:
            _message, fds = self._control.popleft()
            for fd in fds:
                os.close(fd)
        self._server = None
        for link, _pid in list(self._links.values()):
            self._unwatch(link)
        self._loop = None
        self.sock.close()


__all__ = ["Channel", "ChannelClosed", "SpawnError", "Spawner", "forked_pid"]
