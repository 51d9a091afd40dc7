"""The OCI backend started by an unprivileged user (runc's rootless mode), with real runc.

The test drops to uid/gid 65534 with ``setpriv`` and runs a small script with Debian's
``/usr/bin/python3`` and kavach's source on PYTHONPATH: the project venv's interpreter lives
under /root, which that user cannot read.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import textwrap
from pathlib import Path

import pytest

import kavach
from kavach.backends.oci.runtime import probe_runc
from process_helpers import FORKS

SRC = str(Path(kavach.__file__).resolve().parents[1])


def _debian_python_can_import_kavach() -> bool:
    done = subprocess.run(
        ["/usr/bin/python3", "-c", "import kavach.backends.oci"],
        env={"PYTHONPATH": SRC, "PATH": "/usr/bin:/bin"},
        capture_output=True,
        check=False,
    )
    return done.returncode == 0


pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root to switch to an unprivileged user"),
    pytest.mark.skipif(shutil.which("setpriv") is None, reason="setpriv (util-linux) is not installed"),
    pytest.mark.skipif(not probe_runc().usable, reason="runc unusable"),
    pytest.mark.skipif(
        not os.path.exists("/usr/bin/python3") or not _debian_python_can_import_kavach(),
        reason="Debian's python3 cannot import kavach's dependencies (PyYAML)",
    ),
]

SCRIPT = textwrap.dedent(
    """
    import asyncio, dataclasses, json, os, sys
    from kavach.backends.base import ExecRequest, LaunchSpec
    from kavach.backends.oci import OciDriver
    from kavach.errors import SandboxCreateError
    from kavach.policy import ResourceLimits, SandboxPolicy

    async def main():
        out = {"uid": os.geteuid()}
        driver = OciDriver()
        out["state_base"] = driver.state_base
        probe = driver.probe()
        out["probe"] = [probe.available, probe.resource_limits, probe.reason]
        try:
            await driver.start(LaunchSpec(f"rl-limits-{os.getpid()}", SandboxPolicy.basic()))
            out["limits"] = "started"
        except SandboxCreateError as exc:
            out["limits"] = str(exc)
        # Allowed to degrade: it runs without the limits (runc is not asked for them) and says so.
        basic = SandboxPolicy.basic()
        limits = dataclasses.replace(basic.resources, pids=16)
        degraded = dataclasses.replace(basic, allow_degraded=True, resources=limits)
        instance = await driver.start(LaunchSpec(f"rl-degraded-{os.getpid()}", degraded))
        try:
            enforcement = instance.enforcement()
            out["degraded"] = [sorted(c.value for c in enforcement.controls), list(enforcement.degraded)]
            out["nproc"] = enforcement.details.get("rlimit_nproc")
            result = await instance.exec(ExecRequest(argv=("id", "-u"), env={"PATH": "/usr/bin:/bin"}))
            out["degraded_run"] = [result.exit_code, result.stdout.decode().strip()]
            forks = await instance.exec(ExecRequest(argv=("/usr/bin/python3", "-c", sys.argv[1], "40"),
                                                    env={"PATH": "/usr/bin:/bin"}, timeout_ms=30000))
            out["forks"] = forks.stdout.decode().split()
        finally:
            await instance.destroy()
        from kavach.backends import registry
        out["auto"] = [
            registry.resolve_best(SandboxPolicy.strict()).value,
            registry.resolve_best(dataclasses.replace(SandboxPolicy.strict(), allow_degraded=True)).value,
        ]
        policy = dataclasses.replace(SandboxPolicy.basic(), resources=ResourceLimits())
        instance = await driver.start(LaunchSpec(f"rl-{os.getpid()}", policy))
        try:
            out["controls"] = sorted(c.value for c in instance.enforcement().controls)
            result = await instance.exec(ExecRequest(argv=("cat", "/proc/self/uid_map"), env={"PATH": "/usr/bin:/bin"}))
            out["uid_map"] = result.stdout.decode().split()
            timed = await instance.exec(
                ExecRequest(argv=("sh", "-c", "sleep 100 & sleep 100"), env={"PATH": "/usr/bin:/bin"}, timeout_ms=300)
            )
            out["timeout"] = [timed.timed_out, timed.exit_code, instance.live_pids()]
        finally:
            await instance.destroy()
        out["left"] = os.listdir(driver.bundle_base)
        print(json.dumps(out))

    asyncio.run(main())
    """
)


def test_unprivileged_user_gets_a_rootless_sandbox() -> None:
    done = subprocess.run(
        ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "/usr/bin/python3", "-c", SCRIPT, FORKS],
        env={"PYTHONPATH": SRC, "PATH": "/usr/sbin:/usr/bin:/bin", "HOME": "/tmp"},
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
        cwd="/tmp",
    )
    assert done.returncode == 0, done.stderr[-2000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert out["uid"] == 65534 and out["state_base"] == "/tmp/kavach-65534"
    assert "resource limits need a cgroup" in out["limits"]  # fail closed, not silently unlimited
    assert "no cgroup v1 subtree is delegated to uid 65534" in out["limits"]
    # ... and says how to get the limits (test_oci_delegated) or run anyway
    assert "`kavach cgroups delegate nobody`" in out["limits"] and "allow_degraded" in out["limits"]
    # Usable, but the probe tells automatic selection that it cannot apply limits here.
    assert out["probe"][:2] == [True, False] and "resource limits only with allow_degraded" in out["probe"][2]
    assert "`kavach cgroups delegate nobody`" in out["probe"][2]
    # With allow_degraded it runs without the cgroup, listed as degraded and not scored; the
    # pids limit still holds as RLIMIT_NPROC in the container's user namespace.
    assert out["degraded"] == [
        ["network_isolated", "read_only_root", "seccomp"],
        ["resource_limits (no cgroup: rootless on cgroup v1; pids by RLIMIT_NPROC 16; memory not limited)"],
    ]
    assert out["nproc"] == 16
    assert out["degraded_run"] == [0, "0"]
    made, refused, processes = (int(x) for x in out["forks"])
    assert refused > 0 and made + refused == 40
    assert processes <= 16  # every process of the container counts, init and the exec wrapper too
    # Auto-selection skips it for limits it would refuse, and takes it when degrading is allowed.
    assert out["auto"] == ["process", "oci"]
    assert out["controls"] == ["network_isolated", "read_only_root", "seccomp"]
    assert out["uid_map"] == ["0", "65534", "1"]  # root inside is the unprivileged caller
    assert out["timeout"] == [True, 137, 1]  # found by pid namespace, not the session's cgroup
    assert out["left"] == []
