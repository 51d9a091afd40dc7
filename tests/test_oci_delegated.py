"""The OCI backend for an unprivileged user whose cgroup v1 subtree root delegated, with real runc.

runc's rootless mode can give a container a cgroup on cgroup v1 only below a path the user
may write in every hierarchy it joins. ``kavach cgroups delegate USER`` makes that subtree;
the OCI backend then passes ``linux.cgroupsPath`` below it, and the user's containers get
their memory, pids and CPU limits, the freezer and the full score, as a root caller's do.
(test_oci_rootless covers the user without a delegation: refused, or degraded and scored
lower.) The test (as root) creates the user ``kavachocidelegate``, delegates, runs one
script as that user with Debian's python3, asserts here, and undelegates at the end.
"""

from __future__ import annotations

import os
import pwd
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from kavach.backends.oci.runtime import probe_runc
from kavach.backends.process import cgroups
from process_helpers import FORKS, TICKS, delegated_system_user, kavach_run_as, run_script_as, user_dir

USER = "kavachocidelegate"
pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="creating the user and delegating need root"),
    pytest.mark.skipif(cgroups.cgroup_support().version != 1, reason="cgroup v1 delegation: this host is not v1"),
    pytest.mark.skipif(not probe_runc().usable, reason="runc unusable"),
    pytest.mark.skipif(
        shutil.which("runuser") is None or not os.path.exists("/usr/bin/python3"),
        reason="runuser or /usr/bin/python3 missing",
    ),
]

SCRIPT = r"""
import asyncio, json, os, sys, time
from pathlib import Path
from kavach.backends import registry
from kavach.backends.base import ExecRequest, LaunchSpec
from kavach.backends.oci import OciDriver
from kavach.policy import SandboxPolicy

ENV = {"PATH": "/usr/bin:/bin"}
uid = os.getuid()
out = {"uid": uid}
HIERARCHIES = sorted(p for p in Path("/sys/fs/cgroup").iterdir() if p.is_dir() and not p.is_symlink()
                     and p.name != "unified")

async def main():
    driver = OciDriver()
    probe = driver.probe()
    out["probe"] = [probe.available, probe.resource_limits]
    out["auto"] = registry.resolve_best(SandboxPolicy.strict()).value
    policy = SandboxPolicy.strict()
    out["limits"] = {"memory": policy.resources.memory, "pids": policy.resources.pids}
    box = await driver.start(LaunchSpec(f"ocidel-{os.getpid()}", policy))
    mine = f"/kavach-users/{uid}/{box.container_id}"
    dirs = [h / mine.lstrip("/") for h in HIERARCHIES]
    try:
        e = box.enforcement()
        out["controls"] = sorted(c.value for c in e.controls)
        out["degraded"] = list(e.degraded)
        out["cgroup_limits"] = e.details["cgroup_limits"]
        out["dirs_made"] = [str(d) for d in dirs if d.is_dir()]
        out["hierarchies"] = len(HIERARCHIES)
        procs = Path(f"/sys/fs/cgroup/pids{mine}/cgroup.procs")
        busy = "import time\nend = time.time() + 4\nwhile time.time() < end: pass"
        r = await box.exec(ExecRequest(argv=("/bin/sh", "-c", '/usr/bin/python3 -c "$0" >/dev/null 2>&1 & echo started',
                                             busy), env=ENV, timeout_ms=10000))
        out["busy_started"] = r.stdout.decode()
        time.sleep(0.2)
        pids = [int(p) for p in procs.read_text().split()]
        out["members"] = len(pids)
        out["ticks_while_paused"], out["ticks_after_resume"] = await pause_ticks(box, pids)
        # (Before the fork bomb, whose children live on for 2 s.)
        r = await box.exec(ExecRequest(argv=("sh", "-c", "sleep 100 & sleep 100"), env=ENV, timeout_ms=300))
        out["timeout"] = [r.timed_out, r.exit_code, box.live_pids()]
        bomb = "x = []\nwhile True: x.append(bytearray(16 << 20))"
        r = await box.exec(ExecRequest(argv=("/usr/bin/python3", "-c", bomb), env=ENV, timeout_ms=60000))
        out["memory_bomb"] = [r.exit_code, r.reason, box.oom_kills() > 0]
        r = await box.exec(ExecRequest(argv=("/usr/bin/python3", "-c", sys.argv[1], "400"), env=ENV, timeout_ms=60000))
        out["forks"] = r.stdout.decode().split()
    finally:
        await box.destroy()
    out["dirs_after_destroy"] = [str(d) for d in dirs if d.exists()]

asyncio.run(main())
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def delegated_user() -> Iterator[pwd.struct_passwd]:
    """``kavachocidelegate``, created when missing, with a cgroup subtree delegated by the CLI."""
    with delegated_system_user(USER) as user:
        try:
            yield user
        finally:
            shutil.rmtree(f"/tmp/kavach-{user.pw_uid}", ignore_errors=True)  # the driver's runc state directory


@pytest.fixture(scope="module")
def observed(delegated_user: pwd.struct_passwd) -> dict[str, Any]:
    """What the script saw, run as the delegated user."""
    with user_dir(delegated_user, "kavach-ocidel-") as base:
        return run_script_as(USER, TICKS + SCRIPT, FORKS, cwd=str(base), timeout=240, HOME=str(base))


def test_the_delegation_covers_every_v1_hierarchy(delegated_user: pwd.struct_passwd) -> None:
    # runc joins every hierarchy (cpuset, devices, blkio, name=systemd ...), not only the
    # four the Process backend limits with; cpuset's directories need CPUs and memory nodes.
    mounts = [
        Path(line.split()[4])
        for line in Path("/proc/self/mountinfo").read_text().splitlines()
        if line.split(" - ")[1].startswith("cgroup ")
    ]
    assert len(mounts) > 4
    for mount in mounts:
        directory = mount / cgroups.USERS_PARENT / str(delegated_user.pw_uid)
        assert os.stat(directory).st_uid == delegated_user.pw_uid, directory
        if (directory / "cpuset.cpus").exists():
            assert (directory / "cpuset.cpus").read_text().strip() and (directory / "cpuset.mems").read_text().strip()


def test_rootless_oci_gets_every_control_and_no_degradation(observed: dict[str, Any]) -> None:
    assert observed["probe"] == [True, True]  # auto-selection may use it for limits
    assert observed["auto"] == "oci"
    assert observed["controls"] == ["landlock", "network_isolated", "read_only_root", "resource_limits", "seccomp"]
    assert observed["degraded"] == []
    limits = observed["cgroup_limits"]
    assert limits["memory"] == observed["limits"]["memory"] and limits["pids"] == observed["limits"]["pids"]
    # The container's cgroup is below the user's subtree in every hierarchy (runc made it).
    assert len(observed["dirs_made"]) == observed["hierarchies"]


def test_pause_freezes_and_resume_thaws(observed: dict[str, Any]) -> None:
    assert observed["busy_started"] == "started\n"
    assert observed["members"] >= 2  # init and the busy loop are in the container's own cgroup
    assert observed["ticks_while_paused"] == 0
    assert observed["ticks_after_resume"] > 0


def test_a_memory_bomb_is_killed_and_reported(observed: dict[str, Any]) -> None:
    assert observed["memory_bomb"] == [137, "memory limit", True]


def test_a_fork_bomb_is_contained_by_the_pids_limit(observed: dict[str, Any]) -> None:
    made, refused, processes = (int(x) for x in observed["forks"])
    assert refused > 0
    assert processes <= observed["limits"]["pids"]
    assert made + refused == 400


def test_a_timeout_kills_the_command_and_its_children(observed: dict[str, Any]) -> None:
    assert observed["timeout"] == [True, 137, 1]  # only the container's init is left


def test_destroy_removes_the_cgroup(observed: dict[str, Any]) -> None:
    assert observed["dirs_made"] and observed["dirs_after_destroy"] == []


def test_cli_run_strict_picks_oci_with_limits_for_the_user(delegated_user: pwd.struct_passwd) -> None:
    report = kavach_run_as(delegated_user, "--policy", "strict", "--", "echo", "ran")
    assert report["backend"] == "oci" and report["enforcement"]["degraded"] == []
    assert "resource_limits" in report["enforcement"]["controls"]
    assert report["score"] == 73
    assert report["result"]["stdout"] == "ran\n"
