"""Process backend benchmark: latency and idle memory against anchors measured in the same run.

Run: ``.venv/bin/python benchmarks/bench_process.py [--runs N] [--idle 50] [--idle-only]`` (as root
or a user); ``--idle-only`` measures only the idle memory, in a caller that did nothing before.

Prints p50/p95 of
  * bare ``subprocess.run(["/bin/true"])`` (the floor: one fork+exec from Python),
  * ``bwrap --unshare-all ... /bin/true`` (bubblewrap, the reference sandbox),
  * kavach create+exec+destroy of /bin/true through the raw driver (``ProcessDriver``; policy
    minimal, which keeps the host network; minimal with network "off", which has the same
    namespaces as ``bwrap --unshare-all`` and is the one compared with it; and basic) and
    through ``kavach.Sandbox`` with its defaults (basic policy, integrity probe exec at
    create, gate, fsync'd audit log), back to back and 50 ms apart,
  * exec of /bin/true in an existing sandbox through the raw driver, back to back (the next
    warm exec child is still being prepared when the next command comes) and 20 ms apart
    (it is ready), for basic and strict,
  * exec in an existing ``kavach.Sandbox`` and, paired with the driver's exec of the same
    request in the same sandbox, what the Sandbox layer adds (guards, gate, audit),
  * pool claim+exec through ``kavach.Sandbox`` (gate and audit included), with the default
    fsync'd audit log and with ``fsync=False``,
and the PSS of 50 idle sandboxes, with the ratios to the targets of issue 3. Every row runs
with every control of its policy enforced: the driver verifies them at create (and fails
otherwise), and the script checks the enforcement record of the sandboxes it measures.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import functools
import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from kavach.backends.base import ExecRequest, LaunchSpec
from kavach.backends.names import Backend
from kavach.backends.process import ProcessDriver, ProcessInstance
from kavach.config import AuditSettings, SandboxConfig
from kavach.lifecycle import Sandbox
from kavach.policy import NetworkMode, NetworkPolicy, ResourceLimits, SandboxPolicy
from kavach.pool import SandboxPool
from kavach.scoring import Control

TRUE = ExecRequest(argv=("/bin/true",), env={})
BWRAP = [
    "bwrap",
    "--unshare-all",
    "--die-with-parent",
    "--ro-bind",
    "/usr",
    "/usr",
    "--symlink",
    "usr/bin",
    "/bin",
    "--symlink",
    "usr/lib",
    "/lib",
    "--symlink",
    "usr/lib64",
    "/lib64",
    "--symlink",
    "usr/sbin",
    "/sbin",
    "--proc",
    "/proc",
    "--dev",
    "/dev",
    "--tmpfs",
    "/tmp",
    "/bin/true",
]


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def report(name: str, values: list[float]) -> float:
    p50, p95 = pct(values, 0.5), pct(values, 0.95)
    print(f"{name:<50} p50 {p50:8.2f} ms   p95 {p95:8.2f} ms   (n={len(values)})")
    return p50


def timed_sync(fn: Callable[[], object], runs: int) -> list[float]:
    fn()
    out = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        out.append((time.perf_counter() - start) * 1000)
    return out


async def timed_apart(instance: ProcessInstance, runs: int) -> list[float]:
    """exec latency when the previous command ended 20 ms earlier (the warm child is ready)."""
    await instance.exec(TRUE)
    out = []
    for _ in range(runs):
        await asyncio.sleep(0.02)
        start = time.perf_counter()
        await instance.exec(TRUE)
        out.append((time.perf_counter() - start) * 1000)
    return out


async def timed(fn: Callable[[], Awaitable[object]], runs: int, warmup: int = 2) -> list[float]:
    for _ in range(warmup):
        await fn()
    out = []
    for _ in range(runs):
        start = time.perf_counter()
        await fn()
        out.append((time.perf_counter() - start) * 1000)
    return out


def spec(policy: SandboxPolicy) -> LaunchSpec:
    return LaunchSpec(sandbox_id=f"bench-{uuid.uuid4().hex[:10]}", policy=policy)


def expected_controls(policy: SandboxPolicy) -> set[Control]:
    """The scored controls ``policy`` asks for (the driver fails creation if one is missing)."""
    wanted = set()
    if policy.network.mode is not NetworkMode.HOST:
        wanted.add(Control.NETWORK_ISOLATED)
    if policy.seccomp.profile.value != "none":
        wanted.add(Control.SECCOMP)
    if policy.landlock.enabled:
        wanted.add(Control.LANDLOCK)
    if policy.filesystem.read_only_root:
        wanted.add(Control.READ_ONLY_ROOT)
    r = policy.resources
    if r.memory is not None or r.pids is not None or r.cpus is not None:
        wanted.add(Control.RESOURCE_LIMITS)
    return wanted


def check_enforced(instance: ProcessInstance, policy: SandboxPolicy) -> None:
    """Refuse to report numbers for a sandbox that runs with less than its policy asks."""
    enforcement = instance.enforcement()
    missing = expected_controls(policy) - set(enforcement.controls)
    if missing or not enforcement.verified or enforcement.degraded:
        raise SystemExit(f"bench: sandbox not fully enforced: missing {missing}, degraded {enforcement.degraded}")


def pss_kib(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    return int(line.split()[1])
    except OSError:
        return 0
    return 0


def pids_in_pid_ns(ns: str) -> list[int]:
    found = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                if os.readlink(f"/proc/{name}/ns/pid") == ns:
                    found.append(int(name))
            except OSError:
                continue
    return found


async def idle_pss(driver: ProcessDriver, policy: SandboxPolicy, count: int) -> float:
    """Print and return the PSS per idle sandbox (MiB) with ``count`` sandboxes alive."""
    instances: list[ProcessInstance] = []
    try:
        for _ in range(count):
            instances.append(await driver.start(spec(policy)))
            check_enforced(instances[-1], policy)
        await asyncio.sleep(0.5)
        total = 0
        for instance in instances:
            total += sum(pss_kib(p) for p in pids_in_pid_ns(instance.enforcement().details["namespaces"]["pid"]))
        from kavach.backends.process.client import Spawner

        spawner_pss = pss_kib(Spawner.get().pid)
        per_sandbox = total / len(instances) / 1024
        print(
            f"{'idle PSS per sandbox (' + str(count) + ' alive)':<50} {per_sandbox:8.2f} MiB"
            f"   (init + exec server; spawner {spawner_pss / 1024:.2f} MiB once)"
        )
        return per_sandbox
    finally:
        await asyncio.gather(*(i.destroy() for i in instances))


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=40)
    parser.add_argument("--idle", type=int, default=50)
    parser.add_argument(
        "--idle-only", action="store_true", help="only the idle PSS row, in a fresh caller (nothing measured before)"
    )
    args = parser.parse_args()
    runs = args.runs
    driver = ProcessDriver()
    print(f"kernel {os.uname().release}, {os.cpu_count()} cpus, uid {os.geteuid()}, runs {runs}")
    print(driver.probe().reason)
    limits_ok = os.geteuid() == 0
    basic = (
        SandboxPolicy.basic() if limits_ok else dataclasses.replace(SandboxPolicy.basic(), resources=ResourceLimits())
    )
    if args.idle_only:
        await idle_pss(driver, basic, args.idle)
        return

    bare = report("bare subprocess.run(/bin/true)", timed_sync(lambda: subprocess.run(["/bin/true"], check=True), runs))
    bwrap = None
    if shutil.which("bwrap"):
        bwrap = report("bwrap --unshare-all /bin/true", timed_sync(lambda: subprocess.run(BWRAP, check=True), runs))

    async def cycle(policy: SandboxPolicy) -> None:
        instance = await driver.start(spec(policy))
        await instance.exec(TRUE)
        await instance.destroy()

    minimal_netns = dataclasses.replace(SandboxPolicy.minimal(), network=NetworkPolicy(mode=NetworkMode.OFF))
    for policy in (SandboxPolicy.minimal(), minimal_netns, basic):
        probe_instance = await driver.start(spec(policy))
        check_enforced(probe_instance, policy)
        await probe_instance.destroy()
    report("driver create+exec+destroy (minimal, host net)", await timed(lambda: cycle(SandboxPolicy.minimal()), runs))
    cycle_minimal = report(
        "driver create+exec+destroy (minimal, net off)", await timed(lambda: cycle(minimal_netns), runs)
    )
    cycle_basic = report("driver create+exec+destroy (basic)", await timed(lambda: cycle(basic), runs))

    audit_dir = tempfile.mkdtemp(prefix="kavach-bench-")

    def sandbox_config(fsync: bool) -> SandboxConfig:
        # Defaults but for where the audit log goes (a temporary file and key).
        return SandboxConfig(
            backend=Backend.PROCESS,
            policy=basic,
            audit=AuditSettings(
                path=os.path.join(audit_dir, f"audit-{uuid.uuid4().hex[:8]}.jsonl"), key=b"k" * 32, fsync=fsync
            ),
        )

    default_config = sandbox_config(fsync=True)

    async def sandbox_cycle() -> None:
        box = await Sandbox.create(default_config)
        await box.exec(["/bin/true"])
        await box.destroy()

    cycle_sandbox = report(
        "Sandbox create+exec+destroy (basic, defaults)", await timed(sandbox_cycle, max(10, runs // 2))
    )

    # How a caller that creates a sandbox now and then sees it: the CPUs were idle, and so
    # were the kernel's locks (an RCU-synchronised one is slow to take after idle).
    idle_samples = []
    for _ in range(max(10, runs // 2)):
        await asyncio.sleep(0.05)
        start = time.perf_counter()
        await sandbox_cycle()
        idle_samples.append((time.perf_counter() - start) * 1000)
    report("Sandbox create+exec+destroy (defaults, 50 ms apart)", idle_samples)

    exec_p50: dict[str, float] = {}
    for name, policy in (("basic", basic), ("strict", SandboxPolicy.strict() if limits_ok else basic)):
        instance = await driver.start(spec(policy))
        check_enforced(instance, policy)

        try:
            exec_p50[name] = report(
                f"driver exec in existing ({name}, back to back)",
                await timed(functools.partial(instance.exec, TRUE), runs * 3, 5),
            )
            report(f"driver exec in existing ({name}, 20 ms apart)", await timed_apart(instance, runs * 2))
        finally:
            await instance.destroy()

    # The Sandbox layer on one exec (guards, argv scrub, gate, audit), measured as the
    # paired difference with the driver's exec of the same request in the same sandbox:
    # separate rows on this machine differ by more than the layer costs.
    for fsync in (True, False):
        box = await Sandbox.create(sandbox_config(fsync))
        try:
            same = box._request(["/bin/true"], stdin=None, env=None, timeout_ms=None, cwd=None)
            layer, direct = [], []
            await box.exec(["/bin/true"])
            for _ in range(runs * 2):
                await asyncio.sleep(0.02)
                start = time.perf_counter()
                await box._instance.exec(same)
                direct.append((time.perf_counter() - start) * 1000)
                await asyncio.sleep(0.02)
                start = time.perf_counter()
                await box.exec(["/bin/true"])
                layer.append((time.perf_counter() - start) * 1000)
            label = "fsync'd audit" if fsync else "audit without fsync"
            report(f"Sandbox exec in existing ({label}, 20 ms apart)", layer)
            added = sorted(a - b for a, b in zip(layer, direct, strict=True))
            print(f"{'  of which the Sandbox layer (paired difference)':<50} p50 {pct(added, 0.5):8.2f} ms")
        finally:
            await box.destroy()

    pool_p50: dict[bool, float] = {}
    for fsync in (True, False):
        async with SandboxPool(sandbox_config(fsync), size=4) as pool:
            samples = []
            for _ in range(min(runs, 30)):
                # Measure a claim from a full, idle pool: the refill and the previous
                # claimant's teardown are finished, as in a pool that keeps up with demand.
                while pool.stats.warm < pool.size or pool.stats.leased:
                    await asyncio.sleep(0.01)
                await asyncio.sleep(0.02)
                start = time.perf_counter()
                sandbox = await pool.claim()
                await sandbox.exec(["/bin/true"])
                samples.append((time.perf_counter() - start) * 1000)
                await pool.release(sandbox)
            label = "defaults, fsync'd audit" if fsync else "audit without fsync"
            pool_p50[fsync] = report(f"pool claim+exec (Sandbox, {label})", samples)
    shutil.rmtree(audit_dir, ignore_errors=True)

    per_sandbox = await idle_pss(driver, basic, args.idle)

    print()
    print("ratios (target in brackets)")

    def ratio(name: str, value: float, target: str = "") -> None:
        print(f"  {name:<54} {value:6.2f}x   {target}")

    if bwrap is not None:
        ratio("driver create+exec+destroy (minimal, net off) / bwrap", cycle_minimal / bwrap, "[<= 1.0x]")
        ratio("driver create+exec+destroy (basic) / bwrap", cycle_basic / bwrap)
        ratio("Sandbox create+exec+destroy (defaults) / bwrap", cycle_sandbox / bwrap)
    ratio(
        "driver exec in existing (basic) / bare", exec_p50["basic"] / bare, f"[p50 <= 2 ms: {exec_p50['basic']:.2f} ms]"
    )
    for fsync, label in ((True, "defaults"), (False, "audit without fsync")):
        ratio(f"pool claim+exec ({label}) / bare", pool_p50[fsync] / bare, f"[p50 <= 2 ms: {pool_p50[fsync]:.2f} ms]")
    ratio("idle PSS per sandbox / 4 MiB", per_sandbox / 4, f"[<= 4 MiB: {per_sandbox:.2f} MiB]")


if __name__ == "__main__":
    asyncio.run(main())
