"""The seccomp profiles of kavach, as plain data: the one source of truth.

Two consumers read this module:

* the Process backend (:mod:`kavach.backends.process.seccomp`) compiles a
  :class:`SeccompSpec` to classic BPF with libseccomp;
* the OCI backend translates the same :class:`SeccompSpec` to the runtime-spec
  ``linux.seccomp`` JSON (``defaultAction``, ``syscalls[].names/action/errnoRet/args``).
  :class:`Action` and :class:`CmpOp` values are chosen so that the translation is a
  table lookup (``SCMP_ACT_<ACTION>``, ``SCMP_CMP_<OP>``), and :class:`ArgCmp` uses the
  libseccomp / OCI convention: for ``MASKED_EQ`` ``value`` is the mask and
  ``value_two`` the datum.

Semantics of a spec (libseccomp's): the filter covers the native architecture only and
kills the whole process for any other (i386 ``int 0x80`` and x32 on x86_64); a syscall
takes the action of the first matching rule, rules for the same syscall are OR-ed, the
comparisons inside one rule are AND-ed, and an unmatched syscall takes ``default_action``.
No rule ever has the default action (libseccomp refuses that), and a syscall never has
both an unconditional rule and conditional ones.

Profiles
--------
``basic``
    Default allow; :data:`BASIC_DENY` (a superset of what Docker's default profile refuses
    a container without capabilities) returns ``EPERM``; ``socket(AF_VSOCK)``, ``clone``
    with a namespace flag,
    ``ioctl(TIOCSTI)`` / ``ioctl(TIOCLINUX)`` (only the low 32 bits of the request are
    compared, CVE-2019-10063) and ``personality`` outside Docker's safe values return
    ``EPERM``; ``clone3`` returns ``ENOSYS`` so that libc falls back to ``clone``, whose
    flags a classic BPF filter can read. Runtimes that resolve names with their own
    libseccomp (runc, crun) receive the same decisions written as an allow list
    (:func:`build_runtime_spec`), because they skip names they do not know.
``strict``
    Default ``EPERM``; only :data:`STRICT_ALLOW` (enough for dynamically linked programs,
    shells that fork a lot, coreutils and ``/usr/bin/python3``) plus the argument-checked
    ``clone``, ``ioctl``, ``personality``, ``socket`` (``AF_UNIX``, ``AF_INET``,
    ``AF_INET6``) and ``socketpair`` (``AF_UNIX``) are allowed: the same argument rules as
    ``basic``, written as allow rules.
``none``
    No filter, unless the policy lists extra denied syscalls or sockets must be denied.

Both ``basic`` and ``strict`` refuse (``EPERM``) to set the setuid or setgid bit through
``chmod``/``fchmod``/``fchmodat``/``fchmodat2``/``creat``/``mknod``/``mknodat`` and a
creating ``open``/``openat``, and answer ``openat2`` (mode in a struct) with ``ENOSYS``:
files a sandbox writes through an idmapped bind belong to a host user (see
:data:`MODE_SYSCALLS`).

``policy.seccomp.deny`` adds names refused with ``EPERM`` (it wins over every allow);
``policy.seccomp.allow`` extends the strict allow list (argument rules still apply to
the syscalls that have them). ``deny_sockets`` (the degraded no-namespace mode with
network "off") refuses ``socket``/``socketpair`` for every family but ``AF_UNIX``.
"""

from __future__ import annotations

import errno
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from enum import StrEnum

from kavach.errors import PolicyError
from kavach.policy import SeccompPolicy, SeccompProfile


class Action(StrEnum):
    """What a rule does; OCI: ``SCMP_ACT_`` + the upper-cased value."""

    ALLOW = "allow"
    ERRNO = "errno"
    KILL_PROCESS = "kill_process"


class CmpOp(StrEnum):
    """Argument comparison; OCI: ``SCMP_CMP_`` + the upper-cased value."""

    NE = "ne"
    LT = "lt"
    LE = "le"
    EQ = "eq"
    GE = "ge"
    GT = "gt"
    MASKED_EQ = "masked_eq"


@dataclass(frozen=True)
class ArgCmp:
    """Compare syscall argument ``index`` (0-5); for ``MASKED_EQ``: ``arg & value == value_two``."""

    index: int
    op: CmpOp
    value: int
    value_two: int = 0


@dataclass(frozen=True)
class SyscallRule:
    """Apply ``action`` (with ``errno`` for :attr:`Action.ERRNO`) to ``names`` when all ``args`` match."""

    names: tuple[str, ...]
    action: Action
    errno: int = 0
    args: tuple[ArgCmp, ...] = ()


@dataclass(frozen=True)
class SeccompSpec:
    """A complete filter: default action, rules, and what happens on a foreign architecture."""

    profile: SeccompProfile
    default_action: Action
    default_errno: int
    rules: tuple[SyscallRule, ...]
    bad_arch_action: Action = Action.KILL_PROCESS

    def names(self, action: Action | None = None) -> frozenset[str]:
        """Every syscall name a rule mentions (only rules with ``action`` when given)."""
        return frozenset(n for r in self.rules if action in (None, r.action) for n in r.names)


DENY_ERRNO = errno.EPERM

# -- argument constants (Linux UAPI; identical on every architecture kavach runs on) --------

CLONE_NEWNS = 0x0002_0000
CLONE_NEWCGROUP = 0x0200_0000
CLONE_NEWUTS = 0x0400_0000
CLONE_NEWIPC = 0x0800_0000
CLONE_NEWUSER = 0x1000_0000
CLONE_NEWPID = 0x2000_0000
CLONE_NEWNET = 0x4000_0000
# CLONE_NEWTIME (0x80) is only meaningful for clone3/unshare: in clone()'s flags that bit
# belongs to the exit signal, so it must not be matched there.
CLONE_NAMESPACE_FLAGS: tuple[int, ...] = (
    CLONE_NEWNS,
    CLONE_NEWCGROUP,
    CLONE_NEWUTS,
    CLONE_NEWIPC,
    CLONE_NEWUSER,
    CLONE_NEWPID,
    CLONE_NEWNET,
)
CLONE_NAMESPACE_MASK = sum(CLONE_NAMESPACE_FLAGS)

TIOCSTI = 0x5412  # push a byte into a terminal's input queue: injects commands into the caller's shell
TIOCLINUX = 0x541C  # subcode 3/6 copies/pastes the console selection: same injection on a VT
LOW32 = 0xFFFF_FFFF  # the kernel reads ioctl's request and personality's persona as 32-bit ints

# Docker's personality allow list: PER_LINUX, PER_LINUX32, UNAME26, PER_LINUX32|UNAME26 and
# the query value. Anything else can disable ASLR (ADDR_NO_RANDOMIZE), make data executable
# (READ_IMPLIES_EXEC) or map page zero.
PERSONALITY_SAFE: tuple[int, ...] = (0x0, 0x8, 0x2_0000, 0x2_0008, 0xFFFF_FFFF)

AF_UNIX = 1
AF_INET = 2
AF_INET6 = 10
# vsock is not network-namespaced: it talks to the hypervisor and other VMs, whatever the
# sandbox's network mode (Docker refuses it too).
AF_VSOCK = 40
STRICT_SOCKET_FAMILIES: tuple[int, ...] = (AF_UNIX, AF_INET, AF_INET6)

# -- the basic deny list -------------------------------------------------------------------

BASIC_DENY: tuple[str, ...] = (
    # kernel keyrings: not namespaced, a classic cross-container leak
    "add_key",
    "keyctl",
    "request_key",
    # namespaces: new ones widen the kernel attack surface (user ns) or escape ours (setns)
    "unshare",
    "setns",
    # mounts, including the new mount API (which does not go through mount(2))
    "mount",
    "umount",
    "umount2",
    "pivot_root",
    "chroot",
    "open_tree",
    "open_tree_attr",
    "move_mount",
    "fsopen",
    "fsconfig",
    "fsmount",
    "fspick",
    "mount_setattr",
    "listmount",
    "statmount",
    # kernel programs, tracing and profiling
    "bpf",
    "perf_event_open",
    "lookup_dcookie",
    # userfaultfd stalls kernel page faults: a building block of many kernel exploits
    "userfaultfd",
    # io_uring: its own syscall path that seccomp cannot see into; frequent kernel CVEs
    "io_uring_setup",
    "io_uring_enter",
    "io_uring_register",
    # kernel replacement and modules
    "kexec_load",
    "kexec_file_load",
    "init_module",
    "finit_module",
    "delete_module",
    "create_module",
    "get_kernel_syms",
    "query_module",
    # other processes' memory and file descriptors
    "ptrace",
    "process_vm_readv",
    "process_vm_writev",
    "process_madvise",
    "kcmp",
    "pidfd_getfd",
    # host-wide administration
    "acct",
    "swapon",
    "swapoff",
    "reboot",
    "syslog",
    "quotactl",
    "quotactl_fd",
    "nfsservctl",
    "sethostname",
    "setdomainname",
    "vhangup",
    "fanotify_init",
    "_sysctl",
    "sysfs",
    "ustat",
    "uselib",
    # clocks are not namespaced (CLOCK_REALTIME is host-wide)
    "settimeofday",
    "stime",
    "clock_settime",
    "clock_settime64",
    "clock_adjtime",
    "clock_adjtime64",
    "adjtimex",
    # file handles bypass path-based checks (the "shocker" container escape)
    "name_to_handle_at",
    "open_by_handle_at",
    # raw hardware access and legacy modes
    "iopl",
    "ioperm",
    "vm86",
    "vm86old",
    "modify_ldt",
    # NUMA policy of host memory (Docker gates these with CAP_SYS_NICE)
    "mbind",
    "set_mempolicy",
    "set_mempolicy_home_node",
    "get_mempolicy",
    "migrate_pages",
    "move_pages",
    # Linux security module attributes of the caller (labels are host policy)
    "lsm_get_self_attr",
    "lsm_set_self_attr",
    "lsm_list_modules",
    # never implemented on x86_64 (ENOSYS anyway); listed so the list covers Docker's
    "afs_syscall",
    "getpmsg",
    "putpmsg",
    "security",
    "tuxcall",
    "vserver",
)

# Refused with ENOSYS instead of EPERM: glibc (2.34+) tries clone3 first and falls back to
# clone only on ENOSYS. clone3 passes its flags in memory, which BPF cannot read, so the
# namespace-flag check is only possible on clone. openat2 likewise carries its mode in a
# struct, where the setuid/setgid check below cannot see it; callers fall back to openat.
ENOSYS_SYSCALLS: tuple[str, ...] = ("clone3", "openat2")

# -- setuid/setgid bits --------------------------------------------------------------------
# Root inside a sandbox owns, through an idmapped writable bind, files that belong to the
# bind's host owner (host root for a root caller). A setuid or setgid bit on one of them
# is a setuid-root program on the host's disk, whatever no_new_privs does inside. Without
# capabilities (no chown, no file capabilities) the mode bits are what is left, so no
# profile lets a sandbox set them, on any file.
S_ISUID = 0o4000
S_ISGID = 0o2000
SETID_BITS = S_ISUID | S_ISGID
O_CREAT = 0o100
O_TMPFILE_BIT = 0o20000000  # __O_TMPFILE (O_TMPFILE is this bit plus O_DIRECTORY)
# (syscall, index of its mode argument)
MODE_SYSCALLS: tuple[tuple[str, int], ...] = (
    ("chmod", 1),
    ("fchmod", 1),
    ("fchmodat", 2),
    ("fchmodat2", 2),
    ("creat", 1),
    ("mknod", 1),
    ("mknodat", 2),
)
# open/openat read their mode only when they create (O_CREAT, O_TMPFILE); otherwise the
# register holds whatever the caller left there, so only creating calls are checked.
# (syscall, index of flags, index of mode)
OPEN_SYSCALLS: tuple[tuple[str, int, int], ...] = (("open", 1, 2), ("openat", 2, 3))

# -- the strict allow list -----------------------------------------------------------------

STRICT_ALLOW: tuple[str, ...] = (
    # files and directories
    "read",
    "write",
    "readv",
    "writev",
    "pread64",
    "pwrite64",
    "preadv",
    "pwritev",
    "preadv2",
    "pwritev2",
    "open",
    "openat",
    "openat2",
    "creat",
    "close",
    "close_range",
    "lseek",
    "_llseek",
    "dup",
    "dup2",
    "dup3",
    "fcntl",
    "fcntl64",
    "flock",
    "fsync",
    "fdatasync",
    "sync",
    "syncfs",
    "sync_file_range",
    "truncate",
    "ftruncate",
    "fallocate",
    "fadvise64",
    "readahead",
    "sendfile",
    "copy_file_range",
    "splice",
    "tee",
    "vmsplice",
    "stat",
    "fstat",
    "lstat",
    "newfstatat",
    "statx",
    "statfs",
    "fstatfs",
    "access",
    "faccessat",
    "faccessat2",
    "readlink",
    "readlinkat",
    "getdents",
    "getdents64",
    "getcwd",
    "chdir",
    "fchdir",
    "mkdir",
    "mkdirat",
    "rmdir",
    "rename",
    "renameat",
    "renameat2",
    "link",
    "linkat",
    "symlink",
    "symlinkat",
    "unlink",
    "unlinkat",
    "chmod",
    "fchmod",
    "fchmodat",
    "fchmodat2",
    "chown",
    "fchown",
    "lchown",
    "fchownat",
    "umask",
    "utime",
    "utimes",
    "utimensat",
    "futimesat",
    "getxattr",
    "lgetxattr",
    "fgetxattr",
    "getxattrat",
    "listxattr",
    "llistxattr",
    "flistxattr",
    "listxattrat",
    "setxattr",
    "lsetxattr",
    "fsetxattr",
    "setxattrat",
    "removexattr",
    "lremovexattr",
    "fremovexattr",
    "removexattrat",
    "file_getattr",
    "inotify_init",
    "inotify_init1",
    "inotify_add_watch",
    "inotify_rm_watch",
    "pipe",
    "pipe2",
    "memfd_create",
    # waiting and events
    "poll",
    "ppoll",
    "select",
    "pselect6",
    "epoll_create",
    "epoll_create1",
    "epoll_ctl",
    "epoll_wait",
    "epoll_pwait",
    "epoll_pwait2",
    "eventfd",
    "eventfd2",
    "signalfd",
    "signalfd4",
    "timerfd_create",
    "timerfd_settime",
    "timerfd_gettime",
    "io_setup",
    "io_destroy",
    "io_submit",
    "io_cancel",
    "io_getevents",
    "io_pgetevents",
    # memory
    "mmap",
    "munmap",
    "mprotect",
    "mremap",
    "brk",
    "madvise",
    "msync",
    "mincore",
    "mlock",
    "mlock2",
    "munlock",
    "mlockall",
    "munlockall",
    "membarrier",
    "mseal",
    "pkey_alloc",
    "pkey_free",
    "pkey_mprotect",
    "map_shadow_stack",
    # processes and threads (clone is argument-checked below)
    "execve",
    "execveat",
    "exit",
    "exit_group",
    "fork",
    "vfork",
    "wait4",
    "waitid",
    "kill",
    "tkill",
    "tgkill",
    "pidfd_open",
    "pidfd_send_signal",
    "getpid",
    "getppid",
    "gettid",
    "getuid",
    "geteuid",
    "getgid",
    "getegid",
    "getgroups",
    "getresuid",
    "getresgid",
    "setuid",
    "setgid",
    "setreuid",
    "setregid",
    "setresuid",
    "setresgid",
    "setgroups",
    "setfsuid",
    "setfsgid",
    "getpgid",
    "setpgid",
    "getpgrp",
    "getsid",
    "setsid",
    "capget",
    "prctl",
    "arch_prctl",
    "set_tid_address",
    "set_robust_list",
    "get_robust_list",
    "rseq",
    "futex",
    "futex_waitv",
    "sched_yield",
    "sched_getaffinity",
    "sched_setaffinity",
    "sched_getparam",
    "sched_getscheduler",
    "sched_get_priority_max",
    "sched_get_priority_min",
    "sched_rr_get_interval",
    "sched_getattr",
    "getpriority",
    "setpriority",
    "getrlimit",
    "setrlimit",
    "prlimit64",
    "getrusage",
    "times",
    "uname",
    "sysinfo",
    "getcpu",
    "getrandom",
    "seccomp",
    "landlock_create_ruleset",
    "landlock_add_rule",
    "landlock_restrict_self",
    # signals
    "rt_sigaction",
    "rt_sigprocmask",
    "rt_sigreturn",
    "rt_sigpending",
    "rt_sigsuspend",
    "rt_sigtimedwait",
    "rt_sigqueueinfo",
    "rt_tgsigqueueinfo",
    "sigaltstack",
    "restart_syscall",
    # time (reading only) and timers
    "clock_gettime",
    "clock_getres",
    "clock_nanosleep",
    "gettimeofday",
    "time",
    "nanosleep",
    "alarm",
    "pause",
    "getitimer",
    "setitimer",
    "timer_create",
    "timer_settime",
    "timer_gettime",
    "timer_getoverrun",
    "timer_delete",
    # sockets (socket and socketpair are argument-checked below)
    "bind",
    "connect",
    "listen",
    "accept",
    "accept4",
    "getsockname",
    "getpeername",
    "sendto",
    "recvfrom",
    "sendmsg",
    "recvmsg",
    "sendmmsg",
    "recvmmsg",
    "shutdown",
    "setsockopt",
    "getsockopt",
    # System V IPC: private to the sandbox's IPC namespace
    "shmget",
    "shmat",
    "shmdt",
    "shmctl",
    "semget",
    "semop",
    "semtimedop",
    "semctl",
    "msgget",
    "msgsnd",
    "msgrcv",
    "msgctl",
)


# -- rule construction ---------------------------------------------------------------------


def complement_masked(index: int, excluded: Sequence[int], mask: int = LOW32) -> tuple[tuple[ArgCmp], ...]:
    """Single-comparison ``MASKED_EQ`` tests whose union is ``arg & mask`` *not* in ``excluded``.

    libseccomp allows one comparison per argument in a rule and has no masked "not equal",
    so "anything but these values" is written as a prefix tree over the mask's bits: every
    branch that leaves the paths of the excluded values becomes one rule. At most
    ``bits(mask) * len(excluded)`` rules.
    """
    bits = [b for b in range(63, -1, -1) if mask >> b & 1]
    values = {v & mask for v in excluded}
    tests: list[tuple[ArgCmp]] = []

    def walk(depth: int, prefix_mask: int, prefix: int, live: set[int]) -> None:
        if depth == len(bits):
            return
        bit = 1 << bits[depth]
        next_mask = prefix_mask | bit
        for branch in (0, bit):
            inside = {v for v in live if v & bit == branch}
            if inside:
                walk(depth + 1, next_mask, prefix | branch, inside)
            else:
                tests.append((ArgCmp(index, CmpOp.MASKED_EQ, next_mask, prefix | branch),))

    walk(0, 0, 0, values)
    return tuple(tests)


def _rules(names: Iterable[str], action: Action, err: int, tests: Iterable[tuple[ArgCmp, ...]]) -> list[SyscallRule]:
    names = tuple(names)
    return [SyscallRule(names, action, err, args) for args in tests]


def _masked_equal(index: int, values: Iterable[int], mask: int = LOW32) -> list[tuple[ArgCmp]]:
    return [(ArgCmp(index, CmpOp.MASKED_EQ, mask, v & mask),) for v in values]


def setid_deny_rules() -> list[SyscallRule]:
    """Deny rules (default-allow profiles): EPERM when a call would set S_ISUID or S_ISGID."""
    rules = [
        SyscallRule((name,), Action.ERRNO, DENY_ERRNO, (ArgCmp(index, CmpOp.MASKED_EQ, bit, bit),))
        for name, index in MODE_SYSCALLS
        for bit in (S_ISUID, S_ISGID)
    ]
    rules += [
        SyscallRule(
            (name,),
            Action.ERRNO,
            DENY_ERRNO,
            (ArgCmp(flags, CmpOp.MASKED_EQ, creator, creator), ArgCmp(mode, CmpOp.MASKED_EQ, bit, bit)),
        )
        for name, flags, mode in OPEN_SYSCALLS
        for creator in (O_CREAT, O_TMPFILE_BIT)
        for bit in (S_ISUID, S_ISGID)
    ]
    return rules


def setid_guard_spec() -> SeccompSpec:
    """A default-allow filter with only the setid rules (and openat2 -> ENOSYS).

    For a sandbox whose policy filters nothing (profile ``none``) but which a root caller
    gives writable binds: the one refusal that keeps such a sandbox from planting a
    setuid-root file on the host's disk. Backends stack it with (or use it instead of) the
    policy's filter; it is not a scored control.
    """
    rules = [*setid_deny_rules(), SyscallRule(("openat2",), Action.ERRNO, errno.ENOSYS)]
    return SeccompSpec(SeccompProfile.NONE, Action.ALLOW, 0, tuple(rules))


def setid_allow_rules(allowed: frozenset[str]) -> list[SyscallRule]:
    """Allow rules (the allow-list profile) for the mode syscalls in ``allowed``: only without setid bits."""
    rules = [
        SyscallRule((name,), Action.ALLOW, 0, (ArgCmp(index, CmpOp.MASKED_EQ, SETID_BITS, 0),))
        for name, index in MODE_SYSCALLS
        if name in allowed
    ]
    for name, flags, mode in OPEN_SYSCALLS:
        if name in allowed:
            rules.append(SyscallRule((name,), Action.ALLOW, 0, (ArgCmp(mode, CmpOp.MASKED_EQ, SETID_BITS, 0),)))
            # Not creating: the mode register is meaningless, any value is fine.
            rules.append(
                SyscallRule((name,), Action.ALLOW, 0, (ArgCmp(flags, CmpOp.MASKED_EQ, O_CREAT | O_TMPFILE_BIT, 0),))
            )
    return rules


def basic_argument_rules(*, deny_sockets: bool) -> list[SyscallRule]:
    """The argument rules of the deny-list profile (refuse when the argument is dangerous)."""
    eperm = Action.ERRNO
    rules = [
        SyscallRule(("clone",), eperm, DENY_ERRNO, (ArgCmp(0, CmpOp.MASKED_EQ, flag, flag),))
        for flag in CLONE_NAMESPACE_FLAGS
    ]
    rules += _rules(("ioctl",), eperm, DENY_ERRNO, _masked_equal(1, (TIOCSTI, TIOCLINUX)))
    rules += _rules(("personality",), eperm, DENY_ERRNO, complement_masked(0, PERSONALITY_SAFE))
    if not deny_sockets:  # (with deny_sockets the AF_UNIX-only rule covers vsock)
        rules += _rules(("socket", "socketpair"), eperm, DENY_ERRNO, _masked_equal(0, (AF_VSOCK,)))
    if deny_sockets:
        rules += _rules(("socket", "socketpair"), eperm, DENY_ERRNO, complement_masked(0, (AF_UNIX,)))
    rules += setid_deny_rules()
    return rules


def strict_argument_rules(*, deny_sockets: bool) -> list[SyscallRule]:
    """The same argument rules written as allow rules, for the allow-list profile."""
    families = (AF_UNIX,) if deny_sockets else STRICT_SOCKET_FAMILIES
    return _allow_argument_rules(_masked_equal(0, families), _masked_equal(0, (AF_UNIX,)))


def basic_allow_argument_rules(*, deny_sockets: bool) -> list[SyscallRule]:
    """:func:`basic_argument_rules` (without the setid rules) written as allow rules.

    Exactly the complement of the deny rules: ``clone`` without a namespace flag, ``ioctl``
    but TIOCSTI/TIOCLINUX, Docker's safe ``personality`` values, and every socket family
    but ``AF_VSOCK`` (only ``AF_UNIX`` with ``deny_sockets``).
    """
    if deny_sockets:
        families = _masked_equal(0, (AF_UNIX,))
        return _allow_argument_rules(families, families)
    families = list(complement_masked(0, (AF_VSOCK,)))
    return _allow_argument_rules(families, families)


def _allow_argument_rules(
    socket_tests: Sequence[tuple[ArgCmp, ...]], socketpair_tests: Sequence[tuple[ArgCmp, ...]]
) -> list[SyscallRule]:
    allow = Action.ALLOW
    rules = [SyscallRule(("clone",), allow, 0, (ArgCmp(0, CmpOp.MASKED_EQ, CLONE_NAMESPACE_MASK, 0),))]
    rules += _rules(("ioctl",), allow, 0, complement_masked(1, (TIOCSTI, TIOCLINUX)))
    rules += _rules(("personality",), allow, 0, _masked_equal(0, PERSONALITY_SAFE))
    rules += _rules(("socket",), allow, 0, socket_tests)
    rules += _rules(("socketpair",), allow, 0, socketpair_tests)
    return rules


def _check_names(field: str, names: Sequence[str]) -> None:
    for name in names:
        if not name or not all(c.isalnum() or c == "_" for c in name):
            raise PolicyError(field, name, "not a syscall name")


def _check_policy_names(policy: SeccompPolicy) -> None:
    _check_names("seccomp.deny", policy.deny)
    _check_names("seccomp.allow", policy.allow)
    if policy.allow and policy.profile is not SeccompProfile.STRICT:
        raise PolicyError("seccomp.allow", list(policy.allow), "only valid with profile 'strict' (an allow list)")


def build_spec(policy: SeccompPolicy, *, deny_sockets: bool = False) -> SeccompSpec | None:
    """The filter for ``policy``; ``None`` when nothing is to be filtered (profile none, no deny).

    ``deny_sockets`` adds the "AF_UNIX only" socket rule of the degraded no-namespace mode.
    Names in ``policy.deny`` win over every allow and over the argument rules of the same
    syscall (they are refused unconditionally).
    """
    _check_policy_names(policy)
    extra_deny = frozenset(policy.deny)
    if policy.profile is SeccompProfile.STRICT:
        return _strict_spec(extra_deny, frozenset(policy.allow), deny_sockets=deny_sockets)
    if policy.profile is SeccompProfile.NONE and not extra_deny and not deny_sockets:
        return None
    rules: list[SyscallRule] = []
    if policy.profile is SeccompProfile.BASIC:
        deny = frozenset(BASIC_DENY) | extra_deny
        rules += _without(basic_argument_rules(deny_sockets=deny_sockets), deny)
        rules.append(SyscallRule(tuple(n for n in ENOSYS_SYSCALLS if n not in deny), Action.ERRNO, errno.ENOSYS))
    else:  # profile none, but something must still be refused
        deny = extra_deny
        if deny_sockets:
            rules += _without(
                _rules(("socket", "socketpair"), Action.ERRNO, DENY_ERRNO, complement_masked(0, (AF_UNIX,))),
                deny,
            )
    rules.insert(0, SyscallRule(tuple(sorted(deny)), Action.ERRNO, DENY_ERRNO))
    return SeccompSpec(policy.profile, Action.ALLOW, 0, tuple(r for r in rules if r.names))


def build_runtime_spec(
    policy: SeccompPolicy, known: frozenset[str], *, deny_sockets: bool = False
) -> SeccompSpec | None:
    """The filter for ``policy`` as a runtime that resolves names itself must receive it.

    runc and crun compile the names with their own libseccomp and *skip* the names it does
    not know. In a deny list a skipped name is a syscall that reaches the kernel (Debian
    12's libseccomp 2.5.4 does not know ``statmount``, ``listmount``, ``open_tree_attr``,
    nor the setid-checked ``fchmodat2`` on older builds); in an allow list it is only a
    missing allow, which fails closed. So ``basic`` is written here as an allow list with
    a refusing default (as Docker's profile is): every name in ``known`` that ``basic``
    does not refuse, and the argument rules as their exact complements. The result refuses
    what :func:`build_spec`'s form refuses, and in addition every syscall the runtime
    cannot name (``EPERM``; runc answers ``ENOSYS`` above the highest number the profile
    names, so libc's fallbacks still work). ``known``: the syscall names of the native
    architecture (:func:`kavach.backends.process.seccomp.known_syscall_names`). Other
    profiles are returned as :func:`build_spec` builds them (``strict`` already is an
    allow list; ``none`` only refuses names the caller checked).
    """
    if policy.profile is not SeccompProfile.BASIC:
        return build_spec(policy, deny_sockets=deny_sockets)
    _check_policy_names(policy)
    deny = frozenset(BASIC_DENY) | frozenset(policy.deny)
    return _allow_list_spec(
        SeccompProfile.BASIC, known - deny, basic_allow_argument_rules(deny_sockets=deny_sockets), deny
    )


def _strict_spec(extra_deny: frozenset[str], extra_allow: frozenset[str], *, deny_sockets: bool) -> SeccompSpec:
    listed = (frozenset(STRICT_ALLOW) | extra_allow) - extra_deny
    return _allow_list_spec(SeccompProfile.STRICT, listed, strict_argument_rules(deny_sockets=deny_sockets), extra_deny)


def _allow_list_spec(
    profile: SeccompProfile, listed: frozenset[str], argument_rules: list[SyscallRule], deny: frozenset[str]
) -> SeccompSpec:
    """Default EPERM; ``listed`` allowed, argument-checked where a rule checks them, ``deny`` never."""
    checked_rules = _without(argument_rules + setid_allow_rules(listed), deny)
    checked = {n for r in checked_rules for n in r.names}
    # An explicit allow of an argument-checked syscall (e.g. "ioctl") keeps the argument check.
    allow = listed - deny - checked - frozenset(ENOSYS_SYSCALLS)
    rules = [SyscallRule(tuple(sorted(allow)), Action.ALLOW), *checked_rules]
    enosys = tuple(n for n in ENOSYS_SYSCALLS if n not in deny)
    if enosys:
        rules.append(SyscallRule(enosys, Action.ERRNO, errno.ENOSYS))
    return SeccompSpec(profile, Action.ERRNO, DENY_ERRNO, tuple(rules))


def _without(rules: Iterable[SyscallRule], names: frozenset[str]) -> list[SyscallRule]:
    kept = []
    for rule in rules:
        remaining = tuple(n for n in rule.names if n not in names)
        if remaining:
            kept.append(SyscallRule(remaining, rule.action, rule.errno, rule.args))
    return kept


__all__ = [
    "BASIC_DENY",
    "CLONE_NAMESPACE_FLAGS",
    "DENY_ERRNO",
    "ENOSYS_SYSCALLS",
    "MODE_SYSCALLS",
    "OPEN_SYSCALLS",
    "PERSONALITY_SAFE",
    "SETID_BITS",
    "STRICT_ALLOW",
    "STRICT_SOCKET_FAMILIES",
    "TIOCLINUX",
    "TIOCSTI",
    "Action",
    "ArgCmp",
    "CmpOp",
    "SeccompSpec",
    "SyscallRule",
    "basic_allow_argument_rules",
    "basic_argument_rules",
    "build_runtime_spec",
    "build_spec",
    "complement_masked",
    "setid_allow_rules",
    "setid_deny_rules",
    "setid_guard_spec",
    "strict_argument_rules",
]
