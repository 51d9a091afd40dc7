"""The Process backend's driver and instance (the caller's side).

Creating a sandbox (``ProcessDriver.start``), in order:

1. build the plan from the spec (paths checked, seccomp compiled once, :mod:`.plan`);
2. create the cgroup (memory, pids, cpu, freezer) when the policy asks for limits;
3. ask the spawner to clone the sandbox's init straight into new user, mount, pid, net,
   ipc and uts namespaces; send it the plan and the secrets (as memfds);
4. write its uid/gid maps and (root caller) make idmapped copies of the user binds; send
   "mapped" with them and (cgroup v1) the fds with which init moves itself into its cgroup
   (on v2 the caller moves it); the caller checks the move once init is ready;
5. init builds the root filesystem and lets its exec server (forked before the mounts)
   confine itself and report what it observes (the enforcement probe);
6. :meth:`ProcessInstance.enforcement` is built from that probe, and any control the
   policy asked for that the probe does not confirm fails creation.

Each exec goes straight to the sandbox's exec server (:mod:`.execd`: confined once, it
posix_spawns every command in its own nested Landlock domain and reports its exit) when
one is at hand, else to init, which forks a cold exec child and reports its exit.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import errno
import os
import signal
import socket
import time
from collections.abc import AsyncIterator, Awaitable
from typing import TYPE_CHECKING, Any, TypeVar

from kavach.backends.base import Driver, ExecRequest, Instance, LaunchSpec, ProbeResult, RawProcess, RawResult
from kavach.backends.capture import CappedBuffer, exit_reason
from kavach.backends.names import Backend
from kavach.backends.process import _libc, namespaces, protocol
from kavach.backends.process.client import Channel, ChannelClosed, Spawner, SpawnError, forked_pid
from kavach.backends.process.plan import build_plan, remove_private_workdir
from kavach.backends.process.probe import USERNS_HOWTO, probe_host, userns_block_reason
from kavach.errors import ExecError, SandboxCreateError
from kavach.policy import ResourceLimits
from kavach.scoring import Control, Enforcement

if TYPE_CHECKING:
    from kavach.backends.process.cgroups import Cgroup

DEGRADED_BASE_SCORE = 35  # Process base 50 minus the namespace isolation the degraded mode lacks

# How long output is still read after the command exited, for data its background
# children keep writing; they are not waited for beyond this.
_DRAIN_GRACE_S = 0.05
# How long creation may wait for the spawner's fork and for init's set-up (tens of ms
# normally; seconds under heavy load) before it fails and kills what it started.
CREATE_DEADLINE_S = 30.0
_READ_SIZE = 1 << 16


def _limits_asked(limits: ResourceLimits) -> bool:
    return limits.memory is not None or limits.pids is not None or limits.cpus is not None


class ProcessRun(RawProcess):
    """One running command: its pipes, caps, timeout and exit status."""

    def __init__(self, instance: ProcessInstance, exec_id: int, request: ExecRequest) -> None:
        self.instance = instance
        self.exec_id = exec_id
        self.request = request
        self.pid = 0
        self._started = time.monotonic()
        self._stdout = CappedBuffer(request.stdout_cap)
        self._stderr = CappedBuffer(request.stderr_cap)
        self._queue: asyncio.Queue[tuple[str, bytes] | None] = asyncio.Queue()
        self._streaming = False
        self._open: dict[int, str] = {}
        self._eof = asyncio.Event()
        self._timed_out = False
        self._killed_by_caller = False
        self._timer: asyncio.TimerHandle | None = None
        self._result: RawResult | None = None
        self._exited = False  # its exit report is in (or the sandbox is gone)
        self._early_exit: dict[str, Any] | None = None  # an exit report read by started()
        self._stdin_task: asyncio.Task[None] | None = None
        # The cgroup's OOM record is sticky; only a change during this command counts.
        self._oom_before = instance.oom_killed()
        self._loop = asyncio.get_running_loop()

    # -- setup -----------------------------------------------------------------------------

    def start(self, *, report_pid: bool = True) -> None:
        """Create the pipes, hand the command to init, start reading and the timer.

        ``report_pid`` asks init for a "started" message with the pid (one more wake-up of
        both sides; exec() does without it).
        """
        out_r, out_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        err_r, err_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        # The child's ends must block like ordinary pipes.
        os.set_blocking(out_w, True)
        os.set_blocking(err_w, True)
        fds = [out_w, err_w]
        stdin_w = None
        if self.request.stdin is not None:
            stdin_r, stdin_w = os.pipe2(os.O_CLOEXEC)
            fds.insert(0, stdin_r)
        message = {
            "op": "exec",
            "id": self.exec_id,
            "argv": list(self.request.argv),
            "env": dict(self.request.env),
            "cwd": self.request.cwd,
            "stdin": self.request.stdin is not None,
            "report_pid": report_pid,
        }
        self.instance.channel.begin(self.exec_id)
        try:
            if not self._send_to_server(message, fds):
                self.instance.channel.send(message, fds)
        except (ChannelClosed, protocol.ProtocolError) as exc:
            self.instance.channel.finish(self.exec_id)
            for fd in (out_r, err_r, *fds, *([stdin_w] if stdin_w is not None else [])):
                os.close(fd)
            if isinstance(exc, protocol.ProtocolError):
                raise ExecError(f"command not sent: {exc}") from None
            raise ExecError(f"sandbox {self.instance.sandbox_id} is gone: {exc}") from None
        for fd in fds:
            os.close(fd)
        self._open = {out_r: "stdout", err_r: "stderr"}
        for fd in self._open:
            self._loop.add_reader(fd, self._on_output, fd)
        if stdin_w is not None:
            self._stdin_task = self._loop.create_task(self._feed_stdin(stdin_w, self.request.stdin or b""))
        if self.request.timeout_ms is not None:
            self._timer = self._loop.call_later(self.request.timeout_ms / 1000, self._on_timeout)

    def _send_to_server(self, message: dict[str, Any], fds: list[int]) -> bool:
        """Give the command straight to the sandbox's exec server; False if none is at hand."""
        channel = self.instance.channel
        server = channel.server()
        if server is None:
            return False
        pid, sock = server
        try:
            protocol.send(sock, message, fds)
        except protocol.ProtocolError:
            raise
        except BlockingIOError:
            return False  # its socket buffer is full (it is busy or frozen): init takes this one
        except OSError:
            channel.drop_server(sock)
            return False  # it was killed (a timeout's kill(-1)); init forks another
        # It reports the command's start and exit on its socket; if it dies first, init does.
        channel.sent_to_server(self.exec_id, pid)
        return True

    async def _feed_stdin(self, fd: int, data: bytes) -> None:
        os.set_blocking(fd, False)
        view = memoryview(data)
        try:
            while view:
                try:
                    view = view[os.write(fd, view) :]
                except BlockingIOError:
                    waiter = self._loop.create_future()
                    self._loop.add_writer(fd, waiter.set_result, None)
                    try:
                        await waiter
                    finally:
                        self._loop.remove_writer(fd)
        except BrokenPipeError:
            pass  # the command closed its stdin early; what it did not read is dropped
        finally:
            os.close(fd)

    # -- output ----------------------------------------------------------------------------

    def _on_output(self, fd: int) -> None:
        stream = self._open.get(fd)
        if stream is None:
            return
        buffer = self._stdout if stream == "stdout" else self._stderr
        for _ in range(16):  # bounded per wake-up so one flooding stream cannot starve the loop
            try:
                data = os.read(fd, _READ_SIZE)
            except BlockingIOError:
                return
            if not data:
                self._close_stream(fd)
                return
            kept = buffer.feed(data)
            if kept and self._streaming:
                self._queue.put_nowait((stream, kept))

    def _close_stream(self, fd: int) -> None:
        self._loop.remove_reader(fd)
        os.close(fd)
        del self._open[fd]
        if not self._open:
            self._eof.set()

    def _close_all_streams(self) -> None:
        for fd in list(self._open):
            self._on_output(fd)
        for fd in list(self._open):
            self._close_stream(fd)

    async def chunks(self) -> AsyncIterator[tuple[str, bytes]]:
        """Yield output as it arrives (after the caps), until the command ended and the pipes closed."""
        self._streaming = True
        for stream, buffer in (("stdout", self._stdout), ("stderr", self._stderr)):
            if data := buffer.getvalue():
                yield stream, data
        waiter = self._loop.create_task(self.wait())
        try:
            while True:
                getter = self._loop.create_task(self._queue.get())
                done, _pending = await asyncio.wait({getter, waiter}, return_when=asyncio.FIRST_COMPLETED)
                if getter in done:
                    item = getter.result()
                    if item is not None:
                        yield item
                    continue
                getter.cancel()
                while not self._queue.empty():
                    item = self._queue.get_nowait()
                    if item is not None:
                        yield item
                return
        finally:
            if not waiter.done():
                waiter.cancel()

    # -- termination -----------------------------------------------------------------------

    def _on_timeout(self) -> None:
        self._timed_out = True
        # The rule: a timeout kills every process of the sandbox (background children
        # and double-forked daemons included), not only the command.
        self.instance.kill_everything()

    def abandon(self) -> None:
        """Nobody will wait for this command: kill it (its session and descendants with it)
        and release its pipes, timer and reports. A no-op once it has exited."""
        if self._exited:
            return
        self._killed_by_caller = True
        if self._timer is not None:
            self._timer.cancel()
        with contextlib.suppress(ChannelClosed):
            self.instance.channel.send({"op": "kill", "id": self.exec_id, "sig": signal.SIGKILL})
        self.instance.channel.finish(self.exec_id)
        if self._stdin_task is not None:
            self._stdin_task.cancel()
        self._close_all_streams()

    async def kill(self, signum: int = 9) -> None:
        """Signal the command's process group; SIGKILL also its session and descendants."""
        if signum == signal.SIGKILL:
            self._killed_by_caller = True
        with contextlib.suppress(ChannelClosed):
            # By exec id: init knows the pid even before its "started" message reached us.
            self.instance.channel.send({"op": "kill", "id": self.exec_id, "sig": signum})

    async def started(self) -> None:
        """Wait for the "started" report (sets ``pid``); an early exit report is kept for wait()."""
        try:
            message = await self.instance.channel.for_exec(self.exec_id)
        except ChannelClosed:
            return  # wait() reports the sandbox's end
        if message.get("op") == "started":
            self.pid = int(message["pid"])
        else:
            self._early_exit = message

    async def _next_exit(self) -> dict[str, Any]:
        if self._early_exit is not None:
            message, self._early_exit = self._early_exit, None
            return message
        while True:
            message = await self.instance.channel.for_exec(self.exec_id)
            if message.get("op") == "started":
                self.pid = int(message["pid"])
                continue
            return message

    async def wait(self) -> RawResult:
        """Wait for the exit, then for the pipes (briefly, see _DRAIN_GRACE_S)."""
        if self._result is not None:
            return self._result
        try:
            exit_message = await self._next_exit()
        except ChannelClosed:
            exit_message = {"op": "exit", "code": 128 + signal.SIGKILL, "signal": signal.SIGKILL, "lost": True}
        finally:
            if self._timer is not None:
                self._timer.cancel()
        self._exited = True
        self.instance.channel.finish(self.exec_id)
        if not self._eof.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._eof.wait(), _DRAIN_GRACE_S)
        self._close_all_streams()
        self._result = self._make_result(exit_message)
        self._queue.put_nowait(None)
        return self._result

    def _make_result(self, message: dict[str, Any]) -> RawResult:
        code = int(message.get("code", 1))
        stderr_extra = b""
        error = message.get("error")
        if error is not None:
            step, err = str(error.get("step", "")), int(error.get("errno", 0))
            if step != "execve":
                raise ExecError(f"exec setup failed in sandbox {self.instance.sandbox_id}: {step}: {_errname(err)}")
            code = 126 if err in (13, 8, 21) else 127  # EACCES, ENOEXEC, EISDIR -> 126, like shells
            stderr_extra = f"kavach: {self.request.argv[0]}: {os.strerror(err)}\n".encode()
            self._stderr.feed(stderr_extra)
        oom = (
            message.get("signal") == signal.SIGKILL
            and not self._killed_by_caller
            and not self._oom_before
            and self.instance.oom_killed()
        )
        reason = exit_reason(code, self._timed_out, oom)
        if reason is None and message.get("lost"):
            reason = "sandbox init exited"
        streamed = self._streaming
        return RawResult(
            exit_code=code,
            stdout=b"" if streamed else self._stdout.getvalue(),
            stderr=b"" if streamed else self._stderr.getvalue(),
            duration_ms=(time.monotonic() - self._started) * 1000,
            timed_out=self._timed_out,
            stdout_truncated=self._stdout.truncated,
            stderr_truncated=self._stderr.truncated,
            reason=reason,
        )


def _errname(err: int) -> str:
    return f"{errno.errorcode.get(err, str(err))} ({os.strerror(err)})"


class ProcessInstance(Instance):
    """One sandbox: its init's control channel, its cgroup and what the probe verified."""

    def __init__(
        self,
        spec: LaunchSpec,
        plan: dict[str, Any],
        channel: Channel,
        init_pid: int,
        init_pidfd: int,
        cgroup: Cgroup | None,
    ) -> None:
        self.spec = spec
        self.sandbox_id = spec.sandbox_id
        self.plan = plan
        self.channel = channel
        self.init_pid = init_pid
        self._pidfd = init_pidfd
        self.cgroup = cgroup
        self._next_id = 0
        self._enforcement: Enforcement | None = None
        self._proxy: socket.socket | None = None
        self._paused = False
        self._destroyed = False

    # -- Instance API ------------------------------------------------------------------------

    def enforcement(self) -> Enforcement:
        """What the enforcement probe observed from inside (see :func:`verify_probe`)."""
        if self._enforcement is None:
            raise SandboxCreateError("sandbox has no enforcement record (not started)")
        return self._enforcement

    async def exec(self, request: ExecRequest) -> RawResult:
        """Run ``request`` to completion in a fresh child of init.

        If the caller stops waiting (the awaiting task is cancelled), the command is killed:
        it must not run on unobserved, and its timeout timer goes with the wait.
        """
        run = self._start(request, report_pid=False)
        try:
            return await run.wait()
        except BaseException:
            run.abandon()
            raise

    async def spawn(self, request: ExecRequest) -> ProcessRun:
        """Start ``request``; the handle streams its output. Returns once the command has
        started (``pid`` is its pid inside the sandbox) or failed to start."""
        run = self._start(request, report_pid=True)
        try:
            await run.started()
        except BaseException:
            run.abandon()  # cancelled before the caller got the handle: nobody could stop it
            raise
        return run

    def _start(self, request: ExecRequest, *, report_pid: bool) -> ProcessRun:
        if self._destroyed:
            raise ExecError(f"sandbox {self.sandbox_id} was destroyed")
        if not request.argv:
            raise ExecError("empty argv")
        self._next_id += 1
        run = ProcessRun(self, self._next_id, request)
        run.start(report_pid=report_pid)
        return run

    def kill_everything(self, signum: int = signal.SIGKILL, ack: bool = False) -> None:
        """Signal every process of the sandbox except init (init's kill(-1) in the pid namespace)."""
        with contextlib.suppress(ChannelClosed):
            self.channel.send_killall(signum, ack)

    async def pause(self) -> None:
        """Freeze every process (cgroup freezer; SIGSTOP through init when there is no cgroup)."""
        if self.cgroup is not None:
            self.cgroup.freeze()
        else:
            self.kill_everything(signal.SIGSTOP, ack=True)
            await self._killed_ack()
        self._paused = True

    async def resume(self) -> None:
        """Thaw what pause froze."""
        if self.cgroup is not None:
            self.cgroup.thaw()
        else:
            self.kill_everything(signal.SIGCONT, ack=True)
            await self._killed_ack()
        self._paused = False

    async def _killed_ack(self) -> None:
        with contextlib.suppress(ChannelClosed):
            message, fds = await self.channel.control()
            for fd in fds:
                os.close(fd)
            if message.get("op") != "killed":
                raise ExecError(f"unexpected message from init: {message.get('op')}")

    async def stop(self) -> None:
        """Kill every process (init's killall first, then the cgroup, init included); only destroy is left."""
        if self._paused and self.cgroup is not None:
            self.cgroup.thaw()
            self._paused = False
        self.kill_everything()
        if self.cgroup is not None:
            self.cgroup.kill_all()

    async def destroy(self) -> None:
        """Kill everything, let init exit (its mounts go with its namespace), remove the cgroup."""
        if self._destroyed:
            return
        self._destroyed = True
        _LIVE.discard(self)
        if self.cgroup is not None and self._paused:
            self.cgroup.thaw()  # a frozen (v1) task does not even die of SIGKILL until thawed
        if self.plan["namespaces"]:
            # PID 1's death makes the kernel kill everything else in its pid namespace.
            with contextlib.suppress(ProcessLookupError):
                signal.pidfd_send_signal(self._pidfd, signal.SIGKILL)
        else:
            with contextlib.suppress(ChannelClosed):
                self.channel.send({"op": "shutdown"})  # init kills its descendants, then exits
        self.channel.close()
        try:
            await _wait_pidfd(self._pidfd, timeout=5.0)
        finally:
            # Whatever happened above, release what the host holds for this sandbox.
            os.close(self._pidfd)
            if self._proxy is not None:
                self._proxy.close()
                self._proxy = None
            try:
                if self.cgroup is not None:
                    self.cgroup.destroy()  # kills what is left, then removes it
            finally:
                remove_private_workdir(self.plan)

    def destroy_now(self) -> None:
        """Synchronous last-resort teardown (interpreter exit): kill init, remove the cgroup."""
        if self._destroyed:
            return
        self._destroyed = True
        _LIVE.discard(self)
        if self.cgroup is not None and self._paused:
            self.cgroup.thaw()
        with contextlib.suppress(ProcessLookupError):
            signal.pidfd_send_signal(self._pidfd, signal.SIGKILL)
        self.channel.close()
        os.close(self._pidfd)
        try:
            if self.cgroup is not None:
                self.cgroup.destroy()  # waits until the killed processes are gone
        finally:
            remove_private_workdir(self.plan)

    async def read_file(self, path: str, max_bytes: int) -> bytes:
        """``path`` as the sandbox sees it, read by a confined ``cat`` (never by init)."""
        result = await self.exec(
            ExecRequest(
                argv=("/bin/cat", "--", path), env={}, stdout_cap=max_bytes + 1, stderr_cap=4096, timeout_ms=30_000
            )
        )
        if result.exit_code != 0:
            raise ExecError(f"read {path}: {result.stderr.decode(errors='replace').strip()}")
        if result.stdout_truncated or len(result.stdout) > max_bytes:
            raise ExecError(f"read {path}: larger than {max_bytes} bytes")
        return result.stdout

    def take_proxy_listener(self) -> socket.socket | None:
        """The listener init created inside the network namespace (once)."""
        listener, self._proxy = self._proxy, None
        return listener

    def live_pids(self) -> int | None:
        """Processes in the sandbox's cgroup (init included), or None without a cgroup."""
        return None if self.cgroup is None else self.cgroup.pids_current()

    def oom_killed(self) -> bool:
        """True if the memory cgroup reported an OOM kill."""
        return self.cgroup is not None and self.cgroup.oom_killed()


# Instances not destroyed yet (strong references: an instance nobody destroyed is a leak
# either way). Their inits die anyway when this process exits (their control sockets
# close), but cgroups would stay behind: remove them at interpreter exit.
_LIVE: set[ProcessInstance] = set()


@atexit.register
def _destroy_leftovers() -> None:
    for instance in list(_LIVE):
        with contextlib.suppress(OSError, SandboxCreateError):
            instance.destroy_now()


async def _wait_readable(fd: int, timeout: float) -> bool:
    """True if ``fd`` became readable (a pidfd: the process exited) within ``timeout``."""
    loop = asyncio.get_running_loop()
    waiter: asyncio.Future[None] = loop.create_future()

    def ready() -> None:
        if not waiter.done():
            waiter.set_result(None)

    loop.add_reader(fd, ready)
    try:
        await asyncio.wait_for(waiter, timeout)
        return True
    except TimeoutError:
        return False
    finally:
        loop.remove_reader(fd)


async def _wait_pidfd(pidfd: int, timeout: float) -> None:
    if await _wait_readable(pidfd, timeout):
        return
    # init did not exit on EOF (frozen or wedged): kill it; its namespaces go with it.
    with contextlib.suppress(ProcessLookupError):
        signal.pidfd_send_signal(pidfd, signal.SIGKILL)
    if not await _wait_readable(pidfd, timeout):
        raise ExecError("sandbox init did not exit after SIGKILL")


class ProcessDriver(Driver):
    """The native Linux engine: namespaces, tmpfs root, caps dropped, Landlock, seccomp, cgroups."""

    backend = Backend.PROCESS

    def probe(self) -> ProbeResult:
        """Availability with kernel, user namespace, Landlock and cgroup facts. Never raises."""
        return probe_host()

    def __init__(self, *, simulate_userns_blocked: bool = False) -> None:
        # simulate_userns_blocked exists for tests on hosts where user namespaces work:
        # it exercises the degraded mode's code path; it is never set by kavach itself.
        self._simulate_userns_blocked = simulate_userns_blocked

    async def start(self, spec: LaunchSpec) -> ProcessInstance:
        """Build one sandbox (see the module docstring); fail closed."""
        policy = spec.policy
        if spec.inner_backend is not None:
            # Refused, not ignored: the caller asked for a second layer this backend cannot add.
            raise SandboxCreateError(
                f"the Process backend cannot host an inner backend ({spec.inner_backend.value}): "
                "a composite runs kavach's process layer inside OCI (backend oci, inner process)"
            )
        if self._simulate_userns_blocked:
            blocked: str | None = f"simulated by the caller; {USERNS_HOWTO}"
        else:
            blocked = userns_block_reason()
        if blocked is not None and not policy.allow_degraded:
            raise SandboxCreateError(f"user namespaces are blocked: {blocked}")
        plan = build_plan(spec, use_namespaces=blocked is None)
        try:
            ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            channel = Channel(ours)
            try:
                try:
                    # The spawner clones while this process creates the cgroup: the reply
                    # is awaited in _start. If anything fails before, closing the channel
                    # makes the new process (waiting for its plan) exit.
                    reply = Spawner.get().request_fork(theirs, _clone_flags(plan))
                finally:
                    theirs.close()
                cgroup, no_cgroup = _make_cgroup(spec)
            except BaseException:
                channel.close()
                raise
            if no_cgroup is not None:
                _limit_without_cgroup(plan, policy.resources)
            try:
                return await _start(spec, plan, cgroup, channel, reply, no_cgroup)
            except BaseException:
                if cgroup is not None:
                    cgroup.kill_all()
                    cgroup.destroy()
                raise
        except BaseException:
            remove_private_workdir(plan)
            raise


def _make_cgroup(spec: LaunchSpec) -> tuple[Cgroup | None, str | None]:
    """The sandbox's cgroup when the policy asks for limits, and why there is none when the
    host has none for this caller and the policy allows degrading (else that is an error).

    Without limits a cgroup would only serve pause and kill, which init does as well
    (SIGSTOP/SIGCONT and kill(-1) inside the pid namespace), so it is skipped.
    """
    if not _limits_asked(spec.policy.resources):
        return None, None
    try:
        from kavach.backends.process.cgroups import CgroupError, cgroup_support, create_cgroup
    except ImportError as exc:
        raise SandboxCreateError(f"resource limits asked but the cgroup module is unavailable: {exc}") from None
    support = cgroup_support()
    if support.version is None:
        return _no_cgroup(spec, f"cgroups are unusable here: {support.reason}")
    try:
        return create_cgroup(f"kavach-{spec.sandbox_id}", spec.policy.resources), None
    except CgroupError as exc:
        # Only "this caller may not have a cgroup here" may degrade; a limit the kernel
        # refused on a cgroup we could create is a real failure whatever the policy says.
        if exc.step not in ("probe", "create", "mkdir") or exc.errno not in (errno.EACCES, errno.EPERM, errno.ENOTSUP):
            raise
        return _no_cgroup(spec, str(exc))


def _no_cgroup(spec: LaunchSpec, reason: str) -> tuple[None, str]:
    """Fail closed, unless the policy allows running without the cgroup's limits."""
    if not spec.policy.allow_degraded:
        raise SandboxCreateError(
            f"resource limits asked but {reason}; or set allow_degraded in the policy to run without "
            "cgroup limits (pids then by RLIMIT_NPROC in the sandbox's user namespace, memory and CPU share not "
            "limited; scored without resource limits)"
        )
    return None, reason


def _limit_without_cgroup(plan: dict[str, Any], limits: ResourceLimits) -> None:
    """What a sandbox without its cgroup can still limit: the number of processes.

    RLIMIT_NPROC counts the tasks of a real uid per user namespace (the kernel's ucounts):
    in the sandbox's own user namespace that is exactly the sandbox's processes and threads
    (init and the exec server included), and no capability inside exempts them. Without a
    user namespace it would count all of the caller's processes on the host, so it is not
    set then. Memory and CPU share have no per-sandbox rlimit: they stay unlimited.
    """
    if limits.pids is not None and plan["namespaces"]:
        plan["rlimits"]["nproc"] = limits.pids


def _degraded_limits(plan: dict[str, Any], limits: ResourceLimits, reason: str) -> str:
    """The ``degraded`` entry of a sandbox that runs without the cgroup its limits asked for."""
    nproc = plan["rlimits"].get("nproc")
    unlimited = [
        name
        for name, value in (("memory", limits.memory), ("pids", limits.pids), ("CPU share", limits.cpus))
        if value is not None and not (name == "pids" and nproc is not None)
    ]
    parts = [f"pids by RLIMIT_NPROC {nproc}"] if nproc is not None else []
    if unlimited:
        parts.append(f"{', '.join(unlimited)} not limited")
    return f"resource_limits (no cgroup: {reason}; {'; '.join(parts)})"


def _memfd(name: str, data: bytes) -> int:
    fd = os.memfd_create(f"kavach-{name}", os.MFD_CLOEXEC)
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]
    return fd


def _clone_flags(plan: dict[str, Any]) -> int:
    if not plan["namespaces"]:
        return 0
    return namespaces.SANDBOX_NAMESPACES | (_libc.CLONE_NEWNET if plan["netns"] else 0)


async def _start(
    spec: LaunchSpec,
    plan: dict[str, Any],
    cgroup: Cgroup | None,
    channel: Channel,
    reply: asyncio.Future[dict[str, Any] | None],
    no_cgroup: str | None,
) -> ProcessInstance:
    pidfd = -1
    instance: ProcessInstance | None = None
    try:
        try:
            pid = forked_pid(await _within_deadline(reply, "the spawner's fork reply"))
        except SpawnError as exc:
            if _clone_flags(plan) and exc.errno in (
                errno.EPERM,
                errno.ENOSPC,
                errno.EACCES,
                errno.EINVAL,
                errno.EUSERS,
            ):
                raise SandboxCreateError(
                    f"user namespaces are blocked: clone(CLONE_NEWUSER|...) failed: {exc}; {USERNS_HOWTO}"
                ) from None
            raise
        pidfd = _libc.pidfd_open(pid, "pidfd_open of the sandbox init")
        file_fds = [_memfd(os.path.basename(f.path), f.data) for f in spec.files]
        try:
            channel.send({"op": "plan", "plan": plan}, file_fds)
        finally:
            for fd in file_fds:
                os.close(fd)
        cgroup_fds = _cgroup_entry(cgroup, pid)
        try:
            idmapped = _map_ids(pid, spec, plan) if plan["namespaces"] else []
            try:
                channel.send({"op": "mapped", "cgroup_fds": len(cgroup_fds)}, [*idmapped, *cgroup_fds])
            finally:
                for fd in idmapped:
                    os.close(fd)
        finally:
            for fd in cgroup_fds:
                os.close(fd)
        try:
            message, fds = await _within_deadline(_expect(channel, "ready"), "the sandbox's 'ready'")
        except SandboxCreateError as exc:
            _explain_setup_oom(exc, cgroup, spec)
            raise
        if cgroup is not None:
            # Init reported its own move as done; confirm it from outside before any
            # command can run (the first one is sent only after this returns).
            cgroup.check_member(pid)
        instance = ProcessInstance(spec, plan, channel, pid, pidfd, cgroup)
        _LIVE.add(instance)
        if fds:
            instance._proxy = socket.socket(fileno=fds[0])
            for fd in fds[1:]:
                os.close(fd)
        elif spec.proxy_listen is not None:
            raise SandboxCreateError("proxy listener: init did not hand one over")
        instance._enforcement = verify_probe(plan, message["probe"], cgroup, spec, no_cgroup=no_cgroup)
        return instance
    except BaseException:
        if instance is not None:
            # Not a live sandbox after all (its probe failed verification): the exit hook
            # must not touch its pidfd, closed below (the number may be reused by then).
            _LIVE.discard(instance)
            instance._destroyed = True
        channel.close()
        if pidfd >= 0:
            with contextlib.suppress(ProcessLookupError):
                signal.pidfd_send_signal(pidfd, signal.SIGKILL)
            os.close(pidfd)
        raise


def _explain_setup_oom(exc: SandboxCreateError, cgroup: Cgroup | None, spec: LaunchSpec) -> None:
    """Raise a clearer error when the memory limit killed the sandbox's own processes.

    Init and the exec server need a few MiB (2 MiB does not start here, 4 MiB does); below
    that the OOM killer ends them during set-up and the caller would only see the channel close.
    """
    if cgroup is None or not cgroup.oom_killed():
        return
    memory = spec.policy.resources.memory
    raise SandboxCreateError(
        f"resources.memory: {memory} B is too little for the sandbox's own init and exec server, "
        f"which the memory limit killed during set-up ({exc}); allow at least 8 MiB"
    ) from None


def _cgroup_entry(cgroup: Cgroup | None, pid: int) -> list[int]:
    """Put init in its cgroup: v1, the fds init moves itself with (sent with "mapped"; the
    caller moving it would cost an RCU grace period, see ``Cgroup.self_move_fds``); v2, the
    caller moves it now."""
    if cgroup is None:
        return []
    if cgroup.version == 1:
        return cgroup.self_move_fds()
    cgroup.add(pid)
    return []


def _map_ids(pid: int, spec: LaunchSpec, plan: dict[str, Any]) -> list[int]:
    try:
        namespaces.write_id_maps(pid, spec.sandbox_id)
        if not plan["root_caller"] or not plan["user_binds"]:
            return []
        userns_fd = os.open(f"/proc/{pid}/ns/user", os.O_RDONLY | os.O_CLOEXEC)
        trees: list[int] = []
        try:
            for source, _target, _is_dir, writable in plan["user_binds"]:
                trees.append(namespaces.idmapped_tree(source, userns_fd, writable=writable))
        except BaseException:
            for fd in trees:
                os.close(fd)
            raise
        finally:
            os.close(userns_fd)
        return trees
    except OSError as exc:
        raise SandboxCreateError(f"sandbox {spec.sandbox_id}: {exc}") from None


_T = TypeVar("_T")


async def _within_deadline(awaitable: Awaitable[_T], what: str) -> _T:
    """``awaitable``, or SandboxCreateError after CREATE_DEADLINE_S (a wedged spawner or
    init must not hang the caller; the caller's cleanup then kills what was started)."""
    try:
        return await asyncio.wait_for(awaitable, CREATE_DEADLINE_S)
    except TimeoutError:
        raise SandboxCreateError(f"sandbox creation: no {what} within {CREATE_DEADLINE_S:g} s") from None


async def _expect(channel: Channel, op: str) -> tuple[dict[str, Any], list[int]]:
    try:
        message, fds = await channel.control()
    except ChannelClosed:
        raise SandboxCreateError(f"sandbox setup process exited before '{op}'") from None
    if message.get("op") == "error":
        for fd in fds:
            os.close(fd)
        if message.get("step") == "unshare the user namespace":
            raise SandboxCreateError(
                f"user namespaces are blocked: unshare(CLONE_NEWUSER) failed: {message.get('message')}; " + USERNS_HOWTO
            )
        raise SandboxCreateError(f"sandbox setup failed: {message.get('message')} (errno {message.get('errno')})")
    if message.get("op") != op:
        for fd in fds:
            os.close(fd)
        raise SandboxCreateError(f"sandbox setup: expected '{op}', got {message.get('op')!r}")
    return message, fds


_HOST_NS: dict[str, str] = {}


def host_namespaces() -> dict[str, str]:
    """The caller's namespace inodes (cached; they do not change)."""
    if not _HOST_NS:
        _HOST_NS.update(namespaces.namespace_inodes())
    return dict(_HOST_NS)


def verify_probe(
    plan: dict[str, Any],
    probe: dict[str, Any],
    cgroup: Cgroup | None,
    spec: LaunchSpec,
    *,
    no_cgroup: str | None = None,
) -> Enforcement:
    """The enforcement record from what a confined child observed; raise on any shortfall.

    ``no_cgroup`` says why the sandbox runs without the cgroup its limits asked for (the
    policy allowed degrading): resource limits are then listed as degraded, not scored.
    """
    status = probe.get("status", {})
    problems: list[str] = []
    if status.get("NoNewPrivs") != "1":
        problems.append(f"NoNewPrivs is {status.get('NoNewPrivs')!r}")
    for key in ("CapEff", "CapPrm", "CapInh", "CapBnd", "CapAmb"):
        if status.get(key, "x").strip("0") != "":
            problems.append(f"{key} is {status.get(key)!r}")
    if probe.get("file_imports") is not False:
        # The exec server runs no code it did not preload; an import from a file could load
        # a module from a directory that is writable inside the sandbox.
        problems.append("the exec server can still import modules from files")
    host = host_namespaces()
    inside = probe.get("ns", {})
    degraded: list[str] = []
    if plan["namespaces"]:
        shared = [name for name in namespaces.NS_NAMES if inside.get(name) == host.get(name)]
        if not plan["netns"]:
            shared = [n for n in shared if n != "net"]
        if shared:
            problems.append(f"namespaces shared with the host: {', '.join(shared)}")
    else:
        degraded.append("namespaces (user namespaces blocked: Landlock + seccomp + rlimit mode)")
        if spec.policy.filesystem.read_only_root:
            degraded.append("read_only_root (no mount namespace)")
    controls: set[Control] = set()
    if plan["seccomp"] is not None:
        if status.get("Seccomp") == "2":
            controls.add(Control.SECCOMP)
        else:
            problems.append(f"seccomp asked but Seccomp is {status.get('Seccomp')!r}")
    if plan["landlock"] is not None:
        if int(probe.get("landlock_abi", 0)) > 0:
            controls.add(Control.LANDLOCK)
        else:
            problems.append("Landlock asked but not applied")
    if plan["netns"]:
        if probe.get("interfaces") == ["lo"]:
            controls.add(Control.NETWORK_ISOLATED)
        else:
            problems.append(f"network namespace has interfaces {probe.get('interfaces')}")
    if plan["deny_sockets"]:
        # Degraded mode, network "off": the seccomp filter refuses socket families.
        if status.get("Seccomp") == "2":
            controls.add(Control.NETWORK_ISOLATED)
        else:
            problems.append("network off asked but the socket filter is not loaded")
    elif not plan["namespaces"] and plan["network"] != "host":
        degraded.append(f"network_isolated (mode {plan['network']} needs a network namespace)")
    if plan["read_only_root"] and plan["namespaces"]:
        if probe.get("root_read_only"):
            controls.add(Control.READ_ONLY_ROOT)
        else:
            problems.append("read-only root asked but / is writable")
    limits = spec.policy.resources
    if "nproc" in plan["rlimits"] and probe.get("nproc") != plan["rlimits"]["nproc"]:
        problems.append(f"RLIMIT_NPROC is {probe.get('nproc')!r}, not {plan['rlimits']['nproc']}")
    if _limits_asked(limits):
        if cgroup is not None:
            controls.add(Control.RESOURCE_LIMITS)
        elif no_cgroup is not None and spec.policy.allow_degraded:
            degraded.append(_degraded_limits(plan, limits, no_cgroup))
        else:
            problems.append("resource limits asked but no cgroup")
    if problems:
        raise SandboxCreateError("enforcement check failed inside the sandbox: " + "; ".join(problems))
    details: dict[str, Any] = {
        "namespaces": {name: inside.get(name) for name in namespaces.NS_NAMES},
        "host_namespaces": host,
        "uid_map": " ".join(probe.get("uid_map", [])),
        "seccomp_mode": status.get("Seccomp"),
        "seccomp_profile": spec.policy.seccomp.profile.value,
        "no_new_privs": status.get("NoNewPrivs"),
        "cap_eff": status.get("CapEff"),
        "cap_bnd": status.get("CapBnd"),
        "landlock_abi": probe.get("landlock_abi", 0),
        "interfaces": probe.get("interfaces"),
        "network": plan["network"],
        "root_read_only": probe.get("root_read_only"),
        "init_pid_inside": 1,
        "cgroup": None if cgroup is None else getattr(cgroup, "version", "yes"),
        "rlimits": plan["rlimits"],
    }
    return Enforcement(
        Backend.PROCESS,
        frozenset(controls),
        verified=True,
        details=details,
        degraded=tuple(degraded),
        # Without namespaces the sandbox shares the host's view of processes, mounts and
        # users: a weaker base than the full engine's.
        base_score=None if plan["namespaces"] else DEGRADED_BASE_SCORE,
    )


__all__ = ["ProcessDriver", "ProcessInstance", "ProcessRun", "host_namespaces", "verify_probe"]
