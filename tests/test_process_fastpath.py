"""The Process backend's exec fast path: warm children, their hand-over and what kills them.

These check behaviour the speed-ups must keep (no timing is asserted here; timing lives in
``benchmarks/bench_process.py``).
"""

from __future__ import annotations

import asyncio
import signal

from kavach.backends.base import ExecRequest
from kavach.policy import SandboxPolicy
from process_helpers import ENV, sandbox, sh


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
