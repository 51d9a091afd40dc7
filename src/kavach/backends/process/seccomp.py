"""Compile kavach's seccomp profiles to BPF (libseccomp) and load them (one syscall).

Compiling and loading are split on purpose: :func:`compile_filter` runs once per sandbox
(libseccomp through ``pyseccomp``, exported with ``seccomp_export_bpf``); :func:`load_filter`
runs in every exec child right before ``execve`` and only hands the ready program to the
kernel, so it imports nothing heavy and allocates almost nothing.

The profiles themselves are data in :mod:`kavach.backends.seccomp_profiles`.
"""

from __future__ import annotations

import ctypes
import errno
import functools
import os
import struct
from typing import TYPE_CHECKING

from kavach.errors import SandboxCreateError

if TYPE_CHECKING:
    from collections.abc import Callable

    from kavach.backends.seccomp_profiles import SeccompSpec
    from kavach.policy import SeccompPolicy

_libc = ctypes.CDLL(None, use_errno=True)
_prctl = _libc.prctl
_prctl.restype = ctypes.c_int
_prctl.argtypes = (ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong)
_syscall = _libc.syscall
_syscall.restype = ctypes.c_long

PR_GET_SECCOMP = 21
PR_SET_SECCOMP = 22
PR_SET_NO_NEW_PRIVS = 38
PR_GET_NO_NEW_PRIVS = 39
SECCOMP_MODE_FILTER = 2
SECCOMP_SET_MODE_FILTER = 1
SECCOMP_GET_ACTION_AVAIL = 2
SECCOMP_RET_KILL_PROCESS = 0x8000_0000
SECCOMP_RET_ERRNO = 0x0005_0000
SECCOMP_RET_ALLOW = 0x7FFF_0000
BPF_MAXINSNS = 4096
_INSN_SIZE = 8  # struct sock_filter: u16 code, u8 jt, u8 jf, u32 k

# os.uname(), not platform.machine(): `platform` would be loaded into every sandbox.
_MACHINE = os.uname().machine
_SYS_SECCOMP = {"x86_64": 317, "aarch64": 277}.get(_MACHINE)

# Syscalls newer than the libseccomp this project pins (2.5.4): resolved by number on
# x86_64 so that the deny list covers them too. Numbers from arch/x86/entry/syscalls.
_X86_64_NEWER_SYSCALLS = {
    "futex_wake": 454,
    "futex_wait": 455,
    "futex_requeue": 456,
    "statmount": 457,
    "listmount": 458,
    "lsm_get_self_attr": 459,
    "lsm_set_self_attr": 460,
    "lsm_list_modules": 461,
    "mseal": 462,
    "setxattrat": 463,
    "getxattrat": 464,
    "listxattrat": 465,
    "removexattrat": 466,
    "open_tree_attr": 467,
    "file_getattr": 468,
    "file_setattr": 469,
}
# Syscall numbers from here up are newer than every name above (kernel 6.18 ends at 469).
# The basic and strict profiles answer them ENOSYS: a deny list cannot name syscalls that
# do not exist yet, and ENOSYS is what libc's fallbacks expect from an older kernel.
X86_64_FIRST_UNKNOWN_SYSCALL = 470
_AUDIT_ARCH_X86_64 = 0xC000_003E
_X32_SYSCALL_BIT = 0x4000_0000


class SeccompError(SandboxCreateError):
    """A seccomp filter could not be compiled or loaded; ``step`` and ``errno`` say where and why."""

    def __init__(self, step: str, err: int, detail: str = "") -> None:
        self.step = step
        self.errno = err
        name = errno.errorcode.get(err, str(err))
        extra = f": {detail}" if detail else ""
        super().__init__(f"seccomp {step}: {name} ({os.strerror(err)}){extra}")


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]


# -- compile -------------------------------------------------------------------------------


def compile_filter(policy: SeccompPolicy, *, deny_sockets: bool = False) -> bytes:
    """Compile ``policy`` to a classic BPF program for :func:`load_filter`.

    Returns ``b""`` when nothing is to be filtered (profile ``none`` with no deny list and
    no socket rule): the caller then loads nothing. Unknown syscall names in the policy
    raise :class:`~kavach.errors.PolicyError`; libseccomp failures raise :class:`SeccompError`.
    Programs are cached per (policy, deny_sockets): creating many sandboxes with the same
    policy compiles once.
    """
    try:
        hash(policy)
    except TypeError:  # a policy built with lists instead of tuples: correct, just not cacheable
        return _compile(policy, deny_sockets)
    return _compile_cached(policy, deny_sockets)


def _compile(policy: SeccompPolicy, deny_sockets: bool) -> bytes:
    from kavach.backends.seccomp_profiles import build_spec

    spec = build_spec(policy, deny_sockets=deny_sockets)
    if spec is None:
        return b""
    return compile_spec(spec, user_names=frozenset(policy.allow) | frozenset(policy.deny))


# Exceptions are not cached by lru_cache, so a bad policy raises every time.
_compile_cached = functools.lru_cache(maxsize=32)(_compile)


def compile_spec(
    spec: SeccompSpec,
    *,
    user_names: frozenset[str] = frozenset(),
    first_unknown_syscall: int | None = None,
) -> bytes:
    """Compile an explicit :class:`~kavach.backends.seccomp_profiles.SeccompSpec` to BPF.

    Built-in names the native architecture does not have (``vm86`` on x86_64, ...) are
    skipped; a name in ``user_names`` that cannot be resolved is a policy error. For the
    basic and strict profiles on x86_64, syscall numbers from ``first_unknown_syscall``
    (default :data:`X86_64_FIRST_UNKNOWN_SYSCALL`) up return ENOSYS.
    """
    import pyseccomp

    from kavach.backends.seccomp_profiles import Action, CmpOp
    from kavach.policy import SeccompProfile

    actions = {
        Action.ALLOW: lambda err: pyseccomp.ALLOW,
        Action.ERRNO: pyseccomp.ERRNO,
        Action.KILL_PROCESS: lambda err: pyseccomp.KILL_PROCESS,
    }
    ops = {
        CmpOp.NE: pyseccomp.NE,
        CmpOp.LT: pyseccomp.LT,
        CmpOp.LE: pyseccomp.LE,
        CmpOp.EQ: pyseccomp.EQ,
        CmpOp.GE: pyseccomp.GE,
        CmpOp.GT: pyseccomp.GT,
        CmpOp.MASKED_EQ: pyseccomp.MASKED_EQ,
    }
    try:
        flt = pyseccomp.SyscallFilter(actions[spec.default_action](spec.default_errno))
        flt.set_attr(pyseccomp.Attr.ACT_BADARCH, actions[spec.bad_arch_action](0))
        # A binary search over syscall numbers instead of libseccomp's default linear chain:
        # the strict allow list has ~270 entries and every syscall of the sandbox walks it.
        flt.set_attr(pyseccomp.Attr.CTL_OPTIMIZE, 2)
    except OSError as exc:
        raise SeccompError("init filter", exc.errno or errno.EINVAL) from None
    for rule in spec.rules:
        action = actions[rule.action](rule.errno)
        args = [pyseccomp.Arg(a.index, ops[a.op], a.value, a.value_two) for a in rule.args]
        for name in rule.names:
            number = _resolve(pyseccomp, name, name in user_names)
            if number is None:
                continue
            try:
                flt.add_rule(action, number, *args)
            except OSError as exc:
                raise SeccompError(f"add rule for {name}", exc.errno or errno.EINVAL) from None
    program = _export(flt)
    if spec.profile in (SeccompProfile.BASIC, SeccompProfile.STRICT) and _MACHINE == "x86_64":
        first = X86_64_FIRST_UNKNOWN_SYSCALL if first_unknown_syscall is None else first_unknown_syscall
        program = _unknown_syscalls_prefix(first) + program
        _check_program(program)
    return program


def _insn(code: int, jt: int, jf: int, k: int) -> bytes:
    return struct.pack("=HBBI", code, jt, jf, k)


def _unknown_syscalls_prefix(first_unknown: int) -> bytes:
    """Classic BPF run before libseccomp's program: x86_64 syscalls >= ``first_unknown`` -> ENOSYS.

    libseccomp can only match syscall numbers one by one, so the range test is written by
    hand. Every path that does not return falls through to the original program, which
    starts by loading the architecture again; cBPF jumps are relative and forward-only, so
    prepending instructions leaves the original program's jumps valid.
    """
    ld_abs, jeq, jge, ret = 0x20, 0x15, 0x35, 0x06  # BPF_LD|W|ABS, BPF_JMP|JEQ|K, BPF_JMP|JGE|K, BPF_RET|K
    return b"".join(
        (
            _insn(ld_abs, 0, 0, 4),  # A = seccomp_data.arch
            _insn(jeq, 0, 4, _AUDIT_ARCH_X86_64),  # other arch -> original program
            _insn(ld_abs, 0, 0, 0),  # A = seccomp_data.nr
            _insn(jge, 2, 0, _X32_SYSCALL_BIT),  # x32 (and -1) -> original program, which kills x32
            _insn(jge, 0, 1, first_unknown),  # unknown -> ENOSYS, else -> original program
            _insn(ret, 0, 0, SECCOMP_RET_ERRNO | errno.ENOSYS),
        )
    )


def _resolve(pyseccomp: object, name: str, from_user: bool) -> int | None:
    from kavach.errors import PolicyError

    number = int(pyseccomp.resolve_syscall(0, name))  # type: ignore[attr-defined]
    if number < 0 and _MACHINE == "x86_64":
        number = _X86_64_NEWER_SYSCALLS.get(name, -1)
    if number >= 0:
        return number
    if from_user:
        raise PolicyError("seccomp", name, f"unknown syscall on {_MACHINE}")
    return None


# Highest syscall number probed when listing the names libseccomp knows: above every
# architecture's table (x86_64 ends below 500; x32's offset numbers are not native).
_MAX_SYSCALL_PROBED = 1024


@functools.lru_cache(maxsize=1)
def known_syscall_names() -> frozenset[str]:
    """The native architecture's syscall names: those this host's libseccomp resolves,
    plus (on x86_64) the newer ones kavach resolves from its own table.

    For runtimes that compile an allow list with their own libseccomp
    (:func:`kavach.backends.seccomp_profiles.build_runtime_spec`): a name that runtime does
    not know is skipped there, which in an allow list only refuses that syscall.
    libseccomp is called through ctypes, not pyseccomp: the OCI backend needs only this,
    and runc already needs libseccomp on the host.
    """
    resolve = _libseccomp_resolver()
    names: set[str] = set()
    for number in range(_MAX_SYSCALL_PROBED):
        # arch 0 is SCMP_ARCH_NATIVE; the result is malloc'd (NULL: no such syscall) and ours to free
        pointer = resolve(0, number)
        if pointer:
            try:
                names.add(ctypes.string_at(pointer).decode("ascii"))
            finally:
                _free(pointer)
    if not names:
        raise SeccompError("list syscall names", errno.ENOSYS, "libseccomp resolved no syscall number")
    if _MACHINE == "x86_64":
        names.update(_X86_64_NEWER_SYSCALLS)
    return frozenset(names)


_free = _libc.free
_free.argtypes = (ctypes.c_void_p,)
_free.restype = None


def _libseccomp_resolver() -> Callable[[int, int], int | None]:
    """``seccomp_syscall_resolve_num_arch`` of the host's libseccomp (SeccompError when absent)."""
    try:
        library = ctypes.CDLL("libseccomp.so.2")
    except OSError as exc:
        raise SeccompError("load libseccomp.so.2", errno.ENOENT, str(exc)) from None
    resolve = library.seccomp_syscall_resolve_num_arch
    resolve.argtypes = (ctypes.c_uint32, ctypes.c_int)
    resolve.restype = ctypes.c_void_p
    return resolve


def check_user_syscalls(policy: SeccompPolicy, *, libseccomp_only: bool = False) -> None:
    """Raise :class:`~kavach.errors.PolicyError` for a name in ``deny`` or ``allow`` unknown here.

    ``libseccomp_only`` is for runtimes that compile the names with this host's libseccomp
    themselves (runc, crun) and skip the names it does not know: the names kavach resolves
    from its own table of newer x86_64 syscalls would be dropped there, so they are refused.
    pyseccomp is imported only when the policy names syscalls.
    """
    from kavach.errors import PolicyError

    if not policy.deny and not policy.allow:
        return
    import pyseccomp

    for field_name, names in (("seccomp.deny", policy.deny), ("seccomp.allow", policy.allow)):
        for name in names:
            number = int(pyseccomp.resolve_syscall(0, name))
            if number < 0 and not libseccomp_only and _MACHINE == "x86_64":
                number = _X86_64_NEWER_SYSCALLS.get(name, -1)
            if number < 0:
                where = "this host's libseccomp, which the OCI runtime uses," if libseccomp_only else _MACHINE
                raise PolicyError(field_name, name, f"unknown syscall on {where} (it would not be filtered)")


def _export(flt: object) -> bytes:
    fd = os.memfd_create("kavach-seccomp", os.MFD_CLOEXEC)
    try:
        with os.fdopen(os.dup(fd), "wb") as stream:
            try:
                flt.export_bpf(stream)  # type: ignore[attr-defined]
            except OSError as exc:
                raise SeccompError("export bpf", exc.errno or errno.EIO) from None
        size = os.fstat(fd).st_size
        program = os.pread(fd, size, 0)
    finally:
        os.close(fd)
    _check_program(program)
    return program


def _check_program(program: bytes) -> None:
    if not program or len(program) % _INSN_SIZE:
        raise SeccompError("check program", errno.EINVAL, f"{len(program)} bytes is not a BPF program")
    if len(program) // _INSN_SIZE > BPF_MAXINSNS:
        raise SeccompError("check program", errno.E2BIG, f"{len(program) // _INSN_SIZE} instructions")


# -- load ----------------------------------------------------------------------------------


def load_filter(program: bytes) -> None:
    """Install ``program`` (from :func:`compile_filter`) on the calling thread, irrevocably.

    Sets ``no_new_privs`` first (the kernel requires it without CAP_SYS_ADMIN, and the
    sandbox wants it anyway). Call it last before ``execve``: every later syscall of this
    thread and of everything it starts is filtered. Raises :class:`SeccompError`.
    """
    _check_program(program)
    if _prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
        raise SeccompError("set no_new_privs", ctypes.get_errno())
    # The kernel only reads the program (it copies it during the call), so it is passed in
    # place: a c_char_p of the bytes, kept alive by ``pointer`` until the call returns.
    # (create_string_buffer made a new ctypes array type for every program length: ~100 kB
    # of copied pages in every exec server.)
    pointer = ctypes.c_char_p(program)
    fprog = _SockFprog(len(program) // _INSN_SIZE, ctypes.cast(pointer, ctypes.c_void_p))
    if _SYS_SECCOMP is not None:
        # No SECCOMP_FILTER_FLAG_TSYNC: the exec server and cold children load it while
        # single-threaded (the server's threads, made later, inherit it).
        rc = _syscall(
            ctypes.c_long(_SYS_SECCOMP),
            ctypes.c_long(SECCOMP_SET_MODE_FILTER),
            ctypes.c_long(0),
            ctypes.byref(fprog),
        )
        if rc == 0:
            return
        err = ctypes.get_errno()
        if err != errno.ENOSYS:
            raise SeccompError("load filter", err)
    # Kernels before 3.17 (or an unknown arch number) only have the prctl interface.
    rc = _prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, ctypes.addressof(fprog), 0, 0)
    if rc != 0:
        raise SeccompError("load filter (prctl)", ctypes.get_errno())


# -- probe ---------------------------------------------------------------------------------


def seccomp_supported() -> tuple[bool, str]:
    """Whether this host can load kavach's filters, and why (or why not)."""
    try:
        import pyseccomp
    except (ImportError, RuntimeError) as exc:  # pyseccomp raises RuntimeError without libseccomp
        return False, f"libseccomp is not usable: {exc}"
    if _prctl(PR_GET_SECCOMP, 0, 0, 0, 0) < 0:
        err = ctypes.get_errno()
        return False, f"kernel has no seccomp (prctl PR_GET_SECCOMP: {errno.errorcode.get(err, err)})"
    if _SYS_SECCOMP is not None:
        for name, action in (("kill_process", SECCOMP_RET_KILL_PROCESS), ("errno", SECCOMP_RET_ERRNO)):
            value = ctypes.c_uint32(action)
            rc = _syscall(
                ctypes.c_long(_SYS_SECCOMP),
                ctypes.c_long(SECCOMP_GET_ACTION_AVAIL),
                ctypes.c_long(0),
                ctypes.byref(value),
            )
            if rc != 0:
                err = ctypes.get_errno()
                return False, f"kernel lacks seccomp action {name} ({errno.errorcode.get(err, err)})"
    try:
        pyseccomp.SyscallFilter(pyseccomp.ALLOW)
    except OSError as exc:
        return False, f"libseccomp cannot build a filter: {exc}"
    return True, f"seccomp filter mode with libseccomp on {_MACHINE}"


def filter_mode_of(pid: int | str = "self") -> int | None:
    """The ``Seccomp:`` field of ``/proc/PID/status`` (2 = filter), or ``None`` if absent."""
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("Seccomp:"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


__all__ = [
    "SeccompError",
    "compile_filter",
    "compile_spec",
    "filter_mode_of",
    "known_syscall_names",
    "load_filter",
    "seccomp_supported",
]
