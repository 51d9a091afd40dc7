"""Process backend benchmark: latency and idle memory against anchors measured in the same run.

Run: ``.venv/bin/python benchmarks/bench_process.py [--runs N] [--idle 50]`` (as root or a user).

Prints p50/p95 of
  * bare ``subprocess.run(["/bin/true"])`` (the floor: one fork+exec from Python),
  * ``bwrap --unshare-all ... /bin/true`` (bubblewrap, the reference sandbox),
  * kavach create+exec+destroy of /bin/true (policy minimal = namespaces like bwrap's, and basic),
  * exec of /bin/true in an existing sandbox (basic and strict),
  * pool claim+exec through ``kavach.Sandbox`` (gate and audit included; audit without fsync),
and the PSS of 50 idle sandboxes, with the ratios to the targets of issue 3.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
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
from kavach.policy import ResourceLimits, SandboxPolicy
from kavach.pool import SandboxPool

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
    print(f"{name:<44} p50 {p50:8.2f} ms   p95 {p95:8.2f} ms   (n={len(values)})")
    return p50


def timed_sync(fn: Callable[[], object], runs: int) -> list[float]:
    fn()
    out = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
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


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=40)
    parser.add_argument("--idle", type=int, default=50)
    args = parser.parse_args()
    runs = args.runs
    driver = ProcessDriver()
    print(f"kernel {os.uname().release}, {os.cpu_count()} cpus, uid {os.geteuid()}, runs {runs}")
    print(driver.probe().reason)
    limits_ok = os.geteuid() == 0
    basic = (
        SandboxPolicy.basic() if limits_ok else dataclasses.replace(SandboxPolicy.basic(), resources=ResourceLimits())
    )

    bare = report("bare subprocess.run(/bin/true)", timed_sync(lambda: subprocess.run(["/bin/true"], check=True), runs))
    bwrap = None
    if shutil.which("bwrap"):
        bwrap = report("bwrap --unshare-all /bin/true", timed_sync(lambda: subprocess.run(BWRAP, check=True), runs))

    async def cycle(policy: SandboxPolicy) -> None:
        instance = await driver.start(spec(policy))
        await instance.exec(TRUE)
        await instance.destroy()

    cycle_minimal = report(
        "kavach create+exec+destroy (minimal)", await timed(lambda: cycle(SandboxPolicy.minimal()), runs)
    )
    cycle_basic = report("kavach create+exec+destroy (basic)", await timed(lambda: cycle(basic), runs))

    exec_p50: dict[str, float] = {}
    for name, policy in (("basic", basic), ("strict", SandboxPolicy.strict() if limits_ok else basic)):
        instance = await driver.start(spec(policy))
        try:
            exec_p50[name] = report(
                f"kavach exec in existing sandbox ({name})", await timed(lambda i=instance: i.exec(TRUE), runs * 3, 5)
            )
        finally:
            await instance.destroy()

    with tempfile.TemporaryDirectory() as audit_dir:
        config = SandboxConfig(
            backend=Backend.PROCESS,
            policy=basic,
            audit=AuditSettings(path=os.path.join(audit_dir, "audit.jsonl"), key=b"k" * 32, fsync=False),
        )
        async with SandboxPool(config, size=4) as pool:
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
            pool_p50 = report("pool claim+exec (kavach.Sandbox, warm)", samples)

    instances: list[ProcessInstance] = []
    try:
        for _ in range(args.idle):
            instances.append(await driver.start(spec(basic)))
        await asyncio.sleep(0.5)
        total = 0
        for instance in instances:
            total += sum(pss_kib(p) for p in pids_in_pid_ns(instance.enforcement().details["namespaces"]["pid"]))
        from kavach.backends.process.client import Spawner

        spawner_pss = pss_kib(Spawner.get().pid)
        per_sandbox = total / len(instances) / 1024
        print(
            f"{'idle PSS per sandbox (' + str(args.idle) + ' alive)':<44} {per_sandbox:8.2f} MiB"
            f"   (init + warm exec child; spawner {spawner_pss / 1024:.2f} MiB once)"
        )
    finally:
        await asyncio.gather(*(i.destroy() for i in instances))

    print()
    print("ratios (target in brackets)")
    if bwrap is not None:
        print(f"  create+exec+destroy minimal / bwrap   {cycle_minimal / bwrap:6.2f}x   [<= 1.0x]")
        print(f"  create+exec+destroy basic / bwrap     {cycle_basic / bwrap:6.2f}x")
    print(
        f"  exec in existing (basic) / bare        {exec_p50['basic'] / bare:6.2f}x"
        f"   [p50 <= 2 ms: {exec_p50['basic']:.2f} ms]"
    )
    print(f"  pool claim+exec / bare                 {pool_p50 / bare:6.2f}x   [p50 <= 2 ms: {pool_p50:.2f} ms]")
    print(f"  idle PSS per sandbox                   {per_sandbox / 4:6.2f}x   [<= 4 MiB: {per_sandbox:.2f} MiB]")


if __name__ == "__main__":
    asyncio.run(main())
