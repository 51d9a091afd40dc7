"""The Process backend when user namespaces are blocked.

This host allows user namespaces, so the block is SIMULATED with the driver's
``simulate_userns_blocked`` switch (the only thing not real here): the sandbox is then built
by the real degraded code path (Landlock + seccomp + rlimits, no namespaces) on the real kernel.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os

import pytest

from kavach.backends.base import ExecRequest, LaunchSpec
from kavach.backends.process import ProcessDriver
from kavach.errors import SandboxCreateError
from kavach.policy import SandboxPolicy
from kavach.scoring import Control, score
from process_helpers import ENV, new_id

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
