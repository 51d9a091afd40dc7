"""The Process backend when user namespaces are blocked, or no cgroup is available.

This host allows user namespaces, so the block is SIMULATED with the driver's
``simulate_userns_blocked`` switch (the only thing not real here): the sandbox is then built
by the real degraded code path (Landlock + seccomp + rlimits, no namespaces) on the real kernel.

The tests run as root, who may always create cgroups here, so a caller without one is
SIMULATED by making ``create_cgroup`` raise what it raises for an unprivileged caller (the
real case runs in ``test_process_unprivileged.py``); the rest is the real engine.
"""

from __future__ import annotations

import asyncio
import dataclasses
import errno
import os
from typing import Any

import pytest

from kavach.backends.base import ExecRequest, LaunchSpec
from kavach.backends.process import ProcessDriver
from kavach.backends.process import cgroups as cgroups_module
from kavach.backends.process import driver as driver_module
from kavach.errors import SandboxCreateError
from kavach.policy import ResourceLimits, SandboxPolicy
from kavach.scoring import Control, score
from process_helpers import ENV, FORKS, new_id

pytestmark = pytest.mark.skipif(not ProcessDriver().probe().available, reason="Process backend unavailable here")


def _degraded(policy: SandboxPolicy) -> SandboxPolicy:
    return dataclasses.replace(policy, allow_degraded=True)


async def test_simulated_userns_block_fails_closed_with_how_to_allow_it() -> None:
    with pytest.raises(SandboxCreateError) as info:
        await ProcessDriver(simulate_userns_blocked=True).start(LaunchSpec(new_id(), SandboxPolicy.basic()))
    message = str(info.value)
    assert "user namespaces are blocked" in message
    assert "sysctl" in message and "allow_degraded" in message


async def test_simulated_userns_block_degraded_mode_is_scored_lower_and_listed() -> None:
    box = await ProcessDriver(simulate_userns_blocked=True).start(
        LaunchSpec(new_id(), _degraded(SandboxPolicy.basic()))
    )
    try:
        enforcement = box.enforcement()
        assert any(item.startswith("namespaces") for item in enforcement.degraded)
        assert Control.READ_ONLY_ROOT not in enforcement.controls
        assert {Control.SECCOMP, Control.LANDLOCK, Control.NETWORK_ISOLATED} <= enforcement.controls
        full = SandboxPolicy.basic()
        assert int(score(enforcement)) < 65  # basic with namespaces scores 65
        assert full.allow_degraded is False
    finally:
        await box.destroy()


async def test_simulated_userns_block_degraded_mode_confines_files_network_and_processes() -> None:
    box = await ProcessDriver(simulate_userns_blocked=True).start(
        LaunchSpec(new_id(), _degraded(SandboxPolicy.basic()))
    )
    try:
        run = lambda script: box.exec(  # noqa: E731
            ExecRequest(argv=("/bin/sh", "-c", script), env=ENV, timeout_ms=20_000)
        )
        result = await run("echo hi > made && cat made")
        assert result.stdout == b"hi\n"
        for path in ("/root", "/home", "/tmp", "/var"):
            assert (await run(f"ls {path}")).exit_code != 0, path
        assert (await run("echo x > /tmp/kavach-degraded-escape")).exit_code != 0
        result = await run("/usr/bin/python3 -c 'import socket; socket.socket()'")
        assert result.exit_code != 0 and b"Operation not permitted" in result.stderr
        if os.geteuid() == 0:
            assert (await run("id -u")).stdout == b"65534\n"
    finally:
        await box.destroy()


async def test_simulated_userns_block_timeout_and_destroy_kill_descendants() -> None:
    box = await ProcessDriver(simulate_userns_blocked=True).start(
        LaunchSpec(new_id(), _degraded(SandboxPolicy.basic()))
    )
    try:
        result = await box.exec(
            ExecRequest(
                argv=("/bin/sh", "-c", "sleep 1000 & (setsid sleep 1000 &); sleep 1000"), env=ENV, timeout_ms=400
            )
        )
        assert result.timed_out
        await asyncio.sleep(0.1)
        assert [p for p in _descendants(box.init_pid) if _comm(p) == "sleep"] == []
        await box.exec(ExecRequest(argv=("/bin/sh", "-c", "sleep 1000 & (setsid sleep 1000 &)"), env=ENV))
        await asyncio.sleep(0.1)
        survivors = _descendants(box.init_pid)
        assert len([p for p in survivors if _comm(p) == "sleep"]) == 2
    finally:
        await box.destroy()
    await asyncio.sleep(0.1)
    assert [p for p in survivors if os.path.exists(f"/proc/{p}") and _comm(p) == "sleep"] == []


def _comm(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/comm") as f:
            return f.read().strip()
    except OSError:
        return ""


def _descendants(root: int) -> set[int]:
    children: dict[int, list[int]] = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open(f"/proc/{name}/stat", "rb") as f:
                    ppid = int(f.read().rsplit(b")", 1)[1].split()[1])
            except OSError:
                continue
            children.setdefault(ppid, []).append(int(name))
    found: set[int] = set()
    todo = [root]
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


# -- no cgroup for this caller (simulated as root: see the module docstring) ----------------------


def _no_cgroup_for_this_caller(monkeypatch: pytest.MonkeyPatch, step: str = "mkdir") -> None:
    def refuse(name: str, limits: ResourceLimits) -> cgroups_module.Cgroup:
        detail = "run as root or delegate a writable cgroup"
        raise cgroups_module.CgroupError(step, errno.EACCES, f"/sys/fs/cgroup/pids/kavach/{name}", detail)

    monkeypatch.setattr(cgroups_module, "create_cgroup", refuse)


def _limited(pids: int, *, allow_degraded: bool) -> SandboxPolicy:
    limits = dataclasses.replace(SandboxPolicy.basic().resources, pids=pids)
    return dataclasses.replace(SandboxPolicy.basic(), resources=limits, allow_degraded=allow_degraded)


async def test_simulated_no_cgroup_fails_closed_saying_how_to_run_anyway(monkeypatch: pytest.MonkeyPatch) -> None:
    _no_cgroup_for_this_caller(monkeypatch)
    live_before = set(driver_module._LIVE)
    with pytest.raises(SandboxCreateError) as info:
        await ProcessDriver().start(LaunchSpec(new_id(), _limited(12, allow_degraded=False)))
    message = str(info.value)
    assert message.startswith("resource limits asked but cgroup mkdir ")
    assert "run as root or delegate a writable cgroup" in message and "allow_degraded" in message
    assert set(driver_module._LIVE) == live_before


async def test_simulated_no_cgroup_degrades_scored_with_pids_kept_by_rlimit_nproc(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    _no_cgroup_for_this_caller(monkeypatch)
    seen: list[tuple[Any, ...]] = []
    real = driver_module.verify_probe

    def keep(*args: Any, **kwargs: Any) -> Any:
        seen.append((*args, kwargs))
        return real(*args, **kwargs)

    monkeypatch.setattr(driver_module, "verify_probe", keep)
    box = await ProcessDriver().start(LaunchSpec(new_id(), _limited(12, allow_degraded=True)))
    try:
        enforcement = box.enforcement()
        assert box.cgroup is None
        assert Control.RESOURCE_LIMITS not in enforcement.controls
        (entry,) = enforcement.degraded
        assert entry.startswith("resource_limits (no cgroup: cgroup mkdir ")
        assert entry.endswith("; pids by RLIMIT_NPROC 12; memory not limited)")  # basic sets no CPU share
        assert int(score(enforcement)) < 65  # basic with its cgroup scores 65
        assert enforcement.details["rlimits"]["nproc"] == 12
        # The limit holds inside (root inside is an unprivileged uid outside, so the kernel
        # enforces it): init, the exec server, python and its children make 12.
        result = await box.exec(ExecRequest(argv=("/usr/bin/python3", "-c", FORKS), env=ENV, timeout_ms=20_000))
        made, refused, processes = (int(x) for x in result.stdout.split())
        assert (processes, made, refused) == (12, 9, 21), result
    finally:
        await box.destroy()
    # An RLIMIT_NPROC the probe did not observe fails creation.
    ((plan, probe, cgroup, spec, kwargs),) = seen
    assert probe["nproc"] == 12
    with pytest.raises(SandboxCreateError, match="RLIMIT_NPROC is 1024, not 12"):
        real(plan, {**probe, "nproc": 1024}, cgroup, spec, **kwargs)


async def test_simulated_no_cgroup_never_degrades_a_limit_the_kernel_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    # A cgroup was made but a limit could not be written: that is a failure, not a missing
    # cgroup, whatever the policy allows.
    _no_cgroup_for_this_caller(monkeypatch, step="set pids limit")
    with pytest.raises(SandboxCreateError, match="cgroup set pids limit"):
        await ProcessDriver().start(LaunchSpec(new_id(), _limited(12, allow_degraded=True)))


def test_the_degraded_entry_names_exactly_what_is_not_limited() -> None:
    pids_only = ResourceLimits(pids=5)
    assert driver_module._degraded_limits({"rlimits": {"nproc": 5}}, pids_only, "why") == (
        "resource_limits (no cgroup: why; pids by RLIMIT_NPROC 5)"
    )
    # No user namespace (the userns-blocked mode): no RLIMIT_NPROC, so pids are not limited.
    everything = ResourceLimits(memory=1 << 20, pids=5, cpus=0.5)
    assert driver_module._degraded_limits({"rlimits": {}}, everything, "why") == (
        "resource_limits (no cgroup: why; memory, pids, CPU share not limited)"
    )
