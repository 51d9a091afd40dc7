"""200 create/exec/destroy cycles leave no process, mount or cgroup of kavach behind."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from kavach.backends.process import ProcessDriver
from kavach.backends.process.client import Spawner
from kavach.policy import SandboxPolicy
from process_helpers import new_id, sandbox, sh

pytestmark = pytest.mark.skipif(not ProcessDriver().probe().available, reason="Process backend unavailable here")

CYCLES = 200


def _children_of(pid: int) -> list[int]:
    found = []
    for task in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{task}/children") as f:
            found.extend(int(x) for x in f.read().split())
    return found


def _describe(pid: int) -> str:
    """What a leftover process is: its state and kavach cgroup (named after its sandbox)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
        with open(f"/proc/{pid}/cgroup") as f:
            groups = sorted({line.rsplit("/", 1)[-1].strip() for line in f if "kavach" in line})
    except OSError as exc:
        return f"{pid} (gone: {exc.strerror})"
    return f"{pid} state {state} cgroups {groups or 'none of kavach'}"


def _cgroups_named(prefix: str) -> list[str]:
    found = []
    for parent in Path("/sys/fs/cgroup").glob("*/kavach"):
        found.extend(str(p) for p in parent.iterdir() if p.name.startswith(f"kavach-{prefix}"))
    for parent in Path("/sys/fs/cgroup").glob("unified/kavach"):
        found.extend(str(p) for p in parent.iterdir() if p.name.startswith(f"kavach-{prefix}"))
    return found


def _mount_count() -> int:
    with open("/proc/self/mountinfo") as f:
        return len(f.readlines())


@pytest.mark.slow
async def test_200_cycles_leave_nothing_behind() -> None:
    prefix = new_id("cycle")
    policy = SandboxPolicy.basic() if os.geteuid() == 0 else SandboxPolicy.minimal()
    mounts_before = _mount_count()
    fds_before = len(os.listdir("/proc/self/fd"))
    for i in range(CYCLES):
        async with sandbox(policy, sandbox_id=f"{prefix}-{i}") as box:
            result = await sh(box, "echo $((6*7)) > /tmp/x; cat /tmp/x; sleep 1000 &")
            assert result.stdout == b"42\n"
    spawner = Spawner.get()
    # destroy() returns when init's pidfd reports its exit; the kernel unlinks the task from
    # the spawner's children a moment later (release), so wait, bounded, for the list to
    # empty: a leaked init or orphan would stay there.
    deadline = time.monotonic() + 5.0
    while _children_of(spawner.pid) and time.monotonic() < deadline:
        time.sleep(0.01)
    left = _children_of(spawner.pid)
    # No init and no orphan left under the spawner (the spawner serves the whole test
    # session: a process of an earlier test's sandbox shows here too, named by its cgroup).
    assert left == [], [_describe(pid) for pid in left]
    assert _cgroups_named(prefix) == []
    assert _mount_count() == mounts_before
    assert len(os.listdir("/proc/self/fd")) <= fds_before + 1  # the spawner socket, if it started now


def test_a_caller_that_exits_without_destroy_leaves_no_cgroup_or_process() -> None:
    if os.geteuid() != 0:
        pytest.skip("cgroups need root here")
    name = new_id("exit")
    script = (
        "import asyncio\n"
        "from kavach.backends.base import ExecRequest, LaunchSpec\n"
        "from kavach.backends.process import ProcessDriver\n"
        "from kavach.policy import SandboxPolicy\n"
        "async def main():\n"
        f"    box = await ProcessDriver().start(LaunchSpec({name!r}, SandboxPolicy.basic()))\n"
        "    await box.exec(ExecRequest(argv=('/bin/sh', '-c', 'sleep 1000 &'), env={}))\n"
        "    print(box.init_pid, flush=True)\n"
        "asyncio.run(main())\n"
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, timeout=60, check=True)
    init_pid = int(proc.stdout.split()[-1])
    assert _cgroups_named(name) == []
    assert not os.path.exists(f"/proc/{init_pid}") or _state(init_pid) in ("Z", "X")


def _state(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[0].decode()
    except OSError:
        return "X"
