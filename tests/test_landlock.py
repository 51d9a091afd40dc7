"""Landlock on the real kernel: every domain is entered in a forked child.

A Landlock domain cannot be left, so each test forks, applies the rules in the child,
tries things and sends back what happened (an errno, or 0 for success) through a pipe.
"""

from __future__ import annotations

import errno
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from kavach.backends.process.landlock import (
    LandlockError,
    access_mask,
    apply_landlock,
    landlock_abi,
)
from kavach.policy import Access, LandlockRule

ABI = landlock_abi()
pytestmark = pytest.mark.skipif(ABI == 0, reason="this kernel has no enabled Landlock")

R = frozenset({Access.READ})
RW = frozenset({Access.READ, Access.WRITE})
RX = frozenset({Access.READ, Access.EXECUTE})


def in_child(body: Callable[[dict[str, Any]], None]) -> dict[str, Any]:
    """Fork; run ``body(out)`` in the child; return ``out`` (or the child's exception text)."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: never return into pytest
        os.close(read_end)
        out: dict[str, Any] = {}
        try:
            body(out)
        except BaseException as exc:
            out["exception"] = f"{type(exc).__name__}: {exc}"
        os.write(write_end, json.dumps(out).encode())
        os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as pipe:
        data = pipe.read()
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    result: dict[str, Any] = json.loads(data)
    return result


def attempt(action: Callable[[], object]) -> int:
    """0 when ``action`` succeeds, else the errno of the OSError it raised."""
    try:
        action()
    except OSError as exc:
        return exc.errno or -1
    return 0


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    for name in ("ro", "rw", "hidden"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "file").write_text(name)
    return tmp_path


def test_abi_is_reported() -> None:
    assert ABI >= 1
    assert access_mask({Access.READ}, 1) == 0b1100  # READ_FILE | READ_DIR


def test_reads_and_writes_follow_the_rules(tree: Path) -> None:
    rules = [
        LandlockRule(str(tree / "ro"), R),
        LandlockRule(str(tree / "rw"), RW),
        LandlockRule("/proc", R),
    ]

    def body(out: dict[str, Any]) -> None:
        out["abi"] = apply_landlock(rules)
        out["read_ro"] = attempt((tree / "ro" / "file").read_text)
        out["list_ro"] = attempt(lambda: os.listdir(tree / "ro"))
        out["write_ro"] = attempt(lambda: (tree / "ro" / "new").write_text("x"))
        out["truncate_ro"] = attempt(lambda: os.truncate(tree / "ro" / "file", 0))
        out["read_hidden"] = attempt((tree / "hidden" / "file").read_text)
        out["list_parent"] = attempt(lambda: os.listdir(tree))
        out["write_rw"] = attempt(lambda: (tree / "rw" / "new").write_text("x"))
        out["mkdir_rw"] = attempt((tree / "rw" / "dir").mkdir)
        out["unlink_rw"] = attempt((tree / "rw" / "file").unlink)
        out["etc_passwd"] = attempt(lambda: Path("/etc/passwd").read_text())
        out["nnp"] = [
            ln.split()[1] for ln in Path("/proc/self/status").read_text().splitlines() if ln.startswith("NoNewPrivs")
        ]

    out = in_child(body)
    assert "exception" not in out, out
    assert out["abi"] == ABI
    assert out["read_ro"] == 0 and out["list_ro"] == 0
    assert out["write_ro"] == errno.EACCES
    assert out["truncate_ro"] == errno.EACCES
    assert out["read_hidden"] == errno.EACCES
    assert out["list_parent"] == errno.EACCES
    assert out["etc_passwd"] == errno.EACCES
    assert out["write_rw"] == 0 and out["mkdir_rw"] == 0 and out["unlink_rw"] == 0
    assert (tree / "rw" / "new").read_text() == "x"
    assert out["nnp"] == ["1"]


def test_execute_needs_the_execute_right(tree: Path) -> None:
    def run_true(access: frozenset[Access]) -> dict[str, Any]:
        def body(out: dict[str, Any]) -> None:
            apply_landlock([LandlockRule("/usr", access), LandlockRule("/etc", R)])
            proc = subprocess.run(["/usr/bin/true"], check=False)
            out["rc"] = proc.returncode

        return in_child(body)

    assert run_true(RX) == {"rc": 0}
    denied = run_true(R)
    assert "PermissionError" in denied["exception"]


def test_rules_on_files_get_only_file_rights(tree: Path) -> None:
    single = tree / "hidden" / "file"
    everything = frozenset(Access)

    def body(out: dict[str, Any]) -> None:
        apply_landlock([LandlockRule(str(single), everything)])
        out["read_file"] = attempt(single.read_text)
        out["append_file"] = attempt(lambda: single.open("a").write("more"))
        out["sibling"] = attempt((tree / "ro" / "file").read_text)

    out = in_child(body)
    assert out == {"read_file": 0, "append_file": 0, "sibling": errno.EACCES}


def test_missing_rule_path_fails_closed_before_restricting(tree: Path) -> None:
    missing = str(tree / "does-not-exist")

    def body(out: dict[str, Any]) -> None:
        try:
            apply_landlock([LandlockRule(str(tree / "ro"), R), LandlockRule(missing, R)])
        except LandlockError as exc:
            out["error"] = str(exc)
            out["errno"] = exc.errno
        # Nothing was enforced: the unrelated directory is still readable.
        out["read_hidden"] = attempt((tree / "hidden" / "file").read_text)

    out = in_child(body)
    assert missing in out["error"]
    assert out["errno"] == errno.ENOENT
    assert out["read_hidden"] == 0


def test_no_rules_means_no_filesystem_access() -> None:
    def body(out: dict[str, Any]) -> None:
        apply_landlock([])
        out["root"] = attempt(lambda: os.listdir("/"))

    assert in_child(body) == {"root": errno.EACCES}


@pytest.mark.skipif(ABI < 4, reason="Landlock TCP rules need ABI 4")
def test_deny_network_refuses_tcp_connect_and_bind() -> None:
    with socket.create_server(("127.0.0.1", 0)) as server, socket.create_server(("127.0.0.1", 0)) as proxy:
        port = server.getsockname()[1]
        proxy_port = proxy.getsockname()[1]

        def connect(target: int) -> None:
            with socket.create_connection(("127.0.0.1", target), timeout=5):
                pass

        def bind() -> None:
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))

        def body(out: dict[str, Any]) -> None:
            out["before"] = attempt(lambda: connect(port))
            apply_landlock([], deny_network=True, connect_ports=(proxy_port,))
            out["connect"] = attempt(lambda: connect(port))
            out["bind"] = attempt(bind)
            out["proxy"] = attempt(lambda: connect(proxy_port))
            out["udp"] = attempt(lambda: socket.socket(socket.AF_INET, socket.SOCK_DGRAM).close())

        out = in_child(body)
    assert out == {"before": 0, "connect": errno.EACCES, "bind": errno.EACCES, "proxy": 0, "udp": 0}


@pytest.mark.skipif(ABI < 6, reason="Landlock scoping needs ABI 6")
def test_signals_to_processes_outside_the_domain_are_refused() -> None:
    outsider = subprocess.Popen(["/bin/sleep", "30"])
    try:

        def body(out: dict[str, Any]) -> None:
            apply_landlock([LandlockRule("/usr", RX), LandlockRule("/etc", R)])
            out["outside"] = attempt(lambda: os.kill(outsider.pid, signal.SIGTERM))
            inner = subprocess.Popen(["/usr/bin/sleep", "30"])
            out["inside"] = attempt(lambda: os.kill(inner.pid, signal.SIGTERM))
            out["inner_rc"] = inner.wait()

        out = in_child(body)
        assert outsider.poll() is None  # still alive
    finally:
        outsider.kill()
        outsider.wait()
    assert out == {"outside": errno.EPERM, "inside": 0, "inner_rc": -signal.SIGTERM}


@pytest.mark.skipif(ABI < 6, reason="Landlock scoping needs ABI 6")
def test_abstract_unix_sockets_outside_the_domain_are_unreachable() -> None:
    name = f"\0kavach-test-{os.getpid()}-{time.monotonic_ns()}"
    with socket.socket(socket.AF_UNIX) as server:
        server.bind(name)
        server.listen()

        def connect() -> None:
            with socket.socket(socket.AF_UNIX) as s:
                s.connect(name)

        def scoped(out: dict[str, Any]) -> None:
            apply_landlock([])
            out["connect"] = attempt(connect)

        def unscoped(out: dict[str, Any]) -> None:
            apply_landlock([], scope_abstract_unix=False)
            out["connect"] = attempt(connect)

        assert in_child(scoped) == {"connect": errno.EPERM}
        assert in_child(unscoped) == {"connect": 0}


def test_applied_domain_survives_exec(tree: Path) -> None:
    # What the engine relies on: apply, then execve; the new program is still confined.
    code = (
        "import sys, os\n"
        "from kavach.backends.process.landlock import apply_landlock\n"
        "from kavach.policy import LandlockRule, Access\n"
        f"apply_landlock([LandlockRule('/usr', frozenset(Access)), LandlockRule('/etc', frozenset(Access))])\n"
        f"os.execv('/bin/cat', ['cat', {str(tree / 'hidden' / 'file')!r}])\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert proc.returncode == 1
    assert "Permission denied" in proc.stderr


def test_strict_preset_rules_with_strict_seccomp_run_python(tree: Path) -> None:
    # The engine's order for an exec child: Landlock, then seccomp (last), then execve.
    # (The preset grants /tmp, where ``tree`` lives, so the denied read is a host file.)
    if not os.path.exists("/var/lib/dpkg/status"):
        pytest.skip("needs a host file outside the preset's paths (/var/lib/dpkg/status)")
    rw_dir = tree / "rw"
    script = (
        "import json, subprocess, threading, os\n"
        f"open({str(rw_dir / 'out')!r}, 'w').write('ok')\n"
        "r = subprocess.run(['/bin/sh', '-c', 'for i in 1 2 3; do /bin/true; done; echo sh'],"
        " capture_output=True, text=True)\n"
        "t = threading.Thread(target=lambda: None); t.start(); t.join()\n"
        "try:\n"
        "    open('/var/lib/dpkg/status').read(); hidden = 'readable'\n"
        "except PermissionError:\n"
        "    hidden = 'denied'\n"
        "print(json.dumps([r.stdout.strip(), hidden]))\n"
    )
    code = (
        "import os\n"
        "from kavach.backends.process.landlock import apply_landlock\n"
        "from kavach.backends.process.seccomp import compile_filter, load_filter\n"
        "from kavach.policy import SandboxPolicy, LandlockRule, Access\n"
        "policy = SandboxPolicy.strict()\n"
        "program = compile_filter(policy.seccomp)\n"
        "rules = [r for r in policy.landlock.rules if os.path.exists(r.path)]\n"
        f"rules.append(LandlockRule({str(rw_dir)!r}, frozenset({{Access.READ, Access.WRITE}})))\n"
        "apply_landlock(rules)\n"
        "load_filter(program)\n"
        f"os.execv('/usr/bin/python3', ['python3', '-c', {script!r}])\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == ["sh", "denied"]
    assert (rw_dir / "out").read_text() == "ok"
