"""Landlock through ctypes: filesystem rules, TCP rules and IPC scoping, ABI-aware.

:func:`apply_landlock` restricts the calling thread (and everything it executes) to the
given path rules. The handled access rights are *every* right the running kernel's ABI
knows, so anything a rule does not grant is denied:

* ABI 1: execute, read/write files, read dirs, remove/make entries;
* ABI 2: ``REFER`` (link/rename across directories); ABI 3: ``TRUNCATE``;
* ABI 4: TCP ``bind``/``connect`` (only handled when the caller asks: ``deny_network``);
* ABI 5: ``IOCTL_DEV`` (ioctl on device files); ABI 6: scoping of signals and abstract
  unix sockets to the domain; ABI 7: audit logging flags (left at the kernel default).

Policy rights map to Landlock rights as follows: ``read`` = READ_FILE | READ_DIR;
``write`` = WRITE_FILE | TRUNCATE | IOCTL_DEV | REMOVE_* | MAKE_* | REFER; ``execute`` =
EXECUTE. A rule on a non-directory keeps only the rights that apply to files (the kernel
refuses directory rights there).

Landlock syscall numbers are the same on every architecture (444-446).
"""

from __future__ import annotations

import ctypes
import errno
import os
import stat
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING

from kavach.errors import SandboxCreateError

if TYPE_CHECKING:
    from kavach.policy import Access, LandlockRule

# ``kavach.policy`` is not imported at run time: this module is loaded into every sandbox's
# init and exec server, and policy pulls dataclasses, inspect, tomllib, pathlib ...
# (~7 MiB of a 19 MiB process, copied on write by every fork). Rights are keyed by their
# string values, which ``Access`` members (a StrEnum) hash and compare equal to.

_libc = ctypes.CDLL(None, use_errno=True)
_syscall = _libc.syscall
_syscall.restype = ctypes.c_long
_prctl = _libc.prctl
_prctl.restype = ctypes.c_int
_prctl.argtypes = (ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong)

SYS_LANDLOCK_CREATE_RULESET = 444
SYS_LANDLOCK_ADD_RULE = 445
SYS_LANDLOCK_RESTRICT_SELF = 446
LANDLOCK_CREATE_RULESET_VERSION = 1 << 0
LANDLOCK_RULE_PATH_BENEATH = 1
LANDLOCK_RULE_NET_PORT = 2
PR_SET_NO_NEW_PRIVS = 38
PR_GET_NO_NEW_PRIVS = 39

ACCESS_FS_EXECUTE = 1 << 0
ACCESS_FS_WRITE_FILE = 1 << 1
ACCESS_FS_READ_FILE = 1 << 2
ACCESS_FS_READ_DIR = 1 << 3
ACCESS_FS_REMOVE_DIR = 1 << 4
ACCESS_FS_REMOVE_FILE = 1 << 5
ACCESS_FS_MAKE_CHAR = 1 << 6
ACCESS_FS_MAKE_DIR = 1 << 7
ACCESS_FS_MAKE_REG = 1 << 8
ACCESS_FS_MAKE_SOCK = 1 << 9
ACCESS_FS_MAKE_FIFO = 1 << 10
ACCESS_FS_MAKE_BLOCK = 1 << 11
ACCESS_FS_MAKE_SYM = 1 << 12
ACCESS_FS_REFER = 1 << 13  # ABI 2
ACCESS_FS_TRUNCATE = 1 << 14  # ABI 3
ACCESS_FS_IOCTL_DEV = 1 << 15  # ABI 5

ACCESS_NET_BIND_TCP = 1 << 0  # ABI 4
ACCESS_NET_CONNECT_TCP = 1 << 1  # ABI 4

SCOPE_ABSTRACT_UNIX_SOCKET = 1 << 0  # ABI 6
SCOPE_SIGNAL = 1 << 1  # ABI 6

_ABI1_FS = (1 << 13) - 1
_FS_ADDED = {2: ACCESS_FS_REFER, 3: ACCESS_FS_TRUNCATE, 5: ACCESS_FS_IOCTL_DEV}
FILE_ACCESS = ACCESS_FS_EXECUTE | ACCESS_FS_WRITE_FILE | ACCESS_FS_READ_FILE | ACCESS_FS_TRUNCATE | ACCESS_FS_IOCTL_DEV
_ACCESS_BITS: dict[str, int] = {
    "read": ACCESS_FS_READ_FILE | ACCESS_FS_READ_DIR,
    "write": ACCESS_FS_WRITE_FILE
    | ACCESS_FS_TRUNCATE
    | ACCESS_FS_IOCTL_DEV
    | ACCESS_FS_REMOVE_DIR
    | ACCESS_FS_REMOVE_FILE
    | ACCESS_FS_MAKE_CHAR
    | ACCESS_FS_MAKE_DIR
    | ACCESS_FS_MAKE_REG
    | ACCESS_FS_MAKE_SOCK
    | ACCESS_FS_MAKE_FIFO
    | ACCESS_FS_MAKE_BLOCK
    | ACCESS_FS_MAKE_SYM
    | ACCESS_FS_REFER,
    "execute": ACCESS_FS_EXECUTE,
}

# A rule as init passes it: (path, access rights as strings); or a policy LandlockRule.
RuleData = tuple[str, Iterable[str]]


class LandlockError(SandboxCreateError):
    """Landlock could not be applied as asked; ``step``, ``errno`` and ``path`` say where and why."""

    def __init__(self, step: str, err: int, detail: str = "", path: str | None = None) -> None:
        self.step = step
        self.errno = err
        self.path = path
        name = errno.errorcode.get(err, str(err))
        where = f" {path}" if path else ""
        extra = f": {detail}" if detail else ""
        super().__init__(f"landlock {step}{where}: {name} ({os.strerror(err)}){extra}")


class _RulesetAttr(ctypes.Structure):
    _fields_ = [
        ("handled_access_fs", ctypes.c_uint64),
        ("handled_access_net", ctypes.c_uint64),
        ("scoped", ctypes.c_uint64),
    ]


class _PathBeneathAttr(ctypes.Structure):
    _pack_ = 1  # the UAPI struct is __attribute__((packed)): 12 bytes
    _fields_ = [("allowed_access", ctypes.c_uint64), ("parent_fd", ctypes.c_int32)]


class _NetPortAttr(ctypes.Structure):
    _fields_ = [("allowed_access", ctypes.c_uint64), ("port", ctypes.c_uint64)]


def landlock_abi() -> int:
    """The kernel's Landlock ABI version; 0 when Landlock is missing or disabled."""
    version = _syscall(
        ctypes.c_long(SYS_LANDLOCK_CREATE_RULESET),
        None,
        ctypes.c_long(0),
        ctypes.c_long(LANDLOCK_CREATE_RULESET_VERSION),
    )
    return max(int(version), 0)


def handled_fs_access(abi: int) -> int:
    """Every filesystem right ABI ``abi`` can restrict."""
    mask = _ABI1_FS if abi >= 1 else 0
    for since, bit in _FS_ADDED.items():
        if abi >= since:
            mask |= bit
    return mask


def access_mask(access: Iterable[Access | str], abi: int) -> int:
    """The Landlock filesystem rights for the policy rights ``access`` under ``abi``.

    An unknown right raises KeyError (never silently dropped)."""
    mask = 0
    for right in access:
        mask |= _ACCESS_BITS[right]
    return mask & handled_fs_access(abi)


def apply_landlock(
    rules: Sequence[LandlockRule | RuleData],
    *,
    scope_signals: bool = True,
    scope_abstract_unix: bool = True,
    deny_network: bool = False,
    connect_ports: Sequence[int] = (),
) -> int:
    """Restrict the calling thread to ``rules``; return the ABI used.

    Every filesystem right the ABI knows is handled, so only what ``rules`` grant stays
    possible (no rules: no filesystem access at all). A rule is a ``LandlockRule`` or a
    plain ``(path, rights)`` tuple (what the sandbox side passes). With ABI >= 6, ``scope_signals`` and
    ``scope_abstract_unix`` confine signals and abstract unix socket connections to the
    domain (on older ABIs they cannot be applied and are silently absent: the caller reads
    the returned ABI). ``deny_network`` handles TCP bind/connect (ABI >= 4, else an error)
    and allows only ``connect_ports``. Sets ``no_new_privs`` if it is not set.

    Fails closed: a missing rule path, a kernel without Landlock or any refused call raises
    :class:`LandlockError` before the domain is enforced. Irrevocable once it returns.
    """
    abi = landlock_abi()
    if abi == 0:
        raise LandlockError("probe", ctypes.get_errno() or errno.ENOSYS, "the kernel has no enabled Landlock")
    if (deny_network or connect_ports) and abi < 4:
        raise LandlockError("network rules", errno.EOPNOTSUPP, f"need Landlock ABI 4, kernel has {abi}")
    attr = _RulesetAttr(handled_fs_access(abi), 0, 0)
    if deny_network or connect_ports:
        attr.handled_access_net = ACCESS_NET_BIND_TCP | ACCESS_NET_CONNECT_TCP
    if abi >= 6:
        attr.scoped = (SCOPE_SIGNAL if scope_signals else 0) | (
            SCOPE_ABSTRACT_UNIX_SOCKET if scope_abstract_unix else 0
        )
    ruleset_fd = _create_ruleset(attr)
    try:
        for rule in rules:
            _add_path_rule(ruleset_fd, rule, abi)
        for port in connect_ports:
            _add_port_rule(ruleset_fd, port)
        _ensure_no_new_privs()
        # Must be the last step: from here on the thread is confined.
        rc = _syscall(ctypes.c_long(SYS_LANDLOCK_RESTRICT_SELF), ctypes.c_long(ruleset_fd), ctypes.c_long(0))
        if rc != 0:
            raise LandlockError("restrict_self", ctypes.get_errno())
    finally:
        os.close(ruleset_fd)
    return abi


def add_scope_layer() -> None:
    """Nest the calling thread in a new Landlock domain that only scopes (ABI >= 6).

    The new layer handles no filesystem or network right (those of the enclosing domain
    still apply, unchanged); it confines signals and abstract unix socket connections to
    the new domain, so that what this thread starts cannot signal or connect to anything
    outside it: the thread's own process among them. no_new_privs must already be set.
    Raises :class:`LandlockError` (an OSError) if the kernel refuses.
    """
    attr = _RulesetAttr(0, 0, SCOPE_SIGNAL | SCOPE_ABSTRACT_UNIX_SOCKET)
    ruleset_fd = _create_ruleset(attr)
    try:
        rc = _syscall(ctypes.c_long(SYS_LANDLOCK_RESTRICT_SELF), ctypes.c_long(ruleset_fd), ctypes.c_long(0))
        if rc != 0:
            raise LandlockError("restrict_self (scope layer)", ctypes.get_errno())
    finally:
        os.close(ruleset_fd)


def _create_ruleset(attr: _RulesetAttr) -> int:
    # The full 24-byte struct is accepted by every ABI as long as the fields it does not
    # know are zero (copy_min_struct_from_user), which the caller guarantees.
    fd = _syscall(
        ctypes.c_long(SYS_LANDLOCK_CREATE_RULESET),
        ctypes.byref(attr),
        ctypes.c_long(ctypes.sizeof(attr)),
        ctypes.c_long(0),
    )
    if fd < 0:
        raise LandlockError("create_ruleset", ctypes.get_errno())
    return int(fd)


def _add_path_rule(ruleset_fd: int, rule: LandlockRule | RuleData, abi: int) -> None:
    path, access = rule if isinstance(rule, tuple) else (rule.path, rule.access)
    mask = access_mask(access, abi)
    if not mask:
        return  # a rule that grants nothing adds nothing (the kernel would say ENOMSG)
    try:
        path_fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
    except OSError as exc:
        raise LandlockError("open rule path", exc.errno or errno.ENOENT, path=path) from None
    try:
        if not stat.S_ISDIR(os.fstat(path_fd).st_mode):
            mask &= FILE_ACCESS  # directory rights on a file are EINVAL
            if not mask:
                return
        beneath = _PathBeneathAttr(mask, path_fd)
        rc = _syscall(
            ctypes.c_long(SYS_LANDLOCK_ADD_RULE),
            ctypes.c_long(ruleset_fd),
            ctypes.c_long(LANDLOCK_RULE_PATH_BENEATH),
            ctypes.byref(beneath),
            ctypes.c_long(0),
        )
        if rc != 0:
            raise LandlockError("add_rule", ctypes.get_errno(), path=path)
    finally:
        os.close(path_fd)


def _add_port_rule(ruleset_fd: int, port: int) -> None:
    if not 0 <= port <= 65535:
        raise LandlockError("add_rule", errno.EINVAL, f"TCP port {port} out of range")
    net = _NetPortAttr(ACCESS_NET_CONNECT_TCP, port)
    rc = _syscall(
        ctypes.c_long(SYS_LANDLOCK_ADD_RULE),
        ctypes.c_long(ruleset_fd),
        ctypes.c_long(LANDLOCK_RULE_NET_PORT),
        ctypes.byref(net),
        ctypes.c_long(0),
    )
    if rc != 0:
        raise LandlockError("add_rule", ctypes.get_errno(), f"TCP connect port {port}")


def _ensure_no_new_privs() -> None:
    # landlock_restrict_self requires no_new_privs without CAP_SYS_ADMIN; the sandbox wants
    # it in every case, so it is set even for a privileged caller.
    state = _prctl(PR_GET_NO_NEW_PRIVS, 0, 0, 0, 0)
    if state < 0:
        raise LandlockError("get no_new_privs", ctypes.get_errno())
    if state == 0 and _prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
        raise LandlockError("set no_new_privs", ctypes.get_errno())


__all__ = [
    "FILE_ACCESS",
    "LandlockError",
    "RuleData",
    "access_mask",
    "add_scope_layer",
    "apply_landlock",
    "handled_fs_access",
    "landlock_abi",
]
