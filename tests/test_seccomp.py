"""seccomp profiles on the real kernel.

Each filter is loaded in a fresh child interpreter (a filter is irrevocable), which then
makes raw syscalls and reports the errno it saw. Every probe is also run once without a
filter, so a test can show that the refusal comes from the filter and not from the
arguments (e.g. ``mount`` with a NULL target fails with EFAULT when unfiltered).
"""

from __future__ import annotations

import errno
import itertools
import json
import os
import platform
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from kavach.backends import seccomp_profiles as profiles
from kavach.backends.process.seccomp import (
    SeccompError,
    compile_filter,
    compile_spec,
    known_syscall_names,
    load_filter,
    seccomp_supported,
)
from kavach.errors import PolicyError
from kavach.policy import SeccompPolicy, SeccompProfile

pytestmark = pytest.mark.skipif(
    platform.machine() != "x86_64" or not seccomp_supported()[0],
    reason="raw syscall numbers below are x86_64; needs kernel seccomp and libseccomp",
)

BASIC = SeccompPolicy(profile=SeccompProfile.BASIC)
STRICT = SeccompPolicy(profile=SeccompProfile.STRICT)

# The child: load the filter from argv[1] (if non-empty), then run argv[2] and print `out`.
CHILD = textwrap.dedent(
    """
    import ctypes, json, os, socket, sys
    from kavach.backends.process.seccomp import load_filter
    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long

    def sc(nr, *args):
        ctypes.set_errno(0)
        rc = libc.syscall(ctypes.c_long(nr), *[ctypes.c_long(a) for a in args])
        return 0 if rc >= 0 else ctypes.get_errno()

    def sock(family, kind=socket.SOCK_STREAM):
        try:
            socket.socket(family, kind).close()
            return 0
        except OSError as exc:
            return exc.errno

    program = open(sys.argv[1], "rb").read()
    if program:
        load_filter(program)
    out = {}
    exec(sys.argv[2])
    print(json.dumps(out))
    """
)

# x86_64 syscall numbers and arguments chosen so that the unfiltered call fails with an
# errno other than EPERM (or succeeds harmlessly).
PROBES = textwrap.dedent(
    """
    byte = ctypes.c_char(b"x")
    devnull = os.open("/dev/null", os.O_RDWR)
    out["unshare"] = sc(272, 0)                              # no-op: succeeds unfiltered
    out["setns"] = sc(308, -1, 0)                            # EBADF
    out["mount"] = sc(165, 0, 0, 0, 0, 0)                    # EFAULT
    out["umount2"] = sc(166, 0, 0)                           # EFAULT
    out["fsopen"] = sc(430, 0, 0)                            # EFAULT
    out["open_tree"] = sc(428, -1, 0, 0)                     # EFAULT/EBADF
    out["move_mount"] = sc(429, -1, 0, -1, 0, 0)             # EFAULT/EBADF
    out["keyctl"] = sc(250, 0, -3, 0)                        # KEYCTL_GET_KEYRING_ID: succeeds
    out["add_key"] = sc(248, 0, 0, 0, 0, 0)                  # EFAULT
    out["request_key"] = sc(249, 0, 0, 0, 0)                 # EFAULT
    out["bpf"] = sc(321, -1, 0, 0)                           # EINVAL
    out["ptrace"] = sc(101, 0x4206, 0, 0, 0)                 # PTRACE_SEIZE pid 0: ESRCH
    out["io_uring_setup"] = sc(425, 0, 0)                    # EINVAL/EFAULT
    out["perf_event_open"] = sc(298, 0, 0, -1, -1, 0)        # EFAULT
    out["userfaultfd"] = sc(323, 0xFFFF)                     # EINVAL
    out["kexec_load"] = sc(246, 0, 0, 0, 0xFFFF)             # EINVAL
    out["init_module"] = sc(175, 0, 0, 0)                    # EFAULT/ENOEXEC
    out["process_vm_readv"] = sc(310, 0, 0, 0, 0, 0, 1)      # EINVAL (flags)
    out["pidfd_getfd"] = sc(438, -1, -1, 0)                  # EBADF
    out["open_by_handle_at"] = sc(304, -1, 0, 0)             # EFAULT/EBADF
    out["clock_settime"] = sc(227, 0xFFFF, 0)                # EINVAL
    out["personality_query"] = sc(135, 0xFFFFFFFF)
    out["personality_linux"] = sc(135, 0)
    out["personality_no_aslr"] = sc(135, 0x0040000)          # ADDR_NO_RANDOMIZE
    out["tiocsti"] = sc(16, devnull, 0x5412, ctypes.addressof(byte))           # ENOTTY
    out["tiocsti_high_bits"] = sc(16, devnull, 0x1_0000_5412, ctypes.addressof(byte))
    out["tioclinux"] = sc(16, devnull, 0x541C, ctypes.addressof(byte))
    pipe_r, pipe_w = os.pipe()
    count = ctypes.c_int()
    out["fionread"] = sc(16, pipe_r, 0x541B, ctypes.addressof(count))  # on a pipe: succeeds
    out["clone3"] = sc(435, 0, 0)                            # EINVAL
    for name, flag in (("newuser", 0x10000000), ("newns", 0x20000), ("newnet", 0x40000000),
                       ("newpid", 0x20000000), ("newipc", 0x08000000), ("newuts", 0x04000000),
                       ("newcgroup", 0x02000000)):
        # CLONE_THREAD without CLONE_SIGHAND: EINVAL before any process is created
        out["clone_" + name] = sc(56, flag | 0x10000, 0, 0, 0, 0)
    out["clone_plain_invalid"] = sc(56, 0x10000, 0, 0, 0, 0)
    out["ioprio_get"] = sc(252, 1, 0)                        # IOPRIO_WHO_PROCESS self: succeeds
    out["af_inet"] = sock(socket.AF_INET)
    out["af_inet6"] = sock(socket.AF_INET6)
    out["af_unix"] = sock(socket.AF_UNIX)
    out["af_netlink"] = sock(socket.AF_NETLINK, socket.SOCK_RAW)
    out["af_packet"] = sock(socket.AF_PACKET, socket.SOCK_RAW)
    out["af_inet_high_bits"] = sc(41, 0x1_0000_0002, 1, 0)
    out["af_vsock"] = sc(41, 40, 1, 0)  # EAFNOSUPPORT without the vsock module
    pid = os.fork()
    if pid == 0:
        os._exit(7)
    out["fork_status"] = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
    import threading
    box = []
    worker = threading.Thread(target=box.append, args=(1,))
    worker.start(); worker.join()
    out["thread"] = box == [1]
    import subprocess
    out["subprocess"] = subprocess.run(["/bin/echo", "hi"], capture_output=True).stdout.decode()
    out["status"] = [l.split()[1] for l in open("/proc/self/status") if l.startswith("Seccomp:")][0]
    out["nnp"] = [l.split()[1] for l in open("/proc/self/status") if l.startswith("NoNewPrivs:")][0]
    """
)


def run_child(tmp_path: Path, program: bytes, code: str) -> subprocess.CompletedProcess[str]:
    """Run CHILD with ``program`` loaded; returns the completed process."""
    path = tmp_path / "filter.bpf"
    path.write_bytes(program)
    return subprocess.run(
        [sys.executable, "-c", CHILD, str(path), code],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def probe(tmp_path: Path, program: bytes, code: str = PROBES) -> dict[str, object]:
    """Run ``code`` under ``program`` and return its ``out`` dict."""
    proc = run_child(tmp_path, program, code)
    assert proc.returncode == 0, proc.stderr
    result: dict[str, object] = json.loads(proc.stdout)
    return result


@pytest.fixture(scope="module")
def module_tmp(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("seccomp")


@pytest.fixture(scope="module")
def unfiltered(module_tmp: Path) -> dict[str, object]:
    return probe(module_tmp, b"")


@pytest.fixture(scope="module")
def basic(module_tmp: Path) -> dict[str, object]:
    return probe(module_tmp, compile_filter(BASIC))


@pytest.fixture(scope="module")
def strict(module_tmp: Path) -> dict[str, object]:
    return probe(module_tmp, compile_filter(STRICT))


@pytest.fixture(scope="module")
def runtime_basic(module_tmp: Path) -> dict[str, object]:
    """basic as the OCI backend sends it to runc: an allow list with a refusing default."""
    spec = profiles.build_runtime_spec(BASIC, known_syscall_names())
    assert spec is not None
    return probe(module_tmp, compile_spec(spec))


DANGEROUS = [
    "unshare",
    "setns",
    "mount",
    "umount2",
    "fsopen",
    "open_tree",
    "move_mount",
    "keyctl",
    "add_key",
    "request_key",
    "bpf",
    "ptrace",
    "io_uring_setup",
    "perf_event_open",
    "userfaultfd",
    "kexec_load",
    "init_module",
    "process_vm_readv",
    "pidfd_getfd",
    "open_by_handle_at",
    "clock_settime",
    "personality_no_aslr",
    "tiocsti",
    "tiocsti_high_bits",
    "af_vsock",
    "tioclinux",
    "clone_newuser",
    "clone_newns",
    "clone_newnet",
    "clone_newpid",
    "clone_newipc",
    "clone_newuts",
    "clone_newcgroup",
]


@pytest.mark.skipif(os.geteuid() != 0, reason="unprivileged, several probes are EPERM without a filter")
def test_unfiltered_baseline_is_not_eperm(unfiltered: dict[str, object]) -> None:
    # Otherwise the EPERM assertions below would prove nothing.
    for name in DANGEROUS:
        assert unfiltered[name] != errno.EPERM, name
    assert unfiltered["status"] == "0"
    assert unfiltered["clone3"] != errno.ENOSYS


@pytest.mark.parametrize("profile", ["basic", "strict", "runtime_basic"])
@pytest.mark.parametrize("name", DANGEROUS)
def test_dangerous_syscalls_are_refused_with_eperm(name: str, profile: str, request: pytest.FixtureRequest) -> None:
    if request.getfixturevalue("unfiltered")[name] == errno.EPERM:
        pytest.skip(f"{name} is refused without a filter too (unprivileged caller)")
    out = request.getfixturevalue(profile)
    assert out[name] == errno.EPERM


@pytest.mark.parametrize("profile", ["basic", "strict", "runtime_basic"])
def test_ordinary_process_work_still_runs(profile: str, request: pytest.FixtureRequest) -> None:
    out = request.getfixturevalue(profile)
    assert out["status"] == "2"  # filter mode
    assert out["nnp"] == "1"
    assert out["clone3"] == errno.ENOSYS  # so glibc falls back to the filterable clone
    assert out["fork_status"] == 7
    assert out["thread"] is True
    assert out["subprocess"] == "hi\n"
    assert out["clone_plain_invalid"] == errno.EINVAL  # clone without namespace flags reaches the kernel
    assert out["personality_query"] == 0
    assert out["personality_linux"] == 0
    assert out["fionread"] == 0  # other ioctls are untouched
    assert out["af_unix"] == 0


@pytest.mark.parametrize("profile", ["basic", "runtime_basic"])
def test_basic_allows_what_it_does_not_list(
    profile: str, unfiltered: dict[str, object], request: pytest.FixtureRequest
) -> None:
    out = request.getfixturevalue(profile)
    assert out["ioprio_get"] == 0
    assert out["af_inet"] == 0
    assert out["af_netlink"] == 0
    assert out["af_packet"] == unfiltered["af_packet"]


def test_strict_refuses_unlisted_syscalls_and_exotic_sockets(strict: dict[str, object]) -> None:
    assert strict["ioprio_get"] == errno.EPERM
    assert strict["af_netlink"] == errno.EPERM
    assert strict["af_packet"] == errno.EPERM
    # TCP/UDP sockets stay possible (network mode "proxy" needs loopback); the network
    # namespace, not seccomp, decides where they can go.
    assert strict["af_inet"] == 0
    assert strict["af_inet6"] == 0


def test_strict_runs_a_shell_that_forks_fifty_times(tmp_path: Path) -> None:
    code = textwrap.dedent(
        """
        os.execv("/bin/sh", ["sh", "-c", "for i in $(seq 50); do /bin/true; done; ls / >/dev/null; "
                 "grep Seccomp: /proc/self/status; echo done"])
        """
    )
    proc = run_child(tmp_path, compile_filter(STRICT), code)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["Seccomp:", "2", "done"]


def test_strict_runs_debian_python(tmp_path: Path) -> None:
    script = (
        "import json, socket, subprocess, threading, tempfile, os\n"
        "a, b = socket.socketpair(socket.AF_UNIX)\n"
        "a.sendall(b'x'); assert b.recv(1) == b'x'\n"
        "box = []\n"
        "t = threading.Thread(target=box.append, args=(1,)); t.start(); t.join()\n"
        "r = subprocess.run(['/bin/echo', 'sub'], capture_output=True, check=True)\n"
        "with tempfile.TemporaryDirectory() as d:\n"
        "    open(os.path.join(d, 'f'), 'w').write('x')\n"
        "print(json.dumps({'thread': box, 'sub': r.stdout.decode()}))\n"
    )
    code = f"os.execv('/usr/bin/python3', ['python3', '-c', {script!r}])"
    proc = run_child(tmp_path, compile_filter(STRICT), code)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == {"thread": [1], "sub": "sub\n"}


def test_deny_sockets_allows_only_af_unix(tmp_path: Path) -> None:
    for policy in (BASIC, STRICT, SeccompPolicy(profile=SeccompProfile.NONE)):
        out = probe(tmp_path, compile_filter(policy, deny_sockets=True))
        assert out["af_unix"] == 0, policy
        for name in ("af_inet", "af_inet6", "af_netlink", "af_packet", "af_inet_high_bits", "af_vsock"):
            assert out[name] == errno.EPERM, (policy, name)


def test_policy_deny_and_allow_extend_the_profiles(tmp_path: Path) -> None:
    denied = probe(tmp_path, compile_filter(SeccompPolicy(profile=SeccompProfile.BASIC, deny=("ioprio_get",))))
    assert denied["ioprio_get"] == errno.EPERM
    allowed = probe(tmp_path, compile_filter(SeccompPolicy(profile=SeccompProfile.STRICT, allow=("ioprio_get",))))
    assert allowed["ioprio_get"] == 0
    # An explicit allow of an argument-checked syscall keeps the argument check.
    ioctl = probe(tmp_path, compile_filter(SeccompPolicy(profile=SeccompProfile.STRICT, allow=("ioctl", "clone"))))
    assert ioctl["tiocsti"] == errno.EPERM
    assert ioctl["clone_newuser"] == errno.EPERM
    assert ioctl["fionread"] == 0


def test_profile_none_compiles_to_nothing_unless_something_is_denied(tmp_path: Path) -> None:
    assert compile_filter(SeccompPolicy(profile=SeccompProfile.NONE)) == b""
    out = probe(tmp_path, compile_filter(SeccompPolicy(profile=SeccompProfile.NONE, deny=("keyctl",))))
    assert out["keyctl"] == errno.EPERM
    assert out["unshare"] == 0


def test_unknown_syscall_names_are_policy_errors() -> None:
    with pytest.raises(PolicyError, match="no_such_call"):
        compile_filter(SeccompPolicy(profile=SeccompProfile.BASIC, deny=("no_such_call",)))
    with pytest.raises(PolicyError, match=r"seccomp\.allow"):
        compile_filter(SeccompPolicy(profile=SeccompProfile.BASIC, allow=("read",)))


def test_x32_syscalls_kill_the_process(tmp_path: Path) -> None:
    code = "out['rc'] = sc(0x40000000 | 39)"  # x32 getpid
    proc = run_child(tmp_path, compile_filter(BASIC), code)
    assert proc.returncode == -signal.SIGSYS


I386_GETPID = "b8 14 00 00 00 cd 80 c3"  # mov eax, 20 (i386 getpid); int 0x80; ret
INT80 = textwrap.dedent(
    f"""
    import mmap
    buf = mmap.mmap(-1, 4096, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
    buf.write(bytes.fromhex("{I386_GETPID}"))
    addr = ctypes.addressof(ctypes.c_char.from_buffer(buf))
    out["pid"] = ctypes.CFUNCTYPE(ctypes.c_int)(addr)()
    out["real"] = os.getpid()
    """
)


def test_i386_syscalls_kill_the_process(tmp_path: Path) -> None:
    baseline = run_child(tmp_path, b"", INT80)
    if baseline.returncode != 0:
        pytest.skip(f"this kernel has no ia32 emulation (int 0x80 -> signal {-baseline.returncode})")
    assert json.loads(baseline.stdout)["pid"] == json.loads(baseline.stdout)["real"]
    proc = run_child(tmp_path, compile_filter(BASIC), INT80)
    assert proc.returncode == -signal.SIGSYS


def test_load_filter_rejects_non_programs(tmp_path: Path) -> None:
    with pytest.raises(SeccompError, match="not a BPF program"):
        load_filter(b"")
    with pytest.raises(SeccompError, match="not a BPF program"):
        load_filter(b"1234567")
    # A jump past the end: the kernel's checker refuses it, the child reports EINVAL.
    bad = bytes.fromhex("15 00 05 00 00 00 00 00")  # BPF_JMP|JEQ k=0, jt=5 (out of range)
    code = "out['never'] = True"
    proc = run_child(tmp_path, bad, code)
    assert proc.returncode != 0
    assert "seccomp load filter: EINVAL" in proc.stderr


def test_profiles_data_is_consistent() -> None:
    basic_spec = profiles.build_spec(BASIC)
    strict_spec = profiles.build_spec(STRICT)
    assert basic_spec is not None and strict_spec is not None
    # Nothing the deny list refuses is on the strict allow list.
    assert not set(profiles.BASIC_DENY) & set(profiles.STRICT_ALLOW)
    assert not strict_spec.names(profiles.Action.ALLOW) & set(profiles.BASIC_DENY)
    runtime_spec = profiles.build_runtime_spec(BASIC, known_syscall_names())
    assert runtime_spec is not None and runtime_spec.default_action is profiles.Action.ERRNO
    assert not runtime_spec.names(profiles.Action.ALLOW) & set(profiles.BASIC_DENY)
    # No syscall has both an unconditional and a conditional rule (libseccomp forbids it).
    for spec in (basic_spec, strict_spec, runtime_spec):
        unconditional = {n for r in spec.rules if not r.args for n in r.names}
        conditional = {n for r in spec.rules if r.args for n in r.names}
        assert not unconditional & conditional


def test_complement_masked_covers_exactly_the_other_values() -> None:
    excluded = (profiles.TIOCSTI, profiles.TIOCLINUX)
    tests = profiles.complement_masked(1, excluded, mask=0xFFFF)

    def matches(value: int) -> bool:
        return any(value & cmp.value == cmp.value_two for (cmp,) in tests)

    for value in range(0x10000):
        assert matches(value) == (value not in excluded), hex(value)


def test_syscalls_newer_than_the_profiles_get_enosys(tmp_path: Path) -> None:
    # This kernel's syscalls end at 469, so the default boundary (470) is not observable
    # here; moving it down to 463 (setxattrat, which exists) shows the range test works.
    code = "out['setxattrat'] = sc(463, -1, 0, 0, 0, 0, 0); out['mseal'] = sc(462, 0, 0, 0)"
    baseline = probe(tmp_path, b"", code)
    assert baseline["setxattrat"] not in (0, errno.ENOSYS)
    spec = profiles.build_spec(BASIC)
    assert spec is not None
    out = probe(tmp_path, compile_spec(spec, first_unknown_syscall=463), code)
    assert out["setxattrat"] == errno.ENOSYS
    assert out["mseal"] == baseline["mseal"]
    for policy in (BASIC, STRICT):
        assert probe(tmp_path, compile_filter(policy), "out['future'] = sc(470)") == {"future": errno.ENOSYS}


@pytest.mark.parametrize(
    ("tool", "script"),
    [
        (
            "git",
            "git init -q r && cd r && echo x > f && git add f && git -c user.name=a -c user.email=a@b "
            "commit -qm m && git log --oneline | wc -l",
        ),
        ("make", "printf 'all:\\n\\t@echo 1\\n' > Makefile && make -s"),
        ("perl", "perl -e 'print 1, qq(\\n)'"),
        ("node", 'node -e \'require("child_process").execSync("true"); console.log(1)\''),
    ],
)
def test_strict_runs_common_tools(tool: str, script: str, tmp_path: Path) -> None:
    import shutil

    if shutil.which(tool) is None:
        pytest.skip(f"{tool} is not installed")
    code = f"os.chdir({str(tmp_path)!r}); os.execv('/bin/sh', ['sh', '-c', {script!r}])"
    proc = run_child(tmp_path, compile_filter(STRICT), code)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "1"


@given(st.integers(min_value=0, max_value=2**64 - 1) | st.sampled_from(profiles.PERSONALITY_SAFE))
def test_personality_rules_refuse_exactly_the_unsafe_values(value: int) -> None:
    # basic refuses when any complement test matches; strict allows when a safe test matches.
    refuse = profiles.complement_masked(0, profiles.PERSONALITY_SAFE)
    refused = any(value & cmp.value == cmp.value_two for (cmp,) in refuse)
    assert refused == ((value & 0xFFFFFFFF) not in profiles.PERSONALITY_SAFE)


# -- basic as an allow list (what runtimes receive) decides like basic as a deny list -------

_OPS = {
    profiles.CmpOp.NE: lambda a, c: a != c.value,
    profiles.CmpOp.LT: lambda a, c: a < c.value,
    profiles.CmpOp.LE: lambda a, c: a <= c.value,
    profiles.CmpOp.EQ: lambda a, c: a == c.value,
    profiles.CmpOp.GE: lambda a, c: a >= c.value,
    profiles.CmpOp.GT: lambda a, c: a > c.value,
    profiles.CmpOp.MASKED_EQ: lambda a, c: a & c.value == c.value_two,
}


def decide(spec: profiles.SeccompSpec, name: str, args: tuple[int, ...]) -> tuple[profiles.Action, int]:
    """libseccomp's semantics of a spec: the action of the matching rules, else the default."""
    hits = {
        (rule.action, rule.errno)
        for rule in spec.rules
        if name in rule.names and all(_OPS[cmp.op](args[cmp.index], cmp) for cmp in rule.args)
    }
    assert len(hits) <= 1, (name, args, hits)  # no overlap between rules with different actions
    if hits:
        return hits.pop()
    return spec.default_action, spec.default_errno if spec.default_action is profiles.Action.ERRNO else 0


def _for_names(spec: profiles.SeccompSpec, names: frozenset[str]) -> profiles.SeccompSpec:
    """``spec`` with only the rules that mention ``names`` (so that deciding is cheap)."""
    rules = tuple(r for r in spec.rules if names & set(r.names))
    return profiles.SeccompSpec(spec.profile, spec.default_action, spec.default_errno, rules)


_RUNTIME_CASES = pytest.mark.parametrize(
    ("policy", "deny_sockets"),
    [(BASIC, False), (BASIC, True), (SeccompPolicy(profile=SeccompProfile.BASIC, deny=("chmod", "ioctl")), False)],
    ids=["basic", "deny_sockets", "extra_deny"],
)


def _both_forms(policy: SeccompPolicy, deny_sockets: bool) -> tuple[profiles.SeccompSpec, profiles.SeccompSpec]:
    deny_form = profiles.build_spec(policy, deny_sockets=deny_sockets)
    allow_form = profiles.build_runtime_spec(policy, known_syscall_names(), deny_sockets=deny_sockets)
    assert deny_form is not None and allow_form is not None
    assert deny_form.default_action is profiles.Action.ALLOW
    assert allow_form.default_action is profiles.Action.ERRNO
    return deny_form, allow_form


_INTERESTING_VALUES = (
    0,
    profiles.TIOCSTI,
    profiles.TIOCLINUX,
    0xFFFF_FFFF_0000_0000 | profiles.TIOCSTI,
    profiles.CLONE_NAMESPACE_MASK,
    *profiles.CLONE_NAMESPACE_FLAGS,
    0x11,  # SIGCHLD
    *profiles.PERSONALITY_SAFE,
    0x0040000,
    profiles.AF_UNIX,
    profiles.AF_INET,
    profiles.AF_VSOCK,
    0x1_0000_0000 | profiles.AF_VSOCK,
    0o100,  # O_CREAT
    0o20200000,  # O_TMPFILE
    0o4755,
    0o2755,
    0o755,
    16,  # AF_NETLINK
    0x541B,  # FIONREAD
)
_ARG = st.sampled_from(_INTERESTING_VALUES) | st.integers(min_value=0, max_value=2**64 - 1)
_CHECKED = ["clone", "ioctl", "personality", "socket", "socketpair", "chmod", "fchmodat", "open", "openat", "creat"]


@_RUNTIME_CASES
def test_basic_as_an_allow_list_decides_every_known_syscall_like_the_deny_list(
    policy: SeccompPolicy, deny_sockets: bool
) -> None:
    # Every syscall name, with every interesting value in every argument position.
    deny_form, allow_form = _both_forms(policy, deny_sockets)
    vectors = [(0,) * 6] + [
        tuple(value if i == index else 0 for i in range(6)) for value in _INTERESTING_VALUES for index in range(6)
    ]
    # The argument-checked ones also with every pair of them in every pair of positions
    # (open's O_CREAT with a setuid mode, ...).
    pairs = [
        tuple(first if i == one else second if i == two else 0 for i in range(6))
        for one, two in itertools.combinations(range(4), 2)
        for first in _INTERESTING_VALUES
        for second in _INTERESTING_VALUES
    ]
    for name in sorted(known_syscall_names() | set(_CHECKED)):
        names = frozenset({name})
        deny_one, allow_one = _for_names(deny_form, names), _for_names(allow_form, names)
        for args in vectors + pairs if name in _CHECKED else vectors:
            assert decide(allow_one, name, args) == decide(deny_one, name, args), (name, [hex(a) for a in args])


@_RUNTIME_CASES
@given(name=st.sampled_from(_CHECKED), args=st.tuples(_ARG, _ARG, _ARG, _ARG, _ARG, _ARG))
def test_basic_as_an_allow_list_decides_argument_checked_syscalls_like_the_deny_list(
    policy: SeccompPolicy, deny_sockets: bool, name: str, args: tuple[int, ...]
) -> None:
    deny_form, allow_form = _both_forms(policy, deny_sockets)
    assert decide(allow_form, name, args) == decide(deny_form, name, args)


def test_basic_as_an_allow_list_refuses_names_the_runtime_does_not_know() -> None:
    known = known_syscall_names() - {"statmount", "fchmodat2"}
    spec = profiles.build_runtime_spec(BASIC, known)
    assert spec is not None
    assert "statmount" not in spec.names() and "fchmodat2" not in spec.names()
    assert decide(spec, "statmount", (0,) * 6) == (profiles.Action.ERRNO, errno.EPERM)
    assert decide(spec, "read", (0,) * 6) == (profiles.Action.ALLOW, 0)


def test_the_runtime_form_validates_the_policy_like_build_spec() -> None:
    known = known_syscall_names()
    with pytest.raises(PolicyError, match=r"seccomp\.allow"):
        profiles.build_runtime_spec(SeccompPolicy(profile=SeccompProfile.BASIC, allow=("ioprio_get",)), known)
    with pytest.raises(PolicyError, match=r"seccomp\.deny"):
        profiles.build_runtime_spec(SeccompPolicy(profile=SeccompProfile.BASIC, deny=("no such",)), known)
