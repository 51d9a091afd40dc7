"""The attacker's side of ``test_escape_cli.py``: this file runs INSIDE the sandbox.

It is shipped to ``/usr/bin/python3 -c`` (base64-wrapped, so the command-line guards do not
refuse it before the sandbox itself is tested) and writes one JSON object to
``$KV_OUT/results.json``: for every named check ``{"ok": bool, "detail": str}``, plus raw
dumps the host side inspects itself (every readable ``/proc/*/environ`` and ``cmdline``, so
the host can look for its canary value, which the sandbox is never told).

Every dangerous syscall is attempted in a forked child, so a SIGSYS kill (seccomp) or a
crash counts as one refused attempt instead of ending the probe. An attempt counts as
refused only when it fails with a permission-style errno (EPERM, EACCES, ENOSYS, EROFS ...)
or the child is killed by a signal; the arguments are chosen so that each call would
succeed on an unconfined host, so a refusal is the sandbox's doing, not a bad argument.
It must stay importable by Debian's Python 3.11 with the standard library only.
"""

from __future__ import annotations

import ctypes
import errno
import functools
import json
import os
import signal
import socket
import stat
import struct
import subprocess
import sys
import time
import traceback
from collections.abc import Callable

OUT = os.environ.get("KV_OUT", "/tmp/out")
RESULTS: dict[str, dict[str, object]] = {}
RAW: dict[str, object] = {}

# Errnos that mean "you may not": anything else (EINVAL, EBADF ...) would mean the call
# reached the kernel's argument checks, i.e. the sandbox did not stop it.
DENIED = {errno.EPERM, errno.EACCES, errno.ENOSYS, errno.EROFS, errno.ENOENT, errno.ENXIO, errno.ENOTTY}


# Taken first, before the probe opens anything: what the sandbox handed the command.
def _open_fds() -> dict[str, str]:
    fds = {}
    for fd in os.listdir("/proc/self/fd"):
        try:
            fds[fd] = os.readlink(f"/proc/self/fd/{fd}")
        except FileNotFoundError:  # the descriptor listdir itself used, closed by now
            continue
    return fds


STARTING_FDS = _open_fds()

libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long


def record(name: str, ok: bool, detail: object = "") -> None:
    RESULTS[name] = {"ok": bool(ok), "detail": str(detail)[:2000]}


def check(name: str) -> Callable[[Callable[[], None]], Callable[[], None]]:
    """Decorator: run the check now; an exception is a failed check with its traceback."""

    def run(fn: Callable[[], None]) -> Callable[[], None]:
        try:
            fn()
        except Exception:  # the probe must report every check, whatever breaks
            record(name, False, "probe error: " + traceback.format_exc()[-1500:])
        return fn

    return run


def _arg(x: object) -> object:
    return ctypes.c_long(x) if isinstance(x, int) else x


def sys_call(nr: int, *args: object) -> tuple[int, int]:
    ctypes.set_errno(0)
    ret = libc.syscall(ctypes.c_long(nr), *[_arg(a) for a in args])
    return ret, ctypes.get_errno()


def in_child(fn: Callable[[], tuple[int, int]]) -> tuple[str, int, int]:
    """Run fn() -> (ret, errno) in a forked child; ('signal', signo, 0) if it was killed."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        try:
            ret, err = fn()
        except OSError as exc:
            ret, err = -1, exc.errno or 0
        except BaseException:  # report anything else as a non-refusal so it is looked at
            ret, err = -2, 0
        os.write(w, json.dumps([ret, err]).encode())
        os._exit(0)
    os.close(w)
    data = b""
    while chunk := os.read(r, 4096):
        data += chunk
    os.close(r)
    _, status = os.waitpid(pid, 0)
    if os.WIFSIGNALED(status):
        return ("signal", os.WTERMSIG(status), 0)
    ret, err = json.loads(data)
    return ("ret", ret, err)


def refused(outcome: tuple[str, int, int]) -> bool:
    kind, value, err = outcome
    return kind == "signal" or (value == -1 and err in DENIED)


def describe(outcome: tuple[str, int, int]) -> str:
    kind, value, err = outcome
    if kind == "signal":
        return f"killed by signal {value}"
    return f"ret={value} errno={errno.errorcode.get(err, err)}"


def buf(size: int) -> ctypes.Array[ctypes.c_char]:
    return ctypes.create_string_buffer(size)


# -- syscalls that must be refused (x86_64 numbers) --------------------------------------

CLONE_NEWUSER = 0x10000000
CLONE_NEWNS = 0x00020000
CLONE_NEWNET = 0x40000000
CLONE_NEWPID = 0x20000000


def _clone_newuser() -> tuple[int, int]:
    ret, err = sys_call(56, CLONE_NEWUSER | signal.SIGCHLD, 0, 0, 0, 0)
    if ret == 0:
        os._exit(0)  # the grandchild: it exists, so the attempt succeeded
    return ret, err


def _clone3_newuser() -> tuple[int, int]:
    args = struct.pack("QQQQQQQQQQQ", CLONE_NEWUSER, 0, 0, 0, signal.SIGCHLD, 0, 0, 0, 0, 0, 0)
    ret, err = sys_call(435, ctypes.c_char_p(args), len(args))
    if ret == 0:
        os._exit(0)
    return ret, err


def _perf_attr() -> ctypes.Array[ctypes.c_char]:
    attr = buf(128)
    # type=PERF_TYPE_SOFTWARE(1), size=128, config=PERF_COUNT_SW_CPU_CLOCK(0),
    # flags: disabled(bit0) | exclude_kernel(bit5) | exclude_hv(bit6): allowed at paranoid 2.
    struct.pack_into("IIQQQQ", attr, 0, 1, 128, 0, 0, 0, (1 << 0) | (1 << 5) | (1 << 6))
    return attr


def _io_uring() -> tuple[int, int]:
    return sys_call(425, 4, buf(120))


def _bpf_map() -> tuple[int, int]:
    attr = buf(128)
    struct.pack_into("IIII", attr, 0, 2, 4, 4, 1)  # BPF_MAP_TYPE_ARRAY, key 4, value 4, 1 entry
    return sys_call(321, 0, attr, 128)


def _ptrace_own_child() -> tuple[int, int]:
    victim = os.fork()
    if victim == 0:
        time.sleep(5)
        os._exit(0)
    try:
        return sys_call(101, 16, victim, 0, 0)  # PTRACE_ATTACH: same uid, would succeed unconfined
    finally:
        os.kill(victim, signal.SIGKILL)


def _tiocsti_own_pty() -> tuple[int, int]:
    # A pty of our own as controlling terminal: with legacy TIOCSTI enabled (this kernel), the
    # ioctl succeeds unless the sandbox filters it. No /dev/ptmx at all is a refusal too.
    _master, slave = os.openpty()
    os.setsid()
    import fcntl
    import termios

    fcntl.ioctl(slave, termios.TIOCSCTTY, 0)
    ret, err = sys_call(16, slave, termios.TIOCSTI, ctypes.c_char_p(b"x"))
    return ret, err


def _tiocsti_high_bits() -> tuple[int, int]:
    _master, slave = os.openpty()
    os.setsid()
    import fcntl
    import termios

    fcntl.ioctl(slave, termios.TIOCSCTTY, 0)
    return sys_call(16, slave, 0x100000000 | termios.TIOCSTI, ctypes.c_char_p(b"x"))


def _open_by_handle() -> tuple[int, int]:
    handle = buf(8 + 128)
    struct.pack_into("I", handle, 0, 128)
    mount_id = ctypes.c_int(0)
    ret, err = sys_call(303, -100, b"/usr", handle, ctypes.byref(mount_id), 0)  # name_to_handle_at
    if ret != 0:
        return ret, err
    return sys_call(304, -100, handle, os.O_RDONLY)  # open_by_handle_at: the "shocker" escape


def _pidfd_getfd_init() -> tuple[int, int]:
    pidfd, err = sys_call(434, 1, 0)  # pidfd_open(1)
    if pidfd < 0:
        return pidfd, err
    return sys_call(438, pidfd, 0, 0)  # pidfd_getfd: steal init's fd 0


def _raw_socket() -> tuple[int, int]:
    s = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
    s.close()
    return 0, 0


def _packet_socket() -> tuple[int, int]:
    s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0x0300)
    s.close()
    return 0, 0


def _netlink_add_address() -> tuple[int, int]:
    # RTM_NEWADDR 10.66.0.1/24 on lo (ifindex 1): needs CAP_NET_ADMIN over the netns.
    s = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, 0)
    ifa = struct.pack("BBBBI", socket.AF_INET, 24, 0, 0, 1)
    rta = struct.pack("HH4s", 8, 2, socket.inet_aton("10.66.0.1"))  # IFA_LOCAL
    body = ifa + rta
    nlh = struct.pack("IHHII", 16 + len(body), 20, 0x1 | 0x4 | 0x400 | 0x200, 1, 0)  # REQUEST|ACK|CREATE|EXCL
    s.sendto(nlh + body, (0, 0))
    reply = s.recv(4096)
    s.close()
    msg_type = struct.unpack_from("H", reply, 4)[0]
    if msg_type == 2:  # NLMSG_ERROR
        code = struct.unpack_from("i", reply, 16)[0]
        return (0, 0) if code == 0 else (-1, -code)
    return 0, 0


def _mount_tmpfs() -> tuple[int, int]:
    os.makedirs("/tmp/kv-mnt", exist_ok=True)
    return sys_call(165, b"none", b"/tmp/kv-mnt", b"tmpfs", 0, 0)


def _personality() -> tuple[int, int]:
    # READ_IMPLIES_EXEC makes every readable mapping executable; Docker's profile refuses it.
    ret, err = sys_call(135, 0x0400000)
    if ret == -1:
        return ret, err
    current, err = sys_call(135, 0xFFFFFFFF)
    return (0, 0) if current & 0x0400000 else (-1, errno.EPERM)


def _int80(nr: int, ebx: int) -> tuple[int, int]:
    # An i386 syscall from a 64-bit process: the filter's architecture check must kill it,
    # otherwise i386 numbers (a different table) would bypass every x86_64 rule.
    import mmap

    code = b"\x53\xb8" + struct.pack("<I", nr) + b"\xbb" + struct.pack("<I", ebx) + b"\xcd\x80\x5b\xc3"
    page = mmap.mmap(-1, 4096, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
    page.write(code)
    function = ctypes.CFUNCTYPE(ctypes.c_int)(ctypes.addressof(ctypes.c_char.from_buffer(page)))
    ret = function()
    return (ret, 0) if ret >= 0 else (-1, -ret)


def _mknod(kind: int, dev: tuple[int, int]) -> tuple[int, int]:
    os.mknod("/tmp/kv-node", kind | 0o666, os.makedev(*dev))
    return 0, 0


SYSCALLS = {
    "mount_tmpfs": _mount_tmpfs,
    "mount_bind_root": lambda: sys_call(165, b"/", b"/tmp", None, 0x1000 | 0x4000, 0),  # MS_BIND|MS_REC
    "umount_proc": lambda: sys_call(166, b"/proc", 2),
    "unshare_user": lambda: sys_call(272, CLONE_NEWUSER),
    "unshare_user_mount": lambda: sys_call(272, CLONE_NEWUSER | CLONE_NEWNS),
    "unshare_net": lambda: sys_call(272, CLONE_NEWNET),
    "unshare_pid": lambda: sys_call(272, CLONE_NEWPID),
    "clone_newuser": _clone_newuser,
    "clone3_newuser": _clone3_newuser,
    "setns_init_mnt": lambda: sys_call(308, os.open("/proc/1/ns/mnt", os.O_RDONLY), 0),
    "keyctl_session": lambda: sys_call(250, 0, -3, 1, 0, 0),  # KEYCTL_GET_KEYRING_ID, create
    "add_key": lambda: sys_call(248, b"user", b"kv", b"secret", 6, -3),
    "request_key": lambda: sys_call(249, b"user", b"kv", None, 0),
    "io_uring_setup": _io_uring,
    "ptrace_traceme": lambda: sys_call(101, 0, 0, 0, 0),
    "ptrace_attach_own_child": _ptrace_own_child,
    "ptrace_attach_pid1": lambda: sys_call(101, 16, 1, 0, 0),
    "ptrace_seize_pid1": lambda: sys_call(101, 0x4206, 1, 0, 0),
    "process_vm_readv_pid1": lambda: sys_call(310, 1, buf(16), 1, buf(16), 1, 0),
    "pidfd_getfd_init": _pidfd_getfd_init,
    "bpf_map_create": _bpf_map,
    "perf_event_open_self": lambda: sys_call(298, _perf_attr(), 0, -1, -1, 0),
    "userfaultfd_user_mode": lambda: sys_call(323, 1),  # UFFD_USER_MODE_ONLY: allowed unconfined
    "init_module": lambda: sys_call(175, buf(64), 64, b""),
    "finit_module": lambda: sys_call(313, os.open("/usr/bin/true", os.O_RDONLY), b"", 0),
    "kexec_load": lambda: sys_call(246, 0, 0, 0, 0),
    "open_tree_usr": lambda: sys_call(428, -100, b"/usr", 1),  # OPEN_TREE_CLONE
    "fsopen_tmpfs": lambda: sys_call(430, b"tmpfs", 0),
    "fspick_root": lambda: sys_call(433, -100, b"/", 0),
    "move_mount": lambda: sys_call(429, -100, b"/tmp", -100, b"/work", 0),
    "chroot_tmp": lambda: sys_call(161, b"/tmp"),
    "pivot_root": lambda: sys_call(155, b"/tmp", b"/tmp"),
    "sethostname": lambda: sys_call(170, b"pwned", 5),
    "setdomainname": lambda: sys_call(171, b"pwned", 5),
    "tiocsti_own_pty": _tiocsti_own_pty,
    "tiocsti_high_bits_own_pty": _tiocsti_high_bits,
    "tiocsti_stdin": lambda: sys_call(16, 0, 0x5412, ctypes.c_char_p(b"x")),
    "mknod_char_mem": lambda: _mknod(stat.S_IFCHR, (1, 1)),
    "mknod_block": lambda: _mknod(stat.S_IFBLK, (254, 0)),
    "open_by_handle_at": _open_by_handle,
    "raw_socket": _raw_socket,
    "packet_socket": _packet_socket,
    "netlink_add_address": _netlink_add_address,
    "syslog_read_all": lambda: sys_call(103, 3, buf(4096), 4096),
    "iopl": lambda: sys_call(172, 3),
    "ioperm": lambda: sys_call(173, 0x80, 1, 1),
    "acct": lambda: sys_call(163, b"/tmp/acct"),
    "swapon": lambda: sys_call(167, b"/tmp/swap", 0),
    "reboot_cad_off": lambda: sys_call(169, 0xFEE1DEAD, 672274793, 0, 0),
    "settimeofday": lambda: sys_call(164, buf(16), 0),
    "clock_settime": lambda: sys_call(227, 0, buf(16)),
    "fanotify_init": lambda: sys_call(300, 0, 0),
    "quotactl": lambda: sys_call(179, 0x800002, b"/dev/null", 0, 0),
    "personality_read_implies_exec": _personality,
    "x32_unshare_user": lambda: sys_call(0x40000000 + 272, CLONE_NEWUSER),
    "i386_unshare_user": lambda: _int80(310, CLONE_NEWUSER),
    "i386_keyctl": lambda: _int80(288, 0),
}


@check("dangerous_syscalls_refused")
def _syscalls() -> None:
    outcomes = {name: in_child(fn) for name, fn in SYSCALLS.items()}
    RAW["syscalls"] = {name: describe(o) for name, o in outcomes.items()}
    for name, outcome in outcomes.items():
        record(f"syscall:{name}", refused(outcome), describe(outcome))
    record("dangerous_syscalls_refused", all(refused(o) for o in outcomes.values()), "see syscall:*")


# -- tools an attacker would reach for ---------------------------------------------------

TOOLS = {
    "unshare_U": ["unshare", "-U", "true"],
    "unshare_map_root_mount": ["unshare", "-r", "-m", "true"],
    "unshare_net": ["unshare", "-n", "true"],
    "nsenter_pid1_mnt": ["nsenter", "-t", "1", "-m", "true"],
    "nsenter_pid1_all": ["nsenter", "-t", "1", "-a", "true"],
    "mount_tmpfs": ["mount", "-t", "tmpfs", "none", "/tmp"],
    "mount_proc": ["mount", "-t", "proc", "proc", "/tmp"],
    "chroot": ["chroot", "/tmp", "/bin/true"],
    "pivot_root": ["pivot_root", "/tmp", "/tmp"],
    "mknod_mem": ["mknod", "/tmp/mem", "c", "1", "1"],
    "ip_link_add_dummy": ["ip", "link", "add", "kv0", "type", "dummy"],
    "ip_addr_add": ["ip", "addr", "add", "10.66.0.2/24", "dev", "lo"],
    "ip_route_add": ["ip", "route", "add", "10.67.0.0/16", "dev", "lo"],
    "ip_link_lo_down": ["ip", "link", "set", "lo", "down"],
    "hostname_set": ["hostname", "pwned"],
    "date_set": ["date", "-s", "2000-01-01"],
    "setpriv_all_caps": ["setpriv", "--inh-caps", "+all", "--ambient-caps", "+all", "true"],
    "capsh_add_sys_admin": ["capsh", "--caps=cap_sys_admin+eip", "--", "-c", "true"],
}


@check("attack_tools_fail")
def _tools() -> None:
    failures = []
    for name, argv in TOOLS.items():
        try:
            proc = subprocess.run(argv, capture_output=True, timeout=10, check=False)
            outcome = f"exit {proc.returncode}: {proc.stderr[-200:]!r}"
            ok = proc.returncode != 0
        except OSError as exc:  # not even executable: refused
            outcome, ok = f"exec failed: {exc}", True
        record(f"tool:{name}", ok, outcome)
        if not ok:
            failures.append(name)
    record("attack_tools_fail", not failures, failures)


# -- processes, environment ---------------------------------------------------------------


def _pids() -> list[int]:
    return sorted(int(p) for p in os.listdir("/proc") if p.isdigit())


def _read(path: str, limit: int = 1 << 20) -> bytes:
    with open(path, "rb") as f:
        return f.read(limit)


@check("pid1_is_kavach_init")
def _pid1() -> None:
    cmdline = _read("/proc/1/cmdline").replace(b"\0", b" ").decode(errors="replace")
    comm = _read("/proc/1/comm").decode(errors="replace").strip()
    RAW["pid1"] = {"cmdline": cmdline, "comm": comm}
    record("pid1_is_kavach_init", "kavach" in cmdline, f"comm={comm} cmdline={cmdline[:200]}")


@check("host_processes_invisible")
def _host_procs() -> None:
    marker = os.environ["KV_HOST_MARKER"].encode()
    seen = []
    for pid in _pids():
        try:
            cmd = _read(f"/proc/{pid}/cmdline")
            comm = _read(f"/proc/{pid}/comm").strip()
        except OSError:
            continue
        seen.append((pid, comm.decode(errors="replace")))
        if marker in cmd:
            record("host_processes_invisible", False, f"host bait process visible as pid {pid}")
            return
    host_names = {"systemd", "sshd", "pytest", "cron", "runc", "dockerd", "containerd", "agetty"}
    leaked = [entry for entry in seen if entry[1] in host_names]
    record("host_processes_invisible", not leaked and len(seen) < 30, f"{len(seen)} pids: {seen[:40]}")


@check("environ_dump")
def _environ() -> None:
    dump = {}
    for pid in _pids():
        for name in ("environ", "cmdline"):
            try:
                dump[f"{pid}/{name}"] = _read(f"/proc/{pid}/{name}").decode("latin-1")
            except OSError as exc:
                dump[f"{pid}/{name}"] = f"<{errno.errorcode.get(exc.errno or 0)}>"
    dump["os.environ"] = json.dumps(dict(os.environ))
    RAW["environ"] = dump
    record("environ_dump", True, f"{len(dump)} entries")
    record("env_positive_control", os.environ.get("KV_VISIBLE") == "yes", os.environ.get("KV_VISIBLE"))


@check("signals_to_pid1_ignored")
def _signals() -> None:
    results = {}
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1, signal.SIGSTOP, signal.SIGKILL):
        try:
            os.kill(1, sig)
            results[sig.name] = "delivered"
        except OSError as exc:
            results[sig.name] = errno.errorcode.get(exc.errno or 0, "?")
    time.sleep(0.3)
    state = _read("/proc/1/stat").split(b") ")[1][:1].decode()
    alive = subprocess.run(["/bin/echo", "still-here"], capture_output=True, check=False).stdout == b"still-here\n"
    record("signals_to_pid1_ignored", alive and state not in ("T", "Z", "X"), f"{results} state={state}")


@check("pid1_and_siblings_memory_unreadable")
def _memory() -> None:
    me = os.getpid()
    readable = []
    for pid in _pids():
        if pid == me:
            continue
        try:
            with open(f"/proc/{pid}/mem", "rb") as f:
                maps = _read(f"/proc/{pid}/maps").split(b"\n")[0]
                start = int(maps.split(b"-")[0], 16)
                f.seek(start)
                if f.read(16):
                    readable.append(pid)
        except (OSError, ValueError):
            continue
    record("pid1_and_siblings_memory_unreadable", not readable, f"readable: {readable}")


@check("proc1_links_closed")
def _proc1_links() -> None:
    findings: dict[str, object] = {}
    for link in ("exe", "root", "cwd"):
        try:
            target = os.readlink(f"/proc/1/{link}")
            findings[link] = target
        except OSError as exc:
            findings[link] = errno.errorcode.get(exc.errno or 0, "?")
    # Traversal through init's root: only the sandbox's own tree may show up there.
    host_only = []
    for path in ("/proc/1/root/root", "/proc/1/root/home", "/proc/1/root/work/main", "/proc/1/root/var/lib"):
        if os.path.lexists(path):
            host_only.append(path)
    try:
        fds = {fd: os.readlink(f"/proc/1/fd/{fd}") for fd in os.listdir("/proc/1/fd")}
    except OSError as exc:
        fds = {"error": errno.errorcode.get(exc.errno or 0, "?")}
    findings["fds"] = fds
    bad_fds = [t for t in fds.values() if t.startswith("/") and not t.startswith(("/dev/null", "/dev/pts"))]
    try:
        env = _read("/proc/1/environ")
    except OSError:
        env = b""
    findings["environ_bytes"] = len(env)
    record("proc1_links_closed", not host_only and not bad_fds, f"{findings} host_only={host_only}")


@check("other_processes_fds_closed")
def _other_fds() -> None:
    # kavach's own processes in the sandbox (init, the exec child that started this command,
    # a warm child) hold pipes and sockets to the host: reopening one through /proc would
    # let the command forge what the host reads. Only the command's own fds may be open.
    me = os.getpid()
    reopened = []
    listed = {}
    for pid in _pids():
        if pid == me:
            continue
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError as exc:
            listed[pid] = errno.errorcode.get(exc.errno or 0, "?")
            continue
        listed[pid] = str(len(fds))
        for fd in fds:
            try:
                os.close(os.open(f"/proc/{pid}/fd/{fd}", os.O_RDWR | os.O_NONBLOCK))
                reopened.append(f"{pid}/{fd}")
            except OSError:
                continue
    record("other_processes_fds_closed", not reopened, f"reopened={reopened} listing={listed}")
    # Positive control: the same reopening works on a child of our own (so a refusal above
    # is the sandbox's protection of kavach's processes, not a broken technique).
    child = subprocess.Popen(["/bin/sleep", "5"], stdin=subprocess.PIPE)
    try:
        os.close(os.open(f"/proc/{child.pid}/fd/0", os.O_RDWR | os.O_NONBLOCK))
        control = "reopened"
    except OSError as exc:
        control = errno.errorcode.get(exc.errno or 0, "?")
    finally:
        child.kill()
        child.wait()
    record("fd_reopen_positive_control", control == "reopened", control)


def _open_for_write(path: str) -> tuple[int, int]:
    return os.open(path, os.O_WRONLY), 0


def _read_length(path: str) -> tuple[int, int]:
    return len(_read(path, 4096)), 0


@check("self_exe_not_writable")
def _self_exe() -> None:
    outcomes = {}
    for path in ("/proc/self/exe", "/proc/1/exe", "/usr/bin/python3", "/bin/sh"):
        outcomes[path] = in_child(functools.partial(_open_for_write, path))
    record(
        "self_exe_not_writable",
        all(refused(o) or (o[0] == "ret" and o[2] == errno.ETXTBSY) for o in outcomes.values()),
        {k: describe(v) for k, v in outcomes.items()},
    )


@check("only_stdio_fds_at_start")
def _start_fds() -> None:
    record("only_stdio_fds_at_start", set(STARTING_FDS) <= {"0", "1", "2"}, STARTING_FDS)


@check("stray_fds_closed")
def _fds() -> None:
    fds = {}
    for fd in os.listdir("/proc/self/fd"):
        try:
            fds[fd] = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
    # 0-2 plus the probe's own open files; a leaked directory fd would allow openat(fd, "..").
    dirs = []
    for fd, target in fds.items():
        try:
            if stat.S_ISDIR(os.fstat(int(fd)).st_mode):
                dirs.append((fd, target))
        except OSError:
            continue
    record("stray_fds_closed", not dirs, f"{fds} dirs={dirs}")


# -- network -----------------------------------------------------------------------------


@check("only_loopback")
def _net() -> None:
    try:
        names = sorted(name for _, name in socket.if_nameindex())
    except OSError:  # netlink itself refused (strict seccomp): /proc/net/dev still tells
        names = ["lo"]
    dev = [line.split(":")[0].strip() for line in _read("/proc/net/dev").decode().splitlines()[2:]]
    record("only_loopback", names == ["lo"] and dev == ["lo"], f"if_nameindex={names} /proc/net/dev={dev}")


@check("host_tcp_listener_unreachable")
def _tcp() -> None:
    port = int(os.environ["KV_TCP_PORT"])
    results = {}
    for host in ("127.0.0.1", "localhost", "::1", os.environ.get("KV_HOST_IP", "127.0.0.1")):
        try:
            socket.create_connection((host, port), timeout=2).close()
            results[host] = "connected"
        except OSError as exc:
            results[host] = errno.errorcode.get(exc.errno or 0, str(exc))
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        udp.sendto(b"escaped", ("127.0.0.1", int(os.environ["KV_UDP_PORT"])))
    except OSError:
        pass  # refused outright is fine: the host side checks that nothing arrived
    finally:
        udp.close()
    record("host_tcp_listener_unreachable", "connected" not in results.values(), results)


@check("host_abstract_socket_unreachable")
def _abstract() -> None:
    name = "\0" + os.environ["KV_ABSTRACT"]
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.connect(name)
        outcome = "connected"
    except OSError as exc:
        outcome = errno.errorcode.get(exc.errno or 0, str(exc))
    finally:
        s.close()
    # The abstract namespace belongs to the network namespace: none of the host's names
    # (systemd, dbus, X11 ...) may be listed either.
    listed = [line for line in _read("/proc/net/unix").decode().splitlines()[1:] if "@" in line]
    record("host_abstract_socket_unreachable", outcome != "connected" and not listed, f"{outcome}; listed={listed[:5]}")


# -- filesystem ----------------------------------------------------------------------------

HOST_PATHS = [
    "/root",
    "/home",
    "/var/lib",
    "/var/run/docker.sock",
    "/run",
    "/boot",
    "/srv",
    "/mnt",
    "/media",
    "/opt",
    "/lost+found",
    "/etc/sha" + "dow",
    "/etc/sudo" + "ers",
    "/etc/ssh",
    "/root/.ssh",
    "/work/main",
    "/work/shared",
]


@check("host_paths_absent")
def _host_paths() -> None:
    extra = [p for p in os.environ.get("KV_HOST_PATHS", "").split(":") if p]
    present = {}
    for path in HOST_PATHS + extra:
        try:
            os.lstat(path)
            present[path] = "exists"
        except FileNotFoundError:
            continue
        except OSError as exc:
            present[path] = errno.errorcode.get(exc.errno or 0, "?")
    record("host_paths_absent", not present, present)


@check("work_is_empty_sandbox_dir")
def _work() -> None:
    entries = sorted(os.listdir("/work"))
    record("work_is_empty_sandbox_dir", entries == [], entries)


@check("audit_files_invisible")
def _audit() -> None:
    found = []
    for root, dirs, files in os.walk("/", onerror=lambda e: None):
        if root in ("/proc", "/sys", "/usr"):
            dirs[:] = []
            continue
        for name in files:
            if name.startswith(("audit.key", "audit.jsonl", "offenders.sqlite")):
                found.append(os.path.join(root, name))
    for env in ("KAVACH_DATA_DIR", "KAVACH_AUDIT_KEY", "KAVACH_AUDIT_KEY_FILE", "KAVACH_AUDIT_LOG"):
        if env in os.environ:
            found.append(f"${env}")
    record("audit_files_invisible", not found, found)


WRITE_TARGETS = [
    "/kv-evil",
    "/usr/kv-evil",
    "/usr/bin/kv-evil",
    "/bin/kv-evil",
    "/lib/kv-evil",
    "/etc/kv-evil",
    "/etc/passwd",
    "/etc/hosts",
    "/proc/kv-evil",
    "/proc/sys/kernel/core_pattern",
    "/proc/sys/kernel/hostname",
    "/proc/sys/vm/drop_caches",
    "/proc/sysrq-trigger",
    "/proc/self/attr/current",
    "/sys/kernel/uevent_helper",
    "/sys/fs/cgroup/kv-evil",
    "/sys/fs/cgroup/memory/release_agent",
    "/sys/fs/cgroup/pids/release_agent",
]


def _try_write(path: str) -> str:
    try:
        with open(path, "ab") as f:
            f.write(b"|/tmp/kv-evil\n")
        return "written"
    except OSError as exc:
        return errno.errorcode.get(exc.errno or 0, "?")


def _mkdir_in_dev() -> tuple[int, int]:
    os.mkdir("/dev/kv-dir")
    return 0, 0


@check("writes_outside_writable_paths_fail")
def _writes() -> None:
    ro = os.environ["KV_RO"]
    targets = [*WRITE_TARGETS, f"{ro}/kept.txt", f"{ro}/kv-new"]
    outcomes = {path: _try_write(path) for path in targets}
    operations: dict[str, Callable[[], None]] = {
        "ro_unlink": lambda: os.unlink(f"{ro}/kept.txt"),
        "ro_rename": lambda: os.rename(f"{ro}/kept.txt", f"{ro}/moved"),
        "ro_chmod": lambda: os.chmod(f"{ro}/kept.txt", 0o777),
        "ro_mkdir": lambda: os.mkdir(f"{ro}/kv-dir"),
        "usr_mkdir": lambda: os.mkdir("/usr/kv-dir"),
        "etc_symlink": lambda: os.symlink("/tmp", "/etc/kv-link"),
    }
    for op, fn in operations.items():
        try:
            fn()
            outcomes[op] = "done"
        except OSError as exc:
            outcomes[op] = errno.errorcode.get(exc.errno or 0, "?")
    bad = {k: v for k, v in outcomes.items() if v in ("written", "done")}
    record("writes_outside_writable_paths_fail", not bad, f"bad={bad} all={outcomes}")
    dev = {path: _try_write(path) for path in ("/dev/kv-evil", "/dev/shm/../kv-evil")}
    mkdir = in_child(_mkdir_in_dev)
    dev["mkdir"] = describe(mkdir)
    record("dev_not_writable", "written" not in dev.values() and refused(mkdir), dev)
    positive = _try_write("/tmp/ok") == "written" and _try_write("/work/ok") == "written"
    record("writable_paths_positive_control", positive, "tmp and work writable")


@check("proc_sensitive_masked")
def _masked() -> None:
    leaks = {}
    for path in (
        "/proc/kcore",
        "/proc/keys",
        "/proc/timer_list",
        "/proc/kallsyms",
        "/proc/sched_debug",
        "/proc/kmsg",
        "/proc/kpagecount",
        "/proc/kpageflags",
        "/proc/config.gz",
        "/proc/sysrq-trigger",
        "/sys/firmware/dmi/tables/DMI",
        "/sys/kernel/security",
    ):
        try:
            if os.path.isdir(path):
                if os.listdir(path):
                    leaks[path] = "non-empty dir"
                continue
            data = in_child(functools.partial(_read_length, path))
            if data[0] == "ret" and data[1] > 0:
                leaks[path] = f"{data[1]} bytes"
        except OSError:
            continue
    # kallsyms through a pid's own view, and /proc/key-users is harmless (counts) only if empty
    record("proc_sensitive_masked", not leaks, leaks)


@check("sys_absent_or_read_only")
def _sys() -> None:
    problems = []
    for line in _read("/proc/self/mountinfo").decode().splitlines():
        fields = line.split()
        mountpoint, options = fields[4], fields[5]
        if (mountpoint == "/sys" or mountpoint.startswith("/sys/")) and "ro" not in options.split(","):
            problems.append(f"{mountpoint} {options}")
        if (mountpoint.startswith("/proc/sys") or mountpoint == "/proc/sysrq-trigger") and "ro" not in options.split(
            ","
        ):
            problems.append(f"{mountpoint} {options}")
    if not any(line.split()[4] == "/proc/sys" for line in _read("/proc/self/mountinfo").decode().splitlines()):
        problems.append("/proc/sys is not a read-only mount")
    record("sys_absent_or_read_only", not problems, problems)


ALLOWED_DEVICES = {(1, 3), (1, 5), (1, 7), (1, 8), (1, 9), (5, 0), (5, 2)}  # null zero full random urandom tty ptmx


@check("dev_minimal")
def _dev() -> None:
    bad = []
    names = []
    for root, dirs, files in os.walk("/dev"):
        for name in dirs + files:
            path = os.path.join(root, name)
            names.append(path)
            try:
                st = os.lstat(path)
            except OSError:
                continue
            if stat.S_ISBLK(st.st_mode):
                bad.append(f"{path} block {os.major(st.st_rdev)}:{os.minor(st.st_rdev)}")
            elif stat.S_ISCHR(st.st_mode):
                dev = (os.major(st.st_rdev), os.minor(st.st_rdev))
                if dev not in ALLOWED_DEVICES and not (root == "/dev/pts" and dev[0] in (5, 136)):
                    bad.append(f"{path} char {dev[0]}:{dev[1]}")
    for forbidden in ("/dev/mem", "/dev/kmem", "/dev/port", "/dev/kmsg", "/dev/console", "/dev/vda", "/dev/sda"):
        if os.path.lexists(forbidden):
            bad.append(f"{forbidden} exists")
    shm = os.listdir("/dev/shm") if os.path.isdir("/dev/shm") else []
    if shm:
        bad.append(f"/dev/shm not empty: {shm}")
    record("dev_minimal", not bad, f"bad={bad} all={sorted(names)}")


# -- privileges ----------------------------------------------------------------------------


@check("no_capabilities_after_exec")
def _caps() -> None:
    # A fresh execve: root in a user namespace regains every capability in the bounding set
    # on exec unless the bounding set is empty, so this is the check that matters.
    out = subprocess.run(["/bin/cat", "/proc/self/status"], capture_output=True, check=False).stdout.decode()
    fields = dict(line.split(":\t", 1) for line in out.splitlines() if ":\t" in line)
    want = {"CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"}
    caps = {k: fields.get(k, "?").strip() for k in want}
    ok = all(v == "0000000000000000" for v in caps.values())
    ok = ok and fields.get("NoNewPrivs", "").strip() == "1" and fields.get("Seccomp", "").strip() == "2"
    record(
        "no_capabilities_after_exec",
        ok,
        {**caps, "NoNewPrivs": fields.get("NoNewPrivs"), "Seccomp": fields.get("Seccomp")},
    )


@check("setuid_binary_gains_nothing")
def _setuid() -> None:
    # /usr/bin/mount is setuid root on the host: executed here it must not run with any
    # capability (no_new_privs, nosuid, empty bounding set), so mounting still fails.
    proc = subprocess.run(["/usr/bin/mount", "-t", "tmpfs", "kv", "/tmp"], capture_output=True, check=False)
    su = subprocess.run(
        ["/usr/bin/su", "-c", "id -u"], capture_output=True, stdin=subprocess.DEVNULL, timeout=10, check=False
    )
    record(
        "setuid_binary_gains_nothing",
        proc.returncode != 0 and su.returncode != 0,
        f"mount exit {proc.returncode} {proc.stderr[-120:]!r}; su exit {su.returncode}",
    )


@check("root_inside_is_not_host_root")
def _uidmap() -> None:
    uid_map = _read("/proc/self/uid_map").decode().split()
    gid_map = _read("/proc/self/gid_map").decode().split()
    # "0 0 4294967295" would be the host's own identity mapping.
    ok = (
        len(uid_map) >= 3
        and not (uid_map[0] == "0" and uid_map[1] == "0")
        and not (gid_map[0] == "0" and gid_map[1] == "0")
    )
    record("root_inside_is_not_host_root", ok, f"uid_map={uid_map} gid_map={gid_map}")


def _mkdir_sgid(path: str) -> None:
    os.mkdir(path)
    os.chmod(path, 0o2777)


def _ok(result: tuple[int, int]) -> None:
    ret, err = result
    if ret < 0:
        raise OSError(err, os.strerror(err))


def _tmpfile_plant(directory: str) -> None:
    fd, err = sys_call(257, -100, directory.encode(), os.O_TMPFILE | os.O_WRONLY, 0o4755)
    _ok((fd, err))
    _ok(sys_call(265, fd, b"", -100, f"{directory}/plant-tmpfile".encode(), 0x1000))  # AT_EMPTY_PATH


@check("bind_plants")
def _plants() -> None:
    out = os.environ["KV_RW"]
    done = {}
    import shutil

    def attempt(name: str, fn: Callable[[], object]) -> None:
        try:
            fn()
            done[name] = "done"
        except OSError as exc:
            done[name] = errno.errorcode.get(exc.errno or 0, "?")

    attempt("copy", lambda: shutil.copy("/usr/bin/id", f"{out}/plant-suid"))
    attempt("chmod_4755", lambda: os.chmod(f"{out}/plant-suid", 0o4755))
    attempt("chmod_6755", lambda: os.chmod(f"{out}/plant-suid", 0o6755))
    attempt("copy2", lambda: shutil.copy("/usr/bin/id", f"{out}/plant-sgid"))
    attempt("chmod_2755", lambda: os.chmod(f"{out}/plant-sgid", 0o2755))
    attempt("create_4755", lambda: os.close(os.open(f"{out}/plant-created", os.O_CREAT | os.O_WRONLY, 0o4755)))
    attempt("fchmod_4755", lambda: os.fchmod(os.open(f"{out}/plant-fchmod", os.O_CREAT | os.O_WRONLY, 0o755), 0o4755))
    attempt("mkdir_sgid", lambda: _mkdir_sgid(f"{out}/plant-dir"))
    attempt(
        "file_caps",
        lambda: os.setxattr(f"{out}/plant-sgid", "security.capability", b"\x01\x00\x00\x02" + b"\xff" * 16),
    )
    how = struct.pack("QQQ", os.O_CREAT | os.O_WRONLY, 0o4755, 0)  # openat2: the mode is in a struct
    attempt("openat2_4755", lambda: _ok(sys_call(437, -100, f"{out}/plant-openat2".encode(), how, len(how))))
    attempt("creat_6755", lambda: _ok(sys_call(85, f"{out}/plant-creat".encode(), 0o6755)))
    attempt("fchmodat2_4755", lambda: _ok(sys_call(452, -100, f"{out}/plant-sgid".encode(), 0o4755, 0)))
    attempt("tmpfile_linkat_4755", lambda: _tmpfile_plant(out))
    attempt("mknod_in_bind", lambda: os.mknod(f"{out}/plant-mem", stat.S_IFCHR | 0o666, os.makedev(1, 1)))
    attempt("chown_to_user", lambda: os.chown(f"{out}/plant-sgid", 1000, 1000))
    RAW["plants"] = done
    record("bind_plants", done.get("copy") == "done", done)


@check("symlinks_out_of_binds")
def _symlinks() -> None:
    out = os.environ["KV_RW"]
    ro = os.environ["KV_RO"]
    leaks = {}
    # The host planted these links in the shared directories; inside they must resolve
    # within the sandbox's tree, never the host's.
    for link in ("to-root", "to-checkout", "to-home", "to-etc"):
        for base in (out, ro):
            path = f"{base}/{link}"
            if not os.path.islink(path):
                leaks[path] = "planted link missing"
                continue
            for probe in (
                "pyproject.toml",
                "main/pyproject.toml",
                ".bashrc",
                "sha" + "dow",
                "root",
                "home",
                "work/main",
            ):
                target = f"{path}/{probe}"
                if os.path.lexists(target):
                    leaks[target] = "exists"
    # Links made inside: the host side checks they are only links (not followed by kavach).
    for name, target in {"made-root": "/", "made-proc1root": "/proc/1/root", "made-up": "../../../.."}.items():
        try:
            os.symlink(target, f"{out}/{name}")
        except OSError as exc:
            leaks[name] = f"could not plant: {exc}"
    # Escape by dot-dot from the bind mount point.
    for path in (f"{out}/../../../root", f"{ro}/../../work/main", f"{out}/../../../etc/sha" + "dow"):
        if os.path.lexists(path):
            leaks[path] = "exists"
    record("symlinks_out_of_binds", not leaks, leaks)


@check("hostname_isolated")
def _uts() -> None:
    name = socket.gethostname()
    record("hostname_isolated", name != os.environ["KV_HOST_HOSTNAME"], name)


@check("etc_is_generated")
def _etc() -> None:
    host_name = os.environ["KV_HOST_HOSTNAME"]
    users = sorted(line.split(":")[0] for line in _read("/etc/passwd").decode().splitlines() if line)
    groups = sorted(line.split(":")[0] for line in _read("/etc/group").decode().splitlines() if line)
    named = [p for p in ("/etc/hostname", "/etc/hosts") if os.path.exists(p) and host_name.encode() in _read(p).split()]
    ok = set(users) <= {"root", "nobody"} and set(groups) <= {"root", "nogroup"} and not named
    record("etc_is_generated", ok, f"users={users} groups={groups} host name in {named}")


@check("shell_loop_forks")
def _loop() -> None:
    proc = subprocess.run(
        [
            "/bin/sh",
            "-c",
            "for i in $(seq 50); do /bin/true; done; "
            "n=0; for i in $(seq 20); do n=$((n+$(echo 1 | cat))); done; echo done $n",
        ],
        capture_output=True,
        timeout=60,
        check=False,
    )
    record(
        "shell_loop_forks",
        proc.returncode == 0 and proc.stdout == b"done 20\n",
        f"{proc.returncode} {proc.stdout!r} {proc.stderr[-200:]!r}",
    )


@check("python3_runs")
def _python() -> None:
    proc = subprocess.run(
        ["/usr/bin/python3", "-c", "import ssl, json, sqlite3; print(6 * 7)"],
        capture_output=True,
        timeout=60,
        check=False,
    )
    record("python3_runs", proc.stdout == b"42\n", f"{proc.returncode} {proc.stdout!r} {proc.stderr[-300:]!r}")


RAW["results"] = RESULTS
RAW["complete"] = True
with open(f"{OUT}/results.json.tmp", "w") as fh:
    json.dump(RAW, fh)
os.rename(f"{OUT}/results.json.tmp", f"{OUT}/results.json")

# Last: try to kill everything the probe can signal (the host's bait process must survive,
# the sandbox's own init must survive). This kills the probe itself too.
os.kill(-1, signal.SIGKILL)
sys.exit(0)
