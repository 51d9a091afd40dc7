"""The Process backend's exec fast path: warm children, their hand-over and what kills them.

These check behaviour the speed-ups must keep (no timing is asserted here; timing lives in
``benchmarks/bench_process.py``).
"""

from __future__ import annotations

import asyncio

from kavach.policy import SandboxPolicy
from process_helpers import sandbox, sh


async def test_a_command_right_after_a_killall_runs_and_is_not_lost() -> None:
    async with sandbox(SandboxPolicy.basic()) as box:
        for _ in range(5):
            await asyncio.sleep(0.05)  # a warm exec child is offered and at hand
            # killall kills that warm child; the next command must not be handed to it.
            box.kill_everything()
            result = await sh(box, "echo again")
            assert (result.exit_code, result.stdout, result.timed_out) == (0, b"again\n", False), result
