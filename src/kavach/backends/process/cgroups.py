"""Per-sandbox cgroups: memory, pids and CPU limits, freezing, killing everything, OOM reporting.

cgroup v2 is used when the unified hierarchy offers the memory and pids controllers (cpu
too when a CPU limit is asked); otherwise cgroup v1 (memory, pids and freezer hierarchies,
plus cpu when a CPU limit is asked), as on hybrid hosts where the controllers are bound to
v1. Every sandbox gets one
cgroup named after it under a ``kavach`` parent, in every hierarchy used:

* v2: ``<unified>/kavach/<name>`` (for root), or ``<delegated subtree>/kavach/<name>``
  for an unprivileged caller with a delegated cgroup (see :func:`v2_parent`)
* v1: ``/sys/fs/cgroup/<controller>/kavach/<name>`` for each controller (root), or
  ``/sys/fs/cgroup/<controller>/kavach-users/<uid>/<name>`` for another uid, in the
  subtree root handed to it with :func:`delegate_v1` (``kavach cgroups delegate USER``):
  cgroup v1 has no delegation of its own

Swap is turned off for the sandbox wherever the kernel allows it (``memory.swap.max = 0``,
``memory.memsw.limit_in_bytes`` = the memory limit), so the memory limit is real.

Creating a cgroup needs write access to the hierarchy (root, or a delegated subtree);
without it :func:`create_cgroup` raises :class:`~kavach.errors.SandboxCreateError` saying so.

A caller killed before it destroyed its sandboxes (SIGKILL, the OOM killer, a power cut)
leaves their cgroups behind, empty once the processes died with the caller's sockets. The
first :func:`create_cgroup` of a process removes such leftovers of its own parent
(:func:`remove_stale_cgroups`).
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import pwd
import re
import signal
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Literal

from kavach.errors import SandboxCreateError
from kavach.policy import ResourceLimits

PARENT = "kavach"
USERS_PARENT = "kavach-users"  # v1: <mount>/kavach-users/<uid>, made for a uid by delegate_v1
V2_REQUIRED = frozenset({"memory", "pids"})
V2_CONTROLLERS = frozenset({"memory", "pids", "cpu"})  # cpu joins when available
V1_REQUIRED = ("memory", "pids", "freezer")  # cpu joins when a CPU limit is asked
CPU_PERIOD_US = 100_000
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
_POLL_S = 0.001
# A live sandbox's cgroup holds its init from a few milliseconds after the mkdir until
# destroy, so one that has been empty this long belongs to no sandbox.
STALE_AFTER_S = 60.0

logger = logging.getLogger(__name__)


class CgroupError(SandboxCreateError):
    """A cgroup step failed; ``step``, ``errno`` and ``path`` say where and why."""

    def __init__(self, step: str, err: int, path: str | os.PathLike[str] | None = None, detail: str = "") -> None:
        self.step = step
        self.errno = err
        self.path = None if path is None else str(path)
        name = errno.errorcode.get(err, str(err))
        where = f" {path}" if path is not None else ""
        extra = f": {detail}" if detail else ""
        super().__init__(f"cgroup {step}{where}: {name} ({os.strerror(err)}){extra}")


@dataclass(frozen=True)
class CgroupSupport:
    """Which cgroup version kavach would use here, with which controllers, and why.

    ``version`` is ``None`` when neither hierarchy is usable. ``writable`` says whether
    this process may create cgroups there (root or a delegated subtree).
    """

    version: Literal[1, 2] | None
    controllers: frozenset[str]
    reason: str
    writable: bool = False


@dataclass(frozen=True)
class _Mounts:
    v2: Path | None
    v1: Mapping[str, Path]
    # Every v1 hierarchy's mount point, named ones (name=systemd) and controllers kavach
    # does not use included: runc joins all of them, so a delegation covers all of them.
    v1_all: tuple[Path, ...] = ()


@lru_cache(maxsize=1)
def _mounts() -> _Mounts:
    v2: Path | None = None
    v1: dict[str, Path] = {}
    v1_all: set[Path] = set()
    with open("/proc/self/mountinfo", encoding="utf-8") as mountinfo:
        for line in mountinfo:
            fields = line.split()
            sep = fields.index("-")
            fstype, super_options = fields[sep + 1], fields[sep + 3]
            mount_point = Path(fields[4].replace("\\040", " "))
            if fstype == "cgroup2" and v2 is None:
                v2 = mount_point
            elif fstype == "cgroup":
                v1_all.add(mount_point)
                for option in super_options.split(","):
                    v1.setdefault(option, mount_point)
    known = ("memory", "pids", "freezer", "cpu", "cpuacct", "cpuset", "blkio", "devices", "hugetlb")
    return _Mounts(v2, {name: path for name, path in v1.items() if name in known}, tuple(sorted(v1_all)))


def cgroup_support() -> CgroupSupport:
    """Probe the host: cgroup v2 with memory/pids, else v1 with memory/pids/freezer, else none.

    The cpu controller is used when present (a CPU limit needs it). For an unprivileged
    caller, v2 means the delegated subtree it may write (see :func:`v2_parent`).
    """
    mounts = _mounts()
    v2_missing = ""
    if mounts.v2 is not None:
        parent = v2_parent(mounts.v2)
        base = mounts.v2 if parent is None else parent.parent
        available = frozenset(_read(base / "cgroup.controllers", "").split())
        if available >= V2_REQUIRED:
            where = f"cgroup v2 at {mounts.v2}" if base == mounts.v2 else f"delegated cgroup v2 subtree {base}"
            return CgroupSupport(2, available & V2_CONTROLLERS, where, parent is not None)
        v2_missing = f"; v2 at {base} lacks {', '.join(sorted(V2_REQUIRED - available))}"
    missing = [c for c in V1_REQUIRED if c not in mounts.v1]
    if not missing:
        controllers = frozenset(c for c in (*V1_REQUIRED, "cpu") if c in mounts.v1)
        writable = all(_v1_writable(mounts.v1[c]) for c in controllers)
        reason = f"cgroup v1 hierarchies {', '.join(sorted(controllers))}{v2_missing}"
        return CgroupSupport(1, controllers, reason, writable)
    reason = f"no usable cgroup hierarchy (v1 lacks {', '.join(missing)}{v2_missing or '; no cgroup2 mount'})"
    return CgroupSupport(None, frozenset(), reason)


def v2_parent(v2_root: Path) -> Path | None:
    """Where this process may create sandbox cgroups in the v2 hierarchy, or ``None``.

    Root (or whoever may write the hierarchy's root) uses ``<root>/kavach``. Anyone else
    uses the top of the subtree delegated to them (systemd's ``user@UID.service`` with
    ``Delegate=yes``): the highest ancestor of their own cgroup whose directory and
    ``cgroup.procs`` they may write. Moving a process between two cgroups needs write access
    to their common ancestor's ``cgroup.procs``, which that choice guarantees.
    """
    if os.access(v2_root, os.W_OK) and os.access(v2_root / "cgroup.procs", os.W_OK):
        return v2_root / PARENT
    own = _own_v2_cgroup()
    if own is None:
        return None
    top: Path | None = None
    directory = v2_root / own
    while directory != v2_root and v2_root in directory.parents:
        if not (os.access(directory, os.W_OK) and os.access(directory / "cgroup.procs", os.W_OK)):
            break
        top = directory
        directory = directory.parent
    return None if top is None else top / PARENT


def v1_parent(mount: Path) -> Path:
    """Where this process's sandbox cgroups go in the v1 hierarchy mounted at ``mount``.

    Root: ``<mount>/kavach``. Any other uid: ``<mount>/kavach-users/<uid>``, which only root
    can make and hand over (:func:`delegate_v1`), so one user's sandboxes never share a
    parent with another's or with root's.
    """
    uid = os.geteuid()
    return mount / PARENT if uid == 0 else mount / USERS_PARENT / str(uid)


def _v1_writable(mount: Path) -> bool:
    parent = v1_parent(mount)
    if parent.is_dir():
        return os.access(parent, os.W_OK)
    return os.geteuid() == 0 and os.access(mount, os.W_OK)


def _user_name(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


def _own_v2_cgroup() -> str | None:
    with open("/proc/self/cgroup", encoding="utf-8") as cgroup_file:
        for line in cgroup_file:
            if line.startswith("0::"):
                path = line[3:].strip().lstrip("/")
                return path or None
    return None


def cgroup_paths(pid: int) -> dict[str, str]:
    """controller -> cgroup path of process ``pid``, from ``/proc/PID/cgroup`` (``""`` is the
    v2 unified hierarchy). Raises OSError when the process is gone."""
    paths: dict[str, str] = {}
    with open(f"/proc/{pid}/cgroup", encoding="ascii") as stream:
        for line in stream:
            _, controllers, path = line.rstrip("\n").split(":", 2)
            for controller in controllers.split(",") if controllers else [""]:
                paths[controller] = path
    return paths


def create_cgroup(name: str, limits: ResourceLimits) -> Cgroup:
    """Create the sandbox cgroup ``name`` with ``limits`` (memory, pids, cpus) applied.

    Raises :class:`CgroupError` (a :class:`~kavach.errors.SandboxCreateError`) when no
    hierarchy is usable, when this process may not write it, or when a limit cannot be set.
    Nothing is left behind on failure.
    """
    if not _NAME.match(name):
        raise CgroupError("create", errno.EINVAL, detail=f"invalid cgroup name {name!r}")
    support = cgroup_support()
    if support.version is None:
        raise CgroupError("probe", errno.ENOTSUP, detail=support.reason)
    mounts = _mounts()
    if support.version == 2:
        assert mounts.v2 is not None
        parent = v2_parent(mounts.v2)
        if parent is None:
            raise CgroupError(
                "create",
                errno.EACCES,
                mounts.v2,
                f"not writable by uid {os.geteuid()} and no delegated subtree: run as root or delegate a "
                "writable cgroup (systemd-run --user -p Delegate=yes)",
            )
        if limits.cpus is not None and "cpu" not in support.controllers:
            raise CgroupError("probe", errno.ENOTSUP, parent.parent, "a CPU limit needs the v2 cpu controller")
        _sweep_once()
        return _create_v2(parent, name, limits)
    controllers = [*V1_REQUIRED]
    if limits.cpus is not None:
        if "cpu" not in mounts.v1:
            raise CgroupError("probe", errno.ENOTSUP, detail="a CPU limit needs the v1 cpu controller")
        controllers.append("cpu")
    parents = {c: v1_parent(mounts.v1[c]) for c in controllers}
    if os.geteuid() != 0:
        _check_delegated(parents)
    _sweep_once()
    return _create_v1(parents, name, limits)


def _check_delegated(parents: Mapping[str, Path]) -> None:
    """A non-root caller needs the v1 subtrees root delegated to it, in every hierarchy used."""
    uid = os.geteuid()
    for parent in parents.values():
        if not (parent.is_dir() and os.access(parent, os.W_OK)):
            raise CgroupError(
                "create",
                errno.EACCES,
                parent,
                f"no cgroup v1 subtree is delegated to uid {uid}: as root, run `kavach cgroups delegate "
                f"{_user_name(uid)}` (or run as root)",
            )


def _parent_dirs() -> dict[str, Path]:
    """The ``kavach`` parent directory of every hierarchy this host would use."""
    support = cgroup_support()
    mounts = _mounts()
    if support.version == 2 and mounts.v2 is not None:
        parent = v2_parent(mounts.v2)
        return {} if parent is None else {"unified": parent}
    if support.version == 1:
        return {c: v1_parent(mounts.v1[c]) for c in (*V1_REQUIRED, "cpu") if c in mounts.v1}
    return {}


def existing_cgroups() -> list[str]:
    """Names of the sandbox cgroups that exist now (for example left behind by a crash)."""
    names: set[str] = set()
    for parent in _parent_dirs().values():
        try:
            names.update(entry.name for entry in os.scandir(parent) if entry.is_dir(follow_symlinks=False))
        except FileNotFoundError:
            continue
        except OSError as exc:
            raise CgroupError("list", exc.errno or errno.EIO, parent) from None
    return sorted(names)


def open_cgroup(name: str) -> Cgroup | None:
    """A handle on the existing sandbox cgroup ``name`` (to kill and remove it), or ``None``."""
    if not _NAME.match(name):
        raise CgroupError("open", errno.EINVAL, detail=f"invalid cgroup name {name!r}")
    parents = _parent_dirs()
    dirs = {controller: parent / name for controller, parent in parents.items() if (parent / name).is_dir()}
    if not dirs:
        return None
    return Cgroup(name, 2 if "unified" in dirs else 1, dirs)


SANDBOX_PREFIX = "kavach-"  # the Process driver names every sandbox cgroup kavach-<sandbox id>


@lru_cache(maxsize=1)
def _sweep_once() -> None:
    """Remove stale leftovers on the first create of this process (later ones pay nothing).

    A sweep that fails (the parent cannot be listed) is logged: it must not stop the
    create, which reports its own errors.
    """
    try:
        remove_stale_cgroups()
    except CgroupError as exc:
        logger.warning("could not look for stale sandbox cgroups: %s", exc)


def remove_stale_cgroups(older_than: float = STALE_AFTER_S) -> list[str]:
    """Remove this caller's sandbox cgroups that are empty and older than ``older_than`` seconds.

    Such a cgroup is what a caller killed before it destroyed its sandbox leaves: its
    processes died with the caller's sockets, the directory stayed. A live sandbox's cgroup
    always holds its init (from a few milliseconds after the mkdir until destroy), and the
    kernel refuses to remove a cgroup that holds a process, so a process that joins one
    meanwhile keeps it. Returns the names removed; one that cannot be removed is logged
    and left.
    """
    removed = []
    now = time.time()
    for name in existing_cgroups():
        if not name.startswith(SANDBOX_PREFIX):
            continue
        cgroup = open_cgroup(name)
        if cgroup is None or cgroup._populated():
            continue
        if any(now - _mtime(directory) < older_than for directory in cgroup.dirs.values()):
            continue
        try:
            cgroup.remove_empty()
        except CgroupError as exc:
            logger.warning("stale sandbox cgroup %s left in place: %s", name, exc)
            continue
        removed.append(name)
    return removed


def _mtime(directory: Path) -> float:
    try:
        return os.stat(directory).st_mtime
    except FileNotFoundError:
        return 0.0  # removed meanwhile: rmdir will find nothing either
    except OSError as exc:
        raise CgroupError("stat", exc.errno or errno.EIO, directory) from None


# -- delegation (v1) ------------------------------------------------------------------------------


def delegate_v1(uid: int, gid: int) -> list[Path]:
    """Give ``uid`` its own cgroup v1 subtree for sandboxes (root only); returns its directories.

    Makes ``<mount>/kavach-users/<uid>`` in every mounted v1 hierarchy and gives only that
    directory to ``uid:gid``: the user can then create and remove the sandbox cgroups below
    it, set their limits and move its own processes into them (v1 checks that the writer's
    uid is the process's). The Process backend uses the memory, pids, freezer and cpu
    hierarchies; runc, for the OCI backend's rootless containers, joins every hierarchy
    (cpuset, devices, blkio, name=systemd ...) and fails when one is not writable, hence
    all of them. No limit can be widened below the delegated directory: a child's limits
    count against its parent's, a child cpuset's CPUs must be a subset of its parent's, and
    the devices files need CAP_SYS_ADMIN. (Where net_cls or net_prio are mounted, the user
    can tag its own processes' traffic with a class or priority.) The delegated directory's
    own limit files stay root's, so root may cap all of that user's sandboxes together.
    Idempotent. cgroup v2 hosts delegate with systemd instead (``Delegate=yes``).
    """
    if uid == 0:
        raise CgroupError("delegate", errno.EINVAL, detail="root needs no delegation")
    mounts = _delegation_mounts()
    made = []
    for mount in mounts:
        top = mount / USERS_PARENT
        _mkdir(top, exist_ok=True)
        directory = top / str(uid)
        _mkdir(directory, exist_ok=True)
        _inherit_cpuset(mount, (top, directory))
        try:
            os.chown(directory, uid, gid)
        except OSError as exc:
            raise CgroupError("delegate", exc.errno or errno.EIO, directory, f"chown to {uid}:{gid}") from None
        made.append(directory)
    return made


def undelegate_v1(uid: int) -> list[Path]:
    """Remove what :func:`delegate_v1` made for ``uid`` (root only); returns the directories removed.

    Refused (``EBUSY``) while a sandbox cgroup of that user exists below it.
    """
    removed = []
    for mount in _delegation_mounts():
        directory = mount / USERS_PARENT / str(uid)
        if not directory.is_dir():
            continue
        try:
            os.rmdir(directory)
        except OSError as exc:
            detail = ""
            if exc.errno in (errno.EBUSY, errno.ENOTEMPTY):
                detail = f"uid {uid} still has sandbox cgroups: {_subdirectories(directory)}"
            raise CgroupError("undelegate", exc.errno or errno.EIO, directory, detail) from None
        removed.append(directory)
    return removed


def _subdirectories(directory: Path) -> list[str]:
    try:
        return sorted(entry.name for entry in os.scandir(directory) if entry.is_dir(follow_symlinks=False))
    except OSError as exc:  # only for the message: say why it could not be listed
        return [f"(cannot list: {exc.strerror})"]


def _delegation_mounts() -> list[Path]:
    """The distinct v1 mounts a delegation covers; refuses when v1 is not what this host uses."""
    if os.geteuid() != 0:
        raise CgroupError("delegate", errno.EPERM, detail="only root can delegate cgroups")
    support = cgroup_support()
    if support.version != 1:
        how = "with systemd (Delegate=yes)" if support.version == 2 else "nowhere"
        raise CgroupError(
            "delegate", errno.ENOTSUP, detail=f"this host does not use cgroup v1 ({support.reason}): delegate {how}"
        )
    return list(_mounts().v1_all)


def _inherit_cpuset(mount: Path, directories: tuple[Path, ...]) -> None:
    """Give each new cpuset directory its parent's CPUs and memory nodes (root only).

    A v1 cpuset cgroup starts with none, and no process can join it until both are set;
    runc fills only the directories it creates, so the ones root made must be filled here
    (top down, each from its parent).
    """
    if not (mount / "cpuset.cpus").exists():
        return  # not the cpuset hierarchy
    for directory in directories:
        for name in ("cpuset.cpus", "cpuset.mems"):
            target = directory / name
            try:
                if target.read_text(encoding="ascii").strip():
                    continue
                target.write_text((directory.parent / name).read_text(encoding="ascii"), encoding="ascii")
            except OSError as exc:
                raise CgroupError("delegate", exc.errno or errno.EIO, target, "copy from its parent") from None


def delegated_v1_path() -> str | None:
    """The cgroup path (``/kavach-users/<uid>``) delegated to this non-root caller in every
    mounted v1 hierarchy, or ``None`` (root, not a v1 host, or not delegated in all of them).

    What a container runtime needs to give this caller's rootless containers a cgroup below
    it: it creates the container's cgroup in each hierarchy (see the OCI backend).
    """
    uid = os.geteuid()
    mounts = _mounts()
    if uid == 0 or not mounts.v1_all or "memory" not in mounts.v1:
        return None
    relative = f"/{USERS_PARENT}/{uid}"
    for mount in mounts.v1_all:
        directory = mount / USERS_PARENT / str(uid)
        if not directory.is_dir() or not os.access(directory, os.W_OK | os.X_OK):
            return None
    return relative


# -- the cgroup handle --------------------------------------------------------------------------


class Cgroup:
    """One sandbox's cgroup (one directory per hierarchy). Use :func:`create_cgroup`."""

    def __init__(self, name: str, version: Literal[1, 2], dirs: Mapping[str, Path]) -> None:
        self.name = name
        self.version: Literal[1, 2] = version
        # v1: controller -> directory; v2: {"unified": directory}
        self.dirs = dict(dirs)
        self._destroyed = False
        self._oom_fd: int | None = None  # see _oom_counters

    def __repr__(self) -> str:
        return f"Cgroup({self.name!r}, v{self.version}, {sorted(str(d) for d in self.dirs.values())})"

    @property
    def path(self) -> Path:
        """The directory that holds the processes: the v2 cgroup or the v1 freezer cgroup."""
        if self.version == 2:
            return self.dirs["unified"]
        return self.dirs.get("freezer") or next(iter(self.dirs.values()))

    def procs_files(self) -> tuple[Path, ...]:
        """Every ``cgroup.procs`` a process must be written to (one per hierarchy)."""
        return tuple(d / "cgroup.procs" for d in self.dirs.values())

    def add(self, pid: int) -> None:
        """Move process ``pid`` (all its threads) into the cgroup in every hierarchy."""
        for procs in self.procs_files():
            _write(procs, str(pid), f"add pid {pid}")

    def self_move_fds(self) -> list[int]:
        """Write-only fds of each v1 hierarchy's ``tasks`` file, with which a process moves itself in.

        Why: writing another process's pid to ``cgroup.procs`` takes the kernel's global
        threadgroup lock for writing, and that waits for an RCU grace period whenever the
        lock was idle (measured: 5.0-6.3 ms for the first hierarchy, tens of µs for the
        next). A thread that writes "0" (itself) to ``tasks`` is moved without that lock
        (``cgroup_procs_write_start``: no pid, no thread group): 0.04-0.1 ms for four
        hierarchies. The fds are opened here, by the caller, so the sandbox process needs no
        access to the host's cgroup tree; the kernel's permission check (the writer's uid
        against the moved task's) always passes for a task moving itself. cgroup v2 has no
        such file for a domain cgroup (``cgroup.threads`` refuses moves across domains):
        there :meth:`add` is used.
        """
        if self.version != 1:
            raise CgroupError("open tasks", errno.ENOTSUP, self.path, "only cgroup v1 has a tasks file per cgroup")
        fds: list[int] = []
        try:
            for directory in self.dirs.values():
                tasks = directory / "tasks"
                try:
                    fds.append(os.open(tasks, os.O_WRONLY | os.O_CLOEXEC))
                except OSError as exc:
                    raise CgroupError("open tasks", exc.errno or errno.EIO, tasks) from None
        except BaseException:
            for fd in fds:
                os.close(fd)
            raise
        return fds

    def check_member(self, pid: int) -> None:
        """Raise :class:`CgroupError` unless process ``pid`` is in this cgroup in every hierarchy.

        Read from ``/proc/PID/cgroup`` (one file for all hierarchies): each line of a
        hierarchy this cgroup uses must end in this cgroup's name, which is unique per sandbox.
        """
        where = f"/proc/{pid}/cgroup"
        try:
            paths = cgroup_paths(pid)
        except OSError as exc:
            raise CgroupError("check membership", exc.errno or errno.EIO, where) from None
        # Cgroup.dirs names the v2 hierarchy "unified"; /proc names it "".
        mine = "/" + self.name
        outside = sorted(c for c in self.dirs if not paths.get("" if c == "unified" else c, "").endswith(mine))
        if outside:
            raise CgroupError(
                "check membership", errno.ESRCH, where, f"process {pid} is not in {self.name} for {', '.join(outside)}"
            )

    def pids(self) -> list[int]:
        """The processes currently in the cgroup (in any of its hierarchies)."""
        found: set[int] = set()
        for procs in self.procs_files():
            found.update(int(p) for p in _read(procs, "").split())
        return sorted(found)

    def pids_current(self) -> int:
        """Tasks (processes and threads) counted by the pids controller."""
        directory = self.dirs["unified"] if self.version == 2 else self.dirs["pids"]
        return int(_read(directory / "pids.current"))

    def oom_killed(self) -> bool:
        """Whether the kernel's OOM killer killed a process of this cgroup."""
        counters = _keyed(self._oom_counters())
        if self.version == 2 or "oom_kill" in counters:  # v1: kernels >= 4.13
            return counters.get("oom_kill", 0) > 0
        # Older kernels only count hits of the limit: the closest signal they give.
        return int(_read(self.dirs["memory"] / "memory.failcnt", "0")) > 0

    def _oom_counters(self) -> str:
        """The text of ``memory.events`` (v2) or ``memory.oom_control`` (v1); "" once removed.

        Read through an fd kept open until :meth:`destroy`: the driver reads it before every
        exec, and opening it anew cost up to 0.2 ms when the CPU had been idle for 20 ms
        (``pread`` of the open fd: 0.04 ms; a throwaway script, median of 50).
        """
        if self.version == 2:
            path = self.dirs["unified"] / "memory.events"
        else:
            path = self.dirs["memory"] / "memory.oom_control"
        try:
            if self._oom_fd is None:
                self._oom_fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            return os.pread(self._oom_fd, 4096, 0).decode("ascii")
        except FileNotFoundError:
            return ""  # the cgroup is gone
        except OSError as exc:
            if exc.errno == errno.ENODEV:  # removed while the fd was open
                return ""
            raise CgroupError("read", exc.errno or errno.EIO, path) from None

    def _close_oom_fd(self) -> None:
        fd, self._oom_fd = self._oom_fd, None
        if fd is not None:
            os.close(fd)

    def memory_peak(self) -> int | None:
        """The highest memory usage seen, in bytes (``None`` where the kernel does not say)."""
        if self.version == 2:
            value = _read(self.dirs["unified"] / "memory.peak", "")
        else:
            value = _read(self.dirs["memory"] / "memory.max_usage_in_bytes", "")
        return int(value) if value.strip().isdigit() else None

    # -- freezing -------------------------------------------------------------------------

    def freeze(self, timeout: float = 5.0) -> None:
        """Stop every process of the cgroup; return once the kernel reports it frozen."""
        if self.version == 2:
            _write(self.path / "cgroup.freeze", "1", "freeze")
            self._wait(lambda: _keyed(_read(self.path / "cgroup.events", "")).get("frozen") == 1, "freeze", timeout)
        else:
            state = self.path / "freezer.state"
            _write(state, "FROZEN", "freeze")
            # FREEZING until every task has stopped; writing again re-triggers a stalled attempt.
            self._wait(lambda: _read(state, "").strip() == "FROZEN", "freeze", timeout, rewrite=(state, "FROZEN"))

    def thaw(self) -> None:
        """Let the processes run again."""
        if self.version == 2:
            _write(self.path / "cgroup.freeze", "0", "thaw")
        else:
            _write(self.path / "freezer.state", "THAWED", "thaw")

    def frozen(self) -> bool:
        """Whether the kernel reports the cgroup frozen."""
        if self.version == 2:
            return _keyed(_read(self.path / "cgroup.events", "")).get("frozen") == 1
        return _read(self.path / "freezer.state", "").strip() == "FROZEN"

    # -- killing and removal ----------------------------------------------------------------

    def kill_all(self, timeout: float = 5.0) -> None:
        """SIGKILL every process of the cgroup, including ones forked while killing; wait until empty."""
        if self.version == 2 and (self.path / "cgroup.kill").exists():
            _write(self.path / "cgroup.kill", "1", "kill")
            self._wait(lambda: not self._populated(), "kill", timeout)
            return
        deadline = time.monotonic() + timeout
        # Frozen processes cannot fork between our reading cgroup.procs and the kill;
        # SIGKILL is delivered when they are thawed. (A cgroup opened after a crash may have
        # lost its freezer directory: then kill repeatedly until nothing is left.)
        can_freeze = self.version == 2 or (self.path / "freezer.state").exists()
        while self._populated():
            if can_freeze:
                self.freeze(timeout=max(deadline - time.monotonic(), 0.05))
            for pid in self.pids():
                _kill(pid)
            if can_freeze:
                self.thaw()
            self._wait(
                lambda: not self._populated(), "kill", min(0.2, max(deadline - time.monotonic(), 0.0)), strict=False
            )
            if time.monotonic() > deadline and self._populated():
                raise CgroupError("kill", errno.ETIMEDOUT, self.path, f"still populated: {self.pids()}")

    def destroy(self) -> None:
        """Kill what is left and remove the cgroup from every hierarchy. Idempotent."""
        if self._destroyed:
            return
        if self._populated():
            self.kill_all()
        if self.version == 1 and self.frozen():
            self.thaw()  # a frozen (empty) v1 cgroup could not be removed
        self._close_oom_fd()
        for directory in self.dirs.values():
            _rmdir(directory)
        self._destroyed = True

    def remove_empty(self) -> None:
        """Remove the cgroup if it holds no process; never kills (the kernel refuses a populated one)."""
        if self.version == 1 and self.frozen():
            self.thaw()
        self._close_oom_fd()
        for directory in self.dirs.values():
            _rmdir(directory)
        self._destroyed = True

    def _populated(self) -> bool:
        if self.version == 2:
            return _keyed(_read(self.path / "cgroup.events", "")).get("populated", 0) == 1
        return any(_read(d / "cgroup.procs", "").strip() for d in self.dirs.values() if d.exists())

    def _wait(
        self,
        done: Callable[[], bool],
        step: str,
        timeout: float,
        *,
        rewrite: tuple[Path, str] | None = None,
        strict: bool = True,
    ) -> None:
        deadline = time.monotonic() + timeout
        delay = _POLL_S
        while not done():
            if time.monotonic() >= deadline:
                if strict:
                    raise CgroupError(step, errno.ETIMEDOUT, self.path, f"not done after {timeout:.1f}s")
                return
            time.sleep(delay)
            delay = min(delay * 2, 0.02)
            if rewrite is not None:
                _write(rewrite[0], rewrite[1], step)


# -- creation -----------------------------------------------------------------------------------


def _create_v2(parent: Path, name: str, limits: ResourceLimits) -> Cgroup:
    _ensure_v2_parent(parent, V2_CONTROLLERS)
    directory = parent / name
    _mkdir(directory)
    cgroup = Cgroup(name, 2, {"unified": directory})
    try:
        _apply_v2_limits(directory, limits)
    except BaseException:
        cgroup.destroy()  # only after our own mkdir succeeded: never someone else's cgroup
        raise
    return cgroup


def _ensure_v2_parent(parent: Path, controllers: Iterable[str]) -> None:
    if not parent.is_dir():
        _check_writable(parent.parent)
        _mkdir(parent, exist_ok=True)
    wanted = sorted(set(controllers) & set(_read(parent.parent / "cgroup.controllers", "").split()))
    for directory in (parent.parent, parent):
        enabled = set(_read(directory / "cgroup.subtree_control", "").split())
        missing = [c for c in wanted if c not in enabled]
        if missing:
            _write(directory / "cgroup.subtree_control", " ".join(f"+{c}" for c in missing), "enable controllers")


def _apply_v2_limits(directory: Path, limits: ResourceLimits) -> None:
    if limits.memory is not None:
        _write(directory / "memory.max", str(limits.memory), "set memory limit")
        if (directory / "memory.swap.max").exists():
            _write(directory / "memory.swap.max", "0", "disable swap")
    if limits.pids is not None:
        _write(directory / "pids.max", str(limits.pids), "set pids limit")
    if limits.cpus is not None:
        quota = max(1000, int(limits.cpus * CPU_PERIOD_US))
        _write(directory / "cpu.max", f"{quota} {CPU_PERIOD_US}", "set cpu limit")


def _create_v1(parents: Mapping[str, Path], name: str, limits: ResourceLimits) -> Cgroup:
    dirs = {controller: parent / name for controller, parent in parents.items()}
    created: dict[str, Path] = {}
    try:
        for controller, parent in parents.items():
            if not parent.is_dir():
                _check_writable(parent.parent)
                _mkdir(parent, exist_ok=True)
            _check_writable(parent)
            _mkdir(dirs[controller])
            created[controller] = dirs[controller]
        _apply_v1_limits(dirs, limits)
    except BaseException:
        # Roll back only the directories this call made (a name clash must not remove the
        # other sandbox's cgroup).
        # No process was added yet, so the new directories are empty and rmdir succeeds.
        _rmdir_all(created.values())
        raise
    return Cgroup(name, 1, dirs)


def _rmdir_all(directories: Iterable[Path]) -> None:
    for directory in directories:
        _rmdir(directory)


def _apply_v1_limits(dirs: Mapping[str, Path], limits: ResourceLimits) -> None:
    memory = dirs["memory"]
    if limits.memory is not None:
        # The memory limit first: memsw (memory + swap) may never be below it.
        _write(memory / "memory.limit_in_bytes", str(limits.memory), "set memory limit")
        if (memory / "memory.memsw.limit_in_bytes").exists():
            _write(memory / "memory.memsw.limit_in_bytes", str(limits.memory), "disable swap")
        else:
            _write(memory / "memory.swappiness", "0", "disable swap")
    if limits.pids is not None:
        _write(dirs["pids"] / "pids.max", str(limits.pids), "set pids limit")
    if limits.cpus is not None:
        quota = max(1000, int(limits.cpus * CPU_PERIOD_US))
        _write(dirs["cpu"] / "cpu.cfs_period_us", str(CPU_PERIOD_US), "set cpu period")
        _write(dirs["cpu"] / "cpu.cfs_quota_us", str(quota), "set cpu limit")


# -- small checked file helpers ------------------------------------------------------------------


def _check_writable(directory: Path) -> None:
    if not os.access(directory, os.W_OK):
        raise CgroupError(
            "create",
            errno.EACCES,
            directory,
            f"not writable by uid {os.geteuid()}: run as root or delegate a writable cgroup",
        )


def _mkdir(directory: Path, *, exist_ok: bool = False) -> None:
    try:
        os.mkdir(directory, 0o755)
    except FileExistsError:
        if not exist_ok:
            raise CgroupError("mkdir", errno.EEXIST, directory, "a cgroup of that name exists") from None
    except OSError as exc:
        detail = "run as root or delegate a writable cgroup" if exc.errno in (errno.EACCES, errno.EPERM) else ""
        raise CgroupError("mkdir", exc.errno or errno.EIO, directory, detail) from None


def _rmdir(directory: Path) -> None:
    try:
        os.rmdir(directory)
    except FileNotFoundError:
        return
    except OSError as exc:
        raise CgroupError("rmdir", exc.errno or errno.EIO, directory) from None


def _write(path: Path, value: str, step: str) -> None:
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    except OSError as exc:
        raise CgroupError(step, exc.errno or errno.EIO, path) from None
    try:
        os.write(fd, value.encode())
    except OSError as exc:
        raise CgroupError(step, exc.errno or errno.EIO, path, f"writing {value!r}") from None
    finally:
        os.close(fd)


def _read(path: Path, default: str | None = None) -> str:
    """The file's text; ``default`` when it does not exist (or raise when no default)."""
    try:
        with open(path, encoding="ascii") as handle:
            return handle.read()
    except FileNotFoundError:
        if default is None:
            raise CgroupError("read", errno.ENOENT, path) from None
        return default
    except OSError as exc:
        raise CgroupError("read", exc.errno or errno.EIO, path) from None


def _keyed(text: str) -> dict[str, int]:
    values: dict[str, int] = {}
    for line in text.splitlines():
        key, _, value = line.partition(" ")
        if value.strip().lstrip("-").isdigit():
            values[key] = int(value)
    return values


def _kill(pid: int) -> None:
    # A process may exit between reading cgroup.procs and the kill.
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)


__all__ = [
    "STALE_AFTER_S",
    "Cgroup",
    "CgroupError",
    "CgroupSupport",
    "cgroup_paths",
    "cgroup_support",
    "create_cgroup",
    "delegate_v1",
    "existing_cgroups",
    "open_cgroup",
    "remove_stale_cgroups",
    "undelegate_v1",
    "v1_parent",
    "v2_parent",
]
