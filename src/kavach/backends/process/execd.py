"""The exec server: one confined process per sandbox that starts every command.

Init forks it once (again only after a killall or if it died). It confines itself exactly
as a command must start (rlimits, capabilities dropped, oom score, no_new_privs, Landlock,
seccomp last: see ``init._server_child``), reports the enforcement probe, and then serves
the caller directly over its own socket: each ``exec`` message (argv, env, cwd and the
command's stdio fds) becomes one ``posix_spawn`` (the C library's vfork+execve: no copy of
this Python process, no fork of init per command), and the command's exit comes back on
the same socket.

Isolation between commands and from this server: each command is started from a fresh
thread that first adds its own Landlock layer (signal and abstract-unix-socket scoping,
ABI >= 6), so every command runs in a domain nested below the server's. Landlock then
refuses a command's signals to the server (a parent domain) and to the commands of other
execs (sibling domains), and its ptrace rules refuse it the server's memory; the server is
also non-dumpable. The thread ends as soon as the command has started: no thread of the
server stays in a command's domain. Without Landlock scoping (policies without Landlock,
ABI < 6) commands share the server's domain, as they shared the warm child's before.

The server tells init, through its record pipe (fd 3), which pid runs which exec
(``{"start": id, "pid": pid}``, written before the caller hears of the command). If the
server dies (a killall, the pids limit, the OOM killer), its commands become init's
(init is the child subreaper) and init reports their exits; an exec the caller sent that
never started is reported by init when the caller asks (``lost``).
"""

from __future__ import annotations

import _signal as _csignal  # type: ignore[import-not-found]  # C module of `signal`
import _thread
import contextlib
import errno
import json
import os
import select
import signal
import socket
from collections import deque
from collections.abc import Callable
from typing import Any, NoReturn

from kavach.backends.process import protocol

RECORD_FD = 3
EXIT_EXEC_FAILED = 127
# Small stacks: the thread only makes two syscalls and a posix_spawn, and an address-space
# rlimit (RLIMIT_AS) of the policy also bounds this process.
_THREAD_STACK = 256 * 1024
# Dispositions a command must start with: Python ignores SIGPIPE and SIGXFSZ, and an
# ignored signal stays ignored through execve (handled ones are reset by the kernel).
_DEFAULT_SIGNALS = tuple(sig for sig in signal.Signals if sig not in (signal.SIGKILL, signal.SIGSTOP))
RECV_FLAGS = socket.MSG_CMSG_CLOEXEC  # a received fd must never leak into another command
# What ExecServer.warm asks to run: never a regular file, so execve always refuses it.
_WARM_TARGET = "/dev/null"


def exit_message(exec_id: int, status: int, error: dict[str, Any] | None) -> dict[str, Any]:
    """The "exit" report of exec ``exec_id`` from its wait status (128+N for signal N)."""
    reply: dict[str, Any] = {"op": "exit", "id": exec_id}
    if os.WIFSIGNALED(status):
        reply["signal"] = os.WTERMSIG(status)
        reply["code"] = 128 + os.WTERMSIG(status)
    else:
        reply["code"] = os.WEXITSTATUS(status)
    if error is not None:
        reply["error"] = error
    return reply


def spawn_command(argv: list[bytes], env: dict[bytes, bytes], stdio: tuple[int, int, int]) -> int:
    """posix_spawn the command on ``stdio`` in a new session; the PATH search of execvpe.

    The command starts from this thread's controls (capabilities, no_new_privs, rlimits,
    oom score, Landlock domain, seccomp filter: all inherited), with default signal
    dispositions and an empty mask. The PATH search is os.execvpe's: the command's own
    PATH, else os.defpath; the first error other than ENOENT/ENOTDIR wins.
    """
    actions = [(os.POSIX_SPAWN_DUP2, fd, target) for target, fd in enumerate(stdio)]

    def attempt(path: bytes) -> int:
        return os.posix_spawn(
            path, argv, env, file_actions=actions, setsid=True, setsigmask=(), setsigdef=_DEFAULT_SIGNALS
        )

    if os.path.dirname(argv[0]):
        return attempt(argv[0])
    first_error: OSError | None = None
    last_error: OSError = FileNotFoundError(2, "No such file or directory")
    for directory in os.get_exec_path(env):  # type: ignore[arg-type]  # bytes keys are accepted
        try:
            return attempt(os.path.join(os.fsencode(directory), argv[0]))
        except (FileNotFoundError, NotADirectoryError) as exc:
            last_error = exc
        except OSError as exc:
            last_error = exc
            first_error = first_error or exc
    raise first_error or last_error


def run_in_fresh_thread(fn: Callable[[], int]) -> int:
    """Run ``fn`` in a new thread and return its result (or raise its OSError) here.

    The thread exits right after ``fn``: whatever ``fn`` applied to it (a Landlock layer)
    dies with it and never reaches the server's own thread.
    """
    done = _thread.allocate_lock()
    done.acquire()
    outcome: list[int | BaseException] = []

    def body() -> None:
        try:
            outcome.append(fn())
        except BaseException as exc:  # noqa: BLE001 - handed to the waiting thread as is
            outcome.append(exc)
        finally:
            done.release()

    try:
        _thread.start_new_thread(body, ())
    except RuntimeError:
        # No thread could be created: the pids limit is reached (a fork bomb of an earlier
        # command, say). The command cannot start either; its exec fails, the server stays.
        raise OSError(errno.EAGAIN, "cannot start a thread") from None
    done.acquire()
    result = outcome[0]
    if isinstance(result, BaseException):
        raise result
    return result


class ExecServer:
    """The serving loop of one sandbox's exec server (see the module docstring)."""

    def __init__(self, sock: socket.socket, null_fd: int, scope_layer: Callable[[], None] | None, workdir: str) -> None:
        self.sock = sock
        self.null_fd = null_fd
        self.workdir = workdir
        # Adds a nested Landlock layer to the calling thread; None: commands share our domain.
        self.scope_layer = scope_layer
        self.running: dict[int, int] = {}  # pid -> exec id
        # Execs whose exit was reported since the last record: init learns of them with the
        # next start record (one pipe write per command, not two).
        self.ended: list[int] = []
        self.poller = select.epoll()
        self.wake_r, self.wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        # Reports the socket could not take yet (the caller is slow to read): sent in order
        # once it can. Nothing is dropped: the caller waits for every exit report.
        self.outbox: deque[dict[str, Any]] = deque()
        self.waiting_to_write = False
        self.sock.setblocking(False)

    def warm(self) -> None:
        """Run the spawn path once, with a command that cannot start, before any command came.

        Otherwise the first command pays for this process's first run of that path: the
        pages CPython writes while it runs code for the first time here (shared with init
        until then, so each one is copied), the first thread and its stack, the first
        Landlock layer. The first command of a sandbox then took about 0.55 ms longer than
        the next ones; after this, 0.1-0.2 ms (docs/process.md). It costs about 0.25 MiB
        of idle memory per sandbox and runs after the probe is sent, while the caller
        finishes the creation.

        The target is /dev/null: execve refuses anything that is not a regular file
        (EACCES) and no bind can cover it (the policy refuses targets under /dev), so
        nothing runs; every refusal (EACCES, or EAGAIN at the pids limit) is the expected
        outcome. Should a process start anyway, it is killed and this raises: the server
        then fails and so does the sandbox's creation.
        """
        _thread.stack_size(_THREAD_STACK)
        try:
            pid = self._spawn({"argv": [_WARM_TARGET], "env": {}, "cwd": None}, (self.null_fd,) * 3)
        except _SetupError:
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        raise RuntimeError(f"the warm-up started {_WARM_TARGET} as a command")

    def serve(self) -> NoReturn:
        """Serve commands until the caller closes the socket; then end (init kills what is left)."""
        # The C-level calls (_signal, select.epoll), not the signal/selectors wrappers: every
        # object the server touches is a page copied from init in every sandbox (idle PSS).
        _thread.stack_size(_THREAD_STACK)
        _csignal.set_wakeup_fd(self.wake_w)
        _csignal.signal(signal.SIGCHLD, _ignore_in_python)
        sock_fd = self.sock.fileno()
        self.poller.register(sock_fd, select.EPOLLIN)
        self.poller.register(self.wake_r, select.EPOLLIN)
        while True:
            for fd, events in self.poller.poll(-1, 2):  # two fds: no 1023-event buffer per call
                if fd == sock_fd:
                    if events & select.EPOLLOUT:
                        self._flush()
                    if events & (select.EPOLLIN | select.EPOLLHUP | select.EPOLLERR):
                        self._on_sock()
                else:
                    drain(self.wake_r)
                    self._reap()

    def _on_sock(self) -> None:
        while True:
            try:
                message, fds = protocol.recv(self.sock, RECV_FLAGS)
            except BlockingIOError:
                return
            except (protocol.ProtocolError, ConnectionError):
                os._exit(0)
            if message is None:
                os._exit(0)  # the caller is gone
            self._handle(message, fds)

    def _handle(self, message: dict[str, Any], fds: list[int]) -> None:
        if message.get("op") == "exec":
            self._start(message, fds)
        else:
            for fd in fds:
                os.close(fd)

    def _start(self, message: dict[str, Any], fds: list[int]) -> None:
        exec_id = int(message.get("id", -1))
        try:
            stdio = self._stdio(message, fds)
            pid = self._spawn(message, stdio)
        except _SetupError as exc:
            self._send(exit_message(exec_id, EXIT_EXEC_FAILED << 8, {"step": exc.step, "errno": exc.errno}))
            return
        finally:
            for fd in fds:
                os.close(fd)
        self.running[pid] = exec_id
        # Init first: from here on it can find the command (a kill, this server's death).
        _record({"start": exec_id, "pid": pid, "ended": self.ended})
        self.ended = []
        if message.get("report_pid"):
            self._send({"op": "started", "id": exec_id, "pid": pid})

    def _stdio(self, message: dict[str, Any], fds: list[int]) -> tuple[int, int, int]:
        if message.get("stdin"):
            if len(fds) != 3:
                raise _SetupError("set up stdio: wrong number of fds", 22)
            return fds[0], fds[1], fds[2]
        if len(fds) != 2:
            raise _SetupError("set up stdio: wrong number of fds", 22)
        return self.null_fd, fds[0], fds[1]

    def _spawn(self, message: dict[str, Any], stdio: tuple[int, int, int]) -> int:
        cwd = message.get("cwd") or self.workdir
        try:
            # The cwd is the process's: set here, in the one thread that spawns, and
            # inherited by the command (posix_spawn has no chdir action in Python 3.11).
            os.chdir(cwd)
        except OSError as exc:
            raise _SetupError(f"chdir {cwd}", exc.errno or 0) from None
        except ValueError:  # a NUL byte (ExecRequest refuses it first): fail the exec, not the server
            raise _SetupError("chdir: NUL byte in the path", errno.EINVAL) from None
        argv = [os.fsencode(a) for a in message["argv"]]
        env = {os.fsencode(k): os.fsencode(v) for k, v in message["env"].items()}
        scope_layer = self.scope_layer

        def in_own_domain() -> int:
            if scope_layer is not None:
                try:
                    scope_layer()
                except OSError as exc:
                    raise _SetupError(f"Landlock layer of the command: {exc}", exc.errno or 0) from None
            return spawn_command(argv, env, stdio)

        try:
            if scope_layer is None:
                # Nothing to confine to one thread: spawn from this one (a thread start
                # and its wake-up cost more than the posix_spawn itself).
                return in_own_domain()
            return run_in_fresh_thread(in_own_domain)
        except _SetupError:
            raise
        except OSError as exc:
            raise _SetupError("execve", exc.errno or 0) from None
        except ValueError:
            # posix_spawn's refusal of a NUL byte or of '=' in a variable name (ExecRequest
            # refuses both first): this exec fails, the server keeps serving.
            raise _SetupError("execve: NUL byte or '=' in a variable name", errno.EINVAL) from None

    def _reap(self) -> None:
        while self.running:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            exec_id = self.running.pop(pid, None)
            if exec_id is not None:
                self._send(exit_message(exec_id, status, None))
                self.ended.append(exec_id)

    def _send(self, message: dict[str, Any]) -> None:
        self.outbox.append(message)
        if len(self.outbox) == 1:
            self._flush()

    def _flush(self) -> None:
        while self.outbox:
            try:
                protocol.send(self.sock, self.outbox[0])
            except BlockingIOError:
                self._want_write(True)
                return
            except OSError:
                os._exit(0)  # the caller is gone
            self.outbox.popleft()
        self._want_write(False)

    def _want_write(self, want: bool) -> None:
        if want != self.waiting_to_write:
            self.poller.modify(self.sock.fileno(), select.EPOLLIN | (select.EPOLLOUT if want else 0))
            self.waiting_to_write = want


class _SetupError(Exception):
    """A command could not be started; ``step`` and ``errno`` go into its exit report."""

    def __init__(self, step: str, err: int) -> None:
        super().__init__(step)
        self.step = step
        self.errno = err


def _record(entry: dict[str, Any]) -> None:
    # A short write to a pipe is atomic below PIPE_BUF; if init is gone, so is the sandbox.
    with contextlib.suppress(OSError):
        os.write(RECORD_FD, json.dumps(entry, separators=(",", ":")).encode() + b"\n")


def drain(fd: int) -> None:
    """Read a non-blocking fd (a signal wakeup pipe) until it is empty."""
    try:
        while os.read(fd, 4096):
            pass
    except BlockingIOError:
        return


def _ignore_in_python(_signum: int, _frame: object) -> None:
    """SIGCHLD wakes the loop through the wakeup fd; nothing to do in Python."""


__all__ = [
    "EXIT_EXEC_FAILED",
    "RECORD_FD",
    "RECV_FLAGS",
    "ExecServer",
    "drain",
    "exit_message",
    "run_in_fresh_thread",
    "spawn_command",
]
