"""The OCI runtime-spec ``config.json`` (and per-exec ``process.json``) of a kavach sandbox.

Pure functions of the policy and a :class:`BundleInputs` record: no file system access, no
host probing, so the output can be checked field by field against the runtime specification
(https://github.com/opencontainers/runtime-spec/blob/main/config.md, config-linux.md).

What the config always says, whatever the policy:

* every capability set empty and ``noNewPrivileges`` true, so the sandboxed root has no
  privilege the kernel checks by capability and setuid binaries cannot raise it;
* pid, ipc, uts, mount and cgroup namespaces; a network namespace unless the policy asks for
  the host network; a user namespace whenever id mappings are given (kavach always gives them,
  so root inside is an unprivileged uid outside);
* a fresh tmpfs ``/dev`` (the runtime adds only null, zero, full, random, urandom, tty, ptmx),
  never the host's; ``/proc`` with the masked and read-only paths container runtimes use;
* a size-capped tmpfs ``/tmp`` and workdir (or the host workdir bound read-write).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from kavach.backends.rootfs import PROC_MASKED_DIRS, PROC_MASKED_FILES, PROC_READONLY, SYS_MASKED
from kavach.policy import NetworkMode, SandboxPolicy

OCI_VERSION = "1.0.2"
CPU_PERIOD_US = 100_000

#: Paths masked inside (runtimes bind /dev/null over files, a read-only tmpfs over directories)
#: and made read-only: the shared layout of :mod:`kavach.backends.rootfs`, plus /sys paths
#: because an OCI sandbox with its own network namespace gets a read-only sysfs.
MASKED_PATHS: tuple[str, ...] = (*PROC_MASKED_FILES, *PROC_MASKED_DIRS, *SYS_MASKED)
READONLY_PATHS: tuple[str, ...] = PROC_READONLY

_CAPABILITY_SETS = ("bounding", "effective", "inheritable", "permitted", "ambient")


@dataclass(frozen=True)
class IdMap:
    """One user-namespace id mapping: ``size`` ids from ``container_id`` map to ``host_id``."""

    container_id: int
    host_id: int
    size: int

    def to_oci(self) -> dict[str, int]:
        """The runtime-spec ``LinuxIDMapping`` object."""
        return {"containerID": self.container_id, "hostID": self.host_id, "size": self.size}


@dataclass(frozen=True)
class Mount:
    """One runtime-spec mount."""

    destination: str
    source: str
    type: str = "bind"
    options: tuple[str, ...] = ()

    def to_oci(self) -> dict[str, Any]:
        """The runtime-spec ``Mount`` object."""
        return {
            "destination": self.destination,
            "type": self.type,
            "source": self.source,
            "options": list(self.options),
        }


def ro_bind(source: str, destination: str | None = None, *, noexec: bool = False) -> Mount:
    """A recursive read-only bind; nosuid and nodev because nothing inside needs either.

    ``noexec`` must be given when the source mount has it: inside a user namespace the
    runtime's read-only remount may not clear a flag the source mount has (locked flags).
    """
    options = ("rbind", "ro", "nosuid", "nodev", *(("noexec",) if noexec else ()))
    return Mount(destination or source, source, "bind", options)


def rw_bind(source: str, destination: str | None = None) -> Mount:
    """A recursive read-write bind (nosuid, nodev)."""
    return Mount(destination or source, source, "bind", ("rbind", "rw", "nosuid", "nodev"))


@dataclass(frozen=True)
class BundleInputs:
    """What the config needs besides the policy; the driver fills it in from the host."""

    rootfs: str  # absolute path, or relative to the bundle directory
    init_args: tuple[str, ...]
    hostname: str = "kavach"
    uid_map: tuple[IdMap, ...] = ()
    gid_map: tuple[IdMap, ...] = ()
    # Mounts of the rootfs mode (host /usr, /bin ... in "host" mode); they come after the
    # standard ones and before the policy's /tmp, workdir and binds.
    system_mounts: tuple[Mount, ...] = ()
    # Mounts placed last so that nothing hides them: injected files, kavach's directory.
    late_mounts: tuple[Mount, ...] = ()
    workdir_host: str | None = None
    # policy bind source -> the host path actually bound (an idmapped copy of it, for example)
    source_overrides: Mapping[str, str] = field(default_factory=dict)
    seccomp: Mapping[str, Any] | None = None
    cgroups_path: str | None = None
    init_env: tuple[str, ...] = ("PATH=/usr/sbin:/usr/bin:/sbin:/bin",)
    masked_paths: tuple[str, ...] = MASKED_PATHS
    readonly_paths: tuple[str, ...] = READONLY_PATHS
    annotations: Mapping[str, str] = field(default_factory=dict)
    # RLIMIT_NPROC of every process, for a container without a cgroup (rootless on cgroup
    # v1): the kernel counts it per uid and user namespace, so in the container's own user
    # namespace it counts exactly the container's processes and threads.
    nproc: int | None = None


def rlimits(policy: SandboxPolicy, nproc: int | None = None) -> list[dict[str, Any]]:
    """The policy's rlimits; RLIMIT_CORE is always 0 so a crash leaves no memory image behind.

    ``nproc`` sets RLIMIT_NPROC: the pids limit of a container that has no cgroup (see
    :attr:`BundleInputs.nproc`).
    """
    r = policy.resources
    limits: list[tuple[str, int]] = [("RLIMIT_CORE", 0)]
    if r.cpu_time_s is not None:
        limits.append(("RLIMIT_CPU", r.cpu_time_s))
    if r.file_size is not None:
        limits.append(("RLIMIT_FSIZE", r.file_size))
    if r.open_files is not None:
        limits.append(("RLIMIT_NOFILE", r.open_files))
    if r.address_space is not None:
        limits.append(("RLIMIT_AS", r.address_space))
    if nproc is not None:
        limits.append(("RLIMIT_NPROC", nproc))
    return [{"type": name, "hard": value, "soft": value} for name, value in limits]


def build_process(
    policy: SandboxPolicy,
    args: Sequence[str],
    env: Mapping[str, str] | Sequence[str],
    cwd: str,
    nproc: int | None = None,
    *,
    init: bool = False,
) -> dict[str, Any]:
    """A runtime-spec ``process`` object: for the init in config.json (``init``) and for each ``exec``.

    Each exec gets its own complete process object (``runtime exec --process``) instead of
    inheriting the init's, so its environment is exactly the request's and nothing else.
    """
    env_list = [f"{k}={v}" for k, v in env.items()] if isinstance(env, Mapping) else list(env)
    process: dict[str, Any] = {
        "terminal": False,
        "user": {"uid": 0, "gid": 0},
        "args": list(args),
        "env": env_list,
        "cwd": cwd,
        "capabilities": {name: [] for name in _CAPABILITY_SETS},
        "rlimits": rlimits(policy, nproc),
        "noNewPrivileges": True,
    }
    if not init:
        # The kernel's OOM killer picks commands first. Not the init: when tmpfs pages (which
        # belong to no process) fill the memory cgroup, the init would otherwise be the largest
        # candidate, and its death ends the container. It keeps the caller's value (lowering
        # it could need CAP_SYS_RESOURCE, which a rootless caller lacks).
        process["oomScoreAdj"] = 1000
    return process


def _standard_mounts(policy: SandboxPolicy) -> list[Mount]:
    mounts = [
        Mount("/proc", "proc", "proc", ("nosuid", "noexec", "nodev")),
        Mount("/dev", "tmpfs", "tmpfs", ("nosuid", "strictatime", "mode=755", "size=65536k")),
        # No gid=5: group 5 need not be mapped in the user namespace, and the kernel refuses
        # a devpts mount whose gid is unmapped.
        Mount("/dev/pts", "devpts", "devpts", ("nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620")),
        Mount("/dev/shm", "shm", "tmpfs", ("nosuid", "noexec", "nodev", "mode=1777", "size=65536k")),
        Mount("/dev/mqueue", "mqueue", "mqueue", ("nosuid", "noexec", "nodev")),
    ]
    if policy.network.mode is not NetworkMode.HOST:
        # sysfs may only be mounted by a user namespace that owns the network namespace, and
        # it is read-only with /sys/firmware masked. Without our own network namespace the
        # sandbox gets no /sys at all rather than a bind of the host's.
        mounts.append(Mount("/sys", "sysfs", "sysfs", ("nosuid", "noexec", "nodev", "ro")))
    return mounts


def _policy_mounts(policy: SandboxPolicy, inputs: BundleInputs) -> list[Mount]:
    fs = policy.filesystem
    source = inputs.source_overrides.get
    mounts = [
        Mount("/tmp", "tmpfs", "tmpfs", ("nosuid", "nodev", "mode=1777", f"size={fs.tmp_size}")),
    ]
    if inputs.workdir_host is not None:
        mounts.append(rw_bind(source(inputs.workdir_host, inputs.workdir_host), fs.workdir))
    else:
        mounts.append(Mount(fs.workdir, "tmpfs", "tmpfs", ("nosuid", "nodev", "mode=0755", f"size={fs.workdir_size}")))
    mounts.extend(ro_bind(b.source, b.target) for b in fs.ro_binds)
    mounts.extend(rw_bind(source(b.source, b.source), b.target) for b in fs.rw_binds)
    return mounts


def cpu_quota_us(cpus: float) -> int:
    """CFS quota per :data:`CPU_PERIOD_US` for ``cpus`` cores (at least 1 ms, the kernel's minimum)."""
    return max(1000, int(cpus * CPU_PERIOD_US))


def _resources(policy: SandboxPolicy) -> dict[str, Any]:
    r = policy.resources
    # Deny every device by default; the runtime then allows only its default set.
    resources: dict[str, Any] = {"devices": [{"allow": False, "access": "rwm"}]}
    if r.memory is not None:
        # swap == limit: no extra swap beyond the memory limit.
        resources["memory"] = {"limit": r.memory, "swap": r.memory}
    if r.pids is not None:
        resources["pids"] = {"limit": r.pids}
    if r.cpus is not None:
        resources["cpu"] = {"quota": cpu_quota_us(r.cpus), "period": CPU_PERIOD_US}
    return resources


def namespaces(policy: SandboxPolicy, user_namespace: bool) -> list[dict[str, str]]:
    """The namespaces the sandbox gets."""
    kinds = ["pid", "ipc", "uts", "mount", "cgroup"]
    if policy.network.mode is not NetworkMode.HOST:
        kinds.append("network")
    if user_namespace:
        kinds.append("user")
    return [{"type": kind} for kind in kinds]


def build_config(policy: SandboxPolicy, inputs: BundleInputs) -> dict[str, Any]:
    """The complete ``config.json`` for ``policy``."""
    user_namespace = bool(inputs.uid_map)
    mounts = [
        *_standard_mounts(policy),
        *inputs.system_mounts,
        *_policy_mounts(policy, inputs),
        *inputs.late_mounts,
    ]
    linux: dict[str, Any] = {
        "namespaces": namespaces(policy, user_namespace),
        "maskedPaths": list(inputs.masked_paths),
        # /dev last: runc remounts it read-only after creating the device nodes, so nothing
        # new can be created there (the nodes themselves stay usable: a read-only mount does
        # not stop writes to a character device). /dev/pts, /dev/shm keep their own mounts.
        "readonlyPaths": [*inputs.readonly_paths, *(() if "/dev" in inputs.readonly_paths else ("/dev",))],
        "resources": _resources(policy),
        "rootfsPropagation": "private",
    }
    if user_namespace:
        linux["uidMappings"] = [m.to_oci() for m in inputs.uid_map]
        linux["gidMappings"] = [m.to_oci() for m in inputs.gid_map]
    if inputs.cgroups_path is not None:
        linux["cgroupsPath"] = inputs.cgroups_path
    if inputs.seccomp is not None:
        linux["seccomp"] = dict(inputs.seccomp)
    config: dict[str, Any] = {
        "ociVersion": OCI_VERSION,
        "process": build_process(policy, inputs.init_args, inputs.init_env, "/", inputs.nproc, init=True),
        "root": {"path": inputs.rootfs, "readonly": policy.filesystem.read_only_root},
        "hostname": inputs.hostname,
        "mounts": [m.to_oci() for m in mounts],
        "linux": linux,
    }
    if inputs.annotations:
        config["annotations"] = dict(inputs.annotations)
    return config


__all__ = [
    "CPU_PERIOD_US",
    "MASKED_PATHS",
    "OCI_VERSION",
    "READONLY_PATHS",
    "BundleInputs",
    "IdMap",
    "Mount",
    "build_config",
    "build_process",
    "cpu_quota_us",
    "namespaces",
    "rlimits",
    "ro_bind",
    "rw_bind",
]
