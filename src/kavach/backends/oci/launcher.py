"""kavach's in-sandbox launcher: the one piece of kavach that runs *inside* an OCI container.

It is executed by the container's ``/usr/bin/python3`` (Debian's, not the project venv) as
``python3 -I -S /dev/.kavach/launcher.py MODE ...``, so it may import only the standard
library. That is a design decision, not an accident:

* Importing kavach inside would mean binding the venv's site-packages and kavach's source
  into the sandbox and importing ``kavach`` (whose package imports pull in PyYAML, typer ...)
  with a Python that is not the venv's. Instead every policy decision is made **on the host**
  by the shared modules and handed in as data: the seccomp program is compiled by
  :func:`kavach.backends.process.seccomp.compile_filter` (libseccomp, the same profiles the
  Process backend loads) and written as raw BPF; the Landlock rules are resolved to access
  masks on the host (:func:`kavach.backends.oci.driver.landlock_plan`). What remains here is
  the few kernel calls that must be made by the sandboxed process itself.
* It starts on every exec that needs it, so it imports little: no json, typing or socket at
  the top (about 20 ms of start-up on this machine). The plan is a line-based text file
  written by :func:`render_plan` and read by :func:`parse_plan`, both in this module.
* ``-I -S``: isolated mode (no PYTHON* variables, no user site, no cwd on sys.path) and no
  ``site`` import, so nothing the sandboxed command controls is imported before the
  restrictions are in place.

Modes:

``init``
    PID 1 of the container: reaps every child (orphans of double-forked daemons included),
    exits on SIGTERM/SIGINT, and is non-dumpable so no sandboxed process can ptrace it or
    read its memory.
``exec PLAN [--announce] -- ARGV...``
    Applies the plan's layers in order, then ``execvp(ARGV)``: every Landlock domain first,
    then every seccomp program (a seccomp filter could refuse the Landlock syscalls, and
    seccomp must be last before execve). A composite sandbox's plan has two layers, so the
    command runs under two stacked seccomp filters (the runtime's and the inner one) and
    Landlock. ``--announce`` prints one ``key=value`` line to stderr saying what was applied, for the
    enforcement probe. Any failed kernel call stops with exit code 126 and names the step and
    the errno: the command never runs with fewer restrictions than planned.
``listen HOST PORT UNIX_SOCKET``
    Creates a listening TCP socket *inside* the sandbox's network namespace (the egress
    proxy's address there) and passes it over ``UNIX_SOCKET`` (SCM_RIGHTS) to the host,
    which accepts the sandbox's connections on it. The host cannot create it itself without
    joining the namespace.
"""

from __future__ import annotations

import ctypes
import errno
import os
import signal
import stat
import sys

EXIT_SETUP_FAILED = 126

# Generic syscall numbers: Landlock's are the same on every architecture (444-446).
SYS_LANDLOCK_CREATE_RULESET = 444
SYS_LANDLOCK_ADD_RULE = 445
SYS_LANDLOCK_RESTRICT_SELF = 446
LANDLOCK_CREATE_RULESET_VERSION = 1
LANDLOCK_RULE_PATH_BENEATH = 1
PR_SET_DUMPABLE = 4
PR_SET_NAME = 15
PR_SET_SECCOMP = 22
PR_SET_NO_NEW_PRIVS = 38
SECCOMP_MODE_FILTER = 2
BPF_INSN_SIZE = 8
O_PATH = getattr(os, "O_PATH", 0o10000000)

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long


class LandlockLayer:
    """One Landlock domain: handled rights and ``(path, access mask)`` rules, resolved on the host."""

    __slots__ = ("file_access_mask", "handled_fs", "handled_net", "min_abi", "rules", "scoped")

    def __init__(
        self,
        min_abi: int,
        handled_fs: int,
        handled_net: int,
        scoped: int,
        file_access_mask: int,
        rules: list[tuple[str, int]],
    ) -> None:
        self.min_abi = min_abi
        self.handled_fs = handled_fs
        self.handled_net = handled_net
        self.scoped = scoped
        self.file_access_mask = file_access_mask
        self.rules = rules


class Layer:
    """One layer of restrictions: a Landlock domain and/or a precompiled seccomp program."""

    __slots__ = ("landlock", "name", "seccomp_bpf")

    def __init__(self, name: str, landlock: LandlockLayer | None = None, seccomp_bpf: str | None = None) -> None:
        self.name = name
        self.landlock = landlock
        self.seccomp_bpf = seccomp_bpf


def render_plan(layers: list[Layer]) -> str:
    """The plan file for ``layers`` (host side). Paths must not contain newlines."""
    lines = []
    for layer in layers:
        lines.append(f"layer {layer.name}")
        if layer.landlock is not None:
            ll = layer.landlock
            lines.append(f"landlock {ll.min_abi} {ll.handled_fs} {ll.handled_net} {ll.scoped} {ll.file_access_mask}")
            lines += [f"rule {mask} {path}" for path, mask in ll.rules]
        if layer.seccomp_bpf is not None:
            lines.append(f"seccomp {layer.seccomp_bpf}")
    for line in lines:
        if "\n" in line or "\r" in line:
            raise ValueError(f"plan entry with a line break: {line!r}")
    return "\n".join(lines) + "\n"


def parse_plan(text: str) -> list[Layer]:
    """Read :func:`render_plan`'s output; an unknown or misplaced line is an error."""
    layers: list[Layer] = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line:
            continue
        kind, _, rest = line.partition(" ")
        if kind == "layer":
            layers.append(Layer(rest))
        elif kind == "landlock" and layers:
            abi, fs, net, scoped, file_mask = (int(v) for v in rest.split())
            layers[-1].landlock = LandlockLayer(abi, fs, net, scoped, file_mask, [])
        elif kind == "rule" and layers and layers[-1].landlock is not None:
            mask, _, path = rest.partition(" ")
            layers[-1].landlock.rules.append((path, int(mask)))
        elif kind == "seccomp" and layers:
            layers[-1].seccomp_bpf = rest
        else:
            raise ValueError(f"plan line {number}: {line!r}")
    return layers


class SetupError(Exception):
    """A kernel call failed; the message names the step and the errno."""

    def __init__(self, step: str, err: int) -> None:
        super().__init__(f"kavach-launcher: {step}: {errno.errorcode.get(err, str(err))} ({os.strerror(err)})")


class _RulesetAttr(ctypes.Structure):
    _fields_ = [
        ("handled_access_fs", ctypes.c_uint64),
        ("handled_access_net", ctypes.c_uint64),
        ("scoped", ctypes.c_uint64),
    ]


class _PathBeneathAttr(ctypes.Structure):
    _pack_ = 1  # the kernel's struct landlock_path_beneath_attr is __attribute__((packed))
    _fields_ = [("allowed_access", ctypes.c_uint64), ("parent_fd", ctypes.c_int32)]


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]


def _prctl(option: int, arg2: int, step: str) -> None:
    if _libc.prctl(ctypes.c_int(option), ctypes.c_ulong(arg2), ctypes.c_ulong(0), ctypes.c_ulong(0), 0) != 0:
        raise SetupError(step, ctypes.get_errno())


def landlock_abi() -> int:
    """The kernel's Landlock ABI version (0 when Landlock is unavailable)."""
    abi = _libc.syscall(
        ctypes.c_long(SYS_LANDLOCK_CREATE_RULESET),
        None,
        ctypes.c_size_t(0),
        ctypes.c_uint32(LANDLOCK_CREATE_RULESET_VERSION),
    )
    return max(0, int(abi))


def _attr_size(abi: int) -> int:
    # The kernel rejects fields it does not know unless they are zero, and rejects a size
    # larger than its struct only when the extra bytes are non-zero; sending exactly the
    # fields of this ABI keeps older kernels happy.
    if abi >= 6:
        return 24
    if abi >= 4:
        return 16
    return 8


def apply_landlock(layer: LandlockLayer) -> int:
    """Create, fill and enforce one Landlock domain; returns the ABI used."""
    abi = landlock_abi()
    if abi < layer.min_abi:
        raise SetupError(f"landlock ABI {abi} < required {layer.min_abi}", errno.EOPNOTSUPP)
    attr = _RulesetAttr(layer.handled_fs, layer.handled_net, layer.scoped)
    ruleset = _libc.syscall(
        ctypes.c_long(SYS_LANDLOCK_CREATE_RULESET),
        ctypes.byref(attr),
        ctypes.c_size_t(_attr_size(abi)),
        ctypes.c_uint32(0),
    )
    if ruleset < 0:
        raise SetupError("landlock_create_ruleset", ctypes.get_errno())
    try:
        for path, access in layer.rules:
            try:
                # A missing rule path is an error, as in the Process backend: fail closed
                # rather than run with a rule set other than the one the policy names.
                fd = os.open(path, O_PATH | os.O_CLOEXEC)
            except OSError as exc:
                raise SetupError(f"open {path} for a landlock rule", exc.errno or errno.EIO) from None
            try:
                # A rule on a file may only carry file rights; the host computed both masks.
                is_dir = stat.S_ISDIR(os.fstat(fd).st_mode)
                mask = access if is_dir else access & layer.file_access_mask
                beneath = _PathBeneathAttr(mask, fd)
                rc = _libc.syscall(
                    ctypes.c_long(SYS_LANDLOCK_ADD_RULE),
                    ctypes.c_int(ruleset),
                    ctypes.c_int(LANDLOCK_RULE_PATH_BENEATH),
                    ctypes.byref(beneath),
                    ctypes.c_uint32(0),
                )
                if rc != 0:
                    raise SetupError(f"landlock_add_rule {path}", ctypes.get_errno())
            finally:
                os.close(fd)
        # no_new_privs is already set by the runtime (noNewPrivileges); setting it again is
        # idempotent and makes the launcher safe to run under any runtime config.
        _prctl(PR_SET_NO_NEW_PRIVS, 1, "prctl(PR_SET_NO_NEW_PRIVS)")
        if _libc.syscall(ctypes.c_long(SYS_LANDLOCK_RESTRICT_SELF), ctypes.c_int(ruleset), ctypes.c_uint32(0)) != 0:
            raise SetupError("landlock_restrict_self", ctypes.get_errno())
    finally:
        os.close(ruleset)
    return abi


def load_seccomp(path: str) -> None:
    """Load the raw BPF program in ``path`` (compiled on the host) as one more seccomp filter."""
    with open(path, "rb") as stream:
        program = stream.read()
    if not program or len(program) % BPF_INSN_SIZE:
        raise SetupError(f"read seccomp program {path} ({len(program)} bytes)", errno.EINVAL)
    _prctl(PR_SET_NO_NEW_PRIVS, 1, "prctl(PR_SET_NO_NEW_PRIVS)")
    # The buffer must stay alive while the kernel copies the program (during the call).
    buffer = ctypes.create_string_buffer(program, len(program))
    fprog = _SockFprog(len(program) // BPF_INSN_SIZE, ctypes.cast(buffer, ctypes.c_void_p))
    rc = _libc.prctl(
        ctypes.c_int(PR_SET_SECCOMP), ctypes.c_ulong(SECCOMP_MODE_FILTER), ctypes.byref(fprog), ctypes.c_ulong(0), 0
    )
    if rc != 0:
        raise SetupError(f"prctl(PR_SET_SECCOMP) {path}", ctypes.get_errno())


def apply_plan(layers: list[Layer]) -> str:
    """Apply every layer: all Landlock domains, then all seccomp programs. Returns a report line."""
    domains = abi = loaded = 0
    for layer in layers:
        if layer.landlock is not None:
            abi = apply_landlock(layer.landlock)
            domains += 1
    for layer in layers:
        if layer.seccomp_bpf is not None:
            load_seccomp(layer.seccomp_bpf)
            loaded += 1
    names = ",".join(layer.name for layer in layers)
    return f"landlock_domains={domains} landlock_abi={abi} seccomp_loaded={loaded} layers={names}"


def raise_oom_score_adj() -> None:
    """Make this process (and the command it becomes) the OOM killer's first choice.

    runc 1.1 ignores an exec's ``oomScoreAdj``, and the container's init keeps the caller's
    value: without this, a memory cgroup filled by tmpfs pages (which belong to no process)
    would have its OOM killer pick the init, the largest process, and end the sandbox.
    Raising the value needs no privilege.
    """
    try:
        with open("/proc/self/oom_score_adj", "w", encoding="ascii") as stream:
            stream.write("1000")
    except OSError as exc:
        raise SetupError("write /proc/self/oom_score_adj", exc.errno or 0) from None


def run_exec(args: list[str]) -> int:
    """``exec PLAN [--announce] -- ARGV...``: apply the plan, then replace ourselves with ARGV."""
    if "--" not in args or not args:
        print("kavach-launcher: usage: exec PLAN [--announce] -- ARGV...", file=sys.stderr)
        return 2
    split = args.index("--")
    options, argv = args[:split], args[split + 1 :]
    if not options or not argv:
        print("kavach-launcher: exec needs a plan and a command", file=sys.stderr)
        return 2
    try:
        with open(options[0], encoding="utf-8") as stream:
            layers = parse_plan(stream.read())
        # Ordering: before the plan's Landlock domain, which may leave /proc read-only.
        raise_oom_score_adj()
        report = apply_plan(layers)
    except (SetupError, OSError, ValueError) as exc:
        print(str(exc), file=sys.stderr)
        return EXIT_SETUP_FAILED
    if "--announce" in options[1:]:
        print(f"kavach-launcher: {report}", file=sys.stderr, flush=True)
    try:
        os.execvp(argv[0], argv)  # noqa: S606 - the sandboxed command, exec'd without a shell on purpose
    except OSError as exc:
        # Same message and codes as the Process backend and shells: 127 not found, 126 otherwise.
        print(f"kavach: {argv[0]}: {exc.strerror}", file=sys.stderr)
        return 127 if exc.errno == errno.ENOENT else EXIT_SETUP_FAILED
    return EXIT_SETUP_FAILED  # not reached: execvp returns only by raising


def run_init(args: list[str]) -> int:
    """PID 1: reap every child until SIGTERM/SIGINT, or until the owner's lifeline closes.

    ``--lifeline FD``: the read end of a pipe whose only write end the host's kavach process
    holds. When that process is gone (killed, crashed), the pipe reaches EOF and init exits,
    so the kernel kills every process of the container: a sandbox never runs on with no one
    to enforce its timeout.
    """
    _prctl(PR_SET_DUMPABLE, 0, "prctl(PR_SET_DUMPABLE, 0)")
    # What ps and /proc/1/comm show inside (else "python3").
    name = ctypes.create_string_buffer(b"kavach-init")
    _prctl(PR_SET_NAME, ctypes.addressof(name), "prctl(PR_SET_NAME)")
    lifeline = int(args[1]) if args[:1] == ["--lifeline"] and len(args) == 2 else None
    wanted = {signal.SIGCHLD, signal.SIGTERM, signal.SIGINT}
    if lifeline is not None:
        wanted.add(signal.SIGIO)
    # Blocked and collected with sigwaitinfo, so no SIGCHLD can slip between a reap and the
    # next wait (the race a pause()-based loop has). Ordering: SIGIO is blocked before the
    # lifeline may raise it.
    signal.pthread_sigmask(signal.SIG_BLOCK, wanted)
    if lifeline is not None:
        _watch(lifeline)
        # The owner may have gone before the watch was set up: no SIGIO would come then.
        if _closed(lifeline):
            return 0
    while True:
        info = signal.sigwaitinfo(wanted)
        if info.si_signo in (signal.SIGTERM, signal.SIGINT):
            return 0
        if info.si_signo == signal.SIGIO:
            if lifeline is not None and _closed(lifeline):
                return 0
            continue
        while True:
            try:
                pid, _status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if pid == 0:
                break


def _watch(fd: int) -> None:
    """Have the kernel send this process SIGIO when ``fd`` (a pipe's read end) changes state;
    the last writer's close is one such change (the pipe's fasync readers are signalled)."""
    import fcntl  # init only: not on the start-up path of every exec

    fcntl.fcntl(fd, fcntl.F_SETFD, fcntl.FD_CLOEXEC)
    fcntl.fcntl(fd, fcntl.F_SETOWN, os.getpid())
    flags = fcntl.fcntl(fd, fcntl.F_GETFL)
    fcntl.fcntl(fd, fcntl.F_SETFL, flags | os.O_NONBLOCK | os.O_ASYNC)


def _closed(fd: int) -> bool:
    """Whether the pipe ``fd`` is at EOF (every write end closed); data, never sent, is dropped."""
    try:
        return os.read(fd, 64) == b""
    except BlockingIOError:
        return False


def run_listen(args: list[str]) -> int:
    """``listen HOST PORT UNIX_SOCKET``: hand a listening socket of this namespace to the host."""
    import socket  # only this mode needs it (start-up time of every exec)

    if len(args) != 3:
        print("kavach-launcher: usage: listen HOST PORT UNIX_SOCKET", file=sys.stderr)
        return 2
    host, port, unix_path = args[0], int(args[1]), args[2]
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as listener:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((host, port))
        listener.listen(128)
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as channel:
            channel.connect(unix_path)
            socket.send_fds(channel, [b"L"], [listener.fileno()])
            # Stay alive until the host acknowledges: it checks (SO_PEERCRED) that the
            # sender is a process of this sandbox, which needs the sender to still exist.
            channel.recv(1)
    return 0


def main(argv: list[str]) -> int:
    """Entry point: ``launcher.py init``, ``exec ...`` or ``listen ...``."""
    if argv[:1] == ["init"]:
        return run_init(argv[1:])
    if argv[:1] == ["listen"]:
        try:
            return run_listen(argv[1:])
        except OSError as exc:
            print(f"kavach-launcher: listen: {exc}", file=sys.stderr)
            return EXIT_SETUP_FAILED
    if argv[:1] == ["exec"]:
        return run_exec(argv[1:])
    usage = "launcher.py init [--lifeline FD] | exec PLAN [--announce] -- ARGV..."
    print(f"kavach-launcher: usage: {usage}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
