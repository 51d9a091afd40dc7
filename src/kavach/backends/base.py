"""The driver interface every isolation backend implements.

Shape (like an httpx transport): a :class:`Driver` probes the host and starts an
:class:`Instance`; the instance runs commands and reports its :class:`Enforcement`.
Drivers know nothing about scanning, guards, threat or audit: :class:`kavach.Sandbox`
composes those around them.
"""

from __future__ import annotations

import abc
import os
import resource
import socket
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field

from kavach.backends.names import Backend
from kavach.errors import ExecError, SandboxCreateError
from kavach.policy import SandboxPolicy
from kavach.scoring import Enforcement


@dataclass(frozen=True)
class ProbeResult:
    """Whether a backend can run here, and why (binary found, device present, kernel feature ...)."""

    backend: Backend
    available: bool
    reason: str
    version: str | None = None
    implemented: bool = True
    # False for backends that run only their own module format (WASM), so auto-selection
    # never picks them to run an ordinary Linux command.
    runs_linux_commands: bool = True
    # False when this caller gets no cgroup from the backend here (rootless runc on a cgroup
    # v1 host): a policy's resource limits then run only with allow_degraded, unscored, and
    # auto-selection does not pick the backend for limits it cannot apply.
    resource_limits: bool = True

    @property
    def usable(self) -> bool:
        """Implemented and available on this host."""
        return self.implemented and self.available


@dataclass(frozen=True)
class InjectedFile:
    """A file placed inside the sandbox on a tmpfs (never on the host disk), e.g. a secret."""

    path: str
    data: bytes = field(repr=False)
    mode: int = 0o400


@dataclass(frozen=True)
class LaunchSpec:
    """Everything a driver needs to build one sandbox. ``policy`` is already merged and validated."""

    sandbox_id: str
    policy: SandboxPolicy
    env: Mapping[str, str] = field(default_factory=dict, repr=False)  # base env of every exec
    workdir_host: str | None = None  # host directory bound read-write at policy.filesystem.workdir
    inner_backend: Backend | None = None
    files: tuple[InjectedFile, ...] = ()
    hostname: str = "kavach"
    # With network mode "proxy": the loopback address (inside the sandbox's network
    # namespace) where the backend must create a listening TCP socket and hand it to the
    # host through Instance.take_proxy_listener(). Creating it inside and passing the fd
    # out works unprivileged; setns() into the sandbox's netns from the host would not.
    proxy_listen: tuple[str, int] | None = None


@dataclass(frozen=True)
class ExecRequest:
    """One command to run. ``shell`` keeps the original string when the caller gave one."""

    argv: tuple[str, ...]
    env: Mapping[str, str] = field(default_factory=dict, repr=False)  # the complete environment
    stdin: bytes | None = field(default=None, repr=False)  # None = stdin closed (/dev/null)
    cwd: str | None = None
    timeout_ms: int | None = None
    stdout_cap: int = 16 * 1024 * 1024
    stderr_cap: int = 16 * 1024 * 1024
    shell: str | None = None

    def __post_init__(self) -> None:
        """Refuse what no kernel can pass to execve (NUL bytes, ``=`` in a variable name) and
        non-positive limits, naming the field: every backend gets checked input."""
        if not self.argv or not all(isinstance(a, str) and "\0" not in a for a in self.argv) or not self.argv[0]:
            raise ExecError("argv: must be a non-empty list of strings without NUL bytes")
        for name, value in self.env.items():
            if not isinstance(name, str) or not name or "=" in name or "\0" in name:
                raise ExecError(f"env: {name!r} is not a variable name (empty, or holds '=' or NUL)")
            if not isinstance(value, str) or "\0" in value:
                raise ExecError(f"env: the value of {name} must be a string without NUL bytes")
        if self.cwd is not None and (not isinstance(self.cwd, str) or not self.cwd.startswith("/") or "\0" in self.cwd):
            raise ExecError(f"cwd: must be an absolute path (got {self.cwd!r})")
        for field_name in ("timeout_ms", "stdout_cap", "stderr_cap"):
            value = getattr(self, field_name)
            if value is None and field_name == "timeout_ms":
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ExecError(f"{field_name}: must be a positive integer (got {value!r})")


@dataclass
class RawResult:
    """What a backend observed of one command, before the gate looked at it.

    ``exit_code`` is 128+N when the command was killed by signal N. ``reason`` explains an
    abnormal end ("wall-clock timeout", "fuel exhausted", "memory limit", "trap: ...").
    """

    exit_code: int
    stdout: bytes = b""
    stderr: bytes = b""
    duration_ms: float = 0.0
    timed_out: bool = False
    stdout_truncated: bool = False
    stderr_truncated: bool = False
    reason: str | None = None


class RawProcess(abc.ABC):
    """A command started with :meth:`Instance.spawn`, streaming its output."""

    pid: int

    @abc.abstractmethod
    def chunks(self) -> AsyncIterator[tuple[str, bytes]]:
        """Yield ``("stdout" | "stderr", bytes)`` as output arrives, until both streams close."""

    @abc.abstractmethod
    async def wait(self) -> RawResult:
        """Wait for the exit. The result's stdout/stderr hold what :meth:`chunks` did not yield."""

    @abc.abstractmethod
    async def kill(self, signum: int = 9) -> None:
        """Send ``signum`` to the command (and, for SIGKILL, to everything it started)."""


class Instance(abc.ABC):
    """One running sandbox of a backend."""

    @abc.abstractmethod
    def enforcement(self) -> Enforcement:
        """What this sandbox actually enforces, verified from inside where the backend can."""

    @abc.abstractmethod
    async def exec(self, request: ExecRequest) -> RawResult:
        """Run a command to completion, enforcing the timeout and the output caps."""

    @abc.abstractmethod
    async def spawn(self, request: ExecRequest) -> RawProcess:
        """Start a command and return a handle that streams its output."""

    @abc.abstractmethod
    async def pause(self) -> None:
        """Freeze every process of the sandbox (cgroup freezer or SIGSTOP of all of them)."""

    @abc.abstractmethod
    async def resume(self) -> None:
        """Thaw what :meth:`pause` froze."""

    @abc.abstractmethod
    async def stop(self) -> None:
        """Kill every process; the sandbox can only be destroyed afterwards."""

    @abc.abstractmethod
    async def destroy(self) -> None:
        """Kill everything, unmount, remove cgroups and state. Idempotent."""

    @abc.abstractmethod
    async def read_file(self, path: str, max_bytes: int) -> bytes:
        """Bytes of ``path`` inside the sandbox (at most ``max_bytes``; more raises ExecError)."""

    def take_proxy_listener(self) -> socket.socket | None:
        """The listening socket created inside the sandbox for ``LaunchSpec.proxy_listen``.

        Returned once (ownership passes to the caller, the egress proxy); None when the
        spec asked for none. A backend that cannot provide it when asked fails in start().
        """
        return None

    def live_pids(self) -> int | None:
        """How many processes the sandbox has now, or None when the backend cannot tell."""
        return None


NR_OPEN_PATH = "/proc/sys/fs/nr_open"  # the kernel's ceiling for any RLIMIT_NOFILE


def check_open_files(policy: SandboxPolicy, *, user_namespace: bool = True) -> None:
    """Refuse ``resources.open_files`` above what the sandbox can be given.

    Raising a hard rlimit needs CAP_SYS_RESOURCE in the initial user namespace: a sandbox in
    its own user namespace (root caller or not) gets at most the caller's hard limit
    (``ulimit -Hn``); only a root caller without one may go up to ``fs.nr_open``. Above that
    the sandbox could not start, and the kernel's EPERM would not name the policy field.
    """
    limit = policy.resources.open_files
    if limit is None:
        return
    bounds: list[tuple[int, str]] = []
    try:
        with open(NR_OPEN_PATH, encoding="ascii") as f:
            bounds.append((int(f.read()), "this host's fs.nr_open"))
    except (OSError, ValueError):
        pass  # unknown here: the caller's hard limit below still applies, and setrlimit fails closed
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    if (user_namespace or os.geteuid() != 0) and hard != resource.RLIM_INFINITY:
        bounds.append((hard, "the caller's hard limit of open files (ulimit -Hn), which a sandbox cannot raise"))
    if bounds:
        bound, what = min(bounds)
        if limit > bound:
            raise SandboxCreateError(f"resources.open_files: {limit} is above {what} ({bound})")


class Driver(abc.ABC):
    """A backend: probes the host and starts instances."""

    backend: Backend

    @abc.abstractmethod
    def probe(self) -> ProbeResult:
        """Whether this backend can run here now. Must be cheap and must not raise."""

    @abc.abstractmethod
    async def start(self, spec: LaunchSpec) -> Instance:
        """Build a sandbox, fail closed: a control the policy asks for and the host cannot
        provide raises :class:`~kavach.errors.SandboxCreateError` unless ``policy.allow_degraded``
        (then the instance's enforcement lists it in ``degraded``)."""


__all__ = [
    "Driver",
    "ExecRequest",
    "InjectedFile",
    "Instance",
    "LaunchSpec",
    "ProbeResult",
    "RawProcess",
    "RawResult",
]
