"""Turning a :class:`LaunchSpec` into the plain-data plan the sandbox side executes.

The plan is computed in the caller (host view of paths, policy checks, the seccomp program
compiled once) and sent to the sandbox's init as JSON. Secrets are not in it:
they travel as memfds next to it.
"""

from __future__ import annotations

import base64
import functools
import os
import shutil
import tempfile
from typing import Any

from kavach.backends import rootfs
from kavach.backends.base import LaunchSpec, check_open_files
from kavach.backends.process import _libc
from kavach.errors import SandboxCreateError
from kavach.policy import NetworkMode, SeccompPolicy, SeccompProfile, landlock_rules

DEGRADED_ROOT_UID = 65534  # a root caller's commands run as nobody in the degraded mode


@functools.lru_cache(maxsize=32)
def seccomp_program(policy: SeccompPolicy, deny_sockets: bool) -> bytes:
    """The BPF program of ``policy`` (compiled once per distinct policy, then reused)."""
    from kavach.backends.process.seccomp import compile_filter

    return compile_filter(policy, deny_sockets=deny_sockets)


@functools.lru_cache(maxsize=1)
def setid_guard_program() -> bytes:
    """A seccomp filter refusing to set the setuid/setgid bits (and openat2, whose mode it cannot see).

    Needed for a root caller's writable binds: through the idmapped mount, files that root
    inside creates belong to the host owner of the bind, often host root; a setuid bit on
    one of them would be a setuid-root program on the host's disk. Capabilities are gone
    (no chown, no file capabilities), so the mode bits are what is left to refuse. Stacked
    with the policy's filter (whose basic and strict profiles carry the same rules), so it
    also holds with seccomp profile ``none``; it is not a scored control.
    """
    from kavach.backends.process.seccomp import compile_spec
    from kavach.backends.seccomp_profiles import setid_guard_spec

    return compile_spec(setid_guard_spec())


def wants_seccomp(policy: SeccompPolicy) -> bool:
    """True if the policy asks for any seccomp filtering."""
    return policy.profile is not SeccompProfile.NONE or bool(policy.deny)


def _check_path(path: str, field: str) -> None:
    if not path.startswith("/") or "\0" in path or any(part == ".." for part in path.split("/")):
        raise SandboxCreateError(f"{field}: {path!r} must be an absolute path without '..'")


def check_no_symlink(source: str, field: str) -> None:
    """Refuse a bind source reached through a symbolic link.

    A bind source may lie under a directory a sandbox writes (a workdir, another bind): a
    sandbox could replace it by a link to any host path, and the next sandbox created with
    the same configuration would bind that path instead, writable as the caller. So only a
    path without links is accepted (init resolves it again with RESOLVE_NO_SYMLINKS, which
    closes the window between this check and the mount).
    """
    real = os.path.realpath(source)
    if real != os.path.normpath(source):
        raise SandboxCreateError(
            f"{field}: source {source} goes through a symbolic link (it resolves to {real}); "
            "give the path without links"
        )


def build_plan(spec: LaunchSpec, *, use_namespaces: bool) -> dict[str, Any]:
    """The plan for ``spec``; raises :class:`SandboxCreateError` for impossible requests."""
    policy = spec.policy
    fs = policy.filesystem
    network = policy.network.mode
    ro_binds: list[tuple[str, str]] = []
    symlinks: list[tuple[str, str]] = []
    for path in rootfs.SYSTEM_RO_DIRS:
        if os.path.islink(path):
            symlinks.append((os.readlink(path), path))
        elif os.path.isdir(path):
            ro_binds.append((path, path))
    ro_binds.extend((path, path) for path in rootfs.ETC_RO_PATHS if os.path.exists(path))
    system_targets = {target for _source, target in ro_binds} | {link for _t, link in symlinks}

    user_ro: list[tuple[str, str]] = []
    user_rw: list[tuple[str, str]] = []
    for binds, out, field in (
        (fs.ro_binds, user_ro, "filesystem.ro_binds"),
        (fs.rw_binds, user_rw, "filesystem.rw_binds"),
    ):
        for bind in binds:
            _check_path(bind.source, field)
            _check_path(bind.target, field)
            if not os.path.exists(bind.source):
                raise SandboxCreateError(f"{field}: source {bind.source} does not exist")
            check_no_symlink(bind.source, field)
            if bind.target in ("/", "/proc", "/dev") or bind.target in system_targets:
                raise SandboxCreateError(f"{field}: cannot bind over {bind.target}")
            out.append((bind.source, bind.target))
    _check_path(fs.workdir, "filesystem.workdir")
    if spec.workdir_host is not None:
        if not os.path.isdir(spec.workdir_host):
            raise SandboxCreateError(f"workdir: host directory {spec.workdir_host} does not exist")
        check_no_symlink(os.path.abspath(spec.workdir_host), "workdir")
    workdir = fs.workdir
    private_workdir = None
    if not use_namespaces:
        # No mount namespace: the command runs in a host directory, its own on a tmpfs
        # (/dev/shm) unless the caller gave one; Landlock confines it there.
        if spec.files:
            raise SandboxCreateError("files: injected files need a mount namespace (user namespaces are blocked)")
        if user_ro or user_rw:
            raise SandboxCreateError("filesystem binds need a mount namespace (user namespaces are blocked)")
        if spec.workdir_host is not None:
            workdir = spec.workdir_host
        else:
            workdir = private_workdir = tempfile.mkdtemp(prefix=f"kavach-{spec.sandbox_id[:32]}-", dir="/dev/shm")
            if os.geteuid() == 0:
                os.chown(workdir, DEGRADED_ROOT_UID, DEGRADED_ROOT_UID)  # commands run as nobody
    elif spec.workdir_host is not None:
        user_rw.append((spec.workdir_host, fs.workdir))

    user_binds = sorted(
        [[source, target, os.path.isdir(source), False] for source, target in user_ro]
        + [[source, target, os.path.isdir(source), True] for source, target in user_rw],
        key=lambda bind: str(bind[1]).rstrip("/").count("/"),
    )

    resolv = None
    if network is NetworkMode.HOST and os.path.exists("/etc/resolv.conf"):
        with open("/etc/resolv.conf", "rb") as f:
            resolv = f.read()
    generated = [
        (g.path, base64.b64encode(g.content).decode(), g.mode) for g in rootfs.generated_etc(spec.hostname, resolv)
    ]
    for injected in spec.files:
        _check_path(injected.path, "files")
        if injected.path.startswith(("/proc/", "/dev/")):
            raise SandboxCreateError(f"files: cannot place {injected.path} in /proc or /dev")

    check_open_files(policy, user_namespace=use_namespaces)
    r = policy.resources
    rlimits = {
        name: value
        for name, value in (
            ("cpu", r.cpu_time_s),
            ("fsize", r.file_size),
            ("nofile", r.open_files),
            ("as", r.address_space),
        )
        if value is not None
    }
    # Without a network namespace, "off" can only be enforced by refusing sockets.
    deny_sockets = not use_namespaces and network is NetworkMode.OFF
    program = seccomp_program(policy.seccomp, deny_sockets) if wants_seccomp(policy.seccomp) or deny_sockets else b""
    landlock = None
    if policy.landlock.enabled:
        rules = [
            [_host_path(rule.path, fs.workdir, workdir), sorted(a.value for a in rule.access)]
            for rule in landlock_rules(policy)
        ]
        landlock = {"rules": rules, "deny_network": deny_sockets, "connect_ports": []}
        if network is NetworkMode.PROXY and spec.proxy_listen is not None and _landlock_abi() >= 4:
            # The egress proxy is the only way out: TCP connects to its port alone, no binds.
            landlock["deny_network"] = True
            landlock["connect_ports"] = [spec.proxy_listen[1]]
    elif not use_namespaces:
        # Without namespaces Landlock is the filesystem boundary, asked or not.
        landlock = {"rules": degraded_landlock_rules(workdir), "deny_network": deny_sockets, "connect_ports": []}
    if spec.proxy_listen is not None and network is not NetworkMode.PROXY:
        raise SandboxCreateError("proxy_listen is only valid with network mode 'proxy'")
    if network is NetworkMode.PROXY and spec.proxy_listen is None:
        raise SandboxCreateError("network mode 'proxy' needs LaunchSpec.proxy_listen")
    setid_guard = None
    if use_namespaces and os.geteuid() == 0 and any(writable for *_rest, writable in user_binds):
        setid_guard = base64.b64encode(setid_guard_program()).decode()
    return {
        "sandbox_id": spec.sandbox_id,
        "setid_guard": setid_guard,
        "hostname": spec.hostname,
        "namespaces": use_namespaces,
        "root_caller": os.geteuid() == 0,
        "netns": use_namespaces and network is not NetworkMode.HOST,
        "network": network.value,
        "proxy_listen": list(spec.proxy_listen) if spec.proxy_listen else None,
        # [source, target, is_dir]: world-readable system paths, bound from inside.
        "system_binds": [[source, target, os.path.isdir(source)] for source, target in ro_binds],
        # [source, target, is_dir, writable], shallowest first. A root caller prepares them
        # (idmapped) from the host, since root inside may not even traverse their parents.
        "user_binds": user_binds,
        "symlinks": [list(s) for s in symlinks],
        "dev_nodes": list(rootfs.DEV_NODES),
        "generated": generated,
        "tmp_size": fs.tmp_size,
        "workdir": workdir,
        "private_workdir": private_workdir,
        "workdir_size": fs.workdir_size,
        "workdir_tmpfs": spec.workdir_host is None,
        "read_only_root": fs.read_only_root,
        "files": [[f.path, f.mode] for f in spec.files],
        "rlimits": rlimits,
        "landlock": landlock,
        "seccomp": base64.b64encode(program).decode() if program else None,
        "deny_sockets": deny_sockets,
        "last_cap": _libc.last_cap(),
    }


def _landlock_abi() -> int:
    from kavach.backends.process.landlock import landlock_abi

    return landlock_abi()


def _host_path(path: str, inside_workdir: str, host_workdir: str) -> str:
    """A Landlock rule path as the process sees it (differs only for the workdir in degraded mode)."""
    if inside_workdir != host_workdir and rootfs.is_within(path, inside_workdir):
        return host_workdir + path[len(inside_workdir) :]
    return path


def degraded_landlock_rules(workdir: str) -> list[list[Any]]:
    """Landlock rules of the degraded mode: system files read/execute, the workdir read/write."""
    rx = ["execute", "read"]
    rules: list[list[Any]] = [[path, rx] for path in ("/usr", "/bin", "/sbin", "/lib", "/lib64", "/etc")]
    # Of /proc only the process's own directory (resolved when the rules are applied, in
    # the process that then execs the command): without a pid namespace all of /proc would
    # show the host's processes and the environment of the caller's own ones.
    rules += [["/proc/self", ["read"]], ["/dev/null", ["read", "write"]], ["/dev/urandom", ["read"]]]
    rules.append([workdir, ["read", "write"]])
    return [rule for rule in rules if os.path.exists(rule[0])]


def remove_private_workdir(plan: dict[str, Any]) -> None:
    """Delete the degraded mode's own workdir (a tmpfs directory), if it made one."""
    path = plan.get("private_workdir")
    if path:
        shutil.rmtree(path, ignore_errors=True)


__all__ = [
    "build_plan",
    "check_no_symlink",
    "degraded_landlock_rules",
    "remove_private_workdir",
    "seccomp_program",
    "wants_seccomp",
]
