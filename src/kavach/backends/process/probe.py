"""Host checks for the Process backend: kernel, user namespaces, Landlock, seccomp, cgroups.

Cheap (a few /proc reads), and nothing here raises: every failure becomes a reason string.
"""

from __future__ import annotations

import os

from kavach.backends.base import ProbeResult
from kavach.backends.names import Backend
from kavach.backends.process import _libc
from kavach.errors import KavachError

MIN_KERNEL = (5, 12)  # mount_setattr (idmapped mounts, recursive read-only) and the new mount API

USERNS_HOWTO = (
    "allow them with `sysctl -w user.max_user_namespaces=15000`, "
    "`sysctl -w kernel.unprivileged_userns_clone=1` (Debian), "
    "`sysctl -w kernel.apparmor_restrict_unprivileged_userns=0` or an AppArmor profile with "
    "`userns,` for this Python (Ubuntu 24.04), or run the container with user namespaces allowed "
    "(e.g. a seccomp profile permitting unshare/clone with CLONE_NEWUSER); "
    "or set policy.allow_degraded for the Landlock + seccomp + rlimit mode"
)


def _read_int(path: str) -> int | None:
    try:
        with open(path, "rb") as f:
            return int(f.read().strip() or b"0")
    except (OSError, ValueError):
        return None


def kernel_version() -> tuple[int, int]:
    """(major, minor) of the running kernel."""
    release = os.uname().release
    parts = release.split(".")
    try:
        return int(parts[0]), int("".join(ch for ch in parts[1] if ch.isdigit()) or 0)
    except (IndexError, ValueError):
        return (0, 0)


def userns_block_reason() -> str | None:
    """Why user namespaces cannot be created here (from sysctls), or None if they can."""
    if _read_int("/proc/sys/user/max_user_namespaces") == 0:
        return f"user.max_user_namespaces is 0; {USERNS_HOWTO}"
    if os.geteuid() != 0:
        if _read_int("/proc/sys/kernel/unprivileged_userns_clone") == 0:
            return f"kernel.unprivileged_userns_clone is 0; {USERNS_HOWTO}"
        if _read_int("/proc/sys/kernel/apparmor_restrict_unprivileged_userns") == 1:
            return f"AppArmor restricts unprivileged user namespaces; {USERNS_HOWTO}"
    return None


def probe_host() -> ProbeResult:
    """The Process backend's :class:`ProbeResult`; never raises."""
    try:
        return _probe_host()
    except (OSError, ValueError, KavachError) as exc:
        return ProbeResult(Backend.PROCESS, False, f"probe failed: {exc}", os.uname().release)


def _probe_host() -> ProbeResult:
    release = os.uname().release
    facts = [f"kernel {release}"]
    if not _libc.supported_arch():
        return ProbeResult(Backend.PROCESS, False, f"unsupported architecture {os.uname().machine}", release)
    if kernel_version() < MIN_KERNEL:
        return ProbeResult(
            Backend.PROCESS, False, f"kernel {release} is older than {MIN_KERNEL[0]}.{MIN_KERNEL[1]}", release
        )
    blocked = userns_block_reason()
    facts.append("user namespaces: " + ("blocked" if blocked else "yes"))
    try:
        from kavach.backends.process.landlock import landlock_abi

        facts.append(f"Landlock ABI {landlock_abi()}")
    except ImportError as exc:
        facts.append(f"Landlock: module unavailable ({exc})")
    except (OSError, KavachError) as exc:
        facts.append(f"Landlock: {exc}")
    try:
        from kavach.backends.process.seccomp import seccomp_supported

        ok, why = seccomp_supported()
        facts.append(f"seccomp: {why}" if ok else f"seccomp unavailable: {why}")
    except ImportError as exc:
        facts.append(f"seccomp: module unavailable ({exc})")
    try:
        from kavach.backends.process.cgroups import cgroup_support

        support = cgroup_support()
        if support.version is None:
            facts.append(f"cgroups unusable: {support.reason}")
        elif support.writable:
            facts.append(f"cgroup v{support.version}")
        else:
            how = "kavach cgroups delegate USER, as root" if support.version == 1 else "systemd Delegate=yes"
            facts.append(
                f"cgroup v{support.version} not writable by uid {os.geteuid()}: resource limits need a delegated "
                f"cgroup ({how}) or allow_degraded"
            )
    except ImportError as exc:
        facts.append(f"cgroups: module unavailable ({exc})")
    except (OSError, KavachError) as exc:
        facts.append(f"cgroups: {exc}")
    if blocked is not None:
        return ProbeResult(
            Backend.PROCESS,
            False,
            f"user namespaces are blocked: {blocked} ({'; '.join(facts)})",
            release,
        )
    return ProbeResult(Backend.PROCESS, True, "; ".join(facts), release)


__all__ = ["MIN_KERNEL", "USERNS_HOWTO", "kernel_version", "probe_host", "userns_block_reason"]
