"""Sandbox cgroups on the real kernel (this machine: cgroup v1 controllers, an empty v2 mount).

Each workload starts blocked on a line of stdin, is moved into the cgroup, and only then
released, so that everything it forks is born inside the cgroup.
"""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from kavach.backends.process import cgroups
from kavach.backends.process.cgroups import (
    Cgroup,
    CgroupError,
    cgroup_support,
    create_cgroup,
    existing_cgroups,
    open_cgroup,
)
from kavach.errors import SandboxCreateError
from kavach.policy import ResourceLimits

MiB = 1024 * 1024
SUPPORT = cgroup_support()
pytestmark = pytest.mark.skipif(
    SUPPORT.version is None or not SUPPORT.writable,
    reason=f"needs a writable cgroup hierarchy: {SUPPORT.reason}",
)
PYTHON = "/usr/bin/python3" if os.path.exists("/usr/bin/python3") else sys.executable


def wait_for(condition: Callable[[], bool], timeout: float = 10.0) -> bool:
    """Poll ``condition`` until true or ``timeout`` seconds passed (no timing is asserted)."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


@pytest.fixture
def make_cgroup() -> Iterator[Callable[[ResourceLimits], Cgroup]]:
    made: list[Cgroup] = []

    def make(limits: ResourceLimits) -> Cgroup:
        cgroup = create_cgroup(f"test-{uuid.uuid4().hex[:12]}", limits)
        made.append(cgroup)
        return cgroup

    yield make
    for cgroup in made:
        cgroup.destroy()


def start_in(cgroup: Cgroup, argv: list[str], **kwargs: object) -> subprocess.Popen[bytes]:
    """Start ``argv`` behind a ``read`` gate, move it into ``cgroup``, then open the gate."""
    gated = ["/bin/sh", "-c", 'read _gate; exec "$@"', "gate", *argv]
    proc = subprocess.Popen(gated, stdin=subprocess.PIPE, **kwargs)  # type: ignore[call-overload]
    cgroup.add(proc.pid)
    assert proc.stdin is not None
    proc.stdin.write(b"go\n")
    proc.stdin.close()
    proc.stdin = None  # so that communicate() does not flush the closed gate
    return proc  # type: ignore[no-any-return]


def cpu_ticks(pid: int) -> int:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])  # utime + stime


def test_support_reports_this_host() -> None:
    assert SUPPORT.version in (1, 2)
    assert {"memory", "pids"} <= SUPPORT.controllers
    assert SUPPORT.reason


def test_create_applies_limits_and_destroy_removes_every_directory(
    make_cgroup: Callable[[ResourceLimits], Cgroup],
) -> None:
    cgroup = make_cgroup(ResourceLimits(memory=64 * MiB, pids=12, cpus=0.5))
    for directory in cgroup.dirs.values():
        assert directory.is_dir()
    if cgroup.version == 1:
        assert (cgroup.dirs["memory"] / "memory.limit_in_bytes").read_text().strip() == str(64 * MiB)
        assert (cgroup.dirs["pids"] / "pids.max").read_text().strip() == "12"
        assert (cgroup.dirs["cpu"] / "cpu.cfs_quota_us").read_text().strip() == "50000"
        memsw = cgroup.dirs["memory"] / "memory.memsw.limit_in_bytes"
        if memsw.exists():
            assert memsw.read_text().strip() == str(64 * MiB)
    else:
        assert (cgroup.path / "memory.max").read_text().strip() == str(64 * MiB)
        assert (cgroup.path / "pids.max").read_text().strip() == "12"
    cgroup.destroy()
    cgroup.destroy()  # idempotent
    for directory in cgroup.dirs.values():
        assert not directory.exists()


@pytest.mark.skipif(SUPPORT.version != 1, reason="the tasks-file self-move is cgroup v1's")
def test_a_process_moves_itself_in_with_the_callers_tasks_fds(make_cgroup: Callable[[ResourceLimits], Cgroup]) -> None:
    """How a sandbox's init joins its cgroup: fds the caller opened, "0" written from inside."""
    cgroup = make_cgroup(ResourceLimits(memory=64 * MiB, pids=20))
    fds = cgroup.self_move_fds()
    assert len(fds) == len(cgroup.dirs)
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        try:
            for fd in fds:
                os.write(fd, b"0")
            code = 0
        except OSError as exc:
            code = 100 + (exc.errno or 0) % 100
        if code == 0:
            signal.pause()  # stay until the parent has checked (it kills us)
        os._exit(code)
    for fd in fds:
        os.close(fd)
    try:
        assert wait_for(lambda: pid in cgroup.pids())
        cgroup.check_member(pid)
        for procs in cgroup.procs_files():
            assert str(pid) in procs.read_text().split()
        with pytest.raises(CgroupError, match="is not in"):
            cgroup.check_member(os.getpid())  # this test process never joined it
    finally:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)


def test_check_member_names_every_hierarchy_the_process_is_missing_from(
    make_cgroup: Callable[[ResourceLimits], Cgroup],
) -> None:
    cgroup = make_cgroup(ResourceLimits(memory=64 * MiB, pids=20))
    proc = subprocess.Popen(["sleep", "30"])
    try:
        with pytest.raises(CgroupError) as raised:
            cgroup.check_member(proc.pid)
        for controller in cgroup.dirs:
            assert controller in str(raised.value)
        cgroup.add(proc.pid)
        cgroup.check_member(proc.pid)
    finally:
        proc.kill()
        proc.wait()


def test_duplicate_and_invalid_names_are_refused(make_cgroup: Callable[[ResourceLimits], Cgroup]) -> None:
    cgroup = make_cgroup(ResourceLimits())
    with pytest.raises(CgroupError, match="exists"):
        create_cgroup(cgroup.name, ResourceLimits())
    assert all(d.is_dir() for d in cgroup.dirs.values())  # the failed create removed nothing of ours
    with pytest.raises(SandboxCreateError, match="invalid cgroup name"):
        create_cgroup("../escape", ResourceLimits())


def test_memory_bomb_is_oom_killed_and_reported(make_cgroup: Callable[[ResourceLimits], Cgroup]) -> None:
    cgroup = make_cgroup(ResourceLimits(memory=48 * MiB))
    bomb = "chunks = []\nwhile True:\n    chunks.append(b'x' * (1 << 20))\n"
    assert not cgroup.oom_killed()  # read before the bomb, as the driver does before each exec
    proc = start_in(cgroup, [PYTHON, "-c", bomb], stderr=subprocess.DEVNULL)
    assert proc.wait(timeout=60) == -signal.SIGKILL
    assert cgroup.oom_killed()  # the same file read again sees the kill
    peak = cgroup.memory_peak()
    assert peak is None or peak <= 48 * MiB


def test_oom_state_of_a_removed_cgroup_reads_as_none_and_destroy_still_works(
    make_cgroup: Callable[[ResourceLimits], Cgroup],
) -> None:
    cgroup = make_cgroup(ResourceLimits(memory=48 * MiB))
    assert not cgroup.oom_killed()  # its counters' file is now held open
    for directory in cgroup.dirs.values():
        os.rmdir(directory)  # removed behind its back (an operator, a sweep)
    assert not cgroup.oom_killed()
    cgroup.destroy()
    assert not cgroup.oom_killed()


def test_fresh_cgroup_reports_no_oom(make_cgroup: Callable[[ResourceLimits], Cgroup]) -> None:
    cgroup = make_cgroup(ResourceLimits(memory=48 * MiB))
    proc = start_in(cgroup, ["/bin/true"])
    assert proc.wait(timeout=30) == 0
    assert not cgroup.oom_killed()


def test_pids_limit_contains_a_fork_bomb(make_cgroup: Callable[[ResourceLimits], Cgroup]) -> None:
    cgroup = make_cgroup(ResourceLimits(pids=8))
    script = "for i in $(seq 40); do /bin/sleep 1000 & done; wait"
    proc = start_in(cgroup, ["/bin/sh", "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    # dash gives up at the first failed fork; either way the cgroup fills up to the limit.
    assert wait_for(lambda: cgroup.pids_current() >= 8 or proc.poll() is not None)
    for _ in range(5):
        assert cgroup.pids_current() <= 8
        assert len(cgroup.pids()) <= 8
        time.sleep(0.02)
    cgroup.kill_all()
    _, stderr = proc.communicate(timeout=30)
    assert b"fork" in stderr.lower()  # dash: "Cannot fork"
    assert cgroup.pids() == []


def test_freeze_stops_a_busy_loop_and_thaw_resumes_it(make_cgroup: Callable[[ResourceLimits], Cgroup]) -> None:
    cgroup = make_cgroup(ResourceLimits())
    proc = start_in(cgroup, ["/bin/sh", "-c", "while :; do :; done"])
    try:
        start = cpu_ticks(proc.pid)
        assert wait_for(lambda: cpu_ticks(proc.pid) > start)  # it is spinning
        cgroup.freeze()
        assert cgroup.frozen()
        frozen_at = cpu_ticks(proc.pid)
        time.sleep(0.3)
        assert cpu_ticks(proc.pid) == frozen_at  # no CPU time while frozen
        cgroup.thaw()
        assert not cgroup.frozen()
        assert wait_for(lambda: cpu_ticks(proc.pid) > frozen_at)
    finally:
        cgroup.kill_all()
        proc.wait(timeout=30)


def test_kill_all_reaches_background_children_and_double_forked_daemons(
    make_cgroup: Callable[[ResourceLimits], Cgroup],
) -> None:
    cgroup = make_cgroup(ResourceLimits())
    script = (
        "/bin/sleep 1000 & "
        "/bin/sh -c '/usr/bin/setsid /bin/sh -c \"/bin/sleep 1000 & /bin/sleep 1000\" &' ; "
        "echo started; wait"
    )
    proc = start_in(cgroup, ["/bin/sh", "-c", script], stdout=subprocess.PIPE)
    assert proc.stdout is not None
    assert proc.stdout.readline() == b"started\n"
    assert wait_for(lambda: len(cgroup.pids()) >= 5)
    victims = cgroup.pids()
    cgroup.kill_all()
    assert cgroup.pids() == []
    for directory in cgroup.dirs.values():
        assert (directory / "cgroup.procs").read_text() == ""
    proc.wait(timeout=30)
    for pid in victims:
        # Reparented daemons were reaped by init; none may still run.
        stat = Path(f"/proc/{pid}/stat")
        assert not stat.exists() or stat.read_text().rsplit(")", 1)[1].split()[0] == "Z"


def test_destroy_kills_what_is_left(make_cgroup: Callable[[ResourceLimits], Cgroup]) -> None:
    cgroup = make_cgroup(ResourceLimits(memory=64 * MiB, pids=16))
    proc = start_in(cgroup, ["/bin/sleep", "1000"])
    assert wait_for(lambda: cgroup.pids() == [proc.pid])
    cgroup.destroy()
    assert proc.wait(timeout=30) == -signal.SIGKILL
    assert not any(d.exists() for d in cgroup.dirs.values())


def test_a_leftover_cgroup_can_be_found_and_removed(make_cgroup: Callable[[ResourceLimits], Cgroup]) -> None:
    # What a restarted engine does with cgroups a crashed one left behind.
    original = make_cgroup(ResourceLimits(pids=16))
    proc = start_in(original, ["/bin/sleep", "1000"])
    assert original.name in existing_cgroups()
    reopened = open_cgroup(original.name)
    assert reopened is not None
    assert reopened.pids() == [proc.pid]
    reopened.destroy()
    assert proc.wait(timeout=30) == -signal.SIGKILL
    assert original.name not in existing_cgroups()
    assert open_cgroup(original.name) is None
    if reopened.version == 1:
        # A handle without the freezer directory (lost in a crash) still empties the cgroup.
        partial = make_cgroup(ResourceLimits())
        sleeper = start_in(partial, ["/bin/sleep", "1000"])
        assert wait_for(lambda: partial.pids() == [sleeper.pid])
        handle = open_cgroup(partial.name)
        assert handle is not None
        del handle.dirs["freezer"]
        handle.kill_all()
        assert sleeper.wait(timeout=30) == -signal.SIGKILL


def test_v2_freeze_and_kill_on_the_controllerless_unified_hierarchy() -> None:
    # This host binds memory/pids/cpu to v1, so the v2 path can only be exercised for what
    # needs no controller: creation, cgroup.freeze, cgroup.kill and removal.
    mounts = cgroups._mounts()
    if mounts.v2 is None or not os.access(mounts.v2, os.W_OK):
        pytest.skip("no writable cgroup2 mount")
    cgroup = cgroups._create_v2(mounts.v2 / cgroups.PARENT, f"test-{uuid.uuid4().hex[:12]}", ResourceLimits())
    try:
        proc = start_in(cgroup, ["/bin/sh", "-c", "/bin/sleep 1000 & while :; do :; done"])
        assert wait_for(lambda: len(cgroup.pids()) == 2)
        cgroup.freeze()
        frozen_at = cpu_ticks(proc.pid)
        time.sleep(0.2)
        assert cpu_ticks(proc.pid) == frozen_at
        cgroup.thaw()
        cgroup.kill_all()
        assert cgroup.pids() == []
        assert proc.wait(timeout=30) == -signal.SIGKILL
    finally:
        cgroup.destroy()
    assert not cgroup.path.exists()


@pytest.mark.skipif(os.geteuid() != 0, reason="setting up a delegated subtree needs root")
def test_v2_delegated_subtree_serves_an_unprivileged_caller() -> None:
    # What systemd's Delegate=yes gives a user: a subtree owned by them. Simulated on the
    # controller-less unified mount (so no limits, but the same permission rules).
    mounts = cgroups._mounts()
    if mounts.v2 is None or not os.access(mounts.v2, os.W_OK):
        pytest.skip("no writable cgroup2 mount")
    delegated = mounts.v2 / f"test-delegated-{uuid.uuid4().hex[:8]}"
    leaf = delegated / "app.scope"
    for directory in (delegated, leaf):
        directory.mkdir()
        for path in (directory, directory / "cgroup.procs", directory / "cgroup.subtree_control"):
            os.chown(path, 65534, 65534)
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: never return into pytest
        report: dict[str, object] = {}
        try:
            (leaf / "cgroup.procs").write_text(str(os.getpid()))
            os.setgroups([])
            os.setresgid(65534, 65534, 65534)
            os.setresuid(65534, 65534, 65534)
            parent = cgroups.v2_parent(mounts.v2)
            report["parent"] = str(parent)
            assert parent is not None
            cgroup = cgroups._create_v2(parent, "sandbox", ResourceLimits())
            sleeper = os.fork()
            if sleeper == 0:
                time.sleep(1000)
                os._exit(0)
            cgroup.add(sleeper)
            cgroup.freeze()
            report["frozen"] = cgroup.frozen()
            cgroup.thaw()
            cgroup.kill_all()
            report["signal"] = os.waitstatus_to_exitcode(os.waitpid(sleeper, 0)[1])
            cgroup.destroy()
            report["removed"] = not cgroup.path.exists()
        except BaseException as exc:
            report["error"] = repr(exc)
        os.write(write_end, json.dumps(report).encode())
        os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as pipe:
        reported = json.loads(pipe.read())
    os.waitpid(pid, 0)
    for directory in (delegated / cgroups.PARENT / "sandbox", delegated / cgroups.PARENT, leaf, delegated):
        if directory.exists():
            directory.rmdir()
    expected = {
        "parent": str(delegated / cgroups.PARENT),
        "frozen": True,
        "signal": -signal.SIGKILL,
        "removed": True,
    }
    assert reported == expected


@pytest.mark.skipif(os.geteuid() != 0, reason="switching to an unprivileged user needs root")
def test_unprivileged_caller_gets_a_clear_error() -> None:
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: drop to nobody, try, report; never return into pytest
        message = b"no error"
        try:
            os.setgroups([])
            os.setresgid(65534, 65534, 65534)
            os.setresuid(65534, 65534, 65534)
            create_cgroup("unpriv-test", ResourceLimits(memory=64 * MiB))
        except SandboxCreateError as exc:
            message = str(exc).encode()
        except BaseException as exc:
            message = repr(exc).encode()
        os.write(write_end, message)
        os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as pipe:
        reported = pipe.read().decode()
    os.waitpid(pid, 0)
    if SUPPORT.version == 1:
        # v1 has no delegation of its own: the message names the command that gives one.
        assert "no cgroup v1 subtree is delegated to uid 65534" in reported
        assert "kavach cgroups delegate nobody" in reported
    else:
        assert "not writable by uid 65534" in reported
        assert "run as root or delegate" in reported


def _as_uid(uid: int, gid: int, work: Callable[[], dict[str, object]]) -> dict[str, object]:
    """Run ``work`` in a forked child that became ``uid:gid``; return what it reported."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: never return into pytest
        try:
            os.setgroups([])
            os.setresgid(gid, gid, gid)
            os.setresuid(uid, uid, uid)
            report = work()
        except BaseException as exc:
            report = {"error": repr(exc)}
        os.write(write_end, json.dumps(report).encode())
        os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as pipe:
        reported: dict[str, object] = json.loads(pipe.read())
    os.waitpid(pid, 0)
    return reported


V1_ONLY = pytest.mark.skipif(
    SUPPORT.version != 1 or os.geteuid() != 0, reason="cgroup v1 delegation: needs root on a v1 host"
)


@V1_ONLY
def test_v1_delegation_gives_an_unprivileged_caller_limited_cgroups() -> None:
    uid = gid = 64000 + os.getpid() % 1000  # a uid no process of this host runs as
    made = cgroups.delegate_v1(uid, gid)
    try:
        assert made == cgroups.delegate_v1(uid, gid)  # idempotent
        assert {d.name for d in made} == {str(uid)}
        assert {d.parent.name for d in made} == {cgroups.USERS_PARENT}
        assert all(os.stat(d).st_uid == uid for d in made)
        assert all(os.stat(d / "cgroup.procs").st_uid == 0 for d in made)  # its own limits stay root's

        def work() -> dict[str, object]:
            cgroup = create_cgroup("kavach-delegated", ResourceLimits(memory=64 * MiB, pids=8, cpus=0.5))
            sleeper = os.fork()
            if sleeper == 0:
                time.sleep(1000)
                os._exit(0)
            cgroup.add(sleeper)
            report: dict[str, object] = {
                "dirs": sorted(str(d) for d in cgroup.dirs.values()),
                "pids_max": (cgroup.dirs["pids"] / "pids.max").read_text().strip(),
                "memory": (cgroup.dirs["memory"] / "memory.limit_in_bytes").read_text().strip(),
                "member": f"{cgroup.dirs['pids']}".endswith(
                    Path(f"/proc/{sleeper}/cgroup").read_text().split("pids:", 1)[1].splitlines()[0]
                ),
                "listed": existing_cgroups(),
            }
            cgroup.freeze()
            report["frozen"] = cgroup.frozen()
            cgroup.destroy()
            report["signal"] = os.waitstatus_to_exitcode(os.waitpid(sleeper, 0)[1])
            report["removed"] = not any(d.exists() for d in cgroup.dirs.values())
            return report

        reported = _as_uid(uid, gid, work)
        parents = {str(d) for d in made}
        assert "error" not in reported, reported
        # The sandbox's cgroup is in the four hierarchies the Process backend uses, below the
        # delegated directories (which cover every v1 hierarchy: runc joins all of them).
        assert len(made) == len(cgroups._mounts().v1_all)
        assert {str(Path(d).parent) for d in reported["dirs"]} <= parents  # type: ignore[union-attr]
        assert len(reported["dirs"]) >= 3  # type: ignore[arg-type]
        assert reported["pids_max"] == "8" and reported["memory"] == str(64 * MiB)
        assert reported["member"] is True
        assert reported["listed"] == ["kavach-delegated"]  # only its own parent, not root's
        assert reported["frozen"] is True and reported["signal"] == -signal.SIGKILL
        assert reported["removed"] is True
    finally:
        cgroups.undelegate_v1(uid)
    assert not any(d.exists() for d in made)
    assert cgroups.undelegate_v1(uid) == []


@V1_ONLY
def test_delegated_v1_path_needs_the_subtree_in_every_hierarchy() -> None:
    uid = gid = 63000 + os.getpid() % 1000
    assert cgroups.delegated_v1_path() is None  # root has its own parent, no delegation

    def work() -> dict[str, object]:
        return {"path": cgroups.delegated_v1_path()}

    made = cgroups.delegate_v1(uid, gid)
    try:
        assert _as_uid(uid, gid, work) == {"path": f"/{cgroups.USERS_PARENT}/{uid}"}
        # A delegation missing one hierarchy (e.g. made by an older kavach for memory, pids,
        # freezer and cpu only) gives runc nothing it could use: no path.
        partial = next(d for d in made if d.parent.parent.name not in ("memory", "pids", "freezer", "cpu"))
        partial.rmdir()
        assert _as_uid(uid, gid, work) == {"path": None}
        assert cgroups.delegate_v1(uid, gid) == made  # delegating again completes it
        assert _as_uid(uid, gid, work) == {"path": f"/{cgroups.USERS_PARENT}/{uid}"}
    finally:
        cgroups.undelegate_v1(uid)


@V1_ONLY
def test_v1_undelegate_is_refused_while_a_sandbox_cgroup_exists() -> None:
    uid = gid = 65000 + os.getpid() % 500
    made = cgroups.delegate_v1(uid, gid)
    leftover = made[0] / "kavach-busy"
    leftover.mkdir()
    try:
        with pytest.raises(CgroupError) as refused:
            cgroups.undelegate_v1(uid)
        assert refused.value.errno in (errno.EBUSY, errno.ENOTEMPTY)
        assert "still has sandbox cgroups: ['kavach-busy']" in str(refused.value)
    finally:
        leftover.rmdir()
        cgroups.undelegate_v1(uid)
    assert not any(d.exists() for d in made)


@V1_ONLY
def test_only_root_delegates_and_root_needs_no_delegation() -> None:
    with pytest.raises(CgroupError, match="root needs no delegation"):
        cgroups.delegate_v1(0, 0)

    def work() -> dict[str, object]:
        try:
            cgroups.delegate_v1(65534, 65534)
        except CgroupError as exc:
            return {"message": str(exc)}
        return {"message": "delegated"}

    assert "only root can delegate cgroups" in str(_as_uid(65534, 65534, work)["message"])


def test_stale_empty_cgroups_are_removed_and_live_ones_kept(
    make_cgroup: Callable[[ResourceLimits], Cgroup],
) -> None:
    def named(prefix: str) -> Cgroup:
        cgroup = create_cgroup(f"{prefix}-{uuid.uuid4().hex[:12]}", ResourceLimits(pids=16))
        return cgroup

    stale, busy, fresh = named("kavach-stale"), named("kavach-busy"), named("kavach-fresh")
    foreign = make_cgroup(ResourceLimits(pids=16))  # not a sandbox's name: never touched
    sleeper = start_in(busy, ["/bin/sleep", "1000"])
    try:
        hour_ago = time.time() - 3600
        for cgroup in (stale, busy, foreign):
            for directory in cgroup.dirs.values():
                os.utime(directory, (hour_ago, hour_ago))
        if stale.version == 1:
            stale.freeze()  # a frozen leftover is thawed first (v1 refuses to remove it otherwise)
        removed = cgroups.remove_stale_cgroups()
        assert stale.name in removed
        assert not any(d.exists() for d in stale.dirs.values())
        assert busy.name not in removed and all(d.exists() for d in busy.dirs.values())
        assert sleeper.poll() is None  # never killed
        assert fresh.name not in removed and all(d.exists() for d in fresh.dirs.values())
        assert foreign.name in existing_cgroups()
    finally:
        for cgroup in (busy, fresh):
            cgroup.destroy()
        stale.destroy()
        sleeper.wait(timeout=30)
