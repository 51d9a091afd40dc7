"""The sandbox root filesystem layout, in one place for every backend that builds one.

Plain data and small pure functions: which host paths are bound read-only, which ``/etc``
files are bound from the host, which are generated (passwd, group, hosts, nsswitch.conf),
and which ``/proc`` paths are masked or made read-only (the same lists container runtimes
use). The Process engine builds its tmpfs root from this; the OCI backend writes the same
layout into its bundles.

Anything not listed here does not exist inside: no /home, no /root, no /var, no /sys.
"""

from __future__ import annotations

from typing import NamedTuple

# Host directories bound read-only (when they exist). On merged-/usr systems /bin, /lib ...
# are symlinks into /usr: they are recreated as the same symlinks, not bound twice.
SYSTEM_RO_DIRS: tuple[str, ...] = ("/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32")

# Host files and directories of /etc that ordinary programs need, bound read-only when they
# exist: the dynamic loader's cache, TLS roots, the Debian alternatives symlinks that many
# /usr/bin entries point through, and the protocol/service tables getaddrinfo reads.
ETC_RO_PATHS: tuple[str, ...] = (
    "/etc/ld.so.cache",
    "/etc/ld.so.conf",
    "/etc/ld.so.conf.d",
    "/etc/alternatives",
    "/etc/ssl/certs",
    "/etc/ca-certificates.conf",
    "/etc/protocols",
    "/etc/services",
    "/etc/localtime",
    "/etc/mime.types",
)

# Device nodes bound from the host onto a fresh tmpfs /dev (mknod is not allowed in a user
# namespace; binding the host's character devices is what rootless runtimes do).
DEV_NODES: tuple[str, ...] = ("/dev/null", "/dev/zero", "/dev/full", "/dev/random", "/dev/urandom")
DEV_TTY = "/dev/tty"
DEV_SYMLINKS: tuple[tuple[str, str], ...] = (
    ("/dev/fd", "/proc/self/fd"),
    ("/dev/stdin", "/proc/self/fd/0"),
    ("/dev/stdout", "/proc/self/fd/1"),
    ("/dev/stderr", "/proc/self/fd/2"),
)

# /proc paths made read-only (bound onto themselves, then remounted read-only).
PROC_READONLY: tuple[str, ...] = ("/proc/sys", "/proc/sysrq-trigger", "/proc/irq", "/proc/bus", "/proc/fs")

# /proc files hidden behind /dev/null, and directories hidden behind an empty read-only tmpfs.
PROC_MASKED_FILES: tuple[str, ...] = (
    "/proc/kcore",
    "/proc/keys",
    "/proc/timer_list",
    "/proc/latency_stats",
    "/proc/sched_debug",
    "/proc/kallsyms",
    "/proc/kmsg",
    "/proc/kpagecount",
    "/proc/kpageflags",
    "/proc/config.gz",
)
PROC_MASKED_DIRS: tuple[str, ...] = ("/proc/acpi", "/proc/scsi", "/proc/asound", "/proc/driver")

# Paths masked on backends that expose /sys (OCI). The Process engine mounts no /sys at all.
SYS_MASKED: tuple[str, ...] = ("/sys/firmware", "/sys/devices/virtual/powercap", "/sys/kernel")

DEV_TMPFS_SIZE = 64 * 1024
DEV_SHM_SIZE = 16 * 1024 * 1024


def tmpfs_inodes(size: int) -> int:
    """The inode cap of a kavach tmpfs of ``size`` bytes: one per KiB, at least 1024, so that
    empty files cannot pin unbounded kernel memory when no memory limit is set."""
    return max(1024, size // 1024)


class GeneratedFile(NamedTuple):
    """A file written into the sandbox's /etc (never a host file).

    A NamedTuple, not a dataclass: this module is imported on the sandbox side (init's
    mounts), where ``dataclasses`` would pull inspect, ast, dis ... into every sandbox.
    """

    path: str
    content: bytes
    mode: int = 0o644


def passwd(home: str = "/tmp") -> bytes:
    """A passwd with root and nobody only; root's home is ``home`` because /root does not exist."""
    return (f"root:x:0:0:root:{home}:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin\n").encode()


def group() -> bytes:
    """A group file with root and nogroup only."""
    return b"root:x:0:\nnogroup:x:65534:\n"


def hosts(hostname: str) -> bytes:
    """/etc/hosts naming loopback and the sandbox's hostname."""
    return f"127.0.0.1\tlocalhost {hostname}\n::1\tlocalhost ip6-localhost ip6-loopback\n".encode()


NSSWITCH = (
    b"passwd: files\ngroup: files\nshadow: files\nhosts: files dns\n"
    b"networks: files\nprotocols: files\nservices: files\n"
)


def generated_etc(hostname: str, resolv_conf: bytes | None = None) -> tuple[GeneratedFile, ...]:
    """The generated /etc files; ``resolv_conf`` only when the sandbox shares the host network."""
    files = [
        GeneratedFile("/etc/passwd", passwd()),
        GeneratedFile("/etc/group", group()),
        GeneratedFile("/etc/hosts", hosts(hostname)),
        GeneratedFile("/etc/hostname", f"{hostname}\n".encode()),
        GeneratedFile("/etc/nsswitch.conf", NSSWITCH),
    ]
    if resolv_conf is not None:
        files.append(GeneratedFile("/etc/resolv.conf", resolv_conf))
    return tuple(files)


def parent_dirs(path: str) -> list[str]:
    """Every ancestor of an absolute ``path`` below /, shallowest first: /a/b/c -> [/a, /a/b]."""
    parts = [p for p in path.split("/") if p]
    return ["/" + "/".join(parts[:i]) for i in range(1, len(parts))]


def is_within(path: str, prefix: str) -> bool:
    """True if ``path`` is ``prefix`` or lies beneath it (both absolute, normalised)."""
    return path == prefix or path.startswith(prefix.rstrip("/") + "/")


__all__ = [
    "DEV_NODES",
    "DEV_SHM_SIZE",
    "DEV_SYMLINKS",
    "DEV_TMPFS_SIZE",
    "DEV_TTY",
    "ETC_RO_PATHS",
    "NSSWITCH",
    "PROC_MASKED_DIRS",
    "PROC_MASKED_FILES",
    "PROC_READONLY",
    "SYSTEM_RO_DIRS",
    "SYS_MASKED",
    "GeneratedFile",
    "generated_etc",
    "group",
    "hosts",
    "is_within",
    "parent_dirs",
    "passwd",
]
