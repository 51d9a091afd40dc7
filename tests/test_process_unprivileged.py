"""The Process backend run by an unprivileged user (created by this test's setup).

The test (as root) creates a system user ``kavachtest`` if it is missing and runs one
script as that user with ``runuser``: the script builds sandboxes with the real engine and
prints what it observed as JSON; the assertions run here. Debian's /usr/bin/python3 runs
the script, with the checkout's ``src`` and the venv's site-packages on PYTHONPATH (the
venv's interpreter lives under /root, which the user cannot read).
"""

from __future__ import annotations

import json
import os
import pwd
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from process_helpers import FORKS, user_dir, user_env

USER = "kavachtest"

SCRIPT = r"""
import asyncio, dataclasses, json, os, sys
from kavach.backends.base import ExecRequest, LaunchSpec
from kavach.backends.process import ProcessDriver
from kavach.errors import SandboxCreateError
from kavach.policy import Access, Bind, LandlockPolicy, LandlockRule, ResourceLimits, SandboxPolicy

ENV = {"PATH": "/usr/bin:/bin"}
shared = sys.argv[1]
out = {"uid": os.getuid()}

async def sh(box, script, **kw):
    timeout = kw.pop("timeout_ms", 20000)
    r = await box.exec(ExecRequest(argv=("/bin/sh", "-c", script), env=ENV, timeout_ms=timeout, **kw))
    return {"code": r.exit_code, "out": r.stdout.decode(), "err": r.stderr.decode(), "timed_out": r.timed_out}

def pids_in(ns):
    found = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                if os.readlink(f"/proc/{name}/ns/pid") == ns:
                    found.append(int(name))
            except OSError:
                pass
    return found

async def main():
    driver = ProcessDriver()
    probe = driver.probe()
    out["probe_available"] = probe.available
    out["probe_reason"] = probe.reason
    try:
        await driver.start(LaunchSpec("unpriv-limits", SandboxPolicy.basic()))
        out["limits_error"] = None
    except SandboxCreateError as exc:
        out["limits_error"] = str(exc)
    base = SandboxPolicy.strict()
    rules = (*base.landlock.rules, LandlockRule("/shared", frozenset({Access.READ, Access.WRITE})))
    strict = dataclasses.replace(
        base,
        landlock=LandlockPolicy(enabled=True, rules=rules),
        resources=ResourceLimits(),
        filesystem=dataclasses.replace(SandboxPolicy.strict().filesystem, rw_binds=(Bind(shared, "/shared"),)),
    )
    os.environ["KAVACH_LEAK_MARKER"] = "unprivileged-caller-secret"
    box = await driver.start(LaunchSpec("unpriv-strict", strict))
    e = box.enforcement()
    out["controls"] = sorted(c.value for c in e.controls)
    out["uid_map"] = e.details["uid_map"]
    inside, host = e.details["namespaces"], e.details["host_namespaces"]
    out["namespaces_differ"] = all(inside[n] != host[n] for n in inside)
    out["id"] = await sh(box, "id -u; grep CapEff /proc/self/status")
    out["bind"] = await sh(box, "echo from-sandbox > /shared/made && cat /shared/made")
    out["python"] = await sh(box, "/usr/bin/python3 -c 'print(6*7)'")
    out["mount"] = await sh(box, "mount -t tmpfs none /tmp")
    out["unshare"] = await sh(box, "unshare -U true")
    out["root_home"] = await sh(box, "ls -d /root /home")
    out["interfaces"] = await sh(box, "tail -n +3 /proc/net/dev | cut -d: -f1 | tr -d ' '")
    out["write_usr"] = await sh(box, "echo x > /usr/evil")
    out["environ"] = await sh(box, "cat /proc/[0-9]*/environ 2>/dev/null | tr '\\0' '\\n'")
    out["timeout"] = await sh(box, "sleep 1000 & (setsid sleep 1000 &); sleep 1000", timeout_ms=400)
    ns = e.details["namespaces"]["pid"]
    await asyncio.sleep(0.1)
    out["after_timeout"] = [open(f"/proc/{p}/comm").read().strip() for p in pids_in(ns)]
    await sh(box, "sleep 1000 & (setsid sleep 1000 &) ; echo bg")
    await box.destroy()
    out["after_destroy"] = pids_in(ns)
    out["owner_of_made"] = os.stat(os.path.join(shared, "made")).st_uid
    # No cgroup for this user on this host: with allow_degraded the limits degrade, scored.
    limits = ResourceLimits(memory=256 << 20, pids=16, cpus=1.0)
    degraded = dataclasses.replace(strict, resources=limits, allow_degraded=True)
    box = await driver.start(LaunchSpec("unpriv-degraded", degraded))
    e = box.enforcement()
    out["degraded"] = list(e.degraded)
    out["degraded_controls"] = sorted(c.value for c in e.controls)
    forks = await box.exec(ExecRequest(argv=("/usr/bin/python3", "-c", sys.argv[2], "40"), env=ENV, timeout_ms=20000))
    out["forks"] = forks.stdout.decode().split()
    await box.destroy()

asyncio.run(main())
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def unprivileged_user() -> pwd.struct_passwd:
    """The ``kavachtest`` user, created when missing (needs root)."""
    if os.geteuid() != 0:
        pytest.skip("creating the test user needs root")
    if shutil.which("runuser") is None or not os.path.exists("/usr/bin/python3"):
        pytest.skip("runuser or /usr/bin/python3 missing")
    try:
        return pwd.getpwnam(USER)
    except KeyError:
        subprocess.run(["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", USER], check=True)
        return pwd.getpwnam(USER)


@pytest.fixture(scope="module")
def observed(unprivileged_user: pwd.struct_passwd) -> Iterator[dict[str, Any]]:
    """What the unprivileged script saw."""
    # Not under pytest's basetemp: its root is 0700 (and reset by every pytest session).
    base = Path(tempfile.mkdtemp(prefix="kavach-unpriv-", dir="/tmp"))
    try:
        yield _run_script(unprivileged_user, base)
    finally:
        shutil.rmtree(base, ignore_errors=True)


def _run_script(unprivileged_user: pwd.struct_passwd, base: Path) -> dict[str, Any]:
    os.chmod(base, 0o755)
    shared = base / "shared"
    shared.mkdir()
    os.chown(shared, unprivileged_user.pw_uid, unprivileged_user.pw_gid)
    env = user_env(HOME=str(base))
    proc = subprocess.run(  # noqa: PLW1510 - the return code is asserted with the stderr shown
        [shutil.which("runuser") or "runuser", "-u", USER, "--", "/usr/bin/python3", "-c", SCRIPT, str(shared), FORKS],
        capture_output=True,
        env=env,
        cwd=str(base),
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr.decode()[-3000:]
    result: dict[str, Any] = json.loads(proc.stdout.decode().strip().splitlines()[-1])
    return result


def test_runs_as_the_unprivileged_user(observed: dict[str, Any], unprivileged_user: pwd.struct_passwd) -> None:
    assert observed["uid"] == unprivileged_user.pw_uid
    assert observed["probe_available"]


def test_root_inside_is_the_caller_outside(observed: dict[str, Any], unprivileged_user: pwd.struct_passwd) -> None:
    assert observed["uid_map"] == f"0 {unprivileged_user.pw_uid} 1"
    assert observed["id"]["out"].split() == ["0", "CapEff:", "0000000000000000"]
    assert observed["namespaces_differ"]


def test_limits_without_cgroup_access_fail_closed(observed: dict[str, Any]) -> None:
    assert observed["limits_error"] is not None
    assert "cgroup" in observed["limits_error"]
    assert "allow_degraded" in observed["limits_error"]  # says how to run anyway
    assert "kavach cgroups delegate" in observed["limits_error"]  # ... or how to get the limits
    # `kavach backends` says so before anything is created.
    assert "not writable by uid" in observed["probe_reason"]
    assert "kavach cgroups delegate USER" in observed["probe_reason"]


def test_allow_degraded_runs_without_the_cgroup_scored_and_pids_still_limited(observed: dict[str, Any]) -> None:
    # Resource limits are not a scored control, and the record says what is not limited.
    assert observed["degraded_controls"] == ["landlock", "network_isolated", "read_only_root", "seccomp"]
    (entry,) = observed["degraded"]
    assert entry.startswith("resource_limits (no cgroup: ")
    assert "pids by RLIMIT_NPROC 16" in entry and "memory, CPU share not limited" in entry
    # RLIMIT_NPROC in the sandbox's user namespace: init, the exec server, python and the
    # children it could fork make 16, and the rest of the 40 forks are refused.
    made, refused, processes = (int(x) for x in observed["forks"])
    assert processes == 16 and made == 13 and refused == 27


def test_strict_controls_without_limits_are_enforced(observed: dict[str, Any]) -> None:
    assert observed["controls"] == ["landlock", "network_isolated", "read_only_root", "seccomp"]


def test_rw_bind_writes_land_as_the_caller(observed: dict[str, Any], unprivileged_user: pwd.struct_passwd) -> None:
    assert observed["bind"]["out"] == "from-sandbox\n"
    assert observed["owner_of_made"] == unprivileged_user.pw_uid


def test_escapes_fail_for_an_unprivileged_caller_too(observed: dict[str, Any]) -> None:
    assert observed["python"]["out"] == "42\n"
    assert observed["mount"]["code"] != 0
    assert observed["unshare"]["code"] != 0
    assert observed["root_home"]["code"] != 0 and observed["root_home"]["out"] == ""
    assert observed["interfaces"]["out"] == "lo\n"
    assert observed["write_usr"]["code"] != 0
    assert "unprivileged-caller-secret" not in observed["environ"]["out"]


def test_background_processes_die_at_timeout_and_destroy(observed: dict[str, Any]) -> None:
    assert observed["timeout"]["timed_out"]
    assert "sleep" not in observed["after_timeout"]
    assert observed["after_destroy"] == []


def test_cli_run_allow_degraded_as_the_unprivileged_user(unprivileged_user: pwd.struct_passwd) -> None:
    # `kavach run` with a preset (which asks for limits) fails closed for this user here,
    # naming the option; with --allow-degraded it runs, and the JSON shows what was lost.
    with user_dir(unprivileged_user, "kavach-unpriv-cli-") as base:
        # (runuser resets HOME to the user's, which does not exist: the data directory goes here.)
        env = user_env(XDG_DATA_HOME=str(base))
        cli = [
            shutil.which("runuser") or "runuser",
            "-u",
            USER,
            "--",
            "/usr/bin/python3",
            "-c",
            "import sys; from kavach.cli import main; sys.exit(main())",
            "run",
            "--backend",
            "process",
            "--policy",
            "strict",
            "--json",
        ]

        def run(*args: str) -> subprocess.CompletedProcess[bytes]:
            return subprocess.run([*cli, *args], capture_output=True, env=env, cwd=str(base), timeout=120, check=False)

        refused = run("--", "true")
        ran = run("--allow-degraded", "--", "sh", "-c", "echo ran")
    assert refused.returncode != 0 and refused.stdout == b""
    assert b"allow_degraded" in refused.stderr and b"Traceback" not in refused.stderr
    assert ran.returncode == 0, ran.stderr.decode()[-2000:]
    data = json.loads(ran.stdout)
    assert data["result"]["stdout"] == "ran\n"
    assert data["score"] == 66  # strict's 68 without the resource-limits modifier
    assert [d.split(" ")[0] for d in data["enforcement"]["degraded"]] == ["resource_limits"]
