"""Pre-warmed sandboxes: :class:`SandboxPool`.

A pool keeps ``size`` sandboxes of one :class:`~kavach.config.SandboxConfig` created ahead
(namespaces, mounts, cgroup, init and its pre-confined exec child already built), so that
:meth:`SandboxPool.claim` hands one out at once. It refills in the background.

Rules:

* a claimed sandbox belongs to its claimant; :meth:`SandboxPool.release` destroys it,
  unless the pool was made with ``reuse=True``, when it goes back to the pool until it has
  served ``max_uses`` claimants (state in /tmp and the workdir then carries over: only for
  callers that trust each other);
* a warm sandbox older than ``max_lifetime_s`` or no longer running is destroyed instead of
  handed out (the health check), and replaced;
* when the pool is empty, :meth:`claim` creates a sandbox on demand;
* the refill starts ``refill_delay_s`` after a claim, so that it does not compete with the
  claimant's first command for the CPU;
* every method is safe to call from many asyncio tasks of one event loop.

Use it as ``async with SandboxPool(config, size=4) as pool: async with pool.lease() as sb: ...``.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from types import TracebackType

from kavach.backends.base import Driver
from kavach.config import SandboxConfig
from kavach.errors import KavachError, PolicyError
from kavach.lifecycle import Sandbox, SandboxState

HealthCheck = Callable[[Sandbox], Awaitable[bool]]


@dataclass
class _Entry:
    sandbox: Sandbox
    created: float
    uses: int = 0


@dataclass(frozen=True)
class PoolStats:
    """Counters for monitoring a pool."""

    warm: int
    leased: int
    created: int
    claimed_warm: int
    claimed_cold: int
    discarded: int


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _check_int(name: str, value: object, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise PolicyError(name, value, f"must be an integer >= {minimum}")


class SandboxPool:
    """A pool of pre-created sandboxes of one configuration (see the module docstring)."""

    def __init__(
        self,
        config: SandboxConfig | None = None,
        size: int = 4,
        *,
        reuse: bool = False,
        max_uses: int = 1,
        max_lifetime_s: float | None = 600.0,
        health_check: HealthCheck | None = None,
        driver: Driver | None = None,
        concurrency: int = 2,
        refill_delay_s: float = 0.1,
    ) -> None:
        _check_int("pool.size", size, 0)
        _check_int("pool.max_uses", max_uses, 1)
        _check_int("pool.concurrency", concurrency, 1)
        # NaN compares false with everything: a NaN lifetime would never expire a sandbox.
        if max_lifetime_s is not None and not (_is_number(max_lifetime_s) and 0 < max_lifetime_s < math.inf):
            raise PolicyError("pool.max_lifetime_s", max_lifetime_s, "must be a positive number of seconds, or None")
        if not (_is_number(refill_delay_s) and 0 <= refill_delay_s < math.inf):
            raise PolicyError("pool.refill_delay_s", refill_delay_s, "must be a finite number of seconds >= 0")
        self.config = config or SandboxConfig()
        self.size = size
        self.reuse = reuse
        self.max_uses = max_uses if reuse else 1
        self.max_lifetime_s = max_lifetime_s
        self._health_check = health_check
        # Creating a sandbox is CPU work in several processes; right after a claim it would
        # compete with the claimant's first command, so the refill waits this long.
        self.refill_delay_s = refill_delay_s
        self._driver = driver
        self._warm: deque[_Entry] = deque()
        self._leased: dict[int, _Entry] = {}
        self._creating = 0
        self._create_slots = asyncio.Semaphore(concurrency)
        self._wake = asyncio.Event()
        self._refill_timer: asyncio.TimerHandle | None = None
        self._refiller: asyncio.Task[None] | None = None
        self._closed = False
        self._last_error: BaseException | None = None
        self._created = self._claimed_warm = self._claimed_cold = self._discarded = 0

    # -- lifecycle ---------------------------------------------------------------------------

    async def start(self) -> None:
        """Fill the pool to ``size`` now and start the background refill."""
        self._check_open()
        await self.replenish()
        if self._refiller is None:
            self._refiller = asyncio.create_task(self._refill_loop(), name="kavach-pool-refill")

    async def close(self) -> None:
        """Stop refilling and destroy every sandbox of the pool, warm and leased."""
        self._closed = True
        if self._refill_timer is not None:
            self._refill_timer.cancel()
            self._refill_timer = None
        if self._refiller is not None:
            self._refiller.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._refiller
            self._refiller = None
        entries = [*self._warm, *self._leased.values()]
        self._warm.clear()
        self._leased.clear()
        await asyncio.gather(*(self._destroy(entry) for entry in entries))

    async def __aenter__(self) -> SandboxPool:
        await self.start()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    # -- claiming ----------------------------------------------------------------------------

    async def claim(self) -> Sandbox:
        """A running sandbox for the caller alone: a warm one at once, or a new one if none is warm."""
        self._check_open()
        while self._warm:
            entry = self._warm.popleft()
            self._schedule_refill()
            try:
                healthy = await self._healthy(entry)
            except BaseException:
                # Cancelled (or a failing health check): the entry is still the pool's, not
                # lost with this claim (close() destroys what the pool holds).
                self._warm.appendleft(entry)
                raise
            if healthy:
                self._claimed_warm += 1
                return self._lease(entry)
            await self._discard(entry)
        self._schedule_refill()
        entry = await self._create()
        self._claimed_cold += 1
        return self._lease(entry)

    async def release(self, sandbox: Sandbox) -> None:
        """Give a claimed sandbox back: destroyed, or returned warm when reuse allows it."""
        entry = self._leased.pop(id(sandbox), None)
        if entry is None:
            raise KavachError(f"sandbox {sandbox.id} was not claimed from this pool")
        if self.reuse and not self._closed and entry.uses < self.max_uses:
            try:
                healthy = await self._healthy(entry)
            except BaseException:
                self._leased[id(sandbox)] = entry  # still leased, still the pool's to destroy
                raise
            if healthy:
                self._warm.append(entry)
                return
        await self._destroy(entry)
        self._schedule_refill()

    @contextlib.asynccontextmanager
    async def lease(self) -> AsyncIterator[Sandbox]:
        """``async with pool.lease() as sandbox``: claim, then release on exit (even on error)."""
        sandbox = await self.claim()
        try:
            yield sandbox
        finally:
            await self.release(sandbox)

    async def replenish(self) -> None:
        """Create sandboxes until ``size`` are warm (creation errors propagate)."""
        self._check_open()
        missing = self.size - len(self._warm) - self._creating
        if missing <= 0:
            return
        tasks = [asyncio.ensure_future(self._create()) for _ in range(missing)]
        try:
            entries = await asyncio.gather(*tasks, return_exceptions=True)
        except asyncio.CancelledError:
            await self._destroy_finished(tasks)
            raise
        errors = [e for e in entries if isinstance(e, BaseException)]
        for entry in entries:
            if isinstance(entry, _Entry):
                if self._closed:
                    await self._destroy(entry)
                else:
                    self._warm.append(entry)
        if errors:
            raise errors[0]

    async def _destroy_finished(self, tasks: list[asyncio.Task[_Entry]]) -> None:
        """After a cancelled replenish: destroy the sandboxes its finished creations made.

        Cancelling the gather cancelled the creations still under way (each cleans up after
        itself); one that had already finished made a sandbox that only the cancelled call
        knew of, which would otherwise run until the interpreter exits.
        """
        for task in tasks:
            task.cancel()  # (no effect on finished ones)
        await asyncio.wait(tasks)
        for task in tasks:
            if not task.cancelled() and task.exception() is None:
                await self._destroy(task.result())

    @property
    def stats(self) -> PoolStats:
        """Current counters."""
        return PoolStats(
            warm=len(self._warm),
            leased=len(self._leased),
            created=self._created,
            claimed_warm=self._claimed_warm,
            claimed_cold=self._claimed_cold,
            discarded=self._discarded,
        )

    @property
    def last_error(self) -> BaseException | None:
        """The last error of the background refill (it retries with a pause)."""
        return self._last_error

    # -- internals ---------------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise KavachError("the sandbox pool is closed")

    def _schedule_refill(self) -> None:
        """Wake the refill ``refill_delay_s`` from now (once, however many claims come meanwhile).

        A timer, not an immediate wake-up: the refill task does not even run while the
        claimant's first command is in flight, so the claim path costs no extra task switches.
        """
        if self._refill_timer is not None or self._closed:
            return
        self._refill_timer = asyncio.get_running_loop().call_later(self.refill_delay_s, self._refill_due)

    def _refill_due(self) -> None:
        self._refill_timer = None
        self._wake.set()

    def _lease(self, entry: _Entry) -> Sandbox:
        entry.uses += 1
        self._leased[id(entry.sandbox)] = entry
        return entry.sandbox

    async def _create(self) -> _Entry:
        self._creating += 1
        try:
            async with self._create_slots:
                sandbox = await Sandbox.create(self.config, driver=self._driver)
        finally:
            self._creating -= 1
        self._created += 1
        return _Entry(sandbox, time.monotonic())

    async def _healthy(self, entry: _Entry) -> bool:
        if entry.sandbox.state is not SandboxState.RUNNING:
            return False
        if self.max_lifetime_s is not None and time.monotonic() - entry.created > self.max_lifetime_s:
            return False
        return self._health_check is None or await self._health_check(entry.sandbox)

    async def _discard(self, entry: _Entry) -> None:
        self._discarded += 1
        await self._destroy(entry)

    async def _destroy(self, entry: _Entry) -> None:
        with contextlib.suppress(KavachError):
            # Already destroyed or broken sandboxes raise; the pool only needs them gone.
            await entry.sandbox.destroy()

    async def _refill_loop(self) -> None:
        while not self._closed:
            timeout = None if self.max_lifetime_s is None else max(self.max_lifetime_s / 4, 0.5)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout)
            self._wake.clear()
            await self._expire_old()
            try:
                await self.replenish()
                self._last_error = None
            except KavachError as exc:
                self._last_error = exc
                await asyncio.sleep(1.0)  # the host is short of something; do not spin

    async def _expire_old(self) -> None:
        for entry in list(self._warm):
            if not await self._healthy(entry):
                with contextlib.suppress(ValueError):
                    self._warm.remove(entry)
                    await self._discard(entry)


__all__ = ["HealthCheck", "PoolStats", "SandboxPool"]
