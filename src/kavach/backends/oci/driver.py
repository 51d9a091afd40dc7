"""The OCI backend: one long-lived runc/crun container per sandbox, one ``runtime exec`` per command.

Lifecycle of an instance (each step raises :class:`~kavach.errors.SandboxCreateError` naming
itself when it fails, and everything built so far is torn down):

1. bundle directory ``/run/kavach/bundles/<id>`` (0711: the sandbox's unprivileged root must
   traverse it to reach the rootfs) with the owner record (``owner.json``, for the sweep of
   :mod:`kavach.backends.oci.sweep` that the first create of a process runs), the rootfs
   (host layout, user directory or unpacked image), ``kavach/`` (the launcher, its plan and
   precompiled BPF, bound read-only at ``/dev/.kavach``; for a root caller it and the host
   layout's rootfs are private tmpfs mounts, so no host path shows in the sandbox's
   mountinfo) and ``config.json`` from
   :func:`kavach.backends.oci.bundle.build_config`;
2. ``runtime --root /run/kavach/<runtime> run -d`` of an init (kavach's launcher in ``init`` mode
   when the rootfs has ``/usr/bin/python3``, else a POSIX shell loop): files in /tmp and the
   workdir persist across execs;
3. one ``runtime exec`` probe that reads ``/proc/self/status`` (Seccomp, Seccomp_filters,
   NoNewPrivs, CapEff), ``uid_map``, the root mount's options and the network interfaces from
   inside; namespace inodes and cgroup limits are read from the host. Every control the
   policy asks for must be seen, else creation fails (or, with ``allow_degraded``, the control
   is listed as degraded and not scored);
4. ``exec``: ``runtime exec --preserve-fds 3 --process /proc/self/fd/N`` (a memfd holding a
   complete process object: the request's environment and nothing else, empty capabilities,
   rlimits, no_new_privs; the command gets kavach's pipes directly, see STDIO_WRAPPER). With
   Landlock or a composite inner layer the command runs through the launcher, which applies them and execs it;
5. timeout: the container is frozen, every process but init is SIGKILLed, it is thawed, so
   daemons the command started die too and the sandbox stays usable;
6. ``destroy``: ``runtime delete --force`` (kills everything, removes the cgroups), unmounts
   kavach's host-side mounts, removes the bundle, and checks that the runtime's state
   directory for the container is gone.

User namespace (always): as root, root inside maps to the same unprivileged host range the
Process backend uses (:func:`kavach.backends.process.namespaces.root_map_base`), and writable
binds (workdir, ``rw_binds``) are idmapped mounts made on the host
(:func:`kavach.backends.process.namespaces.idmapped_tree`) so they stay writable; unprivileged,
root inside maps to the caller (runc's rootless mode; cgroup limits then need a delegated
cgroup v2, so they are refused here unless the policy allows degrading).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import fcntl
import json
import logging
import os
import pwd
import re
import shutil
import signal
import socket
import stat
import struct
import time
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kavach.backends.base import (
    Driver,
    ExecRequest,
    Instance,
    LaunchSpec,
    ProbeResult,
    RawProcess,
    RawResult,
    check_open_files,
)
from kavach.backends.capture import CappedBuffer, exit_reason
from kavach.backends.names import Backend
from kavach.backends.oci import image as images
from kavach.backends.oci.bundle import BundleInputs, IdMap, Mount, build_config, build_process, cpu_quota_us, ro_bind
from kavach.backends.oci.launcher import LandlockLayer, Layer, render_plan
from kavach.backends.oci.runtime import (
    DEFAULT_STATE_ROOT,
    CgroupMode,
    RuntimeInfo,
    RuntimeName,
    cgroup_mode,
    choose_runtime,
    explain,
    probe_runtime,
    state_root,
)
from kavach.backends.oci.runtime import call as call_runtime
from kavach.backends.oci.seccomp_oci import to_oci
from kavach.backends.oci.sweep import sweep_logged, write_owner
from kavach.backends.process.cgroups import delegated_v1_path
from kavach.backends.rootfs import tmpfs_inodes
from kavach.backends.seccomp_profiles import build_runtime_spec, build_spec, setid_guard_spec
from kavach.errors import ExecError, SandboxCreateError
from kavach.policy import Access, NetworkMode, SandboxPolicy, landlock_rules
from kavach.scoring import Control, Enforcement

KAVACH_DIR_INSIDE = "/dev/.kavach"  # on the runtime's fresh /dev tmpfs: exists in every rootfs
LAUNCHER_INSIDE = f"{KAVACH_DIR_INSIDE}/launcher.py"
PLAN_INSIDE = f"{KAVACH_DIR_INSIDE}/plan"
PYTHON_INSIDE = "/usr/bin/python3"
BUNDLE_BASE = os.path.join(DEFAULT_STATE_ROOT, "bundles")
# Sizes of the tmpfs a root caller's bundle mounts (see OciInstance._private_tmpfs): the host
# layout's root (mount points and generated /etc files, a few KiB; what a writable root can
# hold, as the Process backend's 1 MiB root tmpfs), kavach's own files bound at
# KAVACH_DIR_INSIDE (launcher, plan, BPF, FIFOs) and the injected files.
HOST_ROOTFS_SIZE = 1 << 20
KAVACH_DIR_SIZE = 4 << 20
INJECTED_FILES_SIZE = 8 << 20
RUNTIME_TIMEOUT_S = 30.0
RUNTIME_CACHE_S = 60.0
DRAIN_GRACE_S = 0.05  # output of leftover background processes is still read this long (as the Process backend)
EXIT_TIMEOUT = 128 + signal.SIGKILL
_ID_RE = re.compile(r"[^A-Za-z0-9_.-]")
_log = logging.getLogger(__name__)

# A POSIX-shell init for rootfs without python3: `wait` with no operand makes dash/bash call
# waitpid(-1), which also reaps orphans re-parented to PID 1.
SH_INIT = 'trap "exit 0" TERM INT; while :; do sleep 3600 & wait; done'
# The same with the owner's lifeline on fd 3 (see LIFELINE_RUNTIMES): a background reader
# sends init SIGTERM at EOF. Weaker than the Python init's, which no process of the sandbox
# can interfere with: a command may kill that reader (it runs as the sandbox's user).
SH_INIT_LIFELINE = (
    'trap "exit 0" TERM INT; { read -r _ <&3; kill -TERM $$; } & exec 3<&-; while :; do sleep 3600 & wait; done'
)

# Runtimes given the owner's lifeline: the read end of a pipe passed to the container's init
# as fd 3 (``run --preserve-fds 1``), whose write end only this process holds. When this
# process dies, however it dies, init sees EOF and exits, and the kernel kills the container.
LIFELINE_RUNTIMES = frozenset({RuntimeName.RUNC, RuntimeName.CRUN})
LIFELINE_FD = 3

# Attached (non-detached) ``runtime exec`` copies the command's stdio through pipes of its
# own and exits only when they reach EOF: a command that leaves `sleep 1000 &` behind
# holding stdout would never return. So kavach's pipes are also passed in as fds 3-5 and
# this wrapper execs the command on them; the runtime's own pipes close at that exec and it
# returns when the command exits, with its status (128+N for a signal; 127/126 from the
# shell when the command cannot run). No extra process stays behind. `unset PWD`: the shell
# would otherwise export PWD, and the environment must be exactly the request's. The
# runtime's own stdin is /dev/null, or its copy loop would consume the command's input.
# The wrapper also raises its oom_score_adj to 1000 (inherited by the command) so that the
# OOM killer picks commands, never the container's init (whose death would end the
# sandbox): runc 1.1 ignores an exec's ``oomScoreAdj``. A failed write stops the exec (126).
STDIO_WRAPPER = 'echo 1000 >/proc/self/oom_score_adj || exit 126; unset PWD; exec "$@" <&3 >&4 2>&5 3<&- 4>&- 5>&-'

# The enforcement probe, in shell builtins only (it must work in any rootfs with /bin/sh).
# It reads its *own* /proc/self entries, i.e. those of a process started exactly like every
# exec (same runtime exec path, same launcher layers).
PROBE_SCRIPT = r"""
while IFS= read -r line; do
  case "$line" in
    Seccomp:*|Seccomp_filters:*|NoNewPrivs:*|CapEff:*|CapPrm:*|CapBnd:*|CapAmb:*|CapInh:*)
      printf '%s\n' "$line";;
  esac
done < /proc/self/status
while read -r inside outside count; do
  printf 'uid_map:\t%s %s %s\n' "$inside" "$outside" "$count"
done < /proc/self/uid_map
rootopts=""
while read -r _id _parent _dev _root mnt opts _rest; do
  if [ "$mnt" = / ]; then rootopts="$opts"; fi
done < /proc/self/mountinfo
printf 'root_opts:\t%s\n' "$rootopts"
ifaces=""
{
  read -r _h1; read -r _h2
  while IFS=: read -r name _rest; do for n in $name; do ifaces="$ifaces $n"; done; done
} < /proc/self/net/dev
printf 'net_ifaces:\t%s\n' "$ifaces"
set -- /*
if [ "$1" = "/*" ]; then printf 'root_listing:\tdenied\n'; else printf 'root_listing:\tallowed\n'; fi
"""


# -- helpers that do not need an instance -----------------------------------------------------


def container_id(sandbox_id: str) -> str:
    """The runtime's container id for a sandbox (runc allows ``[A-Za-z0-9_.-]``)."""
    return "kavach-" + _ID_RE.sub("_", sandbox_id)[:100]


def landlock_plan(policy: SandboxPolicy) -> LandlockLayer | None:
    """The Landlock layer for the launcher, resolved on the host with the Process backend's mapping."""
    if not policy.landlock.enabled:
        return None
    from kavach.backends.process import landlock

    abi = landlock.landlock_abi()
    if abi == 0:
        raise SandboxCreateError("the policy asks for Landlock but this kernel has none enabled")
    scoped = (landlock.SCOPE_SIGNAL | landlock.SCOPE_ABSTRACT_UNIX_SOCKET) if abi >= 6 else 0
    rules = []
    for rule in landlock_rules(policy):
        if "\n" in rule.path or "\r" in rule.path:
            raise SandboxCreateError(f"landlock rule path {rule.path!r} contains a line break")
        mask = landlock.access_mask(rule.access, abi)
        if mask:
            rules.append((rule.path, mask))
    return LandlockLayer(abi, landlock.handled_fs_access(abi), 0, scoped, landlock.FILE_ACCESS, rules)


def _root_listing_allowed_by_rules(policy: SandboxPolicy) -> bool:
    return any(r.path == "/" and Access.READ in r.access for r in policy.landlock.rules)


def parse_probe(text: str) -> dict[str, str]:
    """``key:\\tvalue`` lines of the probe's output."""
    facts: dict[str, str] = {}
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep:
            facts[key.strip()] = value.strip()
    return facts


def parse_announce(stderr: str) -> dict[str, Any]:
    """The launcher's ``--announce`` line (``landlock_domains=1 ... layers=oci,inner``), typed."""
    for line in stderr.splitlines():
        if line.startswith("kavach-launcher: landlock_domains="):
            fields = dict(item.partition("=")[::2] for item in line.partition(": ")[2].split())
            report: dict[str, Any] = {k: int(v) for k, v in fields.items() if v.isdigit()}
            report["layers"] = [name for name in fields.get("layers", "").split(",") if name]
            return report
    return {}


def _cgroup_paths(pid: int) -> dict[str, str]:
    """controller -> cgroup path of ``pid`` (``""`` is the v2 unified hierarchy)."""
    # Imported here, as the other Process modules this driver uses: the package would load
    # the whole Process driver with it.
    from kavach.backends.process.cgroups import cgroup_paths

    return cgroup_paths(pid)


def _read_int(path: str) -> int | None:
    try:
        text = Path(path).read_text(encoding="ascii").split()[0]
    except (OSError, IndexError):
        return None
    return None if text == "max" else int(text)


def cgroup_limits(paths: Mapping[str, str]) -> dict[str, int | None]:
    """The memory, pids and CPU quota limits the kernel enforces on the cgroup at ``paths``
    (controller -> path, as :func:`kavach.backends.process.cgroups.cgroup_paths` reads them)."""
    limits: dict[str, int | None] = {"memory": None, "pids": None, "cpu_quota_us": None}
    if "memory" in paths:  # cgroup v1
        limits["memory"] = _read_int(f"/sys/fs/cgroup/memory{paths['memory']}/memory.limit_in_bytes")
        limits["pids"] = _read_int(f"/sys/fs/cgroup/pids{paths.get('pids', '')}/pids.max")
        cpu = paths.get("cpu") or paths.get("cpu,cpuacct", "")
        quota = _read_int(f"/sys/fs/cgroup/cpu{cpu}/cpu.cfs_quota_us")
        limits["cpu_quota_us"] = quota if quota is not None and quota > 0 else None
    elif "" in paths:  # cgroup v2
        base = f"/sys/fs/cgroup{paths['']}"
        limits["memory"] = _read_int(f"{base}/memory.max")
        limits["pids"] = _read_int(f"{base}/pids.max")
        limits["cpu_quota_us"] = _read_int(f"{base}/cpu.max")
    return limits


_EXEC_ERRORS: tuple[tuple[bytes, int, str], ...] = (
    (b"executable file not found", 127, "No such file or directory"),
    (b"no such file or directory", 127, "No such file or directory"),
    (b"permission denied", 126, "Permission denied"),
    (b"exec format error", 126, "Exec format error"),
    (b"is a directory", 126, "Is a directory"),
)


_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_SHELL_EXEC_FAILURE = re.compile(
    rb"kavach: \d+: exec: (.+): (not found|Permission denied|Exec format error|Is a directory)\n"
)


def start_failure(code: int, stderr: bytes, argv0: str) -> tuple[int, bytes] | None:
    """Map a failure to start the command to a shell-style result.

    With STDIO_WRAPPER the shell's ``exec`` reports it (127/126 and its own message); without
    it runc exits 255 with ``exec failed: unable to start container process: exec: "X": ...``
    when the command cannot be executed: that becomes 127 (not found) or 126 (not
    executable) with ``kavach: X: <strerror>`` on stderr, as the Process backend reports it.
    Any other start failure (the working directory is missing, ...) raises ExecError.
    """
    shell = _SHELL_EXEC_FAILURE.fullmatch(stderr)
    if code in (126, 127) and shell is not None and shell.group(1) == argv0.encode():
        # STDIO_WRAPPER's `exec` could not run the command: the shell said so in its words.
        text = "No such file or directory" if code == 127 else shell.group(2).decode(errors="replace")
        return code, f"kavach: {argv0}: {text}\n".encode()
    if code != 255 or b"exec failed: unable to start container process" not in stderr:
        return None
    detail = stderr.lower()
    if b"exec: " in detail:
        for needle, exit_code, text in _EXEC_ERRORS:
            if needle in detail:
                return exit_code, f"kavach: {argv0}: {text}\n".encode()
    message = stderr.decode(errors="replace").strip().rsplit("unable to start container process: ", 1)[-1]
    message = message.rstrip('"').replace('\\"', '"')
    raise ExecError(f"exec setup failed in the sandbox: {message}")


def _status_fields(pid: int) -> dict[str, str]:
    """``/proc/PID/status`` as a dict (read on the host, not trusting anything inside)."""
    fields: dict[str, str] = {}
    with contextlib.suppress(OSError), open(f"/proc/{pid}/status", encoding="ascii") as stream:
        for line in stream:
            key, _, value = line.partition(":")
            fields[key] = value.strip()
    return fields


def _user_state_root() -> str:
    """An unprivileged caller's state directory: $XDG_RUNTIME_DIR/kavach, else /tmp/kavach-UID."""
    runtime_dir = os.environ.get("XDG_RUNTIME_DIR")
    if runtime_dir and os.path.isdir(runtime_dir):
        return os.path.join(runtime_dir, "kavach")
    return f"/tmp/kavach-{os.geteuid()}"


def _check_private_dir(path: str) -> None:
    """Refuse a state directory someone else owns or can write (e.g. planted in /tmp)."""
    info = os.lstat(path)
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.geteuid() or info.st_mode & 0o022:
        raise SandboxCreateError(
            f"state directory {path} must be a directory owned by uid {os.geteuid()}, not group/other writable"
        )


def _rootless_without_cgroup() -> bool:
    """A caller that gets no cgroup from runc here: not root, no cgroup v2 to delegate, and
    no v1 subtree delegated to it (``kavach cgroups delegate USER``) in every hierarchy."""
    return not _is_root() and cgroup_mode() is not CgroupMode.UNIFIED and delegated_v1_path() is None


def _cgroups_path(container_id: str) -> str | None:
    """The container's ``linux.cgroupsPath``: below ``/kavach`` for root, below the caller's
    delegated v1 subtree otherwise (runc's rootless mode then creates it and sets the
    limits, as it does for root), ``None`` when the caller has neither."""
    if _is_root():
        return f"/kavach/{container_id}"
    delegated = delegated_v1_path() if cgroup_mode() is not CgroupMode.UNIFIED else None
    return None if delegated is None else f"{delegated}/{container_id}"


def _is_root() -> bool:
    return os.geteuid() == 0


def _user_name() -> str:
    """This caller's user name (its uid when it has none), for the messages that say what root can do."""
    try:
        return pwd.getpwuid(os.geteuid()).pw_name
    except KeyError:
        return str(os.geteuid())


def _max_processes(pid: int) -> int | None:
    """The soft RLIMIT_NPROC of ``pid`` (``None`` when unlimited), from /proc/PID/limits."""
    try:
        text = Path(f"/proc/{pid}/limits").read_text(encoding="ascii")
    except OSError as exc:
        raise SandboxCreateError(f"cannot read the limits of the sandbox init {pid}: {exc.strerror}") from None
    for line in text.splitlines():
        if line.startswith("Max processes"):
            soft = line[len("Max processes") :].split()[0]
            return None if soft == "unlimited" else int(soft)
    raise SandboxCreateError(f"/proc/{pid}/limits has no 'Max processes' line")


# -- processes -----------------------------------------------------------------------------------


@dataclass
class _Streams:
    stdout: CappedBuffer
    stderr: CappedBuffer
    queue: asyncio.Queue[tuple[str, bytes] | None] | None = None
    tasks: list[asyncio.Task[None]] = field(default_factory=list)


async def _pump(reader: asyncio.StreamReader, name: str, buffer: CappedBuffer, streams: _Streams) -> None:
    while chunk := await reader.read(65536):
        kept = buffer.feed(chunk)
        if kept and streams.queue is not None:
            await streams.queue.put((name, kept))


async def _exited(proc: asyncio.subprocess.Process) -> int:
    """The process's exit status as soon as it exits.

    ``Process.wait()`` (Python 3.11) also waits until its stdout/stderr pipes are closed;
    after ``runtime exec -d`` those pipes belong to the command, which may run on.
    """
    try:
        pidfd = os.pidfd_open(proc.pid)
    except ProcessLookupError:
        pidfd = -1  # already exited and reaped: the child watcher has set the status
    if pidfd >= 0:
        loop = asyncio.get_running_loop()
        exited: asyncio.Future[None] = loop.create_future()

        def readable() -> None:
            if not exited.done():
                exited.set_result(None)

        loop.add_reader(pidfd, readable)
        try:
            await exited
        finally:
            loop.remove_reader(pidfd)
            os.close(pidfd)
    # The child watcher reaps it right after it exits and then records the status.
    while proc.returncode is None:
        await asyncio.sleep(0.001)
    return proc.returncode


class OciProcess(RawProcess):
    """One ``runtime exec``: streams output, enforces the timeout, kills the whole sandbox tree."""

    def __init__(
        self,
        instance: OciInstance,
        proc: asyncio.subprocess.Process,
        request: ExecRequest,
        streaming: bool,
    ) -> None:
        self.pid = proc.pid
        self._instance = instance
        self._proc = proc
        self._request = request
        self._started = time.monotonic()
        self._streams = _Streams(CappedBuffer(request.stdout_cap), CappedBuffer(request.stderr_cap))
        if streaming:
            self._streams.queue = asyncio.Queue()
        self._yielded = False
        self._oom_before = instance.oom_kills()
        self._result: RawResult | None = None
        self._killed_by: int | None = None
        assert proc.stdout is not None and proc.stderr is not None
        self._streams.tasks = [
            asyncio.create_task(_pump(proc.stdout, "stdout", self._streams.stdout, self._streams)),
            asyncio.create_task(_pump(proc.stderr, "stderr", self._streams.stderr, self._streams)),
        ]
        self._stdin_task = asyncio.create_task(self._feed_stdin(request.stdin))
        self._waiter = asyncio.create_task(self._supervise())

    async def _feed_stdin(self, data: bytes | None) -> None:
        writer = self._proc.stdin
        if writer is None:
            return
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            if data:
                writer.write(data)
                await writer.drain()
            writer.close()
            await writer.wait_closed()

    async def _supervise(self) -> RawResult:
        try:
            return await self._supervise_inner()
        finally:
            # End of stream for chunks(), whatever happened (a start failure raises).
            if self._streams.queue is not None:
                self._streams.queue.put_nowait(None)

    async def _supervise_inner(self) -> RawResult:
        timeout = self._request.timeout_ms / 1000 if self._request.timeout_ms is not None else None
        timed_out = False
        try:
            await asyncio.wait_for(_exited(self._proc), timeout)
        except TimeoutError:
            timed_out = True
            await self._instance.kill_all_but_init()
            try:
                await asyncio.wait_for(_exited(self._proc), RUNTIME_TIMEOUT_S)
            except TimeoutError:
                self._proc.kill()
                await _exited(self._proc)
        # Output of processes the command left running in the background is collected for a
        # short grace only: the exec ends when its command ends, as with the Process backend.
        _done, pending = await asyncio.wait(self._streams.tasks, timeout=DRAIN_GRACE_S)
        for task in pending:
            task.cancel()
        for task in pending:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._stdin_task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._stdin_task
        code = self._proc.returncode if self._proc.returncode is not None else EXIT_TIMEOUT
        if code < 0:  # the runtime itself was killed by a signal
            code = 128 - code
        if self._killed_by is not None:
            code = 128 + self._killed_by
        stderr = self._streams.stderr.getvalue()
        failure = start_failure(code, stderr, self._request.argv[0]) if not timed_out else None
        if failure is not None:
            # The command never ran: report it as the Process backend (and a shell) does.
            code, message = failure
            stderr = message if self._streams.queue is None else b""
            if self._streams.queue is not None:
                await self._streams.queue.put(("stderr", message))
        reason = exit_reason(code, timed_out, self._instance.oom_kills() > self._oom_before)
        if timed_out:
            code = EXIT_TIMEOUT
        return RawResult(
            exit_code=code,
            stdout=self._streams.stdout.getvalue(),
            stderr=stderr,
            duration_ms=(time.monotonic() - self._started) * 1000,
            timed_out=timed_out,
            stdout_truncated=self._streams.stdout.truncated,
            stderr_truncated=self._streams.stderr.truncated,
            reason=reason,
        )

    async def chunks(self) -> AsyncIterator[tuple[str, bytes]]:
        """Output as it arrives (only for processes started with :meth:`OciInstance.spawn`)."""
        queue = self._streams.queue
        if queue is None:
            return
        self._yielded = True
        while (item := await queue.get()) is not None:
            yield item

    async def wait(self) -> RawResult:
        """The result; after :meth:`chunks` its stdout/stderr are empty (already yielded)."""
        if self._result is None:
            self._result = await asyncio.shield(self._waiter)
        if self._yielded:
            return RawResult(
                exit_code=self._result.exit_code,
                duration_ms=self._result.duration_ms,
                timed_out=self._result.timed_out,
                stdout_truncated=self._result.stdout_truncated,
                stderr_truncated=self._result.stderr_truncated,
                reason=self._result.reason,
            )
        return self._result

    async def abandon(self) -> None:
        """Nobody will wait for this command: kill it and its descendants (not the sandbox's
        other commands). The supervisor still reaps the runtime process."""
        if self._result is not None or self._waiter.done():
            return
        self._killed_by = signal.SIGKILL
        await self._instance.kill_exec_tree(self._proc.pid)

    async def kill(self, signum: int = signal.SIGKILL) -> None:
        """SIGKILL kills every process of the sandbox but init; other signals go to the command."""
        if self._result is not None or self._waiter.done():
            return
        if signum == signal.SIGKILL:
            self._killed_by = signum
            await self._instance.kill_all_but_init()
        else:
            # runc exec relays the signals it receives to the container process.
            with contextlib.suppress(ProcessLookupError):
                self._proc.send_signal(signum)


# -- instance ------------------------------------------------------------------------------------


@dataclass
class _Layout:
    """Host-side paths of one bundle and what must be undone at destroy."""

    bundle_dir: str
    kavach_dir: str
    host_mounts: list[str] = field(default_factory=list)  # unmounted (detached) at destroy


class OciInstance(Instance):
    """One container."""

    def __init__(self, driver: OciDriver, spec: LaunchSpec, runtime: RuntimeInfo) -> None:
        assert runtime.path is not None
        self.spec = spec
        self.policy = spec.policy
        self.backend = driver.backend
        self.runtime = runtime
        self.runtime_path = runtime.path
        self.state_dir = state_root(runtime.name, driver.state_base)
        self.container_id = container_id(spec.sandbox_id)
        self.layout = _Layout(
            os.path.join(driver.bundle_base, self.container_id),
            os.path.join(driver.bundle_base, self.container_id, "kavach"),
        )
        self._driver = driver
        self._exec_counter = 0
        self._launcher_needed = False
        self._inner = spec.inner_backend
        self._enforcement: Enforcement | None = None
        self._init_pid: int | None = None
        self._init_pidns = ""
        # A root caller, or one with a delegated cgroup v1 subtree, gives the container a
        # cgroup of its own (cgroupsPath). Without one, the init's cgroup is the caller's
        # session: processes are then found by pid namespace and frozen with SIGSTOP, never
        # through that shared cgroup.
        self._cgroups_path = _cgroups_path(self.container_id)
        self._own_cgroup = self._cgroups_path is not None
        # controller -> the container's cgroup, read once from its init when it starts. Never
        # re-read from /proc/<init pid>: after the init dies (the OOM killer may pick it) that
        # pid may name a host process, whose cgroup would then be frozen, listed and killed.
        self._cgroup_dirs: dict[str, str] = {}
        # Without a cgroup (rootless on cgroup v1 without a delegated subtree, which needs
        # allow_degraded for limits), the pids limit still holds as RLIMIT_NPROC of every
        # process of the container. (Decided once, with the cgroups path: a delegation made or
        # removed meanwhile must not split the two.)
        self._without_cgroup = not _is_root() and cgroup_mode() is not CgroupMode.UNIFIED and not self._own_cgroup
        self._nproc = spec.policy.resources.pids if self._without_cgroup else None
        self._destroyed = False
        self._stopped = False
        self._has_sh = False  # /bin/sh in the rootfs: execs run under STDIO_WRAPPER
        self._owner: tuple[int, int] | None = None
        self._owns_bundle = False  # set once this instance created the bundle (and the container id)
        self._proxy_listener: socket.socket | None = None
        self._lifeline: int | None = None  # write end of the init's lifeline (LIFELINE_RUNTIMES)
        self._extra_runtime_args: tuple[str, ...] = driver.runtime_args(spec.policy)

    # -- runtime calls ----------------------------------------------------------------------

    def _runtime_argv(self, *args: str) -> list[str]:
        return [self.runtime_path, "--root", self.state_dir, *self._extra_runtime_args, *args]

    async def _runtime(self, *args: str, check: bool = True, timeout: float = RUNTIME_TIMEOUT_S) -> str:
        try:
            returncode, out, err = await call_runtime(self._runtime_argv(*args), timeout)
        except TimeoutError:
            raise ExecError(f"{self.runtime.name.value} {args[0]} timed out after {timeout:.0f}s") from None
        if check and returncode != 0:
            detail = err.decode(errors="replace").strip() or out.decode(errors="replace").strip()
            raise ExecError(f"{self.runtime.name.value} {args[0]} failed ({returncode}): {detail}")
        return out.decode(errors="replace")

    # -- creation ----------------------------------------------------------------------------

    async def create(self) -> None:
        """Build the bundle, start the init, probe the enforcement (fail closed)."""
        policy = self.policy
        self._check_bind_sources()
        os.makedirs(self.state_dir, mode=0o700, exist_ok=True)
        _check_private_dir(self._driver.state_base)
        os.makedirs(self._driver.bundle_base, mode=0o711, exist_ok=True)
        try:
            os.mkdir(self.layout.bundle_dir, 0o711)
        except FileExistsError:
            # Another sandbox with this id is alive: destroy() must not touch its bundle or
            # container, so nothing of this instance is marked as owned.
            raise SandboxCreateError(f"bundle {self.layout.bundle_dir} already exists (sandbox id reused?)") from None
        self._owns_bundle = True
        # 0711, not 0700: the sandbox's root (an unprivileged host uid) must traverse it.
        os.chmod(self.layout.bundle_dir, 0o711)  # noqa: S103
        # Before anything is mounted below the bundle: a sweep after this process dies
        # finds the owner dead and removes the bundle (kavach.backends.oci.sweep).
        write_owner(self.layout.bundle_dir, self.runtime.name.value)
        uid_map, gid_map = self._id_maps()
        owner = (uid_map[0].host_id, gid_map[0].host_id) if _is_root() else None
        self._owner = owner
        prepared = await self._prepare_rootfs(uid_map, gid_map, owner)
        self._has_sh = prepared.has_sh
        self._launcher_needed = policy.landlock.enabled or self._inner is not None or self.spec.proxy_listen is not None
        if self._launcher_needed and prepared.kind != "host" and not policy.filesystem.read_only_root:
            # The launcher runs the rootfs's own python3 before Landlock is applied. With a
            # writable image or directory root the sandbox could replace that binary and
            # make every later command skip its restrictions; the host layout binds /usr
            # read-only, so it is safe there.
            raise SandboxCreateError(
                f"Landlock / composite / proxy listener with a writable {prepared.kind} root is refused: "
                f"the sandbox could replace {PYTHON_INSIDE}; set filesystem.read_only_root"
            )
        if self._launcher_needed and not prepared.has_python3:
            raise SandboxCreateError(
                f"the {prepared.kind} rootfs has no {PYTHON_INSIDE}: kavach's in-sandbox launcher needs it "
                "for Landlock, a composite inner layer or the egress proxy listener"
            )
        if not prepared.has_python3 and not prepared.has_sh:
            raise SandboxCreateError(f"the {prepared.kind} rootfs has neither {PYTHON_INSIDE} nor /bin/sh for init")
        self._write_kavach_dir(owner)
        overrides = await self._writable_binds()
        late = [*self._injected_files(owner), ro_bind(self.layout.kavach_dir, KAVACH_DIR_INSIDE, noexec=True)]
        if prepared.kind == "host":
            targets = [(policy.filesystem.workdir, True)]
            targets += [(b.target, os.path.isdir(b.source)) for b in policy.filesystem.ro_binds]
            targets += [(b.target, os.path.isdir(b.source)) for b in policy.filesystem.rw_binds]
            targets += [(m.destination, False) for m in late if m.destination != KAVACH_DIR_INSIDE]
            images.create_mountpoints(prepared.path, targets, owner)
        lifeline = self.runtime.name in LIFELINE_RUNTIMES
        if prepared.has_python3:
            init_args: tuple[str, ...] = (PYTHON_INSIDE, "-I", "-S", LAUNCHER_INSIDE, "init")
            if lifeline:
                init_args += ("--lifeline", str(LIFELINE_FD))
        else:
            init_args = ("/bin/sh", "-c", SH_INIT_LIFELINE if lifeline else SH_INIT)
        # The runtime skips syscall names its libseccomp does not know: a misspelt deny entry
        # would be dropped in silence. Refused here instead (PolicyError naming the syscall).
        from kavach.backends.process.seccomp import check_user_syscalls, known_syscall_names

        check_user_syscalls(policy.seccomp, libseccomp_only=True)
        check_open_files(policy)
        # basic as an allow list: a deny-list name the runtime cannot resolve would reach
        # the kernel; an allow-list name it cannot resolve is only refused.
        spec = build_runtime_spec(policy.seccomp, known_syscall_names())
        if spec is None and os.geteuid() == 0 and (policy.filesystem.rw_binds or self.spec.workdir_host):
            # A root caller's writable binds are idmapped so that files keep their host owner:
            # root inside writes as host root there. With no policy filter to refuse setuid and
            # setgid bits, install the guard alone (it is not the scored seccomp control: the
            # enforcement probe still counts only the policy's own filter).
            spec = setid_guard_spec()
        inputs = BundleInputs(
            rootfs=prepared.path,
            init_args=init_args,
            hostname=self.spec.hostname,
            uid_map=uid_map,
            gid_map=gid_map,
            system_mounts=prepared.mounts,
            late_mounts=tuple(late),
            workdir_host=self.spec.workdir_host,
            source_overrides=overrides,
            seccomp=None if spec is None else to_oci(spec),
            cgroups_path=self._cgroups_path,
            annotations={"org.kavach.sandbox-id": self.spec.sandbox_id},
            nproc=self._nproc,
        )
        if self._without_cgroup:
            # runc would fail to set them (no cgroup of ours to write); _check_policy let
            # limits through only with allow_degraded, and the probe finds them missing
            # (the pids limit is then RLIMIT_NPROC, set above).
            policy = dataclasses.replace(policy, resources=policy.resources.without_cgroup_limits())
        config = build_config(policy, inputs)
        with open(os.path.join(self.layout.bundle_dir, "config.json"), "w", encoding="utf-8") as stream:
            json.dump(config, stream, indent=1)
        pid_file = os.path.join(self.layout.bundle_dir, "init.pid")
        await self._run_detached(pid_file, lifeline=lifeline)
        self._init_pid = int(Path(pid_file).read_text(encoding="ascii").strip())
        self._init_pidns = os.readlink(f"/proc/{self._init_pid}/ns/pid")
        if self._own_cgroup:
            self._cgroup_dirs = self._read_cgroup_dirs(self._init_pid)
        if self.spec.proxy_listen is not None:
            self._proxy_listener = await self._make_proxy_listener(self.spec.proxy_listen)
        self._enforcement = await self._probe_enforcement(prepared.kind)

    def _read_cgroup_dirs(self, pid: int) -> dict[str, str]:
        """The cgroups of the container's init ``pid``, checked to be the one asked for."""
        try:
            paths = _cgroup_paths(pid)
        except OSError as exc:
            raise SandboxCreateError(f"cannot read the cgroups of the container's init: {exc.strerror}") from None
        # Fail closed: limits, freezing and kills all go through these paths.
        if self._cgroups_path not in paths.values():
            raise SandboxCreateError(
                f"the container's init is not in its cgroup {self._cgroups_path} "
                f"(it is in {sorted(set(paths.values()))})"
            )
        return paths

    async def _run_detached(self, pid_file: str, *, lifeline: bool) -> None:
        """``runtime run -d``. The init inherits the runtime's stdio, so it must not be a pipe
        we wait on: stdout is /dev/null and stderr a log file in the bundle (runtime errors
        and anything init prints). With ``lifeline``, the init also gets the read end of the
        owner's lifeline as fd 3; the write end stays in ``self._lifeline`` until destroy."""
        log_path = os.path.join(self.layout.bundle_dir, "init.log")
        run = ["run", "-d", "--bundle", self.layout.bundle_dir, "--pid-file", pid_file, self.container_id]
        argv = self._runtime_argv(*run)
        stdin: int = asyncio.subprocess.DEVNULL
        if lifeline:
            # Both ends close-on-exec: no other child of this process inherits either. The
            # read end becomes the runtime's stdin, which this shim moves to fd 3 (stdin is
            # then /dev/null again) for --preserve-fds 1 to hand to the container's init.
            stdin, self._lifeline = os.pipe2(os.O_CLOEXEC)
            argv = [
                "/bin/sh",
                "-c",
                f'exec "$@" {LIFELINE_FD}<&0 0</dev/null',
                "kavach-run",
                *self._runtime_argv("run", "--preserve-fds", "1", *run[1:]),
            ]
        try:
            with open(log_path, "wb") as log:
                proc = await asyncio.create_subprocess_exec(
                    *argv, stdin=stdin, stdout=asyncio.subprocess.DEVNULL, stderr=log
                )
        finally:
            if lifeline:
                os.close(stdin)  # the runtime (then the init) holds it now
        try:
            await asyncio.wait_for(proc.wait(), RUNTIME_TIMEOUT_S)
        except TimeoutError:
            proc.kill()
            await proc.wait()
            raise SandboxCreateError(f"{self.runtime.name.value} run timed out") from None
        if proc.returncode != 0:
            detail = Path(log_path).read_text(encoding="utf-8", errors="replace").strip()
            raise SandboxCreateError(f"{self.runtime.name.value} could not start the sandbox: {detail}")

    def _id_maps(self) -> tuple[tuple[IdMap, ...], tuple[IdMap, ...]]:
        if _is_root():
            from kavach.backends.process.namespaces import ROOT_MAP_SIZE, root_map_base

            base = root_map_base(self.spec.sandbox_id)
            return (IdMap(0, base, ROOT_MAP_SIZE),), (IdMap(0, base, ROOT_MAP_SIZE),)
        return (IdMap(0, os.geteuid(), 1),), (IdMap(0, os.getegid(), 1),)

    async def _prepare_rootfs(
        self, uid_map: tuple[IdMap, ...], gid_map: tuple[IdMap, ...], owner: tuple[int, int] | None
    ) -> images.PreparedRootfs:
        source = self._driver.rootfs
        if isinstance(source, images.DirectoryRootfs):
            fs = self.policy.filesystem
            needed = ["/proc", "/dev", "/tmp", fs.workdir, *(b.target for b in (*fs.ro_binds, *fs.rw_binds))]
            if self.policy.network.mode is not NetworkMode.HOST:
                needed.append("/sys")
            needed += [f.path for f in self.spec.files]
            prepared = images.prepare_directory_rootfs(source, needed)
            return dataclasses.replace(prepared, path=self._bind_into_bundle(prepared.path))
        if isinstance(source, images.ImageRootfs):
            image_dir = os.path.join(self.layout.bundle_dir, "image")
            prepared = await images.unpack_image(source, image_dir, uid_map, gid_map)
            # umoci creates the bundle 0700; the sandbox's root must traverse it to its rootfs.
            os.chmod(image_dir, 0o711)  # noqa: S103
            return prepared
        resolv = None
        if self.policy.network.mode is NetworkMode.HOST:
            with contextlib.suppress(OSError):
                resolv = Path("/etc/resolv.conf").read_bytes()
        if _is_root():
            # The host layout's root is a private tmpfs, as the Process backend's is: the
            # sandbox's mountinfo shows a tmpfs, not the bundle's host path, and a writable
            # root (read_only_root false) holds at most this much, not the host disk's space.
            # (Unprivileged, nothing can be mounted here: it is a directory of the user's.)
            rootfs_dir = os.path.join(self.layout.bundle_dir, "rootfs")
            self._private_tmpfs(rootfs_dir, HOST_ROOTFS_SIZE, "0755", "mount the rootfs tmpfs", noexec=False)
        return images.prepare_host_rootfs(self.layout.bundle_dir, self.spec.hostname, owner, resolv)

    def _private_tmpfs(self, path: str, size: int, mode: str, step: str, *, noexec: bool) -> None:
        """A new directory ``path`` with a fresh tmpfs on it (root only; nosuid, nodev, capped at
        ``size`` bytes and :func:`~kavach.backends.rootfs.tmpfs_inodes` inodes), detached at
        destroy like every host-side mount."""
        from kavach.backends.process import _libc

        os.mkdir(path, 0o700)  # the tmpfs's own mode applies once it is mounted
        flags = _libc.MS_NOSUID | _libc.MS_NODEV | (_libc.MS_NOEXEC if noexec else 0)
        options = f"size={size},nr_inodes={tmpfs_inodes(size)},mode={mode}"
        _libc.mount("tmpfs", path, "tmpfs", flags, options, step)
        self.layout.host_mounts.append(path)

    def _bind_into_bundle(self, directory: str) -> str:
        """Bind the user's rootfs directory at ``bundle/rootfs`` (host side).

        The runtime re-binds the rootfs from inside the user namespace, where the sandbox's
        root must be able to reach it; the user's directory may sit below paths it cannot
        traverse (``/tmp/pytest-of-root`` is 0700), the bundle (0711) can always be reached.
        """
        from kavach.backends.process import _libc

        target = os.path.join(self.layout.bundle_dir, "rootfs")
        os.mkdir(target, 0o755)
        _libc.mount(directory, target, None, _libc.MS_BIND | _libc.MS_REC, None, f"bind rootfs {directory}")
        self.layout.host_mounts.append(target)
        return target

    def _write_kavach_dir(self, owner: tuple[int, int] | None) -> None:
        # 0711: the sandbox reaches its files by name; nobody else can list the random
        # names of the status FIFOs created here. As root on a tmpfs of its own, so the
        # sandbox's mountinfo shows no host path for it either.
        if _is_root():
            self._private_tmpfs(self.layout.kavach_dir, KAVACH_DIR_SIZE, "0711", "mount the kavach tmpfs", noexec=True)
        else:
            os.mkdir(self.layout.kavach_dir, 0o711)
        os.chmod(self.layout.kavach_dir, 0o711)  # noqa: S103
        shutil.copyfile(Path(__file__).with_name("launcher.py"), os.path.join(self.layout.kavach_dir, "launcher.py"))
        layers: list[Layer] = []
        # A runtime without Landlock (gVisor's sentry does not implement it) gets no Landlock
        # layer; _check_policy let that happen only with allow_degraded, and the probe then
        # lists Landlock as degraded.
        landlock = landlock_plan(self.policy) if self._driver.supports_landlock else None
        if landlock is not None:
            layers.append(Layer("oci", landlock))
        if self._inner is not None:
            layers.append(self._inner_layer(landlock))
        with open(os.path.join(self.layout.kavach_dir, "plan"), "w", encoding="utf-8") as stream:
            stream.write(render_plan(layers))
        for name in os.listdir(self.layout.kavach_dir):
            os.chmod(os.path.join(self.layout.kavach_dir, name), 0o644)

    def _inner_layer(self, landlock: LandlockLayer | None) -> Layer:
        """The composite inner layer: the policy's own seccomp program (a second, stacked filter,
        compiled by the Process backend's compiler) and a second Landlock domain."""
        from kavach.backends.process.seccomp import compile_filter

        layer = Layer(f"inner-{self._inner.value if self._inner else '?'}", landlock)
        program = compile_filter(self.policy.seccomp)
        if program:
            with open(os.path.join(self.layout.kavach_dir, "inner.bpf"), "wb") as stream:
                stream.write(program)
            layer.seccomp_bpf = f"{KAVACH_DIR_INSIDE}/inner.bpf"
        if layer.seccomp_bpf is None and layer.landlock is None:
            raise SandboxCreateError(
                "composite inner layer has nothing to apply: the policy asks for neither seccomp nor Landlock"
            )
        return layer

    def _check_bind_sources(self) -> None:
        """Every bind source exists, checked before anything is built (the runtime's own
        error for a missing one is a page of its log, and it leaves a cgroup to retry)."""
        from kavach.backends.process.plan import check_no_symlink

        fs = self.policy.filesystem
        for binds, name in ((fs.ro_binds, "filesystem.ro_binds"), (fs.rw_binds, "filesystem.rw_binds")):
            for bind in binds:
                if not os.path.exists(bind.source):
                    raise SandboxCreateError(f"{name}: source {bind.source} does not exist")
                # runc follows links in a source, and a sandbox may have planted one where
                # it wrote (the writable ones are also opened with RESOLVE_NO_SYMLINKS).
                check_no_symlink(bind.source, name)
        if self.spec.workdir_host is not None:
            if not os.path.isdir(self.spec.workdir_host):
                raise SandboxCreateError(f"workdir: host directory {self.spec.workdir_host} does not exist")
            check_no_symlink(os.path.abspath(self.spec.workdir_host), "workdir")

    async def _writable_binds(self) -> dict[str, str]:
        """Host source -> path to bind, for the workdir and rw_binds.

        As root they are idmapped copies (made here, attached under the bundle) so that the
        sandbox's root, an unprivileged host uid, can write what the host owner can.
        Unprivileged, root inside *is* the caller, so the sources are bound as they are.
        """
        sources = [b.source for b in self.policy.filesystem.rw_binds]
        if self.spec.workdir_host is not None:
            sources.insert(0, self.spec.workdir_host)
        # (Each source exists: _check_bind_sources ran before anything was built.)
        if not sources or not _is_root():
            return {}
        overrides: dict[str, str] = {}
        idmap_dir = os.path.join(self.layout.bundle_dir, "idmapped")
        os.mkdir(idmap_dir, 0o711)
        async with _userns_holder(self.spec.sandbox_id) as userns_fd:
            for index, source in enumerate(dict.fromkeys(sources)):
                host_path = os.path.join(idmap_dir, str(index))
                _idmapped_bind(source, host_path, userns_fd)
                self.layout.host_mounts.append(host_path)
                overrides[source] = host_path
        return overrides

    def _injected_files(self, owner: tuple[int, int] | None) -> list[Mount]:
        """Each injected file lives on a kavach tmpfs (never the host disk), bound read-only."""
        if not self.spec.files:
            return []
        if not _is_root():
            raise SandboxCreateError("injected files need a private tmpfs, which only root can mount here")
        files_dir = os.path.join(self.layout.bundle_dir, "files")
        self._private_tmpfs(files_dir, INJECTED_FILES_SIZE, "0711", "mount tmpfs for injected files", noexec=True)
        mounts = []
        for index, injected in enumerate(self.spec.files):
            host_path = os.path.join(files_dir, str(index))
            fd = os.open(host_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
            try:
                os.write(fd, injected.data)
                if owner is not None:
                    os.fchown(fd, *owner)
                os.fchmod(fd, injected.mode)
            finally:
                os.close(fd)
            mounts.append(ro_bind(host_path, injected.path, noexec=True))
        return mounts

    async def _make_proxy_listener(self, address: tuple[str, int]) -> socket.socket:
        """A TCP listener created *inside* the sandbox's network namespace, passed out over a unix socket."""
        path = os.path.join(self.layout.kavach_dir, "proxy.sock")
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as server:
            server.bind(path)
            # The sandbox's root is an unprivileged host uid; the socket is in a 0711 directory
            # only kavach and this sandbox can reach.
            os.chmod(path, 0o666)  # noqa: S103
            server.listen(1)
            server.setblocking(False)
            request = ExecRequest(
                argv=(
                    PYTHON_INSIDE,
                    "-I",
                    "-S",
                    LAUNCHER_INSIDE,
                    "listen",
                    address[0],
                    str(address[1]),
                    f"{KAVACH_DIR_INSIDE}/proxy.sock",
                ),
                timeout_ms=int(RUNTIME_TIMEOUT_S * 1000),
            )
            process = await self._start(request, streaming=False, launcher=False)
            loop = asyncio.get_running_loop()
            accept = asyncio.create_task(loop.sock_accept(server))
            finished = asyncio.create_task(process.wait())
            await asyncio.wait({accept, finished}, timeout=RUNTIME_TIMEOUT_S, return_when=asyncio.FIRST_COMPLETED)
            if not accept.done():
                accept.cancel()
                result = await finished
                raise SandboxCreateError(
                    f"proxy listener was not handed over: {result.stderr.decode(errors='replace').strip()}"
                )
            conn, _ = accept.result()
            with conn:
                self._check_peer_is_sandbox(conn)
                conn.setblocking(True)
                conn.settimeout(RUNTIME_TIMEOUT_S)
                _msg, fds, _flags, _addr = socket.recv_fds(conn, 16, 1)
                conn.sendall(b"k")
            result = await finished
        os.unlink(path)
        if result.exit_code != 0 or len(fds) != 1:
            for fd in fds:
                os.close(fd)
            raise SandboxCreateError(
                f"proxy listener failed inside the sandbox: {result.stderr.decode(errors='replace').strip()}"
            )
        listener = socket.socket(fileno=fds[0])
        if listener.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN) != 1 or listener.getsockname()[:2] != address:
            listener.close()
            raise SandboxCreateError("the handed-over proxy socket is not a listener on the requested address")
        return listener

    def _check_peer_is_sandbox(self, conn: socket.socket) -> None:
        """Only a process of this sandbox may hand over the listener.

        The unix socket's path is reachable by anyone who can guess it (the bundle is 0711);
        a host process that connected first could otherwise pass its own socket and be
        served by the egress proxy, credentials included.
        """
        creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        pid, _uid, _gid = struct.unpack("3i", creds)
        try:
            peer_ns = os.readlink(f"/proc/{pid}/ns/pid")
        except OSError:
            peer_ns = ""
        if peer_ns != self._init_pidns:
            raise SandboxCreateError(f"proxy listener hand-over came from pid {pid}, not from this sandbox")

    # -- enforcement -------------------------------------------------------------------------

    async def _probe_enforcement(self, rootfs_kind: str) -> Enforcement:
        policy = self.policy
        assert self._init_pid is not None
        argv: tuple[str, ...] = ("/bin/sh", "-c", PROBE_SCRIPT)
        if self._launcher_needed:
            argv = (PYTHON_INSIDE, "-I", "-S", LAUNCHER_INSIDE, "exec", PLAN_INSIDE, "--announce", "--", *argv)
        result = await self._start(
            ExecRequest(
                argv=argv, env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin"}, timeout_ms=int(RUNTIME_TIMEOUT_S * 1000)
            ),
            streaming=False,
            launcher=False,
        )
        raw = await result.wait()
        if raw.exit_code != 0:
            raise SandboxCreateError(
                f"enforcement probe failed inside the sandbox (exit {raw.exit_code}): "
                f"{raw.stderr.decode(errors='replace').strip()}"
            )
        facts = parse_probe(raw.stdout.decode(errors="replace"))
        announce = parse_announce(raw.stderr.decode(errors="replace"))
        from kavach.backends.process.namespaces import namespace_inodes

        inside_ns = namespace_inodes(self._init_pid)
        host_ns = namespace_inodes("self")
        limits = (
            cgroup_limits(self._cgroup_dirs)
            if self._own_cgroup
            else {"memory": None, "pids": None, "cpu_quota_us": None}
        )
        seccomp_spec = build_spec(policy.seccomp)
        filters = int(facts.get("Seccomp_filters", "0") or 0)
        outer_filters = 1 if seccomp_spec is not None else 0
        seen: dict[Control, bool] = {}
        if seccomp_spec is not None:
            seen[Control.SECCOMP] = facts.get("Seccomp") == "2" and filters >= outer_filters
        if policy.network.mode is not NetworkMode.HOST:
            seen[Control.NETWORK_ISOLATED] = inside_ns.get("net") != host_ns.get("net") and facts.get(
                "net_ifaces", ""
            ).split() == ["lo"]
        if policy.filesystem.read_only_root:
            seen[Control.READ_ONLY_ROOT] = facts.get("root_opts", "").split(",")[0] == "ro"
        r = policy.resources
        if r.memory is not None or r.pids is not None or r.cpus is not None:
            seen[Control.RESOURCE_LIMITS] = (
                (r.memory is None or limits["memory"] == r.memory)
                and (r.pids is None or limits["pids"] == r.pids)
                and (r.cpus is None or limits["cpu_quota_us"] == cpu_quota_us(r.cpus))
            )
        landlock_seen = int(announce.get("landlock_domains", 0)) >= 1 and (
            facts.get("root_listing") == "denied" or _root_listing_allowed_by_rules(policy)
        )
        if policy.landlock.enabled:
            seen[Control.LANDLOCK] = landlock_seen
        baseline_ok = facts.get("NoNewPrivs") == "1" and int(facts.get("CapEff", "1"), 16) == 0
        if not baseline_ok:
            raise SandboxCreateError(
                f"the sandbox runs with privileges: NoNewPrivs={facts.get('NoNewPrivs')} CapEff={facts.get('CapEff')}"
            )
        # The probe's shell comes from the rootfs, which may be an untrusted image: what it
        # reports must agree with what the host sees of the container's init, which the
        # runtime started with the same seccomp filter, capabilities and no_new_privs.
        host_view = _status_fields(self._init_pid)
        disagreement = [
            key
            for key, inside in (
                ("NoNewPrivs", facts.get("NoNewPrivs")),
                ("CapEff", facts.get("CapEff")),
                ("Seccomp", facts.get("Seccomp")),
            )
            if host_view.get(key) != inside
        ]
        if int(host_view.get("Seccomp_filters", "0")) < outer_filters:
            disagreement.append("Seccomp_filters")
        if disagreement:
            raise SandboxCreateError(
                f"the probe's report disagrees with the host's view of the sandbox init on {', '.join(disagreement)}"
            )
        missing = [c.value for c, ok in seen.items() if not ok]
        if missing and not policy.allow_degraded:
            raise SandboxCreateError(
                f"the OCI sandbox does not enforce {', '.join(missing)} (probe: {json.dumps(facts, sort_keys=True)})"
            )
        degraded = [self._degraded_limits(policy) if m == Control.RESOURCE_LIMITS.value else m for m in missing]
        details: dict[str, Any] = {
            "runtime": self.runtime.name.value,
            "runtime_version": self.runtime.version,
            "cgroup_mode": cgroup_mode().value,
            "rootfs": rootfs_kind,
            "container_id": self.container_id,
            "namespaces": {k: v for k, v in inside_ns.items() if v != host_ns.get(k)},
            "uid_map": facts.get("uid_map"),
            "CapEff": facts.get("CapEff"),
            "NoNewPrivs": facts.get("NoNewPrivs"),
            "Seccomp": facts.get("Seccomp"),
            "Seccomp_filters": filters,
            "root_opts": facts.get("root_opts"),
            "net_ifaces": facts.get("net_ifaces"),
            "cgroup_limits": limits,
        }
        if self._nproc is not None:
            details["rlimit_nproc"] = self._nproc
        if announce:
            details["launcher"] = announce
        inner = None
        if self._inner is not None:
            inner = self._inner_enforcement(announce, filters, outer_filters, facts)
        return Enforcement(
            self.backend,
            frozenset(c for c, ok in seen.items() if ok),
            verified=True,
            details=details,
            degraded=tuple(degraded),
            inner=inner,
        )

    def _degraded_limits(self, policy: SandboxPolicy) -> str:
        """The ``degraded`` entry for limits without a cgroup, once RLIMIT_NPROC is checked."""
        if self._nproc is None:
            return Control.RESOURCE_LIMITS.value
        assert self._init_pid is not None
        # Read from the host: the init's limit (each exec's process object carries the same).
        seen = _max_processes(self._init_pid)
        if seen != self._nproc:
            raise SandboxCreateError(f"RLIMIT_NPROC {self._nproc} was asked but the sandbox init has {seen}")
        r = policy.resources
        unlimited = [name for name, value in (("memory", r.memory), ("CPU share", r.cpus)) if value is not None]
        parts = [f"pids by RLIMIT_NPROC {self._nproc}"]
        if unlimited:
            parts.append(f"{', '.join(unlimited)} not limited")
        return f"resource_limits (no cgroup: rootless on cgroup v1; {'; '.join(parts)})"

    def _inner_enforcement(
        self, announce: Mapping[str, Any], filters: int, outer_filters: int, facts: Mapping[str, str]
    ) -> Enforcement:
        """The inner layer counts a control only when seen from inside: one more seccomp
        filter stacked on the runtime's, and a second Landlock domain that denies the probe."""
        assert self._inner is not None
        controls: set[Control] = set()
        inner_seccomp = build_spec(self.policy.seccomp) is not None
        if inner_seccomp and int(announce.get("seccomp_loaded", 0)) >= 1 and filters >= outer_filters + 1:
            controls.add(Control.SECCOMP)
        expected_domains = 2 if self.policy.landlock.enabled else 0
        if (
            self.policy.landlock.enabled
            and int(announce.get("landlock_domains", 0)) >= expected_domains
            and (facts.get("root_listing") == "denied" or _root_listing_allowed_by_rules(self.policy))
        ):
            controls.add(Control.LANDLOCK)
        asked = {Control.SECCOMP} if inner_seccomp else set()
        if self.policy.landlock.enabled:
            asked.add(Control.LANDLOCK)
        verified = bool(asked) and asked <= controls
        if not verified and not self.policy.allow_degraded:
            raise SandboxCreateError(
                f"composite inner layer ({self._inner.value}) was not verified from inside: "
                f"seccomp filters {filters}, launcher {dict(announce)}"
            )
        return Enforcement(
            self._inner,
            frozenset(controls),
            verified=verified,
            details={"applied_by": "kavach launcher inside the OCI container", "seccomp_filters": filters},
            degraded=tuple(c.value for c in asked - controls),
        )

    def enforcement(self) -> Enforcement:
        """What the probe saw (see the module docstring)."""
        if self._enforcement is None:
            raise ExecError("the sandbox was not started")
        return self._enforcement

    # -- exec --------------------------------------------------------------------------------

    async def _start(self, request: ExecRequest, *, streaming: bool, launcher: bool) -> OciProcess:
        if self._destroyed or self._stopped:
            raise ExecError(f"the sandbox was {'destroyed' if self._destroyed else 'stopped'}")
        argv = tuple(request.argv)
        if not argv:
            raise ExecError("empty command")
        if launcher and self._launcher_needed:
            argv = (PYTHON_INSIDE, "-I", "-S", LAUNCHER_INSIDE, "exec", PLAN_INSIDE, "--", *argv)
        self._exec_counter += 1
        cwd = request.cwd or self.policy.filesystem.workdir
        # The wrapper is a POSIX shell: it would drop environment names that are not shell
        # identifiers and rewrite PWD. Such a request runs without it (plain attached exec).
        wrapped = self._has_sh and "PWD" not in request.env and all(_ENV_NAME.fullmatch(k) for k in request.env)
        if wrapped:
            argv = ("/bin/sh", "-c", STDIO_WRAPPER, "kavach", *argv)
        process = json.dumps(build_process(self.policy, argv, dict(request.env), cwd, self._nproc)).encode()
        # The process object holds the request's environment, which may carry secrets: it
        # goes to the runtime through a memfd (read as /proc/self/fd/N), never a file on disk.
        # It is moved above fd 9 so the fd shuffle below (3, 4, 5) cannot clobber it.
        raw_memfd = os.memfd_create(f"kavach-exec-{self._exec_counter}", os.MFD_CLOEXEC)
        memfd = fcntl.fcntl(raw_memfd, fcntl.F_DUPFD_CLOEXEC, 10)
        os.close(raw_memfd)
        runtime_argv = self._runtime_argv("exec", "--process", f"/proc/self/fd/{memfd}", self.container_id)
        if wrapped:
            # Our stdio pipes also become the runtime's fds 3, 4, 5 and are passed into the
            # container (--preserve-fds 3), where STDIO_WRAPPER gives them to the command.
            runtime_argv = [
                "/bin/sh",
                "-c",
                'exec "$@" 3<&0 4>&1 5>&2 0</dev/null',
                "kavach-exec",
                *runtime_argv[:-4],
                "exec",
                "--preserve-fds",
                "3",
                *runtime_argv[-3:],
            ]
        try:
            os.write(memfd, process)
            os.lseek(memfd, 0, os.SEEK_SET)
            proc = await asyncio.create_subprocess_exec(
                *runtime_argv,
                stdin=asyncio.subprocess.PIPE if request.stdin is not None else asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
                pass_fds=(memfd,),
            )
        finally:
            os.close(memfd)
        return OciProcess(self, proc, request, streaming)

    async def exec(self, request: ExecRequest) -> RawResult:
        """Run to completion (timeout and caps enforced).

        If the caller stops waiting (the awaiting task is cancelled), the command and its
        descendants are killed; other commands of the sandbox are not touched.
        """
        process = await self._start(request, streaming=False, launcher=True)
        try:
            return await process.wait()
        except asyncio.CancelledError:
            try:
                await process.abandon()
            except ExecError as exc:
                # The freezer did not answer: the command runs on to its timeout, as before;
                # the caller still sees its cancellation, not this.
                _log.warning("cancelled exec in %s not killed: %s", self.container_id, exc)
            raise

    async def spawn(self, request: ExecRequest) -> RawProcess:
        """Start and stream."""
        return await self._start(request, streaming=True, launcher=True)

    async def kill_exec_tree(self, runtime_pid: int) -> None:
        """SIGKILL every descendant of one ``runtime exec`` process (its command and what the
        command started), frozen; the runtime process then exits by itself. A process that had
        already left the tree (a double-forked daemon, reparented to init) is not killed."""
        if self._destroyed or self._init_pid is None:
            return
        await self._kill_frozen(lambda: _descendants(runtime_pid))

    async def kill_all_but_init(self) -> None:
        """SIGKILL every process of the container except init, frozen; wait until they are gone."""
        if self._destroyed or self._init_pid is None:
            return
        await self._kill_frozen(lambda: [p for p in self._container_pids() if p != self._init_pid])
        # The SIGKILLs land on thaw; wait until init has reaped them so that "killed" means
        # gone (a caller counting processes right after sees only init).
        deadline = time.monotonic() + RUNTIME_TIMEOUT_S
        while True:
            survivors = [p for p in self._container_pids() if p != self._init_pid]
            if not survivors:
                return
            if time.monotonic() > deadline:
                raise ExecError(f"{len(survivors)} processes of the sandbox survived SIGKILL")
            for pid in survivors:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            await asyncio.sleep(0.005)

    async def _kill_frozen(self, targets: Callable[[], list[int]]) -> None:
        """Freeze, SIGKILL every pid ``targets()`` lists, thaw.

        Frozen, nothing can fork between listing and killing; the SIGKILLs are delivered
        when the cgroup is thawed. Without a freezer (rootless) it lists and kills three times.
        """
        frozen = True
        try:
            await self._set_frozen(True)
        except ExecError:
            frozen = False
        try:
            for _ in range(1 if frozen else 3):
                for pid in targets():
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
        finally:
            if frozen:
                await self._set_frozen(False)

    def _pidns_members(self) -> list[int]:
        members = []
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                with contextlib.suppress(OSError):
                    if os.readlink(f"/proc/{entry}/ns/pid") == self._init_pidns:
                        members.append(int(entry))
        return members

    def _container_pids(self) -> list[int]:
        assert self._init_pid is not None
        if not self._own_cgroup:
            return self._pidns_members()
        paths = self._cgroup_dirs
        for candidate in (
            f"/sys/fs/cgroup/pids{paths.get('pids', '')}/cgroup.procs" if "pids" in paths else "",
            f"/sys/fs/cgroup/freezer{paths.get('freezer', '')}/cgroup.procs" if "freezer" in paths else "",
            f"/sys/fs/cgroup{paths['']}/cgroup.procs" if "" in paths and cgroup_mode() is CgroupMode.UNIFIED else "",
        ):
            if candidate:
                with contextlib.suppress(OSError):
                    return [int(p) for p in Path(candidate).read_text(encoding="ascii").split()]
        raise ExecError("cannot list the sandbox's processes: no pids, freezer or unified cgroup")

    def _freezer(self) -> tuple[str, str, str, str] | None:
        """(file to write, file to read, frozen value, thawed value) of the container's freezer."""
        if self._init_pid is None or not self._own_cgroup:
            return None
        paths = self._cgroup_dirs
        if "freezer" in paths:
            state = f"/sys/fs/cgroup/freezer{paths['freezer']}/freezer.state"
            return state, state, "FROZEN", "THAWED"
        if "" in paths and cgroup_mode() is CgroupMode.UNIFIED:
            base = f"/sys/fs/cgroup{paths['']}"
            return f"{base}/cgroup.freeze", f"{base}/cgroup.events", "1", "0"
        return None

    async def _set_frozen(self, frozen: bool) -> None:
        """Freeze or thaw through the cgroup files, waiting until the kernel reports it.

        runc 1.1's own ``pause`` gives up after a few milliseconds ("unable to freeze") when
        busy processes take longer to reach the freezer on a loaded host; this waits up to
        :data:`RUNTIME_TIMEOUT_S`, re-requesting the state as runc does.
        """
        freezer = self._freezer()
        if freezer is None:
            # No cgroup of our own: stop (or continue) every process of the pid namespace.
            signum = signal.SIGSTOP if frozen else signal.SIGCONT
            for _ in range(3 if frozen else 1):  # again, for anything forked meanwhile
                for pid in self._pidns_members():
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signum)
            return
        write_path, read_path, frozen_value, thawed_value = freezer
        wanted = frozen_value if frozen else thawed_value
        deadline = time.monotonic() + RUNTIME_TIMEOUT_S
        while True:
            try:
                Path(write_path).write_text(wanted, encoding="ascii")
                current = Path(read_path).read_text(encoding="ascii")
            except OSError as exc:
                raise ExecError(f"freezer {write_path}: {exc.strerror}") from None
            if read_path.endswith("cgroup.events"):
                reached = f"frozen {wanted}" in current
            else:
                reached = current.strip() == wanted
            if reached:
                return
            if time.monotonic() > deadline:
                raise ExecError(f"the sandbox did not reach {wanted} in {RUNTIME_TIMEOUT_S:.0f}s")
            await asyncio.sleep(0.005)

    def oom_kills(self) -> int:
        """How many times the kernel's OOM killer fired in the container's memory cgroup."""
        if self._init_pid is None or not self._own_cgroup:
            return 0
        paths = self._cgroup_dirs
        if "memory" in paths:
            source, key = f"/sys/fs/cgroup/memory{paths['memory']}/memory.oom_control", "oom_kill"
        elif "" in paths and cgroup_mode() is CgroupMode.UNIFIED:
            source, key = f"/sys/fs/cgroup{paths['']}/memory.events", "oom_kill"
        else:
            return 0
        with contextlib.suppress(OSError, ValueError):
            for line in Path(source).read_text(encoding="ascii").splitlines():
                name, _, value = line.partition(" ")
                if name == key:
                    return int(value)
        return 0

    def live_pids(self) -> int | None:
        """Processes in the container's cgroup."""
        if self._init_pid is None or self._destroyed:
            return None
        try:
            return len(self._container_pids())
        except (OSError, ExecError):
            return None

    async def read_file(self, path: str, max_bytes: int) -> bytes:
        """``cat`` inside the sandbox (its view, its restrictions): never a host-side path walk."""
        result = await self.exec(
            ExecRequest(
                argv=("cat", "--", path), env={"PATH": "/usr/bin:/bin"}, stdout_cap=max_bytes + 1, timeout_ms=30_000
            )
        )
        if result.exit_code != 0:
            raise ExecError(f"{path}: {result.stderr.decode(errors='replace').strip() or 'cannot read'}")
        if len(result.stdout) > max_bytes:
            raise ExecError(f"{path}: larger than {max_bytes} bytes")
        return result.stdout

    def take_proxy_listener(self) -> socket.socket | None:
        """The listener made inside for ``LaunchSpec.proxy_listen`` (once)."""
        listener, self._proxy_listener = self._proxy_listener, None
        return listener

    # -- lifecycle ---------------------------------------------------------------------------

    async def pause(self) -> None:
        """Freeze every process (cgroup freezer)."""
        await self._set_frozen(True)

    async def resume(self) -> None:
        """Thaw."""
        await self._set_frozen(False)

    async def stop(self) -> None:
        """Kill every process, init included."""
        if self._init_pid is None or self._destroyed:
            return
        self._stopped = True
        await self._runtime("kill", "--all", self.container_id, "KILL", check=False)
        # A frozen container cannot die; thaw it so the SIGKILLs are delivered.
        with contextlib.suppress(ExecError):
            await self._set_frozen(False)
        deadline = time.monotonic() + RUNTIME_TIMEOUT_S
        while time.monotonic() < deadline:
            state = await self._runtime("state", self.container_id, check=False)
            if not state or json.loads(state).get("status") == "stopped":
                return
            await asyncio.sleep(0.02)
        raise ExecError(f"container {self.container_id} did not stop")

    async def _kill_init(self) -> None:
        """SIGKILL the container's init through a pidfd and wait for it to exit.

        When PID 1 of a pid namespace dies the kernel kills every other process in it, so this
        empties the container; ``runtime delete --force`` on a running container does the same
        but polls in 100 ms steps. The pidfd makes the kill immune to pid reuse. Any failure
        here only means the slower ``delete --force`` path does the work.
        """
        if self._init_pid is None:
            return
        try:
            pidfd = os.pidfd_open(self._init_pid)
        except OSError:
            return  # already gone
        try:
            # The pid may have been reused since init exited: kill only our container's init.
            if os.readlink(f"/proc/{self._init_pid}/ns/pid") != self._init_pidns:
                return
            signal.pidfd_send_signal(pidfd, signal.SIGKILL)
            loop = asyncio.get_running_loop()
            exited: asyncio.Future[None] = loop.create_future()

            def on_exit() -> None:
                if not exited.done():
                    exited.set_result(None)

            loop.add_reader(pidfd, on_exit)
            try:
                await asyncio.wait_for(exited, RUNTIME_TIMEOUT_S)
            finally:
                loop.remove_reader(pidfd)
        except (OSError, TimeoutError):
            return
        finally:
            os.close(pidfd)

    async def destroy(self) -> None:
        """Delete the container and its bundle; check that no runtime state is left. Idempotent."""
        if self._destroyed:
            return
        self._destroyed = True
        if not self._owns_bundle:
            return  # creation stopped before anything of this instance existed
        errors: list[str] = []
        if os.path.exists(os.path.join(self.state_dir, self.container_id)):
            with contextlib.suppress(ExecError):
                await self._set_frozen(False)
            await self._kill_init()
            try:
                await self._runtime("delete", "--force", self.container_id)
            except ExecError as exc:
                errors.append(str(exc))
        if self._proxy_listener is not None:
            self._proxy_listener.close()
            self._proxy_listener = None
        errors += _teardown_layout(self.layout)
        if self._lifeline is not None:
            os.close(self._lifeline)  # after the delete: init is gone already, or goes now
            self._lifeline = None
        if os.path.exists(os.path.join(self.state_dir, self.container_id)):
            errors.append(f"runtime state {os.path.join(self.state_dir, self.container_id)} is left over")
        if errors:
            raise ExecError("destroy left state behind: " + "; ".join(errors))


def _descendants(pid: int) -> list[int]:
    """Every descendant of ``pid`` (the children of each of its threads, recursively)."""
    found: list[int] = []
    pending = [pid]
    while pending:
        parent = pending.pop()
        try:
            tasks = os.listdir(f"/proc/{parent}/task")
        except OSError:
            continue  # gone meanwhile
        for task in tasks:
            with contextlib.suppress(OSError):
                children = [int(c) for c in Path(f"/proc/{parent}/task/{task}/children").read_text().split()]
                found.extend(children)
                pending.extend(children)
    return found


def _teardown_layout(layout: _Layout) -> list[str]:
    from kavach.backends.process import _libc

    errors = []
    for mount_point in reversed(layout.host_mounts):
        try:
            _libc.umount2(mount_point, _libc.MNT_DETACH, f"unmount {mount_point}")
        except OSError as exc:
            errors.append(str(exc))
    layout.host_mounts.clear()
    if os.path.lexists(layout.bundle_dir) and not errors:
        try:
            shutil.rmtree(layout.bundle_dir)
        except OSError as exc:
            errors.append(f"remove {layout.bundle_dir}: {exc.strerror}")
    return errors


# -- idmapped writable binds ----------------------------------------------------------------------


@contextlib.asynccontextmanager
async def _userns_holder(sandbox_id: str) -> AsyncIterator[int]:
    """An fd of a user namespace with the sandbox's id mapping (for idmapped mounts).

    A short-lived ``unshare --user`` child creates it; the maps are written from here with
    the Process backend's :func:`write_id_maps`, so both backends map the same ids.
    """
    from kavach.backends.process.namespaces import write_id_maps

    unshare = shutil.which("unshare")
    if unshare is None:
        raise SandboxCreateError("unshare (util-linux) not found: needed for idmapped writable binds")
    proc = await asyncio.create_subprocess_exec(
        unshare,
        "--user",
        "--",
        "sleep",
        "30",
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    fd = -1
    try:
        own = os.readlink("/proc/self/ns/user")
        deadline = time.monotonic() + 5
        # unshare(1) calls unshare(2) and then execs sleep: wait until the child's user
        # namespace differs from ours before writing maps into it.
        while os.readlink(f"/proc/{proc.pid}/ns/user") == own:
            if time.monotonic() > deadline or proc.returncode is not None:
                raise SandboxCreateError("unshare --user did not create a user namespace")
            await asyncio.sleep(0.002)
        write_id_maps(proc.pid, sandbox_id)
        fd = os.open(f"/proc/{proc.pid}/ns/user", os.O_RDONLY | os.O_CLOEXEC)
        yield fd
    finally:
        if fd >= 0:
            os.close(fd)
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        await proc.wait()


def _idmapped_bind(source: str, host_path: str, userns_fd: int) -> None:
    """Attach an idmapped clone of ``source`` at ``host_path`` (a dir or file created here)."""
    from kavach.backends.process import _libc
    from kavach.backends.process.namespaces import idmapped_tree

    if os.path.isdir(source):
        os.mkdir(host_path, 0o755)
    else:
        os.close(os.open(host_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644))
    tree = idmapped_tree(source, userns_fd, writable=True)
    try:
        _libc.move_mount(tree, _libc.AT_FDCWD, host_path, f"attach idmapped {source}")
    finally:
        os.close(tree)


# -- drivers -------------------------------------------------------------------------------------


# When this process last swept each bundle directory (OciDriver._sweep_if_due), how often a
# long-lived process sweeps again (what an owner killed after the last sweep left), and
# the runtimes whose leftovers a sweep removes.
_SWEPT_AT: dict[str, float] = {}
SWEEP_EVERY_S = 600.0
_SWEPT_RUNTIMES = frozenset({RuntimeName.RUNC, RuntimeName.CRUN})


class OciDriver(Driver):
    """runc (or crun) containers. ``rootfs`` picks the root filesystem source (host layout by default)."""

    backend = Backend.OCI
    preferred: tuple[RuntimeName, ...] = (RuntimeName.RUNC, RuntimeName.CRUN)
    supports_landlock = True  # the launcher's Landlock calls reach the host kernel

    def __init__(
        self,
        rootfs: images.RootfsSource | None = None,
        *,
        runtime: RuntimeName | None = None,
        state_base: str | None = None,
        bundle_base: str | None = None,
    ) -> None:
        if state_base is None:
            state_base = DEFAULT_STATE_ROOT if _is_root() else _user_state_root()
        self.rootfs: images.RootfsSource = rootfs if rootfs is not None else images.HostRootfs()
        self.runtime_choice = (runtime,) if runtime is not None else self.preferred
        self.state_base = state_base
        self.bundle_base = bundle_base or os.path.join(state_base, "bundles")
        self._cached: tuple[float, RuntimeInfo] | None = None

    def runtime_args(self, policy: SandboxPolicy) -> tuple[str, ...]:
        """Global flags passed to every runtime call (none for runc/crun)."""
        return ()

    def _choose(self) -> tuple[RuntimeInfo | None, list[RuntimeInfo]]:
        return choose_runtime(self.runtime_choice)

    def _runtime_for_start(self) -> tuple[RuntimeInfo | None, list[RuntimeInfo]]:
        # A start must not pay for `runtime --version` every time; a usable answer is reused
        # for RUNTIME_CACHE_S (a runtime removed meanwhile makes the start fail loudly anyway).
        now = time.monotonic()
        if self._cached is not None and now - self._cached[0] < RUNTIME_CACHE_S:
            return self._cached[1], []
        info, results = self._choose()
        if info is not None:
            self._cached = (now, info)
        return info, results

    def probe(self) -> ProbeResult:
        """Available when a preferred runtime is usable; the reason names every rejected one."""
        try:
            # Every candidate is probed (not just up to the first usable) so that the reason
            # also says why the others cannot be used, e.g. crun on a cgroup v1 hybrid host.
            results = [probe_runtime(name) for name in self.runtime_choice]
        except OSError as exc:  # never raise from a probe
            return ProbeResult(self.backend, False, f"runtime probe failed: {exc}")
        info = next((r for r in results if r.usable), None)
        if info is None:
            return ProbeResult(self.backend, False, explain(results))
        rejected = [r for r in results if not r.usable and r.path is not None]
        reason = info.reason + (f"; not used: {explain(rejected)}" if rejected else "")
        if _rootless_without_cgroup():
            # Usable, but a policy's resource limits need allow_degraded here (see
            # _check_policy); the flag keeps auto-selection from picking OCI for limits.
            return ProbeResult(
                self.backend,
                True,
                f"{reason}; rootless on this cgroup {cgroup_mode().value} host without a delegated cgroup: "
                "resource limits only with allow_degraded (then pids by RLIMIT_NPROC, memory and CPU share not "
                f"limited, not scored), or run as root, or as root run `kavach cgroups delegate {_user_name()}`",
                version=info.version,
                resource_limits=False,
            )
        return ProbeResult(self.backend, True, reason, version=info.version)

    def _check_policy(self, spec: LaunchSpec) -> None:
        policy = spec.policy
        r = policy.resources
        limits = r.memory is not None or r.pids is not None or r.cpus is not None
        if not _is_root() and limits and not policy.allow_degraded and delegated_v1_path() is None:
            if cgroup_mode() is CgroupMode.UNIFIED:
                missing, remedy = "an unprivileged caller gets no cgroup of its own here", "run as root"
            else:
                missing = f"no cgroup v1 subtree is delegated to uid {os.geteuid()} in every hierarchy"
                remedy = f"as root run `kavach cgroups delegate {_user_name()}`, or run as root"
            raise SandboxCreateError(
                f"resource limits need a cgroup for the OCI backend ({missing}); {remedy}, or set allow_degraded "
                "in the policy (kavach run --allow-degraded) to run without the cgroup (pids then by RLIMIT_NPROC, "
                "memory and CPU share not limited; listed as degraded, not scored)"
            )
        if spec.inner_backend is not None and spec.inner_backend is not Backend.PROCESS:
            raise SandboxCreateError(
                f"an OCI sandbox can run only kavach's process layer inside, not {spec.inner_backend.value}"
            )

    async def _sweep_if_due(self, info: RuntimeInfo) -> None:
        """Remove dead owners' leftovers from the bundle directory: on the first start per
        bundle directory in this process, then on the first start after ``SWEEP_EVERY_S``.

        runc and crun only: gVisor's runsc is not on this machine to test the sweep with.
        """
        if info.name not in _SWEPT_RUNTIMES or info.path is None:
            return
        now = time.monotonic()
        last = _SWEPT_AT.get(self.bundle_base)
        if last is not None and now - last < SWEEP_EVERY_S:
            return
        # Marked before the first await: concurrent starts do not sweep the same directory twice.
        _SWEPT_AT[self.bundle_base] = now
        state_dir = state_root(info.name, self.state_base)
        await sweep_logged(self.bundle_base, state_dir, info.name.value, [info.path, "--root", state_dir])

    async def start(self, spec: LaunchSpec) -> Instance:
        """Create the container (see the module docstring); on any failure nothing is left."""
        info, results = self._runtime_for_start()
        if info is None:
            raise SandboxCreateError(f"no usable OCI runtime: {explain(results)}")
        self._check_policy(spec)
        await self._sweep_if_due(info)
        instance = OciInstance(self, spec, info)
        try:
            await instance.create()
        except BaseException:
            with contextlib.suppress(ExecError):
                await instance.destroy()
            raise
        return instance


class GVisorDriver(OciDriver):
    """The same bundle run by gVisor's ``runsc`` (a user-space kernel between the sandbox and Linux).

    ``platform`` is ``systrap`` (no hardware needs), ``ptrace`` or ``kvm``. Network: ``none``
    for policy ``off``, ``host`` for ``host``; the egress-proxy mode needs a host unix socket
    handed into the sentry and is refused. The sentry does not implement Landlock, so a policy
    asking for it is refused unless it allows degrading (then it is listed as degraded).
    The policy's seccomp profile is enforced by the sentry (``--oci-seccomp``).
    """

    backend = Backend.GVISOR
    preferred = (RuntimeName.RUNSC,)
    supports_landlock = False

    def __init__(
        self,
        rootfs: images.RootfsSource | None = None,
        *,
        platform: str = "systrap",
        state_base: str | None = None,
        bundle_base: str | None = None,
    ) -> None:
        super().__init__(rootfs, runtime=RuntimeName.RUNSC, state_base=state_base, bundle_base=bundle_base)
        if platform not in ("systrap", "ptrace", "kvm"):
            raise SandboxCreateError(f"unknown gVisor platform {platform!r}; use systrap, ptrace or kvm")
        self.platform = platform

    def runtime_args(self, policy: SandboxPolicy) -> tuple[str, ...]:
        """runsc global flags for ``policy`` (see :func:`runsc_flags`)."""
        return runsc_flags(self.platform, rootless=not _is_root(), network=policy.network.mode)

    def _check_policy(self, spec: LaunchSpec) -> None:
        super()._check_policy(spec)
        policy = spec.policy
        if policy.network.mode is NetworkMode.PROXY or spec.proxy_listen is not None:
            raise SandboxCreateError("gVisor with the egress proxy is not supported by kavach yet; use network off")
        if spec.inner_backend is not None:
            raise SandboxCreateError("a composite inner layer needs Landlock/seccomp syscalls gVisor does not provide")
        if policy.landlock.enabled and not policy.allow_degraded:
            raise SandboxCreateError("gVisor does not implement Landlock; disable it or allow degrading")


def runsc_flags(platform: str, *, rootless: bool, network: NetworkMode) -> tuple[str, ...]:
    """The global ``runsc`` flags kavach passes (before the subcommand).

    ``--oci-seccomp`` makes the sentry enforce the bundle's ``linux.seccomp`` (runsc ignores
    it by default, since the sentry itself is the syscall boundary).
    """
    flags = [f"--platform={platform}", "--oci-seccomp"]
    if rootless:
        flags.append("--rootless")
    flags.append("--network=host" if network is NetworkMode.HOST else "--network=none")
    return tuple(flags)


__all__ = [
    "BUNDLE_BASE",
    "GVisorDriver",
    "OciDriver",
    "OciInstance",
    "OciProcess",
    "cgroup_limits",
    "container_id",
    "landlock_plan",
    "parse_announce",
    "parse_probe",
    "runsc_flags",
]
