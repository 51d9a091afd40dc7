"""SandboxPool over real Process sandboxes (kavach.Sandbox on the native engine)."""

from __future__ import annotations

import asyncio
import dataclasses

import pytest

from kavach.backends.names import Backend
from kavach.backends.process import ProcessDriver
from kavach.config import SandboxConfig
from kavach.errors import KavachError, PolicyError
from kavach.lifecycle import Sandbox, SandboxState
from kavach.policy import SandboxPolicy
from kavach.pool import SandboxPool

pytestmark = pytest.mark.skipif(not ProcessDriver().probe().available, reason="Process backend unavailable here")


def _config() -> SandboxConfig:
    return SandboxConfig(backend=Backend.PROCESS, policy=SandboxPolicy.basic())


async def test_claim_is_served_warm_and_the_pool_refills() -> None:
    async with SandboxPool(_config(), size=2) as pool:
        assert pool.stats.warm == 2
        async with pool.lease() as sandbox:
            assert sandbox.state is SandboxState.RUNNING
            result = await sandbox.exec(["echo", "pooled"])
            assert result.stdout == b"pooled\n"
        assert pool.stats.claimed_warm == 1
        for _ in range(100):
            if pool.stats.warm == 2:
                break
            await asyncio.sleep(0.05)
        assert pool.stats.warm == 2


async def test_sandboxes_are_not_reused_across_claimants() -> None:
    async with SandboxPool(_config(), size=1) as pool:
        first = await pool.claim()
        await first.exec(["sh", "-c", "echo secret > /tmp/left-behind"])
        await pool.release(first)
        assert first.state is SandboxState.DESTROYED
        second = await pool.claim()
        assert second.id != first.id
        result = await second.exec(["sh", "-c", "cat /tmp/left-behind || echo absent"])
        assert b"absent" in result.stdout
        await pool.release(second)


async def test_reuse_when_configured_up_to_max_uses() -> None:
    async with SandboxPool(_config(), size=1, reuse=True, max_uses=2) as pool:
        first = await pool.claim()
        await pool.release(first)
        again = await pool.claim()
        assert again is first
        await pool.release(again)
        assert first.state is SandboxState.DESTROYED
        third = await pool.claim()
        assert third is not first
        await pool.release(third)


async def test_expired_and_dead_warm_entries_are_not_handed_out() -> None:
    async with SandboxPool(_config(), size=1, max_lifetime_s=0.2) as pool:
        await asyncio.sleep(0.4)
        sandbox = await pool.claim()
        assert sandbox.state is SandboxState.RUNNING
        assert pool.stats.discarded >= 1
        await pool.release(sandbox)
    async with SandboxPool(_config(), size=1, max_lifetime_s=None) as pool:
        warm = pool._warm[0].sandbox
        await warm.destroy()  # dies while warm
        sandbox = await pool.claim()
        assert sandbox is not warm and sandbox.state is SandboxState.RUNNING
        await pool.release(sandbox)


async def test_empty_pool_creates_on_demand() -> None:
    async with SandboxPool(_config(), size=0) as pool:
        async with pool.lease() as sandbox:
            assert (await sandbox.exec(["true"])).exit_code == 0
        assert pool.stats.claimed_cold == 1


async def test_many_tasks_claim_distinct_sandboxes() -> None:
    async with SandboxPool(_config(), size=2) as pool:

        async def use() -> str:
            async with pool.lease() as sandbox:
                await sandbox.exec(["true"])
                return sandbox.id

        ids = await asyncio.gather(*(use() for _ in range(6)))
        assert len(set(ids)) == 6


async def test_close_destroys_warm_and_leased_sandboxes() -> None:
    pool = SandboxPool(_config(), size=2)
    await pool.start()
    warm = [entry.sandbox for entry in pool._warm]
    leased = await pool.claim()
    await pool.close()
    for sandbox in (*warm, leased):
        assert sandbox.state is SandboxState.DESTROYED
    with pytest.raises(KavachError):
        await pool.claim()


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("size", 2.5),
        ("size", True),
        ("concurrency", float("nan")),
        ("max_uses", 0),
        # NaN compares false with everything: such a lifetime would never expire a sandbox.
        ("max_lifetime_s", float("nan")),
        ("max_lifetime_s", float("inf")),
        ("max_lifetime_s", 0),
        ("refill_delay_s", float("nan")),
        ("refill_delay_s", float("inf")),
        ("refill_delay_s", -1),
    ],
)
def test_bad_pool_arguments_are_refused_naming_them(field: str, value: object) -> None:
    with pytest.raises(PolicyError) as info:
        SandboxPool(_config(), **{field: value})  # type: ignore[arg-type]
    assert info.value.field == f"pool.{field}"


async def test_foreign_sandbox_release_and_bad_arguments_are_refused() -> None:
    with pytest.raises(PolicyError):
        SandboxPool(_config(), size=-1)
    with pytest.raises(PolicyError):
        SandboxPool(_config(), max_uses=0)
    async with SandboxPool(_config(), size=0) as pool:
        stranger = await Sandbox.create(dataclasses.replace(_config()))
        try:
            with pytest.raises(KavachError):
                await pool.release(stranger)
        finally:
            await stranger.destroy()


async def test_a_warm_claim_never_suspends_and_the_refill_waits_for_its_delay() -> None:
    """Claiming from a warm pool is plain bookkeeping: the coroutine finishes in one step (no
    I/O, no await that yields), and the refill is woken only once refill_delay_s has passed."""
    async with SandboxPool(_config(), size=2, refill_delay_s=1.0) as pool:
        coroutine = pool.claim()
        with pytest.raises(StopIteration) as done:
            coroutine.send(None)
        sandbox = done.value.value
        assert isinstance(sandbox, Sandbox) and pool.stats.claimed_warm == 1
        await asyncio.sleep(0.05)
        assert pool.stats.warm == 1 and pool.stats.created == 2  # not refilled yet
        for _ in range(100):
            if pool.stats.warm == 2:
                break
            await asyncio.sleep(0.05)
        assert pool.stats.warm == 2 and pool.stats.created == 3
        await pool.release(sandbox)


async def test_close_during_a_refill_destroys_the_sandboxes_it_already_made(monkeypatch: pytest.MonkeyPatch) -> None:
    # A refill creates several sandboxes at once; close() cancels it. One creation that had
    # finished by then made a sandbox only the refill knew of: it must be destroyed, not left
    # running (its init alive until the interpreter exits).
    made: list[Sandbox] = []
    calls: list[int] = []
    first_made = asyncio.Event()
    real_create = Sandbox.create.__func__  # type: ignore[attr-defined]

    async def create(cls: type[Sandbox], /, config: SandboxConfig, **kwargs: object) -> Sandbox:
        calls.append(1)
        if len(calls) > 1:
            await asyncio.Event().wait()  # a creation still under way when close() comes
        sandbox: Sandbox = await real_create(cls, config, **kwargs)
        made.append(sandbox)
        first_made.set()
        return sandbox

    monkeypatch.setattr(Sandbox, "create", classmethod(create))
    pool = SandboxPool(_config(), size=2)
    refill = asyncio.create_task(pool.replenish())
    await asyncio.wait_for(first_made.wait(), 30)
    await asyncio.sleep(0)
    pool._refiller = refill  # as the background refill would hold it
    await pool.close()
    assert len(made) == 1
    assert made[0].state is SandboxState.DESTROYED


async def test_a_claim_or_release_cancelled_in_the_health_check_loses_no_sandbox() -> None:
    checking = asyncio.Event()
    block = asyncio.Event()

    async def slow_check(_sandbox: Sandbox) -> bool:
        checking.set()
        await block.wait()
        return True

    pool = SandboxPool(_config(), size=2, reuse=True, max_uses=3, health_check=slow_check, refill_delay_s=60)
    await pool.start()
    created = [entry.sandbox for entry in pool._warm]
    # A claim cancelled while the health check runs: its entry goes back to the pool.
    claim = asyncio.create_task(pool.claim())
    await asyncio.wait_for(checking.wait(), 10)
    claim.cancel()
    with pytest.raises(asyncio.CancelledError):
        await claim
    assert pool.stats.warm == 2
    # A release cancelled while the health check runs: the sandbox stays leased.
    block.set()
    leased = await pool.claim()
    block.clear()
    checking.clear()
    release = asyncio.create_task(pool.release(leased))
    await asyncio.wait_for(checking.wait(), 10)
    release.cancel()
    with pytest.raises(asyncio.CancelledError):
        await release
    assert pool.stats.leased == 1
    await pool.close()
    assert {s.state for s in created} == {SandboxState.DESTROYED}
