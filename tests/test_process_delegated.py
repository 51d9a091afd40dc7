"""An unprivileged user whose cgroup v1 subtree root delegated: full limits, full score.

cgroup v1 (this host) lets only root create cgroups, so without help an unprivileged
caller's sandboxes cannot have their memory, pids and CPU limits (test_process_unprivileged
covers that: fail closed, or degraded and scored lower). Here the test (as root) creates the
user ``kavachdelegate``, runs ``kavach cgroups delegate`` for it, and runs one script as that
user with the real engine; the assertions run here. Teardown runs ``kavach cgroups
undelegate``. A different user from test_process_unprivileged's, so the two never see each
other's setup.
"""

from __future__ import annotations

import os
import pwd
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from kavach.backends.process.cgroups import USERS_PARENT, cgroup_support
from process_helpers import (
    FORKS,
    TICKS,
    delegated_system_user,
    kavach_cli,
    kavach_run_as,
    run_script_as,
)

USER = "kavachdelegate"
pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="creating the user and delegating need root"),
    pytest.mark.skipif(cgroup_support().version != 1, reason="cgroup v1 delegation: this host is not v1"),
    pytest.mark.skipif(
        shutil.which("runuser") is None or not os.path.exists("/usr/bin/python3"),
        reason="runuser or /usr/bin/python3 missing",
    ),
]

SCRIPT = r"""
import asyncio, json, os, sys, time
from kavach.backends.base import ExecRequest, LaunchSpec
from kavach.backends.process import ProcessDriver
from kavach.policy import SandboxPolicy

ENV = {"PATH": "/usr/bin:/bin"}
out = {"uid": os.getuid()}

async def main():
    out["probe_reason"] = ProcessDriver().probe().reason
    policy = SandboxPolicy.strict()
    out["limits"] = {"memory": policy.resources.memory, "pids": policy.resources.pids}
    box = await ProcessDriver().start(LaunchSpec("delegated", policy))
    e = box.enforcement()
    out["controls"] = sorted(c.value for c in e.controls)
    out["degraded"] = list(e.degraded)
    out["cgroup_dirs"] = sorted(str(d) for d in box.cgroup.dirs.values())
    # A busy loop in the background (4 s of wall clock), paused and resumed.
    busy = "import time\nend = time.time() + 4\nwhile time.time() < end: pass"
    r = await box.exec(ExecRequest(argv=("/bin/sh", "-c", '/usr/bin/python3 -c "$0" >/dev/null 2>&1 & echo started',
                                         busy), env=ENV, timeout_ms=10000))
    out["busy_started"] = r.stdout.decode()
    time.sleep(0.2)
    pids = box.cgroup.pids()
    out["ticks_while_paused"], out["ticks_after_resume"] = await pause_ticks(box, pids)
    bomb = "x = []\nwhile True: x.append(bytearray(16 << 20))"
    r = await box.exec(ExecRequest(argv=("/usr/bin/python3", "-c", bomb), env=ENV, timeout_ms=60000))
    out["memory_bomb"] = {"code": r.exit_code, "reason": r.reason, "oom": box.oom_killed()}
    r = await box.exec(ExecRequest(argv=("/usr/bin/python3", "-c", sys.argv[1], "400"), env=ENV, timeout_ms=60000))
    out["forks"] = r.stdout.decode().split()
    await box.destroy()
    out["dirs_after_destroy"] = [d for d in out["cgroup_dirs"] if os.path.exists(d)]

asyncio.run(main())
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def delegated_user() -> Iterator[pwd.struct_passwd]:
    """``kavachdelegate``, created when missing, with a cgroup subtree delegated by the CLI."""
    with delegated_system_user(USER) as user:
        yield user


@pytest.fixture(scope="module")
def observed(delegated_user: pwd.struct_passwd) -> dict[str, Any]:
    """What the script saw, run as the delegated user."""
    return run_script_as(USER, TICKS + SCRIPT, FORKS, cwd="/", timeout=180)


def test_delegate_made_the_users_subtree(delegated_user: pwd.struct_passwd) -> None:
    again = kavach_cli("cgroups", "delegate", USER)  # idempotent, and says where
    assert again.returncode == 0
    directories = [Path(line.split()[1]) for line in again.stdout.splitlines()]
    assert len(directories) >= 3  # memory, pids, freezer (and cpu)
    for directory in directories:
        assert directory.parent.name == USERS_PARENT and directory.name == str(delegated_user.pw_uid)
        assert os.stat(directory).st_uid == delegated_user.pw_uid


def test_the_users_sandbox_has_every_control_and_no_degradation(
    observed: dict[str, Any], delegated_user: pwd.struct_passwd
) -> None:
    assert observed["uid"] == delegated_user.pw_uid
    assert observed["probe_reason"].endswith("; cgroup v1")  # writable: nothing to ask for
    assert observed["controls"] == ["landlock", "network_isolated", "read_only_root", "resource_limits", "seccomp"]
    assert observed["degraded"] == []
    parent = f"/{USERS_PARENT}/{delegated_user.pw_uid}/kavach-delegated"
    assert observed["cgroup_dirs"] and all(d.endswith(parent) for d in observed["cgroup_dirs"])


def test_a_memory_bomb_is_killed_and_reported(observed: dict[str, Any]) -> None:
    assert observed["memory_bomb"] == {"code": 137, "reason": "memory limit", "oom": True}


def test_a_fork_bomb_is_contained_by_the_pids_limit(observed: dict[str, Any]) -> None:
    made, refused, processes = (int(x) for x in observed["forks"])
    assert refused > 0
    assert processes <= observed["limits"]["pids"]
    assert made + refused == 400


def test_pause_freezes_and_resume_thaws(observed: dict[str, Any]) -> None:
    assert observed["busy_started"] == "started\n"
    assert observed["ticks_while_paused"] == 0
    assert observed["ticks_after_resume"] > 0


def test_destroy_removes_the_cgroup(observed: dict[str, Any]) -> None:
    assert observed["dirs_after_destroy"] == []


def test_cli_run_strict_scores_68_for_the_user(delegated_user: pwd.struct_passwd) -> None:
    data = kavach_run_as(delegated_user, "--backend", "process", "--policy", "strict", "--", "sh", "-c", "echo ran")
    assert data["result"]["stdout"] == "ran\n"
    assert data["score"] == 68 and data["enforcement"]["degraded"] == []


def test_undelegate_refuses_while_a_sandbox_cgroup_exists(delegated_user: pwd.struct_passwd) -> None:
    busy = Path(kavach_cli("cgroups", "delegate", USER).stdout.split()[1]) / "kavach-left-behind"
    busy.mkdir()
    try:
        refused = kavach_cli("cgroups", "undelegate", USER)
        assert refused.returncode == 2 and refused.stdout == ""
        assert "still has sandbox cgroups: ['kavach-left-behind']" in refused.stderr
        assert "Traceback" not in refused.stderr
    finally:
        busy.rmdir()
