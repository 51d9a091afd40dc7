"""The inside of a sandbox: init (PID 1) and the confined exec children.

The spawner clones one process per sandbox straight into new user, mount, pid, net, ipc
and uts namespaces; it runs :func:`sandbox_main` and is the sandbox's init:

``sandbox_main``
    waits for the plan and for "mapped" (the caller wrote its uid/gid maps), moves itself
    into its cgroup (v1; on v2 the caller moved it), becomes root inside and enters a new
    cgroup namespace.
``_init_main`` (PID 1)
    forks the exec server, builds the root filesystem (:mod:`.mounts`), sets the
    hostname, brings up loopback, creates the proxy listener, makes itself non-dumpable,
    lets the server confine itself and report the enforcement probe, reports ``ready``
    and serves: it hands the server's socket to the caller, forks a cold exec child when
    the caller has no server at hand, reaps every zombie (and adopts the commands of a
    server that died), reports exits, relays signals and kills everything on request.
``_server_child`` / ``_exec_child``
    the confinement sequence, in the order the kernel needs: fds, session, rlimits,
    capabilities, oom score, no_new_privs, Landlock, seccomp LAST; then the exec server
    (:mod:`.execd`, which posix_spawns every command) or, for a cold child, cwd and execve.

Only the standard library and small kavach modules are imported; the spawner has already
imported them, so forking costs no imports.
"""

from __future__ import annotations

import _frozen_importlib as _bootstrap  # importlib's core, always loaded
import _signal as _csignal  # type: ignore[import-not-found]  # C module of `signal` (child_signals_default)
import base64
import contextlib
import errno
import json
import os
import resource
import selectors
import signal
import socket
import sys
import time
from collections.abc import Callable
from typing import Any, NoReturn

from kavach.backends.process import _libc, caps, execd, mounts, namespaces, protocol
from kavach.backends.process._libc import KernelCallError
from kavach.backends.process.execd import exit_message

# Imported lazily so that the engine keeps working while the sibling modules are absent
# (for example on a host without libseccomp); see _security_modules().
_SECURITY: dict[str, Callable[..., Any]] = {}

EXIT_EXEC_FAILED = execd.EXIT_EXEC_FAILED
NOBODY = 65534
_ERR_FD = 3
_RELAYED_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2)
# The signals init has Python handlers for: the only ones blocked across a fork_child.
# (Plain ints, for the C module ``_signal``: the ``signal`` module's wrappers turn every
# old handler and mask into enum members, which costs pages copied in every fork.)
_HANDLED_SIGNALS = frozenset(int(s) for s in (signal.SIGCHLD, *_RELAYED_SIGNALS))


def fork_child() -> int:
    """fork() for init's exec children: 0 in the child, its pid in init.

    ``os.fork()`` runs CPython's after-fork repairs and every at-fork callback of the
    imported modules (random's reseed, threading's bookkeeping ...): about 0.8 ms of CPU
    in each child here (it was most of a per-exec child's start-up), to repair threads and locks that
    a single-threaded init does not have. A raw clone(SIGCHLD) skips them.

    The signals init handles in Python are blocked across the clone, so that none of its
    handlers (the relay, SIGCHLD's) can run in the child before it resets them (every other
    signal has a C-level disposition the child inherits as is); the child must call
    :func:`child_signals_default` first thing, which also restores the mask (a mask is
    inherited through execve, so the command must not start with one).
    """
    previous = _csignal.pthread_sigmask(_csignal.SIG_BLOCK, _HANDLED_SIGNALS)
    try:
        pid = _libc.clone_process(0, "fork an exec child")
    except BaseException:
        _csignal.pthread_sigmask(_csignal.SIG_SETMASK, previous)
        raise
    if pid != 0:
        _csignal.pthread_sigmask(_csignal.SIG_SETMASK, previous)
    return pid


def child_signals_default() -> None:
    """In a child of :func:`fork_child`: init's handlers back to default, then unblock.

    Through the C module ``_signal``: the ``signal`` module's wrappers turn every old
    handler and mask into enum members (a failed enum lookup raises and catches a
    ValueError for each handler), which made this the costliest step of an exec child
    (~110 copied pages of ~370).
    """
    for sig in (signal.SIGCHLD, *_RELAYED_SIGNALS, signal.SIGPIPE):
        _csignal.signal(int(sig), _csignal.SIG_DFL)
    _csignal.set_wakeup_fd(-1)
    _csignal.pthread_sigmask(_csignal.SIG_SETMASK, ())


def preload() -> None:
    """Import what exec children need, once, in the spawner (forks then share it)."""
    # Not kavach.policy (dataclasses, inspect, tomllib, pathlib ...): every module loaded
    # here is in every init and exec server, and forking a larger interpreter costs more.
    _security_modules()
    _warm_shared_paths()


def _warm_shared_paths() -> None:
    """Run, here in the spawner, the side-effect-free code every init and exec server runs.

    CPython 3.11 specializes a function's bytecode and fills its type-attribute cache the
    first times code runs: in a fresh fork those writes copy pages, in every sandbox (~75 kB
    per exec server for the probe and message encoding, measured with smaps_rollup in a
    fork). Done here, a few times, the forks find that work done. It only reads this
    process's own /proc entries and encodes and decodes messages: nothing changes.
    """
    for _ in range(8):
        report = _probe_data({"landlock_abi_applied": 0})
        message, _fds = protocol.decode(protocol.encode({"op": "probe", "report": report}), [])
        protocol.encode(exit_message(0, 0, message))


def _security_modules() -> tuple[Callable[..., Any] | None, Callable[..., Any] | None]:
    if "load_filter" not in _SECURITY:
        try:
            from kavach.backends.process.seccomp import load_filter
        except ImportError:
            pass  # a plan that asks for seccomp then fails closed in _confine
        else:
            _SECURITY["load_filter"] = load_filter
    if "apply_landlock" not in _SECURITY:
        try:
            from kavach.backends.process.landlock import apply_landlock
        except ImportError:
            pass  # as above, for Landlock
        else:
            _SECURITY["apply_landlock"] = apply_landlock
    return _SECURITY.get("load_filter"), _SECURITY.get("apply_landlock")


def _error_message(exc: BaseException, default_step: str) -> dict[str, Any]:
    if isinstance(exc, KernelCallError):
        return {"op": "error", "step": exc.step, "errno": exc.errno, "message": str(exc)}
    if isinstance(exc, OSError):
        step = f"{default_step}: {exc.filename}" if exc.filename else default_step
        return {"op": "error", "step": step, "errno": exc.errno or 0, "message": f"{step}: {exc.strerror}"}
    return {"op": "error", "step": default_step, "errno": 0, "message": f"{default_step}: {exc!r}"}


_NO_FILE_IMPORTERS = (_bootstrap.BuiltinImporter, _bootstrap.FrozenImporter)


def forbid_file_imports() -> None:
    """From now on an import can only fail or load a module built into the interpreter.

    After pivot_root, paths of the caller's ``sys.path`` and the kavach packages'
    ``__path__`` resolve inside the sandbox, where a command may be able to write them (a
    checkout under /work is the sandbox's writable /work): a lazy import in init or the
    exec server would run planted code. Everything they run was preloaded by the spawner,
    so the path-based finder (and any other, such as setuptools' distutils hook) goes.
    Emptying ``sys.path`` alone would leave package-relative imports, and clearing
    ``sys.path_importer_cache`` costs ~115 pages copied per process for nothing.
    """
    # (Only writes when there is something to drop: the spawner already did it before it
    # forked this process, and a write would copy a page shared with it.)
    if sys.path:
        sys.path.clear()
    if file_imports_possible():  # (sys.path is empty now: a finder other than ours is left)
        sys.meta_path[:] = [f for f in sys.meta_path if f in _NO_FILE_IMPORTERS]


def file_imports_possible() -> bool:
    """Whether this process could still import from files (what the probe reports)."""
    return bool(sys.path) or any(f not in _NO_FILE_IMPORTERS for f in sys.meta_path)


def reopen_std_fds() -> None:
    """fds 0-2 on /dev/null: nothing of the caller's terminal survives into the sandbox."""
    null = os.open("/dev/null", os.O_RDWR)
    for fd in (0, 1, 2):
        if null != fd:
            os.dup2(null, fd)
    if null > 2:
        os.close(null)


# -- the sandbox's first moments ------------------------------------------------------------------


def sandbox_main(ctl_fd: int) -> NoReturn:
    """Entry of the process the spawner created for one sandbox: it becomes init. Never returns.

    With namespaces it was cloned straight into new user, mount, pid, net, ipc and uts
    namespaces, so it is already PID 1. It waits for the plan, then for "mapped" (the
    caller has written its uid/gid maps), joins its cgroup, becomes root inside and enters
    a new cgroup namespace, rooted at that cgroup.
    """
    ctl = socket.socket(fileno=ctl_fd)
    try:
        # (Through _signal, as in child_signals_default: no enum conversions.)
        for sig in (signal.SIGCHLD, *_RELAYED_SIGNALS, signal.SIGPIPE):
            _csignal.signal(int(sig), _csignal.SIG_DFL)
        reopen_std_fds()
        ctl.setblocking(True)
        message, file_fds = protocol.recv(ctl)
        if message is None or message.get("op") != "plan":
            os._exit(1)
        plan: dict[str, Any] = message["plan"]
        message, fds = protocol.recv(ctl)
        if message is None or message.get("op") != "mapped":
            os._exit(1)
        idmapped, cgroup_fds = _split_mapped_fds(message, fds)
        # Ordering: into the cgroup before anything else. The cgroup namespace below is
        # rooted at the cgroup we are in when it is made, and every process of the sandbox
        # (the exec server, the commands) is forked after this and inherits it.
        _join_cgroup(cgroup_fds)
        if plan["namespaces"]:
            _become_root_inside(plan)
            _libc.unshare(_libc.CLONE_NEWCGROUP, "unshare the cgroup namespace")
    except (OSError, ValueError, KeyError) as exc:
        _send_quietly(ctl, _error_message(exc, "prepare the sandbox"))
        os._exit(1)
    _init_main(ctl, plan, file_fds, idmapped)


def _split_mapped_fds(message: dict[str, Any], fds: list[int]) -> tuple[list[int], list[int]]:
    """The fds of "mapped": the idmapped mount trees, then ``cgroup_fds`` cgroup ``tasks`` files."""
    count = message.get("cgroup_fds", 0)
    if not isinstance(count, int) or isinstance(count, bool) or not 0 <= count <= len(fds):
        for fd in fds:
            os.close(fd)
        raise ValueError(f"'mapped': cgroup_fds {count!r} for {len(fds)} fds")
    cut = len(fds) - count
    return fds[:cut], fds[cut:]


def _join_cgroup(task_fds: list[int]) -> None:
    """Move this process into the sandbox's cgroup v1 hierarchies: "0" (the writing thread)
    to each ``tasks`` fd the caller opened (``Cgroup.self_move_fds`` says why not the caller).

    "0" moves only the calling thread; init is single-threaded here (a fork of the
    single-threaded spawner), so that is the whole process. Every fd is closed, also on error.
    """
    try:
        for fd in task_fds:
            try:
                written = os.write(fd, b"0")
            except OSError as exc:
                raise KernelCallError("join the sandbox's cgroup", exc.errno or errno.EIO) from None
            if written != 1:
                raise KernelCallError("join the sandbox's cgroup (short write)", errno.EIO)
    finally:
        for fd in task_fds:
            os.close(fd)


def _become_root_inside(plan: dict[str, Any]) -> None:
    try:
        os.setresgid(0, 0, 0)
        if plan["root_caller"]:
            # Supplementary groups of host root would otherwise keep host gid 0's file access.
            os.setgroups([])
        os.setresuid(0, 0, 0)
    except OSError as exc:
        raise KernelCallError("become root inside the user namespace", exc.errno or 0) from None


def _send_quietly(ctl: socket.socket, message: dict[str, Any]) -> None:
    # If the caller went away, nobody is left to tell.
    with contextlib.suppress(OSError):
        protocol.send(ctl, message)


# -- init ---------------------------------------------------------------------------------------


def _init_main(ctl: socket.socket, plan: dict[str, Any], file_fds: list[int], idmapped: list[int]) -> NoReturn:
    try:
        started = time.monotonic()
        _libc.set_process_name(b"kavach-init")
        # The exec server is forked now and waits for "go": its fork overlaps with
        # the mount work below (pivot_root moves its root along with init's). It closes
        # every inherited fd (the secrets' memfds among them) before anything else.
        prepare_confinement(plan)
        first = _fork_server(plan, probe=True, wait_for_go=True)
        if plan["namespaces"]:
            _build_root(plan, file_fds, idmapped)
        # Ordering: "go" only once the root is final (pivot_root done, the read-only
        # remount applied): the server's Landlock rules open paths of that root and its
        # probe reports what it sees there. What init still does below (hostname,
        # loopback, proxy listener, its own session and flags) changes nothing the server
        # applies or observes, so the server confines itself and probes meanwhile.
        released = _release(first)
        proxy_fd = _finish_setup(plan, file_fds)
        built = time.monotonic()
        init = Init(ctl, plan)  # after the setup: its /dev/null is the sandbox's
        probe = init.adopt_first_server(first, released)
        probe["setup_ms"] = round((built - started) * 1000, 2)
        probe["probe_ms"] = round((time.monotonic() - built) * 1000, 2)
        # The server first: a command sent right after "ready" then finds it at hand
        # instead of costing a cold fork.
        init.offer()
        protocol.send(ctl, {"op": "ready", "probe": probe}, [proxy_fd] if proxy_fd is not None else [])
        if proxy_fd is not None:
            os.close(proxy_fd)
    except (OSError, ValueError, KeyError) as exc:
        _send_quietly(ctl, _error_message(exc, "build the sandbox"))
        os._exit(1)
    init.serve()
    os._exit(0)


def _build_root(plan: dict[str, Any], file_fds: list[int], idmapped: list[int]) -> None:
    sources = mounts.detach_sources(plan, idmapped)
    try:
        mounts.build_root(plan, sources, file_fds)
    finally:
        sources.close()


def _release(server: ServerChild) -> bool:
    """Send the waiting exec server its "go"; False if it is gone (its probe then says why)."""
    assert server.sock is not None
    try:
        protocol.send(server.sock, {"op": "go"})
    except OSError:
        return False
    return True


def _finish_setup(plan: dict[str, Any], file_fds: list[int]) -> int | None:
    if plan["namespaces"]:
        _libc.sethostname(plan["hostname"], "set the hostname")
        if plan["netns"]:
            namespaces.bring_up_loopback()
    for fd in file_fds:
        os.close(fd)
    proxy_fd = None
    if plan["proxy_listen"] is not None:
        host, port = plan["proxy_listen"]
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        listener = socket.socket(family, socket.SOCK_STREAM)
        try:
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            listener.bind((host, port))
            listener.listen(128)
        except OSError as exc:
            listener.close()
            raise KernelCallError(f"listen on the proxy address {host}:{port}", exc.errno or 0) from None
        proxy_fd = listener.detach()
    if plan["namespaces"]:
        reopen_std_fds()  # the sandbox's /dev/null, not the host's (inherited before pivot_root)
    forbid_file_imports()
    os.setsid()
    _libc.prctl(_libc.PR_SET_DUMPABLE, 0, "make init non-dumpable")
    # Orphans (double-forked daemons) come back to init, so it can reap and kill them
    # even without a pid namespace.
    _libc.prctl(_libc.PR_SET_CHILD_SUBREAPER, 1, "make init a child subreaper")
    return proxy_fd


class ServerChild:
    """The sandbox's exec server (see :mod:`.execd`), as init sees it.

    Forking and confining (capabilities, Landlock, seccomp) is done once, here, not per
    command. Its socket goes to the caller, who sends it commands directly; its record
    pipe tells init which pid runs which exec.
    """

    def __init__(self, pid: int, sock: socket.socket, records: int) -> None:
        self.pid = pid
        self.sock: socket.socket | None = sock
        self.records = records  # read end of the server's record pipe (non-blocking)
        self.pending = b""
        self.started: dict[int, int] = {}  # exec id -> pid, from the records
        self.lost: set[int] = set()  # exec ids the caller reported lost before init reaped it
        self.error: dict[str, Any] | None = None  # a setup failure it recorded


def _fork_server(plan: dict[str, Any], probe: bool, wait_for_go: bool = False) -> ServerChild:
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    records_r, records_w = os.pipe2(os.O_CLOEXEC)
    try:
        pid = fork_child()
    except OSError:
        for fd in (records_r, records_w):
            os.close(fd)
        ours.close()
        theirs.close()
        raise
    if pid == 0:
        _server_child(plan, theirs.fileno(), records_w, probe, wait_for_go)
    theirs.close()
    os.close(records_w)
    os.set_blocking(records_r, False)
    return ServerChild(pid, ours, records_r)


def _read_error(fd: int) -> dict[str, Any] | None:
    """What a cold exec child wrote to its error pipe (one JSON object a line), merged; None if nothing.

    Only kavach's code writes there: the pipe is close-on-exec, so no command has it.
    """
    if fd < 0:
        return None
    try:
        data = os.read(fd, 65536)
    finally:
        os.close(fd)
    if not data:
        return None
    result: dict[str, Any] = {}
    for line in data.splitlines():
        if line.strip():
            result.update(json.loads(line))
    return result


class Init:
    """PID 1: serves the caller's commands, reaps zombies, relays signals."""

    def __init__(self, ctl: socket.socket, plan: dict[str, Any]) -> None:
        self.ctl = ctl
        self.plan = plan
        # Cold exec children (forked by init when the caller had no server at hand) and
        # commands adopted from a dead server: pid -> (exec id, error pipe or -1).
        self.children: dict[int, tuple[int, int]] = {}
        self.selector = selectors.DefaultSelector()
        self.wake_r, self.wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self.running = True
        self.server: ServerChild | None = None
        # Dead servers, by pid: what they started, for a caller asking about a lost exec.
        self.dead: dict[int, ServerChild] = {}
        # Reaped pids nobody claimed yet (an orphaned command reaped before its server's
        # death was processed): pid -> wait status.
        self.unclaimed: dict[int, int] = {}
        self.pending_kills: dict[int, int] = {}  # exec id -> signal, for a pid not yet recorded
        self.refill = False
        self.null_fd = os.open("/dev/null", os.O_RDONLY | os.O_CLOEXEC)
        # How many "killall" requests were carried out. Offers carry it, so that the caller
        # can tell an offer made before its last killall (that server is dead or about to
        # be) from one made after.
        self.kill_generation = 0

    def adopt_first_server(self, server: ServerChild, released: bool) -> dict[str, Any]:
        """Take the first server's enforcement probe (what it observes once confined).

        ``released``: whether its "go" was sent (see :func:`_release`).
        """
        assert server.sock is not None
        message: dict[str, Any] | None = None
        fds: list[int] = []
        if released:
            try:
                message, fds = protocol.recv(server.sock)
            except OSError:
                message, fds = None, []
        for fd in fds:
            os.close(fd)
        if message is None or message.get("op") != "probe":
            server.sock.close()
            _pid, status = os.waitpid(server.pid, 0)
            os.set_blocking(server.records, True)
            self._read_records(server)
            os.close(server.records)
            if server.error is not None:
                raise KernelCallError(f"enforcement probe: {server.error['step']}", server.error["errno"])
            raise KernelCallError(f"enforcement probe exited with wait status {status}", 0)
        self.server = server
        report: dict[str, Any] = message["report"]
        return report

    def offer(self) -> None:
        """Hand the server's socket to the caller (init keeps only its record pipe)."""
        server = self.server
        if server is None or server.sock is None:
            return
        try:
            offer = {"op": "server", "pid": server.pid, "gen": self.kill_generation}
            protocol.send(self.ctl, offer, [server.sock.fileno()])
        finally:
            server.sock.close()
            server.sock = None
        self.selector.register(server.records, selectors.EVENT_READ, "records")

    def _refill_server(self) -> None:
        self.refill = False
        if self.server is not None or not self.running:
            return  # one server at a time
        try:
            self.server = _fork_server(self.plan, probe=False)
        except OSError:
            # The pids limit is exhausted (a fork bomb, say): execs fall back to a cold fork,
            # which reports the error to the caller; retry after the next exec.
            return
        self.offer()

    def _read_records(self, server: ServerChild) -> None:
        """Take in what ``server`` recorded (non-blocking unless its pipe was set blocking)."""
        while True:
            try:
                data = os.read(server.records, 65536)
            except BlockingIOError:
                break
            if not data:
                break
            server.pending += data
        *lines, server.pending = server.pending.split(b"\n")
        for line in lines:
            if not line.strip():
                continue
            entry = json.loads(line)
            if "start" in entry:
                for done in entry.get("ended", ()):
                    server.started.pop(int(done), None)
                exec_id, pid = int(entry["start"]), int(entry["pid"])
                server.started[exec_id] = pid
                signum = self.pending_kills.pop(exec_id, None)
                if signum is not None:
                    self._kill_pid(pid, signum)
            elif "step" in entry:
                server.error = entry

    def serve(self) -> None:
        """The loop: commands from the caller and SIGCHLD, until shutdown or the caller leaves."""
        _csignal.set_wakeup_fd(self.wake_w)
        _csignal.signal(int(signal.SIGCHLD), _noop_handler)
        for sig in _RELAYED_SIGNALS:
            _csignal.signal(int(sig), self._relay)
        self.ctl.setblocking(False)
        self.selector.register(self.ctl, selectors.EVENT_READ, "ctl")
        self.selector.register(self.wake_r, selectors.EVENT_READ, "wake")
        while self.running:
            # Refill the server only when nothing else is pending, so that it never
            # delays a command or an exit report.
            events = self.selector.select(0 if self.refill else None)
            if not events and self.refill:
                self._refill_server()
            for key, _events in events:
                if key.data == "ctl":
                    self._on_ctl()
                elif key.data == "records":
                    if self.server is not None:
                        self._read_records(self.server)
                else:
                    execd.drain(self.wake_r)
                    self._reap()
        self.kill_all(signal.SIGKILL)

    def _relay(self, signum: int, _frame: object) -> None:
        self.kill_all(signum)

    def _on_ctl(self) -> None:
        while True:
            try:
                message, fds = protocol.recv(self.ctl)
            except BlockingIOError:
                return
            except (protocol.ProtocolError, ConnectionError):
                self.running = False
                return
            if message is None:
                self.running = False
                return
            self._handle(message, fds)

    def _handle(self, message: dict[str, Any], fds: list[int]) -> None:
        op = message.get("op")
        if op == "exec":
            self._start_exec(message, fds)
            return
        for fd in fds:
            os.close(fd)
        if op == "lost":
            self._lost(int(message["id"]), int(message["server"]))
        elif op == "kill":
            self._kill_exec(int(message["id"]), int(message["sig"]))
        elif op == "killall":
            self.kill_generation += 1
            self.kill_all(int(message["sig"]))
            if message.get("ack"):
                protocol.send(self.ctl, {"op": "killed"})
        elif op == "shutdown":
            self.running = False

    def _start_exec(self, message: dict[str, Any], fds: list[int]) -> None:
        exec_id = int(message["id"])
        if message.get("stdin"):
            stdin_fd, stdout_fd, stderr_fd = fds
        else:
            stdout_fd, stderr_fd = fds
            stdin_fd = os.dup(self.null_fd)
        try:
            pid, err_read = self._dispatch(message, [stdin_fd, stdout_fd, stderr_fd])
        except OSError as exc:
            protocol.send(
                self.ctl,
                {"op": "exit", "id": exec_id, "code": 126, "error": {"step": "fork", "errno": exc.errno or 0}},
            )
            return
        finally:
            for fd in (stdin_fd, stdout_fd, stderr_fd):
                os.close(fd)
        self.children[pid] = (exec_id, err_read)
        self.refill = True
        if message.get("report_pid"):
            protocol.send(self.ctl, {"op": "started", "id": exec_id, "pid": pid})

    def _dispatch(self, message: dict[str, Any], fds: list[int]) -> tuple[int, int]:
        """Fork a cold exec child (the caller had no server at hand)."""
        err_read, err_write = os.pipe2(os.O_CLOEXEC)
        try:
            pid = fork_child()
        except OSError:
            os.close(err_read)
            os.close(err_write)
            raise
        if pid == 0:
            _exec_child(self.plan, message, fds[0], fds[1], fds[2], err_write)
        os.close(err_write)
        return pid, err_read

    def _reap(self) -> None:
        reaped: list[tuple[int, int]] = []
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if pid == 0:
                break
            reaped.append((pid, status))
        server = self.server
        server_status: int | None = None
        others: list[int] = []
        for pid, status in reaped:
            if server is not None and pid == server.pid:
                server_status = status
            else:
                self.unclaimed[pid] = status
                others.append(pid)
        # The server's death first: it tells which of the other pids were its commands.
        if server is not None and server_status is not None:
            self._server_ended(server, server_status)
        for pid in others:
            if pid in self.unclaimed:
                self._child_ended(pid, self.unclaimed.pop(pid))

    def _server_ended(self, server: ServerChild, status: int) -> None:
        """Adopt the commands of a dead server: their exits are init's to report now."""
        if server.sock is not None:
            server.sock.close()  # it died before it was offered
            server.sock = None
        with contextlib.suppress(KeyError, ValueError):
            self.selector.unregister(server.records)
        self._read_records(server)  # the writer is dead: everything it wrote is there
        os.close(server.records)
        server.records = -1
        for exec_id, pid in server.started.items():
            # Only commands that are init's children now (reparented) or were reaped as
            # orphans: the others ended under the server, which reported them.
            if pid in self.unclaimed or _is_child(pid):
                self.children.setdefault(pid, (exec_id, -1))
        self.dead[server.pid] = server
        while len(self.dead) > 64:
            self.dead.pop(next(iter(self.dead)))
        self.server = None
        self.refill = True
        # Ordering: the lost execs before the orphans below, while every adopted command is
        # still in self.children (their exits are reported next, once).
        for exec_id in server.lost:
            self._lost(exec_id, server.pid)
        # Orphans reaped before this death was processed.
        for pid in [pid for pid in self.unclaimed if pid in self.children]:
            self._child_ended(pid, self.unclaimed.pop(pid))

    def _child_ended(self, pid: int, status: int) -> None:
        entry = self.children.pop(pid, None)
        if entry is None:
            # An orphan (a daemon, or a command whose server's death is not processed yet).
            self.unclaimed[pid] = status
            while len(self.unclaimed) > 64:
                self.unclaimed.pop(next(iter(self.unclaimed)))
            return
        exec_id, err_read = entry
        info = _read_error(err_read)
        protocol.send(self.ctl, exit_message(exec_id, status, info))

    def _lost(self, exec_id: int, server_pid: int) -> None:
        """The caller saw server ``server_pid`` close with exec ``exec_id`` unreported."""
        if self.server is not None and self.server.pid == server_pid:
            # Not yet reaped (the caller saw the socket close first): answered once it is.
            self.server.lost.add(exec_id)
            return
        server = self.dead.get(server_pid)
        if server is None:
            # Forgotten (more servers died since than init remembers): answer rather than
            # leave the caller waiting; an adopted command still running is reported killed.
            protocol.send(self.ctl, exit_message(exec_id, signal.SIGKILL, None))
            return
        pid = server.started.get(exec_id)
        if pid is not None and pid in self.children:
            return  # adopted in _server_ended: init reports its exit when it reaps it
        # Never started (the server died with the command still in its socket), or started
        # and reaped by the server, which died before its report went out: the exit status
        # died with it. Reported killed, never left unanswered (the caller would wait forever).
        protocol.send(self.ctl, exit_message(exec_id, signal.SIGKILL, None))

    def _kill_exec(self, exec_id: int, signum: int) -> None:
        """Signal an exec's process group; SIGKILL also reaches its session and descendants."""
        pids = [pid for pid, (known_id, _err) in self.children.items() if known_id == exec_id]
        if not pids and self.server is not None:
            self._read_records(self.server)
            pid = self.server.started.get(exec_id)
            if pid is None:
                self.pending_kills[exec_id] = signum  # its start record is on its way
                while len(self.pending_kills) > 64:  # (or it never started: keep few)
                    self.pending_kills.pop(next(iter(self.pending_kills)))
                return
            pids = [pid]
        if pids:
            self._kill_pid(pids[0], signum)

    def _kill_pid(self, pid: int, signum: int) -> None:
        targets = {pid}
        if signum == signal.SIGKILL:
            targets |= _descendants(pid)
        _signal_group(pid, signum)
        for target in targets:
            _signal(target, signum)

    def kill_all(self, signum: int) -> None:
        """Signal every process of the sandbox except init itself."""
        if self.plan["namespaces"]:
            # In its own pid namespace, kill(-1) from PID 1 reaches exactly the sandbox.
            try:
                os.kill(-1, signum)
            except ProcessLookupError:
                return
            return
        # Without a pid namespace kill(-1) would hit every process of the user: walk the
        # tree below init instead (orphans come back to init, a child subreaper).
        for target in _descendants(os.getpid()):
            _signal(target, signum)


def _noop_handler(_signum: int, _frame: object) -> None:
    """SIGCHLD only needs to wake the loop through the wakeup fd."""


def _signal(pid: int, signum: int) -> None:
    try:
        os.kill(pid, signum)
    except ProcessLookupError:
        return


def _signal_group(pgid: int, signum: int) -> None:
    try:
        os.killpg(pgid, signum)
    except ProcessLookupError:
        return


def _is_child(pid: int) -> bool:
    """Whether ``pid`` is a child of this process (alive or a zombie not yet reaped)."""
    try:
        os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)  # looks, does not reap
    except ChildProcessError:
        return False
    return True


def _descendants(root: int) -> set[int]:
    """Every process below ``root`` in the parent tree (read from /proc)."""
    parents: dict[int, list[int]] = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue  # exited while we looked
        ppid = int(stat[stat.rindex(b")") + 2 :].split()[1])
        parents.setdefault(ppid, []).append(int(name))
    found: set[int] = set()
    todo = [root]
    while todo:
        for child in parents.get(todo.pop(), []):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


# -- the exec child ------------------------------------------------------------------------------


_RLIMITS = {
    "cpu": resource.RLIMIT_CPU,
    "fsize": resource.RLIMIT_FSIZE,
    "nofile": resource.RLIMIT_NOFILE,
    "as": resource.RLIMIT_AS,
    "nproc": resource.RLIMIT_NPROC,  # only without a cgroup (see driver._limit_without_cgroup)
}


def _exec_child(
    plan: dict[str, Any],
    request: dict[str, Any],
    stdin_fd: int,
    stdout_fd: int,
    stderr_fd: int,
    err_fd: int,
) -> NoReturn:
    """Confine this (freshly forked) process and execve the command. Never returns.

    A failure before execve is written as JSON to the error pipe (fd 3, close-on-exec, so
    a successful execve closes it with nothing written) and the child exits 127.
    """
    step = "prepare the exec"
    try:
        child_signals_default()
        step = "set up stdio"
        # err_fd first to fd 3: the dup2s below may not clobber it.
        os.dup2(err_fd, _ERR_FD + 100)
        os.dup2(stdin_fd, 0)
        os.dup2(stdout_fd, 1)
        os.dup2(stderr_fd, 2)
        os.dup2(_ERR_FD + 100, _ERR_FD, inheritable=False)
        _libc.close_range_from(_ERR_FD + 1)
        step = "new session"
        os.setsid()
        step = f"chdir {request.get('cwd') or plan['workdir']}"
        os.chdir(request.get("cwd") or plan["workdir"])
        _confine(plan)
        argv = [os.fsencode(a) for a in request["argv"]]
        env = {os.fsencode(k): os.fsencode(v) for k, v in request["env"].items()}
        step = "execve"
        os.execvpe(argv[0], argv, env)  # noqa: S606 - argv is the command, run without a shell
    except BaseException as exc:  # noqa: BLE001 - the child must never return into init's code
        _report_exception(exc, step)
    os._exit(EXIT_EXEC_FAILED)


def _report_child_error(step: str, err: int) -> None:
    # If init is gone, the exit status still says the exec failed.
    with contextlib.suppress(OSError):
        os.write(_ERR_FD, json.dumps({"step": step, "errno": err}).encode() + b"\n")


def _confine(plan: dict[str, Any]) -> None:
    """rlimits, oom score, capabilities, no_new_privs, Landlock, then seccomp (last)."""
    _confine_process(plan)
    _confine_access(plan)


def _confine_process(plan: dict[str, Any]) -> None:
    """The controls that do not depend on the root filesystem: rlimits, capabilities, oom
    score, no_new_privs. The exec server applies them while init still builds the
    root (they are per process: init keeps its own capabilities for the mounts)."""
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    for name, value in plan["rlimits"].items():
        try:
            resource.setrlimit(_RLIMITS[name], (value, value))
        except ValueError:
            # CPython reports EPERM as ValueError, without the errno: raising the hard
            # limit (RLIMIT_NOFILE above fs.nr_open). Its other ValueError, EINVAL for a
            # soft limit above the hard one, cannot happen: both are set to ``value``.
            raise KernelCallError(f"setrlimit {name}={value}", errno.EPERM) from None
        except OSError as exc:
            raise KernelCallError(f"setrlimit {name}={value}", exc.errno or errno.EIO) from None
    # A non-dumpable process cannot write its own /proc files inside a user namespace, so
    # the child is dumpable just long enough to raise its oom_score_adj, then not again:
    # while the exec server serves, commands of the sandbox cannot open its /proc/PID/fd
    # (its socket and record pipe). execve makes the command dumpable, as for any program.
    # Ordering: this window comes BEFORE the capability drop. A replacement server is
    # forked while the sandbox's commands run; dumpable and already without capabilities,
    # it would pass the kernel's ptrace check for a command of the same uid, which could
    # open its /proc/PID/mem and rewrite it before seccomp is loaded. While it still holds
    # its capabilities, a capability-less command is refused (its own set is no superset).
    _libc.prctl(_libc.PR_SET_DUMPABLE, 1, "make the exec child dumpable")
    try:
        # The sandbox's commands are the OOM killer's first choice, before init or the host.
        # (os.open/os.write: no io objects, fewer pages copied in every exec child.)
        fd = os.open("/proc/self/oom_score_adj", os.O_WRONLY | os.O_CLOEXEC)
        try:
            if os.write(fd, b"1000") != 4:
                raise OSError(5, "short write")
        finally:
            os.close(fd)
    except OSError as exc:
        raise KernelCallError("raise oom_score_adj", exc.errno or 0) from None
    _libc.prctl(_libc.PR_SET_DUMPABLE, 0, "make the exec server (or child) non-dumpable")
    if plan["namespaces"]:
        caps.drop_all_capabilities(plan["last_cap"])
    elif os.geteuid() == 0:
        # Degraded mode for a root caller: no user namespace makes root inside harmless, so
        # the command runs as nobody (the uid switch needs the capabilities that the
        # bounding-set drop leaves in place until capset clears them).
        caps.drop_bounding_and_lock(plan["last_cap"])
        try:
            os.setgroups([])
            os.setresgid(NOBODY, NOBODY, NOBODY)
            os.setresuid(NOBODY, NOBODY, NOBODY)
        except OSError as exc:
            raise KernelCallError("switch to nobody (degraded mode)", exc.errno or 0) from None
        _libc.capset_empty("clear capabilities")
    else:
        # Degraded mode as a normal user: nothing to drop from the bounding set (that
        # needs CAP_SETPCAP); clearing what is there is enough.
        _libc.prctl(_libc.PR_CAP_AMBIENT, _libc.PR_CAP_AMBIENT_CLEAR_ALL, "clear the ambient capabilities")
        _libc.capset_empty("clear capabilities")
    caps.set_no_new_privs()


class _Prepared:
    """The plan's Landlock rules and seccomp programs, decoded once in init.

    Every exec child inherits them with the fork instead of building them again: fewer
    objects allocated in each child, so fewer pages copied (CPU, and the idle memory of
    every exec server).
    """

    def __init__(self, plan: dict[str, Any]) -> None:
        self.rules: list[tuple[str, frozenset[str]]] | None = None
        landlock = plan["landlock"]
        if landlock is not None:
            # Plain (path, rights) tuples: kavach.policy is not loaded on the sandbox side
            # (see preload); landlock.access_mask rejects an unknown right.
            self.rules = [(str(path), frozenset(str(a) for a in access)) for path, access in landlock["rules"]]
        self.setid_guard = None if plan.get("setid_guard") is None else base64.b64decode(plan["setid_guard"])
        self.seccomp = None if plan["seccomp"] is None else base64.b64decode(plan["seccomp"])


_PREPARED: dict[int, _Prepared] = {}


def prepare_confinement(plan: dict[str, Any]) -> _Prepared:
    """The decoded confinement of ``plan`` (built on first use; init calls it before forking)."""
    prepared = _PREPARED.get(id(plan))
    if prepared is None:
        _PREPARED.clear()  # one plan per init
        prepared = _PREPARED[id(plan)] = _Prepared(plan)
    return prepared


def _confine_access(plan: dict[str, Any]) -> None:
    """Landlock (its rules name paths of the sandbox's root, so after pivot_root), then
    the seccomp filters, last."""
    load_filter, apply_landlock = _security_modules()
    prepared = prepare_confinement(plan)
    landlock = plan["landlock"]
    if landlock is not None:
        if apply_landlock is None or prepared.rules is None:
            raise KernelCallError("apply Landlock: module unavailable", 38)
        abi = apply_landlock(
            prepared.rules,
            deny_network=landlock["deny_network"],
            connect_ports=tuple(landlock.get("connect_ports", ())),
        )
        plan["landlock_abi_applied"] = abi
    if prepared.setid_guard is not None:
        if load_filter is None:
            raise KernelCallError("load the setuid guard filter: module unavailable", 38)
        load_filter(prepared.setid_guard)
    if prepared.seccomp is not None:
        if load_filter is None:
            raise KernelCallError("load the seccomp filter: module unavailable", 38)
        load_filter(prepared.seccomp)


def _probe_data(plan: dict[str, Any]) -> dict[str, Any]:
    """What a confined process observes. Uses only open/read/readlink/statfs."""
    report: dict[str, Any] = {"status": {}, "ns": {}, "interfaces": []}
    with open("/proc/self/status", "rb") as f:
        for line in f.read().decode().splitlines():
            key, _sep, value = line.partition(":")
            if key in ("Seccomp", "NoNewPrivs", "CapEff", "CapPrm", "CapInh", "CapBnd", "CapAmb", "Uid", "Gid"):
                report["status"][key] = value.strip()
    report["ns"] = {name: os.readlink(f"/proc/self/ns/{name}") for name in namespaces.NS_NAMES}
    with open("/proc/net/dev", "rb") as f:
        for line in f.read().decode().splitlines()[2:]:
            report["interfaces"].append(line.split(":", 1)[0].strip())
    report["pid"] = os.getpid()
    report["root_read_only"] = bool(os.statvfs("/").f_flag & os.ST_RDONLY)
    report["landlock_abi"] = plan.get("landlock_abi_applied", 0)
    report["file_imports"] = file_imports_possible()
    report["nproc"] = resource.getrlimit(resource.RLIMIT_NPROC)[0]
    with open("/proc/self/uid_map", "rb") as f:
        report["uid_map"] = f.read().decode().split()
    return report


_SOCK_FD = 4


def _server_child(plan: dict[str, Any], sock_fd: int, records_fd: int, probe: bool, wait_for_go: bool) -> NoReturn:
    """Confine now, then serve commands (:class:`.execd.ExecServer`). Never returns.

    Everything a command of this sandbox starts from is applied here, once: it does not
    depend on the command. Only fds, cwd, argv and env come with each command.
    """
    step = "prepare the exec server"
    try:
        child_signals_default()
        # (Forked before init does the same for itself; the probe reports it.)
        forbid_file_imports()
        # Via high numbers first, so that neither dup2 clobbers the other's source.
        os.dup2(records_fd, 100)
        os.dup2(sock_fd, 101)
        os.dup2(100, execd.RECORD_FD, inheritable=False)
        os.dup2(101, _SOCK_FD, inheritable=False)
        _libc.close_range_from(_SOCK_FD + 1)
        sock = socket.socket(fileno=_SOCK_FD)
        _libc.set_process_name(b"kavach-execd")
        step = "new session"
        os.setsid()
        if wait_for_go:
            # What does not need the sandbox's root is applied now, in parallel with
            # init's mount work; Landlock and seccomp follow once the root is built.
            _confine_process(plan)
            step = "wait for the root filesystem"
            go, _fds = protocol.recv(sock)
            if go is None:
                os._exit(0)
            # Forked before pivot_root, its cwd may still be a host directory of the old
            # root (pivot_root only moves cwds that were the old root itself) and its stdio
            # the host's /dev/null: trade both for the sandbox's own.
            os.chdir("/")
            reopen_std_fds()
            _confine_access(plan)
        else:
            _confine(plan)
        if probe:
            step = "enforcement probe"
            protocol.send(sock, {"op": "probe", "report": _probe_data(plan)})
        step = "start serving"
        null_fd = os.open("/dev/null", os.O_RDONLY | os.O_CLOEXEC)
        server = execd.ExecServer(sock, null_fd, _scope_layer if _scoped(plan) else None, plan["workdir"])
        # After the probe (the caller is not kept waiting for it), before any command.
        step = "warm the spawn path"
        server.warm()
    except BaseException as exc:  # noqa: BLE001 - the child must never return into init's code
        _report_exception(exc, step)
        os._exit(EXIT_EXEC_FAILED)
    server.serve()


def _scoped(plan: dict[str, Any]) -> bool:
    """Whether commands can get their own Landlock layer (scoping needs ABI 6)."""
    return int(plan.get("landlock_abi_applied", 0)) >= 6


def _scope_layer() -> None:
    """A nested, scoping-only Landlock layer on the calling thread (errors as KernelCallError)."""
    from kavach.backends.process.landlock import LandlockError, add_scope_layer

    try:
        add_scope_layer()
    except LandlockError as exc:
        raise KernelCallError(exc.step, exc.errno) from None


def _report_exception(exc: BaseException, step: str) -> None:
    # KernelCallError and the seccomp/Landlock errors carry their own step and errno.
    err = getattr(exc, "errno", None)
    own_step = getattr(exc, "step", None)
    if isinstance(own_step, str):
        _report_child_error(own_step, err if isinstance(err, int) else 0)
    elif isinstance(exc, OSError):
        _report_child_error(step, exc.errno or 0)
    else:
        _report_child_error(f"{step}: {type(exc).__name__}: {exc}", 0)


def child_entry(ctl_fd: int) -> NoReturn:
    """What the spawner's clone runs (kept separate so the spawner never touches sandbox data)."""
    sys.stdout.flush()
    sandbox_main(ctl_fd)


__all__ = ["EXIT_EXEC_FAILED", "Init", "child_entry", "preload", "reopen_std_fds", "sandbox_main"]
