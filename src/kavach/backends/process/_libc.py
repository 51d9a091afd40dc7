"""Thin, checked ctypes wrappers for the kernel calls the Process engine needs.

Every wrapper raises :class:`KernelCallError` naming the step and the errno when the call
fails, so that the setup sequence can stop with a message such as
``mount /proc: EPERM (Operation not permitted)``. Only the standard library is imported:
this module is loaded by the spawner and by init, which must stay small.

Syscall numbers are x86_64 and aarch64 (the new mount API shares numbers across
architectures since 5.2); :func:`supported_arch` says whether this machine is one of them.
"""

from __future__ import annotations

import ctypes
import errno
import os

_libc = ctypes.CDLL(None, use_errno=True)
_syscall = _libc.syscall
_syscall.restype = ctypes.c_long

# Namespaces (linux/sched.h)
CLONE_NEWNS = 0x00020000
CLONE_NEWCGROUP = 0x02000000
CLONE_NEWUTS = 0x04000000
CLONE_NEWIPC = 0x08000000
CLONE_NEWUSER = 0x10000000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000

# mount(2) flags
MS_RDONLY = 1
MS_NOSUID = 2
MS_NODEV = 4
MS_NOEXEC = 8
MS_REMOUNT = 32
MS_BIND = 4096
MS_REC = 16384
MS_PRIVATE = 1 << 18
MNT_DETACH = 2

# New mount API (linux/mount.h)
OPEN_TREE_CLONE = 1
OPEN_TREE_CLOEXEC = 0o2000000
AT_EMPTY_PATH = 0x1000
AT_RECURSIVE = 0x8000
AT_SYMLINK_NOFOLLOW = 0x100
AT_FDCWD = -100
# openat2(2) resolve flags (linux/openat2.h)
RESOLVE_NO_MAGICLINKS = 0x02
RESOLVE_NO_SYMLINKS = 0x04
RESOLVE_BENEATH = 0x08
MOVE_MOUNT_F_EMPTY_PATH = 0x00000004
MOVE_MOUNT_T_EMPTY_PATH = 0x00000040
FSCONFIG_SET_STRING = 1
FSCONFIG_CMD_CREATE = 6
FSOPEN_CLOEXEC = 1
FSMOUNT_CLOEXEC = 1
MOUNT_ATTR_RDONLY = 0x00000001
MOUNT_ATTR_NOSUID = 0x00000002
MOUNT_ATTR_NODEV = 0x00000004
MOUNT_ATTR_NOEXEC = 0x00000008
MOUNT_ATTR_IDMAP = 0x00100000

# prctl(2)
PR_SET_PDEATHSIG = 1
PR_SET_DUMPABLE = 4
PR_CAPBSET_READ = 23
PR_CAPBSET_DROP = 24
PR_SET_SECUREBITS = 28
PR_SET_NO_NEW_PRIVS = 38
PR_GET_NO_NEW_PRIVS = 39
PR_CAP_AMBIENT = 47
PR_CAP_AMBIENT_CLEAR_ALL = 4
PR_SET_CHILD_SUBREAPER = 36
PR_SET_NAME = 15

_SYSCALLS: dict[str, dict[str, int]] = {
    "x86_64": {
        "pivot_root": 155,
        "capget": 125,
        "capset": 126,
        "open_tree": 428,
        "move_mount": 429,
        "fsopen": 430,
        "fsconfig": 431,
        "fsmount": 432,
        "pidfd_open": 434,
        "close_range": 436,
        "mount_setattr": 442,
        "clone": 56,
        "openat2": 437,
    },
    "aarch64": {
        "pivot_root": 41,
        "capget": 90,
        "capset": 91,
        "open_tree": 428,
        "move_mount": 429,
        "fsopen": 430,
        "fsconfig": 431,
        "fsmount": 432,
        "pidfd_open": 434,
        "close_range": 436,
        "mount_setattr": 442,
        "clone": 220,
        "openat2": 437,
    },
}
# os.uname() is what platform.machine() reads on Linux; `platform` itself is not imported
# because this module is loaded into every sandbox's init and exec server.
_ARCH = os.uname().machine
_NR = _SYSCALLS.get(_ARCH, {})


class KernelCallError(OSError):
    """A kernel call failed; ``step`` names what the engine was doing."""

    def __init__(self, step: str, err: int) -> None:
        self.step = step
        name = errno.errorcode.get(err, str(err))
        super().__init__(err, f"{step}: {name} ({os.strerror(err)})")


def supported_arch() -> bool:
    """True if the syscall numbers of this machine's architecture are known."""
    return bool(_NR)


def _check(result: int, step: str) -> int:
    if result < 0:
        raise KernelCallError(step, ctypes.get_errno())
    return result


def _nr(name: str, step: str) -> int:
    try:
        return _NR[name]
    except KeyError:
        raise KernelCallError(step, errno.ENOSYS) from None


def _b(path: str) -> bytes:
    return os.fsencode(path)


def unshare(flags: int, step: str = "unshare") -> None:
    """unshare(2)."""
    _check(_libc.unshare(ctypes.c_int(flags)), step)


def setns(fd: int, nstype: int, step: str = "setns") -> None:
    """setns(2)."""
    _check(_libc.setns(ctypes.c_int(fd), ctypes.c_int(nstype)), step)


def mount(source: str | None, target: str, fstype: str | None, flags: int, data: str | None, step: str) -> None:
    """mount(2)."""
    _check(
        _libc.mount(
            None if source is None else _b(source),
            _b(target),
            None if fstype is None else _b(fstype),
            ctypes.c_ulong(flags),
            None if data is None else _b(data),
        ),
        step,
    )


def umount2(target: str, flags: int, step: str) -> None:
    """umount2(2)."""
    _check(_libc.umount2(_b(target), ctypes.c_int(flags)), step)


def pivot_root(new_root: str, put_old: str, step: str = "pivot_root") -> None:
    """pivot_root(2)."""
    _check(_syscall(ctypes.c_long(_nr("pivot_root", step)), _b(new_root), _b(put_old)), step)


def open_tree(dirfd: int, path: str, flags: int, step: str) -> int:
    """open_tree(2): with OPEN_TREE_CLONE, a detached copy of the mount at ``path``."""
    return _check(
        _syscall(ctypes.c_long(_nr("open_tree", step)), ctypes.c_int(dirfd), _b(path), ctypes.c_uint(flags)),
        step,
    )


class _OpenHow(ctypes.Structure):
    _fields_ = [("flags", ctypes.c_uint64), ("mode", ctypes.c_uint64), ("resolve", ctypes.c_uint64)]


def openat2(dirfd: int, path: str, flags: int, resolve: int, step: str) -> int:
    """openat2(2) with ``resolve`` restrictions (RESOLVE_*); returns the new fd."""
    how = _OpenHow(flags, 0, resolve)
    return _check(
        _syscall(
            ctypes.c_long(_nr("openat2", step)),
            ctypes.c_int(dirfd),
            _b(path),
            ctypes.byref(how),
            ctypes.c_size_t(ctypes.sizeof(how)),
        ),
        step,
    )


def open_tree_no_symlinks(path: str, flags: int, step: str) -> int:
    """open_tree(2) of ``path``, failing (ELOOP) if any component of it is a symbolic link.

    For bind sources a sandbox may be able to write around (under a writable bind or its
    workdir): a link planted there between two creations must fail the next one, never turn
    its bind into one of whatever the link names. The path is resolved once, into an
    O_PATH fd, and the tree is cloned from that fd, so no rename in between can redirect it.
    """
    path_fd = openat2(
        AT_FDCWD, path, os.O_PATH | os.O_CLOEXEC, RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS, f"{step}: resolve"
    )
    try:
        return open_tree(path_fd, "", flags | AT_EMPTY_PATH, step)
    finally:
        os.close(path_fd)


def move_mount(from_fd: int, to_dirfd: int, to_path: str, step: str) -> None:
    """move_mount(2) of a detached tree ``from_fd`` onto ``to_path`` (relative to ``to_dirfd``;
    an empty ``to_path`` means onto ``to_dirfd`` itself, an O_PATH fd)."""
    flags = MOVE_MOUNT_F_EMPTY_PATH | (0 if to_path else MOVE_MOUNT_T_EMPTY_PATH)
    _check(
        _syscall(
            ctypes.c_long(_nr("move_mount", step)),
            ctypes.c_int(from_fd),
            b"",
            ctypes.c_int(to_dirfd),
            _b(to_path),
            ctypes.c_uint(flags),
        ),
        step,
    )


class _MountAttr(ctypes.Structure):
    _fields_ = [
        ("attr_set", ctypes.c_uint64),
        ("attr_clr", ctypes.c_uint64),
        ("propagation", ctypes.c_uint64),
        ("userns_fd", ctypes.c_uint64),
    ]


def mount_setattr(
    dirfd: int, path: str, flags: int, attr_set: int, step: str, attr_clr: int = 0, userns_fd: int = 0
) -> None:
    """mount_setattr(2): change mount attributes (read-only, nosuid, idmap ...) in one call."""
    attr = _MountAttr(attr_set, attr_clr, 0, userns_fd)
    _check(
        _syscall(
            ctypes.c_long(_nr("mount_setattr", step)),
            ctypes.c_int(dirfd),
            _b(path),
            ctypes.c_uint(flags),
            ctypes.byref(attr),
            ctypes.c_size_t(ctypes.sizeof(attr)),
        ),
        step,
    )


def fsopen(fstype: str, step: str) -> int:
    """fsopen(2)."""
    return _check(_syscall(ctypes.c_long(_nr("fsopen", step)), _b(fstype), ctypes.c_uint(FSOPEN_CLOEXEC)), step)


def fsconfig_string(fd: int, key: str, value: str, step: str) -> None:
    """fsconfig(FSCONFIG_SET_STRING)."""
    _check(
        _syscall(
            ctypes.c_long(_nr("fsconfig", step)),
            ctypes.c_int(fd),
            ctypes.c_uint(FSCONFIG_SET_STRING),
            _b(key),
            _b(value),
            ctypes.c_int(0),
        ),
        step,
    )


def fsconfig_create(fd: int, step: str) -> None:
    """fsconfig(FSCONFIG_CMD_CREATE)."""
    _check(
        _syscall(
            ctypes.c_long(_nr("fsconfig", step)),
            ctypes.c_int(fd),
            ctypes.c_uint(FSCONFIG_CMD_CREATE),
            None,
            None,
            ctypes.c_int(0),
        ),
        step,
    )


def fsmount(fd: int, attr_flags: int, step: str) -> int:
    """fsmount(2): a detached mount of the configured filesystem."""
    return _check(
        _syscall(
            ctypes.c_long(_nr("fsmount", step)),
            ctypes.c_int(fd),
            ctypes.c_uint(FSMOUNT_CLOEXEC),
            ctypes.c_uint(attr_flags),
        ),
        step,
    )


def new_fs_mount(fstype: str, options: dict[str, str], attr_flags: int, step: str) -> int:
    """fsopen + fsconfig + fsmount: a detached mount of a fresh ``fstype`` filesystem."""
    fs_fd = fsopen(fstype, step)
    try:
        for key, value in options.items():
            fsconfig_string(fs_fd, key, value, f"{step} ({key}={value})")
        fsconfig_create(fs_fd, step)
        return fsmount(fs_fd, attr_flags, step)
    finally:
        os.close(fs_fd)


def clone_process(flags: int, step: str) -> int:
    """clone(2) like fork() (no new stack: the child runs on a copy of the caller's), with
    namespace ``flags``; returns 0 in the child, the child's pid in the parent.

    Only for a single-threaded caller (the spawner): unlike os.fork() it skips Python's
    after-fork hooks, which exist to repair state of other threads and held locks.
    """
    sigchld = 17
    return _check(
        _syscall(
            ctypes.c_long(_nr("clone", step)),
            ctypes.c_ulong(flags | sigchld),
            ctypes.c_void_p(None),
            ctypes.c_void_p(None),
            ctypes.c_void_p(None),
            ctypes.c_ulong(0),
        ),
        step,
    )


def pidfd_open(pid: int, step: str = "pidfd_open") -> int:
    """pidfd_open(2)."""
    return _check(_syscall(ctypes.c_long(_nr("pidfd_open", step)), ctypes.c_int(pid), ctypes.c_uint(0)), step)


def close_range_from(first: int) -> None:
    """Close every fd >= ``first`` (close_range(2), falling back to os.closerange)."""
    nr = _NR.get("close_range")
    if nr is None or _syscall(ctypes.c_long(nr), ctypes.c_uint(first), ctypes.c_uint(0xFFFFFFFF), 0) < 0:
        os.closerange(first, 65536)


# prctl(2) with its argument types declared once (a separate function object from
# ``_libc.prctl``): calls with plain ints build no ctypes objects, which matters in exec
# children, where every allocation dirties pages shared with init. Returns -1 and sets
# errno on failure.
PRCTL = _libc["prctl"]
PRCTL.restype = ctypes.c_int
PRCTL.argtypes = (ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong)


def prctl(option: int, arg2: int, step: str, arg3: int = 0) -> int:
    """prctl(2) with integer arguments."""
    return _check(PRCTL(option, arg2, arg3, 0, 0), step)


def set_process_name(name: bytes) -> None:
    """prctl(PR_SET_NAME): the name ``ps`` and ``/proc/PID/comm`` show for this process.

    Inside a sandbox, PID 1 and the exec server are then ``kavach-init`` and
    ``kavach-execd`` instead of the interpreter's name.
    """
    if not name or len(name) > 15 or b"\0" in name:
        raise ValueError(f"a process name is 1-15 bytes without NUL (got {name!r})")
    buf = ctypes.create_string_buffer(name)
    _check(PRCTL(PR_SET_NAME, ctypes.addressof(buf), 0, 0, 0), "set the process name")


def sethostname(name: str, step: str = "sethostname") -> None:
    """sethostname(2)."""
    raw = name.encode()
    _check(_libc.sethostname(raw, ctypes.c_size_t(len(raw))), step)


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32), ("inheritable", ctypes.c_uint32)]


_LINUX_CAPABILITY_VERSION_3 = 0x20080522
# Made once, here (in the spawner), and only read by the kernel: building the array type and
# the structures inside capset_empty cost every exec server and cold child ~90 kB of copied
# pages (measured with /proc/self/smaps_rollup in a fork of the spawner).
_CAP_HEADER = _CapHeader(_LINUX_CAPABILITY_VERSION_3, 0)
_CAP_EMPTY = (_CapData * 2)()


def capset_empty(step: str = "capset") -> None:
    """Clear the effective, permitted and inheritable capability sets of the calling thread."""
    # capset(2) writes the header's version only when it rejects it (then this fails loudly).
    _check(_syscall(ctypes.c_long(_nr("capset", step)), ctypes.byref(_CAP_HEADER), ctypes.byref(_CAP_EMPTY)), step)


def last_cap() -> int:
    """The highest capability number this kernel knows."""
    try:
        with open("/proc/sys/kernel/cap_last_cap", "rb") as f:
            return int(f.read())
    except OSError:
        return 63


__all__ = [
    "CLONE_NEWCGROUP",
    "CLONE_NEWIPC",
    "CLONE_NEWNET",
    "CLONE_NEWNS",
    "CLONE_NEWPID",
    "CLONE_NEWUSER",
    "CLONE_NEWUTS",
    "PRCTL",
    "KernelCallError",
    "capset_empty",
    "clone_process",
    "close_range_from",
    "last_cap",
    "mount",
    "mount_setattr",
    "move_mount",
    "new_fs_mount",
    "open_tree",
    "pidfd_open",
    "pivot_root",
    "prctl",
    "set_process_name",
    "sethostname",
    "setns",
    "supported_arch",
    "umount2",
    "unshare",
]
