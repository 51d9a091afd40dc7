"""The shared seccomp profiles refuse setuid/setgid bits (both backends compile them).

Root inside a sandbox writes through idmapped binds as the bind's host owner; a setuid bit
on such a file would be a setuid program on the host's disk. Each case runs the real
filter in a fresh interpreter on the real kernel and is compared with an unfiltered run,
so a refusal is the filter's doing.
"""

from __future__ import annotations

import errno
import json
import platform
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from kavach.backends.oci.seccomp_oci import policy_to_oci
from kavach.backends.process.seccomp import compile_filter, seccomp_supported
from kavach.policy import SeccompPolicy, SeccompProfile

pytestmark = pytest.mark.skipif(
    platform.machine() != "x86_64" or not seccomp_supported()[0],
    reason="raw syscall numbers below are x86_64; needs kernel seccomp and libseccomp",
)

CHILD = textwrap.dedent(
    """
    import ctypes, json, os, struct, sys
    from kavach.backends.process.seccomp import load_filter
    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long

    def sc(nr, *args):
        ctypes.set_errno(0)
        conv = [ctypes.c_long(a) if isinstance(a, int) else a for a in args]
        rc = libc.syscall(ctypes.c_long(nr), *conv)
        return 0 if rc >= 0 else ctypes.get_errno()

    d = sys.argv[2].encode()
    program = open(sys.argv[1], "rb").read()
    if program:
        load_filter(program)
    open(d + b"/f", "w").close()
    how = struct.pack("QQQ", os.O_CREAT | os.O_WRONLY, 0o4755, 0)
    out = {
        "chmod_0755": sc(90, d + b"/f", 0o755),
        "chmod_4755": sc(90, d + b"/f", 0o4755),
        "chmod_2755": sc(90, d + b"/f", 0o2755),
        "chmod_high_garbage_4755": sc(90, d + b"/f", 0x1_0000_0000 | 0o4755),
        "fchmodat_6755": sc(268, -100, d + b"/f", 0o6755),
        "fchmodat2_4755": sc(452, -100, d + b"/f", 0o4755, 0),
        "creat_4755": sc(85, d + b"/c", 0o4755),
        "creat_0644": sc(85, d + b"/c2", 0o644),
        "openat_create_4755": sc(257, -100, d + b"/o", os.O_CREAT | os.O_WRONLY, 0o4755),
        "openat_create_2755": sc(257, -100, d + b"/o2", os.O_CREAT | os.O_WRONLY, 0o2755),
        "openat_create_0644": sc(257, -100, d + b"/o3", os.O_CREAT | os.O_WRONLY, 0o644),
        "openat_tmpfile_4755": sc(257, -100, d, os.O_TMPFILE | os.O_WRONLY, 0o4755),
        "openat_read_garbage_mode": sc(257, -100, d + b"/f", os.O_RDONLY, 0o7777),
        "open_create_4755": sc(2, d + b"/p", os.O_CREAT | os.O_WRONLY, 0o4755),
        "mknodat_regular_4755": sc(259, -100, d + b"/m", 0o100000 | 0o4755, 0),
        "openat2_create_4755": sc(437, -100, d + b"/q", how, len(how)),
    }
    out["modes"] = {n: oct(os.stat(os.path.join(sys.argv[2], n)).st_mode) for n in sorted(os.listdir(sys.argv[2]))}
    print(json.dumps(out))
    """
)

REFUSED = (
    "chmod_4755",
    "chmod_2755",
    "chmod_high_garbage_4755",
    "fchmodat_6755",
    "fchmodat2_4755",
    "creat_4755",
    "openat_create_4755",
    "openat_create_2755",
    "openat_tmpfile_4755",
    "open_create_4755",
)
ALLOWED = ("chmod_0755", "creat_0644", "openat_create_0644", "openat_read_garbage_mode")


def _run(tmp_path: Path, program: bytes, name: str) -> dict[str, object]:
    work = tmp_path / name
    work.mkdir()
    filter_file = tmp_path / f"{name}.bpf"
    filter_file.write_bytes(program)
    proc = subprocess.run(
        [sys.executable, "-c", CHILD, str(filter_file), str(work)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    result: dict[str, object] = json.loads(proc.stdout)
    return result


@pytest.fixture(scope="module")
def unfiltered(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    return _run(tmp_path_factory.mktemp("setid"), b"", "none")


def test_unfiltered_baseline_sets_the_bits(unfiltered: dict[str, object]) -> None:
    for name in (*REFUSED, *ALLOWED, "openat2_create_4755"):
        assert unfiltered[name] == 0, (name, unfiltered[name])


@pytest.mark.parametrize("profile", [SeccompProfile.BASIC, SeccompProfile.STRICT])
def test_profiles_refuse_setuid_and_setgid_bits(profile: SeccompProfile, tmp_path: Path) -> None:
    out = _run(tmp_path, compile_filter(SeccompPolicy(profile=profile)), profile.value)
    for name in REFUSED:
        assert out[name] == errno.EPERM, (name, out[name])
    for name in ALLOWED:
        assert out[name] == 0, (name, out[name])
    assert out["openat2_create_4755"] == errno.ENOSYS  # the mode is in a struct: callers fall back to openat
    modes = out["modes"]
    assert isinstance(modes, dict)
    assert not [n for n, mode in modes.items() if int(mode, 8) & 0o6000], modes


def test_an_explicit_deny_still_wins_over_the_setid_rules(tmp_path: Path) -> None:
    policy = SeccompPolicy(profile=SeccompProfile.STRICT, deny=("chmod",))
    out = _run(tmp_path, compile_filter(policy), "deny")
    assert out["chmod_0755"] == errno.EPERM
    assert out["fchmodat_6755"] == errno.EPERM and out["creat_0644"] == 0


@pytest.mark.parametrize("profile", [SeccompProfile.BASIC, SeccompProfile.STRICT])
def test_the_oci_translation_carries_the_setid_rules(profile: SeccompProfile) -> None:
    seccomp = policy_to_oci(SeccompPolicy(profile=profile), "x86_64")
    assert seccomp is not None
    chmod_rules = [s for s in seccomp["syscalls"] if "chmod" in s["names"]]
    assert chmod_rules and all(s.get("args") for s in chmod_rules)  # never unconditional
    assert any("openat2" in s["names"] and s.get("errnoRet") == errno.ENOSYS for s in seccomp["syscalls"])
