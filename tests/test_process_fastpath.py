"""The Process backend's exec fast path: the exec server, its hand-over and what kills it.

These check behaviour the speed-ups must keep (no timing is asserted here; timing lives in
``benchmarks/bench_process.py``).
"""

from __future__ import annotations

import asyncio
import os
import signal

import pytest

from kavach.backends.base import ExecRequest
from kavach.backends.process import ProcessInstance
from kavach.policy import SandboxPolicy
from process_helpers import ENV, sandbox, sh


def _children(pid: int) -> list[int]:
    """Host pids of the children of host pid ``pid``."""
    with open(f"/proc/{pid}/task/{pid}/children") as f:
        return [int(p) for p in f.read().split()]


async def _server_pid(box: ProcessInstance) -> int:
    """The host pid of the sandbox's exec server (init's only child at rest)."""
    for _ in range(100):
        children = _children(box.init_pid)
        if len(children) == 1:
            return children[0]
        await asyncio.sleep(0.02)
    raise AssertionError(f"init has children {_children(box.init_pid)}")


async def test_a_command_right_after_a_killall_runs_and_is_not_lost() -> None:
    async with sandbox(SandboxPolicy.basic()) as box:
        for _ in range(5):
            await asyncio.sleep(0.05)  # a warm exec child is offered and at hand
            # killall kills that warm child; the next command must not be handed to it.
            box.kill_everything()
            result = await sh(box, "echo again")
            assert (result.exit_code, result.stdout, result.timed_out) == (0, b"again\n", False), result


async def test_a_spawned_command_reports_its_own_pid_and_a_caught_signal_reaches_it() -> None:
    async with sandbox(SandboxPolicy.basic()) as box:
        await asyncio.sleep(0.05)  # served by a warm exec child
        script = "trap 'echo got-term; exit 3' TERM; echo $$; while :; do sleep 0.05; done"
        run = await box.spawn(ExecRequest(argv=("/bin/sh", "-c", script), env=ENV, timeout_ms=20_000))
        first = b""
        async for _stream, data in run.chunks():
            first += data
            if first.endswith(b"\n"):
                break
        await run.kill(signal.SIGTERM)  # to the process group: the command handles it
        result = await run.wait()
        assert result.exit_code == 3, result
        # ``pid`` is set once the "started" report is read (it may trail the output).
        assert int(first) == run.pid  # the command's pid, not its warm exec child's


async def test_sigkill_of_a_spawned_command_kills_what_left_its_session() -> None:
    async with sandbox(SandboxPolicy.basic()) as box:
        run = await box.spawn(
            ExecRequest(argv=("/bin/sh", "-c", "setsid sleep 300 & sleep 300"), env=ENV, timeout_ms=20_000)
        )
        await asyncio.sleep(0.3)
        await run.kill(signal.SIGKILL)
        result = await run.wait()
        assert result.exit_code == 128 + signal.SIGKILL and not result.timed_out
        left = await sh(box, "ps -eo comm= 2>/dev/null || ls /proc | grep -c '^[0-9]'")
        assert b"sleep" not in left.stdout, left.stdout


async def test_exit_statuses_pass_through_the_warm_child_unchanged() -> None:
    async with sandbox(SandboxPolicy.strict()) as box:
        cases = {"exit 0": 0, "exit 7": 7, "kill -TERM $$": 128 + signal.SIGTERM, "kill -SEGV $$": 128 + 11}
        for script, code in cases.items():
            await asyncio.sleep(0.03)
            result = await sh(box, script)
            assert result.exit_code == code, (script, result)
        missing = await box.exec(ExecRequest(argv=("no-such-command",), env=ENV))
        assert missing.exit_code == 127 and b"No such file" in missing.stderr
        not_executable = await box.exec(ExecRequest(argv=("/etc/hostname",), env=ENV))
        assert not_executable.exit_code == 126, not_executable


async def test_the_waiting_parent_keeps_its_fds_and_killing_it_does_not_change_the_result() -> None:
    # The warm exec child waits for the command as its parent. It is non-dumpable (its
    # socket is out of the command's reach) and, if the command kills it (same uid), init
    # reports the command's own exit instead.
    async with sandbox(SandboxPolicy.strict()) as box:
        await asyncio.sleep(0.05)
        script = "ls /proc/$PPID/fd >/dev/null 2>&1 && echo fds-open; kill -KILL $PPID; sleep 0.2; echo alive; exit 5"
        result = await sh(box, script)
        assert (result.exit_code, result.stdout) == (5, b"alive\n"), result


async def test_a_command_cannot_signal_the_exec_server_nor_the_commands_of_other_execs() -> None:
    # Each command runs in its own Landlock domain nested below the server's (ABI >= 6
    # scopes signals): SIGSTOP to the server would stall every later exec; a signal to
    # another exec's process would let one command end another.
    async with sandbox(SandboxPolicy.strict()) as box:
        stop = await sh(box, "kill -STOP $PPID && echo stopped || echo refused; kill -KILL $PPID || echo refused")
        assert stop.stdout == b"refused\nrefused\n", stop
        assert (await sh(box, "echo next")).stdout == b"next\n"
        daemon = await sh(box, "sleep 300 >/dev/null 2>&1 & echo $!")
        pid = daemon.stdout.decode().strip()
        other = await sh(box, f"kill -TERM {pid} && echo killed || echo refused; test -d /proc/{pid} && echo alive")
        assert other.stdout == b"refused\nalive\n", other


async def test_commands_of_a_killed_exec_server_are_still_reported_and_a_new_server_serves() -> None:
    async with sandbox(SandboxPolicy.basic()) as box:
        server = await _server_pid(box)
        run = await box.spawn(ExecRequest(argv=("/bin/sh", "-c", "sleep 0.5; echo done; exit 7"), env=ENV))
        await asyncio.sleep(0.2)
        os.kill(server, signal.SIGKILL)  # from the host: the command is init's to report now
        result = await run.wait()
        assert (result.exit_code, result.stdout) == (7, b"done\n"), result
        for _ in range(3):
            assert (await sh(box, "echo served")).stdout == b"served\n"
        assert await _server_pid(box) != server


async def test_a_command_sent_to_a_server_that_dies_before_reading_it_is_reported_not_lost() -> None:
    async with sandbox(SandboxPolicy.basic()) as box:
        server = await _server_pid(box)
        os.kill(server, signal.SIGSTOP)  # it cannot read the command
        spawning = asyncio.ensure_future(box.spawn(ExecRequest(argv=("/bin/echo", "never"), env=ENV)))
        await asyncio.sleep(0.1)
        assert not spawning.done()  # spawn returns once the command started (or could not)
        os.kill(server, signal.SIGKILL)
        run = await asyncio.wait_for(spawning, 10)
        result = await asyncio.wait_for(run.wait(), 10)
        assert result.exit_code == 128 + signal.SIGKILL and result.stdout == b"" and not result.timed_out, result
        assert (await sh(box, "echo served")).stdout == b"served\n"


async def test_creation_fails_with_a_clear_error_when_the_spawner_is_wedged(monkeypatch: pytest.MonkeyPatch) -> None:
    from kavach.backends.process import driver
    from kavach.backends.process.client import Spawner
    from kavach.errors import SandboxCreateError

    async with sandbox(SandboxPolicy.minimal()):
        pass  # the spawner is up
    monkeypatch.setattr(driver, "CREATE_DEADLINE_S", 0.5)
    spawner = Spawner.get().pid
    os.kill(spawner, signal.SIGSTOP)
    try:
        with pytest.raises(SandboxCreateError, match=r"fork reply within 0\.5 s"):
            async with sandbox(SandboxPolicy.minimal()):
                pass
    finally:
        os.kill(spawner, signal.SIGCONT)
    async with sandbox(SandboxPolicy.minimal()) as box:  # the spawner serves again
        assert (await sh(box, "echo fine")).stdout == b"fine\n"


async def test_a_command_cannot_reach_the_abstract_unix_socket_of_another_exec() -> None:
    listen = (
        "import socket, time\n"
        "s = socket.socket(socket.AF_UNIX); s.bind('\\0kavach-test-abstract'); s.listen(1)\n"
        "print('listening', flush=True); time.sleep(30)\n"
    )
    connect = (
        "import socket\n"
        "s = socket.socket(socket.AF_UNIX)\n"
        "try:\n    s.connect('\\0kavach-test-abstract'); print('connected')\n"
        "except OSError as e:\n    print('refused', e.errno)\n"
    )
    # Landlock (strict; basic does not enable it) scopes abstract sockets to each command's domain.
    async with sandbox(SandboxPolicy.strict()) as box:
        server = await box.spawn(ExecRequest(argv=("/usr/bin/python3", "-c", listen), env=ENV, timeout_ms=20_000))
        async for _stream, data in server.chunks():
            if b"listening" in data:
                break
        other = await box.exec(ExecRequest(argv=("/usr/bin/python3", "-c", connect), env=ENV, timeout_ms=20_000))
        assert other.stdout.startswith(b"refused"), other
        await server.kill(signal.SIGKILL)
        await server.wait()
