"""OCI backend benchmark: kavach's runc sandboxes against bare runc, in the same run.

Measures p50/p95 (milliseconds) of

* bare ``runc run`` of ``/bin/true`` (a minimal rootful bundle: runc spec + read-only binds of
  /usr, /bin, /lib*; runc deletes it when it exits), the anchor for creation;
* kavach OCI create + exec ``/bin/true`` + destroy (basic policy: user namespace, seccomp,
  cgroup limits, enforcement probe, bundle removal);
* bare ``runc exec`` of ``/bin/true`` into a running bare container, the anchor for exec;
* kavach exec of ``/bin/true`` in an existing sandbox (basic and strict: strict adds the
  launcher for Landlock);

and prints the ratios kavach / bare runc. Needs root and runc. Run once:

    .venv/bin/python benchmarks/bench_oci.py [--iterations N]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

from kavach.backends.base import ExecRequest, LaunchSpec
from kavach.backends.oci import OciDriver
from kavach.policy import SandboxPolicy

RUNC = shutil.which("runc") or "runc"
TRUE = ExecRequest(argv=("/bin/true",), env={"PATH": "/usr/bin:/bin"})


def percentiles(samples: list[float]) -> tuple[float, float]:
    ordered = sorted(samples)
    p95 = ordered[min(len(ordered) - 1, round(0.95 * (len(ordered) - 1)))]
    return statistics.median(ordered), p95


def bare_bundle(base: Path, args: list[str]) -> Path:
    bundle = base / "bundle"
    (bundle / "rootfs").mkdir(parents=True, exist_ok=True)
    subprocess.run([RUNC, "spec", "--bundle", str(bundle)], check=True)
    config = json.loads((bundle / "config.json").read_text())
    config["process"]["terminal"] = False
    config["process"]["args"] = args
    for path in ("/usr", "/bin", "/lib", "/lib64", "/sbin"):
        if os.path.islink(path):
            (bundle / "rootfs" / path.lstrip("/")).symlink_to(os.readlink(path))
        elif os.path.isdir(path):
            config["mounts"].append({"destination": path, "type": "bind", "source": path, "options": ["rbind", "ro"]})
    (bundle / "config.json").write_text(json.dumps(config))
    return bundle


def time_sync(fn: Callable[[], None], n: int) -> list[float]:
    samples = []
    for _ in range(n):
        started = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - started) * 1000)
    return samples


async def time_async(fn: Callable[[], Awaitable[None]], n: int) -> list[float]:
    samples = []
    for _ in range(n):
        started = time.perf_counter()
        await fn()
        samples.append((time.perf_counter() - started) * 1000)
    return samples


def row(name: str, samples: list[float]) -> tuple[float, float]:
    p50, p95 = percentiles(samples)
    print(f"  {name:<48} p50 {p50:8.1f} ms   p95 {p95:8.1f} ms   (n={len(samples)})")
    return p50, p95


async def main(iterations: int) -> int:
    if os.geteuid() != 0:
        print("bench_oci: needs root (runc as root, cgroup limits)", file=sys.stderr)
        return 2
    version = subprocess.run([RUNC, "--version"], capture_output=True, text=True, check=True).stdout.split()[2]
    print(f"OCI backend benchmark: runc {version}, {os.cpu_count()} CPUs, {iterations} iterations each")
    with tempfile.TemporaryDirectory(prefix="bench-oci-") as tmp:
        base = Path(tmp)
        state = str(base / "state")
        true_bundle = bare_bundle(base / "true", ["/bin/true"])
        counter = iter(range(10**9))

        def bare_run() -> None:
            subprocess.run(
                [RUNC, "--root", state, "run", "--bundle", str(true_bundle), f"bare-{next(counter)}"],
                check=True,
                stdin=subprocess.DEVNULL,
            )

        bare_run()  # warm the page cache
        bare_create = time_sync(bare_run, iterations)

        sleeper = bare_bundle(base / "sleep", ["/bin/sleep", "1000"])
        subprocess.run(
            [RUNC, "--root", state, "run", "-d", "--bundle", str(sleeper), "bare-long"],
            check=True,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            bare_exec = time_sync(
                lambda: subprocess.run([RUNC, "--root", state, "exec", "bare-long", "/bin/true"], check=True),
                iterations,
            )
        finally:
            subprocess.run([RUNC, "--root", state, "delete", "--force", "bare-long"], check=False)

        driver = OciDriver()

        async def kavach_cycle() -> None:
            instance = await driver.start(LaunchSpec(f"bench-{next(counter)}", SandboxPolicy.basic()))
            try:
                result = await instance.exec(TRUE)
                assert result.exit_code == 0, result
            finally:
                await instance.destroy()

        await kavach_cycle()
        kavach_create = await time_async(kavach_cycle, iterations)

        exec_rows = {}
        for label, policy in (
            ("basic", SandboxPolicy.basic()),
            ("strict (Landlock via launcher)", SandboxPolicy.strict()),
        ):
            instance = await driver.start(LaunchSpec(f"bench-exec-{next(counter)}", policy))
            try:

                async def one_exec(instance=instance) -> None:  # type: ignore[no-untyped-def]
                    result = await instance.exec(TRUE)
                    assert result.exit_code == 0, result

                await one_exec()
                exec_rows[label] = await time_async(one_exec, iterations)
            finally:
                await instance.destroy()

    print("create + exec /bin/true + destroy")
    bare_c = row("bare runc run /bin/true", bare_create)
    kav_c = row("kavach OCI (basic) create+exec+destroy", kavach_create)
    print("exec /bin/true in a running container")
    bare_e = row("bare runc exec", bare_exec)
    kav_e = {label: row(f"kavach OCI exec, {label}", samples) for label, samples in exec_rows.items()}
    print("ratios (kavach / bare runc, p50)")
    print(f"  create+exec+destroy: {kav_c[0] / bare_c[0]:.2f}x")
    for label, (p50, _p95) in kav_e.items():
        print(f"  exec, {label}: {p50 / bare_e[0]:.2f}x")
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--iterations", type=int, default=30)
    sys.exit(asyncio.run(main(parser.parse_args().iterations)))
